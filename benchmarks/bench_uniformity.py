"""Uniformity (Wang & Isola 2020): the fused op vs what users write instead.

``log mean_{i != j} exp(-t |x_i - x_j|^2)``, t = 2, on L2-normalised x (K, d):

  fused              ``infomax_ext.uniformity``: S = 2t x x^T - t|x_i|^2 - t|x_j|^2 reduced
                     without storing it, the diagonal excluded, by ``symmetric_softmax_mean``
                     (upper half of S; the gradient comes out of the forward pass)
  pdist              Wang & Isola's ``torch.pdist(x).pow(2).mul(-t).exp().mean().log()``
                     (``reference.uniformity_pdist``; underflows to -inf for spread points)
  matmul             the matmul + logsumexp form a careful user writes: squared distances
                     from one K x K matmul, diagonal masked, one logsumexp
                     (``infomax_ext.bench.uniformity_matmul``)
  matmul+compile     that form under ``torch.compile(dynamic=False)``
  reference          ``reference.uniformity``: exact differences, holds (K, K, d) (skipped
                     where that does not fit, ``BENCH_MAX_GIB``)

Each case's first call is checked against the matmul form in float64 before timing.

    .venv/bin/python -m pytest benchmarks/bench_uniformity.py --benchmark-only     # K in {1024, 4096}, d = 128
    BENCH_FULL=1 .venv/bin/python -m pytest benchmarks/bench_uniformity.py --benchmark-only
    .venv/bin/python benchmarks/bench_uniformity.py [--sizes 4096 --d 128]          # table, fresh process per case

Full grid: K in {256, 1024, 4096, 16384}, d in {32, 128, 512}, float32 and bfloat16,
fwd and fwd+bwd. The issue-6 CPU target reads off the K = 4096, d = 128 fwd+bwd group:
fused at least 3x faster than pdist and 4x faster than matmul.
"""
import argparse
import math

import pytest
import torch
import torch.nn.functional as F

import _common
import infomax_ext as ie
from infomax_ext import reference as ref
from infomax_ext.bench import uniformity_matmul

T = 2.0
IMPLS = ["fused", "pdist", "matmul", "matmul+compile", "reference"]
PASSES = {"fwd": False, "fwd+bwd": True}


def implementation(impl):
    if impl == "fused":
        return lambda x: ie.uniformity(x, T)
    if impl == "pdist":
        return lambda x: ref.uniformity_pdist(x, T)
    if impl == "matmul":
        return lambda x: uniformity_matmul(x, T)
    if impl == "matmul+compile":
        torch._dynamo.reset()  # NB: one graph per case (see bench_estimators.implementation)
        return torch.compile(uniformity_matmul, dynamic=False)
    if impl == "reference":
        return lambda x: ref.uniformity(x, T)
    raise ValueError(f"unknown implementation {impl!r}; choose from {IMPLS}")


def impl_bytes(impl, K, d, backward):
    """Rough memory of the materialised tensors of ``impl`` (the skip guard)."""
    if impl == "fused":
        return 4 * K * d * 4
    if impl == "reference":
        return K * K * d * 4 * (4 if backward else 2)
    return K * K * 4 * (8 if backward else 4)


def make_case(impl, K, d=128, dtype="float32", backward=True, seed=0):
    """A zero-argument callable: one uniformity forward (+ backward) of ``impl``."""
    g = torch.Generator().manual_seed(seed)
    x0 = F.normalize(torch.randn(K, d, generator=g, dtype=torch.float64), dim=1)
    x = x0.to(device=_common.DEVICE, dtype=getattr(torch, dtype)).requires_grad_(backward)
    fn = implementation(impl)

    def run():
        x.grad = None
        out = fn(x)
        if backward:
            out.backward()
        _common.sync()
        return out.detach()

    def check(out):
        from infomax_ext import bench

        exp, grads = _common.oracle(lambda z: uniformity_matmul(z, T), [x], backward)
        got = [x.grad] if backward else []
        return bench.compare(out, got, exp, grads, bench.tolerance(dtype))

    run.inputs, run.check = [x], check
    return run


def _grid():
    if _common.FULL:
        sizes, dims, dtypes = [256, 1024, 4096, 16384], [32, 128, 512], ["float32", "bfloat16"]
    else:
        sizes, dims, dtypes = [1024, 4096], [128], ["float32"]
    sizes = _common.env_list("BENCH_SIZES", sizes, int)
    dims = _common.env_list("BENCH_DIMS", dims, int)
    dtypes = _common.env_list("BENCH_DTYPES", dtypes)
    passes = _common.env_list("BENCH_PASSES", PASSES)
    impls = _common.env_list("BENCH_IMPLS", IMPLS)
    return [pytest.param(p, K, d, dt, i, id=f"{p}-K{K}-d{d}-{dt}-{i}")
            for dt in dtypes for d in dims for K in sizes for p in passes for i in impls]


@pytest.mark.parametrize("pass_, K, d, dtype, impl", _grid())
def test_uniformity(benchmark, pass_, K, d, dtype, impl):
    backward = PASSES[pass_]
    benchmark.group = f"uniformity {pass_} K={K} d={d} {dtype}"
    _common.skip_if_too_big(impl_bytes(impl, K, d, backward), impl)
    run = make_case(impl, K, d, dtype, backward)
    _common.checked_first_call(run, f"uniformity {impl} {pass_} K={K} d={d} {dtype}", impl, dtype)
    _common.run_benchmark(benchmark, run, impl, baseline="matmul", K=K, d=d, dtype=dtype, pass_=pass_)


def main(argv=None):

    p = argparse.ArgumentParser(description="uniformity: time and peak memory of the fused op and the "
                                            "forms users write, one fresh process per case")
    p.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096])
    p.add_argument("--d", type=int, default=128)
    p.add_argument("--forward-only", action="store_true")
    p.add_argument("--impls", nargs="+", default=["fused", "pdist", "matmul"], choices=IMPLS)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    pass_ = "fwd" if args.forward_only else "fwd+bwd"
    print(f"uniformity {pass_}, t={T}, d={args.d}, float32, normalised inputs, {torch.get_num_threads()} "
          f"threads; peak = extra resident memory of one call in a fresh process")
    print(f"{'K':>6} | {'impl':>15} | {'median ms':>10} | {'peak MiB':>9} | {'fused/this time':>15} | "
          f"{'speed-up of fused':>17} | check")
    for K in args.sizes:
        rows = {i: _common.measure("bench_uniformity", dict(impl=i, K=K, d=args.d, backward=not args.forward_only),
                                args.repeats) for i in args.impls}
        fused = rows.get("fused", {})
        for impl, r in rows.items():
            if "error" in r:
                print(f"{K:>6} | {impl:>15} | failed: {r['error'][:80]}")
                continue
            ratio = fused["time_s"] / r["time_s"] if "time_s" in fused else math.nan
            print(f"{K:>6} | {impl:>15} | {r['time_s'] * 1e3:10.1f} | {r['peak_bytes'] / 2**20:9.1f} | "
                  f"{ratio:15.3f} | {1 / ratio:16.2f}x | {r['check']}")


if __name__ == "__main__":
    main()
