"""Inference throughput of both towers' ``encode``, against sentence-transformers in the same run.

1. Entity tower: 10,000 generated entities (about 300 characters over 5 text fields, plus one 256-d
   pre-existing embedding) through ``OmniSearchSageEntityModel.encode`` at the paper's sizes (hash table
   100k x 256, MLP 1024 → 1024 → 256), tokenization included. Peer: sentence-transformers
   all-MiniLM-L6-v2 encoding the same entities' texts joined into one document each.
2. Query tower: ``OmniSearchSageQueryModel.encode`` vs ``SentenceTransformer.encode`` on the same
   backbone (all-MiniLM-L6-v2, mean pooling) and the same generated queries.

Each figure is the best of ``--repeats`` timed runs after a warm-up (best-of filters out the other
processes of a shared machine). Results go to ``bench/results/encode_speed.{json,md}``.

Usage:
    python bench/encode_speed.py [--entities 10000] [--peer-docs 1000] [--queries 4000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from sentence_transformers import SentenceTransformer

from omnisearchsage_hf import (
    OmniSearchSageEntityConfig,
    OmniSearchSageEntityModel,
    OmniSearchSageQueryModel,
    build_vocab,
)

RESULTS = Path(__file__).parent / "results"
TEXT_FIELDS = ["title", "description", "caption", "board_titles", "engaged_queries"]
SHARED = Path(__file__).resolve().parents[2] / "shared"


def make_lexicon() -> tuple[np.ndarray, np.ndarray]:
    """Real English product words with their frequencies, read in place from Amazon ePQA (CDLA-Sharing-1.0).

    Real words matter for the peer: MiniLM's cost depends on how many word pieces a text splits into.
    """
    with open(SHARED / "data" / "amazon_pqa" / "ePQA" / "dev.csv", encoding="utf-8", newline="") as handle:
        counts = Counter(w for row in csv.DictReader(handle) for w in (row["candidate"] + " " + row["title"]).split())
    words, freq = zip(*counts.most_common(), strict=True)
    freq = np.asarray(freq, dtype=np.float64)
    return np.asarray(words), freq / freq.sum()


def make_text(rng: np.random.Generator, lexicon: tuple[np.ndarray, np.ndarray], chars: int) -> str:
    words, freq = lexicon
    return " ".join(rng.choice(words, max(1, chars // 4), p=freq))[:chars]


def make_entities(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    lexicon = make_lexicon()
    return [
        {
            "title": make_text(rng, lexicon, 60),
            "description": make_text(rng, lexicon, 105),
            "caption": make_text(rng, lexicon, 50),
            "board_titles": [make_text(rng, lexicon, 22) for _ in range(2)],
            "engaged_queries": [make_text(rng, lexicon, 18) for _ in range(2)],
            "image_embedding": rng.standard_normal(256).astype(np.float32),
        }
        for _ in range(n)
    ]


def joined_text(entity: dict) -> str:
    parts = []
    for field in TEXT_FIELDS:
        value = entity[field]
        parts += value if isinstance(value, list) else [value]
    return ". ".join(parts)


def best_rate(fn, n_items: int, repeats: int) -> float:
    """Items per second of the fastest of ``repeats`` calls of ``fn`` (after one warm-up call)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return n_items / min(times)


def backbone_path(name: str) -> str:
    tool = Path(__file__).resolve().parents[2] / "shared" / "tools" / "backbones.py"
    return subprocess.run([sys.executable, str(tool), name], check=True, capture_output=True, text=True).stdout.strip()


def bench_entities(args: argparse.Namespace, minilm: str) -> dict:
    entities = make_entities(args.entities)
    chars = float(np.mean([len(joined_text(e)) for e in entities]))
    tokenizer = build_vocab(([e[f] for e in entities for f in TEXT_FIELDS]), show_progress_bar=False)
    config = OmniSearchSageEntityConfig(
        vocab_size=tokenizer.vocab_size, text_fields=TEXT_FIELDS, dense_features={"image_embedding": 256}
    )
    torch.manual_seed(0)
    model = OmniSearchSageEntityModel(config).eval()
    model.tokenizer = tokenizer
    ours = best_rate(lambda: model.encode(entities, batch_size=args.batch_size), len(entities), args.repeats)

    inputs = model.prepare_inputs(entities[: args.batch_size])
    with torch.inference_mode():
        model_only = best_rate(lambda: model(**inputs), args.batch_size, args.repeats)
    tokenize_only = best_rate(lambda: model.prepare_inputs(entities), len(entities), args.repeats)

    peer = SentenceTransformer(minilm, device="cpu")
    docs = [joined_text(e) for e in entities[: args.peer_docs]]
    peer_rate = best_rate(lambda: peer.encode(docs, batch_size=32), len(docs), 1)
    peer_tokens = float(np.mean([len(ids) for ids in peer.tokenizer(docs, truncation=True)["input_ids"]]))
    return {
        "entities": len(entities),
        "mean_text_chars": round(chars, 1),
        "vocab_size": tokenizer.vocab_size,
        "batch_size": args.batch_size,
        "entity_tower_entities_per_s": round(ours, 1),
        "entity_tower_model_only_entities_per_s": round(model_only, 1),
        "tokenization_only_entities_per_s": round(tokenize_only, 1),
        "minilm_docs": len(docs),
        "minilm_docs_per_s": round(peer_rate, 1),
        "minilm_mean_tokens": round(peer_tokens, 1),
        "ratio_vs_minilm": round(ours / peer_rate, 1),
    }


def make_queries(n: int, seed: int = 1) -> list[str]:
    rng = np.random.default_rng(seed)
    lexicon = make_lexicon()
    return [make_text(rng, lexicon, int(rng.integers(8, 40))) for _ in range(n)]


def bench_queries(args: argparse.Namespace, minilm: str) -> dict:
    queries = make_queries(args.queries)
    ours = OmniSearchSageQueryModel.from_backbone(minilm, pooling="mean", out_dim=256)
    peer = SentenceTransformer(minilm, device="cpu")
    rates = {"ours": [], "peer": []}
    # Interleave the two so that background load hits both alike.
    for _ in range(args.repeats):
        rates["ours"].append(best_rate(lambda: ours.encode(queries, batch_size=32), len(queries), 1))
        rates["peer"].append(best_rate(lambda: peer.encode(queries, batch_size=32), len(queries), 1))
    best_ours, best_peer = max(rates["ours"]), max(rates["peer"])
    return {
        "queries": len(queries),
        "query_tower_queries_per_s": round(best_ours, 1),
        "sentence_transformers_queries_per_s": round(best_peer, 1),
        "ratio_vs_sentence_transformers": round(best_ours / best_peer, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entities", type=int, default=10_000)
    parser.add_argument("--peer-docs", type=int, default=1_000, help="MiniLM documents timed (it is ~100x slower)")
    parser.add_argument("--queries", type=int, default=4_000)
    parser.add_argument("--batch-size", type=int, default=512, help="entity tower batch size")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(2)
    minilm = backbone_path("minilm")

    results = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads",
        "torch": torch.__version__,
        "entity": bench_entities(args, minilm),
        "query": bench_queries(args, minilm),
    }
    print(json.dumps(results, indent=2))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "encode_speed.json").write_text(json.dumps(results, indent=2) + "\n")
    e, q = results["entity"], results["query"]
    (RESULTS / "encode_speed.md").write_text(
        "# Encode throughput (`python bench/encode_speed.py`)\n\n"
        "Text: words drawn with their real frequencies from Amazon ePQA (CDLA-Sharing-1.0), "
        "read in place from `../shared/data/amazon_pqa`.\n\n"
        f"Machine: {results['machine']}; torch {results['torch']}. Best of {args.repeats} timed runs after a "
        "warm-up (MiniLM, ~100x slower: one timed run after a warm-up).\n\n"
        "## Entity tower vs all-MiniLM-L6-v2 (sentence-transformers)\n\n"
        f"{e['entities']} generated entities, {e['mean_text_chars']} characters of text over 5 fields + a 256-d "
        f"embedding; vocabulary {e['vocab_size']} n-grams; batch {e['batch_size']}.\n\n"
        "| system | items/s |\n|---|---|\n"
        f"| OmniSearchSage entity tower `encode` (tokenization included) | {e['entity_tower_entities_per_s']} |\n"
        f"| ... tokenization alone | {e['tokenization_only_entities_per_s']} |\n"
        f"| ... model forward alone | {e['entity_tower_model_only_entities_per_s']} |\n"
        f"| all-MiniLM-L6-v2 on the joined text ({e['minilm_docs']} docs, {e['minilm_mean_tokens']} tokens each) "
        f"| {e['minilm_docs_per_s']} |\n\n"
        f"Ratio entity tower / MiniLM: **{e['ratio_vs_minilm']}x**.\n\n"
        "## Query tower vs SentenceTransformer.encode, same backbone (all-MiniLM-L6-v2, mean pooling)\n\n"
        "| system | queries/s |\n|---|---|\n"
        f"| `OmniSearchSageQueryModel.encode` | {q['query_tower_queries_per_s']} |\n"
        f"| `SentenceTransformer.encode` | {q['sentence_transformers_queries_per_s']} |\n\n"
        f"Ratio: **{q['ratio_vs_sentence_transformers']}** ({q['queries']} queries, batch 32).\n"
    )


if __name__ == "__main__":
    main()
