"""The synthetic world's config, its languages' scripts and the constants that shape its data."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, NamedTuple

TASKS = ("query_pin", "query_product", "query_query")
SPLITS = ("train", "test")
# Columns of the entity tables that say how an entity was generated; the entity tower reads none of them.
ENTITY_METADATA_COLUMNS = ("topic", "language", "popularity")
PIN_ENGAGEMENTS = {"click": 0.45, "save": 0.35, "closeup": 0.2}
PRODUCT_ENGAGEMENTS = {"click": 0.4, "closeup": 0.2, "save": 0.1, "add_to_cart": 0.2, "checkout": 0.1}
BRANDS = ("Acme", "Aurora", "Birchwood", "Cobalt", "Ember", "Fjord", "Harbor", "Juniper", "Lumen", "Maple", "Rowan")
COLORS = ("black", "white", "grey", "red", "blue", "green", "yellow", "orange", "pink", "purple", "brown", "gold")
BLOCK_SIZE = 65_536  # entity rows per random stream (and per parquet row group)

TOPIC_SKEW = 0.5  # Zipf exponent of topic sizes: some topics are bigger than others
QUERY_LENGTH_P = (0.25, 0.35, 0.2, 0.12, 0.08)  # queries of 1..5 words
REFINEMENT_SHARE = 0.2  # intents that extend another intent by one word
RELATED_QUERY_P = (0.3, 0.3, 0.4)  # query→query: translation, refinement, same topic and language
TEXT_SPECS = {  # kind of text: (min words, max words, share of topic words; the rest are generic words)
    "title": (2, 6, 0.8),
    "product_title": (3, 8, 0.8),
    "description": (6, 20, 0.4),
    "caption": (4, 9, 0.6),
    "board_title": (1, 3, 0.7),
}
STREAMS = {"lexicon": 1, "queries": 2, "entities": 3, "pin": 4, "product": 5, "pairs": 6, "pin_product": 7}


class Script(NamedTuple):
    """How a language's pseudo-words look: 1..n syllables of onset + nucleus + coda."""

    onsets: tuple[str, ...]
    nuclei: tuple[str, ...]
    codas: tuple[str, ...]
    syllables: tuple[int, int]
    separator: str  # between words: "" for languages written without spaces


def _script(onsets: str | tuple, nuclei: str | tuple, codas: str, syllables: tuple[int, int], sep: str = " ") -> Script:
    """A ``Script`` from space-separated parts, where ``-`` stands for the empty string."""
    parts = [
        p if isinstance(p, tuple) else tuple(s.replace("-", "") for s in p.split()) for p in (onsets, nuclei, codas)
    ]
    return Script(*parts, syllables, sep)


def _chars(first: int, last: int, step: int = 1) -> tuple[str, ...]:
    return tuple(chr(code) for code in range(first, last + 1, step))


LANGUAGE_SCRIPTS: dict[str, Script] = {
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

            from omnisearchsage_hf.data.synthetic import SyntheticWorldConfig, generate_world

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


__all__ = [
    "BLOCK_SIZE",
    "BRANDS",
    "COLORS",
    "ENTITY_METADATA_COLUMNS",
    "LANGUAGE_SCRIPTS",
    "PIN_ENGAGEMENTS",
    "PRODUCT_ENGAGEMENTS",
    "QUERY_LENGTH_P",
    "REFINEMENT_SHARE",
    "RELATED_QUERY_P",
    "SPLITS",
    "STREAMS",
    "TASKS",
    "TEXT_SPECS",
    "TOPIC_SKEW",
    "Script",
    "SyntheticWorldConfig",
]
