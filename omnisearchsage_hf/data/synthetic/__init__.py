"""A synthetic Pinterest-like world: pins, products, a query log and engagement pairs, from one seed.

Tests and scale runs need data shaped like the data OmniSearchSage learns from (paper §3.2, §4.1), at
any size and without a real log. Every query and entity belongs to one topic and one language. Text is
made of pseudo-words from per-topic vocabularies that differ by language (``"ja"`` mixes kanji and kana,
so the tokenizer's CJK path runs); the pre-existing embeddings are noisy topic centroids, a weaker
topic signal than the text. Queries, pins and products have Zipf popularity, engagements mostly stay
within the query's topic (and language), and the enrichment fields appear at the paper's coverage.

Generation is vectorised numpy and Arrow, in fixed-size blocks that each own a random stream: the same
config gives the same world on any machine, and a million pins take about 4 GB (mostly the float32
embeddings). No popularity cap is applied here: the data loader does that.

Modules: ``config`` (``SyntheticWorldConfig``, the languages' scripts, the constants), ``sampling``
(random streams and vectorised draws), ``lexicon`` (pseudo-words and texts), ``queries`` (the query log),
``catalogue`` (pins and products, their features), ``world`` (``generate_world``, ``SyntheticWorld``).

Run ``python -m omnisearchsage_hf.data.synthetic --out DIR --num-pins N ...`` to write a world.
"""

from .config import (
    BLOCK_SIZE,
    ENTITY_METADATA_COLUMNS,
    LANGUAGE_SCRIPTS,
    PIN_ENGAGEMENTS,
    PRODUCT_ENGAGEMENTS,
    SPLITS,
    TASKS,
    SyntheticWorldConfig,
)
from .world import SyntheticWorld, entity_features, generate_world

__all__ = [
    "BLOCK_SIZE",
    "ENTITY_METADATA_COLUMNS",
    "LANGUAGE_SCRIPTS",
    "PIN_ENGAGEMENTS",
    "PRODUCT_ENGAGEMENTS",
    "SPLITS",
    "TASKS",
    "SyntheticWorld",
    "SyntheticWorldConfig",
    "entity_features",
    "generate_world",
]
