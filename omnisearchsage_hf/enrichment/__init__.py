"""Entity enrichment (paper §3.2): board titles, engaged queries (incremental) and synthetic captions.

Each step turns logs into one text field of the entity tower: ``board_titles`` from board saves,
``engaged_queries`` from search engagement logs, ``caption`` from an image-captioning model. The
``omnisearchsage-enrich`` command (``cli.main``) runs them over an entity table and writes the enriched
table as parquet.
"""

from .board_titles import board_titles
from .captions import CaptionCache, CaptionConfig, build_captioner, caption_entities, caption_images
from .cli import enrich_entities
from .columns import attach_column
from .engaged_queries import (
    EngagedQueriesConfig,
    EngagedQueryState,
    engaged_queries_from_pairs,
    update_engaged_queries,
)

__all__ = [
    "CaptionCache",
    "CaptionConfig",
    "EngagedQueriesConfig",
    "EngagedQueryState",
    "attach_column",
    "board_titles",
    "build_captioner",
    "caption_entities",
    "caption_images",
    "engaged_queries_from_pairs",
    "enrich_entities",
    "update_engaged_queries",
]
