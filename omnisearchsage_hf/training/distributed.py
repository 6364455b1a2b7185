"""Collectives for the loss: rank, world size, and all-gathers with and without gradient.

Sampled softmax with in-batch negatives gets better with more negatives, so every process scores its
queries against the candidates of *all* processes. That gather must keep gradients: a candidate
embedded on process 1 receives gradient from the queries of process 0. Every function here also runs
in a single process without ``torch.distributed`` set up, where it is the identity.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable

import torch
import torch.distributed as dist

# Room for the shape of any tensor we gather; checked by `_check_same_shape`.
_MAX_GATHER_DIMS = 8


def is_distributed() -> bool:
    """Whether a ``torch.distributed`` process group is initialised (False in a plain single process)."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """The rank of this process in the default process group, or ``0`` without one."""
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    """The number of processes in the default process group, or ``1`` without one."""
    return dist.get_world_size() if is_distributed() else 1


def all_gather_with_grad(tensor: torch.Tensor, *, check_shapes: bool = True) -> torch.Tensor:
    """Concatenate ``tensor`` from every process along dim 0, keeping the autograd graph.

    A collective: every process must call it, in the same order, with a tensor of the same shape and
    dtype. Assuming two processes with 3 rows each, every process gets the same 6 rows, rank 0's at
    ``[0, 3)`` and rank 1's at ``[3, 6)``: this process's rows are at ``[rank * 3, rank * 3 + 3)`` and
    are the gathered copy of ``tensor``.

    Gradient: the backward pass sums, over all processes, the gradient that each process's loss sends
    to a slice, and delivers it to the process that owns the slice. So if every process computes a loss
    ``L_r`` on the gathered tensor, this process's ``tensor`` receives ``d(sum_r L_r)/d tensor``, and
    after DDP averages parameter gradients over the ``W`` processes, the parameters see the gradient of
    ``mean_r L_r``: exactly what one process holding the whole global batch would compute.

    Args:
        tensor: ``(n, ...)``, the same shape on every process.
        check_shapes: Gather the shapes first (one small extra collective) and raise a clear error if
            they differ, instead of failing or hanging inside the backend. Turn off only when the shape
            is already known to agree.

    Returns:
        ``(world_size * n, ...)``; without a process group, ``tensor`` itself.

    Raises:
        ValueError: The shapes differ between processes (e.g. an uneven last batch).
    """
    if not is_distributed():
        return tensor
    if check_shapes:
        _check_same_shape(tensor, "all_gather_with_grad")
    from torch.distributed.nn.functional import all_gather

    # torch >= 2.6 marks this public autograd op deprecated in favour of the private
    # `torch.distributed._functional_collectives`; it is still the supported path for gloo and NCCL.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*all_gather is deprecated", category=FutureWarning)
        parts = all_gather(tensor)  # world_size x (n, ...)
    return torch.cat(parts, dim=0)  # (world_size * n, ...)


def all_gather_no_grad(tensor: torch.Tensor, *, check_shapes: bool = True) -> torch.Tensor:
    """Concatenate ``tensor`` from every process along dim 0, without gradient (for ids and counts).

    Same collective semantics as :func:`all_gather_with_grad` (every process, same order, same shape;
    rank ``r``'s rows at ``[r * n, (r + 1) * n)``), but the result is detached.

    Args:
        tensor: ``(n, ...)``, the same shape on every process.
        check_shapes: As in :func:`all_gather_with_grad`.

    Returns:
        ``(world_size * n, ...)``, detached; without a process group, ``tensor.detach()``.
    """
    if not is_distributed():
        return tensor.detach()
    if check_shapes:
        _check_same_shape(tensor, "all_gather_no_grad")
    tensor = tensor.detach().contiguous()
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor)
    return torch.cat(parts, dim=0)  # (world_size * n, ...)


def all_reduce_gradients(parameters: Iterable[torch.nn.Parameter], *, bucket_elements: int = 2**24) -> None:
    """Average every parameter's ``.grad`` over the processes, in place: what DDP does during backward.

    For backward passes that do not go through the DDP wrapper (gradient caching re-runs the towers
    chunk by chunk, see ``gradient_cache.py``), this is the one synchronisation per optimizer step. A
    collective: every process passes the same parameters in the same order. A parameter without a
    gradient on some process counts as zero there (it is given a zero ``.grad``), so the buckets line up.

    Args:
        parameters: The parameters that require gradients.
        bucket_elements: Gradients are copied into flat buckets of about this many elements per
            all-reduce (fewer collectives, bounded extra memory).
    """
    if not is_distributed():
        return
    params = [p for p in parameters if p.requires_grad]
    for param in params:
        if param.grad is None:
            param.grad = torch.zeros_like(param)
    bucket: list[torch.Tensor] = []  # gradients of one dtype, about `bucket_elements` in all
    size = 0
    for param in params:
        if bucket and (param.grad.dtype != bucket[0].dtype or size >= bucket_elements):
            _average_in_place(bucket)
            bucket, size = [], 0
        bucket.append(param.grad)
        size += param.numel()
    if bucket:
        _average_in_place(bucket)


def _average_in_place(grads: list[torch.Tensor]) -> None:
    """One all-reduce of ``grads`` flattened together, divided by the world size, copied back."""
    flat = torch.cat([grad.reshape(-1) for grad in grads])  # (total elements,)
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    start = 0
    for grad in grads:
        grad.copy_(flat[start : start + grad.numel()].view_as(grad))
        start += grad.numel()


def _check_same_shape(tensor: torch.Tensor, caller: str) -> None:
    """Raise the same ValueError on every process if ``tensor``'s shape differs between processes."""
    if tensor.ndim > _MAX_GATHER_DIMS:
        raise ValueError(f"{caller} supports tensors of at most {_MAX_GATHER_DIMS} dims, got {tensor.ndim}.")
    # [ndim, size_0, ..., size_7], padded with -1 so tensors of different rank still compare.
    shape = [tensor.ndim, *tensor.shape] + [-1] * (_MAX_GATHER_DIMS - tensor.ndim)
    local = torch.tensor(shape, dtype=torch.long, device=tensor.device)
    shapes = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(shapes, local)
    decoded = [tuple(s[1 : 1 + s[0]]) for s in torch.stack(shapes).tolist()]  # per rank
    if len(set(decoded)) > 1:
        listing = ", ".join(f"rank {rank}: {shape}" for rank, shape in enumerate(decoded))
        raise ValueError(
            f"{caller} needs the same shape on every process, got {listing}. Make batches even across "
            "processes (e.g. drop the last uneven batch, or keep Accelerator(even_batches=True))."
        )


__all__ = [
    "all_gather_no_grad",
    "all_reduce_gradients",
    "all_gather_with_grad",
    "get_rank",
    "get_world_size",
    "is_distributed",
]
