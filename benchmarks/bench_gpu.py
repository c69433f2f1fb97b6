"""GPU benchmark: InfoNCE forward + backward, fused vs plain torch, with the GEMM floor.

For K = M in --sizes, d in --dims and each dtype, times one forward + backward of

  fused     infomax_ext.infonce(a, b, scale)                       (S never stored)
  fused-tile  the same call on the tile kernels (fp16/bf16; INFOMAX_EXT_CUDA_TILE_KERNELS=1)
  eager     reference.infonce(reference.scores_dot(a, b, scale))   (S materialised)
  compile   torch.compile of the same reference function
  floor     the 4 plain GEMMs of K x M x d the op needs (S, S again in backward,
            G B, G^T A) in the input dtype: no implementation can beat it by much

and prints the median time (synchronised, after a first call), the peak memory above
what was allocated before the call (inputs and their gradients' owners excluded),
and the ratio to the floor; then, for the largest K of each fp16/bf16 case, the kernels
each fused path spends its time in (torch.profiler, one call). A case that does not fit
prints OOM. The floor and the fused paths of every case run first, the references after
them; nothing new starts once --time-budget seconds have passed.

Run from the repository root on a GPU machine after building the extension:

    python benchmarks/bench_gpu.py                 # K = M in 8192 32768 65536, d in 512 128
    python benchmarks/bench_gpu.py --sizes 4096 --dtypes fp32 --no-compile

Exit status: 0 after a run, 2 when there is no CUDA device or no CUDA build.
"""
import argparse
import contextlib
import gc
import os
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
KERNELS_ENV = "INFOMAX_EXT_CUDA_TILE_KERNELS"
TILE_ROWS = 64  # rows (and columns) of one tile kernel block
SM_COUNT = 132  # an H100's or H200's SMs: a wave of the tile kernels is 2 blocks per SM
SMEM_PER_SM = 228 << 10  # an H100's or H200's shared memory per SM
TILE_DEPTH = 32  # features per staged slab of the tile kernels
TILE_STATIC_SMEM = 2 * TILE_ROWS * (TILE_DEPTH + 8) * 2 + TILE_ROWS * (TILE_ROWS + 4) * 4  # B's slabs, the tile


def ceil_div(a, b):
    return -(-a // b)


@contextlib.contextmanager
def on_path(path):
    """The CUDA walker's path ("chunks", the default, or "tiles") for the calls inside:
    the ops read the switch per call, forward and backward."""
    if path == "tiles":
        os.environ[KERNELS_ENV] = "1"
    try:
        yield
    finally:
        os.environ.pop(KERNELS_ENV, None)


def finish_bytes(K, M, d, dtype):
    """After the walk, on either path: for fp16, dA and dB divided by G's scale; dscale,
    the scaling and the casts of dA and dB."""
    e = ELEM[dtype]
    return {
        "G scale undone on dA, dB (fp16)": (K + M) * d * (4 + 4) if dtype == "fp16" else 0,
        "dscale, scale, cast": (K + M) * d * (4 + 4 + 4 + 4 + e) + K * d * e,
    }


def design_bytes(K, M, d, dtype, col_bias=False, budget=CHUNK_BUDGET, kernels="chunks"):
    """HBM bytes one fused InfoNCE forward + backward moves by design on the CUDA walker,
    as {part: bytes}: on the chunk path (kernels="chunks", the default) or on the tile
    path (kernels="tiles", fp16/bf16 only: see tile_design_bytes).

    The chunk path's one walk (S, G B, G^T A per chunk of whole rows):

    Per chunk of R rows (R x M float32 scores within the budget): the S GEMM writes the
    chunk and reads B; the fold kernel reads it; the gradient kernel reads it and writes G
    (in the input dtype for fp16/bf16 inputs, fp16 scaled by a power of two; float32
    otherwise); with a column bias the column-sum pass reads G in float32 (for fp16/bf16
    a float32 copy, which the gradient kernel writes too); the two G GEMMs read G and
    their operands (in the input dtype) and accumulate into float32 dA rows and all of
    dB (read + write). Then finish_bytes. O(K + M) terms (G's scale among them) and the
    positive term (O((K + M) d)) are left out."""
    if kernels == "tiles":
        return tile_design_bytes(K, M, d, dtype, col_bias, budget)
    e = ELEM[dtype]
    g = 4 if dtype == "fp32" else e  # bytes of a stored G
    R = max(1, min(K, budget // (4 * M)))
    n = ceil_div(K, R)
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
        **finish_bytes(K, M, d, dtype),
    }
    return {k: v for k, v in parts.items() if v}


def tile_design_bytes(K, M, d, dtype, col_bias=False, budget=CHUNK_BUDGET, sms=SM_COUNT):
    """The tile path's bytes (fp16/bf16), as design_bytes: S is never stored.

    The forward tile kernel makes S 64 x 64 at a time on chip and keeps per-row states
    (O(K)). The backward walks chunks of R rows (R x M of G in the input dtype within the
    budget): the gradient tile kernel makes S again on chip and writes G once (with a
    column bias also a float32 partial column sum per block of 64 rows, written and read
    once); the two G GEMMs read G and their operands and accumulate as on the chunk path.
    A tile kernel reads A once and B once per wave of 2 blocks per SM: the blocks of a
    wave sweep the same tiles of B, which L2 serves to all of them. Then finish_bytes."""
    if "tiles" not in paths(dtype):
        raise ValueError(f"the tile path takes fp16/bf16 inputs, not {dtype}")
    e = ELEM[dtype]
    KM = K * M
    R = max(1, min(K, budget // (e * M)))
    n = ceil_div(K, R)
    wave_rows = 2 * sms * TILE_ROWS
    parts = {
        "a, b reads (forward tiles)": K * d * e + ceil_div(K, wave_rows) * M * d * e,
        "a, b reads (gradient tiles, per chunk)": K * d * e + n * ceil_div(R, wave_rows) * M * d * e,
        "G write (gradient tiles)": e * KM,
        "column partials write + read (column bias)": 2 * 4 * ceil_div(K, TILE_ROWS) * M if col_bias else 0,
        "G read (2 G GEMMs)": 2 * e * KM,
        "a, b reads (2 G GEMMs, per chunk)": n * M * d * e + K * d * e,
        "dA, dB accumulate (per chunk)": 2 * 4 * K * d + n * 2 * 4 * M * d,
        **finish_bytes(K, M, d, dtype),
    }
    return {k: v for k, v in parts.items() if v}


def slab_padded(d):
    """d rounded up to whole slabs: the features the tile kernels stage per row."""
    return ceil_div(d, TILE_DEPTH) * TILE_DEPTH


def tile_a_resident(d):
    """Whether the tile kernels keep a block's 64 rows of A (all d features, padded to a
    slab, 8 more elements a row) in shared memory: while two blocks still fit in an SM,
    1 KiB of each the system's."""
    resident = TILE_ROWS * (slab_padded(d) + 8) * 2
    return 2 * (TILE_STATIC_SMEM + resident + 1024) <= SMEM_PER_SM


def tile_l2_bytes(K, M, d, dtype, sms=SM_COUNT):
    """Bytes the tile kernels of one training call stage from L2 into shared memory (not
    HBM traffic: design_bytes counts that). The forward and the gradient walk each make
    every 64 x 64 tile once and stage its 64 rows of B, features padded to a slab; A's 64
    rows too, per tile, unless they are resident (tile_a_resident): then once per block.
    A launch spreads the column tiles over splits until 2 blocks per SM are busy."""
    if "tiles" not in paths(dtype):
        raise ValueError(f"the tile path takes fp16/bf16 inputs, not {dtype}")
    row_panel = TILE_ROWS * slab_padded(d) * ELEM[dtype]  # 64 staged rows
    row_blocks, col_tiles = ceil_div(K, TILE_ROWS), ceil_div(M, TILE_ROWS)
    per_split = ceil_div(col_tiles, max(1, min(ceil_div(2 * sms, row_blocks), col_tiles)))
    blocks = row_blocks * ceil_div(col_tiles, per_split)
    a_panels = blocks if tile_a_resident(d) else row_blocks * col_tiles
    return 2 * (row_blocks * col_tiles + a_panels) * row_panel


PATH_OF_IMPL = {"fused": "chunks", "fused-tile": "tiles"}  # the CUDA walker's path of each fused line


def paths(dtype):
    """The CUDA walker's paths for a dtype: the tile path takes fp16/bf16 only."""
    return ("chunks", "tiles") if dtype in ("bf16", "fp16") else ("chunks",)


def bw_bound_ms(K, d, dtype, path, bandwidth_tbs):
    """The time the design bytes of K = M take at the device's bandwidth."""
    return sum(design_bytes(K, K, d, dtype, kernels=path).values()) / (bandwidth_tbs * 1e12) * 1e3


def design_table(sizes, dims, dtypes, peaks, bandwidth_tbs):
    """Lines of the design table: bytes moved, the bandwidth-bound time and the GEMM floor
    (3 GEMMs on the chunk path's one walk; 4 on the tile path, which makes S twice), and
    for the tile path the bytes its kernels stage from L2 (cuBLAS's own are not counted)."""
    lines = [f"By design (InfoNCE fwd+bwd, workspace budget {CHUNK_BUDGET >> 20} MiB, no column bias; "
             f"{bandwidth_tbs:g} TB/s, peak TFLOP/s {peaks}):",
             f"{'dtype':<6} {'K=M':>6} {'d':>5} {'path':<7} {'GB moved':>9} {'bw-bound ms':>12} "
             f"{'GEMMs':>6} {'GEMM ms':>8} {'bound by':>9} {'L2 GB':>6}"]
    for name in dtypes:
        for d in dims:
            for K in sizes:
                for path in paths(name):
                    total = sum(design_bytes(K, K, d, name, kernels=path).values())
                    bw_ms = bw_bound_ms(K, d, name, path, bandwidth_tbs)
                    gemms = 4 if path == "tiles" else 3
                    gemm_ms = gemms * 2 * K * K * d / (peaks[name] * 1e12) * 1e3
                    l2 = f"{tile_l2_bytes(K, K, d, name) / 1e9:.1f}" if path == "tiles" else "-"
                    lines.append(f"{name:<6} {K:>6} {d:>5} {path:<7} {total / 1e9:>9.1f} {bw_ms:>12.2f} "
                                 f"{gemms:>6} {gemm_ms:>8.2f} {'memory' if bw_ms > gemm_ms else 'GEMM':>9} {l2:>6}")
    return lines


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[8192, 32768, 65536], help="K = M values")
    p.add_argument("--dims", type=int, nargs="+", default=[512, 128], help="feature sizes d")
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


def kernel_breakdown(fn, cuda, top=6):
    """[(name, calls, ms)] of the kernels one call of fn (after a first one) runs on the
    GPU, most time first, from torch.profiler; on the CPU (the smoke mode), its ops' own
    CPU time."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    fn()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        fn()
        if cuda:
            torch.cuda.synchronize()
    events = prof.key_averages()
    if cuda:
        timed = [(e, e.self_device_time_total) for e in events
                 if e.device_type == torch.autograd.DeviceType.CUDA and e.self_device_time_total > 0]
        # NB: where a torch version files kernels under their launching op, take those.
        timed = timed or [(e, e.self_device_time_total) for e in events if e.self_device_time_total > 0]
    else:
        timed = [(e, e.self_cpu_time_total) for e in events if e.self_cpu_time_total > 0]
    timed.sort(key=lambda x: -x[1])
    return [(e.key, e.count, us / 1e3) for e, us in timed[:top]]


def main(argv=None):
    args = parse_args(argv)
    if args.design_only:
        print("\n".join(design_table(args.sizes, args.dims, args.dtypes, *device_peaks(args))))
        return 0
    import torch

    # NB: "fused" is the default (chunk) path whatever the caller's environment says;
    # "fused-tile" sets the switch around its own calls (on_path).
    os.environ.pop(KERNELS_ENV, None)

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

    def fused_loss(a, b):
        return -infomax_ext.infonce(a, b, scale=scale)

    def ref_loss(a, b):
        return -ref.infonce(ref.scores_dot(a, b, scale))

    def fwd_bwd(loss_fn, a, b, path="chunks"):
        def run():
            with on_path(path):
                torch.autograd.grad(loss_fn(a, b), (a, b))
        return run

    # Correctness once, before any timing, on a small case of each dtype and path.
    for name in args.dtypes:
        dt = getattr(torch, DTYPES[name])
        d = args.dims[0]
        g = torch.Generator(device=dev).manual_seed(0)
        a0 = torch.nn.functional.normalize(torch.randn(1024, d, device=dev, generator=g), dim=1)
        b0 = torch.nn.functional.normalize(a0 + 0.5 * torch.randn(1024, d, device=dev, generator=g), dim=1)
        al, bl = a0.to(dt).requires_grad_(True), b0.to(dt).requires_grad_(True)
        # The oracle: float32 reference on the same (rounded) inputs.
        a_r, b_r = al.detach().float().requires_grad_(True), bl.detach().float().requires_grad_(True)
        lr = ref_loss(a_r, b_r)
        gr = torch.autograd.grad(lr, (a_r, b_r))
        for path in paths(name):
            with on_path(path):
                lf = fused_loss(al, bl)
                gf = torch.autograd.grad(lf, (al, bl))
            err_v = abs(lf.item() - lr.item())
            err_g = max((x.float() - y).abs().max().item() / y.abs().max().item() for x, y in zip(gf, gr))
            log(f"check {name} {path} K=M=1024 d={d}: |loss - ref| = {err_v:.2e}, "
                f"max relative grad error {err_g:.2e}")
            tol = 1e-4 if name == "fp32" else 2e-2
            if not (err_v <= tol * max(1.0, abs(lr.item())) and err_g <= tol):
                log(f"FAILED correctness check for {name} {path}: the timings below are of a wrong result")

    def case_inputs(name, d, K):
        """Fresh unit-norm (K, d) inputs a, b of a case, in its dtype, requiring grad."""
        free_memory(cuda)
        g = torch.Generator(device=dev).manual_seed(K)
        dt = getattr(torch, DTYPES[name])
        return [torch.nn.functional.normalize(torch.randn(K, d, device=dev, generator=g), dim=1).to(dt)
                .requires_grad_(True) for _ in range(2)]

    def run_case(name, d, K, impls, rows):
        """Times impls on one case (fresh inputs), appending (dtype, K, d, impl, ms, peak,
        note) rows."""
        tag = f"{name} K=M={K} d={d}"
        a, b = case_inputs(name, d, K)
        fns = {"floor": lambda: bench.matmul_floor(a, b),  # the four GEMMs the op needs
               "fused": fwd_bwd(fused_loss, a, b),
               "fused-tile": fwd_bwd(fused_loss, a, b, path="tiles"),
               "eager": fwd_bwd(ref_loss, a, b)}
        for impl in impls:
            if time.perf_counter() - t_start > args.time_budget:
                log(f"{tag} {impl}: skipped (time budget)")
                rows.append((name, K, d, impl, None, None, "skipped (time budget)"))
                continue
            log(f"{tag} {impl} ...")
            fn = fns.get(impl) or fwd_bwd(torch.compile(ref_loss, dynamic=False), a, b)
            try:
                ms, peak, first = time_fn(fn, args, cuda)
            except Exception as e:  # noqa: BLE001 - report and go on to the next case
                ms = peak = None
                note = "OOM" if is_oom(e) else f"FAILED: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
            else:
                note = f"first call {first:.1f} s" if impl == "compile" else ""
            if impl == "compile":
                torch._dynamo.reset()
            del fn
            free_memory(cuda)
            log(f"{tag} {impl}: " + (f"{ms:.2f} ms peak +{peak / 2**20:.0f} MiB {note}" if ms is not None
                                      else note))
            rows.append((name, K, d, impl, ms, peak, note))

    # NB: two passes over the cases: the floor and the fused paths of every case first,
    # then the references (eager, and torch.compile with its slow first call) in the time
    # left, so a short budget still compares the paths everywhere.
    rows = []
    cases = [(n, d, K) for n in args.dtypes for d in args.dims for K in args.sizes]
    passes = [("floor", "fused", "fused-tile")]
    if not args.no_reference:
        passes.append(("eager",) if args.no_compile else ("eager", "compile"))
    for impls in passes:
        for name, d, K in cases:
            if "floor" not in impls and not any(r[:3] == (name, K, d) and r[3] == "fused" and r[4] for r in rows):
                continue  # no references where the fused call did not run
            run_case(name, d, K, [i for i in impls if i != "fused-tile" or "tiles" in paths(name)], rows)

    # The table.
    floors = {r[:3]: r[4] for r in rows if r[3] == "floor" and r[4] is not None}
    print()
    print(f"InfoNCE forward + backward, K = M, scale = {scale:.3g}; {where}, torch {torch.__version__}")
    header = (f"{'dtype':<6} {'K=M':>6} {'d':>5} {'impl':<10} {'median ms':>10} {'peak+ MiB':>10} {'vs floor':>9} "
              f"{'bw-bound ms':>11}  note")
    print(header)
    print("-" * len(header))
    order = {impl: n for n, impl in enumerate(("floor", "fused", "fused-tile", "eager", "compile"))}
    rank = {c: n for n, c in enumerate(cases)}
    for name, K, d, impl, ms, peak, note in sorted(rows, key=lambda r: (rank[(r[0], r[2], r[1])], order[r[3]])):
        fl = floors.get((name, K, d))
        ratio = f"{ms / fl:.2f}x" if (ms is not None and fl) else ""
        ms_s = f"{ms:.2f}" if ms is not None else "-"
        peak_s = f"{peak / 2**20:.0f}" if peak is not None else "-"
        path = PATH_OF_IMPL.get(impl)
        bw_s = f"{bw_bound_ms(K, d, name, path, bandwidth):.2f}" if path else ""
        print(f"{name:<6} {K:>6} {d:>5} {impl:<10} {ms_s:>10} {peak_s:>10} {ratio:>9} {bw_s:>11}  {note}")
    print("floor = 4 GEMMs of K x M x d (2 x 4 K M d FLOP) in the input dtype; peak+ = max_memory_allocated "
          "during the call minus what was allocated before.")
    print("bw-bound = the bytes the fused call moves by design on its path (below) at the device's bandwidth.")
    print()

    # Where the fused calls' time goes: per dtype and d, the largest K both paths ran.
    for name in [n for n in args.dtypes if "tiles" in paths(n)]:
        for d in args.dims:
            done = [r[1] for r in rows if r[0] == name and r[2] == d and r[3] == "fused-tile" and r[4]]
            if not done or time.perf_counter() - t_start > args.time_budget:
                continue
            K = max(done)
            a, b = case_inputs(name, d, K)
            for impl, path in PATH_OF_IMPL.items():
                try:
                    top = kernel_breakdown(fwd_bwd(fused_loss, a, b, path), cuda)
                except Exception as e:  # noqa: BLE001 - the breakdown is extra: report and go on
                    print(f"kernel breakdown {name} K=M={K} d={d} {impl}: FAILED {type(e).__name__}: {e}")
                    continue
                total = sum(ms for _, _, ms in top)
                print(f"Kernel breakdown, {name} K=M={K} d={d} {impl} (one call, profiler; top {len(top)}: "
                      f"{total:.2f} ms):")
                for key, calls, ms in top:
                    print(f"    {ms:>9.2f} ms {calls:>6}x  {key[:100]}")
            del a, b
    print()
    print("\n".join(design_table(args.sizes, args.dims, args.dtypes, peaks, bandwidth)))
    log(f"done in {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
