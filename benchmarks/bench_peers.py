"""The drop-in losses against the libraries a user would otherwise install.

  ntxent        ``infomax_ext.NTXentLoss(0.07)(z1, z2)`` vs pytorch-metric-learning's
                ``NTXentLoss(temperature=0.07)(cat([z1, z2]), cat([arange(N), arange(N)]))``
                (paired labels: each view's positive is its other view); N samples, 2N rows
  infonce       ``infomax_ext.InfoNCELoss(0.1)(q, k)`` vs info-nce-pytorch's
                ``InfoNCE(temperature=0.1)(q, k)`` (in-batch negatives), K = M
  infonce-bank  ``InfoNCELoss(0.1, bank_only=True)(q, k, negatives=bank)`` vs
                ``InfoNCE(0.1, negative_mode="unpaired")(q, k, bank)`` (MoCo-style queue)

Implementations: ``ours`` (fused), ``ours-reference`` (the same loss with
``use_reference(True)``: S materialised) and the peer. A peer that is not installed
skips its cases. Each case's first call is checked against ``ours-reference`` in
float64 (value and gradients) before timing, so the peers are checked to compute the
same loss. Ratios in the side-by-side table are to the peer.

    .venv/bin/python -m pytest benchmarks/bench_peers.py --benchmark-only
    BENCH_FULL=1 .venv/bin/python -m pytest benchmarks/bench_peers.py --benchmark-only
    .venv/bin/python benchmarks/bench_peers.py            # table, fresh process per case

Default: fwd+bwd, d = 128, float32; ntxent N in {128, 2048}, infonce K in {1024, 4096},
infonce-bank K = 1024 with a 4096-row bank. Full grid (``BENCH_FULL=1``): both passes,
d in {32, 128, 512}, ntxent N in {128, 256, 512, 2048, 8192}, infonce K in {256, 1024,
4096, 16384}, banks of {4096, 16384, 65536} rows. pytorch-metric-learning's NTXentLoss
holds a (2N) x (2N)(2N - 2) mask (O(N^3) memory: 2.2 GiB at N = 256), so its cases
past N = 256 or so are skipped by the memory guard (``BENCH_MAX_GIB``).
"""
import argparse
import importlib.util
import math
import os

import pytest
import torch

import _common
import infomax_ext as ie
from infomax_ext import bench

PEERS = {"ntxent": ("pytorch-metric-learning", "pytorch_metric_learning"),
         "infonce": ("info-nce-pytorch", "info_nce"),
         "infonce-bank": ("info-nce-pytorch", "info_nce")}
PASSES = {"fwd": False, "fwd+bwd": True}


def peer_installed(loss):
    return importlib.util.find_spec(PEERS[loss][1]) is not None


def implementations(loss):
    return ["ours", "ours-reference", PEERS[loss][0]]


def _ours(loss):
    if loss == "ntxent":
        return lambda z1, z2: ie.NTXentLoss(temperature=0.07)(z1, z2)
    if loss == "infonce":
        return lambda q, k: ie.InfoNCELoss(temperature=0.1)(q, k)
    return lambda q, k, bank: ie.InfoNCELoss(temperature=0.1, bank_only=True)(q, k, negatives=bank)


def _peer(loss):
    if loss == "ntxent":
        from pytorch_metric_learning.losses import NTXentLoss

        fn = NTXentLoss(temperature=0.07)

        def pml(z1, z2):
            n = z1.shape[0]
            labels = torch.cat([torch.arange(n), torch.arange(n)]).to(z1.device)  # paired labels
            return fn(torch.cat([z1, z2]), labels)

        return pml
    import info_nce

    if loss == "infonce":
        return info_nce.InfoNCE(temperature=0.1)
    return info_nce.InfoNCE(temperature=0.1, negative_mode="unpaired")


def _with_reference(fn, on):
    def call(*xs):
        ie.use_reference(on)
        try:
            return fn(*xs)
        finally:
            ie.use_reference(False)

    return call


def implementation(loss, impl):
    if impl == "ours":
        return _with_reference(_ours(loss), False)
    if impl == "ours-reference":
        return _with_reference(_ours(loss), True)
    if impl == PEERS[loss][0]:
        return _peer(loss)
    raise ValueError(f"unknown implementation {impl!r} of {loss}; choose from {implementations(loss)}")


def make_inputs(loss, K, d, dtype="float32", backward=True, bank=4096, seed=0):
    g = torch.Generator().manual_seed(seed)
    z1 = torch.randn(K, d, generator=g, dtype=torch.float64)
    xs = [z1, z1 + 0.5 * torch.randn(K, d, generator=g, dtype=torch.float64)]
    if loss == "infonce-bank":
        xs.append(torch.randn(bank, d, generator=g, dtype=torch.float64))
    dt = getattr(torch, dtype)
    return [x.to(device=_common.DEVICE, dtype=dt).requires_grad_(backward) for x in xs]


def case_bytes(loss, impl, K, d, bank):
    """Rough memory of the materialised tensors (the skip guard)."""
    if impl == "ours":
        return 8 * (K + bank) * d * 4
    rows = 2 * K if loss == "ntxent" else K
    cols = bank if loss == "infonce-bank" else rows
    if impl == "pytorch-metric-learning":
        # NB: pml's NTXentLoss masks every negative pair for every positive pair: a
        # (2N) x (2N)(2N - 2) float matrix, O(N^3) (2.2 GiB peak at N = 256).
        return rows * rows * (rows - 2) * 20
    return rows * cols * 4 * 10


def make_case(loss, impl, K, d=128, dtype="float32", backward=True, bank=4096, seed=0):
    """A zero-argument callable: one loss forward (+ backward). K: N samples (ntxent) or
    the batch (infonce, infonce-bank); bank: rows of the negatives (infonce-bank)."""
    inputs = make_inputs(loss, K, d, dtype, backward, bank, seed)
    fn = implementation(loss, impl)

    run = bench.step(fn, inputs, backward, after=_common.sync)

    def check(out):

        exp, grads = _common.oracle(_with_reference(_ours(loss), True), inputs, backward)
        got = [x.grad for x in inputs] if backward else []
        return bench.compare(out, got, exp, grads, bench.tolerance(dtype))

    run.inputs, run.check = inputs, check
    return run


def _grid():
    if _common.FULL:
        passes, dims = ["fwd", "fwd+bwd"], [32, 128, 512]
        sizes = {"ntxent": [(n, 0) for n in (128, 256, 512, 2048, 8192)],
                 "infonce": [(k, 0) for k in (256, 1024, 4096, 16384)],
                 "infonce-bank": [(1024, n) for n in (4096, 16384, 65536)]}
    else:
        passes, dims = ["fwd+bwd"], [128]
        sizes = {"ntxent": [(128, 0), (2048, 0)], "infonce": [(1024, 0), (4096, 0)],
                 "infonce-bank": [(1024, 4096)]}
    passes = _common.env_list("BENCH_PASSES", passes)
    dims = _common.env_list("BENCH_DIMS", dims, int)
    dtypes = _common.env_list("BENCH_DTYPES", ["float32"])
    if "BENCH_SIZES" in os.environ:
        Ks = _common.env_list("BENCH_SIZES", [], int)
        sizes = {k: [(K, 4 * K if k == "infonce-bank" else 0) for K in Ks] for k in sizes}
    return [pytest.param(loss, p, K, bank, d, dt, impl,
                         id=f"{loss}-{p}-K{K}" + (f"-bank{bank}" if bank else "") + f"-d{d}-{dt}-{impl}")
            for loss in sizes for dt in dtypes for d in dims for (K, bank) in sizes[loss] for p in passes
            for impl in implementations(loss)]


@pytest.mark.parametrize("loss, pass_, K, bank, d, dtype, impl", _grid())
def test_peer(benchmark, loss, pass_, K, bank, d, dtype, impl):
    backward = PASSES[pass_]
    peer = PEERS[loss][0]
    if impl == peer and not peer_installed(loss):
        pytest.skip(f"{peer} is not installed (pip install {peer})")
    size = f"N={K} (2N rows)" if loss == "ntxent" else f"K=M={K}" + (f" bank={bank}" if bank else "")
    benchmark.group = f"peers {loss} {pass_} {size} d={d} {dtype}"
    _common.skip_if_too_big(case_bytes(loss, impl, K, d, bank), impl)
    run = make_case(loss, impl, K, d, dtype, backward, bank or 4096)
    out = run()  # first call: warm-up
    ok, msg = run.check(out)
    assert ok, f"{loss} {impl} {pass_} K={K} d={d} {dtype}: {msg}"  # correct before timed
    _common.run_benchmark(benchmark, run, impl, baseline=peer, loss=loss, K=K, bank=bank, d=d, dtype=dtype,
                          pass_=pass_)


def main(argv=None):

    p = argparse.ArgumentParser(description="drop-in losses vs their peers: time and peak memory, one "
                                            "fresh process per case")
    p.add_argument("--losses", nargs="+", default=list(PEERS), choices=list(PEERS))
    p.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096],
                   help="N samples (ntxent: 2N rows) or K = M; the bank is 4K rows")
    p.add_argument("--d", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    print(f"drop-in losses fwd+bwd, d={args.d}, float32, {torch.get_num_threads()} threads; "
          "peak = extra resident memory of one call in a fresh process")
    print(f"{'loss':>12} | {'K':>6} | {'impl':>23} | {'median ms':>10} | {'peak MiB':>9} | {'ours/this time':>14} | "
          f"{'ours/this peak':>14} | check")
    for loss in args.losses:
        impls = [i for i in implementations(loss) if i != PEERS[loss][0] or peer_installed(loss)]
        if len(impls) < 3:
            print(f"{loss:>12} | {PEERS[loss][0]} is not installed: only ours is measured")
        for K in args.sizes:
            bank = 4 * K if loss == "infonce-bank" else 4096
            rows = {i: _common.measure("bench_peers", dict(loss=loss, impl=i, K=K, d=args.d, bank=bank),
                                    args.repeats) for i in impls}
            ours = rows.get("ours", {})
            for impl, r in rows.items():
                if "error" in r:
                    print(f"{loss:>12} | {K:>6} | {impl:>23} | failed: {r['error'][:80]}")
                    continue
                tr = ours["time_s"] / r["time_s"] if "time_s" in ours else math.nan
                pr = (ours["peak_bytes"] / r["peak_bytes"]
                      if r.get("peak_bytes") and "peak_bytes" in ours else math.nan)
                print(f"{loss:>12} | {K:>6} | {impl:>23} | {r['time_s'] * 1e3:10.1f} | "
                      f"{r['peak_bytes'] / 2**20:9.1f} | {tr:14.3f} | {pr:14.4f} | {r['check']}")


if __name__ == "__main__":
    main()
