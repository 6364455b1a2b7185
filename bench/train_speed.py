"""Training throughput of OmniSearchSage (query tower + entity tower, multi-task) against sentence-transformers.

Both sides fine-tune the same pretrained backbone (all-MiniLM-L6-v2, float32, CPU) on the same generated
query→pin pairs, with the same per-step batch and AdamW, and are timed the same way.

Data: one synthetic world (``omnisearchsage_hf.data.synthetic``, pins only, 256-d pre-existing
embeddings), generated once and written to a temporary folder that both sides read.

Ours: ``omnisearchsage_hf.training.Trainer.train`` itself, so what is timed is exactly a training step of
our system, as ``training/train.py`` runs it: ``Trainer.collate`` (pair and random-negative sampling,
reading entity rows, WordPiece tokenization of the queries, n-gram tokenization of the entities),
the ``MultiTaskModel`` forward (one query-tower call, one entity-tower call, one sampled-softmax loss
per task with logQ correction, frequency sketches and accidental-hit masks), backward, gradient
clipping, the AdamW step and the learning-rate schedule. The only addition is a ``collate`` override
that records the clock when each step begins. The towers are built by the trainer from the config:
``OmniSearchSageQueryModel.from_backbone(minilm, pooling="mean", out_dim=256)``, an entity tower at the
paper's sizes (hash table 100k x 256, MLP 1024 → 1024 → 256) over the pins' five text fields plus
``pinsage_embedding`` and ``visual_embedding``, and an entity tokenizer built by ``build_vocab`` from
the pins' text. Tasks and shares of every batch: query→pin with the entity tower (8, plus
``--random-negatives`` catalogue negatives), query→query with the query tower (2), query→pin with the
compatibility tower on ``pinsage_embedding`` (2).

Peer: ``SentenceTransformer(minilm)`` + ``MultipleNegativesRankingLoss`` in a plain PyTorch loop
(the smallest honest fine-tuning step, without ``SentenceTransformerTrainer``'s data-loading and
callback overhead): each step takes ``--batch-size`` (query, passage) pairs, tokenizes both columns with
``model.preprocess`` (``tokenize`` is its deprecated alias in v6), runs the loss (which embeds both
columns), backward, gradient clipping at 1.0 and AdamW, with the same learning-rate schedule. Its
pairs are the same query→pin pairs, after the same popularity cap, read in the same seeded order as our
query→pin task; a passage is the pin's title, description, caption, board titles and engaged queries
joined into one string (built once before training, as a prepared dataset would be), truncated at the
model's ``max_seq_length`` (256 tokens; ``--peer-max-seq-length`` changes it). Padded to the longest
passage of each batch, that side is dominated by its passages (about 110 tokens each here, queries about
10), which is why its steps take seconds per batch where ours, whose entity tower embeds n-gram bags,
do not.

Timing: each side runs in its own subprocess (so peak memory is its own) for ``--warmup`` untimed
steps and then ``--steps`` timed steps; the sides alternate ``--repeats`` times so that background load
hits both alike, and each side's figure is its fastest run. Ours counts as pairs the pairs of all tasks
in a step (``--batch-size``); its query→pin pairs are also reported alone. Memory: the peak resident
set size of the process (``ru_maxrss``) at the end of the timed steps, and its resident set just
before the first step (after loading data and models). Results go to ``bench/results/train_speed.{json,md}``.

Usage:
    python bench/train_speed.py [--batch-size 64] [--steps 10] [--warmup 2] [--repeats 1] [--pins 10000]

At the defaults it takes about 8 minutes on 2 cores, nearly all of it the sentence-transformers side
(about 25 s per step of 64 pairs).
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
import torch

RESULTS = Path(__file__).parent / "results"
TEXT_FIELDS = ["title", "description", "caption", "board_titles", "engaged_queries"]
SHARES = {"query_pin": 8, "query_query": 2, "query_pin_pinsage": 2}
SEED = 0
SAMPLE = 2000  # texts whose token counts are reported


def backbone_path(name: str) -> str:
    tool = Path(__file__).resolve().parents[2] / "shared" / "tools" / "backbones.py"
    return subprocess.run([sys.executable, str(tool), name], check=True, capture_output=True, text=True).stdout.strip()


def rss_mb(field: str = "VmRSS") -> float | None:
    """Current resident set size in MiB (Linux ``/proc``; ``field="VmHWM"``: its peak), or None elsewhere."""
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            kib = next(int(line.split()[1]) for line in handle if line.startswith(f"{field}:"))
    except (OSError, StopIteration):
        return None
    return kib / 1024


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB (``ru_maxrss`` is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def window(stamps: list[float], args: argparse.Namespace) -> dict:
    """Seconds of the timed steps and each step's milliseconds, from the start time of every step."""
    start, end = args.warmup, args.warmup + args.steps
    return {
        "seconds": stamps[end] - stamps[start],
        "step_ms": [
            round(1000 * (b - a), 1) for a, b in zip(stamps[start:end], stamps[start + 1 : end + 1], strict=True)
        ],
    }


def mean_tokens(features: dict[str, torch.Tensor]) -> float:
    """Mean non-padding tokens per text of a tokenized batch."""
    return round(features["attention_mask"].sum(1).float().mean().item(), 1)


def world_config(args: argparse.Namespace):
    from omnisearchsage_hf.data.synthetic import SyntheticWorldConfig

    # Pins only: the benchmark's tasks read no product, so the product catalogue is one row.
    return SyntheticWorldConfig(
        num_pins=args.pins,
        num_products=1,
        num_queries=args.pins // 2,
        num_query_pin_pairs=2 * args.pins,
        num_query_product_pairs=0,
        num_query_query_pairs=args.pins // 2,
        seed=SEED,
    )


def pairs_path(world: Path, task: str) -> str:
    return str(world / "pairs" / f"{task}_train.parquet")


def ours_config(args: argparse.Namespace, world: Path, output_dir: Path, minilm: str):
    """The ``TrainingConfig`` of our side: real backbone, paper-sized entity tower, three tasks."""
    from omnisearchsage_hf.training.config import load_config

    dim = world_config(args).embedding_dim
    tasks = [
        {
            "name": "query_pin",
            "candidate": "entity:pin",
            "pairs": pairs_path(world, "query_pin"),
            "share": SHARES["query_pin"],
            "num_random_negatives": args.random_negatives,
        },
        {"name": "query_query", "candidate": "query", "pairs": pairs_path(world, "query_query"), "share": 2},
        {
            "name": "query_pin_pinsage",
            "candidate": "compat:pin:pinsage_embedding",
            "pairs": pairs_path(world, "query_pin"),
            "share": SHARES["query_pin_pinsage"],
        },
    ]
    total_steps = args.warmup + args.steps + 1  # one untimed step after the window closes it
    return load_config(
        None,
        {
            "output_dir": str(output_dir),
            "data": {"source": "files", "entities": {"pin": str(world / "pins.parquet")}, "tasks": tasks},
            "model": {
                "backbone": minilm,
                "query": {"pooling": "mean", "out_dim": 256},
                "entity": {
                    "text_fields": TEXT_FIELDS,
                    "dense_features": {"pinsage_embedding": dim, "visual_embedding": dim},
                },
                "vocab": {"show_progress_bar": False},
            },
            "train": {
                "batch_size": args.batch_size,
                "max_steps": total_steps,
                "learning_rate": args.learning_rate,
                "warmup_steps": args.warmup,
                "log_every": total_steps,
                "eval_every": 0,
                "save_every": 0,
                "seed": SEED,
            },
        },
    )


def run_ours(args: argparse.Namespace, world: Path, minilm: str) -> dict:
    from omnisearchsage_hf.training.trainer import Trainer

    stamps: list[float] = []
    memory: dict[str, float | None] = {}
    closing_step = args.warmup + args.steps

    class StampedTrainer(Trainer):
        """``Trainer`` that records the clock (and memory) when each training step starts."""

        def collate(self, micro_step: int):
            stamps.append(time.perf_counter())
            if micro_step == 0:
                memory["rss_before_training_mb"] = rss_mb()
            elif micro_step == closing_step:
                memory["peak_rss_mb"] = peak_rss_mb()
            return super().collate(micro_step)

    with tempfile.TemporaryDirectory(prefix="train_speed_ours_") as output_dir:
        trainer = StampedTrainer(ours_config(args, world, Path(output_dir), minilm))
        trainer.train()
        batch_sizes = trainer.batch_sizes
        query_tokens = mean_tokens(
            trainer.query_tower.tokenize(trainer.data.pairs["query_pin"].queries(np.arange(SAMPLE)))
        )
    return {
        **window(stamps, args),
        "mean_query_tokens": query_tokens,
        "pairs_per_step": sum(batch_sizes.values()),
        "pairs_per_step_by_task": batch_sizes,
        "query_pin_pairs_per_step": batch_sizes["query_pin"],
        "entity_vocab_size": trainer.entity_tower.config.vocab_size,
        **memory,
    }


def passage(row: dict) -> str:
    """A pin's text fields joined into one passage (missing fields skipped)."""
    parts: list[str] = []
    for field in TEXT_FIELDS:
        value = row.get(field)
        if value:
            parts += value if isinstance(value, list) else [value]
    return ". ".join(parts)


def run_peer(args: argparse.Namespace, world: Path, minilm: str) -> dict:
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    from omnisearchsage_hf.data.tables import EntityTable
    from omnisearchsage_hf.training.pairs import load_pairs
    from omnisearchsage_hf.training.tasks import pair_indices
    from omnisearchsage_hf.training.trainer import learning_rate

    torch.manual_seed(SEED)
    pins = EntityTable.read(world / "pins.parquet", name="pin", columns=TEXT_FIELDS)
    passages = [passage(row) for row in pins.to_records()]
    # The same pairs as our query→pin task: same file, popularity cap (50 per pin), seed and order.
    pairs = load_pairs(pairs_path(world, "query_pin"), pins, task="query_pin", max_per_candidate=50, seed=SEED)
    model = SentenceTransformer(minilm, device="cpu").train()
    if args.peer_max_seq_length:
        model.max_seq_length = args.peer_max_seq_length
    loss_fn = MultipleNegativesRankingLoss(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=0.01)
    total_steps = args.warmup + args.steps + 1
    stamps: list[float] = []
    memory = {"rss_before_training_mb": rss_mb()}
    for step in range(total_steps):
        stamps.append(time.perf_counter())
        if step == args.warmup + args.steps:
            memory["peak_rss_mb"] = peak_rss_mb()
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, base=args.learning_rate, warmup_steps=args.warmup, max_steps=total_steps)
        picked = pair_indices(len(pairs), step=step, count=args.batch_size, seed=SEED)
        queries = pairs.queries(picked)
        documents = [passages[row] for row in pairs.candidates[picked]]
        loss = loss_fn([model.preprocess(queries), model.preprocess(documents)], None)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
    queries = pairs.queries(np.arange(SAMPLE))
    documents = [passages[row] for row in pairs.candidates[:SAMPLE]]
    return {
        **window(stamps, args),
        "mean_query_tokens": mean_tokens(model.preprocess(queries)),
        "mean_passage_tokens": mean_tokens(model.preprocess(documents)),
        "mean_passage_chars": round(float(np.mean([len(d) for d in documents])), 1),
        "pairs_per_step": args.batch_size,
        "query_pin_pairs_per_step": args.batch_size,
        "max_seq_length": model.max_seq_length,
        "train_pairs": len(pairs),
        **memory,
    }


def run_side(args: argparse.Namespace) -> None:
    """Child process: train one side, write its measurements to ``--result``."""
    torch.set_num_threads(args.threads)
    minilm = backbone_path("minilm")
    run = run_ours if args.side == "ours" else run_peer
    result = run(args, Path(args.world), minilm)
    Path(args.result).write_text(json.dumps(result, indent=2) + "\n")


def spawn(args: argparse.Namespace, side: str, world: Path, scratch: Path) -> dict:
    result = scratch / f"{side}.json"
    command = [sys.executable, __file__, "--side", side, "--world", str(world), "--result", str(result)]
    names = (
        "batch_size",
        "steps",
        "warmup",
        "pins",
        "random_negatives",
        "learning_rate",
        "threads",
        "peer_max_seq_length",
    )
    for name in names:
        command += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    # Each run's datasets cache stays in the scratch folder (a fresh world folder is a fresh cache key).
    env = {**os.environ, "HF_DATASETS_CACHE": str(scratch / "datasets"), "HF_HUB_OFFLINE": "1"}
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)
    return json.loads(result.read_text())


def summarise(runs: list[dict]) -> dict:
    """The fastest run's figures plus the largest peak memory of all runs."""
    best = min(runs, key=lambda run: run["seconds"])
    steps = len(best["step_ms"])
    return {
        **{k: v for k, v in best.items() if k not in ("seconds", "step_ms", "peak_rss_mb", "rss_before_training_mb")},
        "pairs_per_s": round(best["pairs_per_step"] * steps / best["seconds"], 1),
        "query_pin_pairs_per_s": round(best["query_pin_pairs_per_step"] * steps / best["seconds"], 1),
        "best_seconds": round(best["seconds"], 2),
        "median_step_ms_of_best": float(np.median(best["step_ms"])),
        "step_ms_of_best": best["step_ms"],
        "seconds_per_run": [round(run["seconds"], 2) for run in runs],
        "rss_before_training_mb": round(max(run["rss_before_training_mb"] or 0 for run in runs), 1),
        "peak_rss_mb": round(max(run["peak_rss_mb"] for run in runs), 1),
    }


def write_markdown(results: dict, args: argparse.Namespace) -> None:
    ours, peer, ratio = results["ours"], results["peer"], results["ratio"]
    sizes = results["sizes"]
    tasks = ", ".join(f"{name} {count}" for name, count in ours["pairs_per_step_by_task"].items())
    (RESULTS / "train_speed.md").write_text(
        f"# Training throughput (`{results['command']}`)\n\n"
        f"Machine: {results['machine']}; torch {results['torch']}, sentence-transformers "
        f"{results['sentence_transformers']}. Each side in its own process, {args.repeats} run(s) each, "
        f"alternating, fastest reported. A run: {args.warmup} warm-up steps, then {args.steps} timed steps of "
        f"{args.batch_size} pairs (collation and tokenization, forward, backward, clipping, AdamW step).\n\n"
        f"Data: synthetic world of {sizes['pins']} pins (5 languages, 256-d pre-existing embeddings), "
        f"{sizes['query_pin_pairs']} query→pin training pairs after the popularity cap; both sides read the "
        "same query→pin pairs in the same order.\n\n"
        "| system | pairs/s (all tasks) | query→pin pairs/s | peak RSS (MiB) | RSS before step 1 (MiB) |\n"
        "|---|---|---|---|---|\n"
        f"| OmniSearchSage `Trainer`: query tower (MiniLM-L6, mean, 256-d) + entity tower (100k x 256 hash, "
        f"1024-1024-256 MLP, vocab {ours['entity_vocab_size']}); pairs per step {tasks}, "
        f"{args.random_negatives} random pin negatives | {ours['pairs_per_s']} | "
        f"{ours['query_pin_pairs_per_s']} | {ours['peak_rss_mb']} | {ours['rss_before_training_mb']} |\n"
        f"| sentence-transformers all-MiniLM-L6-v2 + MultipleNegativesRankingLoss, plain PyTorch loop "
        f"(queries {peer['mean_query_tokens']} tokens, passages {peer['mean_passage_tokens']} tokens, "
        f"max_seq_length {peer['max_seq_length']}) | "
        f"{peer['pairs_per_s']} | {peer['query_pin_pairs_per_s']} | {peer['peak_rss_mb']} | "
        f"{peer['rss_before_training_mb']} |\n\n"
        f"Ratio ours / sentence-transformers: **{ratio['pairs']}x** in pairs of all tasks, "
        f"{ratio['query_pin_pairs']}x in query→pin pairs alone (target >= 0.8x in pairs).\n\n"
        f"Seconds of each timed run: ours {ours['seconds_per_run']}, sentence-transformers "
        f"{peer['seconds_per_run']}.\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=64, help="pairs per training step, both sides")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before them")
    parser.add_argument("--repeats", type=int, default=1, help="runs per side, alternating; fastest is reported")
    parser.add_argument("--pins", type=int, default=10_000, help="pins in the synthetic world")
    parser.add_argument("--random-negatives", type=int, default=32, help="catalogue negatives of the query→pin task")
    parser.add_argument("--learning-rate", type=float, default=5e-5)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of each side")
    parser.add_argument(
        "--peer-max-seq-length", type=int, default=0, help="truncate the peer's texts here (0: the model's own)"
    )
    parser.add_argument("--side", choices=["ours", "peer"], help=argparse.SUPPRESS)
    parser.add_argument("--world", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side is not None:
        run_side(args)
        return

    import sentence_transformers

    from omnisearchsage_hf.data.synthetic import generate_world

    runs: dict[str, list[dict]] = {"ours": [], "peer": []}
    with tempfile.TemporaryDirectory(prefix="train_speed_") as scratch:
        world_dir = Path(scratch) / "world"
        world = generate_world(world_config(args))
        world.save(world_dir)
        for repeat in range(args.repeats):
            for side in ("ours", "peer"):
                runs[side].append(spawn(args, side, world_dir, Path(scratch)))
                print(f"run {repeat + 1}/{args.repeats} {side}: {runs[side][-1]['seconds']:.2f} s", flush=True)
    ours, peer = summarise(runs["ours"]), summarise(runs["peer"])
    flags = " ".join(
        f"--{k.replace('_', '-')} {v}"
        for k, v in vars(args).items()
        if k not in ("side", "world", "result") and v != parser.get_default(k)
    )
    results = {
        "command": f"python bench/train_speed.py {flags}".strip(),
        "machine": f"{platform.processor() or platform.machine()}, {args.threads} torch threads",
        "torch": torch.__version__,
        "sentence_transformers": sentence_transformers.__version__,
        "sizes": {
            "batch_size": args.batch_size,
            "timed_steps": args.steps,
            "warmup_steps": args.warmup,
            "repeats": args.repeats,
            "pins": args.pins,
            "query_pin_pairs": peer.pop("train_pairs"),
            "random_negatives": args.random_negatives,
        },
        "ours": ours,
        "peer": peer,
        "ratio": {
            "pairs": round(ours["pairs_per_s"] / peer["pairs_per_s"], 3),
            "query_pin_pairs": round(ours["query_pin_pairs_per_s"] / peer["query_pin_pairs_per_s"], 3),
            "peak_rss": round(ours["peak_rss_mb"] / peer["peak_rss_mb"], 3),
        },
    }
    print(json.dumps(results, indent=2))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "train_speed.json").write_text(json.dumps(results, indent=2) + "\n")
    write_markdown(results, args)
    print(
        f"ours {ours['pairs_per_s']} pairs/s ({ours['query_pin_pairs_per_s']} query→pin), "
        f"sentence-transformers {peer['pairs_per_s']} pairs/s: ratio {results['ratio']['pairs']}x; "
        f"peak RSS {ours['peak_rss_mb']} vs {peer['peak_rss_mb']} MiB"
    )


if __name__ == "__main__":
    main()
