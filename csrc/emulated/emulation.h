// The CUDA execution model on the CPU, so that csrc/cuda/*.cu compile as C++ and
// their kernels run, unchanged, on CPU tensors (the "emulated CUDA" backend).
//
// Included (through cuda_common.cuh) only when INFOMAX_CUDA_EMULATED is defined;
// nvcc builds never see it. What it provides:
//   - the CUDA keywords: __global__, __device__, __host__, __forceinline__ and
//     __launch_bounds__ vanish; __shared__ becomes `static` (one copy per
//     kernel instantiation: per block, because blocks run one after another and
//     a launch holds a process-wide lock);
//   - threadIdx / blockIdx / blockDim / gridDim of the running emulated thread;
//   - __syncthreads(): a real barrier among the block's threads;
//   - __shfl_xor_sync(): a real exchange among the 32 lanes of a warp;
//   - dynamic shared memory: launch(..., smem_bytes) gives every block a buffer of that
//     size (filled with 0xff bytes, a NaN in every float format, at each block's start:
//     on a GPU it holds whatever was there), which dynamic_smem() returns;
//   - launch(grid, block, body, smem_bytes): runs body once per thread of every block.
//
// Every CUDA thread of a block is a fiber (its own stack, switched cooperatively,
// deterministic order), so code between two barriers really interleaves with the
// other threads' code: a missing __syncthreads reads data another thread has not
// written yet, and under ThreadSanitizer (fibers annotated, no implicit
// synchronisation on a switch) it is reported as a data race on the shared array.
// Undefined behaviour on a GPU is an error here, raised from launch(): a full-warp
// shuffle with a lane that has exited or that does not exist (a partial warp), a
// __syncthreads after some threads of the block have exited or while other threads
// wait in a shuffle, and launch configurations a GPU rejects.
#pragma once

#include <cstdint>
#include <cstring>
#include <functional>
#include <type_traits>

#ifndef INFOMAX_CUDA_EMULATED
#error "emulation.h is for the emulated build of csrc/cuda/*.cu only"
#endif

struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};

// A stream is a token here: launches run synchronously, in call order.
struct CUstream_st;
using cudaStream_t = CUstream_st*;

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

namespace infomax_ext {
namespace emu {

constexpr unsigned kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;

// Coordinates of the emulated thread now running (valid inside a launch only).
struct Coords {
  dim3 thread_idx, block_idx, block_dim, grid_dim;
};
// NB: a plain global, not thread_local: one launch runs at a time (launch() holds a
// process-wide lock), and the scheduler points it at the running fiber's coordinates.
extern const Coords* g_coords;

void syncthreads();
// All 32 lanes of the caller's warp exchange `bits`; returns lane (lane ^ lane_mask)'s.
uint64_t shfl_xor_bits(unsigned mask, uint64_t bits, int lane_mask);
// Runs body for every thread of every block of the grid (blocks in order x, y, z;
// the threads of a block as fibers). Throws c10::Error on a bad configuration or on
// undefined behaviour in the kernel (see the top of this file).
// smem_bytes: the block's dynamic shared memory, at most kMaxDynamicSmem.
void launch(dim3 grid, dim3 block, const std::function<void()>& body, size_t smem_bytes = 0);

// The shared memory of the GPUs the kernels are sized for (sm_90: H100, H200): what one
// block may have after opting in, and what one SM holds.
constexpr size_t kMaxDynamicSmem = 227 << 10;
constexpr size_t kSmemPerSm = 228 << 10;
// The running block's dynamic shared memory (128-byte aligned; valid inside a launch only).
unsigned char* dynamic_smem();

// Lane (0..31) of the running emulated thread in its warp.
unsigned lane_id();
// Fails the running launch with `message` (undefined behaviour on a GPU); never returns.
[[noreturn]] void fail_launch(const char* message);

// Kernel launches so far (all threads, all launches): tests check that a path ran.
int64_t launch_count();
// The most dynamic shared memory one launch had since the last call (then 0 again).
int64_t take_peak_smem();

template <typename T>
T shfl_xor_sync(unsigned mask, T v, int lane_mask) {
  static_assert(std::is_trivially_copyable<T>::value && sizeof(T) <= sizeof(uint64_t),
                "__shfl_xor_sync: at most 8 bytes of plain data");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  bits = shfl_xor_bits(mask, bits, lane_mask);
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}

}  // namespace emu
}  // namespace infomax_ext

#define threadIdx (::infomax_ext::emu::g_coords->thread_idx)
#define blockIdx (::infomax_ext::emu::g_coords->block_idx)
#define blockDim (::infomax_ext::emu::g_coords->block_dim)
#define gridDim (::infomax_ext::emu::g_coords->grid_dim)
#define __syncthreads() ::infomax_ext::emu::syncthreads()
#define __shfl_xor_sync(mask, v, lane_mask) ::infomax_ext::emu::shfl_xor_sync(mask, v, lane_mask)

// ---------------------------------------------------------------------------
// nvcuda::wmma: the warp's matrix multiply-accumulate on tensor cores
// ---------------------------------------------------------------------------
//
// The subset the kernels use, with CUDA's semantics: fragments of m x n x k tiles,
// fill_fragment, load_matrix_sync, mma_sync (products of 16-bit values exact,
// accumulated in float32) and store_matrix_sync. On a GPU a fragment spreads its tile
// over the 32 lanes in a layout the API leaves unspecified. Here a lane's matrix_a and
// matrix_b fragments hold the whole tile (as float32: fp16 and bf16 values convert
// exactly), and a lane owns the accumulator elements e with e % 32 == its lane: mma_sync
// computes those and store_matrix_sync writes those (so a warp's mma costs one product,
// not 32). NB: the tile is named `tile`, not CUDA's `x`: code that reads or writes a
// fragment's elements one by one depends on that unspecified layout, and does not
// compile here.
//
// What a GPU leaves undefined fails the launch: a warp that is not whole or not
// converged at a *_sync call (each call is a rendezvous of the 32 lanes), lanes of one
// warp passing different pointers or strides (each lane compares with its neighbour's),
// a pointer that is not 256-bit aligned, a stride (ldm) that is not a multiple of
// 16 bytes. store_matrix_sync writes each element from one lane only (lane e % 32 writes
// element e), so overlapping stores from two warps are races a sanitizer sees.
namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int m, int n, int k, typename T, typename Layout = void>
struct fragment {
  static constexpr int kRows = std::is_same<Use, matrix_b>::value ? k : m;
  static constexpr int kCols = std::is_same<Use, matrix_a>::value ? k : n;
  float tile[kRows * kCols];  // row-major
};

namespace detail {
// The rendezvous of a *_sync call: all 32 lanes arrive, each checks that its neighbour
// (lane ^ 1) passed the same pointer and stride, and the pointer's alignment.
inline void converge(const void* p, unsigned ldm, size_t elem_bytes, const char* what) {
  const uint64_t mine = reinterpret_cast<uintptr_t>(p) ^ (uint64_t(ldm) << 48);
  const uint64_t other = ::infomax_ext::emu::shfl_xor_sync(::infomax_ext::emu::kFullMask, mine, 1);
  if (other != mine) ::infomax_ext::emu::fail_launch(what);
  if (p && reinterpret_cast<uintptr_t>(p) % 32 != 0)
    ::infomax_ext::emu::fail_launch("wmma: the matrix pointer must be 256-bit aligned");
  if (p && (ldm * elem_bytes) % 16 != 0)
    ::infomax_ext::emu::fail_launch("wmma: ldm must be a multiple of 16 bytes");
}
}  // namespace detail

template <typename Use, int m, int n, int k, typename T, typename L, typename V>
inline void fill_fragment(fragment<Use, m, n, k, T, L>& f, const V& v) {
  for (float& x : f.tile) x = static_cast<float>(v);
}

// matrix_a / matrix_b: the layout is the fragment's.
template <typename Use, int m, int n, int k, typename T, typename L>
inline void load_matrix_sync(fragment<Use, m, n, k, T, L>& f, const T* p, unsigned ldm) {
  static_assert(std::is_same<L, row_major>::value || std::is_same<L, col_major>::value,
                "load_matrix_sync without a layout argument is for matrix_a / matrix_b fragments");
  detail::converge(p, ldm, sizeof(T), "wmma::load_matrix_sync: lanes of one warp disagree on the matrix");
  using F = fragment<Use, m, n, k, T, L>;
  for (int r = 0; r < F::kRows; ++r)
    for (int c = 0; c < F::kCols; ++c)
      f.tile[r * F::kCols + c] =
          static_cast<float>(std::is_same<L, row_major>::value ? p[size_t(r) * ldm + c] : p[r + size_t(c) * ldm]);
}

template <int m, int n, int k>
inline void store_matrix_sync(float* p, const fragment<accumulator, m, n, k, float>& f, unsigned ldm,
                              layout_t layout) {
  detail::converge(p, ldm, sizeof(float), "wmma::store_matrix_sync: lanes of one warp disagree on the matrix");
  for (int e = static_cast<int>(::infomax_ext::emu::lane_id()); e < m * n; e += 32) {
    const int r = e / n, c = e % n;
    p[layout == mem_row_major ? size_t(r) * ldm + c : r + size_t(c) * ldm] = f.tile[e];
  }
}

// d = a b + c (d may be c), on the lane's own elements of the accumulator.
template <int m, int n, int k, typename Ta, typename La, typename Tb, typename Lb>
inline void mma_sync(fragment<accumulator, m, n, k, float>& d, const fragment<matrix_a, m, n, k, Ta, La>& a,
                     const fragment<matrix_b, m, n, k, Tb, Lb>& b, const fragment<accumulator, m, n, k, float>& c) {
  detail::converge(nullptr, 0, 1, "wmma::mma_sync: lanes of one warp diverged");
  for (int e = static_cast<int>(::infomax_ext::emu::lane_id()); e < m * n; e += 32) {
    const int r = e / n, col = e % n;
    float s = c.tile[e];
    for (int x = 0; x < k; ++x) s += a.tile[r * k + x] * b.tile[x * n + col];
    d.tile[e] = s;  // NB: element e of c is read before it is written: d may be c
  }
}

}  // namespace wmma
}  // namespace nvcuda
