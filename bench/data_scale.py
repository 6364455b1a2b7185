"""How the trainer's data path scales: start-up time, peak memory and step time at 10M and 100M pairs.

The paper trains on 1.5B pairs. What limits a single machine is the data path: how the entity tables and
the pair files become what the training loop indexes. This script writes plain tables of a given size
(an entity table with ``id`` and ``title``, a pair file with ``query`` and ``candidate_id``; the world
generator is too slow at 100M pairs and its extra columns do not change what is measured), then, in a
fresh subprocess per size, times the trainer's data loading and a few training steps of a tiny model, and
reads the process's peak resident set size (``ru_maxrss``) after loading and after the steps.

Sizes (``--sizes``): ``1M:10M`` is one million entities and ten million pairs, ``10M:100M`` ten times
that. Queries are drawn Zipf-like from ``pairs / 10`` distinct texts, candidates uniformly from the
entities. The model is tiny (a 2-layer, 64-wide BERT query tower and a small entity tower over
``title``) and its tokenizers are built beforehand from a sample, so that what is timed is the data path.

``--impl after`` (default) measures this checkout. ``--impl before --repo PATH`` measures an older
checkout of the package (the commit before the data-layer rewrite, whose ``Trainer`` loaded data in
``_load_data`` through ``datasets``); each run writes ``bench/results/data_scale_<impl>.json`` and the
table ``bench/results/data_scale.md`` is rebuilt from whichever of the two files exist.

Usage:
    python bench/data_scale.py --work /tmp/data_scale [--sizes 1M:10M,10M:100M] [--impl after]
    python bench/data_scale.py --work /tmp/data_scale --impl before --repo /tmp/before
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

RESULTS = Path(__file__).parent / "results"
STEPS, WARMUP, BATCH = 20, 3, 256
SEED = 0


def parse_count(text: str) -> int:
    scale = {"K": 10**3, "M": 10**6, "B": 10**9}.get(text[-1].upper(), 1)
    return int(float(text[:-1] if text[-1].isalpha() else text) * scale)


def fixed_width_strings(prefix: str, numbers: np.ndarray, digits: int) -> pa.Array:
    """``prefix + zero-padded number`` for every number, built as one Arrow buffer (no Python strings)."""
    numbers = numbers.astype(np.int64)
    width = len(prefix) + digits
    chars = np.empty((len(numbers), width), dtype=np.uint8)  # (n, width)
    chars[:, : len(prefix)] = np.frombuffer(prefix.encode(), dtype=np.uint8)
    rest = numbers.copy()
    for position in range(width - 1, len(prefix) - 1, -1):
        chars[:, position] = ord("0") + rest % 10
        rest //= 10
    offsets = np.arange(len(numbers) + 1, dtype=np.int64) * width
    buffers = [None, pa.py_buffer(offsets), pa.py_buffer(chars.tobytes())]
    return pa.Array.from_buffers(pa.large_string(), len(numbers), buffers)


def write_tables(folder: Path, num_entities: int, num_pairs: int) -> None:
    """``entities.parquet`` (id, title) and ``pairs.parquet`` (query, candidate_id), in blocks of 5M rows."""
    folder.mkdir(parents=True, exist_ok=True)
    if (folder / "done.json").is_file():
        return
    rng = np.random.default_rng(SEED)
    block = 5_000_000
    words = np.array(["copper", "sink", "oak", "table", "linen", "lamp", "garden", "bowl", "wool", "rug"])
    with pq.ParquetWriter(folder / "entities.parquet", pa.schema([("id", pa.string()), ("title", pa.string())])) as w:
        for start in range(0, num_entities, block):
            rows = np.arange(start, min(start + block, num_entities))
            ids = fixed_width_strings("pin_", rows, 9).cast(pa.string())
            topic = pa.array(words[rows % len(words)])
            numbers = fixed_width_strings(" item ", rows % 100_003, 6)
            title = pc.binary_join_element_wise(topic, numbers.cast(pa.string()), "")
            w.write_table(pa.table({"id": ids, "title": title}), row_group_size=65_536)
    num_queries = max(1, num_pairs // 10)
    schema = pa.schema([("query", pa.string()), ("candidate_id", pa.string())])
    with pq.ParquetWriter(folder / "pairs.parquet", schema) as writer:
        for start in range(0, num_pairs, block):
            n = min(block, num_pairs - start)
            queries = np.minimum(rng.zipf(1.2, n) - 1, num_queries - 1)
            candidates = rng.integers(0, num_entities, n)
            query = fixed_width_strings("query text ", queries, 8).cast(pa.string())
            candidate = fixed_width_strings("pin_", candidates, 9).cast(pa.string())
            writer.write_table(pa.table({"query": query, "candidate_id": candidate}), row_group_size=1 << 20)
    (folder / "done.json").write_text(json.dumps({"entities": num_entities, "pairs": num_pairs}))


def write_tiny_models(folder: Path, sample_queries: list[str], sample_titles: list[str]) -> None:
    """A tiny BERT backbone folder (with a WordPiece tokenizer) and an entity tokenizer, from samples."""
    if (folder / "done").is_file():
        return
    from transformers import BertConfig, BertModel

    from omnisearchsage_hf.tokenization import build_vocab

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    try:
        from omnisearchsage_hf.training.builders import train_wordpiece_tokenizer
    except ImportError:  # the checkout before the rewrite kept it in the trainer module
        from omnisearchsage_hf.training.trainer import train_wordpiece_tokenizer

    tokenizer = train_wordpiece_tokenizer(sample_queries, 500)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        max_position_embeddings=64,
    )
    BertModel(config).save_pretrained(folder / "backbone")
    tokenizer.save_pretrained(folder / "backbone")
    build_vocab(sample_titles, trigram_size=5000, unigram_size=5000, bigram_size=5000).save_pretrained(
        folder / "entity_tokenizer"
    )
    (folder / "done").write_text("")


def training_overrides(tables: Path, models: Path, output_dir: Path) -> dict:
    task = {"name": "query_pin", "candidate": "entity:pin", "pairs": str(tables / "pairs.parquet"), "share": 1}
    task["num_random_negatives"] = 64
    return {
        "output_dir": str(output_dir),
        "data": {"source": "files", "entities": {"pin": str(tables / "entities.parquet")}, "tasks": [task]},
        "model": {
            "backbone": str(models / "backbone"),
            "tokenizer": str(models / "entity_tokenizer"),
            "query": {"out_dim": 32, "max_length": 16},
            "entity": {
                "text_fields": ["title"],
                "dense_features": {},
                "out_dim": 32,
                "num_buckets": 10000,
                "embedding_dim": 32,
                "hidden_dims": [64],
            },
        },
        "train": {
            "batch_size": BATCH,
            "max_steps": WARMUP + STEPS + 1,
            "warmup_steps": 1,
            "log_every": 1000,
            "eval_every": 0,
            "save_every": 0,
            "seed": SEED,
        },
    }


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(impl: str, tables: Path, models: Path) -> dict:
    """Child process: load the data as the trainer does, then time ``STEPS`` steps. Prints one JSON line."""
    from omnisearchsage_hf.training.config import load_config

    if impl == "before":
        from omnisearchsage_hf.training import Trainer
    else:
        from omnisearchsage_hf.training.trainer import Trainer

    with tempfile.TemporaryDirectory(prefix="data_scale_") as output_dir:
        os.environ["HF_DATASETS_CACHE"] = str(Path(output_dir) / "datasets_cache")  # removed with the folder
        config = load_config(None, training_overrides(tables, models, Path(output_dir)))
        stamps: list[float] = []
        result: dict = {}
        trainer = Trainer(config)
        start = time.perf_counter()
        if impl == "before":
            trainer._load_data()
            trainer._load_data = lambda: None  # loaded once; `train` would load again
            collate = trainer.collate
        else:
            trainer.load_data()
            collate = trainer.collate
        result["load_seconds"] = round(time.perf_counter() - start, 1)
        result["peak_rss_after_load_mb"] = round(peak_rss_mb())

        def stamped(micro_step: int):
            stamps.append(time.perf_counter())
            return collate(micro_step)

        trainer.collate = stamped
        trainer.train()
        step_ms = [1000 * (b - a) for a, b in zip(stamps[WARMUP:-1], stamps[WARMUP + 1 :], strict=True)]
        result["step_ms_median"] = round(float(np.median(step_ms)), 1)
        result["step_ms"] = [round(s, 1) for s in step_ms]
        result["peak_rss_mb"] = round(peak_rss_mb())
    return result


def write_markdown() -> None:
    runs = {}
    for impl in ("before", "after"):
        path = RESULTS / f"data_scale_{impl}.json"
        if path.is_file():
            runs[impl] = json.loads(path.read_text())
    lines = [
        "# Data path at scale",
        "",
        "Generated by `bench/data_scale.py`: the trainer's data loading (start-up) and its training steps on "
        "plain generated tables, one fresh process per size. Peak RSS is the process's `ru_maxrss`. "
        f"Step: {BATCH} pairs with 64 random negatives, tiny towers, median of {STEPS} steps after {WARMUP}.",
        "",
        "| code | entities | pairs | load (s) | peak RSS after load (GiB) | peak RSS (GiB) | step (ms) |",
        "|---|---|---|---|---|---|---|",
    ]
    for impl, run in runs.items():
        for size in run["sizes"]:
            if "error" in size:
                failure = f"failed after {size['wall_seconds']} s: {size['error']}"
                lines.append(f"| {impl} | {size['entities']:,} | {size['pairs']:,} | {failure} | | | |")
                continue
            lines.append(
                f"| {impl} | {size['entities']:,} | {size['pairs']:,} | {size['load_seconds']} | "
                f"{size['peak_rss_after_load_mb'] / 1024:.2f} | {size['peak_rss_mb'] / 1024:.2f} | "
                f"{size['step_ms_median']} |"
            )
    limits = ", ".join(f"{impl}: {run['memory_limit_gb']:g} GB" for impl, run in runs.items())
    lines += [
        "",
        f"Each measuring process ran under an address-space cap ({limits}; the machine has 24 GB), so that a",
        "run which cannot fit fails with a MemoryError instead of taking the machine down. Load time includes",
        "the one-time Arrow copy of the entity table (after) or the datasets cache conversion (before).",
        "",
        "Machines: " + "; ".join(f"{impl}: {run['machine']}" for impl, run in runs.items()),
        "",
    ]
    (RESULTS / "data_scale.md").write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", required=True, type=Path, help="folder for the generated tables (reused)")
    parser.add_argument("--sizes", default="1M:10M,10M:100M", help="entities:pairs, comma-separated")
    parser.add_argument("--impl", choices=["before", "after"], default="after")
    parser.add_argument("--repo", type=Path, help="with --impl before: the older checkout to measure")
    parser.add_argument("--memory-limit-gb", type=float, default=20.0, help="address-space cap of each child")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds each child may run")
    parser.add_argument("--child", nargs=2, metavar=("TABLES", "MODELS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(measure(args.impl, Path(args.child[0]), Path(args.child[1]))), flush=True)
        return
    sizes = []
    for spec in args.sizes.split(","):
        entities, pairs = (parse_count(part) for part in spec.split(":"))
        tables = args.work / f"{entities}_{pairs}"
        print(f"Writing {entities:,} entities and {pairs:,} pairs to {tables} (reused when there)", flush=True)
        write_tables(tables, entities, pairs)
        sample = pq.ParquetFile(tables / "pairs.parquet").read_row_group(0).slice(0, 20_000)
        titles = pq.ParquetFile(tables / "entities.parquet").read_row_group(0).column("title").to_pylist()
        models = args.work / "models"
        write_tiny_models(models, sample.column("query").to_pylist(), titles)
        env = dict(os.environ)
        if args.impl == "before":
            if args.repo is None:
                parser.error("--impl before needs --repo (a checkout of the older package)")
            env["PYTHONPATH"] = str(args.repo.resolve())
        command = [sys.executable, __file__, "--impl", args.impl, "--work", str(args.work)]
        command += ["--child", str(tables), str(models)]
        limit = int(args.memory_limit_gb * 2**30)

        def cap_memory(limit: int = limit) -> None:
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

        print(f"Measuring {args.impl} at {entities:,} entities / {pairs:,} pairs", flush=True)
        started = time.perf_counter()
        try:
            child = subprocess.run(
                command, env=env, capture_output=True, text=True, preexec_fn=cap_memory, timeout=args.timeout
            )
        except subprocess.TimeoutExpired:
            child = None
        line = next((x for x in child.stdout.splitlines() if x.startswith("RESULT ")), None) if child else None
        record = {"entities": entities, "pairs": pairs, "wall_seconds": round(time.perf_counter() - started, 1)}
        if child is None:
            record["error"] = f"not finished after {args.timeout:.0f} s"
        elif line is None:
            tail = (child.stderr.strip().splitlines() or ["no output"])[-1]
            record["error"] = f"exit {child.returncode} ({tail[:160]})"
        else:
            record.update(json.loads(line[len("RESULT ") :]))
        print(json.dumps(record), flush=True)
        sizes.append(record)
    RESULTS.mkdir(exist_ok=True)
    machine = (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    )
    out = {"impl": args.impl, "machine": machine, "memory_limit_gb": args.memory_limit_gb, "sizes": sizes}
    (RESULTS / f"data_scale_{args.impl}.json").write_text(json.dumps(out, indent=2) + "\n")
    write_markdown()


if __name__ == "__main__":
    main()
