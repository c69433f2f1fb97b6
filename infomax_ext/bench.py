"""``python -m infomax_ext bench``: fused ops side by side with what a user would write otherwise.

A short report (default under 3 minutes on 2 cores): forward + backward time and
peak extra memory against K = M for

  infonce      the fused drop-in loss ``InfoNCELoss(t, normalize=False)`` vs the line a
               user writes, ``F.cross_entropy(a @ b.T / t, arange(K))`` (eager and under ``torch.compile``), the
               materialising reference (eager and compiled) and the *matmul floors*:
               the three K x M x d matmuls of a forward + backward that keeps S (S, G b,
               G^T a: what the fused op does, ``ops.score_reduce_weighted``) and the four
               of a recomputing one
  clip, ntxent (``--ops``) fused CLIP (``InfoNCELoss(symmetric=True)``) and NT-Xent
               (``NTXentLoss``) against their
               eager lines (rows and columns; 2K x 2K with the diagonal masked)
  uniformity   fused ``uniformity`` vs Wang & Isola's ``torch.pdist`` formula, the
               matmul + logsumexp form a careful user writes, and that form compiled
  concat       the fused concat-MLP critic (InfoNCE, H = 256, d = 64) vs the
               reference that materialises the (K, M, H) hidden tensor

printed as a table with the ratios fused / other (time and peak memory), plus a
CSV and a PNG plot (time and peak memory against K) under ``--out``.

How it measures (one implementation, also used by the ``benchmarks/`` suites): the cases
of one (op, implementation) run in a fresh subprocess, smallest K first (``--fresh``:
one process per case). Per case: one first call (warm-up, compilation), whose result
is checked against a float64 reference (float32 for concat); then the peak extra
memory of one call; three more warm calls; then the median time of ``--min-reps``..
``--max-reps`` calls (about ``--target-s`` seconds at the last warm call's time). Peak
memory on CPU is the process's peak resident set during the call minus the resident
set just before it, with the inputs allocated:
freed heap memory is first returned to the OS (``malloc_trim``) and the peak reset
(``/proc/self/clear_refs``), so earlier cases and the warm-up do not count. On CUDA it
is ``max_memory_allocated`` minus ``memory_allocated`` before the call.

    python -m infomax_ext bench                        # the default report
    python -m infomax_ext bench --sizes 1024 4096 --ops infonce --no-compile
    python -m infomax_ext bench --ops infonce --sizes 256 512 --no-compile --interleave 31
    python -m infomax_ext.bench --help
"""
import argparse
import csv
import ctypes
import gc
import importlib
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

import infomax_ext as ie

from . import reference as ref

# ---------------------------------------------------------------------------
# Time and peak memory of one case (the one implementation; benchmarks/_common.py
# and benchmarks/bench_gpu.py import these)
# ---------------------------------------------------------------------------

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def current_rss():
    """Resident set size of this process in bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


def _status_bytes(key):
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_peak_rss():
    """Resets the kernel's peak-RSS mark (VmHWM) to the current RSS; False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    hwm = _status_bytes("VmHWM")
    # NB: a kernel that ignores "5" leaves VmHWM at the lifetime peak, far above the RSS.
    return hwm is not None and hwm <= current_rss() + 64 * _PAGE


def _malloc_trim():
    """Returns freed heap memory of every malloc arena to the OS (glibc), so the
    resident set before a measured call holds live memory only."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _device_of(device):
    if device is None:
        want = os.environ.get("BENCH_DEVICE", "cpu")
        return "cuda" if want == "cuda" and torch.cuda.is_available() else "cpu"
    return str(device)


def step(fn, inputs, backward=True, after=None):
    """A benchmark step: clear the inputs' gradients, ``out = fn(*inputs)``, backward if
    asked, then ``after()`` (e.g. a CUDA synchronise); returns ``out.detach()``."""
    def run():
        for x in inputs:
            x.grad = None
        out = fn(*inputs)
        if backward:
            out.backward()
        if after is not None:
            after()
        return out.detach()
    return run


def _sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure_peak(fn, device="cpu"):
    """Extra peak memory (bytes) of one call of ``fn``, already warmed up.

    CPU: peak resident set during the call minus the resident set just before it
    (heap trimmed, peak mark reset). CUDA: ``max_memory_allocated`` minus
    ``memory_allocated`` before the call. Returns None where the peak cannot be
    reset (no ``/proc/self/clear_refs``); see :func:`time_and_peak` for the fallback.
    """
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return max(torch.cuda.max_memory_allocated() - base, 0)
    _malloc_trim()
    if not _reset_peak_rss():
        return None
    base = current_rss()
    fn()
    return max(_status_bytes("VmHWM") - base, 0)


def _call_times(fn, device, n):
    """Seconds of each of ``n`` calls of ``fn``, each one synchronised (CUDA)."""
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times


def time_and_peak(fn, device="cpu", repeats=None, target_s=1.0, min_reps=3, max_reps=20, check=None):
    """Runs a zero-argument ``fn``: first call, peak memory of one call, then timed calls.

    Args:
        fn: the case (``make_case(...)``'s callable); may carry ``fn.check(out)`` returning
            ``(ok, message)``, called on the first call's result unless ``check`` is given.
        repeats: a fixed number of timed calls; None picks ``ceil(target_s / t)`` within
            ``[min_reps, max_reps]`` from the time ``t`` of the last of three plain calls
            after the peak-memory one.

    Returns:
        dict(time_s (median), peak_bytes, reps, first_s, check): ``check`` is "ok",
        "FAIL: ..." or "n/a".
    """
    check = check if check is not None else getattr(fn, "check", None)
    t0 = time.perf_counter()
    if device.startswith("cuda") or _reset_peak_rss():
        out = fn()  # first call: warm-up (thread pools, BLAS workspaces, compilation)
        _sync(device)
        first = time.perf_counter() - t0
        verdict = _run_check(check, out)
        del out
        peak = measure_peak(fn, device)
        _sync(device)
    else:
        # NB: no resettable peak mark: the peak of the *first* call (ru_maxrss, a
        # lifetime maximum), taken before anything else grows the process.
        base = current_rss()
        out = fn()
        first = time.perf_counter() - t0
        peak = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base, 0)
        verdict = _run_check(check, out)
        del out
    reps = repeats
    if reps is None:
        # NB: the calls above carry the check, the peak measurement and first-call
        # costs; the number of timed calls comes from the last of three plain calls.
        one = _call_times(fn, device, 3)[-1]
        reps = int(min(max_reps, max(min_reps, math.ceil(target_s / max(one, 1e-6)))))
    times = _call_times(fn, device, reps)
    return {"time_s": statistics.median(times), "peak_bytes": peak, "reps": reps, "first_s": first,
            "check": verdict}


def _run_check(check, out):
    if check is None:
        return "n/a"
    try:
        ok, msg = check(out)
    except Exception as e:  # noqa: BLE001 - a broken check is reported, not fatal
        return f"FAIL: check raised {type(e).__name__}: {e}"
    return "ok" if ok else f"FAIL: {msg}"


def run_case(make, repeats=3, device=None):
    """``make() -> callable``; returns (median seconds, extra peak bytes) of that callable."""
    r = time_and_peak(make(), _device_of(device), repeats=repeats)
    return r["time_s"], r["peak_bytes"]


def interleaved(op, K, impls, rounds=31, calls=30, device="cpu", round_s=0.1, **case):
    """The implementations of one (op, K) timed round-robin in this process, so that a
    shared machine's drift hits them alike: per round, per implementation, warm calls
    (three, one for a call over 10 ms) and the median of up to ``calls`` timed ones (at
    least one, fewer when they would pass about ``round_s`` seconds). Returns ``(ms,
    ratio)``: the median over rounds per implementation, and the median over rounds of
    the per-round ratio fused / other (``impls`` must hold ``"fused"``)."""
    runs = {impl: make_case(op, impl, K, device=device, **case) for impl in impls}
    plan = {}
    for impl, run in runs.items():
        one = _call_times(run, device, 2)[-1]  # after the first call (compilation for the compiled lines)
        plan[impl] = (3 if one < 0.01 else 1, max(1, min(calls, int(round_s / max(one, 1e-6)))))
    per = {impl: [] for impl in runs}
    for _ in range(rounds):
        for impl, run in runs.items():
            warm, n = plan[impl]
            for _ in range(warm):
                run()
            per[impl].append(statistics.median(_call_times(run, device, n)))
    ms = {impl: statistics.median(v) * 1e3 for impl, v in per.items()}
    ratio = {impl: statistics.median(f / o for f, o in zip(per["fused"], v)) for impl, v in per.items()
             if impl != "fused"}
    return ms, ratio


def _interleaved_report(args):
    """``--interleave``: the cases of each (op, K) of the plan timed round-robin in this
    process (no peak memory, no CSV)."""
    groups = {}
    for op, impl, cases in _plan(args):
        for c in cases:
            if impl != "floor":
                groups.setdefault((op, c["K"]), (c, []))[1].append(impl)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"interleaved: {args.interleave} rounds of up to {args.calls} calls per implementation, "
          f"{torch.get_num_threads()} threads, {args.dtype}, median ms (fused / this: median of the "
          f"per-round ratios)")
    for (op, K), (c, impls) in groups.items():
        if "fused" not in impls:
            continue
        kw = {k: v for k, v in c.items() if k not in ("op", "impl", "K", "device")}
        ms, ratio = interleaved(op, K, impls, rounds=args.interleave, calls=args.calls, device=args.device, **kw)
        cells = [f"fused {ms['fused']:.3f}"] + [f"{LABELS.get((op, i), i)} {ms[i]:.3f} ({ratio[i]:.3f})"
                                                 for i in impls if i != "fused"]
        print(f"{op:<10} K={K:<6} " + "; ".join(cells), flush=True)
    return 0


# ---------------------------------------------------------------------------
# Subprocess runner
# ---------------------------------------------------------------------------

_MARK = "@@infomax-bench "
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _worker(target, cases, options):
    """Subprocess body: imports ``module:function`` and prints one JSON line per case."""
    module, func = target.split(":")
    make_case = getattr(importlib.import_module(module), func)
    device = _device_of(options.pop("device", None))
    for case in cases:
        try:
            res = time_and_peak(make_case(**case), device, **options)
        except Exception as e:  # noqa: BLE001 - one failing case must not stop the others
            msg = str(e).strip().splitlines()
            res = {"error": f"{type(e).__name__}: {msg[0][:200] if msg else ''}"}
        print(_MARK + json.dumps(res), flush=True)


def measure_many(target, cases, repeats=None, env=None, paths=(), device=None, on_result=None, **options):
    """Runs ``target`` (``"module:make_case"``) on each case (kwargs dicts) in ONE fresh subprocess.

    Returns a list of dicts (``time_and_peak``'s, or ``{"error": ...}``) in case order;
    ``on_result(i, result)`` is called as each arrives. ``paths`` go in front of the
    subprocess's ``sys.path`` (after the checkout that holds this package).
    """
    opts = dict(options, repeats=repeats)
    if device is not None:
        opts["device"] = device
    code = ("import json, sys; sys.path[:0] = json.loads(sys.argv[1])\n"
            "from infomax_ext.bench import _worker\n"
            "_worker(sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4]))\n")
    args = [sys.executable, "-c", code, json.dumps([_ROOT, *paths]), target, json.dumps(cases), json.dumps(opts)]
    results = []
    with tempfile.TemporaryFile(mode="w+") as err:
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=err, text=True,
                                env=dict(os.environ, **(env or {})))
        for line in proc.stdout:
            if line.startswith(_MARK):
                results.append(json.loads(line[len(_MARK):]))
                if on_result is not None:
                    on_result(len(results) - 1, results[-1])
        proc.wait()
        if len(results) < len(cases):
            err.seek(0)
            tail = [s for s in err.read().strip().splitlines() if s.strip()]
            why = tail[-1][:200] if tail else f"exit status {proc.returncode}"
            if proc.returncode and proc.returncode < 0:
                why = f"killed by signal {-proc.returncode} (out of memory?)"
            while len(results) < len(cases):
                results.append({"error": why})
                if on_result is not None:
                    on_result(len(results) - 1, results[-1])
    return results


def measure(target, case, repeats=3, env=None, paths=(), device=None):
    """One case in a fresh subprocess: dict(time_s, peak_bytes, ...) or {"error": ...}."""
    return measure_many(target, [case], repeats=repeats, env=env, paths=paths, device=device)[0]


# ---------------------------------------------------------------------------
# The cases
# ---------------------------------------------------------------------------

INFONCE_SCALE = 10.0  # cosine similarity / temperature 0.1
UNIFORMITY_T = 2.0
OPS = {
    "infonce": ("fused", "eager", "eager_compile", "reference", "compile", "floor3", "floor"),
    "clip": ("fused", "eager", "eager_compile"),
    "ntxent": ("fused", "eager", "eager_compile"),
    "uniformity": ("fused", "pdist", "matmul", "compile"),
    "concat": ("fused", "reference"),
}
LABELS = {
    ("infonce", "eager"): "F.cross_entropy line (eager)",
    ("infonce", "eager_compile"): "F.cross_entropy line (compiled)",
    ("infonce", "reference"): "reference (eager)",
    ("infonce", "compile"): "reference (compiled)",
    ("infonce", "floor3"): "matmul floor (3 matmuls)",
    ("infonce", "floor"): "matmul floor (4 matmuls)",
    ("clip", "eager"): "2 x cross_entropy (eager)",
    ("clip", "eager_compile"): "2 x cross_entropy (compiled)",
    ("ntxent", "eager"): "masked cross_entropy (eager)",
    ("ntxent", "eager_compile"): "masked cross_entropy (compile)",
    ("uniformity", "pdist"): "torch.pdist (Wang & Isola)",
    ("uniformity", "matmul"): "matmul + logsumexp",
    ("uniformity", "compile"): "matmul + logsumexp (compiled)",
    ("concat", "reference"): "reference (K x M x H)",
}


def reference_infonce(a, b, scale=INFONCE_SCALE):
    """The materialising InfoNCE of ``reference.py``: S = scale a b^T, then the bound."""
    return ref.infonce(ref.scores_dot(a, b, scale))


# What a user writes without this library: one or two lines of torch each. The values
# are the losses; the fused lines are the drop-in loss modules a user would put there.
def eager_infonce(a, b, scale=INFONCE_SCALE):
    """InfoNCE as the one line ``F.cross_entropy(scale * a @ b.T, arange(K))``."""
    return F.cross_entropy(scale * a @ b.T, torch.arange(a.shape[0], device=a.device))


def eager_clip(a, b, scale=INFONCE_SCALE):
    """CLIP's symmetric loss: the cross entropies of the rows and of the columns."""
    logits = scale * a @ b.T
    labels = torch.arange(a.shape[0], device=a.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def eager_ntxent(a, b, temperature=1.0 / INFONCE_SCALE):
    """NT-Xent (SimCLR) as lightly writes it: 2K x 2K similarities, the diagonal masked."""
    K = a.shape[0]
    z = F.normalize(torch.cat([a, b]), dim=1)
    logits = (z @ z.T / temperature).masked_fill(torch.eye(2 * K, dtype=torch.bool, device=a.device), -math.inf)
    labels = torch.cat([torch.arange(K, 2 * K), torch.arange(K)]).to(a.device)
    return F.cross_entropy(logits, labels)


def matmul_floor3(a, b):
    """The three K x M x d matmuls of a forward + backward that keeps S: S, G b, G^T a."""
    with torch.no_grad():
        G = a @ b.T
        G @ b
        G.T @ a
    return None


def uniformity_matmul(x, t=UNIFORMITY_T):
    """Uniformity as a careful user writes it: squared distances from one matmul, the
    diagonal masked, one logsumexp (finite where ``log(mean(exp))`` underflows)."""
    K = x.shape[0]
    sq = x.pow(2).sum(1)
    d2 = (sq[:, None] + sq[None, :] - 2 * (x @ x.T)).clamp_min(0)
    logits = (-t * d2).masked_fill(torch.eye(K, dtype=torch.bool, device=x.device), -math.inf)
    return torch.logsumexp(logits.flatten(), 0) - math.log(K * (K - 1))


def matmul_floor(a, b):
    """The four K x M x d matmuls a recomputing InfoNCE forward + backward needs."""
    with torch.no_grad():
        S = a @ b.T  # forward scores
        S = a @ b.T  # recomputed in backward
        G = S  # stands in for dL/dS (same shape and dtype)
        G @ b
        G.T @ a
    return None


def tolerance(dtype):
    """(value, gradient) relative tolerances of a check against a float64 reference."""
    return {"float64": (1e-8, 1e-6), "float32": (1e-4, 1e-3)}.get(str(dtype).replace("torch.", ""), (3e-2, 5e-2))


def compare(out, grads, expected, expected_grads, tol):
    """(ok, message). ``tol``: (value, gradient) tolerances, or one number for both.

    The value must lie within tol * max(1, |expected|); each gradient's max-abs error
    within tol * max|expected gradient| (at least 1e-3 of the largest gradient of all
    inputs, for gradients that are zero in exact arithmetic, like a shift's)."""
    tol, gtol = tol if isinstance(tol, tuple) else (tol, tol)
    err = abs(float(out) - float(expected))
    if not err <= tol * max(1.0, abs(float(expected))):
        return False, f"value {float(out):.6g} vs {float(expected):.6g}"
    floor = 1e-3 * max([e.abs().max().item() for e in expected_grads if e.numel()] or [0.0])
    for i, (g, e) in enumerate(zip(grads, expected_grads)):
        if g is None:
            return False, f"gradient {i} missing"
        scale = max(e.abs().max().item(), floor)
        gerr = (g.double() - e).abs().max().item()
        if not gerr <= gtol * max(scale, 1e-30):
            return False, f"gradient {i}: max error {gerr:.3g} vs max |g| {scale:.3g}"
    return True, f"value error {err:.1e}"


def _oracle_check(fn64, inputs, dtype, backward):
    """A check closure: fn64 on the float64 upcast of ``inputs``, value (and gradients)."""
    def check(out):
        xs = [x.detach().double().requires_grad_(backward) for x in inputs]
        with torch.enable_grad():
            val = fn64(*xs)
            grads = torch.autograd.grad(val, xs) if backward else ()
        got = [x.grad for x in inputs] if backward else []
        return compare(out, got, val.detach(), grads, tolerance(dtype))

    return check


def make_case(op, impl, K, d=128, dtype="float32", backward=True, H=256, seed=0, device="cpu"):
    """A zero-argument callable running one forward (+ backward) of ``impl`` on ``op``.

    Args:
        op: "infonce", "uniformity" or "concat" (keys of ``OPS``).
        impl: one of ``OPS[op]``.
        K: K = M, the batch size. d: features (concat: input size of each view).
        H: hidden size of the concat critic.

    The callable returns the (detached) value, or None for the floor, and carries
    ``check(out) -> (ok, message)`` against a float64 reference (concat: float32).
    """
    if impl not in OPS.get(op, ()):
        raise ValueError(f"unknown case {op!r}/{impl!r}; choose from {OPS}")
    g = torch.Generator().manual_seed(seed)
    dt = getattr(torch, dtype)

    def leaf(x):
        return x.to(device=device, dtype=dt).requires_grad_(backward)

    if op == "concat":
        return _concat_case(impl, K, d, H, dt, backward, seed, device)

    if op in ("infonce", "clip", "ntxent"):
        a0 = F.normalize(torch.randn(K, d, generator=g), dim=1)
        b0 = F.normalize(a0 + 0.5 * torch.randn(K, d, generator=g), dim=1)
        inputs = [leaf(a0), leaf(b0)]
        eager = {"infonce": eager_infonce, "clip": eager_clip, "ntxent": eager_ntxent}[op]
        t = 1.0 / INFONCE_SCALE
        fused = {"infonce": ie.InfoNCELoss(temperature=t, normalize=False),
                 "clip": ie.InfoNCELoss(temperature=t, symmetric=True, normalize=False),
                 "ntxent": ie.NTXentLoss(temperature=t)}[op]
        fns = {"fused": fused, "eager": eager, "reference": reference_infonce}
        oracle = reference_infonce if op == "infonce" and impl in ("reference", "compile") else eager
        if impl == "eager_compile":
            fns["eager_compile"] = torch.compile(eager, dynamic=False)
    else:
        inputs = [leaf(F.normalize(torch.randn(K, d, generator=g), dim=1))]
        fns = {"fused": lambda x: ie.uniformity(x, UNIFORMITY_T), "pdist": ref.uniformity_pdist,
               "matmul": uniformity_matmul}
        oracle = uniformity_matmul
    if impl == "compile":
        base = reference_infonce if op == "infonce" else uniformity_matmul
        fns["compile"] = torch.compile(base, dynamic=False)
    if impl in ("floor", "floor3"):
        floor = matmul_floor if impl == "floor" else matmul_floor3

        def run():
            floor(*inputs)
        return run

    run = step(fns[impl], inputs, backward)

    run.check = _oracle_check(oracle, inputs, dtype, backward)
    run.inputs = inputs
    return run


def _concat_case(impl, K, d, H, dt, backward, seed, device):
    torch.manual_seed(seed)
    critic = ie.ConcatMLP(d, d, H, activation="relu").to(device=device, dtype=dt)
    u = torch.randn(K, d, dtype=dt, device=device).requires_grad_(backward)
    v = torch.randn(K, d, dtype=dt, device=device).requires_grad_(backward)
    params = [u, v] + list(critic.parameters())

    def call(reference):
        for p in params:
            p.grad = None
        ie.use_reference(reference)
        try:
            out = ie.mi_lower_bound(u, v, critic, "infonce")
            if backward:
                out.backward()
        finally:
            ie.use_reference(False)
        return out.detach()

    def run():
        return call(impl == "reference")

    def check(out):
        if impl == "reference":
            return True, "is the reference"
        got = [p.grad.clone() if p.grad is not None else None for p in params] if backward else []
        expected = call(True)  # NB: float32 reference: a float64 (K, M, H) tensor would not fit
        exp_grads = [p.grad.double() for p in params] if backward else []
        return compare(out, got, expected, exp_grads, tuple(10 * t for t in tolerance(dt)))

    run.check = check
    return run


# ---------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------


def _parse(argv):
    p = argparse.ArgumentParser(prog="python -m infomax_ext bench",
                                description="Fused ops vs reference, compiled reference and peers: "
                                            "time and peak memory against K (table, CSV, PNG).")
    p.add_argument("--ops", nargs="+", default=["infonce", "uniformity", "concat"], choices=list(OPS),
                   help="also: clip, ntxent (fused CLIP and NT-Xent against their eager lines)")
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 1024, 2048, 4096],
                   help="K = M for infonce and uniformity")
    p.add_argument("--concat-sizes", type=int, nargs="+", default=[256, 1024], help="K = M for concat")
    p.add_argument("--d", type=int, default=128, help="feature size (infonce, uniformity)")
    p.add_argument("--concat-d", type=int, default=64)
    p.add_argument("--concat-H", type=int, default=256)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float64"])
    p.add_argument("--forward-only", action="store_true", help="time the forward pass only (default: fwd+bwd)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile cases")
    p.add_argument("--compile-sizes", type=int, nargs="+", default=None,
                   help="K values of the torch.compile cases (default: the largest of --sizes; "
                        "each size is one more compilation, seconds each)")
    p.add_argument("--fresh", action="store_true", help="one fresh process per case (slower)")
    p.add_argument("--target-s", type=float, default=0.5, help="about this many timed seconds per case")
    p.add_argument("--min-reps", type=int, default=3)
    p.add_argument("--max-reps", type=int, default=20)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads in the measuring processes (default: torch's)")
    p.add_argument("--out", default=os.path.join("infomax_out", "bench"),
                   help="folder for bench.csv and bench.png (created)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--interleave", type=int, default=None, metavar="ROUNDS",
                   help="instead: time the implementations of each (op, K) round-robin in this process, "
                        "ROUNDS rounds (drift of a shared machine hits them alike; no peak memory, no CSV; "
                        "the 4-matmul floor left out)")
    p.add_argument("--calls", type=int, default=30,
                   help="timed calls per implementation and round (--interleave; fewer for a slow one, "
                        "about 0.1 s a round)")
    return p.parse_args(argv)


def _plan(args):
    """[(op, impl, [case kwargs ...])] in run order."""
    plan = []
    for op in args.ops:
        sizes = args.concat_sizes if op == "concat" else args.sizes
        for impl in OPS[op]:
            if impl in ("compile", "eager_compile") and args.no_compile:
                continue
            if impl in ("floor", "floor3") and args.forward_only:
                continue
            Ks = (args.compile_sizes or [max(sizes)]) if impl in ("compile", "eager_compile") else sizes
            cases = []
            for K in sorted(Ks):
                c = dict(op=op, impl=impl, K=K, dtype=args.dtype, backward=not args.forward_only,
                         device=args.device)
                if op == "concat":
                    c.update(d=args.concat_d, H=args.concat_H)
                else:
                    c["d"] = args.d
                cases.append(c)
            plan.append((op, impl, cases))
    return plan


def _fmt(x, spec, missing="-"):
    return missing if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _with_ratios(rows):
    """Adds fused/this ratios of time and peak to each row of its (op, K) group."""
    fused = {(r["op"], r["K"]): r for r in rows if r["impl"] == "fused" and r.get("time_ms") is not None}
    for r in rows:
        f = fused.get((r["op"], r["K"]))
        r["fused_over_this_time"] = r["fused_over_this_peak"] = None
        if f is None or r["impl"] == "fused" or r.get("time_ms") is None:
            continue
        r["fused_over_this_time"] = f["time_ms"] / r["time_ms"]
        if r["impl"] != "floor" and r.get("peak_mib"):
            r["fused_over_this_peak"] = f["peak_mib"] / r["peak_mib"]
    return rows


def _table(rows, args):
    lines = []
    hdr = (f"{'op':<10} {'K=M':>6} {'implementation':<30} {'median ms':>10} {'peak MiB':>9} "
           f"{'fused/this time':>15} {'fused/this peak':>15}  check")
    lines.append(hdr)
    lines.append("-" * len(hdr))
    last = None
    for r in rows:
        if last is not None and (r["op"], r["K"]) != last:
            lines.append("")
        last = (r["op"], r["K"])
        name = LABELS.get((r["op"], r["impl"]), r["impl"])
        if r.get("error"):
            lines.append(f"{r['op']:<10} {r['K']:>6} {name:<30} failed: {r['error'][:90]}")
            continue
        peak = None if r["impl"] == "floor" else r["peak_mib"]
        lines.append(f"{r['op']:<10} {r['K']:>6} {name:<30} {_fmt(r['time_ms'], '10.2f'):>10} "
                     f"{_fmt(peak, '9.2f'):>9} {_fmt(r['fused_over_this_time'], '15.3f'):>15} "
                     f"{_fmt(r['fused_over_this_peak'], '15.4f'):>15}  {r['check']}")
    return lines


def _summary(rows):
    """The ratios that matter, per op at its largest K, with the issue's CPU targets."""
    by = {(r["op"], r["K"], r["impl"]): r for r in rows if r.get("time_ms") is not None}
    out = []

    def ratio(op, K, impl, what="time_ms"):
        f, o = by.get((op, K, "fused")), by.get((op, K, impl))
        if f is None or o is None or not o.get(what):
            return None
        return f[what] / o[what]

    def verdict(x, ok):
        return "" if x is None else ("  [target met]" if ok(x) else "  [target not met]")

    for op in ("infonce", "clip", "ntxent"):
        # NB: the line a user writes without us, at every K (fused / eager < 1: we win).
        Ks = sorted({k for (o, k, i) in by if o == op and i == "eager"})
        if Ks:
            out.append(f"{op:<10} fused/eager time: " + ", ".join(
                f"K={K} {_fmt(ratio(op, K, 'eager'), '.2f')}" for K in Ks))
    for op in OPS:
        Ks = sorted({k for (o, k, _) in by if o == op})
        if not Ks or op in ("clip", "ntxent"):
            continue
        K = Ks[-1]
        parts = []
        if op == "infonce":
            t, fl, pk, cp = (ratio(op, K, "reference"), ratio(op, K, "floor"),
                             ratio(op, K, "reference", "peak_mib"), ratio(op, K, "compile"))
            out.append(f"infonce    K=M={K}: fused/reference time {_fmt(t, '.3f')}, fused/floor "
                       f"{_fmt(fl, '.3f')}, fused/reference peak {_fmt(pk, '.4f')}, fused/compiled "
                       f"{_fmt(cp, '.3f')}")
            if K == 4096:
                parts = [f"target (K=4096, d=128): time <= 0.8x reference{verdict(t, lambda x: x <= 0.8)}",
                         f"<= 1.5x floor{verdict(fl, lambda x: x <= 1.5)}",
                         f"peak <= 5% of reference{verdict(pk, lambda x: x <= 0.05)}"]
        elif op == "uniformity":
            pd, mm, cp = ratio(op, K, "pdist"), ratio(op, K, "matmul"), ratio(op, K, "compile")
            out.append(f"uniformity K={K}: fused/pdist time {_fmt(pd, '.3f')} "
                       f"({_fmt(1 / pd if pd else None, '.2f')}x faster), fused/matmul+lse "
                       f"{_fmt(mm, '.3f')} ({_fmt(1 / mm if mm else None, '.2f')}x faster), fused/compiled "
                       f"{_fmt(cp, '.3f')}")
            if K == 4096:
                parts = [f"target (K=4096, d=128): >= 3x faster than pdist{verdict(pd, lambda x: x <= 1 / 3)}",
                         f">= 4x faster than matmul+lse{verdict(mm, lambda x: x <= 1 / 4)}"]
        else:
            t, pk = ratio(op, K, "reference"), ratio(op, K, "reference", "peak_mib")
            out.append(f"concat     K=M={K}: fused/reference time {_fmt(t, '.4f')} "
                       f"({_fmt(1 / t if t else None, '.1f')}x faster), fused/reference peak {_fmt(pk, '.4f')}")
            if K == 1024:
                parts = [f"target (K=1024, H=256, d=64): >= 10x faster than the reference"
                         f"{verdict(t, lambda x: x <= 0.1)}"]
        if parts:
            out.append("           " + "; ".join(parts))
    return out


def _write_csv(rows, path):
    fields = ["op", "pass", "K", "M", "d", "H", "dtype", "device", "threads", "impl", "time_ms", "peak_mib", "reps",
              "first_s", "fused_over_this_time", "fused_over_this_peak", "check", "error"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow(r)


def _plot(rows, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ops = [op for op in OPS if any(r["op"] == op and r.get("time_ms") is not None for r in rows)]
    if not ops:
        return False
    fig, axes = plt.subplots(len(ops), 2, figsize=(11, 3.6 * len(ops)), squeeze=False)
    for row, op in zip(axes, ops):
        for impl in OPS[op]:
            pts = sorted((r["K"], r["time_ms"], r["peak_mib"]) for r in rows
                         if r["op"] == op and r["impl"] == impl and r.get("time_ms") is not None)
            if not pts:
                continue
            Ks = [p[0] for p in pts]
            style = dict(marker="o", label=LABELS.get((op, impl), impl),
                         linestyle="--" if impl in ("floor", "compile") else "-")
            row[0].plot(Ks, [p[1] for p in pts], **style)
            if impl != "floor":
                row[1].plot(Ks, [max(p[2], 1e-3) for p in pts], **style)
        for ax, what in zip(row, ("median time (ms)", "peak extra memory (MiB)")):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("K = M")
            ax.set_ylabel(what)
            ax.set_title(f"{op}: {what.split(' (')[0]}")
            ax.grid(True, which="both", alpha=0.3)
        row[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv=None):
    """Runs the report; returns 0, or 1 when a case failed or a check did not hold."""
    args = _parse(argv)
    if args.interleave:
        return _interleaved_report(args)
    from tqdm import tqdm

    t_start = time.perf_counter()
    plan = _plan(args)
    total = sum(len(c) for _, _, c in plan)
    dev = "CPU" if args.device == "cpu" else args.device
    # NB: the measuring processes read OMP_NUM_THREADS when torch starts.
    env = {"OMP_NUM_THREADS": str(args.threads)} if args.threads else None
    head = (f"infomax_ext {ie.__version__} bench: backend={ie.backend()}, torch {torch.__version__}, "
            f"{args.threads or torch.get_num_threads()} threads, {dev}, {args.dtype}, "
            f"{'forward' if args.forward_only else 'forward+backward'}")
    print(head, flush=True)
    if ie.backend() != "compiled":
        print("warning: the compiled kernels are not loaded; 'fused' runs the reference", flush=True)
    rows = []
    opts = dict(target_s=args.target_s, min_reps=args.min_reps, max_reps=args.max_reps)
    with tqdm(total=total, desc="bench", unit="case", dynamic_ncols=True) as bar:
        for op, impl, cases in plan:
            def done(i, res, op=op, impl=impl, cases=cases):
                c = cases[i]
                rows.append({
                    "op": op, "pass": "fwd" if args.forward_only else "fwd+bwd", "K": c["K"], "M": c["K"],
                    "d": c["d"], "H": c.get("H", ""), "dtype": args.dtype, "device": args.device, "impl": impl,
                    "threads": args.threads or torch.get_num_threads(),
                    "time_ms": res["time_s"] * 1e3 if "time_s" in res else None,
                    "peak_mib": res["peak_bytes"] / 2**20 if res.get("peak_bytes") is not None else None,
                    "reps": res.get("reps"), "first_s": res.get("first_s"),
                    "check": res.get("check", ""), "error": res.get("error", ""),
                })
                bar.update(1)

            def progress(i, res, done=done, op=op, impl=impl, cases=cases):
                done(i, res)
                if i + 1 < len(cases):
                    bar.set_postfix_str(f"{op} {impl} K={cases[i + 1]['K']}")

            bar.set_postfix_str(f"{op} {impl} K={cases[0]['K']}")
            if args.fresh:
                for i, c in enumerate(cases):
                    progress(i, measure_many("infomax_ext.bench:make_case", [c], env=env, device=args.device,
                                             **opts)[0])
            else:
                measure_many("infomax_ext.bench:make_case", cases, env=env, device=args.device, on_result=progress,
                             **opts)

    order = {(op, impl): i for i, (op, impl, _) in enumerate(plan)}
    rows.sort(key=lambda r: (list(OPS).index(r["op"]), r["K"], order[(r["op"], r["impl"])]))
    _with_ratios(rows)
    elapsed = time.perf_counter() - t_start

    print()
    print(head)
    print("median of the calls after the first (warm-up/compile) call; peak = extra resident memory of one "
          "call, measured in a fresh process per (op, implementation); fused/this < 1: fused is faster "
          "(or smaller); check: first call vs a float64 reference (concat: float32)")
    for line in _table(rows, args):
        print(line)
    print()
    for line in _summary(rows):
        print(line)
    fl = [r for r in rows if r["impl"] == "floor" and r.get("time_ms") is not None]
    if fl:
        print(f"matmul floor: the four K x M x d float matmuls (S, S recomputed, G b, G^T a) of a recomputing "
              f"InfoNCE forward+backward, {4 * 2 * max(r['K'] for r in fl) ** 2 * args.d / 1e9:.1f} GFLOP "
              f"at K=M={max(r['K'] for r in fl)}; the fused InfoNCE keeps S per row block and needs three")

    os.makedirs(args.out, exist_ok=True)
    csv_path = os.path.join(args.out, "bench.csv")
    _write_csv(rows, csv_path)
    print(f"\nCSV:  {csv_path}")
    if not args.no_plot:
        png = os.path.join(args.out, "bench.png")
        try:
            if _plot(rows, png, head):
                print(f"plot: {png}")
        except ImportError as e:
            print(f"plot skipped ({e}); pip install matplotlib")
    bad = [r for r in rows if r.get("error") or str(r.get("check", "")).startswith("FAIL")]
    print(f"{total} cases in {elapsed:.0f} s" + (f"; {len(bad)} failed or did not check" if bad else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
