"""Drop-in ``nn.Module`` losses with the conventions users already know.

Every loss here is computed from the fused streaming reductions of ``ops.py``
(or, with the compiled module absent or ``use_reference(True)``, from
``reference.py``), so no K x M score matrix is stored. Rows of a score matrix
are always the anchors (the first argument, view 1), columns the candidates
(view 2, plus any extra negatives); the positive of anchor i is candidate
``i + pos_offset``. Which peer each loss reproduces is in ``docs/losses.md``.

All losses are values to **minimise**. Each ``forward`` takes
``return_diagnostics=False``; with True it returns ``(loss, diagnostics)``, where
the dict is built from the same fused outputs as the loss (no second pass over
S) and holds detached tensors:

- ``"bound"``: the MI lower bound in nats that the loss corresponds to (for the
  contrastive losses ``log_m - loss``, InfoNCE with ``log_m`` candidates);
- ``"log_m"``: log of the number of candidates per anchor (InfoNCE's ceiling);
- ``"per_row"``: the per-anchor terms (documented per class).

The alignment/uniformity losses are geometric, not bounds: their dicts carry the
per-row terms and the parts of the loss instead of ``"bound"``.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from . import estimators as est
from . import ops
from .critics import Dot
from .distributed import gather_with_grad
from .estimators import check_pair
from .ops import COL_LSE, NEG_LSE, ROW_LSE

__all__ = [
    "InfoNCELoss",
    "NTXentLoss",
    "ClipLoss",
    "BoundLoss",
    "NWJLoss",
    "DVLoss",
    "MINELoss",
    "JSLoss",
    "SMILELoss",
    "TUBALoss",
    "AlignmentLoss",
    "UniformityLoss",
    "AlignUniformLoss",
]


# ---------------------------------------------------------------------------
# Shared pieces of the dot-product losses
# ---------------------------------------------------------------------------


def _lse_over(a, bank, scale):
    """(K,) ``logsumexp_j scale <a_i, bank_j>`` over every row of ``bank`` (N, d), fused.

    The op needs at least as many columns as rows, so a bank smaller than the batch
    is put on the rows and reduced column-wise instead.
    """
    if bank.shape[0] >= a.shape[0]:
        return ops.score_reduce(a, bank, scale, reductions=ROW_LSE).row_lse
    return ops.score_reduce(bank, a, scale, reductions=COL_LSE).col_lse


def _check_bank(negatives, like, name="negatives"):
    if negatives is None:
        return
    if not isinstance(negatives, torch.Tensor) or negatives.dim() != 2 or negatives.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty (N, d) tensor, got "
                         f"{tuple(getattr(negatives, 'shape', ()))}")
    if negatives.shape[1] != like.shape[1]:
        raise ValueError(f"feature sizes differ: {name} has d={negatives.shape[1]}, "
                         f"the views have d={like.shape[1]}")
    if negatives.dtype != like.dtype or negatives.device != like.device:
        raise ValueError(f"{name} must match the views' dtype and device, got {negatives.dtype} on "
                         f"{negatives.device}, views {like.dtype} on {like.device}")


def _check_temperature(temperature):
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    return float(temperature)


def _contrastive_result(per_row, log_m, return_diagnostics, loss=None, **extra):
    """Loss = mean of the per-anchor cross entropies (or ``loss``, that mean computed
    by the caller, who may then pass per_row None without diagnostics); bound = log_m -
    loss (nats)."""
    loss = per_row.mean() if loss is None else loss
    if not return_diagnostics:
        return loss
    d = loss.detach()
    diag = {"bound": log_m - d, "log_m": log_m, "per_row": per_row.detach()}
    diag.update(extra)
    return loss, diag


# ---------------------------------------------------------------------------
# Contrastive losses (cross entropy over candidates)
# ---------------------------------------------------------------------------


class InfoNCELoss(nn.Module):
    """InfoNCE / contrastive cross entropy on a pair of views, with optional extra negatives.

    ``S[i, j] = <z1_i, c_j> / temperature`` with anchors ``z1`` (K, d) on the rows and
    candidates ``c = [z2; negatives]`` on the columns; the positive of anchor i is
    ``z2[i + pos_offset]``. The loss is ``mean_i [logsumexp_j S_ij - S_i,pos]``, i.e.
    ``F.cross_entropy`` with labels ``i + pos_offset``, and ``log M - loss`` is the InfoNCE
    bound in nats (``M`` candidates per anchor).

    Conventions (``docs/losses.md``): with ``negatives=None`` it is info-nce-pytorch's
    ``InfoNCE`` without negative keys, open_clip's one-directional CLIP loss and, with
    ``symmetric=True``, the CLIP loss at a fixed temperature. With a bank and
    ``bank_only=True`` the candidates are the positive plus the bank only (MoCo,
    lightly's ``NTXentLoss`` with a memory bank, info-nce-pytorch with ``negative_keys``).

    Args:
        temperature: ``S = cos / temperature`` (``normalize=True``) or ``dot / temperature``.
        symmetric: also score ``z2`` anchors against ``z1`` candidates (plus the bank) and
            average the two directions (CLIP); needs K == M and ``pos_offset = 0``.
        normalize: L2-normalise z1, z2 and the negatives first (cosine similarity).
        bank_only: with ``negatives``, drop the in-batch negatives (MoCo's queue convention).
        gather_distributed: score the local anchors against every rank's ``z2`` (and ``z1``
            when symmetric) via ``distributed.gather_with_grad``; positives sit at
            ``rank * M_local + i + pos_offset``. A no-op outside a process group.

    Forward:
        ``z1`` (K, d), ``z2`` (M, d) with M >= K, ``negatives`` (N, d) or None,
        ``pos_offset`` in [0, M - K]. ``per_row`` of the diagnostics: the K per-anchor cross
        entropies (2K when symmetric: the z1 anchors, then the z2 anchors).
    """

    def __init__(self, temperature=0.1, symmetric=False, normalize=True, bank_only=False,
                 gather_distributed=False):
        super().__init__()
        self.temperature = _check_temperature(temperature)
        self.symmetric, self.normalize = bool(symmetric), bool(normalize)
        self.bank_only, self.gather_distributed = bool(bank_only), bool(gather_distributed)

    def extra_repr(self):
        return (f"temperature={self.temperature}, symmetric={self.symmetric}, normalize={self.normalize}, "
                f"bank_only={self.bank_only}, gather_distributed={self.gather_distributed}")

    def forward(self, z1, z2, negatives=None, pos_offset=0, return_diagnostics=False):
        check_pair(z1, z2, pos_offset, names=("z1", "z2"))
        _check_bank(negatives, z1)
        K, M = z1.shape[0], z2.shape[0]
        if self.symmetric and (K != M or pos_offset != 0):
            raise ValueError(f"symmetric InfoNCE needs K == M and pos_offset 0, got K={K}, M={M}, "
                             f"pos_offset={pos_offset}")
        if self.bank_only and negatives is None:
            raise ValueError("bank_only=True needs negatives= (the bank / queue)")
        if self.normalize:
            z1, z2 = F.normalize(z1, dim=-1), F.normalize(z2, dim=-1)
            negatives = None if negatives is None else F.normalize(negatives, dim=-1)
        scale = 1.0 / self.temperature
        cand, off = z2, pos_offset  # the z1 anchors' candidates (every rank's z2 when gathered)
        if self.gather_distributed and not self.bank_only:
            z2_all, rank, world = gather_with_grad(z2, name="z2")
            if world > 1:
                cand, off = z2_all, rank * M + pos_offset
        if negatives is None and not self.bank_only and not (self.symmetric and cand is not z2):
            # The InfoNCE estimator itself, one direction or both (its gradient made with
            # the forward walk).
            log_m = math.log(cand.shape[0])
            from_ = est.infonce_symmetric_from if self.symmetric else est.infonce_from
            e = from_(est.DotScores(z1, cand, scale, pos_offset=off), as_loss=True, rows=return_diagnostics)
            return _contrastive_result(log_m - e.per_row if return_diagnostics else None, log_m, return_diagnostics,
                                       loss=e.value)

        pos = est.DotScores(z1, z2, scale, pos_offset=pos_offset).positive()
        lse2 = None
        if self.bank_only:
            # Candidates: the positive and the bank (MoCo); no in-batch negatives.
            lse1 = torch.logaddexp(pos, _lse_over(z1, negatives, scale))
            lse2 = torch.logaddexp(pos, _lse_over(z2, negatives, scale)) if self.symmetric else None
            n_cand = 1 + negatives.shape[0]
        else:
            if cand is not z2:
                lse1 = ops.score_reduce(z1, cand, scale, pos_offset=off, reductions=ROW_LSE).row_lse
                if self.symmetric:
                    z1_all = gather_with_grad(z1, name="z1")[0]
                    lse2 = ops.score_reduce(z2, z1_all, scale, pos_offset=off, reductions=ROW_LSE).row_lse
            else:
                st = ops.score_reduce(z1, z2, scale, pos_offset=pos_offset,
                                      reductions=ROW_LSE | (COL_LSE if self.symmetric else 0))
                lse1, lse2 = st.row_lse, (st.col_lse if self.symmetric else None)
            n_cand = cand.shape[0]
            if negatives is not None:
                lse1 = torch.logaddexp(lse1, _lse_over(z1, negatives, scale))
                if self.symmetric:
                    lse2 = torch.logaddexp(lse2, _lse_over(z2, negatives, scale))
                n_cand += negatives.shape[0]

        per_row = lse1 - pos if lse2 is None else torch.cat([lse1 - pos, lse2 - pos])
        return _contrastive_result(per_row, math.log(n_cand), return_diagnostics)


class NTXentLoss(nn.Module):
    """SimCLR's NT-Xent: each of the 2N views against the other 2N - 1 views.

    With ``z = [z1; z2]`` (2N, d), L2-normalised, and ``S = z z^T / temperature``, anchor
    k's positive is its other view (k +- N) and its candidates are all 2N - 1 rows but
    itself; the loss is the mean over the 2N anchors of ``logsumexp_{j != k} S_kj - S_k,pos``.
    Fused as **one** ``score_reduce(z, z)`` whose negatives' log-sum-exp excludes exactly
    the self-similarity (the "positive" of the op is the diagonal), plus the O(N d)
    positive scores, so S (2N x 2N) is never stored. When a backward follows, that call
    is ``ops.score_reduce_weighted``, which makes the mean's gradient in the same walk.

    Matches lightly's ``NTXentLoss(temperature)`` (memory bank off) and
    pytorch-metric-learning's ``NTXentLoss(temperature)`` on ``cat([z1, z2])`` with labels
    ``cat([arange(N), arange(N)])``. For a memory bank use ``InfoNCELoss(bank_only=True)``.

    Args:
        temperature: 0.5 is lightly's default (pytorch-metric-learning uses 0.07).
        normalize: L2-normalise first (both peers do).
        gather_distributed: every local anchor against the 2N * world_size views of all
            ranks (lightly's ``gather_distributed``); a no-op outside a process group.

    Forward:
        ``z1``, ``z2``: (N, d) the two views, row i of each from the same sample.
        ``per_row``: the 2N per-anchor cross entropies (z1 anchors, then z2 anchors);
        ``log_m = log(2N - 1)`` (times the world size when gathered).
    """

    def __init__(self, temperature=0.5, normalize=True, gather_distributed=False):
        super().__init__()
        self.temperature = _check_temperature(temperature)
        self.normalize, self.gather_distributed = bool(normalize), bool(gather_distributed)

    def extra_repr(self):
        return (f"temperature={self.temperature}, normalize={self.normalize}, "
                f"gather_distributed={self.gather_distributed}")

    def forward(self, z1, z2, return_diagnostics=False):
        check_pair(z1, z2, names=("z1", "z2"))
        if z1.shape[0] != z2.shape[0]:
            raise ValueError(f"NT-Xent needs two views of the same N samples, got {z1.shape[0]} and {z2.shape[0]}")
        if self.normalize:
            z1, z2 = F.normalize(z1, dim=-1), F.normalize(z2, dim=-1)
        scale = 1.0 / self.temperature
        z = torch.cat([z1, z2])  # (2N, d)
        z_all, off = z, 0
        if self.gather_distributed:
            # NB: gather [z1; z2] per rank, so rank r's rows sit at [2N r, 2N (r + 1)) and
            # the self-similarity of local row k is column k + 2N r: one constant offset.
            z_all, rank, _ = gather_with_grad(z, name="[z1; z2]")
            off = rank * z.shape[0]
        # NB: the loss is a plain mean of the negatives' log-sum-exps minus the positives:
        # the gradient of the first comes out of the forward walk.
        t = est.DotScores(z, z_all, scale, pos_offset=off).terms(NEG_LSE, walk=est.Walk(neg=1.0 / z.shape[0]))
        lse = t.stats.neg_lse
        lse_mean = lse.mean() if t.walked is None else t.walked
        pos = est.DotScores(z1, z2, scale).positive()
        return _contrastive_result(lse - torch.cat([pos, pos]).detach(), math.log(z_all.shape[0] - 1),
                                   return_diagnostics, loss=lse_mean - pos.mean())


class ClipLoss(nn.Module):
    """CLIP's symmetric cross entropy with a learnable ``logit_scale`` (open_clip's ``ClipLoss``).

    ``S = exp(logit_scale) * image @ text^T (+ logit_bias)`` with images on the rows, texts
    on the columns and pairs on the diagonal; the loss is
    ``(CE(S, arange) + CE(S^T, arange)) / 2``. The scale (and bias) get gradients from the
    fused op. A bias added to every logit cancels in both softmaxes: it is accepted for
    open_clip's signature and gets a zero gradient.

    Args:
        init_logit_scale: initial ``log scale``, ``log(1 / 0.07)`` as in CLIP.
        max_logit_scale: the module's ``logit_scale`` is clamped to it before ``exp``
            (``log 100``: CLIP's cap on the scale, open_clip's clamp); None: no clamp.
        learnable: the scale (and bias) are ``nn.Parameter``s; else buffers.
        bias: None for no bias, or the initial value of a bias added to every logit.
        normalize: L2-normalise the features first. False by default: open_clip's loss
            takes features its model already normalised.
        gather_distributed: local anchors against every rank's candidates in both
            directions (open_clip's ``local_loss=True, gather_with_grad=True``).

    Forward:
        ``image_features``, ``text_features``: (N, d). ``logit_scale``, ``logit_bias``:
        optional overrides with open_clip's meaning (``logit_scale`` already exponentiated,
        as open_clip's model returns it); None uses the module's own.
        ``per_row``: 2N per-anchor cross entropies (images, then texts); the diagnostics
        also hold ``"logit_scale"`` (the scale used, exponentiated).
    """

    def __init__(self, init_logit_scale=math.log(1 / 0.07), learnable=True, bias=None,
                 normalize=False, gather_distributed=False, max_logit_scale=math.log(100)):
        super().__init__()
        if max_logit_scale is not None and not math.isfinite(float(max_logit_scale)):
            raise ValueError(f"max_logit_scale must be finite or None, got {max_logit_scale!r}")
        self.max_logit_scale = None if max_logit_scale is None else float(max_logit_scale)
        if not math.isfinite(float(init_logit_scale)):
            raise ValueError(f"init_logit_scale must be finite, got {init_logit_scale!r}")
        if self.max_logit_scale is not None and float(init_logit_scale) > self.max_logit_scale:
            raise ValueError(f"init_logit_scale={init_logit_scale!r} is above max_logit_scale="
                             f"{self.max_logit_scale:g} (log 100, CLIP's clamp); pass a smaller one or "
                             "raise max_logit_scale")
        scale = torch.tensor(float(init_logit_scale))
        if learnable:
            self.logit_scale = nn.Parameter(scale)
        else:
            self.register_buffer("logit_scale", scale)
        if bias is None:
            self.logit_bias = None
        elif learnable:
            self.logit_bias = nn.Parameter(torch.tensor(float(bias)))
        else:
            self.register_buffer("logit_bias", torch.tensor(float(bias)))
        self.normalize, self.gather_distributed = bool(normalize), bool(gather_distributed)

    def extra_repr(self):
        return (f"normalize={self.normalize}, gather_distributed={self.gather_distributed}, "
                f"max_logit_scale={self.max_logit_scale}")

    def forward(self, image_features, text_features, logit_scale=None, logit_bias=None,
                return_diagnostics=False):
        img, txt = image_features, text_features
        check_pair(img, txt, names=("image_features", "text_features"))
        if img.shape[0] != txt.shape[0]:
            raise ValueError(f"ClipLoss needs as many texts as images, got {img.shape[0]} and {txt.shape[0]}")
        if self.normalize:
            img, txt = F.normalize(img, dim=-1), F.normalize(txt, dim=-1)
        acc = ops.acc_dtype(img.dtype)
        if logit_scale is None:
            # NB: CLIP caps the scale at 100 (open_clip clamps the parameter to log 100
            # after each step); the clamp here keeps exp() from overflowing in between.
            log_scale = self.logit_scale
            if self.max_logit_scale is not None:
                log_scale = log_scale.clamp(max=self.max_logit_scale)
            scale = log_scale.exp()
        else:
            scale = torch.as_tensor(logit_scale)
        bias = self.logit_bias if logit_bias is None else torch.as_tensor(logit_bias)
        for name, t in (("logit_scale", scale), ("logit_bias", bias)):
            if t is not None and t.numel() != 1:
                raise ValueError(f"{name} must be a number or a one-element tensor (one value for every "
                                 f"logit), got shape {tuple(t.shape)}")
        scale = scale.to(device=img.device, dtype=acc).reshape(())
        K = img.shape[0]
        row_bias = None if bias is None else bias.to(device=img.device, dtype=acc).reshape(()).expand(K)
        src = est.DotScores(img, txt, scale, row_bias)

        gathered = False
        if self.gather_distributed:
            txt_all, rank, world = gather_with_grad(txt, name="text_features")
            gathered = world > 1
        if not gathered:
            # The symmetric InfoNCE estimator itself (its gradient made with the forward walk).
            log_m = math.log(K)
            e = est.infonce_symmetric_from(src, as_loss=True, rows=return_diagnostics)
            return _contrastive_result(log_m - e.per_row if return_diagnostics else None, log_m, return_diagnostics,
                                       loss=e.value, logit_scale=scale.detach())
        img_all = gather_with_grad(img, name="image_features")[0]
        off = rank * K
        lse_i = ops.score_reduce(img, txt_all, scale, row_bias, None, off, ROW_LSE).row_lse
        lse_t = ops.score_reduce(txt, img_all, scale, row_bias, None, off, ROW_LSE).row_lse
        pos = src.positive()
        per_row = torch.cat([lse_i - pos, lse_t - pos])
        return _contrastive_result(per_row, math.log(txt_all.shape[0]), return_diagnostics,
                                   logit_scale=scale.detach())


# ---------------------------------------------------------------------------
# Negated MI bounds on a critic
# ---------------------------------------------------------------------------


class BoundLoss(nn.Module):
    """The negated MI lower bound ``-estimator(critic(u, v))``; the base of the bound losses.

    Rows of the critic's S are the anchors ``u`` (K, du), columns the candidates ``v``
    (M, dv), M >= K, positive of row i at column ``i + pos_offset``. The bound comes from
    ``estimators.py`` on ``critic.source(u, v, pos_offset)``, so it is fused for every
    critic with a fused form and identical to :func:`infomax_ext.mi_lower_bound`.

    Args:
        estimator: ``"infonce"``, ``"nwj"``, ``"dv"``, ``"js"``, ``"smile"`` or ``"tuba"``
            (``"mine"``: use :class:`MINELoss`, which keeps the moving average).
        critic: a critic from ``critics.py``; default ``Dot()`` (``S = <u_i, v_j>``).
        **options: the estimator's keyword options (``tau`` for SMILE).

    Forward:
        ``(u, v, pos_offset=0, return_diagnostics=False)``. ``per_row`` (K,): the
        per-anchor terms of the bound (see each subclass); ``log_m = log M``.
    """

    _per_row_doc = ""

    def __init__(self, estimator, critic=None, **options):
        super().__init__()
        if estimator not in est.BOUNDS:
            raise ValueError(f"unknown estimator {estimator!r}; choose one of {sorted(est.BOUNDS)}")
        if estimator == "mine" and not isinstance(self, MINELoss):
            raise ValueError("use MINELoss for 'mine': it keeps the moving average in a buffer")
        self.estimator = estimator
        self.critic = Dot() if critic is None else critic
        self.options = options

    def extra_repr(self):
        return f"estimator={self.estimator!r}" + "".join(f", {k}={v!r}" for k, v in self.options.items())

    def _estimate(self, src, u):
        """The estimator's :class:`estimators.Estimate` and the extra diagnostics."""
        return est.estimate(src, self.estimator, **self.options), {}

    def forward(self, u, v, pos_offset=0, return_diagnostics=False):
        src = self.critic.source(u, v, pos_offset)
        e, extra = self._estimate(src, u)
        if not return_diagnostics:
            return -e.value
        diag = {"bound": e.value.detach(), "log_m": math.log(src.M), "per_row": e.per_row.detach()}
        diag.update({k: v.detach() for k, v in extra.items()})
        return -e.value, diag


class NWJLoss(BoundLoss):
    """``-NWJ``: ``-(mean_pos S - e^{-1} mean_neg exp(S))`` on a critic (Nguyen et al.; Poole's
    ``nwj_lower_bound``). ``per_row``: ``S_ii - e^{-1} mean_{j != i} exp(S_ij)`` (mean = bound)."""

    def __init__(self, critic=None):
        super().__init__("nwj", critic)


class DVLoss(BoundLoss):
    """``-DV``: ``-(mean_pos S - log mean_neg exp(S))`` on a critic (Donsker-Varadhan; biased in
    mini-batches). ``per_row``: the per-anchor DV ``S_ii - log mean_{j != i} exp(S_ij)``."""

    def __init__(self, critic=None):
        super().__init__("dv", critic)


class JSLoss(BoundLoss):
    """``-JS``: the loss's **gradient** is that of the Jensen-Shannon objective
    ``-mean_pos softplus(-S) - mean_neg softplus(S)`` (f-GAN / Deep InfoMax); its **value**
    is ``-NWJ(S + 1)``, the MI estimate of a JS-trained critic (Poole). ``per_row``:
    ``S_ii + 1 - mean_{j != i} exp(S_ij)`` (mean = bound)."""

    def __init__(self, critic=None):
        super().__init__("js", critic)


class SMILELoss(BoundLoss):
    """``-SMILE`` (Song & Ermon): value ``-(mean_pos S - log mean_neg exp(clamp(S, -tau, tau)))``,
    gradient of the JS objective. ``per_row``: ``S_ii - log mean_{j != i} exp(clamp(S_ij))``.

    Args:
        tau: the clip (1 or 5 in the paper; 5 is the common default).
        critic: as in :class:`BoundLoss`.
    """

    def __init__(self, tau=5.0, critic=None):
        if not tau > 0:
            raise ValueError(f"SMILE: tau must be > 0, got {tau}")
        super().__init__("smile", critic, tau=float(tau))


class TUBALoss(BoundLoss):
    """``-TUBA``: ``-(1 + mean_i (S_ii - a_i) - mean_neg exp(S_ij - a_i))`` with a row baseline
    ``a_i`` (Poole's ``tuba_lower_bound``; NWJ is TUBA with ``a = 1``).

    Args:
        baseline: None (``a = 0``), a float (constant ``a``), or a module mapping the
            anchors ``u`` (K, du) to (K,) or (K, 1) log-baselines ``a_i`` (Poole's ``a(y)``,
            learnable; it gets gradients).
        critic: as in :class:`BoundLoss`.

    ``per_row``: ``1 + S_ii - a_i - mean_{j != i} exp(S_ij - a_i)`` (mean = bound).
    """

    def __init__(self, baseline=None, critic=None):
        super().__init__("tuba", critic)
        self.baseline = baseline if isinstance(baseline, nn.Module) else None
        self.constant = 0.0 if baseline is None or self.baseline is not None else float(baseline)

    def _estimate(self, src, u):
        acc = ops.acc_dtype(u.dtype)
        if self.baseline is not None:
            a = self.baseline(u).reshape(-1).to(acc)
            if a.shape[0] != src.K:
                raise ValueError(f"TUBA baseline must give one value per anchor ({src.K}), got {a.shape[0]}")
        else:
            a = torch.full((src.K,), self.constant, dtype=acc, device=u.device)
        return est.tuba_from(src, a), {"baseline": a}


class MINELoss(BoundLoss):
    """``-MINE`` (Belghazi et al.): value ``-DV``; the log-partition gradient is divided by an
    exponential moving average of ``mean_neg exp(S)`` (bias correction).

    The moving average is kept **in log space** in the buffer ``log_ema`` (NaN until the
    first training step; saved in the state dict, moved by ``.to``). It is updated in
    training mode only, with ``momentum`` the weight of the old value (0.9), and equals the
    ``ema`` threaded through :func:`infomax_ext.mine` / ``reference.mine`` step by step.
    ``per_row``: the per-anchor DV. The diagnostics add ``"log_ema"``.
    """

    def __init__(self, momentum=0.9, critic=None):
        super().__init__("mine", critic)
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {momentum}")
        self.momentum = float(momentum)
        self.register_buffer("log_ema", torch.tensor(math.nan, dtype=torch.float64))

    def _estimate(self, src, u):
        e = est.mine_from(src, self.log_ema, self.momentum)
        if self.training:
            self.log_ema.copy_(e.state)
        return e, {"log_ema": e.state}


# ---------------------------------------------------------------------------
# Alignment and uniformity (Wang & Isola 2020)
# ---------------------------------------------------------------------------


def _alignment_rows(x, y, alpha, normalize):
    """``|x_i - y_i|^alpha`` (K,) of paired rows (L2-normalised first if asked), in the
    accumulation dtype, and the x and y the caller goes on with."""
    check_pair(x, y, names=("x", "y"))
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    if normalize:
        x, y = F.normalize(x, dim=-1), F.normalize(y, dim=-1)
    acc = ops.acc_dtype(x.dtype)
    return (x.to(acc) - y.to(acc)).norm(p=2, dim=1).pow(alpha), x, y


_uniformity = est.uniformity_terms


class AlignmentLoss(nn.Module):
    """Wang & Isola's ``align_loss``: ``mean_i |x_i - y_i|_2^alpha`` (x, y: (K, d) paired rows).

    Args:
        alpha: the exponent (2).
        normalize: L2-normalise x and y first. False: the reference function takes
            features the model already normalised.

    ``per_row``: ``|x_i - y_i|^alpha``; no ``"bound"``.
    """

    def __init__(self, alpha=2.0, normalize=False):
        super().__init__()
        if not alpha > 0:
            raise ValueError(f"alpha must be > 0, got {alpha}")
        self.alpha, self.normalize = float(alpha), bool(normalize)

    def forward(self, x, y, return_diagnostics=False):
        rows = _alignment_rows(x, y, self.alpha, self.normalize)[0]
        loss = rows.mean()
        return (loss, {"per_row": rows.detach()}) if return_diagnostics else loss


class UniformityLoss(nn.Module):
    """Wang & Isola's ``uniform_loss``: ``log mean_{i != j} exp(-t |x_i - x_j|^2)`` (x: (K, d)).

    Same value as the reference ``torch.pdist(x).pow(2).mul(-t).exp().mean().log()`` where
    that is finite, and finite where it underflows to -inf (fused log-sum-exp).

    Args:
        t: the temperature (2).
        normalize: L2-normalise x first (False, as the reference function).

    ``per_row``: ``log mean_{j != i} exp(-t |x_i - x_j|^2)``; ``log_m = log(K (K - 1))``.
    """

    def __init__(self, t=2.0, normalize=False):
        super().__init__()
        if not t > 0:
            raise ValueError(f"t must be > 0, got {t}")
        self.t, self.normalize = float(t), bool(normalize)

    def forward(self, x, return_diagnostics=False):
        if self.normalize:
            x = F.normalize(x, dim=-1)
        loss, rows = _uniformity(x, self.t)
        if not return_diagnostics:
            return loss
        K = x.shape[0]
        return loss, {"per_row": rows.detach(), "log_m": math.log(K * (K - 1))}


class AlignUniformLoss(nn.Module):
    """Wang & Isola's recipe ``align(x, y) + lam * (uniform(x) + uniform(y)) / 2``.

    Args:
        lam: weight of the uniformity term (``unif_w`` in the reference, 1).
        alpha, t: as in :class:`AlignmentLoss` and :class:`UniformityLoss`.
        normalize: L2-normalise x and y first (True: the recipe's features are normalised).

    Diagnostics: ``"align"``, ``"uniform_x"``, ``"uniform_y"`` and ``per_row`` (the
    alignment rows).
    """

    def __init__(self, lam=1.0, alpha=2.0, t=2.0, normalize=True):
        super().__init__()
        if not alpha > 0 or not t > 0:
            raise ValueError(f"alpha and t must be > 0, got alpha={alpha}, t={t}")
        self.lam, self.alpha, self.t, self.normalize = float(lam), float(alpha), float(t), bool(normalize)

    def extra_repr(self):
        return f"lam={self.lam}, alpha={self.alpha}, t={self.t}, normalize={self.normalize}"

    def forward(self, x, y, return_diagnostics=False):
        rows, x, y = _alignment_rows(x, y, self.alpha, self.normalize)
        align = rows.mean()
        ux, uy = _uniformity(x, self.t)[0], _uniformity(y, self.t)[0]
        loss = align + self.lam * (ux + uy) / 2
        if not return_diagnostics:
            return loss
        return loss, {"align": align.detach(), "uniform_x": ux.detach(), "uniform_y": uy.detach(),
                      "per_row": rows.detach()}
