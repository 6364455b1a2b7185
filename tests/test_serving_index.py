"""HNSW entity index: recall against exact search, per-type search, ids, save/load, errors."""

import json

import numpy as np
import pytest

from omnisearchsage_hf.serving.ann_index import EntityIndex, build_entity_index, exact_search, recall_at_k


def unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    centroids = unit(rng.standard_normal((50, 32)))
    pins = unit(centroids[rng.integers(0, 50, 3000)] + 0.3 * rng.standard_normal((3000, 32)))
    products = unit(rng.standard_normal((500, 32)))
    queries = unit(centroids[rng.integers(0, 50, 200)] + 0.3 * rng.standard_normal((200, 32)))
    return pins, products, queries


@pytest.fixture(scope="module")
def index(data):
    pins, products, _ = data
    return build_entity_index(
        {"pin": ([f"pin{i}" for i in range(len(pins))], pins), "product": ([f"prod{i}" for i in range(500)], products)},
        recall_queries=200,
    )


def test_exact_search_matches_argsort():
    rng = np.random.default_rng(1)
    corpus, queries = unit(rng.standard_normal((1000, 16))), unit(rng.standard_normal((20, 16)))
    expected = np.argsort(-(queries @ corpus.T), axis=1, kind="stable")[:, :7]
    np.testing.assert_array_equal(exact_search(queries, corpus, 7, chunk_size=64), expected)


def test_recall_at_k():
    assert recall_at_k(np.array([[1, 2], [3, 4]]), np.array([[2, 1], [3, 9]])) == 0.75


def test_hnsw_recall_against_exact_search(index, data):
    pins, _, queries = data
    exact = exact_search(queries, pins, 10)
    found = index.search(queries, k=10, entity_types=["pin"])["pin"]
    rows = np.array([[int(i[3:]) for i in ids] for ids in found.ids])
    assert recall_at_k(rows, exact) >= 0.95
    assert index.recall("pin", queries) == pytest.approx(recall_at_k(rows, exact))
    assert index.recall_at_10["pin"] >= 0.95 and index.recall_at_10["product"] >= 0.95
    # Scores are the inner products of the returned entities, best first.
    np.testing.assert_allclose(found.scores, np.einsum("qd,qkd->qk", queries, pins[rows]), atol=1e-5)
    assert (np.diff(found.scores, axis=1) <= 1e-6).all()


def test_chunked_add_under_a_progress_bar(data, capsys):
    """The graph is built a chunk at a time under a labelled bar; ids and recall are as with one `add` call."""
    pins, _, queries = data
    index = EntityIndex(dim=32, m=16, ef_construction=64)
    index.add("pin", [f"pin{i}" for i in range(len(pins))], pins, chunk_size=700, show_progress_bar=True)
    assert "Building HNSW index (pin)" in capsys.readouterr().err
    assert index.sizes() == {"pin": 3000}
    assert index.search(pins[[5, 2999]], k=1)["pin"].ids == [["pin5"], ["pin2999"]]
    assert index.recall("pin", queries) >= 0.95


def test_types_are_separate(index, data):
    _, products, _ = data
    both = index.search(products[0], k=3)
    assert set(both) == {"pin", "product"}
    assert both["product"].ids[0][0] == "prod0"
    assert all(i.startswith("pin") for i in both["pin"].ids[0])
    assert index.search(products[0], k=3, entity_types=["product"]).keys() == {"product"}
    assert index.sizes() == {"pin": 3000, "product": 500}


def test_save_load_roundtrip(index, data, tmp_path):
    _, _, queries = data
    index.save(tmp_path / "idx")
    loaded = EntityIndex.load(tmp_path / "idx")
    manifest = json.loads((tmp_path / "idx" / "index.json").read_text())
    assert manifest["sizes"] == {"pin": 3000, "product": 500} and manifest["recall_at_10"] == index.recall_at_10
    # Every other file of the folder, with the SHA-256 the load checks (corruptions: test_integrity.py).
    files = sorted(p.name for p in (tmp_path / "idx").iterdir() if p.name != "index.json")
    assert sorted(manifest["files"]) == files == ["pin.faiss", "pin.ids.json", "product.faiss", "product.ids.json"]
    assert all(len(digest) == 64 for digest in manifest["files"].values())
    before, after = index.search(queries, k=10), loaded.search(queries, k=10)
    for entity_type in ("pin", "product"):
        assert before[entity_type].ids == after[entity_type].ids
        np.testing.assert_array_equal(before[entity_type].scores, after[entity_type].scores)
    loaded.ef_search = 16
    assert loaded.ef_search == 16


def test_k_larger_than_type_and_duplicate_ids():
    index = EntityIndex(dim=4)
    index.add("pin", ["a", "b"], unit(np.eye(4, dtype=np.float32)[:2]))
    result = index.search(np.eye(4, dtype=np.float32)[0], k=5)["pin"]
    assert result.ids == [["a", "b"]]
    np.testing.assert_array_equal(result.scores, [[1.0, 0.0, -np.inf, -np.inf, -np.inf]])
    with pytest.raises(ValueError, match="must be unique"):
        index.add("pin", ["a"], unit(np.ones((1, 4))))


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda i: i.search(np.ones(4), entity_types=["board"]), KeyError, r"Unknown entity type\(s\) \['board'\]"),
        (lambda i: i.search(np.ones(3)), ValueError, r"shape \(n, 4\)"),
        (lambda i: i.search(np.ones(4), k=0), ValueError, "`k` must be a positive int"),
        (lambda i: i.add("pin/x", ["z"], np.ones((1, 4))), ValueError, "names files"),
        (lambda i: i.add("pin", ["z", "y"], np.ones((1, 4))), ValueError, "2 ids for 1 embeddings"),
        (lambda i: i.search(np.full(4, np.nan)), ValueError, "NaN"),
        (lambda i: i.add("pin", ["z"], np.ones((1, 4)), chunk_size=0), ValueError, "`chunk_size` must be a positive"),
    ],
)
def test_errors(call, error, match):
    index = EntityIndex(dim=4)
    index.add("pin", ["a"], unit(np.ones((1, 4))))
    with pytest.raises(error, match=match):
        call(index)


def test_load_of_unfinished_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="omnisearchsage-index"):
        EntityIndex.load(tmp_path)
