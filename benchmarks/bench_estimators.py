"""Every estimator: fused vs the materialising reference, eager and under torch.compile.

For each estimator (infonce, infonce_symmetric, nwj, tuba, dv, mine, js, js_objective,
smile, uniformity, alignment), implementation (``fused``: ``infomax_ext.<estimator>``;
``reference``: ``reference.<estimator>`` on the materialised S; ``reference+compile``:
that under ``torch.compile(dynamic=False)``), size K = M, feature size d, dtype and pass
(``fwd``: inputs without gradients, the evaluation of a bound; ``fwd+bwd``: forward and
backward to the inputs), one pytest-benchmark case. The inputs are L2-normalised with
correlated positives, ``S = 10 <a_i, b_j>`` (cosine / temperature 0.1). Each case's
first call (warm-up, compilation) is checked against the reference in float64
(float32 above K = 4096; uniformity against the float64 matmul form, since
``reference.uniformity`` holds K x K x d) before anything is timed. Cases whose
materialised tensors would not fit (``BENCH_MAX_GIB``) are skipped with the reason.

    .venv/bin/python -m pytest benchmarks/bench_estimators.py --benchmark-only         # default grid
    BENCH_FULL=1 .venv/bin/python -m pytest benchmarks/bench_estimators.py --benchmark-only
    BENCH_ESTIMATORS=infonce,nwj BENCH_SIZES=4096 .venv/bin/python -m pytest benchmarks/bench_estimators.py \
        --benchmark-only                                                  # one axis at a time
    .venv/bin/python benchmarks/bench_estimators.py --estimators infonce nwj --sizes 4096   # table, fresh processes

Default grid: every estimator and implementation, d = 128, float32, fwd+bwd at K in
{1024, 4096} and fwd at K = 4096, plus infonce in bfloat16 at K = 4096 (fwd+bwd). Full grid
(``BENCH_FULL=1``): K in {256, 1024, 4096, 16384}, d in {32, 128, 512}, float32 and
bfloat16. The pytest table's peak memory comes from ``_common.run_benchmark``; see
benchmarks/README.md.
"""
import argparse
import math
import os

import pytest
import torch
import torch.nn.functional as F

import _common
import infomax_ext as ie
from infomax_ext import bench
from infomax_ext import reference as ref
from infomax_ext.bench import uniformity_matmul

SCALE = 10.0
TAU = 5.0
T = 2.0
IMPLS = ["fused", "reference", "reference+compile"]
PASSES = {"fwd": False, "fwd+bwd": True}


def _S(a, b):
    return ref.scores_dot(a, b, SCALE)


def _baseline(a):
    return torch.full((a.shape[0],), 0.5, dtype=a.dtype, device=a.device)


# name: (inputs kind, fused, reference, oracle (None: the reference itself))
#   kinds: "pair" (a, b: (K, d) views), "single" (x), "aligned" (x, y)
ESTIMATORS = {
    "infonce": ("pair", lambda a, b: ie.infonce(a, b, SCALE), lambda a, b: ref.infonce(_S(a, b)), None),
    "infonce_symmetric": ("pair", lambda a, b: ie.infonce_symmetric(a, b, SCALE),
                          lambda a, b: ref.infonce_symmetric(_S(a, b)), None),
    "nwj": ("pair", lambda a, b: ie.nwj(a, b, SCALE), lambda a, b: ref.nwj(_S(a, b)), None),
    "tuba": ("pair", lambda a, b: ie.tuba(a, b, _baseline(a), SCALE),
             lambda a, b: ref.tuba(_S(a, b), _baseline(a)), None),
    "dv": ("pair", lambda a, b: ie.dv(a, b, SCALE), lambda a, b: ref.dv(_S(a, b)), None),
    "mine": ("pair", lambda a, b: ie.mine(a, b, None, 0.9, SCALE)[0],
             lambda a, b: ref.mine(_S(a, b), None, 0.9)[0], None),
    "js": ("pair", lambda a, b: ie.js(a, b, SCALE), lambda a, b: ref.js(_S(a, b)), None),
    "js_objective": ("pair", lambda a, b: ie.js_objective(a, b, SCALE),
                     lambda a, b: ref.js_objective(_S(a, b)), None),
    "smile": ("pair", lambda a, b: ie.smile(a, b, TAU, SCALE), lambda a, b: ref.smile(_S(a, b), TAU), None),
    "uniformity": ("single", lambda x: ie.uniformity(x, T), lambda x: ref.uniformity(x, T),
                   lambda x: uniformity_matmul(x, T)),
    "alignment": ("aligned", lambda x, y: ie.alignment(x, y), lambda x, y: ref.alignment(x, y), None),
}


def reference_bytes(estimator, K, d, backward):
    """Rough memory of the materialising reference (the skip guard)."""
    if estimator == "alignment":
        return 8 * K * d * 4
    if estimator == "uniformity":
        return K * K * d * 4 * (4 if backward else 2)  # NB: reference.uniformity holds (K, K, d)
    return K * K * 4 * (10 if backward else 4)


def make_inputs(estimator, K, d, dtype="float32", backward=True, seed=0, device=None):
    """The leaf inputs of ``estimator`` (normalised, correlated positives), deterministic in ``seed``."""
    g = torch.Generator().manual_seed(seed)
    a = F.normalize(torch.randn(K, d, generator=g, dtype=torch.float64), dim=1)
    kind = ESTIMATORS[estimator][0]
    xs = [a] if kind == "single" else [a, F.normalize(a + 0.5 * torch.randn(K, d, generator=g,
                                                                             dtype=torch.float64), dim=1)]
    dt = getattr(torch, dtype)
    return [x.to(device=device or _common.DEVICE, dtype=dt).requires_grad_(backward) for x in xs]


def implementation(estimator, impl):
    kind, fused, reference, _ = ESTIMATORS[estimator]
    if impl == "fused":
        return fused
    if impl == "reference":
        return reference
    if impl == "reference+compile":
        # NB: a fresh dynamo cache per case: with dynamic=False every shape, dtype and
        # grad mode is one more graph, past the per-function recompile limit otherwise.
        torch._dynamo.reset()
        return torch.compile(reference, dynamic=False)
    raise ValueError(f"unknown implementation {impl!r}; choose from {IMPLS}")


def make_case(estimator, impl, K, d=128, dtype="float32", backward=True, seed=0):
    """A zero-argument callable: one forward (+ backward) of ``impl`` on ``estimator``.

    Returns the detached value; ``run.inputs`` are the leaf tensors (their ``.grad`` after
    a fwd+bwd call); ``run.check(out)`` compares a result with the float64 oracle.
    """
    inputs = make_inputs(estimator, K, d, dtype, backward, seed)
    fn = implementation(estimator, impl)
    ie.use_reference(False)

    run = bench.step(fn, inputs, backward, after=_common.sync)

    def check(out):
        exp, grads = expected(estimator, K, d, dtype, backward, seed)
        got = [x.grad for x in inputs] if backward else []

        return bench.compare(out, got, exp, grads, bench.tolerance(dtype))

    run.inputs, run.check = inputs, check
    return run


_oracle_cache = {}


def expected(estimator, K, d, dtype, backward, seed=0):
    """The oracle of one case: the reference (or the uniformity matmul form) in float64
    (float32 above K = 4096) on the upcast inputs. Cached for the latest case only."""
    key = (estimator, K, d, dtype, backward, seed)
    if key not in _oracle_cache:
        _oracle_cache.clear()
        _, _, reference, oracle_fn = ESTIMATORS[estimator]
        inputs = make_inputs(estimator, K, d, dtype, backward, seed)
        acc = torch.float64 if K <= 4096 else torch.float32
        _oracle_cache[key] = _common.oracle(oracle_fn or reference, inputs, backward, acc)
    return _oracle_cache[key]


def _grid():
    """[(estimator, pass, K, d, dtype)] of this run."""
    if _common.FULL:
        sizes, dims, dtypes = [256, 1024, 4096, 16384], [32, 128, 512], ["float32", "bfloat16"]
    else:
        sizes, dims, dtypes = [1024, 4096], [128], ["float32"]
    ests = _common.env_list("BENCH_ESTIMATORS", ESTIMATORS)
    sizes = _common.env_list("BENCH_SIZES", sizes, int)
    dims = _common.env_list("BENCH_DIMS", dims, int)
    dtypes = _common.env_list("BENCH_DTYPES", dtypes)
    passes = _common.env_list("BENCH_PASSES", PASSES)
    grid = [(e, p, K, d, dt) for e in ests for dt in dtypes for d in dims for K in sizes for p in passes]
    if not _common.FULL and not any(k in os.environ for k in ("BENCH_DTYPES", "BENCH_SIZES", "BENCH_DIMS",
                                                               "BENCH_PASSES")):
        # NB: the default keeps the forward pass at the largest K only, and adds one
        # low-precision case, to finish in minutes.
        grid = [c for c in grid if c[1] == "fwd+bwd" or c[2] == max(sizes)]
        if "infonce" in ests:
            grid.append(("infonce", "fwd+bwd", 4096, 128, "bfloat16"))
    return grid


CASES = [pytest.param(e, p, K, d, dt, impl, id=f"{e}-{p}-K{K}-d{d}-{dt}-{impl}")
         for (e, p, K, d, dt) in _grid() for impl in _common.env_list("BENCH_IMPLS", IMPLS)]


@pytest.mark.parametrize("estimator, pass_, K, d, dtype, impl", CASES)
def test_estimator(benchmark, estimator, pass_, K, d, dtype, impl):
    backward = PASSES[pass_]
    benchmark.group = f"estimator {estimator} {pass_} K=M={K} d={d} {dtype}"
    if impl != "fused":
        _common.skip_if_too_big(reference_bytes(estimator, K, d, backward), f"{impl} {estimator}")
    run = make_case(estimator, impl, K, d, dtype, backward)
    _common.checked_first_call(run, f"{estimator} {impl} {pass_} K={K} d={d} {dtype}", impl, dtype)
    _common.run_benchmark(benchmark, run, impl, estimator=estimator, K=K, d=d, dtype=dtype, pass_=pass_)


def main(argv=None):

    p = argparse.ArgumentParser(description="estimators: time and peak memory, fused vs reference, "
                                            "one fresh process per case")
    p.add_argument("--estimators", nargs="+", default=list(ESTIMATORS), choices=list(ESTIMATORS))
    p.add_argument("--sizes", type=int, nargs="+", default=[4096])
    p.add_argument("--d", type=int, default=128)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--forward-only", action="store_true")
    p.add_argument("--impls", nargs="+", default=["fused", "reference"], choices=IMPLS)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    pass_ = "fwd" if args.forward_only else "fwd+bwd"
    print(f"estimators {pass_}, d={args.d}, {args.dtype}, {torch.get_num_threads()} threads, torch "
          f"{torch.__version__}; peak = extra resident memory of one call in a fresh process")
    print(f"{'estimator':>17} | {'K=M':>6} | {'impl':>17} | {'median ms':>10} | {'peak MiB':>9} | "
          f"{'fused/ref time':>14} | {'fused/ref peak':>14} | check")
    for est in args.estimators:
        for K in args.sizes:
            rows = {i: _common.measure("bench_estimators", dict(estimator=est, impl=i, K=K, d=args.d,
                                                             dtype=args.dtype, backward=not args.forward_only),
                                    args.repeats) for i in args.impls}
            base, fused = rows.get("reference", {}), rows.get("fused", {})
            for impl, r in rows.items():
                if "error" in r:
                    print(f"{est:>17} | {K:>6} | {impl:>17} | failed: {r['error'][:80]}")
                    continue
                tr = fused["time_s"] / base["time_s"] if "time_s" in base and "time_s" in fused else math.nan
                pr = (fused["peak_bytes"] / base["peak_bytes"]
                      if base.get("peak_bytes") and "peak_bytes" in fused else math.nan)
                print(f"{est:>17} | {K:>6} | {impl:>17} | {r['time_s'] * 1e3:10.1f} | "
                      f"{r['peak_bytes'] / 2**20:9.1f} | {tr:14.3f} | {pr:14.4f} | {r['check']}")


if __name__ == "__main__":
    main()
