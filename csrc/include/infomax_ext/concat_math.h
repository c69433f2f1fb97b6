// Per-element math of the concat-MLP critic
//
//     S[i, j] = sum_h w2[h] * act(P[i, h] + Q[j, h]) + b2,
//
// shared by the CPU walker and a CUDA kernel: each activation's value and
// derivative are defined here once (act_value_grad). Raw scalars only.
//
// The activation is a compile-time template parameter of the inner loops, so
// the switch sits outside the loop over h and the loop can be vectorised;
// `dispatch_activation` is the one switch that maps the runtime code to it.
//
// NB: in float32 the transcendental functions are the branch-free polynomial
// versions of `fmath` below (exp, expm1, tanh from Cephes, erfc from Numerical
// Recipes, log1p from score_math.h; all within a few ulp), not libm calls: the compiler
// cannot vectorise a loop that calls libm's tanhf or expf, and such a loop ran
// ~30x slower than relu (slower than the materialising reference). float64
// (gradcheck, the oracle's precision) uses libm.
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "infomax_ext/score_math.h"

namespace infomax_ext {

using std::erfc;
using std::exp;
using std::expm1;
using std::fabs;
using std::log1p;
using std::tanh;

// Codes of the `activation` argument of concat_score_reduce. Keep in sync with
// ACTIVATION_CODES in infomax_ext/ops.py.
enum Activation : int64_t {
  kRelu = 0,      // max(x, 0); derivative 1[x > 0] (0 at the kink, like torch)
  kElu = 1,       // x > 0 ? x : expm1(x)   (alpha = 1)
  kTanh = 2,      // tanh(x)
  kSoftplus = 3,  // log(1 + exp(x))       (beta = 1)
  kGelu = 4,      // x * Phi(x)             (exact erf form, torch's approximate="none")
  kNumActivations = 5,
};

inline bool valid_activation(int64_t code) { return code >= 0 && code < kNumActivations; }

namespace fmath {

// -|x|: sets the sign bit.
INFOMAX_HOST_DEVICE float neg_abs(float x) {
  return int_bits_as_float(float_bits(x) | static_cast<int32_t>(0x80000000u));
}

// expm1(x) for x <= 0: the Taylor series to x^9 / 9! on (-0.5, 0] (error below
// 1e-9 relative), vexp(x) - 1 below (no cancellation there: |result| > 0.39).
INFOMAX_HOST_DEVICE float expm1_nonpos(float x) {
  float p = 1.f / 362880.f;
  p = p * x + 1.f / 40320.f;
  p = p * x + 1.f / 5040.f;
  p = p * x + 1.f / 720.f;
  p = p * x + 1.f / 120.f;
  p = p * x + 1.f / 24.f;
  p = p * x + 1.f / 6.f;
  p = p * x + 0.5f;
  const float series = p * x * x + x;
  return select(x > -0.5f, series, vexp(x) - 1.f);
}

// tanh: |x| < 0.625: Cephes' odd polynomial; else sign(x) (1 - e) / (1 + e) with
// e = vexp(-2|x|) in (0, 0.29] (no overflow, no cancellation).
INFOMAX_HOST_DEVICE float tanh(float x) {
  const float z = x * x;
  const float small = ((((-5.70498872745e-3f * z + 2.06390887954e-2f) * z - 5.37397155531e-2f) * z +
                        1.33314422036e-1f) * z - 3.33332819422e-1f) * z * x + x;
  const float e = vexp(2.f * neg_abs(x));
  const float big = (1.f - e) / (1.f + e);
  return select(z < 0.390625f, small, select(x < 0.f, -big, big));
}

// erfc(z) for z >= 0: the Chebyshev fit of Numerical Recipes (erfcc), relative
// error < 1.2e-7 over the whole range, so the Gaussian tail keeps its relative
// precision (1 - erf(z) would cancel).
INFOMAX_HOST_DEVICE float erfc_nonneg(float z) {
  const float t = 1.f / (1.f + 0.5f * z);
  const float poly =
      -1.26551223f +
      t * (1.00002368f +
           t * (0.37409196f +
                t * (0.09678418f +
                     t * (-0.18628806f +
                          t * (0.27886807f + t * (-1.13520398f + t * (1.48851587f + t * (-0.82215223f + t * 0.17087277f))))))));
  return t * vexp(poly - z * z);
}

}  // namespace fmath

// The building blocks of the activations: fmath in float32, libm in float64
// (log1p on [0, 1] is score_math.h's vlog1p_unit, for both).
template <typename T>
INFOMAX_HOST_DEVICE T act_select(bool c, T a, T b) {
  return select(c, a, b);
}
template <typename T>
INFOMAX_HOST_DEVICE T act_neg_abs(T x) {
  if constexpr (std::is_same<T, float>::value) return fmath::neg_abs(x); else return -fabs(x);
}
template <typename T>
INFOMAX_HOST_DEVICE T act_exp(T x) {
  return vexp(x);
}
template <typename T>
INFOMAX_HOST_DEVICE T act_expm1_nonpos(T x) {
  if constexpr (std::is_same<T, float>::value) return fmath::expm1_nonpos(x); else return expm1(x);
}
template <typename T>
INFOMAX_HOST_DEVICE T act_tanh(T x) {
  if constexpr (std::is_same<T, float>::value) return fmath::tanh(x); else return tanh(x);
}
// The standard normal CDF Phi(x) = erfc(-x / sqrt 2) / 2.
template <typename T>
INFOMAX_HOST_DEVICE T act_normal_cdf(T x) {
  if constexpr (std::is_same<T, float>::value) {
    const float e = 0.5f * fmath::erfc_nonneg(-0.70710678118654752f * fmath::neg_abs(x));
    return select(x < 0.f, e, 1.f - e);
  } else {
    return T(0.5) * erfc(x * T(-0.70710678118654752440));
  }
}

// act(x) and act'(x) of the activation A, sharing the transcendental between
// them: the one definition of every activation (act_value and act_grad are
// views of it; in a loop that only needs the value the rest is dead code).
template <int64_t A, typename T>
INFOMAX_HOST_DEVICE void act_value_grad(T x, T& value, T& grad) {
  const bool pos = x > T(0);
  if constexpr (A == kRelu) {
    // NB: derivative 0 at x == 0, as torch's threshold_backward. Plain ternaries:
    // nothing follows them to thread, and the value one becomes a max instruction.
    value = pos ? x : T(0);
    grad = pos ? T(1) : T(0);
  } else if constexpr (A == kElu) {
    // NB: expm1 keeps the value accurate near 0; exp(x) = expm1(x) + 1 gives the
    // derivative (continuous at 0 since alpha = 1). Only x <= 0 is exponentiated.
    const T e = act_expm1_nonpos(act_select(pos, T(0), x));
    value = act_select(pos, x, e);
    grad = act_select(pos, T(1), e + T(1));
  } else if constexpr (A == kTanh) {
    const T t = act_tanh(x);
    value = t;
    grad = T(1) - t * t;
  } else if constexpr (A == kSoftplus) {
    // softplus(x) = max(x, 0) + log1p(exp(-|x|)); sigmoid from the same exp(-|x|).
    // NB: only -|x| is exponentiated: no overflow for large |x|.
    const T e = act_exp(act_neg_abs(x));
    const T inv = T(1) / (T(1) + e);
    value = act_select(pos, x, T(0)) + vlog1p_unit(e);
    grad = act_select(pos, inv, e * inv);
  } else {
    static_assert(A == kGelu, "unknown activation");
    // gelu(x) = x Phi(x); gelu'(x) = Phi(x) + x phi(x).
    // NB: Phi from erfc, not (1 + erf) / 2: no cancellation in the negative tail.
    const T cdf = act_normal_cdf(x);
    value = x * cdf;
    grad = cdf + x * T(0.39894228040143267794) * act_exp(T(-0.5) * x * x);
  }
}

template <int64_t A, typename T>
INFOMAX_HOST_DEVICE T act_value(T x) {
  T value, grad;
  act_value_grad<A>(x, value, grad);
  return value;
}

template <int64_t A, typename T>
INFOMAX_HOST_DEVICE T act_grad(T x) {
  T value, grad;
  act_value_grad<A>(x, value, grad);
  return grad;
}

// Calls f(std::integral_constant<int64_t, A>{}) for the runtime code: the one
// switch on the activation code. Returns false for an unknown code.
template <typename F>
inline bool dispatch_activation(int64_t code, F&& f) {
  switch (code) {
    case kRelu: f(std::integral_constant<int64_t, kRelu>{}); return true;
    case kElu: f(std::integral_constant<int64_t, kElu>{}); return true;
    case kTanh: f(std::integral_constant<int64_t, kTanh>{}); return true;
    case kSoftplus: f(std::integral_constant<int64_t, kSoftplus>{}); return true;
    case kGelu: f(std::integral_constant<int64_t, kGelu>{}); return true;
    default: return false;
  }
}

}  // namespace infomax_ext
