"""Command-line entries: ``omnisearchsage-embed``, ``omnisearchsage-index`` and ``omnisearchsage-serve``.

The daily pipeline of paper §3.6, one command per step:

```bash
omnisearchsage-embed --entity-model runs/x/entity_tower --table data/pins.parquet --entity-type pin --out emb/pins
accelerate launch --multi_gpu --num_processes 2 -m omnisearchsage_hf.serving.cli embed ...   # same, 2 processes
omnisearchsage-embed --engine ray --num-actors 8 ...   # same output, an actor pool on the Ray cluster
omnisearchsage-index --embeddings emb/pins emb/products --out index/
omnisearchsage-serve --query-model runs/x/query_tower --index index/ --port 8000
omnisearchsage-serve --query-model runs/x/query_tower --backend onnx --backend-file model_qint8_quantized.onnx
```

``--backend onnx|openvino`` runs the query tower from an export written by ``omnisearchsage-export``
(``omnisearchsage_hf.backends``): int8 on the CPU is several times faster per cache miss.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ..cli_errors import UsageError, run_command
from .query_cache import ONE_GIB, THIRTY_DAYS

if TYPE_CHECKING:
    from transformers import PretrainedConfig

    from .ann_index import EntityIndex

logger = logging.getLogger(__name__)


def _add_debug_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true", help="Show tracebacks of errors.")


def _run(prog: str, args: argparse.Namespace, body: Callable[[], int]) -> int:
    """Run ``body`` through :func:`run_command`: a user error is one line on stderr and exit status 2."""
    # The parsed flag, not the raw argv: argparse also accepts abbreviations such as `--deb`.
    return run_command(prog, body, ["--debug"] if args.debug else [])


def _model_config(folder: str, flag: str, example: str) -> PretrainedConfig:
    """The config of the model saved in ``folder``: cheap to read, so a wrong folder is refused before any work.

    Only a local folder is accepted: a mistyped path would otherwise be tried as a Hub name, with network
    retries and a message about repo ids.
    """
    from transformers import AutoConfig  # knows our model types: importing this module imported the package

    if not Path(folder).is_dir():
        raise UsageError(f"{flag} {folder!r} is not a folder; pass the folder a training run saved, e.g. {example}.")
    if not (Path(folder) / "config.json").is_file():
        raise UsageError(f"{flag} {folder!r} has no config.json: it is not a saved model folder (e.g. {example}).")
    return AutoConfig.from_pretrained(folder)


def embed_main(argv: Sequence[str] | None = None) -> int:
    """``omnisearchsage-embed``: batch entity inference (resumable; split across ``accelerate launch`` processes)."""
    parser = argparse.ArgumentParser(prog="omnisearchsage-embed", description=embed_main.__doc__)
    parser.add_argument(
        "--entity-model", required=True, help="Entity tower or ItemSage folder (save_pretrained output)."
    )
    parser.add_argument(
        "--table",
        required=True,
        help="Entity table with an `id` column: a parquet file or folder of parquet files, Arrow IPC, jsonl or csv.",
    )
    parser.add_argument("--entity-type", required=True, help="Type of these entities, e.g. pin or product.")
    parser.add_argument("--out", required=True, help="Output folder; run again with the same folder to resume.")
    parser.add_argument("--chunk-size", type=int, default=50_000, help="Rows per resumable chunk (default 50000).")
    parser.add_argument("--batch-size", type=int, default=256, help="Entities per forward pass (default 256).")
    parser.add_argument("--quiet", action="store_true", help="No progress bar.")
    parser.add_argument(
        "--engine",
        choices=("local", "ray"),
        default="local",
        help="local (default): this process, or the processes of `accelerate launch`; ray: Ray Data over an "
        "actor pool of towers on the Ray cluster (RAY_ADDRESS, else a local one), parquet tables only, needs "
        'pip install "omnisearchsage-hf[ray]". Both write the same output folder.',
    )
    ray = parser.add_argument_group("--engine ray (defaults: those of embed_entity_table_with_ray)")
    ray.add_argument(
        "--num-actors", type=int, help="Towers in the actor pool (default 1): one per GPU, or ~one per core."
    )
    ray.add_argument(
        "--num-cpus-per-actor",
        type=float,
        help="Ray CPUs each actor reserves (default 1); torch runs on that many threads, rounded up. The pool must "
        "leave one CPU to read the table.",
    )
    ray.add_argument(
        "--num-gpus-per-actor", type=float, help="GPU share per actor (default 1 if the cluster has GPUs)."
    )
    ray.add_argument("--rows-per-call", type=int, help="Rows per Ray block and actor call (default 4096).")
    _add_debug_flag(parser)
    args = parser.parse_args(argv)
    return _run(parser.prog, args, lambda: _embed(args))


# Flags of `omnisearchsage-embed --engine ray`, named as embed_entity_table_with_ray's arguments.
_RAY_FLAGS = ("num_actors", "num_cpus_per_actor", "num_gpus_per_actor", "rows_per_call")


def _embed(args: argparse.Namespace) -> int:
    from transformers import AutoModel

    from ..modeling import OmniSearchSageQueryConfig
    from .batch_inference import ENTITY_MODEL_TYPES, embed_entity_table, process_state

    model_type = _model_config(args.entity_model, "--entity-model", "runs/x/entity_tower").model_type
    if model_type not in ENTITY_MODEL_TYPES:
        hint = (
            " — the query tower goes to omnisearchsage-serve --query-model"
            if model_type == OmniSearchSageQueryConfig.model_type
            else ""
        )
        raise UsageError(
            "--entity-model needs an entity tower or ItemSage folder (e.g. runs/x/entity_tower); "
            f"{args.entity_model!r} holds a {model_type!r} model{hint}."
        )
    ray_options = {name: getattr(args, name) for name in _RAY_FLAGS if getattr(args, name) is not None}
    if args.engine == "ray":
        return _embed_with_ray(args, ray_options)
    if ray_options:
        flags = ", ".join(f"--{name.replace('_', '-')}" for name in ray_options)
        raise UsageError(f"{flags} configure the Ray engine: add --engine ray, or drop them.")
    state = process_state()
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
            _print_output(out)
    finally:
        # Without it gloo intermittently aborts at exit (see ../shared/DESIGN.md §8).
        state.destroy_process_group()
    return 0


def _embed_with_ray(args: argparse.Namespace, ray_options: dict) -> int:
    """``omnisearchsage-embed --engine ray``: one driver process; the actors do the embedding."""
    from transformers import AutoModel

    from .ray_inference import embed_entity_table_with_ray, import_ray

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UsageError(
            "--engine ray runs from one driver process, not under `accelerate launch` with several processes: "
            "run `omnisearchsage-embed --engine ray ...` directly (Ray spreads the work), or drop --engine ray."
        )
    try:
        import_ray()
    except ImportError as error:
        raise UsageError(f"--engine ray: {error}") from None
    out = embed_entity_table_with_ray(
        AutoModel.from_pretrained(args.entity_model),
        args.table,
        args.out,
        entity_type=args.entity_type,
        chunk_size=args.chunk_size,
        batch_size=args.batch_size,
        show_progress_bar=not args.quiet,
        **ray_options,
    )
    _print_output(out)
    return 0


def _print_output(out: Path) -> None:
    """One JSON line: the finished output folder, checked by loading it, and what it holds."""
    from .batch_inference import EntityEmbeddings

    loaded = EntityEmbeddings.load(out)
    print(json.dumps({"out": str(out), "entity_type": loaded.entity_type, "shape": loaded.embeddings.shape}))


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
    parser.add_argument("--quiet", action="store_true", help="No progress bar.")
    _add_debug_flag(parser)
    args = parser.parse_args(argv)
    return _run(parser.prog, args, lambda: _index(args))


def _index(args: argparse.Namespace) -> int:
    import faiss

    from .ann_index import build_entity_index
    from .batch_inference import EntityEmbeddings

    if args.threads is not None:
        faiss.omp_set_num_threads(args.threads)
    tables = {}
    folders = {}
    for folder in args.embeddings:
        loaded = EntityEmbeddings.load(folder)
        if loaded.entity_type in tables:
            raise UsageError(
                f"Entity type {loaded.entity_type!r} comes from two --embeddings folders "
                f"({folders[loaded.entity_type]!r} and {folder!r}); pass one folder per type."
            )
        tables[loaded.entity_type] = (loaded.ids, loaded.embeddings)
        folders[loaded.entity_type] = folder
    index = build_entity_index(
        tables,
        m=args.m,
        ef_construction=args.ef_construction,
        ef_search=args.ef_search,
        recall_queries=args.recall_queries,
        show_progress_bar=not args.quiet,
    )
    index.save(args.out)
    print(json.dumps({"out": args.out, "sizes": index.sizes(), "recall_at_10": index.recall_at_10}))
    return 0


# The --help text of each HttpLimits field, flag --field-name.
_LIMIT_HELP = {
    "max_body_bytes": "Largest request body in bytes; more is a 413",
    "max_header_bytes": "Largest request line plus headers in bytes; more is a 431",
    "header_timeout": "Seconds for a request's headers to arrive, from the connection's opening or the request's "
    "first byte; later is a 408",
    "body_timeout": "Seconds for the body to arrive after the headers; later is a 408",
    "keep_alive_timeout": "Seconds an idle connection is kept between requests",
    "max_connections": "Open connections plus running requests at most; more get a 503",
}


def serve_main(argv: Sequence[str] | None = None) -> int:
    """``omnisearchsage-serve``: the HTTP service (query embeddings behind a cache, HNSW search)."""
    from .http_limits import HttpLimits  # the defaults below are its fields'

    parser = argparse.ArgumentParser(prog="omnisearchsage-serve", description=serve_main.__doc__)
    parser.add_argument("--query-model", required=True, help="Query tower folder (save_pretrained output).")
    parser.add_argument("--index", default=None, help="Index folder of omnisearchsage-index (needed by /search).")
    parser.add_argument("--host", default="127.0.0.1", help="Address to bind (default 127.0.0.1: local only).")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--cache-bytes",
        type=int,
        default=ONE_GIB,
        help=f"Memory the query cache may hold: entries, query strings and the dictionary (default {ONE_GIB}, "
        "1 GiB: about 750,000 256-d queries); 0 disables the cache.",
    )
    parser.add_argument(
        "--cache-size", type=int, default=None, help="Cached queries at most, on top of --cache-bytes; 0 disables."
    )
    parser.add_argument("--ttl-days", type=float, default=THIRTY_DAYS / 86400, help="Cache TTL (default 30).")
    parser.add_argument("--max-batch-size", type=int, default=64, help="Most queries per model call.")
    parser.add_argument("--max-wait-ms", type=float, default=1.0, help="Idle model waits this long for a batch.")
    parser.add_argument("--max-query-chars", type=int, default=1000, help="Longer queries get a 422.")
    parser.add_argument(
        "--backend",
        choices=("torch", "onnx", "openvino"),
        default="torch",
        help="What runs the query tower: torch (default), or an export of it (omnisearchsage-export) on ONNX "
        "Runtime or OpenVINO.",
    )
    parser.add_argument(
        "--backend-file",
        default=None,
        help="The export to serve, a file name in backbone/onnx/ or backbone/openvino/ of the tower folder, e.g. "
        "model_qint8_quantized.onnx (default: the float32 export).",
    )
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=1,
        help="Threads of the query tower, on any backend (default 1).",
    )
    parser.add_argument("--log-level", default="warning", help="uvicorn log level (default warning).")
    limits = parser.add_argument_group("limits per client (slow or oversized requests get a 4xx and are closed)")
    for field in dataclasses.fields(HttpLimits):
        default = field.default
        limits.add_argument(
            f"--{field.name.replace('_', '-')}",
            type=float if isinstance(default, float) else int,
            default=default,
            help=f"{_LIMIT_HELP[field.name]} (default {'none' if default is None else f'{default:g}'}).",
        )
    _add_debug_flag(parser)
    args = parser.parse_args(argv)
    return _run(parser.prog, args, lambda: _serve(args))


def _serve(args: argparse.Namespace) -> int:
    import faiss
    import torch
    from transformers import AutoModel

    from ..modeling import OmniSearchSageQueryConfig
    from .ann_index import EntityIndex
    from .batch_inference import ENTITY_MODEL_TYPES
    from .http_limits import HttpLimits
    from .query_cache import CachedQueryEmbedder
    from .service import create_app, serve

    # Everything that can be refused is checked before the weights load, so a mistake costs seconds.
    limits = HttpLimits(**{field.name: getattr(args, field.name) for field in dataclasses.fields(HttpLimits)})
    if args.backend == "torch" and args.backend_file is not None:
        raise UsageError("--backend-file names an ONNX or OpenVINO export: pass --backend onnx or openvino with it.")
    if args.torch_threads < 1:
        raise UsageError(f"--torch-threads must be >= 1, got {args.torch_threads}.")
    config = _model_config(args.query_model, "--query-model", "runs/x/query_tower")
    if config.model_type != OmniSearchSageQueryConfig.model_type:
        hint = (
            " — an entity tower or ItemSage model goes to omnisearchsage-embed --entity-model"
            if config.model_type in ENTITY_MODEL_TYPES
            else ""
        )
        raise UsageError(
            "--query-model needs a query tower folder (e.g. runs/x/query_tower); "
            f"{args.query_model!r} holds a {config.model_type!r} model{hint}."
        )
    index = EntityIndex.load(args.index) if args.index else None
    if index is not None and index.dim != config.out_dim:
        raise UsageError(
            f"--query-model {args.query_model!r} embeds queries in {config.out_dim} dimensions, but --index "
            f"{args.index!r} holds {index.dim}-dimensional entity embeddings. Serve the query tower trained "
            "with the entity tower that embedded the index (the same run), or rebuild the index with it."
        )

    torch.set_num_threads(args.torch_threads)
    # One query per request: faiss parallelises across queries, so more threads would only compete with the
    # event loop and the query tower for the cores.
    faiss.omp_set_num_threads(1)
    if args.backend == "torch":
        model = AutoModel.from_pretrained(args.query_model)
    else:
        from ..backends import load_query_encoder

        model = load_query_encoder(
            args.query_model, args.backend, file_name=args.backend_file, num_threads=args.torch_threads
        )
    encode = functools.partial(model.encode, batch_size=args.max_batch_size, show_progress_bar=False)
    encode(["warm up"])  # the first call pays one-off setup; keep it out of the first request
    embedder = CachedQueryEmbedder(
        encode,
        max_bytes=args.cache_bytes,
        max_size=args.cache_size,
        ttl_seconds=args.ttl_days * 86400,
        max_batch_size=args.max_batch_size,
        max_wait_ms=args.max_wait_ms,
    )
    app = create_app(embedder, index, limits=limits, max_query_chars=args.max_query_chars)
    print(_startup_summary(args, config.out_dim, index), flush=True)
    serve(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def _startup_summary(args: argparse.Namespace, out_dim: int, index: EntityIndex | None) -> str:
    """Two lines for the terminal: where the service answers, and what it loaded."""
    host = f"[{args.host}]" if ":" in args.host else args.host  # an IPv6 address goes in brackets in a URL
    if index is None:
        loaded = "no index: /search disabled"
    else:
        sizes = ", ".join(f"{entity_type} {size}" for entity_type, size in index.sizes().items())
        loaded = f"index {args.index} ({sizes})"
    if args.cache_bytes and args.cache_size != 0:
        count = f" and {args.cache_size} queries" if args.cache_size is not None else ""
        cache = f"query cache up to {args.cache_bytes / 2**20:g} MiB{count}, TTL {args.ttl_days:g} days"
    else:
        cache = "query cache disabled"
    runs_on = "" if args.backend == "torch" else f", backend {args.backend} {args.backend_file or 'float32'}"
    return (
        f"omnisearchsage-serve: http://{host}:{args.port} with query tower {args.query_model} (out_dim {out_dim}"
        f"{runs_on})\n"
        f"omnisearchsage-serve: {loaded}; {cache}"
    )


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
