// Per-element math of the fused score reductions, shared by the CPU and CUDA
// walkers. Raw scalars only (no at::Tensor) so that host and device compile
// the very same lines: a change to the numerics here changes both backends.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define INFOMAX_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define INFOMAX_HOST_DEVICE inline
#endif

namespace infomax_ext {

using std::exp;
using std::log;
using std::log1p;

// Bits of the `reductions` argument: which streaming reductions of S to compute.
enum Reduction : int64_t {
  kRowLse = 1,        // logsumexp over all columns of row i            -> (K,)
  kColLse = 2,        // logsumexp over all rows of column j            -> (M,)
  kNegLse = 4,        // logsumexp over the negatives of row i          -> (K,)
  kNegClampLse = 8,   // logsumexp over clamp(S, -tau, tau), negatives  -> (K,)
  kNegSoftplus = 16,  // sum of softplus(S) over the negatives of row i -> (K,)
  kAllReductions = 31,
};

template <typename T>
INFOMAX_HOST_DEVICE T neg_infinity() {
  return -INFINITY;
}

// A running log-sum-exp as (max, sum of exp(x - max)).
template <typename T>
struct LseState {
  T max;
  T sum;
};

template <typename T>
INFOMAX_HOST_DEVICE LseState<T> lse_empty() {
  return LseState<T>{neg_infinity<T>(), T(0)};
}

// Merge two partial states in log space.
// NB: when both maxima are -inf (every entry masked) the rescale factors would
// be exp(-inf - -inf) = exp(NaN); the guard keeps the state empty instead.
template <typename T>
INFOMAX_HOST_DEVICE LseState<T> lse_merge(LseState<T> x, LseState<T> y) {
  const T m = x.max > y.max ? x.max : y.max;
  if (m == neg_infinity<T>()) return lse_empty<T>();
  return LseState<T>{m, x.sum * exp(x.max - m) + y.sum * exp(y.max - m)};
}

// Fold a single value into a running state (online softmax update).
template <typename T>
INFOMAX_HOST_DEVICE LseState<T> lse_push(LseState<T> s, T x) {
  if (x <= s.max) {
    // NB: x == s.max == -inf lands here; exp(-inf - -inf) would be NaN.
    return s.max == neg_infinity<T>() ? s : LseState<T>{s.max, s.sum + exp(x - s.max)};
  }
  return LseState<T>{x, s.sum * exp(s.max - x) + T(1)};
}

// NB: an empty state (no entries, or all -inf) finalises to -inf, not NaN.
template <typename T>
INFOMAX_HOST_DEVICE T lse_finalize(LseState<T> s) {
  return s.max == neg_infinity<T>() ? neg_infinity<T>() : s.max + log(s.sum);
}

// exp(x - lse), the softmax weight of x in a reduction whose result is lse.
// NB: x = -inf (a masked entry) has weight 0 even when lse is -inf too.
template <typename T>
INFOMAX_HOST_DEVICE T softmax_weight(T x, T lse) {
  return x == neg_infinity<T>() ? T(0) : exp(x - lse);
}

// log(1 + exp(x)) without overflow for large x or loss of precision for very negative x.
template <typename T>
INFOMAX_HOST_DEVICE T softplus(T x) {
  return x > T(0) ? x + log1p(exp(-x)) : log1p(exp(x));
}

template <typename T>
INFOMAX_HOST_DEVICE T sigmoid(T x) {
  // NB: both branches only ever exponentiate a non-positive number.
  if (x >= T(0)) return T(1) / (T(1) + exp(-x));
  const T e = exp(x);
  return e / (T(1) + e);
}

template <typename T>
INFOMAX_HOST_DEVICE T clamp_tau(T x, T tau) {
  return x < -tau ? -tau : (x > tau ? tau : x);
}

// The score of one pair from its dot product.
template <typename T>
INFOMAX_HOST_DEVICE T score_from_dot(T dot, T scale, T row_bias, T col_bias) {
  return scale * dot + row_bias + col_bias;
}

// Upstream gradients of the five reductions and the statistics saved by the
// forward pass, for one row i (the column ones are passed per element).
template <typename T>
struct RowGrad {
  T g_row, row_lse;        // d/d row_lse_i, row_lse_i
  T g_neg, neg_lse;        // d/d neg_lse_i, neg_lse_i
  T g_clamp, clamp_lse;    // d/d neg_clamp_lse_i, neg_clamp_lse_i
  T g_softplus;            // d/d neg_softplus_i
};

// dL/dS_ij for one element of S: the sum over the requested reductions of
// (upstream gradient) * (derivative of the reduction w.r.t. S_ij).
// Reductions that were not requested carry a zero upstream gradient and are skipped.
template <typename T>
INFOMAX_HOST_DEVICE T score_grad(T s, bool is_pos, const RowGrad<T>& r, T g_col, T col_lse,
                                 T tau, int64_t reductions) {
  T g = T(0);
  if ((reductions & kRowLse) && r.g_row != T(0)) g += r.g_row * softmax_weight(s, r.row_lse);
  if ((reductions & kColLse) && g_col != T(0)) g += g_col * softmax_weight(s, col_lse);
  if (is_pos) return g;
  if ((reductions & kNegLse) && r.g_neg != T(0)) g += r.g_neg * softmax_weight(s, r.neg_lse);
  // NB: like torch.clamp, the clamp passes gradient on the closed interval [-tau, tau].
  if ((reductions & kNegClampLse) && r.g_clamp != T(0) && s >= -tau && s <= tau)
    g += r.g_clamp * exp(s - r.clamp_lse);
  if ((reductions & kNegSoftplus) && r.g_softplus != T(0)) g += r.g_softplus * sigmoid(s);
  return g;
}

}  // namespace infomax_ext
