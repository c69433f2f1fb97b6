// CPU kernels of score_reduce: S = scale * A B^T + row_bias + col_bias.
//
// A tile's dot products come from one BLAS call (cpu::gemm into the thread's
// tile buffer); the walk over tiles and the epilogues are the shared ones of
// reduce_walker.h. Backward adds, per G tile, (G B) into the block's rows of dA
// (owned by the thread) and G^T A into dB or a per-thread partial ((threads - 1) * M * d
// extra memory), so the four matmuls of a recomputing op are all BLAS calls.
#include <ATen/Dispatch.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/full_like.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <utility>
#include <vector>

#include "dot_tile.h"

namespace infomax_ext {
namespace {

using cpu::DotInputs;
using cpu::DotTile;
using cpu::Walk;
using cpu::dot_inputs;
using cpu::dot_tile;

Tensor5 score_reduce_forward_cpu(const Tensor& a,            // (K, d) anchors
                                 const Tensor& b,            // (M, d) candidates
                                 const Tensor& scale,        // one element
                                 const OptTensor& row_bias,  // (K,) or None
                                 const OptTensor& col_bias,  // (M,) or None
                                 int64_t pos_offset,         // positive of row i at column i + pos_offset
                                 int64_t reductions,         // bit mask of Reduction
                                 double clamp_tau) {         // clamp of kNegClampLse
  check_score_reduce_args(a, b, scale, row_bias, col_bias, pos_offset, reductions, clamp_tau);
  const DotInputs in = dot_inputs(a, b, row_bias, col_bias);
  const Walk w{in.A.size(0), in.B.size(0), pos_offset, reductions, clamp_tau};
  Tensor5 out = alloc_reductions(a, w.K, w.M, reductions);
  AT_DISPATCH_FLOATING_TYPES(in.acc, "score_reduce_forward_cpu", [&] {
    cpu::reduce_forward<scalar_t>(w, in.A.options(), out, dot_tile<scalar_t>(in, scale));
  });
  return out;
}

// The input gradients of a dot-product walk, accumulated from its G tiles: the
// block's rows of dA += G B (owned by the thread) and dB += G^T A, into dB itself for
// thread 0 and into a partial per other thread ((threads - 1) * M * d extra memory,
// added in a fixed order: no atomics, bitwise reruns), so the matmuls of the gradient
// are all BLAS calls; d scale = sum_ij G_ij <a_i, b_j> = sum_i <(G B)_i, a_i>, once at the end.
// needs_grad (kNeedA | kNeedB | kNeedScale): a GEMM whose gradient nobody needs is
// skipped, and so is the per-thread dB memory. The row and column sums of G are taken
// only for a bias that is given (walk_drow / walk_dcol); without it they stay zeros.
// NB: the scale s of S rides on the G GEMMs (alpha = s) unless d scale is wanted, which
// needs G B unscaled (dividing by s would fail at s = 0); then dA and dB are scaled
// once at the end.
// NB: dA, dB and the partials start uninitialised. The first GEMM into each range
// overwrites it (beta = 0): for dA a row block's first column tile (j0 = 0: the walkers
// visit a block's tiles in order, on one thread), for a thread's dB its first row
// block. result() zeroes what no GEMM wrote. At K = M = 256 the zero fills were about a
// twentieth of the op's time.
template <typename T>
struct DotGrads {
  const DotInputs& in;
  const bool with_dA, with_dB, with_dscale;
  const T s, alpha;
  Tensor dA, dB, dB_rest, drow, dcol;
  std::vector<int64_t> first_block;  // per thread: the i0 of the first block it consumed, or -1

  DotGrads(const DotInputs& in_, int64_t K, int64_t M, T s_, int64_t needs_grad = kNeedAll)
      : in(in_),
        with_dA(need_dA(needs_grad)),
        with_dB(need_dB(needs_grad)),
        with_dscale(needs_grad & kNeedScale),
        s(s_),
        alpha(with_dscale ? T(1) : s_),
        dA(at::empty_like(in_.A)),
        dB(at::empty_like(in_.B)),
        dB_rest(with_dB && at::get_num_threads() > 1
                    ? at::empty({at::get_num_threads() - 1, M, in_.B.size(1)}, in_.A.options())
                    : Tensor()),
        drow(at::zeros({K}, in_.A.options())),
        dcol(at::zeros({M}, in_.A.options())),
        first_block(at::get_num_threads(), -1) {}

  // The dB a thread accumulates into: dB itself for thread 0, its partial otherwise.
  Tensor dB_of(int tid) const { return tid == 0 ? dB : dB_rest[tid - 1]; }

  // The walk's drow and dcol: undefined (not summed) without their bias.
  Tensor walk_drow() const { return in.rb.defined() ? drow : Tensor(); }
  Tensor walk_dcol() const { return in.cb.defined() ? dcol : Tensor(); }

  // The betas of a tile's two GEMMs: 0 where it is the first to write its range of dA
  // (resp. of the thread's dB), 1 where it accumulates.
  std::pair<bool, bool> accumulate(int tid, int64_t i0, int64_t j0) {
    int64_t& first = first_block[tid];
    if (first < 0) first = i0;
    return {j0 != 0, first != i0};
  }

  void consume(int tid, const Tensor& G, int64_t i0, int64_t tk, int64_t j0, int64_t tm) {
    if constexpr (std::is_same_v<T, float>) {
      if (in.A16.defined()) return consume_bf16(tid, G, i0, tk, j0, tm);
    }
    const auto [acc_a, acc_b] = accumulate(tid, i0, j0);
    const T* g = G.data_ptr<T>();
    const int64_t d = in.A.size(1);
    if (with_dA)  // rows of G B
      cpu::gemm<T>(false, false, tk, d, tm, alpha, g, tm, in.B.data_ptr<T>() + j0 * d, d, T(acc_a),
                   dA.data_ptr<T>() + i0 * d, d);
    if (with_dB) {  // (partial) G^T A
      T* dB_t = dB_of(tid).template data_ptr<T>();
      cpu::gemm<T>(true, false, tm, d, tk, alpha, g, tm, in.A.data_ptr<T>() + i0 * d, d, T(acc_b), dB_t + j0 * d,
                   d);
    }
  }

  // The same with bf16 GEMMs accumulating into the float32 dA and dB (beta = 1). NB: G
  // is rounded to bf16 for them, as the inputs already are; its sums (drow, dcol) and
  // every statistic stay float32.
  void consume_bf16(int tid, const Tensor& G, int64_t i0, int64_t tk, int64_t j0, int64_t tm) {
    const auto [acc_a, acc_b] = accumulate(tid, i0, j0);
    const Tensor G16 = G.to(at::kBFloat16);
    const at::BFloat16* g = G16.data_ptr<at::BFloat16>();
    const int64_t d = in.A16.size(1);
    if (with_dA)
      cpu::gemm_bf16(false, false, tk, d, tm, alpha, g, tm, in.B16.data_ptr<at::BFloat16>() + j0 * d, d,
                     float(acc_a), dA.data_ptr<float>() + i0 * d, d);
    if (with_dB) {
      cpu::gemm_bf16(true, false, tm, d, tk, alpha, g, tm, in.A16.data_ptr<at::BFloat16>() + i0 * d, d,
                     float(acc_b), dB_of(tid).template data_ptr<float>() + j0 * d, d);
    }
  }

  // (da, db, dscale, drow, dcol) in the dtypes of the inputs, or da and db in the
  // accumulation dtype with keep_acc (the caller adds to them before one cast). NB: scaled
  // in place.
  Tensor5 result(const Tensor& a, const Tensor& b, const Tensor& scale, const OptTensor& row_bias,
                 const OptTensor& col_bias, bool keep_acc = false) {
    // NB: every row block is consumed or none is (no gradient term): dA is all written
    // or not at all; a thread's dB partial is written if it consumed a block.
    const bool consumed = std::any_of(first_block.begin(), first_block.end(), [](int64_t i) { return i >= 0; });
    if (!with_dA || !consumed) dA.zero_();
    if (!with_dB || first_block[0] < 0) dB.zero_();
    if (dB_rest.defined())
      for (int64_t t = 0; t < dB_rest.size(0); ++t)
        if (first_block[t + 1] >= 0) dB.add_(dB_rest[t]);
    dB_rest = Tensor();
    double dscale = 0.0;
    if (with_dscale) {
      // NB: accumulated in double: K * d products of either sign.
      dscale = dA.mul(in.A).sum(at::kDouble).template item<double>();
      dA.mul_(s);
      dB.mul_(s);
    }
    return Tensor5{dA.to(keep_acc ? in.acc : a.scalar_type()), dB.to(keep_acc ? in.acc : b.scalar_type()),
                   at::full_like(scale, dscale), drow.to(has(row_bias) ? row_bias->scalar_type() : in.acc),
                   dcol.to(has(col_bias) ? col_bias->scalar_type() : in.acc)};
  }
};

Tensor5 score_reduce_backward_cpu(const Tensor& grad_row_lse,    // (K,) or (0,)
                                  const Tensor& grad_col_lse,    // (M,) or (0,)
                                  const Tensor& grad_neg_lse,    // (K,) or (0,)
                                  const Tensor& grad_clamp_lse,  // (K,) or (0,)
                                  const Tensor& grad_softplus,   // (K,) or (0,)
                                  const Tensor& a, const Tensor& b, const Tensor& scale,
                                  const OptTensor& row_bias, const OptTensor& col_bias,
                                  const Tensor& row_lse,  // saved forward outputs
                                  const Tensor& col_lse, const Tensor& neg_lse,
                                  const Tensor& clamp_lse, int64_t pos_offset, int64_t reductions,
                                  double clamp_tau, int64_t needs_grad,
                                  bool keep_acc) {  // da, db in the accumulation dtype
  check_score_reduce_args(a, b, scale, row_bias, col_bias, pos_offset, reductions, clamp_tau);
  check_needs_grad(needs_grad, "_score_reduce_backward");
  check_score_reduce_backward_args(grad_row_lse, grad_col_lse, grad_neg_lse, grad_clamp_lse, grad_softplus, a, b,
                                   row_lse, col_lse, neg_lse, clamp_lse, reductions);
  const DotInputs in = dot_inputs(a, b, row_bias, col_bias);
  const cpu::GradInputs g = cpu::grad_inputs(grad_row_lse, grad_col_lse, grad_neg_lse, grad_clamp_lse,
                                             grad_softplus, row_lse, col_lse, neg_lse, clamp_lse, in.acc);
  const Walk w{in.A.size(0), in.B.size(0), pos_offset, cpu::active_grads(reductions, g), clamp_tau};
  Tensor5 grads;
  AT_DISPATCH_FLOATING_TYPES(in.acc, "score_reduce_backward_cpu", [&] {
    const DotTile<scalar_t> tile = dot_tile<scalar_t>(in, scale);
    DotGrads<scalar_t> acc(in, w.K, w.M, tile.scale, needs_grad);
    if (w.reductions) {
      cpu::reduce_backward<scalar_t>(
          w, in.A.options(), g, acc.walk_drow(), acc.walk_dcol(), tile,
          [&](int tid, const Tensor& G, int64_t i0, int64_t tk, int64_t j0, int64_t tm) {
            acc.consume(tid, G, i0, tk, j0, tm);
          },
          [](int, int64_t, int64_t) {});
    }
    grads = acc.result(a, b, scale, row_bias, col_bias, keep_acc);
  });
  return grads;
}

// The row statistics of score_reduce and, in the same walk, the gradients of the
// loss sum_i (g_row_i row_lse_i + g_neg_i neg_lse_i + g_clamp_i neg_clamp_lse_i +
// g_sp_i neg_softplus_i + g_pos_i S[i, i + pos_offset]) for upstream gradients known in
// advance (e.g. 1/K for a mean): three GEMMs instead of the four of score_reduce plus its
// backward; the positives' weights join G. NB: with a column statistic (final only
// after every row) or when the kept rows (cpu::fwd_bwd_fits) would pass
// kKeptRowsBudget, it is score_reduce followed by its backward (same results).
// Arguments checked by score_reduce_with_grad (score_reduce_common.h).
WithGrad score_reduce_with_grad_cpu(const Tensor& grad_row_lse, const Tensor& grad_col_lse,
                                    const Tensor& grad_neg_lse, const Tensor& grad_clamp_lse,
                                    const Tensor& grad_softplus, const Tensor& grad_pos, const Tensor& a,
                                    const Tensor& b, const Tensor& scale, const OptTensor& row_bias,
                                    const OptTensor& col_bias, int64_t pos_offset, int64_t reductions,
                                    double clamp_tau, int64_t needs_grad) {
  const DotInputs in = dot_inputs(a, b, row_bias, col_bias);
  if ((reductions & kColLse) || !cpu::fwd_bwd_fits(in.B.size(0), in.A.element_size()))
    return forward_then_backward(&score_reduce_forward_cpu, &score_reduce_backward_cpu, grad_row_lse, grad_col_lse,
                                 grad_neg_lse, grad_clamp_lse, grad_softplus, grad_pos, a, b, scale, row_bias,
                                 col_bias, pos_offset, reductions, clamp_tau, needs_grad);
  const Tensor none = at::empty({0}, in.A.options());
  cpu::GradInputs g = cpu::grad_inputs(grad_row_lse, none, grad_neg_lse, grad_clamp_lse, grad_softplus, none, none,
                                       none, none, in.acc);
  g.g_pos = as_acc(grad_pos, in.acc);
  const Walk w{in.A.size(0), in.B.size(0), pos_offset, reductions, clamp_tau};
  WithGrad r{alloc_reductions(a, w.K, w.M, reductions), at::empty({g.g_pos.numel() ? w.K : 0}, in.A.options()), {}};
  AT_DISPATCH_FLOATING_TYPES(in.acc, "score_reduce_with_grad_cpu", [&] {
    const DotTile<scalar_t> tile = dot_tile<scalar_t>(in, scale);
    DotGrads<scalar_t> acc(in, w.K, w.M, tile.scale, needs_grad);
    cpu::reduce_forward_backward<scalar_t>(
        w, in.A.options(), r.stats, r.pos, g, acc.walk_drow(), acc.walk_dcol(), tile,
        [&](int tid, const Tensor& G, int64_t i0, int64_t tk, int64_t j0, int64_t tm) {
          acc.consume(tid, G, i0, tk, j0, tm);
        },
        [](int, int64_t, int64_t) {});
    r.grads = acc.result(a, b, scale, row_bias, col_bias, /*keep_acc=*/true);
  });
  return r;
}

}  // namespace

TORCH_LIBRARY_IMPL(infomax_ext, CPU, m) {
  m.impl("score_reduce", &score_reduce_forward_cpu);
  m.impl("_score_reduce_backward", &backward_op<&score_reduce_backward_cpu>);
  m.impl("_score_reduce_with_grad", &score_reduce_with_grad<&score_reduce_with_grad_cpu>);
}

}  // namespace infomax_ext
