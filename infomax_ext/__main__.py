"""``python -m infomax_ext [command] [options]``: the project's main job (see ``USAGE``)."""
import sys

USAGE = """usage: python -m infomax_ext [command] [options]

commands (--help after any of them lists its options):
  (none)              the tour, about a minute on 2 CPU cores: every estimator with the
                      optimal critic on correlated Gaussians, a short trained-critic
                      estimation run, and fused vs reference time and memory; tables
                      printed, plots written to infomax_out/
  estimate            the MI staircase of Poole et al. and Song & Ermon (d = 20, 2 to 10
                      nats): the estimate per step against the truth, and bias, variance
                      and MSE per estimator (CSV and plots)
  represent           Tschannen et al.'s two-view experiment on MNIST (default) or 8x8
                      digits with a linear probe
  experiments NAME    the follow-up experiments of the MI-maximisation study: alignuniform,
                      jacobian, threshold, invertible
  bench               the benchmark report: fused ops against what a user would write
                      otherwise (time and peak memory against K; CSV and plot)
  benchmark           estimate_mi on the closed-form tasks of the "Beyond Normal" MI
                      benchmark, every estimator against the truth (table, CSV, heat map;
                      --full, --bmi-python)
"""
COMMANDS = ("tour", "estimate", "represent", "experiments", "bench", "benchmark")


def _usage():
    return USAGE


def bench(argv):
    """``python -m infomax_ext bench [args]``: ``infomax_ext.bench.main(args)``, imported lazily."""
    import importlib

    try:
        mod = importlib.import_module("infomax_ext.bench")
    except ModuleNotFoundError as e:
        # NB: only a missing infomax_ext.bench itself is reported this way; a dependency
        # missing inside that module is raised as it is.
        if e.name != "infomax_ext.bench":
            raise
        print("python -m infomax_ext bench: the benchmark module infomax_ext/bench.py is not in this "
              "checkout.\nMeanwhile: .venv/bin/python benchmarks/bench_infonce.py --sizes 4096 16384",
              file=sys.stderr)
        return 2
    rc = mod.main(list(argv))
    return rc if isinstance(rc, int) else 0


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    cmd = argv[0] if argv and argv[0] in COMMANDS else None
    rest = argv[1:] if cmd else argv
    if cmd == "bench":
        return bench(rest)
    if cmd is None and argv and not argv[0].startswith("-"):
        print(f"unknown command {argv[0]!r}\n{_usage()}", file=sys.stderr)
        return 2
    if cmd == "benchmark":
        from .experiments import mi_benchmark

        return mi_benchmark.main(rest)
    if cmd == "estimate":
        from .experiments import gaussian

        return gaussian.main(rest)
    if cmd == "represent":
        from .experiments import represent

        return represent.main(rest)
    if cmd == "experiments":
        from .experiments import seed

        return seed.main(rest)
    from .experiments import tour

    return tour.main(rest, commands=_usage())


if __name__ == "__main__":
    sys.exit(main())
