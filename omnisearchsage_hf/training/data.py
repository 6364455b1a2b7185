"""Training data: entity tables keyed by id and per-task pair lists, read through HF ``datasets``.

Files may be parquet, jsonl or csv. An entity table has an ``id`` column plus the feature columns the
entity tower reads (text fields, pre-existing embeddings); a pair file has ``query`` and
``candidate_id`` columns, and an ``engagement`` column for tasks that keep one engagement type. Ids
become row indices once at load time, so the training loop only moves integers around, and the same
files give the same indices on every process.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np

from .config import DEFAULT_POPULARITY_CAPS, TaskConfig
from .tasks import cap_pairs_per_candidate

_FORMATS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv"}


def read_table(path: str | Path) -> datasets.Dataset:
    """Load a parquet / jsonl / csv file as a ``datasets.Dataset`` (local files only, no Hub)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Data file {str(path)!r} does not exist.")
    fmt = _FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"Cannot read {str(path)!r}: use one of {sorted(_FORMATS)}.")
    return datasets.load_dataset(fmt, data_files=str(path), split="train")


class EntityTable(Mapping[str, dict[str, Any]]):
    """An entity table: ``id → feature dict`` (only the columns the entity tower reads), plus row access.

    Args:
        dataset: Rows with an ``id`` column.
        feature_names: Columns handed to the entity tower (others, like ``topic``, are dropped).
        name: Table name, for error messages.
    """

    def __init__(self, dataset: datasets.Dataset, feature_names: Sequence[str], name: str):
        if "id" not in dataset.column_names:
            raise ValueError(f"Entity table {name!r} has no `id` column; columns: {dataset.column_names}.")
        self.name = name
        self.columns = [c for c in feature_names if c in dataset.column_names]
        self.dataset = dataset.select_columns(["id", *self.columns])
        self.ids = [str(i) for i in self.dataset["id"]]
        self.row_of = {entity_id: row for row, entity_id in enumerate(self.ids)}
        if len(self.row_of) != len(self.ids):
            raise ValueError(f"Entity table {name!r} has duplicate ids.")

    def rows(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        """Feature dicts of the given rows, without null features (a missing feature is an absent key)."""
        columns = self.dataset[np.asarray(indices, dtype=np.int64)]
        return [
            {c: columns[c][i] for c in ("id", *self.columns) if columns[c][i] is not None} for i in range(len(indices))
        ]

    def column(self, name: str, indices: Sequence[int]) -> list[Any]:
        return self.dataset[np.asarray(indices, dtype=np.int64)][name]

    def __getitem__(self, entity_id: str) -> dict[str, Any]:
        return self.rows([self.row_of[entity_id]])[0]

    def __iter__(self) -> Iterator[str]:
        return iter(self.ids)

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class TaskPairs:
    """One task's pairs as arrays: query texts, query ids (one per distinct text), candidate row indices.

    ``candidate_texts`` is set for query→query tasks, whose candidates are query texts rather than rows
    of an entity table.
    """

    queries: list[str]
    query_ids: np.ndarray
    candidates: np.ndarray
    candidate_texts: list[str] | None = None

    def __len__(self) -> int:
        return len(self.queries)


def read_pairs(path: str | Path, *, task: str, engagements: Sequence[str] | None = None) -> tuple[list[str], list[str]]:
    """``(queries, candidate_ids)`` of a pair file, as strings, keeping only ``engagements`` if given.

    Raises when a column is missing, or when the engagement filter keeps nothing (naming the engagement
    types the file has), so a typo in a config never trains on zero pairs.
    """
    table = read_table(path)
    needed = {"query", "candidate_id"} | ({"engagement"} if engagements is not None else set())
    missing = needed - set(table.column_names)
    if missing:
        raise ValueError(f"Pairs of task {task!r} ({path}) lack column(s) {sorted(missing)}.")
    queries = [str(q) for q in table["query"]]
    candidate_ids = [str(c) for c in table["candidate_id"]]
    if engagements is not None:
        kinds, wanted = table["engagement"], set(engagements)
        keep = [i for i, kind in enumerate(kinds) if kind in wanted]
        if not keep:
            raise ValueError(
                f"Task {task!r}: no pair in {path} has an engagement in {list(engagements)}; "
                f"the file has {sorted(set(map(str, kinds)))}."
            )
        queries, candidate_ids = [queries[i] for i in keep], [candidate_ids[i] for i in keep]
    return queries, candidate_ids


def held_out_pairs(
    path: str | Path, *, task: str, max_pairs: int, seed: int, engagements: Sequence[str] | None = None
) -> list[tuple[str, str]]:
    """Up to ``max_pairs`` ``(query, candidate_id)`` pairs of a held-out file, a seeded sample in file order.

    The trainer's periodic Recall@K and the benchmarks draw evaluation pairs with this, so both score the
    same pairs.
    """
    pairs = list(zip(*read_pairs(path, task=task, engagements=engagements)))
    order = np.random.default_rng(seed).permutation(len(pairs))[:max_pairs]
    return [pairs[i] for i in sorted(order)]


def load_pairs(
    path: str | Path,
    candidate_row: Mapping[str, int] | None,
    *,
    task: str,
    max_per_candidate: int | None,
    seed: int,
    engagements: Sequence[str] | None = None,
) -> TaskPairs:
    """Read a pair file (see ``read_pairs``), map candidate ids to rows, and apply the popularity cap.

    With ``candidate_row=None`` (query→query tasks) the candidates are the distinct ``candidate_id``
    texts themselves, numbered in sorted order.
    """
    queries, candidate_ids = read_pairs(path, task=task, engagements=engagements)
    candidate_texts = None
    if candidate_row is None:
        candidate_texts = sorted(set(candidate_ids))
        candidate_row = {text: row for row, text in enumerate(candidate_texts)}
    unknown = next((c for c in candidate_ids if c not in candidate_row), None)
    if unknown is not None:
        raise ValueError(f"Task {task!r}: pair candidate {unknown!r} is not in the candidate table.")
    candidates = np.array([candidate_row[c] for c in candidate_ids], dtype=np.int64)
    kept = cap_pairs_per_candidate(candidates, max_per_candidate, seed)
    queries = [queries[i] for i in kept]
    _, query_ids = np.unique(np.array(queries, dtype=object), return_inverse=True)
    return TaskPairs(queries, query_ids.astype(np.int64), candidates[kept], candidate_texts)


def popularity_cap(task: TaskConfig) -> int | None:
    """The task's cap, or the paper's default for its entity table (50 per pin, 200 per product)."""
    if task.max_pairs_per_candidate is not None:
        return task.max_pairs_per_candidate
    kind, _, table = task.candidate.partition(":")
    return DEFAULT_POPULARITY_CAPS.get(table.split(":")[0]) if kind in ("entity", "compat") else None


__all__ = ["EntityTable", "TaskPairs", "held_out_pairs", "load_pairs", "popularity_cap", "read_pairs", "read_table"]
