"""Gradient caching: a global batch far larger than activation memory allows, with the exact gradient.

In-batch negatives are only as strong as the batch is large (the paper trains with about 10,000 pairs
per GPU), but a tower holds the activations of every row it embeds until the backward pass. Gradient
caching (Gao et al., 2021; sentence-transformers' ``CachedMultipleNegativesRankingLoss``) separates the
two: the loss of a sampled softmax depends on the towers only through the embeddings, so

1. embed the step's rows chunk by chunk **without** a graph (memory: one chunk of activations);
2. compute the multi-task loss over the whole global batch from those embeddings, with the very same
   ``MultiTaskModel.score`` as without caching (in-batch, random and hard negatives, logQ, id masks,
   Matryoshka dims, gathering across processes), and backpropagate it to the embeddings only;
3. run each chunk again **with** a graph and backpropagate the cached embedding gradients through it.

By the chain rule, step 3 accumulates exactly the parameter gradients of one big forward/backward.
Dropout is replayed: the random state before each chunk's first pass is restored for its second, so
both passes see the same masks. The price is one more forward pass per step (about a third more compute
than an uncached step of the same size); the gain is that memory no longer grows with the batch beyond
the embeddings and the ``(B, B)`` logits.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .batches import StepBatch
from .multitask import MultiTaskModel


class RandomState:
    """The torch random state (CPU, and the accelerator's when the inputs live there), to replay later."""

    def __init__(self, device: torch.device):
        self.cpu = torch.get_rng_state()
        self.cuda_device = device if device.type == "cuda" else None
        self.cuda = torch.cuda.get_rng_state(device) if self.cuda_device is not None else None

    @contextlib.contextmanager
    def replay(self) -> Iterator[None]:
        """Run the block from the recorded state; the random state afterwards is as it was before."""
        devices = [self.cuda_device] if self.cuda_device is not None else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(self.cpu)
            if self.cuda_device is not None:
                torch.cuda.set_rng_state(self.cuda, self.cuda_device)
            yield


def _chunk_device(chunk: Mapping[str, Any]) -> torch.device:
    tensors = [v for v in chunk.values() if isinstance(v, Tensor)]
    return tensors[0].device if tensors else torch.device("cpu")


def _embed_without_graph(
    tower: nn.Module, chunks: Sequence[Mapping[str, Any]], autocast: Callable[[], Any]
) -> tuple[Tensor | None, list[RandomState]]:
    """Every chunk's embeddings (concatenated, detached) and the random state each chunk started from."""
    if not chunks:
        return None, []
    states, outputs = [], []
    with torch.no_grad():
        for chunk in chunks:
            states.append(RandomState(_chunk_device(chunk)))
            with autocast():
                outputs.append(tower(**chunk).embeddings)  # (chunk_rows, out_dim)
    return torch.cat(outputs), states  # (num_rows, out_dim)


def _replay_with_graph(
    tower: nn.Module,
    chunks: Sequence[Mapping[str, Any]],
    states: Sequence[RandomState],
    gradient: Tensor,
    autocast: Callable[[], Any],
) -> None:
    """Re-embed each chunk with a graph and backpropagate its rows of ``gradient`` into the tower."""
    start = 0
    for chunk, state in zip(chunks, states, strict=True):
        with state.replay(), autocast():
            embeddings = tower(**chunk).embeddings  # (chunk_rows, out_dim)
        rows = embeddings.shape[0]
        embeddings.backward(gradient[start : start + rows].to(embeddings.dtype))
        start += rows


def cached_backward(
    model: MultiTaskModel,
    batch: StepBatch,
    *,
    backward: Callable[[Tensor], None],
    autocast: Callable[[], Any] = contextlib.nullcontext,
) -> tuple[Tensor, dict[str, Tensor]]:
    """One micro-step's loss and its parameter gradients (accumulated into ``.grad``), with gradient caching.

    Args:
        model: The multi-task model, **unwrapped** (not the DDP wrapper: with caching, gradients are
            synchronised once per optimizer step by ``distributed.all_reduce_gradients``).
        batch: The step's rows, its tower inputs split into chunks (``collate(chunk_size=...)``); each
            chunk bounds the activation memory.
        backward: Backpropagates the loss to the embeddings, e.g. ``lambda loss:
            accelerator.backward(loss / gradient_accumulation_steps)``; whatever it scales the loss by
            (accumulation, an fp16 loss scale) reaches the parameters through the cached gradients.
        autocast: Context factory for mixed precision (``accelerator.autocast``), used for every pass.

    Returns:
        ``(loss, parts)`` as ``MultiTaskModel.forward`` returns them, detached.
    """
    query_out, query_states = _embed_without_graph(model.query_tower, batch.query_chunks, autocast)
    entity_out, entity_states = _embed_without_graph(model.entity_tower, batch.entity_chunks, autocast)
    for tower, out in ((model.query_tower, query_out), (model.entity_tower, entity_out)):
        if out is not None and any(p.requires_grad for p in tower.parameters()):
            out.requires_grad_()  # a leaf: the loss's gradient stops here, to be replayed chunk by chunk
    with autocast():
        loss, parts = model.score(batch, query_out, entity_out)
    backward(loss)  # gradients of the embeddings (and of the losses' own parameters, the logit scales)
    if query_out is not None and query_out.grad is not None:
        _replay_with_graph(model.query_tower, batch.query_chunks, query_states, query_out.grad, autocast)
    if entity_out is not None and entity_out.grad is not None:
        _replay_with_graph(model.entity_tower, batch.entity_chunks, entity_states, entity_out.grad, autocast)
    return loss.detach(), parts


__all__ = ["RandomState", "cached_backward"]
