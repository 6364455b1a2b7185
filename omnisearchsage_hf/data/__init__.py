"""Data: every table reader and writer.

``tables`` is the one way to read a table (``EntityTable``, ``records.RecordTable``, ``read_table``,
``iter_batches``); ``keys`` hashes Arrow strings to stable 64-bit keys; ``synthetic`` generates a
Pinterest-like world; ``xquad_r`` and ``amazon_pqa`` turn the real data sets into tables; ``encoders``
loads zero-shot encoders that compute embedding columns.
"""

from .records import RecordTable
from .tables import EntityTable, iter_batches, read_table, write_table_atomically

__all__ = ["EntityTable", "RecordTable", "iter_batches", "read_table", "write_table_atomically"]
