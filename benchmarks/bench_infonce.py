"""InfoNCE forward+backward: fused op vs the materialising reference (eager and compiled).

pytest-benchmark suite:   .venv/bin/python -m pytest benchmarks/bench_infonce.py --benchmark-only
Memory table (one run):   .venv/bin/python benchmarks/bench_infonce.py [--sizes 4096 16384]
"""
import argparse
import math

import pytest
import torch

import infomax_ext as ie
from infomax_ext import reference as ref

SCALE = 0.1


def reference_infonce(a, b):
    return ref.infonce(ref.scores_dot(a, b, SCALE))


_compiled = {}


def implementation(name):
    if name == "fused":
        return lambda a, b: ie.infonce(a, b, SCALE)
    if name == "reference":
        return reference_infonce
    if name == "reference+compile":
        if "fn" not in _compiled:
            _compiled["fn"] = torch.compile(reference_infonce)
        return _compiled["fn"]
    raise ValueError(name)


def make_case(impl, K, d, dtype="float32", backward=True, seed=0):
    """A zero-argument callable running one forward (+ backward) of ``impl``."""
    g = torch.Generator().manual_seed(seed)
    dt = getattr(torch, dtype)
    a = torch.randn(K, d, generator=g).to(dt).requires_grad_()
    b = torch.randn(K, d, generator=g).to(dt).requires_grad_()
    fn = implementation(impl)

    def run():
        a.grad = b.grad = None
        out = fn(a, b)
        if backward:
            out.backward()
        return out

    return run


IMPLS = ["fused", "reference", "reference+compile"]


@pytest.mark.parametrize("K", [256, 1024, 4096])
@pytest.mark.parametrize("d", [128])
@pytest.mark.parametrize("impl", IMPLS)
def test_infonce_fwd_bwd(benchmark, impl, K, d):
    benchmark.group = f"infonce fwd+bwd K=M={K} d={d} float32"
    run = make_case(impl, K, d)
    expected = make_case("reference", K, d)()
    torch.testing.assert_close(run(), expected, rtol=1e-4, atol=1e-4)  # correct before timed
    benchmark(run)


def main(argv=None):
    import _common

    p = argparse.ArgumentParser(description="InfoNCE fwd+bwd time and peak memory, fused vs reference")
    p.add_argument("--sizes", type=int, nargs="+", default=[4096, 16384])
    p.add_argument("--d", type=int, default=128)
    p.add_argument("--impls", nargs="+", default=["fused", "reference"])
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    print(f"InfoNCE forward+backward, d={args.d}, float32, {torch.get_num_threads()} threads; "
          "peak = extra resident memory of one call, measured in a fresh process")
    print(f"{'K=M':>6} | {'impl':>18} | {'median ms':>10} | {'peak MiB':>9} | {'time ratio':>10} | {'peak ratio':>10}")
    for K in args.sizes:
        rows = {i: _common.measure("bench_infonce", dict(impl=i, K=K, d=args.d), args.repeats) for i in args.impls}
        base = rows.get("reference", {})
        for impl, r in rows.items():
            if "error" in r:
                print(f"{K:>6} | {impl:>18} | {'failed: ' + r['error'][:60]}")
                continue
            tr = r["time_s"] / base["time_s"] if "time_s" in base else math.nan
            pr = r["peak_bytes"] / base["peak_bytes"] if base.get("peak_bytes") else math.nan
            print(f"{K:>6} | {impl:>18} | {r['time_s'] * 1e3:10.1f} | {r['peak_bytes'] / 2**20:9.1f} | "
                  f"{tr:10.2f} | {pr:10.3f}")


if __name__ == "__main__":
    main()
