"""The fused concat-MLP op ``concat_score_reduce`` against a materialising oracle, one test
body per behaviour, each on every backend (conftest fixture ``device``: the CPU kernels,
the CUDA kernels' own code emulated on the CPU, the CUDA kernels on a GPU). The CUDA
walkers' own checks (against the CPU op, streams, awkward sizes) are in
tests/test_devices_concat.py.

S[i, j] = w2 . act(P_i + Q_j) + b2 is K x M (rows anchors, columns candidates,
positive of row i at column i + pos_offset). The oracle builds S with
``reference.scores_concat`` (identity first-layer weights, so its P and Q are the
op's P and Q exactly) and computes the five reductions explicitly with
``torch.logsumexp`` and the negatives' mask. Inputs are made in float64 on the CPU,
then moved, so every device and dtype sees the same values.
``INFOMAX_EXT_CUDA_TILE_BYTES`` shrinks the CUDA walker's workspaces so that small
inputs walk several row chunks.
"""
import math
import os
import subprocess
import sys

import pytest
import torch

import infomax_ext
from infomax_ext import ops, reference as ref
from helpers import TILE_ENV, cpu_kernels, set_tile

pytestmark = [pytest.mark.usefixtures("default_cuda_tiles"),
              pytest.mark.skipif(not infomax_ext._backend.HAS_C, reason="compiled module not built")]

ACTS = list(ops.ACTIVATION_CODES)
SMOOTH = ["elu", "tanh", "softplus", "gelu"]
BITS = [ops.ROW_LSE, ops.COL_LSE, ops.NEG_LSE, ops.NEG_CLAMP_LSE, ops.NEG_SOFTPLUS]
TAU = 1.5
# The default budget (one chunk here) and 1 KiB (chunks of 32 rows: K = 70 walks 3).
TILES = [None, "1024"]

# (K, M, H, pos_offset): K = 1 and 2, sizes off the CPU's 64-row / 512-column tile grid
# and the CUDA's 32 x 32 tiles and 32-wide hidden chunks, M > K, pos_offset > 0, H odd
# and even (vector remainders), M past one tile row many times.
CASES = [
    (1, 1, 3, 0),
    (1, 5, 4, 3),
    (2, 2, 5, 0),
    (2, 9, 33, 4),
    (7, 13, 9, 4),
    (32, 32, 32, 0),
    (33, 65, 64, 31),
    (64, 64, 8, 0),
    (64, 513, 3, 100),
    (70, 600, 17, 17),
    (70, 1030, 5, 960),
]


def case_id(c):
    return "K{}-M{}-H{}-off{}".format(*c)


def make_inputs(K, M, H, seed=0, dtype=torch.float64, noncontig=False, spread=1.0, requires_grad=True):
    g = torch.Generator().manual_seed(seed)
    P = torch.randn(K, H, generator=g, dtype=torch.float64) * spread
    Q = torch.randn(M, H, generator=g, dtype=torch.float64) * spread
    w2 = torch.randn(H, generator=g, dtype=torch.float64) / math.sqrt(H)
    b2 = torch.randn((), generator=g, dtype=torch.float64)
    P, Q, w2, b2 = (t.to(dtype) for t in (P, Q, w2, b2))
    if noncontig:
        P = P.t().contiguous().t()  # column-major view, same values
        Q = torch.cat([Q, Q], 1)[:, ::2]  # every other column of a wider tensor
        assert not Q.is_contiguous()
    return [t.requires_grad_(requires_grad) for t in (P, Q, w2, b2)]


def oracle(P, Q, w2, b2, activation, pos_offset, reductions=ops.ALL_REDUCTIONS, tau=TAU):
    """The five reductions on a materialised S, in the accumulation dtype."""
    acc = ops.acc_dtype(P.dtype)
    P, Q, w2, b2 = (t.to(acc) for t in (P, Q, w2, b2))
    H = P.shape[1]
    eye = torch.eye(H, dtype=acc)
    S = ref.scores_concat(P, Q, eye, eye, torch.zeros(H, dtype=acc), w2, b2, activation)
    K, M = S.shape
    neg = ref.negative_mask(K, M, pos_offset)
    ninf = torch.full_like(S, -math.inf)
    empty = S.new_empty((0,))
    out = [
        torch.logsumexp(S, 1),
        torch.logsumexp(S, 0),
        torch.logsumexp(torch.where(neg, S, ninf), 1),
        torch.logsumexp(torch.where(neg, S.clamp(-tau, tau), ninf), 1),
        torch.where(neg, torch.logaddexp(S, torch.zeros_like(S)), torch.zeros_like(S)).sum(1),
    ]
    return tuple(o if reductions & bit else empty for o, bit in zip(out, BITS))


def fused(P, Q, w2, b2, activation, pos_offset, reductions=ops.ALL_REDUCTIONS, tau=TAU):
    return ops.concat_score_reduce(P, Q, w2, b2, activation, pos_offset, reductions, tau)


def weighted_grads(outputs, weights, inputs):
    # NB: with M == 1 the negatives' reductions are -inf (no negatives); leave them out.
    loss = sum((w * o).sum() for w, o in zip(weights, outputs) if o.numel() and torch.isfinite(o).all())
    return torch.autograd.grad(loss, inputs)


def on_device(inputs, device, dtype=None):
    """The same tensors on device (optionally cast), as new leaves."""
    return [t.detach().to(device=device, dtype=dtype or t.dtype).requires_grad_(t.requires_grad) for t in inputs]


def weights_for(outputs, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(o.shape, generator=g, dtype=torch.float64) for o in outputs]


def close(got, want, **tol):
    torch.testing.assert_close(got.detach().cpu().to(want.dtype), want.detach().cpu(), **tol)


# ---------------------------------------------------------------------------
# Values and gradients against the oracle
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("tile", TILES)
@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_float64_values_and_gradients_match_oracle(case, activation, tile, monkeypatch, device):
    set_tile(monkeypatch, tile)
    K, M, H, off = case
    n = CASES.index(case)
    host = make_inputs(K, M, H, seed=n, noncontig=n % 2 == 1)
    dev = on_device(host, device)
    got, want = fused(*dev, activation, off), oracle(*host, activation, off)
    for f, o in zip(got, want):
        assert f.device.type == device and f.shape == o.shape and f.dtype == o.dtype
        close(f, o)
    weights = weights_for(want, n)
    gf = weighted_grads(got, [w.to(device) for w in weights], dev)
    for x, t, y in zip(gf, dev, weighted_grads(want, weights, host)):
        assert x.device == t.device and x.dtype == t.dtype and x.shape == t.shape
        close(x, y)


@pytest.mark.parametrize("tile", TILES)
@pytest.mark.parametrize("activation", ACTS)
def test_float32_matches_cpu_op_and_oracle(activation, tile, monkeypatch, device):
    set_tile(monkeypatch, tile)
    host = make_inputs(70, 600, 40, seed=3, dtype=torch.float32, noncontig=True)
    dev = on_device(host, device)
    host64 = [t.detach().double().requires_grad_() for t in host]
    with cpu_kernels():
        cpu = fused(*host, activation, 5)
    got, want = fused(*dev, activation, 5), oracle(*host64, activation, 5)
    for f, c, o in zip(got, cpu, want):
        assert f.dtype == torch.float32
        close(f, c, rtol=2e-5, atol=2e-5)
        close(f, o, rtol=2e-5, atol=2e-5)
    weights = weights_for(want, 1)
    gf = weighted_grads(got, [w.float().to(device) for w in weights], dev)
    with cpu_kernels():
        gc = weighted_grads(cpu, [w.float() for w in weights], host)
    for x, c, y in zip(gf, gc, weighted_grads(want, weights, host64)):
        # NB: dw2 and db2 sum K * M = 42000 float32 terms; judged against float64.
        tol = dict(rtol=1e-4, atol=1e-5 * y.abs().max().item())
        close(x, c, **tol)
        close(x, y, **tol)


@pytest.mark.parametrize("bit", BITS)
def test_single_reduction_only_fills_its_output(bit, device):
    host = make_inputs(9, 70, 6, seed=2)
    dev = on_device(host, device)
    got, want = fused(*dev, "elu", 3, bit, 1.0), oracle(*host, "elu", 3, bit, 1.0)
    idx = BITS.index(bit)
    for n, (f, o) in enumerate(zip(got, want)):
        assert f.shape == o.shape
        assert (f.numel() > 0) == (n == idx)
    close(got[idx], want[idx])
    for x, y in zip(torch.autograd.grad(got[idx].sum(), dev), torch.autograd.grad(want[idx].sum(), host)):
        close(x, y)


def test_unused_outputs_and_zero_upstream_gradient(device):
    host = make_inputs(5, 8, 4, seed=6)
    dev = on_device(host, device)
    out = fused(*dev, "tanh", 1)
    (gP,) = torch.autograd.grad(out[2].sum(), [dev[0]])  # one output of five used
    (gP_ref,) = torch.autograd.grad(oracle(*host, "tanh", 1)[2].sum(), [host[0]])
    close(gP, gP_ref)
    out = fused(*dev, "tanh", 1)
    grads = torch.autograd.grad((0 * out[0]).sum(), dev)
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)


def test_unused_output_gradients_and_b2_as_float():
    P, Q, w2, _ = make_inputs(5, 8, 4, seed=6)
    out = ops.concat_score_reduce(P, Q, w2, 0.25, "tanh", 1)
    (gP,) = torch.autograd.grad(out[2].sum(), [P])  # one output of five used
    (gP_ref,) = torch.autograd.grad(oracle(P, Q, w2, torch.tensor(0.25, dtype=torch.float64), "tanh", 1)[2].sum(), [P])
    torch.testing.assert_close(gP, gP_ref)


def test_large_scores_stay_finite_and_exact(device):
    P, Q, w2, b2 = make_inputs(33, 600, 16, seed=5, requires_grad=False)
    w2 = w2 * 200.0
    for act in ("relu", "softplus"):
        got, want = fused(*on_device([P, Q, w2, b2], device), act, 0), oracle(P, Q, w2, b2, act, 0)
        for f, o in zip(got, want):
            assert torch.isfinite(f).all()
            close(f, o)


@pytest.mark.parametrize("activation", ACTS)
def test_float32_activation_math_elementwise(activation, device):
    """K = 1, H = 1, w2 = 1, b2 = 0: col_lse[j] = act(Q[j]) and its gradient act'(Q[j])."""
    x = torch.cat([torch.linspace(-30, 30, 20001), torch.tensor([0.0, 1e-30, -1e-30, 1e-6, -1e-6, 88.5, -100.0])])
    P = torch.zeros(1, 1, device=device, requires_grad=True)
    Q = x[:, None].to(device).requires_grad_()
    w2, b2 = torch.ones(1, device=device), torch.zeros((), device=device)
    col = ops.concat_score_reduce(P, Q, w2, b2, activation, 0, ops.COL_LSE)[1]
    (dQ,) = torch.autograd.grad(col.sum(), [Q])
    x64 = x.double().requires_grad_()
    want = ref.activation_fn(activation)(x64)
    (dwant,) = torch.autograd.grad(want.sum(), [x64])
    close(col, want, rtol=4e-7, atol=1e-7)
    close(dQ[:, 0], dwant, rtol=4e-7, atol=3e-7)


@pytest.mark.parametrize("activation", ACTS)
def test_float32_error_at_most_twice_plain_torch(activation):
    """End to end in float32 against float64, pre-activations spread over [-20, 20]: the fused
    error is at most twice plain torch float32's, plus 1e-6 relative (the walker's
    sequential float32 sums over a row)."""
    P, Q, w2, b2 = make_inputs(40, 300, 16, seed=4, dtype=torch.float32, spread=6.0, requires_grad=False)
    exact = oracle(P.double(), Q.double(), w2.double(), b2.double(), activation, 2)
    plain = oracle(P, Q, w2, b2, activation, 2)
    for f, e, p in zip(fused(P, Q, w2, b2, activation, 2), exact, plain):
        err_fused = (f.double() - e).abs().max().item()
        err_plain = (p.double() - e).abs().max().item()
        assert err_fused <= 2 * err_plain + 1e-6 * e.abs().max().item(), (err_fused, err_plain)
    P, Q, w2, b2 = (t.requires_grad_() for t in (P, Q, w2, b2))
    P64, Q64, w64, b64 = (t.detach().double().requires_grad_() for t in (P, Q, w2, b2))
    gf = torch.autograd.grad(fused(P, Q, w2, b2, activation, 2)[0].sum(), [P, Q, w2, b2])
    gp = torch.autograd.grad(oracle(P, Q, w2, b2, activation, 2)[0].sum(), [P, Q, w2, b2])
    ge = torch.autograd.grad(oracle(P64, Q64, w64, b64, activation, 2)[0].sum(), [P64, Q64, w64, b64])
    for f, p, e in zip(gf, gp, ge):
        err_fused = (f.double() - e).abs().max().item()
        err_plain = (p.double() - e).abs().max().item()
        assert err_fused <= 2 * err_plain + 1e-6 * e.abs().max().item(), (err_fused, err_plain)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_accumulate_in_float32(dtype, device):
    host = make_inputs(33, 520, 24, seed=9, dtype=dtype)
    dev = on_device(host, device)
    got = fused(*dev, "tanh", 3)
    # the op upcasts its inputs once: it equals the float32 oracle (and CPU op) on the upcast inputs
    want = oracle(*[t.detach().float() for t in host], "tanh", 3)
    with cpu_kernels():
        cpu = fused(*host, "tanh", 3)
    for f, o, c in zip(got, want, cpu):
        assert f.dtype == torch.float32
        close(f, o, rtol=2e-5, atol=2e-5)
        close(f, c, rtol=2e-5, atol=2e-5)
    grads = torch.autograd.grad(got[0].sum() + got[1].sum(), dev)
    with cpu_kernels():
        cgrads = torch.autograd.grad(cpu[0].sum() + cpu[1].sum(), host)
    for g, c, t in zip(grads, cgrads, dev):
        assert g.dtype == dtype and g.shape == t.shape and torch.isfinite(g.float()).all()
        # one rounding to the low-precision dtype apart at most
        close(g.float(), c.float(), rtol=1e-2, atol=1e-2 * c.float().abs().max().item() + 1e-6)


# ---------------------------------------------------------------------------
# gradcheck, opcheck, torch.compile, bad input
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("activation", SMOOTH)
@pytest.mark.parametrize("shape", [(1, 3, 2, 2), (3, 5, 4, 1), (2, 2, 3, 0), (33, 35, 3, 2)])
def test_gradcheck_float64(activation, shape, monkeypatch, device):
    K, M, H, off = shape
    if K > 32:
        monkeypatch.setenv(TILE_ENV, "64")  # two row chunks
    inputs = on_device(make_inputs(K, M, H, seed=K + M), device)

    def f(P, Q, w2, b2):
        return ops.concat_score_reduce(P, Q, w2, b2, activation, off, ops.ALL_REDUCTIONS, TAU)

    assert torch.autograd.gradcheck(f, tuple(inputs), fast_mode=K > 32)


def test_gradcheck_off_the_tile_grid():
    inputs = make_inputs(70, 520, 3, seed=8)
    f = lambda P, Q, w2, b2: ops.concat_score_reduce(P, Q, w2, b2, "tanh", 7, ops.ALL_REDUCTIONS, TAU)  # noqa: E731
    assert torch.autograd.gradcheck(f, tuple(inputs), fast_mode=True)


def test_gradcheck_relu_away_from_the_kink(device):
    P = torch.tensor([[0.5, -1.0, 2.0], [-0.7, 0.3, 1.1]], dtype=torch.float64)
    Q = torch.tensor([[0.2, -0.4, 0.1], [1.0, 0.8, -0.5], [-0.2, 2.0, 0.6]], dtype=torch.float64)
    w2 = torch.tensor([0.3, -0.6, 0.9], dtype=torch.float64)
    b2 = torch.tensor(0.1, dtype=torch.float64)
    assert (P[:, None] + Q[None]).abs().min() >= 0.1
    inputs = [t.to(device).requires_grad_() for t in (P, Q, w2, b2)]
    f = lambda P, Q, w2, b2: ops.concat_score_reduce(P, Q, w2, b2, "relu", 1, ops.ALL_REDUCTIONS, TAU)  # noqa: E731
    assert torch.autograd.gradcheck(f, tuple(inputs))


def test_opcheck(device):
    P, Q, w2, b2 = on_device(make_inputs(5, 9, 3), device)
    op = ops._ops().concat_score_reduce  # the emulated backend's inside the emulation
    torch.library.opcheck(op, (P, Q, w2, b2, ops.ACTIVATION_CODES["tanh"], 2, 31, TAU))
    torch.library.opcheck(op, (P, Q, w2, b2, ops.ACTIVATION_CODES["relu"], 0, ops.ROW_LSE, 5.0))
    det = [t.detach() for t in (P, Q, w2, b2)]
    outs = op(*det, 1, 2, 31, TAU)
    grads = [torch.randn_like(o) for o in outs]
    torch.library.opcheck(ops._ops()._concat_score_reduce_backward,
                          (*grads, *det, 1, *outs[:4], 2, 31, TAU))


def test_torch_compile_fullgraph_equals_eager():
    P, Q, w2, b2 = make_inputs(7, 20, 5, seed=1, dtype=torch.float32)

    def loss(P, Q, w2, b2):
        row, col, neg, clamp, sp = ops.concat_score_reduce(P, Q, w2, b2, "tanh", 3, ops.ALL_REDUCTIONS, TAU)
        return row.sum() + col.mean() - neg.sum() + clamp.mean() + sp.sum()

    compiled = torch.compile(loss, fullgraph=True)
    eager_value = loss(P, Q, w2, b2)
    eager_grads = torch.autograd.grad(eager_value, [P, Q, w2, b2])
    comp_value = compiled(P, Q, w2, b2)
    comp_grads = torch.autograd.grad(comp_value, [P, Q, w2, b2])
    torch.testing.assert_close(comp_value, eager_value)
    for c, e in zip(comp_grads, eager_grads):
        torch.testing.assert_close(c, e)


def test_bad_inputs_raise_clear_errors(device):
    P, Q, w2, b2 = on_device(make_inputs(3, 5, 4, requires_grad=False), device)
    op = ops._ops().concat_score_reduce  # the emulated backend's inside the emulation

    def raises(match, *args):
        with pytest.raises(RuntimeError, match=match):
            op(*args)

    raises("P must be 2-D", P[0], Q, w2, b2, 0, 0, 31, 5.0)
    raises("Q must be 2-D", P, Q[None], w2, b2, 0, 0, 31, 5.0)
    raises("hidden sizes differ", P, Q[:, :3], w2, b2, 0, 0, 31, 5.0)
    raises("M >= K", Q, P, w2, b2, 0, 0, 31, 5.0)
    raises(r"pos_offset must be in \[0, M-K\] = \[0, 2\]", P, Q, w2, b2, 0, 3, 31, 5.0)
    raises("pos_offset", P, Q, w2, b2, 0, -1, 31, 5.0)
    raises(r"w2 must have shape \(H,\)", P, Q, w2[:3], b2, 0, 0, 31, 5.0)
    raises("b2 must have one element", P, Q, w2, torch.zeros(2, dtype=torch.float64, device=device), 0, 0, 31, 5.0)
    raises("P and Q dtypes differ", P, Q.float(), w2, b2, 0, 0, 31, 5.0)
    raises("P must be floating point", P.long(), Q.long(), w2, b2, 0, 0, 31, 5.0)
    raises("w2 must be floating point", P, Q, w2.long(), b2, 0, 0, 31, 5.0)
    raises("activation must be a code", P, Q, w2, b2, 7, 0, 31, 5.0)
    raises("activation must be a code", P, Q, w2, b2, -1, 0, 31, 5.0)
    raises("reductions must be a non-zero bit mask", P, Q, w2, b2, 0, 0, 0, 5.0)
    raises("clamp_tau must be > 0", P, Q, w2, b2, 0, 0, ops.NEG_CLAMP_LSE, 0.0)
    raises("non-empty", P[:0], Q, w2, b2, 0, 0, 31, 5.0)
    with pytest.raises(ValueError, match="unknown activation 'swish'"):
        ops.concat_score_reduce(P, Q, w2, b2, "swish")
    assert ops.activation_code("tanh") == ops.activation_code(2) == 2
    if device == "cuda":
        raises("must be on one device", P, Q.cpu(), w2, b2, 0, 0, 31, 5.0)


# ---------------------------------------------------------------------------
# The CPU kernels' own: threads and the baseline ISA
# ---------------------------------------------------------------------------


def test_reruns_are_bitwise_identical_and_threads_agree():
    P, Q, w2, b2 = make_inputs(150, 1100, 16, seed=11, dtype=torch.float32)
    first = fused(P, Q, w2, b2, "gelu", 0)
    g1 = torch.autograd.grad(first[0].sum() + first[1].sum(), [P, Q, w2, b2])
    again = fused(P, Q, w2, b2, "gelu", 0)
    g2 = torch.autograd.grad(again[0].sum() + again[1].sum(), [P, Q, w2, b2])
    for x, y in zip(first + g1, again + g2):
        assert torch.equal(x, y)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = fused(P, Q, w2, b2, "gelu", 0)
    finally:
        torch.set_num_threads(n)
    for x, y in zip(first, single):
        torch.testing.assert_close(x, y)


@pytest.mark.parametrize("isa", ["base", "avx2"])
def test_narrower_isa_paths_match_oracle(isa):
    """On x86 the hot loops also exist compiled for AVX2 and AVX-512, the widest the CPU
    runs picked at run time; INFOMAX_EXT_CPU_ISA caps it, in a fresh process."""
    code = r"""
import sys, torch
sys.path.insert(0, %r)
import test_concat as t
for n, act in enumerate(t.ACTS):
    inputs = t.make_inputs(70, 530, 13, seed=n, noncontig=True)
    got, want = t.fused(*inputs, act, 4), t.oracle(*inputs, act, 4)
    for f, o in zip(got, want):
        torch.testing.assert_close(f, o)
    w = [torch.randn(o.shape, dtype=torch.float64) for o in want]
    for a, b in zip(t.weighted_grads(got, w, inputs), t.weighted_grads(want, w, inputs)):
        torch.testing.assert_close(a, b)
    x = t.make_inputs(9, 40, 16, seed=n, dtype=torch.float32)
    for f, o in zip(t.fused(*x, act, 1), t.oracle(*[v.double() for v in x], act, 1)):
        torch.testing.assert_close(f.double(), o, rtol=2e-5, atol=2e-5)
import infomax_ext
print(infomax_ext.build_info()["cpu_isa"], "ok")
""" % os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, INFOMAX_EXT_CPU_ISA=isa)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]
    assert out.stdout.split()[-2] in (isa, "base")  # base where the CPU lacks the ISA
