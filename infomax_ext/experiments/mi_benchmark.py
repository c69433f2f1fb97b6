"""``python -m infomax_ext benchmark``: estimate_mi on closed-form MI tasks, against the truth.

The tasks are those of the "Beyond Normal" benchmark whose MI is known in closed form
(``mi_tasks.py``); every estimator of the library runs through :func:`infomax_ext.estimate_mi`
on the same samples. Printed: a table of estimate vs truth with the error and the time;
written to ``--out``: ``mi_benchmark.csv`` and ``mi_benchmark.png`` (a heat map of the
estimates, tasks by estimators, coloured by the error, the paper's layout).

The default run is a quick one (four tasks, 2000 pairs, one split, short training: about
two minutes on two cores); ``--full`` runs every task at 5000 pairs with estimate_mi's
defaults (hours on a CPU); every setting has its own flag.

``--bmi-python PY`` runs the benchmark's own package (``benchmark-mi``, import ``bmi``,
installed in another environment: it pins an old jax) under the interpreter PY: its task
samplers draw the samples both sides then estimate on, and its neural estimators
(InfoNCE, NWJ, DV with their defaults) are timed beside ours. The library never imports it.
"""
import argparse
import csv
import json
import math
import os
import subprocess
import sys
import time
import warnings

import torch

from ..mi import ESTIMATORS, estimate_mi
from .common import DEFAULT_OUT, format_table, num_threads, out_dir, progress
from .mi_tasks import FULL_TASKS, QUICK_TASKS, task

BMI_ESTIMATORS = ("infonce", "nwj", "dv")
QUICK = dict(n=2000, steps=400, folds=1, eval_every=25, patience=8)
FULL = dict(n=5000, steps=None, folds=None, eval_every=None, patience=None)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m infomax_ext benchmark", description=__doc__.split("\n\n")[0])
    p.add_argument("--full", action="store_true",
                   help="every closed-form task, 5000 pairs, estimate_mi's defaults (5 folds, up to 4000 steps)")
    p.add_argument("--tasks", nargs="+", default=None, metavar="NAME",
                   help=f"task names (default: the quick four, or all {len(FULL_TASKS)} with --full); "
                        "e.g. 1v1-normal-0.75 half_cube-multinormal-sparse-5-5-2-2.0")
    p.add_argument("--estimators", nargs="+", default=list(ESTIMATORS), choices=ESTIMATORS, metavar="EST",
                   help=f"estimate_mi estimators (default: all: {' '.join(ESTIMATORS)})")
    p.add_argument("--n", type=int, default=None, help="pairs per task (quick 2000, full 5000)")
    p.add_argument("--steps", type=int, default=None, help="most training steps (quick 400; full: estimate_mi's)")
    p.add_argument("--folds", type=int, default=None, help="estimate_mi folds (quick 1; full: estimate_mi's)")
    p.add_argument("--critic", default=None, help="estimate_mi critic (default: estimate_mi's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the samples and of estimate_mi")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: fastest for small MLPs)")
    p.add_argument("--out", default=os.path.join(DEFAULT_OUT, "mi_benchmark"), help="output folder")
    p.add_argument("--bmi-python", default=None, metavar="PY",
                   help="a Python with benchmark-mi installed: draw the samples with its task samplers and "
                        "run its InfoNCE, NWJ and DV (defaults) on them")
    p.add_argument("--bmi-estimators", nargs="*", default=list(BMI_ESTIMATORS), choices=BMI_ESTIMATORS)
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def settings(args):
    """The estimate_mi keyword arguments and the sample size of this run."""
    base = FULL if args.full else QUICK
    n = args.n or base["n"]
    kw = {k: v for k, v in base.items() if k != "n" and v is not None}
    for k in ("steps", "folds"):
        if getattr(args, k) is not None:
            kw[k] = getattr(args, k)
    if args.critic:
        kw["critic"] = args.critic
    return n, kw


def run_bmi(python, names, n, seed, estimators, folder):
    """Runs ``bmi_side.py`` under ``python``; returns its JSON (samples are left in ``folder``)."""
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bmi_side.py")
    cmd = [python, script, "--out", folder, "--n", str(n), "--seed", str(seed), "--tasks", *names,
           "--estimators", *estimators]
    print(f"benchmark-mi: {len(names)} task(s) x {len(estimators)} estimator(s) under {python} ...", flush=True)
    subprocess.run(cmd, check=True)
    with open(os.path.join(folder, "bmi.json")) as f:
        return json.load(f)


def load_samples(folder, name):
    import numpy as np

    path = os.path.join(folder, f"{name}.npz")
    if not os.path.exists(path):
        return None
    d = np.load(path)
    return torch.from_numpy(d["x"]), torch.from_numpy(d["y"])


def heatmap(rows, methods, path, title):
    """Tasks (rows) by methods (columns): the estimate written in each cell, the colour its
    error; a first column holds the true MI."""
    from .plotting import _plt

    plt = _plt()
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    truth = {r["task"]: r["true_mi"] for r in rows}
    est = {(r["task"], r["method"]): r["estimate"] for r in rows}
    err = torch.full((len(tasks), len(methods) + 1), math.nan)
    for i, t in enumerate(tasks):
        err[i, 0] = 0.0
        for j, m in enumerate(methods):
            if (t, m) in est and math.isfinite(est[(t, m)]):
                err[i, j + 1] = est[(t, m)] - truth[t]
    lim = max(0.1, float(torch.nan_to_num(err.abs(), nan=0.0).max()))
    fig, ax = plt.subplots(figsize=(3.5 + 0.8 * (len(methods) + 1), 1.0 + 0.32 * len(tasks)))
    im = ax.imshow(err.clamp(-lim, lim).numpy(), cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto")
    for i, t in enumerate(tasks):
        ax.text(0, i, f"{truth[t]:.2f}", ha="center", va="center", fontsize=7, weight="bold")
        for j, m in enumerate(methods):
            v = est.get((t, m), math.nan)
            ax.text(j + 1, i, "-" if not math.isfinite(v) else f"{v:.2f}", ha="center", va="center", fontsize=7)
    ax.set_xticks(range(len(methods) + 1), ["true MI"] + list(methods), rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(len(tasks)), tasks, fontsize=7)
    ax.set_title(title, fontsize=8)
    fig.colorbar(im, ax=ax, label="error (nats)", fraction=0.04)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None):
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    names = args.tasks or list(FULL_TASKS if args.full else QUICK_TASKS)
    tasks = [task(name) for name in names]  # unknown names fail before any work
    n, kw = settings(args)
    out = out_dir(args.out)
    t_start = time.perf_counter()

    bmi = None
    if args.bmi_python:
        bmi = run_bmi(args.bmi_python, names, n, args.seed, args.bmi_estimators, os.path.join(out, "samples"))

    desc = ", ".join(f"{k}={v}" for k, v in kw.items()) or "estimate_mi's defaults"
    print(f"MI benchmark: {len(tasks)} task(s), {n} pairs each, estimators {' '.join(args.estimators)}; "
          f"estimate_mi({desc}); {args.threads} thread(s)")
    rows = []
    bar = progress(len(tasks) * len(args.estimators), "benchmark", disable=args.no_progress)
    with num_threads(args.threads):
        for t in tasks:
            samples = load_samples(os.path.join(out, "samples"), t.name) if bmi else None
            source = "benchmark-mi" if samples is not None else "mi_tasks"
            x, y = samples if samples is not None else t.sample(n, args.seed)
            for e in args.estimators:
                t0 = time.perf_counter()
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    r = estimate_mi(x.float(), y.float(), e, seed=args.seed, progress=False, **kw)
                rows.append(dict(task=t.name, dim_x=t.dim_x, dim_y=t.dim_y, true_mi=t.mutual_information,
                                 method=e, estimate=r.estimate, std=r.std,
                                 error=r.estimate - t.mutual_information, seconds=time.perf_counter() - t0,
                                 n=len(x), samples=source, overfit_warning=bool(caught)))
                bar.update(1)
                bar.set_postfix_str(f"{t.name[:24]} {e}: {r.estimate:.2f}")
            if bmi and t.name in bmi["tasks"] and "estimators" in bmi["tasks"][t.name]:
                rec = bmi["tasks"][t.name]
                if abs(rec["mi"] - t.mutual_information) > 1e-6:
                    print(f"WARNING: {t.name}: true MI {t.mutual_information:.6f} here, {rec['mi']:.6f} in "
                          "benchmark-mi", file=sys.stderr)
                for e, v in rec["estimators"].items():
                    rows.append(dict(task=t.name, dim_x=t.dim_x, dim_y=t.dim_y, true_mi=t.mutual_information,
                                     method=f"bmi-{e}", estimate=v["estimate"], std=math.nan,
                                     error=v["estimate"] - t.mutual_information, seconds=v["seconds"],
                                     n=len(x), samples=source, overfit_warning=False))
    bar.close()

    header = ["task", "true MI", "method", "estimate", "std", "error", "seconds"]
    table = [[r["task"], r["true_mi"], r["method"], r["estimate"], r["std"], r["error"], r["seconds"]]
             for r in rows]
    print(format_table(header, table, fmt={"std": "{:.3f}", "error": "{:+.3f}", "seconds": "{:.1f}"}))
    print("(std: bootstrap over the test pairs, critic fixed; error = estimate - true MI)")
    mean_abs = {}
    for r in rows:
        mean_abs.setdefault(r["method"], []).append(abs(r["error"]))
    print("mean |error| per method: " + ", ".join(f"{m} {sum(v) / len(v):.3f}" for m, v in mean_abs.items()))

    csv_path = os.path.join(out, "mi_benchmark.csv")
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]) + ["seed", "settings"])
        w.writeheader()
        for r in rows:
            w.writerow({**r, "seed": args.seed, "settings": desc if not r["method"].startswith("bmi-")
                        else "benchmark-mi defaults"})
    print(f"wrote {csv_path}")
    if not args.no_plot:
        methods = list(dict.fromkeys(r["method"] for r in rows))
        png = heatmap(rows, methods, os.path.join(out, "mi_benchmark.png"),
                      f"estimate vs true MI, {n} pairs")
        print(f"wrote {png}")
    print(f"total {time.perf_counter() - t_start:.0f} s")
    return 0
