"""Shared test inputs: devices, dtypes and awkward sample cases for the fused ops."""
import contextlib
import math

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
on_cuda_backends = pytest.mark.parametrize("backend", CUDA_BACKENDS, indirect=True)
needs_c = pytest.mark.skipif(not infomax_ext._backend.HAS_C, reason="compiled module not built")


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


# The CUDA walker's kernels for fp16/bf16 inputs: "chunks" (cuBLAS writes chunks of S,
# the default) or "tiles" (the tensor-core tile kernels, S never stored).
KERNELS_ENV = "INFOMAX_EXT_CUDA_TILE_KERNELS"
on_both_kernels = pytest.mark.parametrize("kernels", ["chunks", "tiles"])


def set_kernels(monkeypatch, kernels):
    """Choose the CUDA walker's fp16/bf16 kernels for one test."""
    if kernels == "tiles":
        monkeypatch.setenv(KERNELS_ENV, "1")
    else:
        monkeypatch.delenv(KERNELS_ENV, raising=False)


def set_tile(monkeypatch, tile):
    """Set (a string of bytes) or clear (None) the CUDA workspace budget for one test."""
    if tile is None:
        monkeypatch.delenv(TILE_ENV, raising=False)
    else:
        monkeypatch.setenv(TILE_ENV, tile)


# ---------------------------------------------------------------------------
# score_reduce's arguments as a dict, on any device (tests/test_score_reduce.py and the
# CUDA walkers' checks in tests/test_devices.py)
# ---------------------------------------------------------------------------

ARGS = ("a", "b", "scale", "row_bias", "col_bias")
BITS = [1, 2, 4, 8, 16]  # ROW_LSE, COL_LSE, NEG_LSE, NEG_CLAMP_LSE, NEG_SOFTPLUS: the outputs' order
# (K, M, d, pos_offset): K in {1, 2, 7, 64, 300}, M >= K, pos_offset > 0 in most.
SHAPES = [
    (1, 1, 3, 0),
    (1, 6, 4, 5),
    (2, 2, 5, 0),
    (2, 9, 3, 4),
    (7, 7, 16, 0),
    (7, 20, 8, 13),
    (64, 64, 32, 0),
    (64, 300, 17, 100),
    (300, 300, 8, 0),
    (300, 517, 33, 200),
]
SMALL_SHAPES = [s for s in SHAPES if s[0] <= 64 and s[1] <= 300]


def _ids(shapes):
    return [f"K{K}-M{M}-d{d}-off{o}" for K, M, d, o in shapes]




def make_inputs(K, M, d, pos_offset, dtype=torch.float64, device="cpu", seed=0, noncontig=False,
                bias=True, masked=False, scale=1.3, requires_grad=True):
    """Arguments of score_reduce as a dict (created in float64 on the CPU, then moved, so
    every device and dtype sees the same values). masked: a few -inf column biases
    (never all of a row's negatives, never a positive column)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(K, d, generator=g, dtype=torch.float64)
    b = torch.randn(M, d, generator=g, dtype=torch.float64)
    rb = torch.randn(K, generator=g, dtype=torch.float64) if bias else None
    cb = torch.randn(M, generator=g, dtype=torch.float64) if bias else None
    if masked and cb is not None:
        pos_cols = set(range(pos_offset, pos_offset + K))
        free = [j for j in range(M) if j not in pos_cols]
        # Mask at most a third of the negatives of each row, so every reduction stays finite.
        cb[free[: len(free) // 3]] = -math.inf
    a, b = a.to(device=device, dtype=dtype), b.to(device=device, dtype=dtype)
    if noncontig:
        a = a.t().contiguous().t()  # column-major: same values, strides (1, K)
        b = torch.cat([b, b], 1)[:, ::2]  # every other column of a wider tensor
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    to = dict(device=device, dtype=acc)
    kw = dict(a=a, b=b, scale=torch.tensor(scale, **to), row_bias=None if rb is None else rb.to(**to),
              col_bias=None if cb is None else cb.to(**to), pos_offset=pos_offset)
    if requires_grad:
        for k in ARGS:
            if kw[k] is not None:
                kw[k].requires_grad_(True)
    return kw


def to_device(kw, device, dtype=None):
    """The same arguments on another device (and dtype), as new leaves."""
    out = dict(kw)
    for k in ARGS:
        t = kw[k]
        if t is not None:
            dt = dtype if (dtype is not None and k in ("a", "b")) else t.dtype
            out[k] = t.detach().to(device=device, dtype=dt).requires_grad_(t.requires_grad)
    return out


def weights_like(outputs, seed=0):
    g = torch.Generator().manual_seed(seed + 17)
    return [torch.randn(o.shape, generator=g, dtype=torch.float64).to(o) for o in outputs]


def grads_of(outputs, weights, kw):
    inputs = [kw[k] for k in ARGS if kw[k] is not None]
    loss = sum((w * o).sum() for w, o in zip(weights, outputs) if o.numel())
    return torch.autograd.grad(loss, inputs)


def tol(dtype):
    """Values: float64 exact to rounding; float32 within a few ulp of sums of ~500 terms."""
    return {} if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-5)


def gtol(dtype):
    """Gradients: sums of terms of both signs, so float32 is judged at the terms' scale."""
    return {} if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------
# Build
# ---------------------------------------------------------------------------
