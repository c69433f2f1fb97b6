// CPU kernels of score_reduce: S = scale * A B^T + row_bias + col_bias.
//
// A tile's dot products come from one BLAS call (at::mm_out into the thread's
// tile buffer); the walk over tiles and the epilogues are the shared ones of
// reduce_walker.h. Backward adds, per G tile, (G B) into the block's rows of dA
// (owned by the thread) and G^T A into a per-thread partial dB (threads * M * d
// extra memory), so the four matmuls of a recomputing op are all BLAS calls.
#include <ATen/Dispatch.h>
#include <ATen/ops/full_like.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

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
                                  double clamp_tau) {
  check_score_reduce_args(a, b, scale, row_bias, col_bias, pos_offset, reductions, clamp_tau);
  const DotInputs in = dot_inputs(a, b, row_bias, col_bias);
  const cpu::GradInputs g = cpu::grad_inputs(grad_row_lse, grad_col_lse, grad_neg_lse, grad_clamp_lse,
                                             grad_softplus, row_lse, col_lse, neg_lse, clamp_lse, in.acc);
  const Walk w{in.A.size(0), in.B.size(0), pos_offset, cpu::active_grads(reductions, g), clamp_tau};
  const auto opts = in.A.options();
  Tensor dA = at::zeros_like(in.A), dB = at::zeros_like(in.B);
  Tensor drow = at::zeros({w.K}, opts), dcol = at::zeros({w.M}, opts);
  double dscale = 0.0;
  if (w.reductions) {
    const int n_threads = at::get_num_threads();
    Tensor dB_part = at::zeros({n_threads, w.M, in.B.size(1)}, opts);
    std::vector<double> dscale_part(n_threads, 0.0);
    AT_DISPATCH_FLOATING_TYPES(in.acc, "score_reduce_backward_cpu", [&] {
      const DotTile<scalar_t> tile = dot_tile<scalar_t>(in, scale);
      cpu::reduce_backward<scalar_t>(
          w, opts, g, drow, dcol, tile,
          [&](int tid, const Tensor& G, int64_t i0, int64_t tk, int64_t j0, int64_t tm) {
            dA.narrow(0, i0, tk).addmm_(G, in.B.narrow(0, j0, tm));              // rows of G B
            dB_part[tid].narrow(0, j0, tm).addmm_(G.t(), in.A.narrow(0, i0, tk));  // partial G^T A
          },
          [&](int tid, int64_t i0, int64_t tk) {
            // d scale = sum_ij G_ij <a_i, b_j> = sum_i <(G B)_i, a_i>.
            dscale_part[tid] +=
                dA.narrow(0, i0, tk).mul(in.A.narrow(0, i0, tk)).sum().template item<double>();
          });
      dA.mul_(tile.scale);
      dB.copy_(dB_part.sum(0)).mul_(tile.scale);
    });
    for (double v : dscale_part) dscale += v;
  }
  return Tensor5{dA.to(a.scalar_type()), dB.to(b.scalar_type()), at::full_like(scale, dscale),
                 drow.to(has(row_bias) ? row_bias->scalar_type() : in.acc),
                 dcol.to(has(col_bias) ? col_bias->scalar_type() : in.acc)};
}

}  // namespace

TORCH_LIBRARY_IMPL(infomax_ext, CPU, m) {
  m.impl("score_reduce", &score_reduce_forward_cpu);
  m.impl("_score_reduce_backward", &score_reduce_backward_cpu);
}

}  // namespace infomax_ext
