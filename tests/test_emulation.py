"""The emulated CUDA backend itself: what its launches guarantee (real barriers, warp
shuffles, errors for what a GPU leaves undefined), how the ops reach it, and that the
walkers' multi-chunk paths really run (counted launches). The kernels' results on it are
tested with the other backends in test_devices.py, test_devices_concat.py and the files
that use the ``device`` fixture."""
import math
import os

import pytest
import torch

import infomax_ext
from infomax_ext import _backend, ops, reference as ref
from helpers import cpu_kernels, make_bias, make_pair, needs_emulated, set_kernels, set_tile

pytestmark = [needs_emulated, pytest.mark.usefixtures("default_cuda_tiles")]


def selftest(name):
    return infomax_ext._backend._C._emulation_selftest(name)


def launches():
    return infomax_ext._backend._C._emulated_launch_count()


# ---------------------------------------------------------------------------
# The execution model
# ---------------------------------------------------------------------------


NEIGHBOURS = [b * 1000 + (t + 1) % 64 + 1 for b in range(2) for t in range(64)]


def test_barrier_orders_shared_memory():
    """Each of 2 x 64 threads writes its shared slot, waits at __syncthreads and reads
    its neighbour's: every read sees the neighbour's write."""
    assert selftest("barrier") == NEIGHBOURS


@pytest.mark.skipif(os.environ.get("INFOMAX_SANITIZER") == "thread",
                    reason="a deliberate data race: tools/sanitize.sh checks that TSAN reports it")
def test_a_missing_barrier_is_visible():
    """Without the barrier a thread reads before its neighbour (a later fiber) has
    written, and gets stale data (under ThreadSanitizer: a reported data race)."""
    assert selftest("no_barrier") != NEIGHBOURS


OTHER_WARP = [b * 1000 + (t + 32) % 64 + 1 for b in range(2) for t in range(64)]


def test_barrier_orders_shared_memory_between_warps():
    assert selftest("other_warp") == OTHER_WARP


@pytest.mark.skipif(os.environ.get("INFOMAX_SANITIZER") == "thread",
                    reason="a deliberate data race: tools/sanitize.sh checks that TSAN reports it")
def test_a_missing_barrier_between_warps_is_visible():
    """Each warp writes its slots between two shuffles and reads the other warp's. The
    scheduler lets one warp run on past its shuffles while the other waits: without the
    barrier, block 0's first warp and block 1's second read before the other warp wrote
    (stale values), however alike the two warps' code."""
    got = selftest("other_warp_no_barrier")
    assert got[:32] != OTHER_WARP[:32] and got[64 + 32:] != OTHER_WARP[64 + 32:]


def test_dynamic_shared_memory_is_the_blocks_own():
    """A launch's dynamic shared memory: a barrier orders it like static shared memory,
    and each block finds it full of set bits (as a GPU leaves it undefined), not the data
    the previous block wrote."""
    got = selftest("dynamic_smem")
    assert got[:128] == NEIGHBOURS
    assert got[128:] == [1, 1]


def test_warp_shuffle_exchanges_lanes():
    assert selftest("warp_sum") == [496] * 64


@pytest.mark.parametrize("name, match", [
    ("partial_warp", "partial warp: the block has 48 threads"),
    ("shuffle_after_exit", "only 31 of 32 lanes reached it"),
    ("sync_after_exit", r"__syncthreads\(\) reached by 40 threads after 24 .* returned"),
    ("divergent", r"__syncthreads\(\) reached by 32 threads"),
    ("too_many_threads", "invalid configuration argument: block"),
    ("grid_y", "invalid configuration argument: grid"),
    ("too_much_smem", "too many resources requested: 232449 bytes of dynamic shared memory"),
])
def test_undefined_behaviour_fails_the_launch(name, match):
    with pytest.raises(RuntimeError, match=match):
        selftest(name)
    # the scheduler recovers: the next launch runs normally
    assert selftest("warp_sum") == [496] * 64


def test_wmma_multiplies_fp16_tiles():
    """One warp's 16 x 16 x 16 product through the emulated nvcuda::wmma (A row-major, B
    column-major, C row-major) against torch's, on small integers (exact)."""
    i = torch.arange(16)
    A = (i[:, None] + 2 * i[None, :]) % 7 - 3
    B = (3 * i[:, None] + i[None, :]) % 5 - 2
    assert selftest("wmma") == (A @ B).flatten().tolist()


@pytest.mark.parametrize("name, match", [
    ("wmma_misaligned", "256-bit aligned"),
    ("wmma_ldm", "ldm must be a multiple of 16 bytes"),
    ("wmma_diverged", "only 16 of 32 lanes reached it"),
    ("wmma_lanes_disagree", "lanes of one warp disagree"),
])
def test_wmma_misuse_fails_the_launch(name, match):
    with pytest.raises(RuntimeError, match=match):
        selftest(name)
    assert selftest("wmma")[:3] == selftest("wmma")[:3]


# ---------------------------------------------------------------------------
# Reaching the emulated ops
# ---------------------------------------------------------------------------


def test_ops_are_registered_and_selected_by_the_context():
    assert "cuda_emulated" in infomax_ext.build_info()["backends"]
    for op in ("score_reduce", "_score_reduce_backward", "_score_reduce_with_grad", "symmetric_softmax_mean",
               "concat_score_reduce", "_concat_score_reduce_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"infomax_ext_emulated::{op}", "CPU"), op
    a, b = make_pair(5, 9, 3)
    n = launches()
    ops.score_reduce(a, b)
    assert launches() == n  # the CPU kernels: no launch
    with _backend.emulated_cuda():
        assert _backend.op_namespace() == "infomax_ext_emulated"
        ops.score_reduce(a, b)
        with _backend.emulated_cuda(False):
            ops.score_reduce(a, b)
    assert _backend.op_namespace() == "infomax_ext"
    assert launches() > n


def test_backward_runs_on_the_backend_of_its_forward():
    a, b = make_pair(6, 11, 4, requires_grad=True)
    with _backend.emulated_cuda():
        row = ops.score_reduce(a, b, reductions=ops.ROW_LSE)[0]
    n = launches()
    (ga,) = torch.autograd.grad(row.sum(), [a])  # outside the context
    assert launches() > n
    with cpu_kernels():
        (gc,) = torch.autograd.grad(ops.score_reduce(a, b, reductions=ops.ROW_LSE)[0].sum(), [a])
    torch.testing.assert_close(ga, gc)


def test_emulated_ops_take_cpu_tensors_only():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA tensor to pass")
    a = torch.randn(3, 2, device="cuda")
    with _backend.emulated_cuda(), pytest.raises(Exception):
        ops.score_reduce(a, a)


# ---------------------------------------------------------------------------
# The multi-chunk paths run (launch counts); their values are checked in test_devices.py
# ---------------------------------------------------------------------------


def _weighted(K, M, d, dtype, seed=0, col_bias=False):
    a, b = make_pair(K, M, d, dtype=dtype, seed=seed, requires_grad=True)
    rb = make_bias(K, dtype=dtype, seed=seed, requires_grad=True)
    cb = make_bias(M, dtype=dtype, seed=seed + 1, requires_grad=True) if col_bias else None
    w = torch.full((K,), 1.0 / K, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    value = ops.score_reduce_weighted(a, b, 2.0, rb, cb, M - K, ops.ROW_LSE, weights=(w, None, None, None),
                                      w_pos=-w)[0]
    S = ref.scores_dot(a, b, 2.0, rb, cb)
    oracle = (torch.logsumexp(S, 1) - ref.positive_scores(S, M - K)).mean()
    return value, oracle, tuple(x for x in (a, b, rb, cb) if x is not None)


@pytest.mark.parametrize("tile, K, chunks, forward", [
    # float32 chunks of 1024 x 1100 scores: two chunks of whole rows, one walk: per chunk
    # the fold, then the gradient kernel
    (str(1024 * 1100 * 4), 1100, 2, 1),
    # chunks of 70 x 256 scores: 5 column chunks, forward then backward: 5 x the row
    # kernel, then 5 x the gradient kernel
    (str(70 * 256 * 4), 70, 5, 1),
])
@pytest.mark.parametrize("col_bias", [False, True])
def test_with_grad_one_walk_and_fallback_paths_run(tile, K, chunks, forward, col_bias, monkeypatch):
    """Launch counts: the path taken, and the column-sum pass (two kernels per chunk)
    only when there is a column bias to differentiate."""
    set_tile(monkeypatch, tile)
    M = 1100
    expected = chunks * (forward + 1 + (2 if col_bias else 0))
    with _backend.emulated_cuda():
        n = launches()
        value, oracle, inputs = _weighted(K, M, 4, torch.float32, col_bias=col_bias)
        assert launches() - n == expected
        torch.testing.assert_close(value, oracle, rtol=1e-5, atol=1e-5)
        for g, o in zip(torch.autograd.grad(value, inputs), torch.autograd.grad(oracle, inputs)):
            torch.testing.assert_close(g, o, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("col_bias", [False, True])
@pytest.mark.parametrize("kernels, forward, backward, col_sums", [
    # the chunk path: one fused fold forward, one gradient kernel backward (and two
    # column-sum kernels when the column bias needs a gradient)
    ("chunks", 1, 1, 2),
    # the tile path: the tile fold, then the row finish; backward the tile gradient,
    # then the row sums (and one column-sum kernel over the tiles' partials)
    ("tiles", 2, 2, 1),
])
def test_tile_kernels_are_the_path_taken(kernels, forward, backward, col_sums, col_bias, monkeypatch):
    """bf16 ROW_LSE at K = 70, M = 200 (neither a multiple of the 64-row tile): the
    launch counts show which kernels ran, and the value and gradients match the CPU
    kernels on either path."""
    set_kernels(monkeypatch, kernels)
    backward += col_sums if col_bias else 0
    a, b = make_pair(70, 200, 24, dtype=torch.bfloat16, seed=11)
    cb = make_bias(200, dtype=torch.bfloat16, seed=11) if col_bias else None

    def run():
        x, y = a.clone().requires_grad_(), b.clone().requires_grad_()
        c = cb.clone().requires_grad_() if col_bias else None
        n = launches()
        value = ops.score_reduce(x, y, 0.7, None, c, 0, ops.ROW_LSE)[0].sum()
        n_fwd = launches() - n
        grads = torch.autograd.grad(value, [t for t in (x, y, c) if t is not None])
        return value, grads, n_fwd, launches() - n - n_fwd

    with _backend.emulated_cuda():
        value, grads, n_fwd, n_bwd = run()
    assert (n_fwd, n_bwd) == (forward, backward)
    with cpu_kernels():
        value_c, grads_c, _, _ = run()
    torch.testing.assert_close(value.float(), value_c.float(), rtol=2e-3, atol=2e-3)
    for g, o in zip(grads, grads_c):
        torch.testing.assert_close(g.float(), o.float(), rtol=2e-2, atol=2e-2)


def tile_dynamic_smem(d):
    """The dynamic shared memory of a tile block, by the rule the kernels document: A's
    64 rows of all d features (padded to 32, + 8 elements a row, 2 bytes each) when two
    blocks still fit in an SM's 228 KiB beside the static 27 KiB (B's two 64 x 40 slabs
    and the 64 x 68 float32 tile) and 1 KiB of the system's per block; else two 64 x 40
    slabs of A."""
    static = 2 * 64 * 40 * 2 + 64 * 68 * 4
    resident = 64 * (math.ceil(d / 32) * 32 + 8) * 2
    fits = 2 * (static + resident + 1024) <= 228 * 1024
    return (resident if fits else 2 * 64 * 40 * 2), fits


# d = 672: 2 x (27648 + 87040 + 1024) = 231424 bytes fit in 233472; d = 673 pads to 704.
@pytest.mark.parametrize("d, resident", [(24, True), (672, True), (673, False), (800, False)])
def test_tile_kernels_keep_a_resident_while_two_blocks_fit(d, resident, monkeypatch):
    """bf16 ROW_LSE forward and backward on the tile kernels: the launches ask for A's
    resident rows up to d = 672 and for two slabs past it, and the value and gradients
    match the CPU kernels either way."""
    set_kernels(monkeypatch, "tiles")
    a, b = make_pair(70, 130, d, dtype=torch.bfloat16, seed=d)
    take_peak = infomax_ext._backend._C._emulated_take_peak_smem

    def run():
        x, y = a.clone().requires_grad_(), b.clone().requires_grad_()
        value = ops.score_reduce(x, y, 0.05, None, None, 0, ops.ROW_LSE)[0].sum()
        return value, torch.autograd.grad(value, [x, y])

    with _backend.emulated_cuda():
        take_peak()
        value, grads = run()
        assert take_peak() == tile_dynamic_smem(d)[0]
    assert tile_dynamic_smem(d)[1] == resident
    with cpu_kernels():
        value_c, grads_c = run()
    torch.testing.assert_close(value.float(), value_c.float(), rtol=2e-3, atol=2e-3)
    for g, o in zip(grads, grads_c):
        torch.testing.assert_close(g.float(), o.float(), rtol=2e-2, atol=2e-2 * o.abs().max().item())


def test_symmetric_softmax_mean_walks_several_row_and_column_chunks(monkeypatch):
    """K = 65 with 128-byte chunks (32 float32 scores): 3 row chunks (32, 32, 1 rows) x
    65 one-column chunks, in the forward walk and in the weighted-mean walk."""
    set_tile(monkeypatch, "128")
    x = make_pair(65, 65, 7, dtype=torch.float32, seed=4)[0]
    bias = make_bias(65, dtype=torch.float32, seed=4)
    with _backend.emulated_cuda():
        n = launches()
        lse, mean = ops.symmetric_softmax_mean(x, 0.8, bias)
        assert launches() - n == 2 * 3 * 65
    with cpu_kernels():
        lse_c, mean_c = ops.symmetric_softmax_mean(x, 0.8, bias)
    torch.testing.assert_close(lse, lse_c, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mean, mean_c, rtol=1e-5, atol=1e-5)
