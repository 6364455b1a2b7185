"""Recall@K: the chunked exact ranks against a brute-force sort, ties and exclusions included."""

import numpy as np
import pytest

from omnisearchsage_hf.evaluation import RecallEvaluator, positive_ranks, ranks_from_scores, recall_metrics
from omnisearchsage_hf.evaluation.scoring import BM25Scorer, DenseScorer


def brute_force_ranks(queries, positives, corpus, excluded=()):
    skip = {(int(p), int(c)) for p, c in excluded}
    ranks = []
    for i, (q, p) in enumerate(zip(queries, positives, strict=True)):
        pos = float(q @ p)
        ranks.append(sum(1 for j, c in enumerate(corpus) if (i, j) not in skip and float(q @ c) >= pos))
    return np.array(ranks)


@pytest.mark.parametrize("chunk_size", [1, 7, 1000])
def test_matches_brute_force_with_ties_and_exclusions(chunk_size):
    rng = np.random.default_rng(0)
    # Small integer vectors give many exact ties.
    queries = rng.integers(-2, 3, size=(40, 4)).astype(np.float32)
    positives = rng.integers(-2, 3, size=(40, 4)).astype(np.float32)
    corpus = rng.integers(-2, 3, size=(60, 4)).astype(np.float32)
    excluded = np.stack([rng.integers(0, 40, 30), rng.integers(0, 60, 30)], axis=1)
    ranks = positive_ranks(queries, positives, corpus, excluded=excluded, chunk_size=chunk_size)
    assert np.array_equal(ranks, brute_force_ranks(queries, positives, corpus, excluded))


def test_ties_count_against_the_positive():
    q = np.ones((1, 2), dtype=np.float32)
    assert positive_ranks(q, q, np.ones((5, 2), dtype=np.float32))[0] == 5


def test_metrics():
    metrics = recall_metrics(np.array([0, 3, 9, 10, 150]), ks=(1, 10, 100), prefix="t_")
    assert metrics == {
        "t_recall@1": 0.2,
        "t_recall@10": 0.6,
        "t_recall@100": 0.8,
        "t_mrr": pytest.approx(np.mean([1, 1 / 4, 1 / 10, 1 / 11, 1 / 151])),
    }
    with pytest.raises(ValueError, match="no pairs"):
        recall_metrics(np.array([]))


def test_bad_shapes():
    with pytest.raises(ValueError, match="equal shape"):
        positive_ranks(np.ones((2, 3)), np.ones((3, 3)), np.ones((4, 3)))


def test_evaluator_end_to_end_with_groups_and_engaged_exclusion():
    rng = np.random.default_rng(1)
    vectors = {f"e{i}": rng.standard_normal(8).astype(np.float32) for i in range(50)}
    vectors["e0"] *= 5  # long enough that q0 = e0 scores e0 above every other entity
    # q0's text embeds exactly as e0, so e0 ranks first; q0 also engaged with e1, never counted against it.
    query_vectors = {"q0": vectors["e0"], "q1": -vectors["e2"]}
    pairs = [("q0", "e0"), ("q0", "e1"), ("q1", "e2")]
    evaluator = RecallEvaluator(
        pairs, vectors, corpus_size=50, ks=(1, 10), groups={"en": [0, 1], "de": [2]}, name="task"
    )

    def encode(items):
        return np.stack([query_vectors[x] if isinstance(x, str) else x for x in items])

    metrics = evaluator(encode, encode)
    assert metrics["task_en_recall@1"] == 0.5  # (q0, e0) ranks 0; (q0, e1) almost surely not first
    assert metrics["task_de_recall@10"] == 0.0  # q1 = -e2: e2 scores last
    assert evaluator.primary_metric == "task_recall@10" and "task_mrr" in metrics
    ranks_e0 = positive_ranks(
        encode(["q0"]), encode([vectors["e0"]]), np.stack(list(vectors.values())), excluded=np.array([[0, 0], [0, 1]])
    )
    assert ranks_e0[0] == 0


def test_evaluator_rejects_unknown_candidates():
    with pytest.raises(ValueError, match="not among"):
        RecallEvaluator([("q", "missing")], {"a": 1})


def test_ranks_from_scores_match_brute_force_with_ties_and_exclusions():
    rng = np.random.default_rng(1)
    queries = rng.integers(-2, 3, size=(40, 4)).astype(np.float32)
    corpus = rng.integers(-2, 3, size=(60, 4)).astype(np.float32)
    gold = rng.integers(0, 60, 40)
    excluded = np.stack([rng.integers(0, 40, 30), rng.integers(0, 60, 30)], axis=1)
    # The positive is a corpus column here: it never counts against itself, whatever `excluded` says.
    expected = brute_force_ranks(queries, corpus[gold], corpus, [*excluded, *zip(range(40), gold, strict=True)])
    assert np.array_equal(ranks_from_scores(queries @ corpus.T, gold, excluded=excluded), expected)


def test_ranks_from_scores_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="positives"):
        ranks_from_scores(np.zeros((3, 5)), np.zeros(4, dtype=int))


def test_dense_scorer_encodes_each_corpus_row_and_query_once():
    calls = []

    def corpus_encoder(rows):
        calls.append([row["id"] for row in rows])
        return np.array([[float(row["x"]), 1.0] for row in rows])

    def query_encoder(texts):
        calls.append(list(texts))
        return np.array([[float(t), 0.0] for t in texts])

    scorer = DenseScorer(query_encoder, corpus_encoder)
    rows = [{"id": "a", "x": 1}, {"id": "b", "x": 3}]
    np.testing.assert_allclose(scorer(["2"], rows), [[2.0, 6.0]])
    np.testing.assert_allclose(scorer(["1", "2", "1"], [rows[1], {"id": "c", "x": -1}]), [[3, -1], [6, -2], [3, -1]])
    assert calls == [["a", "b"], ["2"], ["c"], ["1"]]


def test_bm25_scorer_ranks_by_term_overlap_and_reindexes_new_corpora():
    scorer = BM25Scorer(lambda row: row["text"])
    rows = [{"id": "0", "text": "copper bathroom sink"}, {"id": "1", "text": "red summer dress"}]
    rows += [{"id": "2", "text": "copper pot"}, {"id": "3", "text": "linen shirt"}]
    scores = scorer(["copper sink", "dress", "zebra", "the"], rows)
    assert scores.shape == (4, 4) and scores.dtype == np.float32
    assert scores[0].argmax() == 0 and scores[0, 2] > 0 == scores[0, 1] == scores[0, 3]
    assert scores[1].argmax() == 1 and not scores[2].any() and not scores[3].any()  # unseen word, stopword
    assert scorer(["copper"], rows[:1]).shape == (1, 1)
