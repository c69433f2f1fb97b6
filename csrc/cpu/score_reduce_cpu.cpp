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

#include "reduce_walker.h"

namespace infomax_ext {
namespace {

using cpu::Walk;

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
    at::mm_out(out, A.narrow(0, i0, tk), B.narrow(0, j0, tm).t());
    T* s = out.data_ptr<T>();
    for (int64_t r = 0; r < tk; ++r) {
      const T rb = row_bias ? row_bias[i0 + r] : T(0);
      T* row = s + r * tm;
      for (int64_t c = 0; c < tm; ++c)
        row[c] = score_from_dot(row[c], scale, rb, col_bias ? col_bias[j0 + c] : T(0));
    }
    return s;
  }
};

struct DotInputs {
  Tensor A, B, rb, cb;  // contiguous, accumulation dtype; biases undefined if absent
  at::ScalarType acc;
};

DotInputs dot_inputs(const Tensor& a, const Tensor& b, const OptTensor& row_bias,
                     const OptTensor& col_bias) {
  const auto acc = acc_dtype(a.scalar_type());
  // NB: low-precision inputs are upcast once (O((K+M) d)) so every tile is
  // multiplied and reduced in float32. detach(): the worker threads of
  // parallel_for do not inherit the below-autograd dispatch state, and the
  // BLAS calls there must not see tensors that require grad.
  return DotInputs{a.detach().to(acc).contiguous(), b.detach().to(acc).contiguous(),
                   bias_acc(row_bias, acc), bias_acc(col_bias, acc), acc};
}

template <typename T>
DotTile<T> dot_tile(const DotInputs& in, const Tensor& scale) {
  return DotTile<T>{in.A, in.B, in.rb.defined() ? in.rb.data_ptr<T>() : nullptr,
                    in.cb.defined() ? in.cb.data_ptr<T>() : nullptr,
                    static_cast<T>(scale.item<double>())};
}

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
