"""Real-data benchmarks: XQuAD-R question → sentence and ePQA question → product retrieval over a ``Scorer``.

``evaluate_xquad`` scores a ``Scorer`` on XQuAD-R the way the data README asks: per language over that
language's whole sentence pool, and pooled across all languages at once (LAReQA's cross-lingual
setting, counted by ``ranks_of_relevant``). ``evaluate_epqa`` scores question → product retrieval over
the whole ePQA catalogue. Both read the data with ``omnisearchsage_hf.data.xquad_r`` /
``omnisearchsage_hf.data.amazon_pqa``, built with the same options as for training, and rank with any
``Scorer`` (``DenseScorer`` for trained towers or zero-shot encoders, ``BM25Scorer`` for the lexical
baseline). ``rank_xquad`` / ``rank_epqa`` return the per-question ranks those figures average
(``QuestionRanks``), for confidence intervals of a difference between systems (``paired_bootstrap``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.amazon_pqa import load_epqa
from ..data.xquad_r import LANGUAGES, TEXT_FIELDS, Split, check_languages, load_xquad_r
from .recall import ranks_from_scores, recall_metrics
from .scoring import Scorer


def ranks_of_relevant(
    scores: np.ndarray | torch.Tensor,
    relevant: np.ndarray,
    *,
    ignored: Sequence[Sequence[int]] = (),
) -> np.ndarray:
    """0-based rank of each relevant corpus row in its query's ranking by ``scores``.

    Unlike ``ranks_from_scores`` (one positive per query, others ignored) a query's relevant rows compete
    with each other here, so ``rank < k`` says "in the top k". A tie with an irrelevant row counts
    against the relevant one; relevant rows that tie with each other take consecutive ranks in the order
    of ``relevant``, so a model that scores all of them alike still fills the top k with them.

    Args:
        scores: ``(num_queries, corpus_size)``.
        relevant: ``(num_queries, num_relevant)`` corpus indices.
        ignored: Per query, corpus indices ranked below everything (answers to an identical question text).

    Returns:
        ``(num_queries, num_relevant)`` int64 ranks.
    """
    scores = torch.as_tensor(scores, dtype=torch.float32).clone()
    relevant = torch.as_tensor(relevant, dtype=torch.long)
    for row, columns in enumerate(ignored):
        scores[row, list(columns)] = -torch.inf
    positions = torch.arange(relevant.shape[1])
    order = positions[None, :] < positions[:, None]  # (num_relevant, num_relevant): [i, j] = j comes before i
    relevant_scores = scores.gather(1, relevant)  # (num_queries, num_relevant)
    # Corpus rows scoring >= each relevant score, without sorting the corpus: bucket every score by how
    # many relevant scores it reaches, then count the buckets from the top.
    ascending, permutation = relevant_scores.sort(dim=1)  # (num_queries, num_relevant)
    buckets = torch.searchsorted(ascending, scores, right=True)  # (num_queries, corpus_size) in [0, num_relevant]
    histogram = torch.zeros(len(buckets), relevant.shape[1] + 1, dtype=torch.long)
    histogram.scatter_add_(1, buckets, torch.ones_like(buckets))  # (num_queries, num_relevant + 1)
    reached = histogram.flip(1).cumsum(1).flip(1)[:, 1:]  # (num_queries, num_relevant), in ascending order
    at_least = torch.empty_like(reached).scatter_(1, permutation, reached)  # (num_queries, num_relevant)
    # Among relevant rows, equal scores are ordered by position in `relevant`, not counted against.
    other, this = relevant_scores[:, None, :], relevant_scores[:, :, None]  # (num_queries, 1 | num_relevant, ...)
    relevant_at_least = (other >= this).sum(-1)  # (num_queries, num_relevant), itself included
    relevant_before = ((other > this) | ((other == this) & order)).sum(-1)  # (num_queries, num_relevant)
    ranks = at_least - relevant_at_least + relevant_before
    return ranks.numpy()


@dataclass(frozen=True)
class QuestionRanks:
    """Per-question ranks of one benchmark run: what its metrics average, kept for a paired bootstrap.

    ``rank_xquad`` / ``rank_epqa`` return it and ``xquad_metrics`` / ``recall_metrics`` reduce it, so a
    benchmark scores each system once and gets both its figures and the per-question values (reciprocal
    ranks ``1 / (rank + 1)``, hits ``rank < k``) that ``paired_bootstrap`` compares between systems.

    Attributes:
        question_ids: language → ids of the queried questions, in the order of ``ranks[language]`` (the data
            files' order; XQuAD-R's questions are parallel, so the same ids in every language).
        ranks: language → ``(num_questions,)`` int64 0-based rank of each question's one relevant row.
        pooled: language → ``(num_questions, num_languages)`` int64 ranks of the question's gold sentence in
            each language (columns in the order of ``ranks``) in the pooled index; empty when not evaluated.
    """

    question_ids: dict[str, list[str]]
    ranks: dict[str, np.ndarray]
    pooled: dict[str, np.ndarray] = field(default_factory=dict)


def evaluate_xquad(
    scorer: Scorer,
    root: str | Path,
    *,
    languages: Sequence[str] = LANGUAGES,
    split: Split = "test",
    ks: Sequence[int] = (1, 10, 100),
    pooled_k: int | None = 10,
    name: str = "xquad_r",
) -> dict[str, float]:
    """Recall@K and MRR of question → answer sentence retrieval, per language and pooled across languages.

    Per language: the queries are that language's questions of ``split`` articles; the pool is all of
    that language's sentences (train and test articles alike, ~1,200; 852 in Thai); a query's one
    relevant sentence is its gold sentence. Pooled (LAReQA's cross-lingual setting): every language's
    sentences in one index; a question's relevant sentences are its gold sentence in each of the
    languages, and the metric is the fraction of them in its top ``pooled_k``, averaged over the
    questions of each query language. With 11 relevant sentences and ``pooled_k=10`` a perfect model
    scores 10/11. Answers of a different question with the identical text (a few per language) are
    removed from that query's ranking instead of counting as misses. Ties count against the answer.
    ``rank_xquad`` followed by ``xquad_metrics``; call those two to also keep the per-question ranks.

    Args:
        scorer: ``(question texts, sentence rows) → scores``; sentence rows hold ``id`` and the
            ``TEXT_FIELDS`` (``sentence``, ``context``, ``title``). ``DenseScorer(query_tower.encode,
            entity_tower.encode)`` for embeddings, ``BM25Scorer`` for the lexical baseline.
        root: Folder of the real data sets (holds ``xquad_r/``).
        languages: Languages evaluated and pooled.
        split: Articles whose questions are the queries.
        ks: The K of each per-language Recall@K.
        pooled_k: The K of the pooled figure; None skips the pooled evaluation.
        name: Prefix of the metric keys.

    Returns:
        ``{name}_{lang}_recall@{k}`` and ``{name}_{lang}_mrr`` per language, their means over languages
        ``{name}_recall@{k}`` / ``{name}_mrr``, and ``{name}_pooled_{lang}_recall@{pooled_k}`` per query
        language with their mean ``{name}_pooled_recall@{pooled_k}``.

    Example:
        ::

            metrics = evaluate_xquad(DenseScorer(query_tower.encode, entity_tower.encode), "../shared/data")
            metrics["xquad_r_en_recall@10"], metrics["xquad_r_pooled_recall@10"]
    """
    ranks = rank_xquad(scorer, root, languages=languages, split=split, pooled=pooled_k is not None)
    return xquad_metrics(ranks, ks=ks, pooled_k=pooled_k, name=name)


def rank_xquad(
    scorer: Scorer,
    root: str | Path,
    *,
    languages: Sequence[str] = LANGUAGES,
    split: Split = "test",
    pooled: bool = True,
) -> QuestionRanks:
    """The per-question ranks behind ``evaluate_xquad`` (same queries, pools and tie rules; see there).

    Args:
        scorer, root, languages, split: As in ``evaluate_xquad``.
        pooled: Also rank every question against the pooled index of all ``languages``.

    Example:
        ::

            ranks = rank_xquad(scorer, "../shared/data")
            metrics = xquad_metrics(ranks)  # == evaluate_xquad(scorer, "../shared/data")
            reciprocal = {language: 1.0 / (r + 1) for language, r in ranks.ranks.items()}  # per-question MRR terms
    """
    if split not in ("train", "dev", "test"):
        raise ValueError(f"`split` must be 'train', 'dev' or 'test', got {split!r}.")
    languages = check_languages(languages)
    # Dev questions exist only when the train articles are split (``load_xquad_r(dev_split=True)``).
    data = load_xquad_r(root, languages=languages, dev_split=split == "dev")
    rows = [{k: row[k] for k in ("id", *TEXT_FIELDS)} for row in data.sentences]  # grouped by language
    position = {row["id"]: i for i, row in enumerate(rows)}  # index in the pooled corpus
    bounds: dict[str, list[int]] = {}  # language → [start, end) of its sentences in `rows`
    for i, row in enumerate(data.sentences):
        bounds.setdefault(row["language"], [i, i])[1] = i + 1
    golds: dict[str, dict[str, int]] = {}  # question id → language → gold position
    same_text: dict[tuple[str, str], set[str]] = {}  # (language, text) → question ids
    for q in data.questions:
        golds.setdefault(q["id"], {})[q["language"]] = position[q["gold_id"]]
        same_text.setdefault((q["language"], q["question"]), set()).add(q["id"])

    result = QuestionRanks({}, {}, {})
    for language, questions in zip(languages, _by_language(data.questions, languages), strict=True):
        questions = [q for q in questions if q["split"] == split]
        if not questions:
            raise ValueError(f"No {split} questions in language {language!r}.")
        texts = [q["question"] for q in questions]
        start, end = bounds[language]
        pool = rows[start:end]
        gold = np.array([golds[q["id"]][language] - start for q in questions])  # (n,) positions in the pool
        twins = [same_text[(language, q["question"])] for q in questions]
        # The golds of identically worded questions are not negatives.
        excluded = np.array([(i, golds[t][language] - start) for i, ids in enumerate(twins) for t in ids])
        result.question_ids[language] = [q["id"] for q in questions]
        result.ranks[language] = ranks_from_scores(scorer(texts, pool), gold, excluded=excluded.reshape(-1, 2))
        if not pooled:
            continue
        relevant = np.array([[golds[q["id"]][other] for other in languages] for q in questions])
        ignored = [
            sorted({golds[t][other] for t in ids for other in languages} - set(row))
            for ids, row in zip(twins, relevant.tolist(), strict=True)
        ]
        result.pooled[language] = ranks_of_relevant(scorer(texts, rows), relevant, ignored=ignored)  # (n, num_lang)
    return result


def xquad_metrics(
    ranks: QuestionRanks, *, ks: Sequence[int] = (1, 10, 100), pooled_k: int | None = 10, name: str = "xquad_r"
) -> dict[str, float]:
    """``evaluate_xquad``'s metrics from ``rank_xquad``'s ranks (keys as documented there).

    Args:
        ranks: Per-question ranks; its languages, in order, are the ones reported and averaged.
        ks: The K of each per-language Recall@K.
        pooled_k: The K of the pooled figure; None leaves it out.
        name: Prefix of the metric keys.
    """
    if pooled_k is not None and set(ranks.pooled) != set(ranks.ranks):
        raise ValueError(
            f"`pooled_k={pooled_k}` needs pooled ranks for every language {sorted(ranks.ranks)}, got "
            f"{sorted(ranks.pooled)}: rank with `rank_xquad(..., pooled=True)` or pass `pooled_k=None`."
        )
    prefix = f"{name}_" if name else ""
    languages = list(ranks.ranks)
    metrics: dict[str, float] = {}
    for language in languages:
        metrics.update(recall_metrics(ranks.ranks[language], ks, f"{prefix}{language}_"))
        if pooled_k is not None:
            metrics[f"{prefix}pooled_{language}_recall@{pooled_k}"] = float((ranks.pooled[language] < pooled_k).mean())
    for key in [f"recall@{k}" for k in ks] + ["mrr"]:
        metrics[f"{prefix}{key}"] = float(np.mean([metrics[f"{prefix}{lang}_{key}"] for lang in languages]))
    if pooled_k is not None:
        metrics[f"{prefix}pooled_recall@{pooled_k}"] = float(
            np.mean([metrics[f"{prefix}pooled_{lang}_recall@{pooled_k}"] for lang in languages])
        )
    return metrics


def _by_language(rows: Sequence[Mapping[str, Any]], languages: Sequence[str]) -> list[list[Mapping[str, Any]]]:
    """Rows grouped by their ``language``, in the order of ``languages``."""
    groups: dict[str, list[Mapping[str, Any]]] = {language: [] for language in languages}
    for row in rows:
        groups[row["language"]].append(row)
    return [groups[language] for language in languages]


def evaluate_epqa(
    scorer: Scorer,
    root: str | Path,
    *,
    engaged_queries: bool = True,
    test_question_snippets: bool = False,
    dev_split: bool = False,
    split: Split = "test",
    ks: Sequence[int] = (1, 10, 100),
    name: str = "epqa",
) -> dict[str, float]:
    """Recall@K and MRR of question → product retrieval over the whole 888-product catalogue.

    Each question of ``split`` is ranked against every product by ``scorer``; its one relevant product
    is its ASIN (ties count against it). Products are built as for training, with the same options, so
    pass those the towers were trained with. With ``split="train"`` a product's engaged queries contain
    the query itself, which makes the figure an optimistic sanity check only.
    ``rank_epqa`` followed by ``recall_metrics``; call those two to also keep the per-question ranks.

    Args:
        scorer: ``(question texts, product rows) → scores``; product rows hold ``id`` and the text fields
            (``engaged_queries`` only when enabled; None values left out). ``DenseScorer(query_tower.encode,
            entity_tower.encode)`` for embeddings, ``BM25Scorer`` for the lexical baseline.
        root: Folder of the real data sets (holds ``amazon_pqa/``).
        engaged_queries, test_question_snippets, dev_split: As in ``load_epqa``; they shape the catalogue
            (leak-free by default: no snippet chosen only for held-out questions), so pass the values the
            towers were trained with. ``dev_split`` is needed for ``split="dev"``.
        split: The questions used as queries.
        ks: The K of each Recall@K.
        name: Prefix of the metric keys.

    Returns:
        ``{name}_recall@{k}`` for each k and ``{name}_mrr``.

    Example:
        ::

            evaluate_epqa(DenseScorer(query_tower.encode, entity_tower.encode), "../shared/data")["epqa_recall@10"]
    """
    ranks = rank_epqa(
        scorer,
        root,
        engaged_queries=engaged_queries,
        test_question_snippets=test_question_snippets,
        dev_split=dev_split,
        split=split,
    )
    return recall_metrics(ranks.ranks["en"], ks, f"{name}_" if name else "")


def rank_epqa(
    scorer: Scorer,
    root: str | Path,
    *,
    engaged_queries: bool = True,
    test_question_snippets: bool = False,
    dev_split: bool = False,
    split: Split = "test",
) -> QuestionRanks:
    """The per-question ranks behind ``evaluate_epqa``, under the one language ``"en"`` (ePQA is English).

    Args:
        scorer, root, engaged_queries, test_question_snippets, dev_split, split: As in ``evaluate_epqa``.

    Example:
        ::

            ranks = rank_epqa(scorer, "../shared/data").ranks["en"]  # (num_questions,), ids in .question_ids["en"]
            recall_metrics(ranks, prefix="epqa_")  # == evaluate_epqa(scorer, "../shared/data")
    """
    if split not in ("train", "dev", "test"):
        raise ValueError(f"`split` must be 'train', 'dev' or 'test', got {split!r}.")
    if split == "dev" and not dev_split:
        raise ValueError("`split='dev'` needs `dev_split=True` (the dev questions are carved out of train).")
    data = load_epqa(
        root, engaged_queries=engaged_queries, test_question_snippets=test_question_snippets, dev_split=dev_split
    )
    products = [{key: value for key, value in product.items() if value is not None} for product in data.products]
    questions = [q for q in data.questions if q["split"] == split]
    row_of = {product["id"]: i for i, product in enumerate(data.products)}
    gold = np.array([row_of[q["asin"]] for q in questions])  # (num_questions,)
    ranks = ranks_from_scores(scorer([q["question"] for q in questions], products), gold)
    return QuestionRanks({"en": [q["qid"] for q in questions]}, {"en": ranks})


__all__ = [
    "QuestionRanks",
    "evaluate_epqa",
    "evaluate_xquad",
    "rank_epqa",
    "rank_xquad",
    "ranks_of_relevant",
    "xquad_metrics",
]
