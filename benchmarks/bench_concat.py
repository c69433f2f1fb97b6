"""Concat-MLP critic InfoNCE: the fused ``concat_score_reduce`` vs the materialising reference.

The critic is ``ConcatMLP(d, d, H)``: ``S[i, j] = w2 . act(Wu u_i + Wv v_j + b1) + b2``.
The fused path computes P = u Wu^T + b1 and Q = v Wv^T by matmuls and reduces all
K x M pairs without building S or the (K, M, H) hidden tensor; the reference
(``use_reference(True)``) materialises the (K, M, H) hidden tensor and S.

pytest-benchmark suite:   .venv/bin/python -m pytest benchmarks/bench_concat.py --benchmark-only
Table (one run):          .venv/bin/python benchmarks/bench_concat.py [--K 1024 --H 256 --d 64]

The table's peak memory is measured by ``infomax_ext.bench`` (``_common.measure``): a fresh subprocess
per case, the peak resident set (``ru_maxrss``) after the first forward+backward
minus the resident set just before it, with inputs and critic already allocated.
"""
import argparse
import math

import pytest
import torch

import infomax_ext as ie

IMPLS = ["fused", "reference"]


def make_case(impl, K, H=256, d=64, activation="relu", dtype="float32", backward=True, seed=0):
    """A zero-argument callable running one InfoNCE forward (+ backward) of the concat critic.

    impl: "fused" (the fused op), "reference" (materialises K x M x H) or
    "reference+compile" (the reference under torch.compile).
    """
    if impl != "reference+compile":
        # NB: a tiny call first, so one-time allocations of the runtime (thread pools,
        # BLAS workspaces) happen before the harness takes its baseline.
        _build(impl, 4, H, d, activation, dtype, backward, seed)()
    return _build(impl, K, H, d, activation, dtype, backward, seed)


def _build(impl, K, H, d, activation, dtype, backward, seed):
    torch.manual_seed(seed)
    dt = getattr(torch, dtype)
    critic = ie.ConcatMLP(d, d, H, activation=activation).to(dt)
    u = torch.randn(K, d, dtype=dt).requires_grad_()
    v = torch.randn(K, d, dtype=dt).requires_grad_()
    params = [u, v] + list(critic.parameters())

    def bound(u, v):
        return ie.mi_lower_bound(u, v, critic, "infonce")

    if impl == "reference+compile":
        fn = torch.compile(bound)
    elif impl in ("fused", "reference"):
        fn = bound
    else:
        raise ValueError(f"unknown implementation {impl!r}")
    reference = impl != "fused"

    def run():
        for p in params:
            p.grad = None
        ie.use_reference(reference)
        try:
            out = fn(u, v)
            if backward:
                out.backward()
        finally:
            ie.use_reference(False)
        return out.detach()

    return run


@pytest.mark.parametrize("K", [256, 1024])
@pytest.mark.parametrize("activation", ["relu", "tanh"])
@pytest.mark.parametrize("impl", IMPLS)
def test_concat_infonce_fwd_bwd(benchmark, impl, activation, K):
    benchmark.group = f"concat-critic infonce fwd+bwd K=M={K} H=256 d=64 {activation} float32"
    run = make_case(impl, K, activation=activation)
    expected = make_case("reference", K, activation=activation)()
    torch.testing.assert_close(run(), expected, rtol=1e-4, atol=1e-4)  # correct before timed
    benchmark.pedantic(run, rounds=3 if K >= 1024 else 5, iterations=1, warmup_rounds=1)


@pytest.mark.parametrize("K", [1024])
@pytest.mark.parametrize("impl", IMPLS)
def test_concat_infonce_fwd(benchmark, impl, K):
    benchmark.group = f"concat-critic infonce fwd K=M={K} H=256 d=64 relu float32"
    run = make_case(impl, K, backward=False)
    benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=1)


def main(argv=None):
    import _common

    p = argparse.ArgumentParser(description="concat-critic InfoNCE fwd+bwd: time and peak memory, "
                                            "fused vs materialising reference")
    p.add_argument("--K", type=int, default=1024, help="K = M")
    p.add_argument("--H", type=int, default=256)
    p.add_argument("--d", type=int, default=64)
    p.add_argument("--activations", nargs="+", default=["relu", "tanh"])
    p.add_argument("--impls", nargs="+", default=IMPLS, help="also: reference+compile")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    K, H, d = args.K, args.H, args.d
    print(f"concat-critic InfoNCE forward+backward, K=M={K}, H={H}, d={d}, float32, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    print("time: median of the calls after the first; peak: extra resident memory (ru_maxrss) of the "
          "first call in a fresh process")
    print(f"(K + M) * H * 4 bytes = {(2 * K * H * 4) / 2**20:.1f} MiB; K * M * H * 4 bytes = "
          f"{K * K * H * 4 / 2**20:.0f} MiB")
    print(f"{'activation':>10} | {'impl':>18} | {'median ms':>10} | {'peak MiB':>9} | {'speed-up':>8} | "
          f"{'peak / ref':>10}")
    for act in args.activations:
        rows = {i: _common.measure("bench_concat", dict(impl=i, K=K, H=H, d=d, activation=act), args.repeats)
                for i in args.impls}
        base = rows.get("reference", {})
        for impl, r in rows.items():
            if "error" in r:
                print(f"{act:>10} | {impl:>18} | failed: {r['error'][:80]}")
                continue
            speed = base["time_s"] / r["time_s"] if "time_s" in base else math.nan
            ratio = r["peak_bytes"] / base["peak_bytes"] if base.get("peak_bytes") else math.nan
            print(f"{act:>10} | {impl:>18} | {r['time_s'] * 1e3:10.1f} | {r['peak_bytes'] / 2**20:9.1f} | "
                  f"{speed:7.1f}x | {ratio:10.4f}")


if __name__ == "__main__":
    main()
