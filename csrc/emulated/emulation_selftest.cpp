// Small kernels, in CUDA's own dialect, that pin down what the emulation does: a
// barrier orders shared memory, a missing one is visible, warp shuffles exchange
// lanes, and what is undefined on a GPU fails the launch. Reached from Python as
// infomax_ext._C._emulation_selftest(name) (tests/test_emulation.py).
#define INFOMAX_CUDA_EMULATED 1
#include "emulation.h"

#include <c10/util/Exception.h>

#include <string>
#include <vector>

namespace infomax_ext {
namespace emu {
namespace {

constexpr int kMax = 256;

// out[t] = t + 1 read back from thread (t + 1) % n's shared slot, after a barrier
// (with_barrier) or without one.
__global__ void neighbour_kernel(int64_t* out, bool with_barrier) {
  __shared__ int64_t slot[kMax];
  const unsigned t = threadIdx.x, n = blockDim.x;
  slot[t] = int64_t(blockIdx.x) * 1000 + t + 1;
  if (with_barrier) __syncthreads();
  out[blockIdx.x * n + t] = slot[(t + 1) % n];
}

// out[t] = the sum of the warp's lane ids (496 in a whole warp) by butterfly shuffles.
__global__ void warp_sum_kernel(int64_t* out) {
  int v = static_cast<int>(threadIdx.x & 31);
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  out[threadIdx.x] = v;
}

// Lanes >= quit return first; the rest shuffle (with_shuffle) or meet at a barrier.
__global__ void early_exit_kernel(int64_t* out, unsigned quit, bool with_shuffle) {
  if (threadIdx.x >= quit) return;
  int v = 1;
  if (with_shuffle) {
    v = __shfl_xor_sync(0xffffffffu, v, 1);
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = v;
}

// A barrier that one warp waits at while another waits in a shuffle.
__global__ void divergent_kernel(int64_t* out) {
  if (threadIdx.x < 32) {
    __syncthreads();
  } else {
    out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1, 1);
  }
}

}  // namespace

std::vector<int64_t> selftest(const std::string& name) {
  std::vector<int64_t> out(2 * kMax, -1);
  int64_t* p = out.data();
  if (name == "barrier" || name == "no_barrier") {
    const bool with = name == "barrier";
    launch(dim3(2), dim3(64), [=] { neighbour_kernel(p, with); });
    out.resize(128);
  } else if (name == "warp_sum") {
    launch(dim3(1), dim3(64), [=] { warp_sum_kernel(p); });
    out.resize(64);
  } else if (name == "partial_warp") {
    launch(dim3(1), dim3(48), [=] { warp_sum_kernel(p); });
  } else if (name == "shuffle_after_exit") {
    launch(dim3(1), dim3(32), [=] { early_exit_kernel(p, 31, true); });
  } else if (name == "sync_after_exit") {
    launch(dim3(1), dim3(64), [=] { early_exit_kernel(p, 40, false); });
  } else if (name == "divergent") {
    launch(dim3(1), dim3(64), [=] { divergent_kernel(p); });
  } else if (name == "too_many_threads") {
    launch(dim3(1), dim3(1025), [=] { warp_sum_kernel(p); });
  } else if (name == "grid_y") {
    launch(dim3(1, 65536), dim3(32), [=] { warp_sum_kernel(p); });
  } else {
    TORCH_CHECK(false, "unknown emulation self-test ", name);
  }
  return out;
}

}  // namespace emu
}  // namespace infomax_ext
