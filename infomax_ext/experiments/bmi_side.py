"""The benchmark-mi side of ``python -m infomax_ext benchmark --bmi-python PY``.

Run by path under an interpreter that has ``benchmark-mi`` (import ``bmi``) and its
pinned jax; it imports neither torch nor infomax_ext. For each named task it draws
the samples with the task's own sampler, runs bmi's neural estimators with their
defaults on them, and writes

- ``OUT/<task>.npz``: ``x``, ``y`` (the samples both sides estimate on);
- ``OUT/bmi.json``: per task, the true MI bmi states and per estimator
  ``{"estimate", "seconds"}``.

Usage: ``PY bmi_side.py --out DIR --n 5000 --seed 0 --tasks NAME ... [--estimators infonce nwj dv]``
"""
import argparse
import json
import os
import sys
import time

# One CPU thread for XLA, as for torch on the other side (set before jax loads).
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--n", type=int, default=5000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tasks", nargs="+", required=True)
    p.add_argument("--estimators", nargs="*", default=["infonce", "nwj", "dv"])
    args = p.parse_args(argv)

    import numpy as np
    from bmi.benchmark import BENCHMARK_TASKS
    import bmi.estimators as be

    makers = {"infonce": be.InfoNCEEstimator, "nwj": be.NWJEstimator, "dv": be.DonskerVaradhanEstimator}
    os.makedirs(args.out, exist_ok=True)
    out = {"n": args.n, "seed": args.seed, "tasks": {}}
    for name in args.tasks:
        if name not in BENCHMARK_TASKS:
            out["tasks"][name] = {"error": "not a bmi task"}
            continue
        task = BENCHMARK_TASKS[name]
        x, y = task.sample(args.n, seed=args.seed)
        x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
        np.savez(os.path.join(args.out, f"{name}.npz"), x=x, y=y)
        rec = {"mi": float(task.mutual_information), "estimators": {}}
        for est in args.estimators:
            t0 = time.perf_counter()
            value = float(makers[est](verbose=False).estimate(x, y))
            rec["estimators"][est] = {"estimate": value, "seconds": time.perf_counter() - t0}
            print(f"bmi {name} {est}: {value:.3f} ({rec['estimators'][est]['seconds']:.1f} s)",
                  file=sys.stderr, flush=True)
        out["tasks"][name] = rec
        with open(os.path.join(args.out, "bmi.json"), "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
