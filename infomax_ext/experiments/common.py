"""Small shared pieces of the experiments: threads, output folder, timing, MLPs, tables."""
import contextlib
import os
import time

import torch

from .. import mi as _mi

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


mlp = _mi.mlp  # one definition, shared with estimate_mi


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
