"""XQuAD-R as a training source and benchmark: questions → answer sentences in 11 parallel languages.

XQuAD-R (Roy et al. 2020) is XQuAD re-cut for retrieval: 48 Wikipedia articles translated into 11
languages, each paragraph split into sentences, each question answered by one sentence. It maps onto
OmniSearchSage like this: queries are questions; entities are sentences, enriched with their paragraph
(``context``) and article ``title`` as the paper enriches pins with board titles; and the same question
in two languages is a query→query pair. Articles with index ``% 3 == 2`` (16 of 48) are held out, so no
test sentence, paragraph or question is seen in training; the translations of a train question are
train data too.

``build_xquad_r_tables`` returns the tables (``sources.prepare_source`` writes them under
``<output_dir>/data``); ``evaluate_xquad`` scores trained towers the way the data README asks: per
language over that language's whole sentence pool, and pooled across all languages at once.

References:
    - Roy et al. 2020, LAReQA: Language-agnostic answer retrieval from a multilingual pool:
      https://arxiv.org/abs/2004.05484
    - Data: github.com/google-research-datasets/lareqa (``xquad-r/``), CC BY-SA 4.0.
"""

from __future__ import annotations

import bisect
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import torch

from ..evaluation import ranks_from_scores, recall_metrics
from ..evaluation.baselines import passage_embeddings
from ..evaluation.scoring import Scorer

LANGUAGES = ("ar", "de", "el", "en", "es", "hi", "ru", "th", "tr", "vi", "zh")
TEXT_FIELDS = ("sentence", "context", "title")
Split = Literal["train", "test"]


def article_split(article_index: int) -> Split:
    """``"test"`` for every third article (0-based index ``% 3 == 2``: 16 of 48), else ``"train"``."""
    return "test" if article_index % 3 == 2 else "train"


def gold_sentence_index(sentence_breaks: Sequence[Sequence[int]], answer_start: int) -> int:
    """Index of the sentence holding character ``answer_start`` of the paragraph.

    ``sentence_breaks`` are the ``[start, end)`` spans of the sentences in the context. An answer that
    starts in a gap between two spans (the space after a full stop) belongs to the sentence that starts
    before it; one before the first span to the first sentence.

    Example:
        ::

            gold_sentence_index([[0, 165], [166, 288]], 170)  # 1
            gold_sentence_index([[0, 165], [166, 288]], 165)  # 0
    """
    starts = [start for start, _ in sentence_breaks]
    return max(bisect.bisect_right(starts, answer_start) - 1, 0)


@dataclass
class XQuADR:
    """XQuAD-R read into rows.

    Attributes:
        sentences: Entity rows: ``id`` (``"{lang}/{article}/{paragraph}/{sentence}"``), the text fields
            ``sentence``, ``context``, ``title``, and the metadata ``language`` and ``split``.
        questions: ``id`` (shared by the translations of a question), ``question``, ``language``,
            ``split`` and ``gold_id`` (the id of the sentence holding the answer).
    """

    sentences: list[dict[str, Any]]
    questions: list[dict[str, Any]]


def check_languages(languages: Sequence[str]) -> list[str]:
    """The distinct ``languages`` in canonical order; raises on an unknown one or an empty list."""
    unknown = sorted(set(languages) - set(LANGUAGES))
    if unknown or not languages or isinstance(languages, str):
        raise ValueError(f"`languages` must be a non-empty list drawn from {list(LANGUAGES)}, got {languages!r}.")
    return [language for language in LANGUAGES if language in languages]


def load_xquad_r(root: str | Path, *, languages: Sequence[str] = LANGUAGES) -> XQuADR:
    """Read ``<root>/xquad_r/xquad-r/{lang}.json`` (SQuAD format) into sentence and question rows.

    Entity text is the ``sentences`` list of the file; ``sentence_breaks`` only locate the answers
    (they index the ``context``, which in a few paragraphs carries mojibake the sentences do not).
    """
    sentences: list[dict[str, Any]] = []
    questions: list[dict[str, Any]] = []
    for language in check_languages(languages):
        path = Path(root) / "xquad_r" / "xquad-r" / f"{language}.json"
        if not path.is_file():
            raise FileNotFoundError(f"XQuAD-R file {str(path)!r} is missing; `root` should hold `xquad_r/xquad-r/`.")
        with open(path, encoding="utf-8") as handle:
            articles = json.load(handle)["data"]
        for a, article in enumerate(articles):
            split, title = article_split(a), article["title"].replace("_", " ")
            for p, paragraph in enumerate(article["paragraphs"]):
                prefix = f"{language}/{a}/{p}"
                for s, sentence in enumerate(paragraph["sentences"]):
                    sentences.append(
                        {
                            "id": f"{prefix}/{s}",
                            "sentence": sentence,
                            "context": paragraph["context"],
                            "title": title,
                            "language": language,
                            "split": split,
                        }
                    )
                for qa in paragraph["qas"]:
                    gold = gold_sentence_index(paragraph["sentence_breaks"], qa["answers"][0]["answer_start"])
                    questions.append(
                        {
                            "id": qa["id"],
                            "question": qa["question"],
                            "language": language,
                            "split": split,
                            "gold_id": f"{prefix}/{gold}",
                        }
                    )
    return XQuADR(sentences, questions)


def translation_pairs(
    questions: Sequence[Mapping[str, Any]], *, per_question: int = 2, seed: int = 0
) -> list[dict[str, str]]:
    """Query→query pairs: each question in language a → the same question in ``per_question`` other languages.

    The other languages are drawn without replacement from a ``numpy`` generator seeded with ``seed``,
    afresh for every (question, language a), in the order of ``questions``.

    Returns:
        Rows with ``query`` (text in a), ``candidate_id`` (text in b: query→query candidates are texts),
        ``language`` (a), ``candidate_language`` (b) and ``question_id``.
    """
    text: dict[str, dict[str, str]] = {}  # question id → language → text
    for question in questions:
        text.setdefault(question["id"], {})[question["language"]] = question["question"]
    rng = np.random.default_rng(seed)
    rows = []
    for question_id, by_language in text.items():
        languages = sorted(by_language)
        for language in languages:
            others = [other for other in languages if other != language]
            for other in rng.choice(others, size=min(per_question, len(others)), replace=False):
                rows.append(
                    {
                        "query": by_language[language],
                        "candidate_id": by_language[other],
                        "language": language,
                        "candidate_language": str(other),
                        "question_id": question_id,
                    }
                )
    return rows


def build_xquad_r_tables(
    root: str | Path,
    *,
    languages: Sequence[str] = LANGUAGES,
    seed: int = 0,
    translations_per_question: int = 2,
    compat_encoder: str | None = None,
    compat_feature: str = "e5_embedding",
    compat_batch_size: int = 64,
    compat_max_length: int = 128,
    context_feature: str | None = None,
    context_max_length: int = 256,
    cache_dir: str | Path | None = None,
    show_progress_bar: bool = True,
) -> dict[str, pa.Table]:
    """The entity table and pair files of the ``xquad_r`` source (``data.options`` are these keywords).

    Args:
        root: Folder of the real data sets (holds ``xquad_r/``).
        languages: Languages to include (default all 11).
        seed: Seed of the translation-pair languages.
        translations_per_question: Other languages b drawn per question and language a.
        compat_encoder: Local encoder folder for the pre-existing ``compat_feature`` column, or None for no
            such column: the zero-shot multilingual-e5-small passage embedding, as a legacy space.
        compat_feature: Name of that column.
        compat_batch_size, compat_max_length: Encoding batch size and token limit.
        context_feature: Name of a further column holding the same encoder's passage embedding of each
            sentence's paragraph (``context``, up to ``context_max_length`` tokens), or None for none: the
            pre-existing embedding of the entity's enriched text, next to that of its own text.
        cache_dir: Where the compat embeddings are cached (see ``passage_embeddings``).
        show_progress_bar: Show the encoding progress bar.

    Returns:
        ``sentences.parquet`` (``id``, ``sentence``, ``context``, ``title``, ``language``, ``split`` [, the
        compat column]); ``pairs/query_sentence_{train,test}.parquet`` (``query``, ``candidate_id``,
        ``language``, ``question_id``); ``pairs/query_query_train.parquet`` (see ``translation_pairs``).

    Example:
        ::

            tables = build_xquad_r_tables("../shared/data")
            {name: table.num_rows for name, table in tables.items()}
            # {'sentences.parquet': 13014, 'pairs/query_sentence_train.parquet': 8976,
            #  'pairs/query_sentence_test.parquet': 4114, 'pairs/query_query_train.parquet': 17952}
    """
    data = load_xquad_r(root, languages=languages)
    sentences = pa.Table.from_pylist(data.sentences)
    if compat_encoder is not None:
        embeddings = passage_embeddings(
            [row["sentence"] for row in data.sentences],
            compat_encoder,
            max_length=compat_max_length,
            batch_size=compat_batch_size,
            cache_dir=cache_dir,
            show_progress_bar=show_progress_bar,
        )
        column = pa.array(list(embeddings), type=pa.list_(pa.float32()))
        sentences = sentences.append_column(compat_feature, column)
    if context_feature is not None:
        if compat_encoder is None:
            raise ValueError("`context_feature` needs `compat_encoder`, the encoder that embeds the paragraphs.")
        contexts = sorted({row["context"] for row in data.sentences})
        embeddings = passage_embeddings(
            contexts,
            compat_encoder,
            max_length=context_max_length,
            batch_size=compat_batch_size,
            cache_dir=cache_dir,
            show_progress_bar=show_progress_bar,
        )
        row_of = {context: i for i, context in enumerate(contexts)}
        embeddings = embeddings[[row_of[row["context"]] for row in data.sentences]]  # (num_sentences, dim)
        sentences = sentences.append_column(context_feature, pa.array(list(embeddings), type=pa.list_(pa.float32())))
    tables = {"sentences.parquet": sentences}
    for split in ("train", "test"):
        tables[f"pairs/query_sentence_{split}.parquet"] = pa.Table.from_pylist(
            [
                {
                    "query": q["question"],
                    "candidate_id": q["gold_id"],
                    "language": q["language"],
                    "question_id": q["id"],
                }
                for q in data.questions
                if q["split"] == split
            ]
        )
    train = [q for q in data.questions if q["split"] == "train"]
    pairs = translation_pairs(train, per_question=translations_per_question, seed=seed)
    columns = ("query", "candidate_id", "language", "candidate_language", "question_id")
    schema = pa.schema([(column, pa.string()) for column in columns])  # typed even when empty (one language)
    tables["pairs/query_query_train.parquet"] = pa.Table.from_pylist(pairs, schema=schema)
    return tables


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
    if split not in ("train", "test"):
        raise ValueError(f"`split` must be 'train' or 'test', got {split!r}.")
    languages = check_languages(languages)
    data = load_xquad_r(root, languages=languages)
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

    prefix = f"{name}_" if name else ""
    metrics: dict[str, float] = {}
    for language, questions in zip(languages, _by_language(data.questions, languages)):
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
        ranks = ranks_from_scores(scorer(texts, pool), gold, excluded=excluded.reshape(-1, 2))
        metrics.update(recall_metrics(ranks, ks, f"{prefix}{language}_"))
        if pooled_k is None:
            continue
        relevant = np.array([[golds[q["id"]][other] for other in languages] for q in questions])
        ignored = [
            sorted({golds[t][other] for t in ids for other in languages} - set(row))
            for ids, row in zip(twins, relevant.tolist())
        ]
        pooled = ranks_of_relevant(scorer(texts, rows), relevant, ignored=ignored)  # (n, num_languages)
        metrics[f"{prefix}pooled_{language}_recall@{pooled_k}"] = float((pooled < pooled_k).mean())
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


__all__ = [
    "LANGUAGES",
    "TEXT_FIELDS",
    "XQuADR",
    "article_split",
    "build_xquad_r_tables",
    "evaluate_xquad",
    "gold_sentence_index",
    "load_xquad_r",
    "ranks_of_relevant",
    "translation_pairs",
]
