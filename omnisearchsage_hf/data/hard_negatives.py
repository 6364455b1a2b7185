"""Hard-negative mining: for every query, the entities an encoder ranks close to it that are not its positives.

In-batch and random negatives are mostly easy: a random sentence of another article is far from any
question. Mining asks an encoder (zero-shot, or the towers of an earlier run) for each query's nearest
entities, skips the top of the ranking (``rank_range``: the very nearest are often unlabelled
positives), drops candidates that score too close to the query's positive (the false-negative filter,
as in sentence-transformers' ``mine_hard_negatives`` and NV-Retriever's positive-aware mining), never
returns a known positive, and keeps the ``num_negatives`` best of what remains.

The result is a table, one row per query: ``query`` (string), ``negative_ids`` (list of entity ids, best
first) and ``negative_scores`` (their similarities). ``omnisearchsage-mine`` writes it for a task of a
training config, and the trainer draws each pair's hard negatives from its query's row
(``TaskConfig.hard_negatives``).
"""

from __future__ import annotations

import os
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
from tqdm.auto import tqdm

from .tables import check_columns, read_table, write_table_atomically

QUERY_COLUMN = "query"
NEGATIVES_COLUMN = "negative_ids"
SCORES_COLUMN = "negative_scores"
HARD_NEGATIVES_SCHEMA = pa.schema(
    [(QUERY_COLUMN, pa.string()), (NEGATIVES_COLUMN, pa.list_(pa.string())), (SCORES_COLUMN, pa.list_(pa.float32()))]
)


def _unit_float32(name: str, embeddings: np.ndarray, rows: int) -> np.ndarray:
    array = np.asarray(embeddings, dtype=np.float32)
    if array.ndim != 2 or array.shape[0] != rows:
        raise ValueError(f"`{name}` must have shape ({rows}, dim), one row per item, got {array.shape}.")
    if not np.isfinite(array).all():
        raise ValueError(f"`{name}` contains NaN or inf.")
    return np.ascontiguousarray(array / np.maximum(np.linalg.norm(array, axis=1, keepdims=True), 1e-12))


def check_mining_options(
    rank_range: tuple[int, int], num_negatives: int, absolute_margin: float | None, relative_margin: float | None
) -> None:
    """Raise on options ``mine_hard_negatives`` cannot use (a command checks them before embedding anything)."""
    start, stop = rank_range
    if not (isinstance(start, int) and isinstance(stop, int) and 0 <= start < stop):
        raise ValueError(f"`rank_range` must be (start, stop) ints with 0 <= start < stop, got {rank_range!r}.")
    if not isinstance(num_negatives, int) or not 1 <= num_negatives <= stop - start:
        raise ValueError(
            f"`num_negatives` must be an int in [1, {stop - start}] (the size of rank_range {rank_range!r}), "
            f"got {num_negatives!r}."
        )
    if absolute_margin is not None and not absolute_margin >= 0:
        raise ValueError(f"`absolute_margin` must be >= 0 or None, got {absolute_margin!r}.")
    if relative_margin is not None and not 0 <= relative_margin < 1:
        raise ValueError(f"`relative_margin` must be in [0, 1) or None, got {relative_margin!r}.")


def mine_hard_negatives(
    query_texts: Sequence[str],
    query_embeddings: np.ndarray,
    entity_ids: Sequence[str],
    entity_embeddings: np.ndarray,
    positives: Mapping[str, Collection[str]],
    *,
    excluded: Mapping[str, Collection[str]] | None = None,
    rank_range: tuple[int, int] = (10, 100),
    num_negatives: int = 8,
    absolute_margin: float | None = None,
    relative_margin: float | None = None,
    batch_size: int = 1024,
    show_progress_bar: bool = True,
) -> pa.Table:
    """Each query's hard negatives: near entities in a rank range, not positives, below a margin.

    Embeddings are L2-normalised (float32), so scores are cosine similarities; a faiss ``IndexFlatIP``
    finds every query's nearest entities exactly. For query ``q`` with positive score ``s+`` (the best
    score of its known positives, computed exactly), the candidates are ranked by score with every known
    positive (and ``excluded`` id) removed first, and those of rank ``rank_range[0] <= r < rank_range[1]`` (0-based) are
    examined in rank order. A candidate with score ``s`` is dropped when
    ``s > s+ - absolute_margin`` (absolute margin; 0 keeps only negatives scored below the positive) or
    ``s > s+ - |s+| * relative_margin`` (relative margin; 0.05 keeps a negative only when it scores at
    least 5% of the positive's magnitude below it). These are sentence-transformers' definitions. The
    first ``num_negatives`` that survive are kept; a query may get fewer (the trainer then draws fewer).

    Args:
        query_texts: ``(Q,)`` distinct query texts.
        query_embeddings: ``(Q, d)`` their embeddings (any scale; normalised here).
        entity_ids: ``(E,)`` distinct entity ids (the candidate table's ``id`` column).
        entity_embeddings: ``(E, d)`` their embeddings.
        positives: Query text → ids of its known positives; every query needs one, every id must be in
            ``entity_ids``.
        excluded: Query text → further ids never returned and not ranked, but not positives either (they do
            not set ``s+``): e.g. the translations of a positive sentence, relevant to a cross-lingual search.
        rank_range: ``(start, stop)``, ranks among non-positives to draw from; default ``(10, 100)``.
        num_negatives: Negatives kept per query (>= 1), best first.
        absolute_margin: See above (>= 0), or None.
        relative_margin: See above (in ``[0, 1)``), or None.
        batch_size: Queries searched at a time.
        show_progress_bar: Show a tqdm bar over the queries.

    Returns:
        A table with ``HARD_NEGATIVES_SCHEMA``: ``query``, ``negative_ids`` (best first), ``negative_scores``.

    Example:
        ::

            table = mine_hard_negatives(["red dress"], [[1.0, 0.0]], ["a", "b", "c"],
                                        [[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]], {"red dress": {"a"}},
                                        rank_range=(0, 2), num_negatives=1, show_progress_bar=False)
            table.to_pylist()[0]["negative_ids"]
            # ['b']
    """
    import faiss  # an optional dependency (the `serve` and `test` extras): only mining needs it here

    check_mining_options(rank_range, num_negatives, absolute_margin, relative_margin)
    start, stop = rank_range
    queries = _unit_float32("query_embeddings", query_embeddings, len(query_texts))
    entities = _unit_float32("entity_embeddings", entity_embeddings, len(entity_ids))
    if queries.shape[1] != entities.shape[1]:
        raise ValueError(f"Query embeddings have {queries.shape[1]} dims, entity embeddings {entities.shape[1]}.")
    row_of = {entity_id: row for row, entity_id in enumerate(entity_ids)}
    if len(row_of) != len(entity_ids):
        raise ValueError("`entity_ids` must be distinct.")
    positive_rows, skipped_rows = [], []
    for text in query_texts:
        ids, more = positives.get(text) or (), (excluded or {}).get(text) or ()
        if not ids:
            raise ValueError(f"Query {text!r} has no positive in `positives`; the margin filter needs one.")
        for name, values in (("Positives", ids), ("Excluded ids", more)):
            unknown = [entity_id for entity_id in values if entity_id not in row_of]
            if unknown:
                raise ValueError(f"{name} {sorted(unknown)[:3]} of query {text!r} are not in `entity_ids`.")
        positive_rows.append(np.fromiter((row_of[i] for i in ids), dtype=np.int64))
        skipped_rows.append(np.fromiter((row_of[i] for i in {*ids, *more}), dtype=np.int64))
    index = faiss.IndexFlatIP(entities.shape[1])
    index.add(entities)
    # Enough neighbours that `stop` candidates remain once the positives (and excluded ids) are removed.
    depth = min(len(entity_ids), stop + max(len(rows) for rows in skipped_rows))
    negative_ids, negative_scores = [], []
    bar = tqdm(total=len(query_texts), desc="Mining hard negatives", unit=" queries", disable=not show_progress_bar)
    with bar:
        for begin in range(0, len(query_texts), batch_size):
            chunk = queries[begin : begin + batch_size]  # (b, d)
            scores, neighbours = index.search(chunk, depth)  # (b, depth), best first
            for i in range(len(chunk)):
                known = positive_rows[begin + i]
                best = float((entities[known] @ chunk[i]).max())  # s+: exact, wherever the positives rank
                keep = (neighbours[i] >= 0) & ~np.isin(neighbours[i], skipped_rows[begin + i])
                rows, row_scores = neighbours[i][keep][start:stop], scores[i][keep][start:stop]
                allowed = np.ones(len(rows), dtype=bool)
                if absolute_margin is not None:
                    allowed &= row_scores <= best - absolute_margin
                if relative_margin is not None:
                    allowed &= row_scores <= best - abs(best) * relative_margin
                rows, row_scores = rows[allowed][:num_negatives], row_scores[allowed][:num_negatives]
                negative_ids.append([entity_ids[row] for row in rows])
                negative_scores.append(row_scores.astype(np.float32).tolist())
            bar.update(len(chunk))
    columns = [pa.array(list(query_texts), pa.string()), negative_ids, negative_scores]
    return pa.table(columns, schema=HARD_NEGATIVES_SCHEMA)


def write_hard_negatives(table: pa.Table, path: str | os.PathLike) -> Path:
    """Write a mined table as parquet, atomically (a temporary file renamed); returns the path."""
    check_columns(table.schema, [QUERY_COLUMN, NEGATIVES_COLUMN], "A hard-negative table")
    return write_table_atomically(table, path)


def read_hard_negatives(path: str | os.PathLike, *, where: str = "") -> pa.Table:
    """Read a mined table's ``query`` (string) and ``negative_ids`` (list of string) columns, checked.

    Args:
        path: The table (parquet, or any format ``read_table`` reads).
        where: What names it, for errors (``"task 'query_sentence' (`hard_negatives`)"``).
    """
    path = Path(path)
    source = f"{where}: " if where else ""
    if not path.exists():
        raise FileNotFoundError(
            f"{source}hard-negative table {str(path)!r} does not exist; write it with omnisearchsage-mine "
            "(a relative path is relative to the working directory)."
        )
    table = read_table(path, [QUERY_COLUMN, NEGATIVES_COLUMN])
    query_type, negatives_type = table.schema.field(QUERY_COLUMN).type, table.schema.field(NEGATIVES_COLUMN).type
    if not (pa.types.is_string(query_type) or pa.types.is_large_string(query_type)):
        raise ValueError(f"{source}{path}: `{QUERY_COLUMN}` must hold strings, got {query_type}.")
    if not (pa.types.is_list(negatives_type) or pa.types.is_large_list(negatives_type)):
        raise ValueError(f"{source}{path}: `{NEGATIVES_COLUMN}` must hold lists of entity ids, got {negatives_type}.")
    if table.column(QUERY_COLUMN).null_count:
        raise ValueError(f"{source}{path}: {table.column(QUERY_COLUMN).null_count} rows have a null `{QUERY_COLUMN}`.")
    return table


__all__ = [
    "HARD_NEGATIVES_SCHEMA",
    "NEGATIVES_COLUMN",
    "QUERY_COLUMN",
    "SCORES_COLUMN",
    "check_mining_options",
    "mine_hard_negatives",
    "read_hard_negatives",
    "write_hard_negatives",
]
