#!/usr/bin/env bash
# One-shot GPU check for a machine with a CUDA GPU (Python + a CUDA build of torch with
# pytest and ninja preinstalled, no network needed). From the repository root:
#
#     bash benchmarks/gpu_check.sh
#
# 1. builds the extension for the local GPU arch only (TORCH_CUDA_ARCH_LIST from
#    torch.cuda.get_device_capability()) and checks that the CUDA kernels are in it;
# 2. runs the device tests (every CUDA case, the multi-chunk ones included; the fp16/bf16
#    cases on both the chunk and the tile kernels), then the rest;
# 3. runs compute-sanitizer (memcheck, racecheck, synccheck) on a few small CUDA cases,
#    the tile kernels' among them;
# 4. runs benchmarks/bench_gpu.py (InfoNCE fused on either path vs eager vs torch.compile
#    vs the GEMM floor, at d = 512 and 128, with the bytes each path moves by design).
# Every phase runs under a time limit taken from one deadline (GPU_CHECK_SECONDS, default
# 470 s) so that the whole script ends within 8 minutes; the benchmark runs even if the
# tests fail, and stops starting new cases shortly before the deadline. Exit status: 0
# when every phase passed, 1 when one failed, 2 without a GPU.
# Environment: PYTHON (default python), MAX_JOBS, TORCH_CUDA_ARCH_LIST (override),
# GPU_CHECK_SECONDS, PYTEST_ARGS (default "-q -x"), BENCH_ARGS (extra bench_gpu.py arguments).
set -u -o pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-python}"
T0=$(date +%s)
DEADLINE=$(( T0 + ${GPU_CHECK_SECONDS:-470} ))
say() { echo "[gpu_check +$(( $(date +%s) - T0 ))s] $*"; }
left() {  # seconds left before the deadline, at most $1, at least 10
    local l=$(( DEADLINE - $(date +%s) ))
    [ "$l" -gt "$1" ] && l=$1
    [ "$l" -lt 10 ] && l=10
    echo "$l"
}

say "repository $(pwd), $(date)"
if ! "$PY" - <<'PYEOF'
import sys, torch
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, CUDA {torch.version.cuda}")
if not torch.cuda.is_available():
    print("gpu_check: no CUDA device visible; this script needs a GPU")
    sys.exit(1)
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"cuda:{i} {p.name}, {p.total_memory / 2**30:.0f} GiB, capability {p.major}.{p.minor}")
PYEOF
then
    exit 2
fi

ARCH=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$ARCH}"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
export FORCE_CUDA=1  # fail loudly rather than build a CPU-only module on a GPU machine

# --- 1. build -----------------------------------------------------------------------
say "build: pip install --no-build-isolation --no-deps -e . (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST, MAX_JOBS=$MAX_JOBS)"
BUILD_LOG=$(mktemp)
if timeout "$(left 240)" "$PY" -m pip install --no-build-isolation --no-deps -v -e . >"$BUILD_LOG" 2>&1; then
    BUILD=ok
else
    say "pip install failed (last lines below); falling back to setup.py build_ext --inplace"
    tail -n 30 "$BUILD_LOG"
    if timeout "$(left 240)" "$PY" setup.py build_ext --inplace >"$BUILD_LOG" 2>&1; then BUILD=ok; else BUILD=FAILED; fi
fi
grep -E "infomax_ext .*building backends|score_reduce_cuda|error" "$BUILD_LOG" | cut -c1-240 | head -n 20
if [ "$BUILD" != ok ]; then
    tail -n 60 "$BUILD_LOG"
    say "BUILD FAILED"
    exit 1
fi
if ! "$PY" - <<'PYEOF'
import torch, infomax_ext
info = infomax_ext.build_info()
print("build_info:", {k: v for k, v in info.items() if k != "aten_parallel"})
ok = "cuda" in info.get("backends", []) and all(
    torch._C._dispatch_has_kernel_for_dispatch_key(f"infomax_ext::{op}", "CUDA")
    for op in ("score_reduce", "_score_reduce_backward"))
raise SystemExit(0 if ok else 1)
PYEOF
then
    say "BUILD has no CUDA kernels"
    exit 1
fi
say "build ok"

# --- 2. tests -----------------------------------------------------------------------
# NB: the CUDA tests first (they are what this machine is for), then the CPU suite
# without the slow-marked checks, in whatever time the phase has left.
CUDA_TESTS="tests/test_build.py tests/test_devices.py tests/test_devices_concat.py"
say "tests: pytest $CUDA_TESTS ${PYTEST_ARGS:--q}"
# shellcheck disable=SC2086
timeout "$(left 150)" "$PY" -m pytest $CUDA_TESTS tests/test_weighted.py ${PYTEST_ARGS:--q} -k "not emulated"
TESTS=$?
say "tests: pytest tests -m 'not slow' (the rest, CPU)"
timeout "$(left 60)" "$PY" -m pytest tests -q -m "not slow" --deselect tests/test_devices.py --deselect tests/test_devices_concat.py || say "CPU suite did not finish or failed (not counted)"
[ "$TESTS" -eq 0 ] && say "tests ok" || say "TESTS FAILED (exit $TESTS)"

# --- 3. compute-sanitizer -----------------------------------------------------------
# NB: a few small cases of each CUDA walker (score_reduce and its one-walk gradient, the
# symmetric op, the concat op; partial warps, several chunks; the tile kernels with A
# resident and with A staged a slab at a time), the emulated ones deselected.
SAN="not slow and cuda and not emulated and (K7-M20 or K33-M33 or K7-M13 or tiny-chunks or 65-128 or (tile_kernels and (K70-M200 or K70-M130)))"
SANITIZER=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null || true)
SANITIZERS=skipped
if [ -n "$SANITIZER" ]; then
    SANITIZERS=ok
    for tool in memcheck racecheck synccheck; do
        say "compute-sanitizer --tool $tool on: $SAN"
        timeout "$(left 60)" "$SANITIZER" --tool "$tool" --error-exitcode 1 --target-processes all \
            "$PY" -m pytest -q -x -p no:cacheprovider tests/test_devices.py tests/test_devices_concat.py -k "$SAN" \
            2>&1 | tail -n 15 || { SANITIZERS=FAILED; say "compute-sanitizer $tool FAILED"; }
    done
else
    say "compute-sanitizer not found: skipped"
fi

# --- 4. benchmark -------------------------------------------------------------------
BENCH_S=$(left 400)
say "benchmark: benchmarks/bench_gpu.py (${BENCH_S}s left)"
# NB: bench_gpu.py checks its budget only between cases (the largest takes < 1 min).
# shellcheck disable=SC2086
timeout "$BENCH_S" "$PY" benchmarks/bench_gpu.py --time-budget $(( BENCH_S > 90 ? BENCH_S - 60 : 30 )) ${BENCH_ARGS:-}
BENCH=$?
[ "$BENCH" -eq 0 ] && say "benchmark ok" || say "BENCHMARK FAILED (exit $BENCH)"

say "summary: build $BUILD, tests exit $TESTS, compute-sanitizer $SANITIZERS, benchmark exit $BENCH"
[ "$TESTS" -eq 0 ] && [ "$BENCH" -eq 0 ] && [ "$SANITIZERS" != FAILED ]
