"""Fused vs reference: InfoNCE forward+backward time and peak memory.

Each (implementation, K) case runs in a **fresh Python process** (the approach of
``benchmarks/peak.py``): the inputs are allocated, one warm-up call is made (one-time
thread-pool and allocator set-up) and its freed heap returned to the OS (``malloc_trim``),
the resident set is read, one more call is
made, and the extra peak is the peak resident set minus that resident set; then the call is timed
``repeats`` times (median). A fresh process per case keeps one case's allocations out of
another's peak. The peak is the kernel's ``VmHWM``, reset just before the call through
``/proc/self/clear_refs`` (Linux); elsewhere ``ru_maxrss``, whose mark includes the
imports, so small peaks read as 0 there. The fused op's extra memory is O((K + M) d)
plus its tiles and the thread pool's buffers; the table therefore also gives the analytic size of one float32 score matrix,
``K * M * 4`` bytes, which the reference materialises (its backward holds several).

Run alone: ``python -m infomax_ext.experiments.speed --sizes 1024 4096``.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

SCALE = 0.1


def _current_rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _trim():
    """Returns freed heap to the OS (glibc ``malloc_trim``), so the warm-up's freed blocks do
    not hide the measured call's allocations; a no-op elsewhere."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_peak():
    """Resets the kernel's peak-RSS mark (``VmHWM``); True if it could.

    NB: ``ru_maxrss`` alone is wrong in a child process: the mark survives fork/vfork and
    exec, so a child of a big parent reports the parent's size as its own peak.
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss(reset):
    if reset:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def make_case(impl, K, d=128, seed=0):
    """A zero-argument callable: one InfoNCE forward+backward of ``impl`` on (K, d) x (K, d)."""
    from .. import estimators as est
    from .. import reference as ref

    g = torch.Generator().manual_seed(seed)
    a = torch.randn(K, d, generator=g).requires_grad_()
    b = torch.randn(K, d, generator=g).requires_grad_()
    if impl == "fused":
        fn = lambda: est.infonce(a, b, SCALE)  # noqa: E731
    elif impl == "reference":
        fn = lambda: ref.infonce(ref.scores_dot(a, b, SCALE))  # noqa: E731
    else:
        raise ValueError(f"unknown impl {impl!r}")

    def run():
        a.grad = b.grad = None
        fn().backward()

    return run


def time_case(impl, K, d=128, repeats=3, memory=True):
    """(median seconds, extra peak bytes or None) measured in this process."""
    fn = make_case(impl, K, d)
    fn()  # warm-up: thread pools, allocator arenas
    if memory:
        _trim()
    reset = _reset_peak() if memory else False
    base = _current_rss()
    fn()  # the measured peak
    peak = max(_peak_rss(reset) - base, 0) if memory else None
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), peak


def measure(impl, K, d=128, repeats=3, threads=0):
    """Runs :func:`time_case` in a fresh process; dict(time_s, peak_bytes) or dict(error)."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    cmd = [sys.executable, "-m", "infomax_ext.experiments.speed", "--child", impl, str(K), str(d), str(repeats),
           str(threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        err = out.stderr.strip().splitlines()
        return {"error": err[-1] if err else f"exit {out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def compare(sizes=(1024, 2048, 4096), d=128, repeats=3, memory=True, threads=0, bar=None):
    """Rows dict(impl, K, time_ms, peak_mib, s_mib) for fused and reference at each K.

    ``memory=False`` times in this process (no subprocesses; ``peak_mib`` None).
    """
    rows = []
    for K in sizes:
        for impl in ("fused", "reference"):
            if memory:
                r = measure(impl, K, d, repeats, threads)
            else:
                t, _ = time_case(impl, K, d, repeats, memory=False)
                r = {"time_s": t, "peak_bytes": None}
            if "error" in r:
                rows.append(dict(impl=impl, K=K, time_ms=float("nan"), peak_mib=None, s_mib=K * K * 4 / 2**20,
                                 error=r["error"]))
            else:
                rows.append(dict(impl=impl, K=K, time_ms=r["time_s"] * 1e3,
                                 peak_mib=None if r["peak_bytes"] is None else r["peak_bytes"] / 2**20,
                                 s_mib=K * K * 4 / 2**20))
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


def _child(argv):
    impl, K, d, repeats, threads = argv[0], int(argv[1]), int(argv[2]), int(argv[3]), int(argv[4])
    if threads:
        torch.set_num_threads(threads)
    t, p = time_case(impl, K, d, repeats)
    print(json.dumps({"time_s": t, "peak_bytes": p}))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child":
        return _child(argv[1:])
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096])
    p.add_argument("--d", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args(argv)
    print(table(compare(a.sizes, a.d, a.repeats)))


if __name__ == "__main__":
    sys.exit(main())
