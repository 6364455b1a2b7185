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

Run ``python -m omnisearchsage_hf.training.synthetic --out DIR --num-pins N ...`` to write a world.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from ..atomic import replace_atomically, write_text_atomically

TASKS = ("query_pin", "query_product", "query_query")
SPLITS = ("train", "test")
# Columns of the entity tables that say how an entity was generated; the entity tower reads none of them.
ENTITY_METADATA_COLUMNS = ("topic", "language", "popularity")
PIN_ENGAGEMENTS = {"click": 0.45, "save": 0.35, "closeup": 0.2}
PRODUCT_ENGAGEMENTS = {"click": 0.4, "closeup": 0.2, "save": 0.1, "add_to_cart": 0.2, "checkout": 0.1}
BRANDS = ("Acme", "Aurora", "Birchwood", "Cobalt", "Ember", "Fjord", "Harbor", "Juniper", "Lumen", "Maple", "Rowan")
COLORS = ("black", "white", "grey", "red", "blue", "green", "yellow", "orange", "pink", "purple", "brown", "gold")
BLOCK_SIZE = 65_536  # entity rows per random stream (and per parquet row group)

_TOPIC_SKEW = 0.5  # Zipf exponent of topic sizes: some topics are bigger than others
_QUERY_LENGTH_P = (0.25, 0.35, 0.2, 0.12, 0.08)  # queries of 1..5 words
_REFINEMENT_SHARE = 0.2  # intents that extend another intent by one word
_RELATED_QUERY_P = (0.3, 0.3, 0.4)  # query→query: translation, refinement, same topic and language
_TEXT_SPECS = {  # kind of text: (min words, max words, share of topic words; the rest are generic words)
    "title": (2, 6, 0.8),
    "product_title": (3, 8, 0.8),
    "description": (6, 20, 0.4),
    "caption": (4, 9, 0.6),
    "board_title": (1, 3, 0.7),
}
_STREAMS = {"lexicon": 1, "queries": 2, "entities": 3, "pin": 4, "product": 5, "pairs": 6, "pin_product": 7}


class _Script(NamedTuple):
    """How a language's pseudo-words look: 1..n syllables of onset + nucleus + coda."""

    onsets: tuple[str, ...]
    nuclei: tuple[str, ...]
    codas: tuple[str, ...]
    syllables: tuple[int, int]
    separator: str  # between words: "" for languages written without spaces


def _script(
    onsets: str | tuple, nuclei: str | tuple, codas: str, syllables: tuple[int, int], sep: str = " "
) -> _Script:
    """A ``_Script`` from space-separated parts, where ``-`` stands for the empty string."""
    parts = [
        p if isinstance(p, tuple) else tuple(s.replace("-", "") for s in p.split()) for p in (onsets, nuclei, codas)
    ]
    return _Script(*parts, syllables, sep)


def _chars(first: int, last: int, step: int = 1) -> tuple[str, ...]:
    return tuple(chr(code) for code in range(first, last + 1, step))


LANGUAGE_SCRIPTS: dict[str, _Script] = {
    "en": _script("b c d f g h l m n p r s t w br cl st tr sh th", "a e i o u ea oo y", "- - n t r ck ng ll s", (1, 3)),
    "de": _script(
        "b d f g h k l m n r s t w z sch st pf kl", "a e i o u ä ö ü ei au ie", "- n r ch tz ss ß lt", (1, 3)
    ),
    "fr": _script("b c d f g j l m n p r s t v ch gr pl", "a e i o ou é è ê eau ai oi", "- - n r s x que lle", (1, 3)),
    "es": _script("b c d f g j l ll m n ñ p r rr s t v ch", "a e i o u á é í ó ue ia", "- - n s r l z", (2, 3)),
    "it": _script("b c d f g l m n p r s t v gn sc", "a e i o u ia io", "- - - n l r", (2, 3)),
    "pt": _script("b c d f g j l m n p r s t v lh nh", "a e i o u ã õ ei ou", "- - s r m l", (2, 3)),
    "ru": _script("б в г д ж з к л м н п р с т ш", "а е и о у ы я ю", "- - й к в н ст", (2, 3)),
    # Kanji or katakana, then hiragana: kanji are CJK ideographs, each its own word for the tokenizer.
    "ja": _script(
        _chars(0x4E00, 0x4FFF, 7) + _chars(0x30A2, 0x30F3, 2), _chars(0x3042, 0x3093, 2) + ("",), "-", (1, 3), ""
    ),
    "zh": _script(_chars(0x5000, 0x5FFF, 11), "-", "-", (1, 2), ""),
    "ko": _script(_chars(0xAC00, 0xD7A3, 97), "-", "-", (2, 3)),
}


@dataclass(frozen=True)
class SyntheticWorldConfig:
    """Size, shape and seed of a synthetic world.

    Args:
        num_pins: Pins in the catalogue (>= 1).
        num_products: Products in the catalogue (>= 1).
        num_queries: Distinct queries in the query log (>= 1).
        num_topics: Topics; every query and entity has one (>= 1).
        languages: Language codes (keys of ``LANGUAGE_SCRIPTS``); earlier ones are more common
            (weights 1/rank). Captions are written in the first, as by one captioning model.
        embedding_dim: Width of every pre-existing embedding (default 256, the paper's).
        words_per_topic: Pseudo-words per topic and language (>= 5).
        num_generic_words: Topic-less pseudo-words per language, which pad descriptions and captions.
        num_query_pin_pairs: Query→pin engagement events to sample (>= 0). Repeats of one (query, pin,
            engagement) merge into one row whose ``count`` adds up, so there are at most this many rows.
        num_query_product_pairs: The same for query→product.
        num_query_query_pairs: The same for query→query (clicks on related queries); self pairs are dropped.
        num_pin_product_pairs: Pin→product engagement events (a product engaged from a pin's page: the
            ItemSage paper's second surface). 0 (default) makes no ``pin_product`` pairs; otherwise pins
            are drawn by popularity and products as for queries, and ``test_fraction`` of the pins are held
            out (their pairs form the test split).
        noise_rate: Share of events whose candidate comes from any topic (off-topic engagement).
        same_language_rate: Share of on-topic entity events kept within the query's language.
        translation_rate: Share of query intents also searched in a second language.
        embedding_noise: Norm of the noise added to the topic centroid before normalisation; 1.5 gives
            same-topic cosines around 0.3 and cross-topic ones around 0.
        zipf_exponent: Exponent of the Zipf popularity of queries, pins and products.
        title_or_description_rate: Share of pins with a title or a description (paper: 0.71).
        board_titles_rate: Share of pins and products with board titles (paper: 0.91).
        engaged_queries_rate: Share of pins and products with engaged queries (paper: 0.65).
        product_description_rate: Share of products with a description (all have a title).
        multi_image_rate: Share of products with 2..``max_images`` images.
        max_images: Most images per product (>= 1).
        test_fraction: Share of queries held out; their pairs form the test split (in [0, 1)).
        seed: Seed of everything (>= 0).

    Example:
        ::

            from omnisearchsage_hf.training.synthetic import SyntheticWorldConfig, generate_world

            config = SyntheticWorldConfig(num_pins=1000, num_products=200, num_queries=500, embedding_dim=32)
            world = generate_world(config)
            world.counts()["pairs"]["query_pin"]
            # {'train': 5678, 'test': 512}
    """

    num_pins: int = 10_000
    num_products: int = 2_000
    num_queries: int = 5_000
    num_topics: int = 50
    languages: tuple[str, ...] = ("en", "de", "fr", "es", "ja")
    embedding_dim: int = 256
    words_per_topic: int = 40
    num_generic_words: int = 300
    num_query_pin_pairs: int = 20_000
    num_query_product_pairs: int = 5_000
    num_query_query_pairs: int = 5_000
    num_pin_product_pairs: int = 0
    noise_rate: float = 0.05
    same_language_rate: float = 0.8
    translation_rate: float = 0.3
    embedding_noise: float = 1.5
    zipf_exponent: float = 1.0
    title_or_description_rate: float = 0.71
    board_titles_rate: float = 0.91
    engaged_queries_rate: float = 0.65
    product_description_rate: float = 0.6
    multi_image_rate: float = 0.3
    max_images: int = 4
    test_fraction: float = 0.1
    seed: int = 0

    def __post_init__(self):
        object.__setattr__(self, "languages", tuple(self.languages))
        for field in dataclasses.fields(self):
            name, value = field.name, getattr(self, field.name)
            if isinstance(field.default, int) and not isinstance(field.default, bool):
                low = {"words_per_topic": 5, "seed": 0}.get(name, 0 if name.endswith("_pairs") else 1)
                if not isinstance(value, int) or isinstance(value, bool) or value < low:
                    raise ValueError(f"`{name}` must be an int >= {low}, got {value!r}.")
            elif isinstance(field.default, float):
                high = 1.0 if name.endswith(("_rate", "_fraction")) else float("inf")
                if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value <= high:
                    raise ValueError(f"`{name}` must be a number in [0, {high}], got {value!r}.")
        if self.test_fraction >= 1:
            raise ValueError(f"`test_fraction` must be < 1 so that some queries train, got {self.test_fraction!r}.")
        unknown = [code for code in self.languages if code not in LANGUAGE_SCRIPTS]
        if not self.languages or unknown or len(set(self.languages)) != len(self.languages):
            raise ValueError(
                f"`languages` must be distinct codes from {sorted(LANGUAGE_SCRIPTS)}, got {self.languages!r}."
            )

    def to_dict(self) -> dict[str, Any]:
        """The fields as JSON-ready values; ``SyntheticWorldConfig(**config.to_dict())`` rebuilds it."""
        return {**dataclasses.asdict(self), "languages": list(self.languages)}


class SyntheticTable:
    """One generated table, kept columnar in Arrow and read as dicts.

    Rows read by index or slice (``table[0]``, ``table[:50]``) or ``to_records()`` leave out the
    metadata columns, so entity rows go straight into ``OmniSearchSageEntityModel.encode``. A missing
    feature is None; a vector is a float32 ``np.ndarray`` of shape ``(dim,)``, several images one
    ``(num_images, dim)`` array.

    Args:
        table: The columns (vector columns hold no nulls).
        metadata_columns: Columns read only through ``column`` (e.g. ``ENTITY_METADATA_COLUMNS``).
    """

    def __init__(self, table: pa.Table, metadata_columns: Sequence[str] = ()):
        self.table = table
        self.metadata_columns = tuple(c for c in metadata_columns if c in table.column_names)

    @property
    def record_columns(self) -> list[str]:
        """Columns that rows carry: all but the metadata columns."""
        return [c for c in self.table.column_names if c not in self.metadata_columns]

    def __len__(self) -> int:
        return self.table.num_rows

    def __getitem__(self, index: int | slice) -> dict[str, Any] | list[dict[str, Any]]:
        table = self.table.select(self.record_columns)
        if isinstance(index, slice):
            rows = range(*index.indices(len(self)))
            if rows.step == 1:
                return _records(table.slice(rows.start, len(rows)))
            return _records(table.take(pa.array(rows, pa.int64())))
        if not isinstance(index, (int, np.integer)) or not -len(self) <= index < len(self):
            raise IndexError(f"Row {index!r} is out of range for a table of {len(self)} rows.")
        return _records(table.slice(int(index) % len(self), 1))[0]

    def to_records(self) -> list[dict[str, Any]]:
        """Every row as a dict (fine for thousands of rows; use ``table`` for millions)."""
        return self[:]

    def column(self, name: str) -> np.ndarray:
        """One column, metadata included, as numpy: ``(n, dim)`` float32 for vectors, else ``(n,)``."""
        if name not in self.table.column_names:
            raise KeyError(f"No column {name!r}; columns: {self.table.column_names}.")
        column = self.table.column(name).combine_chunks()
        if pa.types.is_fixed_size_list(column.type):
            return column.flatten().to_numpy().reshape(len(column), column.type.list_size)
        return column.to_numpy(zero_copy_only=False)


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
    pins: SyntheticTable
    products: SyntheticTable
    queries: SyntheticTable
    pairs: dict[str, dict[str, SyntheticTable]]

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
        from .. import __version__

        directory = Path(directory)
        (directory / "pairs").mkdir(parents=True, exist_ok=True)
        tables = {"pins.parquet": self.pins, "products.parquet": self.products, "queries.parquet": self.queries}
        for task, by_split in self.pairs.items():
            tables.update({f"pairs/{task}_{split}.parquet": table for split, table in by_split.items()})
        written = {}
        for name, table in tqdm(tables.items(), desc="Writing world", disable=not show_progress_bar):
            write = functools.partial(pq.write_table, table.table, row_group_size=BLOCK_SIZE)
            written[name] = replace_atomically(directory / name, write)
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
    lexicon = _Lexicon.build(config, _rng(config, "lexicon"))
    queries = _QueryLog.build(config, lexicon, _rng(config, "queries"))
    progress.update(2)

    rng = _rng(config, "entities")
    centroids = {
        name: _unit(rng.standard_normal((config.num_topics, config.embedding_dim), dtype=np.float32))
        for name in ("pinsage_embedding", "visual_embedding", "itemsage_embedding")
    }
    catalogues = {kind: _Catalogue.build(kind, n, config, lexicon, rng) for kind, n in sizes.items()}
    tables = {}
    for kind, catalogue in catalogues.items():
        parts = []
        for index, start in enumerate(blocks[kind]):
            rows = slice(start, start + BLOCK_SIZE)
            block_rng = _rng(config, kind, index)
            parts.append(_entity_block(catalogue, rows, config, lexicon, queries, centroids, block_rng))
            progress.update(1)
        tables[kind] = SyntheticTable(pa.concat_tables(parts), ENTITY_METADATA_COLUMNS)

    rng = _rng(config, "pairs")
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
        rng = _rng(config, "pin_product")
        pins = catalogues["pin"]
        held_out = rng.random(len(pins.topics)) < config.test_fraction
        pin, product = catalogues["product"].engaged_by(pins, config.num_pin_product_pairs, rng)
        engagement = rng.choice(len(PRODUCT_ENGAGEMENTS), size=len(pin), p=list(PRODUCT_ENGAGEMENTS.values()))
        pairs["pin_product"] = _pair_splits(
            pins.ids, held_out, pin, product, engagement, list(PRODUCT_ENGAGEMENTS), catalogues["product"].ids
        )
        progress.update(1)
    progress.close()
    return SyntheticWorld(config, tables["pin"], tables["product"], SyntheticTable(queries.table()), pairs)


def _rng(config: SyntheticWorldConfig, stream: str, block: int = 0) -> np.random.Generator:
    return np.random.default_rng([config.seed, _STREAMS[stream], block])


def _unit(x: np.ndarray) -> np.ndarray:
    """``x`` of shape (n, dim), scaled in place to unit rows."""
    x /= np.sqrt(np.einsum("ij,ij->i", x, x))[:, None]
    return x


def _draw_by_weight(weights: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` indices drawn with replacement, each with probability proportional to its weight."""
    cumulative = np.cumsum(weights, dtype=np.float64)
    drawn = np.searchsorted(cumulative, rng.random(n) * cumulative[-1], side="right")
    return np.minimum(drawn, len(cumulative) - 1)


def _zipf_weights(n: int, exponent: float, rng: np.random.Generator) -> np.ndarray:
    """Weights ``rank ** -exponent`` over a random ranking of ``n`` items, summing to 1."""
    weights = (rng.permutation(n) + 1.0) ** -exponent
    return weights / weights.sum()


def _offsets(lengths: np.ndarray) -> pa.Array:
    return pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))


def _first_unique_rows(matrix: np.ndarray) -> np.ndarray:
    """Indices of the first occurrence of every distinct row of ``matrix``, in order."""
    return np.sort(np.unique(matrix, axis=0, return_index=True)[1])


class _GroupSampler:
    """Draws members of many groups at once, each with probability proportional to its weight.

    Args:
        groups: Group of every member, in ``[0, num_groups)``.
        weights: Positive weight of every member.
        num_groups: Number of groups.
        members: What ``sample`` returns for each member (default: its index).
    """

    def __init__(self, groups: np.ndarray, weights: np.ndarray, num_groups: int, members: np.ndarray | None = None):
        order = np.argsort(groups, kind="stable")
        self.members = order if members is None else np.asarray(members)[order]
        self.cumulative = np.cumsum(weights[order], dtype=np.float64)
        bounds = np.searchsorted(groups[order], np.arange(num_groups + 1))  # group g: [bounds[g], bounds[g+1])
        self.start, self.stop = bounds[:-1], bounds[1:]

    def sample(self, groups: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """One member of each requested group; -1 where the group is empty."""
        if len(self.members) == 0:
            return np.full(len(groups), -1, dtype=np.int64)
        start, stop = self.start[groups], self.stop[groups]
        below = np.where(start > 0, self.cumulative[np.maximum(start - 1, 0)], 0.0)
        total = self.cumulative[np.clip(stop - 1, 0, None)] - below
        position = np.searchsorted(self.cumulative, below + rng.random(len(groups)) * total, side="right")
        position = np.minimum(np.clip(position, start, stop - 1), len(self.members) - 1)
        return np.where(stop > start, self.members[position], -1)


@dataclass(frozen=True)
class _Lexicon:
    """The world's words, and how common each topic and language is.

    Word ids index ``words``: language-major, each language holding its topic words (topic-major,
    ``words_per_topic`` each) and then its generic words. No word is shared between languages.
    """

    words: pa.Array  # (num_languages * size,) strings
    separators: pa.Array  # (num_languages,) what joins words
    num_topics: int
    words_per_topic: int
    word_cdf: np.ndarray  # Zipf over a topic's words: a few words per topic are frequent
    topic_p: np.ndarray  # (num_topics,), shared by queries and entities
    language_p: np.ndarray  # (num_languages,), 1/rank in `config.languages` order

    @classmethod
    def build(cls, config: SyntheticWorldConfig, rng: np.random.Generator) -> _Lexicon:
        size = config.num_topics * config.words_per_topic + config.num_generic_words
        taken: set[str] = set()
        words = [_pseudo_words(LANGUAGE_SCRIPTS[code], size, rng, taken) for code in config.languages]
        cdf = np.cumsum(1.0 / np.arange(1, config.words_per_topic + 1))
        language_p = 1.0 / np.arange(1, len(config.languages) + 1)
        return cls(
            words=pa.array([word for language in words for word in language], pa.string()),
            separators=pa.array([LANGUAGE_SCRIPTS[code].separator for code in config.languages], pa.string()),
            num_topics=config.num_topics,
            words_per_topic=config.words_per_topic,
            word_cdf=cdf / cdf[-1],
            topic_p=_zipf_weights(config.num_topics, _TOPIC_SKEW, rng),
            language_p=language_p / language_p.sum(),
        )

    @property
    def size(self) -> int:
        return len(self.words) // len(self.separators)

    def topic_word_ids(self, topics: np.ndarray, languages: np.ndarray, local: np.ndarray) -> np.ndarray:
        return languages * self.size + topics * self.words_per_topic + local

    def draw(self, rng: np.random.Generator, topics: np.ndarray, languages: np.ndarray, share: float) -> np.ndarray:
        """One word id per row: with probability ``share`` a Zipf-frequent topic word, else a generic one."""
        n, generic_start = len(topics), self.num_topics * self.words_per_topic
        local = np.minimum(np.searchsorted(self.word_cdf, rng.random(n)), self.words_per_topic - 1)
        generic = languages * self.size + generic_start + rng.integers(0, self.size - generic_start, n)
        return np.where(rng.random(n) < share, self.topic_word_ids(topics, languages, local), generic)

    def join(
        self, word_ids: np.ndarray, lengths: np.ndarray, languages: np.ndarray, present: np.ndarray | None = None
    ) -> pa.Array:
        """One string per row from consecutive runs of ``lengths`` word ids (null where not ``present``)."""
        mask = None if present is None else pa.array(~present)
        lists = pa.ListArray.from_arrays(_offsets(lengths), self.words.take(pa.array(word_ids)), mask=mask)
        return pc.binary_join(lists, self.separators.take(pa.array(languages)))

    def phrases(
        self,
        rng: np.random.Generator,
        topics: np.ndarray,
        languages: np.ndarray,
        kind: str,
        present: np.ndarray | None = None,
    ) -> pa.Array:
        """One text per row, with the length and topic share of ``_TEXT_SPECS[kind]``."""
        low, high, share = _TEXT_SPECS[kind]
        lengths = rng.integers(low, high + 1, len(topics))
        if present is not None:
            lengths = np.where(present, lengths, 0)
        rows = np.repeat(np.arange(len(topics)), lengths)
        return self.join(self.draw(rng, topics[rows], languages[rows], share), lengths, languages, present)


def _pseudo_words(script: _Script, count: int, rng: np.random.Generator, taken: set[str]) -> list[str]:
    """``count`` distinct words of ``script`` that are not in ``taken`` (and are added to it)."""
    words: list[str] = []
    pools = [np.array(pool, dtype=object) for pool in (script.onsets, script.nuclei, script.codas)]
    low, high = script.syllables
    for _ in range(100):
        n = 2 * (count - len(words)) + 64
        onset, nucleus, coda = (pool[rng.integers(0, len(pool), (n, high))] for pool in pools)
        syllables = onset + nucleus + coda  # (n, high) strings
        syllables[np.arange(high) >= rng.integers(low, high + 1, n)[:, None]] = ""
        for word in syllables.sum(axis=1):
            if len(word) > 1 and word not in taken:
                taken.add(word)
                words.append(word)
                if len(words) == count:
                    return words
    raise ValueError(
        f"Cannot make {count} distinct words: lower `num_topics`, `words_per_topic` or `num_generic_words`."
    )


def _intents(
    config: SyntheticWorldConfig, lexicon: _Lexicon, count: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``count`` search intents: topic, local word ids ``(count, 5)``, length 1..5, and parent (or -1).

    A share of intents refines another intent: the same words plus one.
    """
    words = config.words_per_topic
    topics = rng.choice(config.num_topics, count, p=lexicon.topic_p)
    first = np.minimum(np.searchsorted(lexicon.word_cdf, rng.random(count)), words - 1)
    steps = rng.integers(1, words // 5 + 1, (count, 4))  # steps sum to < words: a query's words are distinct
    local = (first[:, None] + np.concatenate([np.zeros((count, 1), int), steps.cumsum(1)], axis=1)) % words
    lengths = rng.choice(5, count, p=_QUERY_LENGTH_P) + 1
    base = np.flatnonzero(rng.random(count) >= _REFINEMENT_SHARE)
    refined = np.setdiff1d(np.arange(count), base)
    parent = base[rng.integers(0, len(base), len(refined))] if len(base) else np.zeros(0, int)
    refined, parent = refined[lengths[parent] < 5], parent[lengths[parent] < 5]
    topics[refined], local[refined], lengths[refined] = topics[parent], local[parent], lengths[parent] + 1
    parents = np.full(count, -1)
    parents[refined] = parent
    return topics, local, lengths, parents


@dataclass
class _QueryLog:
    """The distinct queries, one per (intent, language), with a Zipf frequency and a split."""

    texts: pa.Array
    topics: np.ndarray
    languages: np.ndarray
    intents: np.ndarray
    parents: np.ndarray  # indexed by intent: the intent it refines, or -1
    frequency: np.ndarray
    is_test: np.ndarray
    codes: tuple[str, ...]

    @classmethod
    def build(cls, config: SyntheticWorldConfig, lexicon: _Lexicon, rng: np.random.Generator) -> _QueryLog:
        num_languages = len(config.languages)
        count = int(config.num_queries / (1 + config.translation_rate * (num_languages > 1)) * 1.3) + 16
        for _ in range(6):
            topics, local, lengths, parents = _intents(config, lexicon, count, rng)
            # Every intent in one language; some also in a second one.
            primary = rng.choice(num_languages, count, p=lexicon.language_p)
            second = np.flatnonzero((rng.random(count) < config.translation_rate) & (num_languages > 1))
            other = (primary[second] + rng.integers(1, max(num_languages, 2), len(second))) % num_languages
            order = rng.permutation(count + len(second))
            intents, languages = (
                np.concatenate([np.arange(count), second])[order],
                np.concatenate([primary, other])[order],
            )
            words_per_query = lengths[intents]
            rows = np.repeat(np.arange(len(intents)), words_per_query)
            position = np.arange(len(rows)) - np.repeat(np.cumsum(words_per_query) - words_per_query, words_per_query)
            ids = lexicon.topic_word_ids(topics[intents[rows]], languages[rows], local[intents[rows], position])
            texts = lexicon.join(ids, words_per_query, languages)
            keep = _first_unique_rows(pc.dictionary_encode(texts).indices.to_numpy()[:, None])[: config.num_queries]
            if len(keep) == config.num_queries:
                break
            count *= 2
        else:
            raise ValueError(
                f"Cannot make {config.num_queries} distinct queries (`num_queries`): raise `num_topics` or "
                "`words_per_topic`."
            )
        is_test = np.zeros(len(keep), dtype=bool)
        is_test[rng.permutation(len(keep))[: round(config.test_fraction * len(keep))]] = True
        weights = _zipf_weights(len(keep), config.zipf_exponent, rng)
        frequency = np.maximum(1, np.rint(1e5 * weights / weights.max())).astype(np.int64)  # head: 100k searches
        intents = intents[keep]
        return cls(
            texts.take(pa.array(keep)),
            topics[intents],
            languages[keep],
            intents,
            parents,
            frequency,
            is_test,
            config.languages,
        )

    def table(self) -> pa.Table:
        return pa.table(
            {
                "text": self.texts,
                "topic": self.topics.astype(np.int32),
                "language": pa.array(np.array(self.codes, dtype=object)[self.languages], pa.string()),
                "frequency": self.frequency,
                "intent": self.intents.astype(np.int64),
                "split": pa.array(np.where(self.is_test, "test", "train").astype(object), pa.string()),
            }
        )

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """``n`` query indices drawn by frequency, one per search."""
        return _draw_by_weight(self.frequency, n, rng)

    def engaged_sampler(self, num_topics: int) -> _GroupSampler:
        """Train queries by topic and frequency: held-out queries never become entity features."""
        train = np.flatnonzero(~self.is_test)
        return _GroupSampler(self.topics[train], self.frequency[train], num_topics, members=train)

    def related(self, n: int, noise_rate: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """``n`` (query, related query) events, self pairs dropped (see ``generate_world``)."""
        q, num_languages = self.sample(n, rng), len(self.codes)
        mode = rng.choice(3, n, p=_RELATED_QUERY_P)
        candidate = np.where(mode == 0, self._translations()[q], np.where(mode == 1, self._refinements()[q], -1))
        groups = self.topics * num_languages + self.languages
        nearby = _GroupSampler(groups, self.frequency, int(groups.max()) + 1).sample(groups[q], rng)
        candidate = np.where(candidate >= 0, candidate, nearby)
        noise = rng.random(n) < noise_rate
        candidate[noise] = self.sample(int(noise.sum()), rng)
        keep = candidate != q
        return q[keep], candidate[keep]

    def _translations(self) -> np.ndarray:
        """Per query, the next query of the same intent (cyclically), or -1 if its intent has one language."""
        by_intent = np.argsort(self.intents, kind="stable")
        ordered = self.intents[by_intent]
        has_next = np.append(ordered[1:] == ordered[:-1], False)
        following = np.where(has_next, np.arange(len(ordered)) + 1, np.searchsorted(ordered, ordered))
        translation = np.empty_like(by_intent)
        translation[by_intent] = by_intent[following]
        return np.where(translation == np.arange(len(translation)), -1, translation)

    def _refinements(self) -> np.ndarray:
        """Per query, the query of its parent intent in its language, else of a child intent, else -1."""
        num_languages = len(self.codes)
        keys = self.intents * num_languages + self.languages  # unique: one text per (intent, language)
        order = np.argsort(keys)

        def query_of(intents: np.ndarray) -> np.ndarray:
            wanted = np.where(intents >= 0, intents * num_languages + self.languages, -1)
            at = np.minimum(np.searchsorted(keys[order], wanted), len(keys) - 1)
            return np.where((wanted >= 0) & (keys[order][at] == wanted), order[at], -1)

        children = np.full(len(self.parents), -1)
        refining = np.flatnonzero(self.parents >= 0)[::-1]  # reversed, so the first child wins
        children[self.parents[refining]] = refining
        parent = query_of(self.parents[self.intents])
        return np.where(parent >= 0, parent, query_of(children[self.intents]))


@dataclass
class _Catalogue:
    """Ids, topics, languages and popularity of all pins or all products (features are made per block)."""

    kind: Literal["pin", "product"]
    ids: pa.Array
    topics: np.ndarray
    languages: np.ndarray
    popularity: np.ndarray
    num_topics: int
    num_languages: int
    noise_rate: float
    same_language_rate: float

    @classmethod
    def build(cls, kind: str, n: int, config: SyntheticWorldConfig, lexicon: _Lexicon, rng: np.random.Generator):
        digits = pc.utf8_lpad(pa.array(np.arange(n)).cast(pa.string()), width=max(6, len(str(n - 1))), padding="0")
        return cls(
            kind=kind,
            ids=pc.binary_join_element_wise({"pin": "pin_", "product": "prod_"}[kind], digits, ""),
            topics=rng.choice(config.num_topics, n, p=lexicon.topic_p),
            languages=rng.choice(len(config.languages), n, p=lexicon.language_p),
            popularity=_zipf_weights(n, config.zipf_exponent, rng),
            num_topics=config.num_topics,
            num_languages=len(config.languages),
            noise_rate=config.noise_rate,
            same_language_rate=config.same_language_rate,
        )

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """``n`` entity indices drawn by popularity (as anchors of pin → product events)."""
        return _draw_by_weight(self.popularity, n, rng)

    def engaged_by(
        self, queries: _QueryLog | _Catalogue, n: int, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        """``n`` (anchor, entity) events: anchors are queries or another catalogue's entities (pins).

        See ``generate_world``: an entity of the anchor's topic and (``same_language_rate``) language, by
        popularity, or with ``noise_rate`` any entity.
        """
        q = queries.sample(n, rng)
        groups = self.topics * self.num_languages + self.languages
        same_language = _GroupSampler(groups, self.popularity, self.num_topics * self.num_languages)
        use_language = rng.random(n) < self.same_language_rate
        in_language = same_language.sample(queries.topics[q] * self.num_languages + queries.languages[q], rng)
        candidate = np.where(use_language, in_language, -1)
        on_topic = _GroupSampler(self.topics, self.popularity, self.num_topics).sample(queries.topics[q], rng)
        candidate = np.where(candidate >= 0, candidate, on_topic)
        noise = (rng.random(n) < self.noise_rate) | (candidate < 0)
        anywhere = _GroupSampler(np.zeros(len(self.topics), int), self.popularity, 1)
        candidate[noise] = anywhere.sample(np.zeros(int(noise.sum()), int), rng)
        return q, candidate


def _entity_block(
    catalogue: _Catalogue,
    rows: slice,
    config: SyntheticWorldConfig,
    lexicon: _Lexicon,
    queries: _QueryLog,
    centroids: dict[str, np.ndarray],
    rng: np.random.Generator,
) -> pa.Table:
    """Features and metadata of the catalogue's entities ``rows``, as one Arrow table."""
    topics, languages, n = catalogue.topics[rows], catalogue.languages[rows], len(catalogue.topics[rows])
    is_pin = catalogue.kind == "pin"
    if is_pin:  # of pins with either: both 45%, title only 40%, description only 15%
        has_any, which = rng.random(n) < config.title_or_description_rate, rng.choice(3, n, p=(0.45, 0.4, 0.15))
        has_title, has_description = has_any & (which != 2), has_any & (which != 1)
    else:
        has_title, has_description = np.ones(n, bool), rng.random(n) < config.product_description_rate
    columns = {
        "id": catalogue.ids[rows],
        "title": lexicon.phrases(rng, topics, languages, "title" if is_pin else "product_title", has_title),
        "description": lexicon.phrases(rng, topics, languages, "description", has_description),
        "caption": lexicon.phrases(rng, topics, np.zeros(n, int), "caption"),
        "board_titles": _board_titles(lexicon, rng, topics, languages, rng.random(n) < config.board_titles_rate),
        "engaged_queries": _engaged_queries(
            queries.engaged_sampler(config.num_topics),
            queries,
            rng,
            topics,
            rng.random(n) < config.engaged_queries_rate,
        ),
    }
    dim = config.embedding_dim

    def embed(name: str, count: int, topic: np.ndarray) -> pa.Array:  # count unit vectors near the centroids
        x = rng.standard_normal((count, dim), dtype=np.float32)
        x *= np.float32(config.embedding_noise / np.sqrt(dim))  # noise of norm ~`embedding_noise`
        x += centroids[name][topic]
        return pa.FixedSizeListArray.from_arrays(pa.array(_unit(x).reshape(-1)), dim)

    if is_pin:
        columns["pinsage_embedding"] = embed("pinsage_embedding", n, topics)
        columns["visual_embedding"] = embed("visual_embedding", n, topics)
    else:
        brand = (topics * 7 + rng.integers(0, 3, n)) % len(BRANDS)  # three brands per topic
        columns["brand"] = pa.array(np.array(BRANDS, object)[brand], pa.string(), mask=rng.random(n) >= 0.85)
        color = rng.integers(0, len(COLORS), n)
        columns["color"] = pa.array(np.array(COLORS, object)[color], pa.string(), mask=rng.random(n) >= 0.7)
        columns["itemsage_embedding"] = embed("itemsage_embedding", n, topics)
        several = rng.random(n) < config.multi_image_rate
        images = np.where(several, rng.integers(min(2, config.max_images), config.max_images + 1, n), 1)
        image_vectors = embed("visual_embedding", int(images.sum()), np.repeat(topics, images))
        columns["visual_embedding"] = pa.ListArray.from_arrays(_offsets(images), image_vectors)
    columns["topic"] = pa.array(topics.astype(np.int32))
    columns["language"] = pa.array(np.array(config.languages, object)[languages], pa.string())
    columns["popularity"] = pa.array(catalogue.popularity[rows])
    return pa.table(columns)


def _board_titles(
    lexicon: _Lexicon, rng: np.random.Generator, topics: np.ndarray, languages: np.ndarray, present: np.ndarray
) -> pa.Array:
    """Up to 10 distinct short titles per entity, null where not ``present``."""
    counts = np.where(present, 1 + rng.binomial(9, 0.35, len(topics)), 0)
    owner = np.repeat(np.arange(len(topics)), counts)
    low, high, share = _TEXT_SPECS["board_title"]
    lengths = rng.integers(low, high + 1, len(owner))
    ids = lexicon.draw(rng, np.repeat(topics[owner], high), np.repeat(languages[owner], high), share)
    ids = ids.reshape(len(owner), high)  # (num_titles, high), -1 past each title's length
    ids[np.arange(high) >= lengths[:, None]] = -1
    keep = _first_unique_rows(np.column_stack([owner, ids]))
    owner, ids, lengths = owner[keep], ids[keep], lengths[keep]
    counts = np.bincount(owner, minlength=len(topics))
    titles = lexicon.join(ids[ids >= 0], lengths, languages[owner])
    return pa.ListArray.from_arrays(_offsets(counts), titles, mask=pa.array(counts == 0))


def _engaged_queries(
    sampler: _GroupSampler, queries: _QueryLog, rng: np.random.Generator, topics: np.ndarray, present: np.ndarray
) -> pa.Array:
    """Up to 20 distinct train queries of the entity's topic, most searched first; null where absent."""
    counts = np.where(present, 1 + rng.binomial(19, 0.3, len(topics)), 0)
    owner = np.repeat(np.arange(len(topics)), counts)
    q = sampler.sample(topics[owner], rng)
    owner, q = owner[q >= 0], q[q >= 0]
    keep = _first_unique_rows(np.column_stack([owner, q]))
    owner, q = owner[keep], q[keep]
    order = np.lexsort((-queries.frequency[q], owner))
    owner, q = owner[order], q[order]
    counts = np.bincount(owner, minlength=len(topics))
    return pa.ListArray.from_arrays(_offsets(counts), queries.texts.take(pa.array(q)), mask=pa.array(counts == 0))


def _pair_splits(
    anchor_names: pa.Array,
    anchor_is_test: np.ndarray,
    q: np.ndarray,
    candidate: np.ndarray,
    engagement: np.ndarray,
    names: list[str],
    candidate_ids: pa.Array | None,
) -> dict[str, SyntheticTable]:
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
        "train": SyntheticTable(table.filter(pa.array(train))),
        "test": SyntheticTable(table.filter(pa.array(test))),
    }


def _records(table: pa.Table) -> list[dict[str, Any]]:
    """Rows of ``table`` as dicts, vectors as float32 arrays viewing one buffer per column."""
    columns = {}
    for name in table.column_names:
        column = table.column(name).combine_chunks()
        if pa.types.is_fixed_size_list(column.type):  # (dim,) per row
            columns[name] = list(column.flatten().to_numpy().reshape(len(column), column.type.list_size))
        elif pa.types.is_list(column.type) and pa.types.is_fixed_size_list(column.type.value_type):  # (k, dim)
            flat = column.flatten().flatten().to_numpy().reshape(-1, column.type.value_type.list_size)
            columns[name] = np.split(flat, np.cumsum(column.value_lengths().to_numpy())[:-1])
        else:
            columns[name] = column.to_pylist()
    return [dict(zip(columns, values)) for values in zip(*columns.values())]


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``python -m omnisearchsage_hf.training.synthetic --out DIR [--num-pins N ...]``.

    Every ``SyntheticWorldConfig`` field is a flag (``--num-pins``, ``--noise-rate``, ``--languages
    en,de,ja``...). Prints the counts as JSON.
    """
    parser = argparse.ArgumentParser(description="Write a synthetic OmniSearchSage world (parquet + world.json).")
    parser.add_argument("--out", required=True, help="Output folder (created if missing).")
    parser.add_argument("--quiet", action="store_true", help="No progress bars.")
    for field in dataclasses.fields(SyntheticWorldConfig):
        flag = "--" + field.name.replace("_", "-")
        if field.name == "languages":
            parser.add_argument(
                flag, default=",".join(field.default), help="comma-separated codes (default %(default)s)"
            )
        else:
            parser.add_argument(flag, type=type(field.default), default=field.default, help="default %(default)s")
    args = vars(parser.parse_args(argv))
    out, quiet = args.pop("out"), args.pop("quiet")
    args["languages"] = tuple(code.strip() for code in args["languages"].split(",") if code.strip())
    world = generate_world(SyntheticWorldConfig(**args), show_progress_bar=not quiet)
    world.save(out, show_progress_bar=not quiet)
    print(json.dumps({"out": str(out), **world.counts()}, sort_keys=True))
    return 0


__all__ = [
    "BLOCK_SIZE",
    "ENTITY_METADATA_COLUMNS",
    "LANGUAGE_SCRIPTS",
    "PIN_ENGAGEMENTS",
    "PRODUCT_ENGAGEMENTS",
    "SPLITS",
    "TASKS",
    "SyntheticTable",
    "SyntheticWorld",
    "SyntheticWorldConfig",
    "entity_features",
    "generate_world",
    "main",
]

if __name__ == "__main__":
    sys.exit(main())
