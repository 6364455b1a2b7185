"""Load test of ``omnisearchsage-serve``: a Zipf(1.1) query stream against the cached query-embedding endpoint.

What it does, in one command (``python bench/serve_load.py``):

1. Builds a query tower and a small entity index (10,000 random pins) and saves both to a temporary folder.
   ``--backbone me5`` (default): the real multilingual-e5-small as the XQuAD-R run builds it (mean pooling,
   identity projection to 384 dims, ``"query: "`` prefix); ``--backbone minilm``: the real all-MiniLM-L6-v2
   (``../shared/tools/backbones.py me5|minilm``), projected to 256 dims; ``--backbone tiny``: a randomly
   initialised 2-layer, 128-wide BERT with MiniLM's WordPiece vocabulary, projected to 256 dims, kept only
   as a labelled reference row (it costs a real tower's misses a tenth of their CPU). With ``--backend onnx``
   or ``openvino`` the tower is exported (``omnisearchsage_hf.backends``; int8 unless ``--quantize none``,
   OpenVINO calibrated on 300 generated queries of another seed) and served from that export.
2. Starts ``omnisearchsage-serve`` (as ``python -m omnisearchsage_hf.serving.cli serve``) on 127.0.0.1 only, in
   its own process.
3. From a separate client process (uvloop, raw HTTP/1.1 over ``--connections`` keep-alive connections, each
   sending its next request as soon as the previous answer arrives: a closed loop), replays a Zipf(1.1) stream
   over 100,000 distinct generated queries to ``POST /embed/query``:
   - warm-up (not measured): the first ``--warmup-requests`` draws of the stream (default 500,000), sent as
     their distinct queries once each (~46,000), which leaves the cache exactly as replaying all of them would.
     Zipf(1.1) over 100k queries has a long tail: an unbounded cache reaches a 95% hit rate only after ~500k
     requests. A production cache has seen far more: paper §3.6 serves 300k requests/s;
   - measured: the stream continues for ``--duration`` seconds (default 60): throughput, client-side latency
     percentiles (p50/p90/p99, request write to full response read), the cache hit rate and model calls/s over
     that window (differences of the server's ``/health`` counters before and after).
4. Repeats with the cache disabled (``--cache-size 0``: every request goes to the model, identical concurrent
   requests are still coalesced), on the same measured stream (the warm-up prefix is skipped), for the ratio.

Network: every request goes to 127.0.0.1; request loops are bounded by time and count. Figures on a shared
2-core machine (server and client share the two cores with each other and with anything else running) vary
from run to run.

Usage:
    python bench/serve_load.py [--duration 60] [--connections 8] [--backbone me5|minilm|tiny]
                               [--backend torch|onnx|openvino] [--quantize int8|none]
                               [--warmup-requests 500000] [--no-cache-duration 60]
    Results: bench/results/serve_load_<backbone>_<backend>.{json,md} (``--out`` to change).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results"
HOST = "127.0.0.1"
DISTINCT_QUERIES = 100_000
ZIPF_EXPONENT = 1.1
STREAM_CHUNK = 65_536  # Zipf draws made at a time by the client
WARMUP_CONNECTIONS = 64
ADJECTIVES = "antique modern rustic vintage minimalist boho cozy elegant industrial coastal farmhouse scandinavian "
ADJECTIVES += "luxury cheap handmade oversized small large tiny outdoor indoor summer winter spring autumn retro"
COLOURS = "red blue green black white beige pink gold silver copper brass navy olive grey cream teal mustard"
COLOURS += " rose ivory charcoal"
MATERIALS = "linen cotton wool leather wood oak walnut marble glass ceramic velvet rattan bamboo steel concrete"
MATERIALS += " silk denim jute stone terracotta"
NOUNS = "sink lamp dress sofa chair table rug mirror vase bed shelf desk curtain pillow blanket jacket boots shoes "
NOUNS += "bag necklace ring earrings watch kettle mug plate bowl planter tiles faucet cabinet bench stool wallpaper "
NOUNS += "frame clock candle basket tray headboard nightstand dresser wardrobe bathtub shower towel apron skirt coat "
NOUNS += "sweater scarf hat sandals sneakers backpack wallet bracelet pendant chandelier sconce ottoman"


def generate_queries(n: int = DISTINCT_QUERIES, seed: int = 0) -> list[str]:
    """``n`` distinct search-like queries (2-4 words from product vocabularies), in a seeded random order."""
    rng = np.random.default_rng(seed)
    parts = [ADJECTIVES.split(), COLOURS.split(), MATERIALS.split(), NOUNS.split()]
    queries: dict[str, None] = {}
    while len(queries) < n:
        words = [rng.choice(p) for p in parts]
        keep = sorted(rng.choice(3, size=rng.integers(1, 4), replace=False).tolist()) + [3]  # noun always last
        queries[" ".join(words[i] for i in keep)] = None
    return list(queries)[:n]


def zipf_probabilities(n: int, exponent: float) -> np.ndarray:
    """P(rank r) proportional to r^-exponent, r = 1..n."""
    weights = np.arange(1, n + 1, dtype=np.float64) ** -exponent
    return weights / weights.sum()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


# --------------------------------------------------------------------------------------------------- client


async def _request(reader, writer, request: bytes) -> tuple[int, bytes]:
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = 0
    for line in head.split(b"\r\n"):
        if line[:15].lower() == b"content-length:":
            length = int(line[15:])
    return status, await reader.readexactly(length)


def _post(path: str, body: bytes) -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body


async def _client(port: int, args: dict) -> dict:
    import orjson

    queries = generate_queries(args["distinct"], args["seed"])
    bodies = [_post("/embed/query", orjson.dumps({"query": q})) for q in queries]
    probabilities = zipf_probabilities(len(queries), args["zipf"])
    rng = np.random.default_rng(args["seed"] + 1)
    stream: list[int] = []
    position = 0
    phase = {"name": "start", "sent": 0, "stop": False}
    latencies: list[int] = []
    errors: dict[int, int] = {}

    def next_body() -> bytes:
        nonlocal stream, position
        if position == len(stream):
            stream, position = rng.choice(len(queries), size=STREAM_CHUNK, p=probabilities).tolist(), 0
        position += 1
        return bodies[stream[position - 1]]

    async def connection():
        reader, writer = await asyncio.open_connection(HOST, port)
        try:
            while not phase["stop"]:
                request = next_body()
                measured = phase["name"] == "measure"
                start = time.perf_counter_ns()
                status, _ = await _request(reader, writer, request)
                phase["sent"] += 1
                if status != 200:
                    errors[status] = errors.get(status, 0) + 1
                if measured and phase["name"] == "measure":
                    latencies.append(time.perf_counter_ns() - start)
        finally:
            writer.close()

    async def health() -> dict:
        reader, writer = await asyncio.open_connection(HOST, port)
        writer.write(f"GET /health HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(next(line[15:] for line in head.split(b"\r\n") if line[:15].lower() == b"content-length:"))
        body = await reader.readexactly(length)
        writer.close()
        return json.loads(body)["cache"]

    # Warm-up: the stream's first `warmup_requests` draws. Sending each distinct query of that prefix once
    # leaves the cache exactly as replaying the whole prefix would (nothing expires or is evicted: the cache
    # holds 1M entries, the TTL is 30 days), in a fraction of the time. The uncached run skips the same prefix.
    prefix = rng.choice(len(queries), size=args["warmup_requests"], p=probabilities) if args["warmup_requests"] else []
    _, first_seen = np.unique(prefix, return_index=True)
    warm = [bodies[i] for i in np.asarray(prefix)[np.sort(first_seen)]] if args["warm_cache"] else []
    warmup_start = time.perf_counter()

    async def warm_connection(share: list[bytes]):
        reader, writer = await asyncio.open_connection(HOST, port)
        for request in share:
            if time.perf_counter() - warmup_start > args["warmup_max_seconds"]:
                break
            status, _ = await _request(reader, writer, request)
            if status != 200:
                raise RuntimeError(f"Warm-up request failed with HTTP {status}.")
        writer.close()

    # Many connections: the model sees large micro-batches.
    await asyncio.gather(*(warm_connection(warm[i::WARMUP_CONNECTIONS]) for i in range(WARMUP_CONNECTIONS)))
    warmup = {
        "stream_requests": len(prefix),
        "distinct_queries_sent": len(warm),
        "seconds": round(time.perf_counter() - warmup_start, 1),
    }
    tasks = [asyncio.ensure_future(connection()) for _ in range(args["connections"])]
    before = await health()
    phase["name"], sent_before = "measure", phase["sent"]
    start = time.perf_counter()
    await asyncio.sleep(args["duration"])
    phase["name"] = "done"
    elapsed = time.perf_counter() - start
    sent = phase["sent"] - sent_before
    after = await health()
    phase["stop"] = True
    await asyncio.gather(*tasks)
    ms = np.asarray(latencies, dtype=np.float64) / 1e6
    hits, misses = after["hits"] - before["hits"], after["misses"] - before["misses"]
    return {
        "warmup": warmup,
        "seconds": round(elapsed, 2),
        "requests": sent,
        "requests_per_s": round(sent / elapsed, 1),
        "latency_ms": {
            name: round(float(np.percentile(ms, q)), 3) for name, q in (("p50", 50), ("p90", 90), ("p99", 99))
        }
        | {"mean": round(float(ms.mean()), 3), "max": round(float(ms.max()), 3)},
        "non_200_responses": errors,
        "cache_hit_rate": round(hits / max(1, hits + misses), 4),
        "coalesced_misses": after["coalesced"] - before["coalesced"],
        "model_calls_per_s": round((after["model_calls"] - before["model_calls"]) / elapsed, 1),
        "model_queries_per_s": round((after["model_queries"] - before["model_queries"]) / elapsed, 1),
        "cache_size_after": after["size"],
    }


def _client_process(port: int, args: dict, out_path: str) -> None:
    import uvloop

    result = uvloop.run(_client(port, args))
    Path(out_path).write_text(json.dumps(result))


# --------------------------------------------------------------------------------------------------- server


def backbone_folder(name: str) -> str:
    """The local folder of a real encoder (``../shared/tools/backbones.py me5|minilm``)."""
    tool = Path(__file__).resolve().parents[2] / "shared" / "tools" / "backbones.py"
    return subprocess.run([sys.executable, str(tool), name], check=True, capture_output=True, text=True).stdout.strip()


def build_models(backbone: str, folder: Path) -> str:
    """Save a query tower and a small entity index under ``folder``; return a description of the tower."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    from omnisearchsage_hf import OmniSearchSageQueryModel
    from omnisearchsage_hf.serving import build_entity_index

    if backbone == "me5":
        tower = OmniSearchSageQueryModel.from_backbone(
            backbone_folder("me5"), pooling="mean", out_dim=384, projection_init="identity", query_prefix="query: "
        )
        description = "multilingual-e5-small (12 layers, 384 wide) + mean pooling + identity projection, 'query: '"
    elif backbone == "minilm":
        tower = OmniSearchSageQueryModel.from_backbone(backbone_folder("minilm"), pooling="mean", out_dim=256)
        description = "all-MiniLM-L6-v2 (6 layers, 384 wide) + mean pooling + 384->256 projection"
    else:
        minilm = backbone_folder("minilm")
        tokenizer = BertTokenizerFast.from_pretrained(minilm)  # a real WordPiece vocabulary for the tiny model
        torch.manual_seed(0)
        config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=128, num_hidden_layers=2,
                            num_attention_heads=2, intermediate_size=512)  # fmt: skip
        (folder / "tiny").mkdir()
        BertModel(config).save_pretrained(folder / "tiny")
        tokenizer.save_pretrained(folder / "tiny")
        tower = OmniSearchSageQueryModel.from_backbone(folder / "tiny", pooling="mean", out_dim=256)
        description = "TINY REFERENCE ROW: random 2-layer 128-wide BERT (MiniLM vocabulary) + mean pooling + 128->256"
    tower.save_pretrained(folder / "query_tower")
    rng = np.random.default_rng(0)
    entities = rng.standard_normal((10_000, tower.config.out_dim)).astype(np.float32)
    entities /= np.linalg.norm(entities, axis=1, keepdims=True)
    build_entity_index({"pin": ([f"pin{i}" for i in range(len(entities))], entities)}, recall_queries=0).save(
        folder / "index"
    )
    return description


def export_tower(folder: Path, backend: str, quantize: str) -> str | None:
    """Export the saved tower for ``backend`` (None for torch); returns the export's file name."""
    if backend == "torch":
        return None
    from omnisearchsage_hf.backends import export_query_tower

    quantize = None if quantize == "none" else quantize
    calibration = generate_queries(300, seed=12345) if backend == "openvino" and quantize else None
    return export_query_tower(folder / "query_tower", backend, quantize=quantize, calibration_queries=calibration).name


def start_server(folder: Path, port: int, cache_size: int, args: argparse.Namespace) -> subprocess.Popen:
    command = [sys.executable, "-m", "omnisearchsage_hf.serving.cli", "serve", "--query-model",
               str(folder / "query_tower"), "--index", str(folder / "index"), "--host", HOST, "--port", str(port),
               "--cache-size", str(cache_size), "--torch-threads", str(args.torch_threads),
               "--backend", args.backend]  # fmt: skip
    if args.backend_file:
        command += ["--backend-file", args.backend_file]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while True:
        try:
            with socket.create_connection((HOST, port), timeout=1):
                return server
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                raise RuntimeError(f"The server did not start: {server.stderr.read().decode()}") from None
            time.sleep(0.2)


def run_phase(folder: Path, args: argparse.Namespace, *, cache_size: int, duration: float, warm: bool) -> dict:
    port = free_port()
    server = start_server(folder, port, cache_size, args)
    try:
        client_args = {
            "distinct": args.distinct,
            "zipf": ZIPF_EXPONENT,
            "seed": args.seed,
            "connections": args.connections,
            "duration": duration,
            "warmup_requests": args.warmup_requests,
            "warm_cache": warm,
            "warmup_max_seconds": args.warmup_max_seconds,
        }
        out_path = folder / f"client-{cache_size}.json"
        client = multiprocessing.get_context("spawn").Process(
            target=_client_process, args=(port, client_args, str(out_path))
        )
        client.start()
        client.join(timeout=duration + args.warmup_max_seconds + 120)
        if client.exitcode != 0:
            client.kill()
            raise RuntimeError(f"The load client failed (exit code {client.exitcode}).")
        return json.loads(out_path.read_text())
    finally:
        server.terminate()
        server.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=60.0, help="Measured seconds with the cache (default 60).")
    parser.add_argument("--no-cache-duration", type=float, default=60.0, help="Measured seconds without the cache.")
    parser.add_argument("--connections", type=int, default=8, help="Keep-alive connections of the client.")
    parser.add_argument("--backbone", choices=("me5", "minilm", "tiny"), default="me5")
    parser.add_argument("--backend", choices=("torch", "onnx", "openvino"), default="torch")
    parser.add_argument("--quantize", choices=("int8", "none"), default="int8", help="Export precision (not torch).")
    parser.add_argument("--warmup-requests", type=int, default=500_000)
    parser.add_argument("--warmup-max-seconds", type=float, default=600.0)
    parser.add_argument("--distinct", type=int, default=DISTINCT_QUERIES)
    parser.add_argument("--torch-threads", type=int, default=1, help="Query tower threads in the server.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="Result file stem (default serve_load_<backbone>_<backend>).")
    args = parser.parse_args()
    from omnisearchsage_hf.atomic import write_text_atomically  # here: the client process stays light

    if args.duration <= 0 or args.no_cache_duration < 0 or args.connections < 1:
        parser.error("--duration must be > 0, --no-cache-duration >= 0 and --connections >= 1.")

    args.out = args.out or f"serve_load_{args.backbone}_{args.backend}"
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="serve_load_") as tmp:
        folder = Path(tmp)
        tower = build_models(args.backbone, folder)
        args.backend_file = export_tower(folder, args.backend, args.quantize)
        if args.backend_file:
            tower += f"; served by {args.backend} from backbone/{args.backend}/{args.backend_file}"
        cached = run_phase(folder, args, cache_size=1_000_000, duration=args.duration, warm=True)
        print(json.dumps({"cached": cached}, indent=2), flush=True)
        uncached = None
        if args.no_cache_duration:
            uncached = run_phase(folder, args, cache_size=0, duration=args.no_cache_duration, warm=False)
            print(json.dumps({"uncached": uncached}, indent=2), flush=True)

    import torch

    results = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs (shared), "
        f"load average (1 min) {load_before[0]:.2f} before the run, {os.getloadavg()[0]:.2f} after",
        "torch": torch.__version__,
        "query_tower": tower,
        "server": f"omnisearchsage-serve (uvicorn + uvloop + httptools, Starlette, orjson), "
        f"--backend {args.backend}, {args.torch_threads} query-tower thread(s), micro-batches of <= 64, 30-day TTL",
        "client": f"separate process, uvloop, raw HTTP/1.1, {args.connections} keep-alive connections, closed loop",
        "stream": f"Zipf({ZIPF_EXPONENT}) over {args.distinct} distinct generated queries, seed {args.seed}",
        "cached": cached,
        "uncached": uncached,
        "ratio_throughput_cached_over_uncached": round(cached["requests_per_s"] / uncached["requests_per_s"], 1)
        if uncached
        else None,
        "targets": {
            "requests_per_s>=2000": cached["requests_per_s"] >= 2000,
            "p50<=3ms": cached["latency_ms"]["p50"] <= 3,
            "p90<=20ms": cached["latency_ms"]["p90"] <= 20,
            "hit_rate>=0.95": cached["cache_hit_rate"] >= 0.95,
        },
    }
    RESULTS.mkdir(exist_ok=True)
    write_text_atomically(RESULTS / f"{args.out}.json", json.dumps(results, indent=2) + "\n")
    write_text_atomically(RESULTS / f"{args.out}.md", render_markdown(results, args))
    print(json.dumps(results, indent=2))


def render_markdown(results: dict, args: argparse.Namespace) -> str:
    def row(name: str, phase: dict) -> str:
        lat = phase["latency_ms"]
        return (
            f"| {name} | {phase['seconds']} | {phase['requests_per_s']:,} | {lat['p50']} | {lat['p90']} | {lat['p99']} "
            f"| {phase['cache_hit_rate']:.2%} | {phase['model_calls_per_s']} | {phase['model_queries_per_s']} "
            f"| {sum(phase['non_200_responses'].values())} |"
        )

    cached, uncached = results["cached"], results["uncached"]
    lines = [
        "# Serving load test (`python bench/serve_load.py`)",
        "",
        f"Command: `python bench/serve_load.py --duration {args.duration:g} --no-cache-duration "
        f"{args.no_cache_duration:g} --connections {args.connections} --backbone {args.backbone} --backend "
        f"{args.backend} --quantize {args.quantize} --warmup-requests {args.warmup_requests}`",
        "",
        f"- Machine: {results['machine']}; torch {results['torch']}. The server, the client and other users' jobs "
        "share the cores, so figures vary from run to run.",
        f"- Query tower (on CPU): {results['query_tower']}.",
        f"- Server: {results['server']}; bound to 127.0.0.1.",
        f"- Client: {results['client']}. Latency is measured by the client, from writing a request to reading the "
        "whole response.",
        f"- Stream: {results['stream']}, to `POST /embed/query`. Warm-up (not measured): the first "
        f"{cached['warmup']['stream_requests']:,} requests of the stream, sent as its "
        f"{cached['warmup']['distinct_queries_sent']:,} distinct queries ({cached['warmup']['seconds']} s), which "
        "leaves the cache as replaying them all would. The cache-off run skips the same prefix, so both runs measure "
        "the same requests.",
        "",
        "| run | seconds | requests/s | p50 ms | p90 ms | p99 ms | cache hit rate | model calls/s "
        "| model queries/s | non-200 |",
        "|---|---|---|---|---|---|---|---|---|---|",
        row("cache on (after warm-up)", cached),
    ]
    if uncached:
        lines.append(row("cache off (`--cache-size 0`)", uncached))
        lines += [
            "",
            f"Throughput ratio, cache on / cache off: **{results['ratio_throughput_cached_over_uncached']}x**.",
        ]
    lines += [
        "",
        "Targets of issues 6 and 17 (2-core machine, query tower on CPU): "
        + ", ".join(f"{name}: {'met' if ok else '**not met**'}" for name, ok in results["targets"].items())
        + ".",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
