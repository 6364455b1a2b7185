"""Recall@10 evaluation speed of ``positive_ranks``, against a plain numpy argsort in the same run.

Data: seeded random 256-d unit vectors (float32), generated in chunks: ``--queries`` queries, one positive
per query (``normalize(query + 3 * unit noise)``, cosine about 0.32, so that Recall@10 is neither 0 nor 1)
and a corpus of ``--corpus`` random entities.

1. Ours: ``positive_ranks(queries, positives, corpus, chunk_size=...)`` + ``recall_metrics`` on all
   queries, after an untimed warm-up on one chunk.
2. Baseline ("plain numpy argsort"): for each chunk of 32 queries, ``scores = q @ corpus.T`` in numpy,
   the positive's score appended as an extra last column, ``np.argsort(-scores, axis=1, kind="stable")``
   and the positive's position in that order. Stable sorting puts corpus entities that tie with the
   positive above it, the evaluator's tie rule, so the metric is the same. A full sort of the corpus per
   query is slow, so it runs on the first ``--baseline-queries`` queries only and its time for all
   queries is extrapolated from its per-query rate. Both must give identical ranks on that subset.

Ratio = baseline seconds per query / ours. Both use 2 threads (torch and numpy's BLAS). Memory: the
peak resident set size of the process (``ru_maxrss``) after the data is built, after the baseline and
after ours. It only grows, so each figure includes what came before; the baseline, which needs less,
runs first. One timed run per side. Results go to ``bench/results/eval_speed.{json,md}``.

Usage:
    python bench/eval_speed.py [--queries 10000] [--corpus 1000000] [--dim 256] [--baseline-queries 200]
                               [--chunk-size 512]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from omnisearchsage_hf.evaluation import positive_ranks, recall_metrics

RESULTS = Path(__file__).parent / "results"
THREADS = 2
NOISE = 3.0  # norm of the noise added to a query to make its positive
GENERATE_CHUNK = 65_536  # rows generated at a time, so no float64 copy of the corpus is ever made
BASELINE_CHUNK = 32  # its (chunk, corpus + 1) int64 argsort output is 256 MB at a 1M corpus
KS = (1, 10, 100)


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB (``ru_maxrss`` is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def normalize_(x: np.ndarray) -> np.ndarray:
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def unit_vectors(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    """``(n, dim)`` float32 random unit vectors, generated ``GENERATE_CHUNK`` rows at a time."""
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, GENERATE_CHUNK):
        end = min(start + GENERATE_CHUNK, n)
        out[start:end] = normalize_(rng.standard_normal((end - start, dim), dtype=np.float32))
    return out


def make_data(args: argparse.Namespace, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    queries = unit_vectors(rng, args.queries, args.dim)
    positives = normalize_(queries + NOISE * unit_vectors(rng, args.queries, args.dim))
    corpus = unit_vectors(rng, args.corpus, args.dim)
    return queries, positives, corpus


def argsort_ranks(queries: np.ndarray, positives: np.ndarray, corpus: np.ndarray) -> np.ndarray:
    """The baseline: 0-based rank of each positive from a full argsort of the corpus and the positive."""
    ranks = np.empty(len(queries), dtype=np.int64)
    for start in range(0, len(queries), BASELINE_CHUNK):
        q, p = queries[start : start + BASELINE_CHUNK], positives[start : start + BASELINE_CHUNK]
        scores = np.empty((len(q), len(corpus) + 1), dtype=np.float32)  # (chunk, corpus_size + 1)
        np.matmul(q, corpus.T, out=scores[:, :-1])  # (chunk, corpus_size)
        scores[:, -1] = (q * p).sum(-1)  # (chunk,): the positive is the last candidate
        order = np.argsort(-scores, axis=1, kind="stable")  # (chunk, corpus_size + 1)
        ranks[start : start + len(q)] = np.argmax(order == len(corpus), axis=1)  # (chunk,)
    return ranks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=10_000)
    parser.add_argument("--corpus", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument(
        "--baseline-queries", type=int, default=200, help="queries the argsort baseline is timed on (it is slow)"
    )
    parser.add_argument(
        "--chunk-size", type=int, default=512, help="pairs per matmul in ours; memory is chunk x corpus floats"
    )
    args = parser.parse_args()
    if not 0 < args.baseline_queries <= args.queries:
        parser.error(f"--baseline-queries must be in [1, --queries={args.queries}], got {args.baseline_queries!r}.")
    torch.set_num_threads(THREADS)
    threadpool_limits(THREADS)  # numpy's BLAS, for the baseline's matmul

    start = time.perf_counter()
    queries, positives, corpus = make_data(args)
    data_seconds = time.perf_counter() - start
    data_peak = peak_rss_mb()

    # The baseline goes first: it needs less memory, so its peak RSS is its own, not ours.
    n = args.baseline_queries
    start = time.perf_counter()
    baseline_ranks = argsort_ranks(queries[:n], positives[:n], corpus)
    baseline_metrics = recall_metrics(baseline_ranks, KS)
    baseline_seconds = time.perf_counter() - start
    baseline_peak = peak_rss_mb()

    positive_ranks(queries[: args.chunk_size], positives[: args.chunk_size], corpus, chunk_size=args.chunk_size)
    start = time.perf_counter()
    ranks = positive_ranks(queries, positives, corpus, chunk_size=args.chunk_size)
    ours_metrics = recall_metrics(ranks, KS)
    ours_seconds = time.perf_counter() - start
    ours_peak = peak_rss_mb()
    mismatches = int(np.sum(baseline_ranks != ranks[:n]))
    if mismatches:
        raise RuntimeError(f"The argsort baseline and positive_ranks disagree on {mismatches} of {n} ranks.")

    ours_per_query = ours_seconds / args.queries
    baseline_per_query = baseline_seconds / n
    results = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"{THREADS} BLAS threads",
        "torch": torch.__version__,
        "numpy": np.__version__,
        "queries": args.queries,
        "corpus": args.corpus,
        "dim": args.dim,
        "data_seconds": round(data_seconds, 2),
        "data_peak_rss_mb": round(data_peak, 1),
        "ours": {
            "chunk_size": args.chunk_size,
            "queries": args.queries,
            "seconds": round(ours_seconds, 3),
            "queries_per_s": round(args.queries / ours_seconds, 1),
            "recall@10": ours_metrics["recall@10"],
            "mrr": round(ours_metrics["mrr"], 6),
            "peak_rss_mb": round(ours_peak, 1),
        },
        "baseline": {
            "chunk_size": BASELINE_CHUNK,
            "queries": n,
            "seconds": round(baseline_seconds, 3),
            "queries_per_s": round(n / baseline_seconds, 1),
            "extrapolated_seconds_all_queries": round(baseline_per_query * args.queries, 1),
            "peak_rss_mb": round(baseline_peak, 1),
        },
        "subset_recall@10_ours": recall_metrics(ranks[:n], KS)["recall@10"],
        "subset_recall@10_baseline": baseline_metrics["recall@10"],
        "subset_ranks_identical": True,
        "ratio_baseline_per_query_over_ours": round(baseline_per_query / ours_per_query, 1),
    }
    print(json.dumps(results, indent=2))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "eval_speed.json").write_text(json.dumps(results, indent=2) + "\n")
    ours, base = results["ours"], results["baseline"]
    (RESULTS / "eval_speed.md").write_text(
        "# Recall@10 evaluation speed (`python bench/eval_speed.py`)\n\n"
        f"Command: `python bench/eval_speed.py --queries {args.queries} --corpus {args.corpus} --dim {args.dim} "
        f"--baseline-queries {n} --chunk-size {args.chunk_size}`\n\n"
        f"Machine: {results['machine']}; torch {results['torch']}, numpy {results['numpy']}. One timed run each "
        "(ours after a one-chunk warm-up).\n\n"
        f"Data: seeded random {args.dim}-d float32 unit vectors: {args.queries} queries, one positive each "
        f"(`normalize(query + {NOISE} * unit noise)`), and a corpus of {args.corpus} entities "
        f"(built in {results['data_seconds']} s; peak RSS after building: {results['data_peak_rss_mb']} MiB).\n\n"
        "| system | queries timed | seconds | queries/s | seconds for all queries | peak RSS (MiB) |\n"
        "|---|---|---|---|---|---|\n"
        f"| `positive_ranks` + `recall_metrics` (chunk {ours['chunk_size']}) | {ours['queries']} | {ours['seconds']} "
        f"| {ours['queries_per_s']} | {ours['seconds']} (measured) | {ours['peak_rss_mb']} |\n"
        f"| numpy matmul + full `argsort` (chunk {base['chunk_size']}) | {base['queries']} | {base['seconds']} "
        f"| {base['queries_per_s']} | {base['extrapolated_seconds_all_queries']} (**extrapolated** from "
        f"{base['queries']} queries) | {base['peak_rss_mb']} |\n\n"
        "Peak RSS only grows: the baseline runs first (it needs less memory), so ours includes it, and both include "
        "the data.\n\n"
        f"Ratio (baseline seconds per query / ours): **{results['ratio_baseline_per_query_over_ours']}x**.\n\n"
        f"Recall@10 over all {args.queries} queries (ours): {ours['recall@10']:.4f}. On the first {n} queries: "
        f"ours {results['subset_recall@10_ours']:.4f}, baseline {results['subset_recall@10_baseline']:.4f}; "
        "the two gave identical ranks for every one of them.\n"
    )


if __name__ == "__main__":
    main()
