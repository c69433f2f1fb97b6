"""The build compiled what this machine can compile."""
import os
import shutil

import pytest
import torch

import infomax_ext


def nvcc_available():
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    return os.path.exists(os.path.join(home, "bin", "nvcc")) or shutil.which("nvcc") is not None


def test_compiled_module_loaded():
    assert infomax_ext._backend.HAS_C, infomax_ext.build_info()
    assert infomax_ext.backend() == "compiled"
    info = infomax_ext.build_info()
    assert "cpu" in info["backends"] and info["version"] == infomax_ext.__version__
    assert info["aten_threads"] >= 1
    assert torch._C._dispatch_has_kernel_for_dispatch_key("infomax_ext::score_reduce", "CPU")


@pytest.mark.skipif(os.environ.get("FORCE_CPU", "0") == "1", reason="FORCE_CPU=1 build")
def test_cuda_kernels_compiled_where_nvcc_exists():
    """CI must not silently drop the CUDA sources: with nvcc and a CUDA torch they are built."""
    if not (nvcc_available() and torch.version.cuda):
        pytest.skip("no nvcc or a CPU-only torch: CUDA kernels cannot be built here")
    cuda_dir = os.path.join(os.path.dirname(__file__), "..", "csrc", "cuda")
    if not os.path.isdir(cuda_dir) or not any(f.endswith(".cu") for f in os.listdir(cuda_dir)):
        pytest.skip("no CUDA sources in csrc/cuda yet")
    info = infomax_ext.build_info()
    assert "cuda" in info["backends"], info
    assert torch._C._dispatch_has_kernel_for_dispatch_key("infomax_ext::score_reduce", "CUDA")


@pytest.mark.skipif(os.environ.get("NO_EMULATED_CUDA", "0") == "1", reason="NO_EMULATED_CUDA=1 build")
def test_emulated_cuda_backend_built():
    """The default build carries the CUDA kernels' code compiled for the CPU (the tests run it)."""
    info = infomax_ext.build_info()
    assert "cuda_emulated" in info["backends"], info
    assert torch._C._dispatch_has_kernel_for_dispatch_key("infomax_ext_emulated::score_reduce", "CPU")


def test_cuda_build_embeds_ptx_for_newer_gpus():
    """The highest listed arch also carries PTX, so the module loads on newer GPUs."""
    info = infomax_ext.build_info()
    if "cuda" not in info["backends"] or not info["cuda_archs"] or info["cuda_archs"] == "native":
        pytest.skip("no CUDA kernels, or archs chosen by torch for the local GPU")
    assert "+PTX" in info["cuda_archs"], info["cuda_archs"]
