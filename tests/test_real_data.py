"""The real data sources: XQuAD-R and Amazon ePQA adapters, their preparation, and their evaluators.

They read the real files in ``../shared/data`` (skipped where that folder is absent). No pretrained
model runs here: the compat column is built with the tiny random BERT of ``conftest``.
"""

import collections
import csv
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from omnisearchsage_hf.data import xquad_r
from omnisearchsage_hf.data.amazon_pqa import attribute_text, build_epqa_tables, epqa_split, load_epqa
from omnisearchsage_hf.data.encoders import passage_embeddings
from omnisearchsage_hf.data.xquad_r import LANGUAGES, build_xquad_r_tables, gold_sentence_index, load_xquad_r
from omnisearchsage_hf.evaluation.benchmarks import (
    evaluate_epqa,
    evaluate_xquad,
    rank_epqa,
    rank_xquad,
    ranks_of_relevant,
)
from omnisearchsage_hf.evaluation.scoring import DenseScorer
from omnisearchsage_hf.training.config import DataConfig, TrainingConfig, load_config
from omnisearchsage_hf.training.sources import SOURCE_MARKER, prepare_real_source, prepare_source, source_options

ROOT = Path(__file__).resolve().parents[2] / "shared" / "data"
pytestmark = pytest.mark.skipif(not (ROOT / "xquad_r").is_dir(), reason=f"real data not found under {ROOT}")

DEV_ARTICLES = (6, 13, 21, 28, 36, 43)  # every fifth train article, with `dev_split`
SPLITS = ("train", "dev", "test")
# Counted from the files; the data README says "about 1,200 per language (852 for th)".
SENTENCES_PER_LANGUAGE = {
    "ar": 1222, "de": 1276, "el": 1234, "en": 1180, "es": 1215, "hi": 1244,
    "ru": 1219, "th": 852, "tr": 1167, "vi": 1209, "zh": 1196,
}  # fmt: skip


@pytest.fixture(scope="module")
def xquad():
    return load_xquad_r(ROOT)


@pytest.fixture(scope="module")
def xquad_tables():
    return {name: table.to_pylist() for name, table in build_xquad_r_tables(ROOT, show_progress_bar=False).items()}


@pytest.fixture(scope="module")
def epqa_rows():
    with open(ROOT / "amazon_pqa" / "ePQA" / "dev.csv", encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def epqa_tables():
    return {name: table.to_pylist() for name, table in build_epqa_tables(ROOT).items()}


def hashing_encoder(texts, dim=512):
    """Bag of UTF-8 byte unigrams and bigrams, hashed into ``dim`` buckets, unit norm."""
    out = np.zeros((len(texts), dim), dtype=np.float32)
    for row, text in enumerate(texts):
        codes = np.frombuffer(text.lower().encode(), dtype=np.uint8).astype(np.int64)
        buckets = np.concatenate([codes, 256 + (codes[:-1] * 257 + codes[1:]) % (dim - 256)])
        out[row] = np.bincount(buckets, minlength=dim)
    return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)


# ---- XQuAD-R -------------------------------------------------------------------------------------


def test_gold_sentence_index_takes_the_sentence_starting_before_a_gap():
    breaks = [[0, 10], [11, 20], [22, 30]]
    assert [gold_sentence_index(breaks, start) for start in (0, 9, 10, 11, 20, 21, 22, 29, 40)] == [
        0, 0, 0, 1, 1, 1, 2, 2, 2,
    ]  # fmt: skip
    assert gold_sentence_index([[3, 10]], 1) == 0  # before the first span


@pytest.mark.parametrize(
    ("language", "question_id", "gold_id", "answer_words"),
    [
        ("en", "56beb4343aeaaa14008c925b", "en/0/0/0", "308 points"),
        ("en", "56e0bb9f7aa994140058e6ce", "en/3/0/4", "since the 1990s"),
        ("zh", "56e0bb9f7aa994140058e6ce", "zh/3/0/5", "90 年代"),
        ("th", "56e0bb9f7aa994140058e6ce", "th/3/0/2", "1990"),
        ("en", "572828383acd2414000df5c6", "en/34/4/1", "Seven Keys to"),
        # This paragraph's context has mojibake the sentences lack; its breaks still find the answer.
        ("tr", "570d47b8b3d812140066d62e", "tr/9/3/2", "1.435 mm"),
        ("tr", "570d47b8b3d812140066d62f", "tr/9/3/3", "760 mm"),
    ],
)
def test_gold_sentences_of_hand_checked_questions(xquad, language, question_id, gold_id, answer_words):
    question = next(q for q in xquad.questions if q["id"] == question_id and q["language"] == language)
    assert question["gold_id"] == gold_id
    sentence = next(s for s in xquad.sentences if s["id"] == gold_id)
    assert answer_words in sentence["sentence"]
    assert sentence["sentence"] in sentence["context"] or language == "tr"


def test_every_third_article_is_test_32_train_16_test(xquad):
    for language in LANGUAGES:
        articles = {(s["id"].split("/")[1], s["split"]) for s in xquad.sentences if s["language"] == language}
        assert collections.Counter(split for _, split in articles) == {"train": 32, "test": 16}
        assert all((int(article) % 3 == 2) == (split == "test") for article, split in articles)


def test_counts_per_language(xquad):
    assert collections.Counter(s["language"] for s in xquad.sentences) == SENTENCES_PER_LANGUAGE
    questions = collections.Counter((q["language"], q["split"]) for q in xquad.questions)
    assert questions == {(language, split): n for language in LANGUAGES for split, n in (("train", 816), ("test", 374))}
    # Parallel files: the same question ids in every language.
    ids = {language: sorted(q["id"] for q in xquad.questions if q["language"] == language) for language in LANGUAGES}
    assert all(ids[language] == ids["en"] for language in LANGUAGES) and len(set(ids["en"])) == 1190


def test_sentence_table_and_question_sentence_pairs(xquad_tables):
    sentences = xquad_tables["sentences.parquet"]
    assert list(sentences[0]) == ["id", "sentence", "context", "title", "language", "split", "paragraph"]
    by_id = {row["id"]: row for row in sentences}
    assert all(row["id"].rsplit("/", 1)[0] == row["paragraph"] for row in sentences)
    assert len(by_id) == len(sentences) == sum(SENTENCES_PER_LANGUAGE.values())
    assert by_id["en/0/0/0"]["title"] == "Super Bowl 50" and "_" not in by_id["en/18/0/0"]["title"]
    for split, count in (("train", 816 * 11), ("test", 374 * 11)):
        pairs = xquad_tables[f"pairs/query_sentence_{split}.parquet"]
        assert len(pairs) == count
        for pair in pairs:
            sentence = by_id[pair["candidate_id"]]
            assert sentence["split"] == split and sentence["language"] == pair["language"]


def test_translation_pairs_join_one_question_in_two_languages(xquad, xquad_tables):
    text = {(q["id"], q["language"]): q["question"] for q in xquad.questions}
    train_ids = {q["id"] for q in xquad.questions if q["split"] == "train"}
    pairs = xquad_tables["pairs/query_query_train.parquet"]
    assert len(pairs) == 816 * 11 * 2
    for pair in pairs:
        assert pair["question_id"] in train_ids and pair["language"] != pair["candidate_language"]
        assert pair["query"] == text[(pair["question_id"], pair["language"])]
        assert pair["candidate_id"] == text[(pair["question_id"], pair["candidate_language"])]
    per_source = collections.Counter((p["question_id"], p["language"]) for p in pairs)
    assert set(per_source.values()) == {2}
    assert len({(p["question_id"], p["language"], p["candidate_language"]) for p in pairs}) == len(pairs)
    train = [q for q in xquad.questions if q["split"] == "train"]
    assert xquad_r.translation_pairs(train, seed=0) == pairs
    assert xquad_r.translation_pairs(train, seed=1) != pairs


def test_crosslingual_pairs_join_a_question_to_its_gold_sentence_in_another_language(xquad, xquad_tables):
    gold = {(q["id"], q["language"]): q["gold_id"] for q in xquad.questions}
    text = {(q["id"], q["language"]): q["question"] for q in xquad.questions}
    sentences = {row["id"]: row for row in xquad_tables["sentences.parquet"]}
    pairs = xquad_tables["pairs/query_sentence_crosslingual_train.parquet"]
    assert len(pairs) == 816 * 11 * 2
    for pair in pairs:
        assert pair["language"] != pair["candidate_language"]
        assert pair["query"] == text[(pair["question_id"], pair["language"])]
        assert pair["candidate_id"] == gold[(pair["question_id"], pair["candidate_language"])]
        sentence = sentences[pair["candidate_id"]]
        assert sentence["language"] == pair["candidate_language"] and sentence["split"] == "train"
    # Same seed, same drawn languages as the query→query pairs; another seed draws others.
    translations = xquad_tables["pairs/query_query_train.parquet"]
    assert [(p["question_id"], p["language"], p["candidate_language"]) for p in pairs] == [
        (p["question_id"], p["language"], p["candidate_language"]) for p in translations
    ]
    train = [q for q in xquad.questions if q["split"] == "train"]
    assert xquad_r.crosslingual_pairs(train, seed=1) != pairs


def test_xquad_dev_split_is_carved_from_train_articles_only(xquad):
    assert [a for a in range(48) if xquad_r.article_split(a, dev_split=True) == "dev"] == list(DEV_ARTICLES)
    assert [xquad_r.article_split(a) for a in range(48)] == ["test" if a % 3 == 2 else "train" for a in range(48)]
    split = load_xquad_r(ROOT, dev_split=True)

    def articles(data, language, name):
        return {s["id"].split("/")[1] for s in data.sentences if s["language"] == language and s["split"] == name}

    def question_keys(data, name):
        return {(q["id"], q["language"], q["gold_id"]) for q in data.questions if q["split"] == name}

    for language in LANGUAGES:
        train, dev = articles(split, language, "train"), articles(split, language, "dev")
        assert dev == {str(a) for a in DEV_ARTICLES} and not train & dev
        assert train | dev == articles(xquad, language, "train")
        assert articles(split, language, "test") == articles(xquad, language, "test")
    train, dev = question_keys(split, "train"), question_keys(split, "dev")
    assert not train & dev and train | dev == question_keys(xquad, "train")
    assert question_keys(split, "test") == question_keys(xquad, "test")
    counts = collections.Counter((q["language"], q["split"]) for q in split.questions)
    assert all(counts[(language, "dev")] == 155 for language in LANGUAGES)
    # A question's translations share its article, so no question id is both dev and train.
    assert not {key[0] for key in train} & {key[0] for key in dev}


def test_xquad_dev_pairs_are_written_and_kept_out_of_training(tmp_path):
    languages = ["en", "zh"]
    prepare_real_source("xquad_r", ROOT, tmp_path, {"dev_split": True, "languages": languages}, show_progress_bar=False)
    pairs = {split: pq.read_table(tmp_path / f"pairs/query_sentence_{split}.parquet").to_pylist() for split in SPLITS}
    translations = pq.read_table(tmp_path / "pairs/query_query_train.parquet").to_pylist()
    translations += pq.read_table(tmp_path / "pairs/query_sentence_crosslingual_train.parquet").to_pylist()
    default = build_xquad_r_tables(ROOT, languages=languages, show_progress_bar=False)
    assert pairs["test"] == default["pairs/query_sentence_test.parquet"].to_pylist()
    old_train = default["pairs/query_sentence_train.parquet"].to_pylist()
    assert len(pairs["dev"]) == 155 * len(languages) and len(pairs["train"]) + len(pairs["dev"]) == len(old_train)
    assert sorted(map(str, pairs["train"] + pairs["dev"])) == sorted(map(str, old_train))
    assert {int(p["candidate_id"].split("/")[1]) for p in pairs["dev"]} == set(DEV_ARTICLES)
    dev_ids = {p["question_id"] for p in pairs["dev"]}
    assert not dev_ids & {p["question_id"] for p in pairs["train"] + translations}


def test_ranks_of_relevant_count_other_relevant_rows_and_ties_against():
    queries = np.array([[1.0, 0.0]])
    corpus = np.array([[1.0, 0.0], [0.9, 0.1], [0.9, 0.0], [0.0, 1.0]])
    scores = queries @ corpus.T
    ranks = ranks_of_relevant(scores, np.array([[0, 2, 3]]))
    np.testing.assert_array_equal(ranks, [[0, 2, 3]])  # rows 1 and 2 tie at 0.9: the tie counts against
    np.testing.assert_array_equal(ranks_of_relevant(scores, np.array([[2]]), ignored=[[0, 1]]), [[0]])
    # Relevant rows tied with each other take consecutive ranks instead of all counting each other.
    np.testing.assert_array_equal(ranks_of_relevant(scores, np.array([[3, 1, 2]])), [[3, 1, 2]])


def test_evaluate_xquad_with_a_character_hashing_encoder_is_sane():
    metrics = evaluate_xquad(
        DenseScorer(hashing_encoder, lambda rows: hashing_encoder([r["sentence"] for r in rows])), ROOT
    )
    assert all(0.0 <= value <= 1.0 for value in metrics.values())
    for language in LANGUAGES:
        recalls = [metrics[f"xquad_r_{language}_recall@{k}"] for k in (1, 10, 100)]
        assert recalls == sorted(recalls)
        assert recalls[1] > 10 * 10 / SENTENCES_PER_LANGUAGE[language]  # lexical overlap beats chance tenfold
    assert metrics["xquad_r_recall@10"] == pytest.approx(
        np.mean([metrics[f"xquad_r_{x}_recall@10"] for x in LANGUAGES])
    )
    assert 0.0 < metrics["xquad_r_pooled_recall@10"] < metrics["xquad_r_recall@10"]
    # All 11 languages' gold sentences are relevant in the pooled index but only 10 fit in a top 10.
    assert metrics["xquad_r_pooled_recall@10"] <= 10 / 11


def test_evaluate_xquad_with_an_oracle_encoder_is_perfect(xquad):
    # One-hot encoders: a question points at its id, a sentence at the ids of the questions it answers (in
    # any language). Four languages keep the one-hot matmul small; the pooled top 10 then holds all 4 golds.
    languages = ["ar", "en", "th", "zh"]
    column = {question_id: i for i, question_id in enumerate(sorted({q["id"] for q in xquad.questions}))}
    ids_of_text, ids_of_sentence = collections.defaultdict(set), collections.defaultdict(set)
    for q in xquad.questions:
        ids_of_text[q["question"]].add(q["id"])
        ids_of_sentence[q["gold_id"]].add(q["id"])

    def one_hots(id_sets):
        out = np.zeros((len(id_sets), len(column)), dtype=np.float32)
        for row, ids in enumerate(id_sets):
            out[row, [column[i] for i in ids]] = 1.0
        return out

    metrics = evaluate_xquad(
        DenseScorer(
            lambda texts: one_hots([ids_of_text[t] for t in texts]),
            lambda rows: one_hots([ids_of_sentence[r["id"]] for r in rows]),
        ),
        ROOT,
        languages=languages,
    )
    assert {key for key in metrics if key.endswith("recall@10")} == {
        *(f"xquad_r_{x}_recall@10" for x in languages),
        *(f"xquad_r_pooled_{x}_recall@10" for x in languages),
        "xquad_r_recall@10",
        "xquad_r_pooled_recall@10",
    }
    assert all(value == 1.0 for value in metrics.values())


def test_compat_column_is_the_mean_pooled_normalised_passage_embedding(tiny_backbone_dir, tmp_path, monkeypatch):
    kwargs = {"languages": ["en"], "compat_encoder": str(tiny_backbone_dir), "cache_dir": tmp_path}
    sentences = build_xquad_r_tables(ROOT, **kwargs, show_progress_bar=False)["sentences.parquet"]
    embeddings = np.array(sentences.column("e5_embedding").to_pylist(), dtype=np.float32)
    assert embeddings.shape == (SENTENCES_PER_LANGUAGE["en"], 32)
    model, tokenizer = AutoModel.from_pretrained(tiny_backbone_dir), AutoTokenizer.from_pretrained(tiny_backbone_dir)
    texts = ["passage: " + text for text in sentences.column("sentence").to_pylist()[:4]]
    batch = tokenizer(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
    with torch.inference_mode():
        hidden = model(**batch).last_hidden_state  # (4, seq, 32)
    mask = batch["attention_mask"][..., None].float()  # (4, seq, 1)
    expected = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    np.testing.assert_allclose(embeddings[:4], expected.numpy(), atol=1e-5)
    # A second build reads the cache: encoding again would fail.
    assert len(list(tmp_path.glob("passages-*.npy"))) == 1
    monkeypatch.setattr("sentence_transformers.SentenceTransformer", None)
    again = build_xquad_r_tables(ROOT, **kwargs, show_progress_bar=False)["sentences.parquet"]
    assert again.equals(sentences)


def test_context_column_is_the_paragraph_passage_embedding(tiny_backbone_dir, tmp_path):
    kwargs = {"languages": ["en"], "compat_encoder": str(tiny_backbone_dir), "cache_dir": tmp_path}
    sentences = build_xquad_r_tables(
        ROOT, **kwargs, context_feature="e5_context", context_max_length=128, show_progress_bar=False
    )["sentences.parquet"].to_pylist()
    by_context = collections.defaultdict(set)
    for row in sentences:
        by_context[row["context"]].add(tuple(row["e5_context"]))
    assert len(by_context) == 240 and all(len(vectors) == 1 for vectors in by_context.values())
    first = sentences[0]
    expected = passage_embeddings([first["context"]], tiny_backbone_dir, max_length=128, show_progress_bar=False)
    np.testing.assert_allclose(first["e5_context"], expected[0], atol=1e-5)
    with pytest.raises(ValueError, match="compat_encoder"):
        build_xquad_r_tables(ROOT, languages=["en"], context_feature="e5_context")


# ---- Amazon ePQA ---------------------------------------------------------------------------------


def test_epqa_split_and_sizes(epqa_tables):
    data = load_epqa(ROOT)
    assert len(data.questions) == 977 and len(data.products) == 888
    assert collections.Counter(q["split"] for q in data.questions) == {"train": 673, "test": 304}
    assert epqa_split(18) == epqa_split("18")
    for split, count in (("train", 673), ("test", 304)):
        pairs = epqa_tables[f"pairs/query_product_{split}.parquet"]
        assert len(pairs) == count == len({p["question_id"] for p in pairs})
        assert all(epqa_split(p["question_id"]) == split for p in pairs)
    product_ids = {p["id"] for p in epqa_tables["products.parquet"]}
    assert len(product_ids) == 888
    assert all(
        p["candidate_id"] in product_ids
        for split in ("train", "test")
        for p in epqa_tables[f"pairs/query_product_{split}.parquet"]
    )


def _product_texts(product):
    for key, value in product.items():
        if key != "id" and value is not None:
            yield from [value] if isinstance(value, str) else value


def test_no_test_question_text_or_evidence_leaks_into_products(epqa_rows, epqa_tables):
    products = epqa_tables["products.parquet"]
    items = {text for product in products for text in _product_texts(product)}
    corpus = "\n".join(sorted(items))
    test_rows = [row for row in epqa_rows if epqa_split(row["qid"]) == "test"]
    evidence = {row["candidate"].strip() for row in test_rows if row["source"] in ("cqa", "review")} - {""}
    # Short snippets ("!", "works great.") may coincide with catalogue text; longer ones must not appear.
    long_evidence = {text for text in evidence if len(text) >= 20}
    assert len(long_evidence) > 1000 and not [text for text in long_evidence if text in corpus]
    test_questions = {row["question"] for row in test_rows}
    assert not test_questions & items


def test_engaged_queries_are_the_products_train_questions(epqa_rows, epqa_tables):
    # One engagement per training question; most engaged first, then in codepoint order (the top-20 rule).
    questions = {(row["qid"], row["ASIN"], row["question"]) for row in epqa_rows if epqa_split(row["qid"]) == "train"}
    counts = collections.defaultdict(collections.Counter)
    for _, asin, question in questions:
        counts[asin][question] += 1
    expected = {asin: sorted(c, key=lambda q: (-c[q], q))[:20] for asin, c in counts.items()}
    products = epqa_tables["products.parquet"]
    assert {p["id"]: p["engaged_queries"] for p in products if p["engaged_queries"]} == expected
    assert "engaged_queries" not in build_epqa_tables(ROOT, engaged_queries=False)["products.parquet"].column_names


def test_product_fields(epqa_tables):
    product = next(p for p in epqa_tables["products.parquet"] if p["id"] == "B00545ATZW")
    assert product["title"] == "Frigidaire 240337103 Crisper Pan for Refrigerator"
    assert "number of items: 1" in product["attribute"]
    assert attribute_text('color:  { value:"white" }') == "color: white"
    nested = "display:  { size:[ { unit:inches, value:13 } ] }"
    assert attribute_text(nested) == nested
    leaky = {p["id"]: p for p in build_epqa_tables(ROOT, test_question_snippets=True)["products.parquet"].to_pylist()}
    for product in epqa_tables["products.parquet"]:  # the default catalogue is the leak-free one
        for field in ("bullet", "attribute"):
            assert set(product[field]) <= set(leaky[product["id"]][field])
    assert sum(map(len, (p["bullet"] for p in epqa_tables["products.parquet"]))) < sum(
        map(len, (p["bullet"] for p in leaky.values()))
    )


def _chosen_snippets(epqa_rows, **split_options):
    """``(asin, field, text)`` → the splits of the questions whose candidates include that snippet."""
    chosen = collections.defaultdict(set)
    for row in epqa_rows:
        text = row["candidate"].strip()
        if row["source"] in ("description", "bullet", "attribute") and text:
            text = attribute_text(text) if row["source"] == "attribute" else text
            chosen[(row["ASIN"], row["source"], text)].add(epqa_split(row["qid"], **split_options))
    return chosen


@pytest.mark.parametrize("dev_split", [False, True])
def test_leak_free_catalogue_drops_the_snippets_chosen_for_held_out_questions(epqa_rows, dev_split):
    chosen = _chosen_snippets(epqa_rows, dev_split=dev_split)
    # Snippets chosen only for held-out questions (long ones: short texts can recur inside others).
    held_out = {key for key, splits in chosen.items() if "train" not in splits and len(key[2]) >= 20}
    options = {"dev_split": dev_split, "engaged_queries": False}
    leaky = {p["id"]: p for p in load_epqa(ROOT, test_question_snippets=True, **options).products}
    free = {p["id"]: p for p in load_epqa(ROOT, **options).products}

    def present(products, asin, field, text):
        value = products[asin][field]
        return text in value if field != "description" else value is not None and text in value

    assert len(held_out) > 100 and all(present(leaky, *key) for key in held_out)
    assert not [key for key in held_out if present(free, *key)]
    for asin, product in free.items():  # the lists hold exactly the snippets of train questions
        for field in ("bullet", "attribute"):
            expected = {
                text for (a, f, text), splits in chosen.items() if (a, f) == (asin, field) and "train" in splits
            }
            assert set(product[field]) == expected


def test_epqa_dev_split_holds_out_a_fifth_of_the_train_questions(epqa_rows):
    default, split = load_epqa(ROOT), load_epqa(ROOT, dev_split=True)

    def qids(data, name):
        return {q["qid"] for q in data.questions if q["split"] == name}

    assert len(qids(split, "dev")) == 133 and not qids(split, "dev") & qids(split, "train")
    assert qids(split, "dev") | qids(split, "train") == qids(default, "train")
    assert qids(split, "test") == qids(default, "test")
    dev_questions = {q["question"] for q in split.questions if q["split"] == "dev"}
    train_questions = {q["question"] for q in split.questions if q["split"] == "train"}
    engaged = {text for p in split.products for text in p["engaged_queries"]}
    assert engaged == train_questions and dev_questions - train_questions  # a dev question is not engaged
    assert not (dev_questions - train_questions) & engaged
    tables = build_epqa_tables(ROOT, dev_split=True)
    for name in ("train", "dev", "test"):
        pairs = tables[f"pairs/query_product_{name}.parquet"].to_pylist()
        assert {p["question_id"] for p in pairs} == qids(split, name)
    assert "pairs/query_product_dev.parquet" not in build_epqa_tables(ROOT)


def test_evaluate_epqa_with_hashing_and_oracle_encoders():
    def product_text(rows):
        return hashing_encoder([" ".join(_product_texts(row)) for row in rows])

    metrics = evaluate_epqa(DenseScorer(hashing_encoder, product_text), ROOT)
    assert set(metrics) == {"epqa_recall@1", "epqa_recall@10", "epqa_recall@100", "epqa_mrr"}
    assert 10 / 888 < metrics["epqa_recall@10"] <= metrics["epqa_recall@100"] <= 1.0
    data = load_epqa(ROOT)
    asin_of = {q["question"]: q["asin"] for q in data.questions}
    column = {p["id"]: i for i, p in enumerate(data.products)}
    eye = np.eye(len(column), dtype=np.float32)
    oracle = evaluate_epqa(
        DenseScorer(
            lambda texts: eye[[column[asin_of[t]] for t in texts]], lambda rows: eye[[column[r["id"]] for r in rows]]
        ),
        ROOT,
    )
    assert oracle["epqa_recall@1"] == oracle["epqa_mrr"] == 1.0


def test_evaluators_score_the_dev_split_only_when_asked():
    """``split="dev"``: the dev questions carved out of train (never test), for choosing settings."""
    scorer = DenseScorer(hashing_encoder, lambda rows: hashing_encoder([r["sentence"] for r in rows]))
    dev = rank_xquad(scorer, ROOT, languages=["en"], split="dev", pooled=False)
    test = rank_xquad(scorer, ROOT, languages=["en"], split="test", pooled=False)
    assert len(dev.question_ids["en"]) == 155 and not set(dev.question_ids["en"]) & set(test.question_ids["en"])
    with pytest.raises(ValueError, match="dev_split=True"):
        evaluate_epqa(scorer, ROOT, split="dev")
    ranks = rank_epqa(
        DenseScorer(hashing_encoder, lambda rows: hashing_encoder([" ".join(_product_texts(r)) for r in rows])),
        ROOT,
        dev_split=True,
        split="dev",
    )
    assert len(ranks.ranks["en"]) == 133


# ---- preparation ---------------------------------------------------------------------------------


def test_prepare_source_writes_once_with_a_marker_last(tmp_path):
    config = TrainingConfig(data=DataConfig(source="amazon_pqa", root=str(ROOT), options={"engaged_queries": False}))
    data_dir = tmp_path / "data"
    prepare_source(config, data_dir)
    marker = json.loads((data_dir / SOURCE_MARKER).read_text())
    # The builder's defaults are recorded too, so a folder prepared before a default changed is rebuilt.
    assert set(marker["options"]) == set(source_options("amazon_pqa"))
    assert marker["options"]["engaged_queries"] is False and marker["options"]["test_question_snippets"] is False
    assert marker["rows"]["products.parquet"] == 888
    files = sorted(str(p.relative_to(data_dir)) for p in data_dir.rglob("*") if p.is_file())
    assert files == sorted([*marker["files"], SOURCE_MARKER])  # no temp files left behind
    assert "engaged_queries" not in pq.read_schema(data_dir / "products.parquet").names
    assert not prepare_real_source("amazon_pqa", ROOT, data_dir, {"engaged_queries": False})
    (data_dir / SOURCE_MARKER).write_text(json.dumps(marker | {"options": {"engaged_queries": False}}))
    assert prepare_real_source("amazon_pqa", ROOT, data_dir, {"engaged_queries": False})  # recorded without defaults
    (data_dir / SOURCE_MARKER).unlink()  # as if killed before the end: redone
    assert prepare_real_source("amazon_pqa", ROOT, data_dir, {"engaged_queries": False})
    assert prepare_real_source("amazon_pqa", ROOT, data_dir, {})  # other options: redone
    assert "engaged_queries" in pq.read_schema(data_dir / "products.parquet").names
    with pytest.raises(ValueError, match=r"Unknown `data.options` \['engaged_query'\].*engaged_queries"):
        prepare_real_source("amazon_pqa", ROOT, data_dir, {"engaged_query": False})
    assert "compat_encoder" in source_options("xquad_r")


def test_config_takes_real_sources_root_and_options():
    config = load_config(
        overrides={
            "data.source": "xquad_r",
            "data.options": {"compat_encoder": "~/me5"},
            "data.tasks": [{"name": "query_sentence", "candidate": "entity:sentence"}],
            "model.backbone": "folder",
        }
    )
    assert config.data.root == "$OMNISEARCHSAGE_DATA" and config.data.options == {"compat_encoder": "~/me5"}
