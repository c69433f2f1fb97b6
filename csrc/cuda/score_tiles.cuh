// Tile kernels of the CUDA walker for fp16/bf16 inputs: the scores are made on tensor
// cores (nvcuda::wmma, float32 accumulation) a 64 x 64 tile at a time in shared memory
// and folded there, so S never goes to device memory.
//
//   forward:  tile_forward_kernel folds each tile into per-thread running row states
//             (negatives' log-sum-exp, clamped, softplus sum; the positive kept aside)
//             and, for a column statistic, writes the tile's column states; small
//             finish kernels merge the partial states in a fixed order.
//   backward: tile_grad_kernel makes the tile again, turns it into G = dL/dS in
//             shared memory (score_grad, with the forward's statistics) and writes it
//             out a row at a time in the input's dtype (fp16 scaled, as on the chunk
//             path) for the two G GEMMs (cuBLAS), with G's row sums and, for a column
//             bias, its column sums.
//
// NB: why: the chunk path (cuBLAS writes each chunk of S in float32, epilogue kernels
// read it) moves about 18 bytes per score for a training call; here G's write and the
// two GEMMs' reads of it are all that scale with K * M: 6 bytes per score in bf16. The
// price is one more pass of tensor-core work (S is made twice, in forward and in
// backward) by a hand-written GEMM instead of cuBLAS. Which side wins depends on d
// and the GPU: the kernels are chosen by INFOMAX_EXT_CUDA_TILE_KERNELS=1 (see
// use_tile_kernels in score_reduce_cuda.cu).
//
// Layout of a block (kTileThreads = 128 threads, 4 warps): warp w makes the 32 x 32
// quarter (rows 32 (w / 2), columns 32 (w % 2)) of the 64 x 64 tile as 2 x 2 fragments
// of 16 x 16, over the feature dimension in slabs of kTileDepth features staged in
// shared memory (zero-padded past d and past the last row, so any d, K and M work).
// B's slabs are double-buffered: slab s + 1 goes from device memory into registers
// before slab s's products and into shared memory after them, so its loads' latency
// hides behind the tensor-core work and one barrier per slab suffices. The block's 64
// rows of A are staged once, all d features, in dynamic shared memory and kept for the
// whole column walk when two blocks still fit on an SM (d up to 672 on sm_90):
// the tiles then read only B from L2, half the bytes. Past that, A is double-buffered
// a slab at a time like B. The
// epilogue reads the float32 tile from shared memory: thread t owns row t / 2, columns
// [32 (t % 2), 32 (t % 2) + 32), and for column statistics column t / 2, rows
// [32 (t % 2), ...); the two halves meet by a shuffle with lane t ^ 1.
// blockIdx.x: a block of 64 rows of the launch's row range; blockIdx.y: a range of
// tiles_per_split column tiles, so small K still fills the GPU.
#pragma once

#include <cstdint>

#include "cuda_common.cuh"

namespace infomax_ext {
namespace {

constexpr int kTileRows = 64;      // rows of S per block (= columns per tile)
constexpr int kTileDepth = 32;     // features staged per step
constexpr int kTileThreads = 128;  // 4 warps
constexpr int kTileLd = kTileDepth + 8;    // staged row stride (16-bit elements): 80 bytes, spreads banks
constexpr int kTileLdC = kTileRows + 4;    // float32 tile row stride: 272 bytes

// The operands and the score arguments of one launch.
struct TileOperands {
  const void* a;             // (K, d) row-major, fp16/bf16
  const void* b;             // (M, d)
  int64_t K, M, d;
  int64_t i0, rows;          // the launch covers rows [i0, i0 + rows) of S
  int64_t tiles_per_split;   // column tiles per blockIdx.y
  bool vec;                  // 16-byte loads: d % 8 == 0 and 16-byte aligned bases
  bool a_resident;           // A's 64 rows staged once per block (all d), else a slab at a time
  int a_ld;                  // row stride of staged A (16-bit elements) in dynamic shared memory
  const float* scale;        // one element, on the device
  const float* row_bias;     // (K,) or nullptr
  const float* col_bias;     // (M,) or nullptr
};

struct TileForwardArgs {
  TileOperands op;
  float tau;
  int64_t pos_offset, reductions;
  // Per (split, row of the launch): partial states, nullptr when not requested.
  LseState<float>* neg_part;
  LseState<float>* clamp_part;
  float* sp_part;
  float* pos;                  // (rows,) the positive scores, or nullptr
  LseState<float>* col_part;   // (gridDim.x, M) column states, or nullptr
};

struct TileGradArgs {
  TileOperands op;
  float tau;
  int64_t pos_offset, reductions;  // the active reductions
  // Upstream gradients and saved statistics (nullptr when inactive), as row_grad_at reads them.
  const float *g_row, *row_lse, *g_neg, *neg_lse, *g_clamp, *clamp_lse, *g_sp;  // (K,)
  const float *g_col, *col_lse;                                                 // (M,)
  void* g;                  // (rows, M) chunk of G, row-major, in the GEMMs' dtype
  const float* g_scale;     // one element: G is stored as g_scale * G (fp16); nullptr: as is
  float* drow_part;         // (splits, rows) row sums of G
  float* dcol_part;         // (gridDim.x, M) column sums of G, or nullptr
};

// Static shared memory of a tile block; A's rows are in dynamic shared memory
// (tile_smem_bytes: all d of them, or two slabs).
template <typename TIn>
struct alignas(32) TileSmem {
  TIn b[2][kTileRows][kTileLd];  // B's slabs, double-buffered
  float c[kTileRows][kTileLdC];
};

// One thread's share of a 64 x kTileDepth slab: 16 elements (two 16-byte vectors).
constexpr int kSlabShare = kTileRows * kTileDepth / kTileThreads;
template <typename TIn>
struct alignas(16) Slab {
  TIn v[kSlabShare];
};

// Where part u of the thread's share sits in the slab (row r, feature c). Vectors: part
// t + 128 u is row (t + 128 u) / 4, features 8 ((t + 128 u) % 4) on; elements: row
// (t + 128 u) / 32, feature (t + 128 u) % 32 (a warp reads 32 consecutive features).
struct SlabPlace {
  int r, c;
};
__device__ __forceinline__ SlabPlace slab_place(int u, bool vec) {
  constexpr int kVecs = kTileDepth / 8;  // 8 elements per 16-byte load
  const int i = static_cast<int>(threadIdx.x) + u * kTileThreads;
  return vec ? SlabPlace{i / kVecs, (i % kVecs) * 8} : SlabPlace{i / kTileDepth, i % kTileDepth};
}

// The thread's share of rows [row0, row0 + 64) x features [k0, k0 + kTileDepth) of x
// (n x d) into registers, zeros past n and d.
template <typename TIn>
__device__ __forceinline__ void load_slab(Slab<TIn>& s, const TIn* x, int64_t row0, int64_t n, int64_t d,
                                          int64_t k0, bool vec) {
  if (vec) {
#pragma unroll
    for (int u = 0; u < kSlabShare / 8; ++u) {
      const SlabPlace at = slab_place(u, true);
      const int64_t row = row0 + at.r, k = k0 + at.c;
      // NB: d % 8 == 0, so a vector is wholly inside the row or wholly past it.
      cuda::copy16(&s.v[8 * u], (row < n && k < d) ? x + row * d + k : nullptr);
    }
  } else {
#pragma unroll
    for (int u = 0; u < kSlabShare; ++u) {
      const SlabPlace at = slab_place(u, false);
      const int64_t row = row0 + at.r, k = k0 + at.c;
      s.v[u] = (row < n && k < d) ? x[row * d + k] : TIn{};  // NB: TIn{} is +0
    }
  }
}

// The share load_slab read, to the same places of the slab at dst (row stride ld).
template <typename TIn>
__device__ __forceinline__ void store_slab(TIn* dst, int ld, const Slab<TIn>& s, bool vec) {
  if (vec) {
#pragma unroll
    for (int u = 0; u < kSlabShare / 8; ++u) {
      const SlabPlace at = slab_place(u, true);
      cuda::copy16(dst + at.r * ld + at.c, &s.v[8 * u]);
    }
  } else {
#pragma unroll
    for (int u = 0; u < kSlabShare; ++u) {
      const SlabPlace at = slab_place(u, false);
      dst[at.r * ld + at.c] = s.v[u];
    }
  }
}

// A's rows [arow0, arow0 + 64), all d features (zeros past K and d), into a_sm: once per
// block when op.a_resident, before the walk (its first barrier orders it before the reads).
template <typename TIn>
__device__ void stage_resident_a(TIn* a_sm, const TileOperands& op, int64_t arow0) {
  for (int64_t k0 = 0; k0 < op.d; k0 += kTileDepth) {
    Slab<TIn> s;
    load_slab(s, static_cast<const TIn*>(op.a), arow0, op.K, op.d, k0, op.vec);
    store_slab(a_sm + k0, op.a_ld, s, op.vec);
  }
}

// sm.c = <a_i, b_j> for rows [arow0, arow0 + 64) of A and [brow0, brow0 + 64) of B, in
// float32 (zeros past K, M). a_sm: A's resident rows (op.a_resident), or room for two
// of its slabs. Ends with a barrier: sm.c is complete for every thread.
// NB: sm.c is written only after the first staging barrier of this call, so an
// epilogue that read the previous tile's sm.c has finished by then.
template <typename TIn>
__device__ void tile_dots(TileSmem<TIn>& sm, TIn* a_sm, const TileOperands& op, int64_t arow0, int64_t brow0) {
  using namespace nvcuda;
  const int warp = static_cast<int>(threadIdx.x) >> 5;
  const int wr = (warp >> 1) * 32, wc = (warp & 1) * 32;
  const TIn* A = static_cast<const TIn*>(op.a);
  const TIn* B = static_cast<const TIn*>(op.b);
  const bool stream_a = !op.a_resident;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
  for (int fi = 0; fi < 2; ++fi)
    for (int fj = 0; fj < 2; ++fj) wmma::fill_fragment(acc[fi][fj], 0.0f);
  Slab<TIn> sa, sb;
  load_slab(sb, B, brow0, op.M, op.d, 0, op.vec);
  store_slab(&sm.b[0][0][0], kTileLd, sb, op.vec);
  if (stream_a) {
    load_slab(sa, A, arow0, op.K, op.d, 0, op.vec);
    store_slab(a_sm, kTileLd, sa, op.vec);
  }
  __syncthreads();
  const int64_t slabs = (op.d + kTileDepth - 1) / kTileDepth;
  for (int64_t s = 0; s < slabs; ++s) {
    const int buf = static_cast<int>(s & 1);
    const bool more = s + 1 < slabs;
    if (more) {  // slab s + 1 into registers; its loads are in flight during the products
      load_slab(sb, B, brow0, op.M, op.d, (s + 1) * kTileDepth, op.vec);
      if (stream_a) load_slab(sa, A, arow0, op.K, op.d, (s + 1) * kTileDepth, op.vec);
    }
    const TIn* a = stream_a ? a_sm + buf * kTileRows * kTileLd : a_sm + s * kTileDepth;
    const int lda = stream_a ? kTileLd : op.a_ld;
#pragma unroll
    for (int kk = 0; kk < kTileDepth; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, TIn, wmma::row_major> fa[2];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, TIn, wmma::col_major> fb[2];  // B^T: b's rows are its columns
      for (int f = 0; f < 2; ++f) {
        wmma::load_matrix_sync(fa[f], a + (wr + 16 * f) * lda + kk, lda);
        wmma::load_matrix_sync(fb[f], &sm.b[buf][wc + 16 * f][kk], kTileLd);
      }
      for (int fi = 0; fi < 2; ++fi)
        for (int fj = 0; fj < 2; ++fj) wmma::mma_sync(acc[fi][fj], fa[fi], fb[fj], acc[fi][fj]);
    }
    if (more) {
      // NB: the other buffer was last read in slab s - 1, which every thread finished
      // before the barrier that ended it.
      store_slab(&sm.b[buf ^ 1][0][0], kTileLd, sb, op.vec);
      if (stream_a) store_slab(a_sm + (buf ^ 1) * kTileRows * kTileLd, kTileLd, sa, op.vec);
    }
    __syncthreads();  // NB: slab s + 1 is whole for every warp; slab s is free to overwrite
  }
  for (int fi = 0; fi < 2; ++fi)
    for (int fj = 0; fj < 2; ++fj)
      wmma::store_matrix_sync(&sm.c[wr + 16 * fi][wc + 16 * fj], acc[fi][fj], kTileLdC, wmma::mem_row_major);
  __syncthreads();
}

// The column tiles [begin, end) of blockIdx.y.
struct TileRange {
  int64_t begin, end;
};

__device__ __forceinline__ TileRange split_tiles(const TileOperands& op) {
  const int64_t n = (op.M + kTileRows - 1) / kTileRows;
  const int64_t begin = static_cast<int64_t>(blockIdx.y) * op.tiles_per_split;
  return {begin, begin + op.tiles_per_split < n ? begin + op.tiles_per_split : n};
}

// The state of lanes t and t ^ 1 merged, the lower lane's first (a fixed order).
__device__ __forceinline__ LseState<float> merge_pair(LseState<float> s) {
  const LseState<float> o{__shfl_xor_sync(0xffffffffu, s.max, 1), __shfl_xor_sync(0xffffffffu, s.sum, 1)};
  return (threadIdx.x & 1) ? lse_merge(o, s) : lse_merge(s, o);
}

__device__ __forceinline__ float sum_pair(float x) {
  const float o = __shfl_xor_sync(0xffffffffu, x, 1);
  return (threadIdx.x & 1) ? o + x : x + o;
}

// The block's walk over its split's column tiles (A's rows staged first when resident):
// each tile made (tile_dots), then row_score(j, c, s) for each of the thread's scores
// in it (row t / 2 of the block, tile columns c in [32 (t % 2), 32 (t % 2) + 32) below
// M, in a fixed rotated order; none when the row is past the launch's), then
// after_tile(j0) by every thread.
template <typename TIn, typename RowScore, typename AfterTile>
__device__ __forceinline__ void walk_tiles(TileSmem<TIn>& sm, const TileOperands& op, int64_t blk0, bool row_ok,
                                           float rb, RowScore row_score, AfterTile after_tile) {
  const int r = static_cast<int>(threadIdx.x) >> 1, h = static_cast<int>(threadIdx.x) & 1;
  const float scale = *op.scale;
  TIn* a_sm = reinterpret_cast<TIn*>(cuda::dynamic_smem());
  if (op.a_resident) stage_resident_a(a_sm, op, op.i0 + blk0);
  const TileRange tiles = split_tiles(op);
  for (int64_t jt = tiles.begin; jt < tiles.end; ++jt) {
    const int64_t j0 = jt * kTileRows;
    tile_dots<TIn>(sm, a_sm, op, op.i0 + blk0, j0);
    if (row_ok) {
      // NB: each thread starts its 32 columns at its own offset (r + 16 h): the 32 lanes
      // of a warp then read 32 different banks of sm.c (a row is 68 floats, 4 banks on).
      for (int q = 0; q < 32; ++q) {
        const int c = h * 32 + ((q + r + 16 * h) & 31);
        const int64_t j = j0 + c;
        if (j >= op.M) continue;
        row_score(j, c, score_from_dot(sm.c[r][c], scale, rb, op.col_bias ? op.col_bias[j] : 0.0f));
      }
    }
    after_tile(j0);
  }
}

template <typename TIn>
__global__ void __launch_bounds__(kTileThreads) tile_forward_kernel(const TileForwardArgs p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  // NB: bf16 fragments need sm_80; the host never launches this kernel below it.
  __trap();
#else
  __shared__ TileSmem<TIn> sm;
  const TileOperands& op = p.op;
  const int t = static_cast<int>(threadIdx.x), r = t >> 1, h = t & 1;
  const int64_t blk0 = static_cast<int64_t>(blockIdx.x) * kTileRows;  // first row of the block, in the launch
  const int64_t lr = blk0 + r;
  const bool row_ok = lr < op.rows;
  const int64_t i = op.i0 + lr, pos_col = i + p.pos_offset;
  const float scale = *op.scale;
  const float rb = (row_ok && op.row_bias) ? op.row_bias[i] : 0.0f;
  const bool need_neg = p.reductions & (kRowLse | kNegLse);
  const bool need_clamp = p.reductions & kNegClampLse;
  const bool need_sp = p.reductions & kNegSoftplus;
  LseState<float> neg = lse_empty<float>(), clamp = lse_empty<float>();
  float sp = 0.0f, pos = 0.0f;
  bool has_pos = false;
  const auto row_score = [&](int64_t j, int, float s) {
    if (j == pos_col) {
      pos = s;  // NB: the positive is excluded from every neg_* reduction.
      has_pos = true;
      return;
    }
    if (need_neg) neg = lse_push(neg, s);
    if (need_clamp) clamp = lse_push(clamp, clamp_tau(s, p.tau));
    if (need_sp) sp += softplus(s);
  };
  const auto col_states = [&](int64_t j0) {
    if (p.col_part) {
      // Column t / 2 of the tile over rows [32 h, 32 h + 32) of the block.
      const int64_t j = j0 + r;
      LseState<float> st = lse_empty<float>();
      if (j < op.M) {
        const float cb = op.col_bias ? op.col_bias[j] : 0.0f;
        for (int rr = h * 32; rr < h * 32 + 32 && blk0 + rr < op.rows; ++rr) {
          const float rbr = op.row_bias ? op.row_bias[op.i0 + blk0 + rr] : 0.0f;
          st = lse_push(st, score_from_dot(sm.c[rr][r], scale, rbr, cb));
        }
      }
      st = merge_pair(st);
      if (h == 0 && j < op.M) p.col_part[static_cast<int64_t>(blockIdx.x) * op.M + j] = st;
    }
  };
  walk_tiles<TIn>(sm, op, blk0, row_ok, rb, row_score, col_states);
  neg = merge_pair(neg);
  clamp = merge_pair(clamp);
  sp = sum_pair(sp);
  if (!row_ok) return;
  if (has_pos && p.pos) p.pos[lr] = pos;  // NB: exactly one thread of the grid sees row i's positive
  if (h != 0) return;
  const int64_t slot = static_cast<int64_t>(blockIdx.y) * op.rows + lr;
  if (p.neg_part) p.neg_part[slot] = neg;
  if (p.clamp_part) p.clamp_part[slot] = clamp;
  if (p.sp_part) p.sp_part[slot] = sp;
#endif
}

// A thread per row of the launch: the splits' partial states merged in order, then the
// row's statistics written (finalize_row, as the chunk path's row kernel does).
__global__ void tile_row_finish_kernel(const TileForwardArgs p, int64_t splits, float* row_out, float* neg_out,
                                       float* clamp_out, float* sp_out) {
  const int64_t lr = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (lr >= p.op.rows) return;
  LseState<float> neg = lse_empty<float>(), clamp = lse_empty<float>();
  float sp = 0.0f;
  for (int64_t y = 0; y < splits; ++y) {
    const int64_t slot = y * p.op.rows + lr;
    if (p.neg_part) neg = lse_merge(neg, p.neg_part[slot]);
    if (p.clamp_part) clamp = lse_merge(clamp, p.clamp_part[slot]);
    if (p.sp_part) sp += p.sp_part[slot];
  }
  finalize_row(p.op.i0 + lr, p.reductions, neg, clamp, sp, p.pos ? p.pos[lr] : 0.0f, row_out, neg_out, clamp_out,
               sp_out);
}

// TIn: the fragments' element type (the device's); TG: G's stored type (c10's fp16 / bf16,
// which converts from float on the device with round-to-nearest-even).
template <typename TIn, typename TG>
__global__ void __launch_bounds__(kTileThreads) tile_grad_kernel(const TileGradArgs p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // NB: see tile_forward_kernel
#else
  __shared__ TileSmem<TIn> sm;
  const TileOperands& op = p.op;
  const int t = static_cast<int>(threadIdx.x), r = t >> 1, h = t & 1;
  const int64_t blk0 = static_cast<int64_t>(blockIdx.x) * kTileRows;
  const int64_t lr = blk0 + r;
  const bool row_ok = lr < op.rows;
  const int64_t i = op.i0 + lr, pos_col = i + p.pos_offset;
  const float rb = (row_ok && op.row_bias) ? op.row_bias[i] : 0.0f;
  const RowGrad<float> rg = row_ok ? row_grad_at<float>(p, i) : RowGrad<float>{};
  const float gs = p.g_scale ? *p.g_scale : 1.0f;  // a power of two: the product is exact
  TG* g = static_cast<TG*>(p.g) + blk0 * op.M;  // the block's first row of G
  float sum = 0.0f;
  const auto row_score = [&](int64_t j, int c, float s) {
    const float gv = score_grad(s, j == pos_col, rg, p.g_col ? p.g_col[j] : 0.0f, p.col_lse ? p.col_lse[j] : 0.0f,
                                p.tau, p.reductions);
    // NB: the row and column sums take the unscaled float32 G, not the stored one.
    sum += gv;
    sm.c[r][c] = gv;  // NB: only the thread that read this entry rewrites it
  };
  const auto store_tile = [&](int64_t j0) {
    __syncthreads();  // every row's G is in sm.c
    // NB: G goes out a row at a time, consecutive threads on consecutive columns: a
    // thread writing its own row's entries would put each store of a warp in 32
    // different sectors of G.
    for (int e = t; e < kTileRows * kTileRows; e += kTileThreads) {
      const int rr = e / kTileRows, cc = e % kTileRows;
      if (blk0 + rr < op.rows && j0 + cc < op.M) g[rr * op.M + j0 + cc] = static_cast<TG>(gs * sm.c[rr][cc]);
    }
    if (p.dcol_part) {
      const int64_t j = j0 + r;
      float cs = 0.0f;
      if (j < op.M)
        for (int rr = h * 32; rr < h * 32 + 32 && blk0 + rr < op.rows; ++rr) cs += sm.c[rr][r];
      cs = sum_pair(cs);
      if (h == 0 && j < op.M) p.dcol_part[static_cast<int64_t>(blockIdx.x) * op.M + j] = cs;
    }
  };
  walk_tiles<TIn>(sm, op, blk0, row_ok, rb, row_score, store_tile);
  sum = sum_pair(sum);
  if (row_ok && h == 0) p.drow_part[static_cast<int64_t>(blockIdx.y) * op.rows + lr] = sum;
#endif
}

// out[i0 + lr] = the splits' partial row sums of G, added in order.
__global__ void tile_row_sums_kernel(const float* part, int64_t splits, int64_t rows, int64_t i0, float* out) {
  const int64_t lr = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (lr >= rows) return;
  float s = 0.0f;
  for (int64_t y = 0; y < splits; ++y) s += part[y * rows + lr];
  out[i0 + lr] = s;
}

// out[j] += the row blocks' partial column sums of G, added in order.
__global__ void tile_col_sums_kernel(const float* part, int64_t blocks, int64_t M, float* out) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= M) return;
  float s = 0.0f;
  for (int64_t y = 0; y < blocks; ++y) s += part[y * M + j];
  out[j] += s;
}

}  // namespace
}  // namespace infomax_ext
