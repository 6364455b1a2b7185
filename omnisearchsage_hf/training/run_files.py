"""The run-folder contract: what a training run writes under ``output_dir``, and where.

Publishing, serving and the benchmarks read finished runs through these names and never import the
trainer. A run folder holds:

- ``training_config.yaml``: the resolved config (overrides included), written when the run starts;
- ``query_tower/`` and ``entity_tower/``: the trained towers with their tokenizers, written at the end;
- ``metrics.json``: the final evaluation metrics, written at the end;
- ``checkpoints/step_N/``: resumable training state (``step_N.partial`` while being written);
- ``tokenizers/``: the tokenizers built for the run; ``data/``: prepared data sources and caches;
- ``logs/``: TensorBoard logs, and ``logs/history.jsonl``: one JSON line per logged step (the losses at
  full precision, then the evaluation metrics; a resumed run appends, so the last line of a step wins).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from .config import TrainingConfig, load_config

CONFIG_FILE = "training_config.yaml"
QUERY_TOWER = "query_tower"
ENTITY_TOWER = "entity_tower"
METRICS_FILE = "metrics.json"
CHECKPOINTS = "checkpoints"
TOKENIZERS = "tokenizers"
DATA = "data"
LOGS = "logs"
HISTORY_FILE = "history.jsonl"  # under LOGS
# What a run writes besides `data/` (prepared sources, reusable by the next run): `--overwrite` removes these.
RUN_OUTPUTS = (CHECKPOINTS, TOKENIZERS, LOGS, QUERY_TOWER, ENTITY_TOWER, METRICS_FILE, CONFIG_FILE)


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


def existing_run(output_dir: str | os.PathLike) -> list[str]:
    """The run outputs already in ``output_dir`` (empty when it holds no run)."""
    folder = Path(output_dir)
    return [name for name in RUN_OUTPUTS if (folder / name).exists()]


def check_run_folder(output_dir: str | os.PathLike, *, resume: bool, overwrite: bool) -> None:
    """Refuse to start in a folder that holds a run unless ``resume`` or ``overwrite`` says what to do.

    Read-only, so every process can call it before any work and all of them stop together.
    """
    if resume and overwrite:
        raise ValueError("Pass either --resume (continue the run) or --overwrite (start over), not both.")
    found = existing_run(output_dir)
    if found and not (resume or overwrite):
        raise FileExistsError(
            f"{str(output_dir)!r} already holds a training run ({', '.join(found)}). Pass --resume to continue "
            "it, --overwrite to replace it, or choose another --output_dir."
        )


def clear_run_folder(output_dir: str | os.PathLike, *, overwrite: bool) -> list[str]:
    """Remove the run outputs for ``overwrite`` (keeping the prepared ``data/``) and half-written checkpoints.

    Leftover ``step_N.partial`` folders of a killed save are removed either way: a checkpoint is only
    complete once renamed. Call it on one process, after ``check_run_folder``.

    Returns:
        What was removed (for the log).
    """
    folder = Path(output_dir)
    removed = []
    if overwrite:
        for name in existing_run(folder):
            path = folder / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()
            removed.append(name)
    for partial in sorted((folder / CHECKPOINTS).glob("*.partial")) if (folder / CHECKPOINTS).is_dir() else []:
        shutil.rmtree(partial)
        removed.append(str(partial.relative_to(folder)))
    return removed


def read_run_config(output_dir: str | os.PathLike) -> TrainingConfig | None:
    """The config a run recorded in ``training_config.yaml``, or None when the folder has none."""
    path = Path(output_dir) / CONFIG_FILE
    return load_config(path) if path.is_file() else None


__all__ = [
    "CHECKPOINTS",
    "CONFIG_FILE",
    "HISTORY_FILE",
    "DATA",
    "LOGS",
    "RUN_OUTPUTS",
    "ENTITY_TOWER",
    "METRICS_FILE",
    "QUERY_TOWER",
    "TOKENIZERS",
    "checkpoint_dir",
    "checkpoint_step",
    "existing_run",
    "check_run_folder",
    "clear_run_folder",
    "latest_checkpoint",
    "read_run_config",
]
