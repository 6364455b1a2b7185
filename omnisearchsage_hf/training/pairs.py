"""Training pairs as int64 arrays: every task's queries, candidates and the tables they index.

A pair file has ``query`` and ``candidate_id`` columns (and ``engagement`` for tasks that keep one
engagement type). Reading one never makes a Python object per pair: it is streamed in batches of Arrow
strings, distinct queries are found by Arrow's hash (``pc.unique``), and both sides become int64
indices (``pc.index_in``, ``EntityTable.rows_of``): a pair costs 16 bytes in the loop, so 100M pairs fit
in a few GB. ``load_training_data``
reads every task of a config: its entity tables (memory-mapped through an Arrow IPC copy), its pairs
after the popularity cap, and the held-out pairs of the periodic evaluation.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..data.tables import EntityTable, check_columns, iter_batches, read_table, table_schema
from .config import DEFAULT_POPULARITY_CAPS, TaskConfig, TrainingConfig
from .hard_negatives import HardNegativePool, load_pool


@dataclass
class TaskPairs:
    """One task's pairs: ``query_ids`` and ``candidates`` are ``(num_pairs,)`` int64 arrays.

    Attributes:
        query_texts: The distinct query texts, sorted; ``query_ids`` index it.
        query_ids: Per pair, its query (equal ids: the same query text).
        candidates: Per pair, the candidate's row in the candidate table (or in ``candidate_texts``).
        candidate_texts: For query→query tasks, the distinct candidate query texts, sorted.
    """

    query_texts: pa.Array
    query_ids: np.ndarray
    candidates: np.ndarray
    candidate_texts: pa.Array | None = None

    def __len__(self) -> int:
        return len(self.query_ids)

    def queries(self, pairs: np.ndarray | Sequence[int]) -> list[str]:
        """Query texts of the given pairs."""
        return self.query_texts.take(pa.array(self.query_ids[np.asarray(pairs, dtype=np.int64)])).to_pylist()


PAIR_BATCH_SIZE = 1 << 22  # pairs read and mapped at a time: bounds the strings held alongside the int64 arrays


def read_pairs(
    path: str | os.PathLike, *, task: str, engagements: Sequence[str] | None = None, batch_size: int = PAIR_BATCH_SIZE
) -> Iterator[tuple[pa.Array, pa.Array]]:
    """Yield ``(queries, candidate_ids)`` string arrays of a pair file, in file order, ``batch_size`` rows at a time.

    Only ``engagements`` are kept if given. Raises when a column is missing or null, or when the
    engagement filter keeps nothing (naming the engagement types the file has), so a typo in a config
    never trains on zero pairs.
    """
    columns = ["query", "candidate_id"] + (["engagement"] if engagements is not None else [])
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"Pairs of task {task!r}: {str(path)!r} does not exist.")
    check_columns(table_schema(path), columns, f"Pairs of task {task!r} ({path})")
    if path.suffix.lower() == ".parquet" or path.is_dir():
        batches = iter_batches(path, columns, batch_size=batch_size)
    else:
        batches = read_table(path, columns).to_batches(max_chunksize=batch_size)
    wanted = pa.array(list(engagements or []), pa.string())
    kinds_seen: set[str] = set()
    kept = 0
    for batch in batches:
        if engagements is not None:
            kinds = pc.cast(batch.column("engagement"), pa.string())
            kinds_seen.update(k for k in pc.unique(kinds).to_pylist() if k is not None)
            batch = batch.filter(pc.is_in(kinds, value_set=wanted))
        queries, candidates = (pc.cast(batch.column(name), pa.string()) for name in ("query", "candidate_id"))
        for name, column in (("query", queries), ("candidate_id", candidates)):
            if column.null_count:
                raise ValueError(f"Pairs of task {task!r} ({path}): {column.null_count} rows have a null `{name}`.")
        kept += len(queries)
        if len(queries):
            yield queries, candidates
    if engagements is not None and kept == 0:
        raise ValueError(
            f"Task {task!r}: no pair in {path} has an engagement in {list(engagements)}; "
            f"the file has {sorted(kinds_seen)}."
        )


def sorted_distinct(strings: pa.ChunkedArray | pa.Array) -> pa.Array:
    """The distinct strings, in codepoint order."""
    distinct = pc.unique(strings)
    if isinstance(distinct, pa.ChunkedArray):
        distinct = distinct.combine_chunks()
    return distinct.take(pc.sort_indices(distinct))


def positions_in(strings: pa.ChunkedArray | pa.Array, value_set: pa.Array) -> np.ndarray:
    """``(n,)`` int64 position of every string in ``value_set`` (all must be present)."""
    positions = pc.index_in(strings, value_set=value_set)
    return positions.to_numpy(zero_copy_only=False).astype(np.int64)


def load_pairs(
    path: str | os.PathLike,
    candidate_table: EntityTable | None,
    *,
    task: str,
    max_per_candidate: int | None,
    seed: int,
    engagements: Sequence[str] | None = None,
) -> TaskPairs:
    """Read a pair file (see ``read_pairs``), map candidate ids to rows, and apply the popularity cap.

    With ``candidate_table=None`` (query→query tasks) the candidates are the distinct ``candidate_id``
    texts themselves, numbered in sorted order.
    """
    # Pass 1: candidate rows, and the distinct queries (and query candidates) of each batch.
    candidate_parts, distinct_queries, distinct_candidates = [], [], []
    for queries, candidate_ids in read_pairs(path, task=task, engagements=engagements):
        distinct_queries.append(pc.unique(queries))
        if candidate_table is None:
            distinct_candidates.append(pc.unique(candidate_ids))
        else:
            where = f"the pairs of task {task!r} ({path})"
            candidate_parts.append(candidate_table.rows_of(candidate_ids, where=where))
    query_texts = sorted_distinct(pa.chunked_array(distinct_queries, pa.string()))
    candidate_texts = None
    if candidate_table is None:
        candidate_texts = sorted_distinct(pa.chunked_array(distinct_candidates, pa.string()))
    # Pass 2: every pair's query (and query candidate) as a position in the sorted distinct texts.
    query_parts = []
    for queries, candidate_ids in read_pairs(path, task=task, engagements=engagements):
        query_parts.append(positions_in(queries, query_texts))
        if candidate_table is None:
            candidate_parts.append(positions_in(candidate_ids, candidate_texts))
    candidates = np.concatenate(candidate_parts) if candidate_parts else np.zeros(0, dtype=np.int64)
    query_ids = np.concatenate(query_parts) if query_parts else np.zeros(0, dtype=np.int64)
    del candidate_parts, query_parts
    kept = cap_pairs_per_candidate(candidates, max_per_candidate, seed)
    if len(kept) < len(candidates):
        query_ids, candidates = query_ids[kept], candidates[kept]
        used = np.unique(query_ids)  # drop the queries the cap removed, keeping sorted order
        query_texts, query_ids = query_texts.take(pa.array(used)), np.searchsorted(used, query_ids)
    return TaskPairs(query_texts, query_ids, candidates, candidate_texts)


def cap_pairs_per_candidate(candidates: np.ndarray, max_per_candidate: int | None, seed: int) -> np.ndarray:
    """Indices of the pairs kept when each candidate may appear at most ``max_per_candidate`` times.

    Which pairs of a popular candidate survive is decided by a seeded shuffle, not by file order. When no
    candidate exceeds the cap every pair is kept without shuffling anything.
    """
    candidates = np.asarray(candidates)
    if max_per_candidate is None:
        return np.arange(len(candidates))
    if max_per_candidate < 1:
        raise ValueError(f"`max_pairs_per_candidate` must be >= 1 or None, got {max_per_candidate!r}.")
    if len(candidates) == 0 or np.bincount(candidates).max() <= max_per_candidate:
        return np.arange(len(candidates))
    order = np.random.default_rng(seed).permutation(len(candidates))
    by_candidate = np.argsort(candidates[order], kind="stable")  # shuffled order kept within a candidate
    grouped = candidates[order[by_candidate]]  # (n,) sorted by candidate
    new_group = np.empty(len(grouped), dtype=bool)
    new_group[0], new_group[1:] = True, grouped[1:] != grouped[:-1]
    del grouped
    positions = np.arange(len(new_group))
    # Occurrence number of each pair among the pairs of its candidate, in shuffled order.
    occurrence = positions - np.maximum.accumulate(np.where(new_group, positions, 0))
    return np.sort(order[by_candidate[occurrence < max_per_candidate]])


def popularity_cap(task: TaskConfig) -> int | None:
    """The task's cap, or the paper's default for its entity table (50 per pin, 200 per product)."""
    if task.max_pairs_per_candidate is not None:
        return task.max_pairs_per_candidate
    return DEFAULT_POPULARITY_CAPS.get(task.table) if task.table is not None else None


def held_out_pairs(
    path: str | os.PathLike, *, task: str, max_pairs: int, seed: int, engagements: Sequence[str] | None = None
) -> list[tuple[str, str]]:
    """Up to ``max_pairs`` ``(query, candidate_id)`` pairs of a held-out file, a seeded sample in file order.

    The trainer's periodic Recall@K and the benchmarks draw evaluation pairs with this, so both score the
    same pairs.
    """
    batches = list(read_pairs(path, task=task, engagements=engagements))
    queries = pa.chunked_array([q for q, _ in batches], pa.string())
    candidate_ids = pa.chunked_array([c for _, c in batches], pa.string())
    chosen = pa.array(np.sort(np.random.default_rng(seed).permutation(len(queries))[:max_pairs]))
    return list(zip(queries.take(chosen).to_pylist(), candidate_ids.take(chosen).to_pylist(), strict=True))


@dataclass
class TrainingData:
    """Everything the loop indexes: entity tables, each task's pairs, and the fixed query-side vectors.

    Attributes:
        tables: Entity table name → table (only the columns the towers and tasks read).
        pairs: Task name → its pairs.
        eval_pairs: Task name → held-out ``(query, candidate_id)`` pairs (tasks with ``eval_pairs``).
        query_rows: For ``query_feature`` tasks, the query entity's row of every pair.
        feature_dims: Task name → width of its fixed vectors (``compat`` candidates, ``query_feature``).
        hard_negatives: Task name → its hard-negative pool (tasks with ``num_hard_negatives``).
    """

    tables: dict[str, EntityTable]
    pairs: dict[str, TaskPairs]
    eval_pairs: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    query_rows: dict[str, np.ndarray] = field(default_factory=dict)
    feature_dims: dict[str, int] = field(default_factory=dict)
    hard_negatives: dict[str, HardNegativePool] = field(default_factory=dict)

    def candidate_table(self, task: TaskConfig) -> EntityTable | None:
        return self.tables[task.table] if task.table is not None else None

    def catalogue_size(self, task: TaskConfig) -> int:
        """How many candidates task ``task`` can draw (its logQ prior and random-negative pool)."""
        pairs = self.pairs[task.name]
        return len(pairs.candidate_texts) if task.candidate.kind == "query" else len(self.tables[task.table])


def load_training_data(
    config: TrainingConfig,
    base: Path,
    *,
    entity_features: Sequence[str],
    entity_paths: dict[str, Path] | None = None,
    cache_dir: Path | None = None,
) -> TrainingData:
    """Read the entity tables and pair files of every task of ``config``.

    Args:
        config: The run's config.
        base: Folder that relative paths in ``data.entities`` and the tasks are relative to.
        entity_features: Columns the entity tower reads (besides ``id``).
        entity_paths: Table name → file overriding ``data.entities`` (e.g. with computed columns).
        cache_dir: Where memory-mapped Arrow copies of the entity tables go (None: read in memory).
    """
    tasks = config.data.tasks
    used = {task.table for task in tasks if task.table is not None}
    used |= {task.query_feature.table for task in tasks if task.query_feature is not None}
    missing = sorted(used - set(config.data.entities))
    if missing:
        raise ValueError(f"Tasks use entity table(s) {missing}; declare them under `data.entities`.")
    extra = [task.candidate.feature for task in tasks if task.candidate.kind == "compat"]
    extra += [task.query_feature.feature for task in tasks if task.query_feature is not None]
    # Group columns are read for the hard-negative pools only: as metadata, so entity rows leave them out.
    groups = {task.hard_negatives_group for task in tasks if task.hard_negatives_group is not None}
    groups -= {*entity_features, *extra}
    paths = {name: base / config.data.entities[name] for name in used} | (entity_paths or {})
    tables = {
        name: EntityTable.read(
            paths[name],
            name=name,
            columns=[*entity_features, *extra, *sorted(groups)],
            metadata_columns=sorted(groups),
            cache_dir=cache_dir,
        )
        for name in sorted(used)
    }
    data = TrainingData(tables, {})
    for index, task in enumerate(tasks):
        if task.pairs is None:
            raise ValueError(f"Task {task.name!r} has no `pairs` file.")
        data.pairs[task.name] = pairs = load_pairs(
            base / task.pairs,
            data.candidate_table(task),
            task=task.name,
            max_per_candidate=popularity_cap(task),
            seed=config.train.seed + index,
            engagements=task.engagements,
        )
        if task.candidate.kind == "compat":
            data.feature_dims[task.name] = data.tables[task.table].feature_dim(task.candidate.feature)
        if task.query_feature is not None:
            query_table = tables[task.query_feature.table]
            # feature_dim first: it names the table and the missing column if the feature is absent.
            data.feature_dims[f"{task.name}/query"] = query_table.feature_dim(task.query_feature.feature)
            rows = query_table.rows_of(pairs.query_texts, where=f"the `query` column of task {task.name!r}")
            data.query_rows[task.name] = rows[pairs.query_ids]
        if task.num_hard_negatives:
            data.hard_negatives[task.name] = load_pool(task, pairs.query_texts, data.candidate_table(task))
        if task.eval_pairs:
            data.eval_pairs[task.name] = held_out_pairs(
                base / task.eval_pairs,
                task=task.name,
                max_pairs=config.eval.max_pairs,
                seed=config.train.seed,
                engagements=task.engagements,
            )
    return data


__all__ = [
    "TaskPairs",
    "TrainingData",
    "cap_pairs_per_candidate",
    "held_out_pairs",
    "load_pairs",
    "load_training_data",
    "popularity_cap",
    "read_pairs",
]
