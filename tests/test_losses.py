"""Drop-in losses (losses.py) against materialised plain-torch formulas: values, gradients,
diagnostics, the reference fallback, torch.compile and bf16 autocast.

Peer packages and the peers' published formulas are compared in test_peers.py.
"""
import math

import pytest
import torch
import torch.nn.functional as F

import infomax_ext as ie
from infomax_ext import critics as C
from infomax_ext import losses as L
from infomax_ext import ops
from infomax_ext import reference as ref

pytestmark = [pytest.mark.skipif(not ie._backend.HAS_C, reason="compiled module not built"),
              pytest.mark.usefixtures("one_thread")]
f64 = torch.float64


def rand(*shape, seed, dtype=f64, grad=True):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=f64).to(dtype).requires_grad_(grad)


def grads(out, inputs):
    return torch.autograd.grad(out, inputs, allow_unused=True)


def assert_same(out, expected, inputs, **tol):
    torch.testing.assert_close(out, expected, **tol)
    for g, h in zip(grads(out, inputs), grads(expected, inputs)):
        if g is None or h is None:
            assert g is None and h is None or (g if h is None else h).abs().max() < 1e-12
        else:
            torch.testing.assert_close(g, h, **tol)


def count_op_calls(monkeypatch):
    """Counts calls of the fused ops made through ops.score_reduce,
    ops.weighted (score_reduce_weighted's path: a mean with its gradient from the
    forward walk) and
    ops.symmetric_softmax_mean (uniformity), and records their input dtypes."""
    calls = []

    def spy_on(name, two_inputs=True):
        real = getattr(ops, name)

        def spy(a, *args, **kw):
            calls.append((a.dtype, args[0].dtype if two_inputs else a.dtype))
            return real(a, *args, **kw)

        monkeypatch.setattr(ops, name, spy)

    spy_on("score_reduce")
    spy_on("weighted")
    spy_on("symmetric_softmax_mean", two_inputs=False)
    return calls


# ---------------------------------------------------------------------------
# plain-torch formulas (materialise the logits)
# ---------------------------------------------------------------------------


def ce_formula(z1, z2, temperature, negatives=None, pos_offset=0, symmetric=False, normalize=True,
               bank_only=False):
    if normalize:
        z1, z2 = F.normalize(z1, dim=-1), F.normalize(z2, dim=-1)
        negatives = None if negatives is None else F.normalize(negatives, dim=-1)
    K = z1.shape[0]
    labels = torch.arange(K) + pos_offset

    def one_way(anchors, cands):
        if bank_only:
            pos = (anchors * cands[labels]).sum(-1, keepdim=True)
            logits = torch.cat([pos, anchors @ negatives.T], 1) / temperature
            return F.cross_entropy(logits, torch.zeros(K, dtype=torch.long))
        allc = cands if negatives is None else torch.cat([cands, negatives])
        return F.cross_entropy(anchors @ allc.T / temperature, labels)

    loss = one_way(z1, z2)
    return (loss + one_way(z2, z1)) / 2 if symmetric else loss


def ntxent_formula(z1, z2, temperature):
    z = F.normalize(torch.cat([z1, z2]), dim=-1)
    N = z1.shape[0]
    S = (z @ z.T / temperature).masked_fill(torch.eye(2 * N, dtype=torch.bool), -math.inf)
    return F.cross_entropy(S, torch.cat([torch.arange(N) + N, torch.arange(N)]))


# ---------------------------------------------------------------------------
# InfoNCE / NT-Xent / CLIP
# ---------------------------------------------------------------------------

INFONCE_CASES = [
    # K, M, N (bank), pos_offset, symmetric, normalize, bank_only
    (1, 1, 0, 0, False, True, False),
    (6, 6, 0, 0, False, True, False),
    (5, 9, 0, 3, False, False, False),
    (7, 7, 0, 0, True, True, False),
    (8, 8, 30, 0, False, True, False),   # bank larger than the batch
    (20, 24, 3, 4, False, True, False),  # bank smaller than the batch
    (9, 9, 4, 0, True, True, False),
    (10, 10, 25, 0, False, True, True),  # MoCo: positive + bank only
    (10, 10, 6, 0, True, False, True),
]


@pytest.mark.parametrize("case", INFONCE_CASES, ids=lambda c: "K{}-M{}-N{}-off{}-sym{}-norm{}-bank{}".format(*c))
def test_infonce_loss_matches_cross_entropy_formula(case):
    K, M, N, off, sym, norm, bank_only = case
    seed = sum(case[:4])
    z1, z2 = rand(K, 5, seed=seed), rand(M, 5, seed=seed + 1)
    neg = rand(N, 5, seed=seed + 2) if N else None
    loss_fn = L.InfoNCELoss(0.3, symmetric=sym, normalize=norm, bank_only=bank_only)
    out, diag = loss_fn(z1, z2, negatives=neg, pos_offset=off, return_diagnostics=True)
    expected = ce_formula(z1, z2, 0.3, neg, off, sym, norm, bank_only)
    assert_same(out, expected, [t for t in (z1, z2, neg) if t is not None])
    n_cand = 1 + N if bank_only else M + N
    assert diag["log_m"] == pytest.approx(math.log(n_cand))
    torch.testing.assert_close(diag["bound"], math.log(n_cand) - expected.detach())
    assert diag["per_row"].shape == ((2 * K,) if sym else (K,))
    torch.testing.assert_close(diag["per_row"].mean(), expected.detach())


def test_infonce_per_row_terms_are_the_per_anchor_cross_entropies():
    z1, z2, neg = rand(12, 4, seed=1), rand(15, 4, seed=2), rand(7, 4, seed=3)
    _, diag = L.InfoNCELoss(0.2)(z1, z2, negatives=neg, pos_offset=2, return_diagnostics=True)
    a, c = F.normalize(z1, dim=-1), F.normalize(torch.cat([z2, neg]), dim=-1)
    rows = F.cross_entropy(a @ c.T / 0.2, torch.arange(12) + 2, reduction="none")
    torch.testing.assert_close(diag["per_row"], rows.detach())


def test_infonce_bound_never_exceeds_log_m():
    z = rand(16, 8, seed=4, grad=False)
    _, diag = L.InfoNCELoss(0.01)(z, z + 1e-3 * rand(16, 8, seed=5, grad=False), return_diagnostics=True)
    assert diag["bound"] <= diag["log_m"] + 1e-12
    assert diag["bound"] > diag["log_m"] - 1e-3  # perfectly separable: saturates at log M


@pytest.mark.parametrize("N", [1, 2, 9])
def test_ntxent_matches_masked_2n_formula(N):
    z1, z2 = rand(N, 6, seed=N), rand(N, 6, seed=N + 50)
    out, diag = L.NTXentLoss(0.25)(z1, z2, return_diagnostics=True)
    assert_same(out, ntxent_formula(z1, z2, 0.25), [z1, z2])
    assert diag["per_row"].shape == (2 * N,)
    assert diag["log_m"] == pytest.approx(math.log(2 * N - 1))


def test_clip_loss_matches_formula_with_gradient_to_scale_and_bias():
    img, txt = rand(11, 7, seed=7), rand(11, 7, seed=8)
    loss_fn = L.ClipLoss(init_logit_scale=1.3, bias=-0.4).double()
    out, diag = loss_fn(img, txt, return_diagnostics=True)
    s, b = loss_fn.logit_scale, loss_fn.logit_bias
    logits = s.exp() * img @ txt.T + b
    labels = torch.arange(11)
    expected = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    assert_same(out, expected, [img, txt, s])
    (gb,) = torch.autograd.grad(loss_fn(img, txt), b)
    assert abs(gb) < 1e-12  # a bias on every logit cancels in the softmax
    torch.testing.assert_close(diag["logit_scale"], s.exp().detach())
    (gs,) = torch.autograd.grad(loss_fn(img, txt), s)
    assert gs.abs() > 1e-3  # the scale does get a gradient


def test_clip_loss_external_scale_overrides_and_buffers_when_not_learnable():
    img, txt = rand(6, 3, seed=9), rand(6, 3, seed=10)
    fixed = L.ClipLoss(init_logit_scale=0.5, learnable=False)
    assert list(fixed.parameters()) == [] and "logit_scale" in dict(fixed.named_buffers())
    ext = torch.tensor(math.exp(0.5), dtype=f64, requires_grad=True)
    a = L.ClipLoss(init_logit_scale=2.0)(img, txt, logit_scale=ext)  # open_clip: already exp'ed
    torch.testing.assert_close(a, fixed(img, txt))
    assert torch.autograd.grad(a, ext)[0].abs() > 0


# ---------------------------------------------------------------------------
# Negated bounds on critics
# ---------------------------------------------------------------------------


def make_critic(kind):
    torch.manual_seed(0)
    if kind == "dot":
        return None
    if kind == "bilinear":
        return C.Bilinear(5, 4).double()
    if kind == "concat":
        return C.ConcatMLP(5, 4, 16, activation="tanh").double()
    return C.Cosine(0.5, learnable=True).double()


BOUND_LOSSES = {
    "nwj": lambda c: (L.NWJLoss(c), {}),
    "dv": lambda c: (L.DVLoss(c), {}),
    "js": lambda c: (L.JSLoss(c), {}),
    "smile": lambda c: (L.SMILELoss(1.0, c), {"tau": 1.0}),
    "infonce": lambda c: (L.BoundLoss("infonce", c), {}),
}


@pytest.mark.parametrize("kind", ["dot", "bilinear", "concat", "cosine"])
@pytest.mark.parametrize("name", list(BOUND_LOSSES))
def test_bound_loss_is_negated_mi_lower_bound(name, kind):
    critic = make_critic(kind)
    dv = 5 if kind in ("dot", "cosine") else 4
    u, v = rand(9, 5, seed=11), rand(13, dv, seed=12)
    loss_fn, kw = BOUND_LOSSES[name](critic)
    out, diag = loss_fn(u, v, pos_offset=3, return_diagnostics=True)
    crit = loss_fn.critic
    expected = -ie.mi_lower_bound(u, v, crit, name, pos_offset=3, **kw)
    params = [u, v] + list(crit.parameters())
    assert_same(out, expected, params)
    # ... and against the materialised S of the critic (independent of the fused op)
    S = crit.scores(u, v)
    oracle = {"nwj": ref.nwj, "dv": ref.dv, "js": ref.js, "infonce": ref.infonce,
              "smile": lambda S, off: ref.smile(S, 1.0, off)}[name](S, 3)
    torch.testing.assert_close(out, -oracle)
    # per-row terms from the same fused outputs
    pos = torch.diagonal(S, offset=3).detach()
    neg = ref.negative_mask(9, 13, 3)
    Sd = S.detach()
    lme = ref._masked_lse(Sd, neg, 1) - math.log(12)
    rows = {"nwj": pos - torch.exp(lme - 1), "dv": pos - lme, "js": pos + 1 - torch.exp(lme),
            "infonce": pos - torch.logsumexp(Sd, 1) + math.log(13),
            "smile": pos - (ref._masked_lse(Sd.clamp(-1, 1), neg, 1) - math.log(12))}[name]
    torch.testing.assert_close(diag["per_row"], rows)
    torch.testing.assert_close(diag["bound"], -out.detach())
    assert diag["log_m"] == pytest.approx(math.log(13))


def test_tuba_loss_with_learned_baseline_matches_reference():
    torch.manual_seed(1)
    base = torch.nn.Linear(5, 1).double()
    loss_fn = L.TUBALoss(baseline=base)
    u, v = rand(8, 5, seed=13), rand(10, 5, seed=14)
    out, diag = loss_fn(u, v, pos_offset=1, return_diagnostics=True)
    a = base(u).squeeze(1)
    expected = -ref.tuba(ref.scores_dot(u, v), a, 1)
    assert_same(out, expected, [u, v, base.weight, base.bias])
    torch.testing.assert_close(diag["per_row"].mean(), -expected.detach())
    const = L.TUBALoss(baseline=0.7)(u, v)
    torch.testing.assert_close(const, -ref.tuba(ref.scores_dot(u, v), 0.7))


def test_mine_loss_keeps_the_moving_average_in_a_buffer():
    loss_fn = L.MINELoss(momentum=0.8)
    assert "log_ema" in loss_fn.state_dict() and torch.isnan(loss_fn.log_ema)
    ema = None
    for step in range(4):
        u, v = rand(10, 3, seed=20 + step), rand(12, 3, seed=30 + step)
        out, diag = loss_fn(u, v, return_diagnostics=True)
        bound, ema = ref.mine(ref.scores_dot(u, v), ema, 0.8)
        assert_same(out, -bound, [u, v])
        torch.testing.assert_close(loss_fn.log_ema, ema)
        torch.testing.assert_close(diag["log_ema"], ema)
    loss_fn.eval()  # evaluation does not move the average
    loss_fn(rand(10, 3, seed=99), rand(12, 3, seed=98))
    torch.testing.assert_close(loss_fn.log_ema, ema)


def test_diagnostics_need_no_second_pass(monkeypatch):
    calls = count_op_calls(monkeypatch)
    z1, z2, neg = rand(8, 4, seed=40), rand(8, 4, seed=41), rand(20, 4, seed=42)
    for loss_fn, args, n in [
        (L.InfoNCELoss(), (z1, z2), 1),
        (L.InfoNCELoss(symmetric=True), (z1, z2), 1),
        (L.InfoNCELoss(), (z1, z2, neg), 2),
        (L.NTXentLoss(), (z1, z2), 1),
        (L.ClipLoss().double(), (z1, z2), 1),
        (L.NWJLoss(), (z1, z2), 1),
        (L.SMILELoss(), (z1, z2), 1),
        (L.UniformityLoss(), (z1,), 1),
    ]:
        for diagnostics in (False, True):
            calls.clear()
            loss_fn(*args, return_diagnostics=diagnostics)
            assert len(calls) == n, (loss_fn, diagnostics)


def test_clip_losses_walk_their_gradient_in_one_op_call(monkeypatch):
    """With a backward to follow, the symmetric InfoNCE loss and ClipLoss (learnable scale
    and bias) are one ops.weighted call (its autograd node C++, no Python step around the
    op); without one, one score_reduce. Loss and gradients as the formula's."""
    calls = []
    real_w, real = ops.weighted, ops.score_reduce
    monkeypatch.setattr(ops, "weighted", lambda *x, **k: calls.append("weighted") or real_w(*x, **k))
    monkeypatch.setattr(ops, "score_reduce", lambda *x, **k: calls.append("plain") or real(*x, **k))
    z1, z2 = rand(9, 4, seed=46), rand(9, 4, seed=47)
    clip = L.ClipLoss(init_logit_scale=1.1, bias=0.3).double()
    for loss_fn, formula, params in (
        (L.InfoNCELoss(0.3, symmetric=True), lambda: ce_formula(z1, z2, 0.3, symmetric=True), []),
        (clip, lambda: (lambda S: (F.cross_entropy(S, torch.arange(9)) + F.cross_entropy(S.T, torch.arange(9))) / 2)(
            clip.logit_scale.exp() * z1 @ z2.T + clip.logit_bias), [clip.logit_scale, clip.logit_bias]),
    ):
        calls.clear()
        loss, diag = loss_fn(z1, z2, return_diagnostics=True)
        assert calls == ["weighted"]
        with torch.no_grad():
            loss_ng = loss_fn(z1, z2)
        assert calls == ["weighted", "plain"]
        want = formula()
        torch.testing.assert_close(loss, want)
        torch.testing.assert_close(loss_ng, want.detach())
        torch.testing.assert_close(diag["per_row"].mean(), want.detach())
        inputs = [z1, z2, *params]
        for g, h in zip(torch.autograd.grad(loss, inputs), torch.autograd.grad(want, inputs, allow_unused=True)):
            torch.testing.assert_close(g, torch.zeros_like(g) if h is None else h)


def test_reference_fallback_gives_the_same_losses():
    z1, z2, neg = rand(7, 4, seed=43), rand(9, 4, seed=44), rand(5, 4, seed=45)
    cases = [(L.InfoNCELoss(0.5), (z1, z2, neg), {"pos_offset": 2}),
             (L.NTXentLoss(), (z1, z2[:7]), {}),
             (L.ClipLoss().double(), (z1, z2[:7]), {}),
             (L.SMILELoss(2.0), (z1, z2), {"pos_offset": 1}),
             (L.TUBALoss(0.3), (z1, z2), {}),
             (L.NWJLoss(C.ConcatMLP(4, 4, 8).double()), (z1, z2), {}),
             (L.AlignUniformLoss(), (z1, z2[:7]), {})]
    fused = [fn(*a, return_diagnostics=True, **kw) for fn, a, kw in cases]
    try:
        ie.use_reference(True)
        oracle = [fn(*a, return_diagnostics=True, **kw) for fn, a, kw in cases]
    finally:
        ie.use_reference(False)
    for (lf, df), (lr, dr) in zip(fused, oracle):
        assert_same(lf, lr, [z1, z2, neg])
        torch.testing.assert_close(df["per_row"], dr["per_row"])


def test_mine_reference_fallback_matches():
    u, v = rand(6, 3, seed=46), rand(6, 3, seed=47)
    a, b = L.MINELoss(), L.MINELoss()
    fa = a(u, v)
    try:
        ie.use_reference(True)
        fb = b(u, v)
    finally:
        ie.use_reference(False)
    assert_same(fa, fb, [u, v])
    torch.testing.assert_close(a.log_ema, b.log_ema)


# ---------------------------------------------------------------------------
# Alignment and uniformity
# ---------------------------------------------------------------------------


def test_alignment_uniformity_match_wang_isola_and_stay_finite():
    x, y = F.normalize(rand(30, 8, seed=50, grad=False), dim=1), F.normalize(rand(30, 8, seed=51, grad=False), dim=1)
    x.requires_grad_(), y.requires_grad_()
    align = L.AlignmentLoss(alpha=1.5)(x, y)
    assert_same(align, (x - y).norm(p=2, dim=1).pow(1.5).mean(), [x, y])
    unif, diag = L.UniformityLoss(t=3)(x, return_diagnostics=True)
    assert_same(unif, torch.pdist(x, p=2).pow(2).mul(-3).exp().mean().log(), [x])
    torch.testing.assert_close(torch.logsumexp(diag["per_row"], 0) - math.log(30), unif.detach())
    both = L.AlignUniformLoss(lam=0.7)(x * 3, y * 2)  # normalises by default
    xn, yn = F.normalize(x * 3, dim=1), F.normalize(y * 2, dim=1)
    expected = ((xn - yn).norm(dim=1).pow(2).mean()
                + 0.7 * (ref.uniformity_pdist(xn) + ref.uniformity_pdist(yn)) / 2)
    assert_same(both, expected, [x, y])
    far = torch.zeros(20, 3, dtype=f64)
    far[:, 0] = 10 * torch.arange(20)  # squared distances >= 100: exp(-200) underflows in float32
    far = far.float().requires_grad_()
    assert ref.uniformity_pdist(far) == -math.inf
    value = L.UniformityLoss()(far)
    assert torch.isfinite(value)
    torch.testing.assert_close(value.double(), ref.uniformity(far.double()), rtol=1e-4, atol=1e-3)


def test_loss_input_errors():
    z = rand(4, 3, seed=60, grad=False)
    with pytest.raises(ValueError, match="temperature"):
        L.InfoNCELoss(0.0)
    with pytest.raises(ValueError, match="K == M"):
        L.InfoNCELoss(symmetric=True)(z, rand(5, 3, seed=61))
    with pytest.raises(ValueError, match="bank_only"):
        L.InfoNCELoss(bank_only=True)(z, z)
    with pytest.raises(ValueError, match="negatives"):
        L.InfoNCELoss()(z, z, negatives=rand(5, 2, seed=62))
    with pytest.raises(ValueError, match="M >= K"):
        L.InfoNCELoss()(z, z[:2])
    with pytest.raises(ValueError, match="same N"):
        L.NTXentLoss()(z, rand(5, 3, seed=63))
    with pytest.raises(ValueError, match="as many texts"):
        L.ClipLoss()(z, rand(5, 3, seed=63))
    with pytest.raises(ValueError, match="MINELoss"):
        L.BoundLoss("mine")
    with pytest.raises(ValueError, match="unknown estimator"):
        L.BoundLoss("foo")
    with pytest.raises(ValueError, match="tau"):
        L.SMILELoss(0.0)
    with pytest.raises(ValueError, match="K >= 2"):
        L.UniformityLoss()(z[:1])
    with pytest.raises(ValueError, match="same shape"):
        L.AlignmentLoss()(z, rand(5, 3, seed=64))


# ---------------------------------------------------------------------------
# torch.compile (few and small: an inductor compile costs 10-20 s on 2 cores, so one
# case goes through inductor and the rest through aot_eager, which runs the same
# capture: dynamo, fake kernels, AOT autograd and the buffer functionalisation)
# ---------------------------------------------------------------------------


def _compile_case(loss_fn, inputs, params, backend="aot_eager", **kw):
    torch._dynamo.reset()
    eager = loss_fn(*inputs, **kw)
    g_eager = grads(eager, inputs + params)
    compiled = torch.compile(lambda *a: loss_fn(*a, **kw), fullgraph=True, backend=backend)(*inputs)
    torch.testing.assert_close(compiled, eager)
    for g, h in zip(grads(compiled, inputs + params), g_eager):
        torch.testing.assert_close(g, h)


def test_compile_inductor_symmetric_infonce_with_bank():
    z1, z2, neg = (rand(12, 8, seed=70 + k, dtype=torch.float32) for k in range(3))
    _compile_case(L.InfoNCELoss(0.2, symmetric=True), [z1, z2, neg[:5]], [], backend="inductor")


def test_compile_clip_ntxent_and_critic_bound_loss():
    z1, z2 = rand(12, 8, seed=73, dtype=torch.float32), rand(12, 8, seed=74, dtype=torch.float32)
    clip = L.ClipLoss(bias=0.1)
    _compile_case(clip, [z1, z2], [clip.logit_scale])
    _compile_case(L.NTXentLoss(0.3), [z1, z2], [])
    torch.manual_seed(2)
    smile = L.SMILELoss(critic=C.ConcatMLP(8, 8, 8, activation="tanh"))
    _compile_case(smile, [z1[:10], z2], list(smile.parameters()), pos_offset=2)


def test_compile_mine_buffer_update():
    torch._dynamo.reset()
    eager, compiled = L.MINELoss(), L.MINELoss()
    step = torch.compile(compiled, fullgraph=True, backend="aot_eager")
    for k in range(2):  # the first step fills the NaN sentinel, the second merges
        a, b = rand(10, 4, seed=80 + k, dtype=torch.float32), rand(10, 4, seed=90 + k, dtype=torch.float32)
        e, c = eager(a, b), step(a, b)
        torch.testing.assert_close(c, e)
        torch.testing.assert_close(grads(c, [a, b]), grads(e, [a, b]))
        torch.testing.assert_close(compiled.log_ema, eager.log_ema)


# ---------------------------------------------------------------------------
# bf16 autocast with a Linear encoder in front
# ---------------------------------------------------------------------------


def clip_formula(z1, z2, scale):
    logits = scale * z1 @ z2.T
    labels = torch.arange(z1.shape[0])
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def align_uniform_formula(x, y):
    x, y = F.normalize(x, dim=-1), F.normalize(y, dim=-1)
    return ((x - y).norm(p=2, dim=1).pow(2).mean()
            + (ref.uniformity(x) + ref.uniformity(y)) / 2)  # (torch.pdist has no bf16 kernel)


# name -> (our loss, the materialised plain-torch formula of the same loss)
AUTOCAST_LOSSES = {
    "infonce": (lambda: L.InfoNCELoss(0.2, symmetric=True),
                lambda a, b: ce_formula(a, b, 0.2, symmetric=True)),
    "ntxent": (lambda: L.NTXentLoss(0.5), lambda a, b: ntxent_formula(a, b, 0.5)),
    "clip": (lambda: L.ClipLoss(init_logit_scale=math.log(10.0)), lambda a, b: clip_formula(a, b, 10.0)),
    "nwj": (lambda: L.NWJLoss(C.Dot(0.25)), lambda a, b: -ref.nwj(4.0 * a @ b.T)),
    "align_uniform": (lambda: L.AlignUniformLoss(), align_uniform_formula),
}


@pytest.mark.parametrize("name", list(AUTOCAST_LOSSES))
def test_bf16_autocast_matches_float32_within_bf16_error(name, monkeypatch):
    torch.manual_seed(3)
    enc = torch.nn.Linear(16, 32)
    if name == "nwj":
        enc.weight.data *= 0.1  # keep exp(S) moderate: NWJ's S is an unnormalised dot product
    x1 = torch.randn(64, 16)
    x2 = x1 + 0.5 * torch.randn(64, 16)
    make, formula = AUTOCAST_LOSSES[name]
    loss_fn = make()
    params = list(enc.parameters())

    exact = loss_fn(enc(x1), enc(x2))  # float32 throughout
    g_exact = torch.autograd.grad(exact, params)
    calls = count_op_calls(monkeypatch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z1 = enc(x1)
        assert z1.dtype == torch.bfloat16
        low = loss_fn(z1, enc(x2))
        plain = formula(enc(x1), enc(x2))  # the materialised formula under the same autocast
    assert calls and all(dt == (torch.bfloat16, torch.bfloat16) for dt in calls)  # inputs stay bf16
    assert low.dtype == torch.float32  # reductions and the result in float32
    g_low = torch.autograd.grad(low, params)
    # bf16 keeps 8 bits: the inputs carry ~4e-3 relative error, which the loss inherits.
    torch.testing.assert_close(low, exact, rtol=2e-2, atol=2e-2)
    for g, h in zip(g_low, g_exact):
        assert (g.float() - h).norm() <= 0.05 * h.norm() + 1e-4
    # error ratio (flash-attention style): no worse than plain torch in the same autocast
    with torch.no_grad():
        truth = formula(enc(x1).double(), enc(x2).double())
    assert (low.double() - truth).abs() <= 2 * (plain.double() - truth).abs() + 1e-3
