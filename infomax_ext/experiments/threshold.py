"""Slide A4 (Tschannen et al. Sec. 3.3) on the two-view digits: maximise the bound only up
to a threshold t, per architecture (``python -m infomax_ext experiments threshold``).

Two objectives (``--objective``): ``clamp`` maximises ``min(I_est, t)`` on each batch
(:func:`clamped_objective`; once a batch's bound passes t its gradient is zero, so the
encoders stop being pushed); ``target`` minimises the paper's ``|I_est - t|``
(:func:`target_objective`), which pulls the bound to t from both sides. For each t and
each encoder architecture we train the two view encoders with a bilinear critic and
report the linear-probe accuracy of the view-1 features. Architectures:

- on 8x8 digits: ``mlp`` 32-hidden x2-embed; ``conv`` two 3x3 conv layers on the 4x8 view
  image, then a linear map to embed;
- on MNIST (the paper's): ``mlp`` 392-300-300-100; ``conv`` conv(64, 5x5, stride 2) - relu -
  conv(128, 5x5, stride 2) - relu - LayerNorm - global average pool - dense(100) on the 14x28
  view image.

If the architecture matters more than the estimator, the accuracy differs more between
the rows (architectures) than along t.
"""
import argparse
import math
import os

import torch
from torch import nn

from .. import critics as C
from .common import INITS, Timer, format_table, initialise_, markdown_table, mlp, num_threads, out_dir
from .seed import add_common, batches, bound_loss, load_data, probe, run_main, set_defaults

ARCHS = ("mlp", "conv")
OBJECTIVES = ("clamp", "target")
PRESETS = {
    "digits": dict(epochs=30, lr=1e-3, thresholds=[0.5, 1.0, 2.0, 3.0, 4.0], embed=64, hidden=256,
                   objective="clamp", channels=16, init="torch"),
    # the paper's encoders, t in {2, 4} and |I - t|, lr 1e-4
    "mnist": dict(epochs=10, lr=1e-4, thresholds=[2.0, 4.0], embed=100, hidden=300, objective="target",
                  channels=64, init="keras"),
}


class ConvEncoder(nn.Module):
    """A view of 8x8 digits (32 pixels = 4 rows x 8) as a 1x4x8 image: conv3x3(ch) - relu -
    conv3x3(2ch) - relu - linear(embed)."""

    def __init__(self, embed=64, ch=16):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(1, ch, 3, padding=1), nn.ReLU(), nn.Conv2d(ch, 2 * ch, 3, padding=1),
                                 nn.ReLU(), nn.Flatten(), nn.Linear(2 * ch * 32, embed))

    def forward(self, x):
        return self.net(x.reshape(-1, 1, 4, 8))


class PaperConvEncoder(nn.Module):
    """Tschannen et al.'s conv encoder: the view as a 1 x rows x width image, conv(ch, 5x5,
    stride 2, same padding) - relu - conv(2 ch, 5x5, stride 2) - relu - LayerNorm over
    (channels, height, width) with a scale and bias per channel - global average pool -
    linear(embed)."""

    def __init__(self, view_shape=(14, 28), embed=100, ch=64):
        super().__init__()
        self.view_shape = tuple(view_shape)
        self.net = nn.Sequential(nn.Conv2d(1, ch, 5, stride=2, padding=2), nn.ReLU(),
                                 nn.Conv2d(ch, 2 * ch, 5, stride=2, padding=2), nn.ReLU(),
                                 nn.GroupNorm(1, 2 * ch, eps=1e-6),  # one group = LayerNorm over (C, H, W)
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * ch, embed))

    def forward(self, x):
        return self.net(x.reshape(-1, 1, *self.view_shape))


def make_encoder(arch, embed=64, hidden=256, d=32, view_shape=(4, 8), channels=None):
    """``mlp`` (d-hidden x2-embed) or ``conv``: the small 3x3 conv on 8x8 digits' 4x8 views,
    the paper's conv encoder on larger views."""
    if arch == "mlp":
        return mlp(d, hidden, 2, embed)
    if arch == "conv":
        if tuple(view_shape) == (4, 8):
            return ConvEncoder(embed, channels or 16)
        return PaperConvEncoder(view_shape, embed, channels or 64)
    raise ValueError(f"unknown architecture {arch!r}")


def clamped_objective(bound, t):
    """``min(bound, t)``: the objective to maximise; its gradient is zero where bound > t."""
    return torch.clamp(bound, max=t)


def target_objective(bound, t):
    """``-|bound - t|``: the paper's objective (loss ``|I_est - t|``), maximal at bound = t."""
    return -(bound - t).abs()


def train(data, arch, t, epochs=30, batch_size=128, lr=1e-3, embed=64, estimator="infonce", seed=0,
          objective="clamp", hidden=256, channels=None, init="torch"):
    """Returns (g1, history) with ``bound`` per epoch and ``steps_below`` (updates made: with
    ``clamp`` those with bound < t, the others having no gradient; with ``target`` all)."""
    d = data["x1_train"].shape[1]
    shape = data.get("view_shape", (4, 8))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        g1 = initialise_(make_encoder(arch, embed, hidden, d, shape, channels), init)
        g2 = initialise_(make_encoder(arch, embed, hidden, d, shape, channels), init)
        loss_fn = initialise_(bound_loss(estimator, C.Bilinear(embed, embed)), init)
    opt = torch.optim.Adam(list(g1.parameters()) + list(g2.parameters()) + list(loss_fn.parameters()), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    x1, x2 = data["x1_train"], data["x2_train"]
    hist = dict(bound=[], objective=[], steps_below=0)
    for _ in range(epochs):
        vals, objs = [], []
        for idx in batches(len(x1), batch_size, gen):
            bound = -loss_fn(g1(x1[idx]), g2(x2[idx]))
            obj = (clamped_objective if objective == "clamp" else target_objective)(bound, t)
            if objective != "clamp" or bound.item() < t:
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
    ax.set_xlabel("threshold t on the bound (nats)")
    ax.set_ylabel("linear probe test accuracy")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def table(rows, markdown=False):
    header = ["architecture", "t", "final train bound", "updates made", "probe acc"]
    body = [[r["arch"], f"{r['t']:.2f}", f"{r['bound']:.2f}", str(r["steps"]), f"{r['acc']:.3f}"] for r in rows]
    return (markdown_table if markdown else format_table)(header, body)


def run(args):
    set_defaults(args, PRESETS)
    out = out_dir(args.out)
    data = load_data(args)
    log_k = math.log(args.batch_size)
    obj = f"maximise min({args.estimator} bound, t)" if args.objective == "clamp" else \
        f"minimise |{args.estimator} bound - t|"
    print(f"Architecture vs estimator (slide A4) on {args.data}: {obj}, t in {args.thresholds}, "
          f"architectures {args.archs}, embed {args.embed}, bilinear critic, {args.epochs} epochs, Adam lr "
          f"{args.lr:g}, batch {args.batch_size} (log K = {log_k:.2f})")
    rows = []
    with Timer() as tm, num_threads(args.threads):
        for arch in args.archs:
            for t in args.thresholds:
                g1, h = train(data, arch, t, args.epochs, args.batch_size, args.lr, args.embed, args.estimator,
                              args.seed, args.objective, args.hidden, args.channels, args.init)
                rows.append(dict(arch=arch, t=t, bound=h["bound"][-1], steps=h["steps_below"],
                                 acc=probe(g1, data, args.probe_iter, args.seed)))
    name = "threshold.png" if args.data == "digits" else f"threshold_{args.data}.png"
    png = plot(rows, os.path.join(out, name), log_k)
    print(f"\nLinear-probe accuracy against the threshold t ({tm.seconds:.0f} s):")
    print(table(rows))
    print(f"\nwrote {png}")
    return dict(rows=rows, png=png, seconds=tm.seconds)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m infomax_ext experiments threshold",
                                description="Slide A4: probe accuracy vs bound threshold t per architecture.")
    add_common(p, epochs=None)
    p.add_argument("--thresholds", type=float, nargs="+", default=None,
                   help="t values (digits 0.5 1 2 3 4, mnist 2 4)")
    p.add_argument("--archs", nargs="+", default=list(ARCHS), choices=ARCHS)
    p.add_argument("--objective", default=None, choices=OBJECTIVES,
                   help="clamp: maximise min(I, t) (digits); target: minimise |I - t|, the paper's (mnist)")
    p.add_argument("--embed", type=int, default=None, help="features (digits 64, mnist 100)")
    p.add_argument("--hidden", type=int, default=None, help="MLP encoder width (digits 256, mnist 300)")
    p.add_argument("--channels", type=int, default=None, help="first conv layer's channels (digits 16, mnist 64)")
    p.add_argument("--init", default=None, choices=INITS, help="torch (digits) or keras (mnist; see represent)")
    p.add_argument("--estimator", default="infonce", choices=("infonce", "nwj"))
    return run_main(run, p, argv)
