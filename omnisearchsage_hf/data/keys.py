"""Stable 64-bit keys for Arrow string columns, and the distinct strings behind them.

Enrichment groups tens of millions of log rows by entity id, query and board title. Grouping Arrow
strings directly (``Table.group_by``) or through a Python dict is slow at that scale, so every string is
replaced by a 64-bit key and all grouping is numpy sorting over integers. Keys are the polynomial hash of
the string's UTF-8 bytes finished by SplitMix64, the same scheme (and code) as the tokenizer's word keys:
stable across processes and machines, unlike Python's salted ``hash()``. Two distinct strings share a
key with probability about ``n**2 / 2**65`` (about 1e-5 for 20 million distinct strings).

Only the distinct strings of each chunk are hashed (``dictionary_encode`` first), and a
``StringCatalogue`` keeps each distinct string once, in first-seen order, to turn keys back into text.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..tokenization.ngrams import KeyTable, span_keys

# Strings hashed per numpy pass: bounds the per-byte temporaries (about 40 bytes per input byte).
_HASH_SLICE = 65_536


def string_keys(strings: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """The ``(n,)`` uint64 key of every string (the empty string's key is 0).

    Args:
        strings: A string or large_string array without nulls.

    Example:
        ::

            string_keys(pa.array(["red", "red", ""]))
            # array([k, k, 0], dtype=uint64) for one k
    """
    if isinstance(strings, pa.ChunkedArray):
        strings = strings.combine_chunks()
    if pa.types.is_string(strings.type):
        offset_type = np.int32
    elif pa.types.is_large_string(strings.type):
        offset_type = np.int64
    else:
        raise TypeError(f"`strings` must be an Arrow string array, got type {strings.type}.")
    if strings.null_count:
        raise ValueError(f"`strings` holds {strings.null_count} nulls; drop or fill them before hashing.")
    keys = np.zeros(len(strings), dtype=np.uint64)
    if len(strings) == 0:
        return keys
    _, offsets_buffer, data_buffer = strings.buffers()
    offsets = np.frombuffer(offsets_buffer, dtype=offset_type)[strings.offset : strings.offset + len(strings) + 1]
    data = np.frombuffer(data_buffer, dtype=np.uint8) if data_buffer is not None else np.zeros(0, np.uint8)
    for start in range(0, len(strings), _HASH_SLICE):
        bounds = offsets[start : start + _HASH_SLICE + 1].astype(np.int64)  # (slice + 1,)
        base = bounds[0]
        starts, ends = bounds[:-1] - base, bounds[1:] - base
        nonempty = np.flatnonzero(ends > starts)
        if len(nonempty):
            chars = data[base : bounds[-1]].astype(np.uint64)  # (bytes in the slice,)
            keys[start + nonempty] = span_keys(chars, starts[nonempty], ends[nonempty])
    return keys


def encode_strings(strings: pa.Array | pa.ChunkedArray, catalogue: StringCatalogue | None = None) -> np.ndarray:
    """Keys of ``strings`` hashing each distinct value once; adds the distinct values to ``catalogue``.

    Args:
        strings: A string array without nulls.
        catalogue: Where the distinct strings are remembered (first-seen order), or None.

    Returns:
        ``(n,)`` uint64 keys.
    """
    if isinstance(strings, pa.ChunkedArray):
        strings = strings.combine_chunks()
    encoded = pc.dictionary_encode(strings)
    distinct = encoded.dictionary
    distinct_keys = string_keys(distinct)  # (num_distinct,)
    if catalogue is not None:
        catalogue.add(distinct_keys, distinct)
    return distinct_keys[encoded.indices.to_numpy(zero_copy_only=False)]  # (n,)


class StringCatalogue:
    """The distinct strings seen so far, each once, in first-seen order, findable by key.

    Example:
        ::

            catalogue = StringCatalogue()
            keys = encode_strings(pa.array(["b", "a", "b"]), catalogue)
            catalogue.strings().to_pylist()   # ['b', 'a']
            catalogue.lookup(keys)            # array([0, 1, 0])
    """

    def __init__(self) -> None:
        self._sorted_keys = np.zeros(0, dtype=np.uint64)
        self._keys: list[np.ndarray] = []
        self._strings: list[pa.Array] = []
        self._table: KeyTable | None = None

    def __len__(self) -> int:
        return len(self._sorted_keys)

    def add(self, keys: np.ndarray, strings: pa.Array) -> None:
        """Remember the strings whose (distinct) keys are new."""
        positions = np.searchsorted(self._sorted_keys, keys)
        known = positions < len(self._sorted_keys)
        known[known] = self._sorted_keys[positions[known]] == keys[known]
        new = np.flatnonzero(~known)
        if len(new):
            self._keys.append(keys[new])
            self._strings.append(strings.take(pa.array(new)))
            self._sorted_keys = np.union1d(self._sorted_keys, keys[new])
            self._table = None

    def keys(self) -> np.ndarray:
        """``(len,)`` keys in first-seen order."""
        return np.concatenate(self._keys) if self._keys else np.zeros(0, dtype=np.uint64)

    def strings(self) -> pa.Array:
        """The distinct strings in first-seen order (row ``i`` has key ``keys()[i]``)."""
        return pa.concat_arrays(self._strings) if self._strings else pa.array([], pa.string())

    def lookup(self, keys: np.ndarray) -> np.ndarray:
        """``(n,)`` catalogue row of every key; raises if one was never added."""
        if self._table is None:
            self._table = KeyTable(self.keys(), np.arange(len(self)))
        rows = self._table.lookup(keys)
        if len(rows) and rows.min() < 0:
            raise KeyError(f"{int((rows < 0).sum())} keys were never added to this catalogue.")
        return rows


def lexical_ranks(strings: pa.Array) -> np.ndarray:
    """``(n,)`` int64 rank of every string in codepoint order (equal strings do not occur in a catalogue)."""
    order = pc.sort_indices(strings).to_numpy()
    ranks = np.empty(len(order), dtype=np.int64)
    ranks[order] = np.arange(len(order))
    return ranks


def group_starts(sorted_keys: np.ndarray) -> np.ndarray:
    """Start index of every run of equal values in a sorted ``(n,)`` array (empty for empty input)."""
    if len(sorted_keys) == 0:
        return np.zeros(0, dtype=np.int64)
    return np.flatnonzero(np.concatenate([[True], sorted_keys[1:] != sorted_keys[:-1]]))


def rank_within_groups(groups_sorted: np.ndarray) -> np.ndarray:
    """``(n,)`` 0-based position of every row within its run of equal values (input grouped)."""
    starts = group_starts(groups_sorted)
    lengths = np.diff(np.append(starts, len(groups_sorted)))
    return np.arange(len(groups_sorted)) - np.repeat(starts, lengths)


def list_array(offsets: np.ndarray, values: pa.Array) -> pa.ListArray:
    """A ``list<string>`` array from ``(n + 1,)`` offsets into ``values``."""
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), values)


__all__ = [
    "StringCatalogue",
    "encode_strings",
    "group_starts",
    "lexical_ranks",
    "list_array",
    "rank_within_groups",
    "string_keys",
]
