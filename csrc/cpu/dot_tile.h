// The dot-product tile of S = scale * A B^T + row_bias + col_bias for the CPU
// walkers: one BLAS call (gemm, into the thread's tile buffer) plus the
// bias epilogue. Shared by score_reduce and symmetric_softmax_mean.
#pragma once

#include <ATen/ops/addmm.h>
#include <ATen/ops/from_blob.h>
#include <ATen/record_function.h>
#include <dlfcn.h>

#include <algorithm>
#include <climits>
#include <cstring>
#include <type_traits>

#include "reduce_walker.h"

namespace infomax_ext {
namespace cpu {

// A BLAS function of the library torch was built with, looked up in libtorch_cpu and
// what it links (nullptr: absent), not in whatever the process loaded first.
inline void* torch_blas_symbol(const char* name) {
  static void* const lib = dlopen("libtorch_cpu.so", RTLD_NOW | RTLD_NOLOAD);
  return lib ? dlsym(lib, name) : nullptr;
}

// bfloat16 x bfloat16 -> float32 GEMM with float32 accumulation (row-major, C = alpha
// op(A) op(B) + beta C), where the BLAS torch links has one: MKL's
// cblas_gemm_bf16bf16f32, found at run time (nullptr: none; the bf16 inputs are then
// upcast like float16). It runs on AVX-512 BF16 / AMX units, about 3.5x a float32
// GEMM here, and ATen has no CPU matmul with a float32 output for bf16 inputs.
// INFOMAX_EXT_NO_BF16_GEMM=1 turns it off (the tests run both).
using Bf16Gemm = void (*)(int, int, int, int, int, int, float, const void*, int, const void*, int, float, float*,
                          int);
inline Bf16Gemm bf16_gemm() {
  static const Bf16Gemm fn = [] {
    const char* off = std::getenv("INFOMAX_EXT_NO_BF16_GEMM");
    if (off && off[0] && std::strcmp(off, "0") != 0) return Bf16Gemm(nullptr);
    return reinterpret_cast<Bf16Gemm>(torch_blas_symbol("cblas_gemm_bf16bf16f32"));
  }();
  return fn;
}
constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;  // the CBLAS enums

// C[m, n] (+)= op(A) op(B) in float32 from bf16 operands; leading dimensions given.
inline void gemm_bf16(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const at::BFloat16* A,
                      int64_t lda, const at::BFloat16* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  bf16_gemm()(kRowMajor, ta ? kTrans : kNoTrans, tb ? kTrans : kNoTrans, int(m), int(n), int(k), alpha, A, int(lda),
              B, int(ldb), beta, C, int(ldc));
}

// The Fortran GEMM of the BLAS torch links (MKL or OpenBLAS export sgemm_ / dgemm_),
// found at run time; nullptr: none (then gemm goes through at::addmm_out).
// INFOMAX_EXT_NO_BLAS_GEMM=1 turns it off (the tests run both).
template <typename T>
using FortranGemm = void (*)(const char*, const char*, const int*, const int*, const int*, const T*, const T*,
                             const int*, const T*, const int*, const T*, T*, const int*);
template <typename T>
FortranGemm<T> fortran_gemm() {
  static const FortranGemm<T> fn = [] {
    const char* off = std::getenv("INFOMAX_EXT_NO_BLAS_GEMM");
    if (off && off[0] && std::strcmp(off, "0") != 0) return FortranGemm<T>(nullptr);
    return reinterpret_cast<FortranGemm<T>>(torch_blas_symbol(std::is_same_v<T, float> ? "sgemm_" : "dgemm_"));
  }();
  return fn;
}

// Row-major C[m, n] = alpha op(A) op(B) + beta C on raw pointers (leading dimensions
// given; beta = 0 never reads C). NB: straight to the BLAS when torch exposes it: an
// at::addmm_out with its views costs several dispatcher calls, and at K = M = 256 the
// op's three GEMMs are a few hundred microseconds, so those calls were a visible share.
// Column-major BLAS computes the transposed product C^T = op(B)^T op(A)^T in place.
template <typename T>
void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, T alpha, const T* A, int64_t lda, const T* B,
          int64_t ldb, T beta, T* C, int64_t ldc) {
  if (m == 0 || n == 0) return;
  // NB: named in profiles (a few nanoseconds when none runs), as ATen's own GEMMs are.
  RECORD_FUNCTION("infomax_ext::gemm", std::vector<c10::IValue>());
  const FortranGemm<T> fn = fortran_gemm<T>();
  if (fn && std::max({m, n, k, lda, ldb, ldc}) <= INT_MAX) {
    const int M = int(m), N = int(n), Kd = int(k), la = int(lda), lb = int(ldb), lc = int(ldc);
    fn(tb ? "T" : "N", ta ? "T" : "N", &N, &M, &Kd, &alpha, B, &lb, A, &la, &beta, C, &lc);
    return;
  }
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  const auto view = [&](const T* p, bool t, int64_t rows, int64_t cols, int64_t ld) {
    const Tensor x = at::from_blob(const_cast<T*>(p), {t ? cols : rows, t ? rows : cols}, {ld, 1}, opts);
    return t ? x.t() : x;
  };
  Tensor c = at::from_blob(C, {m, n}, {ldc, 1}, opts);
  at::addmm_out(c, c, view(A, ta, m, k, lda), view(B, tb, k, n, ldb), beta, alpha);
}

// Writes the scores S[i0:i0+tk, j0:j0+tm] into buf and returns a pointer to them.
template <typename T>
struct DotTile {
  const Tensor& A;    // (K, d) in the accumulation dtype
  const Tensor& B;    // (M, d)
  const Tensor& A16;  // (K, d) bfloat16 for bf16_gemm, or undefined
  const Tensor& B16;  // (M, d)
  const T* row_bias;  // (K,) or nullptr
  const T* col_bias;  // (M,) or nullptr
  T scale;

  // The tile from bf16_gemm when the inputs kept bf16 copies; false: not done.
  bool bf16_tile(T* s, int64_t i0, int64_t tk, int64_t j0, int64_t tm) const {
    if constexpr (std::is_same_v<T, float>) {
      if (!A16.defined()) return false;
      const int64_t d = A16.size(1);
      gemm_bf16(false, true, tk, tm, d, scale, A16.data_ptr<at::BFloat16>() + i0 * d, d,
                B16.data_ptr<at::BFloat16>() + j0 * d, d, 0.0f, s, tm);
      return true;
    }
    return false;
  }

  T* operator()(Tensor& buf, int64_t i0, int64_t tk, int64_t j0, int64_t tm) const {
    // NB: the scale rides on the GEMM (alpha; beta = 0 never reads the buffer), so
    // without biases no pass over the tile is needed.
    T* s = buf.data_ptr<T>();
    const int64_t d = A.size(1);
    if (!bf16_tile(s, i0, tk, j0, tm))
      gemm<T>(false, true, tk, tm, d, scale, A.data_ptr<T>() + i0 * d, d, B.data_ptr<T>() + j0 * d, d, T(0), s, tm);
    if (!row_bias && !col_bias) return s;
    for (int64_t r = 0; r < tk; ++r) {
      const T rb = row_bias ? row_bias[i0 + r] : T(0);
      T* row = s + r * tm;
      for (int64_t c = 0; c < tm; ++c)
        row[c] = score_from_dot(row[c], T(1), rb, col_bias ? col_bias[j0 + c] : T(0));
    }
    return s;
  }
};

struct DotInputs {
  Tensor A, B, rb, cb;  // contiguous, accumulation dtype; biases undefined if absent
  at::ScalarType acc;
  Tensor A16, B16;      // bf16 inputs kept for bf16_gemm (undefined otherwise)
};

inline DotInputs dot_inputs(const Tensor& a, const Tensor& b, const OptTensor& row_bias,
                            const OptTensor& col_bias) {
  const auto acc = acc_dtype(a.scalar_type());
  // NB: low-precision inputs are upcast once (O((K+M) d)) so every tile is
  // multiplied and reduced in float32. detach(): the worker threads of
  // parallel_for do not inherit the below-autograd dispatch state, and the
  // BLAS calls there must not see tensors that require grad.
  // NB: one tensor in both roles (NT-Xent's z against z, the symmetric op's x) and one
  // bias on both sides are converted once.
  const Tensor A = as_acc(a, acc);
  const Tensor rb = bias_acc(row_bias, acc);
  const bool same_bias = has(row_bias) && has(col_bias) && row_bias->is_same(*col_bias);
  DotInputs in{A, b.is_same(a) ? A : as_acc(b, acc), rb, same_bias ? rb : bias_acc(col_bias, acc),
               acc};
  // NB: bf16 inputs keep their bf16 copies for the GEMMs (float32 accumulation and
  // output); the statistics and gradients stay float32. int sizes: CBLAS's LP64 ints.
  if (a.scalar_type() == at::kBFloat16 && bf16_gemm() && std::max(a.numel(), b.numel()) < INT_MAX) {
    in.A16 = a.detach().contiguous();
    in.B16 = b.is_same(a) ? in.A16 : b.detach().contiguous();
  }
  return in;
}

template <typename T>
DotTile<T> dot_tile(const DotInputs& in, const Tensor& scale) {
  return DotTile<T>{in.A, in.B, in.A16, in.B16, in.rb.defined() ? in.rb.data_ptr<T>() : nullptr,
                    in.cb.defined() ? in.cb.data_ptr<T>() : nullptr,
                    static_cast<T>(scale.item<double>())};
}

}  // namespace cpu
}  // namespace infomax_ext
