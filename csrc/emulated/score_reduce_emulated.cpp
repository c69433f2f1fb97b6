// The CUDA walkers of score_reduce and symmetric_softmax_mean, compiled as C++: the
// emulated CUDA backend (torch.ops.infomax_ext_emulated.*, CPU tensors). Not a copy:
// the very lines of csrc/cuda/score_reduce_cuda.cu, with emulation.h standing in for
// the CUDA runtime (see csrc/cuda/cuda_common.cuh).
#define INFOMAX_CUDA_EMULATED 1
#include "../cuda/score_reduce_cuda.cu"
