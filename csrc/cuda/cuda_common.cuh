// Host and device helpers shared by the CUDA walkers (score_reduce_cuda.cu and
// concat_score_reduce_cuda.cu): the one kernel launch, the device guard and stream,
// the workspace budget, raw pointers of optional tensors, and warp reductions. The
// numerics themselves live in score_math.h.
//
// The same .cu sources build two ways:
//   - by nvcc, as the CUDA backend: kernels on the GPU, ops registered for the
//     CUDA dispatch key of torch.ops.infomax_ext;
//   - as C++ with INFOMAX_CUDA_EMULATED (csrc/emulated/*.cpp include the .cu files),
//     as the emulated backend: every launch runs the kernel's threads as fibers on
//     the CPU (csrc/emulated/emulation.h), tensors on the CPU stand in for device
//     memory, and the ops are registered for the CPU key of the separate namespace
//     torch.ops.infomax_ext_emulated.
// Only this header differs between the two; the kernels and host walkers are one source.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <torch/version.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <utility>

#ifdef INFOMAX_CUDA_EMULATED
#include "../emulated/emulation.h"
#else
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>
#include <mma.h>
#endif

#include "infomax_ext/score_math.h"

// at::mm(self, mat2, out_dtype) (fp16/bf16 in, float32 out) exists from torch 2.8.
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 8)
#define INFOMAX_MM_OUT_DTYPE 1
#else
#define INFOMAX_MM_OUT_DTYPE 0
#endif

#ifdef INFOMAX_CUDA_EMULATED
// NB: the emulated build's helpers get their own (inline) namespace: the GPU build's
// inline functions of the same names live in the same .so, and must not be merged.
#define INFOMAX_CUDA_ABI inline namespace emulated_abi
#define INFOMAX_CUDA_LIBRARY_IMPL(m) TORCH_LIBRARY_IMPL(infomax_ext_emulated, CPU, m)
#else
#define INFOMAX_CUDA_ABI inline namespace device_abi
#define INFOMAX_CUDA_LIBRARY_IMPL(m) TORCH_LIBRARY_IMPL(infomax_ext, CUDA, m)
#endif

namespace infomax_ext {
INFOMAX_CUDA_ABI {
namespace cuda {

// Makes the inputs' device current for the walker's lifetime (a check that the
// inputs are on the CPU when emulated).
#ifdef INFOMAX_CUDA_EMULATED
struct DeviceGuard {
  explicit DeviceGuard(const c10::Device& d) {
    TORCH_CHECK(d.is_cpu(), "the emulated CUDA kernels take CPU tensors, got ", d);
  }
};
inline cudaStream_t current_stream() { return nullptr; }
#else
using DeviceGuard = c10::cuda::CUDAGuard;
inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream(); }
#endif

// kernel<<<grid, block, smem_bytes, stream>>>(args...), checked: the one place a kernel
// is launched, on the GPU or emulated. smem_bytes: the block's dynamic shared memory
// (dynamic_smem()).
// NB: the kernel is opted in to smem_bytes at every such launch (a host call of about a
// microsecond): by default static plus dynamic shared memory may not pass 48 KiB, and
// the setting is per device.
template <typename... Params, typename... Args>
void launch_smem(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem_bytes, cudaStream_t stream,
                 Args&&... args) {
#ifdef INFOMAX_CUDA_EMULATED
  (void)stream;  // NB: emulated launches run synchronously, in call order (one stream)
  // NB: arguments are copied at the launch, as CUDA copies them into the kernel's parameters.
  emu::launch(grid, block, [=] { kernel(args...); }, smem_bytes);
#else
  if (smem_bytes > 0)
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(smem_bytes)));
  kernel<<<grid, block, smem_bytes, stream>>>(std::forward<Args>(args)...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
#endif
}

template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, cudaStream_t stream, Args&&... args) {
  launch_smem(kernel, grid, block, 0, stream, std::forward<Args>(args)...);
}

// The running block's dynamic shared memory (the launch's smem_bytes), 128-byte aligned.
__device__ __forceinline__ unsigned char* dynamic_smem() {
#ifdef INFOMAX_CUDA_EMULATED
  return emu::dynamic_smem();
#else
  extern __shared__ __align__(128) unsigned char smem[];
  return smem;
#endif
}

#if INFOMAX_MM_OUT_DTYPE
// out = x @ y for fp16/bf16 x, y and a float32 out: a tensor-core GEMM (exact products,
// float32 accumulation) on the GPU. Emulated, the same arithmetic: the low-precision
// values upcast exactly to float32, multiplied and summed in float32 (torch's CPU
// GEMM has no out_dtype form).
inline void mm_out_dtype(at::Tensor& out, const at::Tensor& x, const at::Tensor& y) {
#ifdef INFOMAX_CUDA_EMULATED
  at::mm_out(out, x.to(out.scalar_type()), y.to(out.scalar_type()));
#else
  at::mm_out(out, x, y, out.scalar_type());
#endif
}

// acc += x @ y for fp16/bf16 x, y and a float32 acc. On the GPU the GEMM accumulates
// into acc itself (beta = 1: acc is read and written once) where torch's addmm takes a
// float32 `self` with low-precision operands; torch versions that refuse it (the
// first call tells: the check runs before any work) get a float32 product and an add,
// which moves acc's bytes three times. Emulated: the same arithmetic in float32.
inline void addmm_out_dtype(at::Tensor& acc, const at::Tensor& x, const at::Tensor& y) {
#ifdef INFOMAX_CUDA_EMULATED
  acc.addmm_(x.to(acc.scalar_type()), y.to(acc.scalar_type()));
#else
  static std::atomic<int> fused{-1};  // -1 untried, 1 works, 0 refused by this torch
  if (fused.load() != 0) {
    try {
      at::addmm_out(acc, acc, x, y, acc.scalar_type());
      fused.store(1);
      return;
    } catch (const c10::Error&) {
      if (fused.load() == 1) throw;  // NB: it worked before: a real error, not the dtype check
      fused.store(0);
    }
  }
  at::Tensor prod = at::empty({x.size(0), y.size(1)}, acc.options());
  mm_out_dtype(prod, x, y);
  acc.add_(prod);
#endif
}
#endif

// Bytes a walker may hold at once in its chunk workspaces (one chunk of S and of G,
// or of the concat op's partial states). INFOMAX_EXT_CUDA_TILE_BYTES overrides it;
// otherwise, on the GPU, a quarter of the free device memory, at most 1 GiB and at
// least 64 MiB: big chunks mean few passes over dB (every row chunk re-reads and
// rewrites it) and a dA GEMM of thousands of rows that fills the SMs. (A chunk is far
// larger than L2: the epilogues stream it from HBM.) Emulated: 256 MiB.
// NB: read per call (cheap) so a test can shrink it and walk many chunks on small inputs.
inline int64_t workspace_bytes() {
  if (const char* env = std::getenv("INFOMAX_EXT_CUDA_TILE_BYTES")) {
    const long long v = std::atoll(env);
    if (v > 0) return static_cast<int64_t>(v);
  }
#ifdef INFOMAX_CUDA_EMULATED
  return int64_t(256) << 20;
#else
  size_t free_bytes = 0, total_bytes = 0;
  if (cudaMemGetInfo(&free_bytes, &total_bytes) != cudaSuccess) {
    (void)cudaGetLastError();  // NB: clear the sticky-free error state; use the floor
    return int64_t(64) << 20;
  }
  return std::clamp<int64_t>(static_cast<int64_t>(free_bytes / 4), int64_t(64) << 20, int64_t(1) << 30);
#endif
}

// The device's type for a c10 16-bit float (the element type of tensor-core fragments).
template <typename T>
struct DeviceHalf;
#ifdef INFOMAX_CUDA_EMULATED
template <>
struct DeviceHalf<at::Half> { using type = c10::Half; };
template <>
struct DeviceHalf<at::BFloat16> { using type = c10::BFloat16; };
#else
template <>
struct DeviceHalf<at::Half> { using type = __half; };
template <>
struct DeviceHalf<at::BFloat16> { using type = __nv_bfloat16; };
#endif

// Streaming multiprocessors of the current device (how many blocks fill it), and whether
// it has bf16 tensor cores (sm_80 and later). Emulated: 4 "SMs" (so that small test
// inputs already split their columns across blocks) and tensor cores.
#ifdef INFOMAX_CUDA_EMULATED
inline int sm_count() { return 4; }
inline bool has_bf16_tensor_cores() { return true; }
#else
inline int device_attribute(cudaDeviceAttr attr) {
  int device = 0, value = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, attr, device));
  return value;
}
inline int sm_count() { return device_attribute(cudaDevAttrMultiProcessorCount); }
inline bool has_bf16_tensor_cores() { return device_attribute(cudaDevAttrComputeCapabilityMajor) >= 8; }
#endif

// Shared memory of the current device: the most one block may have (after opting in),
// and what one SM holds. Emulated: an H100's / H200's.
#ifdef INFOMAX_CUDA_EMULATED
inline int64_t smem_per_block() { return emu::kMaxDynamicSmem; }
inline int64_t smem_per_sm() { return emu::kSmemPerSm; }
#else
inline int64_t smem_per_block() { return device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin); }
inline int64_t smem_per_sm() { return device_attribute(cudaDevAttrMaxSharedMemoryPerMultiprocessor); }
#endif

// 16 bytes from src to dst (both 16-byte aligned), or zeros when src is nullptr: one
// 128-bit load and store on the GPU. NB: memcpy when emulated (no type punning in C++).
template <typename T>
__device__ __forceinline__ void copy16(T* dst, const T* src) {
#ifdef INFOMAX_CUDA_EMULATED
  if (src) {
    std::memcpy(dst, src, 16);
  } else {
    std::memset(dst, 0, 16);
  }
#else
  *reinterpret_cast<uint4*>(dst) = src ? *reinterpret_cast<const uint4*>(src) : make_uint4(0u, 0u, 0u, 0u);
#endif
}

inline int64_t ceil_div(int64_t x, int64_t y) { return (x + y - 1) / y; }

// Data pointer of an optional or possibly empty tensor (nullptr for either).
template <typename T>
T* ptr_or_null(const at::Tensor& t) {
  return (t.defined() && t.numel() > 0) ? t.data_ptr<T>() : nullptr;
}

// A (n, 2) tensor of (max, sum) pairs seen as LseState<T> (nullptr if undefined).
template <typename T>
LseState<T>* as_states(const at::Tensor& t) {
  return t.defined() ? reinterpret_cast<LseState<T>*>(t.data_ptr<T>()) : nullptr;
}

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

}  // namespace cuda
}  // INFOMAX_CUDA_ABI
}  // namespace infomax_ext
