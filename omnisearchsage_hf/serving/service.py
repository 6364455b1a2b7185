"""The HTTP service: query embeddings and entity retrieval over ASGI (Starlette), with Prometheus metrics.

Endpoints (JSON in, JSON out):

- ``POST /embed/query`` ``{"query": "red dress"}`` -> ``{"embedding": [256 floats]}``
- ``POST /search`` ``{"query": "red dress", "k": 10, "entity_types": ["pin"]}`` ->
  ``{"results": {"pin": [{"id": "p1", "score": 0.83}, …]}}`` (``entity_types`` defaults to every type)
- ``GET /health`` -> ``{"status": "ok", "entity_types": {"pin": 1000000}, "cache": {…counters…}}``
- ``GET /metrics`` -> Prometheus text: requests by endpoint and status, a latency histogram per
  endpoint, client disconnects per endpoint, connections the server closed (by reason), cache hits /
  misses / hit rate / size / bytes, model calls and model queries.

Bad requests get a 4xx with ``{"error": "<what is wrong and how to fix it>"}`` and change nothing:
400 for a body that is not a JSON object, 413 for a body over ``HttpLimits.max_body_bytes``, 422 for a
field with a bad value (missing, empty or too long query, ``k`` out of range, unknown entity type). An
error names the field, the JSON type and the limit, never the request's own text, so its length is bounded
whatever the client sent. Handlers are plain async functions with orjson, so a cache hit costs a few tens
of microseconds of Python on top of the HTTP parsing.

Under abuse (:class:`HttpLimits`, all applied by :func:`serve`; the app alone applies the body limit): a
body is counted as it streams and refused with a 413 at the limit (a ``Content-Length`` over it before a
byte is read); a connection whose headers or body do not arrive in time (slowloris) gets a 408, one whose
headers are too large a 431, and is closed; a client that goes away mid-request is counted in
``omnisearchsage_client_disconnects_total``, not as a 500, and logs nothing. ``bench/serve_abuse.py``
measures all of it against the running service.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import orjson
import uvicorn
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from .ann_index import EntityIndex
from .http_limits import REFUSED, HttpLimits, LimitedHttpProtocol, refusal
from .query_cache import CachedQueryEmbedder

JSON = "application/json"
# Fine buckets below 20 ms: the paper's targets are p50 3 ms and p90 20 ms.
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class RequestError(Exception):
    """A client error: answered with ``status`` and ``{"error": message}`` (and ``Connection: close`` if ``close``)."""

    def __init__(self, status: int, message: str, *, close: bool = False):
        super().__init__(message)
        self.status = status
        self.message = message
        self.close = close


class _CacheCollector:
    """Exports the embedder's counters at scrape time (nothing is updated per request)."""

    def __init__(self, embedder: CachedQueryEmbedder):
        self.embedder = embedder

    def collect(self):
        stats = self.embedder.stats()
        for name, value, help_text in (
            ("query_cache_hits", stats.hits, "Query embeddings answered from the cache."),
            ("query_cache_misses", stats.misses, "Query embeddings not in the cache."),
            ("query_cache_coalesced", stats.coalesced, "Misses that joined an identical pending query."),
            ("query_cache_expirations", stats.expirations, "Cache entries dropped past their TTL."),
            ("query_cache_evictions", stats.evictions, "Cache entries dropped for the size bound."),
            ("model_calls", stats.model_calls, "Query tower calls (one per micro-batch)."),
            ("model_queries", stats.model_queries, "Queries embedded by the query tower."),
        ):
            yield CounterMetricFamily(f"omnisearchsage_{name}", help_text, value=value)
        yield GaugeMetricFamily("omnisearchsage_query_cache_hit_rate", "Hits / (hits + misses).", stats.hit_rate)
        yield GaugeMetricFamily("omnisearchsage_query_cache_size", "Entries in the query cache.", stats.size)
        yield GaugeMetricFamily("omnisearchsage_query_cache_bytes", "Memory held by the query cache.", stats.bytes)


def create_app(
    embedder: CachedQueryEmbedder,
    index: EntityIndex | None = None,
    *,
    limits: HttpLimits | None = None,
    max_query_chars: int = 1000,
    max_k: int = 1000,
) -> Starlette:
    """The ASGI application; serve it with :func:`serve` or test it with ``starlette.testclient``.

    The app itself enforces ``limits.max_body_bytes`` (under any ASGI server). The timeouts and the header
    limit need the connection, so only :func:`serve` applies them (it reads ``app.state.limits``); there the
    connection also refuses an oversized body, before the app sees it.

    Args:
        embedder: The cached query embedder (owns the query tower).
        index: Entity index for ``/search``; None answers ``/search`` with 503.
        limits: Request size and time limits (default ``HttpLimits()``: 64 KB bodies, 10 s timeouts).
        max_query_chars: Longest query accepted (default 1,000; the tower reads 64 tokens at most).
        max_k: Largest ``k`` accepted by ``/search`` (default 1,000).

    Example:
        ```python
        from starlette.testclient import TestClient
        app = create_app(CachedQueryEmbedder(query_tower.encode), EntityIndex.load("index/"))
        with TestClient(app) as client:
            print(client.post("/search", json={"query": "red dress", "k": 2}).json())
        # {'results': {'pin': [{'id': 'p17', 'score': 0.71}, {'id': 'p3', 'score': 0.69}]}}
        ```
    """
    limits = limits if limits is not None else HttpLimits()
    registry = CollectorRegistry()
    requests = Counter("omnisearchsage_requests", "HTTP requests.", ("endpoint", "status"), registry=registry)
    disconnects = Counter(
        "omnisearchsage_client_disconnects",
        "Requests whose client went away while its body was being read (not errors of the service).",
        ("endpoint",),
        registry=registry,
    )
    closed = Counter(
        "omnisearchsage_connections_closed",
        "Connections the server answered and closed for a limit (reason: header_timeout, body_timeout, "
        "headers_too_large, body_too_large).",
        ("reason",),
        registry=registry,
    )
    latency = Histogram(
        "omnisearchsage_request_latency_seconds",
        "Time spent in the handler, per endpoint.",
        ("endpoint",),
        buckets=LATENCY_BUCKETS,
        registry=registry,
    )
    registry.register(_CacheCollector(embedder))

    def endpoint(name: str, handler: Callable[[Request], Awaitable[Response]]):
        observe = latency.labels(name).observe
        ok = requests.labels(name, "200")  # bound once: the hot path skips the label lookup

        async def wrapped(request: Request) -> Response:
            start = time.perf_counter()
            try:
                response = await handler(request)
                ok.inc()
            except RequestError as error:
                headers = {"connection": "close"} if error.close else None
                response = Response(orjson.dumps({"error": error.message}), error.status, headers, media_type=JSON)
                requests.labels(name, str(error.status)).inc()
            except ClientDisconnect:  # nobody to answer: counted apart, no traceback
                if REFUSED not in request.scope.get("state", {}):  # else the server counted its reason
                    disconnects.labels(name).inc()
                return Response(status_code=499)  # nginx's "client closed request"; never sent
            except Exception:
                requests.labels(name, "500").inc()  # Starlette answers 500 and keeps serving
                raise
            observe(time.perf_counter() - start)
            return response

        return wrapped

    async def read_body(request: Request) -> bytes:
        """The body, read as it streams and refused with a 413 once past the limit (never held whole)."""
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limits.max_body_bytes:
            raise _body_too_large(limits)  # before reading a byte of it
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limits.max_body_bytes:  # a chunked body, or a Content-Length the server did not enforce
                raise _body_too_large(limits)
            chunks.append(chunk)
        return b"".join(chunks)

    async def read_json(request: Request) -> dict:
        body = await read_body(request)
        try:
            payload = orjson.loads(body)
        except orjson.JSONDecodeError as error:
            raise RequestError(400, f"The request body is not valid JSON ({error}).") from None
        if not isinstance(payload, dict):
            raise RequestError(400, f"The request body must be a JSON object, got {_json_type(payload)}.")
        return payload

    def read_query(payload: dict) -> str:
        query = payload.get("query")
        if not isinstance(query, str):
            raise RequestError(422, f'Field "query" must be a string, got {_json_type(query)}.')
        if not query.strip():
            raise RequestError(422, 'Field "query" is empty: send the text to embed.')
        if len(query) > max_query_chars:
            raise RequestError(
                422, f'Field "query" has {len(query)} characters; the limit is {max_query_chars}. Shorten it.'
            )
        return query

    async def embed_query(request: Request) -> Response:
        vector = await embedder.embed(read_query(await read_json(request)))
        return Response(orjson.dumps({"embedding": vector}, option=orjson.OPT_SERIALIZE_NUMPY), media_type=JSON)

    async def search(request: Request) -> Response:
        payload = await read_json(request)
        query = read_query(payload)
        if index is None:
            raise RequestError(503, "This service has no entity index: start it with --index DIR.")
        k = payload.get("k", 10)
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= max_k:
            got = "an integer out of that range" if isinstance(k, int) and not isinstance(k, bool) else _json_type(k)
            raise RequestError(422, f'Field "k" must be an integer in [1, {max_k}], got {got}.')
        entity_types = payload.get("entity_types", index.entity_types)
        if not isinstance(entity_types, list) or not entity_types or not all(isinstance(t, str) for t in entity_types):
            raise RequestError(
                422, f'Field "entity_types" must be a non-empty array of strings; this index has {index.entity_types}.'
            )
        unknown = [position for position, t in enumerate(entity_types) if t not in index.entity_types]
        if unknown:
            raise RequestError(
                422,
                f'Field "entity_types" has {len(unknown)} unknown type(s), the first at position {unknown[0]}; '
                f"this index has {index.entity_types}.",
            )
        vector = await embedder.embed(query)
        found = index.search(vector, k, entity_types)
        results = {
            entity_type: [{"id": i, "score": float(s)} for i, s in zip(result.ids[0], result.scores[0], strict=False)]
            for entity_type, result in found.items()
        }
        return Response(orjson.dumps({"results": results}), media_type=JSON)

    async def health(request: Request) -> Response:
        body = {
            "status": "ok",
            "entity_types": index.sizes() if index is not None else {},
            "cache": embedder.stats().to_dict(),
        }
        return Response(orjson.dumps(body), media_type=JSON)

    async def metrics(request: Request) -> Response:
        return Response(generate_latest(registry), media_type="text/plain; version=0.0.4; charset=utf-8")

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        embedder.close()

    app = Starlette(
        routes=[
            Route("/embed/query", endpoint("embed_query", embed_query), methods=["POST"]),
            Route("/search", endpoint("search", search), methods=["POST"]),
            Route("/health", endpoint("health", health), methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
        ],
        lifespan=lifespan,
    )
    app.state.limits = limits
    app.state.count_closed = lambda reason: closed.labels(reason).inc()
    return app


def server_config(
    app: Starlette, *, host: str = "127.0.0.1", port: int = 8000, log_level: str = "warning"
) -> uvicorn.Config:
    """uvicorn's configuration for ``app`` (from :func:`create_app`) with all of the app's :class:`HttpLimits`.

    uvicorn's httptools protocol with deadlines and size caps (:class:`LimitedHttpProtocol`), its own
    ``timeout_keep_alive`` and ``limit_concurrency``, and no access log (the metrics count requests).
    """
    limits: HttpLimits = app.state.limits
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        access_log=False,
        http=functools.partial(LimitedHttpProtocol, limits=limits, on_close=app.state.count_closed),
        timeout_keep_alive=limits.keep_alive_timeout,
        limit_concurrency=limits.max_connections,
    )


def serve(app: Starlette, *, host: str = "127.0.0.1", port: int = 8000, log_level: str = "warning") -> None:
    """Serve ``app`` under uvicorn with :func:`server_config` until stopped (Ctrl-C or SIGTERM)."""
    uvicorn.Server(server_config(app, host=host, port=port, log_level=log_level)).run()


def _body_too_large(limits: HttpLimits) -> RequestError:
    status, message = refusal("body_too_large", limits)
    return RequestError(status, message, close=True)  # close: stop reading the rest


def _json_type(value: object) -> str:
    """The JSON type of a parsed value: errors name it instead of echoing the value."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "an array" if isinstance(value, list) else "an object"


__all__ = [
    "LATENCY_BUCKETS",
    "RequestError",
    "create_app",
    "serve",
    "server_config",
]
