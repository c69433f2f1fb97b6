// The CPU tile walk shared by every fused score op (dot-product and concat
// critic): only how a tile of S is produced, and what a tile of G = dL/dS
// feeds into, differ between ops.
//
// Rows are split in blocks of kTileRows handed to threads (at::parallel_for);
// each block walks the columns in tiles of kTileCols; the epilogue folds a tile
// into running log-sum-exp states while it is hot in cache, then the tile is
// dropped. Extra memory: one tile buffer per thread and O(K + threads * M)
// statistics, never O(K * M). The per-element math lives in
// csrc/include/infomax_ext/score_math.h, shared with the CUDA walker.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <vector>

#include "../score_reduce_common.h"

namespace infomax_ext {
namespace cpu {

constexpr int64_t kTileRows = 64;
constexpr int64_t kTileCols = 512;

// Shape and options of one reduction walk.
struct Walk {
  int64_t K, M;        // S is K x M
  int64_t pos_offset;  // positive of row i at column i + pos_offset
  int64_t reductions;  // bit mask of Reduction (in backward: those with a gradient)
  double tau;          // clamp of kNegClampLse
};

// A thread-local tile buffer of kTileRows * kTileCols accumulation scalars.
inline Tensor tile_buffer(const at::TensorOptions& opts) {
  return at::empty({kTileRows * kTileCols}, opts);
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
      // NB: a column whose tile entries are all -inf contributes nothing (no -inf - -inf).
      if (mx[c] != neg_infinity<T>()) sm[c] += exp(s[r * tm + c] - mx[c]);
  for (int64_t c = 0; c < tm; ++c) col[c] = lse_merge(col[c], LseState<T>{mx[c], sm[c]});
}

// Forward walk. tile(buf, i0, tk, j0, tm) returns a pointer to the tk x tm
// scores S[i0:i0+tk, j0:j0+tm] (row-major, leading dimension tm), written into
// the thread's buffer `buf`. Fills the requested outputs of `out`.
template <typename T, typename TileFn>
void reduce_forward(const Walk& w, const at::TensorOptions& opts, Tensor5& out, TileFn tile) {
  const int64_t K = w.K, M = w.M, red = w.reductions;
  const bool need_neg = red & (kRowLse | kNegLse);
  const T tau = static_cast<T>(w.tau);
  const int n_threads = at::get_num_threads();
  std::vector<LseState<T>> col_states((red & kColLse) ? n_threads * M : 0, lse_empty<T>());
  const auto out_ptr = [](const Tensor& t) { return t.numel() ? t.data_ptr<T>() : nullptr; };
  T* row_out = out_ptr(std::get<0>(out));
  T* neg_out = out_ptr(std::get<2>(out));
  T* clamp_out = out_ptr(std::get<3>(out));
  T* sp_out = out_ptr(std::get<4>(out));

  at::parallel_for(0, (K + kTileRows - 1) / kTileRows, 1, [&](int64_t b0, int64_t b1) {
    Tensor buf = tile_buffer(opts);
    LseState<T>* col = (red & kColLse) ? col_states.data() + at::get_thread_num() * M : nullptr;
    std::vector<LseState<T>> neg(kTileRows), clamp(kTileRows);
    std::vector<T> pos(kTileRows), sp(kTileRows), mx, sm;
    const auto clamp_fn = [tau](T x) { return clamp_tau(x, tau); };
    const auto id = [](T x) { return x; };
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t i0 = blk * kTileRows, tk = std::min(kTileRows, K - i0);
      std::fill(neg.begin(), neg.end(), lse_empty<T>());
      std::fill(clamp.begin(), clamp.end(), lse_empty<T>());
      std::fill(sp.begin(), sp.end(), T(0));
      for (int64_t j0 = 0; j0 < M; j0 += kTileCols) {
        const int64_t tm = std::min(kTileCols, M - j0);
        const T* s = tile(buf, i0, tk, j0, tm);
        for (int64_t r = 0; r < tk; ++r) {
          const T* row = s + r * tm;
          const int64_t pc = i0 + r + w.pos_offset - j0;  // positive's column in this tile
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
        // NB: the row's log-sum-exp is the negatives' state plus the positive.
        if (red & kNegLse) neg_out[i] = lse_finalize(neg[r]);
        if (red & kRowLse) row_out[i] = lse_finalize(lse_push(neg[r], pos[r]));
        if (red & kNegClampLse) clamp_out[i] = lse_finalize(clamp[r]);
        if (red & kNegSoftplus) sp_out[i] = sp[r];
      }
    }
  });

  if (red & kColLse) {
    // NB: the threads' column states are merged in log space in a fixed order,
    // so reruns with the same thread count are bitwise identical.
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

// Upstream gradients and saved statistics of a backward walk, in the accumulation dtype.
struct GradInputs {
  Tensor g_row, g_col, g_neg, g_clamp, g_sp;  // (K,), (M,), (K,), (K,), (K,) or (0,)
  Tensor row_lse, col_lse, neg_lse, clamp_lse;  // saved forward outputs or (0,)
};

inline GradInputs grad_inputs(const Tensor& g_row, const Tensor& g_col, const Tensor& g_neg,
                              const Tensor& g_clamp, const Tensor& g_sp, const Tensor& row_lse,
                              const Tensor& col_lse, const Tensor& neg_lse, const Tensor& clamp_lse,
                              at::ScalarType acc) {
  const auto c = [acc](const Tensor& t) { return t.detach().to(acc).contiguous(); };
  return GradInputs{c(g_row),   c(g_col),   c(g_neg),   c(g_clamp),  c(g_sp),
                    c(row_lse), c(col_lse), c(neg_lse), c(clamp_lse)};
}

inline int64_t active_grads(int64_t reductions, const GradInputs& g) {
  return infomax_ext::active_grads(reductions, g.g_row, g.g_col, g.g_neg, g.g_clamp, g.g_sp);
}

// Backward walk: recomputes each tile of S with tile(...), overwrites it with
// G = dL/dS (score_grad), accumulates drow (K,) and dcol (M,), and hands the G
// tile to consume(tid, G, i0, tk, j0, tm) -- G a (tk, tm) tensor view -- for the
// op's own accumulations; finish(tid, i0, tk) runs after each row block.
template <typename T, typename TileFn, typename ConsumeFn, typename FinishFn>
void reduce_backward(const Walk& w, const at::TensorOptions& opts, const GradInputs& g,
                     Tensor& drow, Tensor& dcol, TileFn tile, ConsumeFn consume, FinishFn finish) {
  const int64_t K = w.K, M = w.M, red = w.reductions;
  const T tau = static_cast<T>(w.tau);
  const auto ptr = [](const Tensor& t) { return t.numel() ? t.data_ptr<T>() : nullptr; };
  const T *g_row = ptr(g.g_row), *g_col = ptr(g.g_col), *g_neg = ptr(g.g_neg),
          *g_clamp = ptr(g.g_clamp), *g_sp = ptr(g.g_sp);
  const T *r_lse = ptr(g.row_lse), *c_lse = ptr(g.col_lse), *n_lse = ptr(g.neg_lse),
          *cl_lse = ptr(g.clamp_lse);
  const int n_threads = at::get_num_threads();
  // NB: row blocks of different threads touch the same columns: column sums are
  // kept per thread and added after the parallel region (no atomics, deterministic).
  Tensor dcol_part = at::zeros({n_threads, M}, opts);
  T* drow_p = drow.data_ptr<T>();

  at::parallel_for(0, (K + kTileRows - 1) / kTileRows, 1, [&](int64_t b0, int64_t b1) {
    const int tid = at::get_thread_num();
    Tensor buf = tile_buffer(opts);
    T* dcol_t = dcol_part[tid].data_ptr<T>();
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t i0 = blk * kTileRows, tk = std::min(kTileRows, K - i0);
      for (int64_t j0 = 0; j0 < M; j0 += kTileCols) {
        const int64_t tm = std::min(kTileCols, M - j0);
        T* s = tile(buf, i0, tk, j0, tm);
        for (int64_t r = 0; r < tk; ++r) {
          const int64_t i = i0 + r;
          const RowGrad<T> rg{g_row ? g_row[i] : T(0),     r_lse ? r_lse[i] : T(0),
                              g_neg ? g_neg[i] : T(0),     n_lse ? n_lse[i] : T(0),
                              g_clamp ? g_clamp[i] : T(0), cl_lse ? cl_lse[i] : T(0),
                              g_sp ? g_sp[i] : T(0)};
          const int64_t pc = i + w.pos_offset - j0;
          T* row = s + r * tm;
          T row_sum = T(0);
          for (int64_t c = 0; c < tm; ++c) {
            const int64_t j = j0 + c;
            const T gij = score_grad(row[c], c == pc, rg, g_col ? g_col[j] : T(0),
                                     c_lse ? c_lse[j] : T(0), tau, red);
            row[c] = gij;  // the tile now holds G
            row_sum += gij;
            dcol_t[j] += gij;
          }
          drow_p[i] += row_sum;
        }
        consume(tid, buf.narrow(0, 0, tk * tm).view({tk, tm}), i0, tk, j0, tm);
      }
      finish(tid, i0, tk);
    }
  });
  dcol.copy_(dcol_part.sum(0));
}

}  // namespace cpu
}  // namespace infomax_ext
