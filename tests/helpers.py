"""Shared test inputs: devices, dtypes and awkward sample cases for the fused ops."""
import contextlib

import pytest
import torch

import infomax_ext

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
needs_emulated = pytest.mark.skipif(not infomax_ext._backend.has_emulated_cuda(),
                                    reason="built without the emulated CUDA backend")
# Where the fused ops run: the CPU kernels, the CUDA kernels' own code emulated on the
# CPU (CPU tensors inside _backend.emulated_cuda()), the CUDA kernels on a GPU. The
# conftest fixture ``device`` runs a test on each and gives it the tensors' device.
BACKENDS = ["cpu", pytest.param("emulated", marks=needs_emulated), pytest.param("cuda", marks=needs_cuda)]
CUDA_BACKENDS = BACKENDS[1:]


def tensor_device(backend):
    """The torch device of a backend's tensors."""
    return "cuda" if backend == "cuda" else "cpu"


def backend_context(backend):
    """The context a backend's ops run in (the emulation for "emulated")."""
    return infomax_ext._backend.emulated_cuda() if backend == "emulated" else contextlib.nullcontext()


def cpu_kernels():
    """The CPU kernels, even inside an emulated test (to compare the two)."""
    return infomax_ext._backend.emulated_cuda(False)

# (K, M, d, pos_offset, scale): K=1 and 2, tile edges (64 rows, 512 columns), M > K,
# sizes that are not tile multiples, large scales.
CASES = [
    (1, 1, 3, 0, 1.0),
    (1, 4, 2, 3, 0.5),
    (2, 2, 5, 0, 2.0),
    (2, 7, 3, 4, 1.0),
    (7, 20, 4, 13, 3.0),
    (64, 512, 8, 0, 1.0),
    (65, 513, 5, 1, 0.7),
    (63, 1030, 3, 500, 1.5),
    (300, 301, 6, 1, 0.2),
]


def make_pair(K, M, d, device="cpu", dtype=torch.float64, seed=0, noncontig=False,
              requires_grad=False):
    """Random (K, d) and (M, d) inputs; noncontig gives strided views of the same values."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(K, d, generator=g, dtype=torch.float64)
    b = torch.randn(M, d, generator=g, dtype=torch.float64)
    a, b = a.to(device=device, dtype=dtype), b.to(device=device, dtype=dtype)
    if noncontig:
        a = a.t().contiguous().t()  # column-major: same values, strides (1, K)
        b = torch.cat([b, b], 1)[:, ::2]  # every other column of a wider tensor
        assert not a.is_contiguous() or K == 1
        assert not b.is_contiguous()
    return a.requires_grad_(requires_grad), b.requires_grad_(requires_grad)


def make_bias(n, device="cpu", dtype=torch.float64, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed + 1000)
    return torch.randn(n, generator=g, dtype=torch.float64).to(device=device, dtype=dtype).requires_grad_(requires_grad)


def sample_inputs(device="cpu", dtype=torch.float64, requires_grad=False, seed=0):
    """Yields dicts of score_reduce arguments covering CASES, with and without biases,
    contiguous and not."""
    for n, (K, M, d, off, scale) in enumerate(CASES):
        s = seed * 100 + n
        a, b = make_pair(K, M, d, device, dtype, s, noncontig=(n % 2 == 1), requires_grad=requires_grad)
        with_bias = n % 3 != 0
        yield dict(
            a=a,
            b=b,
            scale=torch.tensor(scale, dtype=dtype if dtype == torch.float64 else torch.float32,
                               device=device).requires_grad_(requires_grad),
            row_bias=make_bias(K, device, dtype, s, requires_grad) if with_bias else None,
            col_bias=make_bias(M, device, dtype, s + 7, requires_grad) if with_bias else None,
            pos_offset=off,
        )


def case_id(kw):
    return f"K{kw['a'].shape[0]}-M{kw['b'].shape[0]}-off{kw['pos_offset']}"


# The CUDA walkers' workspace budget (bytes); tests shrink it to walk many chunks.
TILE_ENV = "INFOMAX_EXT_CUDA_TILE_BYTES"


def set_tile(monkeypatch, tile):
    """Set (a string of bytes) or clear (None) the CUDA workspace budget for one test."""
    if tile is None:
        monkeypatch.delenv(TILE_ENV, raising=False)
    else:
        monkeypatch.setenv(TILE_ENV, tile)
