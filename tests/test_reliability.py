"""Fuzzing against the reference, NaN policy, int64 indexing, memory stability."""
import math
import os
import resource

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import infomax_ext as ie
from infomax_ext import ops, reference as ref
from helpers import ARGS, sample_inputs

pytestmark = pytest.mark.skipif(not ie._backend.HAS_C, reason="compiled module not built")


@st.composite
def problems(draw):
    K = draw(st.sampled_from([1, 2, 3, 5, 31, 63, 64, 65, 97, 127, 128, 129]))
    M = K + draw(st.sampled_from([0, 1, 2, 446, 447, 448, 511, 512, 513, 600]))
    d = draw(st.one_of(st.integers(1, 9), st.sampled_from([15, 16, 17, 31, 33, 64, 65, 100])))
    return dict(
        K=K, M=M, d=d,
        pos_offset=draw(st.integers(0, M - K)),
        scale=draw(st.sampled_from([-3.0, 0.0, 0.01, 1.0, 7.5, 40.0])),
        biases=draw(st.booleans()),
        masked=draw(st.booleans()),
        reductions=draw(st.integers(1, 31)),
        tau=draw(st.sampled_from([0.5, 1.0, 5.0])),
        dtype=draw(st.sampled_from([torch.float64, torch.float32])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def fuzz_inputs(p, g, device, masks=True):
    """(a, b, scale, row_bias, col_bias) of one drawn problem on ``device``, all requiring grad."""
    dt = dict(device=device, dtype=p["dtype"])
    a = torch.randn(p["K"], p["d"], generator=g, dtype=torch.float64).to(**dt).requires_grad_()
    b = torch.randn(p["M"], p["d"], generator=g, dtype=torch.float64).to(**dt).requires_grad_()
    scale = torch.tensor(p["scale"], **dt, requires_grad=True)
    rb = cb = None
    if p["biases"]:
        rb = torch.randn(p["K"], generator=g, dtype=torch.float64).to(**dt)
        cb = torch.randn(p["M"], generator=g, dtype=torch.float64)
        if masks and p["masked"]:  # mask about a fifth of the columns
            cb = torch.where(torch.rand(p["M"], generator=g) < 0.2, -math.inf, cb)
        cb = cb.to(**dt)
        rb.requires_grad_()
        cb.requires_grad_()
    return a, b, scale, rb, cb


# NB: the fuzz tests take the ``device`` fixture (every backend: the CPU kernels, the
# emulated CUDA kernels, a GPU), which stays the same over a test's examples.
FIXTURE_OK = [HealthCheck.too_slow, HealthCheck.function_scoped_fixture]


def exact_copies(tensors):
    """float64 leaves holding the same values: a float32 problem's exact truth comes
    from the reference on these."""
    return [None if t is None else t.detach().double().requires_grad_(t.requires_grad) for t in tensors]


def judge(x, y, exact, rtol, atol, ok=None):
    """Fused x against the reference y on the same inputs, where ``ok`` (default: all);
    ``exact`` (or None) may carry a graph, it is detached here.

    NB: a float32 problem (``exact`` given: the reference in float64 on the same
    values) is judged against that truth, allowing 8 times the float32 reference's own
    error beside ``atol``. With large scales (|S| in the hundreds) and cancelling sums
    (scale's gradient, a softmax-weighted mean) torch's float32 is off by more than a
    fixed tolerance; the fused kernels round S in another order, and two such float32
    results land a few times apart either way (up to 3x seen). A wrong kernel misses by
    the size of the result."""
    ok = torch.ones_like(y, dtype=torch.bool) if ok is None else ok
    if exact is None:
        torch.testing.assert_close(x[ok], y[ok], rtol=rtol, atol=atol)
        return
    exact = exact.detach()
    fin = ok & torch.isfinite(exact)
    own = (y.double() - exact)[fin].abs().max().item() if fin.any() else 0.0
    torch.testing.assert_close(x.double()[ok], exact[ok], rtol=rtol, atol=max(atol, 8 * own))


def weighted_grads(fn, inputs, weights):
    """Gradients of ``sum_k (w_k * fn(*inputs)[k]).sum()`` over the entries fn
    keeps finite (masked rows may be -inf), for the inputs that are not None."""
    outs = fn(*inputs)
    loss = sum((w.to(o.dtype) * torch.where(torch.isfinite(o), o, 0)).sum() for w, o in zip(weights, outs))
    return torch.autograd.grad(loss, [t for t in inputs if t is not None], allow_unused=True)


@settings(max_examples=60, deadline=None, suppress_health_check=FIXTURE_OK)
@given(problems())
def test_fuzz_fused_matches_reference(device, p):
    g = torch.Generator().manual_seed(p["seed"])
    dt = p["dtype"]
    inputs = fuzz_inputs(p, g, device)
    exact = exact_copies(inputs) if dt == torch.float32 else None

    def fn(fused):
        return lambda *t: (ops if fused else ref).score_reduce(*t, p["pos_offset"], p["reductions"], p["tau"])

    fused, oracle = fn(True)(*inputs), fn(False)(*inputs)
    truth = fn(False)(*exact) if exact else [None] * 5
    tol = dict(rtol=1e-7, atol=1e-7) if dt == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    for f, o, t in zip(fused, oracle, truth):
        judge(f, o, t, **tol)
    # gradients through the finite outputs only
    w = [torch.where(torch.isfinite(o), torch.rand(o.shape, generator=g, dtype=torch.float64).to(o.device, dt), 0)
         for o in oracle]
    gf, go = weighted_grads(fn(True), inputs, w), weighted_grads(fn(False), inputs, w)
    gt = weighted_grads(fn(False), exact, w) if exact else [None] * len(go)
    for x, y, t in zip(gf, go, gt):
        if y is None:
            continue
        assert torch.isfinite(x).all()
        # NB: torch's logsumexp backward of an all -inf row is NaN (exp(-inf - -inf));
        # the fused op gives 0 there, so only entries the reference gets finite are compared.
        # NB: both sides round; with scales up to 40 an entry's error scales with the
        # largest gradient, not with the entry (as in the symmetric fuzz below): float64
        # too (K = 64, M = 511, scale 40: an error of 2e-7 beside a largest entry of 7e3).
        ok = torch.isfinite(y)
        big = y[ok].abs().max().item() if ok.any() else 0.0
        gtol = (dict(rtol=1e-7, atol=max(1e-7, 1e-10 * big)) if dt == torch.float64
                else dict(rtol=1e-4, atol=max(1e-4, 1e-4 * big)))
        judge(x, y, t, ok=ok, **gtol)


@settings(max_examples=40, deadline=None, suppress_health_check=FIXTURE_OK)
@given(problems())
def test_fuzz_weighted_sum_matches_reference(device, p):
    """score_reduce_weighted (gradient made in the forward walk) over the same shapes:
    row statistics only, random weights on each and on the positives."""
    red = p["reductions"] & ~ops.COL_LSE or ops.ROW_LSE
    if p["M"] == 1:
        red = ops.ROW_LSE  # no negatives: their statistics are -inf
    g = torch.Generator().manual_seed(p["seed"])
    dt = p["dtype"]
    inputs = fuzz_inputs(p, g, device, masks=False)
    exact = exact_copies(inputs) if dt == torch.float32 else None
    acc = torch.float64 if dt == torch.float64 else torch.float32
    w = [torch.randn(p["K"], generator=g, dtype=torch.float64).to(device, acc) if red & bit else None
         for bit in (ops.ROW_LSE, ops.NEG_LSE, ops.NEG_CLAMP_LSE, ops.NEG_SOFTPLUS)]
    w_pos = torch.randn(p["K"], generator=g, dtype=torch.float64).to(device, acc)

    def oracle_value(a, b, scale, rb, cb):
        stats = ref.score_reduce(a, b, scale, rb, cb, p["pos_offset"], red, p["tau"])
        pos = ref.positive_scores(ref.scores_dot(a, b, scale, rb, cb), p["pos_offset"])
        terms = zip(w, (stats[0], stats[2], stats[3], stats[4]))
        value = sum((wi.to(o.dtype) * o).sum() for wi, o in terms if wi is not None)
        return value + (w_pos.to(pos.dtype) * pos).sum()

    value = ops.score_reduce_weighted(*inputs, p["pos_offset"], red, p["tau"], weights=w, w_pos=w_pos)[0]
    value_o = oracle_value(*inputs).to(acc)
    value_t = oracle_value(*exact) if exact else None
    tol = dict(rtol=1e-7, atol=1e-7) if dt == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    judge(value, value_o, value_t, **tol)
    leaves = [t for t in inputs if t is not None]
    gt = torch.autograd.grad(value_t, [t for t in exact if t is not None]) if exact else [None] * len(leaves)
    for x, y, t in zip(torch.autograd.grad(value, leaves), torch.autograd.grad(value_o, leaves), gt):
        # NB: signed weights on large scores (scale 40: softplus sums in the thousands)
        # cancel; absolute error relative to the gradient's largest entry.
        big = y.abs().max().item()
        scaled = 1e-9 if dt == torch.float64 else 1e-4
        judge(x, y, t, rtol=tol["rtol"], atol=max(tol["atol"], scaled * big))


@settings(max_examples=40, deadline=None, suppress_health_check=FIXTURE_OK)
@given(problems())
def test_fuzz_symmetric_softmax_mean_matches_reference(device, p):
    """symmetric_softmax_mean over K in the same awkward sizes (and K + M - K from them,
    so several column tiles and 128-row blocks), masks, scales and dtypes."""
    K, dt = p["M"], p["dtype"]
    g = torch.Generator().manual_seed(p["seed"])
    x = torch.randn(K, p["d"], generator=g, dtype=torch.float64).to(device, dt).requires_grad_()
    bias = None
    if p["biases"]:
        bias = torch.randn(K, generator=g, dtype=torch.float64)
        if p["masked"]:
            bias = torch.where(torch.rand(K, generator=g) < 0.2, -math.inf, bias)
        bias = bias.to(device, dt)
    exact = exact_copies((x, bias)) if dt == torch.float32 else None
    lse, mean = ops.symmetric_softmax_mean(x, p["scale"], bias)
    lse_o, mean_o = ref.symmetric_softmax_mean(x, p["scale"], bias)
    lse_t, mean_t = ref.symmetric_softmax_mean(exact[0], p["scale"], exact[1]) if exact else (None, None)
    tol = dict(rtol=1e-7, atol=1e-7) if dt == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    judge(lse, lse_o.detach(), lse_t, **tol)
    judge(mean, mean_o.detach(), mean_t, **tol)
    ok = torch.isfinite(lse_o)
    wts = torch.rand(K, generator=g, dtype=torch.float64).to(device, lse.dtype) * ok
    (gx,) = torch.autograd.grad((wts * torch.where(ok, lse, 0)).sum(), x)
    (go,) = torch.autograd.grad((wts * torch.where(ok, lse_o, 0)).sum(), x)
    gt = torch.autograd.grad((wts.double() * torch.where(ok, lse_t, 0)).sum(), exact[0])[0] if exact else None
    assert torch.isfinite(gx).all()
    # NB: as above, torch's logsumexp backward is NaN for an all -inf row; the op gives 0.
    finite = torch.isfinite(go)
    # NB: large scales make gradients in the thousands (float32 sums of ~K terms): the
    # absolute error is judged at the gradient's largest entry, as in the test above.
    big = go[finite].abs().max().item() if finite.any() else 0.0
    gtol = tol if dt == torch.float64 else dict(rtol=1e-4, atol=max(1e-4, 1e-5 * big))
    judge(gx, go, gt, ok=finite, **gtol)


def test_nan_inputs_propagate_to_nan_not_a_wrong_number():
    a = torch.randn(4, 3)
    b = torch.randn(9, 3)
    a[1, 0] = math.nan
    row, col, neg, clamp, sp = ops.score_reduce(a, b, 1.0)
    assert torch.isnan(row[1]) and torch.isnan(neg[1]) and torch.isnan(clamp[1]) and torch.isnan(sp[1])
    assert torch.isfinite(row[[0, 2, 3]]).all()
    assert torch.isnan(col).all()  # every column has row 1 in it
    assert torch.isnan(ie.infonce(a, b))


@pytest.mark.parametrize("scale", [1e4, -1e4])
def test_extreme_scores_stay_finite(scale):
    """Scores of magnitude ~1e4 in float32: InfoNCE and DV finite, gradients match float64."""
    a = torch.nn.functional.normalize(torch.randn(50, 8, dtype=torch.float64), dim=1)
    b = torch.nn.functional.normalize(torch.randn(70, 8, dtype=torch.float64), dim=1)
    for fn in (ie.infonce, ie.dv, ie.smile):
        a32, b32 = a.float().requires_grad_(), b.float().requires_grad_()
        a64, b64 = a.clone().requires_grad_(), b.clone().requires_grad_()
        v32, v64 = fn(a32, b32, scale=scale), fn(a64, b64, scale=scale)
        assert torch.isfinite(v32)
        torch.testing.assert_close(v32.double(), v64, rtol=1e-4, atol=abs(scale) * 1e-6)
        g32 = torch.autograd.grad(v32, [a32, b32])
        g64 = torch.autograd.grad(v64, [a64, b64])
        for x, y in zip(g32, g64):
            assert torch.isfinite(x).all()
            torch.testing.assert_close(x.double(), y, rtol=1e-3, atol=abs(scale) * 1e-5)


@pytest.mark.slow
def test_int64_indexing_beyond_2_pow_31():
    """K * M = 2^31 + 2^15 pairs (d = 1): a_i = 1 makes every row the same, so the
    answers follow in O(M) from b alone."""
    K, M = 1 << 15, (1 << 16) + 1
    g = torch.Generator().manual_seed(0)
    x = torch.randn(M, 1, generator=g)
    a = torch.ones(K, 1)
    s = 3.0
    row, col, neg, _, _ = ops.score_reduce(a, x, s, None, None, 0, ops.ROW_LSE | ops.COL_LSE | ops.NEG_LSE)
    xs = s * x[:, 0].double()
    lse = torch.logsumexp(xs, 0)
    assert K * M > 2**31
    torch.testing.assert_close(row.double(), lse.expand(K), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(col.double(), xs + math.log(K), rtol=1e-5, atol=1e-4)
    # row i drops its positive x_i: log(sum exp - exp(x_i))
    expected_neg = (lse + torch.log1p(-torch.exp(xs - lse)))[:K]
    torch.testing.assert_close(neg.double(), expected_neg, rtol=1e-5, atol=1e-4)
    # backward over the same pairs: d/dx_j of sum_i row_lse_i = K * s * softmax_j
    # (float32 sums over K = 32768 rows: rtol 2e-3)
    xg = x.clone().requires_grad_()
    row = ops.score_reduce(a, xg, s, None, None, 0, ops.ROW_LSE)[0]
    (gx,) = torch.autograd.grad(row.sum(), xg)
    torch.testing.assert_close(gx[:, 0].double(), K * s * torch.softmax(xs, 0), rtol=2e-3, atol=1e-6)


def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.slow
def test_no_memory_growth_over_many_calls():
    a = torch.randn(70, 8, requires_grad=True)
    b = torch.randn(300, 8, requires_grad=True)
    scale = torch.tensor(2.0, requires_grad=True)

    def step():
        (ie.infonce(a, b, scale, pos_offset=5) + ie.smile(a, b, 5.0, scale) + ie.uniformity(a)).backward()

    for _ in range(100):
        step()
    before = rss_bytes()
    for _ in range(1000):
        step()
    grown = rss_bytes() - before
    assert grown < 8 * 2**20, f"resident memory grew by {grown / 2**20:.1f} MiB over 1000 steps"


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    critic=st.sampled_from(["dot", "cosine", "bilinear", "separable", "concat_tanh", "concat_relu"]),
    estimator=st.sampled_from(["infonce", "nwj", "dv", "js", "smile"]),
    K=st.sampled_from([1, 2, 5, 64, 65]),
    extra=st.sampled_from([1, 3, 448, 513]),
    seed=st.integers(0, 2**31 - 1),
)
def test_fuzz_critics_fused_matches_reference(critic, estimator, K, extra, seed):
    """Random critic x estimator x shape: fused path and reference path agree in value
    and in the gradients of u, v and every critic parameter (float64)."""
    torch.manual_seed(seed)
    du, dv_ = 5, (5 if critic in ("dot", "cosine") else 3)
    M = K + extra
    make = {
        "dot": lambda: ie.Dot(temperature=0.7),
        "cosine": lambda: ie.Cosine(temperature=0.3, learnable=True),
        "bilinear": lambda: ie.Bilinear(du, dv_),
        "separable": lambda: ie.Separable(torch.nn.Linear(du, 4), torch.nn.Linear(dv_, 4)),
        "concat_tanh": lambda: ie.ConcatMLP(du, dv_, 6, activation="tanh"),
        "concat_relu": lambda: ie.ConcatMLP(du, dv_, 6, activation="relu"),
    }
    crit = make[critic]().double()
    u = torch.randn(K, du, dtype=torch.float64, requires_grad=True)
    v = torch.randn(M, dv_, dtype=torch.float64, requires_grad=True)
    off = seed % (M - K + 1)
    params = [u, v] + [p for p in crit.parameters() if p.requires_grad]
    kw = {"tau": 1.0} if estimator == "smile" else {}
    fused = ie.mi_lower_bound(u, v, crit, estimator, pos_offset=off, **kw)
    try:
        ie.use_reference(True)
        oracle = ie.mi_lower_bound(u, v, crit, estimator, pos_offset=off, **kw)
    finally:
        ie.use_reference(False)
    torch.testing.assert_close(fused, oracle)
    for x, y in zip(torch.autograd.grad(fused, params, allow_unused=True),
                    torch.autograd.grad(oracle, params, allow_unused=True)):
        if x is None or y is None:
            assert x is None and y is None
            continue
        torch.testing.assert_close(x, y)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["infonce", "dv", "nwj", "smile", "js"])
def test_low_precision_losses_and_gradients_match_float64(dtype, name):
    """fp16/bf16 inputs: finite value and gradients, within the input precision of a
    float64 reference on the same (rounded) inputs."""
    g = torch.Generator().manual_seed(7)
    a = torch.nn.functional.normalize(torch.randn(70, 16, generator=g), dim=1).to(dtype)
    b = torch.nn.functional.normalize(torch.randn(600, 16, generator=g), dim=1).to(dtype)
    fn = getattr(ie, name)
    a_lp, b_lp = a.clone().requires_grad_(), b.clone().requires_grad_()
    a64, b64 = a.double().requires_grad_(), b.double().requires_grad_()
    v_lp, v64 = fn(a_lp, b_lp, scale=5.0, pos_offset=3), fn(a64, b64, scale=5.0, pos_offset=3)
    assert v_lp.dtype == torch.float32 and torch.isfinite(v_lp)
    torch.testing.assert_close(v_lp.double(), v64, rtol=1e-4, atol=1e-4)
    for x, y in zip(torch.autograd.grad(v_lp, [a_lp, b_lp]), torch.autograd.grad(v64, [a64, b64])):
        assert x.dtype == dtype and torch.isfinite(x).all()
        # gradients are returned in the input dtype: compare within its resolution
        eps = torch.finfo(dtype).eps
        torch.testing.assert_close(x.double(), y, rtol=4 * eps, atol=4 * eps * y.abs().max().item())


@pytest.mark.parametrize("sign", [1.0, -1.0], ids=["nan", "minus_nan"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_nan_among_masked_entries_is_nan_not_empty(dtype, sign):
    """A NaN score (of either sign bit: x86's default NaN has it set) whose row is
    otherwise all -inf (masked): the row's maximum must be NaN, not -inf, or the state
    would read as empty and the statistic as -inf."""
    a = torch.randn(2, 3, dtype=dtype)
    b = torch.randn(40, 3, dtype=dtype)
    col_bias = torch.full((40,), -math.inf, dtype=dtype)
    col_bias[21] = math.copysign(math.nan, sign)
    reductions = ops.ROW_LSE | ops.NEG_LSE | ops.COL_LSE
    row, col, neg, clamp, sp = ops.score_reduce(a, b, 1.0, None, col_bias, 0, reductions)
    want = ref.score_reduce(a, b, torch.tensor(1.0, dtype=dtype), None, col_bias, 0, reductions)
    assert torch.isnan(want[0]).all() and torch.isnan(want[2]).all() and torch.isnan(want[1][21])
    assert torch.isnan(row).all() and torch.isnan(neg).all() and torch.isnan(col[21])
    assert torch.equal(col[:21], want[1][:21]) and torch.equal(col[22:], want[1][22:])  # -inf


@pytest.fixture
def nan_for_uninitialised():
    """torch.empty (C++ at::empty too) fills NaN, as deterministic mode does: memory an op
    leaves unwritten shows up in its results."""
    was, fill = torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(was)
    torch.utils.deterministic.fill_uninitialized_memory = fill


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("threads", [1, 2])
def test_gradient_accumulators_write_all_their_memory(nan_for_uninitialised, dtype, threads):
    """dA, dB and the threads' dB partials start uninitialised (the first GEMM into a range
    overwrites it). On one and two threads, over shapes with a single row block (a thread
    with no work), several row blocks and several column tiles: score_reduce's backward
    and score_reduce_weighted match the reference with every input or one of a, b frozen,
    and a gradient the raw op was not asked for is zeros."""
    n = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for k, kw in enumerate(sample_inputs(dtype=dtype, requires_grad=True, seed=11)):
            frozen = ("a", "b", None)[k % 3]
            if frozen:
                kw[frozen] = kw[frozen].detach()
            red = ops.ROW_LSE | (ops.NEG_LSE if kw["b"].shape[0] > 1 else 0)
            w = torch.linspace(-1.0, 1.0, kw["a"].shape[0], dtype=ops.acc_dtype(dtype))
            inputs = [t for t in kw.values() if isinstance(t, torch.Tensor) and t.requires_grad]
            fused = (ops.score_reduce(**kw, reductions=red)[0] * w).sum()
            walked = ops.score_reduce_weighted(**kw, reductions=red, weights=(w, None, None, None), w_pos=w)[0]
            up = {name: t.double() if isinstance(t, torch.Tensor) else t for name, t in kw.items()}
            S = ref.scores_dot(*[up[x] for x in ARGS])
            oracle = (torch.logsumexp(S, 1) * w.double()).sum()
            oracle_w = ((torch.logsumexp(S, 1) + ref.positive_scores(S, kw["pos_offset"])) * w.double()).sum()
            tol = dict(rtol=1e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-5)
            for value, want in ((fused, oracle), (walked, oracle_w)):
                for x, y in zip(torch.autograd.grad(value, inputs), torch.autograd.grad(want, inputs, retain_graph=True)):
                    torch.testing.assert_close(x.double(), y.double(), **tol)
        a, b = [kw[x].detach() for x in ("a", "b")]
        empty = a.new_empty((0,), dtype=ops.acc_dtype(dtype))
        g = torch.ones(a.shape[0], dtype=empty.dtype)
        da = torch.ops.infomax_ext._score_reduce_with_grad(g, empty, empty, empty, empty, empty, a, b,
                                                           kw["scale"].detach(), None, None, kw["pos_offset"],
                                                           ops.ROW_LSE, 1.0, 2)[7]
        assert torch.equal(da, torch.zeros_like(da))
    finally:
        torch.set_num_threads(n)
