"""The Recall@K ``evaluate`` metric: loaded offline from its path, both input modes, and bad input."""

import evaluate
import numpy as np
import pytest
import torch

from omnisearchsage_hf.evaluation import positive_ranks, recall_metrics
from omnisearchsage_hf.evaluation.metric import RECALL_AT_K_PATH


@pytest.fixture(scope="module")
def recall(tmp_path_factory):
    # evaluate copies the script into HF_MODULES_CACHE and keeps its Arrow buffers under cache_dir.
    cache = tmp_path_factory.mktemp("evaluate")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setattr(evaluate.config, "HF_EVALUATE_OFFLINE", True)
        mp.setattr(evaluate.config, "HF_MODULES_CACHE", cache / "modules")
        yield evaluate.load(RECALL_AT_K_PATH, cache_dir=str(cache / "data"))


def test_ids_single_reference_by_hand(recall):
    metrics = recall.compute(predictions=[["a", "b"], ["c", "d"]], references=["b", "x"], ks=[1, 2])
    assert metrics == {"recall@1": 0.0, "recall@2": 0.5, "mrr": 0.25}


def test_ids_several_references_average_the_fraction_found(recall):
    # Query 1: ids 2, 3 at ranks 2, 3. Query 2: id 4 at rank 1, id 9 missing.
    metrics = recall.compute(predictions=[[1, 2, 3], [4, 5, 6]], references=[[2, 3], [9, 4]], ks=[1, 2, 3])
    assert metrics == {"recall@1": 0.25, "recall@2": 0.5, "recall@3": 0.75, "mrr": 0.75}


def test_ids_default_ks_and_add_batch(recall):
    recall.add_batch(predictions=[["a", "b"]], references=["a"])
    recall.add_batch(predictions=[[str(i) for i in range(50)]], references=["20"])
    metrics = recall.compute()
    assert list(metrics) == ["recall@1", "recall@10", "recall@100", "mrr"]
    assert metrics == pytest.approx({"recall@1": 0.5, "recall@10": 0.5, "recall@100": 1.0, "mrr": (1 + 1 / 21) / 2})


def test_embeddings_by_hand(recall):
    queries = np.array([[1.0, 0.0], [0.0, 1.0]])
    positives = np.array([[2.0, 0.0], [0.0, 1.0]])  # scores 2 and 1
    corpus = np.array([[3.0, 0.0], [0.0, 1.0], [1.0, 1.0]])  # query 1: 3, 0, 1; query 2: 0, 1 (tie), 1 (tie)
    metrics = recall.compute(
        query_embeddings=queries, positive_embeddings=positives, corpus_embeddings=corpus, ks=[1, 2, 3]
    )
    # Ranks 1 and 2: ties count against the positive.
    assert metrics == pytest.approx({"recall@1": 0.0, "recall@2": 0.5, "recall@3": 1.0, "mrr": (1 / 2 + 1 / 3) / 2})


def test_embeddings_match_the_package_evaluator_with_ties(recall):
    rng = np.random.default_rng(0)
    # Small integer vectors: exact float32 dot products and many ties.
    queries, positives = (rng.integers(-2, 3, size=(300, 4)).astype(np.float32) for _ in range(2))
    corpus = rng.integers(-2, 3, size=(500, 4)).astype(np.float32)
    ks = [1, 5, 10, 100]
    expected = recall_metrics(positive_ranks(queries, positives, corpus), ks)
    metrics = recall.compute(
        query_embeddings=torch.from_numpy(queries), positive_embeddings=positives, corpus_embeddings=corpus, ks=ks
    )
    assert metrics == pytest.approx(expected)


def test_ids_match_the_package_evaluator(recall):
    # Rank every corpus id by score and append the positive after its ties: its position is its rank.
    rng = np.random.default_rng(1)
    queries, positives = (rng.integers(-2, 3, size=(50, 4)) for _ in range(2))
    corpus = rng.integers(-2, 3, size=(80, 4))
    ranks = positive_ranks(queries, positives, corpus)
    predictions = []
    for q, p in zip(queries, positives, strict=True):
        scores = corpus @ q  # (corpus_size,)
        order = np.argsort(-scores, kind="stable")
        ahead = [f"c{j}" for j in order if scores[j] >= q @ p]
        predictions.append(ahead + ["positive"] + [f"c{j}" for j in order if scores[j] < q @ p])
    metrics = recall.compute(predictions=predictions, references=["positive"] * 50, ks=[1, 10, 50])
    assert metrics == pytest.approx(recall_metrics(ranks, [1, 10, 50]))


def ones(*shapes):
    """Embedding-mode kwargs of the given (query, positive, corpus) shapes; ``None`` leaves one out."""
    return {name: np.ones(shape) for name, shape in zip(EMBEDDINGS, shapes, strict=True) if shape is not None}


EMBEDDINGS = ("query_embeddings", "positive_embeddings", "corpus_embeddings")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"predictions": [["a"], ["b"]], "references": ["a"]}, "one entry per query"),
        ({"predictions": [["a"]]}, "one entry per query"),
        ({"predictions": [], "references": []}, "empty"),
        ({"predictions": [["a"]], "references": [[]]}, "no relevant ids"),
        ({"predictions": [["a"]], "references": ["a"], "ks": [0]}, "positive ints"),
        (ones((2, 3), (3, 3), (4, 3)), "equal shape"),
        (ones((2, 3), (2, 3), (4, 2)), "corpus_size, dim"),
        (ones((0, 3), (0, 3), (4, 3)), "empty"),
        (ones((2, 3), None, (4, 3)), "missing"),
        ({"predictions": [["a"]], "references": ["a"], "query_embeddings": np.ones((1, 3))}, "not both"),
    ],
)
def test_bad_input_raises(recall, kwargs, match):
    with pytest.raises(ValueError, match=match):
        recall.compute(**kwargs)
