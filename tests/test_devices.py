"""The kernels of score_reduce on every backend against the materialising reference,
and the CUDA kernels (on a GPU, and their own code emulated on the CPU) against the CPU
kernels.

Each test runs on the backends of the conftest fixture ``backend`` ("cpu", "emulated",
"cuda"; "cuda" skips without a GPU), or on the CUDA ones only (``CUDA_BACKENDS``).
On a GPU machine a build without the CUDA kernels fails ``test_cuda_kernels_are_registered``
instead of skipping (a build that drops CUDA silently is a failure).

Convention: S = scale * a b^T + row_bias + col_bias is (K, M), rows are anchors a
(view 1), columns candidates b (view 2), the positive of row i is column
i + pos_offset. ``INFOMAX_EXT_CUDA_TILE_BYTES`` shrinks the CUDA walker's chunk of
S so that small inputs walk many row and column chunks (the merge paths).
"""
import math

import pytest
import torch

import infomax_ext
from infomax_ext import ops, reference as ref
from helpers import CUDA_BACKENDS, cpu_kernels, needs_cuda, set_tile

pytestmark = [pytest.mark.usefixtures("default_cuda_tiles")]
on_cuda_backends = pytest.mark.parametrize("backend", CUDA_BACKENDS, indirect=True)

ALL = ops.ALL_REDUCTIONS
BITS = [ops.ROW_LSE, ops.COL_LSE, ops.NEG_LSE, ops.NEG_CLAMP_LSE, ops.NEG_SOFTPLUS]
ARGS = ("a", "b", "scale", "row_bias", "col_bias")
# Chunk budgets: the default (one chunk for small inputs); 1 KiB (K=300: 2 row chunks x
# 517 one-column chunks; K=64: 4-column chunks); 64 bytes (a few rows x 1-2 columns).
TILES = [None, "1024", "64"]

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


@needs_cuda
def test_cuda_kernels_are_registered():
    assert infomax_ext._backend.HAS_C, f"compiled module missing: {infomax_ext.build_info()}"
    assert "cuda" in infomax_ext.build_info()["backends"], infomax_ext.build_info()
    for op in ("score_reduce", "_score_reduce_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"infomax_ext::{op}", "CUDA"), op


needs_c = pytest.mark.skipif(not infomax_ext._backend.HAS_C, reason="compiled module not built")


# ---------------------------------------------------------------------------
# Values and gradients against the reference
# ---------------------------------------------------------------------------


@needs_c
@pytest.mark.parametrize("tile", TILES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", SHAPES, ids=_ids(SHAPES))
def test_values_and_gradients_match_reference(shape, dtype, tile, device, monkeypatch):
    if tile == "64" and shape not in SMALL_SHAPES:
        pytest.skip("tiny chunks only on small shapes (launch count)")
    set_tile(monkeypatch, tile)
    K, M, d, off = shape
    n = SHAPES.index(shape)
    kw = make_inputs(K, M, d, off, dtype, device, seed=n, noncontig=n % 2 == 1, bias=n % 3 != 0)
    fused = ops.score_reduce(**kw, reductions=ALL, clamp_tau=2.0)
    oracle = ref.score_reduce(**kw, reductions=ALL, clamp_tau=2.0)
    for f, o in zip(fused, oracle):
        assert f.device.type == device
        torch.testing.assert_close(f, o, **tol(dtype))
    w = weights_like(oracle, seed=n)
    for gf, go in zip(grads_of(fused, w, kw), grads_of(oracle, w, kw)):
        torch.testing.assert_close(gf, go, **gtol(dtype))


@needs_c
@pytest.mark.parametrize("tile", TILES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", [(7, 20, 8, 13), (64, 300, 17, 100), (300, 517, 33, 200)],
                         ids=_ids([(7, 20, 8, 13), (64, 300, 17, 100), (300, 517, 33, 200)]))
def test_masked_biases_match_reference(shape, dtype, tile, device, monkeypatch):
    """-inf column biases (partial masks, so the reference's own gradient is defined)."""
    if tile == "64" and shape not in SMALL_SHAPES:
        pytest.skip("tiny chunks only on small shapes (launch count)")
    set_tile(monkeypatch, tile)
    K, M, d, off = shape
    kw = make_inputs(K, M, d, off, dtype, device, seed=3, noncontig=True, masked=True)
    # NB: no COL_LSE: a column whose bias is -inf is fully masked, and the
    # reference's logsumexp gradient of an all -inf column is NaN.
    red = ALL & ~ops.COL_LSE
    fused = ops.score_reduce(**kw, reductions=red, clamp_tau=1.5)
    oracle = ref.score_reduce(**kw, reductions=red, clamp_tau=1.5)
    for f, o in zip(fused, oracle):
        torch.testing.assert_close(f, o, **tol(dtype))
    w = weights_like(oracle)
    for gf, go in zip(grads_of(fused, w, kw), grads_of(oracle, w, kw)):
        assert torch.isfinite(gf).all()
        torch.testing.assert_close(gf, go, **gtol(dtype))


@needs_c
@pytest.mark.parametrize("tile", TILES)
def test_fully_masked_rows_and_columns_are_minus_inf_never_nan(tile, device, monkeypatch):
    set_tile(monkeypatch, tile)
    kw = make_inputs(5, 9, 4, 2, torch.float64, device, seed=5)
    with torch.no_grad():
        kw["col_bias"][[0, 1, 5, 8]] = -math.inf  # fully masked columns
        kw["col_bias"][3] = -math.inf  # row 1's positive (column 3) masked
        kw["row_bias"][4] = -math.inf  # a fully masked row
    fused = ops.score_reduce(**kw, reductions=ALL, clamp_tau=2.0)
    oracle = ref.score_reduce(**kw, reductions=ALL, clamp_tau=2.0)
    for f, o in zip(fused, oracle):
        torch.testing.assert_close(f, o)  # -inf where the reference has -inf
    assert fused[0][4] == -math.inf and fused[2][4] == -math.inf
    assert fused[1][0] == -math.inf
    grads = grads_of(fused, weights_like(fused), kw)
    for g in grads:
        assert not torch.isnan(g).any()
    # The CPU kernels share the guards (score_math.h): the gradients agree exactly in kind.
    kw_cpu = to_device(kw, "cpu")
    with cpu_kernels():
        fused_cpu = ops.score_reduce(**kw_cpu, reductions=ALL, clamp_tau=2.0)
        grads_cpu = grads_of(fused_cpu, weights_like(fused_cpu), kw_cpu)
    for gc, gg in zip(grads_cpu, grads):
        torch.testing.assert_close(gg.cpu(), gc)


@needs_c
@pytest.mark.parametrize("bit", BITS)
@pytest.mark.parametrize("tile", [None, "64"])
def test_single_reduction_only_fills_its_output(bit, tile, device, monkeypatch):
    set_tile(monkeypatch, tile)
    kw = make_inputs(9, 70, 4, 3, torch.float64, device, seed=7)
    fused = ops.score_reduce(**kw, reductions=bit, clamp_tau=1.0)
    oracle = ref.score_reduce(**kw, reductions=bit, clamp_tau=1.0)
    idx = BITS.index(bit)
    for n, (f, o) in enumerate(zip(fused, oracle)):
        assert f.shape == o.shape and f.dtype == o.dtype
        assert (f.numel() > 0) == (n == idx)
    torch.testing.assert_close(fused[idx], oracle[idx])
    w = weights_like(oracle)
    for gf, go in zip(grads_of(fused, w, kw), grads_of(oracle, w, kw)):
        torch.testing.assert_close(gf, go)


@needs_c
@on_cuda_backends
def test_larger_problem_several_chunks_float32(device, monkeypatch):
    """2048 x 2048 with 1 MiB chunks: 8 row chunks x 2 column chunks, rows longer than a block."""
    set_tile(monkeypatch, str(1 << 20))
    kw = make_inputs(2048, 2048, 64, 0, torch.float32, device, seed=11, scale=0.5)
    fused = ops.score_reduce(**kw, reductions=ALL, clamp_tau=5.0)
    oracle = ref.score_reduce(**kw, reductions=ALL, clamp_tau=5.0)
    for f, o in zip(fused, oracle):
        torch.testing.assert_close(f, o, rtol=2e-5, atol=5e-5)
    w = weights_like(oracle)
    for gf, go in zip(grads_of(fused, w, kw), grads_of(oracle, w, kw)):
        torch.testing.assert_close(gf, go, rtol=1e-4, atol=1e-4)


@needs_c
@needs_cuda
def test_int64_indexing_beyond_2_pow_31():
    """K * M = 2^32 pairs (d = 1, a_i = 1: every row is the same, so the answers follow
    in O(M) from b); 64 row chunks of 1024 x 65536 with the default chunk size."""
    K = M = 1 << 16
    g = torch.Generator().manual_seed(0)
    x = torch.randn(M, 1, generator=g).cuda()
    a = torch.ones(K, 1, device="cuda")
    s = 3.0
    row, col, neg, _, _ = ops.score_reduce(a, x, s, None, None, 0, ops.ROW_LSE | ops.COL_LSE | ops.NEG_LSE)
    xs = s * x[:, 0].double()
    lse = torch.logsumexp(xs, 0)
    torch.testing.assert_close(row.double(), lse.expand(K), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(col.double(), xs + math.log(K), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(neg.double(), lse + torch.log1p(-torch.exp(xs - lse)), rtol=1e-5, atol=1e-4)
    xg = x.clone().requires_grad_()
    row = ops.score_reduce(a, xg, s, None, None, 0, ops.ROW_LSE)[0]
    (gx,) = torch.autograd.grad(row.sum(), xg)
    torch.testing.assert_close(gx[:, 0].double(), K * s * torch.softmax(xs, 0), rtol=1e-4, atol=1e-6)


@needs_c
def test_large_logits_do_not_overflow(device):
    kw = make_inputs(33, 80, 16, 5, torch.float32, device, seed=2, scale=40.0)
    kw64 = to_device(kw, device, torch.float64)
    kw64["scale"] = kw64["scale"].detach().double().requires_grad_(True)
    for k in ("row_bias", "col_bias"):
        kw64[k] = kw64[k].detach().double().requires_grad_(True)
    fused = ops.score_reduce(**kw, reductions=ALL, clamp_tau=5.0)
    oracle = ref.score_reduce(**kw64, reductions=ALL, clamp_tau=5.0)
    for f, o in zip(fused, oracle):
        assert torch.isfinite(f).all()
        torch.testing.assert_close(f.double(), o, rtol=1e-5, atol=1e-3)


# ---------------------------------------------------------------------------
# gradcheck and opcheck
# ---------------------------------------------------------------------------


@needs_c
@pytest.mark.parametrize("tile", [None, "64"])
@pytest.mark.parametrize("shape", [(1, 3, 2, 2), (3, 5, 4, 1), (6, 11, 3, 4)], ids=str)
def test_gradcheck_float64(shape, tile, device, monkeypatch):
    set_tile(monkeypatch, tile)
    K, M, d, off = shape
    kw = make_inputs(K, M, d, off, torch.float64, device, seed=K)

    def f(a, b, scale, rb, cb):
        return ops.score_reduce(a, b, scale, rb, cb, off, ALL, 1.5)

    assert torch.autograd.gradcheck(f, tuple(kw[k] for k in ARGS))


@needs_c
@pytest.mark.parametrize("red", [ops.ROW_LSE, ops.COL_LSE | ops.NEG_SOFTPLUS, ops.NEG_LSE | ops.NEG_CLAMP_LSE])
def test_gradcheck_subsets_without_biases(red, device):
    kw = make_inputs(4, 7, 3, 2, torch.float64, device, seed=9, bias=False)

    def f(a, b, scale):
        return ops.score_reduce(a, b, scale, None, None, 2, red, 0.8)

    assert torch.autograd.gradcheck(f, (kw["a"], kw["b"], kw["scale"]))


@needs_c
@on_cuda_backends
def test_opcheck(device):
    lib = ops._ops()  # the emulated backend's namespace inside the emulation
    kw = make_inputs(5, 9, 3, 2, torch.float64, device, seed=4)
    a, b, scale, rb, cb = (kw[k] for k in ARGS)
    torch.library.opcheck(lib.score_reduce, (a, b, scale, rb, cb, 2, ALL, 2.0))
    torch.library.opcheck(lib.score_reduce, (a, b, scale, None, None, 0, ops.ROW_LSE, 5.0))
    kw32 = make_inputs(6, 8, 4, 1, torch.float32, device, seed=5)
    torch.library.opcheck(lib.score_reduce, tuple(kw32[k] for k in ARGS) + (1, ops.COL_LSE | ops.NEG_LSE, 1.0))
    det = [t.detach() for t in (a, b, scale, rb, cb)]
    outs = ops.score_reduce(*det, 2, ALL, 2.0)
    grads = [torch.randn_like(o) for o in outs]
    torch.library.opcheck(lib._score_reduce_backward, (*grads, *det, *outs[:4], 2, ALL, 2.0))
    g = [torch.randn_like(outs[0]) for _ in range(4)]
    red = ALL & ~ops.COL_LSE
    torch.library.opcheck(lib._score_reduce_with_grad, (*g, *det, 2, red, 2.0))
    torch.library.opcheck(lib.symmetric_softmax_mean, (a, scale, rb, True))


# ---------------------------------------------------------------------------
# CPU vs CUDA
# ---------------------------------------------------------------------------


@needs_c
@on_cuda_backends
@pytest.mark.parametrize("tile", [None, "4096"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", SHAPES, ids=_ids(SHAPES))
def test_cpu_and_cuda_kernels_agree(shape, dtype, tile, device, monkeypatch):
    set_tile(monkeypatch, tile)
    K, M, d, off = shape
    n = SHAPES.index(shape)
    kw = make_inputs(K, M, d, off, dtype, device, seed=100 + n, noncontig=n % 2 == 0, bias=n % 3 != 1,
                     masked=n % 4 == 3)
    kw_cpu = to_device(kw, "cpu")
    red = ALL if n % 4 != 3 else ALL & ~ops.COL_LSE
    out_gpu = ops.score_reduce(**kw, reductions=red, clamp_tau=2.5)
    w = weights_like(out_gpu, seed=n)
    g_gpu = grads_of(out_gpu, w, kw)
    with cpu_kernels():
        out_cpu = ops.score_reduce(**kw_cpu, reductions=red, clamp_tau=2.5)
        g_cpu = grads_of(out_cpu, [x.cpu() for x in w], kw_cpu)
    for g, c in zip(out_gpu, out_cpu):
        assert g.dtype == c.dtype and g.shape == c.shape
        torch.testing.assert_close(g.cpu(), c, **tol(dtype))
    for gg, gc in zip(g_gpu, g_cpu):
        assert gg.dtype == gc.dtype and gg.shape == gc.shape
        torch.testing.assert_close(gg.cpu(), gc, **gtol(dtype))


@needs_c
@on_cuda_backends
def test_reruns_are_bitwise_identical(device):
    kw = make_inputs(300, 517, 33, 200, torch.float32, device, seed=8)
    first = ops.score_reduce(**kw)
    g1 = grads_of(first, weights_like(first), kw)
    second = ops.score_reduce(**kw)
    g2 = grads_of(second, weights_like(second), kw)
    for x, y in zip(first + g1, second + g2):
        assert torch.equal(x, y)


@needs_c
@needs_cuda
def test_other_device_and_current_stream():
    """The kernels follow the input's device (the guard) and the current stream. NB: on a
    one-GPU machine the device is cuda:0, the current one already: only the stream is tested."""
    dev = torch.device("cuda", torch.cuda.device_count() - 1)
    kw = to_device(make_inputs(40, 90, 8, 7, torch.float32, seed=6), dev)
    s = torch.cuda.Stream(device=dev)
    s.wait_stream(torch.cuda.current_stream(dev))  # the inputs were written on the default stream
    with torch.cuda.device(dev), torch.cuda.stream(s):
        fused = ops.score_reduce(**kw)
        grads = grads_of(fused, weights_like(fused), kw)
    s.synchronize()
    oracle = ref.score_reduce(**kw)
    for f, o in zip(fused, oracle):
        assert f.device == dev
        torch.testing.assert_close(f, o, rtol=2e-5, atol=2e-5)
    for gf, go in zip(grads, grads_of(oracle, weights_like(oracle), kw)):
        torch.testing.assert_close(gf, go, **gtol(torch.float32))


# ---------------------------------------------------------------------------
# Low precision: fp16 / bf16 inputs, float32 accumulation
# ---------------------------------------------------------------------------


def _plain_low_precision(kw, red, tau):
    """What plain torch computes in the input dtype (S materialised in fp16/bf16)."""
    a, b = kw["a"], kw["b"]
    dt = a.dtype
    S = (a @ b.T) * kw["scale"].to(dt) + kw["row_bias"].to(dt)[:, None] + kw["col_bias"].to(dt)[None, :]
    K, M = S.shape
    mask = ref.negative_mask(K, M, kw["pos_offset"], device=S.device)
    neg = torch.where(mask, S, torch.full_like(S, -math.inf))
    outs = [torch.logsumexp(S, 1), torch.logsumexp(S, 0), torch.logsumexp(neg, 1),
            torch.logsumexp(torch.where(mask, S.clamp(-tau, tau), torch.full_like(S, -math.inf)), 1),
            torch.where(mask, torch.nn.functional.softplus(S), torch.zeros_like(S)).sum(1)]
    return [o if red & bit else o.new_empty(0) for o, bit in zip(outs, BITS)]


def _err(x, y):
    return (x.double() - y.double()).abs().max().item() if x.numel() else 0.0


@needs_c
@pytest.mark.parametrize("tile", [None, "4096"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(7, 20, 8, 13), (64, 300, 64, 100), (300, 517, 33, 200)],
                         ids=_ids([(7, 20, 8, 13), (64, 300, 64, 100), (300, 517, 33, 200)]))
def test_low_precision_inputs_against_float32_reference(shape, dtype, tile, device, monkeypatch):
    """Outputs are float32 and as exact as the float32 reference on the same (rounded)
    inputs; gradients (in the input dtype) err at most 2x plain torch in that dtype."""
    set_tile(monkeypatch, tile)
    K, M, d, off = shape
    kw = make_inputs(K, M, d, off, dtype, device, seed=21, scale=0.6)
    kw32 = to_device(kw, device, torch.float32)
    red, tau = ALL, 3.0
    fused = ops.score_reduce(**kw, reductions=red, clamp_tau=tau)
    oracle = ref.score_reduce(**kw32, reductions=red, clamp_tau=tau)
    for f, o in zip(fused, oracle):
        assert f.dtype == torch.float32
        torch.testing.assert_close(f, o, rtol=1e-4, atol=1e-4)

    plain = _plain_low_precision(kw, red, tau)
    for f, p, o in zip(fused, plain, oracle):
        assert _err(f, o) <= 2 * _err(p, o) + 1e-4

    w = weights_like(oracle)
    g_fused = grads_of(fused, w, kw)
    g_oracle = grads_of(oracle, w, kw32)
    g_plain = grads_of(plain, [x.to(dtype) for x in w], kw)
    eps = torch.finfo(dtype).eps
    for name, gf, go, gp in zip([k for k in ARGS if kw[k] is not None], g_fused, g_oracle, g_plain):
        assert gf.dtype == kw[name].dtype
        assert torch.isfinite(gf).all()
        floor = eps * go.abs().max().item()  # rounding of the result itself to the input dtype
        assert _err(gf, go) <= 2 * _err(gp, go) + floor, name


# ---------------------------------------------------------------------------
# Estimators on CUDA
# ---------------------------------------------------------------------------

ESTIMATORS = {
    "infonce": (lambda a, b, s, o: infomax_ext.infonce(a, b, scale=s, pos_offset=o),
                lambda S, o: ref.infonce(S, o)),
    "dv": (lambda a, b, s, o: infomax_ext.dv(a, b, scale=s, pos_offset=o), lambda S, o: ref.dv(S, o)),
    "nwj": (lambda a, b, s, o: infomax_ext.nwj(a, b, scale=s, pos_offset=o), lambda S, o: ref.nwj(S, o)),
    "js": (lambda a, b, s, o: infomax_ext.js(a, b, scale=s, pos_offset=o), lambda S, o: ref.js(S, o)),
    "smile": (lambda a, b, s, o: infomax_ext.smile(a, b, tau=1.5, scale=s, pos_offset=o),
              lambda S, o: ref.smile(S, 1.5, o)),
}


@needs_c
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", [(2, 2, 5, 0), (7, 20, 8, 13), (64, 300, 17, 100)],
                         ids=_ids([(2, 2, 5, 0), (7, 20, 8, 13), (64, 300, 17, 100)]))
@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_estimators_match_reference(name, shape, dtype, device):
    assert infomax_ext.backend() == "compiled"
    fused_fn, ref_fn = ESTIMATORS[name]
    K, M, d, off = shape
    kw = make_inputs(K, M, d, off, dtype, device, seed=31, bias=False, scale=0.9)
    a, b, s = kw["a"], kw["b"], kw["scale"]
    v_fused = fused_fn(a, b, s, off)
    v_ref = ref_fn(ref.scores_dot(a, b, s), off)
    assert v_fused.device.type == device
    torch.testing.assert_close(v_fused, v_ref, **tol(dtype))
    for gf, gr in zip(torch.autograd.grad(v_fused, (a, b, s)), torch.autograd.grad(v_ref, (a, b, s))):
        torch.testing.assert_close(gf, gr, **gtol(dtype))


@needs_c
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("K", [2, 7, 300])
def test_uniformity_matches_reference(K, dtype, device):
    g = torch.Generator().manual_seed(K)
    x = torch.nn.functional.normalize(torch.randn(K, 16, generator=g, dtype=torch.float64), dim=1)
    x = x.to(device=device, dtype=dtype).requires_grad_(True)
    u_fused = infomax_ext.uniformity(x, t=2.0)
    u_ref = ref.uniformity(x, t=2.0)
    loose = {} if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(u_fused, u_ref, **loose)
    (g_fused,) = torch.autograd.grad(u_fused, x)
    (g_ref,) = torch.autograd.grad(u_ref, x)
    torch.testing.assert_close(g_fused, g_ref, **loose)


# ---------------------------------------------------------------------------
# No host synchronisation in the hot path
# ---------------------------------------------------------------------------


@needs_c
@needs_cuda
def test_kernels_do_not_synchronise():
    """scale stays on the device (no .item()): neither CUDA entry point waits for the GPU.
    The ops are called directly so that only this extension's code is under test."""
    kw = make_inputs(300, 517, 33, 200, torch.float32, "cuda", seed=12, requires_grad=False)
    args = tuple(kw[k] for k in ARGS)
    g = torch.Generator(device="cuda").manual_seed(0)
    grads = [torch.randn(n, device="cuda", generator=g) for n in (300, 517, 300, 300, 300)]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        outs = torch.ops.infomax_ext.score_reduce(*args, 200, ALL, 2.0)
        back = torch.ops.infomax_ext._score_reduce_backward(*grads, *args, *outs[:4], 200, ALL, 2.0)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert all(torch.isfinite(t).all() for t in back)


# ---------------------------------------------------------------------------
# Every op of the CUDA walkers at awkward sizes, and with several chunks
# ---------------------------------------------------------------------------

# K = 1, 2: partial warps everywhere; 31, 33: either side of a warp; 257: past a
# column-kernel block of 256 rows. M > K with pos_offset > 0 in most.
AWKWARD = [(1, 40, 3, 17), (2, 2, 5, 0), (31, 100, 6, 69), (33, 33, 8, 0), (257, 300, 5, 43)]
LOW = (torch.float16, torch.bfloat16)


def _every_op(kw, red_w, weights, w_pos):
    """score_reduce (all five, with its backward), score_reduce_weighted (one walk or
    two) and symmetric_softmax_mean (x = a) on kw: the outputs and input gradients."""
    inputs = [kw[k] for k in ARGS if kw[k] is not None]
    out = ops.score_reduce(**kw, reductions=ALL, clamp_tau=1.5)
    finite = [o.masked_fill(~torch.isfinite(o), 0) for o in out]  # fully masked columns
    grads = torch.autograd.grad(sum((w * o).sum() for w, o in zip(weights_like(out), finite)), inputs)
    value, *stats, pos = ops.score_reduce_weighted(**kw, reductions=red_w, clamp_tau=1.5, weights=weights,
                                                   w_pos=w_pos)
    wgrads = torch.autograd.grad(value, inputs)
    x = kw["a"]
    lse, mean = ops.symmetric_softmax_mean(x, kw["scale"], kw["row_bias"])
    sgrads = torch.autograd.grad(lse.sum(), [x])
    return list(out) + [value, *stats, pos, lse, mean], list(grads) + list(wgrads) + list(sgrads)


# The default chunk for all; small chunks (several row and column chunks): 2 KiB up to
# K = 33, 32 KiB for K = 257 (10 column chunks of 31 in float32; 20 of 15 in float64).
AWKWARD_TILES = [(s, None) for s in AWKWARD] + [(s, "2048") for s in AWKWARD if s[0] <= 33] + \
    [(AWKWARD[-1], "32768")]


@needs_c
@on_cuda_backends
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, *LOW], ids=str)
@pytest.mark.parametrize("shape, tile", AWKWARD_TILES, ids=[f"{i}-{t}" for i, t in
                                                            zip(_ids([s for s, _ in AWKWARD_TILES]),
                                                                [t for _, t in AWKWARD_TILES])])
def test_awkward_sizes_every_op_matches_cpu_kernels(shape, tile, dtype, backend, device, monkeypatch):
    """Masked columns (a third of the negatives), pos_offset, biases."""
    set_tile(monkeypatch, tile)
    K, M, d, off = shape
    kw = make_inputs(K, M, d, off, dtype, device, seed=K + M, masked=True, scale=0.7)
    kw_cpu = to_device(kw, "cpu")
    red_w = ops.ROW_LSE | ops.NEG_LSE | ops.NEG_CLAMP_LSE | ops.NEG_SOFTPLUS
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    g = torch.Generator().manual_seed(K)
    w = [torch.randn(K, generator=g, dtype=torch.float64).to(acc) for _ in range(5)]
    if M - 1 < 1:
        w[1] = w[2] = w[3] = None  # no negatives: their statistics are -inf / 0
    got, grads = _every_op(kw, red_w, [None if x is None else x.to(device) for x in w[:4]], w[4].to(device))
    with cpu_kernels():
        want, wgrads = _every_op(kw_cpu, red_w, w[:4], w[4])
    low = dtype in LOW
    for n, (x, y) in enumerate(zip(got, want)):
        assert x.dtype == y.dtype and x.shape == y.shape
        t = dict(rtol=1e-4, atol=1e-4) if low else tol(dtype)
        if n == len(got) - 1 and dtype == torch.bfloat16 and backend != "cpu":
            # NB: symmetric_softmax_mean's weights go to the GEMM in bf16 on CUDA (relative
            # error 2^-9 each, summing to 1): |error| <= 2^-9 max |x|.
            t = dict(rtol=0, atol=2.0 ** -8 * kw["a"].abs().max().item())
        torch.testing.assert_close(x.cpu(), y, **t)
    for x, y in zip(grads, wgrads):
        assert x.dtype == y.dtype and x.shape == y.shape and torch.isfinite(x).all()
        # NB: bf16 G (CUDA) and float32 G (CPU) round differently; judged at the gradient's scale
        scale = y.abs().max().item()
        t = dict(rtol=2e-2, atol=2e-2 * scale + 1e-3) if low else gtol(dtype)
        torch.testing.assert_close(x.cpu(), y, **t)
    if not low:
        oracle = ref.score_reduce(**kw_cpu, reductions=ALL, clamp_tau=1.5)
        for x, y in zip(got[:5], oracle):
            torch.testing.assert_close(x.cpu(), y.detach(), **tol(dtype))


@needs_c
@on_cuda_backends
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("shape, tile", [
    ((1100, 1100, 8, 0), str(1024 * 1100 * 4)),  # float32: one walk, two row chunks of whole rows
    ((70, 1100, 5, 1030), str(70 * 256 * 4)),    # float32: column chunks, forward then backward
    ((33, 90, 4, 7), "256"),                      # tiny chunks: many row and column chunks
], ids=["one-walk-2-row-chunks", "column-chunks", "tiny-chunks"])
def test_weighted_several_chunks_match_reference(shape, tile, dtype, device, monkeypatch):
    set_tile(monkeypatch, tile)
    K, M, d, off = shape
    kw = make_inputs(K, M, d, off, dtype, device, seed=K, masked=True, scale=1.7)
    red = ops.ROW_LSE | ops.NEG_LSE | ops.NEG_CLAMP_LSE | ops.NEG_SOFTPLUS
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    g = torch.Generator().manual_seed(1)
    w = [torch.randn(K, generator=g, dtype=torch.float64).to(device=device, dtype=acc) for _ in range(5)]
    value, *stats, pos = ops.score_reduce_weighted(**kw, reductions=red, clamp_tau=2.0, weights=w[:4], w_pos=w[4])
    out = ref.score_reduce(**kw, reductions=red, clamp_tau=2.0)
    S = ref.scores_dot(kw["a"], kw["b"], kw["scale"], kw["row_bias"], kw["col_bias"])
    pos_o = ref.positive_scores(S, off)
    value_o = sum((x * o).sum() for x, o in zip(w, (out[0], out[2], out[3], out[4], pos_o)))
    t = tol(dtype) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(value, value_o, **t)
    for x, o in zip(stats, out):
        torch.testing.assert_close(x, o.detach(), **t)
    torch.testing.assert_close(pos, pos_o.detach(), **t)
    inputs = [kw[k] for k in ARGS if kw[k] is not None]
    for x, o in zip(torch.autograd.grad(value, inputs), torch.autograd.grad(value_o, inputs)):
        torch.testing.assert_close(x, o, **(gtol(dtype) if dtype == torch.float64 else dict(rtol=1e-3, atol=1e-3)))


@needs_c
@on_cuda_backends
@pytest.mark.parametrize("K, tile", [(65, "128"), (257, "32768"), (1, None), (2, "8")])
def test_symmetric_softmax_mean_several_chunks_match_reference(K, tile, device, monkeypatch):
    set_tile(monkeypatch, tile)
    g = torch.Generator().manual_seed(K)
    x = torch.randn(K, 6, generator=g, dtype=torch.float64).to(device).requires_grad_()
    bias = torch.randn(K, generator=g, dtype=torch.float64).to(device)
    bias[K // 3] = -math.inf  # a masked row and column
    lse, mean = ops.symmetric_softmax_mean(x, 0.9, bias)
    lse_o, mean_o = ref.symmetric_softmax_mean(x, 0.9, bias)
    torch.testing.assert_close(lse, lse_o)
    torch.testing.assert_close(mean, mean_o)
    w = torch.randn(K, generator=g, dtype=torch.float64).to(device)
    fin = torch.isfinite(lse_o)
    (gx,) = torch.autograd.grad((w * lse)[fin].sum(), [x])
    # NB: the reference's gradient is NaN through the fully masked row: the CPU kernels
    # (same -inf guards) are the oracle with the mask, the reference without it.
    with cpu_kernels():
        x_cpu = x.detach().cpu().requires_grad_()
        lse_c = ops.symmetric_softmax_mean(x_cpu, 0.9, bias.cpu())[0]
        (gc,) = torch.autograd.grad((w.cpu() * lse_c)[fin.cpu()].sum(), [x_cpu])
    torch.testing.assert_close(gx.cpu(), gc)
    bias[K // 3] = 0.0
    (gx,) = torch.autograd.grad((w * ops.symmetric_softmax_mean(x, 0.9, bias)[0]).sum(), [x])
    (go,) = torch.autograd.grad((w * ref.symmetric_softmax_mean(x, 0.9, bias)[0]).sum(), [x])
    torch.testing.assert_close(gx, go)


@needs_c
@on_cuda_backends
def test_bf16_bias_gradients_are_sums_of_float32_g(device, monkeypatch):
    """bf16 inputs: G goes to the GEMMs in bf16, but the row and column bias gradients
    (float32 biases) are sums of the float32 G: as exact as the float32 reference on the
    same rounded inputs, not bf16-rounded. Two row chunks, one walk and two walks."""
    set_tile(monkeypatch, str(40 * 300 * 4))
    K, M, off = 80, 300, 7
    kw = make_inputs(K, M, 16, off, torch.bfloat16, device, seed=5, scale=0.8)
    kw32 = to_device(kw, device, torch.float32)
    red = ops.ROW_LSE | ops.COL_LSE | ops.NEG_SOFTPLUS
    out = ops.score_reduce(**kw, reductions=red)
    out32 = ref.score_reduce(**kw32, reductions=red)
    w = weights_like(out32)
    biases = lambda k: [k["row_bias"], k["col_bias"]]  # noqa: E731
    for g, o in zip(torch.autograd.grad(sum((x * y).sum() for x, y in zip(w, out)), biases(kw)),
                    torch.autograd.grad(sum((x * y).sum() for x, y in zip(w, out32)), biases(kw32))):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, o, rtol=1e-4, atol=1e-4 * o.abs().max().item())
    wr = torch.randn(K, generator=torch.Generator().manual_seed(2)).to(device)
    value = ops.score_reduce_weighted(**kw, reductions=ops.ROW_LSE, weights=(wr, None, None, None), w_pos=-wr)[0]
    S = ref.scores_dot(kw32["a"], kw32["b"], kw32["scale"], kw32["row_bias"], kw32["col_bias"])
    oracle = (wr * (torch.logsumexp(S, 1) - ref.positive_scores(S, off))).sum()
    # NB: d value / d row_bias = w (1 - 1): cancels to rounding; judged at the terms' scale (|w| ~ 1).
    for g, o in zip(torch.autograd.grad(value, biases(kw)), torch.autograd.grad(oracle, biases(kw32))):
        torch.testing.assert_close(g, o, rtol=1e-4, atol=1e-5)
