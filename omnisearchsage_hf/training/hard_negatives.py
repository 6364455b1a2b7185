"""Hard-negative pools: where each training pair's hard negatives come from, and the seeded draw per step.

A task with ``num_hard_negatives: H`` draws, at every step, up to ``H`` candidate rows per pair from a
pool, as a pure function of (seed, step, rank, task), like its random negatives, so a resumed run draws
what the killed run would have drawn and nothing needs checkpointing. Two kinds of pool:

- ``hard_negatives: <table>``: per query, the entities an encoder mined for it
  (``data.hard_negatives.mine_hard_negatives``); the pair's query picks the pool.
- ``hard_negatives_group: <column>``: per group, the entities of the candidate table sharing a value of
  ``column`` (same paragraph, same category); the pair's positive picks the pool (its own group).

Both are one ragged array in CSR form: pool ``k`` is ``members[offsets[k]:offsets[k + 1]]``. The pair's
own positive is never drawn, draws are without replacement, and a pool smaller than ``H`` gives what it
has: the missing slots are left out, not filled with repeats that would silently reweight the loss.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..data.hard_negatives import NEGATIVES_COLUMN, QUERY_COLUMN, read_hard_negatives
from ..data.tables import EntityTable, check_columns
from .config import TaskConfig

logger = logging.getLogger(__name__)
MISSING = -1  # a drawn slot with no negative (the pool had fewer than asked)


@dataclass
class HardNegativePool:
    """Candidate rows to draw hard negatives from, one pool per key, in CSR form.

    Attributes:
        offsets: ``(num_keys + 1,)`` int64; pool ``k`` is ``members[offsets[k]:offsets[k + 1]]``.
        members: ``(total,)`` int64 rows of the candidate table.
        row_keys: None when the key is the pair's query id (mined pools); else ``(num_rows,)`` int64, the
            group key of every candidate row (-1: no group), and the key is the positive's group.
    """

    offsets: np.ndarray
    members: np.ndarray
    row_keys: np.ndarray | None = None

    def keys(self, query_ids: np.ndarray, candidates: np.ndarray) -> np.ndarray:
        """``(n,)`` the pool of each pair (``-1``: none), from its query ids and positive rows."""
        return np.asarray(query_ids if self.row_keys is None else self.row_keys[candidates], dtype=np.int64)

    def sizes(self) -> np.ndarray:
        """``(num_keys,)`` members per pool."""
        return np.diff(self.offsets)


def _csr(keys: np.ndarray, members: np.ndarray, num_keys: int) -> tuple[np.ndarray, np.ndarray]:
    """``(offsets, members)`` grouping ``members`` by ``keys`` (stable: each pool keeps the given order)."""
    order = np.argsort(keys, kind="stable")
    offsets = np.zeros(num_keys + 1, dtype=np.int64)
    np.cumsum(np.bincount(keys, minlength=num_keys), out=offsets[1:])
    return offsets, members[order].astype(np.int64)


def mined_pool(path: str | os.PathLike, query_texts: pa.Array, table: EntityTable, *, task: str) -> HardNegativePool:
    """The pool per query of a task from a table written by ``omnisearchsage-mine``.

    Args:
        path: The mined table.
        query_texts: The task's distinct queries, sorted (``TaskPairs.query_texts``); the pool keys index it.
        table: The task's candidate table; the mined ids become its rows.
        task: Task name, for messages.

    Rows of queries the task does not have (e.g. removed by the popularity cap) are skipped; queries the
    table lacks get an empty pool (a warning says how many). Raises when the table shares no query with the
    task (mined for another pair file), repeats a query, or names an id the candidate table lacks (mined for
    another entity table).
    """
    where = f"Task {task!r} (`hard_negatives` {str(path)!r})"
    mined = read_hard_negatives(path, where=f"Task {task!r}")
    queries = mined.column(QUERY_COLUMN)
    if pc.count_distinct(queries).as_py() != len(queries):
        counts = pc.value_counts(queries)
        example = counts.filter(pc.greater(pc.struct_field(counts, "counts"), 1))[0]["values"].as_py()
        raise ValueError(f"{where}: query {example!r} has more than one row; mine each query once.")
    positions = pc.index_in(queries, value_set=query_texts)  # null: not a query of this task
    matched = pc.is_valid(positions)
    num_matched = pc.sum(matched).as_py() or 0
    if num_matched == 0:
        raise ValueError(
            f"{where}: none of its {len(queries)} queries (e.g. {queries[0].as_py() if len(queries) else None!r}) is "
            f"a query of the task's pairs; it was mined for other pairs. Mine it for this task with "
            f"omnisearchsage-mine --task {task}."
        )
    if num_matched < len(query_texts):
        logger.warning(
            "%s: %d of the task's %d queries have no row; their pairs get no hard negatives.",
            where,
            len(query_texts) - num_matched,
            len(query_texts),
        )
    lists = mined.column(NEGATIVES_COLUMN).filter(matched)
    lengths = pc.fill_null(pc.list_value_length(lists), 0).to_numpy(zero_copy_only=False).astype(np.int64)
    ids = pc.list_flatten(lists)
    rows = table.rows_of(ids, where=f"{where}; was it mined for another entity table?")
    query_of = np.repeat(positions.filter(matched).to_numpy(zero_copy_only=False).astype(np.int64), lengths)
    return HardNegativePool(*_csr(query_of, rows, len(query_texts)))


def group_pool(table: EntityTable, column: str, *, task: str) -> HardNegativePool:
    """The pool per group: the candidate table's rows by their value of ``column`` (null: no group)."""
    check_columns(table.table.schema, [column], f"Task {task!r}: `hard_negatives_group` of entity table {table.name!r}")
    encoded = pc.dictionary_encode(pc.cast(table.table.column(column), pa.string())).combine_chunks()
    row_keys = pc.fill_null(encoded.indices, -1).to_numpy(zero_copy_only=False).astype(np.int64)
    grouped = np.flatnonzero(row_keys >= 0)
    offsets, members = _csr(row_keys[grouped], grouped, len(encoded.dictionary))
    return HardNegativePool(offsets, members, row_keys)


def load_pool(task: TaskConfig, query_texts: pa.Array, table: EntityTable) -> HardNegativePool:
    """The pool of a task with hard negatives (``task.hard_negatives`` or ``task.hard_negatives_group``)."""
    if task.hard_negatives is not None:
        return mined_pool(task.hard_negatives, query_texts, table, task=task.name)
    return group_pool(table, task.hard_negatives_group, task=task.name)


def draw_hard_negatives(
    pool: HardNegativePool,
    keys: np.ndarray,
    positives: np.ndarray,
    *,
    count: int,
    seed: int,
    step: int,
    rank: int,
    task: int,
) -> np.ndarray:
    """``(n, count)`` int64 candidate rows for ``n`` pairs, ``MISSING`` where a pool had fewer.

    Pair ``i`` draws, without replacement, from pool ``keys[i]`` less its positive ``positives[i]``;
    seeded by (seed, step, rank, task), so the same arguments always give the same rows.

    Example:
        ::

            pool = HardNegativePool(np.array([0, 3]), np.array([4, 5, 6]))
            draw_hard_negatives(pool, np.array([0]), np.array([5]), count=3, seed=0, step=0, rank=0, task=0)
            # array([[ 4,  6, -1]]) (or 6, 4: the order is random)
    """
    rng = np.random.default_rng([seed, step, rank, task, 2])  # 1 seeds the random negatives (tasks.py)
    out = np.full((len(keys), count), MISSING, dtype=np.int64)
    for i, (key, positive) in enumerate(zip(keys.tolist(), positives.tolist(), strict=True)):
        if key < 0:
            continue
        members = pool.members[pool.offsets[key] : pool.offsets[key + 1]]
        members = members[members != positive]
        if len(members) > count:
            members = members[rng.choice(len(members), size=count, replace=False)]
        out[i, : len(members)] = members
    return out


__all__ = ["MISSING", "HardNegativePool", "draw_hard_negatives", "group_pool", "load_pool", "mined_pool"]
