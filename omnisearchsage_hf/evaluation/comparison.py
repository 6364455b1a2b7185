"""Two systems' per-question ranks compared: mean differences with paired bootstrap intervals, and ranks on disk.

A benchmark ranks every system once (``rank_xquad`` / ``rank_epqa`` → ``QuestionRanks``); this module turns
two such results into the difference of each reported measure (MRR, Recall@K, pooled Recall@K) with its
paired bootstrap interval, resampling the unit the measure averages over. XQuAD-R's languages are
translations of the same questions, so the unit is the question id: its value is the mean over its
languages, and the mean of those values is exactly the languages' mean that ``xquad_metrics`` reports
(every language has the same questions). ePQA has one language, so the unit is the question itself.

Ranks are saved as ``.npz`` arrays (string ids as unicode arrays) and read back with ``allow_pickle=False``,
so a benchmark can score a trained run once and compare it later without loading anything executable.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from ..atomic import replace_atomically
from .benchmarks import QuestionRanks
from .bootstrap import PairedBootstrap, paired_bootstrap

# Per-question value of each measure, from 0-based ranks: (function, reads the pooled ranks).
MEASURES: dict[str, tuple[Callable[[np.ndarray], np.ndarray], bool]] = {
    "mrr": (lambda r: 1.0 / (r + 1.0), False),
    "recall@1": (lambda r: (r < 1).astype(np.float64), False),
    "recall@10": (lambda r: (r < 10).astype(np.float64), False),
    "recall@100": (lambda r: (r < 100).astype(np.float64), False),
    "pooled_recall@10": (lambda r: (r < 10).mean(axis=1), True),  # fraction of the golds in the top 10
}


def per_question_values(ranks: QuestionRanks, measure: str) -> tuple[list[str], np.ndarray]:
    """One value of ``measure`` per question id, averaged over the languages that asked it.

    Returns:
        ``(ids, values)``: the sorted question ids and ``(num_ids,)`` float64 values. Their mean equals the
        languages' mean of the measure when every language asks the same questions (XQuAD-R, ePQA).
    """
    if measure not in MEASURES:
        raise ValueError(f"Unknown measure {measure!r}; choose from {sorted(MEASURES)}.")
    value, pooled = MEASURES[measure]
    source = ranks.pooled if pooled else ranks.ranks
    if pooled and set(source) != set(ranks.ranks):
        raise ValueError(f"Measure {measure!r} needs pooled ranks for every language; rank with pooled=True.")
    by_id: dict[str, list[float]] = {}
    for language, ids in ranks.question_ids.items():
        for question_id, v in zip(ids, value(source[language]), strict=True):
            by_id.setdefault(question_id, []).append(float(v))
    ids = sorted(by_id)
    return ids, np.array([np.mean(by_id[i]) for i in ids])


def compare_ranks(
    reference: QuestionRanks,
    system: QuestionRanks,
    *,
    measures: Sequence[str] | None = None,
    resamples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> dict[str, PairedBootstrap]:
    """``system - reference`` for each measure, with its paired bootstrap interval over question ids.

    Args:
        reference: Ranks of the reference system (e.g. zero-shot e5), on the same questions as ``system``.
        system: Ranks of the compared system.
        measures: Keys of ``MEASURES``; default all those both results support (pooled only when both
            carry pooled ranks).
        resamples, seed, confidence: As in ``paired_bootstrap`` (same seed for every measure, so the
            measures are resampled on the same questions).

    Returns:
        measure → ``PairedBootstrap`` (``difference``, ``low``, ``high``, and both means).
    """
    if measures is None:
        measures = [m for m, (_, pooled) in MEASURES.items() if not pooled or (reference.pooled and system.pooled)]
    out = {}
    for measure in measures:
        ids_a, a = per_question_values(reference, measure)
        ids_b, b = per_question_values(system, measure)
        if ids_a != ids_b:
            missing = sorted(set(ids_a) ^ set(ids_b))[:5]
            raise ValueError(
                f"The two systems were ranked on different questions (e.g. {missing}); rank both on the same "
                "split and languages."
            )
        out[measure] = paired_bootstrap(a, b, resamples=resamples, seed=seed, confidence=confidence)
    return out


def save_ranks(ranks: QuestionRanks, path: str | os.PathLike) -> None:
    """Write ``ranks`` to ``path`` (``.npz``), atomically: ``ids/<lang>``, ``ranks/<lang>``, ``pooled/<lang>``."""
    arrays = {}
    for language, ids in ranks.question_ids.items():
        arrays[f"ids/{language}"] = np.array(ids, dtype=np.str_)
        arrays[f"ranks/{language}"] = np.asarray(ranks.ranks[language], dtype=np.int64)
        if language in ranks.pooled:
            arrays[f"pooled/{language}"] = np.asarray(ranks.pooled[language], dtype=np.int64)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as handle:
            np.savez(handle, **arrays)

    replace_atomically(Path(path), write)


def load_ranks(path: str | os.PathLike) -> QuestionRanks:
    """Read ranks written by ``save_ranks`` (no pickle: string ids are stored as unicode arrays)."""
    with np.load(path, allow_pickle=False) as data:
        arrays = {key: data[key] for key in data.files}
    result = QuestionRanks({}, {}, {})
    for key in arrays:  # in the order written: the languages' order
        kind, language = key.split("/", 1)
        if kind == "ids":
            result.question_ids[language] = arrays[key].tolist()
            result.ranks[language] = arrays[f"ranks/{language}"]
            if f"pooled/{language}" in arrays:
                result.pooled[language] = arrays[f"pooled/{language}"]
    return result


__all__ = ["MEASURES", "compare_ranks", "load_ranks", "per_question_values", "save_ranks"]
