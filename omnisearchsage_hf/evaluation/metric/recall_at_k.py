"""Recall@K and MRR as an ``evaluate`` metric, from ranked id lists or from embeddings.

Self-contained on purpose: ``evaluate.load`` copies this file into its module cache and imports it
from there, so it may only import numpy, datasets and evaluate. The embedding-mode ranks mirror
``omnisearchsage_hf.evaluation.recall.positive_ranks`` (ties count against the positive).
"""

from __future__ import annotations

from collections.abc import Sequence

import datasets
import evaluate
import numpy as np

_CITATION = """\
@inproceedings{agarwal2024omnisearchsage,
  title={OmniSearchSage: Multi-Task Multi-Entity Embeddings for Pinterest Search},
  author={Prabhat Agarwal and Minhazul Islam Sk and Nikil Pancha and Kurchi Subhra Hazra
              and Jiajing Xu and Chuck Rosenberg},
  booktitle={Companion Proceedings of the ACM Web Conference 2024},
  year={2024},
  eprint={2404.16260},
  archivePrefix={arXiv},
  url={https://arxiv.org/abs/2404.16260}
}
"""

_DESCRIPTION = """\
Recall@K: the fraction of relevant items ranked in the top K, averaged over queries, and MRR: the mean
reciprocal rank of the first relevant item (0 when none is ranked). Either score ranked candidate-id
lists, or rank each positive by dot product against a corpus of embeddings (OmniSearchSage §4.2).
"""

_KWARGS_DESCRIPTION = """\
Args:
    predictions (`list[list[str | int]]`): Ranked candidate ids per query, best first (id mode).
    references (`list[str | int]` or `list[list[str | int]]`): The relevant id, or list of relevant ids,
        of each query (id mode). With several ids, a query's recall@k is the fraction of them in its top k.
    query_embeddings (`array (num_pairs, dim)`): One row per (query, positive) pair (embedding mode).
    positive_embeddings (`array (num_pairs, dim)`): The positive of each pair (embedding mode).
    corpus_embeddings (`array (corpus_size, dim)`): The entities each positive competes with; one scoring
        the same as the positive counts as ranked above it (embedding mode).
    ks (`list[int]`, defaults to `[1, 10, 100]`): The K of each reported recall@K.
Returns:
    `recall@{k}` for each k and `mrr`, floats in [0, 1].
Example:
    >>> recall = evaluate.load(RECALL_AT_K_PATH)
    >>> recall.compute(predictions=[["a", "b"], ["c", "d"]], references=["b", "x"], ks=[1, 2])
    {'recall@1': 0.0, 'recall@2': 0.5, 'mrr': 0.25}
"""

_EMBEDDINGS = ("query_embeddings", "positive_embeddings", "corpus_embeddings")


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class RecallAtK(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        features = [
            datasets.Features({"predictions": datasets.Sequence(datasets.Value(t)), "references": reference})
            for t in ("string", "int64")
            for reference in (datasets.Sequence(datasets.Value(t)), datasets.Value(t))
        ]
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=features,
            reference_urls=["https://arxiv.org/abs/2404.16260"],
        )

    def compute(self, *, predictions=None, references=None, **kwargs) -> dict[str, float] | None:
        """Validate, then score ids through ``evaluate``'s buffer, or embeddings directly (see the module docs)."""
        ks = kwargs.get("ks", (1, 10, 100))
        if not ks or any(isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1 for k in ks):
            raise ValueError(f"`ks` must be a non-empty list of positive ints, got {ks!r}.")
        embeddings = [name for name in _EMBEDDINGS if kwargs.get(name) is not None]
        if embeddings and (predictions is not None or references is not None):
            raise ValueError("Pass either `predictions`/`references` or the three embedding arrays, not both.")
        if embeddings:
            if len(embeddings) != 3:
                missing = [name for name in _EMBEDDINGS if name not in embeddings]
                raise ValueError(f"Embedding mode needs all of {list(_EMBEDDINGS)}; missing {missing}.")
            # Dense arrays (and a corpus of another length) do not fit the per-example Arrow buffer.
            return self._compute(**kwargs)
        if predictions is not None or references is not None:
            if predictions is None or references is None or len(predictions) != len(references):
                lengths = tuple(None if x is None else len(x) for x in (predictions, references))
                raise ValueError(f"`predictions` and `references` need one entry per query; got lengths {lengths}.")
            if len(predictions) == 0:
                raise ValueError("No queries to score: `predictions` and `references` are empty.")
        return super().compute(predictions=predictions, references=references, **kwargs)

    def _compute(
        self,
        predictions=None,
        references=None,
        ks: Sequence[int] = (1, 10, 100),
        query_embeddings=None,
        positive_embeddings=None,
        corpus_embeddings=None,
    ) -> dict[str, float]:
        if query_embeddings is not None:
            ranks = [[r] for r in _positive_ranks(query_embeddings, positive_embeddings, corpus_embeddings)]
        else:
            ranks = [_id_ranks(p, r) for p, r in zip(predictions, references, strict=True)]
        metrics = {f"recall@{k}": float(np.mean([np.mean(np.asarray(r) < k) for r in ranks])) for k in ks}
        metrics["mrr"] = float(np.mean([1.0 / (min(r) + 1) for r in ranks]))
        return metrics


def _id_ranks(ranked_ids: Sequence, relevant) -> list[float]:
    """0-based position of each relevant id in ``ranked_ids`` (``inf`` when absent)."""
    relevant = list(relevant) if isinstance(relevant, (list, tuple, np.ndarray)) else [relevant]
    if not relevant:
        raise ValueError(f"A query has no relevant ids (ranked ids {list(ranked_ids)[:5]!r}...).")
    position = {}
    for i, candidate in enumerate(ranked_ids):
        position.setdefault(candidate, i)
    return [float(position.get(r, np.inf)) for r in relevant]


def _positive_ranks(queries, positives, corpus, chunk_size: int = 1024) -> np.ndarray:
    """0-based rank of each positive among ``corpus`` by dot product; ties count against the positive."""
    queries, positives, corpus = (np.asarray(x, dtype=np.float32) for x in (queries, positives, corpus))
    if queries.shape != positives.shape or queries.ndim != 2 or corpus.ndim != 2 or corpus.shape[1] != queries.shape[1]:
        raise ValueError(
            "Expected query and positive embeddings of equal shape (num_pairs, dim) and corpus embeddings "
            f"(corpus_size, dim); got {queries.shape}, {positives.shape} and {corpus.shape}."
        )
    if len(queries) == 0:
        raise ValueError("No pairs to score: `query_embeddings` is empty.")
    ranks = np.empty(len(queries), dtype=np.int64)
    for start in range(0, len(queries), chunk_size):
        chunk = slice(start, start + chunk_size)
        scores = queries[chunk] @ corpus.T  # (chunk, corpus_size)
        positive_scores = (queries[chunk] * positives[chunk]).sum(-1, keepdims=True)  # (chunk, 1)
        ranks[chunk] = (scores >= positive_scores).sum(-1)
    return ranks
