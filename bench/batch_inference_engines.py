"""Batch inference engines compared: the single-machine chunk scheduler against the Ray Data path, same table.

1. Generates ``--pins`` pins (default 1,000,000) as a folder of parquet files: five text fields with words drawn
   with their real frequencies from Amazon ePQA (as ``encode_speed.py`` does, ~300 characters per pin) and a
   256-d image embedding; and a paper-sized entity tower (hash table 100k x 256, MLP 1024 → 1024 → 256, seeded
   weights, vocabulary built on the first 20,000 pins), saved once.
2. Embeds the table with each engine in its own process, so each one's memory is its own:
   ``embed_entity_table`` (one process, 2 torch threads) and ``embed_entity_table_with_ray`` on a local Ray of
   2 CPUs (2 actors of 0.5 CPU, one torch thread each, leaving one logical CPU to the readers).
3. Reports rows/s of each: of the engine call (fingerprints, actors' start and merge included) and of the whole
   command (the driver's model load and ``ray.init`` added), the ratios Ray / single machine, peak memory
   (the process's peak RSS, and the peak of the summed PSS of its process tree, Ray's raylet, object store
   and actors included, sampled every second), ``os.getloadavg()`` before and after each run, and that the two
   outputs hold the same ids in the same order with vectors within 1e-6.

The machine is shared: the load averages say how busy it was. A run with fewer than 1,000,000 pins is labelled
a smoke run in the results.

Usage:
    python bench/batch_inference_engines.py [--pins 1000000] [--work /tmp/omnisearchsage_engines]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from omnisearchsage_hf import OmniSearchSageEntityConfig, OmniSearchSageEntityModel, build_vocab
from omnisearchsage_hf.serving.batch_inference import EntityEmbeddings, embed_entity_table

sys.path.insert(0, str(Path(__file__).parent))
from encode_speed import TEXT_FIELDS, make_lexicon  # noqa: E402
from train_speed import rss_mb  # noqa: E402

RESULTS = Path(__file__).parent / "results"
FULL = 1_000_000
PART_ROWS = 50_000  # rows per parquet file of the generated table
VOCAB_ROWS = 20_000
# Characters per text field (``encode_speed.make_entities``): board titles and engaged queries hold two texts.
CHARS = {"title": 60, "description": 105, "caption": 50, "board_titles": 22, "engaged_queries": 18}
LISTS = {"board_titles": 2, "engaged_queries": 2}
BATCH_SIZE = 512
RAY = {"num_actors": 2, "num_cpus_per_actor": 0.5, "rows_per_call": 4096}


def texts(rng: np.random.Generator, lexicon: tuple[np.ndarray, np.ndarray], n: int, chars: int) -> list[str]:
    """``n`` texts of at most ``chars`` characters, words drawn by frequency (vectorised ``make_text``)."""
    words, freq = lexicon
    drawn = words[rng.choice(len(words), size=(n, max(1, chars // 4)), p=freq)]  # (n, words per text)
    return [" ".join(row)[:chars] for row in drawn]


def pin_part(first: int, n: int, lexicon: tuple[np.ndarray, np.ndarray]) -> pa.Table:
    rng = np.random.default_rng(first)
    columns: dict[str, pa.Array | list] = {"id": [f"pin{i}" for i in range(first, first + n)]}
    for field in TEXT_FIELDS:
        if field in LISTS:
            parts = [texts(rng, lexicon, n, CHARS[field]) for _ in range(LISTS[field])]
            columns[field] = [list(row) for row in zip(*parts, strict=True)]
        else:
            columns[field] = texts(rng, lexicon, n, CHARS[field])
    image = rng.standard_normal((n, 256)).astype(np.float32)
    columns["image_embedding"] = pa.FixedSizeListArray.from_arrays(pa.array(image.reshape(-1)), 256)
    return pa.table(columns)


def prepare(work: Path, pins: int) -> tuple[Path, Path]:
    """The generated table folder and the saved tower (made once per ``pins`` in ``work``)."""
    table, tower = work / f"pins-{pins}", work / f"tower-{pins}"
    if not (table / "_done").is_file():
        shutil.rmtree(table, ignore_errors=True)
        table.mkdir(parents=True)
        lexicon = make_lexicon()
        for first in range(0, pins, PART_ROWS):
            pq.write_table(pin_part(first, min(PART_ROWS, pins - first), lexicon), table / f"part-{first:08d}.parquet")
        (table / "_done").write_text("")  # not a parquet file: the table's readers skip it
    if not (tower / "config.json").is_file():
        sample = pq.read_table(sorted(table.glob("*.parquet"))[0]).slice(0, VOCAB_ROWS)
        tokenizer = build_vocab((v for f in TEXT_FIELDS for v in sample.column(f).to_pylist()), show_progress_bar=False)
        config = OmniSearchSageEntityConfig(
            vocab_size=tokenizer.vocab_size, text_fields=TEXT_FIELDS, dense_features={"image_embedding": 256}
        )
        torch.manual_seed(0)
        model = OmniSearchSageEntityModel(config).eval()
        model.tokenizer = tokenizer
        model.save_pretrained(tower)
    return table, tower


class TreeMemory:
    """Peak of the summed PSS (proportional set size: shared pages split between the processes that map them)
    of this process and all its descendants, sampled every ``interval`` seconds in a thread."""

    def __init__(self, interval: float = 1.0):
        self.interval, self.peak_mb, self._stop = interval, 0.0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.wait(self.interval):
            total = 0
            for process in [me, *me.children(recursive=True)]:
                try:
                    total += process.memory_full_info().pss
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue  # exited between listing and reading, or not ours
            self.peak_mb = max(self.peak_mb, total / 2**20)

    def __enter__(self) -> TreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def run_engine(engine: str, table: Path, tower: Path, out: Path) -> dict:
    """One engine, in this process: its rows/s and memory (the child side of ``main``)."""
    torch.set_num_threads(2)
    start = time.perf_counter()
    model = OmniSearchSageEntityModel.from_pretrained(tower)
    result: dict = {"engine": engine, "model_load_s": round(time.perf_counter() - start, 1), "ray_init_s": 0.0}
    shutil.rmtree(out, ignore_errors=True)
    if engine == "ray":
        import ray

        from omnisearchsage_hf.serving.ray_inference import embed_entity_table_with_ray

        start = time.perf_counter()
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        result["ray_init_s"] = round(time.perf_counter() - start, 1)
    result["loadavg_before"] = [round(x, 2) for x in os.getloadavg()]
    with TreeMemory() as memory:
        start = time.perf_counter()
        if engine == "ray":
            embed_entity_table_with_ray(model, table, out, entity_type="pin", batch_size=BATCH_SIZE,
                                        show_progress_bar=False, **RAY)  # fmt: skip
        else:
            embed_entity_table(model, table, out, entity_type="pin", batch_size=BATCH_SIZE, show_progress_bar=False)
        seconds = time.perf_counter() - start
    rows = len(EntityEmbeddings.load(out).ids)
    result.update(
        rows=rows,
        seconds=round(seconds, 1),
        rows_per_s=round(rows / seconds, 1),
        command_rows_per_s=round(rows / (seconds + result["model_load_s"] + result["ray_init_s"]), 1),
        loadavg_after=[round(x, 2) for x in os.getloadavg()],
        peak_rss_mb=round(rss_mb("VmHWM") or 0.0),
        peak_tree_pss_mb=round(memory.peak_mb),
    )
    return result


def compare(local: Path, ray_out: Path) -> dict:
    a, b = EntityEmbeddings.load(local), EntityEmbeddings.load(ray_out)
    manifests = [json.loads((folder / "manifest.json").read_text()) for folder in (local, ray_out)]
    return {
        "same_ids_in_order": a.ids == b.ids,
        "max_abs_difference": float(np.abs(np.asarray(a.embeddings) - np.asarray(b.embeddings)).max()),
        "same_manifest_but_file_hashes": {k: v for k, v in manifests[0].items() if k != "files"}
        == {k: v for k, v in manifests[1].items() if k != "files"},
    }


def write_markdown(results: dict) -> None:
    local, ray_run, same = results["local"], results["ray"], results["outputs"]
    label = "" if results["pins"] >= FULL else f" — SMOKE RUN ({results['pins']:,} pins, not the 1M of the issue)"
    names = {
        "local": "single machine (`embed_entity_table`, 1 process, 2 torch threads)",
        "ray": "Ray Data (`embed_entity_table_with_ray`, 2 actors x 0.5 CPU, 1 thread each)",
    }
    rows = [
        f"| {names[engine]} | {run['rows_per_s']:,.0f} | {run['seconds']} | {run['command_rows_per_s']:,.0f} | "
        f"{run['model_load_s']} + {run['ray_init_s']} | {run['peak_rss_mb']:,} | {run['peak_tree_pss_mb']:,} | "
        f"{run['loadavg_before']} → {run['loadavg_after']} |"
        for engine, run in (("local", local), ("ray", ray_run))
    ]
    (RESULTS / "batch_inference_engines.md").write_text(
        f"# Batch inference engines (`python bench/batch_inference_engines.py --pins {results['pins']}`){label}\n\n"
        f"Machine: {results['machine']}; torch {results['torch']}, ray {results['ray_version']}. Load average "
        f"(1, 5, 15 min) at the start: {results['loadavg_start']}; the machine is shared, so a load above its 2 "
        "cores means other jobs took part of it during the run.\n\n"
        f"Table: {results['pins']:,} generated pins in {results['files']} parquet file(s) (5 text fields, "
        "~300 characters, words with ePQA frequencies; a 256-d image embedding). Tower: paper-sized entity "
        f"tower, vocabulary {results['vocab_size']:,} n-grams; batch {BATCH_SIZE}, chunks of 50,000 rows.\n\n"
        "| engine | rows/s (engine call) | seconds | rows/s (command) | model load + ray.init (s) | "
        "peak RSS of the process (MB) | peak PSS of its process tree (MB) | load average before → after |\n"
        "|---|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n\n"
        f"Ray / single machine: **{results['ratio_ray_over_local']}x** for the engine call (target ≥ 0.8x), "
        f"{results['command_ratio_ray_over_local']}x for the command. The engine call includes the table "
        "fingerprint, the chunk files and the merge in both engines; Ray's also includes starting its actors, "
        "shipping the tower to them and loading it there. The command adds the driver's model load and, for Ray, "
        "`ray.init` (starting a local Ray; on a cluster that is up already, it only connects).\n\n"
        f"Outputs: same ids in the same order: {same['same_ids_in_order']}; manifests equal but for the files' "
        f"hashes: {same['same_manifest_but_file_hashes']}; largest absolute difference of an embedding value: "
        f"{same['max_abs_difference']:.2e}.\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pins", type=int, default=FULL)
    parser.add_argument("--work", type=Path, default=Path("/tmp/omnisearchsage_engines"))
    parser.add_argument("--engine", choices=["local", "ray"], help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    table, tower = args.work / f"pins-{args.pins}", args.work / f"tower-{args.pins}"
    if args.engine:
        print(json.dumps(run_engine(args.engine, table, tower, args.work / f"out-{args.engine}")))
        return

    import ray

    loadavg_start = [round(x, 2) for x in os.getloadavg()]
    prepare(args.work, args.pins)
    runs = {}
    for engine in ("local", "ray"):
        command = [sys.executable, __file__, "--pins", str(args.pins), "--work", str(args.work), "--engine", engine]
        child = subprocess.run(command, check=True, capture_output=True, text=True)
        runs[engine] = json.loads(child.stdout.strip().splitlines()[-1])
        print(json.dumps(runs[engine]), flush=True)
    results = {
        "pins": args.pins,
        "smoke_run": args.pins < FULL,
        "files": len(list(table.glob("*.parquet"))),
        "vocab_size": json.loads((tower / "config.json").read_text())["vocab_size"],
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "torch": torch.__version__,
        "ray_version": ray.__version__,
        "loadavg_start": loadavg_start,
        "local": runs["local"],
        "ray": runs["ray"],
        "ratio_ray_over_local": round(runs["ray"]["rows_per_s"] / runs["local"]["rows_per_s"], 3),
        "command_ratio_ray_over_local": round(
            runs["ray"]["command_rows_per_s"] / runs["local"]["command_rows_per_s"], 3
        ),
        "outputs": compare(args.work / "out-local", args.work / "out-ray"),
    }
    print(json.dumps(results, indent=2))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "batch_inference_engines.json").write_text(json.dumps(results, indent=2) + "\n")
    write_markdown(results)


if __name__ == "__main__":
    main()
