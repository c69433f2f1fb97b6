"""Shared pieces of the benchmark suites: the size grid from the environment, the
memory guard, the correctness check, and the timed call with its peak memory (both
from ``infomax_ext.bench``, the one harness; ``measure`` runs a case in a fresh
subprocess for the scripts' tables).

Environment (all optional):
  BENCH_FULL=1          the full grid of each suite (hours on 2 cores) instead of the default
  BENCH_SIZES=256,1024  K = M values          BENCH_DIMS=32,128   feature sizes d
  BENCH_DTYPES=float32,bfloat16               BENCH_PASSES=fwd,fwd+bwd
  BENCH_IMPLS=fused,reference                 BENCH_ESTIMATORS=infonce,nwj (bench_estimators)
  BENCH_PEAK=0          skip the peak-memory measurement
  BENCH_TARGET_S=0.5    about this many timed seconds per case (3 to 30 rounds)
  BENCH_MAX_GIB=8       skip cases whose materialised tensors would exceed this (default:
                        half of MemAvailable)
  BENCH_DEVICE=cuda     run on the GPU (times synchronise inside the timed call)
"""
import math
import os
import time

import pytest
import torch

from infomax_ext import bench as _bench

HERE = os.path.dirname(os.path.abspath(__file__))

FULL = os.environ.get("BENCH_FULL", "0") not in ("", "0")
DEVICE = "cuda" if os.environ.get("BENCH_DEVICE") == "cuda" and torch.cuda.is_available() else "cpu"


def env_list(name, default, cast=str):
    """A comma-separated environment override of a grid axis."""
    raw = os.environ.get(name, "").strip()
    return [cast(x) for x in raw.split(",") if x.strip()] if raw else list(default)


def max_bytes():
    raw = os.environ.get("BENCH_MAX_GIB")
    if raw:
        return float(raw) * 2**30
    if DEVICE == "cuda":
        return 0.5 * torch.cuda.get_device_properties(0).total_memory
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return 0.5 * int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 * 2**30


def skip_if_too_big(nbytes, what):
    cap = max_bytes()
    if nbytes > cap:
        pytest.skip(f"{what} would need ~{nbytes / 2**30:.1f} GiB (> {cap / 2**30:.1f} GiB; BENCH_MAX_GIB)")


def checked_first_call(run, what, impl, dtype):
    """The case's first call (warm-up and compilation), checked against its oracle
    before anything is timed. A non-fused implementation that cannot run in a low
    precision dtype is skipped, not failed."""
    try:
        out = run()
    except (RuntimeError, NotImplementedError) as e:
        if dtype != "float32" and impl != "fused":
            pytest.skip(f"{impl} does not run in {dtype}: {str(e).splitlines()[0][:120]}")
        raise
    ok, msg = run.check(out)
    assert ok, f"{what}: {msg}"  # correct before timed


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def oracle(fn, inputs, backward, dtype=torch.float64):
    """(value, gradients) of ``fn`` on the ``dtype`` upcast of ``inputs`` (the reference answer)."""
    xs = [x.detach().to(dtype).requires_grad_(backward) for x in inputs]
    with torch.enable_grad():
        val = fn(*xs)
        val = val[0] if isinstance(val, tuple) else val
        grads = [g.double() for g in torch.autograd.grad(val, xs)] if backward else []
    return val.detach().double(), grads


def measure(module, case, repeats=3, env=None):
    """Time and peak memory of ``benchmarks/<module>.py``'s ``make_case(**case)``, measured
    by ``infomax_ext.bench`` in a fresh subprocess: dict(time_s, peak_bytes, reps,
    first_s, check) or {"error": message}."""
    return _bench.measure(f"{module}:make_case", case, repeats=repeats, env=env, paths=[HERE])


def run_benchmark(benchmark, run, impl, baseline="reference", **info):
    """Times ``run`` (already called once: warm-up, compile, checked) with pytest-benchmark.

    Before timing, the peak extra memory of one call is measured in this process
    (heap trimmed, the kernel's peak-RSS mark reset; ``infomax_ext.bench.measure_peak``)
    and stored in ``benchmark.extra_info["peak_mib"]``; conftest.py prints it beside
    the median with the ratios to the group's ``baseline`` implementation.
    """
    benchmark.extra_info.update(impl=impl, baseline=baseline, **info)
    if getattr(benchmark, "disabled", False):
        benchmark.pedantic(run, rounds=1, iterations=1)
        return
    t0 = time.perf_counter()
    if os.environ.get("BENCH_PEAK", "1") not in ("", "0"):
        peak = _bench.measure_peak(run, DEVICE)
        if peak is not None:
            benchmark.extra_info["peak_mib"] = peak / 2**20
    else:
        run()
    sync()
    one = time.perf_counter() - t0
    target = float(os.environ.get("BENCH_TARGET_S", "0.5"))
    rounds = int(min(30, max(3, math.ceil(target / max(one, 1e-6)))))
    benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=0)
