"""Time and peak memory of one benchmark case, measured in a fresh subprocess.

A thin front of ``infomax_ext.bench`` (the one implementation, shared with
``python -m infomax_ext bench``). Per case, in a fresh process: one first call
(warm-up), then the peak extra memory of one call, then the median time of
``repeats`` calls. Peak memory is the process's peak resident set during the call
minus the resident set just before it, with the inputs allocated (freed heap
returned to the OS with ``malloc_trim`` and the peak mark reset through
``/proc/self/clear_refs`` first; where that is unavailable, the ``ru_maxrss`` of the
first call); with ``BENCH_DEVICE=cuda``, ``torch.cuda.max_memory_allocated`` minus
``memory_allocated`` before the call.
"""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)  # the package without an install

from infomax_ext.bench import current_rss, measure_peak, run_case, time_and_peak  # noqa: E402,F401
from infomax_ext import bench as _bench  # noqa: E402


def measure(module, case, repeats=3, env=None):
    """Runs ``benchmarks/<module>.py``'s ``make_case(**case)`` in a fresh subprocess.

    Returns dict(time_s, peak_bytes, reps, first_s, check) or {"error": message}.
    """
    return _bench.measure(f"{module}:make_case", case, repeats=repeats, env=env, paths=[HERE])
