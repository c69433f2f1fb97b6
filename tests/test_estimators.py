"""Every estimator composed on the fused op against its materialising reference."""
import math

import pytest
import torch

import infomax_ext as ie
from infomax_ext import reference as ref
from helpers import make_bias, make_pair, sample_inputs

pytestmark = pytest.mark.skipif(not ie._backend.HAS_C, reason="compiled module not built")

# name -> (fused call on kw, reference call on S and kw)
NEEDS_NEG = {"nwj", "dv", "js", "js_objective", "smile", "mine", "tuba"}


def fused_call(name, kw):
    dot = {k: kw[k] for k in ("scale", "row_bias", "col_bias", "pos_offset")}
    if name == "smile":
        return ie.smile(kw["a"], kw["b"], tau=1.0, **dot)
    if name == "mine":
        return ie.mine(kw["a"], kw["b"], ema=kw["ema"], **dot)[0]
    if name == "tuba":
        return ie.tuba(kw["a"], kw["b"], kw["baseline"], **dot)
    return getattr(ie, name)(kw["a"], kw["b"], **dot)


def ref_call(name, kw):
    S = ref.scores_dot(kw["a"], kw["b"], kw["scale"], kw["row_bias"], kw["col_bias"])
    off = kw["pos_offset"]
    if name == "smile":
        return ref.smile(S, 1.0, off)
    if name == "mine":
        return ref.mine(S, kw["ema"], 0.9, off)[0]
    if name == "tuba":
        return ref.tuba(S, kw["baseline"], off)
    return getattr(ref, name)(S, off)


@pytest.mark.parametrize("name", ["infonce", "nwj", "dv", "js", "js_objective", "smile", "mine", "tuba"])
@pytest.mark.parametrize("seed", [3, 4])
def test_estimator_matches_reference(device, name, seed):
    for kw in sample_inputs(device, torch.float64, requires_grad=True, seed=seed):
        K, M = kw["a"].shape[0], kw["b"].shape[0]
        if name in NEEDS_NEG and M < 2:
            with pytest.raises(ValueError, match="negative"):
                fused_call(name, dict(kw, ema=None, baseline=torch.zeros(K, dtype=torch.float64)))
            continue
        kw["ema"] = torch.tensor(0.3, dtype=torch.float64, device=device)
        kw["baseline"] = make_bias(K, device, seed=seed + 5, requires_grad=True)
        fused, oracle = fused_call(name, kw), ref_call(name, kw)
        torch.testing.assert_close(fused, oracle)
        inputs = [kw[k] for k in ("a", "b", "scale", "row_bias", "col_bias") if kw[k] is not None]
        if name == "tuba":
            inputs.append(kw["baseline"])
        gf = torch.autograd.grad(fused, inputs)
        go = torch.autograd.grad(oracle, inputs)
        for x, y in zip(gf, go):
            torch.testing.assert_close(x, y)


def test_infonce_symmetric_matches_reference():
    a, b = make_pair(65, 65, 7, seed=2, requires_grad=True)
    scale = torch.tensor(4.0, dtype=torch.float64, requires_grad=True)
    fused = ie.infonce_symmetric(a, b, scale)
    oracle = ref.infonce_symmetric(ref.scores_dot(a, b, scale))
    torch.testing.assert_close(fused, oracle)
    for x, y in zip(torch.autograd.grad(fused, [a, b, scale]), torch.autograd.grad(oracle, [a, b, scale])):
        torch.testing.assert_close(x, y)
    with pytest.raises(ValueError, match="K == M"):
        ie.infonce_symmetric(a[:-1].detach(), b.detach())


def test_mine_moving_average_sequence_matches_reference():
    ema_f = ema_r = None
    for step in range(4):
        a, b = make_pair(20, 30, 5, seed=step, requires_grad=True)
        bound_f, ema_f = ie.mine(a, b, ema_f, 0.9, 1.5)
        bound_r, ema_r = ref.mine(ref.scores_dot(a, b, 1.5), ema_r, 0.9)
        torch.testing.assert_close(ema_f, ema_r)
        torch.testing.assert_close(torch.autograd.grad(bound_f, a), torch.autograd.grad(bound_r, a))


def test_uniformity_matches_pdist_and_stays_finite(device):
    x = torch.nn.functional.normalize(make_pair(50, 50, 6, device=device, seed=1)[0], dim=1).requires_grad_()
    fused = ie.uniformity(x)
    oracle = ref.uniformity_pdist(x)  # Wang & Isola's formula, independent of the fused op
    torch.testing.assert_close(fused, oracle)
    torch.testing.assert_close(torch.autograd.grad(fused, x), torch.autograd.grad(oracle, x))
    noise = make_pair(40, 40, 3, device=device, dtype=torch.float32, seed=4)[0]
    grid = torch.zeros(40, 3, device=device)
    grid[:, 0] = 10 * torch.arange(40, device=device)  # every squared distance >= 100: exp(-200) underflows
    spread = (grid + 0.1 * noise).requires_grad_()
    assert ref.uniformity_pdist(spread) == -math.inf  # the peer's formula underflows
    value = ie.uniformity(spread)
    assert torch.isfinite(value)
    # NB: |x_i - x_j|^2 = |x_i|^2 + |x_j|^2 - 2<x_i, x_j> cancels in float32 for points far
    # from the origin (|x|^2 ~ 1.5e5 here), hence rtol 2e-4; normalised inputs do far better.
    torch.testing.assert_close(value.double(), ref.uniformity(spread.double()), rtol=2e-4, atol=1e-3)
    (g,) = torch.autograd.grad(value, spread)
    assert torch.isfinite(g).all()


def test_alignment_matches_wang_isola():
    x, y = make_pair(30, 30, 8, seed=6)
    torch.testing.assert_close(ie.alignment(x, y), (x - y).norm(p=2, dim=1).pow(2).mean())
    torch.testing.assert_close(ie.alignment(x, y, 1.0), (x - y).norm(p=2, dim=1).mean())


@pytest.mark.parametrize("alpha", [0.5, 1.0, 1.5, 2.0, 3.0])
def test_alignment_of_a_pair_at_zero_distance_has_finite_exact_derivatives(alpha):
    """Row 0 of x equals row 0 of y (a pair an augmentation left unchanged): value and
    gradient finite, row 0's gradient 0, and the others' alpha |r|^(alpha - 2) r / K
    (by hand). For alpha = 2, the Hessian is 2 I / K on every row, row 0 included."""
    K = 3
    y = torch.tensor([[1.0, 2.0], [3.0, 4.0], [0.5, -1.0]], dtype=torch.float64)
    r = torch.tensor([[0.0, 0.0], [1.0, -2.0], [0.25, 0.5]], dtype=torch.float64)
    x = (y + r).requires_grad_()
    value = ie.alignment(x, y, alpha)
    n = r.norm(dim=1)
    torch.testing.assert_close(value.item(), (n ** alpha).sum().item() / K, rtol=1e-15, atol=0)
    (g,) = torch.autograd.grad(value, x)
    want = torch.zeros_like(r)
    want[1:] = alpha * n[1:, None] ** (alpha - 2) * r[1:] / K
    torch.testing.assert_close(g, want, rtol=1e-14, atol=0)
    if alpha == 2.0:
        H = torch.autograd.functional.hessian(lambda t: ie.alignment(t, y, alpha), x.detach())
        torch.testing.assert_close(H.reshape(6, 6), 2 * torch.eye(6, dtype=torch.float64) / K)


def test_infonce_equals_log_m_minus_cross_entropy_at_scale():
    a, b = make_pair(700, 900, 16, dtype=torch.float32, seed=8)
    targets = torch.arange(700) + 150
    expected = math.log(900) - torch.nn.functional.cross_entropy(50 * a @ b.T, targets)
    torch.testing.assert_close(ie.infonce(a, b, 50.0, pos_offset=150), expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("grad", [True, False], ids=["walked", "no_grad"])
@pytest.mark.parametrize("seed", [11, 12])
def test_infonce_as_loss_is_the_cross_entropy(device, grad, seed):
    """``infonce_from(as_loss=True)`` is ``log M - bound`` in value and gradient, walked
    (a backward follows) or not; its per_row is the bound's, None only when the walk made
    the value and rows=False."""
    from infomax_ext import estimators as est
    for kw in sample_inputs(device, torch.float64, requires_grad=grad, seed=seed):
        src = est.DotScores(kw["a"], kw["b"], kw["scale"], kw["row_bias"], kw["col_bias"], kw["pos_offset"])
        S = ref.scores_dot(kw["a"], kw["b"], kw["scale"], kw["row_bias"], kw["col_bias"])
        bound = ref.infonce(S, kw["pos_offset"])
        loss = est.infonce_from(src, as_loss=True)
        torch.testing.assert_close(loss.value, math.log(src.M) - bound)
        torch.testing.assert_close(loss.per_row.mean(), bound)
        lean = est.infonce_from(src, as_loss=True, rows=False)
        assert (lean.per_row is None) == grad
        torch.testing.assert_close(lean.value, loss.value)
        if grad:
            inputs = [kw[k] for k in ("a", "b", "scale", "row_bias", "col_bias") if kw[k] is not None]
            for x, y in zip(torch.autograd.grad(lean.value, inputs), torch.autograd.grad(-bound, inputs)):
                torch.testing.assert_close(x, y)


def test_nwj_overflow_is_minus_inf_not_nan():
    a, b = make_pair(3, 5, 2, dtype=torch.float32)
    value = ie.nwj(a, b, 1e4)
    assert value == -math.inf


def test_reference_switch_routes_to_reference():
    a, b = make_pair(6, 8, 3, seed=12)
    try:
        ie.use_reference(True)
        assert ie.backend() == "reference"
        r = ie.dv(a, b, 2.0, pos_offset=1)
    finally:
        ie.use_reference(False)
    assert ie.backend() == "compiled"
    torch.testing.assert_close(ie.dv(a, b, 2.0, pos_offset=1), r)


def test_estimator_input_errors_name_the_argument():
    a, b = make_pair(4, 6, 3)
    with pytest.raises(ValueError, match="pos_offset"):
        ie.infonce(a, b, pos_offset=3)
    with pytest.raises(ValueError, match="feature sizes"):
        ie.dv(a, b[:, :2])
    with pytest.raises(ValueError, match="M >= K"):
        ie.nwj(b, a)
    with pytest.raises(ValueError, match="tau"):
        ie.smile(a, b, tau=0.0)
    with pytest.raises(ValueError, match="negative"):
        ie.dv(a[:1], b[:1])
    with pytest.raises(ValueError, match="baseline"):
        ie.tuba(a, b, torch.zeros(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="K >= 2"):
        ie.uniformity(a[:1])
    with pytest.raises(ValueError, match="row_bias"):
        ie.infonce(a, b, row_bias=torch.zeros(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="col_bias"):
        ie.dv(a, b, col_bias=torch.zeros(4, dtype=torch.float64))
    with pytest.raises(ValueError, match="dtype"):
        ie.dv(a.int(), b.int())
    with pytest.raises(ValueError, match="temperature"):
        ie.InfoNCELoss(temperature=float("inf"))
    with pytest.raises(ValueError, match="temperature"):
        ie.InfoNCELoss(temperature=0.0)
    with pytest.raises(ValueError, match="init_logit_scale"):
        ie.ClipLoss(init_logit_scale=float("nan"))


@pytest.mark.parametrize("name", ["infonce", "dv"])
def test_compile_fullgraph_equals_eager(name):
    torch._dynamo.reset()
    a, b = make_pair(37, 80, 6, dtype=torch.float32, seed=13, requires_grad=True)
    scale = torch.tensor(2.0, requires_grad=True)
    fn = getattr(ie, name)
    eager = fn(a, b, scale, pos_offset=5)
    compiled = torch.compile(lambda a, b, s: fn(a, b, s, pos_offset=5), fullgraph=True)(a, b, scale)
    torch.testing.assert_close(compiled, eager)
    for x, y in zip(torch.autograd.grad(compiled, [a, b, scale]), torch.autograd.grad(eager, [a, b, scale])):
        torch.testing.assert_close(x, y)


