"""Autograd that never lies: double backward of every estimator and loss, in-place
changes caught by the version counter, and the numerics of masks, overflow, infinities
and translation at the estimator and loss level."""
import math

import pytest
import torch

import infomax_ext as ie
from infomax_ext import critics as C
from infomax_ext import estimators as est
from infomax_ext import losses as L
from infomax_ext import ops
from infomax_ext import reference as ref

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64


def leaf(*shape, seed=0, scale=1.0, device="cpu", dtype=F64):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=g, dtype=dtype)).to(device).requires_grad_()


@pytest.fixture
def reference_path():
    """Switch to the materialising reference inside a test; always switch back."""
    yield lambda flag: ie.use_reference(flag)
    ie.use_reference(False)


# name -> f(a (3, 2), b (4, 2), p (3,) extra parameter) -> scalar, every estimator and loss
K, M, D = 3, 4, 2


def _tuba(a, b, p):
    return est.tuba(a, b, p, scale=0.7)


CASES = {
    "infonce": lambda a, b, p: est.infonce(a, b, 0.8, row_bias=p, pos_offset=1),
    "infonce_symmetric": lambda a, b, p: est.infonce_symmetric(a, b[:K], 0.9, col_bias=p),
    "nwj": lambda a, b, p: est.nwj(a, b, 0.6, row_bias=p),
    "tuba": _tuba,
    "dv": lambda a, b, p: est.dv(a, b, 0.9, row_bias=p, pos_offset=1),
    # NB: momentum 1 keeps the moving average fixed: MINE's gradient then is a derivative
    # (of pos_mean - exp(lme - ema)), which gradgradcheck needs
    "mine": lambda a, b, p: est.mine(a, b, torch.tensor(0.3, dtype=F64), 1.0, 0.8, row_bias=p)[0],
    "js_objective": lambda a, b, p: est.js_objective(a, b, 0.8, row_bias=p),
    "js": lambda a, b, p: est.js(a, b, 0.8, row_bias=p),
    "smile": lambda a, b, p: est.smile(a, b, 1.0, 0.8, row_bias=p),
    "alignment": lambda a, b, p: est.alignment(a, b[:K] * p[:, None]),
    "uniformity": lambda a, b, p: est.uniformity(a * p[:, None], 0.9) + est.uniformity_terms(b, 0.5)[1].sum(),
    "InfoNCELoss": lambda a, b, p: L.InfoNCELoss(0.5)(a, b),
    "InfoNCELoss_bank": lambda a, b, p: L.InfoNCELoss(0.5, symmetric=True)(a, b[:K], negatives=b[K:] + p[:1]),
    "NTXentLoss": lambda a, b, p: L.NTXentLoss(0.5)(a, b[:K] + p[:, None]),
    "ClipLoss": lambda a, b, p: L.ClipLoss(bias=0.1).double()(a, b[:K], logit_scale=p.exp().sum()),
    "NWJLoss_concat": lambda a, b, p: L.NWJLoss(_concat_critic())(a, b),
    "SMILELoss_bilinear": lambda a, b, p: L.SMILELoss(critic=_bilinear_critic())(a * p[:, None], b),
    "TUBALoss": lambda a, b, p: L.TUBALoss(0.3)(a * p[:, None], b),
    "UniformityLoss": lambda a, b, p: L.UniformityLoss()(a + p[:, None]),
    "AlignUniformLoss": lambda a, b, p: L.AlignUniformLoss(normalize=False)(a, b[:K] * p[:, None]),
}


def _concat_critic():
    torch.manual_seed(1)
    return C.ConcatMLP(D, D, 3, activation="tanh").double()


def _bilinear_critic():
    torch.manual_seed(2)
    return C.Bilinear(D, D).double()


def _inputs(device):
    return leaf(K, D, seed=1, device=device), leaf(M, D, seed=2, device=device), \
        (0.5 + torch.rand(K, generator=torch.Generator().manual_seed(3), dtype=F64)).to(device).requires_grad_()


def _penalty_grads(f, inputs):
    """The gradient penalty ``|d f / d a|^2``'s gradient w.r.t. every input."""
    (g,) = torch.autograd.grad(f(*inputs), inputs[0], create_graph=True)
    return torch.autograd.grad(g.pow(2).sum(), inputs, allow_unused=True)


@pytest.mark.parametrize("name", list(CASES))
def test_double_backward_matches_reference(name, device, reference_path):
    """A gradient penalty through the fused path equals the one through the reference."""
    f, inputs = CASES[name], _inputs(device)
    fused = _penalty_grads(f, inputs)
    reference_path(True)
    want = _penalty_grads(f, inputs)
    for x, y in zip(fused, want):
        assert (x is None) == (y is None)
        if x is not None:
            assert torch.isfinite(y).all()
            torch.testing.assert_close(x, y, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("name", list(CASES))
def test_gradgradcheck_fused(name):
    f, inputs = CASES[name], _inputs("cpu")
    torch.autograd.gradgradcheck(f, inputs)


@pytest.mark.parametrize("name", ["infonce", "js", "ClipLoss", "NTXentLoss", "uniformity", "NWJLoss_concat"])
def test_create_graph_first_derivative_is_the_fused_one(name, device):
    """With create_graph the first derivative comes from reference.py: the same numbers."""
    f, inputs = CASES[name], _inputs(device)
    plain = torch.autograd.grad(f(*inputs), inputs, allow_unused=True)
    graph = torch.autograd.grad(f(*inputs), inputs, create_graph=True, allow_unused=True)
    for x, y in zip(plain, graph):
        assert (x is None) == (y is None)
        if x is not None:
            torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12)


def test_raw_ops_gradgradcheck(device):
    a, b = leaf(3, 2, seed=4, device=device), leaf(5, 2, seed=5, device=device)
    scale = torch.tensor(0.7, dtype=F64, device=device, requires_grad=True)
    rb, cb = leaf(3, seed=6, device=device), leaf(5, seed=7, device=device)

    def reduce(a, b, scale, rb, cb):
        return sum(o.sum() * (k + 1) for k, o in enumerate(ops.score_reduce(a, b, scale, rb, cb, 1, 31, 0.8)))

    torch.autograd.gradgradcheck(reduce, (a, b, scale, rb, cb))
    x = leaf(4, 3, seed=8, device=device)
    torch.autograd.gradgradcheck(lambda x, s, rb: ops.symmetric_softmax_mean(x, s, rb[:4] if False else None)[0].exp().sum()
                                 + ops.symmetric_softmax_mean(x, s, rb[:1].expand(4))[0].sum(), (x, scale, rb))
    w = ops.score_reduce_weighted
    wts = (torch.full((3,), 0.3, dtype=F64, device=device), None, None, torch.full((3,), -0.2, dtype=F64, device=device))
    torch.autograd.gradgradcheck(
        lambda a, b, s, rb, cb: w(a, b, s, rb, cb, 2, ops.ROW_LSE | ops.NEG_SOFTPLUS, weights=wts,
                                  w_pos=-wts[0])[0], (a, b, scale, rb, cb))
    w_col = torch.linspace(-0.5, 0.7, 5, dtype=F64, device=device)  # a column term (CLIP's)
    torch.autograd.gradgradcheck(
        lambda a, b, s, rb, cb: w(a, b, s, rb, cb, 2, ops.ROW_LSE | ops.COL_LSE, weights=(wts[0], None, None, None),
                                  w_pos=-wts[0], w_col=w_col)[0], (a, b, scale, rb, cb))
    # one tensor in two roles (b is a, col_bias is row_bias) gets its gradient once
    x5 = leaf(5, 2, seed=12, device=device)
    torch.autograd.gradgradcheck(
        lambda x, rb: sum(o.sum() * (k + 1) for k, o in enumerate(ops.score_reduce(x, x, 0.6, rb, rb, 0, 31, 0.8))),
        (x5, cb))
    penalty = []
    for fn in (ops.score_reduce, ref.score_reduce):
        def f(x):
            return sum(o.sum() * (k + 1) for k, o in enumerate(fn(x, x, scale, cb, cb, 0, 31, 0.8)))
        (g,) = torch.autograd.grad(f(x5), x5, create_graph=True)
        penalty.append(torch.autograd.grad(g.pow(2).sum(), (x5, cb, scale)))
    for p, q in zip(*penalty):
        torch.testing.assert_close(p, q)
    torch.autograd.gradgradcheck(lambda x, rb: w(x, x, 0.5, rb, rb, 0, ops.NEG_LSE,
                                                 weights=(None, wts[0], None, None))[0], (a, rb))
    P, Q, w2 = leaf(3, 4, seed=9, device=device), leaf(4, 4, seed=10, device=device), leaf(4, seed=11, device=device)
    b2 = torch.tensor(0.1, dtype=F64, device=device, requires_grad=True)
    for act in ("gelu", "softplus"):
        torch.autograd.gradgradcheck(
            lambda P, Q, w2, b2: sum(o.sum() for o in ops.concat_score_reduce(P, Q, w2, b2, act, 1, 31, 0.5)),
            (P, Q, w2, b2))


def test_compiled_double_backward_is_a_clear_error():
    """torch.compile's AOTAutograd refuses double backward outright: an error, not a wrong number."""
    a, b, _ = _inputs("cpu")
    f = torch.compile(lambda a, b: est.infonce(a, b), fullgraph=True)
    (g,) = torch.autograd.grad(f(a, b), a, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        g.pow(2).sum().backward()


# ---------------------------------------------------------------------------
# In-place changes between forward and backward
# ---------------------------------------------------------------------------

INPLACE = {
    "infonce": lambda a, b: est.infonce(a, b),
    "js": lambda a, b: est.js(a, b),
    "smile": lambda a, b: est.smile(a, b),
    "js_objective": lambda a, b: est.js_objective(a, b),
    "nwj": lambda a, b: est.nwj(a, b),
    "infonce_symmetric": lambda a, b: est.infonce_symmetric(a, b[:3]),
    "uniformity": lambda a, b: est.uniformity(a),
    "NTXentLoss": lambda a, b: L.NTXentLoss()(a, b[:3]),
    "ClipLoss": lambda a, b: L.ClipLoss().double()(a, b[:3]),
}


@pytest.mark.parametrize("name", list(INPLACE))
@pytest.mark.parametrize("which", [0, 1])
def test_inplace_change_before_backward_raises(name, which, device):
    a0, b0 = leaf(3, 4, seed=1, device=device), leaf(5, 4, seed=2, device=device)
    a, b = a0 * 1, b0 * 1  # non-leaf views of the parameters, changed in place below
    if name == "uniformity" and which == 1:
        pytest.skip("uniformity takes one input")
    value = INPLACE[name](a, b)
    (a, b)[which].add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        value.backward()


# ---------------------------------------------------------------------------
# Translation, masks, overflow, infinities
# ---------------------------------------------------------------------------


def _cluster(offset, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(5)
    x = (offset + 0.05 * torch.randn(24, 8, generator=g, dtype=F64)).to(dtype)
    return x.to(device)


@pytest.mark.parametrize("offset", [0.0, 100.0, 1000.0])
def test_uniformity_exact_under_translation(offset, device):
    x = _cluster(offset, device=device).requires_grad_()
    value = L.UniformityLoss()(x)
    (g,) = torch.autograd.grad(value, x)
    # the truth: float64 pdist on the same float32 points, and its gradient
    x64 = x.detach().cpu().double().requires_grad_()
    want = ref.uniformity_pdist(x64)
    (g64,) = torch.autograd.grad(want, x64)
    torch.testing.assert_close(value.double().cpu(), want.detach(), rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(g.double().cpu(), g64, rtol=1e-4, atol=1e-4 * g64.abs().max().item())
    # no gradient wanted: the same value from the forward-only call
    with torch.no_grad():
        torch.testing.assert_close(L.UniformityLoss()(x), value)


def test_uniformity_per_row_exact_under_translation(device):
    x = _cluster(100.0, device=device).requires_grad_()
    rows = est.uniformity_terms(x, 2.0)[1]
    (g,) = torch.autograd.grad(rows[:5].sum(), x)
    x64 = x.detach().cpu().double().requires_grad_()
    want = ref.uniformity_terms(x64, 2.0)[1]
    (g64,) = torch.autograd.grad(want[:5].sum(), x64)
    torch.testing.assert_close(rows.detach().double().cpu(), want.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g.double().cpu(), g64, rtol=1e-4, atol=1e-4 * g64.abs().max().item())


def test_uniformity_with_an_infinite_point(device):
    """A point with an infinite coordinate is infinitely far from the rest: its pairs drop
    out (the reference's value), and every gradient stays finite (0 on that point)."""
    x = _cluster(0.0, F64, device).clone()
    x[3, 1] = math.inf
    x.requires_grad_()
    value = est.uniformity(x)
    (g,) = torch.autograd.grad(value, x)
    K = x.shape[0]
    rest = torch.cat([x.detach()[:3], x.detach()[4:]]).cpu().requires_grad_()
    # the same sum over the pairs of the other points, divided by all K (K - 1) pairs
    want = ref.uniformity(rest) + math.log((K - 1) * (K - 2)) - math.log(K * (K - 1))
    (g_rest,) = torch.autograd.grad(want, rest)
    torch.testing.assert_close(value.cpu(), want.detach())
    torch.testing.assert_close(value.cpu(), ref.uniformity(x.detach().cpu()))
    assert torch.isfinite(g).all() and (g[3] == 0).all()
    torch.testing.assert_close(torch.cat([g[:3], g[4:]]).cpu(), g_rest)


def test_nwj_with_every_negative_masked(device, reference_path):
    """Value finite (the positives' mean), gradient finite and equal to the reference's."""
    a, b = leaf(1, 3, seed=1, device=device), leaf(3, 3, seed=2, device=device)
    cb = torch.tensor([-math.inf, 0.3, -math.inf], dtype=F64, device=device, requires_grad=True)
    out = []
    for reference in (False, True):
        reference_path(reference)
        value = est.nwj(a, b, col_bias=cb, pos_offset=1)
        out.append((value, *torch.autograd.grad(value, (a, b, cb))))
    for x, y in zip(*out):
        assert torch.isfinite(x).all()
        torch.testing.assert_close(x, y)
    torch.testing.assert_close(out[0][0], (a * b[1]).sum() + 0.3)


def test_dv_and_tuba_with_every_negative_masked(device):
    a, b = leaf(1, 3, seed=1, device=device), leaf(2, 3, seed=2, device=device)
    cb = torch.tensor([0.0, -math.inf], dtype=F64, device=device, requires_grad=True)
    tuba = est.tuba(a, b, torch.zeros(1, dtype=F64, device=device), col_bias=cb)
    assert torch.isfinite(tuba)
    assert all(torch.isfinite(g).all() for g in torch.autograd.grad(tuba, (a, b, cb)))
    dv = est.dv(a, b, col_bias=cb)  # log mean_neg exp(-inf): the bound is +inf
    assert dv.item() == math.inf


def test_js_objective_with_a_masked_positive(device, reference_path):
    a, b = leaf(3, 3, seed=1, device=device), leaf(4, 3, seed=2, device=device)
    cb = torch.tensor([0.0, -math.inf, 0.0, 0.0], dtype=F64, device=device)  # row 1's positive
    values = []
    for reference in (False, True):
        reference_path(reference)
        value = est.js_objective(a, b, col_bias=cb)
        value.backward()
        values.append(value)
        assert not torch.isnan(a.grad).any()
        a.grad = None
    assert values[0].item() == values[1].item() == -math.inf


@pytest.mark.parametrize("name", ["nwj", "tuba"])
def test_exp_bounds_overflow(name, device, reference_path):
    """NWJ and TUBA are exp of a log-mean-exp: at scale 200 on unit vectors exp(S) passes
    float32's range, the value is -inf like the reference's; float64 holds it, and there
    value and gradient are finite and match the reference."""
    g = torch.Generator().manual_seed(0)
    u = torch.nn.functional.normalize(torch.randn(6, 4, generator=g, dtype=F64), dim=-1)
    v = torch.nn.functional.normalize(u + 0.1 * torch.randn(6, 4, generator=g, dtype=F64), dim=-1)
    fn = {"nwj": lambda a, b: est.nwj(a, b, 200.0),
          "tuba": lambda a, b: est.tuba(a, b, torch.zeros(6, dtype=a.dtype, device=a.device), 200.0)}[name]
    v32 = fn(u.float().to(device), v.float().to(device))
    assert v32.item() == -math.inf
    a, b = u.to(device).requires_grad_(), v.to(device).requires_grad_()
    out = []
    for reference in (False, True):
        reference_path(reference)
        value = fn(a, b)
        out.append((value, *torch.autograd.grad(value, (a, b))))
    for x, y in zip(*out):
        assert torch.isfinite(x).all()
        torch.testing.assert_close(x, y, rtol=1e-9, atol=0)
    assert ref.nwj((200.0 * u @ v.T).float()).item() == -math.inf


@pytest.mark.parametrize("name", ["infonce", "dv", "js_objective", "smile", "ClipLoss", "NTXentLoss"])
def test_log_space_losses_finite_at_scores_of_1e4(name, device, reference_path):
    """The log-space estimators stay finite, with finite gradients, at scores of 1e4 in float32."""
    g = torch.Generator().manual_seed(1)
    u = torch.nn.functional.normalize(torch.randn(6, 4, generator=g, dtype=F64), dim=-1)
    v = torch.nn.functional.normalize(torch.randn(6, 4, generator=g, dtype=F64), dim=-1)
    fn = {"infonce": lambda a, b: est.infonce(a, b, 1e4), "dv": lambda a, b: est.dv(a, b, 1e4),
          "js_objective": lambda a, b: est.js_objective(a, b, 1e4), "smile": lambda a, b: est.smile(a, b, 5.0, 1e4),
          "ClipLoss": lambda a, b: L.ClipLoss()(a, b, logit_scale=1e4),
          "NTXentLoss": lambda a, b: L.NTXentLoss(1e-4)(a, b)}[name]
    a, b = u.float().to(device).requires_grad_(), v.float().to(device).requires_grad_()
    value = fn(a, b)
    grads = torch.autograd.grad(value, (a, b))
    assert torch.isfinite(value) and all(torch.isfinite(x).all() for x in grads)
    reference_path(True)
    a64, b64 = u.to(device).requires_grad_(), v.to(device).requires_grad_()
    want = fn(a64, b64)
    torch.testing.assert_close(value.double(), want.detach(), rtol=1e-5, atol=1e-2)


@pytest.mark.parametrize("name", ["infonce", "nwj", "dv", "js_objective"])
def test_an_infinite_input_gives_a_non_finite_value(name, device):
    """The documented policy: an infinite input makes the value non-finite (never a
    finite wrong number); the fused reductions may give NaN where torch gives -inf."""
    a, b = leaf(4, 3, seed=1, device=device).detach(), leaf(5, 3, seed=2, device=device).detach()
    b[4, 0] = math.inf
    assert not torch.isfinite(getattr(est, name)(a, b))


# ---------------------------------------------------------------------------
# Clear errors
# ---------------------------------------------------------------------------


def test_scale_and_bias_on_another_device_are_named():
    a, b = leaf(3, 2, seed=1), leaf(4, 2, seed=2)
    with pytest.raises(ValueError, match="scale is on meta"):
        est.infonce(a, b, torch.tensor(1.0, device="meta"))
    with pytest.raises(ValueError, match="row_bias is on meta"):
        est.nwj(a, b, row_bias=torch.zeros(3, device="meta"))
    with pytest.raises(ValueError, match="col_bias must be floating"):
        est.nwj(a, b, col_bias=torch.zeros(4, dtype=torch.int64))


def test_pos_offset_must_be_an_int():
    a, b = leaf(3, 2, seed=1), leaf(4, 2, seed=2)
    for bad in (0.5, 1.0, True):
        with pytest.raises(ValueError, match="pos_offset must be an int"):
            est.infonce(a, b, pos_offset=bad)
    assert torch.isfinite(est.infonce(a, b, pos_offset=torch.tensor(1).item()))


def test_scale_with_two_elements():
    a, b = leaf(3, 2, seed=1), leaf(4, 2, seed=2)
    with pytest.raises(ValueError, match="scale must be a number or a one-element tensor"):
        est.infonce(a, b, torch.ones(2, dtype=F64))
    with pytest.raises(ValueError, match="scale must be a number or a one-element tensor"):
        ops.score_reduce(a, b, torch.ones(2, dtype=F64))
    torch.testing.assert_close(est.infonce(a, b, torch.full((1, 1), 0.5, dtype=F64)), est.infonce(a, b, 0.5))


def test_clip_loss_scale_and_bias_arguments():
    x, y = leaf(8, 4, seed=1), leaf(8, 4, seed=2)
    loss = L.ClipLoss().double()
    with pytest.raises(ValueError, match="logit_bias must be a number or a one-element tensor"):
        loss(x, y, logit_bias=torch.zeros(8, dtype=F64))
    with pytest.raises(ValueError, match="logit_scale must be a number or a one-element tensor"):
        loss(x, y, logit_scale=torch.ones(2, dtype=F64))
    with pytest.raises(ValueError, match="init_logit_scale"):
        L.ClipLoss(init_logit_scale=1e4)


def test_clip_loss_caps_the_scale_at_100():
    """open_clip clamps logit_scale to log 100; a parameter driven past it is used as 100."""
    x, y = leaf(8, 4, seed=1), leaf(8, 4, seed=2)
    loss = L.ClipLoss().double()
    with torch.no_grad():
        loss.logit_scale.fill_(1e4)
    value, diag = loss(x, y, return_diagnostics=True)
    assert torch.isfinite(value)
    torch.testing.assert_close(diag["logit_scale"], torch.tensor(100.0, dtype=F64))
    torch.testing.assert_close(value, L.ClipLoss(max_logit_scale=None).double()(x, y, logit_scale=100.0))
    unclamped = L.ClipLoss(init_logit_scale=8.0, max_logit_scale=None).double()
    torch.testing.assert_close(unclamped(x, y, return_diagnostics=True)[1]["logit_scale"],
                               torch.tensor(math.exp(8.0), dtype=F64))


def test_estimate_mi_rejects_half_precision_and_no_features():
    x = torch.randn(64, 2)
    with pytest.raises(ValueError, match="float32 or float64"):
        ie.estimate_mi(x, x, steps=1, batch_size=8, dtype=torch.float16, progress=False)
    with pytest.raises(ValueError, match="at least one feature"):
        ie.estimate_mi(torch.randn(64, 0), x, steps=1, batch_size=8, progress=False)


def test_alignment_rejects_mixed_dtypes_and_empty_input():
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="one floating dtype"):
        est.alignment(x, x.double())
    with pytest.raises(ValueError, match="non-empty"):
        est.alignment(x[:0], x[:0])
    with pytest.raises(ValueError, match="same shape"):
        est.alignment(x, torch.randn(5, 3))


def test_jit_trace_of_a_loss_is_a_clear_error(reference_path):
    x, y = torch.randn(4, 3), torch.randn(4, 3)
    with pytest.raises(RuntimeError, match="cannot be traced by torch.jit.trace"):
        torch.jit.trace(L.InfoNCELoss(), (x, y))
    reference_path(True)  # the materialising reference traces
    traced = torch.jit.trace(L.InfoNCELoss(), (x, y), check_trace=False)
    torch.testing.assert_close(traced(x, y), L.InfoNCELoss()(x, y))


def test_gather_with_grad_double_backward_is_a_clear_error(tmp_path):
    import torch.distributed as dist

    from infomax_ext.distributed import _GatherWithGrad

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        x = leaf(3, 2, seed=1)
        y = _GatherWithGrad.apply(x, None, 0, 1)
        (g,) = torch.autograd.grad(y.pow(3).sum(), x)  # first order works
        torch.testing.assert_close(g, 3 * x.detach() ** 2)
        with pytest.raises(RuntimeError, match="not twice differentiable"):
            torch.autograd.grad(y.pow(3).sum(), x, create_graph=True)
    finally:
        dist.destroy_process_group()
