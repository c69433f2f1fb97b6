// Every schema of the library, in one place, and the pybind11 module that
// reports how the extension was built. Kernels register themselves per
// backend with TORCH_LIBRARY_IMPL in cpu/ and cuda/; autograd and fake
// (meta) kernels are registered from Python (infomax_ext/ops.py).
//
// Two namespaces carry the same schemas: torch.ops.infomax_ext (the CPU kernels,
// and the CUDA kernels on CUDA tensors) and, in builds with the emulated backend,
// torch.ops.infomax_ext_emulated (the CUDA kernels' own code run on CPU tensors,
// see csrc/cuda/cuda_common.cuh).
#include <ATen/Parallel.h>
#include <Python.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <torch/library.h>

#include <string>
#include <vector>

#include "cpu/cpu_isa.h"
#include "cpu/dot_tile.h"

#ifdef _OPENMP
#include <omp.h>
#endif

#ifndef INFOMAX_EXT_VERSION
#define INFOMAX_EXT_VERSION "unknown"
#endif
#ifndef INFOMAX_CUDA_ARCHS
#define INFOMAX_CUDA_ARCHS ""
#endif

namespace {

void define_ops(torch::Library& m) {
  // Streaming reductions of S = scale * a b^T + row_bias + col_bias (K x M, never
  // stored): (row_lse (K,), col_lse (M,), neg_lse (K,), neg_clamp_lse (K,),
  // neg_softplus (K,)); unrequested outputs are empty. See score_math.h.
  m.def(
      "score_reduce(Tensor a, Tensor b, Tensor scale, Tensor? row_bias, Tensor? col_bias, "
      "int pos_offset, int reductions, float clamp_tau) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // The gradients (a, b, scale, row_bias, col_bias) of score_reduce for the five outputs'
  // upstream gradients (empty (0,) for none), as differentiable torch ops from the
  // materialising reference (its kernel is registered from Python): score_reduce's
  // backward under create_graph=True. A gradient of an input that is None comes back
  // empty (0,).
  m.def(
      "_score_reduce_grads(Tensor grad_row_lse, Tensor grad_col_lse, Tensor grad_neg_lse, Tensor grad_clamp_lse, "
      "Tensor grad_softplus, Tensor a, Tensor b, Tensor scale, Tensor? row_bias, Tensor? col_bias, "
      "int pos_offset, int reductions, float clamp_tau) -> Tensor[]");
  // Gradients (a, b, scale, row_bias, col_bias) of score_reduce by tile recomputation.
  // needs_grad: bit mask of kNeedA | kNeedB | kNeedScale (score_reduce_common.h); a
  // gradient outside it comes back as zeros and its GEMM is skipped.
  m.def(
      "_score_reduce_backward(Tensor grad_row_lse, Tensor grad_col_lse, Tensor grad_neg_lse, "
      "Tensor grad_clamp_lse, Tensor grad_softplus, Tensor a, Tensor b, Tensor scale, "
      "Tensor? row_bias, Tensor? col_bias, Tensor row_lse, Tensor col_lse, Tensor neg_lse, "
      "Tensor clamp_lse, int pos_offset, int reductions, float clamp_tau, int needs_grad=7) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // value = sum_i g_i . stats_i (+ grad_pos_i S[i, i + pos_offset]) for upstream
  // gradients given up front (a mean's 1/K), score_reduce's statistics, the positives
  // (empty without grad_pos) and, from the same walk, the gradients (a, b, scale,
  // row_bias, col_bias) of value: three GEMMs instead of four. With COL_LSE (a column's
  // statistic is final only after every row) it is score_reduce then its recomputing
  // backward, four GEMMs, still one call. a and b's gradients come in the accumulation
  // dtype; a bias's is zeros when that bias is None.
  m.def(
      "_score_reduce_with_grad(Tensor grad_row_lse, Tensor grad_col_lse, Tensor grad_neg_lse, "
      "Tensor grad_clamp_lse, Tensor grad_softplus, Tensor grad_pos, Tensor a, Tensor b, Tensor scale, "
      "Tensor? row_bias, Tensor? col_bias, int pos_offset, int reductions, float clamp_tau, int needs_grad=7) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // The same walk as a differentiable op (autograd in score_reduce_autograd.cpp):
  // (value, row_lse, col_lse, neg_lse, neg_clamp_lse, neg_softplus, pos) with value =
  // offset + sum_i (w_row_i row_lse_i + ... + w_pos_i S[i, i + pos_offset]) + sum_j
  // w_col_j col_lse_j; a weight is (K,) ((M,) for w_col) or None (its term left out);
  // only value carries a gradient.
  m.def(
      "score_reduce_weighted(Tensor a, Tensor b, Tensor scale, Tensor? row_bias, Tensor? col_bias, "
      "int pos_offset, int reductions, float clamp_tau, Tensor? w_row, Tensor? w_col, Tensor? w_neg, "
      "Tensor? w_clamp, Tensor? w_softplus, Tensor? w_pos, float offset) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // grad times the gradients (a, b, scale, row_bias, col_bias) of score_reduce_weighted's
  // value, as differentiable torch ops from the materialising reference (its kernel is
  // registered from Python): its backward under create_graph=True. A gradient of an
  // input that is None comes back empty (0,).
  m.def(
      "_score_reduce_weighted_grads(Tensor grad, Tensor a, Tensor b, Tensor scale, Tensor? row_bias, "
      "Tensor? col_bias, int pos_offset, int reductions, float clamp_tau, Tensor? w_row, Tensor? w_col, "
      "Tensor? w_neg, Tensor? w_clamp, Tensor? w_softplus, Tensor? w_pos) -> Tensor[]");
  // For the symmetric S = scale * x x^T + bias_i + bias_j with the diagonal excluded:
  // (lse (K,) = logsumexp_{j != i} S_ij, mean (K, d) = sum_{j != i} softmax_i(S)_j x_j),
  // from the upper half of S; with_mean=false: lse only (mean is empty (0,)).
  // Uniformity's value and gradient (estimators.py).
  m.def("symmetric_softmax_mean(Tensor x, Tensor scale, Tensor? bias, bool with_mean=True) -> (Tensor, Tensor)");
  // The same five reductions of the concat-MLP critic S[i, j] = w2 . act(P_i + Q_j) + b2
  // (activation: code of concat_math.h); neither S nor the K x M x H hidden tensor is stored.
  m.def(
      "concat_score_reduce(Tensor P, Tensor Q, Tensor w2, Tensor b2, int activation, "
      "int pos_offset, int reductions, float clamp_tau) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Gradients (P, Q, w2, b2) of concat_score_reduce by tile recomputation.
  m.def(
      "_concat_score_reduce_backward(Tensor grad_row_lse, Tensor grad_col_lse, Tensor grad_neg_lse, "
      "Tensor grad_clamp_lse, Tensor grad_softplus, Tensor P, Tensor Q, Tensor w2, Tensor b2, "
      "int activation, Tensor row_lse, Tensor col_lse, Tensor neg_lse, Tensor clamp_lse, "
      "int pos_offset, int reductions, float clamp_tau) -> (Tensor, Tensor, Tensor, Tensor)");
}

}  // namespace

TORCH_LIBRARY(infomax_ext, m) { define_ops(m); }
#ifdef INFOMAX_WITH_EMULATED_CUDA
TORCH_LIBRARY(infomax_ext_emulated, m) { define_ops(m); }
#endif

namespace py = pybind11;

#ifdef INFOMAX_WITH_EMULATED_CUDA
namespace infomax_ext {
namespace emu {
int64_t launch_count();                                // csrc/emulated/emulation.cpp
int64_t take_peak_smem();                              // csrc/emulated/emulation.cpp
std::vector<int64_t> selftest(const std::string& name);  // csrc/emulated/emulation_selftest.cpp
}
}  // namespace infomax_ext
#endif

PYBIND11_MODULE(_C, m) {
  m.doc() = "infomax_ext compiled kernels; the ops live in torch.ops.infomax_ext";
  m.def("build_info", []() {
    py::dict info;
    py::list backends;
    backends.append("cpu");
#ifdef INFOMAX_WITH_CUDA
    backends.append("cuda");
#endif
#ifdef INFOMAX_WITH_EMULATED_CUDA
    backends.append("cuda_emulated");  // torch.ops.infomax_ext_emulated, CPU tensors
#endif
    info["backends"] = backends;
    info["cuda_archs"] = std::string(INFOMAX_CUDA_ARCHS);
    info["version"] = std::string(INFOMAX_EXT_VERSION);
#ifdef _OPENMP
    info["openmp"] = true;
    info["openmp_max_threads"] = omp_get_max_threads();
#else
    info["openmp"] = false;
    info["openmp_max_threads"] = 1;
#endif
    // which compilation of the CPU hot loops runs
    info["cpu_isa"] = infomax_ext::cpu::isa_name(infomax_ext::cpu::cpu_isa());
    info["cpu_avx2"] = infomax_ext::cpu::cpu_isa() >= infomax_ext::cpu::Isa::kAvx2;
    // bf16 inputs multiplied by a bf16 GEMM with float32 output (else upcast first)
    info["cpu_bf16_gemm"] = infomax_ext::cpu::bf16_gemm() != nullptr;
    // float32 / float64 tile GEMMs called on the BLAS directly (else through at::addmm_out)
    info["cpu_blas_gemm"] = infomax_ext::cpu::fortran_gemm<float>() != nullptr &&
                            infomax_ext::cpu::fortran_gemm<double>() != nullptr;
    info["aten_threads"] = at::get_num_threads();
    info["aten_parallel"] = at::get_parallel_info();
    return info;
  });
#ifdef INFOMAX_WITH_EMULATED_CUDA
  m.def("_emulated_launch_count", &infomax_ext::emu::launch_count,
        "Kernel launches run by the emulated CUDA backend so far (for tests).");
  m.def("_emulated_take_peak_smem", &infomax_ext::emu::take_peak_smem,
        "The most dynamic shared memory (bytes) one emulated launch had since the last call (for tests).");
  m.def("_emulation_selftest", &infomax_ext::emu::selftest,
        "Runs one of the emulation's own test kernels (tests/test_emulation.py).");
#endif
}
