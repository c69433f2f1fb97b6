"""Correlated Gaussians with a known MI and the MI staircase (``python -m infomax_ext estimate``).

The distribution (Poole et al. 2019, Song & Ermon 2020; ``docs/conventions.md``):
``x, eps ~ N(0, I_d)``, ``y = rho x + sqrt(1 - rho^2) eps`` with per-dimension correlation
``rho``, so ``I(X; Y) = -d/2 log(1 - rho^2)`` and ``rho = sqrt(1 - exp(-2 I / d))``. The cubic
variant applies ``y <- y^3`` afterwards: invertible, so the MI is unchanged, but the
optimal critic is no longer a quadratic form.

The staircase: one critic is trained **continuously** on fresh batches while the true
MI steps through ``levels`` (2, 4, 6, 8, 10 nats), switching every ``steps_per_level``
steps, and the bound the optimiser sees is recorded at every step (as in Poole's and
Song & Ermon's notebooks). Bias, variance and MSE per level are computed over the last
``tail`` fraction of each level's steps (the critic has had time to adapt):
``bias = mean(est) - I``, ``variance = mean((est - mean)^2)``, ``mse = mean((est - I)^2)``
(so ``mse = bias^2 + variance`` exactly).

Batch convention: the x of a batch are the anchors (rows of S), its y the candidates
(columns); the positive of row i is column i, the K - 1 other columns are its negatives.
"""
import argparse
import csv
import math
import os
import re
import sys

import torch

from .. import critics as C
from ..losses import BoundLoss, DVLoss, JSLoss, MINELoss, NWJLoss, SMILELoss
from .common import Timer, format_table, mlp, num_threads, out_dir, progress

__all__ = [
    "mi_to_rho",
    "rho_to_mi",
    "sample_correlated_gaussian",
    "log_density_ratio",
    "staircase_schedule",
    "make_critic",
    "make_loss",
    "run_staircase",
    "summarize",
    "main",
]

LEVELS = (2.0, 4.0, 6.0, 8.0, 10.0)
ESTIMATORS = ("infonce", "nwj", "dv", "mine", "js", "smile1", "smile5")
CRITICS = ("separable", "concat")
CSV_COLUMNS = ("critic", "estimator", "true_mi", "mean", "bias", "variance", "mse", "median", "n", "nonfinite",
               "batch_size", "steps_per_level", "cubic")


# ---------------------------------------------------------------------------
# The distribution
# ---------------------------------------------------------------------------


def mi_to_rho(mi, d):
    """Per-dimension correlation giving ``I(X; Y) = mi`` nats in ``d`` dimensions."""
    if mi < 0 or d < 1:
        raise ValueError(f"need mi >= 0 and d >= 1, got mi={mi}, d={d}")
    return math.sqrt(1.0 - math.exp(-2.0 * mi / d))


def rho_to_mi(rho, d):
    """``-d/2 log(1 - rho^2)``."""
    return -d / 2.0 * math.log(1.0 - rho * rho)


def sample_correlated_gaussian(n, d, mi, cubic=False, generator=None, dtype=torch.float32, device=None):
    """``n`` pairs ``(x, y)``, each (n, d), with ``I(X; Y) = mi`` nats.

    ``y = rho x + sqrt(1 - rho^2) eps``; with ``cubic=True`` then ``y <- y^3`` (same MI).
    Sampled in float64, returned in ``dtype``.
    """
    rho = mi_to_rho(mi, d)
    x = torch.randn(n, d, generator=generator, dtype=torch.float64)
    eps = torch.randn(n, d, generator=generator, dtype=torch.float64)
    y = rho * x + math.sqrt(1.0 - rho * rho) * eps
    if cubic:
        y = y ** 3
    return x.to(dtype=dtype, device=device), y.to(dtype=dtype, device=device)


def log_density_ratio(x, y, mi, cubic=False):
    """(n,) ``log p(x_i, y_i) / (p(x_i) p(y_i))`` of the pairs; its mean over pairs is ~ the MI.

    Per dimension ``-1/2 log(1 - rho^2) - (rho^2 x^2 - 2 rho x y + rho^2 y^2) / (2 (1 - rho^2))``.
    For the cubic variant the ratio is that of ``(x, y^(1/3))`` (the Jacobians cancel).
    """
    d = x.shape[1]
    rho = mi_to_rho(mi, d)
    x, y = x.double(), y.double()
    if cubic:
        y = y.sign() * y.abs().pow(1.0 / 3.0)
    q = rho * rho * (x * x + y * y) - 2.0 * rho * x * y
    return (-0.5 * math.log(1.0 - rho * rho) - q / (2.0 * (1.0 - rho * rho))).sum(1)


def staircase_schedule(levels, steps_per_level):
    """(len(levels) * steps_per_level,) float64: the true MI at every training step."""
    if steps_per_level < 1 or not levels:
        raise ValueError(f"need levels and steps_per_level >= 1, got {levels}, {steps_per_level}")
    return torch.tensor([float(m) for m in levels], dtype=torch.float64).repeat_interleave(steps_per_level)


# ---------------------------------------------------------------------------
# Critics and estimators
# ---------------------------------------------------------------------------


def make_critic(kind, d, hidden=256, layers=2, embed=32, concat_layers=1):
    """The papers' critics on (d,)-dimensional x and y.

    ``"separable"``: ``S[i, j] = <g(x_i), h(y_j)>`` with MLPs g, h (``layers`` hidden layers of
    ``hidden`` units, output ``embed``); fused as a dot product.
    ``"concat"``: ``S[i, j] = f([x_i; y_j])``, an MLP with ``concat_layers`` hidden layers;
    one layer is fused (never builds the K x M x H tensor), more materialise it.
    """
    if kind == "separable":
        return C.Separable(mlp(d, hidden, layers, embed), mlp(d, hidden, layers, embed))
    if kind == "concat":
        return C.ConcatMLP(d, d, hidden, concat_layers, "relu")
    raise ValueError(f"unknown critic {kind!r}; choose one of {', '.join(CRITICS)}")


_SMILE = re.compile(r"^smile(?:[_:(]?(?:tau=)?([0-9.]+)\)?)?$")


def parse_estimator(spec):
    """``(name, tau)`` of ``"infonce"``, ``"nwj"``, ``"dv"``, ``"mine"``, ``"js"``, ``"smileT"``
    (``"smile"`` alone is tau 5)."""
    spec = spec.lower()
    m = _SMILE.match(spec)
    if m:
        return "smile", float(m.group(1)) if m.group(1) else 5.0
    if spec in ("infonce", "nwj", "dv", "mine", "js"):
        return spec, None
    raise ValueError(f"unknown estimator {spec!r}; choose from {', '.join(ESTIMATORS)} (smileT: SMILE "
                     "with clip tau=T)")


def estimator_label(spec):
    name, tau = parse_estimator(spec)
    if name == "smile":
        return f"SMILE (tau={tau:g})"
    return {"infonce": "InfoNCE", "nwj": "NWJ", "dv": "DV", "mine": "MINE", "js": "JS"}[name]


def make_loss(spec, critic):
    """The loss module (the negated bound) of an estimator spec on ``critic``.

    The value each reports (``-loss``) is the bound: JS reports NWJ(S + 1), MINE the DV
    value (its gradient uses the moving average), SMILE its clipped DV value (JS gradient).
    """
    name, tau = parse_estimator(spec)
    if name == "infonce":
        return BoundLoss("infonce", critic)
    if name == "nwj":
        return NWJLoss(critic)
    if name == "dv":
        return DVLoss(critic)
    if name == "mine":
        return MINELoss(critic=critic)
    if name == "js":
        return JSLoss(critic)
    return SMILELoss(tau, critic)


# ---------------------------------------------------------------------------
# The staircase
# ---------------------------------------------------------------------------


def run_staircase(estimator, critic="separable", levels=LEVELS, steps_per_level=400, batch_size=64, dim=20,
                  cubic=False, lr=5e-4, hidden=256, layers=2, embed=32, concat_layers=1, seed=0, bar=None):
    """Trains one critic through the MI staircase; returns the (steps,) bound at every step.

    Fresh batches of ``batch_size`` pairs every step (the data seed is ``seed``, the same for
    every estimator, so they see the same batches). Adam with ``lr``. A step whose loss is
    not finite is recorded (NaN/inf) and skipped (no update), so one overflow does not end
    the run. ``bar``: an optional tqdm bar advanced once per step.
    """
    schedule = staircase_schedule(levels, steps_per_level)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        crit = make_critic(critic, dim, hidden, layers, embed, concat_layers)
        loss_fn = make_loss(estimator, crit)
    opt = torch.optim.Adam(loss_fn.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(10_000 + seed)
    values = torch.empty(len(schedule), dtype=torch.float64)
    loss_fn.train()
    for step, mi in enumerate(schedule.tolist()):
        x, y = sample_correlated_gaussian(batch_size, dim, mi, cubic=cubic, generator=gen)
        loss = loss_fn(x, y)
        values[step] = -loss.detach().double()
        if torch.isfinite(loss):
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if bar is not None:
            bar.update(1)
            if step % 50 == 0:
                bar.set_postfix_str(f"{critic}/{estimator} I={mi:g} est={values[step].item():.2f}")
    return values


def summarize(values, levels, steps_per_level, tail=0.5):
    """Per level: dict(true_mi, mean, bias, variance, mse, median, n, nonfinite) over the last
    ``tail`` fraction of the level's steps (non-finite values are counted and left out; the
    median is robust to the rare overflowing steps that dominate NWJ's and JS's mean)."""
    if not 0.0 < tail <= 1.0:
        raise ValueError(f"tail must be in (0, 1], got {tail}")
    n_tail = max(1, int(round(tail * steps_per_level)))
    rows = []
    for k, mi in enumerate(levels):
        v = values[(k + 1) * steps_per_level - n_tail:(k + 1) * steps_per_level]
        fin = v[torch.isfinite(v)]
        if len(fin):
            mean = fin.mean().item()
            var = ((fin - mean) ** 2).mean().item()
            mse = ((fin - mi) ** 2).mean().item()
            median = fin.median().item()
        else:
            mean = var = mse = median = math.nan
        rows.append(dict(true_mi=float(mi), mean=mean, bias=mean - mi, variance=var, mse=mse, median=median,
                         n=len(v), nonfinite=len(v) - len(fin)))
    return rows


def write_steps_csv(path, values, schedule):
    """One row per step: ``step, true_mi`` and the bound of every ``critic/estimator`` run."""
    keys = list(values)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "true_mi"] + [f"{c}/{e}" for c, e in keys])
        cols = [values[k].tolist() for k in keys]
        for i, mi in enumerate(schedule.tolist()):
            w.writerow([i, f"{mi:g}"] + [f"{col[i]:.6g}" for col in cols])


def write_csv(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{r[k]:.6g}" if isinstance(r[k], float) else r[k]) for k in CSV_COLUMNS})


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


def add_arguments(p):
    p.add_argument("--estimators", nargs="+", default=list(ESTIMATORS),
                   help="infonce nwj dv mine js smileT (SMILE with clip T); default: all seven")
    p.add_argument("--critics", nargs="+", default=["separable"], choices=CRITICS,
                   help="critic families (default: separable; the papers also run concat)")
    p.add_argument("--steps-per-level", type=int, default=400,
                   help="steps at each MI level (papers: 4000; default sized for a 2-core CPU)")
    p.add_argument("--levels", type=float, nargs="+", default=list(LEVELS), help="true MI per level (nats)")
    p.add_argument("--batch-size", type=int, default=64, help="K = M (papers: 64 or 128)")
    p.add_argument("--dim", type=int, default=20)
    p.add_argument("--cubic", action="store_true", help="y <- y^3 (same MI, harder critic)")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=2, help="hidden layers of the separable critic's MLPs")
    p.add_argument("--embed", type=int, default=32)
    p.add_argument("--concat-layers", type=int, default=1,
                   help="hidden layers of the concat critic (1 is fused; the papers use 2, which "
                        "materialises K x M x hidden and is ~20x slower here)")
    p.add_argument("--tail", type=float, default=0.5,
                   help="fraction of each level's last steps that bias/variance/MSE average over")
    p.add_argument("--smooth", type=float, default=None, help="EMA span of the plotted line (default steps/8)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest for these small MLPs)")
    p.add_argument("--out", default="infomax_out", help="output folder (created)")
    p.add_argument("--no-progress", action="store_true")
    return p


def run(args):
    """Runs the staircase for every critic x estimator; writes the PNGs and the CSV.

    Returns dict(rows=[CSV rows], values={(critic, est): tensor}, schedule, csv, steps_csv, png,
    bvm_png, seconds).
    """
    from . import plotting

    for e in args.estimators:
        parse_estimator(e)
    out = out_dir(args.out)
    tag = f"staircase{'_cubic' if args.cubic else ''}_b{args.batch_size}"
    levels = list(args.levels)
    schedule = staircase_schedule(levels, args.steps_per_level)
    n_runs = len(args.critics) * len(args.estimators)
    print(f"MI staircase: d={args.dim}, levels {', '.join(f'{m:g}' for m in levels)} nats, "
          f"{args.steps_per_level} steps each, batch {args.batch_size} (log K = {math.log(args.batch_size):.2f}), "
          f"{'cubic ' if args.cubic else ''}Gaussian, critics {', '.join(args.critics)}, "
          f"Adam lr {args.lr:g}, {args.threads or torch.get_num_threads()} thread(s)")
    values, rows = {}, []
    with Timer() as t, num_threads(args.threads):
        bar = progress(n_runs * len(schedule), "staircase", disable=args.no_progress)
        for critic in args.critics:
            for est in args.estimators:
                v = run_staircase(est, critic, levels, args.steps_per_level, args.batch_size, args.dim,
                                  args.cubic, args.lr, args.hidden, args.layers, args.embed,
                                  args.concat_layers, args.seed, bar)
                values[(critic, est)] = v
                for r in summarize(v, levels, args.steps_per_level, args.tail):
                    rows.append(dict(critic=critic, estimator=est, batch_size=args.batch_size,
                                     steps_per_level=args.steps_per_level, cubic=int(args.cubic), **r))
        bar.close()
    csv_path = os.path.join(out, tag + ".csv")
    write_csv(csv_path, rows)
    steps_path = os.path.join(out, tag + "_steps.csv")
    write_steps_csv(steps_path, values, schedule)
    png = os.path.join(out, tag + ".png")
    plotting.staircase_plot(values, schedule, args.batch_size, png, smooth=args.smooth,
                            title=f"{'Cubic' if args.cubic else 'Gaussian'} staircase, d={args.dim}, "
                                  f"batch {args.batch_size}, {args.steps_per_level} steps/level")
    bvm_png = os.path.join(out, tag + "_bvm.png")
    plotting.bias_variance_plot(rows, bvm_png, title=f"last {args.tail:.0%} of each level")

    print(f"\nBias / variance / MSE over the last {args.tail:.0%} of each level's steps "
          f"({t.seconds:.0f} s of training):")
    print(summary_table(rows))
    print(f"\nwrote {csv_path} (bias/variance/MSE)\n      {steps_path} (the bound at every step)\n"
          f"      {png}\n      {bvm_png}\n(output folder: {out})")
    return dict(rows=rows, values=values, schedule=schedule, csv=csv_path, steps_csv=steps_path, png=png,
                bvm_png=bvm_png, seconds=t.seconds)


def _num(x, spec):
    """``spec``-formatted, or 3 significant digits in e-notation once it is huge."""
    return f"{x:.2e}" if math.isfinite(x) and abs(x) >= 1e4 else spec.format(x)


def summary_table(rows, markdown=False):
    from .common import markdown_table

    header = ["critic", "estimator", "true MI", "mean", "bias", "variance", "MSE", "median"]
    body = [[r["critic"], estimator_label(r["estimator"]), f"{r['true_mi']:g}", _num(r["mean"], "{:.2f}"),
             _num(r["bias"], "{:+.2f}"), _num(r["variance"], "{:.3g}"), _num(r["mse"], "{:.3g}"),
             _num(r["median"], "{:.2f}")] + ([] if not r["nonfinite"] else [f"{r['nonfinite']} non-finite"])
            for r in rows]
    if any(len(b) > len(header) for b in body):
        header = header + ["note"]
        body = [b + [""] * (len(header) - len(b)) for b in body]
    return (markdown_table if markdown else format_table)(header, body)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m infomax_ext estimate",
                                description="The MI staircase of Poole et al. / Song & Ermon on correlated "
                                            "Gaussians: estimate per step, bias/variance/MSE per level.")
    add_arguments(p)
    run(p.parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
