"""Evaluation: exact Recall@K / MRR against sampled corpora, and the real-data benchmarks (XQuAD-R, ePQA)."""

from .benchmarks import evaluate_epqa, evaluate_xquad, ranks_of_relevant
from .recall import RecallEvaluator, positive_ranks, ranks_from_scores, recall_metrics

__all__ = [
    "RecallEvaluator",
    "evaluate_epqa",
    "evaluate_xquad",
    "positive_ranks",
    "ranks_from_scores",
    "ranks_of_relevant",
    "recall_metrics",
]
