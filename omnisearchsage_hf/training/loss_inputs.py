"""Input checks of the sampled-softmax loss: shapes, dtypes, finiteness, with errors that name the argument.

``SampledSoftmaxLoss.compute_loss_from_embeddings`` validates everything it is given before any maths, so
a wrong shape or a NaN from a tower is reported as what it is, not as an index error deep in the loss.
"""

from __future__ import annotations

import torch
from torch import Tensor


def check_matrix(name: str, value: Tensor, *, rows: int | None = None, cols: int | None = None) -> int:
    if not isinstance(value, Tensor) or value.ndim != 2 or not value.dtype.is_floating_point:
        shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise ValueError(f"`{name}` must be a 2-D float tensor (n, dim), got {shape}.")
    if value.shape[0] == 0:
        raise ValueError(f"`{name}` is empty (0 rows); skip this task's loss for an empty batch.")
    if rows is not None and value.shape[0] != rows:
        raise ValueError(f"`{name}` must have {rows} rows, one per query, got {value.shape[0]}.")
    if cols is not None and value.shape[1] != cols:
        raise ValueError(f"`{name}` must have {cols} dims like the candidates, got {value.shape[1]}.")
    return value.shape[0]


def check_ids(name: str, value: Tensor, length: int) -> None:
    if not isinstance(value, Tensor) or value.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"`{name}` must be an int64 tensor, got {getattr(value, 'dtype', type(value).__name__)}.")
    if value.ndim != 1 or value.shape[0] != length:
        raise ValueError(f"`{name}` must have shape ({length},), got {tuple(value.shape)}.")


def check_vector(name: str, value: Tensor | None, length: int, required: bool, option: str) -> None:
    if value is None:
        if required:
            raise ValueError(f"{option}=True needs `{name}` of shape ({length},); pass it or turn {option} off.")
        return
    if value.ndim != 1 or value.shape[0] != length:
        raise ValueError(f"`{name}` must have shape ({length},), got {tuple(value.shape)}.")


def check_finite_and_index(embeddings: list[tuple[str, Tensor]], positive_index: Tensor, num_candidates: int) -> None:
    """Raise on NaN/inf embeddings or an out-of-range ``positive_index``, with one device sync in total."""
    bad = [~torch.isfinite(value).all() for _, value in embeddings]
    bad.append((positive_index < 0).any() | (positive_index >= num_candidates).any())
    flags = torch.stack(bad).tolist()
    for (name, _), flag in zip(embeddings, flags[:-1], strict=True):
        if flag:
            raise ValueError(f"`{name}` contains NaN or inf; check the tower's inputs and the learning rate.")
    if flags[-1]:
        raise ValueError(f"`positive_index` must lie in [0, {num_candidates}), got {positive_index.tolist()}.")


__all__ = ["check_finite_and_index", "check_ids", "check_matrix", "check_vector"]
