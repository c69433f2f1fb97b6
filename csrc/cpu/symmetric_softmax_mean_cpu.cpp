// CPU kernel of symmetric_softmax_mean: for the symmetric
//   S = scale * X X^T + bias_i + bias_j   (K x K, never stored, diagonal excluded)
// returns lse_i = logsumexp_{j != i} S_ij and mean_i = sum_{j != i} softmax_i(S)_j x_j,
// the softmax-weighted mean of the other rows (lse_i's gradient w.r.t. x_i's role as
// an anchor, divided by scale). Uniformity's whole gradient is built from it (see
// estimators.uniformity_terms): two GEMMs' worth of work instead of a forward plus a
// recomputing backward (four).
//
// NB: only the upper block triangle of S is computed. Row block I (kTileRows rows)
// takes the column tiles j >= i0; each tile feeds
//   the rows of I  (row side:    O_I += P_row X_J, P_row = exp(S_IJ - row max)) and,
//   the rows of J  (column side: O_J += P_col^T X_I, P_col = exp(S_IJ - column max)),
// the latter except on the square I x I, which the row side covers whole. So S costs
// half a K x K x d GEMM, the two weighted sums one, and each element of S two exps.
// Every row keeps an online (max, sum) state and its unnormalised O, rescaled when its
// max grows (flash-attention's trick). Blocks are dealt to slots round-robin (the
// triangle makes early blocks longer); each slot owns K states and a K x d O, merged
// in log space in a fixed order at the end: extra memory slots * K * (d + 2), no atomics,
// bitwise reruns for a fixed thread count.
#include <ATen/Dispatch.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "dot_tile.h"

namespace infomax_ext {
namespace {

using cpu::kTileCols;
// NB: twice the shared walker's row block: the row block is the inner dimension of
// the column side's GEMM (P_col^T X_I), which runs poorly at 64. Measured at K=4096,
// d=128, one thread: 64 -> 127-155 ms, 128 -> 116-126 ms, 256 -> 124-139 ms.
constexpr int64_t kTileRows = 2 * cpu::kTileRows;
static_assert(kTileRows <= kTileCols, "alpha holds a tile's rows or its columns");

// Row side of a tile: turns each row of s (tk x tm, scores) into the weights
// exp(S - m) with m the row's new running max (the diagonal entry, column `r` when
// `diag`, weighs 0), folds their sum into st[r] and writes the factor alpha[r] by
// which the row's earlier O must be rescaled.
template <typename T>
INFOMAX_CPU_INLINE void softmax_rows(T* __restrict s, int64_t tk, int64_t tm, bool diag, LseState<T>* st,
                                     T* __restrict alpha) {
  for (int64_t r = 0; r < tk; ++r) {
    T* row = s + r * tm;
    const int64_t a = diag ? r : tm;  // NB: the diagonal is left out of the max, then zeroed
    const T m = cpu::range_max(row, a + 1, tm, cpu::range_max(row, 0, a, st[r].max));
    if (m == neg_infinity<T>()) {
      // NB: every entry so far masked (-inf): the weights are 0, the state stays empty.
      for (int64_t c = 0; c < tm; ++c) row[c] = T(0);
      alpha[r] = T(1);
      continue;
    }
    alpha[r] = softmax_weight(st[r].max, m);  // NB: 0 for an empty state (its O is 0)
    for (int64_t c = 0; c < tm; ++c) row[c] = softmax_weight(row[c], m);
    if (diag) row[r] = T(0);
    st[r] = LseState<T>{m, st[r].sum * alpha[r] + cpu::range_sum(row, 0, tm, [](T v) INFOMAX_CPU_INLINE_LAMBDA { return v; })};
  }
}

// Column side of a tile: for the columns [c0, tm) of s (tk x tm, scores, read
// only), writes the weights exp(S - m_c) into p (same layout) with m_c the
// column's new running max, folds their sums into st[c] and writes alpha[c].
template <typename T>
INFOMAX_CPU_INLINE void softmax_cols(const T* __restrict s, T* __restrict p, int64_t tk, int64_t tm, int64_t c0,
                                     LseState<T>* st, T* __restrict mx, T* __restrict sm,
                                     T* __restrict alpha) {
  for (int64_t c = c0; c < tm; ++c) mx[c] = st[c].max;
  for (int64_t r = 0; r < tk; ++r)
    for (int64_t c = c0; c < tm; ++c) mx[c] = cpu::nan_max(s[r * tm + c], mx[c]);
  for (int64_t c = c0; c < tm; ++c) sm[c] = T(0);
  // NB: a column whose entries are all -inf has max -inf: softmax_weight gives 0, not NaN.
  for (int64_t r = 0; r < tk; ++r)
    for (int64_t c = c0; c < tm; ++c) {
      const T w = softmax_weight(s[r * tm + c], mx[c]);
      p[r * tm + c] = w;
      sm[c] += w;
    }
  for (int64_t c = c0; c < tm; ++c) {
    alpha[c] = softmax_weight(st[c].max, mx[c]);
    st[c] = LseState<T>{mx[c], st[c].sum * alpha[c] + sm[c]};
  }
}

template <typename T>
using RowsFn = void (*)(T*, int64_t, int64_t, bool, LseState<T>*, T*);
template <typename T>
using ColsFn = void (*)(const T*, T*, int64_t, int64_t, int64_t, LseState<T>*, T*, T*, T*);

INFOMAX_CPU_CLONES(softmax_rows, softmax_rows,
                   (T* s, int64_t tk, int64_t tm, bool diag, LseState<T>* st, T* alpha),
                   (s, tk, tm, diag, st, alpha), typename T)
INFOMAX_CPU_CLONES(softmax_cols, softmax_cols,
                   (const T* s, T* p, int64_t tk, int64_t tm, int64_t c0, LseState<T>* st, T* mx, T* sm, T* alpha),
                   (s, p, tk, tm, c0, st, mx, sm, alpha), typename T)

// O[n, d] rows times alpha[n], skipping the common alpha == 1.
template <typename T>
void rescale_rows(T* O, int64_t d, const T* alpha, int64_t n) {
  for (int64_t r = 0; r < n; ++r) {
    if (alpha[r] == T(1)) continue;
    T* o = O + r * d;
    for (int64_t k = 0; k < d; ++k) o[k] *= alpha[r];
  }
}

template <typename T>
void symmetric_walk(const cpu::DotInputs& in, const Tensor& scale, Tensor& lse, Tensor& mean) {
  const RowsFn<T> rows_fn = INFOMAX_CPU_PICK(softmax_rows, T);
  const ColsFn<T> cols_fn = INFOMAX_CPU_PICK(softmax_cols, T);
  const Tensor& X = in.A;
  const T* X_p = X.data_ptr<T>();
  const int64_t K = X.size(0), d = X.size(1);
  const auto opts = X.options();
  const cpu::DotTile<T> tile = cpu::dot_tile<T>(in, scale);
  const int64_t n_blocks = (K + kTileRows - 1) / kTileRows;
  const int64_t n_slots = std::min<int64_t>(at::get_num_threads(), n_blocks);
  // NB: without the mean (no gradient wanted) only the states are kept: half of S and its exps.
  const bool with_mean = mean.numel() > 0;
  Tensor O_acc = at::zeros({with_mean ? n_slots : 0, K, d}, opts);
  std::vector<LseState<T>> states(n_slots * K, lse_empty<T>());

  at::parallel_for(0, n_slots, 1, [&](int64_t s0, int64_t s1) {
    Tensor buf = at::empty({kTileRows * kTileCols}, opts), pbuf = at::empty({kTileRows * kTileCols}, opts);
    std::vector<T> mx(kTileCols), sm(kTileCols), alpha(kTileCols);
    for (int64_t slot = s0; slot < s1; ++slot) {
      T* O_p = with_mean ? O_acc[slot].data_ptr<T>() : nullptr;
      LseState<T>* st = states.data() + slot * K;
      for (int64_t blk = slot; blk < n_blocks; blk += n_slots) {
        const int64_t i0 = blk * kTileRows, tk = std::min(kTileRows, K - i0);
        for (int64_t j0 = i0; j0 < K; j0 += kTileCols) {
          const int64_t tm = std::min(kTileCols, K - j0);
          T* s = tile(buf, i0, tk, j0, tm);
          const bool diag = j0 == i0;
          const int64_t c0 = diag ? tk : 0;  // the square I x I: row side only
          if (c0 < tm) {
            // Column side first: it reads the scores that the row side overwrites.
            T* p = pbuf.data_ptr<T>();
            cols_fn(s, p, tk, tm, c0, st + j0, mx.data(), sm.data(), alpha.data());
            if (with_mean) {
              // rows j0 + c0.. of O += P[:, c0:]^T X[i0:i0+tk] (P: tk x tm, row-major)
              rescale_rows(O_p + (j0 + c0) * d, d, alpha.data() + c0, tm - c0);
              cpu::gemm<T>(true, false, tm - c0, d, tk, T(1), p + c0, tm, X_p + i0 * d, d, T(1),
                           O_p + (j0 + c0) * d, d);
            }
          }
          rows_fn(s, tk, tm, diag, st + i0, alpha.data());
          if (with_mean) {
            // rows i0.. of O += E X[j0:j0+tm], E the tile's exps (written over its scores)
            rescale_rows(O_p + i0 * d, d, alpha.data(), tk);
            cpu::gemm<T>(false, false, tk, d, tm, T(1), s, tm, X_p + j0 * d, d, T(1), O_p + i0 * d, d);
          }
        }
      }
    }
  });

  // NB: the slots' states and sums are merged in log space in a fixed order.
  T* lse_p = lse.data_ptr<T>();
  T* mean_p = with_mean ? mean.data_ptr<T>() : nullptr;
  const T* O_p = with_mean ? O_acc.data_ptr<T>() : nullptr;
  at::parallel_for(0, K, 256, [&](int64_t r0, int64_t r1) {
    for (int64_t i = r0; i < r1; ++i) {
      LseState<T> all = lse_empty<T>();
      for (int64_t t = 0; t < n_slots; ++t) all = lse_merge(all, states[t * K + i]);
      lse_p[i] = lse_finalize(all);
      if (!with_mean) continue;
      T* out = mean_p + i * d;
      for (int64_t k = 0; k < d; ++k) out[k] = T(0);
      // NB: a row without a finite entry (K = 1, all masked) has mean 0, not 0/0.
      if (all.max == neg_infinity<T>()) continue;
      for (int64_t t = 0; t < n_slots; ++t) {
        const T w = softmax_weight(states[t * K + i].max, all.max) / all.sum;
        const T* o = O_p + (t * K + i) * d;
        for (int64_t k = 0; k < d; ++k) out[k] += w * o[k];
      }
    }
  });
}

std::tuple<Tensor, Tensor> symmetric_softmax_mean_cpu(const Tensor& x,         // (K, d)
                                                      const Tensor& scale,     // one element
                                                      const OptTensor& bias,   // (K,) or None
                                                      bool with_mean) {        // false: mean is (0,)
  check_symmetric_args(x, scale, bias);
  // NB: x is both GEMM operands and the bias sits on both sides (converted once).
  const cpu::DotInputs in = cpu::dot_inputs(x, x, bias, bias);
  Tensor lse, mean;
  std::tie(lse, mean) = alloc_symmetric(x, with_mean);
  AT_DISPATCH_FLOATING_TYPES(in.acc, "symmetric_softmax_mean_cpu",
                             [&] { symmetric_walk<scalar_t>(in, scale, lse, mean); });
  return {lse, mean};
}

}  // namespace

TORCH_LIBRARY_IMPL(infomax_ext, CPU, m) { m.impl("symmetric_softmax_mean", &symmetric_softmax_mean_cpu); }

}  // namespace infomax_ext
