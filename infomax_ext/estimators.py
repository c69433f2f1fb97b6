"""Mutual-information lower bounds composed on the fused ``score_reduce`` op.

Every estimator takes the fused form of a dot-product critic,

    S[i, j] = scale * <a_i, b_j> + row_bias[i] + col_bias[j],   a: (K, d), b: (M, d), M >= K,

rows = anchors (view 1), columns = candidates (view 2), positive of row i at
column ``i + pos_offset``; every other entry is one of ``n_neg = K * (M - 1)``
negatives. Each returns the **bound value in nats** (maximise it; the training
loss is its negation). The O(K d) positive terms are plain torch; everything
over all K x M pairs is one call of ``ops.score_reduce``, so S is never stored.
With the compiled module absent, or ``use_reference(True)``, each call is
routed to the materialising estimator of the same name in ``reference.py``.
"""
import math

import torch

from . import _backend, ops
from . import reference as ref
from .ops import NEG_CLAMP_LSE, NEG_LSE, NEG_SOFTPLUS, ROW_LSE, COL_LSE


def _check(a, b, pos_offset, need_negatives):
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
        raise TypeError("a and b must be tensors")
    if a.dim() != 2 or b.dim() != 2:
        raise ValueError(f"a and b must be 2-D (K, d) and (M, d), got {tuple(a.shape)} and {tuple(b.shape)}")
    K, M = a.shape[0], b.shape[0]
    if K == 0 or M == 0 or a.shape[1] == 0:
        raise ValueError(f"a and b must be non-empty, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sizes differ: a has d={a.shape[1]}, b has d={b.shape[1]}")
    if M < K:
        raise ValueError(f"need M >= K so every row has a positive, got K={K}, M={M}")
    if not 0 <= pos_offset <= M - K:
        raise ValueError(f"pos_offset must be in [0, M-K] = [0, {M - K}], got {pos_offset}")
    if need_negatives and M < 2:
        raise ValueError("this estimator needs at least one negative per row (M >= 2)")
    if a.device != b.device:
        raise ValueError(f"a and b are on different devices: {a.device} and {b.device}")
    if not (a.is_floating_point() and b.is_floating_point()) or a.dtype != b.dtype:
        raise ValueError(f"a and b must share one floating dtype, got {a.dtype} and {b.dtype}")


class _Fused:
    """Positive scores and the requested reductions of one score matrix."""

    def __init__(self, a, b, scale, row_bias, col_bias, pos_offset, reductions, clamp_tau=5.0):
        K, M = a.shape[0], b.shape[0]
        acc = ops.acc_dtype(a.dtype)
        self.scale = ops.as_scale(scale, a)
        self.K, self.M, self.log_n_neg = K, M, math.log(K * (M - 1)) if M > 1 else float("nan")
        bp = b[pos_offset:pos_offset + K]
        # NB: the O(K d) positive terms accumulate in float32 for low-precision inputs too.
        pos = self.scale.to(acc) * (a.to(acc) * bp.to(acc)).sum(-1)
        if row_bias is not None:
            pos = pos + row_bias.to(acc)
        if col_bias is not None:
            pos = pos + col_bias[pos_offset:pos_offset + K].to(acc)
        self.pos = pos
        (self.row_lse, self.col_lse, self.neg_lse, self.clamp_lse, self.softplus) = ops.score_reduce(
            a, b, self.scale, row_bias, col_bias, pos_offset, reductions, clamp_tau
        )

    def log_mean_exp_neg(self, lse_rows=None):
        """log of the mean over all negatives of exp(S), from the per-row log-sum-exps."""
        rows = self.neg_lse if lse_rows is None else lse_rows
        return torch.logsumexp(rows, 0) - self.log_n_neg

    def js_objective(self):
        return -torch.nn.functional.softplus(-self.pos).mean() - self.softplus.sum() / math.exp(self.log_n_neg)


def _route(a, b, scale, row_bias, col_bias, pos_offset, need_negatives):
    """Validates, and returns S when the reference path runs (None on the fused path)."""
    _check(a, b, pos_offset, need_negatives)
    if _backend.fused_enabled():
        return None
    return ref.scores_dot(a, b, scale, row_bias, col_bias)


def infonce(a, b, scale=1.0, row_bias=None, col_bias=None, pos_offset=0):
    """InfoNCE: ``mean_i [S_ii - logsumexp_j S_ij] + log M`` (at most log M).

    The cross-entropy loss of contrastive libraries is ``log M - infonce``.
    Args as in the module docstring. Returns a 0-dim tensor in nats.
    """
    S = _route(a, b, scale, row_bias, col_bias, pos_offset, False)
    if S is not None:
        return ref.infonce(S, pos_offset)
    f = _Fused(a, b, scale, row_bias, col_bias, pos_offset, ROW_LSE)
    return (f.pos - f.row_lse).mean() + math.log(f.M)


def infonce_symmetric(a, b, scale=1.0, row_bias=None, col_bias=None):
    """CLIP's symmetric InfoNCE: the mean of the row-wise and column-wise bounds (K == M)."""
    if a.dim() == 2 and b.dim() == 2 and a.shape[0] != b.shape[0]:
        raise ValueError(f"infonce_symmetric needs K == M, got K={a.shape[0]}, M={b.shape[0]}")
    S = _route(a, b, scale, row_bias, col_bias, 0, False)
    if S is not None:
        return ref.infonce_symmetric(S)
    f = _Fused(a, b, scale, row_bias, col_bias, 0, ROW_LSE | COL_LSE)
    return (2 * f.pos - f.row_lse - f.col_lse).mean() / 2 + math.log(f.M)


def nwj(a, b, scale=1.0, row_bias=None, col_bias=None, pos_offset=0):
    """NWJ: ``mean_pos S - e^{-1} mean_neg exp(S)``; overflows to -inf (never NaN) for huge scores."""
    S = _route(a, b, scale, row_bias, col_bias, pos_offset, True)
    if S is not None:
        return ref.nwj(S, pos_offset)
    f = _Fused(a, b, scale, row_bias, col_bias, pos_offset, NEG_LSE)
    return f.pos.mean() - torch.exp(f.log_mean_exp_neg() - 1)


def tuba(a, b, baseline, scale=1.0, row_bias=None, col_bias=None, pos_offset=0):
    """TUBA with row baseline ``baseline`` (K,): ``1 + mean_i (S_ii - a_i) - mean_neg exp(S_ij - a_i)``."""
    S = _route(a, b, scale, row_bias, col_bias, pos_offset, True)
    if baseline.shape != (a.shape[0],):
        raise ValueError(f"baseline must have shape (K,) = ({a.shape[0]},), got {tuple(baseline.shape)}")
    if S is not None:
        return ref.tuba(S, baseline, pos_offset)
    f = _Fused(a, b, scale, row_bias, col_bias, pos_offset, NEG_LSE)
    base = baseline.to(f.pos.dtype)
    return 1 + (f.pos - base).mean() - torch.exp(f.log_mean_exp_neg(f.neg_lse - base))


def dv(a, b, scale=1.0, row_bias=None, col_bias=None, pos_offset=0):
    """Donsker-Varadhan: ``mean_pos S - log mean_neg exp(S)`` (biased in mini-batches)."""
    S = _route(a, b, scale, row_bias, col_bias, pos_offset, True)
    if S is not None:
        return ref.dv(S, pos_offset)
    f = _Fused(a, b, scale, row_bias, col_bias, pos_offset, NEG_LSE)
    return f.pos.mean() - f.log_mean_exp_neg()


def mine(a, b, ema=None, momentum=0.9, scale=1.0, row_bias=None, col_bias=None, pos_offset=0):
    """MINE: the DV value, with the log-partition's gradient divided by a moving average.

    Args:
        ema: 0-dim tensor, the running log of the moving average of ``mean_neg exp(S)``
            (log space so it cannot overflow), or None on the first step.
        momentum: weight of the old average (0.9).
    Returns:
        ``(bound, new_ema)``: bound has the DV value and MINE's bias-corrected gradient.
    """
    S = _route(a, b, scale, row_bias, col_bias, pos_offset, True)
    if S is not None:
        return ref.mine(S, ema, momentum, pos_offset)
    f = _Fused(a, b, scale, row_bias, col_bias, pos_offset, NEG_LSE)
    return ref.mine_from_terms(f.pos.mean(), f.log_mean_exp_neg(), ema, momentum)


def js_objective(a, b, scale=1.0, row_bias=None, col_bias=None, pos_offset=0):
    """Jensen-Shannon training objective ``-mean_pos softplus(-S) - mean_neg softplus(S)``."""
    S = _route(a, b, scale, row_bias, col_bias, pos_offset, True)
    if S is not None:
        return ref.js_objective(S, pos_offset)
    return _Fused(a, b, scale, row_bias, col_bias, pos_offset, NEG_SOFTPLUS).js_objective()


def js(a, b, scale=1.0, row_bias=None, col_bias=None, pos_offset=0):
    """JS estimator: value NWJ(S + 1) (tight at the JS-optimal critic, log of the density
    ratio), gradient of ``js_objective``."""
    S = _route(a, b, scale, row_bias, col_bias, pos_offset, True)
    if S is not None:
        return ref.js(S, pos_offset)
    f = _Fused(a, b, scale, row_bias, col_bias, pos_offset, NEG_LSE | NEG_SOFTPLUS)
    obj = f.js_objective()
    value = f.pos.mean() + 1 - torch.exp(f.log_mean_exp_neg())
    return obj + (value - obj).detach()


def smile(a, b, tau=5.0, scale=1.0, row_bias=None, col_bias=None, pos_offset=0):
    """SMILE: value ``mean_pos S - log mean_neg exp(clamp(S, -tau, tau))`` (positives not
    clipped), gradient of ``js_objective``."""
    if not tau > 0:
        raise ValueError(f"smile: tau must be > 0, got {tau}")
    S = _route(a, b, scale, row_bias, col_bias, pos_offset, True)
    if S is not None:
        return ref.smile(S, tau, pos_offset)
    f = _Fused(a, b, scale, row_bias, col_bias, pos_offset, NEG_CLAMP_LSE | NEG_SOFTPLUS, tau)
    obj = f.js_objective()
    value = f.pos.mean() - f.log_mean_exp_neg(f.clamp_lse)
    return obj + (value - obj).detach()


def alignment(x, y, alpha=2.0):
    """Wang & Isola's alignment ``mean_i |x_i - y_i|^alpha`` (a loss: minimise it). O(K d)."""
    return ref.alignment(x, y, alpha)


def uniformity(x, t=2.0):
    """Wang & Isola's uniformity ``log mean_{i != j} exp(-t |x_i - x_j|^2)`` (minimise it).

    Fused as S with scale 2t, row and column bias ``-t |x|^2`` and the diagonal
    excluded, so it stays finite where ``log(mean(exp(.)))`` underflows to -inf.
    """
    if x.dim() != 2 or x.shape[0] < 2:
        raise ValueError(f"uniformity needs x of shape (K, d) with K >= 2, got {tuple(x.shape)}")
    if not _backend.fused_enabled():
        return ref.uniformity(x, t)
    _check(x, x, 0, True)
    bias = -t * x.to(ops.acc_dtype(x.dtype)).pow(2).sum(-1)
    neg_lse = ops.score_reduce(x, x, 2.0 * t, bias, bias, 0, NEG_LSE)[2]
    K = x.shape[0]
    return torch.logsumexp(neg_lse, 0) - math.log(K * (K - 1))
