"""The bytes-by-design model of benchmarks/bench_gpu.py (what a GPU run compares its
timings with): its terms follow the CUDA walker's passes."""
import importlib.util
import os

import pytest

_path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "bench_gpu.py")
_spec = importlib.util.spec_from_file_location("bench_gpu", _path)
bench_gpu = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_gpu)


def test_score_traffic_is_three_float32_passes_plus_g():
    """S is written once and read twice (fold, gradient) in float32; G (bf16) is written
    once and read by the two G GEMMs: 3 * 4 + 3 * 2 bytes per score."""
    K = M = 4096
    parts = bench_gpu.design_bytes(K, M, 64, "bf16")
    score_parts = ("S write (GEMM)", "S read (fold)", "S read + G write (gradient)", "G read (2 G GEMMs)")
    assert sum(parts[p] for p in score_parts) == (3 * 4 + 3 * 2) * K * M


def test_column_bias_adds_one_read_of_g():
    without = sum(bench_gpu.design_bytes(2048, 2048, 32, "fp32").values())
    with_cb = sum(bench_gpu.design_bytes(2048, 2048, 32, "fp32", col_bias=True).values())
    assert with_cb - without == 4 * 2048 * 2048


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_bigger_chunks_mean_fewer_passes_over_db(dtype):
    """Each chunk re-reads and rewrites dB (float32): 64 chunks of 256 MiB vs 16 of 1 GiB
    at K = M = 65536, d = 512."""
    K = M = 65536
    small = bench_gpu.design_bytes(K, M, 512, dtype, budget=256 << 20)
    big = bench_gpu.design_bytes(K, M, 512, dtype, budget=1 << 30)
    acc = "dA, dB accumulate (per chunk)"
    assert small[acc] - big[acc] == (64 - 16) * 2 * 4 * M * 512


def test_design_only_prints_without_a_gpu(capsys):
    assert bench_gpu.main(["--design-only", "--sizes", "1024", "--dtypes", "bf16"]) == 0
    out = capsys.readouterr().out
    assert "GB moved" in out and "bf16" in out


def test_fp16_g_is_stored_in_fp16_like_bf16():
    """fp16 G (scaled) moves bf16's bytes per score: no float32 G and no float32 copies of
    a and b; only the scale undone on dA and dB after the walk (float32 read + write)."""
    K = M = 4096
    d = 64
    fp16 = bench_gpu.design_bytes(K, M, d, "fp16")
    bf16 = bench_gpu.design_bytes(K, M, d, "bf16")
    assert fp16.pop("G scale undone on dA, dB (fp16)") == (K + M) * d * 8
    assert fp16 == bf16


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_column_bias_reads_a_float32_copy_of_low_precision_g(dtype):
    """With a column bias the gradient kernel also writes G in float32 and the column sums
    read that: 8 bytes per score."""
    without = sum(bench_gpu.design_bytes(2048, 2048, 32, dtype).values())
    with_cb = sum(bench_gpu.design_bytes(2048, 2048, 32, dtype, col_bias=True).values())
    assert with_cb - without == 8 * 2048 * 2048
