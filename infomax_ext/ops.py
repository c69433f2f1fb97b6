"""Typed wrappers over ``torch.ops.infomax_ext.*`` with their fake (meta) kernels
and autograd formulas, so the ops work under ``torch.compile(fullgraph=True)``.

``score_reduce`` computes streaming reductions of the score matrix

    S[i, j] = scale * <a_i, b_j> + row_bias[i] + col_bias[j]      (K x M, never stored)

whose rows are anchors (view 1) and columns candidates (view 2); the positive of
row i is column ``i + pos_offset``, every other entry of row i is a negative.
"""
import torch

from . import _backend

ROW_LSE, COL_LSE, NEG_LSE, NEG_CLAMP_LSE, NEG_SOFTPLUS = 1, 2, 4, 8, 16
ALL_REDUCTIONS = 31


def acc_dtype(dtype):
    """Accumulation dtype: float64 stays, everything else is reduced in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def as_scale(scale, like):
    """A learnable scale stays a tensor (and gets a gradient); a number becomes one."""
    if isinstance(scale, torch.Tensor):
        return scale.reshape(()) if scale.dim() else scale
    return torch.tensor(float(scale), dtype=acc_dtype(like.dtype), device=like.device)


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
    """
    return torch.ops.infomax_ext.score_reduce(
        a, b, as_scale(scale, a), row_bias, col_bias, int(pos_offset), int(reductions), float(clamp_tau)
    )


def _fake_outputs(a, b, reductions):
    acc = acc_dtype(a.dtype)
    K, M = a.shape[0], b.shape[0]
    sizes = ((ROW_LSE, K), (COL_LSE, M), (NEG_LSE, K), (NEG_CLAMP_LSE, K), (NEG_SOFTPLUS, K))
    return tuple(a.new_empty((n if reductions & bit else 0,), dtype=acc) for bit, n in sizes)


def _setup_context(ctx, inputs, output):
    a, b, scale, row_bias, col_bias, pos_offset, reductions, clamp_tau = inputs
    row_lse, col_lse, neg_lse, clamp_lse, _ = output
    ctx.save_for_backward(a, b, scale, row_bias, col_bias, row_lse, col_lse, neg_lse, clamp_lse)
    ctx.args = (pos_offset, reductions, clamp_tau)


def _backward(ctx, g_row, g_col, g_neg, g_clamp, g_sp):
    a, b, scale, row_bias, col_bias, row_lse, col_lse, neg_lse, clamp_lse = ctx.saved_tensors
    empty = a.new_empty((0,), dtype=acc_dtype(a.dtype))
    grads = [empty if g is None else g for g in (g_row, g_col, g_neg, g_clamp, g_sp)]
    da, db, dscale, drow, dcol = torch.ops.infomax_ext._score_reduce_backward(
        *grads, a, b, scale, row_bias, col_bias, row_lse, col_lse, neg_lse, clamp_lse, *ctx.args
    )
    return (da, db, dscale, drow if row_bias is not None else None,
            dcol if col_bias is not None else None, None, None, None)


if _backend.HAS_C:
    # NB: only with _C loaded do the op names exist; registering against a
    # missing library would make the package fail to import.
    @torch.library.register_fake("infomax_ext::score_reduce")
    def _score_reduce_fake(a, b, scale, row_bias, col_bias, pos_offset, reductions, clamp_tau):
        torch._check(a.dim() == 2 and b.dim() == 2, lambda: "score_reduce: a and b must be 2-D")
        torch._check(a.shape[1] == b.shape[1], lambda: "score_reduce: feature sizes differ")
        return _fake_outputs(a, b, reductions)

    @torch.library.register_fake("infomax_ext::_score_reduce_backward")
    def _score_reduce_backward_fake(g_row, g_col, g_neg, g_clamp, g_sp, a, b, scale, row_bias,
                                    col_bias, row_lse, col_lse, neg_lse, clamp_lse, pos_offset,
                                    reductions, clamp_tau):
        acc = acc_dtype(a.dtype)
        K, M = a.shape[0], b.shape[0]
        return (
            torch.empty_like(a),
            torch.empty_like(b),
            torch.empty_like(scale),
            a.new_empty((K,), dtype=row_bias.dtype if row_bias is not None else acc),
            a.new_empty((M,), dtype=col_bias.dtype if col_bias is not None else acc),
        )

    torch.library.register_autograd(
        "infomax_ext::score_reduce", _backward, setup_context=_setup_context
    )
