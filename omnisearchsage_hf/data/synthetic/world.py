"""The synthetic world: ``generate_world`` puts the lexicon, query log, catalogue and engagement pairs together.

A ``SyntheticWorld`` holds the pins and products as entity tables (``EntityTable``) and the queries and
pairs as ``RecordTable``; ``save`` writes them all as parquet plus ``world.json``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from tqdm.auto import tqdm

from ...atomic import write_text_atomically
from ..records import RecordTable
from ..tables import EntityTable, write_table_atomically
from .catalogue import Catalogue, entity_block
from .config import (
    BLOCK_SIZE,
    ENTITY_METADATA_COLUMNS,
    PIN_ENGAGEMENTS,
    PRODUCT_ENGAGEMENTS,
    TASKS,
    SyntheticWorldConfig,
)
from .lexicon import Lexicon
from .queries import QueryLog
from .sampling import random_stream, unit


@dataclass
class SyntheticWorld:
    """A generated catalogue and query log; see ``generate_world``.

    Attributes:
        config: The config it was generated from.
        pins: id ("pin_000123"), title, description, caption, board_titles (list), engaged_queries (list),
            pinsage_embedding, visual_embedding; metadata topic, language, popularity.
        products: id ("prod_000123"), title, description, caption, board_titles, engaged_queries, brand,
            color, itemsage_embedding, visual_embedding (a list of 1..``max_images`` vectors); metadata
            topic, language, popularity.
        queries: text, topic, language, frequency (searches), intent (shared by a query's renderings in
            other languages), split ("train" or "test").
        pairs: ``pairs[task][split]`` for task in ``TASKS`` and split in ``SPLITS``, with columns query,
            candidate_id (an entity id, or the other query's text for query_query), engagement, count.
            With ``num_pin_product_pairs`` > 0 also ``pairs["pin_product"]``, whose ``query`` is a pin id.
    """

    config: SyntheticWorldConfig
    pins: EntityTable
    products: EntityTable
    queries: RecordTable
    pairs: dict[str, dict[str, RecordTable]]

    def counts(self) -> dict[str, Any]:
        """Row counts of every table."""
        return {
            "pins": len(self.pins),
            "products": len(self.products),
            "queries": len(self.queries),
            "pairs": {task: {split: len(t) for split, t in by_split.items()} for task, by_split in self.pairs.items()},
        }

    def save(self, directory: str | Path, *, show_progress_bar: bool = False) -> dict[str, Path]:
        """Write the world as parquet files plus ``world.json``, each atomically (temp name, then rename).

        Files: ``pins.parquet``, ``products.parquet``, ``queries.parquet``, ``pairs/{task}_{split}.parquet``
        (every column, metadata included), and last ``world.json`` (config, counts, file names, library
        versions), so a folder holding ``world.json`` is complete.

        Args:
            directory: Output folder, created if missing; existing files of the same names are replaced.
            show_progress_bar: Show a tqdm bar over the files.

        Returns:
            File name (relative to ``directory``) → path written.

        Example:
            ::

                world.save("data/world")["pairs/query_pin_train.parquet"]
                # PosixPath('data/world/pairs/query_pin_train.parquet')
        """
        from ... import __version__

        directory = Path(directory)
        tables = {"pins.parquet": self.pins, "products.parquet": self.products, "queries.parquet": self.queries}
        for task, by_split in self.pairs.items():
            tables.update({f"pairs/{task}_{split}.parquet": table for split, table in by_split.items()})
        written = {}
        for name, table in tqdm(tables.items(), desc="Writing world", disable=not show_progress_bar):
            written[name] = write_table_atomically(table.table, directory / name, row_group_size=BLOCK_SIZE)
        summary = {
            "config": self.config.to_dict(),
            "counts": self.counts(),
            "files": sorted(written),
            "versions": {"omnisearchsage_hf": __version__, "numpy": np.__version__, "pyarrow": pa.__version__},
        }
        text = json.dumps(summary, indent=2, sort_keys=True) + "\n"
        written["world.json"] = write_text_atomically(directory / "world.json", text)
        return written


def entity_features(row: Mapping[str, Any]) -> dict[str, Any]:
    """``row`` without the metadata columns, e.g. a row read back from ``pins.parquet`` for the entity tower."""
    return {key: value for key, value in row.items() if key not in ENTITY_METADATA_COLUMNS}


def generate_world(config: SyntheticWorldConfig, *, show_progress_bar: bool = False) -> SyntheticWorld:
    """Generate the pins, products, query log and train/test pairs that ``config`` describes.

    Queries are drawn by their Zipf frequency. A query→entity event picks, by popularity, an entity of
    the query's topic and (``same_language_rate``) language, or with ``noise_rate`` any entity. A
    query→query event picks the same intent in another language, a one-word refinement or its parent,
    or a query of the same topic and language. Pairs are split by query: a test query appears in no
    train pair (on either side) and in no entity's engaged queries.

    Args:
        config: Sizes, rates and seed; the same config always gives the same world.
        show_progress_bar: Show a tqdm bar over the generation steps.

    Returns:
        A ``SyntheticWorld``.

    Example:
        ::

            world = generate_world(SyntheticWorldConfig(num_pins=100, num_products=20, num_queries=50))
            world.pairs["query_pin"]["train"][0]
            # {'query': 'vorchos totalle', 'candidate_id': 'pin_000001', 'engagement': 'click', 'count': 2}
    """
    sizes = {"pin": config.num_pins, "product": config.num_products}
    blocks = {kind: range(0, n, BLOCK_SIZE) for kind, n in sizes.items()}
    total_steps = 2 + sum(len(b) for b in blocks.values()) + len(TASKS) + bool(config.num_pin_product_pairs)
    progress = tqdm(total=total_steps, desc="Generating world", disable=not show_progress_bar)
    lexicon = Lexicon.build(config, random_stream(config, "lexicon"))
    queries = QueryLog.build(config, lexicon, random_stream(config, "queries"))
    progress.update(2)

    rng = random_stream(config, "entities")
    centroids = {
        name: unit(rng.standard_normal((config.num_topics, config.embedding_dim), dtype=np.float32))
        for name in ("pinsage_embedding", "visual_embedding", "itemsage_embedding")
    }
    catalogues = {kind: Catalogue.build(kind, n, config, lexicon, rng) for kind, n in sizes.items()}
    tables = {}
    for kind, catalogue in catalogues.items():
        parts = []
        for index, start in enumerate(blocks[kind]):
            rows = slice(start, start + BLOCK_SIZE)
            block_rng = random_stream(config, kind, index)
            parts.append(entity_block(catalogue, rows, config, lexicon, queries, centroids, block_rng))
            progress.update(1)
        tables[kind] = EntityTable(pa.concat_tables(parts), name=kind, metadata_columns=ENTITY_METADATA_COLUMNS)

    rng = random_stream(config, "pairs")
    events = {
        "query_pin": (*catalogues["pin"].engaged_by(queries, config.num_query_pin_pairs, rng), PIN_ENGAGEMENTS),
        "query_product": (
            *catalogues["product"].engaged_by(queries, config.num_query_product_pairs, rng),
            PRODUCT_ENGAGEMENTS,
        ),
        "query_query": (*queries.related(config.num_query_query_pairs, config.noise_rate, rng), {"click": 1.0}),
    }
    pairs = {}
    for task, (q, candidates, engagements) in events.items():
        engagement = rng.choice(len(engagements), size=len(q), p=list(engagements.values()))
        candidate_ids = None if task == "query_query" else catalogues[task.split("_")[1]].ids
        pairs[task] = _pair_splits(
            queries.texts, queries.is_test, q, candidates, engagement, list(engagements), candidate_ids
        )
        progress.update(1)
    if config.num_pin_product_pairs:
        rng = random_stream(config, "pin_product")
        pins = catalogues["pin"]
        held_out = rng.random(len(pins.topics)) < config.test_fraction
        pin, product = catalogues["product"].engaged_by(pins, config.num_pin_product_pairs, rng)
        engagement = rng.choice(len(PRODUCT_ENGAGEMENTS), size=len(pin), p=list(PRODUCT_ENGAGEMENTS.values()))
        pairs["pin_product"] = _pair_splits(
            pins.ids, held_out, pin, product, engagement, list(PRODUCT_ENGAGEMENTS), catalogues["product"].ids
        )
        progress.update(1)
    progress.close()
    return SyntheticWorld(config, tables["pin"], tables["product"], RecordTable(queries.table()), pairs)


def _pair_splits(
    anchor_names: pa.Array,
    anchor_is_test: np.ndarray,
    q: np.ndarray,
    candidate: np.ndarray,
    engagement: np.ndarray,
    names: list[str],
    candidate_ids: pa.Array | None,
) -> dict[str, RecordTable]:
    """Merge repeated events into counted rows and split them by anchor (the query, or the pin).

    ``anchor_names`` names each anchor (query texts, pin ids) and ``anchor_is_test`` holds it out.
    ``candidate_ids=None`` means the candidates are anchors too (query→query); a train row then names no
    test anchor on either side.
    """
    rows, counts = np.unique(np.column_stack([q, candidate, engagement]), axis=0, return_counts=True)
    table = pa.table(
        {
            "query": anchor_names.take(pa.array(rows[:, 0])),
            "candidate_id": (anchor_names if candidate_ids is None else candidate_ids).take(pa.array(rows[:, 1])),
            "engagement": pa.array(names, pa.string()).take(pa.array(rows[:, 2])),
            "count": pa.array(counts.astype(np.int64)),
        }
    )
    test = anchor_is_test[rows[:, 0]]
    train = ~test & ~anchor_is_test[rows[:, 1]] if candidate_ids is None else ~test
    return {
        "train": RecordTable(table.filter(pa.array(train))),
        "test": RecordTable(table.filter(pa.array(test))),
    }


__all__ = ["SyntheticWorld", "entity_features", "generate_world"]
