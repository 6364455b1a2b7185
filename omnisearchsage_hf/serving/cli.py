"""Command-line entries: ``omnisearchsage-embed``, ``omnisearchsage-index`` and ``omnisearchsage-serve``.

The daily pipeline of paper §3.6, one command per step:

```bash
omnisearchsage-embed --entity-model runs/x/entity_tower --table data/pins.parquet --entity-type pin --out emb/pins
accelerate launch --multi_gpu --num_processes 2 -m omnisearchsage_hf.serving.cli embed ...   # same, 2 processes
omnisearchsage-index --embeddings emb/pins emb/products --out index/
omnisearchsage-serve --query-model runs/x/query_tower --index index/ --port 8000
```
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import sys
from collections.abc import Sequence

from .query_cache import THIRTY_DAYS

logger = logging.getLogger(__name__)


def embed_main(argv: Sequence[str] | None = None) -> int:
    """``omnisearchsage-embed``: batch entity inference (resumable; split across ``accelerate launch`` processes)."""
    parser = argparse.ArgumentParser(prog="omnisearchsage-embed", description=embed_main.__doc__)
    parser.add_argument(
        "--entity-model", required=True, help="Entity tower or ItemSage folder (save_pretrained output)."
    )
    parser.add_argument("--table", required=True, help="Entity table: parquet, jsonl or csv with an `id` column.")
    parser.add_argument("--entity-type", required=True, help="Type of these entities, e.g. pin or product.")
    parser.add_argument("--out", required=True, help="Output folder; run again with the same folder to resume.")
    parser.add_argument("--chunk-size", type=int, default=50_000, help="Rows per resumable chunk (default 50000).")
    parser.add_argument("--batch-size", type=int, default=256, help="Entities per forward pass (default 256).")
    parser.add_argument("--quiet", action="store_true", help="No progress bar.")
    args = parser.parse_args(argv)

    from accelerate import PartialState
    from transformers import AutoModel

    import omnisearchsage_hf  # noqa: F401  (registers the towers with AutoModel)

    from .batch_inference import EntityEmbeddings, embed_entity_table

    state = PartialState()
    try:
        model = AutoModel.from_pretrained(args.entity_model)
        out = embed_entity_table(
            model,
            args.table,
            args.out,
            entity_type=args.entity_type,
            chunk_size=args.chunk_size,
            batch_size=args.batch_size,
            state=state,
            show_progress_bar=not args.quiet,
        )
        if out is not None:
            loaded = EntityEmbeddings.load(out)
            print(json.dumps({"out": str(out), "entity_type": loaded.entity_type, "shape": loaded.embeddings.shape}))
    finally:
        # Without it gloo intermittently aborts at exit (see ../shared/DESIGN.md §8).
        state.destroy_process_group()
    return 0


def index_main(argv: Sequence[str] | None = None) -> int:
    """``omnisearchsage-index``: build an HNSW index from batch-inference folders and report recall@10."""
    parser = argparse.ArgumentParser(prog="omnisearchsage-index", description=index_main.__doc__)
    parser.add_argument("--embeddings", nargs="+", required=True, help="Output folders of omnisearchsage-embed.")
    parser.add_argument("--out", required=True, help="Index folder to write.")
    parser.add_argument("--m", type=int, default=32, help="HNSW graph degree (default 32).")
    parser.add_argument("--ef-construction", type=int, default=200, help="Build candidate list (default 200).")
    parser.add_argument("--ef-search", type=int, default=64, help="Search candidate list (default 64).")
    parser.add_argument("--recall-queries", type=int, default=1000, help="Queries for the recall check (0 skips).")
    parser.add_argument("--threads", type=int, default=None, help="Build threads (default: all cores).")
    args = parser.parse_args(argv)

    import faiss

    from .ann_index import build_entity_index
    from .batch_inference import EntityEmbeddings

    if args.threads is not None:
        faiss.omp_set_num_threads(args.threads)
    tables = {}
    for folder in args.embeddings:
        loaded = EntityEmbeddings.load(folder)
        if loaded.entity_type in tables:
            parser.error(f"Entity type {loaded.entity_type!r} comes from two --embeddings folders; pass one each.")
        tables[loaded.entity_type] = (loaded.ids, loaded.embeddings)
    index = build_entity_index(
        tables,
        m=args.m,
        ef_construction=args.ef_construction,
        ef_search=args.ef_search,
        recall_queries=args.recall_queries,
    )
    index.save(args.out)
    print(json.dumps({"out": args.out, "sizes": index.sizes(), "recall_at_10": index.recall_at_10}))
    return 0


def serve_main(argv: Sequence[str] | None = None) -> int:
    """``omnisearchsage-serve``: the HTTP service (query embeddings behind a cache, HNSW search)."""
    parser = argparse.ArgumentParser(prog="omnisearchsage-serve", description=serve_main.__doc__)
    parser.add_argument("--query-model", required=True, help="Query tower folder (save_pretrained output).")
    parser.add_argument("--index", default=None, help="Index folder of omnisearchsage-index (needed by /search).")
    parser.add_argument("--host", default="127.0.0.1", help="Address to bind (default 127.0.0.1: local only).")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--cache-size", type=int, default=1_000_000, help="Cached queries at most; 0 disables.")
    parser.add_argument("--ttl-days", type=float, default=THIRTY_DAYS / 86400, help="Cache TTL (default 30).")
    parser.add_argument("--max-batch-size", type=int, default=64, help="Most queries per model call.")
    parser.add_argument("--max-wait-ms", type=float, default=1.0, help="Idle model waits this long for a batch.")
    parser.add_argument("--max-query-chars", type=int, default=1000, help="Longer queries get a 422.")
    parser.add_argument("--torch-threads", type=int, default=1, help="Threads of the query tower (default 1).")
    parser.add_argument("--log-level", default="warning", help="uvicorn log level (default warning).")
    args = parser.parse_args(argv)

    import faiss
    import torch
    import uvicorn
    from transformers import AutoModel

    import omnisearchsage_hf  # noqa: F401  (registers the towers with AutoModel)

    from .ann_index import EntityIndex
    from .query_cache import CachedQueryEmbedder
    from .service import create_app

    torch.set_num_threads(args.torch_threads)
    # One query per request: faiss parallelises across queries, so more threads would only compete with the
    # event loop and the query tower for the cores.
    faiss.omp_set_num_threads(1)
    model = AutoModel.from_pretrained(args.query_model)
    if not hasattr(model, "encode") or model.config.model_type != "omnisearchsage_query":
        parser.error(f"--query-model {args.query_model!r} is a {model.config.model_type!r} model, not a query tower.")
    encode = functools.partial(model.encode, batch_size=args.max_batch_size, show_progress_bar=False)
    encode(["warm up"])  # the first call pays one-off setup; keep it out of the first request
    embedder = CachedQueryEmbedder(
        encode,
        max_size=args.cache_size,
        ttl_seconds=args.ttl_days * 86400,
        max_batch_size=args.max_batch_size,
        max_wait_ms=args.max_wait_ms,
    )
    index = EntityIndex.load(args.index) if args.index else None
    app = create_app(embedder, index, max_query_chars=args.max_query_chars)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, access_log=False)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m omnisearchsage_hf.serving.cli {embed,index,serve} ...`` (for ``accelerate launch -m``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"embed": embed_main, "index": index_main, "serve": serve_main}
    if not argv or argv[0] not in commands:
        print(f"usage: python -m omnisearchsage_hf.serving.cli {{{','.join(commands)}}} [options]", file=sys.stderr)
        return 2
    return commands[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
