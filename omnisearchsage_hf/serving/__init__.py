"""Serving (paper §3.6): batch entity inference, an HNSW entity index, and a cached query-embedding service.

Needs the ``serve`` extra: ``pip install "omnisearchsage-hf[serve]"`` (faiss-cpu, starlette, uvicorn,
orjson, prometheus-client).
"""

import importlib.util

_MISSING = [
    name
    for name in ("faiss", "starlette", "uvicorn", "httptools", "orjson", "prometheus_client")
    if not importlib.util.find_spec(name)
]
if _MISSING:
    raise ImportError(
        f"omnisearchsage_hf.serving needs {_MISSING}: install them with pip install 'omnisearchsage-hf[serve]'."
    )

from .ann_index import EntityIndex, SearchResult, build_entity_index, exact_search, recall_at_k  # noqa: E402
from .batch_inference import EntityEmbeddings, embed_entity_table  # noqa: E402
from .http_limits import HttpLimits  # noqa: E402
from .query_cache import THIRTY_DAYS, CachedQueryEmbedder, CacheStats  # noqa: E402
from .service import create_app, serve  # noqa: E402

__all__ = [
    "THIRTY_DAYS",
    "CacheStats",
    "CachedQueryEmbedder",
    "EntityEmbeddings",
    "EntityIndex",
    "HttpLimits",
    "SearchResult",
    "build_entity_index",
    "create_app",
    "embed_entity_table",
    "exact_search",
    "recall_at_k",
    "serve",
]
