"""Tschannen et al. (2020)'s two-view experiment on scikit-learn's 8x8 digits
(``python -m infomax_ext represent``).

Each 8x8 image (``sklearn.datasets.load_digits``, pixels scaled to [0, 1]) is cut into
two views: **view 1 = the top four rows** (32 pixels), **view 2 = the bottom four rows**.
MLP encoders ``g1``, ``g2`` map the views to ``embed``-dimensional features and a critic
scores every pair of a batch: ``S[i, j] = f(g1(x1_i), g2(x2_j))``, rows the view-1
anchors, columns the view-2 candidates, positives on the diagonal. Encoders and critic
are trained with Adam to maximise an MI lower bound (InfoNCE or NWJ). Critics
(Tschannen et al. Sec. 3.3):

- ``bilinear``: ``g1(x1)^T W g2(x2)``;
- ``separable``: ``<phi1(g1(x1)), phi2(g2(x2))>`` with one-hidden-layer MLPs phi1, phi2;
- ``concat``: an MLP (one hidden layer, fused) on ``[g1(x1); g2(x2)]``, the largest critic.

Every ``probe_every`` epochs the view-1 encoder is frozen and a linear classifier
(scikit-learn ``LogisticRegression(solver="saga")`` on standardised features) is fit on
the training split and scored on the held-out split (25 %, stratified). The final
bound is evaluated without gradients on batches of the held-out split.
"""
import argparse
import math
import os
import sys
import warnings

import torch

from .. import critics as C
from ..losses import BoundLoss, NWJLoss
from .common import Timer, format_table, markdown_table, mlp, num_threads, out_dir, progress, train_epoch

__all__ = ["load_views", "make_critic", "linear_probe", "train_two_view", "run", "main"]

CRITICS = ("bilinear", "separable", "concat")
ESTIMATORS = ("infonce", "nwj")


def load_views(test_size=0.25, seed=0):
    """dict of float32 tensors ``x1_train, x2_train, y_train, x1_test, x2_test, y_test``
    (view 1 = top four rows, 32 pixels; view 2 = bottom four rows), pixels in [0, 1]."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    X, y = load_digits(return_X_y=True)
    X = X / 16.0
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=test_size, stratify=y, random_state=seed)
    f = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    return dict(x1_train=f(Xtr[:, :32]), x2_train=f(Xtr[:, 32:]), y_train=torch.tensor(ytr),
                x1_test=f(Xte[:, :32]), x2_test=f(Xte[:, 32:]), y_test=torch.tensor(yte))


def make_critic(kind, embed, critic_hidden=128):
    """A critic on the encoders' (embed,) features."""
    if kind == "bilinear":
        return C.Bilinear(embed, embed)
    if kind == "separable":
        return C.Separable(mlp(embed, critic_hidden, 1, embed), mlp(embed, critic_hidden, 1, embed))
    if kind == "concat":
        return C.ConcatMLP(embed, embed, critic_hidden, 1, "relu")
    raise ValueError(f"unknown critic {kind!r}; choose one of {', '.join(CRITICS)}")


def _make_loss(estimator, critic):
    if estimator == "infonce":
        return BoundLoss("infonce", critic)
    if estimator == "nwj":
        return NWJLoss(critic)
    raise ValueError(f"unknown estimator {estimator!r}; choose one of {', '.join(ESTIMATORS)}")


def linear_probe(f_train, y_train, f_test, y_test, max_iter=200, seed=0):
    """Test accuracy of ``LogisticRegression(solver="saga")`` on standardised features."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    sc = StandardScaler().fit(f_train)
    clf = LogisticRegression(solver="saga", max_iter=max_iter, tol=1e-3, random_state=seed)
    with warnings.catch_warnings():
        # NB: saga stops at max_iter on a few feature sets; the accuracy is what we report.
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(sc.transform(f_train), y_train)
    return float(clf.score(sc.transform(f_test), y_test))


def _features(enc, x):
    enc.eval()
    with torch.no_grad():
        f = enc(x).double().numpy()
    enc.train()
    return f


def train_two_view(data, critic="bilinear", estimator="infonce", epochs=40, batch_size=128, lr=1e-3,
                   hidden=256, layers=2, embed=64, critic_hidden=128, probe_every=10, probe_iter=200,
                   seed=0, bar=None):
    """Trains g1, g2 and the critic; returns a history dict.

    Keys: ``epoch``, ``bound`` (mean training bound per epoch), ``probe_epoch``,
    ``probe_acc`` (test accuracy of the linear probe on frozen g1 features; epoch 0 is the
    untrained encoder), ``test_bound`` (final bound, mean over held-out batches),
    ``test_bound_std``, ``log_k``.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        g1 = mlp(32, hidden, layers, embed)
        g2 = mlp(32, hidden, layers, embed)
        loss_fn = _make_loss(estimator, make_critic(critic, embed, critic_hidden))
    params = list(g1.parameters()) + list(g2.parameters()) + list(loss_fn.parameters())
    opt = torch.optim.Adam(params, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    x1, x2 = data["x1_train"], data["x2_train"]
    probe = lambda: linear_probe(_features(g1, x1), data["y_train"].numpy(),  # noqa: E731
                                 _features(g1, data["x1_test"]), data["y_test"].numpy(), probe_iter, seed)
    hist = dict(epoch=[], bound=[], probe_epoch=[0], probe_acc=[probe()], log_k=math.log(batch_size))
    for epoch in range(1, epochs + 1):
        hist["epoch"].append(epoch)
        hist["bound"].append(train_epoch(loss_fn, g1, g2, x1, x2, opt, batch_size, gen))
        if epoch % probe_every == 0 or epoch == epochs:
            hist["probe_epoch"].append(epoch)
            hist["probe_acc"].append(probe())
        if bar is not None:
            bar.update(1)
            bar.set_postfix_str(f"{critic}/{estimator} bound={hist['bound'][-1]:.2f} "
                                f"acc={hist['probe_acc'][-1]:.3f}")
    g1.eval(), g2.eval(), loss_fn.eval()
    t1, t2 = data["x1_test"], data["x2_test"]
    m = len(t1) // batch_size
    with torch.no_grad():
        tb = torch.tensor([-loss_fn(g1(t1[k * batch_size:(k + 1) * batch_size]),
                                    g2(t2[k * batch_size:(k + 1) * batch_size])).item() for k in range(m)])
    hist["test_bound"] = tb.mean().item()
    hist["test_bound_std"] = tb.std().item() if m > 1 else 0.0
    return hist


def add_arguments(p):
    p.add_argument("--critics", nargs="+", default=list(CRITICS), choices=CRITICS)
    p.add_argument("--estimators", nargs="+", default=list(ESTIMATORS), choices=ESTIMATORS)
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--hidden", type=int, default=256, help="encoder MLP width")
    p.add_argument("--layers", type=int, default=2, help="encoder hidden layers")
    p.add_argument("--embed", type=int, default=64, help="encoder output size")
    p.add_argument("--critic-hidden", type=int, default=128,
                   help="hidden width of the separable critic's MLPs and of the concat critic")
    p.add_argument("--probe-every", type=int, default=10, help="epochs between linear probes")
    p.add_argument("--probe-iter", type=int, default=200, help="saga max_iter")
    p.add_argument("--seed", type=int, default=0, help="data split and first training seed")
    p.add_argument("--seeds", type=int, default=1, help="training seeds to average (seed, seed+1, ...)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="infomax_out")
    p.add_argument("--no-progress", action="store_true")
    return p


def table(result, markdown=False):
    seeds = result.get("seeds", 1)
    pm = (lambda m, sd: f"{m:.3f} ± {sd:.3f}") if seeds > 1 else (lambda m, sd: f"{m:.3f}")  # noqa: E731
    header = ["critic", "estimator", "test bound", "log K", "probe acc (epoch 0)", "probe acc (final)"]
    rows = [[r["critic"], r["estimator"], f"{r['test_bound']:.2f} ± {r['test_bound_std']:.2f}",
             f"{r['log_k']:.2f}", pm(r["acc0"], r["acc0_std"]), pm(r["acc"], r["acc_std"])]
            for r in result["rows"]]
    rows.append(["raw view-1 pixels", "-", "-", "-", "-", f"{result['pixel_acc']:.3f}"])
    return (markdown_table if markdown else format_table)(header, rows)


def _mean_std(xs):
    t = torch.tensor(xs, dtype=torch.float64)
    return t.mean().item(), (t.std().item() if len(xs) > 1 else 0.0)


def run(args):
    """Trains every critic x estimator (for each of ``args.seeds`` seeds); prints the table and
    writes the plot.

    Returns dict(rows=[dict(critic, estimator, test_bound, test_bound_std, log_k, acc0, acc0_std,
    acc, acc_std)], histories={(critic, estimator): [history per seed]}, pixel_acc, seeds, png,
    seconds). With one seed ``test_bound_std`` is the spread over held-out batches; with more,
    the spread of the per-seed bounds (and ``acc_std`` that of the accuracies).
    """
    from . import plotting

    out = out_dir(args.out)
    data = load_views(seed=args.seed)
    seeds = [args.seed + k for k in range(args.seeds)]
    print(f"Two-view digits (Tschannen et al.): {len(data['x1_train'])} train / {len(data['x1_test'])} test, "
          f"view 1 = top 4 rows, view 2 = bottom 4 rows; encoders MLP 32-{args.hidden}x{args.layers}-{args.embed}, "
          f"critic width {args.critic_hidden}, {args.epochs} epochs, batch {args.batch_size}, Adam lr {args.lr:g}, "
          f"{len(seeds)} seed(s); probe: saga logistic regression on frozen view-1 features every "
          f"{args.probe_every} epochs")
    histories, rows = {}, []
    with Timer() as t, num_threads(args.threads):
        pixel_acc = linear_probe(data["x1_train"].double().numpy(), data["y_train"].numpy(),
                                 data["x1_test"].double().numpy(), data["y_test"].numpy(), args.probe_iter,
                                 args.seed)
        bar = progress(len(args.critics) * len(args.estimators) * args.epochs * len(seeds), "represent",
                       disable=args.no_progress)
        for c in args.critics:
            for e in args.estimators:
                hs = [train_two_view(data, c, e, args.epochs, args.batch_size, args.lr, args.hidden, args.layers,
                                     args.embed, args.critic_hidden, args.probe_every, args.probe_iter, s, bar)
                      for s in seeds]
                histories[(c, e)] = hs
                tb, tb_sd = _mean_std([h["test_bound"] for h in hs])
                acc0, acc0_sd = _mean_std([h["probe_acc"][0] for h in hs])
                acc, acc_sd = _mean_std([h["probe_acc"][-1] for h in hs])
                rows.append(dict(critic=c, estimator=e, test_bound=tb,
                                 test_bound_std=hs[0]["test_bound_std"] if len(hs) == 1 else tb_sd,
                                 log_k=hs[0]["log_k"], acc0=acc0, acc0_std=acc0_sd, acc=acc, acc_std=acc_sd))
        bar.close()
    png = os.path.join(out, "represent.png")
    plotting.represent_plot({k: _average(hs) for k, hs in histories.items()}, png)
    result = dict(rows=rows, histories=histories, pixel_acc=pixel_acc, seeds=len(seeds), png=png,
                  seconds=t.seconds)
    spread = "batches" if len(seeds) == 1 else "seeds (mean ± std)"
    print(f"\nFinal bound (held-out batches of {args.batch_size}; ± over {spread}) and linear-probe test "
          f"accuracy ({t.seconds:.0f} s):")
    print(table(result))
    print(f"\nwrote {png}\n(output folder: {out})")
    return result


def _average(hs):
    """The per-epoch mean of several seeds' histories (same epochs)."""
    avg = lambda key: torch.tensor([h[key] for h in hs], dtype=torch.float64).mean(0).tolist()  # noqa: E731
    return dict(epoch=hs[0]["epoch"], bound=avg("bound"), probe_epoch=hs[0]["probe_epoch"],
                probe_acc=avg("probe_acc"))


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m infomax_ext represent",
                                description="Tschannen et al.'s two-view experiment on 8x8 digits with a "
                                            "linear probe.")
    add_arguments(p)
    run(p.parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
