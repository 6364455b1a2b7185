"""Batched inference shared by both towers' ``encode``.

Both towers embed a list of inputs the way ``SentenceTransformer.encode`` does: inputs are sorted by
length so each batch holds similar sizes (less padding for the query tower, steadier batch cost for the
entity tower), embedded under ``torch.inference_mode``, and returned in the caller's order.

This file is copied next to the modeling files when a model is saved, so it imports only torch,
numpy and transformers.
"""

from __future__ import annotations

import contextlib
import logging as _stdlib_logging
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from transformers.utils import logging

logger = logging.get_logger(__name__)

_SURROGATE = re.compile("[\ud800-\udfff]")


def replace_surrogates(text: str) -> str:
    """``text`` with UTF-16 surrogate code points made encodable: pairs joined, lone ones replaced by U+FFFD.

    A Python string can hold surrogates (``json.loads('"\\ud83d"')``, text cut mid-emoji), but they
    cannot be encoded as UTF-8, so tokenizers reject them with an unreadable error. They are never
    characters, so replacing them changes no real text; the common case (none) costs one regex scan.
    """
    if _SURROGATE.search(text) is None:
        return text
    return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")


def check_batch(inputs: Sequence[Any], name: str) -> None:
    """Raise if ``inputs`` is not a non-empty list or tuple (``name`` is the argument named in the error)."""
    if not isinstance(inputs, (list, tuple)):
        raise TypeError(f"`{name}` must be a list (or a single item), got {type(inputs).__name__}.")
    if len(inputs) == 0:
        raise ValueError(f"`{name}` is an empty list: pass at least one item.")


def check_truncate_dim(truncate_dim: int | None, out_dim: int) -> None:
    """Raise unless ``truncate_dim`` is None or a prefix length in ``[1, out_dim]``."""
    if truncate_dim is not None and not (isinstance(truncate_dim, int) and 1 <= truncate_dim <= out_dim):
        raise ValueError(
            f"`truncate_dim` must be an int in [1, {out_dim}] (the model's out_dim), got {truncate_dim!r}."
        )


def check_queries(queries: str | Sequence[str], out_dim: int, truncate_dim: int | None) -> tuple[list[str], bool]:
    """``(queries as a list, whether one string was given)``, after the checks every query ``encode`` makes.

    Raises ``TypeError`` naming the index of a non-string, ``ValueError`` for an empty list or a
    ``truncate_dim`` outside ``[1, out_dim]``.
    """
    single = isinstance(queries, str)
    queries = [queries] if single else queries
    check_batch(queries, "queries")
    for i, query in enumerate(queries):
        if not isinstance(query, str):
            raise TypeError(f"`queries[{i}]` must be a str, got {type(query).__name__}: {query!r}.")
    check_truncate_dim(truncate_dim, out_dim)
    return list(queries), single


def tokenize_queries(tokenizer: Any, queries: Sequence[str], *, prefix: str, max_length: int, return_tensors: str):
    """Tokenizer features of ``prefix + query`` for each query, padded, truncated to ``max_length`` tokens.

    UTF-16 surrogates, which no tokenizer can encode, are joined or replaced first (``replace_surrogates``).
    The one tokenisation of queries: the PyTorch tower and the exported backends both call it.
    """
    return tokenizer(
        [prefix + replace_surrogates(query) for query in queries],
        padding=True,
        truncation=True,
        max_length=max_length,
        return_tensors=return_tensors,
    )


@contextlib.contextmanager
def evaluating(model: torch.nn.Module, device: str | torch.device | None = None) -> Iterator[None]:
    """Run the block with ``model`` on ``device`` (if given) and dropout off; restore every submodule's mode.

    The move happens here, outside inference mode, so the parameters stay ordinary (trainable) tensors;
    restoring each submodule's own flag keeps a frozen (eval-mode) part of a training model frozen.
    """
    if device is not None:
        model.to(device)
    training_flags = {module: module.training for module in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for module, training in training_flags.items():
            module.training = training


@torch.inference_mode()
def encode_in_batches(
    items: Sequence[Any],
    embed_batch: Callable[[list[Any]], torch.Tensor],
    *,
    lengths: Sequence[int],
    batch_size: int,
    show_progress_bar: bool | None,
    convert_to_numpy: bool,
    convert_to_tensor: bool,
    normalize_embeddings: bool,
    truncate_dim: int | None,
    desc: str,
) -> np.ndarray | torch.Tensor | list[torch.Tensor]:
    """Embed ``items`` in length-sorted batches, under ``torch.inference_mode``; return them in input order.

    Args:
        items: The inputs, already validated.
        embed_batch: Maps a list of items to a ``(len(batch), dim)`` tensor.
        lengths: One size per item; longest items go first so a memory problem shows up at once.
        batch_size: Items per call of ``embed_batch`` (>= 1).
        show_progress_bar: Show a tqdm bar; ``None`` shows it when logging is at INFO or DEBUG.
        convert_to_numpy: Return one float32 ``np.ndarray`` of shape ``(n, dim)``.
        convert_to_tensor: Return one ``torch.Tensor`` of shape ``(n, dim)``; wins over ``convert_to_numpy``.
        normalize_embeddings: L2-normalise after truncation (towers already emit unit vectors, but a
            truncated Matryoshka prefix is not unit length until renormalised).
        truncate_dim: Keep only the first ``truncate_dim`` dimensions.
        desc: Progress bar label.

    Returns:
        ``torch.Tensor`` if ``convert_to_tensor``, else ``np.ndarray`` if ``convert_to_numpy``, else a list
        of 1-D tensors.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"`batch_size` must be a positive int, got {batch_size!r}.")
    if show_progress_bar is None:
        show_progress_bar = logger.getEffectiveLevel() in (_stdlib_logging.INFO, _stdlib_logging.DEBUG)

    order = np.argsort(-np.asarray(lengths, dtype=np.int64), kind="stable")
    chunks = []
    for start in logging.tqdm(range(0, len(items), batch_size), desc=desc, disable=not show_progress_bar):
        batch = [items[i] for i in order[start : start + batch_size]]
        embeddings = embed_batch(batch).float()  # (len(batch), dim)
        if truncate_dim is not None:
            embeddings = embeddings[:, :truncate_dim]
        if normalize_embeddings:
            embeddings = F.normalize(embeddings, p=2, dim=-1)
        chunks.append(embeddings)
    sorted_embeddings = torch.cat(chunks)  # (n, dim), in length order
    embeddings = torch.empty_like(sorted_embeddings)
    embeddings[torch.from_numpy(order).to(embeddings.device)] = sorted_embeddings

    if convert_to_tensor:
        return embeddings
    if convert_to_numpy:
        return embeddings.cpu().numpy()
    return list(embeddings.unbind(0))
