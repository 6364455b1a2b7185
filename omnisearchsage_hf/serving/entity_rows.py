"""The per-batch code of batch inference: which features a table gives a tower, and rows in, checked vectors out.

Both batch engines call these two functions and nothing else to turn table rows into embeddings: the
single-machine chunk scheduler (``batch_inference``) on a range of rows of the whole table, and the Ray Data
path (``ray_inference``) on each record batch an actor receives. So a table is refused, or a row named as
unusable, with the same message whichever engine ran it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch

from ..data.tables import EntityTable

logger = logging.getLogger(__name__)

_SHOWN_IDS = 5  # ids an error message lists before "… and N more"


def check_features(
    entities: EntityTable, features: Sequence[str], columns: Sequence[str], all_null: Sequence[str], *, warn: bool
) -> None:
    """Refuse a table where every feature the model reads is absent or null in every row; with ``warn``, log how
    many are, when only some.

    Args:
        entities: The table (only its ``name`` and row count are read, so a table of ids alone will do).
        features: What the model reads (``config.input_features()``).
        columns: The table file's columns.
        all_null: The features among ``columns`` that are null in every row (none when the table is empty).
        warn: Log the warnings (the main process only, so a launch of N processes logs them once).
    """
    missing = [name for name in features if name not in columns]
    empty = [name for name in features if name in all_null]
    if len(missing) + len(empty) == len(features):
        null = f" ({empty} null in every row)" if empty else ""
        raise ValueError(
            f"Entity table {entities.name!r} has none of the columns the model reads: the model reads {features}, "
            f"the table has {columns}{null}. Rename the table's columns to the model's feature names (or fill "
            "them), or embed it with a model trained on these columns; otherwise every row would embed the same "
            "empty entity."
        )
    if warn and missing:
        logger.warning(
            "Entity table %r lacks %d of the %d features the model reads: %s; they are empty for every row "
            "(the table has %s).",
            entities.name, len(missing), len(features), missing, columns,
        )  # fmt: skip
    if warn and empty:
        logger.warning(
            "Entity table %r: %d of the %d features the model reads are null in all %d rows: %s.",
            entities.name, len(empty), len(features), len(entities), empty,
        )  # fmt: skip


def embed_rows(model: torch.nn.Module, entities: EntityTable, rows: range, batch_size: int) -> np.ndarray:
    """``(len(rows), dim)`` embeddings of table rows ``rows``, all finite; else an error naming the bad rows' ids.

    When the model rejects the rows (a feature value it cannot use) or returns NaN/inf, they are split in
    halves until the failing rows are found, so the error lists their ids, not a position in a batch.

    Args:
        model: An entity tower or ItemSage model with its tokenizer, on the device it should run on.
        entities: The table, or the slice of it this call sees (the error names ``entities.name``).
        rows: Row positions in ``entities``.
        batch_size: Entities per forward pass.

    Raises:
        ValueError: Rows the model rejects or that embed to NaN/inf, naming up to five of their ids.
    """
    batch = entities.rows(np.arange(rows.start, rows.stop))
    vectors, problem = _try_encode(model, batch, batch_size)
    if problem is None:
        return vectors
    # Rows that fail on their own; none if only the whole batch fails (then all of it is named).
    bad = _failing_rows(model, batch, batch_size, rows.start) or list(rows)
    ids = [entities.ids[row].as_py() for row in bad[:_SHOWN_IDS]]
    more = f" and {len(bad) - len(ids)} more" if len(bad) > len(ids) else ""
    raise ValueError(
        f"Entity table {entities.name!r}: {len(bad)} row(s) cannot be embedded: ids {ids}{more}. {problem} "
        "Fix or drop those rows (dense feature values must be finite and of a plausible size: values like 1e25 "
        "overflow float32 inside the model) and run again; finished chunks are kept."
    )


def _try_encode(model: torch.nn.Module, batch: list[dict], batch_size: int) -> tuple[np.ndarray | None, str | None]:
    """(embeddings, None), or (None, why) when the model rejects ``batch`` or returns NaN/inf for it."""
    try:
        vectors = model.encode(batch, batch_size=batch_size, show_progress_bar=False)  # (len(batch), dim)
    except (TypeError, ValueError) as error:
        return None, f"The model says: {error}"
    if not np.isfinite(vectors).all():
        return None, "They embed to NaN or inf."
    return vectors, None


def _failing_rows(model: torch.nn.Module, batch: list[dict], batch_size: int, first_row: int) -> list[int]:
    """Table rows of ``batch`` (which starts at ``first_row``) that fail on their own, found by halving."""
    if len(batch) == 1:
        return [first_row]
    half = len(batch) // 2
    return [
        row
        for part, start in ((batch[:half], first_row), (batch[half:], first_row + half))
        if _try_encode(model, part, batch_size)[1] is not None
        for row in _failing_rows(model, part, batch_size, start)
    ]


__all__ = ["check_features", "embed_rows"]
