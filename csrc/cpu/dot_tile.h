// The dot-product tile of S = scale * A B^T + row_bias + col_bias for the CPU
// walkers: one BLAS call (at::mm_out into the thread's tile buffer) plus the
// bias epilogue. Shared by score_reduce and symmetric_softmax_mean.
#pragma once

#include <ATen/ops/addmm.h>

#include "reduce_walker.h"

namespace infomax_ext {
namespace cpu {

// Writes the scores S[i0:i0+tk, j0:j0+tm] into buf and returns a pointer to them.
template <typename T>
struct DotTile {
  const Tensor& A;    // (K, d) in the accumulation dtype
  const Tensor& B;    // (M, d)
  const T* row_bias;  // (K,) or nullptr
  const T* col_bias;  // (M,) or nullptr
  T scale;

  T* operator()(Tensor& buf, int64_t i0, int64_t tk, int64_t j0, int64_t tm) const {
    Tensor out = buf.narrow(0, 0, tk * tm).view({tk, tm});
    // NB: the scale rides on the GEMM (alpha; beta = 0 never reads the buffer), so
    // without biases no pass over the tile is needed.
    at::addmm_out(out, out, A.narrow(0, i0, tk), B.narrow(0, j0, tm).t(), 0, scale);
    T* s = out.data_ptr<T>();
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
  const Tensor A = a.detach().to(acc).contiguous();
  const Tensor rb = bias_acc(row_bias, acc);
  const bool same_bias = has(row_bias) && has(col_bias) && row_bias->is_same(*col_bias);
  return DotInputs{A, b.is_same(a) ? A : b.detach().to(acc).contiguous(), rb,
                   same_bias ? rb : bias_acc(col_bias, acc), acc};
}

template <typename T>
DotTile<T> dot_tile(const DotInputs& in, const Tensor& scale) {
  return DotTile<T>{in.A, in.B, in.rb.defined() ? in.rb.data_ptr<T>() : nullptr,
                    in.cb.defined() ? in.cb.data_ptr<T>() : nullptr,
                    static_cast<T>(scale.item<double>())};
}

}  // namespace cpu
}  // namespace infomax_ext
