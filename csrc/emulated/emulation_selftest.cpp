// Small kernels, in CUDA's own dialect, that pin down what the emulation does: a
// barrier orders shared memory, a missing one is visible, warp shuffles exchange
// lanes, and what is undefined on a GPU fails the launch. Reached from Python as
// infomax_ext._C._emulation_selftest(name) (tests/test_emulation.py).
#define INFOMAX_CUDA_EMULATED 1
#include "emulation.h"

#include <c10/util/Exception.h>
#include <c10/util/Half.h>

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

// Two warps: each thread writes its shared slot between two shuffles, then reads the
// other warp's slot (t + 32) % 64, after a barrier (with_barrier) or without one. The
// shuffles make the warps wait for the emulated scheduler without ordering memory.
__global__ void other_warp_kernel(int64_t* out, bool with_barrier) {
  __shared__ int64_t slot[64];
  const unsigned t = threadIdx.x;
  int v = __shfl_xor_sync(0xffffffffu, static_cast<int>(t), 1);
  slot[t] = int64_t(blockIdx.x) * 1000 + (v ^ 1) + 1;
  v = __shfl_xor_sync(0xffffffffu, v, 1);
  if (with_barrier) __syncthreads();
  out[blockIdx.x * 64 + t] = slot[(t + 32) % 64];
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

// Dynamic shared memory (n + 1 slots): out[b n + t] = thread (t + 1) % n's slot after a
// barrier, as neighbour_kernel; out[2 n + b] = 1 when slot n, which no thread of block b
// has written yet (thread 0 writes it last), holds the fill pattern (all bits set).
__global__ void dynamic_smem_kernel(int64_t* out) {
  int64_t* slot = reinterpret_cast<int64_t*>(dynamic_smem());
  const unsigned t = threadIdx.x, n = blockDim.x;
  if (t == 0) out[2 * n + blockIdx.x] = slot[n] == -1 ? 1 : 0;
  slot[t] = int64_t(blockIdx.x) * 1000 + t + 1;
  __syncthreads();
  out[blockIdx.x * n + t] = slot[(t + 1) % n];
  if (t == 0) slot[n] = 7;
}

// One warp: out[16 i + j] = (A B)_ij for the 16 x 16 fp16 matrices A_ik = (i + 2k) % 7 - 3
// and B_kj = (3k + j) % 5 - 2, through wmma (A row-major, B column-major in shared
// memory, the product stored row-major). mode 1: a misaligned pointer; 2: a stride that
// is not a multiple of 16 bytes; 3: lanes 16..31 return before the mma; 4: each lane
// passes its own pointer.
__global__ void wmma_kernel(int64_t* out, int mode) {
  using namespace nvcuda;
  struct alignas(32) Tiles {
    c10::Half a[16 * 24], b[16 * 24];
    float c[16 * 16];
  };
  __shared__ Tiles sm;
  c10::Half *a = sm.a, *b = sm.b;
  float* c = sm.c;
  for (int e = static_cast<int>(threadIdx.x); e < 256; e += 32) {
    const int r = e / 16, k = e % 16;
    a[r * 24 + k] = c10::Half(float((r + 2 * k) % 7 - 3));
    b[r * 24 + k] = c10::Half(float((3 * k + r) % 5 - 2));  // row r of b: column r of B
  }
  __syncthreads();
  wmma::fragment<wmma::matrix_a, 16, 16, 16, c10::Half, wmma::row_major> fa;
  wmma::fragment<wmma::matrix_b, 16, 16, 16, c10::Half, wmma::col_major> fb;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
  wmma::fill_fragment(acc, 0.0f);
  const c10::Half* pa = mode == 1 ? a + 1 : mode == 4 ? a + 16 * (threadIdx.x & 1) * 24 : a;
  wmma::load_matrix_sync(fa, pa, mode == 2 ? 12 : 24);
  wmma::load_matrix_sync(fb, b, 24);
  if (mode == 3 && threadIdx.x >= 16) return;
  wmma::mma_sync(acc, fa, fb, acc);
  wmma::store_matrix_sync(c, acc, 16, wmma::mem_row_major);
  __syncthreads();
  for (int e = static_cast<int>(threadIdx.x); e < 256; e += 32) out[e] = static_cast<int64_t>(c[e]);
}

}  // namespace

std::vector<int64_t> selftest(const std::string& name) {
  std::vector<int64_t> out(2 * kMax, -1);
  int64_t* p = out.data();
  if (name == "barrier" || name == "no_barrier") {
    const bool with = name == "barrier";
    launch(dim3(2), dim3(64), [=] { neighbour_kernel(p, with); });
    out.resize(128);
  } else if (name == "other_warp" || name == "other_warp_no_barrier") {
    const bool with = name == "other_warp";
    launch(dim3(2), dim3(64), [=] { other_warp_kernel(p, with); });
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
  } else if (name == "dynamic_smem") {
    launch(dim3(2), dim3(64), [=] { dynamic_smem_kernel(p); }, 65 * sizeof(int64_t));
    out.resize(130);
  } else if (name == "too_much_smem") {
    launch(dim3(1), dim3(32), [=] { warp_sum_kernel(p); }, kMaxDynamicSmem + 1);
  } else if (name == "grid_y") {
    launch(dim3(1, 65536), dim3(32), [=] { warp_sum_kernel(p); });
  } else if (name.rfind("wmma", 0) == 0) {
    const int mode = name == "wmma" ? 0 : name == "wmma_misaligned" ? 1 : name == "wmma_ldm" ? 2
                   : name == "wmma_diverged" ? 3 : name == "wmma_lanes_disagree" ? 4 : -1;
    TORCH_CHECK(mode >= 0, "unknown emulation self-test ", name);
    launch(dim3(1), dim3(32), [=] { wmma_kernel(p, mode); });
    out.resize(256);
  } else {
    TORCH_CHECK(false, "unknown emulation self-test ", name);
  }
  return out;
}

}  // namespace emu
}  // namespace infomax_ext
