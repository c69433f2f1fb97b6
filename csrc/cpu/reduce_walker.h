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
#include "cpu_isa.h"

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

// The loops below are written branch-free over a tile row (selects, vexp) so
// that GCC vectorises them; a row's positive is handled by splitting the row
// into the two ranges around it.

// max(x, m) that propagates NaN: a NaN score must give a NaN statistic, never
// be skipped into a wrong finite (or -inf) one.
template <typename T>
INFOMAX_CPU_INLINE T nan_max(T x, T m) {
  return (x > m || x != x) ? x : m;
}

// max of x[lo, hi). NB: eight independent lanes, because GCC will not
// vectorise a single floating max reduction without -ffast-math.
template <typename T>
INFOMAX_CPU_INLINE T range_max(const T* x, int64_t lo, int64_t hi, T m) {
  T lanes[8];
  for (int l = 0; l < 8; ++l) lanes[l] = m;
  int64_t k = lo;
  for (; k + 8 <= hi; k += 8)
    for (int l = 0; l < 8; ++l) lanes[l] = nan_max(x[k + l], lanes[l]);
  for (; k < hi; ++k) m = nan_max(x[k], m);
  for (int l = 0; l < 8; ++l) m = nan_max(lanes[l], m);
  return m;
}

// sum of f(x[k]) over k in [lo, hi).
template <typename T, typename F>
INFOMAX_CPU_INLINE T range_sum(const T* x, int64_t lo, int64_t hi, F f) {
  T s = T(0);
  for (int64_t k = lo; k < hi; ++k) s += f(x[k]);
  return s;
}

// Log-sum-exp state of x[0, n) without x[skip] (-1: none).
template <typename T>
INFOMAX_CPU_INLINE LseState<T> row_state(const T* x, int64_t n, int64_t skip) {
  const int64_t a = skip < 0 ? n : skip;
  const T m = range_max(x, a + 1, n, range_max(x, 0, a, neg_infinity<T>()));
  // NB: all entries -inf (masked) or none at all: the state stays empty.
  if (m == neg_infinity<T>()) return lse_empty<T>();
  const auto f = [m](T v) { return vexp(v - m); };
  return LseState<T>{m, range_sum(x, 0, a, f) + range_sum(x, a + 1, n, f)};
}

// The same for clamp(x, -tau, tau); the clamp is monotone, so its max is clamp(max).
template <typename T>
INFOMAX_CPU_INLINE LseState<T> clamped_row_state(const T* x, int64_t n, int64_t skip, T tau) {
  const int64_t a = skip < 0 ? n : skip;
  const T m = clamp_tau(range_max(x, a + 1, n, range_max(x, 0, a, neg_infinity<T>())), tau);
  const auto f = [m, tau](T v) { return vexp(clamp_tau(v, tau) - m); };
  return LseState<T>{m, range_sum(x, 0, a, f) + range_sum(x, a + 1, n, f)};
}

// Fold a tile's columns into per-column states (row-major passes over the tile).
template <typename T>
INFOMAX_CPU_INLINE void fold_columns(const T* __restrict s, int64_t tk, int64_t tm, LseState<T>* col,
                                     T* __restrict mxp, T* __restrict smp) {
  for (int64_t c = 0; c < tm; ++c) mxp[c] = neg_infinity<T>();
  for (int64_t c = 0; c < tm; ++c) smp[c] = T(0);
  for (int64_t r = 0; r < tk; ++r)
    for (int64_t c = 0; c < tm; ++c) mxp[c] = nan_max(s[r * tm + c], mxp[c]);
  for (int64_t r = 0; r < tk; ++r)
    // NB: a column whose tile entries are all -inf contributes nothing (softmax_weight's guard).
    for (int64_t c = 0; c < tm; ++c) smp[c] += softmax_weight(s[r * tm + c], mxp[c]);
  for (int64_t c = 0; c < tm; ++c) col[c] = lse_merge(col[c], LseState<T>{mxp[c], smp[c]});
}

// One row of G = dL/dS from one row of S: the sum over the reductions with a
// gradient of (upstream gradient) x (derivative of the reduction), the same sum
// as score_grad in score_math.h, as one vectorisable pass per reduction.
// pc: the positive's column in this tile (-1: none); negatives-only terms skip it.
template <typename T>
INFOMAX_CPU_INLINE void grad_row(const T* __restrict s, T* __restrict g, int64_t tm, int64_t pc, const RowGrad<T>& rg,
              const T* __restrict g_col, const T* __restrict col_lse, T tau, int64_t red) {
  // NB: __restrict tells GCC the rows do not overlap, so the passes vectorise.
  for (int64_t c = 0; c < tm; ++c) g[c] = T(0);
  if ((red & kRowLse) && rg.g_row != T(0))
    for (int64_t c = 0; c < tm; ++c) g[c] += rg.g_row * softmax_weight(s[c], rg.row_lse);
  if (red & kColLse)
    for (int64_t c = 0; c < tm; ++c) g[c] += g_col[c] * softmax_weight(s[c], col_lse[c]);
  // NB: the negatives' terms are added over the whole row, then the positive's
  // entry is put back: its weight there may be inf * 0 (a row whose negatives
  // are all masked has neg_lse = -inf).
  const T keep = pc >= 0 ? g[pc] : T(0);
  if ((red & kNegLse) && rg.g_neg != T(0))
    for (int64_t c = 0; c < tm; ++c) g[c] += rg.g_neg * softmax_weight(s[c], rg.neg_lse);
  if ((red & kNegClampLse) && rg.g_clamp != T(0))
    for (int64_t c = 0; c < tm; ++c) g[c] += rg.g_clamp * clamped_softmax_weight(s[c], tau, rg.clamp_lse);
  if ((red & kNegSoftplus) && rg.g_softplus != T(0))
    for (int64_t c = 0; c < tm; ++c) g[c] += rg.g_softplus * sigmoid(s[c]);
  if (pc >= 0) g[pc] = keep;
}

// Running states of one row block (kTileRows each) and column scratch (kTileCols).
template <typename T>
struct RowFolds {
  LseState<T>* neg;    // negatives' log-sum-exp state per row
  LseState<T>* clamp;  // clamped negatives' state per row
  T* pos;              // the positive's score per row
  T* sp;               // softplus sum per row
  T* mx;               // column scratch: tile maxima
  T* sm;               // column scratch: tile sums
};

// Folds one tile of S (rows i0.., columns j0..) into the row states and, when
// col is given, into the thread's column states col[0, tm).
template <typename T>
INFOMAX_CPU_INLINE void fold_tile(const T* s, int64_t i0, int64_t tk, int64_t j0, int64_t tm,
                                  int64_t pos_offset, int64_t red, T tau, const RowFolds<T>& f,
                                  LseState<T>* col) {
  const bool need_neg = red & (kRowLse | kNegLse);
  for (int64_t r = 0; r < tk; ++r) {
    const T* row = s + r * tm;
    const int64_t pc = i0 + r + pos_offset - j0;  // positive's column in this tile
    const int64_t skip = (pc >= 0 && pc < tm) ? pc : -1;
    if (skip >= 0) f.pos[r] = row[skip];
    if (need_neg) f.neg[r] = lse_merge(f.neg[r], row_state(row, tm, skip));
    if (red & kNegClampLse) f.clamp[r] = lse_merge(f.clamp[r], clamped_row_state(row, tm, skip, tau));
    if (red & kNegSoftplus) {
      const auto sp = [](T v) { return softplus(v); };
      const int64_t a = skip < 0 ? tm : skip;
      f.sp[r] += range_sum(row, 0, a, sp) + range_sum(row, a + 1, tm, sp);
    }
  }
  if (col) fold_columns(s, tk, tm, col, f.mx, f.sm);
}

// Upstream gradients and saved statistics as raw pointers (nullptr: absent).
template <typename T>
struct GradPtrs {
  const T *g_row, *g_col, *g_neg, *g_clamp, *g_sp;
  const T *row_lse, *col_lse, *neg_lse, *clamp_lse;
};

// Turns one tile of S into G = dL/dS (tk x tm, row-major) and adds its row sums
// to drow[i0..] and its column sums to dcol[j0..].
template <typename T>
INFOMAX_CPU_INLINE void grad_tile(const T* s, T* G, int64_t i0, int64_t tk, int64_t j0, int64_t tm,
                                  int64_t pos_offset, int64_t red, T tau, const GradPtrs<T>& p,
                                  T* drow, T* dcol) {
  for (int64_t r = 0; r < tk; ++r) {
    const int64_t i = i0 + r;
    const RowGrad<T> rg{p.g_row ? p.g_row[i] : T(0),     p.row_lse ? p.row_lse[i] : T(0),
                        p.g_neg ? p.g_neg[i] : T(0),     p.neg_lse ? p.neg_lse[i] : T(0),
                        p.g_clamp ? p.g_clamp[i] : T(0), p.clamp_lse ? p.clamp_lse[i] : T(0),
                        p.g_sp ? p.g_sp[i] : T(0)};
    const int64_t pc = i + pos_offset - j0;
    T* g_r = G + r * tm;
    grad_row(s + r * tm, g_r, tm, (pc >= 0 && pc < tm) ? pc : -1, rg, p.g_col ? p.g_col + j0 : nullptr,
             p.col_lse ? p.col_lse + j0 : nullptr, tau, red);
    drow[i] += range_sum(g_r, 0, tm, [](T v) { return v; });
    for (int64_t c = 0; c < tm; ++c) dcol[j0 + c] += g_r[c];
  }
}

// The two epilogues for the baseline ISA and, where available, AVX2 + FMA.
template <typename T>
using FoldTileFn = void (*)(const T*, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, T,
                            const RowFolds<T>&, LseState<T>*);
template <typename T>
using GradTileFn = void (*)(const T*, T*, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, T,
                            const GradPtrs<T>&, T*, T*);

template <typename T>
void fold_tile_base(const T* s, int64_t i0, int64_t tk, int64_t j0, int64_t tm, int64_t off,
                    int64_t red, T tau, const RowFolds<T>& f, LseState<T>* col) {
  fold_tile(s, i0, tk, j0, tm, off, red, tau, f, col);
}
template <typename T>
void grad_tile_base(const T* s, T* G, int64_t i0, int64_t tk, int64_t j0, int64_t tm, int64_t off,
                    int64_t red, T tau, const GradPtrs<T>& p, T* drow, T* dcol) {
  grad_tile(s, G, i0, tk, j0, tm, off, red, tau, p, drow, dcol);
}
#ifdef INFOMAX_HAVE_AVX2_CLONES
template <typename T>
INFOMAX_TARGET_AVX2 void fold_tile_avx2(const T* s, int64_t i0, int64_t tk, int64_t j0, int64_t tm,
                                        int64_t off, int64_t red, T tau, const RowFolds<T>& f,
                                        LseState<T>* col) {
  fold_tile(s, i0, tk, j0, tm, off, red, tau, f, col);
}
template <typename T>
INFOMAX_TARGET_AVX2 void grad_tile_avx2(const T* s, T* G, int64_t i0, int64_t tk, int64_t j0,
                                        int64_t tm, int64_t off, int64_t red, T tau,
                                        const GradPtrs<T>& p, T* drow, T* dcol) {
  grad_tile(s, G, i0, tk, j0, tm, off, red, tau, p, drow, dcol);
}
#endif

template <typename T>
FoldTileFn<T> fold_tile_for_cpu() {
#ifdef INFOMAX_HAVE_AVX2_CLONES
  if (use_avx2()) return &fold_tile_avx2<T>;
#endif
  return &fold_tile_base<T>;
}
template <typename T>
GradTileFn<T> grad_tile_for_cpu() {
#ifdef INFOMAX_HAVE_AVX2_CLONES
  if (use_avx2()) return &grad_tile_avx2<T>;
#endif
  return &grad_tile_base<T>;
}

// Forward walk. tile(buf, i0, tk, j0, tm) returns a pointer to the tk x tm
// scores S[i0:i0+tk, j0:j0+tm] (row-major, leading dimension tm), written into
// the thread's buffer `buf`. Fills the requested outputs of `out`.
template <typename T, typename TileFn>
void reduce_forward(const Walk& w, const at::TensorOptions& opts, Tensor5& out, TileFn tile) {
  const int64_t K = w.K, M = w.M, red = w.reductions;
  const T tau = static_cast<T>(w.tau);
  const auto fold = fold_tile_for_cpu<T>();
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
    std::vector<T> pos(kTileRows), sp(kTileRows), mx(kTileCols), sm(kTileCols);
    const RowFolds<T> folds{neg.data(), clamp.data(), pos.data(), sp.data(), mx.data(), sm.data()};
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t i0 = blk * kTileRows, tk = std::min(kTileRows, K - i0);
      std::fill(neg.begin(), neg.end(), lse_empty<T>());
      std::fill(clamp.begin(), clamp.end(), lse_empty<T>());
      std::fill(sp.begin(), sp.end(), T(0));
      for (int64_t j0 = 0; j0 < M; j0 += kTileCols) {
        const int64_t tm = std::min(kTileCols, M - j0);
        const T* s = tile(buf, i0, tk, j0, tm);
        fold(s, i0, tk, j0, tm, w.pos_offset, red, tau, folds, col ? col + j0 : nullptr);
      }
      for (int64_t r = 0; r < tk; ++r)
        finalize_row(i0 + r, red, neg[r], clamp[r], sp[r], pos[r], row_out, neg_out, clamp_out, sp_out);
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

// Backward walk: recomputes each tile of S with tile(...), turns it into
// G = dL/dS in a second thread-local buffer (grad_row), accumulates drow (K,)
// and dcol (M,), and hands the G tile to consume(tid, G, i0, tk, j0, tm) -- G
// a (tk, tm) tensor view -- for the op's own accumulations; finish(tid, i0, tk)
// runs after each row block.
template <typename T, typename TileFn, typename ConsumeFn, typename FinishFn>
void reduce_backward(const Walk& w, const at::TensorOptions& opts, const GradInputs& g,
                     Tensor& drow, Tensor& dcol, TileFn tile, ConsumeFn consume, FinishFn finish) {
  const int64_t K = w.K, M = w.M, red = w.reductions;
  const T tau = static_cast<T>(w.tau);
  const auto ptr = [](const Tensor& t) -> const T* { return t.numel() ? t.data_ptr<T>() : nullptr; };
  const GradPtrs<T> ptrs{ptr(g.g_row),   ptr(g.g_col),   ptr(g.g_neg),   ptr(g.g_clamp),  ptr(g.g_sp),
                         ptr(g.row_lse), ptr(g.col_lse), ptr(g.neg_lse), ptr(g.clamp_lse)};
  const auto grad = grad_tile_for_cpu<T>();
  const int n_threads = at::get_num_threads();
  // NB: row blocks of different threads touch the same columns: column sums are
  // kept per thread and added after the parallel region (no atomics, deterministic).
  Tensor dcol_part = at::zeros({n_threads, M}, opts);
  T* drow_p = drow.data_ptr<T>();

  at::parallel_for(0, (K + kTileRows - 1) / kTileRows, 1, [&](int64_t b0, int64_t b1) {
    const int tid = at::get_thread_num();
    Tensor buf = tile_buffer(opts), gbuf = tile_buffer(opts);
    T* dcol_t = dcol_part[tid].data_ptr<T>();
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t i0 = blk * kTileRows, tk = std::min(kTileRows, K - i0);
      for (int64_t j0 = 0; j0 < M; j0 += kTileCols) {
        const int64_t tm = std::min(kTileCols, M - j0);
        const T* s = tile(buf, i0, tk, j0, tm);
        grad(s, gbuf.data_ptr<T>(), i0, tk, j0, tm, w.pos_offset, red, tau, ptrs, drow_p, dcol_t);
        consume(tid, gbuf.narrow(0, 0, tk * tm).view({tk, tm}), i0, tk, j0, tm);
      }
      finish(tid, i0, tk);
    }
  });
  dcol.copy_(dcol_part.sum(0));
}

}  // namespace cpu
}  // namespace infomax_ext
