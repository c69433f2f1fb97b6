"""GPU benchmark: InfoNCE forward + backward, fused vs plain torch, with the GEMM floor.

For K = M in --sizes, d = --dim and each dtype, times one forward + backward of

  fused     infomax_ext.infonce(a, b, scale)                       (S never stored)
  eager     reference.infonce(reference.scores_dot(a, b, scale))   (S materialised)
  compile   torch.compile of the same reference function
  floor     the 4 plain GEMMs of K x M x d the op needs (S, S again in backward,
            G B, G^T A) in the input dtype: no implementation can beat it by much

and prints the median time (synchronised, after a first call), the peak memory above
what was allocated before the call (inputs and their gradients' owners excluded),
and fused / floor. A case that does not fit prints OOM. The run stops starting
new cases once --time-budget seconds have passed.

Run from the repository root on a GPU machine after building the extension:

    python benchmarks/bench_gpu.py                 # K = M in 8192 32768 65536, d = 512
    python benchmarks/bench_gpu.py --sizes 4096 --dtypes fp32 --no-compile

Exit status: 0 after a run, 2 when there is no CUDA device or no CUDA build.
"""
import argparse
import gc
import sys
import time

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
ELEM = {"bf16": 2, "fp16": 2, "fp32": 4}
# Peak dense GEMM TFLOP/s and HBM TB/s of the GPUs this was sized for (others: --peak-tflops,
# --bandwidth-tbs). fp32 GEMMs count at the TF32-off CUDA-core rate.
DEVICE_PEAKS = {"H200": ({"bf16": 989.0, "fp16": 989.0, "fp32": 67.0}, 4.8),
                "H100": ({"bf16": 989.0, "fp16": 989.0, "fp32": 67.0}, 3.35),
                "A100": ({"bf16": 312.0, "fp16": 312.0, "fp32": 19.5}, 2.0)}
CHUNK_BUDGET = 1 << 30  # cuda::workspace_bytes() on a large GPU: float32 scores per chunk


def design_bytes(K, M, d, dtype, col_bias=False, budget=CHUNK_BUDGET):
    """HBM bytes one fused InfoNCE forward + backward moves by design on the CUDA walker
    (the one-walk path: S, G B, G^T A per chunk of whole rows), as {part: bytes}.

    Per chunk of R rows (R x M float32 scores within the budget): the S GEMM writes the
    chunk and reads B; the fold kernel reads it; the gradient kernel reads it and writes G
    (in the input dtype for fp16/bf16 inputs, fp16 scaled by a power of two; float32
    otherwise); with a column bias the column-sum pass reads G in float32 (for fp16/bf16
    a float32 copy, which the gradient kernel writes too); the two G GEMMs read G and
    their operands (in the input dtype) and accumulate into float32 dA rows and all of
    dB (read + write). After the walk: for fp16, dA and dB divided by G's scale; dscale,
    the scaling and the casts of dA and dB. O(K + M) terms (G's scale among them) and
    the positive term (O((K + M) d)) are left out."""
    e = ELEM[dtype]
    g = 4 if dtype == "fp32" else e  # bytes of a stored G
    R = max(1, min(K, budget // (4 * M)))
    n = -(-K // R)
    KM = K * M
    parts = {
        "S write (GEMM)": 4 * KM,
        "S read (fold)": 4 * KM,
        "S read + G write (gradient)": (4 + g) * KM,
        "G float32 copy write (column sums, fp16/bf16)": 4 * KM if col_bias and g != 4 else 0,
        "G read (column sums)": 4 * KM if col_bias else 0,
        "G read (2 G GEMMs)": 2 * g * KM,
        "a, b reads (3 GEMMs, per chunk)": 2 * (n * M * d * e + K * d * e),
        "dA, dB accumulate (per chunk)": 2 * 4 * K * d + n * 2 * 4 * M * d,
        "G scale undone on dA, dB (fp16)": (K + M) * d * (4 + 4) if dtype == "fp16" else 0,
        "dscale, scale, cast": (K + M) * d * (4 + 4 + 4 + 4 + e) + K * d * e,
    }
    return {k: v for k, v in parts.items() if v}


def design_table(sizes, d, dtypes, peaks, bandwidth_tbs):
    """Lines of the design table: bytes moved, the bandwidth-bound time and the GEMM floor."""
    lines = [f"By design (one-walk InfoNCE fwd+bwd, d = {d}, chunks of {CHUNK_BUDGET >> 20} MiB of scores, "
             f"no column bias; {bandwidth_tbs:g} TB/s, peak TFLOP/s {peaks}):",
             f"{'dtype':<6} {'K=M':>6} {'GB moved':>9} {'bw-bound ms':>12} {'3-GEMM ms':>10} {'bound by':>9}"]
    for name in dtypes:
        for K in sizes:
            total = sum(design_bytes(K, K, d, name).values())
            bw_ms = total / (bandwidth_tbs * 1e12) * 1e3
            gemm_ms = 3 * 2 * K * K * d / (peaks[name] * 1e12) * 1e3
            lines.append(f"{name:<6} {K:>6} {total / 1e9:>9.1f} {bw_ms:>12.2f} {gemm_ms:>10.2f} "
                         f"{'memory' if bw_ms > gemm_ms else 'GEMM':>9}")
    return lines


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[8192, 32768, 65536], help="K = M values")
    p.add_argument("--dim", type=int, default=512, help="feature size d")
    p.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], choices=sorted(DTYPES))
    p.add_argument("--scale", type=float, default=1 / 0.07, help="logit scale (CLIP's 1 / 0.07)")
    p.add_argument("--min-reps", type=int, default=3)
    p.add_argument("--max-reps", type=int, default=20)
    p.add_argument("--target-s", type=float, default=1.5, help="timed seconds per case (sets reps)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile reference")
    p.add_argument("--no-reference", action="store_true", help="skip the eager and compiled references")
    p.add_argument("--time-budget", type=float, default=300.0,
                   help="seconds after which no new case starts")
    p.add_argument("--device", default="cuda",
                   help="cuda (default); cpu only smoke-tests this script (no memory numbers)")
    p.add_argument("--design-only", action="store_true",
                   help="print the bytes-by-design table and exit (no GPU needed)")
    p.add_argument("--bandwidth-tbs", type=float, default=None, help="HBM TB/s (default: by device name)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="dense GEMM TFLOP/s for every dtype (default: by device name and dtype)")
    return p.parse_args(argv)


def log(msg):
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def is_oom(exc):
    import torch

    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def free_memory(cuda=True):
    import torch

    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def time_fn(fn, args, cuda=True):
    """(median ms, extra peak bytes of one call, first call s) of fn(), by the one harness
    (``infomax_ext.bench.time_and_peak``: synchronised on CUDA, after a first call and a
    peak-memory call)."""
    from infomax_ext import bench

    free_memory(cuda)
    r = bench.time_and_peak(fn, "cuda" if cuda else "cpu", target_s=args.target_s, min_reps=args.min_reps,
                            max_reps=args.max_reps)
    return r["time_s"] * 1e3, r["peak_bytes"], r["first_s"]


def device_peaks(args, name=""):
    """(TFLOP/s by dtype, TB/s) from the flags, else the table above by device name (H200's
    numbers for an unknown device)."""
    known = next((v for k, v in DEVICE_PEAKS.items() if k in name), DEVICE_PEAKS["H200"])
    flops = {k: args.peak_tflops for k in ELEM} if args.peak_tflops else known[0]
    return flops, args.bandwidth_tbs or known[1]


def main(argv=None):
    args = parse_args(argv)
    if args.design_only:
        print("\n".join(design_table(args.sizes, args.dim, args.dtypes, *device_peaks(args))))
        return 0
    import torch

    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    if cuda and not torch.cuda.is_available():
        print("bench_gpu.py: no CUDA device visible (torch.cuda.is_available() is False); "
              "this benchmark needs a GPU. Nothing was run.", file=sys.stderr)
        return 2
    import infomax_ext
    from infomax_ext import bench
    from infomax_ext import reference as ref

    info = infomax_ext.build_info()
    if cuda and "cuda" not in info.get("backends", []):
        print(f"bench_gpu.py: infomax_ext has no CUDA kernels (build_info: {info}); build it with "
              "nvcc first (pip install --no-build-isolation -e .).", file=sys.stderr)
        return 2

    t_start = time.perf_counter()
    if cuda:
        props = torch.cuda.get_device_properties(dev)
        where = f"{props.name}, {props.total_memory / 2**30:.0f} GiB, capability {props.major}.{props.minor}"
    else:
        where = "CPU (smoke test of this script only)"
    log(f"{where}; torch {torch.__version__}; infomax_ext {info.get('version')} archs {info.get('cuda_archs')}; "
        f"fp32 matmul TF32: {torch.backends.cuda.matmul.allow_tf32}")
    peaks, bandwidth = device_peaks(args, where)
    scale = args.scale
    d = args.dim

    def fused_loss(a, b):
        return -infomax_ext.infonce(a, b, scale=scale)

    def ref_loss(a, b):
        return -ref.infonce(ref.scores_dot(a, b, scale))

    def fwd_bwd(loss_fn, a, b):
        def run():
            loss = loss_fn(a, b)
            torch.autograd.grad(loss, (a, b))
        return run

    # Correctness once, before any timing, on a small case of each dtype.
    for name in args.dtypes:
        dt = getattr(torch, DTYPES[name])
        g = torch.Generator(device=dev).manual_seed(0)
        a0 = torch.nn.functional.normalize(torch.randn(1024, d, device=dev, generator=g), dim=1)
        b0 = torch.nn.functional.normalize(a0 + 0.5 * torch.randn(1024, d, device=dev, generator=g), dim=1)
        al, bl = a0.to(dt).requires_grad_(True), b0.to(dt).requires_grad_(True)
        lf = fused_loss(al, bl)
        gf = torch.autograd.grad(lf, (al, bl))
        # The oracle: float32 reference on the same (rounded) inputs.
        a_r, b_r = al.detach().float().requires_grad_(True), bl.detach().float().requires_grad_(True)
        lr = ref_loss(a_r, b_r)
        gr = torch.autograd.grad(lr, (a_r, b_r))
        err_v = abs(lf.item() - lr.item())
        err_g = max((x.float() - y).abs().max().item() / y.abs().max().item() for x, y in zip(gf, gr))
        log(f"check {name} K=M=1024: |loss - ref| = {err_v:.2e}, max relative grad error {err_g:.2e}")
        tol = 1e-4 if name == "fp32" else 2e-2
        if not (err_v <= tol * max(1.0, abs(lr.item())) and err_g <= tol):
            log(f"FAILED correctness check for {name}: the timings below are of a wrong result")

    rows = []
    for name in args.dtypes:
        dt = getattr(torch, DTYPES[name])
        for K in args.sizes:
            M = K
            if time.perf_counter() - t_start > args.time_budget:
                log(f"time budget ({args.time_budget:.0f} s) spent: skipping {name} K=M={K}")
                rows.append((name, K, "all", None, None, "skipped (time budget)"))
                continue
            free_memory(cuda)
            g = torch.Generator(device=dev).manual_seed(K)
            a = torch.nn.functional.normalize(torch.randn(K, d, device=dev, generator=g), dim=1).to(dt)
            b = torch.nn.functional.normalize(torch.randn(M, d, device=dev, generator=g), dim=1).to(dt)
            a.requires_grad_(True)
            b.requires_grad_(True)
            case = {}

            def record(impl, fn):
                if time.perf_counter() - t_start > args.time_budget and impl != "floor":
                    log(f"{name} K=M={K} {impl}: skipped (time budget)")
                    rows.append((name, K, impl, None, None, "skipped (time budget)"))
                    return
                log(f"{name} K=M={K} {impl} ...")
                try:
                    ms, peak, first = time_fn(fn, args, cuda)
                except Exception as e:  # noqa: BLE001 - report and go on to the next case
                    free_memory(cuda)
                    note = "OOM" if is_oom(e) else f"FAILED: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
                    log(f"{name} K=M={K} {impl}: {note}")
                    rows.append((name, K, impl, None, None, note))
                    return
                case[impl] = ms
                note = f"first call {first:.1f} s" if impl == "compile" else ""
                peak_s = f"peak +{peak / 2**20:.0f} MiB" if peak is not None else ""
                log(f"{name} K=M={K} {impl}: {ms:.2f} ms {peak_s} {note}")
                rows.append((name, K, impl, ms, peak, note))
                free_memory(cuda)

            record("floor", lambda: bench.matmul_floor(a, b))  # the four GEMMs the op needs
            record("fused", fwd_bwd(fused_loss, a, b))
            if not args.no_reference:
                record("eager", fwd_bwd(ref_loss, a, b))
                if not args.no_compile:
                    compiled = torch.compile(ref_loss, dynamic=False)
                    record("compile", fwd_bwd(compiled, a, b))
                    del compiled
                    torch._dynamo.reset()
            if "floor" in case and "fused" in case:
                log(f"{name} K=M={K}: fused / floor = {case['fused'] / case['floor']:.2f}")
            del a, b

    # The table.
    floors = {(r[0], r[1]): r[3] for r in rows if r[2] == "floor" and r[3] is not None}
    print()
    print(f"InfoNCE forward + backward, K = M, d = {d}, scale = {scale:.3g}; {where}, torch {torch.__version__}")
    header = (f"{'dtype':<6} {'K=M':>6} {'impl':<8} {'median ms':>10} {'peak+ MiB':>10} {'vs floor':>9} "
              f"{'bw-bound ms':>11}  note")
    print(header)
    print("-" * len(header))
    for name, K, impl, ms, peak, note in rows:
        fl = floors.get((name, K))
        ratio = f"{ms / fl:.2f}x" if (ms is not None and fl) else ""
        ms_s = f"{ms:.2f}" if ms is not None else "-"
        peak_s = f"{peak / 2**20:.0f}" if peak is not None else "-"
        bw = sum(design_bytes(K, K, d, name).values()) / (bandwidth * 1e12) * 1e3 if impl == "fused" else None
        bw_s = f"{bw:.2f}" if bw is not None else ""
        print(f"{name:<6} {K:>6} {impl:<8} {ms_s:>10} {peak_s:>10} {ratio:>9} {bw_s:>11}  {note}")
    flops = {K: 4 * 2 * K * K * d for K in args.sizes}
    print(f"floor = 4 GEMMs of K x M x d ({', '.join(f'K={K}: {flops[K] / 1e12:.3g} TFLOP' for K in args.sizes)}) "
          "in the input dtype; peak+ = max_memory_allocated during the call minus what was allocated before.")
    print("bw-bound = the bytes the fused call moves by design (below) at the device's bandwidth.")
    print()
    print("\n".join(design_table(args.sizes, d, args.dtypes, peaks, bandwidth)))
    log(f"done in {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
