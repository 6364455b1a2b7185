"""Reading enrichment inputs in chunks, and writing the enriched entity table.

Every enrichment step streams its input (board saves, engagement logs) as Arrow record batches, from a
parquet file or folder, an in-memory ``pa.Table``, or any iterable of record batches, so inputs larger
than memory never have to be loaded whole. The enriched entity table is the input entity table with the
enrichment columns the entity tower reads (``board_titles``, ``engaged_queries``, ``caption``) filled
in, written as parquet through a temporary file and a rename: a reader sees the old file or the new
one, never half of one.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Union

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from ..atomic import replace_atomically
from ..tokenization.ngrams import KeyTable
from .keys import string_keys

TableSource = Union[str, os.PathLike, pa.Table, Iterable[pa.RecordBatch]]
ID_COLUMN = "id"
DEFAULT_BATCH_SIZE = 1 << 20


def iter_batches(
    source: TableSource,
    columns: Sequence[str],
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    show_progress_bar: bool = False,
    desc: str = "Reading",
) -> Iterator[pa.RecordBatch]:
    """Yield ``source`` as record batches holding ``columns`` (in that order).

    Args:
        source: A parquet file or folder of parquet files, a ``pa.Table``, or an iterable of record batches.
        columns: Columns every batch must have; others are not read.
        batch_size: Rows per batch read from files and tables (an iterable's own batches are kept).
        show_progress_bar: Show a tqdm bar over the rows.
        desc: Progress bar label.

    Raises:
        ValueError: A column is missing; the message lists the available ones.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"`batch_size` must be a positive int, got {batch_size!r}.")
    total = None
    if isinstance(source, (str, os.PathLike)):
        if not Path(source).exists():
            raise FileNotFoundError(f"Input {str(source)!r} does not exist; pass a parquet file or folder.")
        dataset = ds.dataset(source, format="parquet")
        _check_columns(dataset.schema, columns, str(source))
        total = dataset.count_rows()
        batches: Iterable[pa.RecordBatch] = dataset.to_batches(columns=list(columns), batch_size=batch_size)
    elif isinstance(source, pa.Table):
        _check_columns(source.schema, columns, "the table")
        total = source.num_rows
        batches = source.select(list(columns)).to_batches(max_chunksize=batch_size)
    else:
        batches = source
    with tqdm(total=total, desc=desc, unit=" rows", disable=not show_progress_bar) as progress:
        for batch in batches:
            _check_columns(batch.schema, columns, "a record batch")
            progress.update(batch.num_rows)
            yield batch.select(list(columns))


def _check_columns(schema: pa.Schema, columns: Sequence[str], where: str) -> None:
    missing = [name for name in columns if name not in schema.names]
    if missing:
        raise ValueError(f"{where} lacks column(s) {missing}; it has {schema.names}, and needs {list(columns)}.")


def drop_null_rows(batch: pa.RecordBatch, columns: Sequence[str]) -> pa.RecordBatch:
    """``batch`` without the rows where any of ``columns`` is null."""
    valid = functools.reduce(pc.and_, [pc.is_valid(batch.column(name)) for name in columns])
    return batch if pc.all(valid).as_py() else batch.filter(valid)


def attach_column(entities: pa.Table, name: str, values: pa.Table, *, fill: object = None) -> pa.Table:
    """Set column ``name`` of ``entities`` from ``values`` (columns ``id`` and ``name``), matched by id.

    Entities without a row in ``values`` get ``fill`` (for list columns pass ``[]``). An existing column of
    that name is replaced.

    Args:
        entities: The entity table, with a string ``id`` column.
        name: The column to set.
        values: One row per entity that has a value; ids absent from ``entities`` are ignored.
        fill: The value of entities without a row.
    """
    ids = entities.column(ID_COLUMN).combine_chunks()
    if ids.null_count:
        raise ValueError(
            f"The entity table's `{ID_COLUMN}` column holds {ids.null_count} nulls; every entity needs one."
        )
    column = values.column(name).combine_chunks()
    value_keys = string_keys(values.column(ID_COLUMN))
    rows = KeyTable(value_keys, np.arange(len(value_keys))).lookup(string_keys(ids))  # (num_entities,), -1: none
    filler = pa.array([fill], column.type)
    aligned = pa.concat_arrays([column, filler]).take(pa.array(np.where(rows < 0, len(column), rows)))
    if name in entities.column_names:
        return entities.set_column(entities.column_names.index(name), name, aligned)
    return entities.append_column(name, aligned)


def read_entities(path: str | os.PathLike) -> pa.Table:
    """Read an entity table (parquet) and check that its ``id`` column is present, non-null and unique."""
    table = ds.dataset(path, format="parquet").to_table()
    _check_columns(table.schema, [ID_COLUMN], f"Entity table {str(path)!r}")
    ids = table.column(ID_COLUMN)
    if not pa.types.is_string(ids.type) and not pa.types.is_large_string(ids.type):
        table = table.set_column(table.column_names.index(ID_COLUMN), ID_COLUMN, pc.cast(ids, pa.string()))
    if pc.count_distinct(table.column(ID_COLUMN)).as_py() != table.num_rows:
        raise ValueError(f"Entity table {str(path)!r}: `{ID_COLUMN}` values must be unique.")
    return table


def write_table_atomically(table: pa.Table, path: str | os.PathLike) -> Path:
    """Write ``table`` as parquet to ``path`` through a temporary file and a rename; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return replace_atomically(path, lambda tmp: pq.write_table(table, tmp))


__all__ = [
    "DEFAULT_BATCH_SIZE",
    "ID_COLUMN",
    "TableSource",
    "attach_column",
    "drop_null_rows",
    "iter_batches",
    "read_entities",
    "write_table_atomically",
]
