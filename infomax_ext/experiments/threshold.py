"""Slide A4 (Tschannen et al. Sec. 3.4) on the two-view digits: maximise the bound only up
to a threshold t, per architecture (``python -m infomax_ext experiments threshold``).

The training objective is ``min(I_est, t)`` on each batch (:func:`clamped_objective`): once a
batch's bound passes t its gradient is zero, so the encoders stop being pushed. For each t
and each encoder architecture (``mlp``: 32-hidden x2-embed; ``conv``: two 3x3 conv layers on
the 4x8 view image, then a linear map to embed) we train the two view encoders with a
bilinear critic and report the linear-probe accuracy of the view-1 features. If the
architecture matters more than the estimator, the accuracy differs more between the rows
(architectures) than along t.
"""
import argparse
import math
import os

import torch
from torch import nn

from .. import critics as C
from .common import Timer, format_table, markdown_table, mlp, num_threads, out_dir
from .represent import load_views
from .seed import add_common, batches, bound_loss, probe

ARCHS = ("mlp", "conv")


class ConvEncoder(nn.Module):
    """A view (32 pixels = 4 rows x 8) as a 1x4x8 image: conv3x3(ch) - relu - conv3x3(2ch) - relu
    - linear(embed)."""

    def __init__(self, embed=64, ch=16):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(1, ch, 3, padding=1), nn.ReLU(), nn.Conv2d(ch, 2 * ch, 3, padding=1),
                                 nn.ReLU(), nn.Flatten(), nn.Linear(2 * ch * 32, embed))

    def forward(self, x):
        return self.net(x.reshape(-1, 1, 4, 8))


def make_encoder(arch, embed=64, hidden=256):
    if arch == "mlp":
        return mlp(32, hidden, 2, embed)
    if arch == "conv":
        return ConvEncoder(embed)
    raise ValueError(f"unknown architecture {arch!r}")


def clamped_objective(bound, t):
    """``min(bound, t)``: the objective to maximise; its gradient is zero where bound > t."""
    return torch.clamp(bound, max=t)


def train(data, arch, t, epochs=30, batch_size=128, lr=1e-3, embed=64, estimator="infonce", seed=0):
    """Returns (g1, history) with ``bound`` per epoch and ``steps_below`` (updates with a
    nonzero gradient, i.e. bound < t)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        g1, g2 = make_encoder(arch, embed), make_encoder(arch, embed)
        loss_fn = bound_loss(estimator, C.Bilinear(embed, embed))
    opt = torch.optim.Adam(list(g1.parameters()) + list(g2.parameters()) + list(loss_fn.parameters()), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    x1, x2 = data["x1_train"], data["x2_train"]
    hist = dict(bound=[], objective=[], steps_below=0)
    for _ in range(epochs):
        vals, objs = [], []
        for idx in batches(len(x1), batch_size, gen):
            bound = -loss_fn(g1(x1[idx]), g2(x2[idx]))
            obj = clamped_objective(bound, t)
            if bound.item() < t:
                hist["steps_below"] += 1
                opt.zero_grad(set_to_none=True)
                (-obj).backward()
                opt.step()
            vals.append(bound.item()), objs.append(obj.item())
        hist["bound"].append(sum(vals) / len(vals))
        hist["objective"].append(sum(objs) / len(objs))
    return g1, hist


def plot(rows, path, log_k=None, dpi=80):
    from .plotting import _plt

    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for k, arch in enumerate(dict.fromkeys(r["arch"] for r in rows)):
        rs = [r for r in rows if r["arch"] == arch]
        ax.plot([r["t"] for r in rs], [r["acc"] for r in rs], "o-", color=f"C{k}", label=arch)
    if log_k is not None:
        ax.axvline(log_k, color="0.6", ls=":", label="log K")
    ax.set_xlabel("threshold t on the InfoNCE bound (nats)")
    ax.set_ylabel("linear probe test accuracy")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def table(rows, markdown=False):
    header = ["architecture", "t", "final train bound", "updates (bound < t)", "probe acc"]
    body = [[r["arch"], f"{r['t']:.2f}", f"{r['bound']:.2f}", str(r["steps"]), f"{r['acc']:.3f}"] for r in rows]
    return (markdown_table if markdown else format_table)(header, body)


def run(args):
    out = out_dir(args.out)
    data = load_views(seed=args.seed)
    log_k = math.log(args.batch_size)
    print(f"Architecture vs estimator (slide A4): maximise min({args.estimator} bound, t), t in {args.thresholds}, "
          f"architectures {args.archs}, embed {args.embed}, bilinear critic, {args.epochs} epochs, "
          f"batch {args.batch_size} (log K = {log_k:.2f})")
    rows = []
    with Timer() as tm, num_threads(args.threads):
        for arch in args.archs:
            for t in args.thresholds:
                g1, h = train(data, arch, t, args.epochs, args.batch_size, args.lr, args.embed, args.estimator,
                              args.seed)
                rows.append(dict(arch=arch, t=t, bound=h["bound"][-1], steps=h["steps_below"],
                                 acc=probe(g1, data, args.probe_iter, args.seed)))
    png = plot(rows, os.path.join(out, "threshold.png"), log_k)
    print(f"\nLinear-probe accuracy against the threshold t ({tm.seconds:.0f} s):")
    print(table(rows))
    print(f"\nwrote {png}")
    return dict(rows=rows, png=png, seconds=tm.seconds)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m infomax_ext experiments threshold",
                                description="Slide A4: probe accuracy vs bound threshold t per architecture.")
    add_common(p, epochs=30)
    p.add_argument("--thresholds", type=float, nargs="+", default=[0.5, 1.0, 2.0, 3.0, 4.0])
    p.add_argument("--archs", nargs="+", default=list(ARCHS), choices=ARCHS)
    p.add_argument("--embed", type=int, default=64)
    p.add_argument("--estimator", default="infonce", choices=("infonce", "nwj"))
    run(p.parse_args(argv))
    return 0
