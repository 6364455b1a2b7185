"""Markdown and chart of ``bench/quality.py``: the dev selection and the final test tables with intervals.

Kept apart from the benchmark so that the tables can be rewritten from a saved ``<dataset>.json`` alone:
``python bench/quality_report.py --dataset xquad_r``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from omnisearchsage_hf.atomic import replace_atomically, write_text_atomically
from omnisearchsage_hf.data.xquad_r import LANGUAGES

RESULTS = Path(__file__).resolve().parent / "results"
ZERO_SHOT = {
    "bm25": "BM25 (bm25s defaults)",
    "e5": "multilingual-e5-small zero-shot",
    "e5_context": "e5 zero-shot, sentence + 0.5 x paragraph (the entity tower's starting point)",
    "minilm": "all-MiniLM-L6-v2 zero-shot",
    "minilm_leaky": "all-MiniLM-L6-v2 zero-shot, *leaky catalogue* (test snippets kept; not comparable)",
    "omnisearchsage_leaky": "OmniSearchSage, *leaky catalogue* (same towers; not comparable)",
}
MEASURES = (("recall@1", "R@1"), ("mrr", "MRR"), ("recall@10", "R@10"), ("recall@100", "R@100"))
ORDER = ("bm25", "minilm", "e5", "e5_context", "searchsage", "single_task", "base_text", "title_only")
ORDER += ("catalogue_text", "no_crosslingual", "no_hard_negatives", "omnisearchsage")


def describe(dataset: str) -> str:
    if dataset == "xquad_r":
        return (
            "XQuAD-R test articles (index % 3 == 2; 374 questions per language), each language's questions "
            "against all of that language's sentences (~1,200; 852 in Thai); pooled = all 11 languages' "
            "sentences in one index, the fraction of a question's 11 parallel gold sentences in its top 10 "
            "(ceiling 10/11 = 0.909). Trained runs saw the train articles less the dev articles. Data: XQuAD-R "
            "(CC BY-SA 4.0, Roy et al. 2020)."
        )
    return (
        "ePQA test questions (md5(qid) % 3 == 0: 304) against all 888 products, on the leak-free catalogue (no "
        "snippet chosen only for a held-out question) for every system; product text = title + description/"
        "bullet/attribute snippets, plus the product's training questions as engaged queries where the system "
        "reads them. Trained runs saw the train questions less the dev questions. Data: Amazon ePQA "
        "(CDLA-Sharing-1.0)."
    )


def label(payload: dict[str, Any], name: str) -> str:
    return payload.get("labels", {}).get(name) or ZERO_SHOT.get(name, name)


def interval(ci: dict[str, float]) -> str:
    return f"{ci['difference']:+.3f} [{ci['low']:+.3f}, {ci['high']:+.3f}]"


def ordered(names: list[str]) -> list[str]:
    return sorted(
        names, key=lambda n: (ORDER.index(n.removesuffix("_leaky")) if n.removesuffix("_leaky") in ORDER else 99, n)
    )


def write_test_report(dataset: str, payload: dict[str, Any], results: Path = RESULTS) -> None:
    """``<dataset>.md`` and ``.png`` from the payload ``bench/quality.py`` wrote to ``<dataset>.json``."""
    metrics, differences = payload["metrics"], payload["differences"]
    names = ordered(list(metrics))
    pooled = dataset == "xquad_r"
    lines = [
        f"# Retrieval quality: {dataset} (`python bench/quality.py --dataset {dataset}`)",
        "",
        describe(dataset),
        "",
    ]
    header = "| system | " + " | ".join(short for _, short in MEASURES) + (" | pooled R@10 |" if pooled else " |")
    lines += [header, "|---" * (len(MEASURES) + 1 + pooled) + "|"]
    for name in names:
        m = metrics[name]
        cells = [f"{m[key]:.3f}" for key, _ in MEASURES]
        if pooled:
            cells.append(f"{m['pooled_recall@10']:.3f}" if "pooled_recall@10" in m else "n/a")
        lines.append(f"| {label(payload, name)} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Hyperparameters chosen on dev: {', '.join(f'{k} → `{v}`' for k, v in payload['chosen_on_dev'].items())}",
    ]
    lines += ["(see `" + dataset + "_dev.md`)."]
    if payload.get("not_run"):
        lines += [
            "",
            "Not trained in the run that wrote this file (the script trains them with `--systems` left at its "
            f"default): {', '.join(payload['not_run'])}.",
        ]

    bootstrap = payload["bootstrap"]
    lines += [
        "",
        "## Differences with 95% intervals",
        "",
        f"Paired bootstrap over the same test questions ({bootstrap['resamples']:,} resamples, seed "
        f"{bootstrap['seed']}); on XQuAD-R the unit resampled is the question id, its value averaged over its 11 "
        "languages (they are translations). An interval above 0 says the system beats the reference on questions "
        "like these; it does not cover training noise (another seed).",
    ]
    shown = [key for key, _ in MEASURES] + (["pooled_recall@10"] if pooled else [])
    for reference in payload["references"]:
        lines += ["", f"### minus {label(payload, reference)}", ""]
        lines += ["| system | " + " | ".join(k for k in shown) + " |", "|---" * (len(shown) + 1) + "|"]
        for name in names:
            if name in differences[reference]:
                row = differences[reference][name]
                lines.append(
                    f"| {label(payload, name)} | "
                    + " | ".join(interval(row[k]) if k in row else "n/a" for k in shown)
                    + " |"
                )

    lines += ["", "## Ablations (each minus the full model; same hyperparameters, same dev-chosen budget)", ""]
    lines += ["| ablation | " + " | ".join(shown) + " |", "|---" * (len(shown) + 1) + "|"]
    for name in payload["ablations"]:
        if name in differences["omnisearchsage"]:
            row = differences["omnisearchsage"][name]
            lines.append(
                f"| {label(payload, name)} | "
                + " | ".join(interval(row[k]) if k in row else "n/a" for k in shown)
                + " |"
            )

    languages = [lang for lang in LANGUAGES if f"{lang}_mrr" in metrics[names[0]]] if pooled else []
    if languages:
        for key, short in MEASURES:
            lines += ["", f"## {short} per language", ""]
            lines += ["| system | " + " | ".join(languages) + " | mean |", "|---" * (len(languages) + 2) + "|"]
            for name in names:
                m = metrics[name]
                lines.append(
                    f"| {label(payload, name)} | "
                    + " | ".join(f"{m[f'{lang}_{key}']:.3f}" for lang in languages)
                    + f" | {m[key]:.3f} |"
                )
        lines += ["", "## Pooled cross-lingual R@10 per query language", ""]
        lines += ["| system | " + " | ".join(languages) + " | mean |", "|---" * (len(languages) + 2) + "|"]
        for name in names:
            m = metrics[name]
            if "pooled_recall@10" in m:
                lines.append(
                    f"| {label(payload, name)} | "
                    + " | ".join(f"{m[f'pooled_{lang}_recall@10']:.3f}" for lang in languages)
                    + f" | {m['pooled_recall@10']:.3f} |"
                )
    trained = {k: v for k, v in payload["training_seconds"].items() if v is not None}
    if trained:
        lines += [
            "",
            "Training time on this machine (2 CPU cores, shared with other jobs): "
            + ", ".join(f"{k} {v / 60:.1f} min" for k, v in trained.items())
            + f". Logs: `quality_logs/{dataset}_*.log`.",
        ]
    write_text_atomically(results / f"{dataset}.md", "\n".join(lines) + "\n")
    bar_chart(dataset, payload, [n for n in names if not n.endswith("_leaky")], results / f"{dataset}.png")


def write_dev_report(dataset: str, out: dict[str, Any], results: Path = RESULTS) -> None:
    """``<dataset>_dev.{json,md}``: every candidate's dev figures and the chosen one per system."""
    write_text_atomically(results / f"{dataset}_dev.json", json.dumps(out, indent=2, sort_keys=True) + "\n")
    pooled = dataset == "xquad_r"
    lines = [f"# Model selection on dev: {dataset} (`python bench/quality.py --dataset {dataset} --stage dev`)", ""]
    lines += [
        "Dev questions only (XQuAD-R: the 6 dev articles carved from the train articles, 155 questions per "
        "language; ePQA: 133 train questions held out). The candidate with the best dev MRR is chosen; the test "
        "split is not read here.",
        "",
    ]
    shown = [key for key, _ in MEASURES] + (["pooled_recall@10"] if pooled else [])
    lines += ["| run | overrides | " + " | ".join(shown) + " | minutes | chosen |", "|---" * (len(shown) + 4) + "|"]
    chosen = set(out["chosen"].values())
    for name, candidate in out["candidates"].items():
        m = candidate["dev"]
        overrides = ", ".join(describe_override(k, v) for k, v in candidate["overrides"].items()) or "(config)"
        minutes = f"{candidate['seconds'] / 60:.1f}" if candidate.get("seconds") else "?"
        cells = " | ".join(f"{m[k]:.3f}" if k in m else "n/a" for k in shown)
        lines.append(f"| {name} | {overrides} | {cells} | {minutes} | {'**yes**' if name in chosen else ''} |")
    lines += ["", "Zero-shot systems on the same dev questions:", ""]
    lines += ["| system | " + " | ".join(shown) + " |", "|---" * (len(shown) + 1) + "|"]
    for name, m in out["baselines"].items():
        lines.append(
            f"| {ZERO_SHOT.get(name, name)} | " + " | ".join(f"{m[k]:.3f}" if k in m else "n/a" for k in shown) + " |"
        )
    write_text_atomically(results / f"{dataset}_dev.md", "\n".join(lines) + "\n")


def describe_override(key: str, value: Any) -> str:
    """One override for a table cell; a task list shows each task's name and its hard negatives."""
    if key != "data.tasks":
        return f"`{key}={json.dumps(value)}`"
    names = []
    for task in value:
        pool = task.get("hard_negatives_group") or task.get("hard_negatives")
        names.append(task["name"] + (f" (+{task['num_hard_negatives']} hard: {pool})" if pool else ""))
    return "tasks: " + ", ".join(names)


def bar_chart(dataset: str, payload: dict[str, Any], names: list[str], path: Path) -> None:
    """Grouped bars: R@1, MRR, R@10 (and pooled R@10) per system."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [key for key, _ in MEASURES[:3]] + (["pooled_recall@10"] if dataset == "xquad_r" else [])
    figure, axes = plt.subplots(figsize=(10, 4.5))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        values = [payload["metrics"][name].get(g, np.nan) for g in groups]
        positions = np.arange(len(groups)) + (i - (len(names) - 1) / 2) * width
        axes.bar(positions, values, width, label=label(payload, name).replace("*", ""))
    axes.set_xticks(np.arange(len(groups)), groups)
    axes.set_ylim(0, 1)
    axes.set_title(f"{dataset}: test questions")
    axes.legend(fontsize=6, loc="upper right")
    figure.tight_layout()
    replace_atomically(path, lambda tmp: figure.savefig(tmp, format="png", dpi=110))
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", required=True)
    args = parser.parse_args()
    write_test_report(args.dataset, json.loads((RESULTS / f"{args.dataset}.json").read_text()))


if __name__ == "__main__":
    main()
