"""score_reduce against the materialising reference, one test body per behaviour, each on
every backend (conftest fixture ``device``: the CPU kernels, the CUDA kernels' own code
emulated on the CPU, and the CUDA kernels where there is a GPU). The CUDA walkers' own
checks (chunk walks, CPU against CUDA kernels, streams) are in tests/test_devices.py.

Convention: S = scale * a b^T + row_bias + col_bias is (K, M), rows are anchors a
(view 1), columns candidates b (view 2), the positive of row i is column
i + pos_offset. ``INFOMAX_EXT_CUDA_TILE_BYTES`` shrinks the CUDA walker's chunk of S
so that small inputs walk many row and column chunks (the merge paths).
"""
import math
import os
import platform
import subprocess
import sys

import pytest
import torch

import infomax_ext
from infomax_ext import ops, reference as ref
from helpers import (ARGS, BITS, SHAPES, SMALL_SHAPES, _ids, cpu_kernels, grads_of, gtol, make_inputs, needs_c, set_tile,
                     to_device, tol, weights_like)

pytestmark = [pytest.mark.usefixtures("default_cuda_tiles"),
              pytest.mark.skipif(not infomax_ext._backend.HAS_C, reason="compiled module not built")]

ALL = ops.ALL_REDUCTIONS
# Chunk budgets: the default (one chunk for small inputs); 1 KiB (K=300: 2 row chunks x
# 517 one-column chunks; K=64: 4-column chunks); 64 bytes (a few rows x 1-2 columns).
TILES = [None, "1024", "64"]
# The CPU kernels' tile edges (64-row blocks, 512-column tiles), with the default budget.
CPU_TILE_SHAPES = [(64, 512, 8, 0), (65, 513, 5, 1), (63, 1030, 3, 500)]


@needs_c
@pytest.mark.parametrize("tile", TILES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", SHAPES + CPU_TILE_SHAPES, ids=_ids(SHAPES + CPU_TILE_SHAPES))
def test_values_and_gradients_match_reference(shape, dtype, tile, device, monkeypatch):
    if tile == "64" and shape not in SMALL_SHAPES or tile is not None and shape in CPU_TILE_SHAPES:
        pytest.skip("tiny chunks only on small shapes (launch count)")
    set_tile(monkeypatch, tile)
    K, M, d, off = shape
    n = (SHAPES + CPU_TILE_SHAPES).index(shape)
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
def test_masked_entries_never_nan(device):
    """-inf biases mask pairs: a row whose negatives are all masked has neg_lse -inf, and
    every gradient stays finite."""
    kw = make_inputs(4, 6, 3, 1, torch.float64, device, bias=False, scale=1.0)
    a, b = kw["a"], kw["b"]
    cb = torch.zeros(6, dtype=torch.float64, device=device)
    cb[[0, 2, 3, 4, 5]] = -math.inf  # only column 1 survives
    rb = torch.zeros(4, dtype=torch.float64, device=device)
    rb[3] = -math.inf  # a fully masked row
    kw.update(row_bias=rb, col_bias=cb)
    fused = ops.score_reduce(**kw, reductions=ALL, clamp_tau=2.0)
    oracle = ref.score_reduce(**kw, reductions=ALL, clamp_tau=2.0)
    for f, o in zip(fused, oracle):
        torch.testing.assert_close(f, o)
    assert fused[2][0] == -math.inf  # row 0's only unmasked column is its positive
    assert fused[0][3] == -math.inf and fused[2][3] == -math.inf
    loss = fused[0][:3].sum() + fused[2][[1, 2]].sum() + fused[4].sum() + fused[3].sum() + fused[1][1]
    ga, gb = torch.autograd.grad(loss, [a, b])
    assert torch.isfinite(ga).all() and torch.isfinite(gb).all()


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
@pytest.mark.parametrize("M, off, bias, scale, seed", [(80, 5, True, 40.0, 2), (600, 0, False, 30.0, 5),
                                                       (600, 0, False, 100.0, 5)])
def test_large_logits_do_not_overflow(M, off, bias, scale, seed, device):
    """Scores up to the scale (unit rows) in float32 match float64."""
    kw = make_inputs(33, M, 16, off, torch.float32, device, seed=seed, scale=scale, bias=bias)
    if not bias:
        kw["a"] = torch.nn.functional.normalize(kw["a"].detach(), dim=1)
        kw["b"] = torch.nn.functional.normalize(kw["b"].detach(), dim=1)
    kw64 = to_device(kw, device, torch.float64)
    kw64["scale"] = kw64["scale"].detach().double().requires_grad_(True)
    for k in ("row_bias", "col_bias"):
        if kw64[k] is not None:
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
@pytest.mark.parametrize("path", ["fused", "weighted", "reference"])
def test_clamp_gradient_is_zero_at_the_bounds(path, device):
    """Negatives scored exactly -tau, +tau and 1.5 (all exact in binary): NEG_CLAMP_LSE's
    gradient passes the inside score only (0 at the bounds: the minimum-norm subgradient,
    whatever torch's clamp does there). By hand, with w = exp(1.5 - lse) and lse =
    log(e^-3 + e^3 + e^1.5): dL/da_0 = scale w b_3, dL/db_3 = scale w a_0, dL/dscale =
    w <a_0, b_3>, and 0 for b_0 (the positive), b_1 and b_2 (the bounds)."""
    tau, s = 3.0, 1.5
    a = torch.tensor([[1.0]], dtype=torch.float64, device=device, requires_grad=True)
    b = torch.tensor([[0.25], [-2.0], [2.0], [1.0]], dtype=torch.float64, device=device, requires_grad=True)
    scale = torch.tensor(s, dtype=torch.float64, device=device, requires_grad=True)
    args = (a, b, scale, None, None, 0, ops.NEG_CLAMP_LSE, tau)
    if path == "weighted":
        value = ops.score_reduce_weighted(*args, weights=(None, None, torch.ones(1, dtype=torch.float64,
                                                                                 device=device), None)).value
    else:
        value = (ops if path == "fused" else ref).score_reduce(*args)[3].sum()
    lse = math.log(math.exp(-3.0) + math.exp(3.0) + math.exp(1.5))
    w = math.exp(1.5 - lse)
    torch.testing.assert_close(value.item(), lse, rtol=1e-15, atol=0)
    ga, gb, gs = torch.autograd.grad(value, (a, b, scale))
    torch.testing.assert_close(ga.cpu(), torch.tensor([[s * w]], dtype=torch.float64), rtol=1e-14, atol=0)
    torch.testing.assert_close(gb.cpu(), torch.tensor([[0.0], [0.0], [0.0], [s * w]], dtype=torch.float64),
                               rtol=1e-14, atol=0)
    torch.testing.assert_close(gs.item(), w, rtol=1e-14, atol=0)


@needs_c
@pytest.mark.parametrize("tile", [None, "64"])
@pytest.mark.parametrize("shape", [(1, 3, 2, 2), (3, 5, 4, 1), (6, 11, 3, 4), (70, 520, 2, 7)], ids=str)
def test_gradcheck_float64(shape, tile, device, monkeypatch):
    """Every output and input; (70, 520) crosses the CPU kernels' row-block and column-tile edges."""
    if shape[0] > 10 and (tile is not None or device != "cpu" or infomax_ext._backend.op_namespace() != "infomax_ext"):
        pytest.skip("the tile-edge shape is the CPU kernels' (gradcheck's many calls)")
    set_tile(monkeypatch, tile)
    K, M, d, off = shape
    kw = make_inputs(K, M, d, off, torch.float64, device, seed=K)

    def f(a, b, scale, rb, cb):
        return ops.score_reduce(a, b, scale, rb, cb, off, ALL, 1.5)

    assert torch.autograd.gradcheck(f, tuple(kw[k] for k in ARGS), fast_mode=K > 10)


@needs_c
@pytest.mark.parametrize("red", [ops.ROW_LSE, ops.COL_LSE | ops.NEG_SOFTPLUS, ops.NEG_LSE | ops.NEG_CLAMP_LSE])
def test_gradcheck_subsets_without_biases(red, device):
    kw = make_inputs(4, 7, 3, 2, torch.float64, device, seed=9, bias=False)

    def f(a, b, scale):
        return ops.score_reduce(a, b, scale, None, None, 2, red, 0.8)

    assert torch.autograd.gradcheck(f, (kw["a"], kw["b"], kw["scale"]))


@needs_c
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
    g = [torch.randn_like(outs[k]) for k in (0, 1, 2, 3, 4, 0)]  # the five statistics' weights, the positives'
    torch.library.opcheck(lib._score_reduce_with_grad, (*g, *det, 2, ALL, 2.0))
    torch.library.opcheck(lib._score_reduce_with_grad, (*g[:1], g[1][:0], *g[2:], *det, 2, ALL & ~ops.COL_LSE, 2.0))
    torch.library.opcheck(lib.symmetric_softmax_mean, (a, scale, rb, True))


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


def test_bad_inputs_raise_clear_errors(device):
    kw = make_inputs(3, 5, 4, 0, torch.float64, device, requires_grad=False)
    a, b = kw["a"], kw["b"]
    one = torch.tensor(1.0, dtype=torch.float64, device=device)
    op = ops._ops().score_reduce  # the emulated backend's inside the emulation
    with pytest.raises(RuntimeError, match="a must be 2-D"):
        op(a[0], b, one, None, None, 0, 31, 5.0)
    with pytest.raises(RuntimeError, match="feature sizes differ"):
        op(a, b[:, :3], one, None, None, 0, 31, 5.0)
    with pytest.raises(RuntimeError, match="M >= K"):
        op(b, a, one, None, None, 0, 31, 5.0)
    with pytest.raises(RuntimeError, match="pos_offset"):
        op(a, b, one, None, None, 3, 31, 5.0)
    with pytest.raises(RuntimeError, match="dtypes differ"):
        op(a, b.float(), one, None, None, 0, 31, 5.0)
    with pytest.raises(RuntimeError, match="row_bias"):
        op(a, b, one, torch.zeros(4, dtype=torch.float64, device=device), None, 0, 31, 5.0)
    with pytest.raises(RuntimeError, match="clamp_tau"):
        op(a, b, one, None, None, 0, ops.NEG_CLAMP_LSE, 0.0)
    with pytest.raises(RuntimeError, match="non-empty"):
        op(a[:0], b, one, None, None, 0, 31, 5.0)
    with pytest.raises(RuntimeError, match="floating point"):
        op(a.long(), b.long(), one, None, None, 0, 31, 5.0)


# ---------------------------------------------------------------------------
# Estimators and uniformity on every backend
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
# The CPU kernels' own: threads, the baseline ISA, and the package without _C
# ---------------------------------------------------------------------------


def test_reruns_are_bitwise_identical_and_threads_agree():
    kw = make_inputs(200, 1500, 16, 0, torch.float32, seed=11, bias=False, requires_grad=False)
    a, b = kw["a"], kw["b"]
    first = ops.score_reduce(a, b, 2.0)
    again = ops.score_reduce(a, b, 2.0)
    for x, y in zip(first, again):
        assert torch.equal(x, y)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = ops.score_reduce(a, b, 2.0)
    finally:
        torch.set_num_threads(n)
    for x, y in zip(first, single):
        torch.testing.assert_close(x, y)


def test_package_falls_back_to_reference_without_C(tmp_path):
    """With _C unloadable the package imports, warns and computes through reference.py."""
    code = r"""
import sys, warnings, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "infomax_ext._C":
            raise ImportError("blocked for the test")
sys.meta_path.insert(0, Block())
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    import torch, infomax_ext
assert any("reference" in str(x.message) for x in w), [str(x.message) for x in w]
assert infomax_ext.backend() == "reference"
a = torch.randn(5, 3, dtype=torch.float64); b = torch.randn(6, 3, dtype=torch.float64)
S = infomax_ext.reference.scores_dot(a, b, 2.0)
# NB: the op wrapper is where the reference takes over: the same function, bit for bit;
# the estimator composed on it equals the reference estimator up to rounding order.
for x, y in zip(infomax_ext.ops.score_reduce(a, b, 2.0, pos_offset=1), infomax_ext.reference.score_reduce(a, b, 2.0, pos_offset=1)):
    assert torch.equal(x, y)
torch.testing.assert_close(infomax_ext.infonce(a, b, 2.0, pos_offset=1), infomax_ext.reference.infonce(S, 1), rtol=1e-14, atol=1e-14)
print("ok")
"""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=str(tmp_path))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def _cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            return set(next(line for line in f if line.startswith("flags")).split(":")[1].split())
    except (OSError, StopIteration):
        return set()


def test_widest_isa_clone_is_picked():
    """The CPU epilogues exist for the baseline ISA, AVX2 + FMA and AVX-512; without a
    cap the widest one this CPU runs is picked."""
    flags = _cpu_flags()
    if not flags:
        pytest.skip("no /proc/cpuinfo flags to compare with")
    want = ("avx512" if {"avx512f", "avx512bw", "avx512dq", "avx512vl"} <= flags
            else "avx2" if {"avx2", "fma"} <= flags else "base")
    if platform.machine() not in ("x86_64", "AMD64", "i686"):
        want = "base"
    assert infomax_ext.build_info()["cpu_isa"] == want


@pytest.mark.parametrize("isa, env", [("base", {"INFOMAX_EXT_CPU_ISA": "base"}),
                                      ("base", {"INFOMAX_EXT_NO_AVX2": "1"}),
                                      ("avx2", {"INFOMAX_EXT_CPU_ISA": "avx2"})])
def test_narrower_isa_clones_match_reference(isa, env):
    """INFOMAX_EXT_CPU_ISA caps the clone of the epilogues (INFOMAX_EXT_NO_AVX2=1: the
    baseline): rerun the float32 and float64 comparisons in a fresh process on that path."""
    if isa == "avx2" and not {"avx2", "fma"} <= _cpu_flags():
        pytest.skip("this CPU has no AVX2 + FMA")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root, **env)
    check = subprocess.run([sys.executable, "-c", "import infomax_ext; print(infomax_ext.build_info()['cpu_isa'])"],
                           capture_output=True, text=True, env=env, cwd=root)
    assert check.stdout.strip() == isa, check.stderr[-2000:]
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          "tests/test_score_reduce.py", "tests/test_weighted.py",
                          "-k", "values_and_gradients and cpu or large_logits or with_grad and cpu"],
                         capture_output=True, text=True, env=env, cwd=root)
    assert out.returncode == 0, out.stdout[-3000:]


@pytest.mark.parametrize("off", ["0", "1"], ids=["blas", "aten"])
def test_tile_gemms_match_reference_on_the_blas_and_through_aten(off):
    """The CPU walkers call the BLAS's sgemm_ / dgemm_ directly where torch exports
    them, and at::addmm_out otherwise (INFOMAX_EXT_NO_BLAS_GEMM=1): rerun the float32 and
    float64 comparisons of the forward, the recomputing backward and the one walk in a
    fresh process on each path (uniformity's weighted means included)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root, INFOMAX_EXT_NO_BLAS_GEMM=off)
    check = subprocess.run([sys.executable, "-c", "import infomax_ext; print(infomax_ext.build_info()['cpu_blas_gemm'])"],
                           capture_output=True, text=True, env=env, cwd=root)
    assert check.stdout.strip() == ("False" if off == "1" else "True"), check.stderr[-2000:]
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          "tests/test_score_reduce.py", "tests/test_weighted.py", "tests/test_symmetric.py",
                          "-k", "(values or value_statistics or uniformity_value or with_grad) and cpu or large_logits"],
                         capture_output=True, text=True, env=env, cwd=root)
    assert out.returncode == 0, out.stdout[-3000:]
    assert " passed" in out.stdout, out.stdout[-3000:]


BF16_CHECK = r"""
import torch, infomax_ext as ie
from infomax_ext import reference as ref
torch.manual_seed(0)
for K, M, off in [(1, 1, 0), (2, 5, 3), (300, 700, 17)]:
    a = torch.randn(K, 24).bfloat16().requires_grad_()
    b = torch.randn(M, 24).bfloat16().requires_grad_()
    v = ie.infonce(a, b, scale=3.0, pos_offset=off)
    v.backward()
    a64, b64 = a.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    w = ref.infonce(ref.scores_dot(a64, b64, torch.tensor(3.0, dtype=torch.float64)), off)
    w.backward()
    torch.testing.assert_close(v.double(), w, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(a.grad.double(), a64.grad, rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(b.grad.double(), b64.grad, rtol=2e-2, atol=2e-3)
# the recomputing backward: column tiles of 512, several row blocks
x = torch.randn(600, 24).bfloat16().requires_grad_()
y = torch.randn(600, 24).bfloat16().requires_grad_()
v = ie.infonce_symmetric(x, y, scale=3.0)
v.backward()
x64, y64 = x.detach().double().requires_grad_(), y.detach().double().requires_grad_()
w = ref.infonce_symmetric(ref.scores_dot(x64, y64, torch.tensor(3.0, dtype=torch.float64)))
w.backward()
torch.testing.assert_close(v.double(), w, rtol=1e-4, atol=1e-4)
torch.testing.assert_close(x.grad.double(), x64.grad, rtol=2e-2, atol=2e-3)
torch.testing.assert_close(y.grad.double(), y64.grad, rtol=2e-2, atol=2e-3)
print(ie.build_info()["cpu_bf16_gemm"])
"""


@pytest.mark.parametrize("off", ["0", "1"], ids=["bf16_gemm", "upcast"])
def test_bf16_inputs_match_float64_reference_with_and_without_bf16_gemm(off):
    """bf16 inputs on the CPU: multiplied by a bf16 GEMM with float32 output where the
    BLAS has one (INFOMAX_EXT_NO_BF16_GEMM=1: upcast to float32 first); either way the
    value and gradients match the float64 reference of the same (bf16) inputs within
    bf16 rounding, over one and several row blocks."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root, INFOMAX_EXT_NO_BF16_GEMM=off)
    out = subprocess.run([sys.executable, "-c", BF16_CHECK], capture_output=True, text=True, env=env, cwd=root)
    assert out.returncode == 0, out.stderr[-3000:]
    if off == "1":
        assert out.stdout.split()[-1] == "False"
