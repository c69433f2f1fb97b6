// Host-side argument checks shared by the CPU and CUDA entry points of
// concat_score_reduce, so both backends reject bad input with the same messages.
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

#include "infomax_ext/concat_math.h"
#include "score_reduce_common.h"

namespace infomax_ext {

using Tensor4 = std::tuple<Tensor, Tensor, Tensor, Tensor>;

inline void check_concat_args(const Tensor& P, const Tensor& Q, const Tensor& w2, const Tensor& b2,
                              int64_t activation, int64_t pos_offset, int64_t reductions, double clamp_tau) {
  TORCH_CHECK(P.dim() == 2, "concat_score_reduce: P must be 2-D (K, H), got ", P.dim(), "-D");
  TORCH_CHECK(Q.dim() == 2, "concat_score_reduce: Q must be 2-D (M, H), got ", Q.dim(), "-D");
  const int64_t K = P.size(0), M = Q.size(0), H = P.size(1);
  TORCH_CHECK(K > 0 && M > 0 && H > 0, "concat_score_reduce: P and Q must be non-empty, got P ",
              P.sizes(), " and Q ", Q.sizes());
  TORCH_CHECK(Q.size(1) == H, "concat_score_reduce: hidden sizes differ: P has H=", H, ", Q has H=",
              Q.size(1));
  TORCH_CHECK(M >= K, "concat_score_reduce: need M >= K (every row has a positive column), got K=", K,
              " (P), M=", M, " (Q)");
  TORCH_CHECK(pos_offset >= 0 && pos_offset <= M - K,
              "concat_score_reduce: pos_offset must be in [0, M-K] = [0, ", M - K, "], got ", pos_offset);
  TORCH_CHECK(w2.dim() == 1 && w2.size(0) == H, "concat_score_reduce: w2 must have shape (H,) = (", H,
              ",), got ", w2.sizes());
  TORCH_CHECK(b2.numel() == 1, "concat_score_reduce: b2 must have one element, got shape ", b2.sizes());
  TORCH_CHECK(P.device() == Q.device() && P.device() == w2.device() && P.device() == b2.device(),
              "concat_score_reduce: P, Q, w2 and b2 must be on one device, got ", P.device(), ", ",
              Q.device(), ", ", w2.device(), ", ", b2.device());
  TORCH_CHECK(at::isFloatingType(P.scalar_type()), "concat_score_reduce: P must be floating point, got ",
              P.scalar_type());
  TORCH_CHECK(P.scalar_type() == Q.scalar_type(), "concat_score_reduce: P and Q dtypes differ: ",
              P.scalar_type(), " vs ", Q.scalar_type());
  TORCH_CHECK(at::isFloatingType(w2.scalar_type()), "concat_score_reduce: w2 must be floating point, got ",
              w2.scalar_type());
  TORCH_CHECK(at::isFloatingType(b2.scalar_type()), "concat_score_reduce: b2 must be floating point, got ",
              b2.scalar_type());
  TORCH_CHECK(valid_activation(activation), "concat_score_reduce: activation must be a code in [0, ",
              int64_t(kNumActivations), ") (relu, elu, tanh, softplus, gelu), got ", activation);
  TORCH_CHECK(reductions > 0 && reductions <= kAllReductions,
              "concat_score_reduce: reductions must be a non-zero bit mask below 32, got ", reductions);
  TORCH_CHECK(!(reductions & kNegClampLse) || clamp_tau > 0,
              "concat_score_reduce: clamp_tau must be > 0, got ", clamp_tau);
}

// _concat_score_reduce_backward's gradients and saved statistics (after check_concat_args).
inline void check_concat_backward_args(const Tensor& g_row, const Tensor& g_col, const Tensor& g_neg,
                                       const Tensor& g_clamp, const Tensor& g_sp, const Tensor& P, const Tensor& Q,
                                       const Tensor& row_lse, const Tensor& col_lse, const Tensor& neg_lse,
                                       const Tensor& clamp_lse, int64_t reductions) {
  check_backward_args("_concat_score_reduce_backward", P, P.size(0), Q.size(0), reductions, g_row, g_col, g_neg,
                      g_clamp, g_sp, row_lse, col_lse, neg_lse, clamp_lse);
}

}  // namespace infomax_ext
