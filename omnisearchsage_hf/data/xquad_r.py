"""XQuAD-R read into rows and tables: questions → answer sentences in 11 parallel languages.

XQuAD-R (Roy et al. 2020) is XQuAD re-cut for retrieval: 48 Wikipedia articles translated into 11
languages, each paragraph split into sentences, each question answered by one sentence. It maps onto
OmniSearchSage like this: queries are questions; entities are sentences, enriched with their paragraph
(``context``) and article ``title`` as the paper enriches pins with board titles; and the same question
in two languages is a query→query pair. Articles with index ``% 3 == 2`` (16 of 48) are held out, so no
test sentence, paragraph or question is seen in training; the translations of a train question are
train data too. For model selection without the test set, ``dev_split=True`` also holds out every fifth
train article as ``"dev"`` (6 of the 32; 155 of the 816 train questions per language), leaving the test
articles as they are, so test figures stay comparable with runs made without it.

``load_xquad_r`` reads the files into rows; ``build_xquad_r_tables`` returns the tables of the training
source (``training.sources.prepare_source`` writes them under ``<output_dir>/data``). The benchmark that
scores trained towers on them is ``omnisearchsage_hf.evaluation.benchmarks.evaluate_xquad``.

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

from .encoders import passage_embeddings

LANGUAGES = ("ar", "de", "el", "en", "es", "hi", "ru", "th", "tr", "vi", "zh")
TEXT_FIELDS = ("sentence", "context", "title")
Split = Literal["train", "dev", "test"]
DEV_EVERY = 5  # with the dev split on, every fifth train article is dev


def article_split(article_index: int, *, dev_split: bool = False) -> Split:
    """The split of the 0-based ``article_index``-th article.

    ``"test"`` for every third article (index ``% 3 == 2``: 16 of 48), else ``"train"``; with
    ``dev_split``, every fifth train article in file order (indices 6, 13, 21, 28, 36 and 43) is
    ``"dev"`` instead. Dev is carved from the train articles only, so the test articles never
    change.
    """
    if article_index % 3 == 2:
        return "test"
    train_before = article_index - article_index // 3  # train articles with a smaller index
    return "dev" if dev_split and train_before % DEV_EVERY == DEV_EVERY - 1 else "train"


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
            ``sentence``, ``context``, ``title``, and the metadata ``language``, ``split`` and ``paragraph``
            (``"{lang}/{article}/{paragraph}"``: a group whose other sentences make hard negatives).
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


def load_xquad_r(root: str | Path, *, languages: Sequence[str] = LANGUAGES, dev_split: bool = False) -> XQuADR:
    """Read ``<root>/xquad_r/xquad-r/{lang}.json`` (SQuAD format) into sentence and question rows.

    Entity text is the ``sentences`` list of the file; ``sentence_breaks`` only locate the answers
    (they index the ``context``, which in a few paragraphs carries mojibake the sentences do not).
    With ``dev_split`` the rows of the dev articles (see ``article_split``) have ``split == "dev"``.
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
            split, title = article_split(a, dev_split=dev_split), article["title"].replace("_", " ")
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
                            "paragraph": prefix,
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


def paired_languages(
    questions: Sequence[Mapping[str, Any]], candidate_field: str, *, per_question: int, seed: int
) -> list[dict[str, str]]:
    """Rows pairing each question in language a with field ``candidate_field`` of the same question in language b.

    The ``per_question`` languages b (other than a) are drawn without replacement from a ``numpy`` generator
    seeded with ``seed``, afresh for every (question, language a), in the order of ``questions``; so two pair
    sets built with the same seed pair the same languages.

    Returns:
        Rows with ``query`` (text in a), ``candidate_id`` (``candidate_field`` in b), ``language`` (a),
        ``candidate_language`` (b) and ``question_id``.
    """
    by_question: dict[str, dict[str, Mapping[str, Any]]] = {}  # question id → language → question row
    for question in questions:
        by_question.setdefault(question["id"], {})[question["language"]] = question
    rng = np.random.default_rng(seed)
    rows = []
    for question_id, by_language in by_question.items():
        languages = sorted(by_language)
        for language in languages:
            others = [other for other in languages if other != language]
            for other in rng.choice(others, size=min(per_question, len(others)), replace=False):
                rows.append(
                    {
                        "query": by_language[language]["question"],
                        "candidate_id": by_language[str(other)][candidate_field],
                        "language": language,
                        "candidate_language": str(other),
                        "question_id": question_id,
                    }
                )
    return rows


def translation_pairs(
    questions: Sequence[Mapping[str, Any]], *, per_question: int = 2, seed: int = 0
) -> list[dict[str, str]]:
    """Query→query pairs: each question in language a → the same question in ``per_question`` other languages.

    Rows as ``paired_languages`` gives them; ``candidate_id`` is the question's text in language b
    (query→query candidates are texts).
    """
    return paired_languages(questions, "question", per_question=per_question, seed=seed)


def crosslingual_pairs(
    questions: Sequence[Mapping[str, Any]], *, per_question: int = 2, seed: int = 0
) -> list[dict[str, str]]:
    """Question → sentence pairs across languages: a question in language a → its gold sentence in language b.

    The same question's gold sentence in each language is the translation of one sentence, so these pairs
    teach the query tower to place a question near the answer whatever the answer's language (LAReQA's
    "language-agnostic" retrieval, measured by the pooled Recall@10). Rows as ``paired_languages`` gives
    them; ``candidate_id`` is the gold sentence id in language b.

    Example:
        ::

            questions = [
                {"id": "q1", "language": "de", "question": "Wer?", "gold_id": "de/0/0/1"},
                {"id": "q1", "language": "en", "question": "Who?", "gold_id": "en/0/0/2"},
            ]
            crosslingual_pairs(questions, per_question=1)[0]["candidate_id"]  # 'en/0/0/2'
    """
    return paired_languages(questions, "gold_id", per_question=per_question, seed=seed)


def build_xquad_r_tables(
    root: str | Path,
    *,
    languages: Sequence[str] = LANGUAGES,
    seed: int = 0,
    translations_per_question: int = 2,
    crosslingual_per_question: int = 2,
    dev_split: bool = False,
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
        crosslingual_per_question: Other languages b of the cross-lingual pairs per question and language a
            (see ``crosslingual_pairs``).
        dev_split: Hold out the dev articles of ``article_split`` from training: their questions go to
            ``pairs/query_sentence_dev.parquet`` instead of the train pairs and the translation pairs.
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
        ``language``, ``question_id``), and ``..._dev.parquet`` with ``dev_split``;
        ``pairs/query_query_train.parquet`` (see ``translation_pairs``) and
        ``pairs/query_sentence_crosslingual_train.parquet`` (see ``crosslingual_pairs``), train articles only.

    Example:
        ::

            tables = build_xquad_r_tables("../shared/data")
            {name: table.num_rows for name, table in tables.items()}
            # {'sentences.parquet': 13014, 'pairs/query_sentence_train.parquet': 8976,
            #  'pairs/query_sentence_test.parquet': 4114, 'pairs/query_query_train.parquet': 17952,
            #  'pairs/query_sentence_crosslingual_train.parquet': 17952}
    """
    data = load_xquad_r(root, languages=languages, dev_split=dev_split)
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
    for split in ("train", "dev", "test") if dev_split else ("train", "test"):
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
    pairs = crosslingual_pairs(train, per_question=crosslingual_per_question, seed=seed)
    tables["pairs/query_sentence_crosslingual_train.parquet"] = pa.Table.from_pylist(pairs, schema=schema)
    return tables


__all__ = [
    "DEV_EVERY",
    "LANGUAGES",
    "TEXT_FIELDS",
    "XQuADR",
    "article_split",
    "build_xquad_r_tables",
    "crosslingual_pairs",
    "gold_sentence_index",
    "load_xquad_r",
    "paired_languages",
    "translation_pairs",
]
