"""Critics: ``nn.Module`` score functions ``S[i, j] = f(u_i, v_j)`` for the MI estimators.

Convention: ``u`` is (K, du), the anchors (view 1), ``v`` is (M, dv), the
candidates (view 2), M >= K; **rows of S are the anchors u, columns the
candidates v**, and the positive of row i is column ``i + pos_offset``.

Every critic has one interface:

- ``critic(u, v)`` / ``critic.scores(u, v)``: the materialised (K, M) score
  matrix, computed with the ``reference.py`` functions (for debugging and the
  reference path);
- ``critic.source(u, v, pos_offset=0)``: a *score source* for ``estimators.py``
  that never builds S: dot-product critics hand ``(a, b, scale)`` to the fused
  ``score_reduce`` (``estimators.DotScores``); the one-hidden-layer concat critic
  hands ``(P, Q, w2, b2)`` to the fused ``concat_score_reduce`` (``ConcatScores``).

``mi_lower_bound(u, v, critic, estimator)`` runs any estimator on any critic.

Critic families (Tschannen et al. 2020, Sec. 3.3):

=============  ===============================================  ===================================
critic         S[i, j]                                          fused form
=============  ===============================================  ===================================
``Dot``        ``scale <u_i, v_j>``                             a = u, b = v
``Cosine``     ``scale <u_i/|u_i|, v_j/|v_j|>``, scale = 1/tau  a, b normalised
``Bilinear``   ``u_i^T W v_j``                                  a = u W, b = v
``Separable``  ``scale <g1(u_i), g2(v_j)>``                     a = g1(u), b = g2(v)
``ConcatMLP``  ``w2 . act(Wu u_i + Wv v_j + b1) + b2``          P = u Wu^T + b1, Q = v Wv^T
=============  ===============================================  ===================================
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from . import estimators, ops
from . import reference as ref
from .estimators import DotScores, ScoreSource, check_pair

__all__ = [
    "Critic",
    "Dot",
    "Cosine",
    "Bilinear",
    "Separable",
    "ConcatMLP",
    "ConcatScores",
    "MaterializedScores",
    "mi_lower_bound",
]


class Critic(nn.Module):
    """Base class: ``scores(u, v) -> S`` (K, M) and ``source(u, v, pos_offset) -> score source``.

    Rows of S are the anchors ``u`` (view 1), columns the candidates ``v`` (view 2).
    ``forward(u, v)`` returns ``scores(u, v)``.
    """

    def scores(self, u, v):
        raise NotImplementedError

    def source(self, u, v, pos_offset=0):
        raise NotImplementedError

    def forward(self, u, v):
        return self.scores(u, v)


class _Scaled(Critic):
    """A fixed scale ``1 / temperature`` or a learnable ``logit_scale.exp()`` (CLIP)."""

    def __init__(self, temperature, learnable):
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)
        self.learnable = bool(learnable)
        if self.learnable:
            # NB: the scale is parametrised in log space (CLIP's logit_scale), so it
            # stays positive; the estimators receive scale = exp(logit_scale) as a
            # tensor and the fused op returns its gradient.
            self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / temperature)))

    def scale(self):
        """The current scale: a 0-dim tensor (learnable) or a float."""
        return self.logit_scale.exp() if self.learnable else 1.0 / self.temperature

    def extra_repr(self):
        return f"temperature={self.temperature}, learnable={self.learnable}"


class Dot(_Scaled):
    """Dot-product critic ``S[i, j] = scale * <u_i, v_j>`` (u: (K, d), v: (M, d)).

    Rows of S are the anchors u, columns the candidates v.

    Args:
        temperature: ``scale = 1 / temperature`` (the initial value when learnable).
        learnable: learn ``log scale`` (CLIP's ``logit_scale``); the scale gets a gradient.
    """

    def __init__(self, temperature=1.0, learnable=False):
        super().__init__(temperature, learnable)

    def scores(self, u, v):
        return ref.scores_dot(u, v, self.scale())

    def source(self, u, v, pos_offset=0):
        return DotScores(u, v, self.scale(), pos_offset=pos_offset)


class Cosine(_Scaled):
    """Cosine critic ``S[i, j] = <u_i/|u_i|, v_j/|v_j|> / temperature`` (u: (K, d), v: (M, d)).

    Rows of S are the anchors u, columns the candidates v.

    Args:
        temperature: tau (the initial value when learnable); 0.1 is common.
        learnable: learn ``log(1 / tau)`` like CLIP's ``logit_scale``; the scale gets a gradient.
    """

    def __init__(self, temperature=0.1, learnable=False):
        super().__init__(temperature, learnable)

    def scores(self, u, v):
        temperature = 1.0 / self.scale() if self.learnable else self.temperature
        return ref.scores_cosine(u, v, temperature)

    def source(self, u, v, pos_offset=0):
        return DotScores(F.normalize(u, dim=-1), F.normalize(v, dim=-1), self.scale(),
                         pos_offset=pos_offset)


class Bilinear(Critic):
    """Bilinear critic ``S[i, j] = u_i^T W v_j`` with a learnable ``W`` (dim_u, dim_v).

    Fused as the dot-product critic on ``a = u W`` (one (K, du) x (du, dv) matmul)
    and ``b = v``. Rows of S are the anchors u (K, dim_u), columns the candidates
    v (M, dim_v).

    Args:
        dim_u, dim_v: feature sizes of u and v.
        init_std: std of W's normal init; default ``1 / sqrt(dim_u * dim_v)`` (S of order 1
            for unit-variance features).
    """

    def __init__(self, dim_u, dim_v, init_std=None):
        super().__init__()
        std = init_std if init_std is not None else 1.0 / math.sqrt(dim_u * dim_v)
        self.W = nn.Parameter(torch.randn(dim_u, dim_v) * std)

    def scores(self, u, v):
        return ref.scores_bilinear(u, v, self.W)

    def source(self, u, v, pos_offset=0):
        return DotScores(u @ self.W, v, 1.0, pos_offset=pos_offset)

    def extra_repr(self):
        return f"dim_u={self.W.shape[0]}, dim_v={self.W.shape[1]}"


class Separable(Critic):
    """Separable critic ``S[i, j] = <g1(u_i), g2(v_j)> / temperature`` for any two modules.

    ``g1`` maps u (K, ...) to (K, e) and ``g2`` maps v (M, ...) to (M, e). Fused as the
    dot-product critic on ``a = g1(u)``, ``b = g2(v)``. Rows of S are the anchors u,
    columns the candidates v.
    """

    def __init__(self, g1, g2, temperature=1.0):
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.g1, self.g2 = g1, g2
        self.temperature = float(temperature)

    def scores(self, u, v):
        return ref.scores_dot(self.g1(u), self.g2(v), 1.0 / self.temperature)

    def source(self, u, v, pos_offset=0):
        return DotScores(self.g1(u), self.g2(v), 1.0 / self.temperature, pos_offset=pos_offset)

    def extra_repr(self):
        return f"temperature={self.temperature}"


class ConcatMLP(Critic):
    """Concat-MLP critic ``S[i, j] = f([u_i; v_j])``, an MLP on the concatenated pair.

    ``f`` has ``layers`` hidden layers of width ``hidden`` and a scalar output:
    ``h1 = act(W1 [u_i; v_j] + b1)``, ``h_{l+1} = act(W_{l+1} h_l + b_{l+1})``,
    ``S[i, j] = w_out . h_L + b_out``. Rows of S are the anchors u (K, dim_u),
    columns the candidates v (M, dim_v).

    With ``layers=1`` the critic is fused: ``W1 [u; v] = Wu u + Wv v`` splits the first
    layer, ``P = u Wu^T + b1`` (K, H) and ``Q = v Wv^T`` (M, H) are plain matmuls, and
    ``concat_score_reduce`` evaluates ``w2 . act(P_i + Q_j) + b2`` over all K x M pairs
    without building S or the (K, M, H) hidden tensor.

    With ``layers > 1`` the critic is **not fused**: its source materialises S through the
    (K, M, H) hidden tensor (``MaterializedScores``), so memory is O(K M H) as in the
    reference.

    Args:
        dim_u, dim_v: feature sizes of u and v.
        hidden: width H of the hidden layers.
        layers: number of hidden layers (>= 1).
        activation: ``"relu"``, ``"elu"``, ``"tanh"``, ``"softplus"`` or ``"gelu"``.
    """

    def __init__(self, dim_u, dim_v, hidden, layers=1, activation="relu"):
        super().__init__()
        if layers < 1:
            raise ValueError(f"layers must be >= 1, got {layers}")
        ref.activation_fn(activation)  # validates the name
        ops.activation_code(activation)
        self.dim_u, self.dim_v, self.activation = dim_u, dim_v, activation
        # NB: one Linear over the concatenation [u; v] (its default init sees fan_in
        # dim_u + dim_v); its weight is split into Wu and Wv by views, so both halves
        # get their gradients through the same parameter.
        self.first = nn.Linear(dim_u + dim_v, hidden)
        self.deep = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(layers - 1))
        self.out = nn.Linear(hidden, 1)

    @property
    def layers(self):
        return 1 + len(self.deep)

    def split(self):
        """``(Wu (H, dim_u), Wv (H, dim_v), b1 (H,), w2 (H,), b2 ())`` of a one-layer critic."""
        W = self.first.weight
        return (W[:, : self.dim_u], W[:, self.dim_u:], self.first.bias, self.out.weight[0],
                self.out.bias[0])

    def scores(self, u, v):
        if self.layers == 1:
            Wu, Wv, b1, w2, b2 = self.split()
            return ref.scores_concat(u, v, Wu, Wv, b1, w2, b2, self.activation)
        return self._scores_deep(u, v)

    def _scores_deep(self, u, v):
        act = ref.activation_fn(self.activation)
        W = self.first.weight
        P = u @ W[:, : self.dim_u].T + self.first.bias  # (K, H)
        Q = v @ W[:, self.dim_u:].T  # (M, H)
        h = act(P.unsqueeze(1) + Q.unsqueeze(0))  # (K, M, H): materialised
        for layer in self.deep:
            h = act(layer(h))
        return self.out(h).squeeze(-1)

    def source(self, u, v, pos_offset=0):
        if self.layers == 1:
            Wu, Wv, b1, w2, b2 = self.split()
            return ConcatScores(u, v, Wu, Wv, b1, w2, b2, self.activation, pos_offset)
        return MaterializedScores(lambda: self._scores_deep(u, v), u, v, pos_offset)

    def extra_repr(self):
        return (f"dim_u={self.dim_u}, dim_v={self.dim_v}, hidden={self.first.out_features}, "
                f"layers={self.layers}, activation={self.activation!r}")


class ConcatScores(ScoreSource):
    """Score source of the one-hidden-layer concat critic for ``concat_score_reduce``.

    ``S[i, j] = w2 . act(P_i + Q_j) + b2`` with ``P = u Wu^T + b1`` (K, H) and
    ``Q = v Wv^T`` (M, H). Rows of S are the anchors u (K, du), columns the
    candidates v (M, dv); positive of row i at column ``i + pos_offset``.

    Args:
        u: (K, du). v: (M, dv), M >= K, same dtype and device as u.
        Wu: (H, du). Wv: (H, dv). b1: (H,). w2: (H,). b2: float or 0-dim tensor.
        activation: a name of ``ops.ACTIVATION_CODES``.
        pos_offset: positive of row i at column ``i + pos_offset``.
    """

    def __init__(self, u, v, Wu, Wv, b1, w2, b2=0.0, activation="relu", pos_offset=0):
        check_pair(u, v, pos_offset, names=("u", "v"), same_dim=False)
        ops.activation_code(activation)
        self.u, self.v, self.Wu, self.Wv, self.b1, self.w2, self.b2 = u, v, Wu, Wv, b1, w2, b2
        self.activation = activation
        self.K, self.M, self.pos_offset = u.shape[0], v.shape[0], pos_offset
        self._PQ = None

    def PQ(self):
        """``(P (K, H), Q (M, H))``: the first layer split over the pair (computed once)."""
        if self._PQ is None:
            self._PQ = (self.u @ self.Wu.T + self.b1, self.v @ self.Wv.T)
        return self._PQ

    def positive(self):
        """(K,) scores of the positive pairs in the accumulation dtype, in plain torch. O(K H)."""
        P, Q = self.PQ()
        acc = ops.acc_dtype(P.dtype)
        sl = slice(self.pos_offset, self.pos_offset + self.K)
        act = ref.activation_fn(self.activation)
        h = act(P.to(acc) + Q[sl].to(acc))
        b2 = self.b2.to(acc) if isinstance(self.b2, torch.Tensor) else self.b2
        return h @ self.w2.to(acc) + b2

    def reduce(self, reductions, clamp_tau=ops.CLAMP_TAU):
        P, Q = self.PQ()
        return ops.concat_score_reduce(P, Q, self.w2, self.b2, self.activation, self.pos_offset,
                                       reductions, clamp_tau)

    def materialize(self):
        return ref.scores_concat(self.u, self.v, self.Wu, self.Wv, self.b1, self.w2, self.b2,
                                 self.activation)


class MaterializedScores(ScoreSource):
    """Score source over a materialised S (the fallback for critics with no fused form).

    ``make_S()`` returns the (K, M) scores (rows = anchors u, columns = candidates v);
    it is called once, on first use. ``reduce`` computes the five reductions on S with
    ``reference.reduce_scores``, so memory is that of S (and of whatever built it).
    """

    def __init__(self, make_S, u, v, pos_offset=0):
        check_pair(u, v, pos_offset, names=("u", "v"), same_dim=False)
        self._make_S, self._S = make_S, None
        self.K, self.M, self.pos_offset = u.shape[0], v.shape[0], pos_offset

    def materialize(self):
        if self._S is None:
            self._S = self._make_S()
        return self._S

    def positive(self):
        S = self.materialize()
        return torch.diagonal(S, offset=self.pos_offset).to(ops.acc_dtype(S.dtype))

    def reduce(self, reductions, clamp_tau=ops.CLAMP_TAU):
        S = self.materialize()
        return ops.ScoreStats(*ref.reduce_scores(S.to(ops.acc_dtype(S.dtype)), self.pos_offset, reductions,
                                                 clamp_tau))


def mi_lower_bound(u, v, critic, estimator="infonce", pos_offset=0, **kwargs):
    """An MI lower bound (nats) of the paired batches ``u``, ``v`` under any critic.

    Rows of the critic's S are the anchors ``u`` (K, du), columns the candidates ``v``
    (M, dv), M >= K; the positive of row i is column ``i + pos_offset``. The estimator
    runs on ``critic.source(u, v, pos_offset)`` (fused when the compiled module is
    loaded and ``use_reference`` is off; else on the materialised S).

    Args:
        critic: a :class:`Critic` (``Dot``, ``Cosine``, ``Bilinear``, ``Separable``, ``ConcatMLP``).
        estimator: ``"infonce"``, ``"infonce_symmetric"``, ``"nwj"``, ``"dv"``, ``"mine"``,
            ``"js"``, ``"js_objective"``, ``"smile"`` or ``"tuba"``.
        **kwargs: the estimator's options: ``baseline`` (K,) for ``"tuba"``; ``ema``,
            ``momentum`` for ``"mine"``; ``tau`` for ``"smile"``.

    Returns:
        A 0-dim tensor (the bound; maximise it), or for ``"mine"`` the tuple
        ``(bound, new_ema)``.
    """
    return estimators.estimate_from(critic.source(u, v, pos_offset), estimator, **kwargs)
