"""gather_distributed on two gloo processes equals the single-process loss on the
concatenated batch (distributed.py, losses.py).

The two ranks hold shards of one global batch and an identical encoder. Per the DDP
convention (distributed.py): the mean of the per-rank losses is the single-process loss,
the rank-averaged parameter gradients are the single-process gradients, and the
gradient on a rank's own features is world_size times the single-process gradient of
those rows. Everything runs in one spawn (a few seconds of start-up per process).
"""
import datetime
import math
import os
import socket
import time

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

import infomax_ext as ie
from infomax_ext import losses as L
from infomax_ext.distributed import gather_with_grad, rank_and_world_size

pytestmark = pytest.mark.skipif(
    not (ie._backend.HAS_C and torch.distributed.is_available()), reason="needs _C and torch.distributed")

WORLD, N, D_IN, D = 2, 5, 6, 8
TIMEOUT_S = 120


def global_data():
    g = torch.Generator().manual_seed(1234)
    x1 = torch.randn(WORLD * N, D_IN, generator=g, dtype=torch.float64)
    x2 = x1 + 0.7 * torch.randn(WORLD * N, D_IN, generator=g, dtype=torch.float64)
    bank = torch.randn(7, D, generator=g, dtype=torch.float64)
    return x1, x2, bank


def make_encoder():
    torch.manual_seed(0)
    return torch.nn.Linear(D_IN, D).double()


CASES = {
    "infonce": lambda: L.InfoNCELoss(0.3, gather_distributed=True),
    "infonce_bank": lambda: L.InfoNCELoss(0.3, gather_distributed=True),
    "infonce_symmetric": lambda: L.InfoNCELoss(0.3, symmetric=True, gather_distributed=True),
    "ntxent": lambda: L.NTXentLoss(0.5, gather_distributed=True),
    "clip": lambda: L.ClipLoss(init_logit_scale=1.5, bias=0.2, gather_distributed=True).double(),
}


def run_case(name, x1, x2, bank):
    """Loss and gradients w.r.t. (features z1, z2, bank, encoder and loss parameters)."""
    enc, loss_fn = make_encoder(), CASES[name]()
    bank = bank.clone().requires_grad_()
    z1, z2 = enc(x1), enc(x2)
    args = (z1, z2, bank) if name == "infonce_bank" else (z1, z2)
    loss = loss_fn(*args)
    params = list(enc.parameters()) + list(loss_fn.parameters())
    g = torch.autograd.grad(loss, [z1, z2, bank] + params, allow_unused=True)
    return loss.detach(), [None if t is None else t.detach() for t in g]


def worker(rank, port, outdir):
    torch.set_num_threads(1)
    dist = torch.distributed
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    try:
        x1, x2, bank = global_data()
        sl = slice(rank * N, (rank + 1) * N)
        out = {name: run_case(name, x1[sl], x2[sl], bank) for name in CASES}
        # pos_offset under gather: anchors (3) vs this rank's 5 candidates, offset 1, checked
        # against the cross entropy on the gathered candidates with labels rank * 5 + i + 1
        z1 = x1[sl][:3, :D].clone().requires_grad_()
        z2 = x2[sl][:, :D].clone().requires_grad_()
        ours = L.InfoNCELoss(0.4, gather_distributed=True)(z1, z2, pos_offset=1)
        z2_all = gather_with_grad(z2)[0]
        labels = torch.arange(3) + rank * N + 1
        expected = F.cross_entropy(F.normalize(z1, dim=-1) @ F.normalize(z2_all, dim=-1).T / 0.4, labels)
        out["offset"] = (ours.detach(), expected.detach())
        # mismatched batch sizes: a clear error on every rank, no hang
        n = N if rank == 0 else N - 1
        try:
            L.NTXentLoss(gather_distributed=True)(x1[:n], x2[:n])
            out["mismatch"] = "no error"
        except ValueError as e:
            out["mismatch"] = str(e)
        out["rank_world"] = rank_and_world_size()
        torch.save(out, os.path.join(outdir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    outdir = str(tmp_path_factory.mktemp("dist"))
    ctx = mp.spawn(worker, args=(free_port(), outdir), nprocs=WORLD, join=False)
    deadline = time.monotonic() + TIMEOUT_S
    while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.terminate()
            pytest.fail(f"the {WORLD} gloo processes did not finish within {TIMEOUT_S} s")
    return [torch.load(os.path.join(outdir, f"rank{r}.pt")) for r in range(WORLD)]


@pytest.mark.parametrize("name", list(CASES))
def test_gathered_loss_and_gradients_equal_single_process(ranks, name):
    x1, x2, bank = global_data()
    loss, g = run_case(name, x1, x2, bank)  # no process group: the plain global-batch loss
    losses = torch.stack([r[name][0] for r in ranks])
    torch.testing.assert_close(losses.mean(), loss)
    assert not torch.allclose(losses[0], losses[1])  # the ranks did see different anchors
    per_rank = [r[name][1] for r in ranks]
    for k, (name_k, single) in enumerate(zip(["z1", "z2"], g[:2])):
        # the gradient on a rank's own features: world_size x the single-process rows
        got = torch.cat([per_rank[r][k] for r in range(WORLD)]) / WORLD
        torch.testing.assert_close(got, single, msg=lambda m: f"{name} d/d{name_k}: {m}")
    for k in range(2, len(g)):  # bank, encoder and loss parameters: DDP's average
        if g[k] is None:
            assert all(p[k] is None for p in per_rank)
            continue
        torch.testing.assert_close(sum(p[k] for p in per_rank) / WORLD, g[k])


def test_gathered_pos_offset_and_rank_world(ranks):
    for r, out in enumerate(ranks):
        torch.testing.assert_close(out["offset"][0], out["offset"][1])
        assert out["rank_world"] == (r, WORLD)


def test_mismatched_shapes_raise_on_every_rank(ranks):
    for r, out in enumerate(ranks):
        msg = out["mismatch"]
        assert f"rank {r} of world size {WORLD}" in msg, msg
        assert f"({2 * N}, {D_IN})" in msg and f"({2 * (N - 1)}, {D_IN})" in msg, msg


def test_outside_a_process_group_gather_is_a_no_op():
    assert rank_and_world_size() == (0, 1)
    x = torch.randn(4, 3, requires_grad=True)
    y, rank, world = gather_with_grad(x)
    assert y is x and (rank, world) == (0, 1)
    z1, z2 = torch.randn(6, 4), torch.randn(6, 4)
    for on, off in [(L.InfoNCELoss(gather_distributed=True), L.InfoNCELoss()),
                    (L.NTXentLoss(gather_distributed=True), L.NTXentLoss()),
                    (L.ClipLoss(gather_distributed=True), L.ClipLoss())]:
        torch.testing.assert_close(on(z1, z2), off(z1, z2))
    assert math.isfinite(L.ClipLoss(gather_distributed=True)(z1, z2).item())
