// Per-element math of the fused score reductions, shared by the CPU and CUDA
// walkers. Raw scalars only (no at::Tensor) so that host and device compile
// the very same lines: a change to the numerics here changes both backends.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define INFOMAX_HOST_DEVICE __host__ __device__ __forceinline__
#elif defined(__GNUC__)
// NB: always_inline: a call to vexp left out of line stops GCC from vectorising
// the loop around it ("statement clobbers memory").
#define INFOMAX_HOST_DEVICE inline __attribute__((always_inline))
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

INFOMAX_HOST_DEVICE float int_bits_as_float(int32_t i) {
#if defined(__CUDA_ARCH__)
  return __int_as_float(i);
#else
  // NB: memcpy, not __builtin_bit_cast (GCC >= 11 only): compiles to a register move.
  float f;
  __builtin_memcpy(&f, &i, sizeof(f));
  return f;
#endif
}

INFOMAX_HOST_DEVICE int32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_int(f);
#else
  int32_t i;
  __builtin_memcpy(&i, &f, sizeof(i));
  return i;
#endif
}

// c ? a : b.
// NB: on the host a bit blend, not a ternary: GCC threads a ternary's constant
// arm (a clamp bound, 0, inf) through the math that follows, turns the rest into
// conditional code and then, under the default -ftrapping-math, may not
// if-convert it, so the loop over a tile stays scalar. The blend is straight-line.
INFOMAX_HOST_DEVICE float select(bool c, float a, float b) {
#if defined(__CUDA_ARCH__)
  return c ? a : b;
#else
  const int32_t m = -static_cast<int32_t>(c);
  return int_bits_as_float((float_bits(a) & m) | (float_bits(b) & ~m));
#endif
}

// double is used for exactness (gradcheck), not speed: a plain ternary.
INFOMAX_HOST_DEVICE double select(bool c, double a, double b) { return c ? a : b; }

// exp for the reductions' arguments, which are never positive (x - max,
// x - lse, -|x|). On the device it is the hardware exp. On the host, float uses
// a branch-free Cody-Waite reduction plus a degree-6 polynomial (relative error
// below 1e-7 on x <= 0) so that loops over a tile vectorise, where std::exp would
// stay a scalar libm call; double keeps std::exp (gradcheck precision).
// NB: x < -87.3 gives exactly 0 (no denormals); -inf gives 0; NaN stays NaN;
// x > 88.7 overflows to +inf like std::exp.
INFOMAX_HOST_DEVICE float vexp(float x) {
#if defined(__CUDA_ARCH__) || defined(__HIP_DEVICE_COMPILE__)
  return ::expf(x);
#else
  float xc = select(x < -87.0f, -87.0f, x);
  xc = select(xc > 88.0f, 88.0f, xc);
  // NB: n = round(x / ln 2) by the 1.5 * 2^23 trick: plain adds, so it vectorises
  // even where the ISA has no rounding instruction (needs no -ffast-math).
  const float n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float r = xc - n * 0.693359375f + n * 2.12194440e-4f;  // ln 2 split in two parts
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const float y = p * int_bits_as_float((static_cast<int32_t>(n) + 127) << 23);  // p 2^n
  return select(x < -87.3f, 0.0f, select(x > 88.7f, INFINITY, select(x != x, x, y)));
#endif
}

INFOMAX_HOST_DEVICE double vexp(double x) { return exp(x); }

// log(1 + e) for e in [0, 1] (softplus takes it of exp(-|x|)). On the host, float
// uses log(1 + e) = 2 atanh(z), z = e / (2 + e) <= 1/3, summed to z^13: relative
// error below 1e-7 and no libm call, so it vectorises; exact for tiny e too.
INFOMAX_HOST_DEVICE float vlog1p_unit(float e) {
#if defined(__CUDA_ARCH__) || defined(__HIP_DEVICE_COMPILE__)
  return ::log1pf(e);
#else
  const float z = e / (2.0f + e), z2 = z * z;
  float p = 1.0f / 13.0f;
  p = p * z2 + 1.0f / 11.0f;
  p = p * z2 + 1.0f / 9.0f;
  p = p * z2 + 1.0f / 7.0f;
  p = p * z2 + 1.0f / 5.0f;
  p = p * z2 + 1.0f / 3.0f;
  return 2.0f * z * (p * z2 + 1.0f);
#endif
}

INFOMAX_HOST_DEVICE double vlog1p_unit(double e) { return log1p(e); }

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
  // NB: a NaN maximum wins, so NaN scores propagate instead of being dropped.
  const T m = (x.max > y.max || x.max != x.max) ? x.max : y.max;
  if (m == neg_infinity<T>()) return lse_empty<T>();
  return LseState<T>{m, x.sum * vexp(x.max - m) + y.sum * vexp(y.max - m)};
}

// Fold a single value into a running state (online softmax update).
template <typename T>
INFOMAX_HOST_DEVICE LseState<T> lse_push(LseState<T> s, T x) {
  // NB: a NaN state stays NaN: x > NaN is false, and the else branch would replace
  // its maximum by x.
  if (x <= s.max || s.max != s.max) {
    // NB: x == s.max == -inf lands here; exp(-inf - -inf) would be NaN.
    return s.max == neg_infinity<T>() ? s : LseState<T>{s.max, s.sum + vexp(x - s.max)};
  }
  return LseState<T>{x, s.sum * vexp(s.max - x) + T(1)};
}

// NB: an empty state (no entries, or all -inf) finalises to -inf, not NaN.
template <typename T>
INFOMAX_HOST_DEVICE T lse_finalize(LseState<T> s) {
  return s.max == neg_infinity<T>() ? neg_infinity<T>() : s.max + log(s.sum);
}

// exp(x - lse), the softmax weight of x in a reduction whose result is lse.
// Branch-free (a select), so loops over a tile vectorise.
// NB: x = -inf (a masked entry) has weight 0 even when lse is -inf too.
template <typename T>
INFOMAX_HOST_DEVICE T softmax_weight(T x, T lse) {
  return select(x == neg_infinity<T>(), T(0), vexp(x - lse));
}

// Writes row i's requested statistics from its folded states: the negatives'
// log-sum-exp state, the clamped one, the softplus sum and the positive score.
// NB: the row's log-sum-exp over all columns is the negatives' state plus the positive.
template <typename T>
INFOMAX_HOST_DEVICE void finalize_row(int64_t i, int64_t reductions, LseState<T> neg,
                                      LseState<T> clamp, T softplus_sum, T pos, T* row_out,
                                      T* neg_out, T* clamp_out, T* softplus_out) {
  if (reductions & kNegLse) neg_out[i] = lse_finalize(neg);
  if (reductions & kRowLse) row_out[i] = lse_finalize(lse_push(neg, pos));
  if (reductions & kNegClampLse) clamp_out[i] = lse_finalize(clamp);
  if (reductions & kNegSoftplus) softplus_out[i] = softplus_sum;
}

// log(1 + exp(x)) without overflow for large x or loss of precision for very negative x.
// NB: only exp(-|x|) is taken, so it never overflows.
template <typename T>
INFOMAX_HOST_DEVICE T softplus(T x) {
  const bool p = x > T(0);
  return select(p, x, T(0)) + vlog1p_unit(vexp(select(p, -x, x)));
}

template <typename T>
INFOMAX_HOST_DEVICE T sigmoid(T x) {
  // NB: exp(-|x|) only, and no branch: both sides are selects.
  const bool p = x >= T(0);
  const T e = vexp(select(p, -x, x));
  const T inv = T(1) / (T(1) + e);
  return select(p, inv, e * inv);
}

// d clamp(x, -tau, tau) / dx * exp(clamp(x) - lse): the clamped softmax weight.
// NB: the gradient passes on the open interval (-tau, tau) only: at x = +-tau it is 0,
// the minimum-norm subgradient, as F.hardtanh's and torch 2.14's clamp (earlier
// torch.clamp passed it at the bounds too; reference.py fixes the convention).
template <typename T>
INFOMAX_HOST_DEVICE T clamped_softmax_weight(T x, T tau, T lse) {
  return select(x > -tau && x < tau, vexp(x - lse), T(0));
}

template <typename T>
INFOMAX_HOST_DEVICE T clamp_tau(T x, T tau) {
  return select(x < -tau, -tau, select(x > tau, tau, x));
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

// x[i], or 0 for an absent array (nullptr).
template <typename T>
INFOMAX_HOST_DEVICE T at_or_zero(const T* x, int64_t i) {
  return x ? x[i] : T(0);
}

// Row i's RowGrad from a walk's arrays: p has members g_row, row_lse, g_neg, neg_lse,
// g_clamp, clamp_lse and g_sp ((K,) each, nullptr when absent).
template <typename T, typename Ptrs>
INFOMAX_HOST_DEVICE RowGrad<T> row_grad_at(const Ptrs& p, int64_t i) {
  return RowGrad<T>{at_or_zero(p.g_row, i),   at_or_zero(p.row_lse, i),   at_or_zero(p.g_neg, i),
                    at_or_zero(p.neg_lse, i), at_or_zero(p.g_clamp, i), at_or_zero(p.clamp_lse, i),
                    at_or_zero(p.g_sp, i)};
}

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
  if ((reductions & kNegClampLse) && r.g_clamp != T(0)) g += r.g_clamp * clamped_softmax_weight(s, tau, r.clamp_lse);
  if ((reductions & kNegSoftplus) && r.g_softplus != T(0)) g += r.g_softplus * sigmoid(s);
  return g;
}

}  // namespace infomax_ext
