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
from .comparison import compare_ranks, load_ranks, per_question_values, save_ranks
from .recall import RecallEvaluator, positive_ranks, ranks_from_scores, recall_metrics

__all__ = [
    "PairedBootstrap",
    "QuestionRanks",
    "RecallEvaluator",
    "compare_ranks",
    "evaluate_epqa",
    "evaluate_xquad",
    "load_ranks",
    "paired_bootstrap",
    "per_question_values",
    "positive_ranks",
    "rank_epqa",
    "rank_xquad",
    "ranks_from_scores",
    "ranks_of_relevant",
    "recall_metrics",
    "save_ranks",
    "xquad_metrics",
]
