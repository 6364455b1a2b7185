"""ItemSage on a generated world: its ablations, and what it gives OmniSearchSage's product side.

Every model is trained with ``training/train.py`` on ``training/configs/itemsage.yaml`` plus the overrides
below (a finished run in ``--runs_dir`` is reused), on the same generated world: 5,000 products with 1 to
20 image embeddings and text fields, 20,000 pins, 5,000 queries, and query → product and pin → product
engagements of four types (click, save, add to cart, checkout). Every figure is held-out Recall@10: test
queries (and held-out pins) against their engaged product among 1,000 random products, by the trainer's
own evaluation, so all rows score the same pairs against the same corpus.

Part 1, ItemSage and its ablations (the ItemSage paper's shape), Recall@10 per surface and engagement type:

- ``itemsage``: images + text fields, trained multi-task (8 tasks: 2 surfaces × 4 engagement types); the
  query side is the OmniSearchSage query tower trained with it, the pin side the pins' fixed PinSage-like
  embedding.
- ``image_only`` / ``text_only``: the same model and training reading only the images, or only the text.
- ``mean_of_images``: no product model, the product is the mean of its image embeddings. Its query →
  product figures come from a query tower trained against those fixed means (compatibility tasks); its
  pin → product figures score the pin's own image embedding (the same visual space) against the means,
  untrained: the pins' PinSage space is a different one, which a fixed mean cannot reach.

Part 2, OmniSearchSage's product task (the entity tower over the product's text and images, plus a
pre-existing product embedding as a feature and as a compatibility task):

- ``omnisearchsage_without``: no pre-existing product embedding.
- ``omnisearchsage_generated``: the world's generated stand-in (a noisy topic centroid, the
  ``itemsage_embedding`` column).
- ``omnisearchsage_itemsage``: the trained ``itemsage`` model, named in ``data.embedding_sources``: it
  embeds every product before training and its embeddings replace that column.

Writes ``bench/results/itemsage.{md,json,png}`` and the training logs to ``bench/results/itemsage_logs/``.

Usage:
    python bench/itemsage.py [--runs_dir runs/itemsage_bench] [--max_steps 600]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from omnisearchsage_hf.atomic import replace_atomically, write_text_atomically
from omnisearchsage_hf.evaluation import RecallEvaluator
from omnisearchsage_hf.training.config import load_config
from omnisearchsage_hf.training.pairs import held_out_pairs

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
CONFIG = ROOT / "training" / "configs" / "itemsage.yaml"
ENGAGEMENTS = ("click", "save", "add_to_cart", "checkout")
SURFACES = ("query_product", "pin_product")
PROGRESS = re.compile(r"^\s*(Training|Generating world|Writing world|Counting n-grams|Encoding entities):")


def _query_tasks(candidate: str) -> list[dict[str, Any]]:
    return [
        {"name": f"query_product_{e}", "candidate": candidate, "engagements": [e], "share": 2,
         "num_random_negatives": 32, "pairs": "pairs/query_product_train.parquet",
         "eval_pairs": "pairs/query_product_test.parquet"}
        for e in ENGAGEMENTS
    ]  # fmt: skip


OMNI_ENTITY = {
    "text_fields": ["title", "description", "caption", "board_titles", "engaged_queries", "brand", "color"],
    "num_buckets": 20000, "embedding_dim": 64, "hidden_dims": [256, 256], "out_dim": 64,
}  # fmt: skip
OMNI_PRODUCT_TASK = {
    "name": "query_product", "candidate": "entity:product", "share": 4, "num_random_negatives": 32,
    "pairs": "pairs/query_product_train.parquet", "eval_pairs": "pairs/query_product_test.parquet",
}  # fmt: skip
OMNI_COMPAT_TASK = {
    "name": "query_product_compat", "candidate": "compat:product:itemsage_embedding", "share": 1,
    "pairs": "pairs/query_product_train.parquet", "eval_pairs": "pairs/query_product_test.parquet",
}  # fmt: skip
OMNI = {"model.entity_architecture": "omnisearchsage", "train.batch_size": 64}

# Each variant is itemsage.yaml plus these overrides (dotted keys, as on train.py's command line).
VARIANTS: dict[str, dict[str, Any]] = {
    "itemsage": {},
    "image_only": {"model.entity.text_fields": []},
    "text_only": {"model.entity.image_feature": None},
    "mean_of_images": {"data.tasks": _query_tasks("compat:product:visual_embedding")},
    "omnisearchsage_without": {
        **OMNI,
        "model.entity": {**OMNI_ENTITY, "dense_features": {"visual_embedding": 64}},
        "data.tasks": [OMNI_PRODUCT_TASK],
    },
    "omnisearchsage_generated": {
        **OMNI,
        "model.entity": {**OMNI_ENTITY, "dense_features": {"visual_embedding": 64, "itemsage_embedding": 64}},
        "data.tasks": [OMNI_PRODUCT_TASK, OMNI_COMPAT_TASK],
    },
    "omnisearchsage_itemsage": {
        **OMNI,
        "model.entity": {**OMNI_ENTITY, "dense_features": {"visual_embedding": 64, "itemsage_embedding": 64}},
        "data.tasks": [OMNI_PRODUCT_TASK, OMNI_COMPAT_TASK],
        "data.embedding_sources": {"product.itemsage_embedding": "{runs_dir}/itemsage/entity_tower"},
    },
}
ITEMSAGE_ROWS = ("itemsage", "image_only", "text_only", "mean_of_images")
OMNI_ROWS = ("omnisearchsage_without", "omnisearchsage_generated", "omnisearchsage_itemsage")


def train(variant: str, runs_dir: Path, log_dir: Path, max_steps: int) -> float | None:
    """Train ``variant`` into ``runs_dir/variant`` unless finished there; return its wall-clock seconds."""
    output_dir = runs_dir / variant
    if (output_dir / "metrics.json").is_file():
        return None
    overrides = {**VARIANTS[variant], "train.max_steps": max_steps}
    command = [sys.executable, str(ROOT / "training" / "train.py"), "--config", str(CONFIG),
               "--output_dir", str(output_dir)]  # fmt: skip
    for key, value in overrides.items():
        text = value if isinstance(value, str) else json.dumps(value)
        command += [f"--{key}", text.replace("{runs_dir}", str(runs_dir))]
    if (output_dir / "training_config.yaml").is_file():  # an unfinished earlier attempt: continue it
        command.append("--resume")
    log_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "TQDM_DISABLE": "1", "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1"}
    print(f"training {variant} ...", flush=True)
    start = time.perf_counter()
    with open(log_dir / f"{variant}.log", "w") as log:
        if subprocess.run(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env).returncode != 0:
            raise SystemExit(f"training {variant} failed; see {log_dir / f'{variant}.log'}")
    seconds = time.perf_counter() - start
    (output_dir / "bench_seconds.json").write_text(json.dumps({"seconds": seconds}))
    compact_log(log_dir / f"{variant}.log")
    return seconds


def compact_log(path: Path) -> None:
    """Drop progress-bar redraws from a training log, keeping its messages and JSON lines."""
    kept = []
    for line in path.read_text().replace("\r", "\n").splitlines():
        if PROGRESS.match(line):  # a redraw; a metrics line printed meanwhile is glued to its end
            line = line[line.index('{"step"') :] if '{"step"' in line else ""
        if line.strip():
            kept.append(line)
    write_text_atomically(path, "\n".join(kept) + "\n")


def mean_of_images_pin_recall(data_dir: Path) -> dict[str, float]:
    """Pin → product Recall@K of the pin's image embedding against the mean of each product's images."""
    config = load_config(CONFIG)
    pins = pq.read_table(data_dir / "pins.parquet", columns=["id", "visual_embedding"]).to_pydict()
    products = pq.read_table(data_dir / "products.parquet", columns=["id", "visual_embedding"]).to_pydict()
    pin_vector = {i: np.asarray(v, dtype=np.float32) for i, v in zip(pins["id"], pins["visual_embedding"], strict=True)}
    means = {
        i: np.asarray(v, dtype=np.float32).mean(0)
        for i, v in zip(products["id"], products["visual_embedding"], strict=True)
    }

    def unit(vectors: list[np.ndarray]) -> np.ndarray:
        stacked = np.stack(vectors)
        return stacked / np.linalg.norm(stacked, axis=1, keepdims=True)

    metrics = {}
    for engagement in ENGAGEMENTS:
        name = f"pin_product_{engagement}"
        pairs = held_out_pairs(
            data_dir / "pairs/pin_product_test.parquet",
            task=name,
            max_pairs=config.eval.max_pairs,
            seed=config.train.seed,
            engagements=[engagement],
        )
        evaluator = RecallEvaluator(
            pairs, means, corpus_size=config.eval.corpus_size, ks=config.eval.ks, name=name, seed=config.train.seed
        )
        metrics.update(evaluator(lambda ids: unit([pin_vector[i] for i in ids]), unit))
    return metrics


def held_out_counts(data_dir: Path) -> dict[str, int]:
    """Held-out pairs behind each Recall@10 figure (``query_product``: all engagement types)."""
    config = load_config(CONFIG)
    counts = {}
    for surface in SURFACES:
        for engagement in [*ENGAGEMENTS, None]:
            name = surface if engagement is None else f"{surface}_{engagement}"
            pairs = held_out_pairs(
                data_dir / f"pairs/{surface}_test.parquet",
                task=name,
                max_pairs=config.eval.max_pairs,
                seed=config.train.seed,
                engagements=None if engagement is None else [engagement],
            )
            counts[name] = len(pairs)
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs_dir", default="runs/itemsage_bench")
    parser.add_argument("--max_steps", type=int, default=600)
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset to (re)train")
    args = parser.parse_args()
    runs_dir = Path(args.runs_dir).resolve()
    log_dir = RESULTS / "itemsage_logs"
    for variant in args.variants.split(","):  # `itemsage` first: `omnisearchsage_itemsage` reads its model
        train(variant, runs_dir, log_dir, args.max_steps)
    for log in log_dir.glob("*.log"):
        compact_log(log)
    metrics = {v: json.loads((runs_dir / v / "metrics.json").read_text()) for v in VARIANTS}
    metrics["mean_of_images"].update(mean_of_images_pin_recall(runs_dir / "mean_of_images" / "data"))
    seconds = {
        v: json.loads(p.read_text())["seconds"] if (p := runs_dir / v / "bench_seconds.json").is_file() else None
        for v in VARIANTS
    }
    results = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs (shared)",
        "max_steps": args.max_steps,
        "config": str(CONFIG.relative_to(ROOT)),
        "overrides": VARIANTS,
        "metrics": metrics,
        "training_seconds": seconds,
        "held_out_pairs": held_out_counts(runs_dir / "itemsage" / "data"),
    }
    RESULTS.mkdir(exist_ok=True)
    write_text_atomically(RESULTS / "itemsage.json", json.dumps(results, indent=2, default=str) + "\n")
    write_text_atomically(RESULTS / "itemsage.md", render_markdown(results))
    plot(metrics, RESULTS / "itemsage.png")
    print((RESULTS / "itemsage.md").read_text())


def render_markdown(results: dict[str, Any]) -> str:
    metrics, seconds = results["metrics"], results["training_seconds"]

    def cell(variant: str, key: str) -> str:
        value = metrics[variant].get(key)
        return "n/a" if value is None else f"{value:.3f}"

    def minutes(variant: str) -> str:
        return "n/a" if seconds[variant] is None else f"{seconds[variant] / 60:.1f}"

    columns = [f"{s}_{e}" for s in SURFACES for e in ENGAGEMENTS]
    lines = [
        "# ItemSage on a generated world (`python bench/itemsage.py`)",
        "",
        f"Config `{results['config']}` ({results['max_steps']} steps each) plus each row's overrides (in "
        "`itemsage.json`). One generated world for every row: 5,000 products with 1-20 image embeddings, 20,000 "
        "pins, 5,000 queries; held-out Recall@10 of each test pair's product among 1,000 random products, by "
        f"the trainer's evaluation (the same pairs and corpus in every row). Machine: {results['machine']}. "
        "One run per row. Each figure is a mean over the held-out pairs counted in the last line of the first "
        "table, so its binomial standard error is at most 0.5/sqrt(pairs): 0.016 for 1,000 pairs, 0.02-0.03 "
        "for the rarer engagement types.",
        "",
        "## ItemSage and its ablations: Recall@10 per surface and engagement type",
        "",
        "| model | "
        + " | ".join(c.replace("_product_", " → product, ").replace("_", " ") for c in columns)
        + " | mean | train min |",
        "|---|" + "---|" * (len(columns) + 2),
    ]
    for variant in ITEMSAGE_ROWS:
        values = [metrics[variant].get(f"{c}_recall@10") for c in columns]
        mean = f"{np.mean(values):.3f}" if all(v is not None for v in values) else "n/a"
        cells = " | ".join(cell(variant, f"{c}_recall@10") for c in columns)
        lines.append(f"| {variant.replace('_', ' ')} | {cells} | {mean} | {minutes(variant)} |")
    counts = results["held_out_pairs"]
    lines.append("| *held-out pairs* | " + " | ".join(f"{counts[c]:,}" for c in columns) + " | | |")
    lines += [
        "",
        "- **itemsage**: images + text fields, 8 tasks (2 surfaces × 4 engagement types); query side: the "
        "query tower trained with it; pin side: the pins' fixed PinSage-like embedding.",
        "- **image only** / **text only**: the same model and training, reading only images / only text fields.",
        "- **mean of images**: the product is the mean of its image embeddings, not learned. Query → product: a "
        "query tower trained against those fixed means. Pin → product: the pin's own image embedding against "
        "the means, untrained (the pins' PinSage space, which ItemSage is trained into, is a different space).",
        "",
        "## OmniSearchSage's product task with and without ItemSage",
        "",
        f"Both columns score the same {counts['query_product']:,} held-out query → product pairs (all "
        "engagement types).",
        "",
        "| pre-existing product embedding | query → product (learned product tower) R@10 | query → "
        "pre-existing embedding (compatibility task) R@10 | train min |",
        "|---|---|---|---|",
    ]
    names = {
        "omnisearchsage_without": "none",
        "omnisearchsage_generated": "generated stand-in (`itemsage_embedding` column of the world)",
        "omnisearchsage_itemsage": "trained ItemSage (`data.embedding_sources`)",
    }
    for variant in OMNI_ROWS:
        lines.append(
            f"| {names[variant]} | {cell(variant, 'query_product_recall@10')} | "
            f"{cell(variant, 'query_product_compat_recall@10')} | {minutes(variant)} |"
        )
    lines.append("")
    return "\n".join(lines)


def plot(metrics: dict[str, dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = [f"{s}_{e}" for s in SURFACES for e in ENGAGEMENTS]
    figure, axis = plt.subplots(figsize=(11, 4))
    width = 0.8 / len(ITEMSAGE_ROWS)
    for i, variant in enumerate(ITEMSAGE_ROWS):
        values = [metrics[variant].get(f"{c}_recall@10", np.nan) for c in columns]
        axis.bar(np.arange(len(columns)) + i * width, values, width, label=variant.replace("_", " "))
    axis.set_xticks(np.arange(len(columns)) + width * (len(ITEMSAGE_ROWS) - 1) / 2)
    axis.set_xticklabels([c.replace("_product_", "→product\n") for c in columns], fontsize=8)
    axis.set_ylabel("Recall@10")
    axis.set_ylim(0, 1)
    axis.legend(fontsize=8)
    axis.set_title("ItemSage on a generated world: held-out Recall@10 (1,000-product corpus)")
    figure.tight_layout()
    replace_atomically(path, lambda tmp: figure.savefig(tmp, format="png", dpi=110))


if __name__ == "__main__":
    main()
