"""Slide A2 (Tschannen et al. Sec. 3.2) on the two-view digits: MLP encoders with skip
connections initialised to the identity (``python -m infomax_ext experiments jacobian``).

Each encoder is ``x -> x + sum of residual blocks`` on the 32-pixel view, with every block's
last linear layer initialised to zero, so at initialisation the encoder is exactly the
identity (Jacobian = I, condition number 1). Trained on InfoNCE (bilinear critic); every
``probe_every`` epochs we record the linear-probe accuracy of view-1 features and the
condition number ``sigma_max / sigma_min`` of the 32x32 encoder Jacobian at held-out data
points (``torch.func.vmap(torch.func.jacrev(g1))``), median and quartiles over the points.
"""
import argparse
import os

import torch
from torch import nn

from .. import critics as C
from .common import Timer, format_table, markdown_table, num_threads, out_dir
from .represent import load_views
from .common import train_epoch
from .seed import add_common, bound_loss, probe


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


def jacobian_condition(f, x):
    """Condition numbers (2-norm: sigma_max / sigma_min) of the Jacobian of ``f`` at each row of
    ``x`` (N, d) -> (N,); ``torch.func.vmap(torch.func.jacrev(f))`` on single rows."""
    from torch.func import jacrev, vmap

    J = vmap(jacrev(lambda v: f(v.unsqueeze(0)).squeeze(0)))(x)  # (N, d_out, d_in)
    s = torch.linalg.svdvals(J)
    return s[..., 0] / s[..., -1]


def train(data, epochs=60, batch_size=128, lr=1e-3, hidden=128, blocks=2, estimator="infonce", probe_every=10,
          n_jac=200, probe_iter=200, seed=0):
    """Returns a history: ``probe_epoch``, ``probe_acc``, ``cond_median``, ``cond_q25``,
    ``cond_q75`` (epoch 0 = the identity init), ``epoch``, ``bound``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        g1, g2 = SkipMLP(32, hidden, blocks), SkipMLP(32, hidden, blocks)
        loss_fn = bound_loss(estimator, C.Bilinear(32, 32))
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


def plot(hist, path, dpi=80):
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
    ax.set_title("identity-initialised skip MLP, InfoNCE (bilinear critic)", fontsize=9)
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
    out = out_dir(args.out)
    data = load_views(seed=args.seed)
    print(f"Jacobian conditioning (slide A2): skip MLP encoders 32 -> 32 ({args.blocks} residual blocks of width "
          f"{args.hidden}, identity at init), {args.estimator}, bilinear critic, {args.epochs} epochs; "
          f"cond(J) on {args.n_jac} held-out view-1 points")
    with Timer() as t, num_threads(args.threads):
        hist = train(data, args.epochs, args.batch_size, args.lr, args.hidden, args.blocks, args.estimator,
                     args.probe_every, args.n_jac, args.probe_iter, args.seed)
    png = plot(hist, os.path.join(out, "jacobian.png"))
    print(f"\nLinear-probe accuracy and encoder-Jacobian condition number over training ({t.seconds:.0f} s):")
    print(table(hist))
    print(f"\nwrote {png}")
    return dict(history=hist, png=png, seconds=t.seconds)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m infomax_ext experiments jacobian",
                                description="Slide A2: probe accuracy and Jacobian condition number.")
    add_common(p, epochs=200)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--blocks", type=int, default=2)
    p.add_argument("--estimator", default="infonce", choices=("infonce", "nwj"))
    p.add_argument("--probe-every", type=int, default=25)
    p.add_argument("--n-jac", type=int, default=200, help="held-out points for the condition number")
    run(p.parse_args(argv))
    return 0
