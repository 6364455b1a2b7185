"""HNSW entity retrieval: recall@10 and queries/s of ``EntityIndex`` (faiss) against exact search, same run.

Data: seeded generated 256-d float32 unit vectors with the nested structure of a catalogue: random unit
category centroids; ``--per-category`` (100) topic centroids per category, ``normalize(category + noise)`` with
per-dimension noise ``--topic-noise`` (0.06: sibling topics have cosine ~0.5); ``--per-topic`` (100) entities
per topic, ``normalize(topic + noise)`` with per-dimension noise ``--noise`` (0.08: an entity's cosine to its
topic is ~0.6). Queries are drawn the same way and are not in the index. At 1M entities that is 100
categories of 100 topics. Recall depends on the data and on the graph settings: on this data, and on a variant
with 10,000 unrelated random topics (an earlier run of this script: recall@10 0.936 at ef_search 512), a
``--m 16 --ef-construction 64`` graph stays below 0.95 at 1M entities (0.88 at ef_search 512,
``results/ann_index_m16.md``); the default ``--m 32 --ef-construction 200`` (``EntityIndex``'s and
``omnisearchsage-index``'s default) builds slower and reaches 0.98 at ef_search 64.

1. Library comparison on ``--compare-size`` entities generated the same way (default 100,000): faiss ``IndexHNSWFlat``,
   hnswlib and usearch with the same graph settings (``--m``, ``--ef-construction``, inner product, 2 threads):
   build seconds, then recall@10 and batched queries/s at ef_search 32 to 512, and single-query latency.
2. The chosen library through ``omnisearchsage_hf.serving.EntityIndex`` on all ``--size`` entities (default
   1,000,000): build seconds, recall@10 against exact search and queries/s at ef_search 32 to 512, batched
   (all queries in one call, 2 threads) and one query per call (what the service does).
3. Exact search (``exact_search``: chunked numpy matmul + argpartition, 2 BLAS threads) over the same
   entities and queries, timed in the same run: the recall reference and the speed peer.

Results go to ``bench/results/ann_index.{json,md}``. The machine is shared: timings vary between runs.

Usage:
    python bench/ann_index.py [--size 1000000] [--queries 1000] [--compare-size 100000]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from importlib.metadata import version
from pathlib import Path

import faiss
import numpy as np
from threadpoolctl import threadpool_limits

from omnisearchsage_hf.atomic import write_text_atomically
from omnisearchsage_hf.serving import EntityIndex, exact_search, recall_at_k

RESULTS = Path(__file__).parent / "results"
THREADS = 2
EF_SEARCHES = (32, 64, 128, 256, 512)
SINGLE_QUERIES = 300  # queries timed one per call
GENERATE_CHUNK = 65_536


def topical_vectors(rng: np.random.Generator, centroids: np.ndarray, n: int, noise: float) -> np.ndarray:
    out = np.empty((n, centroids.shape[1]), dtype=np.float32)
    for start in range(0, n, GENERATE_CHUNK):
        end = min(start + GENERATE_CHUNK, n)
        x = centroids[rng.integers(0, len(centroids), end - start)]
        x = x + noise * rng.standard_normal(x.shape, dtype=np.float32)
        out[start:end] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def make_data(rng: np.random.Generator, size: int, args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray]:
    """``size`` entities around ``size / per_topic`` topic centroids, and held-out queries around the same.

    Topics are nested in categories (``per_category`` topics each), as in a catalogue: sibling topics are
    closer to each other than to the rest, so the space is connected rather than made of isolated islands.
    """
    categories = rng.standard_normal((max(1, size // (args.per_topic * args.per_category)), args.dim), dtype=np.float32)
    categories /= np.linalg.norm(categories, axis=1, keepdims=True)
    centroids = topical_vectors(rng, categories, max(1, size // args.per_topic), args.topic_noise)
    return topical_vectors(rng, centroids, size, args.noise), topical_vectors(rng, centroids, args.queries, args.noise)


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def single_query_ms(search, queries: np.ndarray) -> float:
    start = time.perf_counter()
    for q in queries[:SINGLE_QUERIES]:
        search(q[None])
    return (time.perf_counter() - start) / min(SINGLE_QUERIES, len(queries)) * 1000


def compare_libraries(data: np.ndarray, queries: np.ndarray, exact: np.ndarray, m: int, ef_construction: int) -> dict:
    import hnswlib
    from usearch.index import Index

    n, dim = data.shape
    results = {}

    index, seconds = timed(lambda: _faiss_build(data, m, ef_construction))
    rows = {}
    for ef in EF_SEARCHES:
        params = faiss.SearchParametersHNSW(efSearch=ef)
        (_, found), t = timed(lambda params=params: index.search(queries, 10, params=params))
        rows[ef] = {"recall@10": round(recall_at_k(found, exact), 4), "queries_per_s": round(len(queries) / t, 1)}
    index.hnsw.efSearch = 64
    results[f"faiss-cpu {version('faiss-cpu')}"] = {
        "build_seconds": round(seconds, 1),
        "ef_search": rows,
        "single_query_ms_ef64": round(single_query_ms(lambda q: index.search(q, 10), queries), 3),
    }

    def hnswlib_build():
        graph = hnswlib.Index(space="ip", dim=dim)
        graph.init_index(max_elements=n, M=m, ef_construction=ef_construction)
        graph.set_num_threads(THREADS)
        graph.add_items(data)
        return graph

    graph, seconds = timed(hnswlib_build)
    rows = {}
    for ef in EF_SEARCHES:
        graph.set_ef(ef)
        (found, _), t = timed(lambda: graph.knn_query(queries, k=10))
        rows[ef] = {"recall@10": round(recall_at_k(found, exact), 4), "queries_per_s": round(len(queries) / t, 1)}
    graph.set_ef(64)
    results[f"hnswlib {version('hnswlib')}"] = {
        "build_seconds": round(seconds, 1),
        "ef_search": rows,
        "single_query_ms_ef64": round(single_query_ms(lambda q: graph.knn_query(q, k=10), queries), 3),
    }

    def usearch_build():
        graph = Index(ndim=dim, metric="ip", dtype="f32", connectivity=m, expansion_add=ef_construction)
        graph.add(np.arange(n), data, threads=THREADS)
        return graph

    graph, seconds = timed(usearch_build)
    rows = {}
    for ef in EF_SEARCHES:
        graph.expansion_search = ef
        found, t = timed(lambda: graph.search(queries, 10, threads=THREADS).keys)
        rows[ef] = {"recall@10": round(recall_at_k(found, exact), 4), "queries_per_s": round(len(queries) / t, 1)}
    graph.expansion_search = 64
    results[f"usearch {version('usearch')}"] = {
        "build_seconds": round(seconds, 1),
        "ef_search": rows,
        "single_query_ms_ef64": round(single_query_ms(lambda q: graph.search(q[0], 10), queries), 3),
    }
    return results


def _faiss_build(data: np.ndarray, m: int, ef_construction: int) -> faiss.IndexHNSWFlat:
    index = faiss.IndexHNSWFlat(data.shape[1], m, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = ef_construction
    index.add(data)
    return index


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--per-topic", type=int, default=100, help="Entities per topic centroid (default 100).")
    parser.add_argument("--per-category", type=int, default=100, help="Topics per category (default 100).")
    parser.add_argument("--topic-noise", type=float, default=0.06, help="Per-dimension noise of topics.")
    parser.add_argument("--noise", type=float, default=0.08)
    parser.add_argument(
        "--compare-size", type=int, default=100_000, help="Entities of the library comparison (0 skips)."
    )
    parser.add_argument("--m", type=int, default=32, help="HNSW graph degree (default 32, as `omnisearchsage-index`).")
    parser.add_argument("--ef-construction", type=int, default=200, help="HNSW build candidate list (default 200).")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    faiss.omp_set_num_threads(THREADS)
    threadpool_limits(THREADS)

    rng = np.random.default_rng(args.seed)
    comparison = {}
    if args.compare_size:
        subset, subset_queries = make_data(rng, args.compare_size, args)
        comparison = compare_libraries(
            subset, subset_queries, exact_search(subset_queries, subset, 10), args.m, args.ef_construction
        )
        print(json.dumps(comparison, indent=2), flush=True)
        del subset
    data, queries = make_data(rng, args.size, args)

    exact, exact_seconds = timed(lambda: exact_search(queries, data, 10))
    ids = [f"e{i}" for i in range(args.size)]
    index = EntityIndex(dim=args.dim, m=args.m, ef_construction=args.ef_construction)
    _, build_seconds = timed(lambda: index.add("pin", ids, data))
    row_of = {entity_id: row for row, entity_id in enumerate(ids)}
    ours = {}
    for ef in EF_SEARCHES:
        index.ef_search = ef
        result, seconds = timed(lambda: index.search(queries, k=10)["pin"])
        found = np.array([[row_of[i] for i in row] for row in result.ids])
        ours[ef] = {
            "recall@10": round(recall_at_k(found, exact), 4),
            "queries_per_s_batched": round(len(queries) / seconds, 1),
            "single_query_ms": round(single_query_ms(lambda q: index.search(q, k=10), queries), 3),
        }
        print(ef, ours[ef], flush=True)
    exact_qps = len(queries) / exact_seconds
    results = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs (shared), {THREADS} threads, "
        f"load average before the run {os.getloadavg()[0]:.2f}",
        "faiss": faiss.__version__,
        "numpy": np.__version__,
        "data": {
            "size": args.size,
            "dim": args.dim,
            "queries": args.queries,
            "per_topic": args.per_topic,
            "per_category": args.per_category,
            "topic_noise": args.topic_noise,
            "noise": args.noise,
            "seed": args.seed,
        },  # fmt: skip
        "hnsw": {"m": args.m, "ef_construction": args.ef_construction},
        "exact": {"seconds": round(exact_seconds, 2), "queries_per_s": round(exact_qps, 1)},
        "entity_index": {"build_seconds": round(build_seconds, 1), "ef_search": ours},
        "speedup_over_exact_batched": {
            ef: round(row["queries_per_s_batched"] / exact_qps, 1) for ef, row in ours.items()
        },
        "library_comparison": {"size": args.compare_size, "results": comparison},
    }
    RESULTS.mkdir(exist_ok=True)
    write_text_atomically(RESULTS / "ann_index.json", json.dumps(results, indent=2) + "\n")
    write_text_atomically(RESULTS / "ann_index.md", render_markdown(results, args))
    print(json.dumps(results, indent=2))


def render_markdown(results: dict, args: argparse.Namespace) -> str:
    data, exact, ours = results["data"], results["exact"], results["entity_index"]
    lines = [
        "# HNSW entity index (`python bench/ann_index.py`)",
        "",
        f"Command: `python bench/ann_index.py --size {args.size} --queries {args.queries} --compare-size "
        f"{args.compare_size} --m {args.m} --ef-construction {args.ef_construction}`",
        "",
        f"Machine: {results['machine']}; faiss {results['faiss']}, numpy {results['numpy']}. One timed run each; "
        "the machine is shared, so timings vary between runs.",
        "",
        f"Data: {data['size']:,} generated {data['dim']}-d unit vectors, {data['per_topic']} per topic centroid "
        f"(per-dimension noise {data['noise']}), {data['per_category']} topics per category (topic noise "
        f"{data['topic_noise']}), and {data['queries']:,} held-out queries drawn the same way (see the script's "
        "docstring). "
        f"HNSW: M {results['hnsw']['m']}, ef_construction {results['hnsw']['ef_construction']}, inner product.",
        "",
        f"## `EntityIndex` (faiss) on {data['size']:,} entities vs exact search",
        "",
        f"Build: {ours['build_seconds']} s. Exact search (chunked numpy matmul + argpartition): {exact['seconds']} s "
        f"for {data['queries']:,} queries = **{exact['queries_per_s']} queries/s**.",
        "",
        "| ef_search | recall@10 vs exact | queries/s (batched) | speed-up over exact | ms per single query |",
        "|---|---|---|---|---|",
    ]
    for ef, row in ours["ef_search"].items():
        lines.append(
            f"| {ef} | {row['recall@10']:.4f} | {row['queries_per_s_batched']:,} | "
            f"{results['speedup_over_exact_batched'][ef]}x | {row['single_query_ms']} |"
        )
    comparison = results["library_comparison"]
    if comparison["results"]:
        lines += [
            "",
            f"## Library comparison on {comparison['size']:,} entities generated the same way (same graph settings, "
            "2 threads)",
            "",
            "| library | build s | "
            + " | ".join(f"recall@10 / queries/s at ef {ef}" for ef in EF_SEARCHES)
            + " | ms per single query (ef 64) |",
            "|---|---|" + "---|" * len(EF_SEARCHES) + "---|",
        ]
        for name, row in comparison["results"].items():
            cells = " | ".join(f"{r['recall@10']:.4f} / {r['queries_per_s']:,}" for r in row["ef_search"].values())
            lines.append(f"| {name} | {row['build_seconds']} | {cells} | {row['single_query_ms_ef64']} |")
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
