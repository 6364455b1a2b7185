"""A real training run of ``training/configs/xquad_r.yaml``, then Recall@10 per language on the test articles.

Runs ``training/train.py`` to completion (its log is kept), then evaluates the exported towers on the
XQuAD-R test questions of each language against that language's whole sentence pool, and the pooled
cross-lingual figure (all 11 languages in one index). Zero-shot multilingual-e5-small (mean pooling,
``query: ``/``passage: `` prefixes) is evaluated in the same run for reference.

Data: XQuAD-R (CC BY-SA 4.0, Roy et al. 2020), read in place from ``../shared/data/xquad_r``.

Usage:
    python bench/train_xquad_r.py [--output_dir runs/xquad_r] [--skip-training] [--set key=value ...]
Writes ``bench/results/xquad_r_train.{log,json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from sentence_transformers import SentenceTransformer
from transformers import AutoModel

from omnisearchsage_hf.evaluation.scoring import DenseScorer
from omnisearchsage_hf.training.config import load_config
from omnisearchsage_hf.training.data import read_table
from omnisearchsage_hf.training.xquad_r import LANGUAGES, evaluate_xquad

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
CONFIG = ROOT / "training" / "configs" / "xquad_r.yaml"


def run_training(output_dir: str, extra: list[str], log_path: Path) -> float:
    """Run the trainer as a user would, teeing its output into ``log_path``; return the wall time."""
    command = [
        sys.executable,
        str(ROOT / "training" / "train.py"),
        "--config",
        str(CONFIG),
        "--output_dir",
        output_dir,
        *extra,
    ]
    start = time.time()
    with open(log_path, "w", encoding="utf-8") as log:
        log.write("$ " + " ".join(command[1:]) + "\n")
        log.flush()
        process = subprocess.Popen(
            command,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "TQDM_MININTERVAL": "30"},
        )
        for line in process.stdout:
            log.write(line)
            sys.stdout.write(line)
        if process.wait() != 0:
            raise SystemExit(f"training failed; see {log_path}")
    return time.time() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", default="runs/xquad_r")
    parser.add_argument("--skip-training", action="store_true", help="evaluate an existing run")
    args, extra = parser.parse_known_args()
    RESULTS.mkdir(exist_ok=True)
    config = load_config(CONFIG)
    if args.skip_training:
        previous = RESULTS / "xquad_r_train.json"
        seconds = json.loads(previous.read_text()).get("training_seconds") if previous.is_file() else None
    else:
        seconds = run_training(args.output_dir, extra, RESULTS / "xquad_r_train.log")

    output = Path(args.output_dir)
    query_tower = AutoModel.from_pretrained(output / "query_tower")
    entity_tower = AutoModel.from_pretrained(output / "entity_tower")
    root = ROOT / config.data.root
    # The run's data folder holds every sentence's zero-shot e5 passage embedding ("passage: " prefix, mean
    # pooling, 128 tokens, normalised): a feature of the entity tower, and the zero-shot baseline's passages.
    sentences = read_table(output / "data" / "sentences.parquet")
    passage = dict(zip(sentences["id"], np.asarray(sentences["e5_embedding"], dtype=np.float32)))
    ours = evaluate_xquad(
        DenseScorer(
            lambda q: query_tower.encode(q, batch_size=128),
            lambda rows: entity_tower.encode([{**r, "e5_embedding": passage[r["id"]]} for r in rows], batch_size=256),
        ),
        root,
    )
    e5 = SentenceTransformer(str(Path(config.model.backbone).expanduser()), device="cpu")
    zero_shot = evaluate_xquad(
        DenseScorer(
            lambda q: e5.encode(["query: " + x for x in q], batch_size=128, normalize_embeddings=True),
            lambda rows: np.stack([passage[r["id"]] for r in rows]),
        ),
        root,
    )
    results = {
        "training_seconds": seconds,
        "omnisearchsage": ours,
        "e5_zero_shot": zero_shot,
        "metrics_during_training": json.loads((output / "metrics.json").read_text()),
    }
    (RESULTS / "xquad_r_train.json").write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")

    def row(name: str, metrics: dict) -> str:
        values = [metrics[f"xquad_r_{lang}_recall@10"] for lang in LANGUAGES]
        return f"| {name} | " + " | ".join(f"{v:.3f}" for v in values) + f" | {np.mean(values):.3f} |"

    header = "| | " + " | ".join(LANGUAGES) + " | mean |\n|---|" + "---|" * (len(LANGUAGES) + 1)
    (RESULTS / "xquad_r_train.md").write_text(
        "# XQuAD-R: a full run of `training/configs/xquad_r.yaml` (`python bench/train_xquad_r.py`)\n\n"
        "Recall@10 of each language's test questions (article index % 3 == 2) against all of that language's "
        "sentences; data XQuAD-R (CC BY-SA 4.0, Roy et al. 2020), read in place.\n\n"
        f"{header}\n{row('OmniSearchSage (this run)', ours)}\n{row('multilingual-e5-small zero-shot', zero_shot)}\n\n"
        f"Pooled cross-lingual (all 11 languages in one index; fraction of a question's 11 gold sentences in its "
        f"top 10): OmniSearchSage {ours['xquad_r_pooled_recall@10']:.3f}, e5 zero-shot "
        f"{zero_shot['xquad_r_pooled_recall@10']:.3f} (10/11 = 0.909 is the ceiling: 11 gold sentences, 10 places).\n\n"
        + (f"Training took {seconds / 60:.1f} minutes on this machine; log: `xquad_r_train.log`.\n" if seconds else "")
    )
    print((RESULTS / "xquad_r_train.md").read_text())


if __name__ == "__main__":
    main()
