"""The Recall@K / MRR ``evaluate`` metric: ``evaluate.load(RECALL_AT_K_PATH)``."""

from pathlib import Path

RECALL_AT_K_PATH = str(Path(__file__).with_name("recall_at_k.py"))

__all__ = ["RECALL_AT_K_PATH"]
