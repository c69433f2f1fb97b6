// Run-time choice of the instruction set for the CPU hot loops.
//
// The tile epilogues are compute-bound (exp and softplus polynomials), so the
// hot functions are compiled twice: for the build's baseline ISA and, on x86
// with GCC or clang, for AVX2 + FMA (8 float lanes instead of 4), picked once at
// run time. INFOMAX_EXT_NO_AVX2=1 forces the baseline (the tests run both).
#pragma once

#include <cstdlib>
#include <cstring>

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define INFOMAX_HAVE_AVX2_CLONES 1
#define INFOMAX_TARGET_AVX2 __attribute__((target("avx2,fma")))
#else
#define INFOMAX_TARGET_AVX2
#endif

// Functions inlined into both clones must be inlined, or the AVX2 clone would
// call the baseline code.
#define INFOMAX_CPU_INLINE inline __attribute__((always_inline))

namespace infomax_ext {
namespace cpu {

inline bool use_avx2() {
#ifdef INFOMAX_HAVE_AVX2_CLONES
  static const bool on = [] {
    const char* off = std::getenv("INFOMAX_EXT_NO_AVX2");
    const bool disabled = off && off[0] && std::strcmp(off, "0") != 0;
    return !disabled && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return on;
#else
  return false;
#endif
}

}  // namespace cpu
}  // namespace infomax_ext
