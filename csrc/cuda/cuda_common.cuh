// Host and device helpers shared by the CUDA walkers (score_reduce_cuda.cu and
// concat_score_reduce_cuda.cu): the workspace budget, raw pointers of optional
// tensors, and warp reductions. The numerics themselves live in score_math.h.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <cstdlib>

#include "infomax_ext/score_math.h"

namespace infomax_ext {
namespace cuda {

// Bytes of float32 scores a walker may hold at once (one chunk of S or of its
// partial states): 256 MB, or INFOMAX_EXT_CUDA_TILE_BYTES.
// NB: read per call (cheap) so a test can shrink it and walk many chunks on small inputs.
inline int64_t workspace_bytes() {
  if (const char* env = std::getenv("INFOMAX_EXT_CUDA_TILE_BYTES")) {
    const long long v = std::atoll(env);
    if (v > 0) return static_cast<int64_t>(v);
  }
  return int64_t(256) << 20;
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

#ifdef __CUDACC__
template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
#endif

}  // namespace cuda
}  // namespace infomax_ext
