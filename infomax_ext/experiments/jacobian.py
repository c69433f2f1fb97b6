"""Slide A2 (Tschannen et al. Sec. 3.1) on the two-view digits: MLP encoders with skip
connections initialised to (about) the identity (``python -m infomax_ext experiments jacobian``).

Two encoder forms (``--arch``), both mapping a view of d pixels to d features:

- ``residual`` (default on 8x8 digits, d = 32): ``x -> x + sum of residual blocks``, every
  block's last linear layer initialised to zero, so at initialisation the encoder is exactly
  the identity (Jacobian = I, condition number 1);
- ``shortcut`` (default on MNIST, d = 392; the paper's shape): ``layers`` dense layers of
  width d, each ``x -> x + relu(W x + b)`` (the last one without the relu), W drawn from a
  normal of std 1e-4 truncated at 2 std, b = 0: the identity up to ~1e-4.

Trained on InfoNCE (bilinear d x d critic); every ``probe_every`` epochs we record the
linear-probe accuracy of view-1 features and the condition number ``sigma_max / sigma_min``
of the d x d encoder Jacobian at held-out data points
(``torch.func.vmap(torch.func.jacrev(g1))``), median and quartiles over the points.
"""
import argparse
import os

import torch
from torch import nn

from .. import critics as C
from .common import Timer, format_table, initialise_, markdown_table, num_threads, out_dir, train_epoch
from .seed import add_common, bound_loss, load_data, probe, run_main, set_defaults

ARCHS = ("residual", "shortcut")
PRESETS = {
    "digits": dict(arch="residual", epochs=200, lr=1e-3, hidden=128, blocks=2, layers=5, probe_every=25, n_jac=200,
                   init="torch"),
    # the paper's five 392-wide shortcut layers, lr 1e-4
    "mnist": dict(arch="shortcut", epochs=20, lr=1e-4, hidden=392, blocks=2, layers=5, probe_every=5, n_jac=50,
                  init="keras"),
}


class ResidualBlock(nn.Module):
    def __init__(self, d, hidden):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, hidden), nn.Linear(hidden, d)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, x):
        return x + self.fc2(torch.relu(self.fc1(x)))


class SkipMLP(nn.Sequential):
    """``blocks`` residual blocks ``x + W2 relu(W1 x + b1) + b2`` with W2, b2 = 0: the identity
    at initialisation."""

    def __init__(self, d, hidden=128, blocks=2):
        super().__init__(*[ResidualBlock(d, hidden) for _ in range(blocks)])


class ShortcutLayer(nn.Module):
    def __init__(self, d, relu=True, init_std=1e-4):
        super().__init__()
        self.fc, self.relu = nn.Linear(d, d), relu
        nn.init.trunc_normal_(self.fc.weight, std=init_std, a=-2 * init_std, b=2 * init_std)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x):
        h = self.fc(x)
        return x + (torch.relu(h) if self.relu else h)


class ShortcutMLP(nn.Sequential):
    """The paper's skip-connection MLP: ``layers`` layers ``x + relu(W x + b)`` of width d (the
    last without the relu), W ~ N(0, init_std^2) truncated at 2 std, b = 0."""

    def __init__(self, d, layers=5, init_std=1e-4):
        super().__init__(*[ShortcutLayer(d, k < layers - 1, init_std) for k in range(layers)])


def make_encoder(arch, d, hidden=128, blocks=2, layers=5):
    if arch == "residual":
        return SkipMLP(d, hidden, blocks)
    if arch == "shortcut":
        return ShortcutMLP(d, layers)
    raise ValueError(f"unknown encoder {arch!r}; choose one of {', '.join(ARCHS)}")


def jacobian_condition(f, x):
    """Condition numbers (2-norm: sigma_max / sigma_min) of the Jacobian of ``f`` at each row of
    ``x`` (N, d) -> (N,); ``torch.func.vmap(torch.func.jacrev(f))`` on single rows."""
    from torch.func import jacrev, vmap

    J = vmap(jacrev(lambda v: f(v.unsqueeze(0)).squeeze(0)))(x)  # (N, d_out, d_in)
    s = torch.linalg.svdvals(J)
    return s[..., 0] / s[..., -1]


def train(data, epochs=60, batch_size=128, lr=1e-3, hidden=128, blocks=2, estimator="infonce", probe_every=10,
          n_jac=200, probe_iter=200, seed=0, arch="residual", layers=5, init="torch"):
    """Returns a history: ``probe_epoch``, ``probe_acc``, ``cond_median``, ``cond_q25``,
    ``cond_q75`` (epoch 0 = the identity init), ``epoch``, ``bound``."""
    d = data["x1_train"].shape[1]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        g1, g2 = make_encoder(arch, d, hidden, blocks, layers), make_encoder(arch, d, hidden, blocks, layers)
        loss_fn = initialise_(bound_loss(estimator, C.Bilinear(d, d)), init)  # the critic only
    opt = torch.optim.Adam(list(g1.parameters()) + list(g2.parameters()) + list(loss_fn.parameters()), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    x1, x2 = data["x1_train"], data["x2_train"]
    xj = data["x1_test"][:n_jac]
    hist = dict(epoch=[], bound=[], probe_epoch=[], probe_acc=[], cond_median=[], cond_q25=[], cond_q75=[])

    def record(epoch):
        with torch.no_grad():
            c = jacobian_condition(g1, xj)
        q = torch.quantile(c.double(), torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64))
        hist["probe_epoch"].append(epoch)
        hist["probe_acc"].append(probe(g1, data, probe_iter, seed))
        hist["cond_q25"].append(q[0].item()), hist["cond_median"].append(q[1].item())
        hist["cond_q75"].append(q[2].item())

    record(0)
    for epoch in range(1, epochs + 1):
        hist["epoch"].append(epoch)
        hist["bound"].append(train_epoch(loss_fn, g1, g2, x1, x2, opt, batch_size, gen, skip_nonfinite=False))
        if epoch % probe_every == 0 or epoch == epochs:
            record(epoch)
    return hist


def plot(hist, path, dpi=80, title="identity-initialised skip MLP, InfoNCE (bilinear critic)"):
    from .plotting import _plt

    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    e = hist["probe_epoch"]
    ax.plot(e, hist["probe_acc"], "o-", color="C0", label="linear probe accuracy")
    ax.set_xlabel("epoch")
    ax.set_ylabel("linear probe test accuracy", color="C0")
    ax2 = ax.twinx()
    ax2.plot(e, hist["cond_median"], "s-", color="C3", label="cond(J) median")
    ax2.fill_between(e, hist["cond_q25"], hist["cond_q75"], color="C3", alpha=0.2)
    ax2.set_yscale("log")
    ax2.set_ylabel("condition number of encoder Jacobian", color="C3")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def table(hist, markdown=False):
    header = ["epoch", "probe acc", "cond(J) median", "cond(J) IQR"]
    rows = [[str(e), f"{a:.3f}", f"{m:.1f}", f"{lo:.1f}-{hi:.1f}"]
            for e, a, m, lo, hi in zip(hist["probe_epoch"], hist["probe_acc"], hist["cond_median"],
                                       hist["cond_q25"], hist["cond_q75"])]
    return (markdown_table if markdown else format_table)(header, rows)


def run(args):
    set_defaults(args, PRESETS)
    out = out_dir(args.out)
    data = load_data(args)
    d = data["dim"]
    shape = (f"{args.blocks} residual blocks of width {args.hidden}, identity at init" if args.arch == "residual"
             else f"{args.layers} shortcut layers x + relu(Wx + b) of width {d}, W ~ N(0, 1e-4^2) at init")
    print(f"Jacobian conditioning (slide A2) on {args.data}: skip MLP encoders {d} -> {d} ({shape}), "
          f"{args.estimator}, bilinear critic, {args.epochs} epochs, Adam lr {args.lr:g}; "
          f"cond(J) on {args.n_jac} held-out view-1 points")
    with Timer() as t, num_threads(args.threads):
        hist = train(data, args.epochs, args.batch_size, args.lr, args.hidden, args.blocks, args.estimator,
                     args.probe_every, args.n_jac, args.probe_iter, args.seed, args.arch, args.layers, args.init)
    name = "jacobian.png" if args.data == "digits" else f"jacobian_{args.data}.png"
    png = plot(hist, os.path.join(out, name), title=f"{args.arch} skip MLP on {args.data}, {args.estimator} "
                                                   f"(bilinear critic)")
    print(f"\nLinear-probe accuracy and encoder-Jacobian condition number over training ({t.seconds:.0f} s):")
    print(table(hist))
    print(f"\nwrote {png}")
    return dict(history=hist, png=png, seconds=t.seconds)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m infomax_ext experiments jacobian",
                                description="Slide A2: probe accuracy and Jacobian condition number.")
    add_common(p, epochs=None)
    p.add_argument("--arch", default=None, choices=ARCHS,
                   help="residual (digits default) or shortcut (the paper's; mnist default)")
    p.add_argument("--hidden", type=int, default=None, help="residual blocks' width (128)")
    p.add_argument("--blocks", type=int, default=None, help="residual blocks (2)")
    p.add_argument("--layers", type=int, default=None, help="shortcut layers (5)")
    p.add_argument("--init", default=None, choices=("torch", "keras"),
                   help="the bilinear critic's W: torch (digits) or keras, Glorot-uniform (mnist)")
    p.add_argument("--estimator", default="infonce", choices=("infonce", "nwj"))
    p.add_argument("--probe-every", type=int, default=None, help="epochs between probes (digits 25, mnist 5)")
    p.add_argument("--n-jac", type=int, default=None,
                   help="held-out points for the condition number (digits 200, mnist 50)")
    return run_main(run, p, argv)
