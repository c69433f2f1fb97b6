// The CPU tile walk shared by every fused score op (dot-product and concat
// critic): only how a tile of S is produced, and what a tile of G = dL/dS
// feeds into, differ between ops.
//
// Rows are split in blocks (Walk::rows, kTileRows by default) handed to threads
// (at::parallel_for); each block walks the columns in tiles (Walk::cols,
// kTileCols by default); the epilogue folds a tile
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
#include <cstdlib>
#include <limits>
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
  int64_t rows = kTileRows;  // rows of a block (one thread's unit of work)
  int64_t cols = kTileCols;  // columns of a tile

  int64_t blocks() const { return (K + rows - 1) / rows; }
};

// A thread-local tile buffer of w.rows * w.cols accumulation scalars.
inline Tensor tile_buffer(const Walk& w, const at::TensorOptions& opts) {
  return at::empty({w.rows * w.cols}, opts);
}

// The loops below are written branch-free over a tile row (selects, vexp) so
// that GCC vectorises them; a row's positive is handled by splitting the row
// into the two ranges around it.

// max(x, m) that propagates NaN: a NaN score must give a NaN statistic, never
// be skipped into a wrong finite (or -inf) one.
// NB: `|` and a bit-blend select, not `||` and a ternary: those compile to
// branches and keep range_max's lanes scalar.
template <typename T>
INFOMAX_CPU_INLINE T nan_max(T x, T m) {
  return select((x > m) | (x != x), x, m);
}

// Independent lanes of range_sum: 16 floats fill one AVX-512 register (two AVX2
// ones); every clone uses the same count, so the order of the additions does not
// depend on the ISA picked.
constexpr int kLanes = 16;

// max of x[lo, hi), NaN if any entry (or m) is NaN.
template <typename T>
INFOMAX_CPU_INLINE T range_max(const T* x, int64_t lo, int64_t hi, T m) {
  for (int64_t k = lo; k < hi; ++k) m = nan_max(x[k], m);
  return m;
}

// The float one, the hot one. NB: on the bits as integers: key(x) = bits ^ (sign ?
// 0x7fffffff : 0) orders floats as their values do (-inf lowest, -0 below +0), and
// an integer max and an integer OR (the NaN flag) are reductions GCC vectorises
// without -ffast-math, for every ISA; a floating max or a NaN-aware select is not.
typedef int32_t __attribute__((may_alias)) aliased_int32;

template <>
INFOMAX_CPU_INLINE float range_max(const float* x, int64_t lo, int64_t hi, float m) {
  if (hi <= lo) return m;
  const aliased_int32* b = reinterpret_cast<const aliased_int32*>(x);
  int32_t key = std::numeric_limits<int32_t>::min(), nan = 0;
  for (int64_t k = lo; k < hi; ++k) {
    const int32_t v = b[k];
    nan |= (v & 0x7fffffff) > 0x7f800000;
    const int32_t kv = v ^ ((v >> 31) & 0x7fffffff);
    key = kv > key ? kv : key;
  }
  if (nan) return std::numeric_limits<float>::quiet_NaN();
  return nan_max(int_bits_as_float(key ^ ((key >> 31) & 0x7fffffff)), m);
}

// sum of f(x[k]) over k in [lo, hi). NB: kLanes independent lanes, as in range_max:
// GCC keeps a single floating sum (and so the whole loop, f included) scalar
// without -ffast-math, since vectorising would reorder the additions. The lanes
// are added in a fixed order, so results stay bitwise reproducible.
template <typename T, typename F>
INFOMAX_CPU_INLINE T range_sum(const T* x, int64_t lo, int64_t hi, F f) {
  T lanes[kLanes];
  for (int l = 0; l < kLanes; ++l) lanes[l] = T(0);
  int64_t k = lo;
  for (; k + kLanes <= hi; k += kLanes)
    for (int l = 0; l < kLanes; ++l) lanes[l] += f(x[k + l]);
  T s = T(0);
  for (; k < hi; ++k) s += f(x[k]);
  for (int l = 0; l < kLanes; ++l) s += lanes[l];
  return s;
}

// max of x[0, n) without x[skip] (-1: none); -inf when nothing is left.
template <typename T>
INFOMAX_CPU_INLINE T max_without(const T* x, int64_t n, int64_t skip) {
  const int64_t a = skip < 0 ? n : skip;
  return range_max(x, a + 1, n, range_max(x, 0, a, neg_infinity<T>()));
}

// Log-sum-exp state of x[0, n) without x[skip] (-1: none).
template <typename T>
INFOMAX_CPU_INLINE LseState<T> row_state(const T* x, int64_t n, int64_t skip) {
  const int64_t a = skip < 0 ? n : skip;
  const T m = max_without(x, n, skip);
  // NB: all entries -inf (masked) or none at all: the state stays empty.
  if (m == neg_infinity<T>()) return lse_empty<T>();
  const auto f = [m](T v) INFOMAX_CPU_INLINE_LAMBDA { return vexp(v - m); };
  return LseState<T>{m, range_sum(x, 0, a, f) + range_sum(x, a + 1, n, f)};
}

// The same for clamp(x, -tau, tau); the clamp is monotone, so its max is clamp(max).
template <typename T>
INFOMAX_CPU_INLINE LseState<T> clamped_row_state(const T* x, int64_t n, int64_t skip, T tau) {
  const int64_t a = skip < 0 ? n : skip;
  const T m = clamp_tau(max_without(x, n, skip), tau);
  const auto f = [m, tau](T v) INFOMAX_CPU_INLINE_LAMBDA { return vexp(clamp_tau(v, tau) - m); };
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

// Running states of one row block (w.rows each) and column scratch (w.cols).
template <typename T>
struct RowFolds {
  LseState<T>* neg;    // negatives' log-sum-exp state per row
  LseState<T>* clamp;  // clamped negatives' state per row
  T* pos;              // the positive's score per row
  T* sp;               // softplus sum per row
  T* mx;               // column scratch: tile maxima
  T* sm;               // column scratch: tile sums
};

// Folds one row of a tile (tm scores, the positive at column skip, -1: none) into
// its running states.
template <typename T>
INFOMAX_CPU_INLINE void fold_row(const T* row, int64_t tm, int64_t skip, int64_t red, T tau, LseState<T>& neg,
                                 LseState<T>& clamp, T& sp, T& pos) {
  if (skip >= 0) pos = row[skip];
  if (red & (kRowLse | kNegLse)) neg = lse_merge(neg, row_state(row, tm, skip));
  if (red & kNegClampLse) clamp = lse_merge(clamp, clamped_row_state(row, tm, skip, tau));
  if (red & kNegSoftplus) {
    const auto f = [](T v) INFOMAX_CPU_INLINE_LAMBDA { return softplus(v); };
    const int64_t a = skip < 0 ? tm : skip;
    sp += range_sum(row, 0, a, f) + range_sum(row, a + 1, tm, f);
  }
}

// Folds one tile of S (rows i0.., columns j0..) into the row states and, when
// col is given, into the thread's column states col[0, tm).
template <typename T>
INFOMAX_CPU_INLINE void fold_tile(const T* s, int64_t i0, int64_t tk, int64_t j0, int64_t tm,
                                  int64_t pos_offset, int64_t red, T tau, const RowFolds<T>& f,
                                  LseState<T>* col) {
  for (int64_t r = 0; r < tk; ++r) {
    const int64_t pc = i0 + r + pos_offset - j0;  // positive's column in this tile
    fold_row(s + r * tm, tm, (pc >= 0 && pc < tm) ? pc : -1, red, tau, f.neg[r], f.clamp[r], f.sp[r], f.pos[r]);
  }
  if (col) fold_columns(s, tk, tm, col, f.mx, f.sm);
}

// Upstream gradients and saved statistics as raw pointers (nullptr: absent).
template <typename T>
struct GradPtrs {
  const T *g_row, *g_col, *g_neg, *g_clamp, *g_sp;
  const T *row_lse, *col_lse, *neg_lse, *clamp_lse;
  const T* g_pos = nullptr;  // weight of each row's positive score (one walk only)
};

// Ends row i's G (tm entries from column j0; pc: the positive's column in it, -1: none):
// the positive's weight added, the row sum to drow[i], the entries to dcol[j0..]
// (nullptr: not wanted).
template <typename T>
INFOMAX_CPU_INLINE void finish_grad_row(T* g, int64_t i, int64_t j0, int64_t tm, int64_t pc, const GradPtrs<T>& p,
                                        T* drow, T* dcol) {
  // NB: the positive term's weight joins G, so the G GEMMs (and the sums) carry its gradient.
  if (p.g_pos && pc >= 0) g[pc] += p.g_pos[i];
  if (drow) drow[i] += range_sum(g, 0, tm, [](T v) INFOMAX_CPU_INLINE_LAMBDA { return v; });
  if (dcol)
    for (int64_t c = 0; c < tm; ++c) dcol[j0 + c] += g[c];
}

// G for row i from its tm scores (columns j0..; pc: the positive's column, -1: none),
// its row sum added to drow[i] and its entries to dcol[j0..] (nullptr: not wanted).
template <typename T>
INFOMAX_CPU_INLINE void grad_tile_row(const T* s, T* g, int64_t i, int64_t j0, int64_t tm, int64_t pc, int64_t red,
                                      T tau, const GradPtrs<T>& p, T* drow, T* dcol) {
  grad_row(s, g, tm, pc, row_grad_at<T>(p, i), p.g_col ? p.g_col + j0 : nullptr,
           p.col_lse ? p.col_lse + j0 : nullptr, tau, red);
  finish_grad_row(g, i, j0, tm, pc, p, drow, dcol);
}

// Turns one tile of S into G = dL/dS (tk x tm, row-major) and adds its row sums
// to drow[i0..] and its column sums to dcol[j0..] (each nullptr: not wanted).
template <typename T>
INFOMAX_CPU_INLINE void grad_tile(const T* s, T* G, int64_t i0, int64_t tk, int64_t j0, int64_t tm,
                                  int64_t pos_offset, int64_t red, T tau, const GradPtrs<T>& p,
                                  T* drow, T* dcol) {
  for (int64_t r = 0; r < tk; ++r) {
    const int64_t pc = i0 + r + pos_offset - j0;
    grad_tile_row(s + r * tm, G + r * tm, i0 + r, j0, tm, (pc >= 0 && pc < tm) ? pc : -1, red, tau, p, drow, dcol);
  }
}

// Row statistics written by a walk ((K,) each, nullptr when not requested).
template <typename T>
struct Outputs {
  T *row, *neg, *clamp, *sp;
  T* pos = nullptr;  // the positive scores (one walk only)
};

// One log-sum-exp statistic of a whole row and its gradient, the common case (InfoNCE's
// row_lse, NT-Xent's neg_lse), in place: the row's M scores s_c become g_c = g_stat e_c /
// sum with e_c = exp(s_c - m), and lse = m + log sum_c e_c is written to *stat, all from
// one exp per score (the general path takes one for the statistic and one for G). skip:
// a column outside the statistic (-1: none), whose g is 0. Returns false, doing nothing,
// when g_stat is 0 (the general path then keeps G exactly 0 whatever the scores).
template <typename T>
INFOMAX_CPU_INLINE bool softmax_row(T* row, int64_t M, int64_t skip, T g_stat, T* stat) {
  if (g_stat == T(0)) return false;
  const T m = max_without(row, M, skip);
  if (m == neg_infinity<T>()) {  // NB: every score masked (-inf): an empty sum, zero weights
    *stat = neg_infinity<T>();
    for (int64_t c = 0; c < M; ++c) row[c] = T(0);
    return true;
  }
  const auto e = [m](T v) INFOMAX_CPU_INLINE_LAMBDA { return vexp(v - m); };
  for (int64_t c = 0; c < M; ++c) row[c] = e(row[c]);
  if (skip >= 0) row[skip] = T(0);
  const T sum = range_sum(row, 0, M, [](T v) INFOMAX_CPU_INLINE_LAMBDA { return v; });
  *stat = m + log(sum);
  const T coef = g_stat / sum;
  for (int64_t c = 0; c < M; ++c) row[c] *= coef;
  return true;
}

// Whole rows of S (tk x M, rows i0..) folded and, in place, turned into G one row at a
// time: the row's statistics are final after its one pass, so its G follows while the
// row is still in L1 (a block-wide fold, then a block-wide G, would stream the block's
// S from L2 or L3 twice), and G needs no buffer of its own. Writes the statistics to
// out; with grads (the reductions with a gradient, 0: none) makes G, whose saved
// statistics p reads from out. scratch: M values, a copy of the row for the general
// path's G (its epilogue reads the scores while it writes G).
template <typename T>
INFOMAX_CPU_INLINE void fold_grad_rows(T* s, T* scratch, int64_t i0, int64_t tk, int64_t M, int64_t pos_offset,
                                       int64_t red, int64_t grads, T tau, const Outputs<T>& out,
                                       const GradPtrs<T>& p, T* drow, T* dcol) {
  // NB: one statistic with its own gradient (row_lse or neg_lse alone): softmax_row.
  const bool one_lse = (red == kRowLse || red == kNegLse) && grads == red;
  for (int64_t r = 0; r < tk; ++r) {
    const int64_t i = i0 + r, pc = i + pos_offset;
    const int64_t skip = (pc >= 0 && pc < M) ? pc : -1;
    T* row = s + r * M;
    if (one_lse) {
      const bool lse_row = red == kRowLse;
      const T pos = skip >= 0 ? row[skip] : T(0);
      if (softmax_row(row, M, lse_row ? -1 : skip, lse_row ? p.g_row[i] : p.g_neg[i],
                      lse_row ? out.row + i : out.neg + i)) {
        if (out.pos && skip >= 0) out.pos[i] = pos;
        finish_grad_row(row, i, 0, M, skip, p, drow, dcol);
        continue;
      }
    }
    LseState<T> neg = lse_empty<T>(), clamp = lse_empty<T>();
    T sp = T(0), pos = T(0);
    fold_row(row, M, skip, red, tau, neg, clamp, sp, pos);
    finalize_row(i, red, neg, clamp, sp, pos, out.row, out.neg, out.clamp, out.sp);
    if (out.pos) out.pos[i] = pos;
    if (grads) {
      std::copy(row, row + M, scratch);
      grad_tile_row(scratch, row, i, int64_t(0), M, skip, grads, tau, p, drow, dcol);
    }
  }
}

// The two epilogues, compiled for each ISA of cpu_isa.h.
template <typename T>
using FoldTileFn = void (*)(const T*, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, T,
                            const RowFolds<T>&, LseState<T>*);
template <typename T>
using GradTileFn = void (*)(const T*, T*, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, T,
                            const GradPtrs<T>&, T*, T*);

INFOMAX_CPU_CLONES(fold_tile, fold_tile,
                   (const T* s, int64_t i0, int64_t tk, int64_t j0, int64_t tm, int64_t off, int64_t red, T tau,
                    const RowFolds<T>& f, LseState<T>* col),
                   (s, i0, tk, j0, tm, off, red, tau, f, col), typename T)
INFOMAX_CPU_CLONES(grad_tile, grad_tile,
                   (const T* s, T* G, int64_t i0, int64_t tk, int64_t j0, int64_t tm, int64_t off, int64_t red,
                    T tau, const GradPtrs<T>& p, T* drow, T* dcol),
                   (s, G, i0, tk, j0, tm, off, red, tau, p, drow, dcol), typename T)

INFOMAX_CPU_CLONES(fold_grad_rows, fold_grad_rows,
                   (T* s, T* scratch, int64_t i0, int64_t tk, int64_t M, int64_t off, int64_t red, int64_t grads,
                    T tau, const Outputs<T>& out, const GradPtrs<T>& p, T* drow, T* dcol),
                   (s, scratch, i0, tk, M, off, red, grads, tau, out, p, drow, dcol), typename T)

template <typename T>
FoldTileFn<T> fold_tile_for_cpu() {
  return INFOMAX_CPU_PICK(fold_tile, T);
}
template <typename T>
GradTileFn<T> grad_tile_for_cpu() {
  return INFOMAX_CPU_PICK(grad_tile, T);
}
template <typename T>
using FoldGradRowsFn = void (*)(T*, T*, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, T,
                                const Outputs<T>&, const GradPtrs<T>&, T*, T*);
template <typename T>
FoldGradRowsFn<T> fold_grad_rows_for_cpu() {
  return INFOMAX_CPU_PICK(fold_grad_rows, T);
}

// A thread's folding of whole row blocks: its row states (one block at a time), the
// thread's column states (nullptr: no column reduction) and the outputs.
template <typename T>
class BlockFolder {
 public:
  BlockFolder(const Walk& w, LseState<T>* col, Outputs<T> out)
      : w_(w), col_(col), out_(out), fold_(fold_tile_for_cpu<T>()), neg_(w.rows), clamp_(w.rows),
        pos_(w.rows), sp_(w.rows), mx_(col ? w.cols : 0), sm_(col ? w.cols : 0) {}

  // Folds the rows [i0, i0 + w.rows) of S, tile by tile, and writes their
  // statistics. tile: as in reduce_forward; buf_for(j0): the buffer tile j0 goes to.
  template <typename TileFn, typename BufFn>
  void fold_block(int64_t i0, const TileFn& tile, BufFn buf_for) {
    const int64_t tk = std::min(w_.rows, w_.K - i0), red = w_.reductions;
    const RowFolds<T> f{neg_.data(), clamp_.data(), pos_.data(), sp_.data(), mx_.data(), sm_.data()};
    std::fill(neg_.begin(), neg_.end(), lse_empty<T>());
    std::fill(clamp_.begin(), clamp_.end(), lse_empty<T>());
    std::fill(sp_.begin(), sp_.end(), T(0));
    for (int64_t j0 = 0; j0 < w_.M; j0 += w_.cols) {
      const int64_t tm = std::min(w_.cols, w_.M - j0);
      Tensor buf = buf_for(j0);
      const T* s = tile(buf, i0, tk, j0, tm);
      fold_(s, i0, tk, j0, tm, w_.pos_offset, red, static_cast<T>(w_.tau), f, col_ ? col_ + j0 : nullptr);
    }
    for (int64_t r = 0; r < tk; ++r)
      finalize_row(i0 + r, red, neg_[r], clamp_[r], sp_[r], pos_[r], out_.row, out_.neg, out_.clamp, out_.sp);
  }

 private:
  const Walk& w_;
  LseState<T>* col_;
  Outputs<T> out_;
  FoldTileFn<T> fold_;
  std::vector<LseState<T>> neg_, clamp_;
  std::vector<T> pos_, sp_, mx_, sm_;
};

// Forward walk. tile(buf, i0, tk, j0, tm) returns a pointer to the tk x tm
// scores S[i0:i0+tk, j0:j0+tm] (row-major, leading dimension tm), written into
// the thread's buffer `buf`. Fills the requested outputs of `out`.
template <typename T, typename TileFn>
void reduce_forward(const Walk& w, const at::TensorOptions& opts, Tensor5& out, TileFn tile) {
  const int64_t M = w.M, red = w.reductions;
  const int n_threads = at::get_num_threads();
  std::vector<LseState<T>> col_states((red & kColLse) ? n_threads * M : 0, lse_empty<T>());
  const auto out_ptr = [](const Tensor& t) { return t.numel() ? t.data_ptr<T>() : nullptr; };
  T* row_out = out_ptr(std::get<0>(out));
  T* neg_out = out_ptr(std::get<2>(out));
  T* clamp_out = out_ptr(std::get<3>(out));
  T* sp_out = out_ptr(std::get<4>(out));

  at::parallel_for(0, w.blocks(), 1, [&](int64_t b0, int64_t b1) {
    Tensor buf = tile_buffer(w, opts);
    BlockFolder<T> folder(w, col_states.empty() ? nullptr : col_states.data() + at::get_thread_num() * M,
                          Outputs<T>{row_out, neg_out, clamp_out, sp_out});
    for (int64_t blk = b0; blk < b1; ++blk)
      folder.fold_block(blk * w.rows, tile, [&](int64_t) { return buf; });
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
  Tensor g_pos;  // (K,) or (0,): the positives' weights (one walk only)
};

inline GradInputs grad_inputs(const Tensor& g_row, const Tensor& g_col, const Tensor& g_neg,
                              const Tensor& g_clamp, const Tensor& g_sp, const Tensor& row_lse,
                              const Tensor& col_lse, const Tensor& neg_lse, const Tensor& clamp_lse,
                              at::ScalarType acc) {
  const auto c = [acc](const Tensor& t) { return as_acc(t, acc); };
  return GradInputs{c(g_row),   c(g_col),   c(g_neg),   c(g_clamp),  c(g_sp),
                    c(row_lse), c(col_lse), c(neg_lse), c(clamp_lse)};
}

// A walk's gradient mask when only the positives have a weight: no reduction's term.
constexpr int64_t kPositiveOnly = int64_t(1) << 30;

// NB: a positive weight alone still needs G (its one entry per row).
inline int64_t active_grads(int64_t reductions, const GradInputs& g) {
  const int64_t red = infomax_ext::active_grads(reductions, g.g_row, g.g_col, g.g_neg, g.g_clamp, g.g_sp);
  return red || !g.g_pos.defined() || !g.g_pos.numel() ? red : kPositiveOnly;
}

// Column sums of G (the column-bias gradient) over row blocks that threads share.
// NB: kept per thread and added after the parallel region (no atomics, deterministic);
// nothing is kept, and of_thread gives nullptr, when dcol is undefined (not wanted).
template <typename T>
struct ColumnSums {
  Tensor part;  // (threads, M) or undefined

  ColumnSums(const Tensor& dcol, const at::TensorOptions& opts)
      : part(dcol.defined() ? at::zeros({at::get_num_threads(), dcol.size(0)}, opts) : Tensor()) {}
  T* of_thread(int tid) { return part.defined() ? part[tid].data_ptr<T>() : nullptr; }
  void finish(Tensor dcol) {
    if (part.defined()) dcol.copy_(part.sum(0));
  }
};

// G for the rows [i0, i0 + w.rows), tile by tile: scores(j0, tm) gives tile j0
// of S, grad_tile turns it into G in gbuf (adding to drow and the thread's dcol_t),
// and consume(tid, G, i0, tk, j0, tm) takes it.
template <typename T, typename ConsumeFn, typename ScoresFn>
void grad_block(const Walk& w, GradTileFn<T> grad, const GradPtrs<T>& ptrs, Tensor& gbuf, int tid, int64_t i0,
                T* drow, T* dcol_t, ConsumeFn& consume, ScoresFn scores) {
  const int64_t tk = std::min(w.rows, w.K - i0);
  for (int64_t j0 = 0; j0 < w.M; j0 += w.cols) {
    const int64_t tm = std::min(w.cols, w.M - j0);
    grad(scores(j0, tm), gbuf.data_ptr<T>(), i0, tk, j0, tm, w.pos_offset, w.reductions, static_cast<T>(w.tau),
         ptrs, drow, dcol_t);
    consume(tid, gbuf.narrow(0, 0, tk * tm).view({tk, tm}), i0, tk, j0, tm);
  }
}

// Backward walk: recomputes each tile of S with tile(...), turns it into
// G = dL/dS in a second thread-local buffer (grad_row), accumulates drow (K,)
// and dcol (M,) (each skipped when undefined: no bias gradient wanted), and hands
// the G tile to consume(tid, G, i0, tk, j0, tm) -- G a (tk, tm) tensor view -- for
// the op's own accumulations; finish(tid, i0, tk) runs after each row block.
template <typename T, typename TileFn, typename ConsumeFn, typename FinishFn>
void reduce_backward(const Walk& w, const at::TensorOptions& opts, const GradInputs& g,
                     Tensor drow, Tensor dcol, TileFn tile, ConsumeFn consume, FinishFn finish) {
  const int64_t K = w.K;
  const auto ptr = [](const Tensor& t) -> const T* { return t.numel() ? t.data_ptr<T>() : nullptr; };
  const GradPtrs<T> ptrs{ptr(g.g_row),   ptr(g.g_col),   ptr(g.g_neg),   ptr(g.g_clamp),  ptr(g.g_sp),
                         ptr(g.row_lse), ptr(g.col_lse), ptr(g.neg_lse), ptr(g.clamp_lse)};
  const auto grad = grad_tile_for_cpu<T>();
  ColumnSums<T> dcol_sums(dcol, opts);
  T* drow_p = drow.defined() ? drow.data_ptr<T>() : nullptr;

  at::parallel_for(0, w.blocks(), 1, [&](int64_t b0, int64_t b1) {
    const int tid = at::get_thread_num();
    Tensor buf = tile_buffer(w, opts), gbuf = tile_buffer(w, opts);
    T* dcol_t = dcol_sums.of_thread(tid);
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t i0 = blk * w.rows, tk = std::min(w.rows, K - i0);
      grad_block(w, grad, ptrs, gbuf, tid, i0, drow_p, dcol_t, consume,
                 [&](int64_t j0, int64_t tm) -> const T* { return tile(buf, i0, tk, j0, tm); });
      finish(tid, i0, tk);
    }
  });
  dcol_sums.finish(dcol);
}

// Blocks of the one-walk forward and backward (reduce_forward_backward): whole rows of
// S (one tile per block, so each block is three GEMMs: S, G B and G^T A), as many rows
// as keep the block's scores (G overwrites them) within kFwdBwdBlockBytes per thread,
// no more than give every thread a block, and at least kFwdBwdMinRows. NB: the rows are the
// inner size of the G^T A GEMM, which re-reads and rewrites the thread's dB once per
// block: few rows make that GEMM memory-bound, many make the block's epilogue passes
// run from L3 instead of L2. INFOMAX_EXT_CPU_BLOCK_BYTES overrides the budget.
constexpr int64_t kFwdBwdBlockBytes = int64_t(4) << 20;
constexpr int64_t kFwdBwdMinRows = 16;
// Above this (kFwdBwdMinRows rows of S per thread) the ops fall back to a forward plus a
// recomputing backward.
constexpr int64_t kKeptRowsBudget = int64_t(16) << 20;

inline int64_t fwd_bwd_block_bytes() {
  static const int64_t bytes = [] {
    const char* env = std::getenv("INFOMAX_EXT_CPU_BLOCK_BYTES");
    const long long v = env ? std::atoll(env) : 0;
    return v > 0 ? int64_t(v) : kFwdBwdBlockBytes;
  }();
  return bytes;
}

inline bool fwd_bwd_fits(int64_t M, int64_t elem_bytes) {
  return kFwdBwdMinRows * M * elem_bytes <= kKeptRowsBudget;
}

// Scratch memory of a walk, kept by the calling thread between calls (one buffer per
// dtype, at most kWorkspaceCacheBytes; a larger request gets memory of its own). NB:
// a multi-megabyte buffer allocated afresh every call is mapped afresh, and its page
// faults cost about as much as an epilogue pass at K = M = 512. The caller must not
// let the buffer escape the op, and an op must not take a second one while it holds
// one.
constexpr int64_t kWorkspaceCacheBytes = int64_t(32) << 20;

inline Tensor workspace(int64_t numel, const at::TensorOptions& opts) {
  static thread_local Tensor cache[2];  // float, double
  if (numel * static_cast<int64_t>(opts.dtype().itemsize()) > kWorkspaceCacheBytes) return at::empty({numel}, opts);
  Tensor& t = cache[opts.dtype() == at::kDouble ? 1 : 0];
  if (!t.defined() || t.numel() < numel) t = at::empty({numel}, opts);
  return t.narrow(0, 0, numel);
}

inline Walk fwd_bwd_walk(Walk w, int64_t elem_bytes) {
  const int64_t per_thread = (w.K + at::get_num_threads() - 1) / at::get_num_threads();
  const int64_t fit = fwd_bwd_block_bytes() / (w.M * elem_bytes);
  w.rows = std::max<int64_t>(1, std::min(per_thread, std::max(fit, kFwdBwdMinRows)));
  w.cols = w.M;
  return w;
}

// Forward and backward in one walk, for a loss whose upstream gradients are known
// before the walk (g: the gradients, g.g_pos the positives' weights; its
// saved-statistics fields are ignored, the statistics come from this walk). pos: (K,)
// for the positive scores, or undefined. NB: each row block's scores are kept (whole rows,
// fwd_bwd_walk); once a row's statistics are final, its G is made from the kept
// scores (over them) instead of recomputed ones: three GEMMs (S, G B, G^T A) instead of a
// forward's one plus a backward's three (the trick of fused linear cross-entropy).
// Row reductions only: a column statistic is final only after every row block.
// w.reductions: the statistics to write; their gradients are those of g that are
// present.
template <typename T, typename TileFn, typename ConsumeFn, typename FinishFn>
void reduce_forward_backward(const Walk& w0, const at::TensorOptions& opts, Tensor5& out, Tensor pos,
                             const GradInputs& g, Tensor drow, Tensor dcol, TileFn tile, ConsumeFn consume,
                             FinishFn finish) {
  TORCH_CHECK(!(w0.reductions & kColLse), "score_reduce: a column reduction cannot take its gradient in the forward walk");
  const Walk w = fwd_bwd_walk(w0, sizeof(T));
  const auto out_ptr = [](const Tensor& t) { return t.numel() ? t.data_ptr<T>() : nullptr; };
  const Outputs<T> outs{out_ptr(std::get<0>(out)), out_ptr(std::get<2>(out)), out_ptr(std::get<3>(out)),
                        out_ptr(std::get<4>(out)), pos.defined() ? out_ptr(pos) : nullptr};
  const auto ptr = [](const Tensor& t) -> const T* { return t.defined() && t.numel() ? t.data_ptr<T>() : nullptr; };
  const GradPtrs<T> ptrs{ptr(g.g_row), nullptr,  ptr(g.g_neg), ptr(g.g_clamp), ptr(g.g_sp),
                         outs.row,     nullptr,  outs.neg,     outs.clamp,      ptr(g.g_pos)};
  const int64_t grads = active_grads(w.reductions, g);
  const auto fold_grad = fold_grad_rows_for_cpu<T>();
  ColumnSums<T> dcol_sums(dcol, opts);
  T* drow_p = drow.defined() ? drow.data_ptr<T>() : nullptr;
  const int64_t n_slots = at::get_num_threads();

  // NB: the threads' buffers are taken here, not in the workers: memory a worker
  // allocates comes from its own malloc arena, which is not handed back between calls.
  // Per thread: its block's scores (then G) and a row of scratch.
  const int64_t per_slot = (w.rows + 1) * w.M;
  const Tensor bufs = workspace(n_slots * per_slot, opts).view({n_slots, per_slot});

  at::parallel_for(0, w.blocks(), 1, [&](int64_t b0, int64_t b1) {
    const int tid = at::get_thread_num();
    Tensor kept = bufs[tid];
    T* scratch = kept.data_ptr<T>() + w.rows * w.M;
    T* dcol_t = dcol_sums.of_thread(tid);
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t i0 = blk * w.rows, tk = std::min(w.rows, w.K - i0);
      T* s = tile(kept, i0, tk, 0, w.M);
      fold_grad(s, scratch, i0, tk, w.M, w.pos_offset, w.reductions, grads, static_cast<T>(w.tau), outs, ptrs,
                drow_p, dcol_t);
      if (grads) consume(tid, kept.narrow(0, 0, tk * w.M).view({tk, w.M}), i0, tk, 0, w.M);
      finish(tid, i0, tk);
    }
  });
  dcol_sums.finish(dcol);
}

}  // namespace cpu
}  // namespace infomax_ext
