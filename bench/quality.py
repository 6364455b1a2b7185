"""Retrieval quality on real data: OmniSearchSage against BM25 and zero-shot encoders, with the paper's ablations.

For one data set (``--dataset xquad_r`` or ``amazon_pqa``), in two stages:

1. ``--stage dev`` (model selection): every trained system with candidates in ``GRID`` is trained once per
   candidate (``training/train.py``, or a finished run in ``--runs_dir`` is reused) on the train split
   *less the dev split* (XQuAD-R: every fifth train article; ePQA: one train question in five), ranked on
   the dev questions, and the candidate with the best dev MRR is chosen. Writes
   ``bench/results/<dataset>_dev.{json,md}``. The test questions are not touched.
2. ``--stage test`` (the final table): the chosen runs, the ablations (trained with the chosen
   hyperparameters of the system they ablate) and the zero-shot baselines are ranked on the test
   questions with the same scoring code (``rank_xquad`` / ``rank_epqa``); per-language and mean R@1, MRR,
   R@10, R@100 (and pooled cross-lingual R@10 on XQuAD-R), and for every system a paired bootstrap 95%
   interval (same questions, 1,000 resamples, seed 0; ``compare_ranks``) of its difference to each
   reference system. Writes ``bench/results/<dataset>.{json,md,png}``.

Every trained run, the dev selections included, uses the same train split (``dev_split: true``), so the
runs chosen on dev are the ones scored on test. ePQA uses the leak-free catalogue (no snippet that was
chosen only for a held-out question) for every system; the leaky catalogue appears as labelled rows only.

Data: XQuAD-R (CC BY-SA 4.0, Roy et al. 2020) and Amazon ePQA (CDLA-Sharing-1.0, Shen et al. 2023), read
in place from ``../shared/data``. Backbones: ``python ../shared/tools/backbones.py me5|minilm``.

Usage:
    python bench/quality.py --dataset xquad_r [--stage dev|test|all] [--runs_dir runs/quality]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from quality_report import write_dev_report, write_test_report
from transformers import AutoModel

from omnisearchsage_hf.atomic import write_text_atomically
from omnisearchsage_hf.data.amazon_pqa import CATALOGUE_FIELDS, product_text
from omnisearchsage_hf.data.encoders import load_sentence_encoder
from omnisearchsage_hf.evaluation import (
    QuestionRanks,
    compare_ranks,
    load_ranks,
    rank_epqa,
    rank_xquad,
    save_ranks,
    xquad_metrics,
)
from omnisearchsage_hf.evaluation.baselines import zero_shot_scorer
from omnisearchsage_hf.evaluation.scoring import BM25Scorer, DenseScorer, Scorer

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
BACKBONES = ROOT.parent / "shared" / "tools" / "backbones.py"
DATA = ROOT.parent / "shared" / "data"
RESAMPLES, SEED = 1000, 0

XQUAD_TASKS = {
    "query_sentence": {
        "name": "query_sentence",
        "candidate": "entity:sentences",
        "pairs": "pairs/query_sentence_train.parquet",
        "eval_pairs": "pairs/query_sentence_dev.parquet",
        "share": 8,
        "num_random_negatives": 64,
    },
    "query_sentence_crosslingual": {
        "name": "query_sentence_crosslingual",
        "candidate": "entity:sentences",
        "pairs": "pairs/query_sentence_crosslingual_train.parquet",
        "share": 4,
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
        "eval_pairs": "pairs/query_sentence_dev.parquet",
        "share": 2,
    },
}
EPQA_TASKS = {
    "query_product": {
        "name": "query_product",
        "candidate": "entity:products",
        "pairs": "pairs/query_product_train.parquet",
        "eval_pairs": "pairs/query_product_dev.parquet",
        "share": 4,
        "num_random_negatives": 64,
        "max_pairs_per_candidate": 200,
    },
    "query_product_compat": {
        "name": "query_product_compat",
        "candidate": "compat:products:text_embedding",
        "pairs": "pairs/query_product_train.parquet",
        "eval_pairs": "pairs/query_product_dev.parquet",
        "share": 1,
    },
}


def tasks(catalogue: dict[str, dict[str, Any]], *names: str, **changes: dict[str, Any]) -> list[dict[str, Any]]:
    """The named tasks of ``catalogue``, each updated with ``changes[name]`` (e.g. hard-negative options)."""
    return [catalogue[name] | changes.get(name, {}) for name in names]


Overrides = dict[str, Any]
HARD_NEGATIVE_KEYS = ("num_hard_negatives", "hard_negatives", "hard_negatives_group", "hard_negatives_weight")


def keep_tasks(*names: str) -> Callable[[Overrides], Overrides]:
    """An ablation keeping only the named tasks (with whatever options the full model gives them)."""
    return lambda o: o | {"data.tasks": [t for t in o["data.tasks"] if t["name"] in names]}


def drop_tasks(*names: str) -> Callable[[Overrides], Overrides]:
    return lambda o: o | {"data.tasks": [t for t in o["data.tasks"] if t["name"] not in names]}


def without_hard_negatives(o: Overrides) -> Overrides:
    return o | {"data.tasks": [{k: v for k, v in t.items() if k not in HARD_NEGATIVE_KEYS} for t in o["data.tasks"]]}


def with_changes(**changes: Any) -> Callable[[Overrides], Overrides]:
    return lambda o: o | {key.replace("__", "."): value for key, value in changes.items()}


@dataclass
class System:
    """A trained system: the data set's config plus overrides (dotted keys, as on train.py's command line).

    A system with a ``grid`` is trained once per candidate (name → overrides on top of ``BASE_OVERRIDES``)
    and the best dev MRR is chosen. A system without one ``follows`` another and is trained with that
    system's chosen candidate, so an ablation differs from the full model only in what ``ablate`` changes.
    ``ablate`` also applies to the grid candidates (the SearchSage baseline: the same candidates, its one
    task). ``compat`` scores the query tower against that pre-existing embedding instead of the entity
    tower (the SearchSage-style baseline).
    """

    label: str
    grid: dict[str, Overrides] = field(default_factory=dict)
    follows: str | None = None
    ablate: Callable[[Overrides], Overrides] = lambda o: o
    compat: str | None = None


# XQuAD-R candidates: the budget fits 60 minutes of 2 shared CPU cores; hard negatives are the other
# sentences of the gold sentence's paragraph (the confusers of a paragraph-enriched entity).
XQUAD_BUDGET = {"train.max_steps": 150, "train.learning_rate": 2e-5, "train.entity_learning_rate": 6e-5}
XQUAD_BUDGET |= {"train.eval_every": 1000, "train.save_every": 50}
PARAGRAPH_NEGATIVES = {"num_hard_negatives": 4, "hard_negatives_group": "paragraph"}
XQUAD_ALL = ("query_sentence", "query_sentence_crosslingual", "query_query", "query_sentence_e5")
XQUAD_HARD_NEGATIVES = {
    "data.tasks": tasks(
        XQUAD_TASKS,
        *XQUAD_ALL,
        query_sentence=PARAGRAPH_NEGATIVES,
        query_sentence_crosslingual=PARAGRAPH_NEGATIVES,
        query_sentence_e5=PARAGRAPH_NEGATIVES,
    )
}
XQUAD_GRID = {
    "lr2x_s150": XQUAD_BUDGET,
    "hn4_lr2x_s150": XQUAD_BUDGET | XQUAD_HARD_NEGATIVES,
    # Every transformer block trained (the config freezes the first 8 of 12).
    "hn4_unfrozen_lr2x_s150": XQUAD_BUDGET | XQUAD_HARD_NEGATIVES | {"model.freeze_backbone_layers": 0},
}
# ePQA candidates (a run takes 2-5 minutes on 2 quiet cores): the config's budget, a smaller and a larger
# learning rate, and twice the steps; the same grid for the SearchSage-style baseline.
EPQA_GRID = {
    "config": {},
    "lr1e-5": {"train.learning_rate": 1e-5, "train.entity_learning_rate": 1.5e-5},
    "lr5e-5": {"train.learning_rate": 5e-5, "train.entity_learning_rate": 7.5e-5},
    "lr5e-5_s300": {"train.learning_rate": 5e-5, "train.entity_learning_rate": 7.5e-5, "train.max_steps": 300},
}
SYSTEMS: dict[str, dict[str, System]] = {
    "xquad_r": {
        "omnisearchsage": System("**OmniSearchSage** (multi-task, cross-lingual pairs)", grid=XQUAD_GRID),
        "searchsage": System(
            "SearchSage-style (query tower vs. the pre-existing e5 embedding only)",
            grid=XQUAD_GRID,
            ablate=keep_tasks("query_sentence_e5"),
            compat="e5_embedding",
        ),
        "no_hard_negatives": System(
            "OmniSearchSage without hard negatives", follows="omnisearchsage", ablate=without_hard_negatives
        ),
        "no_crosslingual": System(
            "OmniSearchSage without cross-lingual pairs",
            follows="omnisearchsage",
            ablate=drop_tasks("query_sentence_crosslingual"),
        ),
        "single_task": System(
            "OmniSearchSage, single task (query → entity only)",
            follows="omnisearchsage",
            ablate=keep_tasks("query_sentence"),
        ),
        "base_text": System(
            "OmniSearchSage, entity = sentence only (no paragraph, no title)",
            follows="omnisearchsage",
            ablate=with_changes(
                model__entity__text_fields=["sentence"],
                model__entity__dense_features={"e5_embedding": 384},
                model__entity__residual_features={"e5_embedding": 1.0},
            ),
        ),
    },
    "amazon_pqa": {
        "omnisearchsage": System("**OmniSearchSage** (multi-task)", grid=EPQA_GRID),
        "searchsage": System(
            "SearchSage-style (query tower vs. the pre-existing MiniLM embedding only)",
            grid=EPQA_GRID,
            ablate=keep_tasks("query_product_compat"),
            compat="text_embedding",
        ),
        "single_task": System(
            "OmniSearchSage, single task (query → entity only)",
            follows="omnisearchsage",
            ablate=keep_tasks("query_product"),
        ),
        "title_only": System(
            "OmniSearchSage, entity = title only",
            follows="omnisearchsage",
            ablate=with_changes(model__entity__text_fields=["title"], data__options__engaged_queries=False),
        ),
        "catalogue_text": System(
            "OmniSearchSage, entity = catalogue text (no engaged queries)",
            follows="omnisearchsage",
            ablate=with_changes(
                model__entity__text_fields=list(CATALOGUE_FIELDS), data__options__engaged_queries=False
            ),
        ),
    },
}
BASE_OVERRIDES = {
    "xquad_r": {"data.options.dev_split": True, "data.tasks": tasks(XQUAD_TASKS, *XQUAD_ALL)},
    "amazon_pqa": {
        "data.options.dev_split": True,
        "data.tasks": tasks(EPQA_TASKS, "query_product", "query_product_compat"),
    },
}
# Zero-shot systems every trained one is compared with (paired bootstrap intervals of the difference).
REFERENCES = {"xquad_r": ("e5", "e5_context"), "amazon_pqa": ("minilm", "e5")}
# Ablations: (row label, system) pairs compared with the full model.
ABLATIONS = {
    "xquad_r": ("no_hard_negatives", "no_crosslingual", "single_task", "base_text", "searchsage"),
    "amazon_pqa": ("single_task", "title_only", "catalogue_text", "searchsage"),
}


def backbone(name: str) -> str:
    """The local folder of a real pretrained encoder (``me5`` or ``minilm``)."""
    return subprocess.run(
        [sys.executable, str(BACKBONES), name], check=True, capture_output=True, text=True
    ).stdout.strip()


def config_path(dataset: str) -> Path:
    return ROOT / "training" / "configs" / f"{dataset}.yaml"


def train(
    dataset: str, name: str, runs_dir: Path, log_dir: Path, overrides: dict[str, Any]
) -> tuple[Path, float | None]:
    """Train ``runs_dir/dataset/name`` with ``training/train.py`` unless it is already finished; return it.

    ``overrides`` are dotted keys on top of the data set's config. Returns the run folder and its training
    seconds (None when unknown).
    """
    output = runs_dir / dataset / name
    recorded = json.dumps(overrides, sort_keys=True)
    for other in sorted((runs_dir / dataset).glob("*/overrides.json")):
        if other.read_text() == recorded and other.parent != output:  # the same training under another name
            output = other.parent
            break
    if (output / "metrics.json").is_file() and (output / "query_tower").is_dir():
        seconds = output / "training_seconds.txt"
        return output, float(seconds.read_text()) if seconds.is_file() else None
    command = [sys.executable, str(ROOT / "training" / "train.py"), "--config", str(config_path(dataset))]
    command += ["--output_dir", str(output)]
    overrides = dict(overrides)
    if dataset == "amazon_pqa":  # the MiniLM folder sits inside its package, so the config cannot name it
        overrides |= {"model.backbone": backbone("minilm"), "data.options.compat_encoder": backbone("minilm")}
    for key, value in overrides.items():
        command.append(f"--{key}={yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()}")
    if (output / "training_config.yaml").is_file():  # an earlier attempt: continue it
        command.append("--resume")
    output.mkdir(parents=True, exist_ok=True)
    write_text_atomically(output / "overrides.json", recorded)
    # Zero-shot passage embeddings are cached per run; a sibling run's cache spares re-encoding them.
    cache = output / "data" / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    for sibling in (runs_dir / dataset).glob("*/data/cache/passages-*.npy"):
        if not (cache / sibling.name).exists():
            shutil.copyfile(sibling, cache / sibling.name)
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{dataset}_{name}.log"
    start = time.time()
    with open(log_path, "w", encoding="utf-8") as log:
        log.write("$ " + " ".join(command[1:]) + "\n")
        log.flush()
        # The configs name Hub ids and $OMNISEARCHSAGE_DATA; here they resolve to the shared copies.
        env = {
            **os.environ,
            "TQDM_MININTERVAL": "60",
            "OMNISEARCHSAGE_DATA": str(DATA),
            "OMNISEARCHSAGE_MODELS": str(Path(backbone("me5")).parent),
        }
        if subprocess.run(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env).returncode != 0:
            raise SystemExit(f"training {dataset}/{name} failed; see {log_path}")
    (output / "training_seconds.txt").write_text(f"{time.time() - start:.0f}\n")
    return output, time.time() - start


def run_overrides(dataset: str, system: System, candidate: Overrides) -> Overrides:
    return system.ablate(BASE_OVERRIDES[dataset] | candidate)


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


def rank(dataset: str, scorer: Scorer, split: str, cache: Path, **options: Any) -> QuestionRanks:
    """Per-question ranks of ``scorer`` on ``split`` (cached in ``cache``: a trained run never changes)."""
    if cache.is_file():
        return load_ranks(cache)
    pooled = options.pop("pooled", True)  # XQuAD-R's cross-lingual index; ePQA has one language
    if dataset == "xquad_r":
        ranks = rank_xquad(scorer, DATA, split=split, pooled=pooled)
    else:
        options = {"engaged_queries": True, "test_question_snippets": False} | options
        ranks = rank_epqa(scorer, DATA, dev_split=True, split=split, **options)
    cache.parent.mkdir(parents=True, exist_ok=True)
    save_ranks(ranks, cache)
    return ranks


def metrics_of(dataset: str, ranks: QuestionRanks) -> dict[str, float]:
    """Per-language and mean R@1, R@10, R@100 and MRR (+ pooled R@10 where ranked)."""
    return xquad_metrics(ranks, pooled_k=10 if ranks.pooled else None, name="")


def zero_shot_systems(dataset: str, features: dict[str, dict[str, np.ndarray]]) -> dict[str, Callable[[], Scorer]]:
    """BM25, zero-shot e5 and MiniLM on the entity's own text; on XQuAD-R also e5 on the enriched start.

    ``e5_context`` is zero-shot e5 against the passage mix the entity tower starts from (sentence + 0.5 x
    paragraph, renormalised): what training adds to that starting point.
    """
    systems: dict[str, Callable[[], Scorer]] = {}
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
    return systems


def select_on_dev(dataset: str, systems: list[str], runs_dir: Path, log_dir: Path) -> dict[str, Any]:
    """Train every grid candidate, rank it on dev, choose the best dev MRR per system; write the dev results."""
    out: dict[str, Any] = {"candidates": {}, "chosen": {}, "baselines": {}}
    for name, system in SYSTEMS[dataset].items():
        if not system.grid or name not in systems:
            continue
        best = None
        for candidate, changes in system.grid.items():
            run_name = f"{name}__{candidate}"
            print(f"== dev: training {dataset}/{run_name}", flush=True)
            run, seconds = train(dataset, run_name, runs_dir, log_dir, run_overrides(dataset, system, changes))
            features = dense_columns(run, entity_table(dataset))
            ranks = rank(dataset, tower_scorer(run, features, compat=system.compat), "dev", run / "ranks_dev.npz")
            metrics = metrics_of(dataset, ranks)
            out["candidates"][run_name] = {"run": run.name, "overrides": changes, "seconds": seconds, "dev": metrics}
            if best is None or metrics["mrr"] > out["candidates"][best]["dev"]["mrr"]:
                best = run_name
        out["chosen"][name] = best
    first = next(iter(out["candidates"].values()))["run"]
    features = dense_columns(runs_dir / dataset / first, entity_table(dataset))
    for name, scorer in zero_shot_systems(dataset, features).items():
        print(f"== dev: zero-shot {name}", flush=True)
        cache = runs_dir / dataset / "baselines" / f"{name}_dev.npz"
        ranks = rank(dataset, scorer(), "dev", cache, **({"pooled": False} if name == "bm25" else {}))
        out["baselines"][name] = metrics_of(dataset, ranks)
    write_dev_report(dataset, out, RESULTS)
    return out


def entity_table(dataset: str) -> str:
    return "sentences.parquet" if dataset == "xquad_r" else "products.parquet"


def evaluate_on_test(dataset: str, systems: list[str], chosen: dict[str, str], runs_dir: Path, log_dir: Path) -> None:
    """Rank the chosen runs, the ablations and the zero-shot systems on test; write the final tables."""
    runs: dict[str, Path] = {}
    seconds: dict[str, float | None] = {}
    overrides: dict[str, Overrides] = {}
    for name, system in SYSTEMS[dataset].items():
        if name not in systems:
            continue
        source = name if system.grid else system.follows
        candidate = chosen[source].split("__", 1)[1]
        overrides[name] = run_overrides(dataset, system, SYSTEMS[dataset][source].grid[candidate])
        print(f"== test: training {dataset}/{name}__{candidate}", flush=True)
        runs[name], seconds[name] = train(dataset, f"{name}__{candidate}", runs_dir, log_dir, overrides[name])
    features = dense_columns(runs["omnisearchsage"], entity_table(dataset))
    ranks: dict[str, QuestionRanks] = {}
    for name, run in runs.items():
        print(f"== test: ranking {name}", flush=True)
        options = {}
        if dataset == "amazon_pqa":
            options["engaged_queries"] = overrides[name].get("data.options.engaged_queries", True)
        scorer = tower_scorer(run, features, compat=SYSTEMS[dataset][name].compat)
        ranks[name] = rank(dataset, scorer, "test", run / "ranks_test.npz", **options)
    for name, scorer in zero_shot_systems(dataset, features).items():
        print(f"== test: zero-shot {name}", flush=True)
        cache = runs_dir / dataset / "baselines" / f"{name}_test.npz"
        ranks[name] = rank(dataset, scorer(), "test", cache, **({"pooled": False} if name == "bm25" else {}))
    if dataset == "amazon_pqa":  # the leaky catalogue, for comparison with earlier figures only
        leaky = {"test_question_snippets": True}
        ranks["minilm_leaky"] = rank(
            dataset,
            zero_shot_systems(dataset, features)["minilm"](),
            "test",
            runs_dir / dataset / "baselines" / "minilm_test_leaky.npz",
            **leaky,
        )
        run = runs["omnisearchsage"]
        ranks["omnisearchsage_leaky"] = rank(
            dataset, tower_scorer(run, features), "test", run / "ranks_test_leaky.npz", **leaky
        )
    metrics = {name: metrics_of(dataset, r) for name, r in ranks.items()}
    comparisons: dict[str, dict[str, dict[str, dict[str, float]]]] = {}
    for reference in (*REFERENCES[dataset], "omnisearchsage"):
        comparisons[reference] = {
            name: {m: vars(ci) for m, ci in compare_ranks(ranks[reference], r, resamples=RESAMPLES, seed=SEED).items()}
            for name, r in ranks.items()
            if name != reference and not name.endswith("_leaky")
        }
    payload = {
        "dataset": dataset,
        "chosen_on_dev": chosen,
        "training_seconds": seconds,
        "metrics": metrics,
        "differences": comparisons,
        "bootstrap": {"resamples": RESAMPLES, "seed": SEED, "confidence": 0.95},
        "labels": {name: system.label for name, system in SYSTEMS[dataset].items()},
        "ablations": [name for name in ABLATIONS[dataset] if name in runs],
        "not_run": [name for name in SYSTEMS[dataset] if name not in runs],
        "references": REFERENCES[dataset],
    }
    write_text_atomically(RESULTS / f"{dataset}.json", json.dumps(payload, indent=2, sort_keys=True) + "\n")
    write_test_report(dataset, payload, RESULTS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=sorted(SYSTEMS), required=True)
    parser.add_argument("--stage", choices=("dev", "test", "all"), default="all")
    parser.add_argument("--runs_dir", default="runs/quality", help="where trained runs live (reused)")
    parser.add_argument("--systems", help="comma-separated trained systems to include (default: all)")
    args = parser.parse_args()
    systems = args.systems.split(",") if args.systems else list(SYSTEMS[args.dataset])
    unknown = sorted(set(systems) - set(SYSTEMS[args.dataset]))
    if unknown or "omnisearchsage" not in systems:
        raise SystemExit(
            f"--systems must include omnisearchsage and come from {list(SYSTEMS[args.dataset])}; got {systems}."
        )
    RESULTS.mkdir(exist_ok=True)
    log_dir, runs_dir = RESULTS / "quality_logs", Path(args.runs_dir)
    if args.stage in ("dev", "all"):
        chosen = select_on_dev(args.dataset, systems, runs_dir, log_dir)["chosen"]
    else:
        chosen = json.loads((RESULTS / f"{args.dataset}_dev.json").read_text())["chosen"]
    if args.stage in ("test", "all"):
        evaluate_on_test(args.dataset, systems, chosen, runs_dir, log_dir)


if __name__ == "__main__":
    main()
