"""Pure-torch reference implementations (the oracle for the fused kernels).

Everything in this module materialises the score matrix and is written for
clarity and exactness, not speed. The fused C++/CUDA ops are tested against it.

Score matrix convention (used by every function here):
    ``S`` has shape ``(K, M)`` with ``M >= K``. **Rows are anchors** ``u``
    (view 1), **columns are candidates** ``v`` (view 2): ``S[i, j] = f(u_i, v_j)``.
    The positive of row ``i`` is column ``i + pos_offset``; every other entry
    is a negative (a sample of the product of marginals), so there are
    ``n_pos = K`` positives and ``n_neg = K * (M - 1)`` negatives.

All estimators return the *bound value* in nats (a quantity to maximise) as a
0-dim tensor. For ``js``, ``smile`` and ``mine`` the returned tensor's *value*
is the documented bound while its *gradient* is the training gradient of that
estimator (``obj + (value - obj).detach()``).

Every reduction is computed in log-sum-exp form; the positive is excluded from
the negatives by a boolean mask (``torch.where`` with ``-inf`` / ``0``), never
by slicing, so autograd gradients are exact. The single deliberate exception is
:func:`uniformity_pdist`, the literal formula of Wang & Isola (2020), kept as
the peer implementation (it may underflow to ``-inf``).

This module imports only ``math`` and ``torch`` so it can be loaded standalone.
"""

import math

import torch
import torch.nn.functional as F

__all__ = [
    "ROW_LSE", "COL_LSE", "NEG_LSE", "NEG_CLAMP_LSE", "NEG_SOFTPLUS", "ALL_REDUCTIONS",
    "ACTIVATIONS", "activation_fn", "scores_dot", "scores_cosine", "scores_bilinear",
    "scores_concat", "score_reduce", "positive_scores", "negative_mask", "infonce",
    "infonce_symmetric", "nwj", "tuba", "dv", "mine", "js_objective", "js", "smile", "alignment",
    "uniformity", "uniformity_terms", "uniformity_pdist", "logsumexp", "reduce_scores",
    "scores_concat_hidden", "softplus", "clamp",
]

# Bits of the ``reductions`` mask of :func:`score_reduce`.
ROW_LSE = 1
COL_LSE = 2
NEG_LSE = 4
NEG_CLAMP_LSE = 8
NEG_SOFTPLUS = 16
ALL_REDUCTIONS = ROW_LSE | COL_LSE | NEG_LSE | NEG_CLAMP_LSE | NEG_SOFTPLUS  # 31

# The concat critic's activations; a name's index is its code in the ops (``ops.ACTIVATION_CODES``).
ACTIVATIONS = ("relu", "elu", "tanh", "softplus", "gelu")


# ---------------------------------------------------------------------------
# Validation helpers
# ---------------------------------------------------------------------------


def _check_2d(name, t):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")


def _check_pos_offset(pos_offset, K, M):
    if isinstance(pos_offset, bool) or not isinstance(pos_offset, int):
        raise ValueError(f"pos_offset must be an int, got {pos_offset!r}")
    if M < K:
        raise ValueError(
            f"S must have at least as many columns as rows (M >= K), got K={K}, M={M}"
        )
    if not 0 <= pos_offset <= M - K:
        raise ValueError(
            f"pos_offset must satisfy 0 <= pos_offset <= M - K = {M - K} "
            f"(K={K}, M={M}), got pos_offset={pos_offset}"
        )


def _check_S(S, pos_offset=0, need_negatives=False):
    """Validates a score matrix and returns ``(K, M)``."""
    _check_2d("S", S)
    K, M = S.shape
    if K == 0:
        raise ValueError("S must have at least one row (K >= 1)")
    _check_pos_offset(pos_offset, K, M)
    if need_negatives and M == 1:
        raise ValueError(
            "S has a single column (M == 1): there are no negatives for this estimator"
        )
    return K, M


def _acc_dtype(dtype):
    """Accumulation dtype: float32 for float16/bfloat16, else ``dtype``."""
    if dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return dtype


# ---------------------------------------------------------------------------
# Masks and masked reductions
# ---------------------------------------------------------------------------


def negative_mask(K, M, pos_offset=0, device=None):
    """Boolean mask of the negatives of a ``(K, M)`` score matrix.

    Rows are anchors ``u`` (view 1), columns candidates ``v`` (view 2); the
    positive of row ``i`` is column ``i + pos_offset``.

    Args:
        K: number of rows (anchors).
        M: number of columns (candidates), ``M >= K``.
        pos_offset: column offset of the positives, ``0 <= pos_offset <= M - K``.
        device: device of the mask.

    Returns:
        Bool tensor ``(K, M)``: True on the ``K * (M - 1)`` negatives, False on
        the positives.
    """
    _check_pos_offset(pos_offset, K, M)
    rows = torch.arange(K, device=device).unsqueeze(1)
    cols = torch.arange(M, device=device).unsqueeze(0)
    return cols != rows + pos_offset


def logsumexp(x, dim=None):
    """``torch.logsumexp`` whose gradient is 0, not NaN, where every entry is ``-inf``.

    An empty (fully masked) reduction is ``-inf`` with zero gradient, as in the fused
    kernels. NB: torch's backward takes ``exp(x - lse) = exp(-inf + inf)`` there; the
    reduction runs on zeros instead and ``torch.where`` picks ``-inf``, so neither branch
    makes a NaN. ``dim=None`` reduces over all entries.
    """
    if dim is None:
        x, dim = x.reshape(-1), 0
    empty = (x == -math.inf).all(dim)
    lse = torch.logsumexp(torch.where(empty.unsqueeze(dim), torch.zeros_like(x), x), dim)
    return torch.where(empty, torch.full_like(lse, -math.inf), lse)


def softplus(x):
    """``log(1 + exp(x))`` to the dtype's resolution in float32 and float64, as the fused
    kernels compute it.

    NB: ``F.softplus``'s default threshold (20) returns x itself above it, off by
    ``log(1 + exp(-x))``, up to 2e-9: far beyond float64's resolution. At 40, ``exp(-40)``
    is below half an ulp of x in float64, and ``exp(40)`` is still a finite float32, so
    nothing overflows below the threshold. Its gradient is ``sigmoid(x)``, also exact.
    """
    return F.softplus(x, threshold=40.0)


def clamp(x, tau):
    """``clamp(x, -tau, tau)`` whose gradient passes on the open interval only: 0 at
    ``x = +-tau`` (the minimum-norm subgradient), as in the fused kernels, whatever
    torch's clamp does at its bounds (it passed the gradient there before torch 2.14)."""
    inside = (x > -tau) & (x < tau)
    return torch.where(inside, x, x.detach().clamp(-tau, tau))


def _masked_lse(x, mask, dim=None):
    """logsumexp of ``x`` over entries where ``mask`` is True.

    Masked entries are replaced by ``-inf`` with ``torch.where``, whose backward
    sends zero gradient to them; a slice without a finite entry is ``-inf`` with zero
    gradient (:func:`logsumexp`). ``dim=None`` reduces over all entries.
    """
    return logsumexp(torch.where(mask, x, torch.full_like(x, -math.inf)), dim)


def _masked_sum(x, mask, dim=None):
    """Sum of ``x`` over entries where ``mask`` is True (masked entries -> 0)."""
    xm = torch.where(mask, x, torch.zeros_like(x))
    if dim is None:
        return xm.sum()
    return xm.sum(dim=dim)


def _neg_log_mean_exp(S, pos_offset):
    """``log mean_{neg} exp(S_ij)`` = logsumexp over negatives - log n_neg."""
    K, M = S.shape
    mask = negative_mask(K, M, pos_offset, device=S.device)
    return _masked_lse(S, mask) - math.log(K * (M - 1))


# ---------------------------------------------------------------------------
# Critics / score matrices
# ---------------------------------------------------------------------------


def activation_fn(name):
    """Returns the torch function of a concat-critic activation.

    Args:
        name: one of ``"relu"``, ``"elu"``, ``"tanh"``, ``"softplus"``, ``"gelu"``.

    Returns:
        A callable mapping a tensor to a tensor of the same shape.

    Raises:
        ValueError: unknown ``name``.
    """
    table = {
        "relu": F.relu,
        "elu": F.elu,
        "tanh": torch.tanh,
        "softplus": softplus,
        "gelu": F.gelu,
    }
    try:
        return table[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown activation {name!r}; choose one of {', '.join(ACTIVATIONS)}"
        ) from None


def scores_dot(a, b, scale=1.0, row_bias=None, col_bias=None):
    """Separable (dot-product) critic ``S = scale * a b^T + row_bias + col_bias``.

    ``S[i, j] = scale * <a_i, b_j> + row_bias[i] + col_bias[j]``. Rows are anchors
    (view 1), columns are candidates (view 2). Computed in the promoted dtype of
    the inputs (no upcast).

    Args:
        a: ``(K, d)`` anchor embeddings (view 1).
        b: ``(M, d)`` candidate embeddings (view 2).
        scale: Python float or 0-dim tensor (receives a gradient if it requires one).
        row_bias: ``(K,)`` or None.
        col_bias: ``(M,)`` or None.

    Returns:
        ``S``: ``(K, M)``.
    """
    _check_2d("a", a)
    _check_2d("b", b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(
            f"a and b must have the same feature size, got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    K, M = a.shape[0], b.shape[0]
    dt = torch.promote_types(a.dtype, b.dtype)
    if isinstance(scale, torch.Tensor) and scale.dim() != 0:
        raise ValueError(f"scale must be a float or a 0-dim tensor, got shape {tuple(scale.shape)}")
    S = (a.to(dt) @ b.to(dt).T) * scale
    if row_bias is not None:
        if tuple(row_bias.shape) != (K,):
            raise ValueError(f"row_bias must have shape ({K},), got {tuple(row_bias.shape)}")
        S = S + row_bias.unsqueeze(1)
    if col_bias is not None:
        if tuple(col_bias.shape) != (M,):
            raise ValueError(f"col_bias must have shape ({M},), got {tuple(col_bias.shape)}")
        S = S + col_bias.unsqueeze(0)
    return S


def scores_cosine(u, v, temperature=0.1):
    """Cosine critic ``S[i, j] = <u_i/|u_i|, v_j/|v_j|> / temperature``.

    Rows are anchors (view 1), columns are candidates (view 2).

    Args:
        u: ``(K, d)`` view-1 features.
        v: ``(M, d)`` view-2 features.
        temperature: positive float or 0-dim tensor.

    Returns:
        ``S``: ``(K, M)``.
    """
    _check_2d("u", u)
    _check_2d("v", v)
    if not isinstance(temperature, torch.Tensor) and temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return scores_dot(F.normalize(u, dim=-1), F.normalize(v, dim=-1)) / temperature


def scores_bilinear(u, v, W):
    """Bilinear critic ``S[i, j] = u_i^T W v_j``, i.e. ``S = u W v^T``.

    Rows are anchors (view 1), columns are candidates (view 2).

    Args:
        u: ``(K, du)`` view-1 features.
        v: ``(M, dv)`` view-2 features.
        W: ``(du, dv)``.

    Returns:
        ``S``: ``(K, M)``.
    """
    _check_2d("u", u)
    _check_2d("v", v)
    _check_2d("W", W)
    if W.shape != (u.shape[1], v.shape[1]):
        raise ValueError(
            f"W must have shape ({u.shape[1]}, {v.shape[1]}), got {tuple(W.shape)}"
        )
    return (u @ W) @ v.T


def scores_concat(u, v, Wu, Wv, b1, w2, b2=0.0, activation="relu"):
    """Concat-MLP critic ``S[i, j] = w2 . act(W1 [u_i; v_j] + b1) + b2``.

    With ``W1 = [Wu Wv]`` the hidden layer is ``act(Wu u_i + Wv v_j + b1)``. This
    reference materialises the ``(K, M, H)`` hidden tensor. Rows are anchors
    (view 1), columns are candidates (view 2).

    Args:
        u: ``(K, du)`` view-1 features.
        v: ``(M, dv)`` view-2 features.
        Wu: ``(H, du)``.
        Wv: ``(H, dv)``.
        b1: ``(H,)``.
        w2: ``(H,)``.
        b2: float or 0-dim tensor.
        activation: one of ``"relu"``, ``"elu"``, ``"tanh"``, ``"softplus"``, ``"gelu"``.

    Returns:
        ``S``: ``(K, M)``.
    """
    act = activation_fn(activation)
    _check_2d("u", u)
    _check_2d("v", v)
    _check_2d("Wu", Wu)
    _check_2d("Wv", Wv)
    H = Wu.shape[0]
    if Wu.shape[1] != u.shape[1]:
        raise ValueError(f"Wu must have shape (H, {u.shape[1]}), got {tuple(Wu.shape)}")
    if tuple(Wv.shape) != (H, v.shape[1]):
        raise ValueError(f"Wv must have shape ({H}, {v.shape[1]}), got {tuple(Wv.shape)}")
    if tuple(b1.shape) != (H,):
        raise ValueError(f"b1 must have shape ({H},), got {tuple(b1.shape)}")
    if tuple(w2.shape) != (H,):
        raise ValueError(f"w2 must have shape ({H},), got {tuple(w2.shape)}")
    return scores_concat_hidden(u @ Wu.T + b1, v @ Wv.T, w2, b2, activation)


def scores_concat_hidden(P, Q, w2, b2=0.0, activation="relu"):
    """``S[i, j] = w2 . act(P_i + Q_j) + b2`` from the first layer's pre-activations
    ``P = u Wu^T + b1`` (K, H) and ``Q = v Wv^T`` (M, H): the concat critic as the fused
    ``concat_score_reduce`` sees it. Materialises the ``(K, M, H)`` hidden tensor."""
    hidden = activation_fn(activation)(P.unsqueeze(1) + Q.unsqueeze(0))  # (K, M, H)
    return hidden @ w2 + b2


# ---------------------------------------------------------------------------
# Reference of the fused reduction op
# ---------------------------------------------------------------------------


def score_reduce(a, b, scale, row_bias=None, col_bias=None, pos_offset=0, reductions=ALL_REDUCTIONS, clamp_tau=5.0):
    """Reference of the fused score-reduction op (materialises ``S``).

    ``S[i, j] = scale * <a_i, b_j> + row_bias[i] + col_bias[j]`` is built in the
    accumulation dtype (float32 for float16/bfloat16 inputs, else the input
    dtype; ``a``, ``b``, biases and a tensor ``scale`` are upcast first). Rows are
    anchors (view 1), columns are candidates (view 2); the positive of row ``i``
    is column ``i + pos_offset`` and every other entry is a negative
    (``n_neg = K * (M - 1)``). The positive is excluded by a boolean mask, so
    autograd gradients w.r.t. ``a``, ``b``, ``scale`` and the biases are exact.

    Args:
        a: ``(K, d)`` anchors.
        b: ``(M, d)`` candidates, ``M >= K``.
        scale: Python float or 0-dim tensor.
        row_bias: ``(K,)`` or None.
        col_bias: ``(M,)`` or None.
        pos_offset: ``0 <= pos_offset <= M - K``.
        reductions: bit mask of ``ROW_LSE | COL_LSE | NEG_LSE | NEG_CLAMP_LSE |
            NEG_SOFTPLUS`` (default ``ALL_REDUCTIONS`` = 31).
        clamp_tau: clamp bound of ``NEG_CLAMP_LSE`` (must be > 0 when requested).

    Returns:
        Tuple ``(row_lse, col_lse, neg_lse, neg_clamp_lse, neg_softplus)``:

        - ``row_lse``: ``(K,)`` logsumexp over all M columns of row i.
        - ``col_lse``: ``(M,)`` logsumexp over all K rows of column j.
        - ``neg_lse``: ``(K,)`` logsumexp over row i's negatives.
        - ``neg_clamp_lse``: ``(K,)`` logsumexp over row i's negatives of
          ``clamp(S, -clamp_tau, clamp_tau)``.
        - ``neg_softplus``: ``(K,)`` sum over row i's negatives of ``softplus(S)``.

        Outputs whose bit is not set are empty ``(0,)`` tensors of the
        accumulation dtype. With ``M == 1`` (no negatives) ``neg_lse`` and
        ``neg_clamp_lse`` are ``-inf`` and ``neg_softplus`` is 0.
    """
    _check_2d("a", a)
    _check_2d("b", b)
    if isinstance(reductions, bool) or not isinstance(reductions, int) or not (
        0 <= reductions <= ALL_REDUCTIONS
    ):
        raise ValueError(f"reductions must be an int bit mask in [0, {ALL_REDUCTIONS}], got {reductions!r}")
    K, M = a.shape[0], b.shape[0]
    _check_pos_offset(pos_offset, K, M)
    if reductions & NEG_CLAMP_LSE and not clamp_tau > 0:
        raise ValueError(f"clamp_tau must be > 0, got {clamp_tau}")

    acc = _acc_dtype(torch.promote_types(a.dtype, b.dtype))
    # NB: upcast everything before the matmul, so the reference accumulates
    # in float32 for half inputs like the fused kernel.
    a_ = a.to(acc)
    b_ = b.to(acc)
    scale_ = scale.to(acc) if isinstance(scale, torch.Tensor) else scale
    rb = row_bias.to(acc) if row_bias is not None else None
    cb = col_bias.to(acc) if col_bias is not None else None
    return reduce_scores(scores_dot(a_, b_, scale_, rb, cb), pos_offset, reductions, clamp_tau)


def reduce_scores(S, pos_offset=0, reductions=ALL_REDUCTIONS, clamp_tau=5.0):
    """The five reductions of :func:`score_reduce` on a materialised ``S`` (K, M), in its
    dtype; those not requested are empty ``(0,)``. Differentiable (twice and more)."""
    K, M = S.shape
    mask = negative_mask(K, M, pos_offset, device=S.device)
    empty = torch.empty(0, dtype=S.dtype, device=S.device)

    row_lse = logsumexp(S, dim=1) if reductions & ROW_LSE else empty
    col_lse = logsumexp(S, dim=0) if reductions & COL_LSE else empty
    neg_lse = _masked_lse(S, mask, dim=1) if reductions & NEG_LSE else empty
    if reductions & NEG_CLAMP_LSE:
        neg_clamp_lse = _masked_lse(clamp(S, clamp_tau), mask, dim=1)
    else:
        neg_clamp_lse = empty
    neg_softplus = _masked_sum(softplus(S), mask, dim=1) if reductions & NEG_SOFTPLUS else empty
    return row_lse, col_lse, neg_lse, neg_clamp_lse, neg_softplus


def symmetric_softmax_mean(x, scale=1.0, bias=None):
    """Reference of the fused ``symmetric_softmax_mean`` op (materialises ``S``).

    ``S[i, j] = scale * <x_i, x_j> + bias[i] + bias[j]`` (K x K, accumulation dtype)
    with the diagonal excluded.

    Returns:
        ``(lse, mean)``: ``lse[i] = logsumexp_{j != i} S[i, j]`` (``(K,)``, ``-inf`` for
        a row without a finite entry) and ``mean[i] = sum_{j != i} softmax_i(S)[j] x_j``
        (``(K, d)``, 0 for such a row). Both are differentiable here.
    """
    _check_2d("x", x)
    acc = _acc_dtype(x.dtype)
    x_ = x.to(acc)
    scale_ = scale.to(acc) if isinstance(scale, torch.Tensor) else scale
    b = bias.to(acc) if bias is not None else None
    S = scores_dot(x_, x_, scale_, b, b)
    off_diag = ~torch.eye(x.shape[0], dtype=torch.bool, device=S.device)
    lse = _masked_lse(S, off_diag, dim=1)
    # NB: a row with lse = -inf (nothing finite) has all weights 0, not NaN.
    finite = torch.isfinite(lse) | torch.isnan(lse)
    shifted = torch.where(finite[:, None], lse[:, None], torch.zeros_like(lse)[:, None])
    w = torch.where(off_diag & finite[:, None], torch.exp(S - shifted), torch.zeros_like(S))
    return lse, w @ x_


def positive_scores(S, pos_offset=0):
    """Positive scores ``S[i, i + pos_offset]``.

    Args:
        S: ``(K, M)`` score matrix, rows anchors (view 1), columns candidates
            (view 2), ``M >= K``.
        pos_offset: ``0 <= pos_offset <= M - K``.

    Returns:
        ``(K,)`` tensor of the positives.
    """
    _check_S(S, pos_offset)
    return torch.diagonal(S, offset=pos_offset)


# ---------------------------------------------------------------------------
# Estimators on a materialised S
# ---------------------------------------------------------------------------


def infonce(S, pos_offset=0):
    """InfoNCE bound ``mean_i [S_ii - logsumexp_j S_ij] + log M`` (nats).

    Equals ``log M - cross_entropy(S, arange(K) + pos_offset)``; never exceeds
    ``log M``. Rows are anchors (view 1), columns candidates (view 2); the
    positive of row ``i`` is column ``i + pos_offset``.

    Args:
        S: ``(K, M)`` scores, ``M >= K``.
        pos_offset: ``0 <= pos_offset <= M - K``.

    Returns:
        0-dim tensor, the bound value (to maximise).
    """
    K, M = _check_S(S, pos_offset)
    pos = positive_scores(S, pos_offset)
    return (pos - torch.logsumexp(S, dim=1)).mean() + math.log(M)


def infonce_symmetric(S):
    """Symmetric (CLIP) InfoNCE: mean of the row-wise and column-wise bounds.

    Row bound: ``mean_i [S_ii - logsumexp_j S_ij] + log M``; column bound:
    ``mean_j [S_jj - logsumexp_i S_ij] + log K``. Rows are anchors (view 1),
    columns candidates (view 2); the positives are the diagonal.

    Args:
        S: ``(K, K)`` square scores (``K == M`` required).

    Returns:
        0-dim tensor, the bound value in nats (``log K - (CE(S) + CE(S^T)) / 2``).
    """
    _check_2d("S", S)
    K, M = S.shape
    if K != M:
        raise ValueError(f"infonce_symmetric needs a square S (K == M), got K={K}, M={M}")
    _check_S(S, 0)
    pos = torch.diagonal(S)
    row = (pos - torch.logsumexp(S, dim=1)).mean() + math.log(M)
    col = (pos - torch.logsumexp(S, dim=0)).mean() + math.log(K)
    return 0.5 * (row + col)


def nwj(S, pos_offset=0):
    """NWJ bound ``mean_pos S - e^{-1} * mean_neg exp(S)`` (nats).

    ``mean_neg exp(S)`` is computed as ``exp(logsumexp_neg S - log n_neg)`` (with
    the ``e^{-1}`` folded into the exponent), so it overflows to ``inf`` only when
    the true value does. Rows are anchors (view 1), columns candidates (view 2);
    the positive of row ``i`` is column ``i + pos_offset``, all other entries are
    the ``n_neg = K * (M - 1)`` negatives.

    Args:
        S: ``(K, M)`` scores, ``M >= 2``.
        pos_offset: ``0 <= pos_offset <= M - K``.

    Returns:
        0-dim tensor, the bound value (to maximise).
    """
    _check_S(S, pos_offset, need_negatives=True)
    pos = positive_scores(S, pos_offset)
    return pos.mean() - torch.exp(_neg_log_mean_exp(S, pos_offset) - 1.0)


def tuba(S, baseline, pos_offset=0):
    """TUBA bound with row baseline ``a_i`` (nats).

    ``1 + mean_i (S_ii - a_i) - mean_neg exp(S_ij - a_i)``, the negative term in
    log-sum-exp form. Rows are anchors (view 1), columns candidates (view 2);
    the positive of row ``i`` is column ``i + pos_offset``, all other entries are
    the ``n_neg = K * (M - 1)`` negatives.

    Args:
        S: ``(K, M)`` scores, ``M >= 2``.
        baseline: ``(K,)`` per-row baseline ``a_i`` (a 0-dim tensor or float is
            broadcast to all rows).
        pos_offset: ``0 <= pos_offset <= M - K``.

    Returns:
        0-dim tensor, the bound value (to maximise).
    """
    K, M = _check_S(S, pos_offset, need_negatives=True)
    baseline = torch.as_tensor(baseline, dtype=S.dtype, device=S.device)
    if baseline.dim() == 0:
        baseline = baseline.expand(K)
    if tuple(baseline.shape) != (K,):
        raise ValueError(f"baseline must have shape ({K},), got {tuple(baseline.shape)}")
    pos = positive_scores(S, pos_offset)
    shifted = S - baseline.unsqueeze(1)
    return 1.0 + (pos - baseline).mean() - torch.exp(_neg_log_mean_exp(shifted, pos_offset))


def dv(S, pos_offset=0):
    """Donsker-Varadhan bound ``mean_pos S - log mean_neg exp(S)`` (nats).

    ``log mean_neg exp(S) = logsumexp_neg S - log n_neg``. Biased in
    mini-batches. Rows are anchors (view 1), columns candidates (view 2); the
    positive of row ``i`` is column ``i + pos_offset``, all other entries are the
    ``n_neg = K * (M - 1)`` negatives.

    Args:
        S: ``(K, M)`` scores, ``M >= 2``.
        pos_offset: ``0 <= pos_offset <= M - K``.

    Returns:
        0-dim tensor, the bound value (to maximise).
    """
    _check_S(S, pos_offset, need_negatives=True)
    pos = positive_scores(S, pos_offset)
    return pos.mean() - _neg_log_mean_exp(S, pos_offset)


def mine(S, ema=None, momentum=0.9, pos_offset=0):
    """MINE: DV value with a moving-average-corrected gradient (Belghazi 2018).

    Let ``lme = logsumexp_neg S - log n_neg`` (log of the batch mean of
    ``exp(S_neg)``). The running average is kept in log space:
    ``new_log_ema = log(momentum * exp(ema) + (1 - momentum) * exp(lme.detach()))``
    (via ``logaddexp``), or ``lme.detach()`` when ``ema`` is None. The gradient
    is that of ``mean_pos S - exp(lme - new_log_ema.detach())``, i.e. the
    log-partition gradient divided by the (detached) moving average; the value
    is the DV bound. Rows are anchors (view 1), columns candidates (view 2); the
    positive of row ``i`` is column ``i + pos_offset``.

    Args:
        S: ``(K, M)`` scores, ``M >= 2``.
        ema: 0-dim tensor, running *log* of the moving average of
            ``mean_neg exp(S)``, or None (or NaN) on the first call.
        momentum: in ``[0, 1]``.
        pos_offset: ``0 <= pos_offset <= M - K``.

    Returns:
        ``(bound, new_log_ema)``: 0-dim bound (value = DV, gradient = MINE) and
        the detached 0-dim updated log moving average (pass it as ``ema`` next).
    """
    _check_S(S, pos_offset, need_negatives=True)
    pos = positive_scores(S, pos_offset)
    return mine_from_terms(pos.mean(), _neg_log_mean_exp(S, pos_offset), ema, momentum)


def mine_from_terms(pos_mean, lme, ema=None, momentum=0.9):
    """MINE's bound from ``mean_pos S`` and ``lme = log mean_neg exp(S)`` (see :func:`mine`).

    The one definition of MINE's moving average: the estimators and ``MINELoss`` use it.
    ``ema`` None or NaN: the first step.
    Returns ``(bound, new_log_ema)``.
    """
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {momentum}")
    lme_d = lme.detach()
    if ema is None:
        new_log_ema = lme_d
    else:
        ema = torch.as_tensor(ema, dtype=lme.dtype, device=lme.device).detach()
        if ema.dim() != 0:
            raise ValueError(f"ema must be a 0-dim tensor, got shape {tuple(ema.shape)}")
        log_m = math.log(momentum) if momentum > 0 else -math.inf
        log_1m = math.log1p(-momentum) if momentum < 1 else -math.inf
        # NB: log-space merge, cannot overflow. A NaN ema (MINELoss's buffer before its
        # first step) starts the average, branch-free so torch.compile needs no graph break.
        new_log_ema = torch.where(torch.isnan(ema), lme_d, torch.logaddexp(ema + log_m, lme_d + log_1m))
    new_log_ema = new_log_ema.detach()
    value = pos_mean - lme
    surrogate = pos_mean - torch.exp(lme - new_log_ema)
    return surrogate + (value - surrogate).detach(), new_log_ema


def js_objective(S, pos_offset=0):
    """Jensen-Shannon training objective (f-GAN / Deep InfoMax).

    ``-mean_pos softplus(-S_ii) - mean_neg softplus(S_ij)``. This is a training
    objective, not an MI bound; see :func:`js` for the reported value. Rows are
    anchors (view 1), columns candidates (view 2); the positive of row ``i`` is
    column ``i + pos_offset``, the other ``n_neg = K * (M - 1)`` entries are
    negatives.

    Args:
        S: ``(K, M)`` scores, ``M >= 2``.
        pos_offset: ``0 <= pos_offset <= M - K``.

    Returns:
        0-dim tensor (to maximise).
    """
    K, M = _check_S(S, pos_offset, need_negatives=True)
    pos = positive_scores(S, pos_offset)
    mask = negative_mask(K, M, pos_offset, device=S.device)
    neg = _masked_sum(softplus(S), mask) / (K * (M - 1))
    return -softplus(-pos).mean() - neg


def js(S, pos_offset=0):
    """JS-trained critic: value NWJ(S + 1), gradient of :func:`js_objective`.

    The returned value is ``NWJ(S + 1) = mean_pos S + 1 - mean_neg exp(S)``: the
    JS-optimal critic is the log density ratio ``log r``, for which NWJ evaluated
    at ``S + 1`` is tight (NWJ(S) is not). The gradient is that of the JS
    objective (``obj + (value - obj).detach()``). Rows are anchors (view 1),
    columns candidates (view 2); the positive of row ``i`` is column
    ``i + pos_offset``.

    Args:
        S: ``(K, M)`` scores, ``M >= 2``.
        pos_offset: ``0 <= pos_offset <= M - K``.

    Returns:
        0-dim tensor: value NWJ(S + 1) in nats, gradient of the JS objective.
    """
    _check_S(S, pos_offset, need_negatives=True)
    pos = positive_scores(S, pos_offset)
    value = pos.mean() + 1.0 - torch.exp(_neg_log_mean_exp(S, pos_offset))
    obj = js_objective(S, pos_offset)
    return obj + (value - obj).detach()


def smile(S, tau=5.0, pos_offset=0):
    """SMILE (Song & Ermon 2020): clipped DV value, JS gradient.

    Value: ``mean_pos S - (logsumexp_neg clamp(S, -tau, tau) - log n_neg)``, the
    positive term is *not* clipped. Gradient: that of :func:`js_objective`.
    Rows are anchors (view 1), columns candidates (view 2); the positive of row
    ``i`` is column ``i + pos_offset``, the other ``n_neg = K * (M - 1)``
    entries are negatives.

    Args:
        S: ``(K, M)`` scores, ``M >= 2``.
        tau: clip bound, ``> 0`` (1 or 5 in the paper; tau -> inf gives DV).
        pos_offset: ``0 <= pos_offset <= M - K``.

    Returns:
        0-dim tensor: value the SMILE bound in nats, gradient of the JS objective.
    """
    _check_S(S, pos_offset, need_negatives=True)
    if not tau > 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    pos = positive_scores(S, pos_offset)
    value = pos.mean() - _neg_log_mean_exp(clamp(S, tau), pos_offset)
    obj = js_objective(S, pos_offset)
    return obj + (value - obj).detach()


# ---------------------------------------------------------------------------
# Alignment and uniformity (Wang & Isola 2020)
# ---------------------------------------------------------------------------


def alignment(x, y, alpha=2.0):
    """Alignment loss ``mean_i |x_i - y_i|_2^alpha`` (Wang & Isola ``align_loss``).

    A value to MINIMISE (not a bound). Row ``i`` of ``x`` (view 1) is paired
    with row ``i`` of ``y`` (view 2), i.e. the positives of a square ``S``.

    Args:
        x: ``(K, d)`` view-1 features (usually L2-normalised).
        y: ``(K, d)`` view-2 features.
        alpha: exponent, > 0.

    Returns:
        0-dim tensor.
    """
    _check_2d("x", x)
    _check_2d("y", y)
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    r = x - y
    if alpha == 2:
        # NB: the sum of squares itself, not norm() ** 2: the norm's derivative r / |r| is
        # undefined where x_i = y_i, and the second derivative through it came out NaN.
        return r.pow(2).sum(1).mean()
    n = r.norm(p=2, dim=1)
    # NB: where x_i = y_i, pow's derivative alpha n^(alpha - 1) is inf for alpha < 1 (times
    # the norm's 0 there: NaN). The gradient of such a pair is 0 for every alpha: exact
    # for alpha > 1, the norm's own choice at alpha = 1, the symmetric one at the cusp
    # below it.
    moved = n > 0
    return torch.where(moved, torch.where(moved, n, torch.ones_like(n)).pow(alpha), torch.zeros_like(n)).mean()


def uniformity(x, t=2.0):
    """Uniformity ``log mean_{i != j} exp(-t |x_i - x_j|^2)`` in log-sum-exp form.

    Equivalent to a ``(K, K)`` score matrix ``S[i, j] = -t |x_i - x_j|^2`` with
    the diagonal excluded, reduced by logsumexp, minus ``log(K (K - 1))``. Stays
    finite where :func:`uniformity_pdist` underflows to ``-inf``. A value to
    minimise (about ``-2t`` at the optimum in high dimension).

    Args:
        x: ``(K, d)`` features, ``K >= 2``.
        t: positive temperature.

    Returns:
        0-dim tensor.
    """
    return uniformity_terms(x, t)[0]


def uniformity_terms(x, t=2.0):
    """``(value, per_row)`` of :func:`uniformity`: per_row[i] is
    ``log mean_{j != i} exp(-t |x_i - x_j|^2)``. From the differences ``x_i - x_j``, so
    exact under translation; differentiable (twice and more)."""
    _check_2d("x", x)
    K = x.shape[0]
    if K < 2:
        raise ValueError(f"uniformity needs at least 2 points (K >= 2), got K={K}")
    d2 = ((x.unsqueeze(1) - x.unsqueeze(0)) ** 2).sum(-1)  # (K, K), exact
    off_diag = ~torch.eye(K, dtype=torch.bool, device=x.device)
    S = -t * d2
    return _masked_lse(S, off_diag) - math.log(K * (K - 1)), _masked_lse(S, off_diag, 1) - math.log(K - 1)


def uniformity_pdist(x, t=2.0):
    """Wang & Isola's literal ``uniform_loss`` (peer formula, may give ``-inf``).

    ``torch.pdist(x, p=2).pow(2).mul(-t).exp().mean().log()``: the naive
    ``log(mean(exp(.)))`` over pairs ``i < j``, which underflows to ``-inf`` for
    spread-out points. Kept as the peer implementation; prefer :func:`uniformity`.

    Args:
        x: ``(K, d)`` features, ``K >= 2``.
        t: positive temperature.

    Returns:
        0-dim tensor.
    """
    _check_2d("x", x)
    if x.shape[0] < 2:
        raise ValueError(f"uniformity_pdist needs at least 2 points (K >= 2), got K={x.shape[0]}")
    return torch.pdist(x, p=2).pow(2).mul(-t).exp().mean().log()
