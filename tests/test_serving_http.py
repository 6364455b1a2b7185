"""The HTTP service in process (Starlette TestClient): good requests, bad requests, metrics, and the CLI;
and under uvicorn with its limits (oversized, slow and cut-off requests) on 127.0.0.1."""

import asyncio
import json
import logging
import socket
import subprocess
import sys
import threading
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
from omnisearchsage_hf.serving import service as service_module
from omnisearchsage_hf.serving.cli import serve_main
from omnisearchsage_hf.serving.http_limits import HttpLimits
from omnisearchsage_hf.serving.service import server_config


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
    ("/embed/query", b"[1, 2]", 400, "must be a JSON object, got an array"),
    ("/embed/query", b'{"q": "x"}', 422, 'Field "query" must be a string, got null'),
    ("/embed/query", b'{"query": 5}', 422, 'Field "query" must be a string, got a number'),
    ("/embed/query", b'{"query": "   "}', 422, 'Field "query" is empty'),
    ("/embed/query", json.dumps({"query": "x" * 10_000}).encode(), 422, "has 10000 characters; the limit is 100"),
    ("/search", b'{"query": "x", "entity_types": ["pin", "board"]}', 422, "1 unknown type(s), the first at position 1"),
    ("/search", b'{"query": "x", "entity_types": []}', 422, '"entity_types" must be a non-empty array'),
    ("/search", b'{"query": "x", "k": 0}', 422, 'Field "k" must be an integer in [1, 1000], got an integer out of'),
    ("/search", b'{"query": "x", "k": true}', 422, 'Field "k" must be an integer in [1, 1000], got a boolean'),
    ("/search", b"", 400, "not valid JSON"),
]


@pytest.mark.parametrize(("path", "body", "status", "message"), BAD_REQUESTS)
def test_bad_requests_get_a_clear_4xx_and_the_service_keeps_serving(client, path, body, status, message):
    response = client.post(path, content=body, headers={"content-type": "application/json"})
    assert response.status_code == status
    assert message in response.json()["error"]
    assert client.post("/embed/query", json={"query": "lamp"}).status_code == 200


MARKER = "zq-echo-marker-7f3a"
ECHO_BODIES = [
    f'{{"query": "{MARKER}"'.encode(),
    f'{{"query": {MARKER}}}'.encode(),
    f'["{MARKER}"]'.encode(),
    f'{{"query": ["{MARKER}"]}}'.encode(),
    f'{{"query": {{"{MARKER}": 1}}}}'.encode(),
    f'{{"query": "x", "k": "{MARKER}"}}'.encode(),
    f'{{"query": "x", "entity_types": ["{MARKER}"]}}'.encode(),
    f'{{"query": "x", "entity_types": ["{MARKER}", 5]}}'.encode(),
    f'{{"query": "{MARKER * 100}"}}'.encode(),
    MARKER.encode() + b"\xff\xfe",
    f'{{"query": "{MARKER * 10_000}"}}'.encode(),  # over the 64 KB body limit
]


@pytest.mark.parametrize("body", ECHO_BODIES)
def test_error_bodies_never_echo_the_request(client, body):
    """The answer names the field, type and limit; not one byte of what was sent, however much was sent."""
    response = client.post("/search", content=body, headers={"content-type": "application/json"})
    assert 400 <= response.status_code < 500, response.text
    assert MARKER not in response.text and MARKER[:6] not in response.text
    assert len(response.content) < 300


def _fake_encode(queries: list[str]) -> np.ndarray:
    return np.ones((len(queries), 4), dtype=np.float32) / 2


def test_a_body_over_the_limit_is_a_413_naming_the_limit_and_the_flag():
    app = create_app(CachedQueryEmbedder(_fake_encode, max_wait_ms=0), limits=HttpLimits(max_body_bytes=100))
    with TestClient(app) as client:
        just_fits = json.dumps({"query": "x" * 87}).encode()
        assert len(just_fits) == 100
        assert client.post("/embed/query", content=just_fits).status_code == 200
        response = client.post("/embed/query", content=just_fits[:-1] + b" }")
        assert response.status_code == 413 and response.headers["connection"] == "close"
        assert "larger than 100 bytes" in response.json()["error"] and "--max-body-bytes" in response.json()["error"]


def _asgi_call(app, path: str, headers: list[tuple[bytes, bytes]], messages) -> tuple[list[dict], int]:
    """Call ``app`` directly with ``messages`` as the request's ASGI events; returns what it sent and how many
    events it read."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "", "headers": headers,
             "client": ("127.0.0.1", 5), "server": ("127.0.0.1", 8000), "state": {}}  # fmt: skip
    sent, read = [], 0

    async def receive():
        nonlocal read
        read += 1
        return next(messages)

    async def send(message):
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    return sent, read


def test_a_body_longer_than_its_content_length_is_cut_at_the_limit():
    """The app counts what streams in: a small declared length (or none) does not let a big body through."""
    app = create_app(CachedQueryEmbedder(_fake_encode), limits=HttpLimits(max_body_bytes=1000))
    endless = ({"type": "http.request", "body": b"x" * 600, "more_body": True} for _ in range(10_000))
    sent, read = _asgi_call(app, "/embed/query", [(b"content-length", b"10")], endless)
    assert sent[0]["status"] == 413 and read == 2  # refused at the second chunk, 1,200 bytes in
    declared, _ = _asgi_call(app, "/embed/query", [(b"content-length", b"1001")], iter([]))
    assert declared[0]["status"] == 413  # refused without reading


def test_a_client_disconnect_is_counted_apart_from_500s_and_logs_nothing(caplog):
    app = create_app(CachedQueryEmbedder(_fake_encode))
    cut_off = iter([{"type": "http.request", "body": b'{"query": "ab', "more_body": True}, {"type": "http.disconnect"}])
    with caplog.at_level(logging.DEBUG):
        _asgi_call(app, "/search", [(b"content-length", b"100")], cut_off)
    assert [record for record in caplog.records if record.levelno >= logging.WARNING] == []
    with TestClient(app) as client:
        text = client.get("/metrics").text
    assert 'omnisearchsage_client_disconnects_total{endpoint="search"} 1.0' in text
    assert 'status="500"' not in text


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
    """The query tower and index saved to folders, and `serve` replaced: `serve_main` returns instead of serving.

    `serve_main` sets the process-wide torch and faiss thread counts; they are put back afterwards.
    """
    tower.save_pretrained(tmp_path / "query_tower")
    index.save(tmp_path / "index")
    runs = []
    monkeypatch.setattr(service_module, "serve", lambda app, **kwargs: runs.append({"app": app, **kwargs}))
    monkeypatch.delenv("OMNISEARCHSAGE_DEBUG", raising=False)
    threads, faiss_threads = torch.get_num_threads(), faiss.omp_get_max_threads()
    yield tmp_path, runs
    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(faiss_threads)


def test_serve_prints_its_url_and_what_it_loaded(saved, capsys):
    folder, runs = saved
    argv = ["--query-model", str(folder / "query_tower"), "--port", "8123", "--cache-size", "1000", "--ttl-days", "7"]
    assert serve_main(argv + ["--index", str(folder / "index")]) == 0
    assert [{k: v for k, v in run.items() if k != "app"} for run in runs] == [
        {"host": "127.0.0.1", "port": 8123, "log_level": "warning"}
    ]
    assert runs[0]["app"].state.limits == HttpLimits()  # the defaults
    assert capsys.readouterr().out.splitlines() == [
        f"omnisearchsage-serve: http://127.0.0.1:8123 with query tower {folder / 'query_tower'} (out_dim 16)",
        f"omnisearchsage-serve: index {folder / 'index'} (pin 5, product 2); query cache up to 1024 MiB and 1000 "
        "queries, TTL 7 days",
    ]
    assert serve_main(argv + ["--cache-bytes", "0", "--host", "::1"]) == 0
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


def test_serve_limit_flags(saved, capsys):
    folder, runs = saved
    argv = ["--query-model", str(folder / "query_tower"), "--max-body-bytes", "2048", "--max-header-bytes", "4096",
            "--header-timeout", "2.5", "--body-timeout", "3", "--keep-alive-timeout", "1",
            "--max-connections", "50"]  # fmt: skip
    assert serve_main(argv) == 0
    assert runs[0]["app"].state.limits == HttpLimits(2048, 4096, 2.5, 3.0, 1.0, 50)
    config = server_config(runs[0]["app"])
    assert (config.timeout_keep_alive, config.limit_concurrency, config.access_log) == (1.0, 50, False)
    capsys.readouterr()
    assert serve_main(argv + ["--header-timeout", "0"]) == 2  # refused before the model loads
    error = capsys.readouterr().err.splitlines()[0]
    assert "--header-timeout" in error and "must be a number > 0, got 0.0" in error
    assert len(runs) == 1


# ---------------------------------------------------------------- under uvicorn, with the limits of `serve`

LIVE_LIMITS = HttpLimits(max_body_bytes=1000, max_header_bytes=2000, header_timeout=0.5, body_timeout=0.5)


@pytest.fixture(scope="module")
def live():
    """The app under uvicorn as `serve` runs it (`server_config`), in a thread, on 127.0.0.1; yields its port and
    the records uvicorn logs."""
    app = create_app(CachedQueryEmbedder(_fake_encode, max_wait_ms=0), limits=LIVE_LIMITS)
    server = uvicorn.Server(server_config(app, port=_free_port()))
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("uvicorn.error").addHandler(handler)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    yield server.config.port, records
    server.should_exit = True
    thread.join(10)
    logging.getLogger("uvicorn.error").removeHandler(handler)


def _exchange(port: int, data: bytes, *, trickle: bytes = b"", close_after_send: bool = False) -> tuple[str, float]:
    """Send ``data``, then ``trickle`` one byte every 0.1 s; the answer's status line (or "closed") and when it came."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        start = time.monotonic()
        sock.sendall(data)
        if close_after_send:
            return "", 0.0
        sock.settimeout(0.1)
        answer = b""
        for byte in [*trickle, *[None] * 50]:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                if byte is not None:
                    sock.sendall(bytes([byte]))
                continue
            if not chunk:
                break
            answer += chunk
        return (answer.split(b"\r\n", 1)[0].decode() or "closed"), time.monotonic() - start


def _head(length: int | None, extra: str = "") -> bytes:
    size = f"content-length: {length}" if length is not None else "transfer-encoding: chunked"
    return f"POST /embed/query HTTP/1.1\r\nhost: x\r\n{size}\r\n{extra}\r\n".encode()


@pytest.mark.parametrize(
    ("data", "trickle", "status", "seconds"),
    [
        (_head(100_000_000), b"", "HTTP/1.1 413 Request Entity Too Large", (0, 0.4)),  # refused before the body
        (_head(None) + b"7d0\r\n" + b"x" * 2000 + b"\r\n", b"", "HTTP/1.1 413 Request Entity Too Large", (0, 0.4)),
        (_head(2, f"x-big: {'a' * 3000}\r\n") + b"{}", b"", "HTTP/1.1 431 Request Header Fields Too Large", (0, 0.4)),
        (b"", b"", "HTTP/1.1 408 Request Timeout", (0.45, 1.5)),  # opens and sends nothing
        (b"POST /embed/query HTTP/1.1\r\n", b"x-slow: " + b"a" * 100, "HTTP/1.1 408 Request Timeout", (0.45, 1.5)),
        (_head(100) + b'{"query"', b"x" * 100, "HTTP/1.1 408 Request Timeout", (0.45, 1.5)),  # a slow body
    ],
    ids=["content-length", "chunked", "header", "silent", "slow-headers", "slow-body"],
)
def test_uvicorn_limits(live, data, trickle, status, seconds):
    """Oversized requests are answered at once, slow ones at the deadline however they trickle; then closed."""
    port, records = live
    answer, elapsed = _exchange(port, data, trickle=trickle)
    assert answer == status and seconds[0] <= elapsed <= seconds[1], (answer, elapsed)
    assert httpx.post(f"http://127.0.0.1:{port}/embed/query", json={"query": "ok"}).status_code == 200
    assert [r for r in records if r.levelno >= logging.WARNING] == []


def test_uvicorn_counts_a_disconnect_apart_without_a_traceback(live):
    port, records = live

    def disconnects() -> float:
        for line in httpx.get(f"http://127.0.0.1:{port}/metrics").text.splitlines():
            if line.startswith('omnisearchsage_client_disconnects_total{endpoint="embed_query"}'):
                return float(line.split()[-1])
        return 0.0

    before = disconnects()
    _exchange(port, _head(100) + b'{"query": "ab', close_after_send=True)
    deadline = time.monotonic() + 5
    while disconnects() == before and time.monotonic() < deadline:
        time.sleep(0.02)
    assert disconnects() == before + 1
    text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    assert 'status="500"' not in text
    assert [r for r in records if r.levelno >= logging.WARNING] == []
