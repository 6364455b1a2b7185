"""Data sources: turn ``data.source`` into the entity tables and pair files the trainer reads.

``files`` reads the paths in the config as they are. The other sources are materialised under
``<output_dir>/data`` once, and their task files are then named relative to that folder:
``synthetic`` generates a world (``data.synthetic.generate_world``: ``pins.parquet``,
``pairs/query_pin_train.parquet``…); ``xquad_r`` and ``amazon_pqa`` derive tables from the real data
sets under ``data.root`` (``data.xquad_r.build_xquad_r_tables``: ``sentences.parquet``,
``pairs/query_sentence_train.parquet``…; ``data.amazon_pqa.build_epqa_tables``: ``products.parquet``,
``pairs/query_product_train.parquet``…), with ``data.options`` as the builder's keyword options.
"""

from __future__ import annotations

import inspect
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ..atomic import replace_atomically, write_text_atomically
from ..data.amazon_pqa import build_epqa_tables
from ..data.encoders import resolve_model
from ..data.synthetic import SyntheticWorldConfig, generate_world
from ..data.tables import ID_COLUMN, EntityTable, read_table, write_table_atomically
from ..data.xquad_r import build_xquad_r_tables
from .config import TrainingConfig

REAL_SOURCES: dict[str, Callable[..., dict[str, pa.Table]]] = {
    "xquad_r": build_xquad_r_tables,
    "amazon_pqa": build_epqa_tables,
}
# Written last by `prepare_real_source`: a folder holding it is complete for the inputs it records.
SOURCE_MARKER = "source.json"
_BUILDER_ARGUMENTS = ("cache_dir", "show_progress_bar")  # passed by `prepare_real_source`, not options
DATA_ENV = "OMNISEARCHSAGE_DATA"  # the default `data.root`: where a user keeps the real data sets
SOURCE_EMBEDDINGS = "embeddings"  # under <output_dir>/data: tables with the columns of `data.embedding_sources`


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
        prepare_real_source(source, data_root(config.data.root), data_dir, config.data.options)
        return
    raise ValueError(f"Unknown `data.source` {source!r}; expected one of {['files', 'synthetic', *REAL_SOURCES]}.")


def data_root(root: str) -> Path:
    """The folder ``data.root`` names, with ``~`` and ``$VARS`` expanded; raises with the fix if it is absent."""
    folder = Path(os.path.expandvars(os.path.expanduser(root)))
    if not folder.is_dir():
        raise FileNotFoundError(
            f"`data.root` {root!r} is not a folder (resolved to {str(folder)!r}). Set {DATA_ENV} to the folder "
            "that holds xquad_r/ and amazon_pqa/ (the README's Data section says where they come from), or "
            "pass --data.root DIR."
        )
    return folder


def source_options(source: str) -> list[str]:
    """The ``data.options`` keys that real source ``source`` accepts."""
    if source not in REAL_SOURCES:
        raise ValueError(f"Unknown real data source {source!r}; expected one of {sorted(REAL_SOURCES)}.")
    return [name for name in _keywords(REAL_SOURCES[source]) if name not in _BUILDER_ARGUMENTS]


def _keywords(builder: Callable[..., Any]) -> list[str]:
    return [p.name for p in _keyword_parameters(builder)]


def _keyword_parameters(builder: Callable[..., Any]) -> list[inspect.Parameter]:
    return [p for p in inspect.signature(builder).parameters.values() if p.kind is p.KEYWORD_ONLY]


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
    root, options with the builder's defaults filled in, files, row counts) is written last; it is
    removed before a rebuild. So a killed preparation, or one made with other options, is redone, and
    a finished one is reused as is; recording the defaults makes a folder prepared before a default
    changed (ePQA's leak-free catalogue) count as made with other options.
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
    builder = REAL_SOURCES[source]
    resolved = {p.name: p.default for p in _keyword_parameters(builder) if p.name not in _BUILDER_ARGUMENTS}
    # Through JSON, as read back from the marker (a tuple default becomes a list).
    inputs = json.loads(
        json.dumps({"source": source, "root": str(Path(root).resolve()), "options": resolved | options})
    )
    if marker.is_file():
        with open(marker, encoding="utf-8") as handle:
            if {key: value for key, value in json.load(handle).items() if key in inputs} == inputs:
                return False
        marker.unlink()
    arguments = {"cache_dir": data_dir / "cache", "show_progress_bar": show_progress_bar}
    tables = builder(root, **{k: v for k, v in arguments.items() if k in _keywords(builder)}, **options)
    for name, table in tables.items():
        (data_dir / name).parent.mkdir(parents=True, exist_ok=True)
        replace_atomically(data_dir / name, lambda tmp, table=table: pq.write_table(table, tmp))
    summary = {**inputs, "files": sorted(tables), "rows": {name: table.num_rows for name, table in tables.items()}}
    text = json.dumps(summary, indent=2, sort_keys=True) + "\n"
    write_text_atomically(marker, text)
    return True


def embed_sources(config: TrainingConfig, base: Path, data_dir: Path) -> dict[str, Path]:
    """Embed each ``data.embedding_sources`` table with its model, as a copy of the table with that column.

    For ``"<table>.<feature>": folder``, the model in ``folder`` (an ItemSage or entity tower) embeds
    every row of the table, and ``data/embeddings/<table>.parquet`` is the table with column ``feature``
    set to those embeddings (replacing one of that name). Recomputed at every start (a resumed run
    included): the source model is fixed, so the same file comes out, and no stale copy can outlive a
    retrained source model.

    Returns:
        Table name → the file the trainer reads instead of ``data.entities[table]``.
    """
    from transformers import AutoModel  # only runs that embed a source load a model here

    tables: dict[str, pa.Table] = {}
    for key, folder in config.data.embedding_sources.items():
        name, feature = key.split(".")
        if name not in config.data.entities:
            raise ValueError(f"`data.embedding_sources` names table {name!r}; declare it under `data.entities`.")
        model = AutoModel.from_pretrained(resolve_model(folder))
        if not hasattr(model, "encode") or not hasattr(model.config, "input_features"):
            raise ValueError(
                f"`data.embedding_sources[{key!r}]`: {folder} is a {type(model).__name__}; expected a model "
                "that embeds entity dicts (an ItemSage or entity tower folder)."
            )
        table = tables.get(name) or read_table(base / config.data.entities[name])
        rows = tower_rows(EntityTable(table, name=name), model)
        vectors = model.encode(rows.to_records(), batch_size=256, show_progress_bar=True)  # (rows, dim)
        column = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), vectors.shape[1])
        if feature in table.column_names:
            table = table.drop_columns([feature])
        tables[name] = table.append_column(feature, column)
        print(f"Embedded {len(rows)} rows of {name!r} with {folder} into column {feature!r}")
    return {name: write_table_atomically(table, embedded_table_path(data_dir, name)) for name, table in tables.items()}


def tower_rows(table: EntityTable, model: Any) -> EntityTable:
    """``table`` with only the columns ``model`` (an entity tower or ItemSage) reads: rows it can ``encode``."""
    wanted = {ID_COLUMN, *model.config.input_features()}
    return EntityTable(table.table.select([c for c in table.table.column_names if c in wanted]), name=table.name)


def embedded_table_path(data_dir: Path, table: str) -> Path:
    """Where ``embed_sources`` writes entity table ``table`` with its computed columns."""
    return data_dir / SOURCE_EMBEDDINGS / f"{table}.parquet"


__all__ = [
    "REAL_SOURCES",
    "SOURCE_EMBEDDINGS",
    "SOURCE_MARKER",
    "embed_sources",
    "embedded_table_path",
    "prepare_real_source",
    "prepare_source",
    "source_options",
    "tower_rows",
]
