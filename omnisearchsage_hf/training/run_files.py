"""The run-folder contract: what a training run writes under ``output_dir``, and where.

Publishing, serving and the benchmarks read finished runs through these names and never import the
trainer. A run folder holds:

- ``training_config.yaml``: the resolved config (overrides included), written when the run starts;
- ``query_tower/`` and ``entity_tower/``: the trained towers with their tokenizers, written at the end;
- ``metrics.json``: the final evaluation metrics, written at the end;
- ``checkpoints/step_N/``: resumable training state (``step_N.partial`` while being written);
- ``tokenizers/``: the tokenizers built for the run; ``data/``: prepared data sources and caches.
"""

from __future__ import annotations

import os
from pathlib import Path

from .config import TrainingConfig, load_config

CONFIG_FILE = "training_config.yaml"
QUERY_TOWER = "query_tower"
ENTITY_TOWER = "entity_tower"
METRICS_FILE = "metrics.json"
CHECKPOINTS = "checkpoints"
TOKENIZERS = "tokenizers"
DATA = "data"


def checkpoint_dir(output_dir: str | os.PathLike, step: int) -> Path:
    """``output_dir/checkpoints/step_<step>``."""
    return Path(output_dir) / CHECKPOINTS / f"step_{step}"


def checkpoint_step(folder: Path) -> int | None:
    """The step of a complete checkpoint folder (``step_N``), or None for anything else."""
    name = folder.name
    return int(name[5:]) if name.startswith("step_") and name[5:].isdigit() and folder.is_dir() else None


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint folder (``checkpoints/step_N``), or None."""
    folder = Path(output_dir) / CHECKPOINTS
    steps = [p for p in folder.glob("step_*") if checkpoint_step(p) is not None] if folder.is_dir() else []
    return max(steps, key=checkpoint_step, default=None)


def read_run_config(output_dir: str | os.PathLike) -> TrainingConfig | None:
    """The config a run recorded in ``training_config.yaml``, or None when the folder has none."""
    path = Path(output_dir) / CONFIG_FILE
    return load_config(path) if path.is_file() else None


__all__ = [
    "CHECKPOINTS",
    "CONFIG_FILE",
    "DATA",
    "ENTITY_TOWER",
    "METRICS_FILE",
    "QUERY_TOWER",
    "TOKENIZERS",
    "checkpoint_dir",
    "checkpoint_step",
    "latest_checkpoint",
    "read_run_config",
]
