"""Columns that enrichment sets on an entity table: matched by id, nulls filtered.

Every enrichment step streams its input (board saves, engagement logs) through ``data.tables.iter_batches``
and ends by setting one column of the entity table (``board_titles``, ``engaged_queries``, ``caption``)
with ``attach_column``; the enriched table is written with ``data.tables.write_table_atomically``, so a
reader sees the old file or the new one, never half of one.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..data.keys import string_keys
from ..data.tables import ID_COLUMN
from ..tokenization.ngrams import KeyTable


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


__all__ = ["attach_column", "drop_null_rows"]
