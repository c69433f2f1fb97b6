"""MI estimation in one call: train a critic on paired samples, report the bound.

``estimate_mi(x, y)`` is the counterpart of torch-mist's ``estimate_mi`` and of bmi's
neural estimators: it fits a critic by maximising a variational lower bound on
mini-batches of the training split, then evaluates the bound (no gradient) on
``eval_batches`` batches of the held-out split and reports their mean and
standard deviation, with the training curve. Scores are computed by the fused
ops (``losses.py`` on ``critics.py``), so large batches cost no K x M memory.

Convention: the batch's x are the anchors (rows of S), its y the candidates
(columns); the positive of row i is column i.
"""
import math
from dataclasses import dataclass, field

import torch
from torch import nn

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
        estimate: mean of the bound over the evaluation batches.
        std: standard deviation of the bound over the evaluation batches (the spread of
            a single batch's estimate; the standard error of ``estimate`` is
            ``std / sqrt(len(eval_values))``).
        eval_values: (eval_batches,) the bound on each evaluation batch.
        curve: (steps,) the training bound at every step (the value the optimiser saw).
        estimator, batch_size: as requested; ``log_batch_size`` is InfoNCE's ceiling.
        critic: the trained critic (in eval mode).
    """

    estimate: float
    std: float
    eval_values: torch.Tensor
    curve: torch.Tensor
    estimator: str
    batch_size: int
    critic: nn.Module = field(repr=False)

    @property
    def log_batch_size(self):
        return math.log(self.batch_size)

    def __float__(self):
        return self.estimate

    def as_dict(self):
        return {"estimate": self.estimate, "std": self.std, "eval_values": self.eval_values,
                "curve": self.curve, "estimator": self.estimator, "batch_size": self.batch_size}


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


def estimate_mi(x, y, estimator="smile", critic="separable", steps=2000, batch_size=128, lr=5e-4,
                eval_batches=20, test_fraction=0.2, hidden=128, layers=None, embed_dim=32,
                activation="relu", tau=5.0, seed=0, progress=True, device=None, dtype=torch.float32):
    """Estimates I(X; Y) in nats by training a critic on paired samples ``(x_i, y_i)``.

    Args:
        x: (n, dx) samples of X (a 1-D array is one feature); y: (n, dy), row i paired with x_i.
        estimator: ``"smile"`` (default; Song & Ermon, tau below), ``"infonce"`` (at most
            ``log batch_size``), ``"nwj"``, ``"dv"``, ``"mine"``, ``"js"`` (reports NWJ(S + 1))
            or ``"tuba"`` (learned baseline).
        critic: ``"separable"`` (MLPs ``g(x)``, ``h(y)`` and ``<g, h>``; Poole's setup),
            ``"concat"`` (an MLP on ``[x; y]``, fused with one hidden layer), ``"bilinear"``,
            ``"dot"``, or any ``critics.Critic`` module (trained in place).
        steps: optimiser steps (Adam).
        batch_size: pairs per batch; every other pair of the batch is a negative.
        lr: Adam learning rate.
        eval_batches: batches of the held-out split the final estimate averages over.
        test_fraction: share of the pairs held out for evaluation; 0 evaluates on the
            training pairs (biased upwards for flexible critics).
        hidden, layers, embed_dim, activation: the built-in critics' MLPs (``layers``
            defaults to 2 for ``"separable"`` and 1 for ``"concat"``).
        tau: SMILE's clip.
        seed: seeds the split, the batches and the critic's initialisation (the global
            RNG state is left as it was).
        progress: show a tqdm progress bar with the running bound.
        device, dtype: where and in what precision to train (default: x's device, float32;
            float32 or float64).

    Returns:
        :class:`MIEstimate` with ``estimate``, ``std``, ``eval_values``, ``curve`` and the
        trained ``critic``.
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
    if batch_size < 2 or steps < 1 or eval_batches < 1:
        raise ValueError(f"need batch_size >= 2, steps >= 1, eval_batches >= 1, got {batch_size}, "
                         f"{steps}, {eval_batches}")
    n_test = int(round(test_fraction * n))
    if n - n_test < batch_size or (test_fraction > 0 and n_test < batch_size):
        raise ValueError(f"{n} pairs are too few for batch_size={batch_size} with test_fraction="
                         f"{test_fraction} (train {n - n_test}, test {n_test}); lower batch_size or "
                         "test_fraction")
    from tqdm.auto import tqdm

    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=gen)
    test_idx, train_idx = (perm[:n_test], perm[n_test:]) if n_test else (perm, perm)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if layers is None:
            layers = 1 if critic == "concat" else 2
        crit = _make_critic(critic, x.shape[1], y.shape[1], hidden, layers, embed_dim, activation)
        loss_fn = _make_loss(estimator, crit, tau, x.shape[1], hidden, activation)
    loss_fn = loss_fn.to(device=x.device, dtype=dtype)
    params = list(loss_fn.parameters())
    if not params:
        raise ValueError("the critic has no parameters to train")
    opt = torch.optim.Adam(params, lr=lr)

    batches = _Batches(train_idx, batch_size, gen)
    curve = torch.empty(steps, dtype=torch.float64)
    loss_fn.train()
    bar = tqdm(range(steps), disable=not progress, desc=f"estimate_mi[{estimator}]", leave=False)
    for step in bar:
        idx = batches.next()
        loss = loss_fn(x[idx], y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        curve[step] = -loss.detach()
        if progress and (step % 25 == 0 or step == steps - 1):
            bar.set_postfix(mi=f"{curve[max(0, step - 24):step + 1].mean().item():.3f}")
    bar.close()

    loss_fn.eval()
    evals = _Batches(test_idx, batch_size, gen)
    values = torch.empty(eval_batches, dtype=torch.float64)
    with torch.no_grad():
        for k in range(eval_batches):
            idx = evals.next()
            values[k] = -loss_fn(x[idx], y[idx])
    std = values.std().item() if eval_batches > 1 else 0.0
    return MIEstimate(values.mean().item(), std, values, curve, estimator, batch_size, crit)
