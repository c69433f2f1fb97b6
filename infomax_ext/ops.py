"""Typed wrappers over ``torch.ops.infomax_ext.*`` with their fake (meta) kernels
and autograd formulas, so the ops work under ``torch.compile(fullgraph=True)``.

``score_reduce`` computes streaming reductions of the score matrix

    S[i, j] = scale * <a_i, b_j> + row_bias[i] + col_bias[j]      (K x M, never stored)

whose rows are anchors (view 1) and columns candidates (view 2); the positive of
row i is column ``i + pos_offset``, every other entry of row i is a negative.

This module is the one place that calls ``torch.ops.infomax_ext*`` and the one place
that chooses between the fused kernels and ``reference.py``: each wrapper asks
:func:`_lib` once; ``None`` (no compiled module, or ``use_reference(True)``) runs the
materialising reference of the same op, with the same named outputs.
"""
import functools
import math
from typing import NamedTuple

import torch

from . import _backend
from . import reference as ref
# NB: the reduction bits and activation names are defined once, in reference.py (which
# must import nothing from the package); tests/test_op_args.py checks them against the
# C++ enums of csrc/include/infomax_ext/{score_math,concat_math}.h.
from .reference import ACTIVATIONS, ALL_REDUCTIONS, COL_LSE, NEG_CLAMP_LSE, NEG_LSE, NEG_SOFTPLUS, ROW_LSE

# SMILE's common clamp: the default clamp_tau, and the value passed where no clamp is used.
CLAMP_TAU = 5.0

# The int code of an activation is its index in reference.ACTIVATIONS.
ACTIVATION_CODES = {name: code for code, name in enumerate(ACTIVATIONS)}


class ScoreStats(NamedTuple):
    """The five streaming reductions of S; one not requested is an empty ``(0,)``."""
    row_lse: torch.Tensor        # (K,) logsumexp over all M columns of row i
    col_lse: torch.Tensor        # (M,) logsumexp over all K rows of column j
    neg_lse: torch.Tensor        # (K,) logsumexp over the negatives of row i
    neg_clamp_lse: torch.Tensor  # (K,) the same of clamp(S, -tau, tau)
    neg_softplus: torch.Tensor   # (K,) sum of softplus(S) over the negatives of row i


class WeightedStats(NamedTuple):
    """:func:`score_reduce_weighted`'s differentiable value, then its statistics and the
    positives (K,) (empty without ``w_pos``), both without gradient."""
    value: torch.Tensor
    row_lse: torch.Tensor
    col_lse: torch.Tensor
    neg_lse: torch.Tensor
    neg_clamp_lse: torch.Tensor
    neg_softplus: torch.Tensor
    pos: torch.Tensor

    @property
    def stats(self):
        return ScoreStats(*self[1:6])


class SymmetricStats(NamedTuple):
    """:func:`symmetric_softmax_mean`'s outputs."""
    lse: torch.Tensor   # (K,) logsumexp_{j != i} S[i, j]
    mean: torch.Tensor  # (K, d) softmax-weighted mean of the other rows, or empty (0,)


class ScoreGrads(NamedTuple):
    """The gradients of :func:`score_reduce_backward` (None where not needed)."""
    a: torch.Tensor
    b: torch.Tensor
    scale: torch.Tensor
    row_bias: torch.Tensor
    col_bias: torch.Tensor


def acc_dtype(dtype):
    """Accumulation dtype: float64 stays, everything else is reduced in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def as_scale(scale, like):
    """A learnable scale stays a tensor (and gets a gradient); a number becomes one."""
    if isinstance(scale, torch.Tensor):
        if scale.numel() != 1:
            raise ValueError(f"scale must be a number or a one-element tensor, got shape {tuple(scale.shape)}")
        return scale.reshape(()) if scale.dim() else scale
    return torch.full((), float(scale), dtype=acc_dtype(like.dtype), device=like.device)


def score_reduce(a, b, scale=1.0, row_bias=None, col_bias=None, pos_offset=0,
                 reductions=ALL_REDUCTIONS, clamp_tau=5.0):
    """Streaming reductions of ``S = scale * a @ b.T + row_bias[:, None] + col_bias[None, :]``.

    Args:
        a: (K, d) anchors (rows of S).
        b: (M, d) candidates (columns of S), M >= K.
        scale: float or one-element tensor (receives a gradient when it requires one).
        row_bias: (K,) or None. col_bias: (M,) or None. ``-inf`` entries mask pairs.
        pos_offset: the positive of row i is column ``i + pos_offset``, in [0, M - K].
        reductions: bit mask of ROW_LSE | COL_LSE | NEG_LSE | NEG_CLAMP_LSE | NEG_SOFTPLUS.
        clamp_tau: the clamp of NEG_CLAMP_LSE (SMILE's tau), > 0.

    Returns:
        ``(row_lse (K,), col_lse (M,), neg_lse (K,), neg_clamp_lse (K,), neg_softplus (K,))``
        in float32 (float64 for float64 inputs); outputs not requested are empty ``(0,)``.
        ``neg_*`` reduce over the negatives of row i only (the positive excluded).
        A :class:`ScoreStats`.
    """
    args = (a, b, as_scale(scale, a), row_bias, col_bias, int(pos_offset), int(reductions), float(clamp_tau))
    lib = _lib()
    return ScoreStats(*(ref.score_reduce(*args) if lib is None else lib.score_reduce(*args)))


def _fake_outputs(a, b, reductions):
    acc = acc_dtype(a.dtype)
    K, M = a.shape[0], b.shape[0]
    sizes = ((ROW_LSE, K), (COL_LSE, M), (NEG_LSE, K), (NEG_CLAMP_LSE, K), (NEG_SOFTPLUS, K))
    return tuple(a.new_empty((n if reductions & bit else 0,), dtype=acc) for bit, n in sizes)


def _grads_by_reference(fn, inputs, grad_outputs):
    """The input gradients of ``fn(*inputs)`` (a tuple of outputs) for ``grad_outputs``,
    as differentiable torch ops: the backward of every op here when it runs with
    ``create_graph=True`` (grad mode on), so second derivatives are exact.

    ``fn`` is the op's materialising formula from ``reference.py``: O(K M) memory (the
    fused backward kernels are not differentiable). A tensor given twice (``b is a``)
    gets its whole gradient in its first slot, None in the other; so does an input
    without ``requires_grad`` (None).
    """
    uniq = []
    for t in inputs:
        if isinstance(t, torch.Tensor) and t.requires_grad and not any(t is u for u in uniq):
            uniq.append(t)
    result = [None] * len(inputs)
    with torch.enable_grad():
        outs = fn(*inputs) if uniq else ()
    pairs = [(o, g) for o, g in zip(outs, grad_outputs) if g is not None and o.requires_grad]
    if not pairs:
        return result
    grads = torch.autograd.grad([o for o, _ in pairs], uniq, [g.to(o.dtype) for o, g in pairs],
                                create_graph=True, allow_unused=True)
    for u, g in zip(uniq, grads):
        result[next(i for i, t in enumerate(inputs) if t is u)] = g
    return result


def _score_reduce_backward(lib, grads, a, b, scale, row_bias, col_bias, stats, args, needs=(1, 1, 1)):
    """The fused backward of score_reduce in namespace ``lib``: ``grads`` are the upstream
    gradients of the five outputs (None for 0), ``stats`` the forward's ScoreStats, ``args``
    its ``(pos_offset, reductions, clamp_tau)``, ``needs`` whether a, b and scale want a
    gradient. Returns :class:`ScoreGrads`."""
    empty = a.new_empty((0,), dtype=acc_dtype(a.dtype))
    g = [empty if t is None else t for t in grads]
    return ScoreGrads(*lib._score_reduce_backward(*g, a, b, scale, row_bias, col_bias, *stats[:4], *args,
                                                  _needs_grad(*needs)))


def _node_grads(fn, inputs, grad_outputs):
    """:func:`_grads_by_reference` for a C++ node (``score_reduce_autograd.cpp``) under
    ``create_graph=True``: a list of five tensors, zeros for a gradient nobody gets and
    empty for an absent input (the dispatcher's ``Tensor[]`` has no None)."""
    grads = _grads_by_reference(fn, inputs, grad_outputs)
    return [inputs[0].new_empty((0,)) if t is None else torch.zeros_like(t) if g is None else g
            for g, t in zip(grads, inputs)]


def _score_reduce_grads_reference(g_row, g_col, g_neg, g_clamp, g_sp, a, b, scale, row_bias, col_bias, pos_offset,
                                  reductions, clamp_tau):
    """The kernel of ``_score_reduce_grads``: score_reduce's backward under
    ``create_graph=True``. An empty upstream gradient is none."""
    grads = [None if g.numel() == 0 else g for g in (g_row, g_col, g_neg, g_clamp, g_sp)]
    return _node_grads(lambda *x: ref.score_reduce(*x, pos_offset, reductions, clamp_tau),
                       (a, b, scale, row_bias, col_bias), grads)


def _needs_grad(a, b, scale):
    """The backward ops' needs_grad mask: a GEMM for a gradient nobody needs (a frozen
    tower, a fixed scale) is skipped."""
    return int(bool(a)) | 2 * int(bool(b)) | 4 * int(bool(scale))


def _weighted_value_reference(a, b, scale, row_bias, col_bias, pos_offset, reductions, clamp_tau, offset, weights):
    """:func:`score_reduce_weighted` from the materialising reference: the value is
    differentiable (twice and more), the statistics and positives are returned without
    gradient, as by the fused walk."""
    acc = acc_dtype(a.dtype)
    up = [None if t is None else t.to(acc) for t in (a, b, scale, row_bias, col_bias)]
    S = ref.scores_dot(*up)
    stats = ScoreStats(*ref.reduce_scores(S, pos_offset, reductions, clamp_tau))
    pos = ref.positive_scores(S, pos_offset) if weights[5] is not None else S.new_empty((0,))
    used = zip(weights, (*stats, pos))
    value = sum(((w * st).sum() for w, st in used if w is not None), S.new_tensor(float(offset)))
    return WeightedStats(value, *(t.detach() for t in (*stats, pos)))


def score_reduce_weighted(a, b, scale=1.0, row_bias=None, col_bias=None, pos_offset=0,
                          reductions=ROW_LSE, clamp_tau=5.0, weights=(None, None, None, None), w_pos=None,
                          offset=0.0, w_col=None):
    """``value = offset + sum_i (w_row_i row_lse_i + w_neg_i neg_lse_i + w_clamp_i neg_clamp_lse_i +
    w_sp_i neg_softplus_i + w_pos_i S[i, i + pos_offset]) + sum_j w_col_j col_lse_j`` and
    score_reduce's outputs, for weights known before the call (e.g. InfoNCE's cross
    entropy: ``w_row = 1/K``, ``w_pos = -1/K``; CLIP's adds ``w_col``).

    Same arguments as :func:`score_reduce`, plus ``weights``: ``(w_row, w_neg, w_clamp,
    w_sp)``, ``w_pos`` and ``w_col``, each a (K,) tensor ((M,) for ``w_col``) without
    gradient or None for a term outside the sum (requested statistics may stay outside),
    and ``offset``, a constant added to value (InfoNCE's ``log M``) without an autograd
    node of its own.

    Returns:
        :class:`WeightedStats` ``(value, row_lse, col_lse, neg_lse, neg_clamp_lse,
        neg_softplus, pos)``: value is a differentiable scalar; the statistics and the
        positives ``pos`` (K,) (empty without ``w_pos``) are returned without gradient.

    NB: the gradient of value is linear in one upstream scalar, so the op makes it during
    the forward walk, from each row block's scores kept in cache: three K x M x d GEMMs
    instead of the four of score_reduce plus its recomputing backward, O((K + M) d) saved.
    With COL_LSE (a column's statistic is final only after every row) the op runs
    score_reduce and its recomputing backward itself: four GEMMs, still one call and one
    autograd node. Use it when a backward follows; for a forward alone, score_reduce is
    cheaper. The backward may run more than once (retain_graph); with ``create_graph=True`` it is
    recomputed from ``reference.py`` (materialises S) so that it is differentiable.
    """
    K, M = a.shape[0], b.shape[0]
    w_row, w_neg, w_clamp, w_sp = weights
    weights = (w_row, w_col, w_neg, w_clamp, w_sp, w_pos)
    names = ("w_row", "w_col", "w_neg", "w_clamp", "w_sp", "w_pos")
    for name, w in zip(names, weights):
        n, size = ("M", M) if name == "w_col" else ("K", K)
        if w is not None and (not isinstance(w, torch.Tensor) or tuple(w.shape) != (size,) or w.requires_grad):
            raise ValueError(f"{name} must be a ({n},) = ({size},) tensor without gradient or None")
    return weighted(a, b, as_scale(scale, a), row_bias, col_bias, int(pos_offset), int(reductions),
                    float(clamp_tau), weights, float(offset))


def weighted(a, b, scale, row_bias, col_bias, pos_offset, reductions, clamp_tau, weights, offset):
    """:func:`score_reduce_weighted` on arguments its callers built themselves (the score
    sources' walks): scale a 0-dim tensor, ``weights`` the six of them in the order of
    the statistics, then w_pos (``w_row, w_col, w_neg, w_clamp, w_sp, w_pos``), the
    numbers Python ints and floats. Nothing is checked twice; the op still checks what it
    reads."""
    lib = _lib()
    if lib is None:
        return _weighted_value_reference(a, b, scale, row_bias, col_bias, pos_offset, reductions, clamp_tau,
                                         offset, weights)
    # NB: the op's autograd is a C++ node (csrc/score_reduce_autograd.cpp): no Python
    # call on either pass of a training step.
    return WeightedStats(*lib.score_reduce_weighted(a, b, scale, row_bias, col_bias, pos_offset, reductions,
                                                    clamp_tau, *weights, offset))


def _weighted_grads_reference(grad, a, b, scale, row_bias, col_bias, pos_offset, reductions, clamp_tau, *weights):
    """The kernel of ``_score_reduce_weighted_grads``: score_reduce_weighted's backward
    under ``create_graph=True``, as differentiable ops of the reference (the C++ node
    calls it). A gradient nobody gets is zeros, an absent input's is empty."""
    return _node_grads(lambda *x: _weighted_value_reference(*x, pos_offset, reductions, clamp_tau, 0.0, weights)[:1],
                       (a, b, scale, row_bias, col_bias), (grad,))


def _score_reduce_fake(a, b, scale, row_bias, col_bias, pos_offset, reductions, clamp_tau):
    torch._check(a.dim() == 2 and b.dim() == 2, lambda: "score_reduce: a and b must be 2-D")
    torch._check(a.shape[1] == b.shape[1], lambda: "score_reduce: feature sizes differ")
    return _fake_outputs(a, b, reductions)


def _score_reduce_backward_fake(g_row, g_col, g_neg, g_clamp, g_sp, a, b, scale, row_bias,
                                col_bias, row_lse, col_lse, neg_lse, clamp_lse, pos_offset,
                                reductions, clamp_tau, needs_grad=7):
    acc = acc_dtype(a.dtype)
    K, M = a.shape[0], b.shape[0]
    return (
        torch.empty_like(a),
        torch.empty_like(b),
        torch.empty_like(scale),
        a.new_empty((K,), dtype=row_bias.dtype if row_bias is not None else acc),
        a.new_empty((M,), dtype=col_bias.dtype if col_bias is not None else acc),
    )


def _score_reduce_weighted_fake(a, b, scale, row_bias, col_bias, pos_offset, reductions, clamp_tau, w_row, w_col,
                                w_neg, w_clamp, w_sp, w_pos, offset):
    acc = acc_dtype(a.dtype)
    pos = a.new_empty((a.shape[0] if w_pos is not None and w_pos.numel() else 0,), dtype=acc)
    return (a.new_empty((), dtype=acc), *_fake_outputs(a, b, reductions), pos)


def _score_reduce_with_grad_fake(g_row, g_col, g_neg, g_clamp, g_sp, g_pos, a, b, scale, row_bias, col_bias,
                                 pos_offset, reductions, clamp_tau, needs_grad=7):
    acc = acc_dtype(a.dtype)
    empty = a.new_empty((0,), dtype=acc)
    grads = _score_reduce_backward_fake(g_row, g_col, g_neg, g_clamp, g_sp, a, b, scale, row_bias,
                                        col_bias, empty, empty, empty, empty, pos_offset, reductions,
                                        clamp_tau)
    # NB: da and db in the accumulation dtype: score_reduce_weighted's node casts them once.
    return (*_score_reduce_weighted_fake(a, b, scale, row_bias, col_bias, pos_offset, reductions, clamp_tau,
                                         None, None, None, None, None, g_pos, 0.0),
            empty.new_empty(a.shape), empty.new_empty(b.shape), *grads[2:])


# ---------------------------------------------------------------------------
# symmetric_softmax_mean: the symmetric S of uniformity
# ---------------------------------------------------------------------------


def symmetric_softmax_mean(x, scale=1.0, bias=None, with_mean=True):
    """Row log-sum-exps and softmax-weighted means of the symmetric score matrix

        S[i, j] = scale * <x_i, x_j> + bias[i] + bias[j],   j != i (diagonal excluded)

    (never stored). On CPU from the upper half of S; on CUDA from all of it (three
    K x K x d GEMMs with the mean, one without).

    Args:
        x: (K, d). scale: float or one-element tensor. bias: (K,) or None; ``-inf`` masks
            every pair of that row and column.
        with_mean: False skips the weighted sums (then ``mean`` is empty ``(0,)``): on CPU
            half a K x K x d GEMM instead of 1.5.

    Returns:
        ``(lse (K,), mean (K, d))`` in float32 (float64 for float64 inputs):
        ``lse[i] = logsumexp_{j != i} S[i, j]`` and ``mean[i] = sum_{j != i} softmax_i(S)[j] x_j``
        (0 for a row without a finite entry, e.g. K = 1). ``scale * mean[i]`` is the
        gradient of ``lse[i]`` through x_i's role as the row; for a symmetric loss such as
        ``logsumexp_i lse[i]`` that is half the whole gradient, so one call gives value and
        gradient (see :func:`infomax_ext.estimators.uniformity_terms`).
        ``lse`` is differentiable (w.r.t. x, a tensor scale and bias); ``mean`` is returned
        without a gradient (it is already a derivative).
    """
    args = (x, as_scale(scale, x), bias, bool(with_mean))
    lib = _lib()
    if lib is None:
        lse, mean = ref.symmetric_softmax_mean(*args[:3])
        return SymmetricStats(lse, mean.detach() if with_mean else mean.new_empty((0,)))
    return SymmetricStats(*lib.symmetric_softmax_mean(*args))


def _symmetric_setup_context(ctx, inputs, output):
    x, scale, bias, _ = inputs
    lse, mean = output
    ctx.mark_non_differentiable(mean)
    ctx.save_for_backward(x, scale, bias, lse)


def _symmetric_backward(lib, ctx, g_lse, _g_mean):
    x, scale, bias, lse = ctx.saved_tensors
    if g_lse is None:
        return None, None, None, None
    if torch.is_grad_enabled():  # create_graph=True
        grads = _grads_by_reference(lambda *x: ref.symmetric_softmax_mean(*x)[:1], (x, scale, bias), (g_lse,))
        return (*grads, None)
    need_x, need_scale = ctx.needs_input_grad[:2]
    d = _negatives_lse_backward(lib, g_lse, x, scale, bias, lse, (need_x, need_x, need_scale))
    return d.a + d.b, d.scale, (d.row_bias + d.col_bias) if bias is not None else None, None


def _negatives_lse_backward(lib, g_lse, x, scale, bias, lse, needs=(1, 1, 1)):
    """NB: ``lse`` is the negatives' log-sum-exp of ``score_reduce(x, x, scale, bias, bias)``:
    its backward, with x in both roles and bias on both sides (the caller adds them)."""
    empty = lse.new_empty((0,))
    stats = ScoreStats(empty, empty, lse, empty, empty)
    return _score_reduce_backward(lib, (None, None, g_lse, None, None), x, x, scale, bias, bias, stats,
                                  (0, NEG_LSE, CLAMP_TAU), needs)


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
    acc = acc_dtype(x.dtype)
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
        lse, mean = symmetric_softmax_mean(xc, scale, bias)
        K = x.shape[0]
        total = torch.logsumexp(lse, 0)
        # NB: x is saved (no copy) for torch's version check and a create_graph backward.
        ctx.save_for_backward(x, xc, scale, bias, lse, mean, total)
        ctx.t, ctx.lib = t, _ops()
        ctx.set_materialize_grads(False)
        return total - math.log(K * (K - 1)), lse - math.log(K - 1)

    @staticmethod
    def backward(ctx, g_value, g_rows):
        x, xc, scale, bias, lse, mean, total = ctx.saved_tensors
        t = ctx.t
        if torch.is_grad_enabled():  # create_graph=True
            return _grads_by_reference(lambda x: ref.uniformity_terms(x, t), (x,), (g_value, g_rows))[0], None
        xa = xc.to(lse.dtype)
        dx = torch.zeros_like(xa)
        if g_value is not None:
            # NB: q_k = 0 for a masked (infinitely far) row, whose mean_k - xc_k is finite.
            dx = dx + (4.0 * t * g_value * torch.exp(lse - total))[:, None] * (mean - xa)
        if g_rows is not None:
            d = _negatives_lse_backward(ctx.lib, g_rows.to(lse.dtype), xc, scale, bias, lse)
            dx = dx + d.a.to(xa.dtype) + d.b.to(xa.dtype) - (2.0 * t) * (d.row_bias + d.col_bias)[:, None] * xa
        return dx.to(x.dtype), None


class UniformityTerms(NamedTuple):
    """:func:`uniformity_terms`' outputs."""
    value: torch.Tensor    # log mean_{i != j} exp(-t |x_i - x_j|^2)
    per_row: torch.Tensor  # (K,) log mean_{j != i} exp(-t |x_i - x_j|^2)


def uniformity_terms(x, t):
    """Wang & Isola's uniformity of x (K, d), K >= 2, t > 0 (validated by the caller), as
    :class:`UniformityTerms`, from one ``symmetric_softmax_mean`` call: fused as the
    symmetric S of the centred points (``_centred``) with scale 2t, bias ``-t |x_c|^2`` and
    the diagonal excluded; with a gradient wanted, the value's gradient comes from the same
    call (``_Uniformity``). The reference path is ``reference.uniformity_terms``."""
    if _lib() is None:
        return UniformityTerms(*ref.uniformity_terms(x, t))
    if torch.is_grad_enabled() and x.requires_grad:
        return UniformityTerms(*_Uniformity.apply(x, t))
    # NB: no gradient wanted: the log-sum-exps alone (from half of S on CPU)
    xc, bias = _centred(x, t)
    neg_lse = symmetric_softmax_mean(xc, 2.0 * t, bias, with_mean=False).lse
    K = x.shape[0]
    return UniformityTerms(torch.logsumexp(neg_lse, 0) - math.log(K * (K - 1)), neg_lse - math.log(K - 1))


# ---------------------------------------------------------------------------
# concat_score_reduce: the concat-MLP critic
# ---------------------------------------------------------------------------

def activation_code(activation):
    """The int code of a concat-critic activation name (or a valid code, returned as is)."""
    if isinstance(activation, int) and not isinstance(activation, bool):
        if activation in ACTIVATION_CODES.values():
            return activation
    elif activation in ACTIVATION_CODES:
        return ACTIVATION_CODES[activation]
    raise ValueError(f"unknown activation {activation!r}; choose one of {', '.join(ACTIVATION_CODES)}")


def concat_score_reduce(P, Q, w2, b2, activation="relu", pos_offset=0,
                        reductions=ALL_REDUCTIONS, clamp_tau=5.0):
    """Streaming reductions of the concat-MLP critic ``S[i, j] = w2 . act(P_i + Q_j) + b2``.

    With ``P = u Wu^T + b1`` and ``Q = v Wv^T`` (plain matmuls; ``W1 = [Wu Wv]`` of the
    critic's first layer), ``S[i, j] = w2 . act(W1 [u_i; v_j] + b1) + b2``. Neither S
    (K x M) nor the hidden tensor (K x M x H) is ever stored. Rows of S are anchors
    (view 1), columns candidates (view 2).

    Args:
        P: (K, H) first-layer pre-activations of the anchors, bias included.
        Q: (M, H) those of the candidates, M >= K; same dtype as P.
        w2: (H,) output weights. b2: float or one-element tensor, the output bias.
        activation: "relu", "elu" (alpha 1), "tanh", "softplus" (beta 1) or "gelu" (erf form).
        pos_offset, reductions, clamp_tau: as in :func:`score_reduce`.

    Returns:
        ``(row_lse (K,), col_lse (M,), neg_lse (K,), neg_clamp_lse (K,), neg_softplus (K,))``
        in float32 (float64 for float64 inputs); outputs not requested are empty ``(0,)``.
        Gradients flow to P, Q, w2 and a tensor b2. A :class:`ScoreStats`.
    """
    args = (P, Q, w2, as_scale(b2, P), activation_code(activation), int(pos_offset), int(reductions),
            float(clamp_tau))
    lib = _lib()
    return ScoreStats(*(_concat_reference(*args) if lib is None else lib.concat_score_reduce(*args)))


def _concat_reference(P, Q, w2, b2, activation, pos_offset, reductions, clamp_tau):
    """concat_score_reduce from the materialised (K, M, H) hidden tensor, in the accumulation dtype."""
    acc = acc_dtype(P.dtype)
    S = ref.scores_concat_hidden(*(t.to(acc) for t in (P, Q, w2, b2)), ACTIVATIONS[activation])
    return ref.reduce_scores(S, pos_offset, reductions, clamp_tau)


def _concat_setup_context(ctx, inputs, output):
    P, Q, w2, b2, activation, pos_offset, reductions, clamp_tau = inputs
    row_lse, col_lse, neg_lse, clamp_lse, _ = output
    ctx.save_for_backward(P, Q, w2, b2, row_lse, col_lse, neg_lse, clamp_lse)
    ctx.activation = activation
    ctx.args = (pos_offset, reductions, clamp_tau)


def _concat_backward(lib, ctx, g_row, g_col, g_neg, g_clamp, g_sp):
    P, Q, w2, b2, row_lse, col_lse, neg_lse, clamp_lse = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph=True
        grads = _grads_by_reference(lambda *x: _concat_reference(*x, ctx.activation, *ctx.args),
                                    (P, Q, w2, b2), (g_row, g_col, g_neg, g_clamp, g_sp))
        return (*grads, None, None, None, None)
    empty = P.new_empty((0,), dtype=acc_dtype(P.dtype))
    grads = [empty if g is None else g for g in (g_row, g_col, g_neg, g_clamp, g_sp)]
    dP, dQ, dw2, db2 = lib._concat_score_reduce_backward(
        *grads, P, Q, w2, b2, ctx.activation, row_lse, col_lse, neg_lse, clamp_lse, *ctx.args
    )
    return dP, dQ, dw2, db2, None, None, None, None


def _concat_score_reduce_fake(P, Q, w2, b2, activation, pos_offset, reductions, clamp_tau):
    torch._check(P.dim() == 2 and Q.dim() == 2, lambda: "concat_score_reduce: P and Q must be 2-D")
    torch._check(P.shape[1] == Q.shape[1], lambda: "concat_score_reduce: hidden sizes differ")
    return _fake_outputs(P, Q, reductions)


def _concat_score_reduce_backward_fake(g_row, g_col, g_neg, g_clamp, g_sp, P, Q, w2, b2,
                                       activation, row_lse, col_lse, neg_lse, clamp_lse,
                                       pos_offset, reductions, clamp_tau):
    return torch.empty_like(P), torch.empty_like(Q), torch.empty_like(w2), torch.empty_like(b2)


def _symmetric_softmax_mean_fake(x, scale, bias, with_mean=True):
    torch._check(x.dim() == 2, lambda: "symmetric_softmax_mean: x must be 2-D")
    acc = acc_dtype(x.dtype)
    return (x.new_empty((x.shape[0],), dtype=acc),
            x.new_empty(x.shape if with_mean else (0,), dtype=acc))


# ---------------------------------------------------------------------------
# Registration
# ---------------------------------------------------------------------------


def _lib():
    """The fused-or-reference decision of every wrapper above: the op namespace to call,
    or None when the reference runs (no compiled module, or ``use_reference(True)``)."""
    return _ops() if _backend.fused_enabled() else None


def _ops():
    """The op namespace of the fused kernels: ``torch.ops.infomax_ext``, or the
    emulated CUDA backend's inside ``_backend.emulated_cuda()``."""
    if torch.jit.is_tracing():
        # NB: the tracer cannot record the ops' Python autograd (it fails deep inside
        # with "unordered_map::at").
        raise RuntimeError("infomax_ext's fused ops cannot be traced by torch.jit.trace; use torch.compile or "
                           "torch.export, or trace the reference path (infomax_ext.use_reference(True))")
    return getattr(torch.ops, _backend.op_namespace())


def _register(ns):
    """Fake kernels and autograd formulas of the ops in namespace ``ns``. NB: a backward
    calls the backward op of its forward's namespace (bound here), whatever mode is on."""
    lib = getattr(torch.ops, ns)
    fakes = {"score_reduce": _score_reduce_fake, "_score_reduce_backward": _score_reduce_backward_fake,
             "_score_reduce_with_grad": _score_reduce_with_grad_fake,
             "score_reduce_weighted": _score_reduce_weighted_fake,
             "symmetric_softmax_mean": _symmetric_softmax_mean_fake,
             "concat_score_reduce": _concat_score_reduce_fake,
             "_concat_score_reduce_backward": _concat_score_reduce_backward_fake}
    for name, fake in fakes.items():
        torch.library.register_fake(f"{ns}::{name}", fake)
    autograd = {"symmetric_softmax_mean": (_symmetric_backward, _symmetric_setup_context),
                "concat_score_reduce": (_concat_backward, _concat_setup_context)}
    for name, (backward, setup) in autograd.items():
        torch.library.register_autograd(f"{ns}::{name}", functools.partial(backward, lib), setup_context=setup)
    # NB: score_reduce and score_reduce_weighted have C++ nodes; under create_graph they
    # call these.
    torch.library.impl(f"{ns}::_score_reduce_grads", "CompositeImplicitAutograd", _score_reduce_grads_reference)
    torch.library.impl(f"{ns}::_score_reduce_weighted_grads", "CompositeImplicitAutograd", _weighted_grads_reference)


# NB: only with _C loaded do the op names exist; registering against a missing library
# would make the package fail to import.
if _backend.HAS_C:
    _register(_backend.NAMESPACE)
    if _backend.has_emulated_cuda():
        _register(_backend.EMULATED_NAMESPACE)
