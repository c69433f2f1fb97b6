"""Wang & Isola (2020) on the two-view digits: contrastive vs direct alignment + uniformity
(``python -m infomax_ext experiments alignuniform``).

Two MLP encoders (view 1, view 2) with ``embed``-dimensional output (2 by default, so the
L2-normalised features lie on the circle S^1) are trained either

- ``contrastive``: InfoNCE with temperature (:class:`infomax_ext.InfoNCELoss`, cosine), or
- ``direct``: ``align(x, y) + lam * (uniform(x) + uniform(y)) / 2`` on normalised features
  (:class:`infomax_ext.losses.AlignUniformLoss`).

Reported on the held-out split: ``align`` (alpha=2), ``uniform`` (t=2, view-1 features) and
the linear-probe accuracy on the normalised view-1 features, plus the random-init
encoders; the plot draws the test features on S^1 for random init / contrastive / direct.
"""
import argparse
import math
import os

import torch
import torch.nn.functional as F

from ..losses import AlignUniformLoss, InfoNCELoss
from .common import Timer, format_table, markdown_table, mlp, num_threads, out_dir
from .represent import linear_probe
from .seed import add_common, batches, load_data, probe_kind, run_main

METHODS = ("random init", "contrastive", "direct")


def align(x, y, alpha=2.0):
    """``mean_i |x_i - y_i|_2^alpha`` (docs/conventions.md)."""
    return (x - y).norm(p=2, dim=1).pow(alpha).mean()


def uniform(x, t=2.0):
    """``log mean_{i<j} exp(-t |x_i - x_j|^2)`` (docs/conventions.md, via ``torch.pdist``)."""
    return torch.pdist(x, p=2).pow(2).mul(-t).exp().mean().log()


def normalized_features(enc, x):
    enc.eval()
    with torch.no_grad():
        f = F.normalize(enc(x).double(), dim=-1)
    enc.train()
    return f


def _encoders(embed, hidden, layers, seed, d=32):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return mlp(d, hidden, layers, embed), mlp(d, hidden, layers, embed)


def train(data, method, epochs=100, batch_size=128, lr=1e-3, hidden=128, layers=2, embed=2,
          temperature=0.2, lam=1.0, seed=0):
    """Trains (or, for ``random init``, only builds) the two encoders; returns (g1, g2)."""
    g1, g2 = _encoders(embed, hidden, layers, seed, data["x1_train"].shape[1])
    if method == "random init":
        return g1, g2
    if method == "contrastive":
        loss_fn = InfoNCELoss(temperature=temperature, symmetric=True, normalize=True)
    elif method == "direct":
        loss_fn = AlignUniformLoss(lam=lam, normalize=True)
    else:
        raise ValueError(f"unknown method {method!r}")
    opt = torch.optim.Adam(list(g1.parameters()) + list(g2.parameters()), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    x1, x2 = data["x1_train"], data["x2_train"]
    for _ in range(epochs):
        for idx in batches(len(x1), batch_size, gen):
            loss = loss_fn(g1(x1[idx]), g2(x2[idx]))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return g1, g2


def evaluate(g1, g2, data, probe_iter=200, seed=0):
    f1, f2 = normalized_features(g1, data["x1_test"]), normalized_features(g2, data["x2_test"])
    f1tr = normalized_features(g1, data["x1_train"])
    acc = linear_probe(f1tr.numpy(), data["y_train"].numpy(), f1.numpy(), data["y_test"].numpy(), probe_iter, seed,
                       probe_kind(data))
    return dict(align=align(f1, f2).item(), uniform=uniform(f1).item(), acc=acc, features=f1,
                labels=data["y_test"])


def circle_plot(results, path, dpi=80):
    """Test features on S^1 (one panel per method; colour = digit; each class drawn at a
    slightly different radius so overlapping classes stay visible) and the angle histogram."""
    from .plotting import _plt

    plt = _plt()
    n = len(results)
    fig, axes = plt.subplots(2, n, figsize=(3.2 * n, 5.6), gridspec_kw=dict(height_ratios=[3, 1.4]))
    for k, r in enumerate(results):
        f, y = r["features"], r["labels"]
        if f.shape[1] != 2:
            f = F.normalize(f[:, :2], dim=-1)  # first two coordinates when embed > 2
        rad = 1.0 + 0.04 * y.double()
        ax = axes[0, k]
        ax.add_patch(plt.Circle((0, 0), 1.0, fill=False, color="0.7", lw=0.8))
        sc = ax.scatter(f[:, 0] * rad, f[:, 1] * rad, c=y, cmap="tab10", s=5, vmin=-0.5, vmax=9.5)
        ax.set_aspect("equal")
        ax.set_xlim(-1.5, 1.5), ax.set_ylim(-1.5, 1.5)
        ax.set_xticks([]), ax.set_yticks([])
        ax.set_title(f"{r['method']}\nalign {r['align']:.2f}, unif {r['uniform']:.2f}, acc {r['acc']:.2f}",
                     fontsize=8)
        ang = torch.atan2(f[:, 1], f[:, 0])
        axes[1, k].hist(ang.numpy(), bins=36, range=(-math.pi, math.pi), color="C0")
        axes[1, k].set_xlabel("angle", fontsize=8)
    fig.colorbar(sc, ax=axes[0, :].tolist(), shrink=0.6, ticks=range(10), label="digit")
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def table(rows, markdown=False):
    header = ["method", "align (lower better)", "uniform (lower better)", "probe acc"]
    body = [[r["method"], f"{r['align']:.3f}", f"{r['uniform']:.3f}", f"{r['acc']:.3f}"] for r in rows]
    return (markdown_table if markdown else format_table)(header, body)


def run(args):
    out = out_dir(args.out)
    data = load_data(args)
    print(f"Alignment & uniformity (Wang & Isola) on two-view {args.data}: encoders MLP {data['dim']}-{args.hidden}x"
          f"{args.layers}-"
          f"{args.embed}, L2-normalised; contrastive = symmetric InfoNCE, temperature {args.temperature}; "
          f"direct = align + {args.lam} * uniform; {args.epochs} epochs, batch {args.batch_size}")
    rows = []
    with Timer() as t, num_threads(args.threads):
        for m in METHODS:
            g1, g2 = train(data, m, args.epochs, args.batch_size, args.lr, args.hidden, args.layers, args.embed,
                           args.temperature, args.lam, args.seed)
            r = evaluate(g1, g2, data, args.probe_iter, args.seed)
            r["method"] = m
            rows.append(r)
    png = circle_plot(rows, os.path.join(out, "alignuniform.png" if args.data == "digits"
                                         else f"alignuniform_{args.data}.png"))
    print(f"\nHeld-out align, uniform (view-1 features) and linear-probe accuracy ({t.seconds:.0f} s):")
    print(table(rows))
    print(f"\nwrote {png}")
    return dict(rows=rows, png=png, seconds=t.seconds)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m infomax_ext experiments alignuniform",
                                description="Wang & Isola: contrastive vs direct align + uniform on S^1.")
    add_common(p, epochs=100)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--embed", type=int, default=2, help="output size (2: features on S^1)")
    p.add_argument("--temperature", type=float, default=0.2)
    p.add_argument("--lam", type=float, default=1.0, help="weight of the uniformity term")
    return run_main(run, p, argv)
