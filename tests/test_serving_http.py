"""The HTTP service in process (Starlette TestClient): good requests, bad requests, metrics, and the CLI."""

import json
import socket
import subprocess
import sys
import time

import faiss
import httpx
import numpy as np
import pytest
import torch
import uvicorn
from starlette.testclient import TestClient

from omnisearchsage_hf import OmniSearchSageQueryModel
from omnisearchsage_hf.cli_errors import UsageError
from omnisearchsage_hf.serving import CachedQueryEmbedder, EntityIndex, create_app
from omnisearchsage_hf.serving.cli import serve_main


@pytest.fixture(scope="module")
def tower(tiny_backbone_dir):
    return OmniSearchSageQueryModel.from_backbone(tiny_backbone_dir, out_dim=16)


@pytest.fixture(scope="module")
def index(tower):
    pins = tower.encode(["red dress", "copper sink", "kitchen lamp", "wall art", "summer shoes"])
    products = tower.encode(["antique copper bathroom sink", "red summer dress"])
    index = EntityIndex(dim=16)
    index.add("pin", ["p-dress", "p-sink", "p-lamp", "p-art", "p-shoes"], pins)
    index.add("product", ["sku-sink", "sku-dress"], products)
    return index


@pytest.fixture
def client(tower, index):
    app = create_app(CachedQueryEmbedder(tower.encode, max_wait_ms=0), index, max_query_chars=100)
    with TestClient(app) as client:
        yield client


def test_embed_query_matches_the_tower_and_is_cached(client, tower):
    first = client.post("/embed/query", json={"query": "red dress"})
    assert first.status_code == 200 and first.headers["content-type"] == "application/json"
    np.testing.assert_allclose(first.json()["embedding"], tower.encode("red dress"), atol=1e-6)
    assert client.post("/embed/query", json={"query": "red dress"}).json() == first.json()
    cache = client.get("/health").json()["cache"]
    assert (cache["hits"], cache["misses"], cache["model_calls"]) == (1, 1, 1)


def test_search_per_entity_type(client):
    response = client.post("/search", json={"query": "copper sink", "k": 2, "entity_types": ["pin", "product"]})
    assert response.status_code == 200
    results = response.json()["results"]
    assert results["pin"][0]["id"] == "p-sink" and len(results["pin"]) == 2
    assert {r["id"] for r in results["product"]} == {"sku-sink", "sku-dress"}
    assert results["pin"][0]["score"] == pytest.approx(1.0, abs=1e-5)
    only = client.post("/search", json={"query": "red dress"}).json()["results"]
    assert only.keys() == {"pin", "product"} and len(only["pin"]) == 5  # default k=10, capped by the type's size


def test_health(client):
    body = client.get("/health").json()
    assert body["status"] == "ok" and body["entity_types"] == {"pin": 5, "product": 2}


BAD_REQUESTS = [
    ("/embed/query", b"{not json", 400, "not valid JSON"),
    ("/embed/query", b"[1, 2]", 400, "must be a JSON object, got list"),
    ("/embed/query", b'{"q": "x"}', 422, 'Field "query" must be a string, got NoneType'),
    ("/embed/query", b'{"query": 5}', 422, 'Field "query" must be a string, got int'),
    ("/embed/query", b'{"query": "   "}', 422, 'Field "query" is empty'),
    ("/embed/query", json.dumps({"query": "x" * 10_000}).encode(), 422, "has 10000 characters; the limit is 100"),
    ("/search", b'{"query": "x", "entity_types": ["board"]}', 422, r"Unknown entity type(s) ['board']"),
    ("/search", b'{"query": "x", "entity_types": []}', 422, '"entity_types" must be a non-empty list'),
    ("/search", b'{"query": "x", "k": 0}', 422, 'Field "k" must be an integer in [1, 1000], got int 0'),
    ("/search", b'{"query": "x", "k": true}', 422, 'Field "k" must be an integer'),
    ("/search", b"", 400, "not valid JSON"),
]


@pytest.mark.parametrize(("path", "body", "status", "message"), BAD_REQUESTS)
def test_bad_requests_get_a_clear_4xx_and_the_service_keeps_serving(client, path, body, status, message):
    response = client.post(path, content=body, headers={"content-type": "application/json"})
    assert response.status_code == status
    assert message in response.json()["error"]
    assert client.post("/embed/query", json={"query": "lamp"}).status_code == 200


def test_wrong_method_and_path(client):
    assert client.get("/embed/query").status_code == 405
    assert client.post("/nope", json={}).status_code == 404


def test_search_without_index(tower):
    with TestClient(create_app(CachedQueryEmbedder(tower.encode), None)) as client:
        response = client.post("/search", json={"query": "x"})
        assert response.status_code == 503 and "--index" in response.json()["error"]


def test_model_failure_is_a_500_and_the_service_recovers(tower):
    failures = iter([True])

    def encode(queries):
        if next(failures, False):
            raise RuntimeError("model down")
        return tower.encode(queries)

    with TestClient(create_app(CachedQueryEmbedder(encode, max_wait_ms=0)), raise_server_exceptions=False) as client:
        assert client.post("/embed/query", json={"query": "x"}).status_code == 500
        assert client.post("/embed/query", json={"query": "x"}).status_code == 200
        assert 'omnisearchsage_requests_total{endpoint="embed_query",status="500"} 1.0' in client.get("/metrics").text


def test_metrics_prometheus_text(client):
    client.post("/embed/query", json={"query": "red dress"})
    client.post("/embed/query", json={"query": "red dress"})
    client.post("/embed/query", content=b"{bad", headers={"content-type": "application/json"})
    client.post("/search", json={"query": "red dress", "k": 1})
    text = client.get("/metrics").text
    samples = {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }
    assert samples['omnisearchsage_requests_total{endpoint="embed_query",status="200"}'] == 2
    assert samples['omnisearchsage_requests_total{endpoint="embed_query",status="400"}'] == 1
    assert samples['omnisearchsage_requests_total{endpoint="search",status="200"}'] == 1
    assert samples['omnisearchsage_request_latency_seconds_count{endpoint="embed_query"}'] == 3
    assert samples['omnisearchsage_request_latency_seconds_bucket{endpoint="embed_query",le="+Inf"}'] == 3
    assert samples["omnisearchsage_query_cache_hits_total"] == 2  # the second embed and the search
    assert samples["omnisearchsage_query_cache_misses_total"] == 1
    assert samples["omnisearchsage_query_cache_hit_rate"] == pytest.approx(2 / 3)
    assert samples["omnisearchsage_model_calls_total"] == 1 and samples["omnisearchsage_model_queries_total"] == 1
    assert "# TYPE omnisearchsage_request_latency_seconds histogram" in text


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_serve_command(tower, index, tmp_path):
    """`omnisearchsage-serve --query-model DIR --index DIR` answers on 127.0.0.1 until stopped."""
    tower.save_pretrained(tmp_path / "query_tower")
    index.save(tmp_path / "index")
    port = _free_port()
    command = [sys.executable, "-m", "omnisearchsage_hf.serving.cli", "serve", "--query-model",
               str(tmp_path / "query_tower"), "--index", str(tmp_path / "index"), "--port", str(port)]  # fmt: skip
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                response = httpx.post(f"http://127.0.0.1:{port}/search", json={"query": "copper sink", "k": 1})
                break
            except httpx.TransportError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the server did not start: {server.stderr.read().decode()}") from None
                time.sleep(0.2)
        assert response.status_code == 200 and response.json()["results"]["pin"][0]["id"] == "p-sink"
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.fixture
def saved(tower, index, tmp_path, monkeypatch):
    """The query tower and index saved to folders, and `uvicorn.run` replaced: `serve_main` returns instead of serving.

    `serve_main` sets the process-wide torch and faiss thread counts; they are put back afterwards.
    """
    tower.save_pretrained(tmp_path / "query_tower")
    index.save(tmp_path / "index")
    runs = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: runs.append(kwargs))
    monkeypatch.delenv("OMNISEARCHSAGE_DEBUG", raising=False)
    threads, faiss_threads = torch.get_num_threads(), faiss.omp_get_max_threads()
    yield tmp_path, runs
    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(faiss_threads)


def test_serve_prints_its_url_and_what_it_loaded(saved, capsys):
    folder, runs = saved
    argv = ["--query-model", str(folder / "query_tower"), "--port", "8123", "--cache-size", "1000", "--ttl-days", "7"]
    assert serve_main(argv + ["--index", str(folder / "index")]) == 0
    assert runs == [{"host": "127.0.0.1", "port": 8123, "log_level": "warning", "access_log": False}]
    assert capsys.readouterr().out.splitlines() == [
        f"omnisearchsage-serve: http://127.0.0.1:8123 with query tower {folder / 'query_tower'} (out_dim 16)",
        f"omnisearchsage-serve: index {folder / 'index'} (pin 5, product 2); query cache up to 1000 queries, "
        "TTL 7 days",
    ]
    assert serve_main(argv + ["--cache-size", "0", "--host", "::1"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"omnisearchsage-serve: http://[::1]:8123 with query tower {folder / 'query_tower'} (out_dim 16)",
        "omnisearchsage-serve: no index: /search disabled; query cache disabled",
    ]


def test_serve_refuses_an_index_of_another_dimension(saved, capsys):
    """Caught at start-up (not as a 500 on every /search): both folders and both dimensions, before uvicorn runs."""
    folder, runs = saved
    other = EntityIndex(dim=8)
    other.add("pin", ["p"], np.eye(8, dtype=np.float32)[:1])
    other.save(folder / "index8")
    argv = ["--query-model", str(folder / "query_tower"), "--index", str(folder / "index8")]
    assert serve_main(argv) == 2
    error = capsys.readouterr().err.splitlines()[0]
    assert error.startswith("omnisearchsage-serve: error: --query-model")
    assert str(folder / "query_tower") in error and str(folder / "index8") in error
    assert "in 16 dimensions" in error and "holds 8-dimensional entity embeddings" in error
    assert runs == []
    with pytest.raises(UsageError, match="holds 8-dimensional"):
        serve_main(argv + ["--debug"])


def test_serve_refuses_an_entity_tower(saved, make_entity_tower, capsys):
    folder, runs = saved
    make_entity_tower().save_pretrained(folder / "entity_tower")
    capsys.readouterr()  # drop the save's progress bar
    assert serve_main(["--query-model", str(folder / "entity_tower")]) == 2
    error = capsys.readouterr().err.splitlines()[0]
    assert "--query-model needs a query tower folder" in error and str(folder / "entity_tower") in error
    assert "'omnisearchsage_entity' model" in error and "omnisearchsage-embed --entity-model" in error
    assert runs == []
