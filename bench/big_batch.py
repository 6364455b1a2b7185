"""Big global batches on a fixed memory: the trainer with and without gradient caching, and what it buys.

Part ``scale`` (the default): peak memory and pairs/s of the real trainer (``Trainer.train``) against the
global batch size, with and without ``train.gradient_cache_chunk_size``. The model: a MiniLM-L6 query
tower (``../shared/tools/backbones.py minilm``, mean pooling, 256-d) and the paper-sized entity tower
(hash table 100k x 256, MLP 1024 → 1024 → 256) over a generated world of pins (``train_speed.py``'s
world), two tasks: query → pin through the entity tower (share 8, 32 random negatives) and query →
query through the query tower (share 2). Every configuration runs in its own process for ``--warmup``
untimed and ``--steps`` timed steps. Memory is the peak resident set size *during the training steps*
(the kernel's high-water mark, reset with ``/proc/self/clear_refs`` just before the first step, so data
loading and model building do not count), and the resident set before the first step. The budget is
the peak of the uncached trainer at ``--budget-batch`` (256): the table says which batches each mode
trains within it.

Part ``xquad``: the XQuAD-R configuration (``training/configs/xquad_r.yaml``, CPU, frozen lower layers)
trained with a cached global batch of ``--xquad-batch`` pairs for the same budget in pairs as the
committed batch-64 run (100 steps x 64 = 6,400 pairs), evaluated with the same scoring code as
``bench/quality.py`` (``evaluate_xquad``), and reported beside the batch-64 figures committed in
``bench/results/xquad_r.json``. Its learning rates are the batch-64 ones times the batch ratio, so that
the few large steps move the weights as far in total as the many small ones did (Adam's step is about
the learning rate whatever the batch): a rule fixed before the run, not tuned on test data.

Part ``xquad_dev``: the same comparison done as model selection should be: both the batch-64 run and the
cached run train on the train articles less XQuAD-R's dev articles (``data.options.dev_split``), each tries
two learning-rate multipliers of the batch-64 config, and only the one with the best dev MRR is scored on
the test articles.

Results: ``bench/results/big_batch.{json,md}`` (every part; a part's figures are kept when another part runs).

Usage:
    python bench/big_batch.py [--part scale] [--batches 64,256,1024,4096] [--chunk-size 128]
    python bench/big_batch.py --part xquad [--xquad-batch 1280]
    python bench/big_batch.py --part xquad_dev [--xquad-batch 1280]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from omnisearchsage_hf.evaluation import QuestionRanks, compare_ranks, rank_xquad, xquad_metrics

sys.path.insert(0, str(Path(__file__).parent))
from train_speed import backbone_path, ours_config, rss_mb, world_config  # noqa: E402

RESULTS = Path(__file__).parent / "results"
BATCH64 = {"batch_size": 64, "max_steps": 100, "learning_rate": 1.0e-5, "entity_learning_rate": 3.0e-5}


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (``VmHWM``) of this process; False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
            handle.write("5")
    except OSError:
        return False
    return True


def scale_config(args: argparse.Namespace, world: Path, output_dir: Path, minilm: str):
    """``train_speed.py``'s trainer config, less its compatibility task, with the batch and chunk of this run."""
    args.random_negatives, args.learning_rate = 32, 2e-5
    config = ours_config(args, world, output_dir, minilm)
    config.data.tasks = [task for task in config.data.tasks if task.candidate.kind != "compat"]
    config.train.gradient_cache_chunk_size = args.chunk_size or None
    return config


def run_scale_child(args: argparse.Namespace) -> None:
    """Child process: train one (batch, chunk) configuration; write its measurements to ``--result``."""
    from omnisearchsage_hf.training.trainer import Trainer

    torch.set_num_threads(args.threads)
    stamps: list[float] = []
    memory: dict[str, float | None] = {}
    first, closing = args.warmup, args.warmup + args.steps

    class MeasuredTrainer(Trainer):
        """``Trainer`` that records the clock at each step and the peak memory of the timed steps."""

        def collate(self, micro_step: int):
            stamps.append(time.perf_counter())
            if micro_step == 0:
                memory["rss_before_training_mb"] = rss_mb()
                memory["peak_reset"] = reset_peak_rss()
            elif micro_step == closing:
                memory["peak_rss_mb"] = rss_mb("VmHWM")  # the peak since the reset
            return super().collate(micro_step)

    with tempfile.TemporaryDirectory(prefix="big_batch_") as output_dir:
        MeasuredTrainer(scale_config(args, Path(args.world), Path(output_dir), backbone_path("minilm"))).train()
    seconds = stamps[closing] - stamps[first]
    result = {
        "batch_size": args.batch_size,
        "chunk_size": args.chunk_size or None,
        "seconds": round(seconds, 2),
        "pairs_per_second": round(args.batch_size * args.steps / seconds, 2),
        "step_s": [
            round(b - a, 2) for a, b in zip(stamps[first:closing], stamps[first + 1 : closing + 1], strict=True)
        ],
        **memory,
    }
    Path(args.result).write_text(json.dumps(result, indent=2) + "\n")


def run_scale(args: argparse.Namespace) -> dict:
    from omnisearchsage_hf.data.synthetic import generate_world

    runs = []
    with tempfile.TemporaryDirectory(prefix="big_batch_world_") as scratch:
        world = Path(scratch) / "world"
        generate_world(world_config(args)).save(world)
        for batch in [int(b) for b in args.batches.split(",")]:
            for chunk in (0, args.chunk_size):
                if chunk and chunk >= batch:
                    continue  # one chunk: the same as no caching, plus a second forward
                result = Path(scratch) / f"{batch}_{chunk}.json"
                command = [sys.executable, __file__, "--child", "--world", str(world), "--result", str(result)]
                command += ["--batch-size", str(batch), "--chunk-size", str(chunk), "--threads", str(args.threads)]
                command += ["--steps", str(args.steps), "--warmup", str(args.warmup), "--pins", str(args.pins)]
                env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "TRANSFORMERS_VERBOSITY": "error"}
                print(f"== batch {batch}, {'cached, chunk ' + str(chunk) if chunk else 'uncached'}", flush=True)
                done = subprocess.run(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                if done.returncode != 0:  # e.g. out of memory: recorded, the sweep goes on
                    runs.append(
                        {
                            "batch_size": batch,
                            "chunk_size": chunk or None,
                            "returncode": done.returncode,
                            "error": done.stderr[-800:],
                        }
                    )
                    print(f"failed (exit {done.returncode}): {done.stderr[-800:]}", flush=True)
                    continue
                runs.append(json.loads(result.read_text()))
                print(json.dumps(runs[-1]), flush=True)
    ok = [run for run in runs if "error" not in run]
    budget_run = next(r for r in ok if r["batch_size"] == args.budget_batch and r["chunk_size"] is None)
    budget = budget_run["peak_rss_mb"]
    largest = {
        mode: max(
            (r["batch_size"] for r in ok if (r["chunk_size"] is not None) == cached and r["peak_rss_mb"] <= budget),
            default=None,
        )
        for mode, cached in (("uncached", False), ("cached", True))
    }
    biggest_cached = max((r for r in ok if r["chunk_size"] is not None), key=lambda r: r["batch_size"])
    return {
        "runs": runs,
        "budget_batch": args.budget_batch,
        "budget_peak_rss_mb": budget,
        "largest_batch_within_budget": largest,
        "biggest_cached": {
            "batch_size": biggest_cached["batch_size"],
            "peak_rss_mb": biggest_cached["peak_rss_mb"],
            "pairs_per_second_ratio_to_uncached_budget_batch": round(
                biggest_cached["pairs_per_second"] / budget_run["pairs_per_second"], 3
            ),
        },
        "settings": {k: getattr(args, k) for k in ("batches", "chunk_size", "steps", "warmup", "pins", "threads")},
    }


def run_xquad(args: argparse.Namespace) -> dict:
    import quality

    from omnisearchsage_hf.data.xquad_r import LANGUAGES

    budget_pairs = BATCH64["batch_size"] * BATCH64["max_steps"]
    steps = budget_pairs // args.xquad_batch
    if steps * args.xquad_batch != budget_pairs:
        raise SystemExit(f"--xquad-batch must divide the batch-64 budget of {budget_pairs} pairs.")
    factor = args.xquad_batch / BATCH64["batch_size"]
    overrides = {
        "train.batch_size": args.xquad_batch,
        "train.gradient_cache_chunk_size": args.chunk_size,
        "train.max_steps": steps,
        "train.warmup_steps": 1,
        "train.learning_rate": BATCH64["learning_rate"] * factor,
        "train.entity_learning_rate": BATCH64["entity_learning_rate"] * factor,
        "train.log_every": 1,
        "train.eval_every": 0,
        "train.save_every": 0,
    }
    variant = f"omnisearchsage_cached_b{args.xquad_batch}"
    log_dir = RESULTS / "quality_logs"
    run, seconds = quality.train("xquad_r", variant, Path(args.runs_dir), log_dir, overrides)
    features = quality.dense_columns(run, "sentences.parquet")
    metrics = quality.evaluate("xquad_r", quality.tower_scorer(run, features))
    committed = json.loads((RESULTS / "xquad_r.json").read_text())["results"]
    keys = ["xquad_r_recall@1", "xquad_r_mrr", "xquad_r_recall@10", "xquad_r_recall@100", "xquad_r_pooled_recall@10"]
    keys += [f"xquad_r_{lang}_mrr" for lang in LANGUAGES]
    return {
        "variant": variant,
        "overrides": overrides,
        "training_seconds": seconds,
        "pairs": budget_pairs,
        "cached": {k: metrics[k] for k in keys},
        "batch64_committed": {k: committed["omnisearchsage"][k] for k in keys},
        "e5_committed": {k: committed["e5"][k] for k in keys},
        "log": str((log_dir / f"xquad_r_{variant}.log").relative_to(RESULTS.parent.parent)),
    }


def run_xquad_dev(args: argparse.Namespace) -> dict:
    """Batch 64 against a cached batch, each with its learning rate chosen on XQuAD-R's dev articles.

    Both train on the train articles less the dev ones (``data.options.dev_split``), for the same pairs;
    each family tries two learning-rate multipliers of the batch-64 config, a factor ~4.5 apart (batch 64:
    1x and sqrt(20)x; cached: sqrt(20)x, the square-root rule, and 20x, the linear rule), keeps the one with
    the best dev MRR, and only that one is scored on the test articles.
    """
    import quality

    from omnisearchsage_hf.data.xquad_r import LANGUAGES

    budget_pairs = BATCH64["batch_size"] * BATCH64["max_steps"]
    ratio = args.xquad_batch / BATCH64["batch_size"]
    families = {
        "batch64": (BATCH64["batch_size"], BATCH64["max_steps"], 10, None, (1.0, ratio**0.5)),
        "cached": (args.xquad_batch, budget_pairs // args.xquad_batch, 1, args.chunk_size, (ratio**0.5, ratio)),
    }
    tasks = [dict(quality.XQUAD_TASKS[name]) for name in ("query_sentence", "query_query", "query_sentence_e5")]
    for task in tasks:
        if "eval_pairs" in task:  # the trainer's own evaluation looks at dev, never at test
            task["eval_pairs"] = "pairs/query_sentence_dev.parquet"
    options = {"compat_encoder": "intfloat/multilingual-e5-small", "context_feature": "e5_context", "dev_split": True}
    keys = ["xquad_r_recall@1", "xquad_r_mrr", "xquad_r_recall@10", "xquad_r_recall@100", "xquad_r_pooled_recall@10"]
    keys += [f"xquad_r_{lang}_mrr" for lang in LANGUAGES]
    out: dict = {"pairs": budget_pairs, "candidates": {}, "chosen": {}, "test": {}}
    ranks: dict[str, QuestionRanks] = {}
    for family, (batch, steps, warmup, chunk, factors) in families.items():
        best = None
        for factor in factors:
            variant = f"dev_{family}_b{batch}_lr{factor:.3g}x"
            overrides = {
                "data.options": options,
                "data.tasks": tasks,
                "train.batch_size": batch,
                "train.gradient_cache_chunk_size": chunk,
                "train.max_steps": steps,
                "train.warmup_steps": warmup,
                "train.learning_rate": BATCH64["learning_rate"] * factor,
                "train.entity_learning_rate": BATCH64["entity_learning_rate"] * factor,
                "train.eval_every": 0,
                "train.save_every": 0,
            }
            run, seconds = quality.train("xquad_r", variant, Path(args.runs_dir), RESULTS / "quality_logs", overrides)
            scorer = quality.tower_scorer(run, quality.dense_columns(run, "sentences.parquet"))
            dev = quality.evaluate("xquad_r", scorer, split="dev")
            out["candidates"][variant] = {"lr_factor": factor, "seconds": seconds, "dev": {k: dev[k] for k in keys}}
            print(json.dumps({variant: out["candidates"][variant]["dev"]["xquad_r_mrr"]}), flush=True)
            if best is None or dev["xquad_r_mrr"] > best[1]:
                best = (variant, dev["xquad_r_mrr"], scorer)
        out["chosen"][family] = best[0]
        ranks[family] = rank_xquad(best[2], quality.DATA, split="test")
        out["test"][family] = {k: v for k, v in xquad_metrics(ranks[family]).items() if k in keys}
    out["test_difference"] = paired_differences(ranks["batch64"], ranks["cached"])
    return out


def paired_differences(a: QuestionRanks, b: QuestionRanks) -> dict[str, dict[str, float]]:
    """``b - a`` with its paired bootstrap 95% interval (1,000 resamples, seed 0; see ``compare_ranks``)."""
    measures = ["mrr", "recall@1", "recall@10", "pooled_recall@10"]
    return {
        name: {"difference": ci.difference, "low": ci.low, "high": ci.high}
        for name, ci in compare_ranks(a, b, measures=measures).items()
    }


def write_markdown(results: dict) -> None:
    lines = ["# Big batches with gradient caching (`python bench/big_batch.py`)", ""]
    lines.append(f"Machine: {platform.machine()}, {torch.get_num_threads()} torch threads; torch {torch.__version__}.")
    lines.append(
        "GPU: none. No GPU machine was lent to the session that ran this, so the unfrozen bf16 XQuAD-R run with a "
        "large cached batch on a GPU has no figures yet; everything below is CPU."
    )
    scale = results.get("scale")
    if scale:
        s = scale["settings"]
        lines += [
            "",
            "## Memory and speed against the global batch",
            "",
            f"Trainer: MiniLM-L6 query tower + paper-sized entity tower, tasks query→pin (share 8, 32 random "
            f"negatives) and query→query (share 2); {s['pins']} generated pins; {s['warmup']} untimed then "
            f"{s['steps']} timed steps per configuration, each in its own process. Peak RSS is measured over "
            "the training steps only (high-water mark reset before step 1).",
            "",
            "| global batch | mode | pairs/s | s/step | peak RSS during training (MiB) | RSS before step 1 (MiB) |",
            "|---|---|---|---|---|---|",
        ]
        for run in scale["runs"]:
            mode = f"cached, chunk {run['chunk_size']}" if run["chunk_size"] else "uncached"
            if "error" in run:
                # SIGKILL with no Python error: the kernel's out-of-memory killer (the machine's RAM, not a limit).
                last = (run["error"].strip().splitlines() or ["no output"])[-1][:80]
                why = "killed (out of memory)" if run["returncode"] == -9 else last
                lines.append(f"| {run['batch_size']} | {mode} | failed: {why} | | | |")
                continue
            step = sum(run["step_s"]) / len(run["step_s"])
            lines.append(
                f"| {run['batch_size']} | {mode} | {run['pairs_per_second']:.1f} | {step:.1f} | "
                f"{run['peak_rss_mb']:.0f} | {run['rss_before_training_mb']:.0f} |"
            )
        big = scale["biggest_cached"]
        largest = scale["largest_batch_within_budget"]
        lines += [
            "",
            f"Budget: the uncached trainer's peak at batch {scale['budget_batch']}, "
            f"{scale['budget_peak_rss_mb']:.0f} MiB. Largest batch within it: uncached {largest['uncached']}, "
            f"cached {largest['cached']}.",
            f"Cached batch {big['batch_size']}: peak {big['peak_rss_mb']:.0f} MiB, "
            f"**{big['pairs_per_second_ratio_to_uncached_budget_batch']:.2f}x** the pairs/s of uncached batch "
            f"{scale['budget_batch']} (target: within the budget at >= 0.7x).",
        ]
    xquad = results.get("xquad")
    if xquad:
        lines += [
            "",
            f"## XQuAD-R: cached batch {xquad['overrides']['train.batch_size']} vs batch 64, "
            f"same {xquad['pairs']} pairs",
            "",
            f"Overrides of `training/configs/xquad_r.yaml`: `{json.dumps(xquad['overrides'])}`. The training "
            f"command took {xquad['training_seconds'] or 0:.0f} s, zero-shot passage encoding included (a cold "
            f"cache; the steps' own times are in the log: `{xquad['log']}`). Batch 64 and e5: the committed "
            "`bench/results/xquad_r.json` (same scoring code, `evaluate_xquad`; test articles, 11 languages).",
            "",
            "| metric | e5 zero-shot | batch 64 (100 steps) | cached batch (same pairs) |",
            "|---|---|---|---|",
        ]
        for key, value in xquad["cached"].items():
            lines.append(
                f"| {key} | {xquad['e5_committed'][key]:.3f} | {xquad['batch64_committed'][key]:.3f} | {value:.3f} |"
            )
    dev = results.get("xquad_dev")
    if dev:
        lines += [
            "",
            f"## XQuAD-R, learning rates chosen on dev: batch 64 vs cached batch, same {dev['pairs']} pairs",
            "",
            "`python bench/big_batch.py --part xquad_dev`. Both families train on the train articles less the dev "
            "articles (`data.options.dev_split`: every 5th train article) and try two learning-rate multipliers of "
            "the batch-64 config; the one with the best dev MRR is the only one scored on the test articles.",
            "",
            "| candidate | lr multiplier | training command (s) | dev MRR | dev R@1 | dev R@10 | dev pooled R@10 |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, run in dev["candidates"].items():
            m = run["dev"]
            lines.append(
                f"| {name}{' (chosen)' if name in dev['chosen'].values() else ''} | {run['lr_factor']:.3g} | "
                f"{run['seconds'] or 0:.0f} | {m['xquad_r_mrr']:.3f} | {m['xquad_r_recall@1']:.3f} | "
                f"{m['xquad_r_recall@10']:.3f} | {m['xquad_r_pooled_recall@10']:.3f} |"
            )
        lines += ["", "| test metric | batch 64 (chosen) | cached (chosen) |", "|---|---|---|"]
        for key in dev["test"]["batch64"]:
            lines.append(f"| {key} | {dev['test']['batch64'][key]:.3f} | {dev['test']['cached'][key]:.3f} |")
        lines += [
            "",
            "Cached minus batch 64 on the test articles, with a paired bootstrap 95% interval (1,000 resamples of the "
            "374 test questions, seed 0; a question's value is its mean over the 11 languages):",
            "",
            "| metric | difference | 95% interval |",
            "|---|---|---|",
        ]
        for name, d in dev["test_difference"].items():
            lines.append(f"| {name} | {d['difference']:+.4f} | [{d['low']:+.4f}, {d['high']:+.4f}] |")
    (RESULTS / "big_batch.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["scale", "xquad", "xquad_dev"], default="scale")
    parser.add_argument("--batches", default="64,256,1024,4096")
    parser.add_argument("--chunk-size", type=int, default=128, help="rows per cached tower pass")
    parser.add_argument("--budget-batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--pins", type=int, default=10000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--xquad-batch", type=int, default=1280)
    parser.add_argument("--runs_dir", default="runs/quality")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--world", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--batch-size", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run_scale_child(args)
        return
    path = RESULTS / "big_batch.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    results[args.part] = {"scale": run_scale, "xquad": run_xquad, "xquad_dev": run_xquad_dev}[args.part](args)
    path.write_text(json.dumps(results, indent=2) + "\n")
    write_markdown(results)
    print((RESULTS / "big_batch.md").read_text())


if __name__ == "__main__":
    main()
