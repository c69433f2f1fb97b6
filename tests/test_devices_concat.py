"""The CUDA kernels of concat_score_reduce (on a GPU, and their own code emulated on the
CPU): registration, determinism over several chunks, streams, no host synchronisation,
K * M past 2^31, and awkward sizes against the CPU op. The behaviours every backend
shares are tested once, on every backend, in tests/test_concat.py (whose input maker
and oracle these checks use).
"""

import pytest
import torch

import infomax_ext
from infomax_ext import ops
from test_concat import TAU, case_id, close, fused, make_inputs, on_device, oracle, weighted_grads, weights_for
from helpers import TILE_ENV, cpu_kernels, needs_cuda, on_cuda_backends, set_tile

pytestmark = [
    pytest.mark.usefixtures("default_cuda_tiles"),
    pytest.mark.skipif(not infomax_ext._backend.HAS_C, reason="compiled module not built"),
]


@needs_cuda
def test_cuda_kernels_are_registered():
    for op in ("concat_score_reduce", "_concat_score_reduce_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"infomax_ext::{op}", "CUDA"), op


@on_cuda_backends
def test_reruns_are_bitwise_identical(monkeypatch, device):
    monkeypatch.setenv(TILE_ENV, "4096")  # several row chunks
    dev = on_device(make_inputs(150, 1100, 40, seed=11, dtype=torch.float32), device)
    runs = []
    for _ in range(2):
        out = fused(*dev, "gelu", 0)
        runs.append(out + torch.autograd.grad(out[0].sum() + out[1].sum() + out[4].sum(), dev))
    for x, y in zip(*runs):
        assert torch.equal(x, y)


@needs_cuda
def test_other_device_and_current_stream():
    dev = torch.device("cuda", torch.cuda.device_count() - 1)
    host = make_inputs(40, 90, 8, seed=6, dtype=torch.float32)
    inputs = [t.detach().to(dev).requires_grad_() for t in host]
    s = torch.cuda.Stream(device=dev)
    s.wait_stream(torch.cuda.current_stream(dev))
    with torch.cuda.device(dev), torch.cuda.stream(s):
        out = fused(*inputs, "softplus", 7)
        grads = torch.autograd.grad(out[0].sum() + out[1].sum(), inputs)
    s.synchronize()
    want = fused(*host, "softplus", 7)
    wgrads = torch.autograd.grad(want[0].sum() + want[1].sum(), host)
    for f, o in zip(out + grads, want + wgrads):
        assert f.device == dev
        close(f, o, rtol=1e-4, atol=1e-5)


@needs_cuda
def test_kernels_do_not_synchronise():
    P, Q, w2, b2 = on_device(make_inputs(70, 600, 17, seed=12, dtype=torch.float32, requires_grad=False), "cuda")
    g = torch.Generator(device="cuda").manual_seed(0)
    grads = [torch.randn(n, device="cuda", generator=g) for n in (70, 600, 70, 70, 70)]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        outs = torch.ops.infomax_ext.concat_score_reduce(P, Q, w2, b2, 2, 17, 31, TAU)
        back = torch.ops.infomax_ext._concat_score_reduce_backward(*grads, P, Q, w2, b2, 2, *outs[:4], 17, 31, TAU)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert all(torch.isfinite(t).all() for t in back)


@pytest.mark.slow
@needs_cuda
def test_int64_indexing_beyond_2_pow_31():
    """K * M > 2^31 (H = 2): a few rows and columns against torch on the same inputs."""
    K = M = 47000
    g = torch.Generator(device="cuda").manual_seed(0)
    P = torch.randn(K, 2, device="cuda", generator=g)
    Q = torch.randn(M, 2, device="cuda", generator=g)
    w2 = torch.tensor([0.7, -0.4], device="cuda")
    b2 = torch.tensor(0.1, device="cuda")
    row, col = fused(P, Q, w2, b2, "tanh", 0, ops.ROW_LSE | ops.COL_LSE)[:2]
    rows = torch.tensor([0, 1, K // 2, K - 1], device="cuda")
    S_rows = (w2 * torch.tanh(P[rows, None, :].double() + Q[None].double())).sum(-1) + b2
    torch.testing.assert_close(row[rows].double(), torch.logsumexp(S_rows, 1), rtol=1e-5, atol=1e-5)
    cols = torch.tensor([0, M // 3, M - 1], device="cuda")
    S_cols = (w2 * torch.tanh(P[:, None, :].double() + Q[None, cols].double())).sum(-1) + b2
    torch.testing.assert_close(col[cols].double(), torch.logsumexp(S_cols, 0), rtol=1e-5, atol=1e-5)


# K = 1: partial tiles and warps; 31, 33: either side of the 32 x 32 tile; 257: nine row
# tiles; H = 33, 40: past one 32-wide hidden chunk. 4 KiB workspaces: several row chunks.
AWKWARD = [(1, 40, 5, 17), (31, 100, 33, 69), (33, 33, 8, 0), (257, 300, 40, 43)]


@on_cuda_backends
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("tile", [None, "4096"])
@pytest.mark.parametrize("case", AWKWARD, ids=case_id)
def test_awkward_sizes_match_cpu_op_and_oracle(case, tile, dtype, monkeypatch, device):
    set_tile(monkeypatch, tile)
    K, M, H, off = case
    host = make_inputs(K, M, H, seed=K, dtype=dtype)
    dev = on_device(host, device)
    weights = weights_for([torch.empty(n) for n in (K, M, K, K, K)], K)
    got = fused(*dev, "gelu", off)
    g_got = weighted_grads(got, [w.to(device=device, dtype=got[0].dtype) for w in weights], dev)
    with cpu_kernels():
        cpu = fused(*host, "gelu", off)
        g_cpu = weighted_grads(cpu, [w.to(cpu[0].dtype) for w in weights], host)
    for x, y in zip(got, cpu):
        close(x, y, rtol=1e-5, atol=1e-5)
    for x, y in zip(g_got, g_cpu):
        assert x.dtype == dtype
        close(x, y, rtol=1e-2 if dtype == torch.bfloat16 else 1e-6, atol=1e-6 * y.abs().max().item() + 1e-6)
    if dtype == torch.float64:
        for x, y in zip(got, oracle(*host, "gelu", off)):
            close(x, y)
