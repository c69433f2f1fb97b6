// The autograd of score_reduce and score_reduce_weighted, in C++: a node per call, with
// no Python call on either pass of a training step (at K = M = 256 a Python
// autograd.Function around the op cost about a tenth of the whole step).
//
// score_reduce: the backward is the recomputing _score_reduce_backward op.
// score_reduce_weighted: the value sum_i w . stats_i has its gradient made by
// _score_reduce_with_grad during the forward walk (the weights are known up front), so
// the backward is a product by one upstream scalar.
//
// With create_graph=True each backward is recomputed as differentiable torch ops by
// _score_reduce_grads / _score_reduce_weighted_grads, whose kernels are the materialising
// reference registered from Python (infomax_ext/ops.py), so second derivatives are exact.
//
// Registered for both namespaces: infomax_ext (CPU and CUDA kernels) and, in builds
// with the emulated backend, infomax_ext_emulated; each calls the kernels of its own.
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/add.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <string>

#include "score_reduce_common.h"

namespace infomax_ext {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using Tensor7 = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;

constexpr char kNamespace[] = "infomax_ext";
constexpr char kEmulatedNamespace[] = "infomax_ext_emulated";

// Bits of the mask of inputs that want a gradient: kNeedA | kNeedB | kNeedScale (the
// walk's needs_grad) and the two biases (bit i: the node's input i).
constexpr int64_t kNeedRowBias = 8, kNeedColBias = 16;

// The op `name` of namespace infomax_ext, or infomax_ext_emulated, with signature Sig.
template <typename Sig>
c10::TypedOperatorHandle<Sig> find_op(bool emulated, const char* name) {
  return c10::Dispatcher::singleton()
      .findSchemaOrThrow((std::string(emulated ? kEmulatedNamespace : kNamespace) + "::" + name).c_str(), "")
      .typed<Sig>();
}

using WithGradSig = Tensor12(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                             const Tensor&, const Tensor&, const Tensor&, const OptTensor&, const OptTensor&, int64_t,
                             int64_t, double, int64_t);
using Weights = std::array<const OptTensor*, 6>;  // w_row, w_col, w_neg, w_clamp, w_softplus, w_pos
using ReferenceGradsSig = std::vector<Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                              const OptTensor&, const OptTensor&, int64_t, int64_t, double,
                                              const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&,
                                              const OptTensor&, const OptTensor&);

using ReduceSig = Tensor5(const Tensor&, const Tensor&, const Tensor&, const OptTensor&, const OptTensor&, int64_t,
                          int64_t, double);
using BackwardSig = Tensor5(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                            const Tensor&, const Tensor&, const OptTensor&, const OptTensor&, const Tensor&,
                            const Tensor&, const Tensor&, const Tensor&, int64_t, int64_t, double, int64_t);
using ReduceGradsSig = std::vector<Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                           const Tensor&, const Tensor&, const Tensor&, const OptTensor&,
                                           const OptTensor&, int64_t, int64_t, double);

// The op kName of namespace infomax_ext or infomax_ext_emulated, found once each.
template <typename Sig, const char* kName>
const c10::TypedOperatorHandle<Sig>& op(bool emulated) {
  static const auto fused = find_op<Sig>(false, kName);
  if (!emulated) return fused;
  static const auto emu = find_op<Sig>(true, kName);
  return emu;
}

constexpr char kScoreReduce[] = "score_reduce";
constexpr char kBackward[] = "_score_reduce_backward";
constexpr char kReduceGrads[] = "_score_reduce_grads";
constexpr char kWithGrad[] = "_score_reduce_with_grad";
constexpr char kWeightedGrads[] = "_score_reduce_weighted_grads";

// An optional tensor from a saved one (undefined when the input was None).
OptTensor opt(const Tensor& t) { return t.defined() ? OptTensor(t) : OptTensor(); }

// What both nodes keep for their backward besides tensors: the mask of inputs (a, b,
// scale, row_bias, col_bias: bits 0 to 4) that want a gradient, the backend and the
// op's number arguments.
struct NodeArgs {
  int64_t needs, pos_offset, reductions;
  double clamp_tau;
  bool emulated;

  void save(AutogradContext* ctx) const {
    ctx->saved_data["needs"] = needs;
    ctx->saved_data["args"] = std::vector<int64_t>{pos_offset, reductions};
    ctx->saved_data["clamp_tau"] = clamp_tau;
    ctx->saved_data["emulated"] = emulated;
  }
  static NodeArgs load(AutogradContext* ctx) {
    const auto args = ctx->saved_data["args"].toIntVector();
    return {ctx->saved_data["needs"].toInt(), args[0], args[1], ctx->saved_data["clamp_tau"].toDouble(),
            ctx->saved_data["emulated"].toBool()};
  }
  bool wants(int input) const { return needs & (int64_t(1) << input); }
};

// The weights are read-only constants of the sum: one with a gradient would be silently
// treated as one without.
void check_weights(const Weights& weights) {
  static const char* names[] = {"w_row", "w_col", "w_neg", "w_clamp", "w_softplus", "w_pos"};
  for (size_t i = 0; i < weights.size(); ++i)
    TORCH_CHECK(!has(*weights[i]) || !(*weights[i])->requires_grad(), "score_reduce_weighted: ", names[i],
                " must not require grad (the weights are constants of the sum)");
}

// The walk (of the emulated backend or not), its value with the offset added (no
// autograd node).
Tensor12 walk(bool emulated, const Tensor& a, const Tensor& b, const Tensor& scale, const OptTensor& row_bias,
              const OptTensor& col_bias, int64_t pos_offset, int64_t reductions, double clamp_tau,
              const Weights& weights, double offset, int64_t needs_grad) {
  check_weights(weights);
  const Tensor none = at::empty({0}, a.options().dtype(acc_dtype(a.scalar_type())));
  auto w = [&](int i) -> const Tensor& { return has(*weights[i]) ? **weights[i] : none; };
  Tensor12 r = op<WithGradSig, kWithGrad>(emulated).call(w(0), w(1), w(2), w(3), w(4), w(5), a, b, scale, row_bias,
                                                         col_bias, pos_offset, reductions, clamp_tau, needs_grad);
  if (offset != 0.0) std::get<0>(r).add_(offset);  // NB: a constant: no gradient of its own
  return r;
}

}  // namespace

// The nodes are outside the anonymous namespace: their names are the grad_fn users see.
struct ScoreReduceWeightedBackward : public torch::autograd::Function<ScoreReduceWeightedBackward> {
  // needs: the mask of inputs that want a gradient (grad mode is off in here, so the
  // caller reads it); emulated: which backend's walk. NB: b may be a and col_bias may be
  // row_bias (NT-Xent, uniformity): such a pair gets its whole gradient in its first
  // slot, rounded once.
  static variable_list forward(AutogradContext* ctx, const Tensor& a, const Tensor& b, const Tensor& scale,
                               const OptTensor& row_bias, const OptTensor& col_bias, int64_t pos_offset,
                               int64_t reductions, double clamp_tau, const OptTensor& w_row, const OptTensor& w_col,
                               const OptTensor& w_neg, const OptTensor& w_clamp, const OptTensor& w_sp,
                               const OptTensor& w_pos, double offset, int64_t needs, bool emulated) {
    at::AutoDispatchBelowADInplaceOrView guard;
    const auto [value, row, col, neg, clamp, sp, pos, da, db, dscale, drow, dcol] =
        walk(emulated, a, b, scale, row_bias, col_bias, pos_offset, reductions, clamp_tau,
             {&w_row, &w_col, &w_neg, &w_clamp, &w_sp, &w_pos}, offset, needs & kNeedAll);
    // NB: the inputs are saved too (no copy): the version counter then catches an
    // in-place change before the backward, and a create_graph backward needs them.
    ctx->save_for_backward({a, b, scale, row_bias.value_or(Tensor()), col_bias.value_or(Tensor()), da, db, dscale,
                            drow, dcol, w_row.value_or(Tensor()), w_col.value_or(Tensor()),
                            w_neg.value_or(Tensor()), w_clamp.value_or(Tensor()), w_sp.value_or(Tensor()),
                            w_pos.value_or(Tensor())});
    NodeArgs{needs, pos_offset, reductions, clamp_tau, emulated}.save(ctx);
    ctx->saved_data["same_ab"] = b.is_same(a);
    ctx->saved_data["same_bias"] = has(row_bias) && has(col_bias) && col_bias->is_same(*row_bias);
    // NB: the statistics and positives carry no gradient: no zero tensors for them.
    ctx->mark_non_differentiable({row, col, neg, clamp, sp, pos});
    ctx->set_materialize_grads(false);
    return {value, row, col, neg, clamp, sp, pos};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out(17);  // one per forward argument; only the first five are tensors with gradients
    const Tensor& g = grads[0];
    if (!g.defined()) return out;
    const variable_list s = ctx->get_saved_variables();
    const Tensor &a = s[0], &b = s[1];
    const NodeArgs n = NodeArgs::load(ctx);
    const bool same_ab = ctx->saved_data["same_ab"].toBool(), same_bias = ctx->saved_data["same_bias"].toBool();
    const bool want[5] = {n.wants(0), n.wants(1) && !same_ab, n.wants(2), n.wants(3), n.wants(4) && !same_bias};
    if (at::GradMode::is_enabled()) {  // create_graph=True
      const std::vector<Tensor> r = op<ReferenceGradsSig, kWeightedGrads>(n.emulated).call(
          g, a, b, s[2], opt(s[3]), opt(s[4]), n.pos_offset, n.reductions, n.clamp_tau, opt(s[10]), opt(s[11]),
          opt(s[12]), opt(s[13]), opt(s[14]), opt(s[15]));
      for (int i = 0; i < 5; ++i)
        if (want[i]) out[i] = r[i];
      return out;
    }
    const Tensor &da = s[5], &db = s[6], &dscale = s[7], &drow = s[8], &dcol = s[9];
    // NB: da and db are kept in the accumulation dtype until here: one rounding to the
    // inputs' dtype, after the op added the positive term.
    if (want[0]) out[0] = at::mul(same_ab ? at::add(da, db) : da, g).to(a.scalar_type());
    if (want[1]) out[1] = at::mul(db, g).to(b.scalar_type());
    if (want[2]) out[2] = at::mul(dscale, g);
    if (want[3]) out[3] = at::mul(same_bias ? at::add(drow, dcol) : drow, g);
    if (want[4]) out[4] = at::mul(dcol, g);
    return out;
  }
};

// score_reduce's node: the five statistics, each with a gradient, by the recomputing
// backward op.
struct ScoreReduceBackward : public torch::autograd::Function<ScoreReduceBackward> {
  static variable_list forward(AutogradContext* ctx, const Tensor& a, const Tensor& b, const Tensor& scale,
                               const OptTensor& row_bias, const OptTensor& col_bias, int64_t pos_offset,
                               int64_t reductions, double clamp_tau, int64_t needs, bool emulated) {
    at::AutoDispatchBelowADInplaceOrView guard;
    const auto [row, col, neg, clamp, sp] =
        op<ReduceSig, kScoreReduce>(emulated).call(a, b, scale, row_bias, col_bias, pos_offset, reductions,
                                                   clamp_tau);
    ctx->save_for_backward({a, b, scale, row_bias.value_or(Tensor()), col_bias.value_or(Tensor()), row, col, neg,
                            clamp});
    NodeArgs{needs, pos_offset, reductions, clamp_tau, emulated}.save(ctx);
    ctx->set_materialize_grads(false);
    return {row, col, neg, clamp, sp};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out(10);  // one per forward argument; only the first five are tensors with gradients
    if (std::none_of(grads.begin(), grads.end(), [](const Tensor& g) { return g.defined(); })) return out;
    const variable_list s = ctx->get_saved_variables();
    const Tensor &a = s[0], &b = s[1], &scale = s[2];
    const NodeArgs n = NodeArgs::load(ctx);
    // NB: an output without a gradient (or not requested) passes an empty one.
    const Tensor none = at::empty({0}, a.options().dtype(acc_dtype(a.scalar_type())));
    std::array<Tensor, 5> g;
    for (int i = 0; i < 5; ++i) g[i] = grads[i].defined() ? grads[i] : none;
    if (at::GradMode::is_enabled()) {  // create_graph=True
      const std::vector<Tensor> r = op<ReduceGradsSig, kReduceGrads>(n.emulated).call(
          g[0], g[1], g[2], g[3], g[4], a, b, scale, opt(s[3]), opt(s[4]), n.pos_offset, n.reductions, n.clamp_tau);
      for (int i = 0; i < 5; ++i)
        if (n.wants(i)) out[i] = r[i];
      return out;
    }
    const auto r = op<BackwardSig, kBackward>(n.emulated).call(g[0], g[1], g[2], g[3], g[4], a, b, scale, opt(s[3]),
                                                               opt(s[4]), s[5], s[6], s[7], s[8], n.pos_offset,
                                                               n.reductions, n.clamp_tau, n.needs & kNeedAll);
    const Tensor* d[5] = {&std::get<0>(r), &std::get<1>(r), &std::get<2>(r), &std::get<3>(r), &std::get<4>(r)};
    for (int i = 0; i < 5; ++i)
      if (n.wants(i)) out[i] = *d[i];
    return out;
  }
};

namespace {

// The mask of inputs (a, b, scale, row_bias, col_bias) that want a gradient, read
// before a node's forward (where grad mode is off).
int64_t wanted(const Tensor& a, const Tensor& b, const Tensor& scale, const OptTensor& row_bias,
               const OptTensor& col_bias) {
  const bool on = at::GradMode::is_enabled();
  auto wants = [&](const Tensor& t, int64_t bit) { return on && t.defined() && t.requires_grad() ? bit : 0; };
  return wants(a, kNeedA) | wants(b, kNeedB) | wants(scale, kNeedScale) |
         wants(row_bias.value_or(Tensor()), kNeedRowBias) | wants(col_bias.value_or(Tensor()), kNeedColBias);
}

// score_reduce's Autograd kernel.
template <bool emulated>
Tensor5 reduce_autograd(const Tensor& a, const Tensor& b, const Tensor& scale, const OptTensor& row_bias,
                        const OptTensor& col_bias, int64_t pos_offset, int64_t reductions, double clamp_tau) {
  const variable_list o = ScoreReduceBackward::apply(a, b, scale, row_bias, col_bias, pos_offset, reductions,
                                                     clamp_tau, wanted(a, b, scale, row_bias, col_bias), emulated);
  return {o[0], o[1], o[2], o[3], o[4]};
}

// The Autograd kernel: the node when a gradient is wanted, the walk alone otherwise.
template <bool emulated>
Tensor7 weighted_autograd(const Tensor& a, const Tensor& b, const Tensor& scale, const OptTensor& row_bias,
                          const OptTensor& col_bias, int64_t pos_offset, int64_t reductions, double clamp_tau,
                          const OptTensor& w_row, const OptTensor& w_col, const OptTensor& w_neg,
                          const OptTensor& w_clamp, const OptTensor& w_sp, const OptTensor& w_pos, double offset) {
  const int64_t needs = wanted(a, b, scale, row_bias, col_bias);
  const variable_list o = ScoreReduceWeightedBackward::apply(a, b, scale, row_bias, col_bias, pos_offset, reductions,
                                                             clamp_tau, w_row, w_col, w_neg, w_clamp, w_sp, w_pos,
                                                             offset, needs, emulated);
  return {o[0], o[1], o[2], o[3], o[4], o[5], o[6]};
}

// Below autograd (inference mode, a graph traced below it): the walk without gradients.
template <bool emulated>
Tensor7 weighted_plain(const Tensor& a, const Tensor& b, const Tensor& scale, const OptTensor& row_bias,
                       const OptTensor& col_bias, int64_t pos_offset, int64_t reductions, double clamp_tau,
                       const OptTensor& w_row, const OptTensor& w_col, const OptTensor& w_neg,
                       const OptTensor& w_clamp, const OptTensor& w_sp, const OptTensor& w_pos, double offset) {
  const auto r = walk(emulated, a, b, scale, row_bias, col_bias, pos_offset, reductions, clamp_tau,
                      {&w_row, &w_col, &w_neg, &w_clamp, &w_sp, &w_pos}, offset, 0);
  return {std::get<0>(r), std::get<1>(r), std::get<2>(r), std::get<3>(r), std::get<4>(r), std::get<5>(r),
          std::get<6>(r)};
}

}  // namespace

TORCH_LIBRARY_IMPL(infomax_ext, Autograd, m) {
  m.impl("score_reduce", &reduce_autograd<false>);
  m.impl("score_reduce_weighted", &weighted_autograd<false>);
}
TORCH_LIBRARY_IMPL(infomax_ext, CPU, m) { m.impl("score_reduce_weighted", &weighted_plain<false>); }
TORCH_LIBRARY_IMPL(infomax_ext, CUDA, m) { m.impl("score_reduce_weighted", &weighted_plain<false>); }
#ifdef INFOMAX_WITH_EMULATED_CUDA
TORCH_LIBRARY_IMPL(infomax_ext_emulated, Autograd, m) {
  m.impl("score_reduce", &reduce_autograd<true>);
  m.impl("score_reduce_weighted", &weighted_autograd<true>);
}
TORCH_LIBRARY_IMPL(infomax_ext_emulated, CPU, m) { m.impl("score_reduce_weighted", &weighted_plain<true>); }
#endif

}  // namespace infomax_ext
