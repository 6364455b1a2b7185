"""The ``omnisearchsage-enrich`` command: an entity table in, the enriched entity table out.

Example (each step runs only when its input is given)::

    omnisearchsage-enrich --entities pins.parquet --out pins_enriched.parquet \\
        --board-saves saves.parquet \\
        --engagements logs/2024-06/ --as-of 2024-06-30 --state engaged_state.parquet \\
        --captions --caption-model Salesforce/blip-image-captioning-base --caption-cache captions_cache/

``--state`` is read when it exists (the incremental update) and replaced atomically afterwards, so the
next window's run passes the same path. The output is the input table with ``board_titles`` and
``engaged_queries`` (``list<string>``) and ``caption`` (string) set, the field names the entity tower
reads; a summary of every step (rows, seconds) is printed as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from ..cli_errors import run_command
from ..data.tables import DEFAULT_BATCH_SIZE, EntityTable, TableSource, write_table_atomically
from .board_titles import board_titles
from .captions import CaptionConfig, caption_entities
from .columns import attach_column
from .engaged_queries import EngagedQueriesConfig, EngagedQueryState, update_engaged_queries

CAPTION_FIELD = "caption"


def enrich_entities(
    entities: pa.Table,
    *,
    board_saves: TableSource | None = None,
    max_board_titles: int = 10,
    engagement_logs: TableSource | None = None,
    as_of: str | None = None,
    state_path: str | os.PathLike | None = None,
    engaged_config: EngagedQueriesConfig | None = None,
    caption_config: CaptionConfig | None = None,
    caption_cache: str | os.PathLike | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    show_progress_bar: bool = False,
) -> tuple[pa.Table, dict[str, Any]]:
    """Run the enrichment steps whose inputs are given and set their columns on ``entities``.

    Args:
        entities: Entity table with a unique string ``id`` column.
        board_saves: Save records for ``board_titles`` (columns ``entity_id``, ``board_title``), or None.
        max_board_titles: Titles kept per entity.
        engagement_logs: Logs for ``update_engaged_queries``, or None.
        as_of: The logs' last day (required with ``engagement_logs``).
        state_path: Engaged-queries state: read when it exists, then replaced; None keeps no state.
        engaged_config: Scoring of engaged queries; None uses the state's, else the defaults.
        caption_config: Captioning settings, or None to skip captions.
        caption_cache: Caption cache folder (required with ``caption_config``).
        batch_size: Log rows read at a time.
        show_progress_bar: Show tqdm bars.

    Returns:
        The enriched table and a summary ``{step: {rows, seconds, …}}``. Entities without saves or engaged
        queries get empty lists; a caption is generated where the config selects an entity, and any
        caption the input already had is kept elsewhere.
    """
    summary: dict[str, Any] = {"entities": entities.num_rows}
    if board_saves is not None:
        start = time.perf_counter()
        titles = board_titles(
            board_saves, max_titles=max_board_titles, batch_size=batch_size, show_progress_bar=show_progress_bar
        )
        entities = attach_column(entities, "board_titles", titles, fill=[])
        summary["board_titles"] = {"entities_with_titles": titles.num_rows, "seconds": time.perf_counter() - start}
    if engagement_logs is not None:
        if as_of is None:
            raise ValueError("`as_of` (the last day of the engagement logs) is required with `engagement_logs`.")
        start = time.perf_counter()
        state = EngagedQueryState.load(state_path) if state_path is not None and Path(state_path).exists() else None
        state = update_engaged_queries(
            engagement_logs,
            as_of=as_of,
            state=state,
            config=engaged_config,
            batch_size=batch_size,
            show_progress_bar=show_progress_bar,
        )
        if state_path is not None:
            state.save(state_path)
        top = state.top_queries()
        entities = attach_column(entities, "engaged_queries", top, fill=[])
        summary["engaged_queries"] = {
            "entities_with_queries": top.num_rows,
            "state_rows": state.table.num_rows,
            "seconds": time.perf_counter() - start,
        }
    if caption_config is not None:
        if caption_cache is None:
            raise ValueError("`caption_cache` (a folder) is required with `caption_config`.")
        start = time.perf_counter()
        captions = caption_entities(
            entities, config=caption_config, cache_dir=caption_cache, show_progress_bar=show_progress_bar
        )
        summary["captions"] = {"generated": len(captions) - captions.null_count}
        if CAPTION_FIELD in entities.column_names:
            existing = entities.column(CAPTION_FIELD).combine_chunks().cast(pa.string())
            captions = pc.if_else(pc.is_valid(captions), captions, existing)
            entities = entities.set_column(entities.column_names.index(CAPTION_FIELD), CAPTION_FIELD, captions)
        else:
            entities = entities.append_column(CAPTION_FIELD, captions)
        summary["captions"]["seconds"] = time.perf_counter() - start
    return entities, summary


def _optional_number(text: str) -> float | None:
    return None if text.lower() == "none" else float(text)


def _optional_int(text: str) -> int | None:
    return None if text.lower() == "none" else int(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="omnisearchsage-enrich", description=__doc__.splitlines()[0])
    parser.add_argument("--entities", required=True, help="entity table (parquet) with an `id` column")
    parser.add_argument("--out", required=True, help="enriched entity table to write (parquet)")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="log rows read at a time")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    boards = parser.add_argument_group("board titles")
    boards.add_argument("--board-saves", help="save records (parquet file/folder): entity_id, board_title")
    boards.add_argument("--max-board-titles", type=int, default=10)
    engaged = parser.add_argument_group("engaged queries")
    engaged.add_argument("--engagements", help="logs (parquet file/folder): entity_id, query, engagement, count, date")
    engaged.add_argument("--as-of", help="the logs' last day, YYYY-MM-DD (required with --engagements)")
    engaged.add_argument("--state", help="incremental state (parquet): read when it exists, then replaced")
    suppress = argparse.SUPPRESS
    engaged.add_argument(
        "--weights", type=json.loads, default=suppress, help="engagement weights as JSON, e.g. '{\"click\": 1}'"
    )
    engaged.add_argument("--half-life-days", type=_optional_number, default=suppress, help="in days, or none")
    engaged.add_argument("--state-size", type=_optional_int, default=suppress, help="per entity, or none (all)")
    engaged.add_argument("--top-queries", dest="top_k", type=int, default=suppress, help="per entity (default 20)")
    captions = parser.add_argument_group("synthetic captions")
    captions.add_argument("--captions", action="store_true", help="caption images of entities lacking text")
    captions.add_argument("--caption-model", default=CaptionConfig.model, help="Hub name or local folder")
    captions.add_argument("--caption-prompt", default="")
    captions.add_argument("--caption-batch-size", type=int, default=CaptionConfig.batch_size)
    captions.add_argument("--caption-max-new-tokens", type=int, default=CaptionConfig.max_new_tokens)
    captions.add_argument("--caption-cache", default="caption_cache", help="cache folder (reruns skip cached images)")
    captions.add_argument(
        "--caption-all", action="store_true", help="caption every entity, not only those without text"
    )
    captions.add_argument("--image-column", default=CaptionConfig.image_column)
    captions.add_argument("--image-root", help="folder that relative image paths are read from")
    captions.add_argument("--device", help="pipeline device, e.g. cpu, cuda, 0")
    captions.add_argument("--skip-unreadable-images", action="store_true", help="leave their captions empty")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``omnisearchsage-enrich``; returns the exit status (2 for a user error, printed as one line)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    # The parsed flag, not the raw argv: argparse also accepts abbreviations such as `--deb`.
    return run_command(parser.prog, lambda: _enrich(args), ["--debug"] if args.debug else [])


def _enrich(args: argparse.Namespace) -> int:
    # Scoring options left out are absent from `args` (SUPPRESS), so an existing state's config is kept.
    given = {key: getattr(args, key) for key in ("weights", "top_k", "half_life_days", "state_size") if key in args}
    engaged_config = EngagedQueriesConfig(**given) if given else None
    caption_config = None
    if args.captions:
        caption_config = CaptionConfig(
            model=args.caption_model,
            prompt=args.caption_prompt,
            max_new_tokens=args.caption_max_new_tokens,
            batch_size=args.caption_batch_size,
            only_missing_text=not args.caption_all,
            image_column=args.image_column,
            image_root=args.image_root,
            device=args.device,
            on_error="skip" if args.skip_unreadable_images else "raise",
        )
    start = time.perf_counter()
    entities, summary = enrich_entities(
        EntityTable.read(args.entities, name="entities").table,
        board_saves=args.board_saves,
        max_board_titles=args.max_board_titles,
        engagement_logs=args.engagements,
        as_of=args.as_of,
        state_path=args.state,
        engaged_config=engaged_config,
        caption_config=caption_config,
        caption_cache=args.caption_cache,
        batch_size=args.batch_size,
        show_progress_bar=not args.quiet,
    )
    write_table_atomically(entities, args.out)
    summary["out"] = str(args.out)
    summary["seconds"] = time.perf_counter() - start
    print(json.dumps(summary, indent=2, sort_keys=True))
    return 0


__all__ = ["CAPTION_FIELD", "build_parser", "enrich_entities", "main"]
