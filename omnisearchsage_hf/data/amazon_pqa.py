"""Amazon ePQA read into rows and tables: real customer questions → the product they were asked about.

ePQA (``amazon_pqa/ePQA/dev.csv``) holds 977 questions about 888 products; each row pairs a question
with one evidence snippet of its product (``source`` ∈ description, bullet, attribute, cqa, review).
It becomes OmniSearchSage's query→product task: the product catalogue is built from the snippets, and
the gold candidate of a question is its product (ASIN). Questions are split by a fixed hash of their
``qid`` (``md5 % 3 == 0`` is test: 304 of 977); with ``dev_split=True`` one train question in five
(133) is held out as ``"dev"`` for model selection (see ``epqa_split``). ``load_epqa`` reads the file
into rows; ``build_epqa_tables`` returns the tables of the training source. The benchmark that scores trained
towers on them is ``omnisearchsage_hf.evaluation.benchmarks.evaluate_epqa``.

Product fields (the entity tower's text fields):

- ``title``, always.
- ``description`` (the description snippets joined), ``bullet`` and ``attribute`` (lists): catalogue text.
  ePQA holds no catalogue of its own: each snippet is a candidate retrieved *for* one question, so a
  snippet picked for a held-out question is evidence of relevance to that question, and keeping it would
  leak that relevance to every system scored on it. So by default (the leak-free catalogue) a product
  keeps only the snippets picked for train questions; ``test_question_snippets=True`` also keeps those of
  the held-out (test, and dev) questions: the *leaky* catalogue the results before this option used.
- ``engaged_queries``: the product's *train* questions (the paper's engaged-queries enrichment, computed by
  ``omnisearchsage_hf.enrichment.engaged_queries_from_pairs``: each question one engagement, top 20), off
  with ``engaged_queries=False``. A test (or dev) question never appears in any product.
- ``cqa`` and ``review`` snippets are never used, for any question: they are other customers' questions,
  answers and reviews retrieved *for* a question, not catalogue text.

References:
    - Shen et al. 2023, xPQA: Cross-Lingual Product Question Answering in 12 Languages (describes ePQA):
      https://arxiv.org/abs/2305.09249
    - Data: github.com/amazon-science/contextual-product-qa (commit cec976cc), CDLA-Sharing-1.0: derived
      data keeps that licence.
"""

from __future__ import annotations

import csv
import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa

from ..enrichment import engaged_queries_from_pairs
from .encoders import passage_embeddings

TEXT_FIELDS = ("title", "description", "bullet", "attribute", "engaged_queries")
CATALOGUE_SOURCES = ("description", "bullet", "attribute")
CATALOGUE_FIELDS = ("title", *CATALOGUE_SOURCES)  # a product's own text, without engaged queries
Split = Literal["train", "dev", "test"]
DEV_BUCKETS = 5  # with the dev split on, one bucket in five of the train questions is dev
# `color:  { value:"white" }` → `color: white`; nested attribute values are kept verbatim.
_SIMPLE_ATTRIBUTE = re.compile(r'^\s*([^:{}]+?):\s*\{\s*value:"?([^{}"]*)"?\s*\}\s*$')


def epqa_split(qid: int | str, *, dev_split: bool = False) -> Split:
    """The split of question ``qid``, from ``h = int(md5(str(qid)), 16)``: stable across runs and machines.

    ``"test"`` when ``h % 3 == 0``, else ``"train"``; with ``dev_split``, a train question with
    ``(h // 3) % 5 == 0`` is ``"dev"`` instead (133 of the 673). ``h // 3`` is independent of ``h % 3``,
    and the test questions never change.
    """
    h = int(hashlib.md5(str(qid).encode()).hexdigest(), 16)
    if h % 3 == 0:
        return "test"
    return "dev" if dev_split and (h // 3) % DEV_BUCKETS == 0 else "train"


def attribute_text(snippet: str) -> str:
    """A flat ``name: value`` for a one-value attribute (``'color:  { value:"white" }'`` → ``'color: white'``)."""
    match = _SIMPLE_ATTRIBUTE.match(snippet)
    return f"{match.group(1).replace('_', ' ')}: {match.group(2).strip()}" if match else snippet.strip()


@dataclass
class EPQA:
    """ePQA read into rows.

    Attributes:
        questions: ``qid`` (str), ``question``, ``asin`` and ``split``, one per question, in file order.
        products: Entity rows: ``id`` (the ASIN) and the text fields (see the module docstring); a
            missing ``description`` is None, empty lists stay empty.
    """

    questions: list[dict[str, str]]
    products: list[dict[str, Any]]


def load_epqa(
    root: str | Path,
    *,
    engaged_queries: bool = True,
    test_question_snippets: bool = False,
    dev_split: bool = False,
) -> EPQA:
    """Read ``<root>/amazon_pqa/ePQA/dev.csv`` into questions and a product table.

    Args:
        root: Folder of the real data sets (holds ``amazon_pqa/``).
        engaged_queries: Give each product its train questions as ``engaged_queries``.
        test_question_snippets: Also keep the description/bullet/attribute snippets picked for held-out
            (test and dev) questions: the leaky catalogue (see the module docstring). Default: only
            those picked for train questions.
        dev_split: Mark the dev questions of ``epqa_split`` ``split == "dev"``; they are then held out
            like the test questions (no engaged queries, and no snippets unless ``test_question_snippets``).
    """
    path = Path(root) / "amazon_pqa" / "ePQA" / "dev.csv"
    if not path.is_file():
        raise FileNotFoundError(f"ePQA file {str(path)!r} is missing; `root` should hold `amazon_pqa/ePQA/`.")
    with open(path, encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle))
    questions: dict[str, dict[str, str]] = {}
    products: dict[str, dict[str, Any]] = {}
    for row in rows:
        qid, asin = row["qid"], row["ASIN"]
        question = questions.setdefault(
            qid, {"qid": qid, "question": row["question"], "asin": asin, "split": epqa_split(qid, dev_split=dev_split)}
        )
        product = products.setdefault(asin, {"id": asin, "title": row["title"], **{s: {} for s in CATALOGUE_SOURCES}})
        if question["asin"] != asin or product["title"] != row["title"]:
            raise ValueError(f"{path}: question {qid} or product {asin} is inconsistent across rows.")
        snippet = row["candidate"].strip()
        if row["source"] in CATALOGUE_SOURCES and snippet and (test_question_snippets or question["split"] == "train"):
            text = attribute_text(snippet) if row["source"] == "attribute" else snippet
            product[row["source"]][text] = None  # a dict keeps first-seen order without duplicates
    for product in products.values():
        description = list(product.pop("description"))
        product["description"] = " ".join(description) if description else None
        product["bullet"], product["attribute"] = list(product["bullet"]), list(product["attribute"])
    if engaged_queries:
        train = ((q["asin"], q["question"]) for q in questions.values() if q["split"] == "train")
        top = engaged_queries_from_pairs(train)
        for product in products.values():
            product["engaged_queries"] = top.get(product["id"], [])
    return EPQA(list(questions.values()), list(products.values()))


def build_epqa_tables(
    root: str | Path,
    *,
    engaged_queries: bool = True,
    test_question_snippets: bool = False,
    dev_split: bool = False,
    compat_encoder: str | None = None,
    compat_feature: str = "text_embedding",
    compat_prefix: str = "",
    compat_max_length: int = 256,
    cache_dir: str | Path | None = None,
    show_progress_bar: bool = True,
) -> dict[str, pa.Table]:
    """The entity table and pair files of the ``amazon_pqa`` source (``data.options`` are these keywords).

    Args:
        root: Folder of the real data sets (holds ``amazon_pqa/``).
        engaged_queries, test_question_snippets, dev_split: As in ``load_epqa``.
        compat_encoder: Local encoder folder for a pre-existing ``compat_feature`` column (the zero-shot
            embedding of ``compat_prefix + product_text(product, CATALOGUE_FIELDS)``, catalogue text only),
            or None for no such column.
        compat_max_length: Token limit of that encoder.
        cache_dir, show_progress_bar: As in ``passage_embeddings``.

    Returns:
        ``products.parquet`` (``id`` and the text fields of ``load_epqa``) and
        ``pairs/query_product_{train,test}.parquet`` (``query``, ``candidate_id`` = ASIN, ``question_id``),
        one row per question, and ``pairs/query_product_dev.parquet`` with ``dev_split``.

    Example:
        ::

            tables = build_epqa_tables("../shared/data")
            {name: table.num_rows for name, table in tables.items()}
            # {'products.parquet': 888, 'pairs/query_product_train.parquet': 673,
            #  'pairs/query_product_test.parquet': 304}
    """
    data = load_epqa(
        root, engaged_queries=engaged_queries, test_question_snippets=test_question_snippets, dev_split=dev_split
    )
    list_type = pa.list_(pa.string())
    fields = [("id", pa.string()), ("title", pa.string()), ("description", pa.string())]
    fields += [("bullet", list_type), ("attribute", list_type)]
    fields += [("engaged_queries", list_type)] if engaged_queries else []
    products = pa.Table.from_pylist(data.products, schema=pa.schema(fields))
    if compat_encoder is not None:
        embeddings = passage_embeddings(
            [product_text(product, CATALOGUE_FIELDS) for product in data.products],
            compat_encoder,
            prefix=compat_prefix,
            max_length=compat_max_length,
            cache_dir=cache_dir,
            show_progress_bar=show_progress_bar,
        )
        products = products.append_column(compat_feature, pa.array(list(embeddings), type=pa.list_(pa.float32())))
    tables = {"products.parquet": products}
    for split in ("train", "dev", "test") if dev_split else ("train", "test"):
        tables[f"pairs/query_product_{split}.parquet"] = pa.Table.from_pylist(
            [
                {"query": q["question"], "candidate_id": q["asin"], "question_id": q["qid"]}
                for q in data.questions
                if q["split"] == split
            ]
        )
    return tables


def product_text(product: Mapping[str, Any], fields: Sequence[str] = TEXT_FIELDS) -> str:
    """All of a product's ``fields`` joined into one text: what BM25 and the zero-shot encoders read."""
    parts: list[str] = []
    for field in fields:
        value = product.get(field)
        if value is not None:
            parts.extend([value] if isinstance(value, str) else value)
    return " ".join(parts)


__all__ = [
    "CATALOGUE_FIELDS",
    "CATALOGUE_SOURCES",
    "DEV_BUCKETS",
    "EPQA",
    "TEXT_FIELDS",
    "attribute_text",
    "build_epqa_tables",
    "epqa_split",
    "load_epqa",
    "product_text",
]
