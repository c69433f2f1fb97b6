"""Mutual-information lower bounds composed on the fused reduction ops.

Every estimator sees the score matrix S (K x M, M >= K) only through a *score
source*: rows = anchors (view 1), columns = candidates (view 2), positive of row
i at column ``i + pos_offset``; every other entry is one of ``n_neg = K (M - 1)``
negatives. A source gives the O(K) positive scores in plain torch and the
streaming reductions over all K x M pairs from one fused op call, so S is never
stored. ``DotScores`` is the dot-product form

    S[i, j] = scale * <a_i, b_j> + row_bias[i] + col_bias[j],   a: (K, d), b: (M, d);

critics (``critics.py``) provide other sources. Each estimator returns the
**bound value in nats** (maximise it; the training loss is its negation). With
the compiled module absent, or ``use_reference(True)``, the source materialises
S and the estimator of the same name in ``reference.py`` runs instead.
"""
import math
import numbers

import torch

from . import _backend, ops
from . import reference as ref
from .ops import COL_LSE, NEG_CLAMP_LSE, NEG_LSE, NEG_SOFTPLUS, ROW_LSE


def check_pair(a, b, pos_offset=0, need_negatives=False, names=("a", "b"), same_dim=True):
    """Validates a (K, d) / (M, d) pair with messages that name the argument."""
    na, nb = names
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
        raise TypeError(f"{na} and {nb} must be tensors")
    if a.dim() != 2 or b.dim() != 2:
        raise ValueError(f"{na} and {nb} must be 2-D (K, d) and (M, d), got {tuple(a.shape)} and {tuple(b.shape)}")
    K, M = a.shape[0], b.shape[0]
    if K == 0 or M == 0 or a.shape[1] == 0 or b.shape[1] == 0:
        raise ValueError(f"{na} and {nb} must be non-empty, got {tuple(a.shape)} and {tuple(b.shape)}")
    if same_dim and a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sizes differ: {na} has d={a.shape[1]}, {nb} has d={b.shape[1]}")
    if M < K:
        raise ValueError(f"need M >= K so every row has a positive, got K={K} ({na}), M={M} ({nb})")
    if isinstance(pos_offset, bool) or not isinstance(pos_offset, numbers.Integral):
        raise ValueError(f"pos_offset must be an int, got {pos_offset!r}")
    if not 0 <= pos_offset <= M - K:
        raise ValueError(f"pos_offset must be in [0, M-K] = [0, {M - K}], got {pos_offset}")
    if need_negatives and M < 2:
        raise ValueError("this estimator needs at least one negative per row (M >= 2)")
    if a.device != b.device:
        raise ValueError(f"{na} and {nb} are on different devices: {a.device} and {b.device}")
    if not (a.is_floating_point() and b.is_floating_point()) or a.dtype != b.dtype:
        raise ValueError(f"{na} and {nb} must share one floating dtype, got {a.dtype} and {b.dtype}")


def check_like(t, like, name):
    """A tensor argument besides the inputs (scale, a bias) must be floating point and on
    their device; a number passes."""
    if not isinstance(t, torch.Tensor):
        return
    if t.device != like.device:
        raise ValueError(f"{name} is on {t.device} but the inputs are on {like.device}")
    if not t.is_floating_point():
        raise ValueError(f"{name} must be floating point, got {t.dtype}")


class DotScores:
    """Score source ``S = scale * a b^T + row_bias + col_bias`` for the fused ``score_reduce``.

    Args:
        a: (K, d) anchors. b: (M, d) candidates, M >= K.
        scale: float or one-element tensor (a learnable scale gets a gradient).
        row_bias: (K,) or None. col_bias: (M,) or None.
        pos_offset: positive of row i at column ``i + pos_offset``.
    """

    def __init__(self, a, b, scale=1.0, row_bias=None, col_bias=None, pos_offset=0):
        check_pair(a, b, pos_offset)
        for name, bias, n in (("row_bias", row_bias, a.shape[0]), ("col_bias", col_bias, b.shape[0])):
            if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (n,)):
                raise ValueError(f"{name} must be a tensor of shape ({n},), got {tuple(getattr(bias, 'shape', ()))}")
            check_like(bias, a, name)
        check_like(scale, a, "scale")
        self.a, self.b, self.row_bias, self.col_bias = a, b, row_bias, col_bias
        self.scale = ops.as_scale(scale, a)
        self.K, self.M, self.pos_offset = a.shape[0], b.shape[0], pos_offset

    def positive(self):
        """(K,) scores of the positive pairs, in the accumulation dtype. O(K d)."""
        acc = ops.acc_dtype(self.a.dtype)
        sl = slice(self.pos_offset, self.pos_offset + self.K)
        # NB: the positive terms accumulate in float32 for low-precision inputs too.
        pos = self.scale.to(acc) * (self.a.to(acc) * self.b[sl].to(acc)).sum(-1)
        if self.row_bias is not None:
            pos = pos + self.row_bias.to(acc)
        if self.col_bias is not None:
            pos = pos + self.col_bias[sl].to(acc)
        return pos

    def reduce(self, reductions, clamp_tau=5.0):
        return ops.score_reduce(self.a, self.b, self.scale, self.row_bias, self.col_bias,
                                self.pos_offset, reductions, clamp_tau)

    def reduce_weighted(self, reductions, weights, w_pos=None, clamp_tau=5.0):
        """``ops.score_reduce_weighted`` on this source: (value, five statistics, positives)."""
        return ops.score_reduce_weighted(self.a, self.b, self.scale, self.row_bias, self.col_bias,
                                         self.pos_offset, reductions, clamp_tau, weights, w_pos=w_pos)

    def materialize(self):
        return ref.scores_dot(self.a, self.b, self.scale, self.row_bias, self.col_bias)

    def wants_grad(self):
        """True when a backward will follow: grad mode on and an input that requires grad."""
        inputs = (self.a, self.b, self.scale, self.row_bias, self.col_bias)
        return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs)

    def row_mean(self, reduction, minus_positive=False):
        """``(mean_i (stat_i - pos_i), stat)`` for one row statistic, ROW_LSE or NEG_LSE
        (without ``minus_positive``: the mean of stat alone); InfoNCE's cross entropy is
        ``row_mean(ROW_LSE, True)``.

        When a backward will follow (grad mode on and an input that requires grad), from
        ``ops.score_reduce_weighted`` with weights 1/K (and -1/K on the positives): the
        gradient is made in the forward walk (three GEMMs instead of four, and nothing
        left for autograd to hold) and ``stat`` carries no gradient. Otherwise ``stat`` is
        score_reduce's (the reference's) differentiable output.
        """
        idx = {ROW_LSE: 0, NEG_LSE: 2}[reduction]
        inputs = (self.a, self.b, self.scale, self.row_bias, self.col_bias)
        if _backend.fused_enabled() and self.wants_grad():
            w = torch.full((self.K,), 1.0 / self.K, dtype=ops.acc_dtype(self.a.dtype), device=self.a.device)
            weights = (w, None, None, None) if reduction == ROW_LSE else (None, w, None, None)
            out = self.reduce_weighted(reduction, weights, w_pos=-w if minus_positive else None)
            return out[0], out[1 + idx]
        fn = ops.score_reduce if _backend.fused_enabled() else ref.score_reduce
        stat = fn(*inputs, self.pos_offset, reduction)[idx]
        return (stat - self.positive() if minus_positive else stat).mean(), stat


class _Terms:
    """Positive scores and requested reductions of one source, with the shared epilogues.

    ``js_gradient=True`` (for JS, its objective and SMILE, whose gradient is the JS
    objective's): on a DotScores source that needs a gradient, the statistics come from
    one ``ops.score_reduce_weighted`` walk that also makes the gradient of the negatives'
    term ``-mean_neg softplus(S)``, and come back detached; ``js_objective()`` carries
    that gradient (the positives' term is plain torch, O(K d)).
    """

    def __init__(self, src, reductions, clamp_tau=5.0, js_gradient=False):
        self.K, self.M = src.K, src.M
        self.n_neg = src.K * (src.M - 1)
        self.pos = src.positive()
        self._neg_softplus_mean = None
        if js_gradient and _backend.fused_enabled() and isinstance(src, DotScores) and src.wants_grad():
            # NB: the weights are constants (-1/n_neg), so the walk's value is exactly
            # -mean_neg softplus(S) with its gradient (and its second derivative, through
            # the create_graph backward).
            w_sp = torch.full((self.K,), -1.0 / self.n_neg, dtype=self.pos.dtype, device=self.pos.device)
            out = src.reduce_weighted(reductions | NEG_SOFTPLUS, (None, None, None, w_sp), clamp_tau=clamp_tau)
            self._neg_softplus_mean = -out[0]
            self.row_lse, self.col_lse, self.neg_lse, self.clamp_lse, self.softplus = out[1:6]
            return
        self.row_lse, self.col_lse, self.neg_lse, self.clamp_lse, self.softplus = src.reduce(
            reductions, clamp_tau)

    def log_mean_exp_neg(self, lse_rows=None):
        """log of the mean over all negatives of exp(S), from per-row log-sum-exps
        (``-inf`` with zero gradient when every negative is masked)."""
        rows = self.neg_lse if lse_rows is None else lse_rows
        return ref.logsumexp(rows, 0) - math.log(self.n_neg)

    def js_objective(self):
        neg = self._neg_softplus_mean
        if neg is None:
            neg = self.softplus.sum() / self.n_neg
        return -torch.nn.functional.softplus(-self.pos).mean() - neg


def _need_negatives(src):
    if src.M < 2:
        raise ValueError("this estimator needs at least one negative per row (M >= 2)")


def _reference(src):
    return not _backend.fused_enabled()


# Estimators on a score source. Public names below take (a, b, ...) for the dot
# form; ``mi_lower_bound`` takes any critic.

def infonce_from(src):
    """InfoNCE ``mean_i [S_ii - logsumexp_j S_ij] + log M`` (at most log M)."""
    if _reference(src):
        return ref.infonce(src.materialize(), src.pos_offset)
    if isinstance(src, DotScores):
        return math.log(src.M) - src.row_mean(ROW_LSE, minus_positive=True)[0]
    t = _Terms(src, ROW_LSE)
    return (t.pos - t.row_lse).mean() + math.log(t.M)


def infonce_symmetric_from(src):
    """CLIP's symmetric InfoNCE: the mean of the row-wise and column-wise bounds (K == M)."""
    if src.K != src.M or src.pos_offset != 0:
        raise ValueError(f"infonce_symmetric needs K == M and pos_offset 0, got K={src.K}, M={src.M}, "
                         f"pos_offset={src.pos_offset}")
    if _reference(src):
        return ref.infonce_symmetric(src.materialize())
    t = _Terms(src, ROW_LSE | COL_LSE)
    return (2 * t.pos - t.row_lse - t.col_lse).mean() / 2 + math.log(t.M)


def nwj_from(src):
    """NWJ ``mean_pos S - e^{-1} mean_neg exp(S)``; overflows to -inf (never NaN)."""
    _need_negatives(src)
    if _reference(src):
        return ref.nwj(src.materialize(), src.pos_offset)
    t = _Terms(src, NEG_LSE)
    return t.pos.mean() - torch.exp(t.log_mean_exp_neg() - 1)


def tuba_from(src, baseline):
    """TUBA with row baseline (K,): ``1 + mean_i (S_ii - a_i) - mean_neg exp(S_ij - a_i)``."""
    _need_negatives(src)
    if not isinstance(baseline, torch.Tensor) or baseline.shape != (src.K,):
        raise ValueError(f"baseline must be a tensor of shape (K,) = ({src.K},), got "
                         f"{tuple(getattr(baseline, 'shape', ()))}")
    if _reference(src):
        return ref.tuba(src.materialize(), baseline, src.pos_offset)
    t = _Terms(src, NEG_LSE)
    base = baseline.to(t.pos.dtype)
    return 1 + (t.pos - base).mean() - torch.exp(t.log_mean_exp_neg(t.neg_lse - base))


def dv_from(src):
    """Donsker-Varadhan ``mean_pos S - log mean_neg exp(S)`` (biased in mini-batches)."""
    _need_negatives(src)
    if _reference(src):
        return ref.dv(src.materialize(), src.pos_offset)
    t = _Terms(src, NEG_LSE)
    return t.pos.mean() - t.log_mean_exp_neg()


def mine_from(src, ema=None, momentum=0.9):
    """MINE: DV value, log-partition gradient divided by a moving average. Returns (bound, new_ema)."""
    _need_negatives(src)
    if _reference(src):
        return ref.mine(src.materialize(), ema, momentum, src.pos_offset)
    t = _Terms(src, NEG_LSE)
    return ref.mine_from_terms(t.pos.mean(), t.log_mean_exp_neg(), ema, momentum)


def js_objective_from(src):
    """Jensen-Shannon objective ``-mean_pos softplus(-S) - mean_neg softplus(S)`` (not a bound)."""
    _need_negatives(src)
    if _reference(src):
        return ref.js_objective(src.materialize(), src.pos_offset)
    return _Terms(src, NEG_SOFTPLUS, js_gradient=True).js_objective()


def js_from(src):
    """JS estimator: value NWJ(S + 1), gradient of ``js_objective``."""
    _need_negatives(src)
    if _reference(src):
        return ref.js(src.materialize(), src.pos_offset)
    t = _Terms(src, NEG_LSE | NEG_SOFTPLUS, js_gradient=True)
    obj = t.js_objective()
    value = t.pos.mean() + 1 - torch.exp(t.log_mean_exp_neg())
    return obj + (value - obj).detach()


def smile_from(src, tau=5.0):
    """SMILE: value ``mean_pos S - log mean_neg exp(clamp(S, -tau, tau))``, gradient of JS."""
    if not tau > 0:
        raise ValueError(f"smile: tau must be > 0, got {tau}")
    _need_negatives(src)
    if _reference(src):
        return ref.smile(src.materialize(), tau, src.pos_offset)
    t = _Terms(src, NEG_CLAMP_LSE | NEG_SOFTPLUS, tau, js_gradient=True)
    obj = t.js_objective()
    value = t.pos.mean() - t.log_mean_exp_neg(t.clamp_lse)
    return obj + (value - obj).detach()


ESTIMATORS = {
    "infonce": infonce_from,
    "infonce_symmetric": infonce_symmetric_from,
    "nwj": nwj_from,
    "tuba": tuba_from,
    "dv": dv_from,
    "mine": mine_from,
    "js": js_from,
    "js_objective": js_objective_from,
    "smile": smile_from,
}


def estimate_from(src, estimator, **kwargs):
    """Runs the named estimator (a key of ``ESTIMATORS``) on a score source."""
    try:
        fn = ESTIMATORS[estimator]
    except KeyError:
        raise ValueError(f"unknown estimator {estimator!r}; choose one of {sorted(ESTIMATORS)}") from None
    return fn(src, **kwargs)


def infonce(a, b, scale=1.0, row_bias=None, col_bias=None, pos_offset=0):
    """InfoNCE on ``S = scale a b^T + biases``: ``mean_i [S_ii - logsumexp_j S_ij] + log M``.

    a: (K, d) anchors (rows), b: (M, d) candidates (columns), positive of row i at
    column i + pos_offset. The cross-entropy loss of contrastive libraries is
    ``log M - infonce``. Returns a 0-dim tensor in nats.
    """
    return infonce_from(DotScores(a, b, scale, row_bias, col_bias, pos_offset))


def infonce_symmetric(a, b, scale=1.0, row_bias=None, col_bias=None):
    """CLIP's symmetric InfoNCE on ``S = scale a b^T + biases`` (K == M, positives on the diagonal)."""
    return infonce_symmetric_from(DotScores(a, b, scale, row_bias, col_bias))


def nwj(a, b, scale=1.0, row_bias=None, col_bias=None, pos_offset=0):
    """NWJ on ``S = scale a b^T + biases``: ``mean_pos S - e^{-1} mean_neg exp(S)``."""
    return nwj_from(DotScores(a, b, scale, row_bias, col_bias, pos_offset))


def tuba(a, b, baseline, scale=1.0, row_bias=None, col_bias=None, pos_offset=0):
    """TUBA on ``S = scale a b^T + biases`` with row baseline ``baseline`` (K,)."""
    return tuba_from(DotScores(a, b, scale, row_bias, col_bias, pos_offset), baseline)


def dv(a, b, scale=1.0, row_bias=None, col_bias=None, pos_offset=0):
    """Donsker-Varadhan on ``S = scale a b^T + biases``."""
    return dv_from(DotScores(a, b, scale, row_bias, col_bias, pos_offset))


def mine(a, b, ema=None, momentum=0.9, scale=1.0, row_bias=None, col_bias=None, pos_offset=0):
    """MINE on ``S = scale a b^T + biases``.

    Args:
        ema: 0-dim tensor, the running *log* of the moving average of ``mean_neg exp(S)``
            (log space so it cannot overflow), or None on the first step.
        momentum: weight of the old average (0.9).
    Returns:
        ``(bound, new_ema)``: the DV value with MINE's bias-corrected gradient.
    """
    return mine_from(DotScores(a, b, scale, row_bias, col_bias, pos_offset), ema, momentum)


def js_objective(a, b, scale=1.0, row_bias=None, col_bias=None, pos_offset=0):
    """Jensen-Shannon training objective on ``S = scale a b^T + biases``."""
    return js_objective_from(DotScores(a, b, scale, row_bias, col_bias, pos_offset))


def js(a, b, scale=1.0, row_bias=None, col_bias=None, pos_offset=0):
    """JS estimator on ``S = scale a b^T + biases``: value NWJ(S + 1) (tight at the JS-optimal
    critic, the log density ratio), gradient of ``js_objective``."""
    return js_from(DotScores(a, b, scale, row_bias, col_bias, pos_offset))


def smile(a, b, tau=5.0, scale=1.0, row_bias=None, col_bias=None, pos_offset=0):
    """SMILE on ``S = scale a b^T + biases``: clipped DV value (positives unclipped), JS gradient."""
    return smile_from(DotScores(a, b, scale, row_bias, col_bias, pos_offset), tau)


def alignment(x, y, alpha=2.0):
    """Wang & Isola's alignment ``mean_i |x_i - y_i|^alpha`` (a loss: minimise it). O(K d).

    x, y: (K, d) paired rows, non-empty, one floating dtype and device."""
    check_pair(x, y, names=("x", "y"))
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    return ref.alignment(x, y, alpha)


def _check_uniformity_args(x, t):
    """Validates uniformity's x ((K, d), K >= 2) and t (a number > 0); returns float(t)."""
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[0] < 2:
        raise ValueError(f"uniformity needs x of shape (K, d) with K >= 2, got {tuple(getattr(x, 'shape', ()))}")
    if isinstance(t, torch.Tensor) or not t > 0:
        raise ValueError(f"uniformity's t must be a number > 0, got {t!r}")
    return float(t)


def _centred(x, t):
    """``(xc, bias)``: x in the accumulation dtype minus the mean of its finite rows, and
    ``bias = -t |xc|^2``; a row holding an infinite coordinate (and no NaN) is infinitely
    far from every other point: its xc is 0 and its bias ``-inf`` (masked).

    NB: uniformity depends on differences only. Centring first keeps
    ``-t |x_i - x_j|^2 = 2t <xc_i, xc_j> - t |xc_i|^2 - t |xc_j|^2`` free of the
    cancellation that ``|x|^2 ~ |offset|^2`` causes far from the origin; each
    ``x_i - mean`` is exact (Sterbenz) for a cluster, and a rounded mean is a common
    shift, which cancels.
    """
    acc = ops.acc_dtype(x.dtype)
    xa = x.detach().to(acc)
    far = torch.isinf(xa).any(1) & ~torch.isnan(xa).any(1)
    xa = torch.where(far[:, None], torch.zeros_like(xa), xa)
    mean = xa.sum(0) / (~far).sum().clamp(min=1)
    # NB: back in x's dtype, so fp16/bf16 inputs keep their GEMM dtype; the bias is taken
    # from the rounded xc, so S is still exactly -t |xc_i - xc_j|^2.
    xc = torch.where(far[:, None], torch.zeros_like(xa), xa - mean).to(x.dtype)
    bias = torch.where(far, torch.full_like(xa[:, 0], -math.inf), -t * xc.to(acc).pow(2).sum(-1))
    return xc, bias


class _Uniformity(torch.autograd.Function):
    """Uniformity's value and per-row terms from one ``symmetric_softmax_mean`` call.

    NB: with ``S_ij = -t |x_i - x_j|^2`` (symmetric) and ``L = logsumexp_{i != j} S_ij``,
    ``dL/dx_k = 2 * 2t * q_k * (mean_k - x_k)``: ``q_k = exp(lse_k - L)`` is row k's share
    of the total and ``mean_k`` its softmax-weighted mean of the other rows. Both come out
    of the forward call, so the value's backward is O(K d): no second pass over S (the
    "input gradients during the forward" trick of fused linear cross-entropy, here exact
    for any upstream gradient because the loss is a scalar). A gradient of the per-row
    terms (not symmetric) takes the general recomputing backward of score_reduce. Both
    are taken on the centred xc (see ``_centred``) and are the gradients w.r.t. x as they
    are: the terms do not change under translation, so the gradients sum to 0 over the
    rows and centring's projection leaves them alone. With ``create_graph=True`` the
    backward is ``reference.uniformity_terms``'s (materialises S), differentiable.
    """

    @staticmethod
    def forward(ctx, x, t):
        xc, bias = _centred(x, t)
        scale = torch.tensor(2.0 * t, dtype=bias.dtype, device=x.device)
        lse, mean = ops.symmetric_softmax_mean(xc, scale, bias)
        K = x.shape[0]
        total = torch.logsumexp(lse, 0)
        # NB: x is saved (no copy) for torch's version check and a create_graph backward.
        ctx.save_for_backward(x, xc, scale, bias, lse, mean, total)
        ctx.t, ctx.ops = t, ops._ops()
        ctx.set_materialize_grads(False)
        return total - math.log(K * (K - 1)), lse - math.log(K - 1)

    @staticmethod
    def backward(ctx, g_value, g_rows):
        x, xc, scale, bias, lse, mean, total = ctx.saved_tensors
        t = ctx.t
        if torch.is_grad_enabled():  # create_graph=True
            return ops._grads_by_reference(lambda x: ref.uniformity_terms(x, t), (x,), (g_value, g_rows))[0], None
        xa = xc.to(lse.dtype)
        dx = torch.zeros_like(xa)
        if g_value is not None:
            # NB: q_k = 0 for a masked (infinitely far) row, whose mean_k - xc_k is finite.
            dx = dx + (4.0 * t * g_value * torch.exp(lse - total))[:, None] * (mean - xa)
        if g_rows is not None:
            empty = lse.new_empty((0,))
            da, db, _, drow, dcol = ctx.ops._score_reduce_backward(
                empty, empty, g_rows.to(lse.dtype), empty, empty, xc, xc, scale, bias, bias,
                empty, empty, lse, empty, 0, NEG_LSE, 5.0)
            dx = dx + da.to(xa.dtype) + db.to(xa.dtype) - (2.0 * t) * (drow + dcol)[:, None] * xa
        return dx.to(x.dtype), None


def uniformity_terms(x, t=2.0):
    """``(value, per_row)`` of Wang & Isola's uniformity from one fused call.

    value = ``log mean_{i != j} exp(-t |x_i - x_j|^2)``; per_row[i] =
    ``log mean_{j != i} exp(-t |x_i - x_j|^2)``. Fused as the symmetric S of the centred
    points with scale 2t, bias ``-t |x_c|^2`` and the diagonal excluded
    (``ops.symmetric_softmax_mean``: half of S on CPU, and the value's gradient in the
    same pass), so it stays finite where ``log(mean(exp(.)))`` underflows to -inf, and exact
    under translation. A point with an infinite coordinate drops out of every pair (its
    per_row is -inf, its gradient 0). With the fused path off,
    ``reference.uniformity_terms``.
    """
    t = _check_uniformity_args(x, t)
    check_pair(x, x, 0, True, names=("x", "x"))
    if not _backend.fused_enabled():
        return ref.uniformity_terms(x, t)
    if torch.is_grad_enabled() and x.requires_grad:
        return _Uniformity.apply(x, t)
    # NB: no gradient wanted: the log-sum-exps alone (from half of S on CPU)
    xc, bias = _centred(x, t)
    neg_lse = ops.symmetric_softmax_mean(xc, 2.0 * t, bias, with_mean=False)[0]
    K = x.shape[0]
    return torch.logsumexp(neg_lse, 0) - math.log(K * (K - 1)), neg_lse - math.log(K - 1)


def uniformity(x, t=2.0):
    """Wang & Isola's uniformity ``log mean_{i != j} exp(-t |x_i - x_j|^2)`` (minimise it).

    x: (K, d), K >= 2. Fused (see ``uniformity_terms``); the reference path runs
    ``reference.uniformity``.
    """
    if not _backend.fused_enabled():
        return ref.uniformity(x, _check_uniformity_args(x, t))
    return uniformity_terms(x, t)[0]
