// CUDA kernels of concat_score_reduce: the concat-MLP critic
//
//     S[i, j] = sum_h w2[h] * act(P[i, h] + Q[j, h]) + b2      (K x M, never stored whole)
//
// There is no matmul here (O(K M H) elementwise activations), so the tiles of S
// come from a hand-written kernel, not cuBLAS. A block of 64 threads (8 x 8)
// computes a 32 x 32 tile of S (4 x 4 pairs per thread), staging the tile's 32
// rows of P and 32 rows of Q in shared memory over chunks of 32 hidden units,
// accumulating in float32 (float64 for float64; fp16/bf16 inputs are upcast to
// float32 once, O((K + M) H)). The activation is a template parameter (one
// switch, dispatch_activation, outside every kernel).
//
// Rows are walked in chunks of R rows (a multiple of 32, or all K) so that the
// workspaces below stay within cuda::workspace_bytes() (from the free device memory,
// at most 1 GiB; INFOMAX_EXT_CUDA_TILE_BYTES overrides it: tests shrink it to walk
// several chunks). Per chunk:
//   forward:  the tile kernel folds each row of its tile into partial states
//             (negatives' log-sum-exp, clamped, softplus sum: one per row and
//             column tile) and each column into a partial log-sum-exp state (one
//             per column and row tile); the positive score is written by the one
//             tile that holds it. A row kernel then merges a row's partials over
//             the column tiles in a fixed order and finalises it (finalize_row);
//             a column kernel merges the chunk's column partials, in row-tile
//             order, into the running column states (lse_merge), finalised after
//             the last chunk. No atomics: reruns are bitwise identical.
//   backward: the tile kernel recomputes its tile and writes G = dL/dS (score_grad)
//             into a chunk workspace (R x M) plus one sum of G per tile (for db2).
//             Then two kernels that own their outputs (no atomics, no partials):
//               dP kernel: a block per (32 rows, 32 hidden units) walks all M
//                 columns: dP[i, h] = w2[h] sum_j G_ij act'(P_ih + Q_jh), and the
//                 tile's sum_ij G_ij act(.) per h (one partial per row tile, summed
//                 at the end: dw2);
//               dQ kernel: a block per (32 columns, 32 hidden units) walks the
//                 chunk's rows: dQ[j, h] += w2[h] sum_i G_ij act'(.), accumulated
//                 over the chunks in launch order.
//             So the activation is evaluated three times per (i, j, h) in backward
//             (recompute S, the dP and the dQ pass): the price of owning every
//             output in one thread (deterministic) instead of atomics or
//             O(K M H / 32) partial buffers.
//             db2 = sum of the per-tile sums of G; dw2 = sum of the row-tile partials.
// Extra memory: the chunk workspaces (bounded), O(K + M) statistics and the
// O((K + M) H) gradients. Pairs with G_ij == 0 are skipped in the gradient passes,
// as on the CPU (so an infinite act' there does not turn into NaN).
//
// NB: the dP kernel's parallelism is ceil(rows/32) x ceil(H/32) blocks, each
// walking all M columns: fine for the usual K = M in the thousands, thin for tiny
// K with huge M (a split of the columns with partial dP buffers would fix that).
//
// The per-element math (activations: concat_math.h; log-space merges, softplus,
// dL/dS: score_math.h) is shared with the CPU kernels.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>

#include "../concat_common.h"
#include "cuda_common.cuh"
#include "infomax_ext/concat_math.h"
#include "infomax_ext/score_math.h"

namespace infomax_ext {
namespace {

using cuda::as_states;
using cuda::ceil_div;
using cuda::ptr_or_null;
using cuda::warp_sum;

constexpr int kTile = 32;     // rows and columns of S per tile
constexpr int kHC = 32;       // hidden units staged in shared memory per step
constexpr int kSide = 8;      // the tile kernels' block is kSide x kSide threads,
constexpr int kPairs = 4;     // each computing kPairs x kPairs scores of the tile
constexpr int kTileThreads = kSide * kSide;  // 64: the tile kernels' block
constexpr int kThreads = 256; // every other kernel's block
constexpr int kHPerThread = kHC * kTile / kThreads;  // 4: outputs (h values) per thread in dP/dQ

// NB: 4 x 4 scores per thread: per hidden unit a thread loads 4 + 4 + 1 values from
// shared memory for 16 activations (2 x 2 pairs needed 5 for 4), so the activation
// loop, not shared memory, bounds the tile kernels, ReLU included.
static_assert(kSide * kPairs == kTile && kTileThreads == 64, "tile kernel shape: two warps");
static_assert(kThreads / 32 * kHPerThread == kHC, "dP/dQ kernels: 8 warps x 4 h = kHC");



// Rows per chunk: all K if they fit the budget, else a multiple of kTile (at least one tile).
int64_t chunk_rows(int64_t K, int64_t bytes_per_row) {
  int64_t r = cuda::workspace_bytes() / std::max<int64_t>(1, bytes_per_row);
  r = std::min<int64_t>(r, int64_t(65535) * kTile);  // grid.y of the tile kernels
  if (r >= K) return K;
  return std::max<int64_t>(kTile, r / kTile * kTile);
}



// The critic's parameters in the accumulation dtype (contiguous, on the device).
template <typename T>
struct ConcatParams {
  const T* P;   // (K, H)
  const T* Q;   // (M, H)
  const T* w2;  // (H,)
  const T* b2;  // one element (read on the device: no host sync)
  int64_t K, M, H;
};


// Loads rows [x0, x0 + kTile) (those below n) of X (n x H), hidden units
// [h0, h0 + hc), transposed into s[h][r]; zeros elsewhere. t: the thread's index in a
// block of kN threads.
template <int kN, typename T>
__device__ __forceinline__ void load_rows_t(const T* X, int64_t n, int64_t H, int64_t x0, int64_t h0, int hc,
                                            T (*s)[kTile + 1], int t) {
  for (int e = t; e < kTile * kHC; e += kN) {
    const int r = e / kHC, h = e % kHC;  // NB: consecutive threads read consecutive h (coalesced)
    const int64_t x = x0 + r;
    s[h][r] = (x < n && h < hc) ? X[x * H + h0 + h] : T(0);
  }
}

// The scores of the tile at rows i0.., columns j0..: thread (tx, ty) gets
// s[a][b] = S[i0 + ty + kSide a, j0 + tx + kSide b] (b2 included). Rows >= K and
// columns >= M are computed from zeros and must be ignored by the caller.
// Every thread of the block must call it (it synchronises).
template <int64_t A, typename T>
__device__ __forceinline__ void tile_scores(const ConcatParams<T>& d, int64_t i0, int64_t j0,
                                            T (&s)[kPairs][kPairs], T (*sP)[kTile + 1], T (*sQ)[kTile + 1],
                                            T* sW) {
  const int tx = threadIdx.x, ty = threadIdx.y, t = ty * kSide + tx;
  T acc[kPairs][kPairs];
#pragma unroll
  for (int a = 0; a < kPairs; ++a)
#pragma unroll
    for (int b = 0; b < kPairs; ++b) acc[a][b] = T(0);
  for (int64_t h0 = 0; h0 < d.H; h0 += kHC) {
    const int hc = static_cast<int>(std::min<int64_t>(kHC, d.H - h0));
    load_rows_t<kTileThreads>(d.P, d.K, d.H, i0, h0, hc, sP, t);
    load_rows_t<kTileThreads>(d.Q, d.M, d.H, j0, h0, hc, sQ, t);
    if (t < kHC) sW[t] = t < hc ? d.w2[h0 + t] : T(0);
    __syncthreads();
#pragma unroll 2
    for (int h = 0; h < hc; ++h) {
      const T w = sW[h];
      T pv[kPairs], qv[kPairs];
#pragma unroll
      for (int a = 0; a < kPairs; ++a) {
        pv[a] = sP[h][ty + kSide * a];
        qv[a] = sQ[h][tx + kSide * a];
      }
#pragma unroll
      for (int a = 0; a < kPairs; ++a)
#pragma unroll
        for (int b = 0; b < kPairs; ++b) acc[a][b] += w * act_value<A>(pv[a] + qv[b]);
    }
    __syncthreads();  // NB: before the next chunk overwrites sP / sQ
  }
  const T b2 = *d.b2;
#pragma unroll
  for (int a = 0; a < kPairs; ++a)
#pragma unroll
    for (int b = 0; b < kPairs; ++b) s[a][b] = acc[a][b] + b2;
}

// ---------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------

template <typename T>
struct ForwardArgs {
  ConcatParams<T> d;
  int64_t i0, rows;  // the chunk: rows [i0, i0 + rows) of S
  int64_t n_ct;      // column tiles (gridDim.x of the tile kernel)
  int64_t n_rt;      // row tiles of the chunk (gridDim.y)
  int64_t pos_offset, reductions;
  T tau;
  // Partials of the chunk, nullptr when not needed.
  LseState<T>* row_neg;    // [n_ct][rows]
  LseState<T>* row_clamp;  // [n_ct][rows]
  T* row_sp;               // [n_ct][rows]
  T* pos;                  // (K,): S[i, i + pos_offset]
  LseState<T>* col_part;   // [n_rt][M]
};

// A block per 32 x 32 tile (grid: column tiles x row tiles of the chunk).
template <int64_t A, typename T>
__global__ void __launch_bounds__(kTileThreads) concat_forward_tile_kernel(const ForwardArgs<T> p) {
  __shared__ T sP[kHC][kTile + 1];
  __shared__ T sQ[kHC][kTile + 1];
  __shared__ T sW[kHC];
  __shared__ T sS[kTile][kTile + 1];
  const int64_t ct = blockIdx.x, rt = blockIdx.y;
  const int64_t j0 = ct * kTile, r0 = rt * kTile;  // r0: row in the chunk
  T s[kPairs][kPairs];
  tile_scores<A>(p.d, p.i0 + r0, j0, s, sP, sQ, sW);
#pragma unroll
  for (int a = 0; a < kPairs; ++a)
#pragma unroll
    for (int b = 0; b < kPairs; ++b) sS[threadIdx.y + kSide * a][threadIdx.x + kSide * b] = s[a][b];
  __syncthreads();

  const int t = threadIdx.y * kSide + threadIdx.x, lane = t & 31, warp = t >> 5;
  const int64_t M = p.d.M;
  const int64_t red = p.reductions;
  if (warp == 0 && (red & (kRowLse | kNegLse | kNegClampLse | kNegSoftplus))) {
    // A row of the tile per lane (sS[lane][c]: stride 33, no bank conflicts).
    const int64_t rr = r0 + lane;
    if (rr < p.rows) {
      const int64_t i = p.i0 + rr;
      const int64_t pc = i + p.pos_offset - j0;  // the positive's column in this tile
      const int nc = static_cast<int>(std::min<int64_t>(kTile, M - j0));
      const bool need_neg = red & (kRowLse | kNegLse);
      const bool need_clamp = red & kNegClampLse;
      const bool need_sp = red & kNegSoftplus;
      LseState<T> neg = lse_empty<T>(), clamp = lse_empty<T>();
      T sp = T(0);
      for (int c = 0; c < nc; ++c) {
        const T x = sS[lane][c];
        if (c == pc) {
          // NB: the positive is excluded from every neg_* reduction; written by this tile only.
          if (p.pos) p.pos[i] = x;
          continue;
        }
        if (need_neg) neg = lse_push(neg, x);
        if (need_clamp) clamp = lse_push(clamp, clamp_tau(x, p.tau));
        if (need_sp) sp += softplus(x);
      }
      const int64_t k = ct * p.rows + rr;
      if (p.row_neg) p.row_neg[k] = neg;
      if (p.row_clamp) p.row_clamp[k] = clamp;
      if (p.row_sp) p.row_sp[k] = sp;
    }
  } else if (warp == 1 && p.col_part) {
    // A column of the tile per lane: log-sum-exp over all the tile's rows.
    const int64_t j = j0 + lane;
    if (j < M) {
      const int nr = static_cast<int>(std::min<int64_t>(kTile, p.rows - r0));
      LseState<T> st = lse_empty<T>();
      for (int r = 0; r < nr; ++r) st = lse_push(st, sS[r][lane]);
      p.col_part[rt * M + j] = st;
    }
  }
}

template <typename T>
struct RowOutputs {
  T *row, *neg, *clamp, *sp;  // (K,) or nullptr when not requested
};

// A thread per row of the chunk: merges its partials over the column tiles in
// order and writes the row's statistics.
template <typename T>
__global__ void concat_row_finish_kernel(const ForwardArgs<T> p, const RowOutputs<T> o) {
  const int64_t rr = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (rr >= p.rows) return;
  const int64_t i = p.i0 + rr;
  LseState<T> neg = lse_empty<T>(), clamp = lse_empty<T>();
  T sp = T(0);
  for (int64_t ct = 0; ct < p.n_ct; ++ct) {
    const int64_t k = ct * p.rows + rr;
    if (p.row_neg) neg = lse_merge(neg, p.row_neg[k]);
    if (p.row_clamp) clamp = lse_merge(clamp, p.row_clamp[k]);
    if (p.row_sp) sp += p.row_sp[k];
  }
  const T pos = (p.reductions & kRowLse) ? p.pos[i] : T(0);
  finalize_row(i, p.reductions, neg, clamp, sp, pos, o.row, o.neg, o.clamp, o.sp);
}

// A thread per column: merges the chunk's n_rt partials in order into the
// running state (unless first), finalised into out on the last chunk.
template <typename T>
__global__ void concat_col_finish_kernel(const LseState<T>* part, int64_t n_rt, int64_t M, bool first, bool last,
                                         LseState<T>* state, T* out) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= M) return;
  LseState<T> st = first ? lse_empty<T>() : state[j];
  for (int64_t rt = 0; rt < n_rt; ++rt) st = lse_merge(st, part[rt * M + j]);
  if (last) {
    out[j] = lse_finalize(st);
  } else {
    state[j] = st;
  }
}

template <int64_t A, typename T>
void forward_impl(const ConcatParams<T>& d, T tau, int64_t pos_offset, int64_t red, Tensor5& out,
                  const at::TensorOptions& opts, cudaStream_t stream) {
  const int64_t K = d.K, M = d.M;
  const int64_t n_ct = ceil_div(M, kTile);
  const bool row_red = red & (kRowLse | kNegLse | kNegClampLse | kNegSoftplus);
  const bool col_red = red & kColLse;
  // Workspace per row of a chunk: row partials (up to 5 scalars per column tile)
  // and column partials (2 scalars per column per 32 rows).
  const int64_t per_row = int64_t(sizeof(T)) * ((row_red ? 5 * n_ct : 0) + (col_red ? ceil_div(2 * M, kTile) : 0));
  const int64_t R = chunk_rows(K, per_row);
  const int64_t n_rt_max = ceil_div(R, kTile);

  Tensor row_neg, row_clamp, row_sp, pos, col_part, col_state;
  if (red & (kRowLse | kNegLse)) row_neg = at::empty({n_ct * R, 2}, opts);
  if (red & kNegClampLse) row_clamp = at::empty({n_ct * R, 2}, opts);
  if (red & kNegSoftplus) row_sp = at::empty({n_ct * R}, opts);
  if (red & kRowLse) pos = at::empty({K}, opts);
  if (col_red) {
    col_part = at::empty({n_rt_max * M, 2}, opts);
    if (R < K) col_state = at::empty({M, 2}, opts);
  }

  ForwardArgs<T> p{};
  p.d = d;
  p.n_ct = n_ct;
  p.pos_offset = pos_offset;
  p.reductions = red;
  p.tau = tau;
  p.row_neg = as_states<T>(row_neg);
  p.row_clamp = as_states<T>(row_clamp);
  p.row_sp = ptr_or_null<T>(row_sp);
  p.pos = ptr_or_null<T>(pos);
  p.col_part = as_states<T>(col_part);
  const RowOutputs<T> o{ptr_or_null<T>(std::get<0>(out)), ptr_or_null<T>(std::get<2>(out)),
                        ptr_or_null<T>(std::get<3>(out)), ptr_or_null<T>(std::get<4>(out))};
  T* col_out = ptr_or_null<T>(std::get<1>(out));

  for (int64_t i0 = 0; i0 < K; i0 += R) {
    p.i0 = i0;
    p.rows = std::min(R, K - i0);
    p.n_rt = ceil_div(p.rows, kTile);
    const dim3 grid(static_cast<unsigned>(n_ct), static_cast<unsigned>(p.n_rt));
    cuda::launch(concat_forward_tile_kernel<A, T>, grid, dim3(kSide, kSide), stream, p);
    if (row_red) {
      cuda::launch(concat_row_finish_kernel<T>, static_cast<unsigned>(ceil_div(p.rows, kThreads)), kThreads, stream, p, o);
    }
    if (col_red) {
      cuda::launch(concat_col_finish_kernel<T>, static_cast<unsigned>(ceil_div(M, kThreads)), kThreads, stream, p.col_part, p.n_rt, M, i0 == 0, i0 + p.rows == K, as_states<T>(col_state), col_out);
    }
  }
}

// ---------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------

template <typename T>
struct GradTileArgs {
  ConcatParams<T> d;
  int64_t i0, rows, n_ct;
  int64_t rt0;  // global index of the chunk's first row tile (i0 / kTile)
  int64_t pos_offset, reductions;  // reductions: the active ones (requested and given a gradient)
  T tau;
  // Upstream gradients and saved statistics, nullptr when inactive.
  const T *g_row, *row_lse, *g_neg, *neg_lse, *g_clamp, *clamp_lse, *g_sp;  // (K,)
  const T *g_col, *col_lse;                                                 // (M,)
  T* G;     // [rows][M]: the chunk of dL/dS
  T* gsum;  // [total row tiles][n_ct]: sum of G per tile
};

// A block per 32 x 32 tile: recomputes S, writes G = score_grad(S) and the tile's sum of G.
template <int64_t A, typename T>
__global__ void __launch_bounds__(kTileThreads) concat_grad_tile_kernel(const GradTileArgs<T> p) {
  __shared__ T sP[kHC][kTile + 1];
  __shared__ T sQ[kHC][kTile + 1];
  __shared__ T sW[kHC];
  __shared__ T sSum[kTileThreads];
  const int64_t ct = blockIdx.x, rt = blockIdx.y;
  const int64_t j0 = ct * kTile, r0 = rt * kTile;
  const int64_t M = p.d.M;
  T s[kPairs][kPairs];
  tile_scores<A>(p.d, p.i0 + r0, j0, s, sP, sQ, sW);
  T local = T(0);
#pragma unroll
  for (int a = 0; a < kPairs; ++a) {
    const int64_t rr = r0 + threadIdx.y + kSide * a;
    if (rr >= p.rows) continue;
    const int64_t i = p.i0 + rr;
    const RowGrad<T> rg = row_grad_at<T>(p, i);
#pragma unroll
    for (int b = 0; b < kPairs; ++b) {
      const int64_t j = j0 + threadIdx.x + kSide * b;
      if (j >= M) continue;
      const T g = score_grad(s[a][b], j == i + p.pos_offset, rg, p.g_col ? p.g_col[j] : T(0),
                             p.col_lse ? p.col_lse[j] : T(0), p.tau, p.reductions);
      p.G[rr * M + j] = g;
      local += g;
    }
  }
  const int t = threadIdx.y * kSide + threadIdx.x;
  sSum[t] = local;
  __syncthreads();
  if (t == 0) {
    // NB: a fixed order: reruns are bitwise identical.
    T total = T(0);
    for (int k = 0; k < kTileThreads; ++k) total += sSum[k];
    p.gsum[(p.rt0 + rt) * p.n_ct + ct] = total;
  }
}

template <typename T>
struct GradAccArgs {
  ConcatParams<T> d;
  int64_t i0, rows;
  int64_t rt0;   // global index of the chunk's first row tile
  const T* G;    // [rows][M]
  T* dP;         // (K, H), written
  T* dQ;         // (M, H), accumulated over chunks (zero-initialised)
  T* dw_part;    // [total row tiles][H], written
};

// A block per (32 rows of the chunk, 32 hidden units), walking all columns:
// dP[i, h] = w2[h] sum_j G_ij act'(P_ih + Q_jh) and the row tile's sum_ij G_ij act(.).
// Thread t owns row (t % 32) and hidden units (t / 32) + 8 k, k < 4.
template <int64_t A, typename T>
__global__ void __launch_bounds__(kThreads) concat_grad_p_kernel(const GradAccArgs<T> p) {
  __shared__ T sP[kHC][kTile + 1];
  __shared__ T sQ[kHC][kTile + 1];
  __shared__ T sG[kTile][kTile + 1];
  const int t = threadIdx.x, lane = t & 31, hs = t >> 5;
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * kTile, h0 = static_cast<int64_t>(blockIdx.y) * kHC;
  const int64_t M = p.d.M, H = p.d.H;
  const int hc = static_cast<int>(std::min<int64_t>(kHC, H - h0));
  const int64_t row_end = p.i0 + p.rows;  // rows of other chunks are not loaded
  load_rows_t<kThreads>(p.d.P, row_end, H, p.i0 + r0, h0, hc, sP, t);
  __syncthreads();
  T pv[kHPerThread], accP[kHPerThread], accW[kHPerThread];
#pragma unroll
  for (int k = 0; k < kHPerThread; ++k) {
    pv[k] = sP[hs + 8 * k][lane];
    accP[k] = accW[k] = T(0);
  }
  for (int64_t j0 = 0; j0 < M; j0 += kTile) {
    __syncthreads();  // NB: the previous step's reads of sQ / sG are done
    load_rows_t<kThreads>(p.d.Q, M, H, j0, h0, hc, sQ, t);
    for (int e = t; e < kTile * kTile; e += kThreads) {
      const int r = e / kTile, c = e % kTile;
      const int64_t rr = r0 + r, j = j0 + c;
      sG[r][c] = (rr < p.rows && j < M) ? p.G[rr * M + j] : T(0);
    }
    __syncthreads();
    const int nc = static_cast<int>(std::min<int64_t>(kTile, M - j0));
    for (int c = 0; c < nc; ++c) {
      const T g = sG[lane][c];
      if (g == T(0)) continue;  // NB: as the CPU: a zero weight contributes nothing, even times inf
#pragma unroll
      for (int k = 0; k < kHPerThread; ++k) {
        T value, grad;
        act_value_grad<A>(pv[k] + sQ[hs + 8 * k][c], value, grad);
        accP[k] += g * grad;
        accW[k] += g * value;
      }
    }
  }
  const int64_t rr = r0 + lane;
#pragma unroll
  for (int k = 0; k < kHPerThread; ++k) {
    const int h = hs + 8 * k;
    if (rr < p.rows && h < hc) p.dP[(p.i0 + rr) * H + h0 + h] = p.d.w2[h0 + h] * accP[k];
    // NB: rows past the chunk have G = 0 and add exact zeros.
    const T w = warp_sum(accW[k]);
    if (lane == 0 && h < hc) p.dw_part[(p.rt0 + blockIdx.x) * H + h0 + h] = w;
  }
}

// A block per (32 columns, 32 hidden units), walking the chunk's rows:
// dQ[j, h] += w2[h] sum_i G_ij act'(P_ih + Q_jh). Thread t owns column (t % 32)
// and hidden units (t / 32) + 8 k, k < 4.
template <int64_t A, typename T>
__global__ void __launch_bounds__(kThreads) concat_grad_q_kernel(const GradAccArgs<T> p) {
  __shared__ T sP[kHC][kTile + 1];
  __shared__ T sQ[kHC][kTile + 1];
  __shared__ T sG[kTile][kTile + 1];
  const int t = threadIdx.x, lane = t & 31, hs = t >> 5;
  const int64_t c0 = static_cast<int64_t>(blockIdx.x) * kTile, h0 = static_cast<int64_t>(blockIdx.y) * kHC;
  const int64_t M = p.d.M, H = p.d.H;
  const int hc = static_cast<int>(std::min<int64_t>(kHC, H - h0));
  const int64_t row_end = p.i0 + p.rows;
  load_rows_t<kThreads>(p.d.Q, M, H, c0, h0, hc, sQ, t);
  __syncthreads();
  T qv[kHPerThread], accQ[kHPerThread];
#pragma unroll
  for (int k = 0; k < kHPerThread; ++k) {
    qv[k] = sQ[hs + 8 * k][lane];
    accQ[k] = T(0);
  }
  for (int64_t r0 = 0; r0 < p.rows; r0 += kTile) {
    __syncthreads();
    load_rows_t<kThreads>(p.d.P, row_end, H, p.i0 + r0, h0, hc, sP, t);
    for (int e = t; e < kTile * kTile; e += kThreads) {
      const int r = e / kTile, c = e % kTile;
      const int64_t rr = r0 + r, j = c0 + c;
      sG[r][c] = (rr < p.rows && j < M) ? p.G[rr * M + j] : T(0);
    }
    __syncthreads();
    const int nr = static_cast<int>(std::min<int64_t>(kTile, p.rows - r0));
    for (int r = 0; r < nr; ++r) {
      const T g = sG[r][lane];
      if (g == T(0)) continue;
#pragma unroll
      for (int k = 0; k < kHPerThread; ++k) accQ[k] += g * act_grad<A>(sP[hs + 8 * k][r] + qv[k]);
    }
  }
  const int64_t j = c0 + lane;
  if (j >= M) return;
#pragma unroll
  for (int k = 0; k < kHPerThread; ++k) {
    const int h = hs + 8 * k;
    if (h < hc) p.dQ[j * H + h0 + h] += p.d.w2[h0 + h] * accQ[k];
  }
}

struct GradTensors {
  Tensor g_row, g_col, g_neg, g_clamp, g_sp;   // (K,)/(M,) or (0,), accumulation dtype
  Tensor row_lse, col_lse, neg_lse, clamp_lse;  // saved forward outputs or (0,)
};

template <int64_t A, typename T>
void backward_impl(const ConcatParams<T>& d, T tau, int64_t pos_offset, int64_t active, const GradTensors& g,
                   Tensor& dP, Tensor& dQ, Tensor& dw_part, Tensor& gsum, const at::TensorOptions& opts,
                   cudaStream_t stream) {
  const int64_t K = d.K, M = d.M, H = d.H;
  const int64_t n_ct = ceil_div(M, kTile), n_rt_total = ceil_div(K, kTile);
  const int64_t R = chunk_rows(K, int64_t(sizeof(T)) * M);
  Tensor Gws = at::empty({R * M}, opts);
  dw_part = at::empty({n_rt_total, H}, opts);
  gsum = at::empty({n_rt_total * n_ct}, opts);

  GradTileArgs<T> q{};
  q.d = d;
  q.n_ct = n_ct;
  q.pos_offset = pos_offset;
  q.reductions = active;
  q.tau = tau;
  q.g_row = ptr_or_null<T>(g.g_row);
  q.g_col = ptr_or_null<T>(g.g_col);
  q.g_neg = ptr_or_null<T>(g.g_neg);
  q.g_clamp = ptr_or_null<T>(g.g_clamp);
  q.g_sp = ptr_or_null<T>(g.g_sp);
  q.row_lse = ptr_or_null<T>(g.row_lse);
  q.col_lse = ptr_or_null<T>(g.col_lse);
  q.neg_lse = ptr_or_null<T>(g.neg_lse);
  q.clamp_lse = ptr_or_null<T>(g.clamp_lse);
  q.G = Gws.data_ptr<T>();
  q.gsum = gsum.data_ptr<T>();

  GradAccArgs<T> a{};
  a.d = d;
  a.G = Gws.data_ptr<T>();
  a.dP = dP.data_ptr<T>();
  a.dQ = dQ.data_ptr<T>();
  a.dw_part = dw_part.data_ptr<T>();
  const unsigned n_hc = static_cast<unsigned>(ceil_div(H, kHC));

  for (int64_t i0 = 0; i0 < K; i0 += R) {
    const int64_t rows = std::min(R, K - i0);
    const int64_t n_rt = ceil_div(rows, kTile);
    q.i0 = a.i0 = i0;
    q.rows = a.rows = rows;
    q.rt0 = a.rt0 = i0 / kTile;  // NB: i0 is a multiple of kTile (R is, unless R == K)
    cuda::launch(concat_grad_tile_kernel<A, T>, dim3(static_cast<unsigned>(n_ct), static_cast<unsigned>(n_rt)), dim3(kSide, kSide), stream, q);
    cuda::launch(concat_grad_p_kernel<A, T>, dim3(static_cast<unsigned>(n_rt), n_hc), kThreads, stream, a);
    cuda::launch(concat_grad_q_kernel<A, T>, dim3(static_cast<unsigned>(n_ct), n_hc), kThreads, stream, a);
  }
}

// ---------------------------------------------------------------------------
// Entry points
// ---------------------------------------------------------------------------

template <typename T>
ConcatParams<T> concat_params(const Tensor& P, const Tensor& Q, const Tensor& w2, const Tensor& b2) {
  return ConcatParams<T>{P.data_ptr<T>(), Q.data_ptr<T>(), w2.data_ptr<T>(), b2.data_ptr<T>(),
                         P.size(0),       Q.size(0),       P.size(1)};
}

Tensor5 concat_score_reduce_forward_cuda(const Tensor& P,    // (K, H) = u Wu^T + b1, anchors
                                         const Tensor& Q,    // (M, H) = v Wv^T, candidates
                                         const Tensor& w2,   // (H,) output weights
                                         const Tensor& b2,   // one element, output bias
                                         int64_t activation,  // Activation code
                                         int64_t pos_offset,  // positive of row i at column i + pos_offset
                                         int64_t reductions,  // bit mask of Reduction
                                         double clamp_tau) {  // clamp of kNegClampLse
  check_concat_args(P, Q, w2, b2, activation, pos_offset, reductions, clamp_tau);
  const cuda::DeviceGuard guard(P.device());
  const auto acc = acc_dtype(P.scalar_type());
  const Tensor Pc = as_acc(P, acc), Qc = as_acc(Q, acc), wc = as_acc(w2, acc);
  // NB: b2 stays on the device (read through a pointer): no .item() sync.
  const Tensor bc = scalar_acc(b2, acc);
  Tensor5 out = alloc_reductions(P, Pc.size(0), Qc.size(0), reductions);
  const auto opts = Pc.options();
  const cudaStream_t stream = cuda::current_stream();
  AT_DISPATCH_FLOATING_TYPES(acc, "concat_score_reduce_forward_cuda", [&] {
    const ConcatParams<scalar_t> d = concat_params<scalar_t>(Pc, Qc, wc, bc);
    dispatch_activation(activation, [&](auto act) {
      constexpr int64_t A = decltype(act)::value;
      forward_impl<A, scalar_t>(d, static_cast<scalar_t>(clamp_tau), pos_offset, reductions, out, opts, stream);
    });
  });
  return out;
}

Tensor4 concat_score_reduce_backward_cuda(const Tensor& grad_row_lse,    // (K,) or (0,)
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
  check_concat_backward_args(grad_row_lse, grad_col_lse, grad_neg_lse, grad_clamp_lse, grad_softplus, P, Q, row_lse, col_lse, neg_lse, clamp_lse, reductions);
  const cuda::DeviceGuard guard(P.device());
  const auto acc = acc_dtype(P.scalar_type());
  const Tensor Pc = as_acc(P, acc), Qc = as_acc(Q, acc), wc = as_acc(w2, acc);
  const Tensor bc = scalar_acc(b2, acc);
  const auto c = [acc](const Tensor& t) { return as_acc(t, acc); };
  const GradTensors g{c(grad_row_lse), c(grad_col_lse), c(grad_neg_lse), c(grad_clamp_lse), c(grad_softplus),
                      c(row_lse),      c(col_lse),      c(neg_lse),      c(clamp_lse)};
  const int64_t active = active_grads(reductions, g.g_row, g.g_col, g.g_neg, g.g_clamp, g.g_sp);
  const int64_t K = Pc.size(0), M = Qc.size(0), H = Pc.size(1);
  const auto opts = Pc.options();
  Tensor dP = at::zeros({K, H}, opts), dQ = at::zeros({M, H}, opts);
  Tensor dw2 = at::zeros({H}, opts), db2 = at::zeros({}, opts);
  if (active) {
    const cudaStream_t stream = cuda::current_stream();
    Tensor dw_part, gsum;
    AT_DISPATCH_FLOATING_TYPES(acc, "concat_score_reduce_backward_cuda", [&] {
      const ConcatParams<scalar_t> d = concat_params<scalar_t>(Pc, Qc, wc, bc);
      dispatch_activation(activation, [&](auto act) {
        constexpr int64_t A = decltype(act)::value;
        backward_impl<A, scalar_t>(d, static_cast<scalar_t>(clamp_tau), pos_offset, active, g, dP, dQ, dw_part,
                                   gsum, opts, stream);
      });
    });
    // NB: torch's reductions run on the current stream and are deterministic.
    dw2 = at::sum(dw_part, {0});
    db2 = at::sum(gsum);  // d b2 = sum_ij G_ij, on the device (no host sync)
  }
  return Tensor4{dP.to(P.scalar_type()), dQ.to(Q.scalar_type()), dw2.to(w2.scalar_type()),
                 db2.to(b2.scalar_type()).reshape(b2.sizes())};
}

}  // namespace

INFOMAX_CUDA_LIBRARY_IMPL(m) {
  m.impl("concat_score_reduce", &concat_score_reduce_forward_cuda);
  m.impl("_concat_score_reduce_backward", &concat_score_reduce_backward_cuda);
}

}  // namespace infomax_ext
