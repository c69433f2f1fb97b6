import os
import sys

import pytest
import torch

# helpers.py sits beside the tests; make it importable whatever the rootdir.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from helpers import BACKENDS, backend_context, tensor_device  # noqa: E402


@pytest.fixture(params=BACKENDS)
def backend(request):
    """The backend the test's fused ops run on ("cpu", "emulated", "cuda"); for
    "emulated" the test body runs inside the emulation."""
    with backend_context(request.param):
        yield request.param


@pytest.fixture
def device(backend):
    """The torch device of the test's tensors, on each backend in turn."""
    return tensor_device(backend)


@pytest.fixture
def one_thread():
    """Run a test on one torch thread (modules opt in with ``usefixtures("one_thread")``).

    NB: tiny matmuls and MLPs: on the shared 2-core machines one thread is several
    times faster than two.
    """
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def default_cuda_tiles(monkeypatch):
    """Clear INFOMAX_EXT_CUDA_TILE_BYTES and INFOMAX_EXT_CUDA_TILE_KERNELS from the
    environment (tests set their own)."""
    monkeypatch.delenv("INFOMAX_EXT_CUDA_TILE_BYTES", raising=False)
    monkeypatch.delenv("INFOMAX_EXT_CUDA_TILE_KERNELS", raising=False)
