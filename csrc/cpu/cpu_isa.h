// Run-time choice of the instruction set for the CPU hot loops.
//
// The tile epilogues are compute-bound (exp and softplus polynomials), so the hot
// functions are compiled three times: for the build's baseline ISA and, on x86 with
// GCC or clang, for AVX2 + FMA (8 float lanes) and for AVX-512 (16 lanes), one of
// them picked once at run time. INFOMAX_EXT_CPU_ISA=base|avx2|avx512 caps the choice
// (the tests run each); INFOMAX_EXT_NO_AVX2=1 is the same as base.
#pragma once

#include <cstdlib>
#include <cstring>

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define INFOMAX_HAVE_X86_CLONES 1
#define INFOMAX_TARGET_AVX2 __attribute__((target("avx2,fma")))
// NB: prefer-vector-width=512, or GCC's generic tuning may keep the loops 256 bits wide.
#define INFOMAX_TARGET_AVX512 \
  __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,prefer-vector-width=512")))
#else
#define INFOMAX_TARGET_AVX2
#define INFOMAX_TARGET_AVX512
#endif

// Functions inlined into the clones must be inlined, or a clone would call the
// baseline code.
#define INFOMAX_CPU_INLINE inline __attribute__((always_inline))
// The same for a lambda handed to a hot loop (range_sum's f). NB: GCC may otherwise
// keep the lambda out of line once the clone around it grows, and call it per element
// from a scalar loop (measured: 2.4x the op's time at K = M = 256).
#define INFOMAX_CPU_INLINE_LAMBDA __attribute__((always_inline))

// Defines NAME_base, NAME_avx2 and NAME_avx512, three compilations of the call
// BODY ARGS (a function template forced inline), with parameters PARAMS and the
// template parameters given last; INFOMAX_CPU_PICK(NAME, template args) takes the
// one for this CPU.
#define INFOMAX_CPU_CLONES(NAME, BODY, PARAMS, ARGS, ...)                           \
  template <__VA_ARGS__>                                                              \
  void NAME##_base PARAMS {                                                           \
    BODY ARGS;                                                                        \
  }                                                                                   \
  template <__VA_ARGS__>                                                              \
  INFOMAX_TARGET_AVX2 void NAME##_avx2 PARAMS {                                       \
    BODY ARGS;                                                                        \
  }                                                                                   \
  template <__VA_ARGS__>                                                              \
  INFOMAX_TARGET_AVX512 void NAME##_avx512 PARAMS {                                   \
    BODY ARGS;                                                                        \
  }
#define INFOMAX_CPU_PICK(NAME, ...) \
  ::infomax_ext::cpu::for_cpu(&NAME##_base<__VA_ARGS__>, &NAME##_avx2<__VA_ARGS__>, &NAME##_avx512<__VA_ARGS__>)

namespace infomax_ext {
namespace cpu {

enum class Isa : int { kBase = 0, kAvx2 = 1, kAvx512 = 2 };

inline const char* isa_name(Isa isa) {
  return isa == Isa::kAvx512 ? "avx512" : isa == Isa::kAvx2 ? "avx2" : "base";
}

// The widest ISA both this CPU and the environment's cap allow.
inline Isa cpu_isa() {
  static const Isa isa = [] {
    Isa cap = Isa::kAvx512;
    const char* no_avx2 = std::getenv("INFOMAX_EXT_NO_AVX2");
    if (no_avx2 && no_avx2[0] && std::strcmp(no_avx2, "0") != 0) cap = Isa::kBase;
    const char* want = std::getenv("INFOMAX_EXT_CPU_ISA");
    if (want && std::strcmp(want, "base") == 0) cap = Isa::kBase;
    if (want && std::strcmp(want, "avx2") == 0 && cap > Isa::kAvx2) cap = Isa::kAvx2;
    Isa have = Isa::kBase;
#ifdef INFOMAX_HAVE_X86_CLONES
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) have = Isa::kAvx2;
    if (have == Isa::kAvx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl"))
      have = Isa::kAvx512;
#endif
    return have < cap ? have : cap;
  }();
  return isa;
}

template <typename Fn>
Fn for_cpu(Fn base, Fn avx2, Fn avx512) {
  switch (cpu_isa()) {
    case Isa::kAvx512:
      return avx512;
    case Isa::kAvx2:
      return avx2;
    default:
      return base;
  }
}

}  // namespace cpu
}  // namespace infomax_ext
