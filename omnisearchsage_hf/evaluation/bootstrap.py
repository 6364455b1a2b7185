"""Paired bootstrap confidence intervals for the difference between two retrieval systems.

Two systems ranked on the same questions give two per-question values (reciprocal ranks, 0/1 hits at K).
Their mean difference says which is better on these questions; the paired bootstrap says how much of it
is the luck of which questions were asked. Resampling questions with replacement, and taking the same
resampled questions for both systems, keeps the pairing: a question that is hard for both moves both
means alike and cancels from the difference, so the interval is much tighter than one built from two
independent intervals, and a consistent small gain can be told apart from noise.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# Resampled indices held at once: 2**22 int64 (32 MiB) bounds memory for any number of questions.
_CHUNK_ELEMENTS = 2**22


@dataclass(frozen=True)
class PairedBootstrap:
    """The mean difference ``b - a`` of two systems on the same questions, with its bootstrap interval.

    Attributes:
        mean_a: Mean of ``a`` over all questions (e.g. the baseline's MRR).
        mean_b: Mean of ``b`` over all questions.
        difference: ``mean_b - mean_a``.
        low: Lower end of the percentile interval of the difference.
        high: Upper end; ``low > 0`` says ``b`` beats ``a`` at this confidence.
        confidence: Coverage of ``[low, high]``, e.g. 0.95.
        resamples: Number of bootstrap resamples behind the interval.
    """

    mean_a: float
    mean_b: float
    difference: float
    low: float
    high: float
    confidence: float
    resamples: int


def paired_bootstrap(
    a: Sequence[float] | np.ndarray,
    b: Sequence[float] | np.ndarray,
    *,
    resamples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
    groups: Sequence[object] | np.ndarray | None = None,
) -> PairedBootstrap:
    """Mean difference ``b - a`` of two systems' per-question values and its percentile bootstrap interval.

    Each resample draws ``n`` questions with replacement (the same ones for both systems) and takes the
    mean of ``b - a`` over them; ``low`` and ``high`` are the ``(1 - confidence) / 2`` and
    ``(1 + confidence) / 2`` quantiles of those means (the percentile method). Read the interval as: had
    another set of questions like these been asked, the difference would likely lie in it. It covers the
    sampling of questions only, not the training noise of either system (retrain with another seed for
    that). With a fixed ``seed`` the result is reproducible; without groups the resampled indices are
    those of ``np.random.default_rng(seed).integers(0, n, size=(resamples, n))``, drawn in row chunks
    so memory stays bounded (~32 MiB) for any ``n``.

    ``groups`` stratifies: questions are resampled within each group, so each group keeps its count in
    every resample. Use it when the reported figure is a mean over groups of independent questions (a
    mean over languages whose questions differ): the resampled statistic then keeps the same weights.
    When groups hold translations of the same questions (XQuAD-R's languages are parallel), they are
    not independent: average each question's values over its languages first (one value per question
    id) and bootstrap those without groups, so the translations are resampled together.

    Args:
        a: ``(n,)`` per-question values of the reference system (e.g. zero-shot), finite.
        b: ``(n,)`` values of the compared system on the same questions, in the same order.
        resamples: Number of bootstrap resamples, >= 1 (1,000 for a 95% interval; more for 99%).
        seed: Seed of the resampling.
        confidence: Coverage of the interval, in (0, 1).
        groups: Optional ``(n,)`` group label per question (e.g. its language) to stratify by.

    Returns:
        A ``PairedBootstrap``.

    References:
        - Efron & Tibshirani, *An Introduction to the Bootstrap*, Chapman & Hall 1993 (ch. 13, percentile
          intervals).
        - Koehn, *Statistical Significance Tests for Machine Translation Evaluation*, EMNLP 2004
          (the paired bootstrap between two systems): https://aclanthology.org/W04-3250

    Example:
        ::

            paired_bootstrap([0, 1, 0, 1], [1, 1, 0, 1], resamples=1000, seed=0)
            # PairedBootstrap(mean_a=0.5, mean_b=0.75, difference=0.25, low=0.0, high=0.75, ...)
    """
    a, b = _values(a, "a"), _values(b, "b")
    if len(a) != len(b):
        raise ValueError(
            f"`a` and `b` must hold one value per question of the same questions; got {len(a)} and {len(b)} values."
        )
    if isinstance(resamples, bool) or not isinstance(resamples, int | np.integer) or resamples < 1:
        raise ValueError(f"`resamples` must be an int >= 1 (e.g. 1000), got {resamples!r}.")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"`confidence` must lie in (0, 1) (e.g. 0.95), got {confidence!r}.")
    strata = _strata(groups, len(a))
    differences = b - a  # (n,)
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)  # (resamples,)
    step = max(1, _CHUNK_ELEMENTS // len(a))
    for start in range(0, resamples, step):
        count = min(step, resamples - start)
        means[start : start + count] = differences[resample_indices(strata, count, rng)].mean(axis=1)
    low, high = np.quantile(means, [(1.0 - confidence) / 2, (1.0 + confidence) / 2])
    mean_a, mean_b = float(a.mean()), float(b.mean())
    return PairedBootstrap(mean_a, mean_b, float(differences.mean()), float(low), float(high), confidence, resamples)


def resample_indices(strata: Sequence[np.ndarray], count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` bootstrap resamples of question indices, each stratum resampled within itself.

    Args:
        strata: Disjoint index arrays covering ``0 .. n - 1``; one array ``arange(n)`` for no stratification.
        count: Number of resamples.
        rng: Source of randomness.

    Returns:
        ``(count, n)`` int64 indices, columns grouped stratum by stratum in the order of ``strata``: each
        row holds ``len(strata[s])`` indices drawn with replacement from ``strata[s]``, for every ``s``.
    """
    return np.concatenate(
        [stratum[rng.integers(0, len(stratum), size=(count, len(stratum)))] for stratum in strata], axis=1
    )  # (count, n)


def _values(values: Sequence[float] | np.ndarray, name: str) -> np.ndarray:
    """``values`` as a 1-D float64 array, refusing empty, multi-dimensional or non-finite input."""
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1 or array.size == 0:
        raise ValueError(
            f"`{name}` must be a non-empty 1-D sequence of per-question values, got shape {array.shape}; "
            "flatten per-language arrays in one question order first."
        )
    bad = np.flatnonzero(~np.isfinite(array))
    if bad.size:
        raise ValueError(
            f"`{name}` must be finite; position {bad[0]} holds {float(array[bad[0]])!r} ({bad.size} non-finite "
            "in all): drop that question from both systems or fix how its value is computed."
        )
    return array


def _strata(groups: Sequence[object] | np.ndarray | None, n: int) -> list[np.ndarray]:
    """Index arrays of the questions of each group (one stratum of all questions without groups)."""
    if groups is None:
        return [np.arange(n)]
    labels = np.asarray(groups)
    if labels.shape != (n,):
        raise ValueError(
            f"`groups` must hold one label per question, shape ({n},), got shape {labels.shape}; "
            "pass e.g. the language of each value of `a` and `b`."
        )
    _, inverse = np.unique(labels, return_inverse=True)
    return [np.flatnonzero(inverse == g) for g in range(inverse.max() + 1)]


__all__ = ["PairedBootstrap", "paired_bootstrap", "resample_indices"]
