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


def test_tile_path_moves_g_alone_per_score():
    """On the tile path S never leaves the chip: per score only G (bf16) is written once
    and read by the two G GEMMs, 3 * 2 bytes."""
    K = M = 4096
    parts = bench_gpu.design_bytes(K, M, 64, "bf16", kernels="tiles")
    assert parts["G write (gradient tiles)"] + parts["G read (2 G GEMMs)"] == 3 * 2 * K * M
    assert not any(p.startswith("S ") for p in parts)


def test_tile_path_meets_the_60_gb_goal_at_scale():
    """InfoNCE training at K = M = 65536, d = 512, bf16: under 60 GB per call on the tile
    path; the chunk path's three float32 passes over S alone move 3 * 4 * K * M > 51 GB."""
    K = M = 65536
    tiles = sum(bench_gpu.design_bytes(K, M, 512, "bf16", kernels="tiles").values())
    chunks = sum(bench_gpu.design_bytes(K, M, 512, "bf16").values())
    assert tiles < 60e9 < chunks


def test_tile_operands_are_read_once_per_wave():
    """B is read once per wave of 2 x 132 blocks of 64 rows (16896 rows): K = 16896 is one
    wave in the forward, K = 16897 two."""
    one = bench_gpu.design_bytes(16896, 1000, 8, "bf16", kernels="tiles")
    two = bench_gpu.design_bytes(16897, 1000, 8, "bf16", kernels="tiles")
    key = "a, b reads (forward tiles)"
    assert two[key] - one[key] == 8 * 2 + 1000 * 8 * 2


def test_tile_l2_staging_halves_when_a_stays_resident():
    """K = M = 65536 (1024 x 1024 tiles, one split per row block), two walks: at d = 512
    each tile stages B's 64 x 512 panel and each block A's once; at d = 673 (padded to
    704, too big for two resident blocks per SM) each tile stages both."""
    n = 1024
    assert bench_gpu.tile_a_resident(672) and not bench_gpu.tile_a_resident(673)
    assert bench_gpu.tile_l2_bytes(65536, 65536, 512, "bf16") == 2 * (n * n + n) * 64 * 512 * 2
    assert bench_gpu.tile_l2_bytes(65536, 65536, 673, "bf16") == 2 * (2 * n * n) * 64 * 704 * 2
    # one row block: its 100 column tiles go to 100 splits, each a block staging A once
    assert bench_gpu.tile_l2_bytes(64, 6400, 32, "fp16") == 2 * (100 + 100) * 64 * 32 * 2


def test_tile_path_takes_fp16_and_bf16_only():
    with pytest.raises(ValueError, match="fp16/bf16"):
        bench_gpu.design_bytes(64, 64, 8, "fp32", kernels="tiles")
    with pytest.raises(ValueError, match="fp16/bf16"):
        bench_gpu.tile_l2_bytes(64, 64, 8, "fp32")
    assert bench_gpu.paths("fp32") == ("chunks",)


def test_design_table_shows_both_paths_for_half_precision(capsys):
    assert bench_gpu.main(["--design-only", "--sizes", "1024", "--dims", "64", "--dtypes", "bf16", "fp32"]) == 0
    out = capsys.readouterr().out
    assert out.count(" tiles ") == 1 and out.count(" chunks ") == 2


def test_cpu_smoke_run_times_both_paths(capsys):
    """The script's own run on the CPU (its smoke mode): the correctness check passes on
    either path, the table has a row for each, and each has its breakdown."""
    argv = ["--device", "cpu", "--sizes", "64", "--dims", "16", "--dtypes", "bf16", "--no-reference",
            "--min-reps", "1", "--max-reps", "1", "--target-s", "0.01"]
    assert bench_gpu.main(argv) == 0
    out = capsys.readouterr()
    assert "FAILED" not in out.out + out.err
    rows = [line.split() for line in out.out.splitlines() if line.startswith("bf16 ")]
    assert {r[3] for r in rows if len(r) > 4} >= {"floor", "fused", "fused-tile"}
    # the breakdown of each path's call lists the op itself among its entries
    for impl in ("fused", "fused-tile"):
        head = f"Kernel breakdown, bf16 K=M=64 d=16 {impl} "
        assert out.out.count(head) == 1
        block = out.out.split(head)[1].split("\n\n")[0]
        assert "infomax_ext::" in block
