"""Loads the compiled module if it can and says which path runs.

The extension is optional at run time: without ``_C`` the package still imports,
warns once and computes everything with ``reference.py``. ``INFOMAX_EXT_USE_REFERENCE=1``
(or ``use_reference(True)``) forces the reference even when ``_C`` is present.

``emulated_cuda()`` routes the fused ops to the emulated CUDA backend: the CUDA
kernels' own code, compiled as C++, run on CPU tensors (``torch.ops.infomax_ext_emulated``).
"""
import contextlib
import importlib.util
import os
import threading
import warnings

import torch  # noqa: F401  (loads libc10/libtorch before the extension links to them)

try:
    from . import _C  # noqa: F401  (loads the library: registers torch.ops.infomax_ext.*)

    HAS_C = True
    _LOAD_ERROR = None
except ImportError as e:  # pragma: no cover - exercised by test_fallback in a subprocess
    _C = None
    HAS_C = False
    # NB: a missing _C makes Python say "partially initialized module ... (most likely due
    # to a circular import)"; the cause is that nothing was built here, so say that.
    try:
        _missing = importlib.util.find_spec(f"{__package__}._C") is None
    except (ImportError, ValueError):
        _missing = False
    _LOAD_ERROR = ImportError(f"no compiled module infomax_ext/_C*.so next to {os.path.dirname(__file__)}"
                              if _missing else str(e))
    warnings.warn(
        f"infomax_ext: compiled kernels unavailable ({_LOAD_ERROR}); using the pure-torch reference "
        "(materialises the K x M score matrix). Build them with ./setup.sh in the checkout "
        "(elsewhere: pip install --no-build-isolation .).",
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


NAMESPACE, EMULATED_NAMESPACE = "infomax_ext", "infomax_ext_emulated"
_emulation = threading.local()


def has_emulated_cuda():
    """Whether this build carries the emulated CUDA backend."""
    return HAS_C and "cuda_emulated" in _C.build_info()["backends"]


@contextlib.contextmanager
def emulated_cuda(enabled=True):
    """Within the block (this thread), the fused ops on CPU tensors run the CUDA
    kernels' own code on the CPU: every launch executes its blocks' threads as fibers,
    with real ``__syncthreads`` barriers and warp shuffles. Slow (thousands of context
    switches per block); it exists to test the CUDA kernels without a GPU. The backward
    of an op runs on the backend of its forward."""
    if enabled and not has_emulated_cuda():
        raise RuntimeError(f"infomax_ext was built without the emulated CUDA backend: {build_info()}")
    before = getattr(_emulation, "on", False)
    _emulation.on = bool(enabled)
    try:
        yield
    finally:
        _emulation.on = before


def op_namespace():
    """The name of the op namespace the fused ops call now."""
    return EMULATED_NAMESPACE if getattr(_emulation, "on", False) else NAMESPACE


def build_info():
    """How ``_C`` was built (backends, CUDA archs, threads, version), or why it is absent."""
    if not HAS_C:
        return {"backends": [], "error": str(_LOAD_ERROR)}
    return dict(_C.build_info())
