"""Evaluation: exact Recall@K / MRR of (query, engaged entity) pairs against sampled corpora."""

from .recall import RecallEvaluator, positive_ranks, ranks_from_scores, recall_metrics

__all__ = ["RecallEvaluator", "positive_ranks", "ranks_from_scores", "recall_metrics"]
