#!/usr/bin/env bash
# Builds the extension with ThreadSanitizer and with AddressSanitizer and runs the tests of
# the emulated CUDA backend under each (the CUDA kernels' own code, executed on the CPU):
# a data race on the storage that stands in for __shared__ (a missing __syncthreads) fails
# the TSAN run, an out-of-bounds index fails the ASAN run.
#
#     tools/sanitize.sh            # both
#     tools/sanitize.sh thread     # or: address
#     tools/sanitize.sh address -x tests/test_emulation.py   # other pytest arguments
#
# Each sanitizer builds in its own copy of the working tree (build/sanitize-<name>/, the
# CPU and emulated sources only, -O1 -g), so the checkout's own build is left alone. The
# instrumented module is loaded into an uninstrumented Python with LD_PRELOAD. The CPU
# kernels run on one thread (OMP_NUM_THREADS=1): TSAN cannot see OpenMP's barriers. With
# both sanitizers, each one's tests start in the background as soon as its build is done
# (one core each), and their logs are printed when both have finished.
# Exit status: non-zero when a build fails, a test fails or a sanitizer reports.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)
PY=${PYTHON:-$ROOT/.venv/bin/python}
WHICH=${1:-all}
[ $# -gt 0 ] && shift
case "$WHICH" in
  all) SANITIZERS="thread address" ;;
  thread|address) SANITIZERS=$WHICH ;;
  *) echo "usage: tools/sanitize.sh [all|thread|address] [pytest arguments]" >&2; exit 2 ;;
esac
# NB: by default every emulated test but those that walk hundreds of chunks (K >= 257,
# K = 300 with 1 KiB chunks, 1100 and 2048 rows, the fp16 tests of 1100 x 8192) and the
# tile kernels' shared-memory rule at d = 672 to 800 (test_devices runs both staging
# schemes): the same kernels and code paths as the smaller cases, at 10-50x the time
# under a sanitizer.
SKIP="K300 or K257 or 257- or 1100 or larger_problem or one-walk or tiny_g or fp16_zero or fp16_nan or keep_a_resident"
[ -x "$PY" ] || { echo "sanitize: no Python at $PY (run ./setup.sh, or set PYTHON)" >&2; exit 2; }

PARALLEL=0
[ "$(wc -w <<<"$SANITIZERS")" -gt 1 ] && PARALLEL=1
PIDS=() NAMES=() STARTS=()
# NB: a failed build or self-check exits early: the tests already in the background go too.
trap 'for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done' EXIT
for san in $SANITIZERS; do
  T0=$(date +%s)
  if [ $# -gt 0 ]; then
    ARGS=("$@")
  elif [ "$san" = thread ]; then
    # NB: TSAN looks for a missing barrier: it needs every kernel, template instance and
    # barrier path once, not every value. The device test files are written to reach all
    # of them (every op, dtype, chunk and tile scheme, partial warps and tiles); beside
    # them, every concat activation, every single reduction, and the float one-walk
    # gradient. The wrong-argument cases stop at the host's checks, before any kernel
    # runs; the fuzz tests draw more values over the same paths. The address run keeps
    # the whole selection (random shapes are what it looks for); the whole of it under TSAN:
    #   tools/sanitize.sh thread tests -k "(emulated or emulation) and not (...)"
    ARGS=(tests/test_devices.py tests/test_devices_concat.py tests/test_emulation.py
          tests/test_concat.py::test_float64_values_and_gradients_match_oracle
          tests/test_concat.py::test_single_reduction_only_fills_its_output
          tests/test_score_reduce.py::test_single_reduction_only_fills_its_output
          tests/test_weighted.py::test_cuda_one_walk_and_fallback_match_reference
          -k "(emulated or emulation) and not ($SKIP or wrong_argument or fuzz)")
  else
    ARGS=(tests -k "(emulated or emulation) and not ($SKIP)")
  fi
  dir=build/sanitize-$san
  mkdir -p "$dir"
  # NB: a copy of the tracked and untracked (not ignored) files; build outputs are kept
  # between runs so a rebuild is incremental.
  git ls-files -co --exclude-standard -z | tar --null -T - -cf - | tar -xf - -C "$dir"
  echo "sanitize: building with -fsanitize=$san in $dir"
  if ! (cd "$dir" && FORCE_CPU=1 SANITIZE=$san MAX_JOBS=${MAX_JOBS:-$(nproc)} "$PY" setup.py -q build_ext --inplace \
          >build.log 2>&1); then
    tail -n 30 "$dir/build.log" >&2
    echo "sanitize: the $san build failed (log: $dir/build.log)" >&2
    exit 1
  fi
  if [ "$san" = thread ]; then
    lib=$(gcc -print-file-name=libtsan.so)
    export TSAN_OPTIONS="halt_on_error=1 exitcode=66 report_signal_unsafe=0 ${TSAN_OPTIONS:-}"
  else
    # NB: libstdc++ preloaded beside ASan, so ASan finds the real __cxa_throw for its
    # interceptor (triton, which torch.compile imports, throws while loading).
    lib="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libstdc++.so)"
    # NB: Python itself leaks by design at exit; leaks are not what this run looks for.
    export ASAN_OPTIONS="detect_leaks=0 halt_on_error=1 exitcode=66 ${ASAN_OPTIONS:-}"
  fi
  if [ "$san" = thread ]; then
    # The check must be able to fail: a kernel without its __syncthreads is a reported race.
    if out=$(cd "$dir" && LD_PRELOAD="$lib" "$PY" -c \
        "import infomax_ext; infomax_ext._backend._C._emulation_selftest('no_barrier')" 2>&1) \
        || ! grep -q "ThreadSanitizer: data race" <<<"$out"; then
      echo "sanitize: TSAN did not report the kernel without its barrier" >&2; exit 1
    fi
    echo "sanitize: TSAN reports the self-test kernel without its barrier (as it must)"
  fi
  echo "sanitize: pytest ${ARGS[*]} under $san"
  # NB: -s: a sanitizer report must reach the terminal (or the log) before it ends the process.
  run=(env INFOMAX_SANITIZER=$san OMP_NUM_THREADS=1 LD_PRELOAD="$lib"
       "$PY" -m pytest -q -s -p no:cacheprovider -p no:faulthandler "${ARGS[@]}")
  if [ "$PARALLEL" = 1 ]; then
    (cd "$dir" && "${run[@]}") >"$dir/pytest.log" 2>&1 &
    PIDS+=($!) NAMES+=("$san") STARTS+=("$T0")
    echo "sanitize: $san tests running in the background (log: $dir/pytest.log)"
  else
    (cd "$dir" && "${run[@]}")
    echo "sanitize: $san passed in $(( $(date +%s) - T0 )) s"
  fi
done

status=0
for i in "${!PIDS[@]}"; do
  if wait "${PIDS[$i]}"; then result=passed; else result=FAILED; status=1; fi
  echo "sanitize: --- ${NAMES[$i]} (build/sanitize-${NAMES[$i]}/pytest.log) ---"
  cat "build/sanitize-${NAMES[$i]}/pytest.log"
  echo "sanitize: ${NAMES[$i]} $result in $(( $(date +%s) - ${STARTS[$i]} )) s"
done
exit $status
