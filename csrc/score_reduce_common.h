// Host-side argument checks and output allocation shared by the CPU and CUDA
// entry points of score_reduce, so both backends reject bad input with the same
// messages and return tensors of the same shapes and dtypes.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/dot.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Optional.h>

#include <tuple>

#include "infomax_ext/score_math.h"

namespace infomax_ext {

using at::Tensor;
using OptTensor = c10::optional<Tensor>;
using Tensor5 = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>;

// NB: float16/bfloat16 inputs are reduced in float32; the statistics (logsumexp
// values) are always returned in the accumulation dtype.
inline at::ScalarType acc_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

inline bool has(const OptTensor& t) { return t.has_value() && t->defined(); }

// t detached, in dtype acc and contiguous. NB: returned as is when it already is all
// three, without a dispatcher call: every op call converts several small tensors, and
// at K = M = 256 such calls are a visible share of its fixed cost.
inline Tensor as_acc(const Tensor& t, at::ScalarType acc) {
  if (t.scalar_type() == acc && t.is_contiguous() && !t.requires_grad()) return t;
  return t.detach().to(acc).contiguous();
}

// A one-element tensor (a scale, the concat critic's b2) as a 0-dim tensor in dtype acc,
// as as_acc gives it.
inline Tensor scalar_acc(const Tensor& t, at::ScalarType acc) { return as_acc(t, acc).reshape({}); }

inline void check_bias(const OptTensor& bias, const char* name, int64_t n, const char* n_name,
                       const Tensor& a, const char* op = "score_reduce") {
  if (!has(bias)) return;
  TORCH_CHECK(bias->dim() == 1 && bias->size(0) == n, op, ": ", name,
              " must have shape (", n_name, ",) = (", n, ",), got ", bias->sizes());
  TORCH_CHECK(bias->device() == a.device(), op, ": ", name, " is on ", bias->device(),
              " but the inputs are on ", a.device());
  TORCH_CHECK(at::isFloatingType(bias->scalar_type()), op, ": ", name,
              " must be floating point, got ", bias->scalar_type());
}

inline void check_score_reduce_args(const Tensor& a, const Tensor& b, const Tensor& scale,
                                    const OptTensor& row_bias, const OptTensor& col_bias,
                                    int64_t pos_offset, int64_t reductions, double clamp_tau) {
  TORCH_CHECK(a.dim() == 2, "score_reduce: a must be 2-D (K, d), got ", a.dim(), "-D");
  TORCH_CHECK(b.dim() == 2, "score_reduce: b must be 2-D (M, d), got ", b.dim(), "-D");
  const int64_t K = a.size(0), M = b.size(0);
  TORCH_CHECK(K > 0 && M > 0 && a.size(1) > 0,
              "score_reduce: a and b must be non-empty, got a ", a.sizes(), " and b ", b.sizes());
  TORCH_CHECK(a.size(1) == b.size(1), "score_reduce: feature sizes differ: a has d=", a.size(1),
              ", b has d=", b.size(1));
  TORCH_CHECK(M >= K, "score_reduce: need M >= K (every row has a positive column), got K=", K,
              ", M=", M);
  TORCH_CHECK(pos_offset >= 0 && pos_offset <= M - K, "score_reduce: pos_offset must be in [0, M-K] = [0, ",
              M - K, "], got ", pos_offset);
  TORCH_CHECK(a.device() == b.device() && a.device() == scale.device(),
              "score_reduce: a, b and scale must be on one device, got ", a.device(), ", ",
              b.device(), ", ", scale.device());
  TORCH_CHECK(at::isFloatingType(a.scalar_type()), "score_reduce: a must be floating point, got ",
              a.scalar_type());
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), "score_reduce: a and b dtypes differ: ",
              a.scalar_type(), " vs ", b.scalar_type());
  TORCH_CHECK(scale.numel() == 1 && at::isFloatingType(scale.scalar_type()),
              "score_reduce: scale must be a floating tensor with one element, got shape ",
              scale.sizes(), " and dtype ", scale.scalar_type());
  check_bias(row_bias, "row_bias", K, "K", a);
  check_bias(col_bias, "col_bias", M, "M", a);
  TORCH_CHECK(reductions > 0 && reductions <= kAllReductions,
              "score_reduce: reductions must be a non-zero bit mask below 32, got ", reductions);
  TORCH_CHECK(!(reductions & kNegClampLse) || clamp_tau > 0,
              "score_reduce: clamp_tau must be > 0, got ", clamp_tau);
}

// A per-row or per-column vector argument of a backward op (an upstream gradient or a
// saved statistic): 1-D of length n, or empty (0,) for "not given"; floating, on the
// inputs' device. NB: the walkers index these by row and column without bounds checks,
// so a wrong length must stop here.
inline void check_vector_arg(const Tensor& t, const char* op, const char* name, int64_t n, const char* n_name,
                             const Tensor& like) {
  TORCH_CHECK(t.dim() == 1 && (t.size(0) == n || t.size(0) == 0), op, ": ", name, " must have shape (", n_name,
              ",) = (", n, ",) or be empty (0,), got ", t.sizes());
  TORCH_CHECK(t.device() == like.device(), op, ": ", name, " is on ", t.device(), " but the inputs are on ",
              like.device());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), op, ": ", name, " must be floating point, got ",
              t.scalar_type());
}

// The upstream gradients of the five reductions: (K,), (M,), (K,), (K,), (K,) or empty.
inline void check_reduction_grads(const char* op, const Tensor& like, int64_t K, int64_t M, const Tensor& g_row,
                                  const Tensor& g_col, const Tensor& g_neg, const Tensor& g_clamp,
                                  const Tensor& g_sp) {
  check_vector_arg(g_row, op, "grad_row_lse", K, "K", like);
  check_vector_arg(g_col, op, "grad_col_lse", M, "M", like);
  check_vector_arg(g_neg, op, "grad_neg_lse", K, "K", like);
  check_vector_arg(g_clamp, op, "grad_clamp_lse", K, "K", like);
  check_vector_arg(g_sp, op, "grad_softplus", K, "K", like);
}

// A recomputing backward's gradients and saved forward statistics: each statistic
// (K,) / (M,) or empty, and present wherever its gradient takes part (see active_grads).
inline void check_backward_args(const char* op, const Tensor& like, int64_t K, int64_t M, int64_t reductions,
                                const Tensor& g_row, const Tensor& g_col, const Tensor& g_neg,
                                const Tensor& g_clamp, const Tensor& g_sp, const Tensor& row_lse,
                                const Tensor& col_lse, const Tensor& neg_lse, const Tensor& clamp_lse) {
  check_reduction_grads(op, like, K, M, g_row, g_col, g_neg, g_clamp, g_sp);
  const struct {
    int64_t bit;
    const Tensor& g;
    const Tensor& stat;
    const char* name;
    int64_t n;
    const char* n_name;
  } saved[] = {{kRowLse, g_row, row_lse, "row_lse", K, "K"},
               {kColLse, g_col, col_lse, "col_lse", M, "M"},
               {kNegLse, g_neg, neg_lse, "neg_lse", K, "K"},
               {kNegClampLse, g_clamp, clamp_lse, "clamp_lse", K, "K"}};
  for (const auto& s : saved) {
    check_vector_arg(s.stat, op, s.name, s.n, s.n_name, like);
    TORCH_CHECK(!((reductions & s.bit) && s.g.numel() > 0) || s.stat.numel() == s.n, op, ": ", s.name,
                " (the saved forward output) must have shape (", s.n_name, ",) = (", s.n,
                ",) when its gradient is given, got ", s.stat.sizes());
  }
}

// _score_reduce_backward's gradients and saved statistics (after check_score_reduce_args).
inline void check_score_reduce_backward_args(const Tensor& g_row, const Tensor& g_col, const Tensor& g_neg,
                                             const Tensor& g_clamp, const Tensor& g_sp, const Tensor& a,
                                             const Tensor& b, const Tensor& row_lse, const Tensor& col_lse,
                                             const Tensor& neg_lse, const Tensor& clamp_lse, int64_t reductions) {
  check_backward_args("_score_reduce_backward", a, a.size(0), b.size(0), reductions, g_row, g_col, g_neg, g_clamp,
                      g_sp, row_lse, col_lse, neg_lse, clamp_lse);
}

// _score_reduce_with_grad's upstream gradients and positive weights (after
// check_score_reduce_args): (K,) ((M,) for the column statistic) or empty.
inline void check_score_reduce_with_grad_args(const Tensor& g_row, const Tensor& g_col, const Tensor& g_neg,
                                              const Tensor& g_clamp, const Tensor& g_sp, const Tensor& g_pos,
                                              const Tensor& a, const Tensor& b) {
  check_reduction_grads("_score_reduce_with_grad", a, a.size(0), b.size(0), g_row, g_col, g_neg, g_clamp, g_sp);
  check_vector_arg(g_pos, "_score_reduce_with_grad", "grad_pos", a.size(0), "K", a);
}

// Bits of the backward ops' needs_grad argument: which of the inputs' gradients to make.
// dA (G B) feeds d scale too, so kNeedScale alone still takes the dA GEMM.
enum NeedGrad : int64_t { kNeedA = 1, kNeedB = 2, kNeedScale = 4, kNeedAll = 7 };

inline void check_needs_grad(int64_t needs_grad, const char* op) {
  TORCH_CHECK(needs_grad >= 0 && needs_grad <= kNeedAll, op, ": needs_grad must be a bit mask in [0, 7] (a = 1, ",
              "b = 2, scale = 4), got ", needs_grad);
}
inline bool need_dA(int64_t needs_grad) { return needs_grad & (kNeedA | kNeedScale); }
inline bool need_dB(int64_t needs_grad) { return needs_grad & kNeedB; }

using ForwardFn = Tensor5 (*)(const Tensor&, const Tensor&, const Tensor&, const OptTensor&, const OptTensor&,
                              int64_t, int64_t, double);
using BackwardFn = Tensor5 (*)(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                               const Tensor&, const Tensor&, const Tensor&, const OptTensor&, const OptTensor&,
                               const Tensor&, const Tensor&, const Tensor&, const Tensor&, int64_t, int64_t,
                               double, int64_t, bool);

// The _score_reduce_backward op of a backend's backward body (gradients in the inputs' dtypes).
template <BackwardFn backward>
Tensor5 backward_op(const Tensor& g_row, const Tensor& g_col, const Tensor& g_neg, const Tensor& g_clamp,
                    const Tensor& g_sp, const Tensor& a, const Tensor& b, const Tensor& scale,
                    const OptTensor& row_bias, const OptTensor& col_bias, const Tensor& row_lse,
                    const Tensor& col_lse, const Tensor& neg_lse, const Tensor& clamp_lse, int64_t pos_offset,
                    int64_t reductions, double clamp_tau, int64_t needs_grad) {
  return backward(g_row, g_col, g_neg, g_clamp, g_sp, a, b, scale, row_bias, col_bias, row_lse, col_lse, neg_lse,
                  clamp_lse, pos_offset, reductions, clamp_tau, needs_grad, /*keep_acc=*/false);
}

// What a backend's _score_reduce_with_grad walk returns.
struct WithGrad {
  Tensor5 stats;  // row_lse, col_lse (0,), neg_lse, neg_clamp_lse, neg_softplus
  Tensor pos;     // the positives S[i, i + pos_offset] (K,), or (0,) without grad_pos
  Tensor5 grads;  // da, db (both in the accumulation dtype), dscale, drow, dcol
};

// Adds the positive term sum_i g_pos_i S[i, i + pos_offset] to a walk that left it out:
// r.pos and the term's gradients, by O(K d) tensor ops in the accumulation dtype. (The
// CPU's one walk adds g_pos to G instead, so the G GEMMs carry the term.)
inline void add_positive_term(WithGrad& r, const Tensor& g_pos, const Tensor& a, const Tensor& b,
                              const Tensor& scale, const OptTensor& row_bias, const OptTensor& col_bias,
                              int64_t pos_offset, int64_t needs_grad) {
  const auto acc = acc_dtype(a.scalar_type());
  const int64_t K = a.size(0);
  r.pos = at::empty({0}, a.options().dtype(acc));
  if (!g_pos.numel()) return;
  const Tensor w = as_acc(g_pos, acc), s = scalar_acc(scale, acc);
  const Tensor A = as_acc(a, acc), Bp = b.detach().narrow(0, pos_offset, K).to(acc);
  const Tensor dot = at::mul(A, Bp).sum(-1);
  r.pos = at::mul(dot, s);
  if (has(row_bias)) r.pos.add_(row_bias->detach().to(acc));
  if (has(col_bias)) r.pos.add_(col_bias->detach().narrow(0, pos_offset, K).to(acc));
  auto& [da, db, dscale, drow, dcol] = r.grads;
  const Tensor ws = at::mul(w, s).unsqueeze(1);
  if (need_dA(needs_grad)) da.add_(at::mul(ws, Bp));
  if (need_dB(needs_grad)) db.narrow(0, pos_offset, K).add_(at::mul(ws, A));
  if (needs_grad & kNeedScale) dscale.add_(at::mul(w, dot).sum().to(dscale.scalar_type()));
  if (has(row_bias)) drow.add_(w.to(drow.scalar_type()));
  if (has(col_bias)) dcol.narrow(0, pos_offset, K).add_(w.to(dcol.scalar_type()));
}

// _score_reduce_with_grad as a backend's forward op followed by its recomputing
// backward op: the same results as the one-walk version, with four GEMMs; the path of a
// column statistic, which is final only after every row, and of huge M. `backward` is the
// backward op's body with a last argument keep_acc: da and db stay in the accumulation
// dtype, as from the one walk, so fp16 / bf16 gradients are rounded once, after the
// positive term is added.
inline WithGrad forward_then_backward(ForwardFn forward, BackwardFn backward, const Tensor& g_row,
                                      const Tensor& g_col, const Tensor& g_neg, const Tensor& g_clamp,
                                      const Tensor& g_sp, const Tensor& g_pos, const Tensor& a, const Tensor& b,
                                      const Tensor& scale, const OptTensor& row_bias, const OptTensor& col_bias,
                                      int64_t pos_offset, int64_t reductions, double clamp_tau,
                                      int64_t needs_grad) {
  const Tensor5 out = forward(a, b, scale, row_bias, col_bias, pos_offset, reductions, clamp_tau);
  const Tensor5 grads = backward(g_row, g_col, g_neg, g_clamp, g_sp, a, b, scale, row_bias, col_bias,
                                 std::get<0>(out), std::get<1>(out), std::get<2>(out), std::get<3>(out), pos_offset,
                                 reductions, clamp_tau, needs_grad, /*keep_acc=*/true);
  WithGrad r{out, Tensor(), grads};
  add_positive_term(r, g_pos, a, b, scale, row_bias, col_bias, pos_offset, needs_grad);
  return r;
}

// A backend's _score_reduce_with_grad walk (the op's arguments).
using WithGradFn = WithGrad (*)(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                const Tensor&, const Tensor&, const Tensor&, const Tensor&, const OptTensor&,
                                const OptTensor&, int64_t, int64_t, double, int64_t);
// _score_reduce_with_grad's outputs: value, the five statistics, the positives, the
// five gradients.
using Tensor12 = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
                            Tensor, Tensor>;

// _score_reduce_with_grad on every backend: the arguments checked, the backend's walk,
// then value = sum_i (g_row_i row_lse_i + g_neg_i neg_lse_i + g_clamp_i neg_clamp_lse_i
// + g_sp_i neg_softplus_i + g_pos_i pos_i) + sum_j g_col_j col_lse_j, in the
// accumulation dtype.
template <WithGradFn walk>
Tensor12 score_reduce_with_grad(const Tensor& g_row, const Tensor& g_col, const Tensor& g_neg,
                                const Tensor& g_clamp, const Tensor& g_sp, const Tensor& g_pos, const Tensor& a,
                                const Tensor& b, const Tensor& scale, const OptTensor& row_bias,
                                const OptTensor& col_bias, int64_t pos_offset, int64_t reductions, double clamp_tau,
                                int64_t needs_grad) {
  check_score_reduce_args(a, b, scale, row_bias, col_bias, pos_offset, reductions, clamp_tau);
  check_needs_grad(needs_grad, "_score_reduce_with_grad");
  check_score_reduce_with_grad_args(g_row, g_col, g_neg, g_clamp, g_sp, g_pos, a, b);
  const WithGrad r = walk(g_row, g_col, g_neg, g_clamp, g_sp, g_pos, a, b, scale, row_bias, col_bias, pos_offset,
                          reductions, clamp_tau, needs_grad);
  const auto& [row, col, neg, clamp, sp] = r.stats;
  // NB: one dot per weighted term (InfoNCE: two), not a product, a sum and an add each:
  // at K = M = 256 the op's small tensor calls are a visible share of its time.
  Tensor value;
  for (const auto& [w, st] : {std::pair<const Tensor&, const Tensor&>{g_row, row}, {g_col, col}, {g_neg, neg},
                              {g_clamp, clamp}, {g_sp, sp}, {g_pos, r.pos}}) {
    if (!w.numel()) continue;
    const Tensor term = at::dot(as_acc(w, st.scalar_type()), st);
    value = value.defined() ? value.add_(term) : term;
  }
  if (!value.defined()) value = at::zeros({}, row.options());
  const auto& [da, db, dscale, drow, dcol] = r.grads;
  return {value, row, col, neg, clamp, sp, r.pos, da, db, dscale, drow, dcol};
}

// symmetric_softmax_mean(x, scale, bias): the same messages as score_reduce.
inline void check_symmetric_args(const Tensor& x, const Tensor& scale, const OptTensor& bias) {
  TORCH_CHECK(x.dim() == 2, "symmetric_softmax_mean: x must be 2-D (K, d), got ", x.dim(), "-D");
  TORCH_CHECK(x.size(0) > 0 && x.size(1) > 0, "symmetric_softmax_mean: x must be non-empty, got ",
              x.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()),
              "symmetric_softmax_mean: x must be floating point, got ", x.scalar_type());
  TORCH_CHECK(x.device() == scale.device(), "symmetric_softmax_mean: x and scale must be on one device, got ",
              x.device(), ", ", scale.device());
  TORCH_CHECK(scale.numel() == 1 && at::isFloatingType(scale.scalar_type()),
              "symmetric_softmax_mean: scale must be a floating tensor with one element, got shape ",
              scale.sizes(), " and dtype ", scale.scalar_type());
  check_bias(bias, "bias", x.size(0), "K", x, "symmetric_softmax_mean");
}

// Contiguous copy of an optional bias in the accumulation dtype (undefined if absent).
inline Tensor bias_acc(const OptTensor& bias, at::ScalarType acc) {
  return has(bias) ? as_acc(*bias, acc) : Tensor();
}

// The five outputs; those not requested are empty (0,) tensors.
inline Tensor5 alloc_reductions(const Tensor& a, int64_t K, int64_t M, int64_t reductions) {
  auto opts = a.options().dtype(acc_dtype(a.scalar_type()));
  auto make = [&](int64_t bit, int64_t n) { return at::empty({(reductions & bit) ? n : 0}, opts); };
  return Tensor5{make(kRowLse, K), make(kColLse, M), make(kNegLse, K), make(kNegClampLse, K),
                 make(kNegSoftplus, K)};
}

// symmetric_softmax_mean's outputs: lse (K,) and mean (K, d), or (0,) without it.
inline std::tuple<Tensor, Tensor> alloc_symmetric(const Tensor& x, bool with_mean) {
  auto opts = x.options().dtype(acc_dtype(x.scalar_type()));
  return {at::empty({x.size(0)}, opts),
          with_mean ? at::empty({x.size(0), x.size(1)}, opts) : at::empty({0}, opts)};
}

// Which reductions take part in the backward pass: requested and given a gradient.
inline int64_t active_grads(int64_t reductions, const Tensor& g_row, const Tensor& g_col,
                            const Tensor& g_neg, const Tensor& g_clamp, const Tensor& g_sp) {
  int64_t active = 0;
  if ((reductions & kRowLse) && g_row.numel() > 0) active |= kRowLse;
  if ((reductions & kColLse) && g_col.numel() > 0) active |= kColLse;
  if ((reductions & kNegLse) && g_neg.numel() > 0) active |= kNegLse;
  if ((reductions & kNegClampLse) && g_clamp.numel() > 0) active |= kNegClampLse;
  if ((reductions & kNegSoftplus) && g_sp.numel() > 0) active |= kNegSoftplus;
  return active;
}

}  // namespace infomax_ext
