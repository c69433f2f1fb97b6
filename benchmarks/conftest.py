"""pytest configuration of the benchmark suites (not part of the test command).

Collects the ``bench_*.py`` files when the folder is given (``pytest benchmarks``)
(pytest puts this folder on ``sys.path``, so the suites import ``_common``; the package
itself comes from ``./setup.sh``'s path entry or an install), and after pytest-benchmark's own tables prints one
compact table per group: median time, peak extra memory (where the suite measured
it, ``extra_info["peak_mib"]``) and the ratios of time and peak to the group's
baseline (the implementation a suite names in ``extra_info["baseline"]``, else the
first of ``BASELINES`` present), so every implementation of one op, size and pass
reads side by side. It only reads the recorded results: suites that record no peak show "-".
"""
import os

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))

BASELINES = ("reference", "matmul")


def pytest_collect_file(file_path, parent):
    """Collects ``benchmarks/bench_*.py`` (not ``test_*.py``) when the folder is given,
    so ``pytest benchmarks --benchmark-only`` runs every suite; a file named on the
    command line is collected by pytest itself."""
    if (file_path.suffix == ".py" and file_path.name.startswith("bench_")
            and str(file_path.parent) == HERE and not parent.session.isinitpath(file_path)):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def _impl(bench):
    params = bench.params or {}
    return str(bench.extra_info.get("impl") or params.get("impl") or bench.name)


def _fmt(x, spec):
    width = int(spec.split(".")[0] or 0)
    return f"{'-':>{width}}" if x is None else format(x, spec)


def _labels(rows):
    """Implementation names, with the file added where two suites share a group and a name."""
    names = [_impl(b) for b in rows]
    out = []
    for b, n in zip(rows, names):
        if names.count(n) > 1:
            n = f"{n} ({os.path.basename(b.fullname.split('::')[0])})"
        out.append(n)
    return out


@pytest.hookimpl(trylast=True)  # after pytest-benchmark's own tables
def pytest_terminal_summary(terminalreporter, config):
    bs = getattr(config, "_benchmarksession", None)
    if bs is None or getattr(bs, "disabled", False):
        return
    benches = [b for b in bs.benchmarks if b]
    if not benches:
        return
    groups = {}
    for b in benches:
        groups.setdefault(b.group or "", []).append(b)
    tr = terminalreporter
    tr.write_sep("=", "side by side: median, peak extra memory, ratios to the group's baseline")
    head = f"{'implementation':<28} {'median ms':>11} {'peak MiB':>10} {'time/base':>10} {'peak/base':>10}"
    for group in sorted(groups):
        rows = sorted(groups[group], key=lambda b: b.stats.median)
        labels = _labels(rows)
        by_impl = {}
        for b in rows:
            by_impl.setdefault(_impl(b), b)  # NB: a name shared by two suites: the faster is the baseline
        declared = [b.extra_info["baseline"] for b in rows if b.extra_info.get("baseline") in by_impl]
        base_name = declared[0] if declared else next((n for n in BASELINES if n in by_impl), None)
        base = by_impl.get(base_name)
        tr.write_line("")
        tr.write_line(f"{group}   (baseline: {base_name or 'none'})")
        tr.write_line(head)
        for b, label in zip(rows, labels):
            med = b.stats.median * 1e3
            peak = b.extra_info.get("peak_mib")
            t_ratio = p_ratio = None
            if base is not None:
                t_ratio = b.stats.median / base.stats.median
                bpeak = base.extra_info.get("peak_mib")
                if peak is not None and bpeak:
                    p_ratio = peak / bpeak
            tr.write_line(f"{label:<28} {med:11.3f} {_fmt(peak, '10.2f')} {_fmt(t_ratio, '10.3f')} "
                          f"{_fmt(p_ratio, '10.4f')}")
