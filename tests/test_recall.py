"""Recall@K: the chunked exact ranks against a brute-force sort, ties and exclusions included."""

import numpy as np
import pytest

from omnisearchsage_hf.evaluation import RecallEvaluator, positive_ranks, recall_metrics


def brute_force_ranks(queries, positives, corpus, excluded=()):
    skip = {(int(p), int(c)) for p, c in excluded}
    ranks = []
    for i, (q, p) in enumerate(zip(queries, positives)):
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
