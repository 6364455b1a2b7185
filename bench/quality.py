"""Retrieval quality on real data: OmniSearchSage against BM25 and zero-shot encoders, plus the paper's ablations.

For one data set (``--dataset xquad_r`` or ``amazon_pqa``) this trains every model variant it needs with
``training/train.py`` (or reuses a finished run in ``--runs_dir``), evaluates all systems on the same test
questions with the same scoring code (``evaluate_xquad`` / ``evaluate_epqa`` over a ``Scorer``), and writes
``bench/results/<dataset>.md`` (tables shaped like the paper's), ``.json`` (every metric) and ``.png``
(Recall@10 per language, or per system).

Systems, all evaluated in the same run:

- ``bm25``: Okapi BM25 (``bm25s`` defaults) over the entity's own text (the sentence; a product's catalogue
  text).
- ``e5`` / ``minilm``: zero-shot multilingual-e5-small (mean pooling, ``query: ``/``passage: ``) and
  all-MiniLM-L6-v2 on the same text.
- ``searchsage``: the paper's baseline: the query tower trained against the pre-existing (compatibility)
  embedding only, and retrieving with it.
- ``omnisearchsage``: the multi-task model of the data set's config.
- ``single_task``: only the query → entity task (paper Table 5).
- enrichment ablation (paper Table 4): the entity tower with only the entity's base text, then with its
  context/description, then with engaged queries.

Data: XQuAD-R (CC BY-SA 4.0, Roy et al. 2020) and Amazon ePQA (CDLA-Sharing-1.0, Shen et al. 2023), read
in place from ``../shared/data``. Backbones: ``python ../shared/tools/backbones.py me5|minilm``.

Usage:
    python bench/quality.py --dataset xquad_r [--variants omnisearchsage,searchsage] [--runs_dir runs/quality]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from transformers import AutoModel

from omnisearchsage_hf.atomic import replace_atomically, write_text_atomically
from omnisearchsage_hf.data.amazon_pqa import CATALOGUE_FIELDS, product_text
from omnisearchsage_hf.data.encoders import load_sentence_encoder
from omnisearchsage_hf.data.xquad_r import LANGUAGES
from omnisearchsage_hf.evaluation.baselines import zero_shot_scorer
from omnisearchsage_hf.evaluation.benchmarks import evaluate_epqa, evaluate_xquad
from omnisearchsage_hf.evaluation.scoring import BM25Scorer, DenseScorer

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
BACKBONES = ROOT.parent / "shared" / "tools" / "backbones.py"
DATA = ROOT.parent / "shared" / "data"

# Each variant is the data set's config plus these overrides (dotted keys, as on train.py's command line).
XQUAD_TASKS = {
    "query_sentence": {
        "name": "query_sentence",
        "candidate": "entity:sentences",
        "pairs": "pairs/query_sentence_train.parquet",
        "eval_pairs": "pairs/query_sentence_test.parquet",
        "share": 8,
        "num_random_negatives": 64,
    },
    "query_query": {
        "name": "query_query",
        "candidate": "query",
        "pairs": "pairs/query_query_train.parquet",
        "share": 2,
    },
    "query_sentence_e5": {
        "name": "query_sentence_e5",
        "candidate": "compat:sentences:e5_embedding",
        "pairs": "pairs/query_sentence_train.parquet",
        "eval_pairs": "pairs/query_sentence_test.parquet",
        "share": 2,
    },
}
EPQA_TASKS = {
    "query_product": {
        "name": "query_product",
        "candidate": "entity:products",
        "pairs": "pairs/query_product_train.parquet",
        "eval_pairs": "pairs/query_product_test.parquet",
        "share": 4,
        "num_random_negatives": 64,
    },
    "query_product_compat": {
        "name": "query_product_compat",
        "candidate": "compat:products:text_embedding",
        "pairs": "pairs/query_product_train.parquet",
        "eval_pairs": "pairs/query_product_test.parquet",
        "share": 1,
    },
}
VARIANTS: dict[str, dict[str, dict[str, Any]]] = {
    "xquad_r": {
        "omnisearchsage": {},
        "searchsage": {"data.tasks": [XQUAD_TASKS["query_sentence_e5"]]},
        "single_task": {"data.tasks": [XQUAD_TASKS["query_sentence"]]},
        "base_text": {
            "model.entity.text_fields": ["sentence"],
            "model.entity.dense_features": {"e5_embedding": 384},
            "model.entity.residual_features": {"e5_embedding": 1.0},
        },
    },
    "amazon_pqa": {
        "omnisearchsage": {},
        "searchsage": {"data.tasks": [EPQA_TASKS["query_product_compat"]]},
        "single_task": {"data.tasks": [EPQA_TASKS["query_product"]]},
        "title_only": {"model.entity.text_fields": ["title"], "data.options.engaged_queries": False},
        "catalogue_text": {
            "model.entity.text_fields": list(CATALOGUE_FIELDS),
            "data.options.engaged_queries": False,
        },
    },
}
ENRICHMENT = {  # paper Table 4: rows in order of added enrichment
    "xquad_r": [("sentence only", "base_text"), ("+ paragraph context and article title", "omnisearchsage")],
    "amazon_pqa": [
        ("title only", "title_only"),
        ("+ description, bullets, attributes", "catalogue_text"),
        ("+ engaged queries (training questions)", "omnisearchsage"),
    ],
}


def backbone(name: str) -> str:
    """The local folder of a real pretrained encoder (``me5`` or ``minilm``)."""
    return subprocess.run(
        [sys.executable, str(BACKBONES), name], check=True, capture_output=True, text=True
    ).stdout.strip()


def train(
    dataset: str, variant: str, runs_dir: Path, log_dir: Path, overrides: dict[str, Any] | None = None
) -> tuple[Path, float | None]:
    """Train one variant with ``training/train.py`` unless its run is already finished; return its folder.

    ``overrides`` (dotted keys) default to the variant's entry in ``VARIANTS``.
    """
    output = runs_dir / dataset / variant
    if (output / "metrics.json").is_file() and (output / "query_tower").is_dir():
        seconds = output / "training_seconds.txt"
        return output, float(seconds.read_text()) if seconds.is_file() else None
    command = [sys.executable, str(ROOT / "training" / "train.py"), "--config", str(config_path(dataset))]
    command += ["--output_dir", str(output)]
    overrides = dict(VARIANTS[dataset][variant] if overrides is None else overrides)
    if dataset == "amazon_pqa":  # the MiniLM folder sits inside its package, so the config cannot name it
        overrides |= {"model.backbone": backbone("minilm"), "data.options.compat_encoder": backbone("minilm")}
    for key, value in overrides.items():
        command.append(f"--{key}={yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()}")
    if (output / "training_config.yaml").is_file():  # an earlier attempt: continue it
        command.append("--resume")
    # Zero-shot passage embeddings are cached per run; a sibling run's cache spares re-encoding them.
    cache = output / "data" / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    for sibling in (runs_dir / dataset).glob("*/data/cache/passages-*.npy"):
        if not (cache / sibling.name).exists():
            shutil.copyfile(sibling, cache / sibling.name)
    log_path = log_dir / f"{dataset}_{variant}.log"
    start = time.time()
    with open(log_path, "w", encoding="utf-8") as log:
        log.write("$ " + " ".join(command[1:]) + "\n")
        log.flush()
        # The configs name Hub ids and $OMNISEARCHSAGE_DATA; here they resolve to the shared copies.
        models = str(Path(backbone("me5")).parent)
        env = {
            **os.environ,
            "TQDM_MININTERVAL": "60",
            "OMNISEARCHSAGE_DATA": str(DATA),
            "OMNISEARCHSAGE_MODELS": models,
        }
        if subprocess.run(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env).returncode != 0:
            raise SystemExit(f"training {dataset}/{variant} failed; see {log_path}")
    (output / "training_seconds.txt").write_text(f"{time.time() - start:.0f}\n")
    return output, time.time() - start


def config_path(dataset: str) -> Path:
    return ROOT / "training" / "configs" / f"{dataset}.yaml"


def tower_scorer(run: Path, features: dict[str, dict[str, np.ndarray]], *, compat: str | None = None) -> DenseScorer:
    """Our trained query tower against its entity tower, or (``compat``) against a pre-existing embedding."""
    query_tower = AutoModel.from_pretrained(run / "query_tower")

    def encode_queries(texts: list[str]) -> np.ndarray:
        return query_tower.encode(texts, batch_size=128)

    if compat is not None:
        return DenseScorer(encode_queries, lambda rows: np.stack([features[compat][r["id"]] for r in rows]))
    entity_tower = AutoModel.from_pretrained(run / "entity_tower")
    names = [name for name in entity_tower.config.dense_features if name in features]

    fields = set(entity_tower.config.text_fields)

    def encode_entities(rows: list[dict]) -> np.ndarray:
        # An ablated tower reads fewer fields than the data set's rows carry.
        rows = [
            {**{k: v for k, v in row.items() if k in fields}, **{name: features[name][row["id"]] for name in names}}
            for row in rows
        ]
        return entity_tower.encode(rows, batch_size=256)

    return DenseScorer(encode_queries, encode_entities)


def dense_columns(run: Path, table: str) -> dict[str, dict[str, np.ndarray]]:
    """Every list-of-float column of a run's entity table, as ``name → id → vector``."""
    data = pq.read_table(run / "data" / table)
    ids = data["id"].to_pylist()
    return {
        field.name: dict(zip(ids, np.asarray(data[field.name].to_pylist(), dtype=np.float32), strict=True))
        for field in data.schema
        if pa.types.is_list(field.type) and pa.types.is_floating(field.type.value_type)
    }


def evaluate(dataset: str, scorer, **options) -> dict[str, float]:
    root = DATA
    if dataset == "xquad_r":
        return evaluate_xquad(scorer, root, **options)
    return evaluate_epqa(scorer, root, **options)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=sorted(VARIANTS), required=True)
    parser.add_argument("--variants", help="comma-separated subset of the trained variants (default: all)")
    parser.add_argument("--runs_dir", default="runs/quality", help="where trained variants live (reused)")
    args = parser.parse_args()
    dataset = args.dataset
    variants = args.variants.split(",") if args.variants else list(VARIANTS[dataset])
    unknown = sorted(set(variants) - set(VARIANTS[dataset]))
    if unknown:
        raise SystemExit(f"Unknown variants {unknown}; {dataset} has {list(VARIANTS[dataset])}.")
    RESULTS.mkdir(exist_ok=True)
    log_dir = RESULTS / "quality_logs"
    log_dir.mkdir(exist_ok=True)
    runs_dir = Path(args.runs_dir)

    runs, seconds = {}, {}
    for variant in variants:
        print(f"== training {dataset}/{variant}", flush=True)
        runs[variant], seconds[variant] = train(dataset, variant, runs_dir, log_dir)

    table = "sentences.parquet" if dataset == "xquad_r" else "products.parquet"
    features = dense_columns(runs[variants[0]], table)
    compat = "e5_embedding" if dataset == "xquad_r" else "text_embedding"
    results: dict[str, dict[str, float]] = {}
    for variant, run in runs.items():
        print(f"== evaluating {variant}", flush=True)
        cached = run / "quality_metrics.json"  # evaluating a trained variant again gives the same figures
        if cached.is_file() and cached.stat().st_mtime > (run / "metrics.json").stat().st_mtime:
            results[variant] = json.loads(cached.read_text())
            continue
        options = {}
        if dataset == "amazon_pqa":
            options["engaged_queries"] = VARIANTS[dataset][variant].get("data.options.engaged_queries", True)
        scorer = tower_scorer(run, features, compat=compat if variant == "searchsage" else None)
        results[variant] = evaluate(dataset, scorer, **options)
        cached.write_text(json.dumps(results[variant], indent=2, sort_keys=True) + "\n")
    results |= baselines(dataset, features, runs_dir / dataset / "baselines.json")
    report(dataset, results, seconds)


def baselines(dataset: str, features: dict[str, dict[str, np.ndarray]], cache: Path) -> dict[str, dict[str, float]]:
    """BM25, zero-shot e5 and zero-shot MiniLM on the entity's own text (cached in ``cache``: they never change).

    On XQuAD-R also ``e5_context``: zero-shot e5 against the passage mix the entity tower starts from
    (sentence + 0.5 x paragraph, renormalised), which shows what training adds to that starting point.
    """
    results = json.loads(cache.read_text()) if cache.is_file() else {}
    systems: dict[str, Any] = {}
    if dataset == "xquad_r":
        text = lambda row: row["sentence"]  # noqa: E731
        e5 = load_sentence_encoder(backbone("me5"))

        def e5_queries(queries: list[str]) -> np.ndarray:
            return e5.encode(["query: " + x for x in queries], batch_size=128, normalize_embeddings=True)

        def e5_passages(rows: list[dict], context_weight: float = 0.0) -> np.ndarray:
            mix = np.stack(
                [features["e5_embedding"][r["id"]] + context_weight * features["e5_context"][r["id"]] for r in rows]
            )
            return mix / np.linalg.norm(mix, axis=1, keepdims=True)

        systems["e5"] = lambda: DenseScorer(e5_queries, e5_passages)
        systems["e5_context"] = lambda: DenseScorer(e5_queries, lambda rows: e5_passages(rows, 0.5))
    else:
        text = lambda row: product_text(row, CATALOGUE_FIELDS)  # noqa: E731
        systems["e5"] = lambda: zero_shot_scorer(
            load_sentence_encoder(backbone("me5"), max_length=256),
            text,
            query_prefix="query: ",
            passage_prefix="passage: ",
        )
    systems["bm25"] = lambda: BM25Scorer(text)
    systems["minilm"] = lambda: zero_shot_scorer(load_sentence_encoder(backbone("minilm")), text)
    for name, scorer in systems.items():
        if name not in results:
            print(f"== baseline {name}", flush=True)
            options = {"pooled_k": None} if dataset == "xquad_r" and name == "bm25" else {}
            results[name] = evaluate(dataset, scorer(), **options)
            cache.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    return results


def report(dataset: str, results: dict[str, dict[str, float]], seconds: dict[str, float | None]) -> None:
    """Write ``bench/results/<dataset>.{json,md,png}``."""
    names = {
        "bm25": "BM25 (bm25s defaults)",
        "e5": "multilingual-e5-small zero-shot",
        "e5_context": "e5 zero-shot, sentence + 0.5 x paragraph (the entity tower's starting point)",
        "minilm": "all-MiniLM-L6-v2 zero-shot",
        "searchsage": "SearchSage-style (query tower vs. the pre-existing embedding only)",
        "single_task": "OmniSearchSage, single task (query → entity only)",
        "omnisearchsage": "**OmniSearchSage** (multi-task)",
    }
    payload = {"dataset": dataset, "training_seconds": seconds, "results": results}
    write_text_atomically(RESULTS / f"{dataset}.json", json.dumps(payload, indent=2, sort_keys=True) + "\n")

    lines = [f"# Retrieval quality: {dataset} (`python bench/quality.py --dataset {dataset}`)", ""]
    order = ("bm25", "e5", "minilm", "e5_context", "searchsage", "single_task", "omnisearchsage")
    main_rows = [k for k in order if k in results]
    if dataset == "xquad_r":
        lines += [
            "Recall@10 of each language's test questions (articles with index % 3 == 2) against all of that "
            "language's sentences (~1,200; 852 in Thai); pooled = all 11 languages' sentences in one index, the "
            "fraction of a question's 11 parallel gold sentences in its top 10 (ceiling 10/11 = 0.909). Data: "
            "XQuAD-R (CC BY-SA 4.0, Roy et al. 2020).",
            "",
            "| | " + " | ".join(LANGUAGES) + " | mean | pooled |",
            "|---|" + "---|" * (len(LANGUAGES) + 2),
        ]

        def row(key: str) -> str:
            m = results[key]
            values = [m[f"xquad_r_{lang}_recall@10"] for lang in LANGUAGES]
            pooled = m.get("xquad_r_pooled_recall@10")
            cells = " | ".join(f"{v:.3f}" for v in values)
            return f"| {names.get(key, key)} | {cells} | {np.mean(values):.3f} | " + (
                f"{pooled:.3f} |" if pooled is not None else "n/a |"
            )

        metric = "xquad_r_recall@10"
    else:
        lines += [
            "Recall@10 (and MRR) of the 304 test questions (md5(qid) % 3 == 0) against all 888 products; product "
            "text = title + description/bullet/attribute snippets for every system, plus the product's training "
            "questions as engaged queries where a row says so. Data: Amazon ePQA (CDLA-Sharing-1.0).",
            "",
            "| | Recall@1 | Recall@10 | Recall@100 | MRR |",
            "|---|---|---|---|---|",
        ]

        def row(key: str) -> str:
            m = results[key]
            cells = " | ".join(f"{m[f'epqa_{x}']:.3f}" for x in ("recall@1", "recall@10", "recall@100", "mrr"))
            return f"| {names.get(key, key)} | {cells} |"

        metric = "epqa_recall@10"
    lines += [row(key) for key in main_rows]
    lines += ["", "## Enrichment ablation (paper Table 4)", "", "| entity text | Recall@10 |", "|---|---|"]
    lines += [f"| {label} | {results[key][metric]:.3f} |" for label, key in ENRICHMENT[dataset] if key in results]
    if "single_task" in results and "omnisearchsage" in results:
        lines += ["", "## Single-task vs multi-task (paper Table 5)", "", "| model | Recall@10 |", "|---|---|"]
        lines += [f"| {names[key]} | {results[key][metric]:.3f} |" for key in ("single_task", "omnisearchsage")]
    trained = {k: v for k, v in seconds.items() if v is not None}
    if trained:
        lines += [
            "",
            "Training time on this machine (2 CPU cores, shared): "
            + ", ".join(f"{k} {v / 60:.1f} min" for k, v in trained.items())
            + f". Logs: `quality_logs/{dataset}_*.log`.",
        ]
    md = RESULTS / f"{dataset}.md"
    write_text_atomically(md, "\n".join(lines) + "\n")
    bar_chart(dataset, results, main_rows, names, RESULTS / f"{dataset}.png")
    print(md.read_text())


def bar_chart(
    dataset: str, results: dict[str, dict[str, float]], keys: list[str], names: dict[str, str], path: Path
) -> None:
    """Grouped bars of Recall@10: per language for XQuAD-R, per metric for ePQA."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if dataset == "xquad_r":
        groups = [*LANGUAGES, "mean"]
        values = {
            k: [results[k][f"xquad_r_{g}_recall@10"] for g in LANGUAGES] + [results[k]["xquad_r_recall@10"]]
            for k in keys
        }
    else:
        groups = ["recall@1", "recall@10", "recall@100", "mrr"]
        values = {k: [results[k][f"epqa_{g}"] for g in groups] for k in keys}
    figure, axes = plt.subplots(figsize=(max(8, 1.1 * len(groups) + 2), 4.5))
    width = 0.8 / len(keys)
    for i, key in enumerate(keys):
        positions = np.arange(len(groups)) + (i - (len(keys) - 1) / 2) * width
        axes.bar(positions, values[key], width, label=names.get(key, key).replace("*", ""))
    axes.set_xticks(np.arange(len(groups)), groups)
    axes.set_ylim(0, 1)
    axes.set_ylabel("Recall@10" if dataset == "xquad_r" else "score")
    axes.set_title(f"{dataset}: test questions")
    axes.legend(fontsize=7, loc="lower left")
    figure.tight_layout()
    replace_atomically(path, lambda tmp: figure.savefig(tmp, format="png", dpi=110))
    plt.close(figure)


if __name__ == "__main__":
    main()
