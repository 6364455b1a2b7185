"""Scorers: one interface for every retriever the benchmarks compare (our towers, zero-shot encoders, BM25).

A scorer maps ``(query texts, corpus rows)`` to a ``(num_queries, num_rows)`` score matrix, higher is
better. The real-data evaluations (``evaluate_xquad``, ``evaluate_epqa``) rank with it, so a lexical
baseline and a pair of embedding towers are measured by exactly the same code. Corpus rows are entity
dicts that carry an ``id``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import numpy as np
from tqdm.auto import tqdm

Row = Mapping[str, Any]


class Scorer(Protocol):
    """``(queries, rows) → (len(queries), len(rows))`` float scores."""

    def __call__(self, queries: Sequence[str], rows: Sequence[Row]) -> np.ndarray: ...


class DenseScorer:
    """Dot products between a query encoder's and a corpus encoder's embeddings.

    Corpus embeddings are cached by row ``id`` and query embeddings by text, so scoring the same rows
    or queries again (once per language and once pooled) encodes each of them once.

    Args:
        query_encoder: ``list[str] → (n, dim)`` array, e.g. ``query_tower.encode``.
        corpus_encoder: ``list[dict] → (n, dim)`` array, e.g. ``entity_tower.encode``.

    Example:
        ::

            scorer = DenseScorer(query_tower.encode, entity_tower.encode)
            scorer(["who wrote it?"], [{"id": "s1", "sentence": "Tolkien wrote it."}]).shape  # (1, 1)
    """

    def __init__(
        self,
        query_encoder: Callable[[list[str]], np.ndarray],
        corpus_encoder: Callable[[list[Row]], np.ndarray],
    ):
        self.query_encoder, self.corpus_encoder = query_encoder, corpus_encoder
        self._cache: dict[str, np.ndarray] = {}
        self._query_cache: dict[str, np.ndarray] = {}

    def __call__(self, queries: Sequence[str], rows: Sequence[Row]) -> np.ndarray:
        missing = list({row["id"]: row for row in rows if row["id"] not in self._cache}.values())
        if missing:
            embeddings = np.asarray(self.corpus_encoder(missing), dtype=np.float32)
            self._cache.update(zip((row["id"] for row in missing), embeddings, strict=True))
        corpus = np.stack([self._cache[row["id"]] for row in rows])  # (num_rows, dim)
        new = list(dict.fromkeys(q for q in queries if q not in self._query_cache))
        if new:
            self._query_cache.update(zip(new, np.asarray(self.query_encoder(new), dtype=np.float32), strict=True))
        return np.stack([self._query_cache[q] for q in queries]) @ corpus.T  # (num_queries, num_rows)


class BM25Scorer:
    """Okapi BM25 (the ``bm25s`` package, its default tokenizer and parameters) over one text per row.

    The index is built over exactly the rows being scored (so IDF and average length are those of that
    corpus, e.g. one language's sentences) and kept for the next call on the same rows.

    Args:
        text: ``row → str``, the document text of a corpus row.
        show_progress_bar: Show a bar while scoring queries.

    Example:
        ::

            scorer = BM25Scorer(lambda row: row["sentence"])
            scorer(["copper sink"], [{"id": "a", "sentence": "a copper sink"}, {"id": "b", "sentence": "a rug"}])
            # array([[0.59, 0.  ]], dtype=float32)
    """

    def __init__(self, text: Callable[[Row], str], *, show_progress_bar: bool = False):
        self.text, self.show_progress_bar = text, show_progress_bar
        self._ids: tuple[str, ...] | None = None
        self._index = None

    def __call__(self, queries: Sequence[str], rows: Sequence[Row]) -> np.ndarray:
        import bm25s  # an optional dependency of the baselines only

        ids = tuple(row["id"] for row in rows)
        if ids != self._ids:
            self._index = bm25s.BM25()
            self._index.index(
                bm25s.tokenize([self.text(row) for row in rows], show_progress=False), show_progress=False
            )
            self._ids = ids
        tokens = bm25s.tokenize(list(queries), return_ids=False, show_progress=False)
        bar = tqdm(tokens, desc="BM25", disable=not self.show_progress_bar)
        empty = np.zeros(len(rows), dtype=np.float32)  # a query of stopwords only matches nothing
        scores = [self._index.get_scores(query) if query else empty for query in bar]
        return np.stack(scores).astype(np.float32)  # (num_queries, num_rows)


__all__ = ["BM25Scorer", "DenseScorer", "Scorer"]
