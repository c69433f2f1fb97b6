"""Fused vs reference: InfoNCE forward+backward time and peak memory.

Measured by ``infomax_ext.bench``, the one benchmark harness: each (implementation, K)
case runs in a **fresh Python process**, so one case's allocations stay out of
another's peak. Per case: one warm-up call (thread pools, allocator arenas), then the
peak extra memory of one call (the process's peak resident set during the call minus
the resident set just before it, freed heap returned to the OS and the kernel's peak
mark reset first; on CUDA, allocator statistics), then the median of ``repeats``
timed calls. The fused op's extra memory is O((K + M) d) plus its tiles and the
thread pool's buffers; the table therefore also gives the analytic size of one
float32 score matrix, ``K * M * 4`` bytes, which the reference materialises (its
backward holds several).

Run alone: ``python -m infomax_ext.experiments.speed --sizes 1024 4096``.
"""
import argparse
import sys

import torch

import infomax_ext as ie
from infomax_ext import bench

SCALE = 0.1


def make_case(impl, K, d=128, seed=0):
    """A zero-argument callable: one InfoNCE forward+backward of ``impl`` on (K, d) x (K, d)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(K, d, generator=g).requires_grad_()
    b = torch.randn(K, d, generator=g).requires_grad_()
    if impl == "fused":
        fn = lambda a, b: ie.infonce(a, b, SCALE)  # noqa: E731
    elif impl == "reference":
        fn = lambda a, b: ie.reference.infonce(ie.reference.scores_dot(a, b, SCALE))  # noqa: E731
    else:
        raise ValueError(f"unknown impl {impl!r}")
    return bench.step(fn, [a, b])


def compare(sizes=(1024, 2048, 4096), d=128, repeats=3, memory=True, threads=0, bar=None):
    """Rows dict(impl, K, time_ms, peak_mib, s_mib) for fused and reference at each K.

    ``memory=False`` times in this process (no subprocesses; ``peak_mib`` None).
    """
    rows = []
    for K in sizes:
        for impl in ("fused", "reference"):
            case = dict(impl=impl, K=K, d=d)
            if memory:
                # NB: the measuring process reads OMP_NUM_THREADS when torch starts.
                env = {"OMP_NUM_THREADS": str(threads)} if threads else None
                r = bench.measure("infomax_ext.experiments.speed:make_case", case, repeats=repeats, env=env)
            else:
                r = dict(bench.time_and_peak(make_case(**case), repeats=repeats), peak_bytes=None)
            row = dict(impl=impl, K=K, time_ms=float("nan"), peak_mib=None, s_mib=K * K * 4 / 2**20)
            if "error" in r:
                row["error"] = r["error"]
            else:
                row["time_ms"] = r["time_s"] * 1e3
                row["peak_mib"] = None if r["peak_bytes"] is None else r["peak_bytes"] / 2**20
            rows.append(row)
            if bar is not None:
                bar.update(1)
    return rows


def table(rows, markdown=False):
    from .common import format_table, markdown_table

    header = ["K=M", "impl", "fwd+bwd ms", "peak extra MiB (measured)", "one S = K*M*4 (MiB)", "time / ref"]
    ref_t = {r["K"]: r["time_ms"] for r in rows if r["impl"] == "reference"}
    body = []
    for r in rows:
        peak = "-" if r["peak_mib"] is None else f"{r['peak_mib']:.1f}"
        body.append([str(r["K"]), r["impl"], f"{r['time_ms']:.1f}", peak, f"{r['s_mib']:.0f}",
                     f"{r['time_ms'] / ref_t[r['K']]:.2f}" if r["K"] in ref_t else "-"])
    return (markdown_table if markdown else format_table)(header, body)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096])
    p.add_argument("--d", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args(argv)
    print(table(compare(a.sizes, a.d, a.repeats)))


if __name__ == "__main__":
    sys.exit(main())
