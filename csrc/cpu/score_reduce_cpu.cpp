// CPU walker of the fused score reductions.
//
// S = scale * A B^T + row_bias + col_bias is never held whole: rows are split in
// blocks of kTileRows handed to threads (at::parallel_for), each block walks the
// columns in tiles of kTileCols, a tile's dot products come from one BLAS call
// (at::mm_out into a thread-local buffer), and the epilogue folds the tile into
// running log-sum-exp states while it is hot in cache. Extra memory: the
// tile buffers, O(K + threads * M) statistics and, in backward, a per-thread
// dB accumulator (threads * M * d) -- never O(K * M).
// The per-element math (log-space merges, softplus, dL/dS) lives in
// csrc/include/infomax_ext/score_math.h and is shared with the CUDA walker.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/ops/full_like.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../score_reduce_common.h"

namespace infomax_ext {
namespace {

constexpr int64_t kTileRows = 64;
constexpr int64_t kTileCols = 512;

template <typename T>
struct Problem {
  const T* row_bias;  // (K,) or nullptr
  const T* col_bias;  // (M,) or nullptr
  T scale;
  T tau;
  int64_t K, M, d, pos_offset, reductions;
};

// Recompute one tile of S (rows [i0, i0+tk), columns [j0, j0+tm)) into buf.
template <typename T>
T* score_tile(const Tensor& A, const Tensor& B, Tensor& buf, int64_t i0, int64_t tk, int64_t j0,
              int64_t tm, const Problem<T>& p) {
  Tensor out = buf.narrow(0, 0, tk * tm).view({tk, tm});
  at::mm_out(out, A.narrow(0, i0, tk), B.narrow(0, j0, tm).t());
  T* s = out.data_ptr<T>();
  for (int64_t r = 0; r < tk; ++r) {
    const T rb = p.row_bias ? p.row_bias[i0 + r] : T(0);
    T* row = s + r * tm;
    for (int64_t c = 0; c < tm; ++c)
      row[c] = score_from_dot(row[c], p.scale, rb, p.col_bias ? p.col_bias[j0 + c] : T(0));
  }
  return s;
}

// Log-sum-exp state of f(x[k]) for k in [0, n) except k == skip (-1: none).
template <typename T, typename F>
LseState<T> row_lse_state(const T* x, int64_t n, int64_t skip, F f) {
  T m = neg_infinity<T>();
  for (int64_t k = 0; k < n; ++k)
    if (k != skip) m = std::max(m, f(x[k]));
  // NB: all entries -inf (masked) or none at all: the state stays empty.
  if (m == neg_infinity<T>()) return lse_empty<T>();
  T s = T(0);
  for (int64_t k = 0; k < n; ++k)
    if (k != skip) s += exp(f(x[k]) - m);
  return LseState<T>{m, s};
}

// Fold a tile's columns into per-column states (row-major passes over the tile).
template <typename T>
void fold_columns(const T* s, int64_t tk, int64_t tm, LseState<T>* col, std::vector<T>& mx,
                  std::vector<T>& sm) {
  mx.assign(tm, neg_infinity<T>());
  sm.assign(tm, T(0));
  for (int64_t r = 0; r < tk; ++r)
    for (int64_t c = 0; c < tm; ++c) mx[c] = std::max(mx[c], s[r * tm + c]);
  for (int64_t r = 0; r < tk; ++r)
    for (int64_t c = 0; c < tm; ++c)
      // NB: a column whose tile entries are all -inf contributes nothing (guard against -inf - -inf).
      if (mx[c] != neg_infinity<T>()) sm[c] += exp(s[r * tm + c] - mx[c]);
  for (int64_t c = 0; c < tm; ++c) col[c] = lse_merge(col[c], LseState<T>{mx[c], sm[c]});
}

template <typename T>
void forward_impl(const Tensor& A, const Tensor& B, const Problem<T>& p, Tensor5& out) {
  const int64_t K = p.K, M = p.M, red = p.reductions;
  const bool need_neg = red & (kRowLse | kNegLse);
  const int n_threads = at::get_num_threads();
  std::vector<LseState<T>> col_states((red & kColLse) ? n_threads * M : 0, lse_empty<T>());
  const int64_t n_blocks = (K + kTileRows - 1) / kTileRows;
  T* row_out = std::get<0>(out).data_ptr<T>();
  T* neg_out = std::get<2>(out).data_ptr<T>();
  T* clamp_out = std::get<3>(out).data_ptr<T>();
  T* sp_out = std::get<4>(out).data_ptr<T>();

  at::parallel_for(0, n_blocks, 1, [&](int64_t b0, int64_t b1) {
    Tensor buf = at::empty({kTileRows * kTileCols}, A.options());
    LseState<T>* col = (red & kColLse) ? col_states.data() + at::get_thread_num() * M : nullptr;
    std::vector<LseState<T>> neg(kTileRows), clamp(kTileRows);
    std::vector<T> pos(kTileRows), sp(kTileRows), mx, sm;
    const auto clamp_fn = [&](T x) { return clamp_tau(x, p.tau); };
    const auto id = [](T x) { return x; };
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t i0 = blk * kTileRows, tk = std::min(kTileRows, K - i0);
      std::fill(neg.begin(), neg.end(), lse_empty<T>());
      std::fill(clamp.begin(), clamp.end(), lse_empty<T>());
      std::fill(sp.begin(), sp.end(), T(0));
      for (int64_t j0 = 0; j0 < M; j0 += kTileCols) {
        const int64_t tm = std::min(kTileCols, M - j0);
        const T* s = score_tile(A, B, buf, i0, tk, j0, tm, p);
        for (int64_t r = 0; r < tk; ++r) {
          const T* row = s + r * tm;
          const int64_t pc = i0 + r + p.pos_offset - j0;  // positive's column in this tile
          const int64_t skip = (pc >= 0 && pc < tm) ? pc : -1;
          if (skip >= 0) pos[r] = row[skip];
          if (need_neg) neg[r] = lse_merge(neg[r], row_lse_state(row, tm, skip, id));
          if (red & kNegClampLse) clamp[r] = lse_merge(clamp[r], row_lse_state(row, tm, skip, clamp_fn));
          if (red & kNegSoftplus) {
            T acc = T(0);
            for (int64_t c = 0; c < tm; ++c)
              if (c != skip) acc += softplus(row[c]);
            sp[r] += acc;
          }
        }
        if (col) fold_columns(s, tk, tm, col + j0, mx, sm);
      }
      for (int64_t r = 0; r < tk; ++r) {
        const int64_t i = i0 + r;
        if (red & kNegLse) neg_out[i] = lse_finalize(neg[r]);
        if (red & kRowLse) row_out[i] = lse_finalize(lse_push(neg[r], pos[r]));
        if (red & kNegClampLse) clamp_out[i] = lse_finalize(clamp[r]);
        if (red & kNegSoftplus) sp_out[i] = sp[r];
      }
    }
  });

  if (red & kColLse) {
    // NB: column statistics of the threads are merged in log space, in a fixed
    // order, so reruns with the same thread count are bitwise identical.
    T* col_out = std::get<1>(out).data_ptr<T>();
    at::parallel_for(0, M, 1024, [&](int64_t j0, int64_t j1) {
      for (int64_t j = j0; j < j1; ++j) {
        LseState<T> st = lse_empty<T>();
        for (int t = 0; t < n_threads; ++t) st = lse_merge(st, col_states[t * M + j]);
        col_out[j] = lse_finalize(st);
      }
    });
  }
}

template <typename T>
Problem<T> make_problem(const Tensor& A, const Tensor& B, const Tensor& scale, const Tensor& rb,
                        const Tensor& cb, int64_t pos_offset, int64_t reductions, double tau) {
  return Problem<T>{rb.defined() ? rb.data_ptr<T>() : nullptr,
                    cb.defined() ? cb.data_ptr<T>() : nullptr,
                    static_cast<T>(scale.item<double>()),
                    static_cast<T>(tau),
                    A.size(0),
                    B.size(0),
                    A.size(1),
                    pos_offset,
                    reductions};
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
  const auto acc = acc_dtype(a.scalar_type());
  // NB: low-precision inputs are upcast once (O((K+M) d)) so every tile is
  // multiplied and reduced in float32. detach(): the worker threads of
  // parallel_for do not inherit the below-autograd dispatch state, and the
  // BLAS calls there must not see tensors that require grad.
  const Tensor A = a.detach().to(acc).contiguous(), B = b.detach().to(acc).contiguous();
  const Tensor rb = bias_acc(row_bias, acc), cb = bias_acc(col_bias, acc);
  Tensor5 out = alloc_reductions(a, A.size(0), B.size(0), reductions);
  AT_DISPATCH_FLOATING_TYPES(acc, "score_reduce_forward_cpu", [&] {
    forward_impl<scalar_t>(A, B, make_problem<scalar_t>(A, B, scale, rb, cb, pos_offset, reductions, clamp_tau),
                           out);
  });
  return out;
}

template <typename T>
void backward_impl(const Tensor& A, const Tensor& B, const Problem<T>& p, const Tensor5& grads,
                   const Tensor& row_lse, const Tensor& col_lse, const Tensor& neg_lse,
                   const Tensor& clamp_lse, Tensor& dA, Tensor& dB, Tensor& drow, Tensor& dcol,
                   double& dscale) {
  const int64_t K = p.K, M = p.M, d = p.d, red = p.reductions;
  const auto ptr = [](const Tensor& t) { return t.numel() ? t.data_ptr<T>() : nullptr; };
  const T *g_row = ptr(std::get<0>(grads)), *g_col = ptr(std::get<1>(grads)),
          *g_neg = ptr(std::get<2>(grads)), *g_clamp = ptr(std::get<3>(grads)),
          *g_sp = ptr(std::get<4>(grads));
  const T *r_lse = ptr(row_lse), *c_lse = ptr(col_lse), *n_lse = ptr(neg_lse),
          *cl_lse = ptr(clamp_lse);
  const int n_threads = at::get_num_threads();
  // Per-thread partial dB, dcol and dscale: row blocks of different threads
  // touch the same columns, so these are summed after the parallel region.
  Tensor dB_part = at::zeros({n_threads, M, d}, A.options());
  Tensor dcol_part = at::zeros({n_threads, M}, A.options());
  std::vector<double> dscale_part(n_threads, 0.0);
  T* drow_p = drow.data_ptr<T>();
  const int64_t n_blocks = (K + kTileRows - 1) / kTileRows;

  at::parallel_for(0, n_blocks, 1, [&](int64_t b0, int64_t b1) {
    const int tid = at::get_thread_num();
    Tensor buf = at::empty({kTileRows * kTileCols}, A.options());
    Tensor dB_t = dB_part[tid];
    T* dcol_t = dcol_part[tid].data_ptr<T>();
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t i0 = blk * kTileRows, tk = std::min(kTileRows, K - i0);
      Tensor A_blk = A.narrow(0, i0, tk), GB = dA.narrow(0, i0, tk);
      for (int64_t j0 = 0; j0 < M; j0 += kTileCols) {
        const int64_t tm = std::min(kTileCols, M - j0);
        T* s = score_tile(A, B, buf, i0, tk, j0, tm, p);
        for (int64_t r = 0; r < tk; ++r) {
          const int64_t i = i0 + r;
          const RowGrad<T> rg{g_row ? g_row[i] : T(0),     r_lse ? r_lse[i] : T(0),
                              g_neg ? g_neg[i] : T(0),     n_lse ? n_lse[i] : T(0),
                              g_clamp ? g_clamp[i] : T(0), cl_lse ? cl_lse[i] : T(0),
                              g_sp ? g_sp[i] : T(0)};
          const int64_t pc = i + p.pos_offset - j0;
          T* row = s + r * tm;
          T row_sum = T(0);
          for (int64_t c = 0; c < tm; ++c) {
            const int64_t j = j0 + c;
            const T g = score_grad(row[c], c == pc, rg, g_col ? g_col[j] : T(0),
                                   c_lse ? c_lse[j] : T(0), p.tau, red);
            row[c] = g;  // the tile now holds G = dL/dS
            row_sum += g;
            dcol_t[j] += g;
          }
          drow_p[i] += row_sum;
        }
        const Tensor G = buf.narrow(0, 0, tk * tm).view({tk, tm});
        GB.addmm_(G, B.narrow(0, j0, tm));             // (G B) rows of this block
        dB_t.narrow(0, j0, tm).addmm_(G.t(), A_blk);   // partial G^T A
      }
      // d scale = sum_ij G_ij <a_i, b_j> = sum_i <(G B)_i, a_i>.
      dscale_part[tid] += GB.mul(A_blk).sum().template item<double>();
    }
  });
  dA.mul_(p.scale);
  dB.copy_(dB_part.sum(0)).mul_(p.scale);
  dcol.copy_(dcol_part.sum(0));
  for (double v : dscale_part) dscale += v;
}

Tensor5 score_reduce_backward_cpu(const Tensor& grad_row_lse,    // (K,) or (0,)
                                  const Tensor& grad_col_lse,    // (M,) or (0,)
                                  const Tensor& grad_neg_lse,    // (K,) or (0,)
                                  const Tensor& grad_clamp_lse,  // (K,) or (0,)
                                  const Tensor& grad_softplus,   // (K,) or (0,)
                                  const Tensor& a, const Tensor& b, const Tensor& scale,
                                  const OptTensor& row_bias, const OptTensor& col_bias,
                                  const Tensor& row_lse,    // saved forward outputs
                                  const Tensor& col_lse, const Tensor& neg_lse,
                                  const Tensor& clamp_lse, int64_t pos_offset, int64_t reductions,
                                  double clamp_tau) {
  check_score_reduce_args(a, b, scale, row_bias, col_bias, pos_offset, reductions, clamp_tau);
  const auto acc = acc_dtype(a.scalar_type());
  const Tensor A = a.detach().to(acc).contiguous(), B = b.detach().to(acc).contiguous();
  const Tensor rb = bias_acc(row_bias, acc), cb = bias_acc(col_bias, acc);
  const auto cont = [&](const Tensor& t) { return t.detach().to(acc).contiguous(); };
  const Tensor5 grads{cont(grad_row_lse), cont(grad_col_lse), cont(grad_neg_lse),
                      cont(grad_clamp_lse), cont(grad_softplus)};
  const int64_t active = active_grads(reductions, std::get<0>(grads), std::get<1>(grads),
                                      std::get<2>(grads), std::get<3>(grads), std::get<4>(grads));
  const int64_t K = A.size(0), M = B.size(0);
  Tensor dA = at::zeros_like(A), dB = at::zeros_like(B);
  Tensor drow = at::zeros({K}, A.options()), dcol = at::zeros({M}, A.options());
  double dscale = 0.0;
  if (active) {
    AT_DISPATCH_FLOATING_TYPES(acc, "score_reduce_backward_cpu", [&] {
      backward_impl<scalar_t>(A, B,
                              make_problem<scalar_t>(A, B, scale, rb, cb, pos_offset, active, clamp_tau),
                              grads, cont(row_lse), cont(col_lse), cont(neg_lse), cont(clamp_lse), dA,
                              dB, drow, dcol, dscale);
    });
  }
  Tensor dscale_t = at::full_like(scale, dscale);
  return Tensor5{dA.to(a.scalar_type()), dB.to(b.scalar_type()), dscale_t,
                 drow.to(has(row_bias) ? row_bias->scalar_type() : acc),
                 dcol.to(has(col_bias) ? col_bias->scalar_type() : acc)};
}

}  // namespace

TORCH_LIBRARY_IMPL(infomax_ext, CPU, m) {
  m.impl("score_reduce", &score_reduce_forward_cpu);
  m.impl("_score_reduce_backward", &score_reduce_backward_cpu);
}

}  // namespace infomax_ext
