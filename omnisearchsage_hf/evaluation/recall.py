"""Recall@K of (query, engaged entity) pairs against a sampled corpus, exactly and in bounded memory.

Paper §4.2: for each pair, the engaged entity is ranked by dot product against a corpus of m random
entities of the same type; Recall@10 is the fraction of pairs whose entity lands in the top 10. Only
the positive's rank matters, so nothing is sorted: for a chunk of pairs the scores against the whole
corpus are computed in one matmul and compared with the positive's score. That is exact, needs memory
for one ``(chunk, m)`` score block, and is much faster than a full ``argsort``.

Ties are broken against the positive (a corpus entity with the same score counts as ranked above it),
so a collapsed model that scores everything alike gets the worst rank, not the best.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch


def positive_ranks(
    query_embeddings: np.ndarray | torch.Tensor,
    positive_embeddings: np.ndarray | torch.Tensor,
    corpus_embeddings: np.ndarray | torch.Tensor,
    *,
    excluded: np.ndarray | None = None,
    chunk_size: int = 1024,
) -> np.ndarray:
    """0-based rank of each pair's positive among the corpus (0 = scored above every corpus entity).

    Args:
        query_embeddings: ``(num_pairs, dim)``, one row per pair (repeat a query for each of its pairs).
        positive_embeddings: ``(num_pairs, dim)``, the engaged entity of each pair.
        corpus_embeddings: ``(corpus_size, dim)``, the random entities the positive competes with.
        excluded: Optional ``(num_excluded, 2)`` int array of ``(pair index, corpus index)``: corpus entities
            that must not count against a pair (the positive itself, or another entity the query engaged
            with). Sparse, so a million-entity corpus needs no dense mask.
        chunk_size: Pairs scored per matmul; memory is ``chunk_size * corpus_size`` floats.

    Returns:
        ``(num_pairs,)`` int64 ranks.
    """
    queries, positives, corpus = (
        torch.as_tensor(x, dtype=torch.float32) for x in (query_embeddings, positive_embeddings, corpus_embeddings)
    )
    if queries.shape != positives.shape or queries.ndim != 2 or corpus.ndim != 2 or corpus.shape[1] != queries.shape[1]:
        raise ValueError(
            f"Expected queries and positives of equal shape (num_pairs, dim) and a corpus (corpus_size, dim); got "
            f"{tuple(queries.shape)}, {tuple(positives.shape)} and {tuple(corpus.shape)}."
        )
    excluded = np.zeros((0, 2), dtype=np.int64) if excluded is None else np.asarray(excluded, dtype=np.int64)
    if excluded.ndim != 2 or excluded.shape[1] != 2:
        raise ValueError(f"`excluded` must be an array of (pair index, corpus index) rows, got shape {excluded.shape}.")
    excluded = excluded[np.argsort(excluded[:, 0], kind="stable")]
    ranks = torch.empty(len(queries), dtype=torch.long)
    for start in range(0, len(queries), chunk_size):
        end = min(start + chunk_size, len(queries))
        scores = queries[start:end] @ corpus.T  # (chunk, corpus_size)
        positive_scores = (queries[start:end] * positives[start:end]).sum(-1, keepdim=True)  # (chunk, 1)
        above = scores >= positive_scores  # (chunk, corpus_size); ties count against the positive
        lo, hi = np.searchsorted(excluded[:, 0], [start, end])
        rows, cols = torch.from_numpy(excluded[lo:hi, 0] - start), torch.from_numpy(excluded[lo:hi, 1])
        above[rows, cols] = False
        ranks[start:end] = above.sum(-1)
    return ranks.numpy()


def ranks_from_scores(
    scores: np.ndarray | torch.Tensor, positives: np.ndarray, *, excluded: np.ndarray | None = None
) -> np.ndarray:
    """0-based rank of each query's positive column in a precomputed score matrix (ties count against it).

    The scorer-agnostic twin of ``positive_ranks`` for retrievers that are not a dot product (BM25) or
    for corpora small enough to score whole: a query's rank is the number of other, non-excluded columns
    scoring at least as high as its positive.

    Args:
        scores: ``(num_queries, corpus_size)``.
        positives: ``(num_queries,)`` column of each query's positive.
        excluded: Optional ``(num_excluded, 2)`` ``(query index, column)`` rows that do not count against
            the query (another answer it also engaged with).

    Returns:
        ``(num_queries,)`` int64 ranks.
    """
    scores = torch.as_tensor(scores, dtype=torch.float32)
    positives = torch.as_tensor(np.asarray(positives), dtype=torch.long)
    if scores.ndim != 2 or positives.shape != (len(scores),):
        raise ValueError(
            f"Expected scores (num_queries, corpus_size) and positives (num_queries,); got {tuple(scores.shape)} "
            f"and {tuple(positives.shape)}."
        )
    above = scores >= scores.gather(1, positives[:, None])  # (num_queries, corpus_size)
    above[torch.arange(len(scores)), positives] = False
    if excluded is not None and len(excluded):
        excluded = torch.as_tensor(np.asarray(excluded), dtype=torch.long)
        above[excluded[:, 0], excluded[:, 1]] = False
    return above.sum(-1).numpy()


def recall_metrics(ranks: np.ndarray, ks: Sequence[int] = (1, 10, 100), prefix: str = "") -> dict[str, float]:
    """``{prefix}recall@k`` for each k and ``{prefix}mrr`` from 0-based ranks."""
    ranks = np.asarray(ranks)
    if ranks.size == 0:
        raise ValueError("No ranks to score: the evaluation has no pairs.")
    metrics = {f"{prefix}recall@{k}": float(np.mean(ranks < k)) for k in ks}
    metrics[f"{prefix}mrr"] = float(np.mean(1.0 / (ranks + 1)))
    return metrics


class RecallEvaluator:
    """Recall@K and MRR of one task's held-out pairs, with a seeded random corpus of the same entity type.

    Args:
        pairs: ``(query, candidate_id)`` pairs; the candidate id must be a key of ``candidates``.
        candidates: ``candidate_id → candidate`` (an entity dict, a query string, …: whatever
            ``candidate_encoder`` takes), the pool the corpus is drawn from.
        corpus_size: m, the number of random candidates each positive competes with (all of the pool
            when it is smaller).
        ks: The K of each reported Recall@K.
        groups: Optional ``group name → indices of pairs`` (e.g. per language): metrics are also reported
            per group as ``{name}_{group}_recall@k``.
        name: Prefix of the metric keys.
        seed: Seed of the corpus sample.

    Example:
        ::

            evaluator = RecallEvaluator(pairs, pins, corpus_size=1000, name="query_pin")
            metrics = evaluator(query_tower.encode, entity_tower.encode)
            metrics["query_pin_recall@10"], evaluator.primary_metric
    """

    def __init__(
        self,
        pairs: Sequence[tuple[str, str]],
        candidates: Mapping[str, Any],
        *,
        corpus_size: int = 1000,
        ks: Sequence[int] = (1, 10, 100),
        groups: Mapping[str, Sequence[int]] | None = None,
        name: str = "",
        seed: int = 0,
    ):
        if not pairs:
            raise ValueError(f"RecallEvaluator {name!r} got no pairs.")
        missing = next((c for _, c in pairs if c not in candidates), None)
        if missing is not None:
            raise ValueError(f"Pair candidate {missing!r} is not among the {len(candidates)} candidates.")
        self.pairs, self.candidates, self.ks, self.name = list(pairs), candidates, tuple(ks), name
        self.groups = dict(groups or {})
        ids = sorted(candidates)
        rng = np.random.default_rng(seed)
        self.corpus_ids = [ids[i] for i in rng.choice(len(ids), size=min(corpus_size, len(ids)), replace=False)]
        engaged: dict[str, set[str]] = {}
        for query, candidate in self.pairs:
            engaged.setdefault(query, set()).add(candidate)
        # A corpus entity the query engaged with is not a negative for any of its pairs.
        corpus_position = {c: i for i, c in enumerate(self.corpus_ids)}
        self._excluded = np.array(
            [
                (p, corpus_position[c])
                for p, (q, _) in enumerate(self.pairs)
                for c in engaged[q]
                if c in corpus_position
            ],
            dtype=np.int64,
        ).reshape(-1, 2)
        self.primary_metric = f"{name + '_' if name else ''}recall@10"

    def __call__(
        self,
        query_encoder: Callable[[list[str]], np.ndarray],
        candidate_encoder: Callable[[list[Any]], np.ndarray],
    ) -> dict[str, float]:
        """Embed, rank and score; returns flat metrics (see the class docstring)."""
        queries = sorted({q for q, _ in self.pairs})
        query_index = {q: i for i, q in enumerate(queries)}
        positives = sorted({c for _, c in self.pairs})
        positive_index = {c: i for i, c in enumerate(positives)}
        query_emb = np.asarray(query_encoder(queries))
        positive_emb = np.asarray(candidate_encoder([self.candidates[c] for c in positives]))
        corpus_emb = np.asarray(candidate_encoder([self.candidates[c] for c in self.corpus_ids]))
        ranks = positive_ranks(
            query_emb[[query_index[q] for q, _ in self.pairs]],
            positive_emb[[positive_index[c] for _, c in self.pairs]],
            corpus_emb,
            excluded=self._excluded,
        )
        prefix = f"{self.name}_" if self.name else ""
        metrics = recall_metrics(ranks, self.ks, prefix)
        for group, indices in self.groups.items():
            metrics.update(recall_metrics(ranks[np.asarray(indices)], self.ks, f"{prefix}{group}_"))
        return metrics


__all__ = ["RecallEvaluator", "positive_ranks", "ranks_from_scores", "recall_metrics"]
