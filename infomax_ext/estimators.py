"""Mutual-information lower bounds, each written once on a score source.

Every estimator sees the score matrix S (K x M, M >= K) only through a *score
source*: rows = anchors (view 1), columns = candidates (view 2), positive of row
i at column ``i + pos_offset``; every other entry is one of ``n_neg = K (M - 1)``
negatives. A source gives the O(K) positive scores in plain torch and the
streaming reductions over all K x M pairs from one op call (``ops.py``), so S is
never stored. ``DotScores`` is the dot-product form

    S[i, j] = scale * <a_i, b_j> + row_bias[i] + col_bias[j],   a: (K, d), b: (M, d);

critics (``critics.py``) provide the bilinear, concat and materialised sources.
Each estimator (``ESTIMATORS``) returns an :class:`Estimate`: the **bound value in
nats** (maximise it; the training loss is its negation) and its per-anchor terms.
Whether the fused kernels or ``reference.py`` compute the reductions is decided in
``ops.py`` alone; the reference estimators on a materialised S (``reference.infonce``,
...) are the oracles the tests compare these with.
"""
import math
import numbers
from typing import NamedTuple, Optional

import torch

from . import ops
from . import reference as ref
from .ops import CLAMP_TAU, COL_LSE, NEG_CLAMP_LSE, NEG_LSE, NEG_SOFTPLUS, ROW_LSE


def check_pair(a, b, pos_offset=0, need_negatives=False, names=("a", "b"), same_dim=True):
    """Validates a (K, d) / (M, d) pair with messages that name the argument."""
    # NB: each attribute is read once: this runs on every loss call, where a few dozen
    # Python steps are a visible share of a small batch's time.
    na, nb = names
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
        raise TypeError(f"{na} and {nb} must be tensors")
    sa, sb = a.shape, b.shape
    if len(sa) != 2 or len(sb) != 2:
        raise ValueError(f"{na} and {nb} must be 2-D (K, d) and (M, d), got {tuple(sa)} and {tuple(sb)}")
    (K, da), (M, db) = sa, sb
    if not (K and M and da and db):
        raise ValueError(f"{na} and {nb} must be non-empty, got {tuple(sa)} and {tuple(sb)}")
    if same_dim and da != db:
        raise ValueError(f"feature sizes differ: {na} has d={da}, {nb} has d={db}")
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
    dtype = a.dtype
    if dtype != b.dtype or not dtype.is_floating_point:
        raise ValueError(f"{na} and {nb} must share one floating dtype, got {dtype} and {b.dtype}")


def check_like(t, like, name):
    """A tensor argument besides the inputs (scale, a bias) must be floating point and on
    their device; a number passes."""
    if not isinstance(t, torch.Tensor):
        return
    if t.device != like.device:
        raise ValueError(f"{name} is on {t.device} but the inputs are on {like.device}")
    if not t.is_floating_point():
        raise ValueError(f"{name} must be floating point, got {t.dtype}")


class Terms(NamedTuple):
    """What an estimator reads of a source: the positives (K,), the requested
    :class:`ops.ScoreStats`, and ``walked``: the value of the linear combination asked
    for with ``walk=`` whose gradient the fused walk made, or None (then the statistics
    carry the gradient)."""
    pos: torch.Tensor
    stats: ops.ScoreStats
    walked: Optional[torch.Tensor] = None


class Walk(NamedTuple):
    """Constant weights of ``offset + sum_i (row * row_lse_i + neg * neg_lse_i + clamp *
    neg_clamp_lse_i + softplus * neg_softplus_i + pos * S[i, i + pos_offset]) + sum_j col *
    col_lse_j``; None leaves a term out."""
    row: Optional[float] = None
    col: Optional[float] = None
    neg: Optional[float] = None
    clamp: Optional[float] = None
    softplus: Optional[float] = None
    pos: Optional[float] = None
    offset: float = 0.0


class ScoreSource:
    """The interface every estimator is written on. A source has ``K``, ``M`` and
    ``pos_offset`` and gives ``positive()`` (K,) in the accumulation dtype,
    ``reduce(reductions, clamp_tau)`` (:class:`ops.ScoreStats`) and ``materialize()``
    (the (K, M) S, for tests and debugging)."""

    @property
    def n_neg(self):
        return self.K * (self.M - 1)

    def terms(self, reductions, clamp_tau=CLAMP_TAU, walk=None):
        """:class:`Terms` of the requested reductions. ``walk`` (a :class:`Walk`) names a
        sum the caller will differentiate; a source whose op can make that gradient during
        its forward walk does so (``DotScores``), any other ignores it."""
        return Terms(self.positive(), self.reduce(reductions, clamp_tau))


class DotScores(ScoreSource):
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

    def materialize(self):
        return ref.scores_dot(self.a, self.b, self.scale, self.row_bias, self.col_bias)

    def wants_grad(self):
        """True when a backward will follow: grad mode on and an input that requires grad."""
        inputs = (self.a, self.b, self.scale, self.row_bias, self.col_bias)
        return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs)

    def terms(self, reductions, clamp_tau=CLAMP_TAU, walk=None):
        """With ``walk`` and a backward to follow, from ``ops.score_reduce_weighted`` (its
        unchecked ``ops.weighted``: the source checked its inputs and builds the weights): the
        weights are constants, so the op makes the sum's gradient during the forward walk
        (three K x M x d GEMMs instead of four, nothing left for autograd to hold) and the
        statistics come back without gradient. Otherwise the plain reductions."""
        if walk is None or not self.wants_grad():
            return super().terms(reductions, clamp_tau)
        a, K = self.a, self.K
        acc, device = ops.acc_dtype(a.dtype), a.device
        sizes = (K, self.M, K, K, K, K)  # Walk's order: row, col, neg, clamp, softplus, pos
        w = [None if x is None else torch.full((n,), x, dtype=acc, device=device) for n, x in zip(sizes, walk)]
        out = ops.weighted(a, self.b, self.scale, self.row_bias, self.col_bias, self.pos_offset, int(reductions),
                           float(clamp_tau), w, float(walk.offset))
        return Terms(self.positive() if walk.pos is None else out.pos, out.stats, out.value)


class Estimate(NamedTuple):
    """An estimator's result on a source."""
    value: torch.Tensor               # 0-dim bound in nats; its gradient is the estimator's training gradient
    per_row: Optional[torch.Tensor]   # per-anchor terms (K,) (2K for infonce_symmetric); their mean is the
                                      # bound, except DV, MINE and SMILE (per-anchor DV: mean >= the bound);
                                      # None where the caller said it needs none (infonce_from's rows)
    state: Optional[torch.Tensor] = None  # MINE: the new log moving average


def _need_negatives(src):
    if src.M < 2:
        raise ValueError("this estimator needs at least one negative per row (M >= 2)")


def _log_mean_exp_neg(src, lse_rows):
    """log of the mean over all negatives of exp(S), from per-row log-sum-exps over the
    negatives (``-inf`` with zero gradient when every negative is masked)."""
    return ref.logsumexp(lse_rows, 0) - math.log(src.n_neg)


def _row_log_mean_neg(src, lse_rows):
    """Per row: log of the mean over its M - 1 negatives of exp(S)."""
    return lse_rows - math.log(src.M - 1)


# One function per estimator, ``<name>_from(src)``: its Estimate on a source. The public
# ``<name>(a, b, ...)`` below are the dot-product form; ``mi_lower_bound`` takes any critic.

def infonce_from(src, as_loss=False, rows=True):
    """InfoNCE ``mean_i [S_ii - logsumexp_j S_ij] + log M`` (at most log M); per row
    ``S_ii - logsumexp_j S_ij + log M``. The cross entropy ``log M - value`` is a mean
    of row statistics, so its gradient comes out of the forward walk.

    as_loss: the value is that cross entropy instead (walked as such, so no subtraction
    follows the walk); per_row stays the bound's. rows=False: per_row is None when the
    walk made the value (two small ops fewer per training step)."""
    log_m, s = math.log(src.M), (1.0 if as_loss else -1.0)
    t = src.terms(ROW_LSE, walk=Walk(row=s / src.K, pos=-s / src.K, offset=0.0 if as_loss else log_m))
    per_row = t.pos - t.stats.row_lse + log_m if rows or t.walked is None else None
    if t.walked is not None:
        return Estimate(t.walked, per_row)
    return Estimate(log_m - per_row.mean() if as_loss else per_row.mean(), per_row)


def infonce_symmetric_from(src, as_loss=False, rows=True):
    """CLIP's symmetric InfoNCE: the mean of the row-wise and column-wise bounds (K == M);
    per row: the K row anchors' terms, then the K column anchors'. as_loss and rows as
    for :func:`infonce_from` (the value is the two cross entropies' mean)."""
    if src.K != src.M or src.pos_offset != 0:
        raise ValueError(f"infonce_symmetric needs K == M and pos_offset 0, got K={src.K}, M={src.M}, "
                         f"pos_offset={src.pos_offset}")
    log_m, s, K = math.log(src.M), (1.0 if as_loss else -1.0), src.K
    t = src.terms(ROW_LSE | COL_LSE, walk=Walk(row=s / (2 * K), col=s / (2 * K), pos=-s / K,
                                               offset=0.0 if as_loss else log_m))
    row, col = t.stats.row_lse, t.stats.col_lse
    per_row = torch.cat([t.pos - row, t.pos - col]) + log_m if rows or t.walked is None else None
    if t.walked is not None:
        return Estimate(t.walked, per_row)
    return Estimate(log_m - per_row.mean() if as_loss else per_row.mean(), per_row)


def nwj_from(src):
    """NWJ ``mean_pos S - e^{-1} mean_neg exp(S)``; overflows to -inf (never NaN)."""
    _need_negatives(src)
    t = src.terms(NEG_LSE)
    neg = t.stats.neg_lse
    return Estimate(t.pos.mean() - torch.exp(_log_mean_exp_neg(src, neg) - 1),
                    t.pos - torch.exp(_row_log_mean_neg(src, neg) - 1))


def tuba_from(src, baseline):
    """TUBA with row baseline (K,): ``1 + mean_i (S_ii - a_i) - mean_neg exp(S_ij - a_i)``."""
    _need_negatives(src)
    if not isinstance(baseline, torch.Tensor) or baseline.shape != (src.K,):
        raise ValueError(f"baseline must be a tensor of shape (K,) = ({src.K},), got "
                         f"{tuple(getattr(baseline, 'shape', ()))}")
    t = src.terms(NEG_LSE)
    base, neg = baseline.to(t.pos.dtype), t.stats.neg_lse
    return Estimate(1 + (t.pos - base).mean() - torch.exp(_log_mean_exp_neg(src, neg - base)),
                    1 + t.pos - base - torch.exp(_row_log_mean_neg(src, neg) - base))


def dv_from(src):
    """Donsker-Varadhan ``mean_pos S - log mean_neg exp(S)`` (biased in mini-batches)."""
    _need_negatives(src)
    t = src.terms(NEG_LSE)
    return Estimate(t.pos.mean() - _log_mean_exp_neg(src, t.stats.neg_lse),
                    t.pos - _row_log_mean_neg(src, t.stats.neg_lse))


def mine_from(src, ema=None, momentum=0.9):
    """MINE: DV value, log-partition gradient divided by a moving average of
    ``mean_neg exp(S)`` kept in log space (``ema``: None or NaN before the first step);
    the new average is ``state``."""
    _need_negatives(src)
    t = src.terms(NEG_LSE)
    value, state = ref.mine_from_terms(t.pos.mean(), _log_mean_exp_neg(src, t.stats.neg_lse), ema, momentum)
    return Estimate(value, t.pos - _row_log_mean_neg(src, t.stats.neg_lse), state)


def _js_terms(src, reductions, clamp_tau=CLAMP_TAU):
    """Terms for JS, its objective and SMILE, whose gradient is the JS objective's, and
    that objective ``-mean_pos softplus(-S) - mean_neg softplus(S)``. NB: its negatives'
    term is a constant-weight sum (1/n_neg), so a source may make its gradient in the walk."""
    t = src.terms(reductions | NEG_SOFTPLUS, clamp_tau, walk=Walk(softplus=1.0 / src.n_neg))
    neg = t.walked if t.walked is not None else t.stats.neg_softplus.sum() / src.n_neg
    return t, -ref.softplus(-t.pos).mean() - neg


def js_objective_from(src):
    """Jensen-Shannon objective ``-mean_pos softplus(-S) - mean_neg softplus(S)`` (not a bound)."""
    _need_negatives(src)
    t, obj = _js_terms(src, 0)
    return Estimate(obj, -ref.softplus(-t.pos) - t.stats.neg_softplus / (src.M - 1))


def js_from(src):
    """JS estimator: value NWJ(S + 1), gradient of ``js_objective``."""
    _need_negatives(src)
    t, obj = _js_terms(src, NEG_LSE)
    neg = t.stats.neg_lse
    value = t.pos.mean() + 1 - torch.exp(_log_mean_exp_neg(src, neg))
    return Estimate(obj + (value - obj).detach(), t.pos + 1 - torch.exp(_row_log_mean_neg(src, neg)))


def smile_from(src, tau=CLAMP_TAU):
    """SMILE: value ``mean_pos S - log mean_neg exp(clamp(S, -tau, tau))``, gradient of JS."""
    if not tau > 0:
        raise ValueError(f"smile: tau must be > 0, got {tau}")
    _need_negatives(src)
    t, obj = _js_terms(src, NEG_CLAMP_LSE, tau)
    clamped = t.stats.neg_clamp_lse
    value = t.pos.mean() - _log_mean_exp_neg(src, clamped)
    return Estimate(obj + (value - obj).detach(), t.pos - _row_log_mean_neg(src, clamped))


ESTIMATORS = {"infonce": infonce_from, "infonce_symmetric": infonce_symmetric_from, "nwj": nwj_from, "tuba": tuba_from,
              "dv": dv_from, "mine": mine_from, "js": js_from, "js_objective": js_objective_from, "smile": smile_from}
# The estimators that train a critic through BoundLoss and estimate_mi.
BOUNDS = ("infonce", "nwj", "dv", "mine", "js", "smile", "tuba")


def estimate(src, estimator, **kwargs):
    """The :class:`Estimate` of the named estimator (a key of ``ESTIMATORS``) on a score source."""
    try:
        fn = ESTIMATORS[estimator]
    except KeyError:
        raise ValueError(f"unknown estimator {estimator!r}; choose one of {sorted(ESTIMATORS)}") from None
    return fn(src, **kwargs)


def estimate_from(src, estimator, **kwargs):
    """The bound of the named estimator on a score source (for ``"mine"``: ``(bound, new_ema)``)."""
    e = estimate(src, estimator, **kwargs)
    return (e.value, e.state) if estimator == "mine" else e.value


def infonce(a, b, scale=1.0, row_bias=None, col_bias=None, pos_offset=0):
    """InfoNCE on ``S = scale a b^T + biases``: ``mean_i [S_ii - logsumexp_j S_ij] + log M``.

    a: (K, d) anchors (rows), b: (M, d) candidates (columns), positive of row i at
    column i + pos_offset. The cross-entropy loss of contrastive libraries is
    ``log M - infonce``. Returns a 0-dim tensor in nats.
    """
    return infonce_from(DotScores(a, b, scale, row_bias, col_bias, pos_offset), rows=False).value


def infonce_symmetric(a, b, scale=1.0, row_bias=None, col_bias=None):
    """CLIP's symmetric InfoNCE on ``S = scale a b^T + biases`` (K == M, positives on the diagonal)."""
    return infonce_symmetric_from(DotScores(a, b, scale, row_bias, col_bias)).value


def nwj(a, b, scale=1.0, row_bias=None, col_bias=None, pos_offset=0):
    """NWJ on ``S = scale a b^T + biases``: ``mean_pos S - e^{-1} mean_neg exp(S)``."""
    return nwj_from(DotScores(a, b, scale, row_bias, col_bias, pos_offset)).value


def tuba(a, b, baseline, scale=1.0, row_bias=None, col_bias=None, pos_offset=0):
    """TUBA on ``S = scale a b^T + biases`` with row baseline ``baseline`` (K,)."""
    return tuba_from(DotScores(a, b, scale, row_bias, col_bias, pos_offset), baseline).value


def dv(a, b, scale=1.0, row_bias=None, col_bias=None, pos_offset=0):
    """Donsker-Varadhan on ``S = scale a b^T + biases``."""
    return dv_from(DotScores(a, b, scale, row_bias, col_bias, pos_offset)).value


def mine(a, b, ema=None, momentum=0.9, scale=1.0, row_bias=None, col_bias=None, pos_offset=0):
    """MINE on ``S = scale a b^T + biases``.

    Args:
        ema: 0-dim tensor, the running *log* of the moving average of ``mean_neg exp(S)``
            (log space so it cannot overflow), or None on the first step.
        momentum: weight of the old average (0.9).
    Returns:
        ``(bound, new_ema)``: the DV value with MINE's bias-corrected gradient.
    """
    e = mine_from(DotScores(a, b, scale, row_bias, col_bias, pos_offset), ema, momentum)
    return e.value, e.state


def js_objective(a, b, scale=1.0, row_bias=None, col_bias=None, pos_offset=0):
    """Jensen-Shannon training objective on ``S = scale a b^T + biases``."""
    return js_objective_from(DotScores(a, b, scale, row_bias, col_bias, pos_offset)).value


def js(a, b, scale=1.0, row_bias=None, col_bias=None, pos_offset=0):
    """JS estimator on ``S = scale a b^T + biases``: value NWJ(S + 1) (tight at the JS-optimal
    critic, the log density ratio), gradient of ``js_objective``."""
    return js_from(DotScores(a, b, scale, row_bias, col_bias, pos_offset)).value


def smile(a, b, tau=5.0, scale=1.0, row_bias=None, col_bias=None, pos_offset=0):
    """SMILE on ``S = scale a b^T + biases``: clipped DV value (positives unclipped), JS gradient."""
    return smile_from(DotScores(a, b, scale, row_bias, col_bias, pos_offset), tau).value


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


def uniformity_terms(x, t=2.0):
    """``(value, per_row)`` of Wang & Isola's uniformity from one fused call.

    value = ``log mean_{i != j} exp(-t |x_i - x_j|^2)``; per_row[i] =
    ``log mean_{j != i} exp(-t |x_i - x_j|^2)``. Fused as the symmetric S of the centred
    points with scale 2t, bias ``-t |x_c|^2`` and the diagonal excluded
    (``ops.uniformity_terms``: half of S on CPU, and the value's gradient in the same
    pass), so it stays finite where ``log(mean(exp(.)))`` underflows to -inf, and exact
    under translation. A point with an infinite coordinate drops out of every pair (its
    per_row is -inf, its gradient 0).
    """
    t = _check_uniformity_args(x, t)
    check_pair(x, x, 0, True, names=("x", "x"))
    return ops.uniformity_terms(x, t)


def uniformity(x, t=2.0):
    """Wang & Isola's uniformity ``log mean_{i != j} exp(-t |x_i - x_j|^2)`` (minimise it).

    x: (K, d), K >= 2. Fused (see ``uniformity_terms``).
    """
    return uniformity_terms(x, t).value
