"""The losses against the lines a user writes without this library, side by side.

For InfoNCE, symmetric InfoNCE (CLIP) and NT-Xent, forward + backward in float32:

  fused          the drop-in losses: ie.InfoNCELoss(t, normalize=False), with
                 symmetric=True for CLIP, and ie.NTXentLoss(t)
  eager          F.cross_entropy(scale * a @ b.T, arange(K)) (CLIP: rows and columns;
                 NT-Xent: the 2K x 2K similarities with the diagonal masked)
  eager_compile  torch.compile of that line
  floor3         InfoNCE only: the three K x M x d matmuls of a forward + backward

Each case's first call is checked against the float64 eager line before it is timed
(``infomax_ext.bench.make_case``, the cases of ``python -m infomax_ext bench``).

    pytest benchmarks/bench_baselines.py --benchmark-only                       # everything
    pytest benchmarks/bench_baselines.py --benchmark-only -k "infonce and d128 and t1"
"""
import pytest
import torch

from infomax_ext import bench

SIZES = [256, 512, 1024, 2048, 4096]
DIMS = [64, 128, 512]
THREADS = [1, 2]
CASES = [(op, impl) for op in ("infonce", "clip", "ntxent") for impl in bench.OPS[op]
         if impl in ("fused", "eager", "eager_compile", "floor3")]


@pytest.fixture
def threads(request):
    n = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(n)


@pytest.mark.parametrize("threads", THREADS, indirect=True, ids=lambda t: f"t{t}")
@pytest.mark.parametrize("d", DIMS, ids=lambda d: f"d{d}")
@pytest.mark.parametrize("K", SIZES, ids=lambda k: f"K{k}")
@pytest.mark.parametrize("op, impl", CASES, ids=[f"{op}-{impl}" for op, impl in CASES])
def test_loss_fwd_bwd(benchmark, op, impl, K, d, threads):
    benchmark.group = f"{op} fwd+bwd K=M={K} d={d} float32 threads={threads}"
    run = bench.make_case(op, impl, K=K, d=d)
    out = run()  # warm-up (and compilation), then the check
    if hasattr(run, "check"):
        ok, message = run.check(out)
        assert ok, message
    benchmark(run)
