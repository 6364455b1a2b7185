"""Data sources: turn ``data.source`` into the entity tables and pair files the trainer reads.

``files`` reads the paths in the config as they are. The other sources are materialised under
``<output_dir>/data`` once, and their task files are then named relative to that folder:
``synthetic`` generates a world (``synthetic.generate_world``: ``pins.parquet``,
``pairs/query_pin_train.parquet``…); ``xquad_r`` and ``amazon_pqa`` derive tables from the real data
sets under ``data.root`` (``xquad_r.build_xquad_r_tables``: ``sentences.parquet``,
``pairs/query_sentence_train.parquet``…; ``amazon_pqa.build_epqa_tables``: ``products.parquet``,
``pairs/query_product_train.parquet``…), with ``data.options`` as the builder's keyword options.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ..atomic import replace_atomically, write_text_atomically
from .amazon_pqa import build_epqa_tables
from .config import TrainingConfig
from .synthetic import SyntheticWorldConfig, generate_world
from .xquad_r import build_xquad_r_tables

REAL_SOURCES: dict[str, Callable[..., dict[str, pa.Table]]] = {
    "xquad_r": build_xquad_r_tables,
    "amazon_pqa": build_epqa_tables,
}
# Written last by `prepare_real_source`: a folder holding it is complete for the inputs it records.
SOURCE_MARKER = "source.json"
_BUILDER_ARGUMENTS = ("cache_dir", "show_progress_bar")  # passed by `prepare_real_source`, not options


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
    if source in REAL_SOURCES:
        prepare_real_source(source, config.data.root, data_dir, config.data.options)
        return
    raise ValueError(f"Unknown `data.source` {source!r}; expected one of {['files', 'synthetic', *REAL_SOURCES]}.")


def source_options(source: str) -> list[str]:
    """The ``data.options`` keys that real source ``source`` accepts."""
    if source not in REAL_SOURCES:
        raise ValueError(f"Unknown real data source {source!r}; expected one of {sorted(REAL_SOURCES)}.")
    return [name for name in _keywords(REAL_SOURCES[source]) if name not in _BUILDER_ARGUMENTS]


def _keywords(builder: Callable[..., Any]) -> list[str]:
    return [p.name for p in inspect.signature(builder).parameters.values() if p.kind is p.KEYWORD_ONLY]


def prepare_real_source(
    source: str,
    root: str | Path,
    data_dir: str | Path,
    options: Mapping[str, Any] | None = None,
    *,
    show_progress_bar: bool = True,
) -> bool:
    """Write the tables of real source ``source`` under ``data_dir``, unless a complete copy is already there.

    Every file is written under a temporary name and renamed, and ``source.json`` (source, resolved
    root, options, files, row counts) is written last; it is removed before a rebuild. So a killed
    preparation, or one made with other options, is redone, and a finished one is reused as is.
    Expensive intermediates (the compat embeddings) are cached under ``data_dir/cache``.

    Args:
        source: ``xquad_r`` or ``amazon_pqa``.
        root: Folder of the real data sets.
        data_dir: Output folder, created if missing.
        options: Keyword options of the source's builder (``source_options(source)`` lists them).
        show_progress_bar: Show progress bars of long steps.

    Returns:
        True when the tables were built, False when a complete preparation was reused.
    """
    options = dict(options or {})
    unknown = sorted(set(options) - set(source_options(source)))
    if unknown:
        raise ValueError(f"Unknown `data.options` {unknown} for source {source!r}; valid: {source_options(source)}.")
    data_dir = Path(data_dir)
    marker = data_dir / SOURCE_MARKER
    inputs = {"source": source, "root": str(Path(root).resolve()), "options": options}
    if marker.is_file():
        with open(marker, encoding="utf-8") as handle:
            if {key: value for key, value in json.load(handle).items() if key in inputs} == inputs:
                return False
        marker.unlink()
    builder = REAL_SOURCES[source]
    arguments = {"cache_dir": data_dir / "cache", "show_progress_bar": show_progress_bar}
    tables = builder(root, **{k: v for k, v in arguments.items() if k in _keywords(builder)}, **options)
    for name, table in tables.items():
        (data_dir / name).parent.mkdir(parents=True, exist_ok=True)
        replace_atomically(data_dir / name, lambda tmp, table=table: pq.write_table(table, tmp))
    summary = {**inputs, "files": sorted(tables), "rows": {name: table.num_rows for name, table in tables.items()}}
    text = json.dumps(summary, indent=2, sort_keys=True) + "\n"
    write_text_atomically(marker, text)
    return True


__all__ = ["REAL_SOURCES", "SOURCE_MARKER", "prepare_real_source", "prepare_source", "source_options"]
