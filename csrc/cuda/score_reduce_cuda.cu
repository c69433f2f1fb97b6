// CUDA walker of the fused score reductions.
//
// S = scale * A B^T + row_bias + col_bias (K x M) is never held whole. The rows
// are walked in chunks of R rows and, only when M is huge, the columns in
// chunks of C columns, with R * C bounded (cuda::workspace_bytes(): up to 1 GiB of
// scores, from the free device memory; INFOMAX_EXT_CUDA_TILE_BYTES overrides it so
// tests can walk many small tiles).
// Per chunk:
//   forward:  cuBLAS writes the chunk of dot products <a_i, b_j> (at::mm_out on
//             the current stream); an epilogue kernel (a block per row) folds each
//             row into running log-sum-exp states, and a column kernel folds the
//             chunk's columns into running column states, merged across row chunks
//             in log space (lse_merge).
//   backward: cuBLAS recomputes the chunk; a kernel (a block per row) overwrites
//             it with G = dL/dS (score_grad) and sums its rows; the column kernel
//             sums its columns; two more cuBLAS calls accumulate dA += G B and
//             dB += G^T A. dscale = sum_i <(G B)_i, a_i> once at the end.
// Extra memory: the chunk workspace, O(K + M) statistics and the O((K + M) d)
// gradients -- never O(K * M) when K * M is large.
//
// NB: why a cuBLAS tile plus epilogue kernels by default, not one kernel holding tiles
// in shared memory/registers (flash-attention style): the GEMMs of K x M x d are the
// floor of this op, and cuBLAS runs them near peak for every dtype, arch and d, with
// tensor cores for fp16/bf16 (and TF32 when the user enables it); the epilogues are
// memory-bound passes over a chunk streamed from HBM (a chunk is far larger than L2).
// For fp16/bf16 the fused alternative exists: the tile path (score_tiles.cuh, chosen
// with INFOMAX_EXT_CUDA_TILE_KERNELS=1) makes and folds S in shared memory with a
// hand-written tensor-core GEMM, saving the float32 passes over S at the price of
// making S twice. It stays opt-in until GPU timings say where it wins. The math is
// the same either way (score_math.h).
//
// Precision (NB): every score and statistic is in float32 (float64 for float64
// inputs). float32/float64 inputs are multiplied in their dtype. fp16/bf16 inputs
// are NOT upcast: their GEMMs run on tensor cores with float32 accumulation and
// float32 output (at::mm with out_dtype, torch >= 2.8), so S is as exact as with
// upcast inputs. In backward, G is computed in float32 and stored in the input's
// dtype for the two G GEMMs (as flash-attention stores dS), which accumulate in
// float32 into dA and dB; drow and dcol are sums of the float32 G. bf16 has float32's
// range and stores G as is. fp16 does not: entries of G (softmax weights times upstream
// gradients, down to ~1/(K M) for a mean loss) fall below fp16's normal range (6e-5)
// already at moderate K * M, so G is stored as sigma G, sigma a power of two (exact)
// chosen once per walk on the device from the upstream gradients, which bound |G|
// (sigma * bound < 2^14, a quarter of fp16's max), and dA, dB are divided by sigma
// after the walk (fp16_g_scales). symmetric_softmax_mean's weights (<= 1) are stored
// the same way with sigma = 2^14.
// On torch < 2.8 (no out_dtype GEMM) low-precision inputs are upcast once to
// float32 (O((K + M) d) memory) and everything runs in float32.
//
// The per-element math (log-space merges with the -inf guards, softplus,
// dL/dS) lives in csrc/include/infomax_ext/score_math.h, shared with the CPU walker.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>
#include <torch/version.h>

#include <algorithm>
#include <cstdlib>
#include <type_traits>

#include "../score_reduce_common.h"
#include "cuda_common.cuh"
#include "score_tiles.cuh"

namespace infomax_ext {
namespace {

using cuda::as_states;
using cuda::ceil_div;
using cuda::ptr_or_null;
using cuda::warp_sum;

constexpr int64_t kMinTileRows = 1024;  // rows per chunk when M forces column chunks (GEMM height, row-kernel blocks)
constexpr int kRowThreads = 256;       // block of the per-row kernels (a multiple of 32)
constexpr int kColX = 32;              // columns per block of the column kernel
constexpr int kColY = 8;               // threads per column in that block
constexpr int64_t kColRowsPerBlock = 256;
constexpr int kUnroll = 4;             // loads in flight per thread in the row kernels

// ---------------------------------------------------------------------------
// Tiling
// ---------------------------------------------------------------------------


struct Tiling {
  int64_t rows, cols;  // chunk extent: rows of S (<= K) x columns of S (<= M)
};

Tiling choose_tiling(int64_t K, int64_t M, int64_t elem_bytes) {
  // NB: at most 2^30 elements so grid sizes and int math on chunk extents stay small.
  const int64_t elems = std::min<int64_t>(int64_t(1) << 30, std::max<int64_t>(1, cuda::workspace_bytes() / elem_bytes));
  const int64_t min_rows = std::min(K, kMinTileRows);
  const int64_t cols = std::min(M, std::max<int64_t>(1, elems / min_rows));
  const int64_t rows = std::min(K, std::max<int64_t>(1, elems / cols));
  return {rows, cols};
}


// out (rows x cols, accumulation dtype) = x @ y. fp16/bf16 x, y: tensor cores,
// float32 accumulation and output.
void mm_acc(Tensor& out, const Tensor& x, const Tensor& y) {
  if (x.scalar_type() == out.scalar_type()) {
    at::mm_out(out, x, y);
  } else {
#if INFOMAX_MM_OUT_DTYPE
    cuda::mm_out_dtype(out, x, y);
#else
    TORCH_INTERNAL_ASSERT(false, "score_reduce: mixed-dtype GEMM needs torch >= 2.8");
#endif
  }
}

// acc += x @ y (acc in the accumulation dtype, x and y possibly fp16/bf16).
void addmm_acc(Tensor acc, const Tensor& x, const Tensor& y) {
  if (x.scalar_type() == acc.scalar_type()) {
    acc.addmm_(x, y);
  } else {
#if INFOMAX_MM_OUT_DTYPE
    cuda::addmm_out_dtype(acc, x, y);
#else
    TORCH_INTERNAL_ASSERT(false, "score_reduce: mixed-dtype GEMM needs torch >= 2.8");
#endif
  }
}

// Walks S in the chunks of tiling t: for each, cuBLAS writes the dot products
// <a_i, b_j> of rows [i0, i0 + rows) x columns [j0, j0 + cols) into the workspace ws
// and fn(S, i0, rows, j0, cols) consumes them (S: a rows x cols view of ws).
template <typename Fn>
void for_each_dot_chunk(const Tensor& A, const Tensor& B, const Tiling& t, Tensor& ws, Fn fn) {
  const int64_t K = A.size(0), M = B.size(0);
  for (int64_t i0 = 0; i0 < K; i0 += t.rows) {
    const int64_t rows = std::min(t.rows, K - i0);
    for (int64_t j0 = 0; j0 < M; j0 += t.cols) {
      const int64_t cols = std::min(t.cols, M - j0);
      Tensor S = ws.narrow(0, 0, rows * cols).view({rows, cols});
      mm_acc(S, A.narrow(0, i0, rows), B.narrow(0, j0, cols).t());
      fn(S, i0, rows, j0, cols);
    }
  }
}

// ---------------------------------------------------------------------------
// Block and warp reductions
// ---------------------------------------------------------------------------

template <typename T>
__device__ __forceinline__ LseState<T> warp_merge(LseState<T> s) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const LseState<T> t{__shfl_xor_sync(0xffffffffu, s.max, o), __shfl_xor_sync(0xffffffffu, s.sum, o)};
    s = lse_merge(s, t);
  }
  return s;
}


// Merges the states and sums of all threads of the block; the result is valid in thread 0.
template <typename T>
__device__ void block_reduce(LseState<T>& x, LseState<T>& y, T& z) {
  __shared__ LseState<T> sx[kRowThreads / 32], sy[kRowThreads / 32];
  __shared__ T sz[kRowThreads / 32];
  x = warp_merge(x);
  y = warp_merge(y);
  z = warp_sum(z);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
  if (lane == 0) {
    sx[warp] = x;
    sy[warp] = y;
    sz[warp] = z;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    // NB: fixed merge order: reruns are bitwise identical.
    for (int w = 1; w < n_warps; ++w) {
      x = lse_merge(x, sx[w]);
      y = lse_merge(y, sy[w]);
      z += sz[w];
    }
  }
}

template <typename T>
__device__ T block_sum(T z) {
  __shared__ T sz[kRowThreads / 32];
  z = warp_sum(z);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
  if (lane == 0) sz[warp] = z;
  __syncthreads();
  if (threadIdx.x == 0)
    for (int w = 1; w < n_warps; ++w) z += sz[w];
  return z;
}

// ---------------------------------------------------------------------------
// Forward epilogues
// ---------------------------------------------------------------------------

template <typename T>
struct ScoreArgs {
  const T* scale;     // one element, on the device (no host sync to read it)
  const T* row_bias;  // (K,) or nullptr
  const T* col_bias;  // (M,) or nullptr
};

template <typename T>
struct RowForwardArgs {
  const T* dot;       // chunk of <a_i, b_j>: rows [i0, i0 + gridDim.x), columns [j0, j0 + cols), row-major
  int64_t cols, i0, j0;
  ScoreArgs<T> sc;
  T tau;
  int64_t pos_offset, reductions;
  bool first, last;   // first / last column chunk of these rows
  // Running per-row states across column chunks; nullptr when one chunk spans all M columns.
  LseState<T>* neg_state;
  LseState<T>* clamp_state;
  T* sp_state;
  T* pos_state;
  T *row_out, *neg_out, *clamp_out, *sp_out;  // (K,) or nullptr when not requested
};

// A row of a chunk, a block of threads on it: f(c, dot) for each column c of the thread
// (c = threadIdx.x + k blockDim.x, in order), kUnroll loads in flight ahead of their use.
template <typename T, typename F>
__device__ __forceinline__ void for_each_dot(const T* row, int64_t cols, F f) {
  const int64_t stride = blockDim.x;
  for (int64_t c0 = threadIdx.x; c0 < cols; c0 += kUnroll * stride) {
    T v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t c = c0 + u * stride;
      v[u] = c < cols ? row[c] : T(0);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t c = c0 + u * stride;
      if (c >= cols) break;
      f(c, v[u]);
    }
  }
}

// A block per row of the chunk: logsumexp over the negatives (and with the
// positive, the row logsumexp), over the clamped negatives, and the sum of
// softplus over the negatives, merged with the states of earlier column chunks.
template <typename T>
__global__ void row_forward_kernel(const RowForwardArgs<T> p) {
  __shared__ T s_pos;
  const int64_t r = blockIdx.x, i = p.i0 + r;
  const T* row = p.dot + r * p.cols;
  const T scale = *p.sc.scale;
  const T rb = p.sc.row_bias ? p.sc.row_bias[i] : T(0);
  const int64_t pc = i + p.pos_offset - p.j0;  // the positive's column in this chunk
  const bool has_pos = pc >= 0 && pc < p.cols;
  const bool need_neg = p.reductions & (kRowLse | kNegLse);
  const bool need_clamp = p.reductions & kNegClampLse;
  const bool need_sp = p.reductions & kNegSoftplus;

  LseState<T> neg = lse_empty<T>(), clamp = lse_empty<T>();
  T sp = T(0);
  for_each_dot(row, p.cols, [&](int64_t c, T dot) {
    const T s = score_from_dot(dot, scale, rb, p.sc.col_bias ? p.sc.col_bias[p.j0 + c] : T(0));
    if (c == pc) {
      s_pos = s;  // NB: the positive is excluded from every neg_* reduction.
      return;
    }
    if (need_neg) neg = lse_push(neg, s);
    if (need_clamp) clamp = lse_push(clamp, clamp_tau(s, p.tau));
    if (need_sp) sp += softplus(s);
  });
  block_reduce(neg, clamp, sp);  // contains the __syncthreads that publishes s_pos
  if (threadIdx.x != 0) return;

  if (!p.first) {
    // NB: log-space merge with the states of the earlier column chunks of this row.
    if (need_neg) neg = lse_merge(p.neg_state[i], neg);
    if (need_clamp) clamp = lse_merge(p.clamp_state[i], clamp);
    if (need_sp) sp = p.sp_state[i] + sp;
  }
  if (p.last) {
    const T pos = (p.reductions & kRowLse) ? (has_pos ? s_pos : p.pos_state[i]) : T(0);
    finalize_row(i, p.reductions, neg, clamp, sp, pos, p.row_out, p.neg_out, p.clamp_out, p.sp_out);
  } else {
    if (need_neg) p.neg_state[i] = neg;
    if (need_clamp) p.clamp_state[i] = clamp;
    if (need_sp) p.sp_state[i] = sp;
    if (has_pos && p.pos_state) p.pos_state[i] = s_pos;
  }
}

// Partial column reductions of a chunk: block (kColX, kColY) covers kColX columns
// and rows [blockIdx.y * rows_per_block, ...). kSum: plain sums of x (backward: G);
// otherwise the log-sum-exp state of the scores built from x (forward: dots).
// Writes part[blockIdx.y * cols + c].
template <typename T, typename TIn, bool kSum>
__global__ void col_partial_kernel(const TIn* x, int64_t rows, int64_t cols, int64_t rows_per_block,
                                   int64_t i0, int64_t j0, ScoreArgs<T> sc, LseState<T>* part) {
  __shared__ LseState<T> sh[kColY][kColX];
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kColX + threadIdx.x;
  const int64_t r_begin = static_cast<int64_t>(blockIdx.y) * rows_per_block;
  const int64_t r_end = std::min(rows, r_begin + rows_per_block);
  LseState<T> st = kSum ? LseState<T>{T(0), T(0)} : lse_empty<T>();
  if (c < cols) {
    const T scale = kSum ? T(0) : *sc.scale;
    const T cb = (!kSum && sc.col_bias) ? sc.col_bias[j0 + c] : T(0);
#pragma unroll 4
    for (int64_t r = r_begin + threadIdx.y; r < r_end; r += kColY) {
      const T v = static_cast<T>(x[r * cols + c]);
      if constexpr (kSum) {
        st.sum += v;
      } else {
        const T rb = sc.row_bias ? sc.row_bias[i0 + r] : T(0);
        st = lse_push(st, score_from_dot(v, scale, rb, cb));
      }
    }
  }
  sh[threadIdx.y][threadIdx.x] = st;
  __syncthreads();
  if (threadIdx.y != 0 || c >= cols) return;
  for (int y = 1; y < kColY; ++y) {
    if constexpr (kSum) {
      st.sum += sh[y][threadIdx.x].sum;
    } else {
      st = lse_merge(st, sh[y][threadIdx.x]);
    }
  }
  part[static_cast<int64_t>(blockIdx.y) * cols + c] = st;
}

// Folds the ny partials of each column of the chunk, in a fixed order, into the
// running column statistics. kSum: out[j] += sum (out zero-initialised).
// Otherwise: merged in log space with state[j] (unless first), finalised into
// out[j] on the last row chunk, stored back to state[j] before that.
template <typename T, bool kSum>
__global__ void col_finish_kernel(const LseState<T>* part, int64_t ny, int64_t cols, int64_t j0,
                                  bool first, bool last, LseState<T>* state, T* out) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= cols) return;
  const int64_t j = j0 + c;
  if constexpr (kSum) {
    T acc = T(0);
    for (int64_t y = 0; y < ny; ++y) acc += part[y * cols + c].sum;
    out[j] += acc;
  } else {
    LseState<T> st = first ? lse_empty<T>() : state[j];
    for (int64_t y = 0; y < ny; ++y) st = lse_merge(st, part[y * cols + c]);
    if (last) {
      out[j] = lse_finalize(st);
    } else {
      state[j] = st;
    }
  }
}

// Launches the column reduction of a rows x cols chunk x (row-major).
template <typename T, typename TIn, bool kSum>
void reduce_columns(const TIn* x, int64_t rows, int64_t cols, int64_t i0, int64_t j0,
                    const ScoreArgs<T>& sc, LseState<T>* part, bool first, bool last,
                    LseState<T>* state, T* out, cudaStream_t stream) {
  // NB: grid.y <= 65535; a block covers at least kColRowsPerBlock rows.
  const int64_t rows_per_block = std::max(kColRowsPerBlock, ceil_div(rows, 65535));
  const int64_t ny = ceil_div(rows, rows_per_block);
  const dim3 grid(static_cast<unsigned>(ceil_div(cols, kColX)), static_cast<unsigned>(ny));
  cuda::launch(col_partial_kernel<T, TIn, kSum>, grid, dim3(kColX, kColY), stream, x, rows, cols, rows_per_block, i0, j0, sc, part);
  cuda::launch(col_finish_kernel<T, kSum>, static_cast<unsigned>(ceil_div(cols, 256)), 256, stream, part, ny, cols, j0, first, last, state, out);
}

// An upper bound of reduce_columns' ny for every chunk of at most `rows` rows.
int64_t col_partials(int64_t rows) { return std::min<int64_t>(65535, ceil_div(rows, kColRowsPerBlock)); }

int row_threads(int64_t cols) {
  // Whole warps, at most kRowThreads, no more than the columns need.
  return static_cast<int>(std::min<int64_t>(kRowThreads, std::max<int64_t>(32, ceil_div(cols, 32) * 32)));
}



// The row kernel's arguments for one walk writing the requested row outputs of
// `out`; the per-chunk fields and the running states are set by the walk.
template <typename T>
RowForwardArgs<T> row_forward_args(const ScoreArgs<T>& sc, T tau, int64_t pos_offset, int64_t red,
                                   const Tensor5& out) {
  RowForwardArgs<T> p{};
  p.sc = sc;
  p.tau = tau;
  p.pos_offset = pos_offset;
  p.reductions = red;
  p.row_out = ptr_or_null<T>(std::get<0>(out));
  p.neg_out = ptr_or_null<T>(std::get<2>(out));
  p.clamp_out = ptr_or_null<T>(std::get<3>(out));
  p.sp_out = ptr_or_null<T>(std::get<4>(out));
  return p;
}

// The upstream gradients and the forward's statistics that both gradient walks read
// (row_grad_at; nullptr where inactive), into GradArgs or TileGradArgs.
template <typename T, typename Args>
void set_grad_inputs(Args& p, const Tensor5& grads, const Tensor& row_lse, const Tensor& col_lse,
                     const Tensor& neg_lse, const Tensor& clamp_lse) {
  p.g_row = ptr_or_null<T>(std::get<0>(grads));
  p.g_col = ptr_or_null<T>(std::get<1>(grads));
  p.g_neg = ptr_or_null<T>(std::get<2>(grads));
  p.g_clamp = ptr_or_null<T>(std::get<3>(grads));
  p.g_sp = ptr_or_null<T>(std::get<4>(grads));
  p.row_lse = ptr_or_null<T>(row_lse);
  p.col_lse = ptr_or_null<T>(col_lse);
  p.neg_lse = ptr_or_null<T>(neg_lse);
  p.clamp_lse = ptr_or_null<T>(clamp_lse);
}

// ---------------------------------------------------------------------------
// The tile path (score_tiles.cuh): fp16/bf16 scores made and folded on chip
// ---------------------------------------------------------------------------

// Whether the tile kernels walk S: fp16/bf16 GEMM operands (the tensor-core path), chosen
// with INFOMAX_EXT_CUDA_TILE_KERNELS=1 (read per call, like the workspace budget), on a
// GPU with bf16 tensor cores. NB: off by default until GPU timings show where it wins:
// the chunk path's GEMMs are cuBLAS's; the tile path moves a third of the bytes but
// makes S twice with a hand-written GEMM (see score_tiles.cuh).
bool use_tile_kernels(at::ScalarType t) {
  if (!INFOMAX_MM_OUT_DTYPE || (t != at::kHalf && t != at::kBFloat16)) return false;
  const char* env = std::getenv("INFOMAX_EXT_CUDA_TILE_KERNELS");
  return env && env[0] == '1' && env[1] == '\0' && cuda::has_bf16_tensor_cores();
}

// Dynamic shared memory of a tile block: A's resident rows, or two of its slabs.
template <typename TIn>
int64_t tile_smem_bytes(const TileOperands& op) {
  return kTileRows * int64_t(op.a_ld) * int64_t(sizeof(TIn)) * (op.a_resident ? 1 : 2);
}

// The operands of a tile launch over rows [i0, i0 + rows); tiles_per_split spreads the
// column tiles over enough blocks to fill the device (two per SM) when K is small.
// NB: A's rows stay in shared memory for the whole column walk only when two blocks
// still fit on an SM (1 KiB of each block's shared memory is the system's): fewer
// warps per SM would leave the loads' latency uncovered.
template <typename TIn>
TileOperands tile_operands(const Tensor& A, const Tensor& B, const ScoreArgs<float>& sc, int64_t i0,
                           int64_t rows) {
  const int64_t M = B.size(0), d = A.size(1);
  const int64_t row_blocks = ceil_div(rows, kTileRows), col_tiles = ceil_div(M, kTileRows);
  const int64_t want = std::clamp<int64_t>(ceil_div(2 * cuda::sm_count(), row_blocks), 1, std::min<int64_t>(col_tiles, 65535));
  const auto aligned = [](const Tensor& x) { return reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0; };
  TileOperands op{A.data_ptr(), B.data_ptr(),
                  A.size(0), M, d, i0, rows, ceil_div(col_tiles, want),
                  d % 8 == 0 && aligned(A) && aligned(B),
                  true, static_cast<int>(ceil_div(d, kTileDepth) * kTileDepth + 8),  // + 8: as kTileLd
                  sc.scale, sc.row_bias, sc.col_bias};
  const int64_t block_bytes = int64_t(sizeof(TileSmem<TIn>)) + tile_smem_bytes<TIn>(op);
  if (block_bytes > cuda::smem_per_block() || 2 * (block_bytes + 1024) > cuda::smem_per_sm()) {
    op.a_resident = false;
    op.a_ld = kTileLd;
  }
  return op;
}

dim3 tile_grid(const TileOperands& op) {
  return dim3(static_cast<unsigned>(ceil_div(op.rows, kTileRows)),
              static_cast<unsigned>(ceil_div(ceil_div(op.M, kTileRows), op.tiles_per_split)));
}

// Rows per tile launch: all of them, unless per-block column partials (rows / 64 x M of
// them, `bytes` each) would pass the workspace budget.
int64_t tile_launch_rows(int64_t K, int64_t M, int64_t bytes) {
  const int64_t blocks = std::max<int64_t>(1, cuda::workspace_bytes() / (M * bytes));
  return std::min(K, blocks * kTileRows);
}

// score_reduce's forward on the tile path (H: at::Half or at::BFloat16, A's dtype).
template <typename H>
void tile_forward(const Tensor& A, const Tensor& B, const ScoreArgs<float>& sc, float tau, int64_t pos_offset,
                  int64_t red, Tensor5& out) {
  using TIn = typename cuda::DeviceHalf<H>::type;
  const int64_t K = A.size(0), M = B.size(0);
  const bool row_red = red & (kRowLse | kNegLse | kNegClampLse | kNegSoftplus);
  const bool col_red = red & kColLse;
  const int64_t launch_rows = col_red ? tile_launch_rows(K, M, sizeof(LseState<float>)) : K;
  const auto opts = A.options().dtype(at::kFloat);
  const TileOperands first = tile_operands<TIn>(A, B, sc, 0, launch_rows);
  const int64_t max_splits = tile_grid(first).y;
  const auto states = [&](bool on) { return on ? at::empty({max_splits * launch_rows, 2}, opts) : Tensor(); };
  const Tensor neg_part = states(red & (kRowLse | kNegLse)), clamp_part = states(red & kNegClampLse);
  const Tensor sp_part = (red & kNegSoftplus) ? at::empty({max_splits * launch_rows}, opts) : Tensor();
  const Tensor pos = (red & kRowLse) ? at::empty({launch_rows}, opts) : Tensor();
  const Tensor col_part = col_red ? at::empty({ceil_div(launch_rows, kTileRows) * M, 2}, opts) : Tensor();
  const Tensor col_state = (col_red && launch_rows < K) ? at::empty({M, 2}, opts) : Tensor();
  const cudaStream_t stream = cuda::current_stream();
  for (int64_t i0 = 0; i0 < K; i0 += launch_rows) {
    const int64_t rows = std::min(launch_rows, K - i0);
    TileForwardArgs p{};
    p.op = tile_operands<TIn>(A, B, sc, i0, rows);
    p.tau = tau;
    p.pos_offset = pos_offset;
    p.reductions = red;
    p.neg_part = as_states<float>(neg_part);
    p.clamp_part = as_states<float>(clamp_part);
    p.sp_part = ptr_or_null<float>(sp_part);
    p.pos = ptr_or_null<float>(pos);
    p.col_part = as_states<float>(col_part);
    const dim3 grid = tile_grid(p.op);
    cuda::launch_smem(tile_forward_kernel<TIn>, grid, kTileThreads, tile_smem_bytes<TIn>(p.op), stream, p);
    if (row_red)
      cuda::launch(tile_row_finish_kernel, static_cast<unsigned>(ceil_div(rows, 256)), 256, stream, p,
                   static_cast<int64_t>(grid.y), ptr_or_null<float>(std::get<0>(out)),
                   ptr_or_null<float>(std::get<2>(out)), ptr_or_null<float>(std::get<3>(out)),
                   ptr_or_null<float>(std::get<4>(out)));
    if (col_red)
      cuda::launch(col_finish_kernel<float, false>, static_cast<unsigned>(ceil_div(M, 256)), 256, stream,
                   p.col_part, static_cast<int64_t>(grid.x), M, int64_t(0), i0 == 0, i0 + rows == K,
                   as_states<float>(col_state), ptr_or_null<float>(std::get<1>(out)));
  }
}

// The backward walk on the tile path: per chunk of rows (G in TG within the workspace
// budget), G and its row (and column) sums from tile_grad_kernel, then the two G GEMMs.
// Arguments as backward_impl's.
template <typename TG>
void tile_backward(const Tensor& A, const Tensor& B, const ScoreArgs<float>& sc, float tau, int64_t pos_offset,
                   int64_t active, const Tensor5& grads, const Tensor& row_lse, const Tensor& col_lse,
                   const Tensor& neg_lse, const Tensor& clamp_lse, Tensor& dA, Tensor& dB, Tensor& drow,
                   Tensor& dcol, bool need_dcol, int64_t needs_grad, const float* g_scale) {
  using TIn = typename cuda::DeviceHalf<TG>::type;
  const int64_t K = A.size(0), M = B.size(0);
  int64_t chunk = std::clamp<int64_t>(cuda::workspace_bytes() / (M * int64_t(sizeof(TG))), 1, K);
  if (need_dcol) chunk = std::min(chunk, tile_launch_rows(K, M, sizeof(float)));
  const auto opts = A.options().dtype(at::kFloat);
  Tensor gws = at::empty({chunk * M}, A.options());
  const int64_t max_splits = tile_grid(tile_operands<TIn>(A, B, sc, 0, chunk)).y;
  Tensor drow_part = at::empty({max_splits * chunk}, opts);
  Tensor dcol_part = need_dcol ? at::empty({ceil_div(chunk, kTileRows) * M}, opts) : Tensor();
  TileGradArgs p{};
  p.tau = tau;
  p.pos_offset = pos_offset;
  p.reductions = active;
  set_grad_inputs<float>(p, grads, row_lse, col_lse, neg_lse, clamp_lse);
  p.g = gws.data_ptr();
  p.g_scale = g_scale;
  p.drow_part = drow_part.data_ptr<float>();
  p.dcol_part = ptr_or_null<float>(dcol_part);
  const cudaStream_t stream = cuda::current_stream();
  for (int64_t i0 = 0; i0 < K; i0 += chunk) {
    const int64_t rows = std::min(chunk, K - i0);
    p.op = tile_operands<TIn>(A, B, sc, i0, rows);
    const dim3 grid = tile_grid(p.op);
    cuda::launch_smem(tile_grad_kernel<TIn, TG>, grid, kTileThreads, tile_smem_bytes<TIn>(p.op), stream, p);
    cuda::launch(tile_row_sums_kernel, static_cast<unsigned>(ceil_div(rows, 256)), 256, stream, p.drow_part,
                 static_cast<int64_t>(grid.y), rows, i0, drow.data_ptr<float>());
    if (need_dcol)
      cuda::launch(tile_col_sums_kernel, static_cast<unsigned>(ceil_div(M, 256)), 256, stream, p.dcol_part,
                   static_cast<int64_t>(grid.x), M, dcol.data_ptr<float>());
    const Tensor G = gws.narrow(0, 0, rows * M).view({rows, M});
    // NB: a GEMM whose gradient nobody needs (a frozen tower) is skipped.
    if (need_dA(needs_grad)) addmm_acc(dA.narrow(0, i0, rows), G, B);
    if (need_dB(needs_grad)) addmm_acc(dB, G.t(), A.narrow(0, i0, rows));
  }
}

// A and B: the GEMM operands (accumulation dtype, or fp16/bf16 for the tensor-core path).
template <typename T>
void forward_impl(const Tensor& A, const Tensor& B, const ScoreArgs<T>& sc, T tau, int64_t pos_offset,
                  int64_t red, Tensor5& out) {
  if constexpr (std::is_same<T, float>::value) {
    if (use_tile_kernels(A.scalar_type())) {
      if (A.scalar_type() == at::kBFloat16) {
        tile_forward<at::BFloat16>(A, B, sc, tau, pos_offset, red, out);
      } else {
        tile_forward<at::Half>(A, B, sc, tau, pos_offset, red, out);
      }
      return;
    }
  }
  const int64_t K = A.size(0), M = B.size(0);
  const Tiling t = choose_tiling(K, M, sizeof(T));
  const int64_t n_row_chunks = ceil_div(K, t.rows), n_col_chunks = ceil_div(M, t.cols);
  const auto opts = A.options().dtype(c10::CppTypeToScalarType<T>::value);
  Tensor ws = at::empty({t.rows * t.cols}, opts);

  const bool row_red = red & (kRowLse | kNegLse | kNegClampLse | kNegSoftplus);
  const bool col_red = red & kColLse;
  // Running states, only when a row (column) spans several chunks.
  Tensor neg_state, clamp_state, sp_state, pos_state, col_state, part;
  if (row_red && n_col_chunks > 1) {
    if (red & (kRowLse | kNegLse)) neg_state = at::empty({K, 2}, opts);
    if (red & kNegClampLse) clamp_state = at::empty({K, 2}, opts);
    if (red & kNegSoftplus) sp_state = at::empty({K}, opts);
    if (red & kRowLse) pos_state = at::empty({K}, opts);
  }
  if (col_red) {
    if (n_row_chunks > 1) col_state = at::empty({M, 2}, opts);
    part = at::empty({col_partials(t.rows) * t.cols, 2}, opts);
  }

  RowForwardArgs<T> p = row_forward_args(sc, tau, pos_offset, red, out);
  p.neg_state = as_states<T>(neg_state);
  p.clamp_state = as_states<T>(clamp_state);
  p.sp_state = ptr_or_null<T>(sp_state);
  p.pos_state = ptr_or_null<T>(pos_state);
  T* col_out = ptr_or_null<T>(std::get<1>(out));
  const cudaStream_t stream = cuda::current_stream();

  for_each_dot_chunk(A, B, t, ws, [&](const Tensor& S, int64_t i0, int64_t rows, int64_t j0, int64_t cols) {
    const T* dot = S.data_ptr<T>();
    if (row_red) {
      p.dot = dot;
      p.cols = cols;
      p.i0 = i0;
      p.j0 = j0;
      p.first = j0 == 0;
      p.last = j0 + cols == M;
      cuda::launch(row_forward_kernel<T>, static_cast<unsigned>(rows), row_threads(cols), stream, p);
    }
    if (col_red) {
      reduce_columns<T, T, false>(dot, rows, cols, i0, j0, sc, as_states<T>(part), i0 == 0,
                                  i0 + rows == K, as_states<T>(col_state), col_out, stream);
    }
  });
}

// ---------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------

template <typename T, typename TG>
struct GradArgs {
  const T* dot;  // chunk of <a_i, b_j>, rows [i0, i0 + gridDim.x), columns [j0, j0 + cols)
  TG* g;         // chunk of G, same layout; may alias dot (then overwritten in place)
  int64_t cols, i0, j0;
  ScoreArgs<T> sc;
  T tau;
  int64_t pos_offset, reductions;  // reductions: the active ones (requested and given a gradient)
  // Upstream gradients and saved statistics, nullptr when inactive.
  const T *g_row, *row_lse, *g_neg, *neg_lse, *g_clamp, *clamp_lse, *g_sp;  // (K,)
  const T *g_col, *col_lse;                                                 // (M,)
  T* drow;  // (K,), zero-initialised, accumulated over column chunks
  T* g_acc;  // G again in the accumulation dtype (over dot), for the column sums; nullptr
             // when G itself is in that dtype or no column sums are needed
  const T* g_scale;  // one element on the device: g holds g_scale * G (fp16); nullptr: G
};

// A block per row of the chunk: G_ij = score_grad(S_ij) written over the chunk,
// and drow_i += sum_j G_ij.
template <typename T, typename TG>
__global__ void grad_rows_kernel(const GradArgs<T, TG> p) {
  const int64_t r = blockIdx.x, i = p.i0 + r;
  const T* row = p.dot + r * p.cols;
  TG* grow = p.g + r * p.cols;
  const T scale = *p.sc.scale;
  const T rb = p.sc.row_bias ? p.sc.row_bias[i] : T(0);
  const T gs = p.g_scale ? *p.g_scale : T(1);  // a power of two: the product is exact
  const RowGrad<T> rg = row_grad_at<T>(p, i);
  const int64_t pc = i + p.pos_offset - p.j0;
  T sum = T(0);
  for_each_dot(row, p.cols, [&](int64_t c, T dot) {
    const int64_t j = p.j0 + c;
    const T s = score_from_dot(dot, scale, rb, p.sc.col_bias ? p.sc.col_bias[j] : T(0));
    const T g = score_grad(s, c == pc, rg, p.g_col ? p.g_col[j] : T(0), p.col_lse ? p.col_lse[j] : T(0), p.tau,
                           p.reductions);
    grow[c] = static_cast<TG>(gs * g);  // NB: this thread read this element already: in-place is safe
    // NB: drow and dcol from the unscaled float32 G even when G is stored in fp16/bf16
    // for the GEMMs.
    if (p.g_acc) p.g_acc[r * p.cols + c] = g;
    sum += g;
  });
  sum = block_sum(sum);
  if (threadIdx.x == 0) p.drow[i] += sum;
}

// A, B: the GEMM operands, also those of the G GEMMs: fp16/bf16 with G in the same
// dtype (TG) on the tensor-core path, else the accumulation dtype T with G in place over
// the scores. g_scale: see GradArgs (the caller divides dA and dB by it afterwards).
template <typename T, typename TG>
void backward_impl(const Tensor& A, const Tensor& B, const ScoreArgs<T>& sc, T tau, int64_t pos_offset,
                   int64_t active, const Tensor5& grads, const Tensor& row_lse, const Tensor& col_lse,
                   const Tensor& neg_lse, const Tensor& clamp_lse, Tensor& dA, Tensor& dB, Tensor& drow,
                   Tensor& dcol, bool need_dcol, int64_t needs_grad, const RowForwardArgs<T>* fold,
                   const T* g_scale) {
  constexpr bool kInPlace = std::is_same<T, TG>::value;
  if constexpr (!kInPlace) {
    // NB: one walk (fold) is the chunk path's alone: score_reduce_with_grad_cuda routes
    // the tile path to the forward then this recomputing backward.
    if (!fold && use_tile_kernels(A.scalar_type())) {
      tile_backward<TG>(A, B, sc, tau, pos_offset, active, grads, row_lse, col_lse, neg_lse, clamp_lse, dA, dB,
                        drow, dcol, need_dcol, needs_grad, g_scale);
      return;
    }
  }
  const int64_t K = A.size(0), M = B.size(0);
  const Tiling t = choose_tiling(K, M, sizeof(T));
  const auto opts = A.options().dtype(c10::CppTypeToScalarType<T>::value);
  Tensor ws = at::empty({t.rows * t.cols}, opts);
  Tensor gws = kInPlace ? ws : at::empty({t.rows * t.cols}, opts.dtype(c10::CppTypeToScalarType<TG>::value));
  // NB: the column sums of G only feed the column bias's gradient: without one (InfoNCE's
  // default) the pass would read all of G once more for nothing.
  Tensor part = need_dcol ? at::empty({col_partials(t.rows) * t.cols, 2}, opts) : Tensor();

  GradArgs<T, TG> p{};
  p.sc = sc;
  p.tau = tau;
  p.pos_offset = pos_offset;
  p.reductions = active;
  set_grad_inputs<T>(p, grads, row_lse, col_lse, neg_lse, clamp_lse);
  p.drow = drow.data_ptr<T>();
  p.g_scale = g_scale;
  T* dcol_p = dcol.data_ptr<T>();
  // NB: with G in fp16/bf16 the column sums read a float32 copy of G written over the dots
  // (the chunk's dots are dead once the gradient kernel has read them).
  p.g_acc = (need_dcol && !kInPlace) ? ws.data_ptr<T>() : nullptr;
  const cudaStream_t stream = cuda::current_stream();

  for_each_dot_chunk(A, B, t, ws, [&](const Tensor& S, int64_t i0, int64_t rows, int64_t j0, int64_t cols) {
    Tensor G = gws.narrow(0, 0, rows * cols).view({rows, cols});
    p.dot = S.data_ptr<T>();
    p.g = reinterpret_cast<TG*>(G.data_ptr());
    p.cols = cols;
    p.i0 = i0;
    p.j0 = j0;
    if (fold) {
      // NB: one walk (the caller made sure a chunk spans whole rows): the chunk's rows
      // are folded first, so their statistics (read by grad_rows_kernel through p's
      // *_lse pointers, the fold's outputs) are final; same stream, so in order.
      RowForwardArgs<T> f = *fold;
      f.dot = p.dot;
      f.cols = cols;
      f.i0 = i0;
      f.j0 = j0;
      f.first = f.last = true;
      cuda::launch(row_forward_kernel<T>, static_cast<unsigned>(rows), row_threads(cols), stream, f);
    }
    cuda::launch(grad_rows_kernel<T, TG>, static_cast<unsigned>(rows), row_threads(cols), stream, p);
    if (need_dcol) {
      const T* g_acc = kInPlace ? reinterpret_cast<const T*>(p.g) : p.g_acc;
      reduce_columns<T, T, true>(g_acc, rows, cols, i0, j0, sc, as_states<T>(part), i0 == 0,
                                 i0 + rows == K, nullptr, dcol_p, stream);  // dcol += G^T 1
    }
    // NB: a GEMM whose gradient nobody needs (a frozen tower) is skipped.
    if (need_dA(needs_grad)) addmm_acc(dA.narrow(0, i0, rows), G, B.narrow(0, j0, cols));  // (G B) rows
    if (need_dB(needs_grad)) addmm_acc(dB.narrow(0, j0, cols), G.t(), A.narrow(0, i0, rows));  // (G^T A) rows
  });
}

// ---------------------------------------------------------------------------
// fp16 G: the power-of-two scale
// ---------------------------------------------------------------------------
//
// NB: why one scale per walk from the upstream gradients, not max|G| per chunk: every
// term of score_grad is an upstream gradient times a weight in [0, 1] (a softmax weight
// exp(S_ij - lse) against the forward's lse, a clamped one, a sigmoid), so
//   |G_ij| <= bound = max_i (|g_row_i| + |g_neg_i| + |g_clamp_i| + |g_softplus_i|) + max_j |g_col_j|,
// known before the walk from O(K + M) numbers. Scaling by sigma with sigma * bound <
// 2^14 (a quarter of fp16's max 65504: room for exp(S - lse) rounding above 1) needs
// no pass over the chunk, so fp16 moves bf16's bytes. A per-chunk max|G| before the cast
// would need G in float32 first: a float32 write, a read for the max, a read and an fp16
// write for the cast, ~12 more bytes per score on a walk that moves ~20 and is
// memory-bound (benchmarks/bench_gpu.py --design-only: K = M = 65536, d = 512, H200);
// and an addmm alpha of 1 / sigma per chunk would need a host sync per chunk. sigma is
// constant over the walk, so the float32 dA and dB (sums of sigma-scaled chunks) are
// divided by sigma once at the end, exactly. What is lost:
// entries below 2^-28 of the bound become fp16 subnormals (absolute error <= 2^-39
// bound each, <= M 2^-39 bound |b| summed over a row of dA: below fp16's own
// rounding of G for any M up to 2^24). A row whose upstream gradient is much smaller
// than the largest one sits lower in fp16's range by that ratio (bf16 has no such
// limit). Non-finite upstream gradients are left out of the bound: the NaN / inf
// entries of G they make stay NaN / inf through sigma and the cast, and the finite rest
// of G keeps its scale.
constexpr int kFp16GTop = 14;  // sigma * bound < 2^kFp16GTop

// |x[i]| if finite, else 0 (also for an absent array); in double: the sum of the
// row's terms cannot overflow.
__device__ __forceinline__ double finite_abs(const float* x, int64_t i) {
  if (!x) return 0.0;
  const double v = x[i] < 0.0f ? -double(x[i]) : double(x[i]);
  return v < INFINITY ? v : 0.0;  // NB: NaN and inf fail the test
}

// One block: out[0] = sigma = 2^k, out[1] = 1 / sigma, k = kFp16GTop - e with bound <
// 2^e, clamped to [-126, 126] so both are normal float32. bound = 0 (every upstream
// gradient zero or non-finite: G is zero, or its entries are NaN / inf): sigma = 1.
__global__ void fp16_g_scale_kernel(const float* g_row, const float* g_neg, const float* g_clamp,
                                    const float* g_sp, int64_t K, const float* g_col, int64_t M, float* out) {
  __shared__ double s_row[kRowThreads], s_col[kRowThreads];
  double row = 0.0, col = 0.0;
  for (int64_t i = threadIdx.x; i < K; i += blockDim.x) {
    const double r = finite_abs(g_row, i) + finite_abs(g_neg, i) + finite_abs(g_clamp, i) + finite_abs(g_sp, i);
    row = r > row ? r : row;
  }
  for (int64_t j = threadIdx.x; j < M; j += blockDim.x) {
    const double c = finite_abs(g_col, j);
    col = c > col ? c : col;
  }
  s_row[threadIdx.x] = row;
  s_col[threadIdx.x] = col;
  __syncthreads();
  if (threadIdx.x != 0) return;
  for (unsigned t = 1; t < blockDim.x; ++t) {
    row = s_row[t] > row ? s_row[t] : row;
    col = s_col[t] > col ? s_col[t] : col;
  }
  const double bound = row + col;
  int e = kFp16GTop;  // bound = 0: k = 0
  if (bound > 0.0) (void)::frexp(bound, &e);  // bound = m 2^e, m in [0.5, 1): bound < 2^e
  const int k = std::min(126, std::max(-126, kFp16GTop - e));
  out[0] = ::ldexpf(1.0f, k);
  out[1] = ::ldexpf(1.0f, -k);
}

// (sigma, 1 / sigma) of a walk's G, float32 on like's device: no host sync.
Tensor fp16_g_scales(const Tensor5& grads, int64_t active, int64_t K, int64_t M, const Tensor& like) {
  Tensor out = at::empty({2}, like.options().dtype(at::kFloat));
  const auto g = [&](const Tensor& t, int64_t bit) { return (active & bit) ? ptr_or_null<float>(t) : nullptr; };
  cuda::launch(fp16_g_scale_kernel, 1, kRowThreads, cuda::current_stream(), g(std::get<0>(grads), kRowLse),
               g(std::get<2>(grads), kNegLse), g(std::get<3>(grads), kNegClampLse),
               g(std::get<4>(grads), kNegSoftplus), K, g(std::get<1>(grads), kColLse), M, out.data_ptr<float>());
  return out;
}

// ---------------------------------------------------------------------------
// Entry points
// ---------------------------------------------------------------------------

bool tensor_core_path(at::ScalarType t) {
  return INFOMAX_MM_OUT_DTYPE && (t == at::kHalf || t == at::kBFloat16);
}

// The GEMM operand for x: fp16/bf16 kept as is on the tensor-core path, else the
// accumulation dtype. NB: detach(): the GEMMs here must not record autograd history.
Tensor gemm_operand(const Tensor& x, at::ScalarType acc) {
  return tensor_core_path(x.scalar_type()) ? x.detach().contiguous() : x.detach().to(acc).contiguous();
}

// Picks the dtype of G from the GEMM operands: fp16/bf16 on the tensor-core path (G in
// that dtype, fp16 scaled), else the accumulation dtype (in place over the chunk of scores).
template <typename T>
void backward_dispatch(const Tensor& A, const Tensor& B, const ScoreArgs<T>& sc, T tau, int64_t pos_offset,
                       int64_t active, const Tensor5& grads, const Tensor& row_lse, const Tensor& col_lse,
                       const Tensor& neg_lse, const Tensor& clamp_lse, Tensor& dA, Tensor& dB, Tensor& drow,
                       Tensor& dcol, bool need_dcol, int64_t needs_grad, const RowForwardArgs<T>* fold = nullptr) {
  if constexpr (std::is_same<T, float>::value) {
    if (A.scalar_type() == at::kBFloat16) {
      // NB: G in bf16 (float32's range, 8 bits of mantissa) for the two G GEMMs on tensor cores.
      backward_impl<float, at::BFloat16>(A, B, sc, tau, pos_offset, active, grads, row_lse, col_lse, neg_lse,
                                         clamp_lse, dA, dB, drow, dcol, need_dcol, needs_grad, fold, nullptr);
      return;
    }
    if (A.scalar_type() == at::kHalf) {
      // NB: G as sigma G in fp16 (11 bits of mantissa, sigma from fp16_g_scales), the two
      // G GEMMs on tensor cores accumulate sigma dA, sigma dB in float32; divided here
      // (exact: a power of two; a pass over dA and dB, O((K + M) d), on the device).
      const Tensor scales = fp16_g_scales(grads, active, A.size(0), B.size(0), A);
      backward_impl<float, at::Half>(A, B, sc, tau, pos_offset, active, grads, row_lse, col_lse, neg_lse,
                                     clamp_lse, dA, dB, drow, dcol, need_dcol, needs_grad, fold,
                                     scales.data_ptr<float>());
      const Tensor inv = scales.select(0, 1);
      if (need_dA(needs_grad)) dA.mul_(inv);
      if (need_dB(needs_grad)) dB.mul_(inv);
      return;
    }
  }
  backward_impl<T, T>(A, B, sc, tau, pos_offset, active, grads, row_lse, col_lse, neg_lse, clamp_lse, dA, dB,
                      drow, dcol, need_dcol, needs_grad, fold, nullptr);
}

Tensor5 score_reduce_forward_cuda(const Tensor& a,            // (K, d) anchors
                                  const Tensor& b,            // (M, d) candidates
                                  const Tensor& scale,        // one element
                                  const OptTensor& row_bias,  // (K,) or None
                                  const OptTensor& col_bias,  // (M,) or None
                                  int64_t pos_offset,         // positive of row i at column i + pos_offset
                                  int64_t reductions,         // bit mask of Reduction
                                  double clamp_tau) {         // clamp of kNegClampLse
  check_score_reduce_args(a, b, scale, row_bias, col_bias, pos_offset, reductions, clamp_tau);
  const cuda::DeviceGuard guard(a.device());
  const auto acc = acc_dtype(a.scalar_type());
  const Tensor A = gemm_operand(a, acc), B = gemm_operand(b, acc);
  const Tensor rb = bias_acc(row_bias, acc), cb = bias_acc(col_bias, acc);
  // NB: scale stays on the device (kernels read it through a pointer): no .item() sync.
  const Tensor sc = scalar_acc(scale, acc);
  Tensor5 out = alloc_reductions(a, A.size(0), B.size(0), reductions);
  AT_DISPATCH_FLOATING_TYPES(acc, "score_reduce_forward_cuda", [&] {
    const ScoreArgs<scalar_t> args{sc.data_ptr<scalar_t>(), ptr_or_null<scalar_t>(rb), ptr_or_null<scalar_t>(cb)};
    forward_impl<scalar_t>(A, B, args, static_cast<scalar_t>(clamp_tau), pos_offset, reductions, out);
  });
  return out;
}

// The gradients of a walk's unscaled dA = G B, dB = G^T A: d scale = sum_ij G_ij
// <a_i, b_j> = sum_i <(G B)_i, a_i> on the device (no host sync), summed in float64
// like the CPU walker; then dA, dB scaled; all in the dtypes of the inputs, or dA and dB
// in the accumulation dtype with keep_acc (the caller adds to them before one cast).
Tensor5 finish_grads(Tensor& dA, Tensor& dB, const Tensor& drow, const Tensor& dcol, const Tensor& A,
                     const Tensor& sc, bool active, const Tensor& a, const Tensor& b, const Tensor& scale,
                     const OptTensor& row_bias, const OptTensor& col_bias, int64_t needs_grad,
                     bool keep_acc = false) {
  Tensor dscale = at::zeros({}, dA.options());
  if (active) {
    if (needs_grad & kNeedScale) dscale = at::sum(at::mul(dA, A), at::kDouble);
    dA.mul_(sc);  // NB: sc is a one-element device tensor: broadcast, no sync
    dB.mul_(sc);
  }
  const auto acc = dA.scalar_type();
  return Tensor5{keep_acc ? dA : dA.to(a.scalar_type()), keep_acc ? dB : dB.to(b.scalar_type()),
                 dscale.to(scale.scalar_type()).reshape(scale.sizes()),
                 drow.to(has(row_bias) ? row_bias->scalar_type() : acc),
                 dcol.to(has(col_bias) ? col_bias->scalar_type() : acc)};
}

Tensor5 score_reduce_backward_cuda(const Tensor& grad_row_lse,    // (K,) or (0,)
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
  check_score_reduce_backward_args(grad_row_lse, grad_col_lse, grad_neg_lse, grad_clamp_lse, grad_softplus, a, b, row_lse, col_lse, neg_lse, clamp_lse, reductions);
  const cuda::DeviceGuard guard(a.device());
  const auto acc = acc_dtype(a.scalar_type());
  const Tensor A = gemm_operand(a, acc), B = gemm_operand(b, acc);
  const Tensor rb = bias_acc(row_bias, acc), cb = bias_acc(col_bias, acc);
  const Tensor sc = scalar_acc(scale, acc);
  const auto cont = [acc](const Tensor& t) { return as_acc(t, acc); };
  const Tensor5 grads{cont(grad_row_lse), cont(grad_col_lse), cont(grad_neg_lse), cont(grad_clamp_lse),
                      cont(grad_softplus)};
  const int64_t active = active_grads(reductions, std::get<0>(grads), std::get<1>(grads), std::get<2>(grads),
                                      std::get<3>(grads), std::get<4>(grads));
  const int64_t K = A.size(0), M = B.size(0), d = A.size(1);
  const auto opts = A.options().dtype(acc);
  Tensor dA = at::zeros({K, d}, opts), dB = at::zeros({M, d}, opts);
  Tensor drow = at::zeros({K}, opts), dcol = at::zeros({M}, opts);
  if (active) {
    const Tensor r_lse = cont(row_lse), c_lse = cont(col_lse), n_lse = cont(neg_lse), cl_lse = cont(clamp_lse);
    AT_DISPATCH_FLOATING_TYPES(acc, "score_reduce_backward_cuda", [&] {
      const ScoreArgs<scalar_t> args{sc.data_ptr<scalar_t>(), ptr_or_null<scalar_t>(rb), ptr_or_null<scalar_t>(cb)};
      backward_dispatch<scalar_t>(A, B, args, static_cast<scalar_t>(clamp_tau), pos_offset, active, grads, r_lse,
                                  c_lse, n_lse, cl_lse, dA, dB, drow, dcol, has(col_bias), needs_grad);
    });
  }
  return finish_grads(dA, dB, drow, dcol, A, sc, active, a, b, scale, row_bias, col_bias, needs_grad, keep_acc);
}

// ---------------------------------------------------------------------------
// symmetric_softmax_mean
// ---------------------------------------------------------------------------
//
// NB: the GPU takes the plain route: lse from the forward walk above (kNegLse with
// x in both roles and the bias on both sides), then per chunk cuBLAS recomputes the
// dots, softmax_weights_kernel turns them into exp(S_ij - lse_i) (0 on the diagonal)
// in place, and a third GEMM adds W X into mean: three K x K x d GEMMs where the CPU
// walker needs 1.5 (upper half of S, row and column sides with online rescaling).
// Halving S here would need that per-tile column rescaling inside a custom kernel.
// Uniformity's backward is O(K d) either way, against a forward plus a recomputing
// backward (four GEMMs) through score_reduce.

// A block per row of the chunk: w_scale W_ij, W_ij = softmax_weight(S_ij, lse_i), W_ii = 0,
// written to w (over the chunk of dots when TW is T: each thread rewrites only what it read).
template <typename T, typename TW>
__global__ void softmax_weights_kernel(const T* dot, TW* w, int64_t cols, int64_t i0, int64_t j0,
                                       ScoreArgs<T> sc, const T* lse, T w_scale) {
  const int64_t r = blockIdx.x, i = i0 + r;
  const T* row = dot + r * cols;
  TW* wrow = w + r * cols;
  const T scale = *sc.scale;
  const T rb = sc.row_bias ? sc.row_bias[i] : T(0);
  const T l = lse[i];
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
    const int64_t j = j0 + c;
    const T s = score_from_dot(row[c], scale, rb, sc.col_bias ? sc.col_bias[j] : T(0));
    // NB: softmax_weight gives a masked (-inf) entry 0 even when lse_i is -inf too.
    wrow[c] = static_cast<TW>(j == i ? T(0) : w_scale * softmax_weight(s, l));
  }
}

// mean (K x d, float32 or float64, zero-initialised) += W X over all chunks. X: the GEMM
// operand of the scores and of the weighted sum (fp16/bf16 on the tensor-core path, with
// W in the same dtype TW; else the accumulation dtype, W in place over the scores).
// NB: W in bf16 (weights in [0, 1], float32's range) or fp16, the GEMM on tensor cores
// with float32 accumulation, as the score_reduce backward's G. fp16 W is stored as
// 2^14 W: unscaled, a row's weights (summing to 1, each ~1/K when spread out) would fall
// below fp16's normal range (6e-5) from K ~ 2^14 on, and to 0 below 6e-8 (at any K for
// points whose scores lie ~17 below the row's largest, which may still count when there
// are many of them or they are far away). W <= 1 is the
// bound (the lse is the same row's, from the forward walk), so no max is needed:
// entries below 2^-28 become subnormals (absolute error <= 2^-39 each, <= K 2^-39 max|x|
// over a row), and mean is divided by 2^14 after the walk (exact).
template <typename T, typename TW>
void softmax_mean_impl(const Tensor& X, const ScoreArgs<T>& sc, const Tensor& lse, Tensor& mean) {
  constexpr bool kInPlace = std::is_same<T, TW>::value;
  const int64_t K = X.size(0);
  const auto acc = c10::CppTypeToScalarType<T>::value;
  const T w_scale = std::is_same<TW, at::Half>::value ? T(1 << kFp16GTop) : T(1);
  const Tiling t = choose_tiling(K, K, sizeof(T));
  Tensor ws = at::empty({t.rows * t.cols}, X.options().dtype(acc));
  Tensor wws = kInPlace ? ws : at::empty({t.rows * t.cols}, X.options().dtype(c10::CppTypeToScalarType<TW>::value));
  const cudaStream_t stream = cuda::current_stream();
  for_each_dot_chunk(X, X, t, ws, [&](const Tensor& S, int64_t i0, int64_t rows, int64_t j0, int64_t cols) {
    Tensor W = wws.narrow(0, 0, rows * cols).view({rows, cols});
    cuda::launch(softmax_weights_kernel<T, TW>, static_cast<unsigned>(rows), row_threads(cols), stream,
                 S.data_ptr<T>(), reinterpret_cast<TW*>(W.data_ptr()), cols, i0, j0, sc, lse.data_ptr<T>(),
                 w_scale);
    addmm_acc(mean.narrow(0, i0, rows), W, X.narrow(0, j0, cols));
  });
  if (w_scale != T(1)) mean.mul_(T(1) / w_scale);
}

// Picks the dtype of W: X's, fp16/bf16 on the tensor-core path, else T.
template <typename T>
void softmax_mean_dispatch(const Tensor& X, const ScoreArgs<T>& sc, const Tensor& lse, Tensor& mean) {
  if constexpr (std::is_same<T, float>::value) {
    if (X.scalar_type() == at::kBFloat16) {
      softmax_mean_impl<float, at::BFloat16>(X, sc, lse, mean);
      return;
    }
    if (X.scalar_type() == at::kHalf) {
      softmax_mean_impl<float, at::Half>(X, sc, lse, mean);
      return;
    }
  }
  softmax_mean_impl<T, T>(X, sc, lse, mean);
}

std::tuple<Tensor, Tensor> symmetric_softmax_mean_cuda(const Tensor& x,         // (K, d)
                                                       const Tensor& scale,     // one element
                                                       const OptTensor& bias,   // (K,) or None
                                                       bool with_mean) {        // false: mean is (0,)
  check_symmetric_args(x, scale, bias);
  const cuda::DeviceGuard guard(x.device());
  const auto acc = acc_dtype(x.scalar_type());
  const Tensor X = gemm_operand(x, acc);
  const Tensor b = bias_acc(bias, acc);
  const Tensor sc = scalar_acc(scale, acc);
  Tensor5 out = alloc_reductions(x, x.size(0), x.size(0), kNegLse);
  Tensor mean = std::get<1>(alloc_symmetric(x, with_mean));
  AT_DISPATCH_FLOATING_TYPES(acc, "symmetric_softmax_mean_cuda", [&] {
    const ScoreArgs<scalar_t> args{sc.data_ptr<scalar_t>(), ptr_or_null<scalar_t>(b), ptr_or_null<scalar_t>(b)};
    forward_impl<scalar_t>(X, X, args, scalar_t(1), 0, kNegLse, out);
    if (with_mean) {
      mean.zero_();
      softmax_mean_dispatch<scalar_t>(X, args, std::get<2>(out), mean);
    }
  });
  return {std::get<2>(out), mean};
}

// NB: one walk when a chunk spans whole rows (the usual case: M * 1024 scores fit the
// workspace): per chunk, cuBLAS writes the dots once, the fold kernel finalises the
// rows' statistics, and the gradient kernel turns the same chunk into G -- three GEMMs
// (S, G B, G^T A). Otherwise (a column statistic, final only after every row; huge M,
// column chunks) the forward walk then the recomputing backward: the same results with
// four.
WithGrad score_reduce_with_grad_cuda(const Tensor& grad_row_lse, const Tensor& grad_col_lse,
                                     const Tensor& grad_neg_lse, const Tensor& grad_clamp_lse,
                                     const Tensor& grad_softplus, const Tensor& grad_pos, const Tensor& a,
                                     const Tensor& b, const Tensor& scale, const OptTensor& row_bias,
                                     const OptTensor& col_bias, int64_t pos_offset, int64_t reductions,
                                     double clamp_tau, int64_t needs_grad) {
  // NB: arguments checked by score_reduce_with_grad (score_reduce_common.h).
  const cuda::DeviceGuard guard(a.device());
  const auto acc = acc_dtype(a.scalar_type());
  const auto cont = [acc](const Tensor& t) { return as_acc(t, acc); };
  const Tensor none = at::empty({0}, a.options().dtype(acc));
  const Tensor5 grads{cont(grad_row_lse), none, cont(grad_neg_lse), cont(grad_clamp_lse), cont(grad_softplus)};
  const int64_t active = active_grads(reductions, std::get<0>(grads), none, std::get<2>(grads),
                                      std::get<3>(grads), std::get<4>(grads));
  const int64_t K = a.size(0), M = b.size(0), d = a.size(1);
  if (!active || (reductions & kColLse) || choose_tiling(K, M, c10::elementSize(acc)).cols < M ||
      use_tile_kernels(a.scalar_type()))
    return forward_then_backward(&score_reduce_forward_cuda, &score_reduce_backward_cuda, grad_row_lse,
                                 grad_col_lse, grad_neg_lse, grad_clamp_lse, grad_softplus, grad_pos, a, b, scale,
                                 row_bias, col_bias, pos_offset, reductions, clamp_tau, needs_grad);
  const Tensor A = gemm_operand(a, acc), B = gemm_operand(b, acc);
  const Tensor rb = bias_acc(row_bias, acc), cb = bias_acc(col_bias, acc);
  const Tensor sc = scalar_acc(scale, acc);
  Tensor5 out = alloc_reductions(a, K, M, reductions);
  const auto opts = a.options().dtype(acc);
  Tensor dA = at::zeros({K, d}, opts), dB = at::zeros({M, d}, opts);
  Tensor drow = at::zeros({K}, opts), dcol = at::zeros({M}, opts);
  AT_DISPATCH_FLOATING_TYPES(acc, "score_reduce_with_grad_cuda", [&] {
    const ScoreArgs<scalar_t> args{sc.data_ptr<scalar_t>(), ptr_or_null<scalar_t>(rb), ptr_or_null<scalar_t>(cb)};
    const RowForwardArgs<scalar_t> fold =
        row_forward_args(args, static_cast<scalar_t>(clamp_tau), pos_offset, reductions, out);
    backward_dispatch<scalar_t>(A, B, args, static_cast<scalar_t>(clamp_tau), pos_offset, active, grads,
                                std::get<0>(out), none, std::get<2>(out), std::get<3>(out), dA, dB, drow, dcol,
                                has(col_bias), needs_grad, &fold);
  });
  WithGrad r{out, Tensor(),
             finish_grads(dA, dB, drow, dcol, A, sc, true, a, b, scale, row_bias, col_bias, needs_grad,
                          /*keep_acc=*/true)};
  add_positive_term(r, grad_pos, a, b, scale, row_bias, col_bias, pos_offset, needs_grad);
  return r;
}

}  // namespace

INFOMAX_CUDA_LIBRARY_IMPL(m) {
  m.impl("score_reduce", &score_reduce_forward_cuda);
  m.impl("_score_reduce_backward", &backward_op<&score_reduce_backward_cuda>);
  m.impl("symmetric_softmax_mean", &symmetric_softmax_mean_cuda);
  m.impl("_score_reduce_with_grad", &score_reduce_with_grad<&score_reduce_with_grad_cuda>);
}

}  // namespace infomax_ext
