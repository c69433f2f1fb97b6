"""Small shared pieces of the experiments: threads, output folder, timing, MLPs, tables."""
import contextlib
import os
import time

import torch
from torch import nn

from ..mi import mlp  # noqa: F401  (the experiments' MLP is estimate_mi's)

DEFAULT_OUT = "infomax_out"


@contextlib.contextmanager
def num_threads(n):
    """Runs the block with ``torch.set_num_threads(n)`` (None or 0 leaves it), then restores.

    NB: the experiments train small MLPs on small batches; on a shared 2-core machine one
    thread is several times faster than two (measured ~3 ms vs ~30 ms per staircase step).
    """
    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(old)


def out_dir(path):
    """Creates the output folder and returns its absolute path."""
    path = os.path.abspath(path or DEFAULT_OUT)
    os.makedirs(path, exist_ok=True)
    return path


INITS = ("torch", "keras")


def keras_init_(module):
    """Re-initialises ``module`` in place the way Keras does by default (the paper's code is
    Keras): every Linear / Conv2d weight and a bilinear critic's ``W`` Glorot-uniform
    (``U(+-sqrt(6 / (fan_in + fan_out)))``), every bias zero. PyTorch's own default draws
    weights from ``U(+-1 / sqrt(fan_in))`` (about half as large for the 392-300-300-100
    encoders) and a :class:`~infomax_ext.critics.Bilinear` critic's W has std
    ``1 / sqrt(dim_u * dim_v)`` (0.01 at 100 x 100, against Glorot's 0.1). Returns ``module``."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(getattr(m, "W", None), nn.Parameter) and m.W.dim() == 2:
            nn.init.xavier_uniform_(m.W)
    return module


def initialise_(module, init):
    """``init="torch"`` leaves ``module`` as constructed; ``"keras"``: :func:`keras_init_`."""
    if init == "keras":
        return keras_init_(module)
    if init != "torch":
        raise ValueError(f"unknown init {init!r}; choose one of {', '.join(INITS)}")
    return module


class Timer:
    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0


def format_table(header, rows, fmt=None):
    """A plain-text table: ``header`` a list of names, ``rows`` lists of cells (str or number)."""
    fmt = fmt or {}

    def cell(v, col):
        if isinstance(v, str):
            return v
        f = fmt.get(col, "{:.3f}" if isinstance(v, float) else "{}")
        return f.format(v)

    cells = [[cell(v, header[j]) for j, v in enumerate(r)] for r in rows]
    widths = [max(len(h), *(len(r[j]) for r in cells)) if cells else len(h) for j, h in enumerate(header)]
    line = lambda vals: " | ".join(v.rjust(w) for v, w in zip(vals, widths))  # noqa: E731
    out = [line(header), "-+-".join("-" * w for w in widths)]
    out += [line(r) for r in cells]
    return "\n".join(out)


def markdown_table(header, rows, fmt=None):
    """The same table as GitHub markdown."""
    fmt = fmt or {}

    def cell(v, col):
        if isinstance(v, str):
            return v
        return fmt.get(col, "{:.3f}" if isinstance(v, float) else "{}").format(v)

    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(cell(v, header[j]) for j, v in enumerate(r)) + " |" for r in rows]
    return "\n".join(out)


def progress(total, desc, disable=False, **kw):
    """A tqdm bar (lazily imported)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=disable, dynamic_ncols=True, **kw)


def batches(n, batch_size, gen):
    """Shuffled full batches of indices in [0, n) (the last partial batch dropped)."""
    perm = torch.randperm(n, generator=gen)
    return perm[: n // batch_size * batch_size].split(batch_size)


def train_epoch(loss_fn, g1, g2, x1, x2, opt, batch_size, gen, skip_nonfinite=True):
    """One epoch of ``loss_fn(g1(x1), g2(x2))`` over shuffled batches; returns the mean
    training bound (-loss). ``skip_nonfinite`` skips the update of a non-finite loss."""
    vals = []
    for idx in batches(len(x1), batch_size, gen):
        loss = loss_fn(g1(x1[idx]), g2(x2[idx]))
        if not skip_nonfinite or torch.isfinite(loss):
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        vals.append(-loss.item())
    return sum(vals) / len(vals)
