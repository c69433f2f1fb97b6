"""MI estimation in one call: train a critic on paired samples, report the bound.

``estimate_mi(x, y)`` is the counterpart of torch-mist's ``estimate_mi`` and of bmi's
neural estimators. It standardises x and y, then for each of ``folds`` test splits
(cross-fitting: every pair is a test pair once) trains a critic by maximising a
variational lower bound on mini-batches of the training pairs, keeps the step with the
best bound on a validation split (stopping when it no longer improves) and evaluates
that critic on its whole test split as one K x M problem; the estimate is the mean over
the folds, its spread a bootstrap over the test pairs. Scores are computed by the fused
ops (``losses.py`` on ``critics.py``), so the K x M evaluation needs O(K + M) memory.

Convention: the batch's x are the anchors (rows of S), its y the candidates
(columns); the positive of row i is column i.
"""
import math
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from . import _backend
from . import critics as C
from .estimators import BOUNDS
from .losses import BoundLoss, MINELoss, SMILELoss, TUBALoss

__all__ = ["estimate_mi", "MIEstimate", "ESTIMATORS", "CRITICS"]

ESTIMATORS = BOUNDS  # the estimators that train a critic, named once in estimators.py
CRITICS = ("separable", "concat", "bilinear", "dot")


@dataclass
class MIEstimate:
    """Result of :func:`estimate_mi` (all values in nats).

    Attributes:
        estimate: the bound on the whole test split (one K x M evaluation, K = M =
            ``n_test``) with the critic of the best validation step; with several folds,
            the mean of the folds' values (``fold_estimates``).
        std: the spread of ``estimate``, as ``spread`` says: ``"bootstrap"``, its standard
            deviation over resamplings of the test pairs (critic fixed); ``"batches"``, the
            standard deviation of the bound over test batches of ``batch_size`` pairs.
        eval_values: (eval_batches,) the values ``std`` is taken over.
        curve: (steps run,) the training bound at every step (the value the optimiser saw).
        estimator, batch_size: as requested; ``log_batch_size`` is InfoNCE's ceiling on one
            training batch, ``log_eval_size`` its ceiling on the test split.
        critic: the trained critic (in eval mode; the parameters of the best step).
        spread: ``"bootstrap"`` or ``"batches"``.
        n_test: pairs the estimate is computed on.
        train_estimate: the same bound on ``n_test`` training pairs; far above ``estimate``
            when the critic overfits.
        val_estimate: the best validation bound (NaN without a validation split); chosen as
            the maximum, so biased upwards: report ``estimate``.
        best_step: the step whose critic is kept.
        val_curve: (2, evaluations): the steps and the validation bound at each.
        folds, fold_estimates: the number of test splits and the estimate of each.
        (``curve``, ``best_step``, ``val_curve`` and ``critic`` are those of the first fold;
        ``train_estimate`` and ``val_estimate`` the means over the folds.)
    """

    estimate: float
    std: float
    eval_values: torch.Tensor
    curve: torch.Tensor
    estimator: str
    batch_size: int
    critic: nn.Module = field(repr=False)
    spread: str = "batches"
    n_test: int = 0
    train_estimate: float = math.nan
    val_estimate: float = math.nan
    best_step: int = 0
    val_curve: torch.Tensor = field(default=None, repr=False)
    folds: int = 1
    fold_estimates: torch.Tensor = field(default=None, repr=False)

    @property
    def log_batch_size(self):
        return math.log(self.batch_size)

    @property
    def log_eval_size(self):
        return math.log(self.n_test) if self.n_test else math.nan

    def __float__(self):
        return self.estimate

    def as_dict(self):
        return {"estimate": self.estimate, "std": self.std, "eval_values": self.eval_values,
                "curve": self.curve, "estimator": self.estimator, "batch_size": self.batch_size,
                "spread": self.spread, "n_test": self.n_test, "train_estimate": self.train_estimate,
                "val_estimate": self.val_estimate, "best_step": self.best_step,
                "val_curve": self.val_curve, "folds": self.folds, "fold_estimates": self.fold_estimates}


def mlp(d_in, hidden, layers, d_out, activation="relu"):
    """``layers`` hidden layers of width ``hidden`` and a linear output (Poole's ``mlp``)."""
    act = {"relu": nn.ReLU, "elu": nn.ELU, "tanh": nn.Tanh, "softplus": nn.Softplus, "gelu": nn.GELU}
    if activation not in act:
        raise ValueError(f"unknown activation {activation!r}; choose one of {', '.join(act)}")
    mods, d = [], d_in
    for _ in range(layers):
        mods += [nn.Linear(d, hidden), act[activation]()]
        d = hidden
    mods.append(nn.Linear(d, d_out))
    return nn.Sequential(*mods)


def _make_critic(critic, dx, dy, hidden, layers, embed_dim, activation):
    if isinstance(critic, nn.Module):
        if not hasattr(critic, "source"):
            raise TypeError("a critic module needs .source(u, v, pos_offset) (see critics.Critic)")
        return critic
    if critic == "separable":
        return C.Separable(mlp(dx, hidden, layers, embed_dim, activation),
                           mlp(dy, hidden, layers, embed_dim, activation))
    if critic == "concat":
        # NB: one hidden layer is the fused concat critic; deeper ones materialise K x M x H.
        return C.ConcatMLP(dx, dy, hidden, layers if layers is not None else 1, activation)
    if critic == "bilinear":
        return C.Bilinear(dx, dy)
    if critic == "dot":
        if dx != dy:
            raise ValueError(f"critic='dot' needs x and y of one feature size, got {dx} and {dy}")
        return C.Dot()
    raise ValueError(f"unknown critic {critic!r}; choose one of {', '.join(CRITICS)} or pass a critic module")


def _make_loss(estimator, critic, tau, dx, hidden, activation):
    if estimator == "smile":
        return SMILELoss(tau, critic)
    if estimator == "mine":
        return MINELoss(critic=critic)
    if estimator == "tuba":
        # Poole's TUBA with a learned log-baseline a(x) of the anchor.
        return TUBALoss(mlp(dx, hidden, 1, 1, activation), critic)
    if estimator in ESTIMATORS:
        return BoundLoss(estimator, critic)
    raise ValueError(f"unknown estimator {estimator!r}; choose one of {', '.join(ESTIMATORS)}")


def _as_2d(name, t, device, dtype):
    t = torch.as_tensor(t)
    if t.dim() == 1:
        t = t.unsqueeze(1)
    if t.dim() != 2 or not (t.is_floating_point() or t.dtype in (torch.int32, torch.int64)):
        raise ValueError(f"{name} must be an (n, d) array of numbers, got shape {tuple(t.shape)} ({t.dtype})")
    if t.shape[1] == 0:
        raise ValueError(f"{name} must have at least one feature (d >= 1), got shape {tuple(t.shape)}")
    return t.to(device=device if device is not None else t.device, dtype=dtype)


class _Batches:
    """Batches of row indices without replacement, reshuffled each epoch (last partial dropped)."""

    def __init__(self, idx, batch_size, gen):
        self.idx, self.bs, self.gen, self.queue = idx, batch_size, gen, []

    def next(self):
        if not self.queue:
            perm = self.idx[torch.randperm(len(self.idx), generator=self.gen)]
            self.queue = list(perm[: len(perm) // self.bs * self.bs].split(self.bs))
        return self.queue.pop()


def _auto_hidden(dx, dy):
    """Hidden width of the built-in MLP critics when ``hidden=None``: ``16 (dx + dy)`` within
    [64, 256] (a 1 + 1-d pair needs few units, a 5 + 5-d one 160)."""
    return int(min(256, max(64, 16 * (dx + dy))))


def _auto_lr(dx, dy):
    """Adam's learning rate when ``lr=None``: ``1e-2 (dx + dy)^-0.7`` within [1e-3, 5e-3]
    (5e-3 for a 1 + 1-d pair, 2e-3 for 5 + 5-d, 1e-3 from 13 + 13-d on)."""
    return float(min(5e-3, max(1e-3, 1e-2 * (dx + dy) ** -0.7)))


def _standardize(t):
    mean = t.mean(0, keepdim=True)
    std = t.std(0, keepdim=True)
    # NB: a constant column stays constant (divided by 1): it carries no information.
    return (t - mean) / torch.where(std > 0, std, torch.ones_like(std))


# Largest K (= M) evaluated in one call by a critic with no fused form (its K x M scores,
# and for a deep concat critic the K x M x H hidden tensor, are materialised).
_MATERIALIZED_CHUNK = 512


def _fused(loss_fn, x, y):
    """True when the loss's critic hands the estimators a fused score source (O(K + M) memory)."""
    if not _backend.fused_enabled():
        return False
    with torch.no_grad():
        src = loss_fn.critic.source(x[:2], y[:2])
    return not isinstance(src, C.MaterializedScores)


def _bound_on(loss_fn, x, y, idx, fused):
    """The bound (nats) on the pairs ``idx``: one K x M call over all of them when the critic
    is fused, else the mean over chunks of at most ``_MATERIALIZED_CHUNK`` pairs."""
    with torch.no_grad():
        if fused or len(idx) <= _MATERIALIZED_CHUNK:
            return -loss_fn(x[idx], y[idx]).item()
        n_chunks = math.ceil(len(idx) / _MATERIALIZED_CHUNK)
        return sum(-loss_fn(x[c], y[c]).item() for c in idx.chunk(n_chunks)) / n_chunks


def estimate_mi(x, y, estimator="smile", critic="concat", steps=4000, batch_size=256, lr=None,
                eval_batches=20, test_fraction=0.2, hidden=None, layers=None, embed_dim=32,
                activation="relu", tau=5.0, seed=0, progress=True, device=None, dtype=torch.float32,
                *, folds=5, standardize=True, val_fraction=0.2, eval_every=None, patience=20,
                spread="bootstrap", overfit_tol=0.2, weight_decay=0.0):
    """Estimates I(X; Y) in nats by training a critic on paired samples ``(x_i, y_i)``.

    The pairs are split into ``folds`` parts; each part in turn is the test split, and the
    rest is split into a validation split (``val_fraction`` of all pairs) and the training
    split. A critic is trained on mini-batches of the training split; every ``eval_every``
    steps its bound on the whole validation split picks the best step (the run stops when
    it has not improved for ``patience`` evaluations). The critic of the best step is then
    evaluated once on its whole test split, as one K x M problem (K = M = the split's size;
    the fused ops need O(K + M) memory for it). No step was chosen on that split and it is
    not a mean over small batches, so InfoNCE's ceiling is ``log`` of the test split's
    size, not of ``batch_size``. The estimate is the mean over the folds: every pair is
    evaluated once, by a critic that never saw it.

    Args:
        x: (n, dx) samples of X (a 1-D array is one feature); y: (n, dy), row i paired with x_i.
        estimator: ``"smile"`` (default; Song & Ermon, tau below), ``"infonce"`` (at most
            ``log`` of the pairs it is evaluated on), ``"nwj"``, ``"dv"``, ``"mine"``, ``"js"``
            (reports NWJ(S + 1)) or ``"tuba"`` (learned baseline).
        critic: ``"concat"`` (default: an MLP on ``[x; y]`` with one hidden layer, fused),
            ``"separable"`` (MLPs ``g(x)``, ``h(y)`` and ``<g, h>``; Poole's setup),
            ``"bilinear"``, ``"dot"``, or any ``critics.Critic`` module (trained in place;
            with several folds each fold starts from its initial state, and the module
            ends with the last fold's parameters).
        steps: most optimiser steps per fold (Adam); fewer when validation stops improving.
        batch_size: pairs per training batch; every other pair of the batch is a negative.
        lr: Adam's learning rate; default ``None``: ``1e-2 (dx + dy)^-0.7`` within
            [1e-3, 5e-3] (5e-3 for 1 + 1-d data, 2e-3 for 5 + 5-d).
        eval_batches: how many values ``std`` is taken over (see ``spread``).
        test_fraction: with ``folds=1``, the share of the pairs held out for the estimate;
            0 evaluates on the training pairs (biased upwards for flexible critics).
        hidden: width of the built-in critics' MLPs; default ``None``: ``16 (dx + dy)``
            within [64, 256].
        layers, embed_dim, activation: the built-in critics' MLPs (``layers`` defaults to
            2 for ``"separable"`` and 1 for ``"concat"``).
        tau: SMILE's clip.
        seed: seeds the split, the batches and the critics' initialisation (the global
            RNG state is left as it was).
        progress: show a tqdm progress bar with the running bound.
        device, dtype: where and in what precision to train (default: x's device, float32;
            float32 or float64).
        folds: test splits (cross-fitting); 1 is a single split of ``test_fraction``.
            Each fold trains its own critic: the run costs ``folds`` trainings.
        standardize: centre and scale every feature of x and y to unit variance first (MI
            is invariant to it; the critic's initialisation and learning rate are not).
        val_fraction: share of the pairs for choosing the step; 0 keeps the last step (no
            early stopping).
        eval_every: steps between validation evaluations; default ``max(25, steps // 80)``.
        patience: validation evaluations without improvement before stopping; ``None``
            runs all ``steps``.
        spread: what ``std`` measures: ``"bootstrap"`` (default), the standard deviation of
            the estimate over ``eval_batches`` resamplings of the test pairs with
            replacement, the critics fixed (the uncertainty from the finite test splits,
            not from training); ``"batches"``, the standard deviation of the bound over
            ``eval_batches`` test batches of ``batch_size`` pairs (the spread of one
            batch's estimate; wider, and for InfoNCE lower, than the full-split value).
        overfit_tol: a ``UserWarning`` is raised when the bound on as many training pairs
            as a test split holds exceeds the estimate by more than
            ``overfit_tol * max(1, |training bound|) + 3 std`` nats (the critic memorised
            its training pairs); ``None`` turns the check off.
        weight_decay: AdamW's decoupled weight decay (0: plain Adam).

    Returns:
        :class:`MIEstimate` with ``estimate``, ``std``, ``eval_values``, ``curve``, the
        training and validation bounds, the chosen step, the folds' estimates and the
        trained ``critic`` (of the first fold).
    """
    if dtype not in (torch.float32, torch.float64):
        # NB: Adam's eps (1e-8) is 0 in float16: the first step divides by zero.
        raise ValueError(f"estimate_mi trains in float32 or float64, got dtype={dtype}; for half precision "
                         "train a loss yourself under torch.autocast")
    x = _as_2d("x", x, device, dtype)
    y = _as_2d("y", y, x.device, dtype)
    n = x.shape[0]
    if y.shape[0] != n:
        raise ValueError(f"x and y must hold the same number of pairs, got {n} and {y.shape[0]}")
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    if not 0.0 <= val_fraction < 1.0 or test_fraction + val_fraction >= 1.0:
        raise ValueError(f"val_fraction must be in [0, 1 - test_fraction), got {val_fraction} "
                         f"(test_fraction {test_fraction})")
    if batch_size < 2 or steps < 1 or eval_batches < 1:
        raise ValueError(f"need batch_size >= 2, steps >= 1, eval_batches >= 1, got {batch_size}, "
                         f"{steps}, {eval_batches}")
    if spread not in ("bootstrap", "batches"):
        raise ValueError(f"spread must be 'bootstrap' or 'batches', got {spread!r}")
    if eval_every is not None and eval_every < 1:
        raise ValueError(f"eval_every must be >= 1, got {eval_every}")
    if patience is not None and patience < 1:
        raise ValueError(f"patience must be >= 1 or None, got {patience}")
    if not (isinstance(folds, int) and folds >= 1):
        raise ValueError(f"folds must be an int >= 1, got {folds!r}")
    n_test = int(round(test_fraction * n)) if folds == 1 else n // folds
    n_val = int(round(val_fraction * n))
    n_train = n - n_test - n_val
    if (n_train < batch_size or ((test_fraction > 0 or folds > 1) and n_test < 2)
            or (val_fraction > 0 and n_val < 2)):
        raise ValueError(f"{n} pairs are too few for batch_size={batch_size} with folds={folds}, "
                         f"test_fraction={test_fraction}, val_fraction={val_fraction} (train {n_train}, "
                         f"validation {n_val}, test {n_test}); lower batch_size, folds or the fractions")
    if standardize:
        x, y = _standardize(x), _standardize(y)
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=gen)
    if folds == 1:
        splits = [(perm[:n_test], perm[n_test:n_test + n_val], perm[n_test + n_val:])]
        if not n_test:
            splits = [(splits[0][2], splits[0][1], splits[0][2])]
    else:
        splits = []
        for f, test_idx in enumerate(perm.tensor_split(folds)):
            rest = torch.cat([c for g, c in enumerate(perm.tensor_split(folds)) if g != f])
            splits.append((test_idx, rest[:n_val], rest[n_val:]))
    if layers is None:
        layers = 1 if critic == "concat" else 2
    if hidden is None:
        hidden = _auto_hidden(x.shape[1], y.shape[1])
    if lr is None:
        lr = _auto_lr(x.shape[1], y.shape[1])
    every = eval_every if eval_every is not None else max(25, steps // 80)
    fits = []
    for f, (test_idx, val_idx, train_idx) in enumerate(splits):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + f)
            crit = _make_critic(critic, x.shape[1], y.shape[1], hidden, layers, embed_dim, activation)
            loss_fn = _make_loss(estimator, crit, tau, x.shape[1], hidden, activation)
        if f and isinstance(critic, nn.Module):
            # NB: a critic module is trained in place; every fold starts from its initial state.
            loss_fn.load_state_dict(fits[0]["init"])
        init = {k: v.detach().clone() for k, v in loss_fn.state_dict().items()} if not f else None
        fit = _fit(loss_fn, x, y, train_idx, val_idx, test_idx, steps, batch_size, lr, weight_decay, every, patience,
                   eval_batches, spread, estimator, progress, gen, f"{f + 1}/{len(splits)}" if folds > 1 else "")
        fit["init"] = init
        fits.append(fit)
    # Every pair is in one test split: the estimate is the mean of the folds' test bounds
    # weighted by their sizes (equal up to one pair).
    w = torch.tensor([len(s[0]) for s in splits], dtype=torch.float64)
    w = w / w.sum()
    mean = lambda key: float(sum(wi * fit[key] for wi, fit in zip(w.tolist(), fits)))  # noqa: E731
    estimate, train_bound = mean("estimate"), mean("train")
    if spread == "bootstrap":
        # the folds' test pairs are resampled independently: the spread of the weighted mean
        values = sum(wi * fit["values"] for wi, fit in zip(w.tolist(), fits))
    else:
        values = torch.cat([fit["values"] for fit in fits])[:eval_batches]
    std = values.std().item() if len(values) > 1 else 0.0
    gap = train_bound - estimate
    if (overfit_tol is not None and (n_test or folds > 1)
            and gap > overfit_tol * max(1.0, abs(train_bound)) + 3 * std):
        warnings.warn(f"estimate_mi[{estimator}]: the bound on held-out pairs ({estimate:.3f} nats) is far "
                      f"below the bound on as many training pairs ({train_bound:.3f}): the critic overfits "
                      "its training pairs. Use more pairs, a smaller critic, fewer steps or validation "
                      "(val_fraction > 0).", UserWarning, stacklevel=2)
    first = fits[0]
    return MIEstimate(estimate, std, values, first["curve"], estimator, batch_size, first["critic"],
                      spread=spread, n_test=len(splits[0][0]), train_estimate=train_bound,
                      val_estimate=mean("val"), best_step=first["best_step"], val_curve=first["val_curve"],
                      folds=len(splits), fold_estimates=torch.tensor([fit["estimate"] for fit in fits],
                                                                     dtype=torch.float64))


def _fit(loss_fn, x, y, train_idx, val_idx, test_idx, steps, batch_size, lr, weight_decay, every, patience,
         eval_batches, spread, estimator, progress, gen, tag):
    """Trains one critic on ``train_idx`` (best step on ``val_idx``) and evaluates it on ``test_idx``."""
    from tqdm.auto import tqdm

    loss_fn = loss_fn.to(device=x.device, dtype=x.dtype)
    params = list(loss_fn.parameters())
    if not params:
        raise ValueError("the critic has no parameters to train")
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    fused = _fused(loss_fn, x, y)
    batches = _Batches(train_idx, batch_size, gen)
    curve = torch.empty(steps, dtype=torch.float64)
    val_steps, val_values = [], []
    best, best_step, best_state, since_best = -math.inf, 0, None, 0
    n_val = len(val_idx)
    loss_fn.train()
    desc = f"estimate_mi[{estimator}]" + (f" fold {tag}" if tag else "")
    bar = tqdm(range(steps), disable=not progress, desc=desc, leave=False)
    step = 0
    for step in bar:
        idx = batches.next()
        loss = loss_fn(x[idx], y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        curve[step] = -loss.detach()
        if n_val and ((step + 1) % every == 0 or step == steps - 1):
            loss_fn.eval()
            value = _bound_on(loss_fn, x, y, val_idx, fused)
            loss_fn.train()
            val_steps.append(step + 1)
            val_values.append(value)
            if value > best:  # NaN never is
                best, best_step, since_best = value, step + 1, 0
                best_state = {k: v.detach().clone() for k, v in loss_fn.state_dict().items()}
            else:
                since_best += 1
            if patience is not None and since_best >= patience:
                break
        if progress and (step % 25 == 0 or step == steps - 1):
            post = {"mi": f"{curve[max(0, step - 24):step + 1].mean().item():.3f}"}
            if val_values:
                post["val"] = f"{val_values[-1]:.3f}"
            bar.set_postfix(**post)
    bar.close()
    curve = curve[:step + 1]
    if best_state is not None:
        loss_fn.load_state_dict(best_state)
    else:
        best_step = step + 1
    loss_fn.eval()
    estimate = _bound_on(loss_fn, x, y, test_idx, fused)
    # The same bound on as many training pairs (the same K x M), for the overfitting check.
    train_sub = train_idx[torch.randperm(len(train_idx), generator=gen)[:len(test_idx)]]
    train_bound = _bound_on(loss_fn, x, y, train_sub, fused)
    values = torch.empty(eval_batches, dtype=torch.float64)
    if spread == "bootstrap":
        for k in range(eval_batches):
            boot = test_idx[torch.randint(len(test_idx), (len(test_idx),), generator=gen)]
            values[k] = _bound_on(loss_fn, x, y, boot, fused)
    else:
        evals = _Batches(test_idx, batch_size, gen)
        for k in range(eval_batches):
            values[k] = _bound_on(loss_fn, x, y, evals.next(), fused)
    return {"estimate": estimate, "train": train_bound, "values": values, "curve": curve,
            "critic": loss_fn.critic, "best_step": best_step,
            "val": best if best_state is not None else math.nan,
            "val_curve": torch.tensor([val_steps, val_values], dtype=torch.float64).reshape(2, -1)}
