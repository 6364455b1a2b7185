"""Query-tower backends on CPU: speed, parity and retrieval quality of ONNX Runtime and OpenVINO, float32 and int8.

What it does, in one command (``python bench/query_backends.py``), for each backbone (``--backbones``):

1. Builds the query tower as ``training/configs/xquad_r.yaml`` does (``from_backbone``, mean pooling, identity
   projection to 384 dims, max 64 tokens; e5's ``"query: "`` prefix), saves it to a temporary folder and exports
   it four ways with ``omnisearchsage_hf.backends.export_query_tower`` (OpenVINO int8 calibrated on 300
   XQuAD-R questions of the dev articles).
2. Speed, every backend in the same run and interleaved (each query, or each chunk of queries, goes through
   every backend in a shuffled order) so that load from other jobs on the shared machine falls on all of them
   alike: single-query latency p50/p99 of ``encode([query])`` over ``--latency-queries`` questions, and batched
   queries/s of ``encode(chunk, batch_size=32)`` over ``--batch-queries`` questions. All backends run with
   ``--threads`` threads (torch.set_num_threads, ONNX Runtime intra-op threads, OpenVINO
   INFERENCE_NUM_THREADS). The peer row is ``SentenceTransformer(<backbone folder>).encode`` with the same
   prefix, 64 tokens and normalisation.
3. Parity: cosine of every backend's embedding to PyTorch float32's on ``--queries`` XQuAD-R questions (all
   11 languages, shuffled with seed 0): min, 1st percentile, mean, and how many fall below 0.99.
4. Retrieval: XQuAD-R (test articles) mean R@10 and pooled R@10 of a trained run's query tower
   (``--run``, default the cached batch-1280 run of ``bench/big_batch.py``) through each backend, against
   that run's entity tower, scored as ``bench/quality.py`` scores it; nothing is retrained.

Network: none (local model folders and data). Results: ``bench/results/query_backends.{json,md}``.

Usage:
    python bench/query_backends.py [--backbones me5,minilm] [--queries 10000] [--latency-queries 500]
                                   [--batch-queries 2048] [--threads 2] [--run runs/quality/xquad_r/...]
    python bench/query_backends.py --queries 200 --latency-queries 20 --batch-queries 64 --recall-languages en
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))  # bench/quality.py: the run's entity side, scored as it scores

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
DATA = ROOT.parent / "shared" / "data"
BACKBONES_TOOL = ROOT.parent / "shared" / "tools" / "backbones.py"
DEFAULT_RUN = ROOT / "runs" / "quality" / "xquad_r" / "omnisearchsage_cached_b1280"
# (row name, backend, quantize); the first row is the reference of every ratio and cosine.
VARIANTS = [
    ("torch fp32", "torch", None),
    ("onnx fp32", "onnx", None),
    ("onnx int8", "onnx", "int8"),
    ("openvino fp32", "openvino", None),
    ("openvino int8", "openvino", "int8"),
]
PEER = "SentenceTransformer.encode (peer)"
BACKBONES = {"me5": ("intfloat/multilingual-e5-small", "query: "), "minilm": ("all-MiniLM-L6-v2", "")}
BATCH_SIZE = 32
CHUNK = 256  # queries per timed batched call, interleaved across backends


def backbone_folder(name: str) -> str:
    return subprocess.run(
        [sys.executable, str(BACKBONES_TOOL), name], check=True, capture_output=True, text=True
    ).stdout.strip()


def questions(seed: int = 0) -> tuple[list[str], list[str]]:
    """(every XQuAD-R question of the 11 languages, shuffled; 300 dev-article questions for calibration)."""
    from omnisearchsage_hf.data.xquad_r import load_xquad_r

    rows = load_xquad_r(DATA, dev_split=True).questions
    everything = [row["question"] for row in rows]
    dev = [row["question"] for row in rows if row["split"] == "dev"]
    random.Random(seed).shuffle(everything)
    random.Random(seed + 1).shuffle(dev)
    return everything, dev[:300]


def export_all(folder: Path, calibration: list[str]) -> dict[str, float]:
    """Write the four exports into ``folder``; returns seconds per export."""
    from omnisearchsage_hf.backends import export_query_tower

    seconds = {}
    for name, backend, quantize in VARIANTS[1:]:
        start = time.perf_counter()
        queries = calibration if backend == "openvino" and quantize else None  # only static int8 is calibrated
        export_query_tower(folder, backend, quantize=quantize, calibration_queries=queries)
        seconds[name] = round(time.perf_counter() - start, 1)
    return seconds


def encoders(folder: Path, threads: int) -> dict[str, Callable[..., np.ndarray]]:
    """``row name -> encode`` for the tower in ``folder`` on every backend."""
    from omnisearchsage_hf.backends import export_name, load_query_encoder

    out = {}
    for name, backend, quantize in VARIANTS:
        file_name = None if backend == "torch" else export_name(backend, quantize)
        out[name] = load_query_encoder(folder, backend, file_name=file_name, num_threads=threads).encode
    return out


def peer_encoder(path: str, prefix: str, max_length: int) -> Callable[..., np.ndarray]:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(path, device="cpu")
    model.max_seq_length = max_length

    def encode(queries: list[str], batch_size: int = BATCH_SIZE, **_: object) -> np.ndarray:
        return model.encode(
            queries, prompt=prefix, batch_size=batch_size, normalize_embeddings=True, show_progress_bar=False
        )

    return encode


def measure_speed(encode: dict[str, Callable], texts: list[str], latency_n: int, batch_n: int) -> dict[str, dict]:
    """Single-query p50/p99 (ms) and batched queries/s, interleaved across backends in a shuffled order."""
    rng = random.Random(1)
    names = list(encode)
    for name in names:  # warm-up: first calls allocate and pick kernels
        encode[name](texts[:BATCH_SIZE], batch_size=BATCH_SIZE)
        encode[name](texts[:1])
    single = {name: [] for name in names}
    for query in texts[:latency_n]:
        rng.shuffle(names)
        for name in names:
            start = time.perf_counter()
            encode[name]([query])
            single[name].append(time.perf_counter() - start)
    batched = dict.fromkeys(names, 0.0)
    batch_texts = texts[latency_n : latency_n + batch_n]
    for start in range(0, len(batch_texts), CHUNK):
        chunk = batch_texts[start : start + CHUNK]
        rng.shuffle(names)
        for name in names:
            begin = time.perf_counter()
            encode[name](chunk, batch_size=BATCH_SIZE)
            batched[name] += time.perf_counter() - begin
    return {
        name: {
            "single_p50_ms": round(float(np.percentile(single[name], 50)) * 1000, 2),
            "single_p99_ms": round(float(np.percentile(single[name], 99)) * 1000, 2),
            "batched_queries_per_s": round(len(batch_texts) / batched[name], 1),
        }
        for name in encode
    }


def parity(encode: dict[str, Callable], texts: list[str]) -> dict[str, dict]:
    """Cosine of each backend's embeddings to the first backend's (torch fp32) on ``texts``."""
    reference_name, *others = encode
    reference = encode[reference_name](texts, batch_size=64)
    out = {}
    for name in others:
        cosines = (encode[name](texts, batch_size=64) * reference).sum(axis=1)  # (n,), both unit norm
        out[name] = {
            "min": round(float(cosines.min()), 5),
            "p01": round(float(np.percentile(cosines, 1)), 5),
            "mean": round(float(cosines.mean()), 6),
            "below_0.99": int((cosines < 0.99).sum()),
        }
    return out


def recall(run: Path, languages: list[str], threads: int, calibration: list[str], scratch: Path) -> dict:
    """XQuAD-R R@10 of ``run``'s query tower through each backend, against its entity tower (test articles)."""
    import quality

    from omnisearchsage_hf.evaluation import rank_xquad, xquad_metrics
    from omnisearchsage_hf.evaluation.scoring import DenseScorer

    folder = scratch / "trained_query_tower"
    shutil.copytree(run / "query_tower", folder)  # exported in a copy: the run folder is left as it is
    seconds = export_all(folder, calibration)
    entity_side = quality.tower_scorer(run, quality.dense_columns(run, "sentences.parquet")).corpus_encoder
    memo: dict[str, np.ndarray] = {}

    def encode_entities(rows: list[dict]) -> np.ndarray:  # embedded once, shared by every backend's scorer
        missing = [row for row in rows if row["id"] not in memo]
        if missing:
            memo.update(zip((row["id"] for row in missing), entity_side(missing), strict=True))
        return np.stack([memo[row["id"]] for row in rows])

    out = {
        "run": str(run.relative_to(ROOT)) if run.is_relative_to(ROOT) else str(run),
        "languages": languages,
        "export_seconds": seconds,
    }
    for name, encode in encoders(folder, threads).items():
        scorer = DenseScorer(lambda texts, encode=encode: encode(texts, batch_size=128), encode_entities)
        metrics = xquad_metrics(rank_xquad(scorer, DATA, languages=languages, split="test"))
        out[name] = {key: round(metrics[key], 4) for key in ("xquad_r_recall@10", "xquad_r_pooled_recall@10")}
        print(json.dumps({name: out[name]}), flush=True)
    return out


def run_backbone(key: str, args: argparse.Namespace, texts: list[str], calibration: list[str], scratch: Path) -> dict:
    from omnisearchsage_hf import OmniSearchSageQueryModel

    name, prefix = BACKBONES[key]
    path = backbone_folder(key)
    tower = OmniSearchSageQueryModel.from_backbone(
        path, pooling="mean", out_dim=384, projection_init="identity", query_prefix=prefix, max_length=64
    )
    folder = scratch / f"{key}_query_tower"
    tower.save_pretrained(folder)
    del tower
    seconds = export_all(folder, calibration)
    encode = encoders(folder, args.threads)
    encode[PEER] = peer_encoder(path, prefix, 64)
    sizes = {
        row: sum(p.stat().st_size for p in (folder / "backbone" / backend).glob(f"*{stem}*")) / 2**20
        for row, backend, stem in [
            ("onnx fp32", "onnx", "model.onnx"),
            ("onnx int8", "onnx", "model_qint8"),
            ("openvino fp32", "openvino", "openvino_model."),
            ("openvino int8", "openvino", "openvino_model_qint8"),
        ]
    }
    speed = measure_speed(encode, texts, args.latency_queries, args.batch_queries)
    print(json.dumps({key: speed}, indent=1), flush=True)
    agreement = parity(encode, texts[: args.queries])
    print(json.dumps({key: agreement}, indent=1), flush=True)
    reference = speed[VARIANTS[0][0]]
    for row in speed.values():
        row["batched_x_torch"] = round(row["batched_queries_per_s"] / reference["batched_queries_per_s"], 2)
        row["single_p50_x_faster_than_torch"] = round(reference["single_p50_ms"] / row["single_p50_ms"], 2)
    return {
        "backbone": name,
        "tower": f"from_backbone, mean pooling, identity projection to 384, max_length 64, prefix {prefix!r}",
        "export_seconds": seconds,
        "export_mib": {row: round(size, 1) for row, size in sizes.items()},
        "speed": speed,
        "parity_to_torch_fp32": agreement,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", default="me5,minilm", help="Comma-separated, from me5 and minilm.")
    parser.add_argument("--queries", type=int, default=10_000, help="Questions for the parity cosines.")
    parser.add_argument("--latency-queries", type=int, default=500, help="Questions timed one by one.")
    parser.add_argument("--batch-queries", type=int, default=2048, help="Questions timed in batches of 32.")
    parser.add_argument("--threads", type=int, default=2, help="Threads of every backend (default 2).")
    parser.add_argument("--run", default=str(DEFAULT_RUN), help="Trained run whose R@10 is measured ('' skips).")
    parser.add_argument("--recall-languages", default="all", help="Comma-separated XQuAD-R languages, or all.")
    parser.add_argument("--out", default="query_backends", help="Result file stem under bench/results/.")
    args = parser.parse_args()
    from omnisearchsage_hf.atomic import write_text_atomically
    from omnisearchsage_hf.data.xquad_r import LANGUAGES

    torch.set_num_threads(args.threads)
    keys = args.backbones.split(",")
    if unknown := sorted(set(keys) - set(BACKBONES)):
        parser.error(f"--backbones: unknown {unknown}; choose from {sorted(BACKBONES)}.")
    languages = list(LANGUAGES) if args.recall_languages == "all" else args.recall_languages.split(",")
    load_before = os.getloadavg()
    texts, calibration = questions()
    results = {
        "command": "python bench/query_backends.py " + " ".join(sys.argv[1:]),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs (shared)",
        "load_average_before": [round(x, 2) for x in load_before],
        "threads": args.threads,
        "versions": versions(),
        "backbones": {},
    }
    with tempfile.TemporaryDirectory(prefix="query_backends_") as tmp:
        for key in keys:
            results["backbones"][key] = run_backbone(key, args, texts, calibration, Path(tmp))
        if args.run:
            results["xquad_r_recall"] = recall(Path(args.run), languages, args.threads, calibration, Path(tmp))
    results["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    RESULTS.mkdir(exist_ok=True)
    write_text_atomically(RESULTS / f"{args.out}.json", json.dumps(results, indent=2) + "\n")
    write_text_atomically(RESULTS / f"{args.out}.md", render_markdown(results))
    print(render_markdown(results))


def versions() -> dict[str, str]:
    import nncf
    import onnxruntime
    import openvino
    import sentence_transformers
    import transformers

    modules = (torch, transformers, sentence_transformers, onnxruntime, openvino, nncf)
    return {module.__name__: module.__version__ for module in modules}


def render_markdown(results: dict) -> str:
    lines = [
        "# Query-tower backends on CPU (`python bench/query_backends.py`)",
        "",
        f"Command: `{results['command']}`",
        "",
        f"- Machine: {results['machine']}; load average (1, 5, 15 min) {results['load_average_before']} before, "
        f"{results['load_average_after']} after. Other jobs share the cores, so absolute figures vary between "
        "runs; the backends are timed interleaved, so the ratios within this run are the figures to read.",
        f"- Every backend runs with {results['threads']} threads (torch.set_num_threads, ONNX Runtime "
        "intra_op_num_threads, OpenVINO INFERENCE_NUM_THREADS), for single queries and batches of 32 alike.",
        "- Versions: " + ", ".join(f"{k} {v}" for k, v in results["versions"].items()) + ".",
        "",
    ]
    for result in results["backbones"].values():
        lines += [
            f"## {result['backbone']}",
            "",
            f"Tower: {result['tower']}. Export files (MiB): {result['export_mib']}.",
            "",
            "| backend | single p50 ms | single p99 ms | p50 speed-up vs torch | batched queries/s | batched vs torch "
            "| cos min | cos p01 | cos mean | queries < 0.99 |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for name, speed in result["speed"].items():
            cos = result["parity_to_torch_fp32"].get(name)
            cos_cells = (
                f"{cos['min']:.4f} | {cos['p01']:.4f} | {cos['mean']:.5f} | {cos['below_0.99']}"
                if cos
                else "reference | | |"
            )
            lines.append(
                f"| {name} | {speed['single_p50_ms']} | {speed['single_p99_ms']} | "
                f"{speed['single_p50_x_faster_than_torch']}x | {speed['batched_queries_per_s']:,} | "
                f"{speed['batched_x_torch']}x | {cos_cells} |"
            )
        lines += ["", "Cosines: each backend's embedding against torch fp32's, over the parity questions.", ""]
    recall_result = results.get("xquad_r_recall")
    if recall_result:
        lines += [
            f"## XQuAD-R retrieval of the trained query tower (`{recall_result['run']}`)",
            "",
            f"Test articles, languages {', '.join(recall_result['languages'])}, against the run's entity tower "
            "(embedded once, shared by every row). Mean R@10: the mean over languages of each language's R@10.",
            "",
            "| backend | mean R@10 | Δ vs torch fp32 | pooled R@10 |",
            "|---|---|---|---|",
        ]
        reference = recall_result[VARIANTS[0][0]]["xquad_r_recall@10"]
        for name, _, _ in VARIANTS:
            row = recall_result[name]
            lines.append(
                f"| {name} | {row['xquad_r_recall@10']:.4f} | {row['xquad_r_recall@10'] - reference:+.4f} | "
                f"{row['xquad_r_pooled_recall@10']:.4f} |"
            )
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
