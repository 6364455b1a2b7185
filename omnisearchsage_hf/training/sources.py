"""Data sources: turn ``data.source`` into the entity tables and pair files the trainer reads.

``files`` reads the paths in the config as they are. ``synthetic`` generates a world
(``synthetic.generate_world``) into ``<output_dir>/data`` once; its task files are then named relative to
that folder (``pins.parquet``, ``pairs/query_pin_train.parquet``…).
"""

from __future__ import annotations

from pathlib import Path

from .config import TrainingConfig
from .synthetic import SyntheticWorldConfig, generate_world


def prepare_source(config: TrainingConfig, data_dir: Path) -> None:
    """Materialise the configured source under ``data_dir`` (no-op for ``files`` or when already there)."""
    source = config.data.source
    if source == "files":
        return
    if source == "synthetic":
        if not (data_dir / "world.json").is_file():  # written last by `save`, so the world is complete
            world = generate_world(SyntheticWorldConfig(**config.data.synthetic), show_progress_bar=True)
            world.save(data_dir, show_progress_bar=True)
        return
    raise ValueError(f"Unknown `data.source` {source!r}; expected 'files' or 'synthetic'.")


__all__ = ["prepare_source"]
