"""Engaged queries: per entity, the top 20 queries by weighted engagement, updated incrementally (§3.2.3).

Logs are rows ``(entity_id, query, engagement, count, date)``: ``count`` engagements of type
``engagement`` (click, save, …) with the entity on a search for ``query`` on ``date``. On day ``T`` a
row's contribution to the score of ``(entity, query)`` is::

    weights[engagement] * count * 2 ** (-(T - date) / half_life_days)

and an entity's engaged queries are its ``top_k`` queries by summed score (ties: query in codepoint
order). The paper uses a two-year window and blends each new window of logs into the stored top 20
instead of recomputing two years from scratch; the exponential decay is what makes that exact: the
state keeps, per entity, its best ``state_size`` queries with their scores as of the state's date, and
an update multiplies them by ``2 ** (-days_elapsed / half_life_days)`` and adds the new window's
scores. A two-year window is then a soft one: with the default 180-day half-life, engagement two
years old weighs 6% of today's. ``half_life_days=None`` turns decay off (all-time sums).

Exactness: with ``state_size=None`` (keep every query) an incremental update equals a full recomputation
up to float64 rounding (scores agree to a relative 1e-9; only queries whose scores tie within that can
swap places). A finite ``state_size`` bounds memory and drops each entity's tail: a query outside an
entity's best ``state_size`` is forgotten, so it can be missing later if it would have climbed back into
the top ``top_k``. ``bench/enrich_speed.py`` measures how often that changes a top 20.

Memory: 20 bytes per distinct (entity, query) pair of a chunk and of the state, plus the distinct
strings; rows are read in chunks and reduced per chunk.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..data.keys import StringCatalogue, encode_strings, lexical_ranks, list_array, rank_within_groups
from ..data.tables import DEFAULT_BATCH_SIZE, ID_COLUMN, TableSource, iter_batches, write_table_atomically
from .columns import drop_null_rows

LOG_COLUMNS = ("entity_id", "query", "engagement", "count", "date")
DEFAULT_WEIGHTS = {"click": 1.0, "closeup": 1.0, "save": 2.0, "add_to_cart": 3.0, "checkout": 5.0}
_STATE_METADATA_KEY = b"omnisearchsage_engaged_queries"
_EPOCH = dt.date(1970, 1, 1)


@dataclass
class EngagedQueriesConfig:
    """How engaged queries are scored and how much the incremental state keeps.

    Args:
        weights: Weight of each engagement type (>= 0); a log row of a type not listed is an error.
        top_k: Queries kept per entity in the output (paper: 20).
        half_life_days: Days after which an engagement counts half (> 0), or None for no decay.
        state_size: Queries kept per entity in the state (>= ``top_k``), or None to keep all of them,
            which makes incremental updates exact at the cost of memory.
    """

    weights: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_WEIGHTS))
    top_k: int = 20
    half_life_days: float | None = 180.0
    state_size: int | None = 100

    def __post_init__(self):
        if not self.weights or any(not isinstance(w, (int, float)) or w < 0 for w in self.weights.values()):
            raise ValueError(f"`weights` must map engagement types to numbers >= 0, got {self.weights!r}.")
        if not isinstance(self.top_k, int) or self.top_k < 1:
            raise ValueError(f"`top_k` must be a positive int, got {self.top_k!r}.")
        if self.half_life_days is not None and not self.half_life_days > 0:
            raise ValueError(f"`half_life_days` must be > 0 or None (no decay), got {self.half_life_days!r}.")
        if self.state_size is not None and (not isinstance(self.state_size, int) or self.state_size < self.top_k):
            raise ValueError(f"`state_size` must be an int >= top_k ({self.top_k}) or None, got {self.state_size!r}.")

    def decay(self, days: np.ndarray | int) -> np.ndarray:
        """The factor an engagement ``days`` old is weighted by."""
        if self.half_life_days is None:
            return np.ones_like(np.asarray(days, dtype=np.float64))
        return np.exp2(-np.asarray(days, dtype=np.float64) / self.half_life_days)


@dataclass
class EngagedQueryState:
    """Per entity, its best queries with their scores as of ``as_of``: all an incremental update needs.

    Attributes:
        table: ``entity_id``, ``query`` (strings) and ``score`` (float64), grouped by entity, best first.
        as_of: The last day of logs folded in.
        config: The scoring the scores were computed with (an update must use the same).
    """

    table: pa.Table
    as_of: dt.date
    config: EngagedQueriesConfig

    def top_queries(self, top_k: int | None = None) -> pa.Table:
        """``id`` and ``engaged_queries`` (``list<string>``, best first, at most ``top_k``, default the config's)."""
        top_k = self.config.top_k if top_k is None else top_k
        if not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"`top_k` must be a positive int, got {top_k!r}.")
        entity = self.table.column("entity_id").combine_chunks()
        starts = np.zeros(len(entity), dtype=bool)  # (num_rows,): first row of an entity
        starts[:1] = True
        if len(entity) > 1:
            starts[1:] = pc.not_equal(entity[1:], entity[:-1]).to_numpy(zero_copy_only=False)
        group = np.cumsum(starts) - 1
        rank = rank_within_groups(group)
        keep = np.flatnonzero(rank < top_k)
        first = np.flatnonzero(starts)
        offsets = np.append(np.searchsorted(keep, first), len(keep))
        return pa.table(
            {
                ID_COLUMN: entity.take(pa.array(first)),
                "engaged_queries": list_array(
                    offsets, self.table.column("query").combine_chunks().take(pa.array(keep))
                ),
            }
        )

    def save(self, path: str | os.PathLike) -> Path:
        """Write the state as parquet (atomically); its date and config travel in the file's metadata."""
        metadata = {"as_of": self.as_of.isoformat(), "config": dataclasses.asdict(self.config)}
        table = self.table.replace_schema_metadata({_STATE_METADATA_KEY: json.dumps(metadata, sort_keys=True)})
        return write_table_atomically(table, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> EngagedQueryState:
        """Read a state written by ``save``."""
        table = pq.read_table(path)
        raw = (table.schema.metadata or {}).get(_STATE_METADATA_KEY)
        if raw is None:
            raise ValueError(
                f"{str(path)!r} is not an engaged-queries state (no {_STATE_METADATA_KEY.decode()!r} metadata)."
            )
        metadata = json.loads(raw)
        config = EngagedQueriesConfig(**metadata["config"])
        return cls(table.replace_schema_metadata(None), dt.date.fromisoformat(metadata["as_of"]), config)


def update_engaged_queries(
    logs: TableSource,
    *,
    as_of: dt.date | str,
    state: EngagedQueryState | None = None,
    config: EngagedQueriesConfig | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    show_progress_bar: bool = False,
) -> EngagedQueryState:
    """Fold a window of engagement logs into ``state`` (or start one), as of day ``as_of``.

    With ``state=None`` this is the full computation over ``logs``; with a state it is the incremental
    update: the state's scores are decayed from ``state.as_of`` to ``as_of`` and the window's added (see
    the module docstring for the formula and how exact this is). Pairs whose score is 0 (only zero-weight
    engagements) are dropped.

    Args:
        logs: Rows with ``entity_id``, ``query``, ``engagement`` (strings), ``count`` (number >= 0) and
            ``date`` (date, timestamp or ``"YYYY-MM-DD"`` string); rows with a null are skipped. A parquet
            file or folder, a ``pa.Table`` or record batches.
        as_of: The window's last day; no row may be later. With a state, every row must be later than
            ``state.as_of`` (earlier days are already in the state).
        state: The state of the previous update, or None.
        config: Scoring and state size; defaults to the state's, else ``EngagedQueriesConfig()``. It must
            equal the state's.
        batch_size: Rows read at a time.
        show_progress_bar: Show a tqdm bar over the rows.

    Returns:
        The new state; ``state.top_queries()`` gives the entities' engaged queries.

    Example:
        ::

            logs = pa.table({"entity_id": ["p1", "p1", "p1"], "query": ["red dress", "dress", "red dress"],
                             "engagement": ["click", "save", "click"], "count": [1, 1, 2],
                             "date": ["2024-01-01", "2024-01-01", "2024-01-02"]})
            state = update_engaged_queries(logs, as_of="2024-01-02",
                                           config=EngagedQueriesConfig(half_life_days=None))
            state.top_queries().to_pylist()
            # [{'id': 'p1', 'engaged_queries': ['red dress', 'dress']}]   (scores 3 and 2)
    """
    if config is None:
        config = state.config if state is not None else EngagedQueriesConfig()
    elif state is not None and config != state.config:
        raise ValueError(
            f"`config` {config} differs from the config the state was built with ({state.config}); scores of "
            "different weights or half-lives cannot be blended: pass the state's config or recompute from scratch."
        )
    as_of = _to_date(as_of, "as_of")
    if state is not None and as_of < state.as_of:
        raise ValueError(f"`as_of` {as_of} is before the state's as_of {state.as_of}; updates must move forward.")
    today = (as_of - _EPOCH).days
    entities, queries = StringCatalogue(), StringCatalogue()
    parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    if state is not None:
        entity_keys = encode_strings(state.table.column("entity_id"), entities)
        query_keys = encode_strings(state.table.column("query"), queries)
        scores = state.table.column("score").to_numpy() * config.decay((as_of - state.as_of).days)
        parts.append((entity_keys, query_keys, scores))
    for batch in iter_batches(
        logs, LOG_COLUMNS, batch_size=batch_size, show_progress_bar=show_progress_bar, desc="Engaged queries"
    ):
        batch = drop_null_rows(batch, LOG_COLUMNS)
        day = _days(batch.column("date"))
        if len(day) and day.max() > today:
            raise ValueError(f"Logs hold rows dated {_EPOCH + dt.timedelta(int(day.max()))}, after `as_of` {as_of}.")
        if state is not None and len(day) and day.min() <= (state.as_of - _EPOCH).days:
            raise ValueError(
                f"Logs hold rows dated {_EPOCH + dt.timedelta(int(day.min()))}, on or before the state's as_of "
                f"{state.as_of}: those days are already in the state. Pass only logs after {state.as_of}."
            )
        count = batch.column("count").to_numpy(zero_copy_only=False).astype(np.float64)
        if len(count) and count.min() < 0:
            raise ValueError(f"`count` must be >= 0, got {count.min()!r}.")
        value = _weights(batch.column("engagement"), config.weights) * count * config.decay(today - day)
        parts.append(
            _sum_pairs(
                encode_strings(batch.column("entity_id"), entities),
                encode_strings(batch.column("query"), queries),
                value,
            )
        )
    entity_keys, query_keys, scores = (
        _sum_pairs(*(np.concatenate(p) for p in zip(*parts, strict=True))) if parts else _no_pairs()
    )
    positive = scores > 0
    entity_keys, query_keys, scores = entity_keys[positive], query_keys[positive], scores[positive]

    query_row = queries.lookup(query_keys) if len(query_keys) else np.zeros(0, dtype=np.int64)
    query_rank = lexical_ranks(queries.strings())[query_row]
    order = np.lexsort((query_rank, -scores, entity_keys))
    if config.state_size is not None:
        order = order[rank_within_groups(entity_keys[order]) < config.state_size]
    entity_row = entities.lookup(entity_keys[order]) if len(order) else np.zeros(0, dtype=np.int64)
    table = pa.table(
        {
            "entity_id": entities.strings().take(pa.array(entity_row)),
            "query": queries.strings().take(pa.array(query_row[order])),
            "score": pa.array(scores[order], pa.float64()),
        }
    )
    return EngagedQueryState(table, as_of, config)


def engaged_queries_from_pairs(pairs: Iterable[tuple[str, str]], *, top_k: int = 20) -> dict[str, list[str]]:
    """Engaged queries from ``(entity_id, query)`` pairs, each pair one engagement of weight 1.

    The same computation as ``update_engaged_queries`` (no decay): an entity's queries are ranked by how
    many pairs hold them, then in codepoint order, and the first ``top_k`` kept. This is how a data set
    of (question, product) pairs, e.g. Amazon ePQA's training questions, becomes engaged queries.

    Args:
        pairs: ``(entity_id, query)`` tuples.
        top_k: Queries kept per entity (paper: 20).

    Returns:
        Entity id → its queries, best first (entities without pairs are absent).

    Example:
        ::

            engaged_queries_from_pairs([("B01", "is it waterproof"), ("B01", "does it float"),
                                        ("B01", "is it waterproof"), ("B02", "size?")])
            # {'B02': ['size?'], 'B01': ['is it waterproof', 'does it float']}
    """
    entity_ids, queries = [], []
    for entity_id, query in pairs:
        entity_ids.append(entity_id)
        queries.append(query)
    logs = pa.table(
        {
            "entity_id": pa.array(entity_ids, pa.string()),
            "query": pa.array(queries, pa.string()),
            "engagement": pa.array(["pair"] * len(queries), pa.string()),
            "count": pa.array(np.ones(len(queries), dtype=np.int64)),
            "date": pa.array([_EPOCH] * len(queries), pa.date32()),
        }
    )
    config = EngagedQueriesConfig(weights={"pair": 1.0}, top_k=top_k, half_life_days=None, state_size=top_k)
    top = update_engaged_queries(logs, as_of=_EPOCH, config=config).top_queries()
    return dict(zip(top.column(ID_COLUMN).to_pylist(), top.column("engaged_queries").to_pylist(), strict=True))


def _sum_pairs(
    entity_keys: np.ndarray, query_keys: np.ndarray, values: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One row per distinct (entity, query) key pair with its values summed, sorted by entity then query."""
    if len(values) == 0:
        return _no_pairs()
    order = np.lexsort((query_keys, entity_keys))
    entity_keys, query_keys = entity_keys[order], query_keys[order]
    new = np.ones(len(order), dtype=bool)
    new[1:] = (entity_keys[1:] != entity_keys[:-1]) | (query_keys[1:] != query_keys[:-1])
    starts = np.flatnonzero(new)
    return entity_keys[starts], query_keys[starts], np.add.reduceat(values[order], starts)


def _no_pairs() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return np.zeros(0, np.uint64), np.zeros(0, np.uint64), np.zeros(0, np.float64)


def _weights(engagement: pa.Array, weights: dict[str, float]) -> np.ndarray:
    """``(n,)`` weight of every row's engagement type; unknown types are an error that lists the known ones."""
    encoded = pc.dictionary_encode(engagement)
    types = encoded.dictionary.to_pylist()
    unknown = sorted(set(types) - set(weights))
    if unknown:
        raise ValueError(
            f"Engagement type(s) {unknown} have no weight; configured: {sorted(weights)}. Add them to `weights`."
        )
    return np.array([weights[t] for t in types], dtype=np.float64)[encoded.indices.to_numpy(zero_copy_only=False)]


def _days(dates: pa.Array) -> np.ndarray:
    """``(n,)`` int64 days since 1970-01-01 of a date, timestamp or ISO-string column."""
    if pa.types.is_string(dates.type) or pa.types.is_large_string(dates.type):
        dates = pc.cast(pc.strptime(dates, format="%Y-%m-%d", unit="s"), pa.date32())
    elif not pa.types.is_date32(dates.type):
        try:
            dates = pc.cast(dates, pa.date32())
        except pa.ArrowNotImplementedError:
            raise TypeError(
                f"`date` must be a date, timestamp or 'YYYY-MM-DD' string column, got {dates.type}."
            ) from None
    return dates.cast(pa.int32()).to_numpy(zero_copy_only=False).astype(np.int64)


def _to_date(value: dt.date | str, name: str) -> dt.date:
    if isinstance(value, dt.datetime):
        return value.date()
    if isinstance(value, dt.date):
        return value
    try:
        return dt.date.fromisoformat(value)
    except (TypeError, ValueError):
        raise ValueError(f"`{name}` must be a date or a 'YYYY-MM-DD' string, got {value!r}.") from None


__all__ = [
    "DEFAULT_WEIGHTS",
    "LOG_COLUMNS",
    "EngagedQueriesConfig",
    "EngagedQueryState",
    "engaged_queries_from_pairs",
    "update_engaged_queries",
]
