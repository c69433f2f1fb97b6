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
//   - launch(grid, block, body): runs body once per thread of every block.
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
void launch(dim3 grid, dim3 block, const std::function<void()>& body);

// Kernel launches so far (all threads, all launches): tests check that a path ran.
int64_t launch_count();

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
