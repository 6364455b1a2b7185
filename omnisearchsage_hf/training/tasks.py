"""Task mixing: how each batch is split across tasks, and which pairs every process reads at every step.

Paper §3.5: the tasks (query→pin, query→product, query→query, query→legacy embeddings) are mixed
inside every optimizer step by fixed shares, so no task drifts while another trains. Each task reads an
endless, seeded stream of its pairs: a task whose pairs run out starts a new epoch (a fresh permutation)
without stopping the others. Everything here is a pure function of (seed, step, rank), so a resumed run
reads exactly the pairs the killed run would have read, with no sampler state to checkpoint.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import numpy as np


def task_batch_sizes(batch_size: int, shares: Mapping[str, float]) -> dict[str, int]:
    """Split ``batch_size`` pairs across tasks in proportion to ``shares`` (largest remainder, >= 1 each).

    Example:
        ::

            task_batch_sizes(16, {"pin": 8, "product": 4, "query": 2, "other": 2})
            # {'pin': 8, 'product': 4, 'query': 2, 'other': 2}
    """
    if batch_size < len(shares):
        raise ValueError(f"`batch_size` {batch_size} cannot give each of the {len(shares)} tasks one pair.")
    if any(share <= 0 for share in shares.values()):
        raise ValueError(f"Every share must be > 0, got {dict(shares)}.")
    total = sum(shares.values())
    exact = {name: batch_size * share / total for name, share in shares.items()}
    sizes = {name: int(value) for name, value in exact.items()}
    # Largest remainders get the leftover pairs; ties go to the task declared first.
    order = sorted(exact, key=lambda n: -(exact[n] - sizes[n]))
    for name in order[: batch_size - sum(sizes.values())]:
        sizes[name] += 1
    for name in [n for n, size in sizes.items() if size == 0]:  # a tiny share still trains every step
        sizes[max(sizes, key=sizes.get)] -= 1
        sizes[name] = 1
    return sizes


@functools.lru_cache(maxsize=8)
def _epoch_permutation(num_pairs: int, seed: int, epoch: int) -> np.ndarray:
    order = np.random.default_rng([seed, epoch]).permutation(num_pairs)
    # Held for the whole epoch: 4 bytes per pair where that suffices (100M pairs: 400 MB, not 800).
    return order.astype(np.int32) if num_pairs < 2**31 else order


def pair_indices(num_pairs: int, *, step: int, count: int, seed: int, rank: int = 0, world_size: int = 1) -> np.ndarray:
    """Indices of the ``count`` pairs that process ``rank`` reads at ``step``.

    Each epoch is a seeded permutation of all pairs, dealt round-robin to the processes; a process
    reads its share ``count`` pairs per step and moves to the next epoch's share when it runs out.
    The result depends only on the arguments, which is what makes resuming exact.
    """
    if num_pairs < world_size:
        raise ValueError(f"A task needs at least one pair per process: {num_pairs} pairs, {world_size} processes.")
    shard_size = len(range(rank, num_pairs, world_size))
    positions = np.arange(step * count, (step + 1) * count)
    epochs, offsets = np.divmod(positions, shard_size)
    out = np.empty(count, dtype=np.int64)
    for epoch in np.unique(epochs):
        chosen = epochs == epoch
        out[chosen] = _epoch_permutation(num_pairs, seed, int(epoch))[rank::world_size][offsets[chosen]]
    return out


def random_negative_indices(
    num_candidates: int, *, count: int, seed: int, step: int, rank: int, task: int
) -> np.ndarray:
    """``count`` candidates drawn uniformly (with replacement), seeded by (seed, step, rank, task)."""
    return np.random.default_rng([seed, step, rank, task, 1]).integers(0, num_candidates, size=count)


__all__ = ["pair_indices", "random_negative_indices", "task_batch_sizes"]
