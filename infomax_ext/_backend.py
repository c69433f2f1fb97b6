"""Loads the compiled module if it can and says which path runs.

The extension is optional at run time: without ``_C`` the package still imports,
warns once and computes everything with ``reference.py``. ``INFOMAX_EXT_USE_REFERENCE=1``
(or ``use_reference(True)``) forces the reference even when ``_C`` is present.
"""
import os
import warnings

import torch  # noqa: F401  (loads libc10/libtorch before the extension links to them)

try:
    from . import _C  # noqa: F401  (loads the library: registers torch.ops.infomax_ext.*)

    HAS_C = True
    _LOAD_ERROR = None
except ImportError as e:  # pragma: no cover - exercised by test_fallback in a subprocess
    _C = None
    HAS_C = False
    _LOAD_ERROR = e
    warnings.warn(
        f"infomax_ext: compiled kernels unavailable ({e}); using the pure-torch reference "
        "(materialises the K x M score matrix). Build with: pip install --no-build-isolation -e .",
        RuntimeWarning,
        stacklevel=2,
    )

_force_reference = os.environ.get("INFOMAX_EXT_USE_REFERENCE", "0") not in ("", "0")


def use_reference(flag=True):
    """Route every estimator to ``reference.py`` (True) or back to the fused ops (False)."""
    global _force_reference
    _force_reference = bool(flag)


def fused_enabled():
    return HAS_C and not _force_reference


def backend():
    """``"compiled"`` when the fused kernels run, ``"reference"`` otherwise."""
    return "compiled" if fused_enabled() else "reference"


def build_info():
    """How ``_C`` was built (backends, CUDA archs, threads, version), or why it is absent."""
    if not HAS_C:
        return {"backends": [], "error": str(_LOAD_ERROR)}
    return dict(_C.build_info())
