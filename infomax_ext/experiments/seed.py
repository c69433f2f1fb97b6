"""The follow-up experiments of the MI-maximisation study: ``python -m infomax_ext experiments <name>``.

Names:

- ``alignuniform``: Wang & Isola, contrastive InfoNCE vs direct ``align + lam * uniform``
  on 2-d (S^1) features.
- ``jacobian``: Tschannen et al., skip-connection MLP encoders initialised to the identity;
  probe accuracy and the condition number of the encoder Jacobian over training.
- ``threshold``: Tschannen et al., maximise the bound only up to a threshold t (clamped
  objective), MLP vs small conv encoder.
- ``invertible``: Tschannen et al., RealNVP coupling encoders trained on InfoNCE / NWJ plus
  the adversarial control.

All use the two-view digits of ``python -m infomax_ext represent`` (view 1 = top four rows,
view 2 = bottom four) and its linear probe (saga logistic regression on frozen view-1 features).
"""
import importlib
import sys

import torch

from ..losses import BoundLoss, NWJLoss
from .common import batches  # noqa: F401  (re-exported for the experiments)
from .represent import linear_probe

NAMES = ("alignuniform", "jacobian", "threshold", "invertible")


def features(enc, x):
    was = enc.training
    enc.eval()
    with torch.no_grad():
        f = enc(x).double().numpy()
    enc.train(was)
    return f


def probe(enc, data, max_iter=200, seed=0):
    """Linear-probe test accuracy of the frozen view-1 encoder ``enc``."""
    ftr, fte = features(enc, data["x1_train"]), features(enc, data["x1_test"])
    return linear_probe(ftr, data["y_train"].numpy(), fte, data["y_test"].numpy(), max_iter, seed)


def bound_loss(estimator, critic):
    if estimator == "infonce":
        return BoundLoss("infonce", critic)
    if estimator == "nwj":
        return NWJLoss(critic)
    raise ValueError(f"unknown estimator {estimator!r}")


def add_common(p, epochs, out="infomax_out"):
    p.add_argument("--epochs", type=int, default=epochs)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--probe-iter", type=int, default=200, help="saga max_iter")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=out)
    return p


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in NAMES:
        print(f"usage: python -m infomax_ext experiments {{{','.join(NAMES)}}} [options]\n{__doc__}",
              file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    mod = importlib.import_module(f"infomax_ext.experiments.{argv[0]}")
    return mod.main(argv[1:])
