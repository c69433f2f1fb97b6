"""The tour, ``python -m infomax_ext`` with no command (about a minute on 2 CPU cores).

1. Known-MI check: every estimator with the **optimal** critic on correlated Gaussians
   (no training), and the fused values against the reference.
   Their true log density ratio is exactly a dot-product critic with biases, so the
   fused op takes it as it is::

       log p(x, y) / p(x) p(y) = c + s <x, y> - s rho / 2 (|x|^2 + |y|^2),
       s = rho / (1 - rho^2),  c = -d/2 log(1 - rho^2)

   (c split between row and column bias).
2. Known-MI estimation: critics trained with :func:`infomax_ext.estimate_mi` at a few MI
   levels and estimators (short runs), as a table and a plot.
3. Fused vs reference: InfoNCE forward+backward time and peak memory (``speed.py``), as a
   table and a plot.
"""
import argparse
import math
import os

import torch

import infomax_ext as ie

from .common import Timer, format_table, num_threads, out_dir, progress
from .gaussian import estimator_label, parse_estimator, sample_correlated_gaussian

OPTIMAL_ESTIMATORS = {
    "infonce": lambda a, b, s, r, c: ie.infonce(a, b, s, r, c),
    "nwj": lambda a, b, s, r, c: ie.nwj(a, b, s, r, c),
    "dv/mine": lambda a, b, s, r, c: ie.dv(a, b, s, r, c),
    "js": lambda a, b, s, r, c: ie.js(a, b, s, r, c),
    "smile(5)": lambda a, b, s, r, c: ie.smile(a, b, 5.0, s, r, c),
    "smile(1)": lambda a, b, s, r, c: ie.smile(a, b, 1.0, s, r, c),
}


def gaussian_batch(n, d, mi, generator):
    """(x, y, rho) in float64 (``gaussian.sample_correlated_gaussian``)."""
    x, y = sample_correlated_gaussian(n, d, mi, generator=generator, dtype=torch.float64)
    return x, y, math.sqrt(1 - math.exp(-2 * mi / d))


def optimal_critic(x, y, rho):
    """(a, b, scale, row_bias, col_bias) of the true log density ratio."""
    d = x.shape[1]
    s = rho / (1 - rho ** 2)
    c = -d / 2 * math.log(1 - rho ** 2)
    row = c / 2 - s * rho / 2 * x.pow(2).sum(1)
    col = c / 2 - s * rho / 2 * y.pow(2).sum(1)
    return x, y, s, row, col


def optimal_critic_table(args, g):
    print(f"\n[1/3] Known-MI check: correlated Gaussian, d={args.dim}, batch K=M={args.batch}, "
          f"{args.batches} batches, optimal critic (log density ratio). log K = {math.log(args.batch):.2f}")
    header = f"{'true MI':>8} | " + " | ".join(f"{n:>14}" for n in OPTIMAL_ESTIMATORS)
    print(header)
    print("-" * len(header))
    for mi in args.mi:
        vals = {n: [] for n in OPTIMAL_ESTIMATORS}
        for _ in range(args.batches):
            crit = optimal_critic(*gaussian_batch(args.batch, args.dim, mi, g))
            for n, fn in OPTIMAL_ESTIMATORS.items():
                vals[n].append(fn(*crit).item())
        cells = []
        for n in OPTIMAL_ESTIMATORS:
            v = torch.tensor(vals[n])
            cells.append(f"{v.mean():7.2f} ±{v.std():5.2f}")
        print(f"{mi:8.1f} | " + " | ".join(f"{c:>14}" for c in cells))
    print("InfoNCE saturates below log K. NWJ is tight at the critic 1 + log r, so with log r it\n"
          "reads I - 1/e (JS reports NWJ(S + 1), tight here). DV's spread grows with the MI;\n"
          "SMILE's clip trades that variance for bias.")

    print(f"\nFused vs reference (K=M={args.check}, float64, MI 4 nats):")
    crit = optimal_critic(*gaussian_batch(args.check, args.dim, 4.0, g))
    worst = 0.0
    for n, fn in OPTIMAL_ESTIMATORS.items():
        fused = fn(*crit)
        ie.use_reference(True)
        try:
            oracle = fn(*crit)
        finally:
            ie.use_reference(False)
        diff = abs(fused.item() - oracle.item())
        worst = max(worst, diff)
        print(f"  {n:>9}: fused {fused.item():+.10f}  reference {oracle.item():+.10f}  |diff| {diff:.1e}")
    return worst


def estimation_table(args, out):
    """Trains critics with estimate_mi; returns {(mi, estimator): MIEstimate} and the PNG path."""
    from . import plotting

    print(f"\n[2/3] Known-MI estimation: estimate_mi on {args.est_samples} pairs per level "
          f"(20% held out), d={args.dim}, separable critic (hidden {args.est_hidden}), "
          f"{args.est_steps} Adam steps (lr {args.est_lr:g}), batch {args.est_batch} "
          f"(log K = {math.log(args.est_batch):.2f})")
    results = {}
    g = torch.Generator().manual_seed(args.seed + 1)
    n_runs = len(args.est_mi) * len(args.est_estimators)
    with Timer() as t, num_threads(args.threads):
        bar = progress(n_runs, "estimate_mi", disable=args.no_progress)
        for mi in args.est_mi:
            x, y = sample_correlated_gaussian(args.est_samples, args.dim, mi, generator=g)
            for e in args.est_estimators:
                name, tau = parse_estimator(e)
                results[(mi, e)] = ie.estimate_mi(x, y, name, "separable", steps=args.est_steps,
                                               batch_size=args.est_batch, lr=args.est_lr, hidden=args.est_hidden,
                                               tau=tau or 5.0, seed=args.seed, progress=False, folds=1,
                                               spread="batches")
                bar.update(1)
                bar.set_postfix_str(f"I={mi:g} {e}: {results[(mi, e)].estimate:.2f}")
        bar.close()
    header = ["true MI"] + [estimator_label(e) for e in args.est_estimators]
    rows = [[f"{mi:g}"] + [f"{results[(mi, e)].estimate:.2f} ± {results[(mi, e)].std:.2f}"
                           for e in args.est_estimators] for mi in args.est_mi]
    print(format_table(header, rows))
    first = results[next(iter(results))]
    print(f"(the bound on all {first.n_test} held-out pairs at once ± its std over "
          f"{first.eval_values.numel()} held-out batches of {args.est_batch}; {t.seconds:.0f} s. Short runs: "
          f"high-MI levels are under-trained; InfoNCE cannot pass log {first.n_test} = "
          f"{first.log_eval_size:.2f}. The full staircase: python -m infomax_ext estimate)")
    png = plotting.estimates_plot(results, args.est_batch, os.path.join(out, "tour_estimates.png"))
    return results, rows, png


def speed_table(args, out):
    from . import plotting, speed

    mem = "peak extra resident memory per call in a fresh process" if args.memory else "memory not measured"
    print(f"\n[3/3] Fused vs reference: InfoNCE forward+backward, d={args.bench_d}, float32, "
          f"median of {args.repeats}; {mem}; torch threads {args.bench_threads or torch.get_num_threads()}")
    with Timer() as t:
        bar = progress(2 * len(args.sizes), "fused vs reference", disable=args.no_progress)
        rows = speed.compare(args.sizes, args.bench_d, args.repeats, args.memory, args.bench_threads, bar)
        bar.close()
    print(speed.table(rows))
    print(f"({t.seconds:.0f} s. The reference materialises S and its softmax: its extra memory grows like K*M. "
          "The fused op keeps O((K + M) d) statistics and tiles: its extra grows like K. "
          "Timings on a shared CPU are noisy.)")
    png = plotting.speed_plot(rows, os.path.join(out, "tour_speed.png"))
    return rows, png


def add_arguments(p):
    g = p.add_argument_group("1: optimal-critic check")
    g.add_argument("--dim", type=int, default=20)
    g.add_argument("--batch", type=int, default=128)
    g.add_argument("--batches", type=int, default=20)
    g.add_argument("--mi", type=float, nargs="+", default=[2.0, 4.0, 6.0, 8.0, 10.0])
    g.add_argument("--check", type=int, default=512, help="batch size of the fused-vs-reference check")
    g = p.add_argument_group("2: trained-critic estimation")
    g.add_argument("--est-mi", type=float, nargs="+", default=[2.0, 6.0, 10.0])
    g.add_argument("--est-estimators", nargs="+", default=["infonce", "nwj", "js", "smile5"])
    g.add_argument("--est-steps", type=int, default=300)
    g.add_argument("--est-batch", type=int, default=128)
    g.add_argument("--est-samples", type=int, default=10000)
    g.add_argument("--est-hidden", type=int, default=128)
    g.add_argument("--est-lr", type=float, default=1e-3)
    g = p.add_argument_group("3: fused vs reference")
    g.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096])
    g.add_argument("--bench-d", type=int, default=128)
    g.add_argument("--repeats", type=int, default=3)
    g.add_argument("--no-memory", dest="memory", action="store_false",
                   help="time in this process, no subprocesses, no memory column")
    g.add_argument("--bench-threads", type=int, default=0, help="torch threads of the timing (0: torch's default)")
    g.add_argument("--skip-speed", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads for training (1 is fastest here)")
    p.add_argument("--out", default="infomax_out", help="output folder for the plots (created)")
    p.add_argument("--no-progress", action="store_true")
    return p


def run(args):
    """Runs the three parts; returns 0, or 1 if the fused values differ from the reference."""
    g = torch.Generator().manual_seed(args.seed)
    out = out_dir(args.out)
    print(f"infomax_ext {ie.__version__}: backend={ie.backend()}, training threads={args.threads}, "
          f"timing threads={args.bench_threads or torch.get_num_threads()}; plots go to {out}")
    with Timer() as t:
        worst = optimal_critic_table(args, g)
        _, _, est_png = estimation_table(args, out)
        pngs = [est_png]
        if not args.skip_speed:
            pngs.append(speed_table(args, out)[1])
    print(f"\nTour done in {t.seconds:.0f} s. Plots: " + ", ".join(pngs))
    print("Next: python -m infomax_ext estimate (the MI staircase), python -m infomax_ext represent "
          "(two-view digits), python -m infomax_ext bench")
    return 0 if worst < 1e-8 or ie.backend() != "compiled" else 1


def main(argv=None, commands=None):
    """``commands``: the command list shown under the options (``python -m infomax_ext --help``)."""
    p = argparse.ArgumentParser(
        prog="python -m infomax_ext",
        description="The tour (about a minute on 2 CPU cores): every estimator with the optimal critic,\n"
                    "a short trained-critic estimation, fused vs reference time and memory.",
        epilog=commands, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return run(p.parse_args(argv))
