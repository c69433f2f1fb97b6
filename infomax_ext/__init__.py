"""infomax_ext: fused C++/CUDA kernels for mutual-information estimators and
contrastive losses over all K x M pairs of a batch, without materialising the
score matrix.

Convention (docs/conventions.md): ``S[i, j] = f(u_i, v_j)`` is K x M, rows are the
anchors ``u`` (view 1), columns the candidates ``v`` (view 2), M >= K, and the
positive of row i is column ``i + pos_offset``; every other entry is a negative.
Estimators return the bound value in nats (to be maximised).
"""
__version__ = "0.1.0"

from ._backend import backend, build_info, emulated_cuda, use_reference  # noqa: E402
from . import ops, reference  # noqa: E402
from .estimators import (  # noqa: E402
    alignment,
    dv,
    infonce,
    infonce_symmetric,
    js,
    js_objective,
    mine,
    nwj,
    smile,
    tuba,
    uniformity,
)
from .critics import Bilinear, ConcatMLP, Cosine, Critic, Dot, Separable, mi_lower_bound  # noqa: E402
from . import losses as _losses  # noqa: E402
from .losses import *  # noqa: E402,F401,F403 (the drop-in losses: losses.__all__)
from .mi import MIEstimate, estimate_mi  # noqa: E402

__all__ = [
    "__version__",
    "backend",
    "build_info",
    "emulated_cuda",
    "use_reference",
    "ops",
    "reference",
    "alignment",
    "dv",
    "infonce",
    "infonce_symmetric",
    "js",
    "js_objective",
    "mine",
    "nwj",
    "smile",
    "tuba",
    "uniformity",
    "Critic",
    "Dot",
    "Cosine",
    "Bilinear",
    "Separable",
    "ConcatMLP",
    "mi_lower_bound",
    *_losses.__all__,
    "estimate_mi",
    "MIEstimate",
]
