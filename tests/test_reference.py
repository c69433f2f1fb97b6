"""Independent tests of the pure-torch oracle ``infomax_ext.reference``.

Convention: S is (K, M), rows are anchors u (view 1), columns candidates v
(view 2), M >= K, the positive of row i is column i + pos_offset, every other
entry is a negative (n_neg = K * (M - 1)).

Expected values are computed independently: by cross entropy, by explicit
Python ``math`` sums over the few entries of tiny matrices, by Python loops, or
by ``nn.Linear`` modules, never by calling the helpers under test.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from infomax_ext import reference as ref

SEEDS = [0, 1, 2]
SHAPES = [(1, 1, 0), (1, 4, 3), (3, 3, 0), (3, 5, 2), (4, 7, 1), (5, 9, 0)]


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _randn(*shape, seed, dtype=torch.float64, scale=1.0):
    return torch.randn(*shape, generator=_gen(seed), dtype=dtype) * scale


def _grad(fn, S):
    S = S.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(fn(S), S)
    return g


# ---------------------------------------------------------------------------
# InfoNCE vs cross entropy
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("K,M,off", SHAPES)
def test_infonce_equals_log_m_minus_cross_entropy(K, M, off, seed):
    S = _randn(K, M, seed=seed, scale=3.0)
    targets = torch.arange(K) + off
    expected = math.log(M) - F.cross_entropy(S, targets)
    torch.testing.assert_close(ref.infonce(S, pos_offset=off), expected)
    assert ref.infonce(S, pos_offset=off).item() <= math.log(M) + 1e-12


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("K", [1, 2, 5, 8])
def test_infonce_symmetric_equals_mean_of_two_cross_entropies(K, seed):
    S = _randn(K, K, seed=seed, scale=2.0)
    # Make it non-symmetric so rows and columns differ.
    S = S + torch.arange(K, dtype=S.dtype).unsqueeze(0)
    t = torch.arange(K)
    expected = math.log(K) - (F.cross_entropy(S, t) + F.cross_entropy(S.T, t)) / 2
    torch.testing.assert_close(ref.infonce_symmetric(S), expected)


# ---------------------------------------------------------------------------
# Uniformity and alignment
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("t", [0.5, 2.0])
def test_uniformity_matches_pdist_on_spread_points(seed, t):
    x = F.normalize(_randn(9, 4, seed=seed), dim=1)
    u = ref.uniformity(x, t=t)
    p = ref.uniformity_pdist(x, t=t)
    assert torch.isfinite(p)
    torch.testing.assert_close(u, p)


@pytest.mark.parametrize("seed", SEEDS)
def test_uniformity_finite_where_pdist_underflows(seed):
    x = _randn(5, 3, seed=seed, dtype=torch.float32) * 30.0
    p = ref.uniformity_pdist(x, t=2.0)
    assert p.item() == -math.inf
    u = ref.uniformity(x, t=2.0)
    assert torch.isfinite(u)
    # Independent float64 log-sum-exp over ordered pairs i != j with a Python loop.
    xd = x.double().tolist()
    vals = []
    for i in range(5):
        for j in range(5):
            if i != j:
                vals.append(-2.0 * sum((a - b) ** 2 for a, b in zip(xd[i], xd[j])))
    m = max(vals)
    expected = m + math.log(sum(math.exp(v - m) for v in vals)) - math.log(len(vals))
    assert u.dtype == torch.float32
    assert math.isclose(u.item(), expected, rel_tol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_softplus_keeps_its_last_bits_past_torchs_threshold(dtype):
    """reference.softplus (NEG_SOFTPLUS, JS's positive term, the concat activation) is
    log(1 + e^x) to the dtype's resolution, also for 20 < x < 40 where F.softplus's
    default threshold returns x itself; its gradient is sigmoid(x). Judged against
    max(x, 0) + log1p(e^-|x|) in Python floats."""
    xs = [-800.0, -50.0, -5.0, 0.0, 3.0, 20.5, 25.0, 33.0, 39.9, 40.5, 100.0, 800.0]
    x = torch.tensor(xs, dtype=dtype, requires_grad=True)
    y = ref.softplus(x)
    exact = [max(v, 0.0) + math.log1p(math.exp(-abs(v))) for v in x.tolist()]
    sig = [1 / (1 + math.exp(-v)) if v > -700 else 0.0 for v in x.tolist()]
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(y.double(), torch.tensor(exact, dtype=torch.float64), rtol=eps, atol=0)
    (g,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(g.double(), torch.tensor(sig, dtype=torch.float64), rtol=eps, atol=1e-300)


def test_alignment_by_hand():
    x = torch.tensor([[0.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    y = torch.tensor([[3.0, 4.0], [1.0, 2.0]], dtype=torch.float64)
    # distances 5 and 1
    torch.testing.assert_close(ref.alignment(x, y), torch.tensor((25.0 + 1.0) / 2, dtype=torch.float64))
    torch.testing.assert_close(ref.alignment(x, y, alpha=1.0), torch.tensor(3.0, dtype=torch.float64))


# ---------------------------------------------------------------------------
# Estimators by hand on tiny matrices
# ---------------------------------------------------------------------------

# 2 x 3, pos_offset = 1: positives S[0,1], S[1,2]; negatives of row 0 are
# columns 0 and 2, of row 1 columns 0 and 1; n_neg = 4. Entries exceed +-1 so
# that SMILE's clipping with tau = 1 is active.
S23 = [[0.3, 2.0, -1.5], [1.7, -0.4, 1.1]]
# 2 x 2, pos_offset = 0: positives S[0,0], S[1,1]; negatives S[0,1], S[1,0].
S22 = [[1.2, -0.7], [2.5, 0.4]]

HAND = {
    "S23": dict(S=S23, off=1, pos=[S23[0][1], S23[1][2]], neg=[S23[0][0], S23[0][2], S23[1][0], S23[1][1]],
                neg_rows=[0, 0, 1, 1]),
    "S22": dict(S=S22, off=0, pos=[S22[0][0], S22[1][1]], neg=[S22[0][1], S22[1][0]], neg_rows=[0, 1]),
}


def _softplus(x):
    return math.log1p(math.exp(x))


@pytest.mark.parametrize("case", sorted(HAND))
def test_estimators_by_hand(case):
    c = HAND[case]
    S = torch.tensor(c["S"], dtype=torch.float64)
    off, pos, neg = c["off"], c["pos"], c["neg"]
    mp = sum(pos) / len(pos)
    n = len(neg)
    mean_exp_neg = sum(math.exp(s) for s in neg) / n

    dv = mp - math.log(mean_exp_neg)
    nwj = mp - math.exp(-1.0) * mean_exp_neg
    js_value = mp + 1.0 - mean_exp_neg
    js_obj = -sum(_softplus(-p) for p in pos) / len(pos) - sum(_softplus(s) for s in neg) / n
    tau = 1.0
    smile = mp - math.log(sum(math.exp(min(max(s, -tau), tau)) for s in neg) / n)
    base = [0.25, -0.6]
    tuba = (1.0 + sum(p - b for p, b in zip(pos, base)) / len(pos)
            - sum(math.exp(s - base[r]) for s, r in zip(neg, c["neg_rows"])) / n)

    def chk(got, want):
        assert got.dim() == 0
        assert math.isclose(got.item(), want, rel_tol=1e-12, abs_tol=1e-12), (got.item(), want)

    chk(ref.dv(S, pos_offset=off), dv)
    chk(ref.nwj(S, pos_offset=off), nwj)
    chk(ref.js(S, pos_offset=off), js_value)
    chk(ref.js_objective(S, pos_offset=off), js_obj)
    chk(ref.smile(S, tau=tau, pos_offset=off), smile)
    chk(ref.tuba(S, torch.tensor(base, dtype=torch.float64), pos_offset=off), tuba)
    chk(ref.mine(S, pos_offset=off)[0], dv)
    torch.testing.assert_close(ref.positive_scores(S, off), torch.tensor(pos, dtype=torch.float64))


def test_smile_clipping_changes_value():
    # Guard that the hand test above exercises the clamp: with tau = 1, SMILE != DV.
    S = torch.tensor(S23, dtype=torch.float64)
    assert abs(ref.smile(S, tau=1.0, pos_offset=1).item() - ref.dv(S, pos_offset=1).item()) > 1e-3


def test_nwj_is_tuba_of_s_minus_one():
    S = _randn(3, 6, seed=5)
    torch.testing.assert_close(ref.nwj(S, 2), ref.tuba(S - 1.0, torch.zeros(3, dtype=S.dtype), 2))


def test_nwj_overflow_is_inf_not_nan():
    # The sum of exp overflows, the mean does not: the value must stay finite.
    S = torch.full((4, 4), 709.0, dtype=torch.float64)
    v = ref.nwj(S)
    assert torch.isfinite(v)
    assert math.isclose(v.item(), 709.0 - math.exp(708.0), rel_tol=1e-12)
    # The true value is -inf: -inf, never NaN.
    v = ref.nwj(torch.full((3, 3), 1e4, dtype=torch.float64))
    assert v.item() == -math.inf


# ---------------------------------------------------------------------------
# Gradients of SMILE / JS / MINE
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("K,M,off", [(2, 3, 1), (4, 4, 0), (3, 7, 2)])
def test_smile_huge_tau_equals_dv(K, M, off, seed):
    S = _randn(K, M, seed=seed, scale=4.0)
    torch.testing.assert_close(ref.smile(S, tau=1e30, pos_offset=off), ref.dv(S, pos_offset=off))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("K,M,off", [(2, 3, 1), (4, 4, 0), (3, 7, 2)])
def test_smile_and_js_gradients_are_js_objective_gradient(K, M, off, seed):
    S = _randn(K, M, seed=seed, scale=3.0)
    g_obj = _grad(lambda s: ref.js_objective(s, off), S)
    torch.testing.assert_close(_grad(lambda s: ref.smile(s, 5.0, off), S), g_obj)
    torch.testing.assert_close(_grad(lambda s: ref.smile(s, 1.0, off), S), g_obj)
    torch.testing.assert_close(_grad(lambda s: ref.js(s, off), S), g_obj)
    # Hand formula of the JS-objective gradient: positives sigmoid(-S)/K,
    # negatives -sigmoid(S)/n_neg.
    mask = torch.ones(K, M, dtype=torch.bool)
    mask[torch.arange(K), torch.arange(K) + off] = False
    want = torch.where(mask, -torch.sigmoid(S) / (K * (M - 1)), torch.sigmoid(-S) / K)
    torch.testing.assert_close(g_obj, want)


@pytest.mark.parametrize("seed", SEEDS)
def test_mine_value_and_first_gradient_equal_dv(seed):
    S = _randn(3, 5, seed=seed, scale=2.0)
    bound, log_ema = ref.mine(S, pos_offset=2)
    torch.testing.assert_close(bound, ref.dv(S, pos_offset=2))
    g_mine = _grad(lambda s: ref.mine(s, pos_offset=2)[0], S)
    g_dv = _grad(lambda s: ref.dv(s, pos_offset=2), S)
    torch.testing.assert_close(g_mine, g_dv)
    assert not log_ema.requires_grad


@pytest.mark.parametrize("ema", [0.5, -2.0, 3.0])
def test_mine_second_call_gradient_by_hand(ema):
    S = torch.tensor(S23, dtype=torch.float64)
    c = HAND["S23"]
    neg = c["neg"]
    n = len(neg)
    sum_exp = sum(math.exp(s) for s in neg)
    lme = math.log(sum_exp / n)
    new = math.log(0.9 * math.exp(ema) + 0.1 * math.exp(lme))
    scale = math.exp(lme - new)  # gradient factor of the log-partition term

    ema_t = torch.tensor(ema, dtype=torch.float64)
    Sg = S.clone().requires_grad_(True)
    bound, new_log_ema = ref.mine(Sg, ema=ema_t, momentum=0.9, pos_offset=1)
    (g,) = torch.autograd.grad(bound, Sg)

    assert math.isclose(new_log_ema.item(), new, rel_tol=1e-12)
    assert not new_log_ema.requires_grad
    # Value is still DV.
    assert math.isclose(bound.item(), sum(c["pos"]) / 2 - lme, rel_tol=1e-12)
    # Positives get 1/K, negatives -scale * exp(S_ij) / sum_neg exp.
    want = [[-scale * math.exp(S23[0][0]) / sum_exp, 0.5, -scale * math.exp(S23[0][2]) / sum_exp],
            [-scale * math.exp(S23[1][0]) / sum_exp, -scale * math.exp(S23[1][1]) / sum_exp, 0.5]]
    torch.testing.assert_close(g, torch.tensor(want, dtype=torch.float64))
    # It is the DV gradient with the negative part scaled.
    g_dv = _grad(lambda s: ref.dv(s, pos_offset=1), S)
    assert not torch.allclose(g, g_dv)


def test_mine_log_ema_does_not_overflow():
    S = _randn(3, 4, seed=7)
    _, new = ref.mine(S, ema=torch.tensor(5000.0, dtype=torch.float64), momentum=0.9)
    assert math.isclose(new.item(), 5000.0 + math.log(0.9), rel_tol=1e-12)


# ---------------------------------------------------------------------------
# score_reduce
# ---------------------------------------------------------------------------


def _loop_reductions(S, off, tau):
    """Independent per-row reductions with explicit Python lists of negatives."""
    K, M = S.shape
    neg_lse, neg_clamp, neg_sp = [], [], []
    for i in range(K):
        negs = [S[i, j] for j in range(M) if j != i + off]
        if negs:
            t = torch.stack(negs)
            neg_lse.append(torch.logsumexp(t, 0))
            neg_clamp.append(torch.logsumexp(t.clamp(-tau, tau), 0))
            neg_sp.append(sum(torch.logaddexp(x, x.new_zeros(())) for x in negs))
        else:
            neg_lse.append(S.new_tensor(-math.inf))
            neg_clamp.append(S.new_tensor(-math.inf))
            neg_sp.append(S.new_tensor(0.0))
    return torch.stack(neg_lse), torch.stack(neg_clamp), torch.stack(neg_sp)


def _inputs(K, M, d, seed, dtype=torch.float64):
    g = _gen(seed)
    a = torch.randn(K, d, generator=g, dtype=dtype)
    b = torch.randn(M, d, generator=g, dtype=dtype)
    rb = torch.randn(K, generator=g, dtype=dtype)
    cb = torch.randn(M, generator=g, dtype=dtype)
    return a, b, rb, cb


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("K,M,off", SHAPES)
@pytest.mark.parametrize("bias", [False, True])
def test_score_reduce_outputs(K, M, off, seed, bias):
    a, b, rb, cb = _inputs(K, M, 6, seed)
    scale = torch.tensor(1.7, dtype=torch.float64)
    tau = 0.8
    if not bias:
        rb = cb = None
    # Independent S by explicit loop.
    S = torch.empty(K, M, dtype=torch.float64)
    for i in range(K):
        for j in range(M):
            S[i, j] = 1.7 * torch.dot(a[i], b[j]) + (rb[i] if bias else 0.0) + (cb[j] if bias else 0.0)
    row, col, nl, ncl, nsp = ref.score_reduce(a, b, scale, rb, cb, pos_offset=off, clamp_tau=tau)
    torch.testing.assert_close(row, torch.logsumexp(S, 1))
    torch.testing.assert_close(col, torch.logsumexp(S, 0))
    e_nl, e_ncl, e_nsp = _loop_reductions(S, off, tau)
    torch.testing.assert_close(nl, e_nl)
    torch.testing.assert_close(ncl, e_ncl)
    torch.testing.assert_close(nsp, e_nsp)
    for out, n in zip((row, col, nl, ncl, nsp), (K, M, K, K, K)):
        assert out.shape == (n,) and out.dtype == torch.float64


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("K,M,off", [(3, 3, 0), (2, 5, 3), (4, 6, 1)])
def test_score_reduce_gradients_match_slicing_reference(K, M, off, seed):
    a, b, rb, cb = _inputs(K, M, 5, seed)
    scale = torch.tensor(0.9, dtype=torch.float64)
    w = torch.randn(K * 4 + M, generator=_gen(100 + seed), dtype=torch.float64)
    leaves = [t.requires_grad_(True) for t in (a, b, scale, rb, cb)]

    outs = ref.score_reduce(a, b, scale, rb, cb, pos_offset=off, clamp_tau=1.0)
    got = torch.autograd.grad(torch.dot(torch.cat(outs), w), leaves)

    # Independent graph: S by broadcasting, negatives gathered by slicing.
    S = scale * (a.unsqueeze(1) * b.unsqueeze(0)).sum(-1) + rb[:, None] + cb[None, :]
    e = torch.cat((torch.logsumexp(S, 1), torch.logsumexp(S, 0), *_loop_reductions(S, off, 1.0)))
    want = torch.autograd.grad(torch.dot(e, w), leaves)
    for g1, g2 in zip(got, want):
        torch.testing.assert_close(g1, g2)


def test_score_reduce_gradcheck():
    a, b, rb, cb = _inputs(3, 4, 3, 11)
    scale = torch.tensor(1.3, dtype=torch.float64)
    leaves = tuple(t.requires_grad_(True) for t in (a, b, scale, rb, cb))

    def fn(a, b, scale, rb, cb):
        return ref.score_reduce(a, b, scale, rb, cb, pos_offset=1, clamp_tau=0.7)

    assert torch.autograd.gradcheck(fn, leaves)


@pytest.mark.parametrize(
    "mask",
    [0, ref.ROW_LSE, ref.COL_LSE | ref.NEG_SOFTPLUS, ref.NEG_LSE | ref.NEG_CLAMP_LSE, ref.ALL_REDUCTIONS],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_score_reduce_masked_bits_are_empty(mask, dtype):
    a, b, _, _ = _inputs(3, 5, 4, 3, dtype=dtype)
    outs = ref.score_reduce(a, b, 1.0, reductions=mask)
    full = ref.score_reduce(a, b, 1.0)
    acc = torch.float32 if dtype == torch.float16 else dtype
    bits = (ref.ROW_LSE, ref.COL_LSE, ref.NEG_LSE, ref.NEG_CLAMP_LSE, ref.NEG_SOFTPLUS)
    for bit, o, f in zip(bits, outs, full):
        assert o.dtype == acc
        if mask & bit:
            torch.testing.assert_close(o, f)
        else:
            assert o.shape == (0,)
    assert ref.ALL_REDUCTIONS == 31


def test_score_reduce_single_column():
    a, b, rb, cb = _inputs(1, 1, 4, 9)
    leaves = [t.requires_grad_(True) for t in (a, b)]
    row, col, nl, ncl, nsp = ref.score_reduce(a, b, 2.0, rb, cb)
    s = 2.0 * torch.dot(a[0], b[0]) + rb[0] + cb[0]
    torch.testing.assert_close(row, s.reshape(1))
    torch.testing.assert_close(col, s.reshape(1))
    assert nl.tolist() == [-math.inf]
    assert ncl.tolist() == [-math.inf]
    assert nsp.tolist() == [0.0]
    # Finite outputs give finite gradients; the empty negative set gives zero, not NaN.
    ga, gb = torch.autograd.grad(row.sum() + nsp.sum(), leaves, retain_graph=True)
    assert torch.isfinite(ga).all() and torch.isfinite(gb).all()
    ga, gb = torch.autograd.grad(nl.sum() + ncl.sum(), leaves)
    assert (ga == 0).all() and (gb == 0).all()


@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16])
def test_score_reduce_half_accumulates_in_float32(half):
    a, b, rb, cb = _inputs(4, 6, 8, 21, dtype=torch.float32)
    a, b, rb, cb = (t.to(half) for t in (a, b, rb, cb))
    scale = torch.tensor(2.0, dtype=half)
    outs = ref.score_reduce(a, b, scale, rb, cb, pos_offset=2)
    want = ref.score_reduce(*(t.double() for t in (a, b, scale, rb, cb)), pos_offset=2)
    for o, w in zip(outs, want):
        assert o.dtype == torch.float32
        # Upcast inputs are exact; only float32 accumulation error remains.
        torch.testing.assert_close(o.double(), w, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------
# Critics
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
def test_scores_dot_and_cosine(seed):
    a, b, rb, cb = _inputs(3, 5, 4, seed)
    S = ref.scores_dot(a, b, 0.5, rb, cb)
    for i in range(3):
        for j in range(5):
            want = 0.5 * float(torch.dot(a[i], b[j])) + float(rb[i]) + float(cb[j])
            assert math.isclose(float(S[i, j]), want, rel_tol=1e-12, abs_tol=1e-12)
    C = ref.scores_cosine(a, b, temperature=0.2)
    torch.testing.assert_close(C, F.cosine_similarity(a.unsqueeze(1), b.unsqueeze(0), dim=-1) / 0.2)
    # No upcast: float32 in, float32 out; learnable scale gets a gradient.
    s = torch.tensor(1.5, requires_grad=True)
    S32 = ref.scores_dot(a.float(), b.float(), s)
    assert S32.dtype == torch.float32
    (g,) = torch.autograd.grad(S32.sum(), s)
    torch.testing.assert_close(g, (a.float() @ b.float().T).sum())


@pytest.mark.parametrize("seed", SEEDS)
def test_scores_bilinear_equals_loop(seed):
    g = _gen(seed)
    u = torch.randn(3, 4, generator=g, dtype=torch.float64)
    v = torch.randn(5, 2, generator=g, dtype=torch.float64)
    W = torch.randn(4, 2, generator=g, dtype=torch.float64)
    S = ref.scores_bilinear(u, v, W)
    want = torch.empty(3, 5, dtype=torch.float64)
    for i in range(3):
        for j in range(5):
            want[i, j] = sum(u[i, p] * W[p, q] * v[j, q] for p in range(4) for q in range(2))
    torch.testing.assert_close(S, want)


MODULES = {"relu": nn.ReLU, "elu": nn.ELU, "tanh": nn.Tanh, "softplus": nn.Softplus, "gelu": nn.GELU}


@pytest.mark.parametrize("activation", sorted(MODULES))
@pytest.mark.parametrize("seed", [0, 1])
def test_scores_concat_equals_mlp_on_concatenation(activation, seed):
    K, M, du, dv, H = 3, 4, 5, 2, 7
    g = _gen(seed)
    u = torch.randn(K, du, generator=g, dtype=torch.float64)
    v = torch.randn(M, dv, generator=g, dtype=torch.float64)
    mlp = nn.Sequential(nn.Linear(du + dv, H), MODULES[activation](), nn.Linear(H, 1)).double()
    with torch.no_grad():
        for p in mlp.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    W1, b1 = mlp[0].weight, mlp[0].bias
    w2, b2 = mlp[2].weight[0], mlp[2].bias[0]
    S = ref.scores_concat(u, v, W1[:, :du], W1[:, du:], b1, w2, b2, activation=activation)
    with torch.no_grad():
        for i in range(K):
            for j in range(M):
                want = mlp(torch.cat([u[i], v[j]]))[0]
                assert math.isclose(float(S[i, j]), float(want), rel_tol=1e-10, abs_tol=1e-10)
    assert ref.activation_fn(activation) is not None


# ---------------------------------------------------------------------------
# Bad inputs
# ---------------------------------------------------------------------------

_S34 = torch.zeros(3, 4)
_S33 = torch.zeros(3, 3)
_S11 = torch.zeros(1, 1)

BAD = {
    "pos_offset_too_big": lambda: ref.infonce(_S34, pos_offset=2),
    "pos_offset_negative": lambda: ref.dv(_S34, pos_offset=-1),
    "pos_offset_positive_scores": lambda: ref.positive_scores(_S33, pos_offset=1),
    "m_less_than_k": lambda: ref.nwj(torch.zeros(4, 3)),
    "s_not_2d": lambda: ref.infonce(torch.zeros(3)),
    "dv_single_column": lambda: ref.dv(_S11),
    "nwj_single_column": lambda: ref.nwj(_S11),
    "js_single_column": lambda: ref.js(_S11),
    "smile_single_column": lambda: ref.smile(_S11),
    "mine_single_column": lambda: ref.mine(_S11),
    "tuba_single_column": lambda: ref.tuba(_S11, torch.zeros(1)),
    "symmetric_not_square": lambda: ref.infonce_symmetric(_S34),
    "smile_tau_zero": lambda: ref.smile(_S33, tau=0.0),
    "smile_tau_negative": lambda: ref.smile(_S33, tau=-1.0),
    "unknown_activation": lambda: ref.activation_fn("swish"),
    "concat_unknown_activation": lambda: ref.scores_concat(
        torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(4, 3), torch.zeros(4, 3),
        torch.zeros(4), torch.zeros(4), activation="sigmoid"),
    "score_reduce_offset": lambda: ref.score_reduce(torch.zeros(3, 2), torch.zeros(4, 2), 1.0, pos_offset=2),
    "uniformity_one_point": lambda: ref.uniformity(torch.zeros(1, 3)),
    "tuba_bad_baseline": lambda: ref.tuba(_S34, torch.zeros(4)),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_inputs_raise_value_error(name):
    with pytest.raises(ValueError):
        BAD[name]()


def test_error_messages_name_the_argument():
    with pytest.raises(ValueError, match="pos_offset"):
        ref.infonce(_S34, pos_offset=5)
    with pytest.raises(ValueError, match="tau"):
        ref.smile(_S33, tau=0.0)
    with pytest.raises(ValueError, match="relu"):
        ref.activation_fn("swish")
    with pytest.raises(ValueError, match="K == M"):
        ref.infonce_symmetric(_S34)
