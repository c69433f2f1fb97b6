"""Critics x estimators: the fused path (``critic.source`` -> fused ops) against the
reference path (``use_reference(True)``: the source materialises S).

S is (K, M): rows are the anchors u (view 1), columns the candidates v (view 2),
positive of row i at column i + pos_offset.
"""
import copy
import math

import pytest
import torch
from torch import nn

import infomax_ext
from infomax_ext import critics, ops, reference as ref
from infomax_ext import ConcatMLP, Cosine, Bilinear, Dot, Separable, mi_lower_bound

pytestmark = pytest.mark.skipif(not infomax_ext._backend.HAS_C, reason="compiled module not built")

ESTIMATORS = ["infonce", "nwj", "dv", "mine", "js", "smile", "tuba"]
# (K, M, pos_offset): K = 1, square, M > K with an offset, M past one 64-row tile.
SIZES = [(1, 3, 2), (5, 5, 0), (6, 11, 4), (67, 70, 3)]
DU, DV = 5, 3  # feature sizes of u and v (Dot and Cosine use DU for both)


def make_critic(name):
    torch.manual_seed(0)
    table = {
        "dot": lambda: Dot(temperature=0.5),
        "dot_learnable": lambda: Dot(temperature=0.5, learnable=True),
        "cosine": lambda: Cosine(temperature=0.2),
        "cosine_learnable": lambda: Cosine(temperature=0.2, learnable=True),
        "bilinear": lambda: Bilinear(DU, DV),
        "separable": lambda: Separable(nn.Linear(DU, 4),
                                       nn.Sequential(nn.Linear(DV, 6), nn.Tanh(), nn.Linear(6, 4)),
                                       temperature=0.7),
        "concat_relu": lambda: ConcatMLP(DU, DV, 7, activation="relu"),
        "concat_elu": lambda: ConcatMLP(DU, DV, 6, activation="elu"),
        "concat_tanh": lambda: ConcatMLP(DU, DV, 9, activation="tanh"),
        "concat_softplus": lambda: ConcatMLP(DU, DV, 4, activation="softplus"),
        "concat_gelu": lambda: ConcatMLP(DU, DV, 5, activation="gelu"),
        "concat_2layers": lambda: ConcatMLP(DU, DV, 5, layers=2, activation="elu"),
    }
    return table[name]().double()


CRITICS = ["dot", "dot_learnable", "cosine", "cosine_learnable", "bilinear", "separable", "concat_relu",
           "concat_elu", "concat_tanh", "concat_softplus", "concat_gelu", "concat_2layers"]


def dims(name):
    return (DU, DU) if name.startswith(("dot", "cosine")) else (DU, DV)


def make_uv(name, K, M, seed=0, dtype=torch.float64):
    du, dv = dims(name)
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(K, du, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    v = torch.randn(M, dv, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    return u, v


@pytest.fixture
def reference_mode():
    """Yields a setter of use_reference that is always switched back off."""
    try:
        yield infomax_ext.use_reference
    finally:
        infomax_ext.use_reference(False)


def estimator_kwargs(estimator, K, seed=0):
    if estimator == "tuba":
        return {"baseline": torch.randn(K, generator=torch.Generator().manual_seed(seed + 7), dtype=torch.float64)}
    if estimator == "mine":
        return {"ema": torch.tensor(0.3, dtype=torch.float64), "momentum": 0.9}
    if estimator == "smile":
        return {"tau": 1.0}
    return {}


def value_and_grads(critic, u, v, estimator, pos_offset, kwargs):
    out = mi_lower_bound(u, v, critic, estimator, pos_offset, **kwargs)
    value, extra = (out if estimator == "mine" else (out, None))
    params = [p for p in critic.parameters()]
    grads = torch.autograd.grad(value, [u, v] + params)
    return value.detach(), extra, grads


@pytest.mark.parametrize("size", SIZES, ids=lambda s: "K{}-M{}-off{}".format(*s))
@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("name", CRITICS)
def test_fused_equals_reference(name, estimator, size, reference_mode):
    K, M, off = size
    critic = make_critic(name)
    u, v = make_uv(name, K, M, seed=K + M)
    kwargs = estimator_kwargs(estimator, K)
    assert infomax_ext.backend() == "compiled"
    fused_value, fused_extra, fused_grads = value_and_grads(critic, u, v, estimator, off, kwargs)
    reference_mode(True)
    assert infomax_ext.backend() == "reference"
    ref_value, ref_extra, ref_grads = value_and_grads(critic, u, v, estimator, off, kwargs)
    reference_mode(False)
    assert torch.isfinite(fused_value)
    torch.testing.assert_close(fused_value, ref_value)
    if estimator == "mine":
        torch.testing.assert_close(fused_extra, ref_extra)
    names = ["u", "v"] + [n for n, _ in critic.named_parameters()]
    for n, gf, gr in zip(names, fused_grads, ref_grads):
        torch.testing.assert_close(gf, gr, msg=lambda m: f"gradient of {n}: {m}")


@pytest.mark.parametrize("name", ["concat_relu", "concat_tanh", "bilinear", "cosine_learnable"])
def test_float32_fused_equals_reference(name, reference_mode):
    """float32 fused against the float64 reference (float32 against float32 would mostly
    compare two roundings of the same sums)."""
    K, M, off = 70, 600, 9
    critic64 = make_critic(name)
    critic = copy.deepcopy(critic64).float()
    u64, v64 = make_uv(name, K, M, seed=1)
    u, v = (t.detach().float().requires_grad_() for t in (u64, v64))
    fused_value, _, fused_grads = value_and_grads(critic, u, v, "infonce", off, {})
    reference_mode(True)
    ref_value, _, ref_grads = value_and_grads(critic64, u64, v64, "infonce", off, {})
    assert fused_value.dtype == torch.float32
    torch.testing.assert_close(fused_value.double(), ref_value, rtol=1e-5, atol=1e-5)
    for gf, gr in zip(fused_grads, ref_grads):
        assert gf.dtype == torch.float32
        # NB: InfoNCE is invariant to the output bias b2: its gradient is 0 up to rounding.
        atol = max(1e-5 * gr.abs().max().item(), 1e-6)
        torch.testing.assert_close(gf.double(), gr, rtol=1e-4, atol=atol)


@pytest.mark.parametrize("name", CRITICS)
def test_scores_source_and_positive_agree(name):
    critic = make_critic(name)
    u, v = make_uv(name, 4, 9)
    S = critic(u, v)
    assert S.shape == (4, 9)
    src = critic.source(u, v, pos_offset=3)
    assert (src.K, src.M, src.pos_offset) == (4, 9, 3)
    torch.testing.assert_close(src.materialize(), S)
    torch.testing.assert_close(src.positive(), torch.diagonal(S, offset=3))


def test_concat_scores_equals_an_mlp_on_the_concatenation():
    """S[i, j] of ConcatMLP is its MLP applied to [u_i; v_j] (rows u, columns v)."""
    for layers in (1, 3):
        critic = ConcatMLP(DU, DV, 6, layers=layers, activation="tanh").double()
        u, v = make_uv("concat", 3, 5)
        mlp = [critic.first] + [m for d in critic.deep for m in (nn.Tanh(), d)] + [nn.Tanh(), critic.out]
        mlp = nn.Sequential(*mlp)
        pairs = torch.cat([u[:, None].expand(3, 5, DU), v[None].expand(3, 5, DV)], -1)
        torch.testing.assert_close(critic(u, v), mlp(pairs).squeeze(-1))


def test_sources_use_the_fused_ops():
    u, v = make_uv("concat", 4, 6)
    assert isinstance(make_critic("concat_tanh").source(u, v), critics.ConcatScores)
    assert isinstance(make_critic("concat_2layers").source(u, v), critics.MaterializedScores)
    assert isinstance(make_critic("bilinear").source(u, v), infomax_ext.estimators.DotScores)
    u, v = make_uv("dot", 4, 6)
    for name in ("dot", "cosine", "dot_learnable"):
        assert isinstance(make_critic(name).source(u, v), infomax_ext.estimators.DotScores)


@pytest.mark.parametrize("name", ["dot_learnable", "cosine_learnable"])
@pytest.mark.parametrize("estimator", ["infonce", "nwj", "smile"])
def test_learnable_scale_gets_a_gradient(name, estimator, reference_mode):
    critic = make_critic(name)
    u, v = make_uv(name, 6, 8)
    kwargs = estimator_kwargs(estimator, 6)
    grads = []
    for reference in (False, True):
        reference_mode(reference)
        critic.zero_grad()
        mi_lower_bound(u, v, critic, estimator, **kwargs).backward()
        g = critic.logit_scale.grad
        assert g is not None and torch.isfinite(g) and g.abs() > 0
        grads.append(g.clone())
    torch.testing.assert_close(grads[0], grads[1])


def test_cosine_scale_is_one_over_temperature():
    critic = Cosine(temperature=0.25, learnable=True).double()
    u, v = make_uv("cosine", 3, 4)
    torch.testing.assert_close(critic(u, v), ref.scores_cosine(u, v, 0.25))
    torch.testing.assert_close(Cosine(temperature=0.25)(u, v), ref.scores_cosine(u, v, 0.25))


def test_mine_threads_its_moving_average():
    critic = make_critic("concat_tanh")
    u, v = make_uv("concat", 5, 7)
    bound, ema = mi_lower_bound(u, v, critic, "mine")
    bound2, ema2 = mi_lower_bound(u, v, critic, "mine", ema=ema)
    torch.testing.assert_close(bound, bound2)
    assert ema.dim() == 0 and not ema.requires_grad
    torch.testing.assert_close(ema2, ema)  # same batch: the average does not move


def test_infonce_never_exceeds_log_m():
    critic = make_critic("concat_relu")
    u, v = make_uv("concat", 8, 12)
    assert mi_lower_bound(u, v, critic, "infonce", pos_offset=2).item() <= math.log(12) + 1e-12


def test_errors_name_the_problem():
    critic = make_critic("concat_relu")
    u, v = make_uv("concat", 4, 6)
    with pytest.raises(ValueError, match="unknown estimator"):
        mi_lower_bound(u, v, critic, "nce")
    with pytest.raises(ValueError, match="pos_offset"):
        mi_lower_bound(u, v, critic, "infonce", pos_offset=3)
    with pytest.raises(ValueError, match="M >= K"):
        mi_lower_bound(torch.randn(7, DU, dtype=torch.float64), torch.randn(3, DV, dtype=torch.float64), critic)
    with pytest.raises(ValueError, match="unknown activation"):
        ConcatMLP(DU, DV, 4, activation="swish")
    with pytest.raises(ValueError, match="layers"):
        ConcatMLP(DU, DV, 4, layers=0)
    with pytest.raises(ValueError, match="temperature"):
        Cosine(temperature=0.0)


def test_package_exports():
    for name in ("Dot", "Cosine", "Bilinear", "Separable", "ConcatMLP", "mi_lower_bound"):
        assert name in infomax_ext.__all__ and hasattr(infomax_ext, name)
