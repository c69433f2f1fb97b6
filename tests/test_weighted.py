"""ops.score_reduce_weighted: a weighted sum of score_reduce's row statistics whose
gradient is made in the forward walk (three GEMMs), against the reference and against
score_reduce followed by its recomputing backward."""
import pytest
import torch

import infomax_ext
from infomax_ext import estimators as est, ops, reference as ref
from helpers import CUDA_BACKENDS, make_bias, make_pair, sample_inputs, set_tile

pytestmark = pytest.mark.skipif(not infomax_ext._backend.HAS_C, reason="compiled module not built")
ARGS = ("a", "b", "scale", "row_bias", "col_bias")
ROW_SETS = [ops.ROW_LSE, ops.NEG_LSE, ops.ROW_LSE | ops.NEG_LSE | ops.NEG_CLAMP_LSE | ops.NEG_SOFTPLUS]


def weights_for(reductions, K, like, seed):
    """Random (K,) weights for every requested row statistic (None for the others)."""
    g = torch.Generator().manual_seed(seed)
    bits = (ops.ROW_LSE, ops.NEG_LSE, ops.NEG_CLAMP_LSE, ops.NEG_SOFTPLUS)
    return tuple(torch.randn(K, generator=g, dtype=torch.float64).to(like) if reductions & bit else None
                 for bit in bits)


def weighted_reference(kw, reductions, weights, tau=2.0):
    out = ref.score_reduce(**kw, reductions=reductions, clamp_tau=tau)
    stats = (out[0], out[2], out[3], out[4])
    return sum((w * s).sum() for w, s in zip(weights, stats) if w is not None), out


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("reductions", ROW_SETS)
def test_value_statistics_and_gradients_match_reference(device, dtype, reductions):
    tol = {} if dtype == torch.float64 else dict(rtol=5e-5, atol=5e-5)
    for n, kw in enumerate(sample_inputs(device, dtype, requires_grad=True, seed=3)):
        if kw["b"].shape[0] < 2 and reductions & ops.NEG_LSE:
            continue  # no negatives to reduce
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        weights = weights_for(reductions, kw["a"].shape[0], torch.empty(0, dtype=acc, device=device), n)
        w_pos = weights_for(ops.ROW_LSE, kw["a"].shape[0], weights[0] if weights[0] is not None else weights[1], n + 50)[0]
        offset = 0.37 * n - 1.0  # a constant term, added without a node of its own
        value, *stats, pos = ops.score_reduce_weighted(**kw, reductions=reductions, clamp_tau=2.0, weights=weights,
                                                       w_pos=w_pos if n % 2 else None, offset=offset)
        value_o, stats_o = weighted_reference(kw, reductions, weights)
        value_o = value_o + offset
        if n % 2:
            pos_o = ref.positive_scores(ref.scores_dot(**{k: kw[k] for k in ARGS}), kw["pos_offset"])
            torch.testing.assert_close(pos, pos_o.detach(), **tol)
            value_o = value_o + (w_pos * pos_o).sum()
        else:
            assert pos.shape == (0,)
        torch.testing.assert_close(value, value_o, **tol)
        for s, o in zip(stats, stats_o):
            torch.testing.assert_close(s, o.detach(), **tol)
            assert not s.requires_grad
        inputs = [kw[k] for k in ARGS if kw[k] is not None]
        for g, o in zip(torch.autograd.grad(0.7 * value, inputs), torch.autograd.grad(0.7 * value_o, inputs)):
            torch.testing.assert_close(g, o, **tol)


def test_reference_path_takes_the_same_arguments():
    """With the reference forced, score_reduce_weighted gives the fused value (offset
    included), statistics and gradients, first and second."""
    a, b = make_pair(9, 13, 4, requires_grad=True, seed=8)
    w = torch.rand(9, dtype=torch.float64)
    args = dict(pos_offset=2, reductions=ops.ROW_LSE | ops.NEG_SOFTPLUS, weights=(w, None, None, -w), w_pos=-w,
                offset=2.5)
    fused = ops.score_reduce_weighted(a, b, 0.7, **args)
    infomax_ext.use_reference(True)
    try:
        slow = ops.score_reduce_weighted(a, b, 0.7, **args)
    finally:
        infomax_ext.use_reference(False)
    for f, s in zip(fused, slow):
        torch.testing.assert_close(f, s)
    firsts = [torch.autograd.grad(v.value, (a, b), create_graph=True) for v in (fused, slow)]
    for f, s in zip(*firsts):
        torch.testing.assert_close(f, s)
    seconds = [torch.autograd.grad(sum((g * g).sum() for g in gs), (a, b)) for gs in firsts]
    for f, s in zip(*seconds):
        torch.testing.assert_close(f, s)


def test_gradcheck():
    a, b = make_pair(70, 530, 3, requires_grad=True)
    scale = torch.tensor(0.9, dtype=torch.float64, requires_grad=True)
    rb, cb = make_bias(70, requires_grad=True), make_bias(530, seed=1, requires_grad=True)
    w = weights_for(ops.ROW_LSE | ops.NEG_SOFTPLUS, 70, torch.empty(0, dtype=torch.float64), 0)
    torch.autograd.gradcheck(
        lambda *x: ops.score_reduce_weighted(*x, pos_offset=9, reductions=ops.ROW_LSE | ops.NEG_SOFTPLUS,
                                             weights=w)[0], (a, b, scale, rb, cb))


def test_equals_score_reduce_plus_backward_in_float32():
    """The one-walk gradient and the recomputing backward agree to float32 rounding."""
    a, b = make_pair(300, 1100, 16, dtype=torch.float32, seed=5, requires_grad=True)
    scale = torch.tensor(7.0, requires_grad=True)
    w = torch.full((300,), 1 / 300)
    value = ops.score_reduce_weighted(a, b, scale, pos_offset=17, weights=(w, None, None, None))[0]
    lse = ops.score_reduce(a, b, scale, pos_offset=17, reductions=ops.ROW_LSE)[0]
    torch.testing.assert_close(value, lse.mean())
    for g, o in zip(torch.autograd.grad(value, [a, b, scale]), torch.autograd.grad(lse.mean(), [a, b, scale])):
        torch.testing.assert_close(g, o, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype, M", [(torch.float32, 140_000), (torch.float64, 70_000)])
def test_wide_rows_fall_back_to_forward_then_backward(dtype, M):
    """Past the kept-rows budget (64 rows x M scores per thread > 32 MB) the op runs
    score_reduce and its backward: same results."""
    a, b = make_pair(3, M, 2, dtype=dtype, seed=7, requires_grad=True)
    kw = dict(a=a, b=b, scale=torch.tensor(1.5, dtype=dtype), row_bias=None, col_bias=None, pos_offset=11)
    w = weights_for(ops.ROW_LSE, 3, torch.empty(0, dtype=dtype), 1)
    value = ops.score_reduce_weighted(**kw, reductions=ops.ROW_LSE, weights=w)[0]
    value_o, _ = weighted_reference(kw, ops.ROW_LSE, w)
    tol = {} if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(value, value_o, **tol)
    torch.testing.assert_close(torch.autograd.grad(value, b)[0], torch.autograd.grad(value_o, b)[0], **tol)


def test_opcheck():
    a, b = make_pair(9, 70, 4)
    w = torch.full((9,), 1 / 9, dtype=torch.float64)
    empty = torch.empty(0, dtype=torch.float64)
    scale = torch.tensor(1.1, dtype=torch.float64)
    for rb in (None, make_bias(9)):
        torch.library.opcheck(torch.ops.infomax_ext._score_reduce_with_grad.default,
                              (w, empty, empty, empty, w, -w, a, b, scale, rb, None, 3, ops.ROW_LSE | ops.NEG_SOFTPLUS,
                               5.0))
    # the differentiable op (its autograd a C++ node), with inputs that want gradients
    a, b = make_pair(9, 70, 4, requires_grad=True)
    rb, cb = make_bias(9, requires_grad=True), make_bias(70, seed=1, requires_grad=True)
    s = scale.clone().requires_grad_()
    for args in ((a, b, s, None, None, 3), (a, b, s, rb, cb, 3), (a, a[:9], s, rb, rb, 0)):
        torch.library.opcheck(torch.ops.infomax_ext.score_reduce_weighted.default,
                              (*args, ops.ROW_LSE | ops.NEG_SOFTPLUS, 5.0, w, None, None, None, w, -w, 0.5))
    # with the column statistic (CLIP's sum): the forward walk and its recomputing backward, in one call
    wc = torch.linspace(-1, 1, 70, dtype=torch.float64)
    torch.library.opcheck(torch.ops.infomax_ext.score_reduce_weighted.default,
                          (a, b, s, rb, cb, 3, ops.ROW_LSE | ops.COL_LSE, 5.0, w, wc, None, None, None, -w, 0.5))


def test_no_node_without_a_gradient_to_make():
    """Under no_grad and inference_mode the op is the walk alone: the same value and
    statistics, no autograd node. With one, the node is the C++ one (no Python
    autograd.Function on a training step)."""
    a, b = make_pair(9, 30, 4, requires_grad=True)
    w = torch.full((9,), 1 / 9, dtype=torch.float64)
    args = (a, b, torch.tensor(1.3, dtype=torch.float64), None, None, 2, ops.ROW_LSE | ops.NEG_LSE, 5.0,
            w, None, -w, None, None, -w, 0.25)
    op = torch.ops.infomax_ext.score_reduce_weighted
    out = op(*args)
    assert out[0].grad_fn.name().endswith("ScoreReduceWeightedBackward>")
    assert all(t.grad_fn is None and not t.requires_grad for t in out[1:])
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            plain = op(*args)
        assert all(t.grad_fn is None for t in plain)
        for x, y in zip(out, plain):
            torch.testing.assert_close(x.detach(), y)
    with pytest.raises(RuntimeError, match="w_neg must not require grad"):
        op(*args[:10], w.clone().requires_grad_(), *args[11:])


def test_bad_arguments():
    a, b = make_pair(5, 8, 3, requires_grad=True)
    w = torch.ones(5, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"w_col must be a \(M,\) = \(8,\) tensor"):
        ops.score_reduce_weighted(a, b, reductions=ops.ROW_LSE | ops.COL_LSE, weights=(w, None, None, None), w_col=w)
    with pytest.raises(ValueError, match=r"w_neg must be a \(K,\) = \(5,\) tensor"):
        ops.score_reduce_weighted(a, b, reductions=ops.NEG_LSE, weights=(None, torch.ones(6), None, None))
    with pytest.raises(ValueError, match="without gradient"):
        ops.score_reduce_weighted(a, b, weights=(w.clone().requires_grad_(), None, None, None))
    with pytest.raises(RuntimeError, match=r"grad_col_lse must have shape \(M,\) = \(8,\)"):
        torch.ops.infomax_ext._score_reduce_with_grad(w, w, w[:0], w[:0], w[:0], w[:0], a.detach(), b.detach(),
                                                      torch.tensor(1.0, dtype=torch.float64), None, None, 0,
                                                      ops.ROW_LSE | ops.COL_LSE, 5.0)


def test_reruns_are_bitwise_identical_and_threads_agree():
    a, b = make_pair(200, 1030, 8, dtype=torch.float32, seed=2, requires_grad=True)
    w = torch.full((200,), 1 / 200)

    def run():
        value = ops.score_reduce_weighted(a, b, 3.0, pos_offset=5, weights=(w, None, None, None))[0]
        return (value, *torch.autograd.grad(value, [a, b]))

    first, again = run(), run()
    for x, y in zip(first, again):
        assert torch.equal(x, y)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = run()
    finally:
        torch.set_num_threads(n)
    for x, y in zip(first, single):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-7)


def test_infonce_takes_the_one_walk_path_only_when_a_backward_follows(monkeypatch):
    a, b = make_pair(40, 60, 5, requires_grad=True)
    calls = []
    real_w, real = ops.weighted, ops.score_reduce
    monkeypatch.setattr(ops, "weighted", lambda *x, **k: calls.append("weighted") or real_w(*x, **k))
    monkeypatch.setattr(ops, "score_reduce", lambda *x, **k: calls.append("plain") or real(*x, **k))
    value = est.infonce(a, b, 2.0, pos_offset=3)
    with torch.no_grad():
        value_ng = est.infonce(a, b, 2.0, pos_offset=3)
    assert calls == ["weighted", "plain"]
    oracle = ref.infonce(ref.scores_dot(a, b, 2.0), 3)
    torch.testing.assert_close(value, oracle)
    torch.testing.assert_close(value_ng, oracle.detach())
    for g, o in zip(torch.autograd.grad(value, [a, b]), torch.autograd.grad(oracle, [a, b])):
        torch.testing.assert_close(g, o)


def test_one_tensor_in_both_roles():
    """b is a (NT-Xent's z against itself) and col_bias is row_bias: the gradients of
    both roles add up, eager and under torch.compile."""
    a, _ = make_pair(30, 30, 4, requires_grad=True)
    bias = make_bias(30, requires_grad=True)
    scale = torch.tensor(0.8, dtype=torch.float64, requires_grad=True)
    w = weights_for(ops.NEG_LSE, 30, torch.empty(0, dtype=torch.float64), 4)
    value = ops.score_reduce_weighted(a, a, scale, bias, bias, reductions=ops.NEG_LSE, weights=w)[0]
    kw = dict(a=a, b=a, scale=scale, row_bias=bias, col_bias=bias, pos_offset=0)
    value_o, _ = weighted_reference(kw, ops.NEG_LSE, w)
    torch.testing.assert_close(value, value_o)
    for g, o in zip(torch.autograd.grad(value, [a, bias, scale]), torch.autograd.grad(value_o, [a, bias, scale])):
        torch.testing.assert_close(g, o)
    f = torch.compile(lambda a, bias: ops.score_reduce_weighted(a, a, 0.8, bias, bias, reductions=ops.NEG_LSE,
                                                                weights=w)[0], fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(torch.autograd.grad(f(a, bias), a)[0],
                               torch.autograd.grad(weighted_reference(dict(kw, scale=0.8), ops.NEG_LSE, w)[0], a)[0])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs(dtype):
    """fp16/bf16 inputs: statistics and value in float32, gradients in the input dtype,
    close to float64 (the positives' term is added to the input-dtype gradients)."""
    a, b = make_pair(130, 600, 16, dtype=dtype, seed=8, requires_grad=True)
    w = torch.full((130,), 1 / 130)
    value, row_lse, *_, pos = ops.score_reduce_weighted(a, b, 2.0, pos_offset=9, weights=(w, None, None, None),
                                                        w_pos=-w)
    assert value.dtype == row_lse.dtype == pos.dtype == torch.float32
    a64, b64 = a.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    S = ref.scores_dot(a64, b64, 2.0)
    oracle = (torch.logsumexp(S, 1) - ref.positive_scores(S, 9)).mean()
    torch.testing.assert_close(value.double(), oracle, rtol=1e-5, atol=1e-5)
    ga, gb = torch.autograd.grad(value, [a, b])
    assert ga.dtype == gb.dtype == dtype
    oa, ob = torch.autograd.grad(oracle, [a64, b64])
    tol = dict(rtol=2e-2, atol=2e-4)
    torch.testing.assert_close(ga.double(), oa, **tol)
    torch.testing.assert_close(gb.double(), ob, **tol)


def _check_walk_against_reference(K, M, d, off, device):
    """Value, statistics, positives and gradients (a, b, both biases) of a weighted sum
    with every kind of weight, the positives' included, against the reference."""
    a, b = make_pair(K, M, d, device=device, dtype=torch.float32, seed=K, requires_grad=True)
    rb = make_bias(K, device=device, dtype=torch.float32, requires_grad=True)
    cb = make_bias(M, device=device, dtype=torch.float32, seed=1, requires_grad=True)
    kw = dict(a=a, b=b, scale=torch.tensor(3.0, device=device), row_bias=rb, col_bias=cb, pos_offset=off)
    red = ops.ROW_LSE | ops.NEG_SOFTPLUS
    w = weights_for(red, K, torch.empty(0, device=device), 2)
    w_pos = weights_for(ops.ROW_LSE, K, torch.empty(0, device=device), 3)[0]
    value, *stats, pos = ops.score_reduce_weighted(**kw, reductions=red, clamp_tau=2.0, weights=w, w_pos=w_pos)
    # The oracle: the reference in float64 on the same (float32) inputs and weights.
    leaves = [x.detach().double().requires_grad_() for x in (a, b, rb, cb)]
    kw64 = dict(kw, a=leaves[0], b=leaves[1], row_bias=leaves[2], col_bias=leaves[3], scale=kw["scale"].double())
    w64 = [None if x is None else x.double() for x in w]
    value_o, stats_o = weighted_reference(kw64, red, w64)
    pos_o = ref.positive_scores(ref.scores_dot(**{k: kw64[k] for k in ARGS}), off)
    value_o = value_o + (w_pos.double() * pos_o).sum()
    tol = dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(value.double(), value_o, **tol)
    torch.testing.assert_close(pos.double(), pos_o.detach(), **tol)
    for x, y in zip(stats, stats_o):
        torch.testing.assert_close(x.double(), y.detach(), **tol)
    for g, o in zip(torch.autograd.grad(value, [a, b, rb, cb]), torch.autograd.grad(value_o, leaves)):
        # NB: float32 sums over M = 1100 terms of up to |g|max: an entry that cancels to
        # 0.2 beside entries of 3000 is only good to ~1e-6 of the largest.
        torch.testing.assert_close(g.double(), o, rtol=1e-4, atol=1e-5 * o.abs().max().item())


@pytest.mark.parametrize("backend", CUDA_BACKENDS, indirect=True)
@pytest.mark.usefixtures("default_cuda_tiles")
@pytest.mark.parametrize("shape, tile", [
    ((1100, 1100, 8, 0), None),               # one walk, one chunk of whole rows
    ((1100, 1100, 8, 0), str(1024 * 1100 * 4)),  # one walk, two row chunks
    ((70, 300, 5, 3), "1024"),                # column chunks: forward then backward
])
def test_cuda_one_walk_and_fallback_match_reference(shape, tile, device, monkeypatch):
    """On CUDA (and emulated) the gradient is made in the same walk when a chunk spans whole rows
    (INFOMAX_EXT_CUDA_TILE_BYTES sets the chunk budget); otherwise two walks."""
    set_tile(monkeypatch, tile)
    _check_walk_against_reference(*shape, device)


@pytest.mark.parametrize("M", [300, 270_000])
def test_cpu_one_walk_and_fallback_match_reference(M):
    """On the CPU the positives' weights join G in the one walk; past the kept rows' budget
    (16 rows of 2^19 float32 scores and G: M > 262144) the op is a forward and a
    recomputing backward, and the positive term is added by tensor ops."""
    _check_walk_against_reference(3, M, 4, M - 3 - 7, "cpu")


@pytest.mark.parametrize("name", ["infonce", "js", "js_objective", "smile"])
def test_estimators_on_the_one_walk_path(name, monkeypatch):
    """infonce, JS, its objective and SMILE (whose gradient is the JS objective's) make
    their gradient in the forward walk when a backward follows: values and gradients
    equal the reference's; gradcheck in float64 where the value is what is differentiated
    (JS's and SMILE's values are other bounds than the objective that gives the gradient)."""
    calls = []
    real = ops.weighted
    monkeypatch.setattr(ops, "weighted", lambda *x, **k: calls.append(1) or real(*x, **k))
    a, b = make_pair(37, 80, 6, seed=11, requires_grad=True)
    scale = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    fn, oracle_fn = getattr(est, name), getattr(ref, name)
    value = fn(a, b, scale=scale, pos_offset=5)
    assert calls, f"{name} did not take the one-walk path"
    S = ref.scores_dot(a, b, scale)
    oracle = oracle_fn(S, pos_offset=5)
    torch.testing.assert_close(value, oracle)
    for g, o in zip(torch.autograd.grad(value, [a, b, scale]), torch.autograd.grad(oracle, [a, b, scale])):
        torch.testing.assert_close(g, o)
    if name in ("infonce", "js_objective"):
        torch.autograd.gradcheck(lambda a, b, s: fn(a, b, scale=s, pos_offset=5), (a, b, scale))


def _infonce_grads_with_fp16_g(a, b, scale):
    """InfoNCE's gradients (K = M, positives on the diagonal) in float64, with the
    softmax part of G = dL/dS rounded to fp16 (11 significant bits, past the walker's
    power-of-two scale) as the CUDA walker stores it for its G GEMMs; the positives'
    -1/K is added apart, as the ops do."""
    A, B = a.detach().double(), b.detach().double()
    K = A.shape[0]
    m, e = torch.frexp(torch.softmax(scale * A @ B.T, 1) / K)
    G = torch.ldexp(torch.round(m * 2048) / 2048, e)
    return scale * (B / K - G @ B), scale * (A / K - G.T @ A)


@pytest.mark.parametrize("name", ["infonce"])
def test_low_precision_gradients_are_rounded_once(name, backend, device):
    """fp16 inputs: the op's float32 gradient and the positive term are added before one
    rounding to fp16, so the result is the reference's gradient rounded once: all but a
    few elements (those within float32 noise of a rounding boundary) agree exactly. Two
    roundings (the op's, then after the positive term) disagreed on about a third. The
    reference: float32 on the CPU kernels (float32 G); on the CUDA walker, whose G GEMMs
    take G in fp16, float64 with G rounded so (a float32 G there disagrees on ~12 %)."""
    g = torch.Generator().manual_seed(3)
    a = torch.nn.functional.normalize(torch.randn(300, 32, generator=g), dim=1).half().to(device).requires_grad_()
    b = torch.nn.functional.normalize(torch.randn(300, 32, generator=g), dim=1).half().to(device).requires_grad_()
    value = getattr(est, name)(a, b, scale=10.0)
    grads = torch.autograd.grad(value, (a, b))
    if backend == "cpu":
        a32, b32 = (t.detach().float().requires_grad_() for t in (a, b))
        oracle = getattr(ref, name)(ref.scores_dot(a32, b32, 10.0))
        want = torch.autograd.grad(oracle, (a32, b32))
    else:
        want = _infonce_grads_with_fp16_g(a, b, 10.0)
    for x, y in zip(grads, want):
        assert x.dtype == torch.float16
        assert (x != y.half()).float().mean().item() < 0.01


def _gemm_calls(fn):
    """Matmul calls made by fn: the walkers' own BLAS calls (``infomax_ext::gemm`` in a
    profile) and aten's."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    names = ("infomax_ext::gemm", "aten::addmm", "aten::addmm_", "aten::mm")
    return sum(e.count for e in prof.key_averages() if e.key in names)


# NB: the symmetric op has one input (x) in both roles: freezing it leaves only the scale.
FROZEN = [(p, f) for p in ("score_reduce", "weighted") for f in ("a", "b", "scale", "a+scale")] + \
    [("symmetric", "a"), ("symmetric", "scale")]


@pytest.mark.parametrize("path, frozen", FROZEN)
@pytest.mark.usefixtures("one_thread")  # NB: the profiler counts the calling thread's ops
def test_frozen_inputs_skip_their_gemms_and_keep_the_others_exact(frozen, path, device):
    """A gradient nobody asked for (a frozen tower, a fixed scale) costs no GEMM, and the
    gradients that are asked for still equal the reference's."""
    a, b = make_pair(70, 90, 5, device=device, seed=4)
    scale = torch.tensor(1.3, dtype=torch.float64, device=device)
    wants = {name: name not in frozen.split("+") for name in ("a", "b", "scale")}
    for t, name in ((a, "a"), (b, "b"), (scale, "scale")):
        t.requires_grad_(wants[name])
    if path == "symmetric":
        inputs = [t for t, n in ((a, "a"), (scale, "scale")) if wants[n]]
        run = lambda: ops.symmetric_softmax_mean(a, scale)[0].sum()  # noqa: E731
        oracle = lambda: ref.symmetric_softmax_mean(a, scale)[0].sum()  # noqa: E731
    elif path == "weighted":
        inputs = [t for t, n in ((a, "a"), (b, "b"), (scale, "scale")) if wants[n]]
        w = torch.full((70,), 1 / 70, dtype=torch.float64, device=device)
        run = lambda: ops.score_reduce_weighted(a, b, scale, pos_offset=3, weights=(w, None, None, None),  # noqa: E731
                                                w_pos=-w)[0]
        oracle = lambda: (torch.logsumexp(ref.scores_dot(a, b, scale), 1)  # noqa: E731
                          - ref.positive_scores(ref.scores_dot(a, b, scale), 3)).mean()
    else:
        inputs = [t for t, n in ((a, "a"), (b, "b"), (scale, "scale")) if wants[n]]
        run = lambda: ops.score_reduce(a, b, scale, pos_offset=3, reductions=ops.ROW_LSE)[0].sum()  # noqa: E731
        oracle = lambda: ref.score_reduce(a, b, scale, pos_offset=3, reductions=ops.ROW_LSE)[0].sum()  # noqa: E731
    for g, o in zip(torch.autograd.grad(run(), inputs), torch.autograd.grad(oracle(), inputs)):
        torch.testing.assert_close(g, o)
    if path == "symmetric":
        return  # its forward's GEMMs dominate the count; the backward is the general op's, counted above
    full = _gemm_calls(lambda: torch.autograd.grad(run(), inputs))
    for t, name in ((a, "a"), (b, "b"), (scale, "scale")):
        t.requires_grad_(True)
    every = [a, b, scale]
    all_grads = _gemm_calls(lambda: torch.autograd.grad(run(), every))
    # NB: dA (G B) also gives d scale: a frozen a alone keeps that GEMM.
    skipped = {"a": 0, "b": 1, "scale": 0, "a+scale": 1}[frozen]
    assert (full < all_grads) if skipped else (full == all_grads), (full, all_grads)


@pytest.mark.parametrize("bad", [-1, 8])
def test_needs_grad_out_of_range_is_refused(bad, device):
    a, b = make_pair(4, 6, 3, device=device)
    scale = torch.tensor(1.0, dtype=torch.float64, device=device)
    K = a.shape[0]
    g = torch.ones(K, dtype=torch.float64, device=device)
    empty = g.new_empty(0)
    lib = ops._ops()
    with pytest.raises(RuntimeError, match="needs_grad must be a bit mask"):
        lib._score_reduce_with_grad(g, empty, empty, empty, empty, empty, a, b, scale, None, None, 0, ops.ROW_LSE,
                                    1.0, bad)
    row = ops.score_reduce(a, b, scale, reductions=ops.ROW_LSE)[0]
    with pytest.raises(RuntimeError, match="needs_grad must be a bit mask"):
        lib._score_reduce_backward(g, empty, empty, empty, empty, a, b, scale, None, None, row, empty, empty, empty,
                                   0, ops.ROW_LSE, 1.0, bad)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_column_weights_match_reference(device, dtype):
    """w_col: column log-sum-exps join the sum (CLIP's loss). The op runs the forward walk
    and its recomputing backward in one call: value, statistics and every input's
    gradient against the reference, with the row terms, the positives and an offset."""
    tol = {} if dtype == torch.float64 else dict(rtol=5e-5, atol=5e-5)
    acc = ops.acc_dtype(dtype)
    for n, kw in enumerate(sample_inputs(device, dtype, requires_grad=True, seed=9)):
        K, M = kw["a"].shape[0], kw["b"].shape[0]
        g = torch.Generator().manual_seed(n)
        red = ops.ROW_LSE | ops.COL_LSE | (ops.NEG_LSE if M > 1 else 0)
        w_row, w_neg, w_pos = (torch.randn(K, generator=g, dtype=torch.float64).to(device, acc) for _ in range(3))
        w_neg = w_neg if M > 1 else None
        w_col = torch.randn(M, generator=g, dtype=torch.float64).to(device, acc)
        value, *stats, pos = ops.score_reduce_weighted(**kw, reductions=red, weights=(w_row, w_neg, None, None),
                                                       w_pos=w_pos, w_col=w_col, offset=0.5)
        oracle = ref.score_reduce(**kw, reductions=red)
        pos_o = ref.positive_scores(ref.scores_dot(*[kw[x] for x in ARGS]), kw["pos_offset"]).to(acc)
        value_o = 0.5 + sum((w * o).sum() for w, o in zip((w_row, w_col, w_neg, w_pos), (*oracle[:3], pos_o))
                            if w is not None)
        torch.testing.assert_close(value, value_o, **tol)
        for s, o in zip((*stats, pos), (*oracle, pos_o)):
            torch.testing.assert_close(s, o.detach(), **tol)
        inputs = [kw[k] for k in ARGS if kw[k] is not None]
        for x, y in zip(torch.autograd.grad(value, inputs), torch.autograd.grad(value_o, inputs)):
            torch.testing.assert_close(x, y, **tol)
