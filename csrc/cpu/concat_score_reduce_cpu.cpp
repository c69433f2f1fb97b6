// CPU kernels of concat_score_reduce: the concat-MLP critic
//
//     S[i, j] = sum_h w2[h] * act(P[i, h] + Q[j, h]) + b2      (K x M, never stored)
//
// with P = u Wu^T + b1 (K, H) and Q = v Wv^T (M, H) from plain matmuls in Python.
// Neither S nor the K x M x H hidden tensor is ever built: each tile of S is
// computed pair by pair (a loop over h, vectorised) into the thread's tile
// buffer and folded by the shared walker of reduce_walker.h. Backward recomputes
// the tile, lets the walker turn it into G = dL/dS, and per pair (i, j) adds
// t_h = G_ij w2[h] act'(P_ih + Q_jh) into dP[i] (rows owned by the thread's row
// block), into a per-thread partial dQ (threads x M x H) and G_ij act(.) into a
// per-thread dw2; db2 = sum_ij G_ij. Extra memory O((K + threads * M) * H).
// The activation math is shared with CUDA in infomax_ext/concat_math.h. The two
// hot loops (scores_tile_body, grad_tile_body) are also compiled for AVX2 and
// AVX-512 and picked at run time on x86 (cpu_isa.h).
#include <ATen/Dispatch.h>
#include <ATen/ops/full_like.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <tuple>

#include "concat_common.h"
#include "infomax_ext/concat_math.h"
#include "reduce_walker.h"

namespace infomax_ext {
namespace {

using cpu::Walk;

struct ConcatInputs {
  Tensor P, Q, w2;  // contiguous, accumulation dtype
  double b2;
  at::ScalarType acc;
};

ConcatInputs concat_inputs(const Tensor& P, const Tensor& Q, const Tensor& w2, const Tensor& b2) {
  const auto acc = acc_dtype(P.scalar_type());
  // NB: low-precision inputs are upcast once (O((K + M) H)) so every pair is
  // accumulated in float32 (float64 for float64). detach(): the worker threads
  // of parallel_for do not inherit the below-autograd dispatch state.
  const auto c = [acc](const Tensor& t) { return as_acc(t, acc); };
  return ConcatInputs{c(P), c(Q), c(w2), b2.detach().to(at::kDouble).item<double>(), acc};
}

#if defined(__GNUC__)
#define INFOMAX_ALWAYS_INLINE __attribute__((always_inline)) inline
#else
#define INFOMAX_ALWAYS_INLINE inline
#endif

// sum_h w[h] * act(p[h] + q[h]) for four columns q0..q3 at once: p and w are
// loaded once per h for the four pairs. The activation is a template parameter,
// so this loop has no branch on it and vectorises (omp simd: the reduction may
// be reassociated).
template <int64_t A, typename T>
INFOMAX_ALWAYS_INLINE void pair_scores4(const T* __restrict p, const T* __restrict w,
                                        const T* __restrict q0, const T* __restrict q1,
                                        const T* __restrict q2, const T* __restrict q3, int64_t H,
                                        T* out) {
  T s0 = T(0), s1 = T(0), s2 = T(0), s3 = T(0);
#pragma omp simd reduction(+ : s0, s1, s2, s3)
  for (int64_t h = 0; h < H; ++h) {
    const T ph = p[h], wh = w[h];
    s0 += wh * act_value<A>(ph + q0[h]);
    s1 += wh * act_value<A>(ph + q1[h]);
    s2 += wh * act_value<A>(ph + q2[h]);
    s3 += wh * act_value<A>(ph + q3[h]);
  }
  out[0] = s0, out[1] = s1, out[2] = s2, out[3] = s3;
}

template <int64_t A, typename T>
INFOMAX_ALWAYS_INLINE T pair_score(const T* __restrict p, const T* __restrict w, const T* __restrict q,
                                   int64_t H) {
  T s = T(0);
#pragma omp simd reduction(+ : s)
  for (int64_t h = 0; h < H; ++h) s += w[h] * act_value<A>(p[h] + q[h]);
  return s;
}

// Adds one pair's contributions: t = g w2 act'(p + q) into dp and dq, g act(p + q) into dw.
template <int64_t A, typename T>
INFOMAX_ALWAYS_INLINE void pair_backward(T g, const T* __restrict p, const T* __restrict q,
                                         const T* __restrict w, T* __restrict dp, T* __restrict dq,
                                         T* __restrict dw, int64_t H) {
#pragma omp simd
  for (int64_t h = 0; h < H; ++h) {
    T value, grad;
    act_value_grad<A>(p[h] + q[h], value, grad);
    const T t = g * w[h] * grad;
    dp[h] += t;
    dq[h] += t;
    dw[h] += g * value;
  }
}

template <typename T>
INFOMAX_ALWAYS_INLINE void add_to(T* __restrict dst, const T* __restrict src, int64_t n) {
  for (int64_t k = 0; k < n; ++k) dst[k] += src[k];
}

// The critic's parameters in the accumulation dtype (contiguous).
template <typename T>
struct ConcatData {
  const T* P;   // (K, H)
  const T* Q;   // (M, H)
  const T* w2;  // (H,)
  T b2;
  int64_t H;
};

// S[i0:i0+tk, j0:j0+tm] into s (row-major, leading dimension tm).
template <int64_t A, typename T>
INFOMAX_ALWAYS_INLINE void scores_tile_body(const ConcatData<T>& d, T* s, int64_t i0, int64_t tk,
                                            int64_t j0, int64_t tm) {
  const int64_t H = d.H;
  // NB: columns outer, rows inner: the tile's tk rows of P (tk * H scalars)
  // stay in cache while four rows of Q at a time are reused across them.
  int64_t c = 0;
  for (; c + 4 <= tm; c += 4) {
    const T* q = d.Q + (j0 + c) * H;
    for (int64_t r = 0; r < tk; ++r) {
      T out[4];
      pair_scores4<A>(d.P + (i0 + r) * H, d.w2, q, q + H, q + 2 * H, q + 3 * H, H, out);
      T* row = s + r * tm + c;
      for (int k = 0; k < 4; ++k) row[k] = out[k] + d.b2;
    }
  }
  for (; c < tm; ++c)
    for (int64_t r = 0; r < tk; ++r)
      s[r * tm + c] = pair_score<A>(d.P + (i0 + r) * H, d.w2, d.Q + (j0 + c) * H, H) + d.b2;
}

// Given the tile G = dL/dS[i0:i0+tk, j0:j0+tm], adds its contributions to the
// rows i0.. of dP, to this thread's partial dQ (M, H) and dw2 (3, H) (see below).
template <int64_t A, typename T>
INFOMAX_ALWAYS_INLINE void grad_tile_body(const ConcatData<T>& d, const T* G, int64_t i0, int64_t tk,
                                          int64_t j0, int64_t tm, T* dP, T* dQ, T* dw) {
  const int64_t H = d.H;
  T* dw_tile = dw + H;
  T* dw_col = dw + 2 * H;
  std::fill(dw_tile, dw_tile + H, T(0));
  // NB: columns outer as in the tile: dQ[j] and Q[j] stay in L1 while the
  // block's rows of P and dP (owned by this thread) are swept.
  for (int64_t c = 0; c < tm; ++c) {
    const int64_t j = j0 + c;
    std::fill(dw_col, dw_col + H, T(0));
    for (int64_t r = 0; r < tk; ++r) {
      const T gij = G[r * tm + c];
      if (gij == T(0)) continue;
      const int64_t i = i0 + r;
      pair_backward<A>(gij, d.P + i * H, d.Q + j * H, d.w2, dP + i * H, dQ + j * H, dw_col, H);
    }
    add_to(dw_tile, dw_col, H);
  }
  add_to(dw, dw_tile, H);
}

// The two hot loops are compiled for each ISA of cpu_isa.h and picked at run time:
// the activation polynomials are compute-bound and run about twice as fast 8 lanes
// wide as 4 (tests cover every ISA).
INFOMAX_CPU_CLONES(scores_tile, scores_tile_body<A>,
                   (const ConcatData<T>& d, T* s, int64_t i0, int64_t tk, int64_t j0, int64_t tm),
                   (d, s, i0, tk, j0, tm), int64_t A, typename T)
INFOMAX_CPU_CLONES(grad_tile, grad_tile_body<A>,
                   (const ConcatData<T>& d, const T* G, int64_t i0, int64_t tk, int64_t j0, int64_t tm, T* dP,
                    T* dQ, T* dw),
                   (d, G, i0, tk, j0, tm, dP, dQ, dw), int64_t A, typename T)

// The tile functions of one activation and dtype for this CPU.
template <int64_t A, typename T>
struct ConcatKernels {
  decltype(&scores_tile_base<A, T>) scores = INFOMAX_CPU_PICK(scores_tile, A, T);
  decltype(&grad_tile_base<A, T>) grad = INFOMAX_CPU_PICK(grad_tile, A, T);
};

// The walker's tile functor: writes the scores S[i0:i0+tk, j0:j0+tm] into buf
// and returns a pointer to them.
template <int64_t A, typename T>
struct ConcatTile {
  ConcatData<T> d;
  ConcatKernels<A, T> k;

  T* operator()(Tensor& buf, int64_t i0, int64_t tk, int64_t j0, int64_t tm) const {
    T* s = buf.data_ptr<T>();
    k.scores(d, s, i0, tk, j0, tm);
    return s;
  }
};

Tensor5 concat_score_reduce_forward_cpu(const Tensor& P,    // (K, H) = u Wu^T + b1, anchors
                                        const Tensor& Q,    // (M, H) = v Wv^T, candidates
                                        const Tensor& w2,   // (H,) output weights
                                        const Tensor& b2,   // one element, output bias
                                        int64_t activation,  // Activation code
                                        int64_t pos_offset,  // positive of row i at column i + pos_offset
                                        int64_t reductions,  // bit mask of Reduction
                                        double clamp_tau) {  // clamp of kNegClampLse
  check_concat_args(P, Q, w2, b2, activation, pos_offset, reductions, clamp_tau);
  const ConcatInputs in = concat_inputs(P, Q, w2, b2);
  const int64_t H = in.P.size(1);
  const Walk w{in.P.size(0), in.Q.size(0), pos_offset, reductions, clamp_tau};
  Tensor5 out = alloc_reductions(P, w.K, w.M, reductions);
  AT_DISPATCH_FLOATING_TYPES(in.acc, "concat_score_reduce_forward_cpu", [&] {
    dispatch_activation(activation, [&](auto act) {
      constexpr int64_t A = decltype(act)::value;
      const ConcatTile<A, scalar_t> tile{{in.P.data_ptr<scalar_t>(), in.Q.data_ptr<scalar_t>(),
                                          in.w2.data_ptr<scalar_t>(), static_cast<scalar_t>(in.b2), H},
                                         {}};
      cpu::reduce_forward<scalar_t>(w, in.P.options(), out, tile);
    });
  });
  return out;
}

Tensor4 concat_score_reduce_backward_cpu(const Tensor& grad_row_lse,    // (K,) or (0,)
                                         const Tensor& grad_col_lse,    // (M,) or (0,)
                                         const Tensor& grad_neg_lse,    // (K,) or (0,)
                                         const Tensor& grad_clamp_lse,  // (K,) or (0,)
                                         const Tensor& grad_softplus,   // (K,) or (0,)
                                         const Tensor& P, const Tensor& Q, const Tensor& w2,
                                         const Tensor& b2, int64_t activation,
                                         const Tensor& row_lse,  // saved forward outputs
                                         const Tensor& col_lse, const Tensor& neg_lse,
                                         const Tensor& clamp_lse, int64_t pos_offset,
                                         int64_t reductions, double clamp_tau) {
  check_concat_args(P, Q, w2, b2, activation, pos_offset, reductions, clamp_tau);
  check_concat_backward_args(grad_row_lse, grad_col_lse, grad_neg_lse, grad_clamp_lse, grad_softplus, P, Q, row_lse,
                             col_lse, neg_lse, clamp_lse, reductions);
  const ConcatInputs in = concat_inputs(P, Q, w2, b2);
  const cpu::GradInputs g = cpu::grad_inputs(grad_row_lse, grad_col_lse, grad_neg_lse, grad_clamp_lse,
                                             grad_softplus, row_lse, col_lse, neg_lse, clamp_lse, in.acc);
  const int64_t H = in.P.size(1);
  const Walk w{in.P.size(0), in.Q.size(0), pos_offset, cpu::active_grads(reductions, g), clamp_tau};
  const auto opts = in.P.options();
  Tensor dP = at::zeros_like(in.P), dQ = at::zeros_like(in.Q), dw2 = at::zeros_like(in.w2);
  Tensor drow = at::zeros({w.K}, opts), dcol = at::zeros({w.M}, opts);
  if (w.reductions) {
    const int n_threads = at::get_num_threads();
    // NB: row blocks of different threads meet in the same columns: dQ and dw2
    // are kept per thread and summed after the walk (no atomics, deterministic).
    Tensor dQ_part = at::zeros({n_threads, w.M, H}, opts);
    // NB: dw2 sums K * M terms of both signs (G's rows sum to about 0). It is
    // accumulated in three levels, over a column's rows, over a tile's columns,
    // then per thread, so float32 rounding grows with the tile sizes, not K * M.
    Tensor dw_part = at::zeros({n_threads, 3, H}, opts);  // [thread total, tile, column]
    AT_DISPATCH_FLOATING_TYPES(in.acc, "concat_score_reduce_backward_cpu", [&] {
      dispatch_activation(activation, [&](auto act) {
        constexpr int64_t A = decltype(act)::value;
        const ConcatTile<A, scalar_t> tile{{in.P.data_ptr<scalar_t>(), in.Q.data_ptr<scalar_t>(),
                                            in.w2.data_ptr<scalar_t>(), static_cast<scalar_t>(in.b2), H},
                                           {}};
        scalar_t* dPp = dP.data_ptr<scalar_t>();
        scalar_t* dQp = dQ_part.data_ptr<scalar_t>();
        scalar_t* dwp = dw_part.data_ptr<scalar_t>();
        cpu::reduce_backward<scalar_t>(
            w, opts, g, drow, dcol, tile,
            [&](int tid, const Tensor& G, int64_t i0, int64_t tk, int64_t j0, int64_t tm) {
              tile.k.grad(tile.d, G.data_ptr<scalar_t>(), i0, tk, j0, tm, dPp, dQp + tid * w.M * H,
                          dwp + tid * 3 * H);
            },
            [](int, int64_t, int64_t) {});
      });
    });
    dQ.copy_(dQ_part.sum(0));
    dw2.copy_(dw_part.select(1, 0).sum(0));
  }
  // d b2 = sum_ij G_ij = sum_i (G 1)_i.
  const Tensor db2 = at::full_like(b2, drow.sum().item<double>());
  return Tensor4{dP.to(P.scalar_type()), dQ.to(Q.scalar_type()), dw2.to(w2.scalar_type()), db2};
}

}  // namespace

TORCH_LIBRARY_IMPL(infomax_ext, CPU, m) {
  m.impl("concat_score_reduce", &concat_score_reduce_forward_cpu);
  m.impl("_concat_score_reduce_backward", &concat_score_reduce_backward_cpu);
}

}  // namespace infomax_ext
