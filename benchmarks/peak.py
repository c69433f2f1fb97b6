"""Time and peak memory of one benchmark case, measured in a fresh subprocess.

Peak memory is the process's peak resident set (``ru_maxrss``, or
``torch.cuda.max_memory_allocated`` on CUDA) minus the resident set just before
the measured call, with the inputs already allocated: the extra memory the call
needs. A fresh process per case keeps one case's allocations out of another's.
"""
import json
import os
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def current_rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_case(make, repeats):
    """make() -> a zero-argument callable; returns (median seconds, extra peak bytes)."""
    import torch

    fn = make()
    cuda = torch.cuda.is_available() and os.environ.get("BENCH_DEVICE") == "cuda"
    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = current_rss()
    fn()  # first call: peak memory (and warm-up)
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), max(peak, 0)


def measure(module, case, repeats=3, env=None):
    """Runs ``module.make_case(**case)`` in a subprocess; returns dict(time_s, peak_bytes)."""
    code = (
        "import json, sys; sys.path[:0] = [%r, %r]\n"
        "import peak, %s as m\n"
        "t, p = peak.run_case(lambda: m.make_case(**json.loads(sys.argv[1])), %d)\n"
        "print(json.dumps({'time_s': t, 'peak_bytes': p}))\n"
    ) % (ROOT, os.path.join(ROOT, "benchmarks"), module, repeats)
    out = subprocess.run([sys.executable, "-c", code, json.dumps(case)], capture_output=True, text=True,
                         env=dict(os.environ, **(env or {})))
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "failed"}
    return json.loads(out.stdout.strip().splitlines()[-1])
