"""Collation: the pairs, negatives and tower inputs of one micro-step, as a pure function of the step.

Every task reads its pairs for the step (``tasks.pair_indices``: a pure function of seed, step and
rank), draws its random and hard negatives (``hard_negatives.draw_hard_negatives``), and adds its
queries and candidates to the step's two shared tower inputs: all query texts go through one
query-tower call and all entity rows (hard negatives included) through one entity-tower call;
``TaskBatch`` records which rows of those outputs are the task's. Because nothing here keeps state, a
resumed run collates exactly what the killed run would have.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..modeling import OmniSearchSageEntityModel, OmniSearchSageQueryModel
from .config import TaskConfig
from .hard_negatives import MISSING, draw_hard_negatives
from .pairs import TrainingData
from .tasks import pair_indices, random_negative_indices


@dataclass
class TaskBatch:
    """One task's share of a step, as positions into the step's shared embedding calls.

    Attributes:
        queries: Rows of the step's query-tower output that are this task's queries ``(n,)``; empty when
            ``query_vectors`` holds them.
        candidates: Rows of the candidate tower's output (query-tower output for ``query`` tasks,
            entity-tower output for ``entity`` tasks) ``(n,)``; unused for ``compat`` tasks.
        negatives: Rows of random negatives in the same output ``(m,)`` (empty when disabled).
        hard_negatives: Rows of hard negatives in the entity-tower output ``(k,)``: the distinct entities
            drawn for this task's pairs (``k <= n * num_hard_negatives``; empty when disabled or none drawn).
        compat_candidates, compat_negatives, compat_hard_negatives: ``(n, dim)`` / ``(m, dim)`` / ``(k, dim)``
            pre-existing embeddings for ``compat`` tasks.
        query_ids, candidate_ids, negative_ids, hard_negative_ids: int64 ids for accidental-hit masking and
            frequencies (entity ids are candidate-table rows).
        negative_log_q: ``(m,)`` log sampling probability of each random negative.
        query_vectors: ``(n, dim)`` fixed pre-existing query-side embeddings (a ``query_feature`` task,
            e.g. pins' PinSage embeddings for pin → product), or None for query-tower queries.
    """

    queries: torch.Tensor
    candidates: torch.Tensor
    query_ids: torch.Tensor
    candidate_ids: torch.Tensor
    negatives: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    negative_ids: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    negative_log_q: torch.Tensor = field(default_factory=lambda: torch.zeros(0))
    hard_negatives: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    hard_negative_ids: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    compat_candidates: torch.Tensor | None = None
    compat_negatives: torch.Tensor | None = None
    compat_hard_negatives: torch.Tensor | None = None
    query_vectors: torch.Tensor | None = None


@dataclass
class StepBatch:
    """Everything one micro-step needs: tokenized query-tower inputs, entity inputs, and per-task rows.

    The tower inputs come in chunks of consecutive rows (one chunk unless gradient caching splits the
    step, see ``gradient_cache.py``); a tower's output is the concatenation of its chunks' outputs, and
    ``TaskBatch`` rows index that concatenation. A list is empty when no task of the step needs the tower.
    """

    query_chunks: list[dict[str, torch.Tensor]]
    entity_chunks: list[dict[str, Any]]
    tasks: dict[str, TaskBatch]

    def to(self, device: torch.device) -> StepBatch:
        def move(value: Any) -> Any:
            if isinstance(value, torch.Tensor):
                return value.to(device)
            if isinstance(value, dict):
                return {k: move(v) for k, v in value.items()}
            if isinstance(value, list):
                return [move(v) for v in value]
            if isinstance(value, TaskBatch):
                return TaskBatch(**{k: move(getattr(value, k)) for k in value.__dataclass_fields__})
            return value

        return StepBatch(move(self.query_chunks), move(self.entity_chunks), move(self.tasks))


def collate(
    data: TrainingData,
    tasks: Sequence[TaskConfig],
    batch_sizes: dict[str, int],
    *,
    micro_step: int,
    seed: int,
    query_tower: OmniSearchSageQueryModel,
    entity_tower: OmniSearchSageEntityModel,
    rank: int = 0,
    world_size: int = 1,
    chunk_size: int | None = None,
) -> StepBatch:
    """The pairs, negatives and tower inputs process ``rank`` uses at ``micro_step``.

    Args:
        data: The loaded tables and pairs.
        tasks: The tasks, in config order (their index seeds their pair order and negatives).
        batch_sizes: Pairs per task and micro-step (``tasks.task_batch_sizes``).
        micro_step: Global micro-step number.
        seed: The run's seed.
        query_tower, entity_tower: Tokenize the query texts and prepare the entity rows.
        rank, world_size: This process and the number of processes.
        chunk_size: Rows per tower input chunk (each chunk is tokenized and padded on its own); None
            gives each tower one chunk.
    """
    query_texts: list[str] = []
    entity_rows: list[dict[str, Any]] = []
    batches: dict[str, TaskBatch] = {}

    def add(rows: list, items: list) -> torch.Tensor:
        rows.extend(items)
        return torch.arange(len(rows) - len(items), len(rows))

    for index, task in enumerate(tasks):
        pairs = data.pairs[task.name]
        picked = pair_indices(
            len(pairs),
            step=micro_step,
            count=batch_sizes[task.name],
            seed=seed + index,
            rank=rank,
            world_size=world_size,
        )
        candidates = pairs.candidates[picked]
        kind, table = task.candidate.kind, data.candidate_table(task)
        pool = data.catalogue_size(task)
        negatives = random_negative_indices(
            pool, count=task.num_random_negatives, seed=seed, step=micro_step, rank=rank, task=index
        )
        hard = np.zeros(0, dtype=np.int64)
        if task.name in data.hard_negatives:
            hard_pool = data.hard_negatives[task.name]
            drawn = draw_hard_negatives(
                hard_pool,
                hard_pool.keys(pairs.query_ids[picked], candidates),
                candidates,
                count=task.num_hard_negatives,
                seed=seed,
                step=micro_step,
                rank=rank,
                task=index,
            )  # (n, num_hard_negatives)
            # Every row scores all of them (shared columns): each entity once; empty slots are simply absent.
            hard = np.unique(drawn[drawn != MISSING])  # (k,)
        if task.query_feature is None:
            queries, query_vectors = add(query_texts, pairs.queries(picked)), None
        else:
            query_table = data.tables[task.query_feature.table]
            rows = data.query_rows[task.name][picked]
            dim = data.feature_dims[f"{task.name}/query"]
            queries = torch.zeros(0, dtype=torch.long)
            query_vectors = torch.from_numpy(query_table.dense(task.query_feature.feature, rows, dim))
        batch = TaskBatch(
            queries=queries,
            query_vectors=query_vectors,
            candidates=torch.zeros(0, dtype=torch.long),
            query_ids=torch.from_numpy(pairs.query_ids[picked]),
            candidate_ids=torch.from_numpy(candidates),
            negative_ids=torch.from_numpy(negatives),
            # Uniform sampling: each draw picks a given candidate with probability 1 / pool.
            negative_log_q=torch.full((len(negatives),), math.log(max(len(negatives), 1) / pool)),
            hard_negative_ids=torch.from_numpy(hard),
        )
        if kind == "query":
            texts = pairs.candidate_texts
            batch.candidates = add(query_texts, texts.take(candidates).to_pylist())
            batch.negatives = add(query_texts, texts.take(negatives).to_pylist())
        elif kind == "entity":
            batch.candidates = add(entity_rows, table.rows(candidates))
            batch.negatives = add(entity_rows, table.rows(negatives)) if len(negatives) else batch.negatives
            batch.hard_negatives = add(entity_rows, table.rows(hard)) if len(hard) else batch.hard_negatives
        else:
            feature, dim = task.candidate.feature, data.feature_dims[task.name]
            batch.compat_candidates = torch.from_numpy(table.dense(feature, candidates, dim))
            if len(negatives):
                batch.compat_negatives = torch.from_numpy(table.dense(feature, negatives, dim))
            if task.name in data.hard_negatives:
                batch.compat_hard_negatives = torch.from_numpy(table.dense(feature, hard, dim))  # (k, dim)
        batches[task.name] = batch
    return StepBatch(
        _chunks(query_tower.tokenize, query_texts, chunk_size),
        _chunks(entity_tower.prepare_inputs, entity_rows, chunk_size),
        batches,
    )


def _chunks(prepare: Callable[[list], dict[str, Any]], rows: list, chunk_size: int | None) -> list[dict[str, Any]]:
    """``prepare`` applied to consecutive slices of ``rows`` of ``chunk_size`` (all rows when None)."""
    size = chunk_size or max(len(rows), 1)
    return [prepare(rows[start : start + size]) for start in range(0, len(rows), size)]


__all__ = ["StepBatch", "TaskBatch", "collate"]
