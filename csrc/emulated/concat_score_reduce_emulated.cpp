// The CUDA kernels of concat_score_reduce, compiled as C++: the emulated CUDA backend
// (torch.ops.infomax_ext_emulated.*, CPU tensors). Not a copy: the very lines of
// csrc/cuda/concat_score_reduce_cuda.cu, with emulation.h standing in for the CUDA
// runtime (see csrc/cuda/cuda_common.cuh).
#define INFOMAX_CUDA_EMULATED 1
#include "../cuda/concat_score_reduce_cuda.cu"
