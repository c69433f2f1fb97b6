"""Gathering candidates across ranks, with gradients, for the contrastive losses.

With ``gather_distributed=True`` a contrastive loss on rank r scores its *local*
anchors against the candidates of *all* ranks (the global batch), so the positive
of local anchor i sits at global column ``rank * local_batch + i``: the
``pos_offset`` of the score convention. This is open_clip's ``local_loss=True``
with ``gather_with_grad=True`` and lightly's ``gather_distributed=True``.

Gradient convention (the one DDP expects, and the one open_clip and lightly use):
rank r's loss is the mean over its local anchors, the gather's backward sums
the gradients that every rank sends to rank r's candidates, and DDP averages the
parameter gradients over ranks. Then

- the mean of the per-rank losses equals the single-process loss on the
  concatenated batch, and
- after DDP's averaging, parameter gradients equal the single-process ones; the
  gradient on rank r's own features is ``world_size`` times the single-process
  gradient of those rows (DDP's 1 / world_size undoes it).

Only ``torch.distributed`` collectives are used (``all_gather`` forward;
``reduce_scatter_tensor`` backward on NCCL, ``all_reduce`` elsewhere, since gloo
has no reduce-scatter), so the same code runs on gloo (CPU) and NCCL. Outside an
initialised process group everything is a no-op with world size 1.
"""
import torch
import torch.distributed as dist

# Stable codes for the dtypes a rank may send (a mismatch is reported by name).
_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_MAX_DIMS = 4


def is_initialized():
    """True inside an initialised ``torch.distributed`` process group."""
    return dist.is_available() and dist.is_initialized()


def rank_and_world_size(group=None):
    """``(rank, world_size)`` in ``group`` (the default group when None); ``(0, 1)`` outside one."""
    if not is_initialized():
        return 0, 1
    return dist.get_rank(group=group), dist.get_world_size(group=group)


def _describe(row):
    ndim, code = int(row[0]), int(row[1])
    dtype = _DTYPES[code] if 0 <= code < len(_DTYPES) else "unsupported dtype"
    return f"{tuple(int(s) for s in row[2:2 + ndim])} {dtype}"


def check_same_shape(x, group=None, name="tensor"):
    """Checks that every rank passes ``x`` of one shape and dtype, before any gather.

    All ranks exchange ``(ndim, dtype, shape)`` with one small ``all_gather``, so a
    mismatch raises the same ``ValueError`` on every rank instead of a hang (or a
    silently wrong gather) in the collective that would follow.

    Args:
        x: the tensor this rank is about to gather.
        group: process group (default group when None).
        name: what to call ``x`` in the message.

    Raises:
        ValueError: naming the world size, this rank, and each rank's shape.
    """
    rank, world = rank_and_world_size(group)
    if world == 1:
        return
    if x.dim() > _MAX_DIMS:
        raise ValueError(f"rank {rank} of world size {world}: {name} has {x.dim()} dims, "
                         f"at most {_MAX_DIMS} can be gathered")
    code = _DTYPES.index(x.dtype) if x.dtype in _DTYPES else len(_DTYPES)
    row = [x.dim(), code, *x.shape] + [0] * (_MAX_DIMS - x.dim())
    mine = torch.tensor(row, dtype=torch.int64, device=x.device)
    rows = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(rows, mine, group=group)
    rows = [r.tolist() for r in rows]
    if any(r != rows[0] for r in rows):
        seen = ", ".join(f"rank {k}: {_describe(r)}" for k, r in enumerate(rows))
        raise ValueError(
            f"rank {rank} of world size {world}: {name} differs across ranks ({seen}); "
            "gather_distributed needs the same local batch size, feature size and dtype on every rank")


class _GatherWithGrad(torch.autograd.Function):
    """Concatenation of every rank's ``x`` along dim 0; backward sums the gradients
    all ranks computed for this rank's slice."""

    @staticmethod
    def forward(ctx, x, group, rank, world):
        ctx.group, ctx.rank, ctx.n = group, rank, x.shape[0]
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x, group=group)
        return torch.cat(parts, 0)

    @staticmethod
    def backward(ctx, grad):
        if torch.is_grad_enabled():
            # NB: the collectives below record no graph: a create_graph backward would
            # return a gradient cut off from the other ranks' terms (a wrong second derivative).
            raise RuntimeError("gather_with_grad (the losses' gather_distributed=True) is not twice "
                               "differentiable; for a gradient penalty score the local batch "
                               "(gather_distributed=False)")
        # NB: a fresh contiguous buffer; the collectives write in place and the
        # incoming gradient may be shared with other autograd nodes.
        grad = grad.contiguous().clone()
        if dist.get_backend(ctx.group) == dist.Backend.NCCL:
            out = grad.new_empty((ctx.n,) + tuple(grad.shape[1:]))
            dist.reduce_scatter_tensor(out, grad, group=ctx.group)
            return out, None, None, None
        dist.all_reduce(grad, group=ctx.group)
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n], None, None, None


def gather_with_grad(x, group=None, name="tensor"):
    """Every rank's ``x`` concatenated along dim 0, differentiable.

    Args:
        x: (n, ...) this rank's rows; every rank must pass the same shape and dtype.
        group: process group (default group when None).
        name: what to call ``x`` in error messages.

    Returns:
        ``(x_all, rank, world_size)``: ``x_all`` is ``(world_size * n, ...)`` with rank k's
        rows at ``[k * n, (k + 1) * n)``. Outside a process group: ``(x, 0, 1)``.
    """
    rank, world = rank_and_world_size(group)
    if world == 1:
        return x, rank, world
    check_same_shape(x, group, name)
    return _GatherWithGrad.apply(x, group, rank, world), rank, world
