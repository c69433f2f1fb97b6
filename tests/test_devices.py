"""The CUDA kernels' own checks (on a GPU, and their own code emulated on the CPU): the
walks over many chunks, the CUDA kernels against the CPU kernels, streams, no host
synchronisation, awkward sizes of every op. The behaviours every backend shares
(values, gradients, masks, gradcheck, opcheck, low precision) are tested once, on every
backend, in tests/test_score_reduce.py.

On a GPU machine a build without the CUDA kernels fails ``test_cuda_kernels_are_registered``
instead of skipping (a build that drops CUDA silently is a failure).

Convention: S = scale * a b^T + row_bias + col_bias is (K, M), rows are anchors a
(view 1), columns candidates b (view 2), the positive of row i is column
i + pos_offset. ``INFOMAX_EXT_CUDA_TILE_BYTES`` shrinks the CUDA walker's chunk of
S so that small inputs walk many row and column chunks (the merge paths).
"""
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import infomax_ext
from infomax_ext import ops, reference as ref
from helpers import (ARGS, SHAPES, _ids, cpu_kernels, grads_of, gtol, make_inputs, needs_c, needs_cuda,
                     on_both_kernels, on_cuda_backends, set_kernels, set_tile, to_device, tol, weights_like)

pytestmark = [pytest.mark.usefixtures("default_cuda_tiles")]

ALL = ops.ALL_REDUCTIONS


@needs_cuda
def test_cuda_kernels_are_registered():
    assert infomax_ext._backend.HAS_C, f"compiled module missing: {infomax_ext.build_info()}"
    assert "cuda" in infomax_ext.build_info()["backends"], infomax_ext.build_info()
    for op in ("score_reduce", "_score_reduce_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"infomax_ext::{op}", "CUDA"), op


@needs_c
@on_cuda_backends
def test_larger_problem_several_chunks_float32(device, monkeypatch):
    """2048 x 2048 with 1 MiB chunks: 8 row chunks x 2 column chunks, rows longer than a block."""
    set_tile(monkeypatch, str(1 << 20))
    kw = make_inputs(2048, 2048, 64, 0, torch.float32, device, seed=11, scale=0.5)
    fused = ops.score_reduce(**kw, reductions=ALL, clamp_tau=5.0)
    oracle = ref.score_reduce(**kw, reductions=ALL, clamp_tau=5.0)
    for f, o in zip(fused, oracle):
        torch.testing.assert_close(f, o, rtol=2e-5, atol=5e-5)
    w = weights_like(oracle)
    for gf, go in zip(grads_of(fused, w, kw), grads_of(oracle, w, kw)):
        torch.testing.assert_close(gf, go, rtol=1e-4, atol=1e-4)


@needs_c
@needs_cuda
def test_int64_indexing_beyond_2_pow_31():
    """K * M = 2^32 pairs (d = 1, a_i = 1: every row is the same, so the answers follow
    in O(M) from b); 64 row chunks of 1024 x 65536 with the default chunk size."""
    K = M = 1 << 16
    g = torch.Generator().manual_seed(0)
    x = torch.randn(M, 1, generator=g).cuda()
    a = torch.ones(K, 1, device="cuda")
    s = 3.0
    row, col, neg, _, _ = ops.score_reduce(a, x, s, None, None, 0, ops.ROW_LSE | ops.COL_LSE | ops.NEG_LSE)
    xs = s * x[:, 0].double()
    lse = torch.logsumexp(xs, 0)
    torch.testing.assert_close(row.double(), lse.expand(K), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(col.double(), xs + math.log(K), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(neg.double(), lse + torch.log1p(-torch.exp(xs - lse)), rtol=1e-5, atol=1e-4)
    xg = x.clone().requires_grad_()
    row = ops.score_reduce(a, xg, s, None, None, 0, ops.ROW_LSE)[0]
    (gx,) = torch.autograd.grad(row.sum(), xg)
    torch.testing.assert_close(gx[:, 0].double(), K * s * torch.softmax(xs, 0), rtol=1e-4, atol=1e-6)


@needs_c
@on_cuda_backends
@pytest.mark.parametrize("tile", [None, "4096"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", SHAPES, ids=_ids(SHAPES))
def test_cpu_and_cuda_kernels_agree(shape, dtype, tile, device, monkeypatch):
    set_tile(monkeypatch, tile)
    K, M, d, off = shape
    n = SHAPES.index(shape)
    kw = make_inputs(K, M, d, off, dtype, device, seed=100 + n, noncontig=n % 2 == 0, bias=n % 3 != 1,
                     masked=n % 4 == 3)
    kw_cpu = to_device(kw, "cpu")
    red = ALL if n % 4 != 3 else ALL & ~ops.COL_LSE
    out_gpu = ops.score_reduce(**kw, reductions=red, clamp_tau=2.5)
    w = weights_like(out_gpu, seed=n)
    g_gpu = grads_of(out_gpu, w, kw)
    with cpu_kernels():
        out_cpu = ops.score_reduce(**kw_cpu, reductions=red, clamp_tau=2.5)
        g_cpu = grads_of(out_cpu, [x.cpu() for x in w], kw_cpu)
    for g, c in zip(out_gpu, out_cpu):
        assert g.dtype == c.dtype and g.shape == c.shape
        torch.testing.assert_close(g.cpu(), c, **tol(dtype))
    for gg, gc in zip(g_gpu, g_cpu):
        assert gg.dtype == gc.dtype and gg.shape == gc.shape
        torch.testing.assert_close(gg.cpu(), gc, **gtol(dtype))


@needs_c
@on_cuda_backends
def test_reruns_are_bitwise_identical(device):
    kw = make_inputs(300, 517, 33, 200, torch.float32, device, seed=8)
    first = ops.score_reduce(**kw)
    g1 = grads_of(first, weights_like(first), kw)
    second = ops.score_reduce(**kw)
    g2 = grads_of(second, weights_like(second), kw)
    for x, y in zip(first + g1, second + g2):
        assert torch.equal(x, y)


@needs_c
@needs_cuda
def test_other_device_and_current_stream():
    """The kernels follow the input's device (the guard) and the current stream. NB: on a
    one-GPU machine the device is cuda:0, the current one already: only the stream is tested."""
    dev = torch.device("cuda", torch.cuda.device_count() - 1)
    kw = to_device(make_inputs(40, 90, 8, 7, torch.float32, seed=6), dev)
    s = torch.cuda.Stream(device=dev)
    s.wait_stream(torch.cuda.current_stream(dev))  # the inputs were written on the default stream
    with torch.cuda.device(dev), torch.cuda.stream(s):
        fused = ops.score_reduce(**kw)
        grads = grads_of(fused, weights_like(fused), kw)
    s.synchronize()
    oracle = ref.score_reduce(**kw)
    for f, o in zip(fused, oracle):
        assert f.device == dev
        torch.testing.assert_close(f, o, rtol=2e-5, atol=2e-5)
    for gf, go in zip(grads, grads_of(oracle, weights_like(oracle), kw)):
        torch.testing.assert_close(gf, go, **gtol(torch.float32))


@needs_c
@needs_cuda
def test_kernels_do_not_synchronise():
    """scale stays on the device (no .item()): neither CUDA entry point waits for the GPU.
    The ops are called directly so that only this extension's code is under test."""
    kw = make_inputs(300, 517, 33, 200, torch.float32, "cuda", seed=12, requires_grad=False)
    args = tuple(kw[k] for k in ARGS)
    g = torch.Generator(device="cuda").manual_seed(0)
    grads = [torch.randn(n, device="cuda", generator=g) for n in (300, 517, 300, 300, 300)]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        outs = torch.ops.infomax_ext.score_reduce(*args, 200, ALL, 2.0)
        back = torch.ops.infomax_ext._score_reduce_backward(*grads, *args, *outs[:4], 200, ALL, 2.0)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert all(torch.isfinite(t).all() for t in back)


# ---------------------------------------------------------------------------
# Every op of the CUDA walkers at awkward sizes, and with several chunks
# ---------------------------------------------------------------------------

# K = 1, 2: partial warps everywhere; 31, 33: either side of a warp; 257: past a
# column-kernel block of 256 rows. M > K with pos_offset > 0 in most.
AWKWARD = [(1, 40, 3, 17), (2, 2, 5, 0), (31, 100, 6, 69), (33, 33, 8, 0), (257, 300, 5, 43)]
LOW = (torch.float16, torch.bfloat16)


def _every_op(kw, red_w, weights, w_pos):
    """score_reduce (all five, with its backward), score_reduce_weighted (one walk or
    two) and symmetric_softmax_mean (x = a) on kw: the outputs and input gradients."""
    inputs = [kw[k] for k in ARGS if kw[k] is not None]
    out = ops.score_reduce(**kw, reductions=ALL, clamp_tau=1.5)
    finite = [o.masked_fill(~torch.isfinite(o), 0) for o in out]  # fully masked columns
    grads = torch.autograd.grad(sum((w * o).sum() for w, o in zip(weights_like(out), finite)), inputs)
    value, *stats, pos = ops.score_reduce_weighted(**kw, reductions=red_w, clamp_tau=1.5, weights=weights,
                                                   w_pos=w_pos)
    wgrads = torch.autograd.grad(value, inputs)
    x = kw["a"]
    lse, mean = ops.symmetric_softmax_mean(x, kw["scale"], kw["row_bias"])
    sgrads = torch.autograd.grad(lse.sum(), [x])
    return list(out) + [value, *stats, pos, lse, mean], list(grads) + list(wgrads) + list(sgrads)


# The default chunk for all; small chunks (several row and column chunks): 2 KiB up to
# K = 33, 32 KiB for K = 257 (10 column chunks of 31 in float32; 20 of 15 in float64).
AWKWARD_TILES = [(s, None) for s in AWKWARD] + [(s, "2048") for s in AWKWARD if s[0] <= 33] + \
    [(AWKWARD[-1], "32768")]


@needs_c
@on_cuda_backends
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, *LOW], ids=str)
@pytest.mark.parametrize("shape, tile", AWKWARD_TILES, ids=[f"{i}-{t}" for i, t in
                                                            zip(_ids([s for s, _ in AWKWARD_TILES]),
                                                                [t for _, t in AWKWARD_TILES])])
def test_awkward_sizes_every_op_matches_cpu_kernels(shape, tile, dtype, backend, device, monkeypatch):
    """Masked columns (a third of the negatives), pos_offset, biases."""
    set_tile(monkeypatch, tile)
    _every_op_matches_cpu_kernels(shape, dtype, backend, device)


# The tile kernels (fp16/bf16): one 64 x 64 tile or several, rows and columns past the
# tiles' edges, d below, at and past the staged depth of 32, d % 8 == 0 (16-byte loads) or
# not, A's rows resident in shared memory (small d) or staged a slab at a time (d = 673,
# 800); with the default budget (one launch, several column splits) and small ones
# (several row launches for the column statistics, backward chunks of a few rows).
TILE_SHAPES = AWKWARD + [(64, 64, 16, 0), (70, 200, 64, 30), (130, 300, 40, 170), (70, 130, 673, 5),
                         (66, 100, 800, 0)]
TILE_CASES = [(s, None) for s in TILE_SHAPES] + [(s, "16384") for s in TILE_SHAPES if s[0] > 33]


@needs_c
@on_cuda_backends
@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("shape, tile", TILE_CASES, ids=[f"{i}-{t}" for i, t in
                                                         zip(_ids([s for s, _ in TILE_CASES]),
                                                             [t for _, t in TILE_CASES])])
def test_tile_kernels_every_op_matches_cpu_kernels(shape, tile, dtype, backend, device, monkeypatch):
    """The tile kernels, masked columns, pos_offset, biases: every op against the CPU kernels."""
    set_tile(monkeypatch, tile)
    set_kernels(monkeypatch, "tiles")
    _every_op_matches_cpu_kernels(shape, dtype, backend, device)


@needs_c
@on_cuda_backends
@on_both_kernels
@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_half_precision_large_logits_match_cpu_kernels(kernels, dtype, backend, device, monkeypatch):
    """Scale 40 on d = 16 normal inputs: scores in the hundreds (one-hot softmax rows, the
    symmetric op's diagonal near 640) beside -inf masked columns; every op, values and
    gradients finite and equal to the CPU kernels' on either fp16/bf16 path."""
    set_kernels(monkeypatch, kernels)
    _every_op_matches_cpu_kernels((70, 200, 16, 30), dtype, backend, device, scale=40.0)


@needs_c
@on_cuda_backends
@on_both_kernels
@pytest.mark.parametrize("dtype", LOW, ids=str)
@settings(max_examples=15, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(K=st.sampled_from([1, 2, 3, 31, 63, 64, 65, 127, 128, 129]),
       extra=st.sampled_from([0, 1, 2, 63, 64, 65, 130, 300]),
       d=st.sampled_from([1, 2, 7, 8, 9, 15, 16, 24, 31, 32, 33, 40, 64, 65, 100]),
       at=st.floats(0, 1), scale=st.sampled_from([0.3, 0.7, 3.0, 10.0]),
       tile=st.sampled_from([None, "16384", "4096"]))
def test_fuzz_half_precision_every_op_matches_cpu_kernels(kernels, dtype, backend, device, monkeypatch,
                                                          K, extra, d, at, scale, tile):
    """Random shapes, offsets, scales and workspace budgets on either fp16/bf16 path (the
    fixed shapes above pick the edges; this draws the rest): every op against the CPU kernels."""
    set_kernels(monkeypatch, kernels)
    set_tile(monkeypatch, tile)
    _every_op_matches_cpu_kernels((K, K + extra, d, int(at * extra)), dtype, backend, device, scale=scale)


def _every_op_matches_cpu_kernels(shape, dtype, backend, device, scale=0.7):
    K, M, d, off = shape
    kw = make_inputs(K, M, d, off, dtype, device, seed=K + M, masked=True, scale=scale)
    kw_cpu = to_device(kw, "cpu")
    red_w = ops.ROW_LSE | ops.NEG_LSE | ops.NEG_CLAMP_LSE | ops.NEG_SOFTPLUS
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    g = torch.Generator().manual_seed(K)
    w = [torch.randn(K, generator=g, dtype=torch.float64).to(acc) for _ in range(5)]
    if M - 1 < 1:
        w[1] = w[2] = w[3] = None  # no negatives: their statistics are -inf / 0
    got, grads = _every_op(kw, red_w, [None if x is None else x.to(device) for x in w[:4]], w[4].to(device))
    with cpu_kernels():
        want, wgrads = _every_op(kw_cpu, red_w, w[:4], w[4])
    low = dtype in LOW
    for n, (x, y) in enumerate(zip(got, want)):
        assert x.dtype == y.dtype and x.shape == y.shape
        t = dict(rtol=1e-4, atol=1e-4) if low else tol(dtype)
        if n == len(got) - 1 and low and backend != "cpu":
            # NB: symmetric_softmax_mean's weights go to the GEMM in bf16 / fp16 on CUDA
            # (relative error 2^-9 / 2^-12 each, summing to 1): |error| <= 2^-9 / 2^-12 max |x|.
            u = 2.0 ** -9 if dtype == torch.bfloat16 else 2.0 ** -12
            t = dict(rtol=0, atol=2 * u * kw["a"].abs().max().item())
        torch.testing.assert_close(x.cpu(), y, **t)
    for x, y in zip(grads, wgrads):
        assert x.dtype == y.dtype and x.shape == y.shape and torch.isfinite(x).all()
        # NB: fp16/bf16 G (CUDA) and float32 G (CPU) round differently; judged at the gradient's scale
        scale = y.abs().max().item()
        t = dict(rtol=2e-2, atol=2e-2 * scale + 1e-3) if low else gtol(dtype)
        torch.testing.assert_close(x.cpu(), y, **t)
    if not low:
        oracle = ref.score_reduce(**kw_cpu, reductions=ALL, clamp_tau=1.5)
        for x, y in zip(got[:5], oracle):
            torch.testing.assert_close(x.cpu(), y.detach(), **tol(dtype))


@needs_c
@on_cuda_backends
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("shape, tile", [
    ((1100, 1100, 8, 0), str(1024 * 1100 * 4)),  # float32: one walk, two row chunks of whole rows
    ((70, 1100, 5, 1030), str(70 * 256 * 4)),    # float32: column chunks, forward then backward
    ((33, 90, 4, 7), "256"),                      # tiny chunks: many row and column chunks
], ids=["one-walk-2-row-chunks", "column-chunks", "tiny-chunks"])
def test_weighted_several_chunks_match_reference(shape, tile, dtype, device, monkeypatch):
    set_tile(monkeypatch, tile)
    K, M, d, off = shape
    kw = make_inputs(K, M, d, off, dtype, device, seed=K, masked=True, scale=1.7)
    red = ops.ROW_LSE | ops.NEG_LSE | ops.NEG_CLAMP_LSE | ops.NEG_SOFTPLUS
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    g = torch.Generator().manual_seed(1)
    w = [torch.randn(K, generator=g, dtype=torch.float64).to(device=device, dtype=acc) for _ in range(5)]
    value, *stats, pos = ops.score_reduce_weighted(**kw, reductions=red, clamp_tau=2.0, weights=w[:4], w_pos=w[4])
    out = ref.score_reduce(**kw, reductions=red, clamp_tau=2.0)
    S = ref.scores_dot(kw["a"], kw["b"], kw["scale"], kw["row_bias"], kw["col_bias"])
    pos_o = ref.positive_scores(S, off)
    value_o = sum((x * o).sum() for x, o in zip(w, (out[0], out[2], out[3], out[4], pos_o)))
    t = tol(dtype) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(value, value_o, **t)
    for x, o in zip(stats, out):
        torch.testing.assert_close(x, o.detach(), **t)
    torch.testing.assert_close(pos, pos_o.detach(), **t)
    inputs = [kw[k] for k in ARGS if kw[k] is not None]
    for x, o in zip(torch.autograd.grad(value, inputs), torch.autograd.grad(value_o, inputs)):
        torch.testing.assert_close(x, o, **(gtol(dtype) if dtype == torch.float64 else dict(rtol=1e-3, atol=1e-3)))


@needs_c
@on_cuda_backends
@pytest.mark.parametrize("K, tile", [(65, "128"), (257, "32768"), (1, None), (2, "8")])
def test_symmetric_softmax_mean_several_chunks_match_reference(K, tile, device, monkeypatch):
    set_tile(monkeypatch, tile)
    g = torch.Generator().manual_seed(K)
    x = torch.randn(K, 6, generator=g, dtype=torch.float64).to(device).requires_grad_()
    bias = torch.randn(K, generator=g, dtype=torch.float64).to(device)
    bias[K // 3] = -math.inf  # a masked row and column
    lse, mean = ops.symmetric_softmax_mean(x, 0.9, bias)
    lse_o, mean_o = ref.symmetric_softmax_mean(x, 0.9, bias)
    torch.testing.assert_close(lse, lse_o)
    torch.testing.assert_close(mean, mean_o)
    w = torch.randn(K, generator=g, dtype=torch.float64).to(device)
    fin = torch.isfinite(lse_o)
    (gx,) = torch.autograd.grad((w * lse)[fin].sum(), [x])
    # NB: the reference's gradient is NaN through the fully masked row: the CPU kernels
    # (same -inf guards) are the oracle with the mask, the reference without it.
    with cpu_kernels():
        x_cpu = x.detach().cpu().requires_grad_()
        lse_c = ops.symmetric_softmax_mean(x_cpu, 0.9, bias.cpu())[0]
        (gc,) = torch.autograd.grad((w.cpu() * lse_c)[fin.cpu()].sum(), [x_cpu])
    torch.testing.assert_close(gx.cpu(), gc)
    bias[K // 3] = 0.0
    (gx,) = torch.autograd.grad((w * ops.symmetric_softmax_mean(x, 0.9, bias)[0]).sum(), [x])
    (go,) = torch.autograd.grad((w * ref.symmetric_softmax_mean(x, 0.9, bias)[0]).sum(), [x])
    torch.testing.assert_close(gx, go)


@needs_c
@on_cuda_backends
@on_both_kernels
def test_bf16_bias_gradients_are_sums_of_float32_g(kernels, device, monkeypatch):
    """bf16 inputs: G goes to the GEMMs in bf16, but the row and column bias gradients
    (float32 biases) are sums of the float32 G: as exact as the float32 reference on the
    same rounded inputs, not bf16-rounded. Two row chunks, one walk and two walks."""
    set_kernels(monkeypatch, kernels)
    set_tile(monkeypatch, str(40 * 300 * 4))
    K, M, off = 80, 300, 7
    kw = make_inputs(K, M, 16, off, torch.bfloat16, device, seed=5, scale=0.8)
    kw32 = to_device(kw, device, torch.float32)
    red = ops.ROW_LSE | ops.COL_LSE | ops.NEG_SOFTPLUS
    out = ops.score_reduce(**kw, reductions=red)
    out32 = ref.score_reduce(**kw32, reductions=red)
    w = weights_like(out32)
    biases = lambda k: [k["row_bias"], k["col_bias"]]  # noqa: E731
    for g, o in zip(torch.autograd.grad(sum((x * y).sum() for x, y in zip(w, out)), biases(kw)),
                    torch.autograd.grad(sum((x * y).sum() for x, y in zip(w, out32)), biases(kw32))):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, o, rtol=1e-4, atol=1e-4 * o.abs().max().item())
    wr = torch.randn(K, generator=torch.Generator().manual_seed(2)).to(device)
    value = ops.score_reduce_weighted(**kw, reductions=ops.ROW_LSE, weights=(wr, None, None, None), w_pos=-wr)[0]
    S = ref.scores_dot(kw32["a"], kw32["b"], kw32["scale"], kw32["row_bias"], kw32["col_bias"])
    oracle = (wr * (torch.logsumexp(S, 1) - ref.positive_scores(S, off))).sum()
    # NB: d value / d row_bias = w (1 - 1): cancels to rounding; judged at the terms' scale (|w| ~ 1).
    for g, o in zip(torch.autograd.grad(value, biases(kw)), torch.autograd.grad(oracle, biases(kw32))):
        torch.testing.assert_close(g, o, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------
# fp16 inputs: G, and symmetric_softmax_mean's weights, go to the GEMMs in fp16
# ---------------------------------------------------------------------------
#
# K = 1100, M = 8192: InfoNCE's mean makes |G| ~ 1/(K M) ~ 1e-7, below fp16's normal range
# (6e-5), about its smallest subnormal (6e-8); upstream weights of 0.1 / K (or 0.1 / M)
# make it ~1e-8, a fp16 zero. The gradients (~0.1 / K, ~0.1 / M) stay fp16 numbers. Cast
# unscaled, G would lose most of its bits or all of them; the walker scales it by a power
# of two first.
FP16_K, FP16_M, FP16_D = 1100, 8192, 4
ONE_WALK, COLUMN_CHUNKS = str(1024 * FP16_M * 4), str(1024 * 2048 * 4)
FP16_WALKS = [
    ("infonce", ONE_WALK),        # _score_reduce_with_grad: one walk, 2 row chunks of whole rows
    ("infonce", COLUMN_CHUNKS),   # 2 x 4 chunks: the forward walk, then _score_reduce_backward
    ("weighted", ONE_WALK),       # _score_reduce_with_grad with weights 0.1 / K
    ("weighted", COLUMN_CHUNKS),
    ("score_reduce", COLUMN_CHUNKS),  # the four softmax reductions, biases: _score_reduce_backward
]
SOFTMAX_REDUCTIONS = ops.ROW_LSE | ops.COL_LSE | ops.NEG_LSE | ops.NEG_CLAMP_LSE
FP16_REL = 2e-3  # of the largest |gradient|; fp16 G and outputs: ~4e-4 here, an unscaled G: >= 5e-3


def _fp16_inputs(K, M, d, device, seed):
    """Leaves: fp16 a, b, float32 biases, a float64 scale (so d scale comes back in float64,
    summed from the float32 G B); and their float64 copies (the same values)."""
    g = torch.Generator().manual_seed(seed)
    half = [torch.randn(n, d, generator=g, dtype=torch.float64).half() for n in (K, M)]
    bias = [torch.randn(n, generator=g, dtype=torch.float64).float() for n in (K, M)]
    scale = [torch.tensor(1.5, dtype=torch.float64)]
    fused = [t.to(device).requires_grad_() for t in half + bias + scale]
    exact = [t.detach().cpu().double().requires_grad_() for t in fused]
    return fused, exact


def _small_weights(K, M, device, seed):
    """Upstream weights 0.1 N(0, 1) / K for the row statistics (rows, negatives, clamped,
    positives) and / M for the columns', in float32."""
    g = torch.Generator().manual_seed(seed)
    return [(0.1 * torch.randn(n, generator=g, dtype=torch.float64) / n).float().to(device)
            for n in (K, M, K, K, K)]


def _fp16_value(kind, a, b, rb, cb, s, w, fused):
    """The loss of a case, fused (fp16 inputs) or by the reference (their float64 copies)."""
    if kind == "infonce":
        return infomax_ext.infonce(a, b, s) if fused else ref.infonce(ref.scores_dot(a, b, s))
    w = w if fused else [x.double().cpu() for x in w]
    if kind == "weighted" and fused:
        red = ops.ROW_LSE | ops.NEG_LSE | ops.NEG_CLAMP_LSE
        return ops.score_reduce_weighted(a, b, s, rb, cb, 0, red, clamp_tau=2.0, weights=(w[0], w[2], w[3], None),
                                         w_pos=w[4])[0]
    red = SOFTMAX_REDUCTIONS if kind == "score_reduce" else ops.ROW_LSE | ops.NEG_LSE | ops.NEG_CLAMP_LSE
    out = (ops.score_reduce if fused else ref.score_reduce)(a, b, s, rb, cb, 0, red, clamp_tau=2.0)
    value = sum((x.to(o) * o).sum() for x, o in zip(w[:4], out[:4]) if o.numel())
    if kind == "weighted":
        value = value + (w[4] * ref.positive_scores(ref.scores_dot(a, b, s, rb, cb))).sum()
    return value


def _close_at_scale(got, want, rel=FP16_REL):
    """|got - want| <= rel * max |want| on the finite entries, NaN exactly where want has NaN."""
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    fin = ~torch.isnan(want)
    if fin.any():
        err, top = (got[fin] - want[fin]).abs().max().item(), want[fin].abs().max().item()
        assert err <= rel * top, (err, top)


@needs_c
@on_cuda_backends
@pytest.mark.parametrize("kind, tile", FP16_WALKS, ids=[f"{k}-{'one-walk' if t == ONE_WALK else 'column-chunks'}"
                                                         for k, t in FP16_WALKS])
@on_both_kernels
def test_fp16_tiny_g_gradients_match_float64_reference(kind, tile, kernels, device, monkeypatch):
    """fp16 inputs, |G| ~ 1e-7 or 1e-8, several chunks: value and gradients (a, b in fp16;
    biases and scale from float32 sums) against float64 on the same (rounded) inputs."""
    set_kernels(monkeypatch, kernels)
    set_tile(monkeypatch, tile)
    fused, exact = _fp16_inputs(FP16_K, FP16_M, FP16_D, device, seed=3)
    w = _small_weights(FP16_K, FP16_M, device, seed=4)
    value = _fp16_value(kind, *fused, w, fused=True)
    oracle = _fp16_value(kind, *exact, w, fused=False)
    torch.testing.assert_close(value.double().cpu(), oracle.detach(), rtol=1e-5, atol=1e-7)
    pick = [0, 1, 4] if kind == "infonce" else [0, 1, 2, 3, 4]
    grads = torch.autograd.grad(value, [fused[i] for i in pick])
    for i, got, want in zip(pick, grads, torch.autograd.grad(oracle, [exact[i] for i in pick])):
        assert got.dtype == fused[i].dtype
        _close_at_scale(got, want)


@needs_c
@on_cuda_backends
@on_both_kernels
def test_fp16_g_is_stored_in_fp16(kernels, device, monkeypatch):
    """The G GEMMs take G rounded to fp16 (11 significant bits), not float32: d scale
    (float64, summed from the float32 G B before any cast) is far closer to
    sum_ij fp16(G_ij) <a_i, b_j> than to sum_ij G_ij <a_i, b_j>."""
    set_kernels(monkeypatch, kernels)
    set_tile(monkeypatch, str(64 * 517 * 4))
    (a, b, _, _, s), (a64, b64, _, _, s64) = _fp16_inputs(300, 517, 8, device, seed=6)
    w = torch.randn(300, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    row = ops.score_reduce(a, b, s, None, None, 0, ops.ROW_LSE)[0]
    (ds,) = torch.autograd.grad((w.to(row) * row).sum(), [s])
    S = ref.scores_dot(a64, b64, s64)
    (G,) = torch.autograd.grad((w * torch.logsumexp(S, 1)).sum(), [S])
    dot = a64.detach() @ b64.detach().T
    m, e = torch.frexp(G)
    as_fp16 = (torch.ldexp(torch.round(m * 2048) / 2048, e) * dot).sum()  # fp16's rounding past a 2^k scale
    as_fp32 = (G * dot).sum()
    assert abs(ds.item() - as_fp16) < 0.05 * abs(as_fp32 - as_fp16), (ds.item(), as_fp16, as_fp32)


@needs_c
@on_cuda_backends
@on_both_kernels
def test_fp16_zero_upstream_gradients_give_zero_gradients(kernels, device, monkeypatch):
    """A zero bound makes no inf or NaN scale: all weights zero give zero gradients; zero
    weights on the first row chunk's 1024 rows (G all zero there) give zero rows of dA
    and leave the rest as accurate as ever."""
    set_kernels(monkeypatch, kernels)
    set_tile(monkeypatch, ONE_WALK)
    (a, b, rb, cb, s), exact = _fp16_inputs(FP16_K, FP16_M, FP16_D, device, seed=8)
    out = ops.score_reduce(a, b, s, rb, cb, 0, ops.ROW_LSE | ops.NEG_LSE)
    zero = torch.zeros(FP16_K, device=device)
    for g in torch.autograd.grad((zero * out[0]).sum() + (zero * out[2]).sum(), [a, b, rb, cb, s],
                                 retain_graph=True):
        assert torch.equal(g, torch.zeros_like(g))
    w = _small_weights(FP16_K, FP16_M, device, seed=9)[0]
    w[:1024] = 0
    ga, gb = torch.autograd.grad((w * out[0]).sum(), [a, b])
    assert torch.equal(ga[:1024], torch.zeros_like(ga[:1024]))
    row = ref.score_reduce(exact[0], exact[1], exact[4], exact[2], exact[3], 0, ops.ROW_LSE)[0]
    for got, want in zip((ga, gb), torch.autograd.grad((w.double().cpu() * row).sum(), exact[:2])):
        _close_at_scale(got, want)


@needs_c
@on_cuda_backends
@pytest.mark.parametrize("where", ["input", "upstream"])
@on_both_kernels
def test_fp16_nan_propagates_to_the_gradients(where, kernels, device, monkeypatch):
    """A NaN in a (its row of S) or in an upstream gradient (its row of G) gives NaN exactly
    where the float64 reference has them (that row of dA, all of dB); the other rows keep
    their tiny-G accuracy (a NaN upstream gradient does not spoil the scale)."""
    set_kernels(monkeypatch, kernels)
    set_tile(monkeypatch, COLUMN_CHUNKS)
    (a, b, rb, cb, s), exact = _fp16_inputs(FP16_K, FP16_M, FP16_D, device, seed=10)
    w = _small_weights(FP16_K, FP16_M, device, seed=11)[0]
    if where == "input":
        with torch.no_grad():
            a[5, 1] = exact[0][5, 1] = float("nan")
    else:
        w[5] = float("nan")
    row = ops.score_reduce(a, b, s, rb, cb, 0, ops.ROW_LSE)[0]
    got = torch.autograd.grad((w * row).sum(), [a, b])
    row_o = ref.score_reduce(exact[0], exact[1], exact[4], exact[2], exact[3], 0, ops.ROW_LSE)[0]
    want = torch.autograd.grad((w.double().cpu() * row_o).sum(), exact[:2])
    assert torch.isnan(want[0][5]).all() and torch.isnan(want[1]).all() and not torch.isnan(want[0][6:]).any()
    for g, o in zip(got, want):
        _close_at_scale(g, o)


@needs_c
@on_cuda_backends
@pytest.mark.parametrize("tile", [None, "4096"])
@on_both_kernels
def test_fp16_symmetric_softmax_mean_matches_float64_with_fp16_weights(tile, kernels, device, monkeypatch):
    """fp16 x, K = 300 in one chunk or 1 x 100 (3 columns each): lse, mean and lse's
    gradient against float64; the mean's error is that of weights rounded to fp16 (11
    significant bits): far closer to sum_j fp16(W_ij) x_j than to sum_j W_ij x_j."""
    set_kernels(monkeypatch, kernels)
    set_tile(monkeypatch, tile)
    g = torch.Generator().manual_seed(12)
    x = torch.randn(300, 8, generator=g, dtype=torch.float64).half().to(device).requires_grad_()
    bias = torch.randn(300, generator=g, dtype=torch.float64).float().to(device)
    lse, mean = ops.symmetric_softmax_mean(x, 1.5, bias)
    X, b64 = x.detach().double().cpu().requires_grad_(), bias.double().cpu()
    lse_o, mean_o = ref.symmetric_softmax_mean(X, 1.5, b64)
    torch.testing.assert_close(lse.double().cpu(), lse_o.detach(), rtol=1e-5, atol=1e-5)
    _close_at_scale(mean, mean_o)
    S = 1.5 * X.detach() @ X.detach().T + b64[:, None] + b64[None, :]
    W = torch.softmax(S.fill_diagonal_(-math.inf), 1)
    m, e = torch.frexp(W)
    as_fp16 = torch.ldexp(torch.round(m * 2048) / 2048, e) @ X.detach()
    assert (mean.double().cpu() - as_fp16).abs().mean() < 0.1 * (as_fp16 - mean_o.detach()).abs().mean()
    wl = torch.randn(300, generator=g, dtype=torch.float64)
    (gx,) = torch.autograd.grad((wl.to(lse) * lse).sum(), [x])
    (go,) = torch.autograd.grad((wl * lse_o).sum(), [X])
    _close_at_scale(gx, go)


@needs_c
@on_cuda_backends
def test_fp16_symmetric_softmax_mean_tiny_weights_count(device, monkeypatch):
    """Weights below fp16's smallest subnormal still count: 4 points near 0 with bias 0 and
    400 far ones (x ~ 2000, bias -17), scale 1e-9 (the biases set the weights). A near
    point's mean gives each far one a weight of ~1.4e-8 (a fp16 zero unscaled): together
    they move it by ~1e-2."""
    set_tile(monkeypatch, str(64 * 404 * 4))
    g = torch.Generator().manual_seed(13)
    x = torch.cat([torch.randn(4, 4, generator=g, dtype=torch.float64),
                   2000 + 100 * torch.randn(400, 4, generator=g, dtype=torch.float64)]).half().to(device)
    bias = torch.cat([torch.zeros(4), torch.full((400,), -17.0)]).to(device)
    lse, mean = ops.symmetric_softmax_mean(x, 1e-9, bias)
    lse_o, mean_o = ref.symmetric_softmax_mean(x.double().cpu(), 1e-9, bias.double().cpu())
    torch.testing.assert_close(lse.double().cpu(), lse_o, rtol=1e-5, atol=1e-5)
    _close_at_scale(mean[:4], mean_o[:4])
    _close_at_scale(mean, mean_o)
