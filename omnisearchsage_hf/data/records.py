"""Rows of an Arrow table as dicts: the one conversion from columns to what the towers' ``encode`` takes.

``records`` turns a table into dicts, with vector columns (fixed-size lists, lists of floats, lists of
fixed-size lists for several images) as float32 numpy arrays; ``RecordTable`` reads rows of a table by
index, gathering them from its record batches (fast on memory-mapped tables of many chunks).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa


def records(table: pa.Table) -> list[dict[str, Any]]:
    """Rows of ``table`` as dicts; vectors as float32 arrays (``(dim,)``, or ``(k, dim)`` for lists of them)."""
    columns = {}
    for name in table.column_names:
        column = table.column(name).combine_chunks()
        if pa.types.is_fixed_size_list(column.type) or is_vector_list(column.type):
            columns[name] = vectors(column)
        else:
            columns[name] = column.to_pylist()
    return [dict(zip(columns, values, strict=True)) for values in zip(*columns.values(), strict=True)]


def is_vector_list(kind: pa.DataType) -> bool:
    """A list of numbers (a variable-width vector) or a list of fixed-size vectors (several images)."""
    return (pa.types.is_list(kind) or pa.types.is_large_list(kind)) and (
        pa.types.is_floating(kind.value_type) or pa.types.is_fixed_size_list(kind.value_type)
    )


def vectors(column: pa.Array) -> list[np.ndarray | None]:
    """Per-row float32 arrays of a vector column; None where the row is null."""
    valid = column.is_valid().to_numpy(zero_copy_only=False)
    if pa.types.is_fixed_size_list(column.type):
        # A fixed-size list's child holds `list_size` slots for every row, null rows included.
        width = column.type.list_size
        flat = column.values.slice(column.offset * width, len(column) * width).to_numpy(zero_copy_only=False)
        matrix = flat.astype(np.float32, copy=False).reshape(len(column), width)  # (n, dim)
        return [row if ok else None for row, ok in zip(matrix, valid, strict=True)]
    inner = column.type.value_type
    lengths = column.value_lengths().fill_null(0).to_numpy(zero_copy_only=False)
    flat = column.flatten()  # the present rows' items, in order
    if pa.types.is_fixed_size_list(inner):  # (total items, dim): several images per row
        flat = flat.values.slice(flat.offset * inner.list_size, len(flat) * inner.list_size)
        items = flat.to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(-1, inner.list_size)
    else:  # (total values,): one variable-width vector per row
        items = flat.to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    parts = np.split(items, np.cumsum(lengths)[:-1])
    return [part if ok else None for part, ok in zip(parts, valid, strict=True)]


class RecordTable:
    """A table kept columnar in Arrow and read as dicts, leaving out its metadata columns.

    Rows read by index or slice (``table[0]``, ``table[:50]``) or ``to_records()`` carry every column
    but the metadata ones, so entity rows go straight into ``OmniSearchSageEntityModel.encode``. A missing
    feature is None; a vector is a float32 array of shape ``(dim,)``, several images one ``(k, dim)`` array.

    Args:
        table: The columns.
        metadata_columns: Columns read only through ``column`` (e.g. how a synthetic entity was generated).
    """

    def __init__(self, table: pa.Table, metadata_columns: Sequence[str] = ()):
        self.table = table
        self.metadata_columns = tuple(c for c in metadata_columns if c in table.column_names)
        self._batches: list[pa.RecordBatch] | None = None
        self._batch_starts = np.zeros(1, dtype=np.int64)

    def take(self, indices: Sequence[int] | np.ndarray, columns: Sequence[str] | None = None) -> pa.Table:
        """The given rows (in the given order) of ``columns`` (default: all), as a one-chunk table.

        Rows are gathered from each record batch separately: ``pa.Table.take`` on a table of many chunks
        (a memory-mapped file of millions of rows has hundreds) costs time in the number of chunks, this
        costs time in the number of rows asked for.
        """
        indices = np.asarray(indices, dtype=np.int64)
        if self._batches is None:
            self._batches = self.table.to_batches()
            self._batch_starts = np.cumsum([0] + [batch.num_rows for batch in self._batches])
        names = list(columns) if columns is not None else self.table.column_names
        batch_of = np.searchsorted(self._batch_starts, indices, side="right") - 1  # (n,)
        order = np.argsort(batch_of, kind="stable")
        parts = []
        for batch in np.unique(batch_of):
            chosen = order[batch_of[order] == batch]
            local = pa.array(indices[chosen] - self._batch_starts[batch], pa.int64())
            parts.append(self._batches[batch].select(names).take(local))
        if not parts:
            return self.table.select(names).slice(0, 0)
        grouped = pa.Table.from_batches(parts).combine_chunks()  # rows grouped by batch
        restore = np.empty_like(order)
        restore[order] = np.arange(len(order))
        return grouped.take(pa.array(restore, pa.int64()))

    @property
    def record_columns(self) -> list[str]:
        """Columns that rows carry: all but the metadata columns."""
        return [c for c in self.table.column_names if c not in self.metadata_columns]

    def __len__(self) -> int:
        return self.table.num_rows

    def __getitem__(self, index: int | slice) -> dict[str, Any] | list[dict[str, Any]]:
        if isinstance(index, slice):
            return self.rows(np.arange(*index.indices(len(self))))
        if not isinstance(index, (int, np.integer)) or not -len(self) <= index < len(self):
            raise IndexError(f"Row {index!r} is out of range for a table of {len(self)} rows.")
        return self.rows([int(index) % len(self)])[0]

    def rows(self, indices: Sequence[int] | np.ndarray) -> list[dict[str, Any]]:
        """The given rows as dicts (record columns only)."""
        indices = np.asarray(indices, dtype=np.int64)
        if len(indices) and indices[-1] - indices[0] == len(indices) - 1 and np.all(np.diff(indices) == 1):
            return records(self.table.select(self.record_columns).slice(int(indices[0]), len(indices)))
        return records(self.take(indices, self.record_columns))

    def to_records(self) -> list[dict[str, Any]]:
        """Every row as a dict (fine for thousands of rows; use ``table`` for millions)."""
        return self[:]

    def column(self, name: str, rows: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
        """One column (metadata included), all rows or the given ones, as numpy.

        A fixed-width vector column gives ``(n, dim)`` float32; other columns ``(n,)`` (strings and lists
        as objects).
        """
        if name not in self.table.column_names:
            raise KeyError(f"No column {name!r}; columns: {self.table.column_names}.")
        column = self.table.column(name) if rows is None else self.take(rows, [name]).column(name)
        column = column.combine_chunks()
        if pa.types.is_fixed_size_list(column.type) and column.null_count == 0:
            return column.flatten().to_numpy().reshape(len(column), column.type.list_size)
        return column.to_numpy(zero_copy_only=False)


def is_vector_like(kind: pa.DataType) -> bool:
    """A column type that ``vectors`` reads: fixed-size lists, or lists of floats or of fixed-size lists."""
    return pa.types.is_fixed_size_list(kind) or is_vector_list(kind)


__all__ = ["RecordTable", "is_vector_like", "is_vector_list", "records", "vectors"]
