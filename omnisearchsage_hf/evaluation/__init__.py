"""Evaluation: exact Recall@K / MRR against sampled corpora, the real-data benchmarks (XQuAD-R, ePQA), and
paired bootstrap intervals for the difference between two systems."""

from .benchmarks import (
    QuestionRanks,
    evaluate_epqa,
    evaluate_xquad,
    rank_epqa,
    rank_xquad,
    ranks_of_relevant,
    xquad_metrics,
)
from .bootstrap import PairedBootstrap, paired_bootstrap
from .recall import RecallEvaluator, positive_ranks, ranks_from_scores, recall_metrics

__all__ = [
    "PairedBootstrap",
    "QuestionRanks",
    "RecallEvaluator",
    "evaluate_epqa",
    "evaluate_xquad",
    "paired_bootstrap",
    "positive_ranks",
    "rank_epqa",
    "rank_xquad",
    "ranks_from_scores",
    "ranks_of_relevant",
    "recall_metrics",
    "xquad_metrics",
]
