"""The synthetic catalogue: pins and products by topic, language and popularity, and their features."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .config import BRANDS, COLORS, TEXT_SPECS, SyntheticWorldConfig
from .lexicon import Lexicon
from .queries import QueryLog
from .sampling import GroupSampler, draw_by_weight, first_unique_rows, offsets, unit, zipf_weights


@dataclass
class Catalogue:
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
    def build(cls, kind: str, n: int, config: SyntheticWorldConfig, lexicon: Lexicon, rng: np.random.Generator):
        digits = pc.utf8_lpad(pa.array(np.arange(n)).cast(pa.string()), width=max(6, len(str(n - 1))), padding="0")
        return cls(
            kind=kind,
            ids=pc.binary_join_element_wise({"pin": "pin_", "product": "prod_"}[kind], digits, ""),
            topics=rng.choice(config.num_topics, n, p=lexicon.topic_p),
            languages=rng.choice(len(config.languages), n, p=lexicon.language_p),
            popularity=zipf_weights(n, config.zipf_exponent, rng),
            num_topics=config.num_topics,
            num_languages=len(config.languages),
            noise_rate=config.noise_rate,
            same_language_rate=config.same_language_rate,
        )

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """``n`` entity indices drawn by popularity (as anchors of pin → product events)."""
        return draw_by_weight(self.popularity, n, rng)

    def engaged_by(
        self, queries: QueryLog | Catalogue, n: int, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        """``n`` (anchor, entity) events: anchors are queries or another catalogue's entities (pins).

        See ``generate_world``: an entity of the anchor's topic and (``same_language_rate``) language, by
        popularity, or with ``noise_rate`` any entity.
        """
        q = queries.sample(n, rng)
        groups = self.topics * self.num_languages + self.languages
        same_language = GroupSampler(groups, self.popularity, self.num_topics * self.num_languages)
        use_language = rng.random(n) < self.same_language_rate
        in_language = same_language.sample(queries.topics[q] * self.num_languages + queries.languages[q], rng)
        candidate = np.where(use_language, in_language, -1)
        on_topic = GroupSampler(self.topics, self.popularity, self.num_topics).sample(queries.topics[q], rng)
        candidate = np.where(candidate >= 0, candidate, on_topic)
        noise = (rng.random(n) < self.noise_rate) | (candidate < 0)
        anywhere = GroupSampler(np.zeros(len(self.topics), int), self.popularity, 1)
        candidate[noise] = anywhere.sample(np.zeros(int(noise.sum()), int), rng)
        return q, candidate


def entity_block(
    catalogue: Catalogue,
    rows: slice,
    config: SyntheticWorldConfig,
    lexicon: Lexicon,
    queries: QueryLog,
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
        return pa.FixedSizeListArray.from_arrays(pa.array(unit(x).reshape(-1)), dim)

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
        columns["visual_embedding"] = pa.ListArray.from_arrays(offsets(images), image_vectors)
    columns["topic"] = pa.array(topics.astype(np.int32))
    columns["language"] = pa.array(np.array(config.languages, object)[languages], pa.string())
    columns["popularity"] = pa.array(catalogue.popularity[rows])
    return pa.table(columns)


def _board_titles(
    lexicon: Lexicon, rng: np.random.Generator, topics: np.ndarray, languages: np.ndarray, present: np.ndarray
) -> pa.Array:
    """Up to 10 distinct short titles per entity, null where not ``present``."""
    counts = np.where(present, 1 + rng.binomial(9, 0.35, len(topics)), 0)
    owner = np.repeat(np.arange(len(topics)), counts)
    low, high, share = TEXT_SPECS["board_title"]
    lengths = rng.integers(low, high + 1, len(owner))
    ids = lexicon.draw(rng, np.repeat(topics[owner], high), np.repeat(languages[owner], high), share)
    ids = ids.reshape(len(owner), high)  # (num_titles, high), -1 past each title's length
    ids[np.arange(high) >= lengths[:, None]] = -1
    keep = first_unique_rows(np.column_stack([owner, ids]))
    owner, ids, lengths = owner[keep], ids[keep], lengths[keep]
    counts = np.bincount(owner, minlength=len(topics))
    titles = lexicon.join(ids[ids >= 0], lengths, languages[owner])
    return pa.ListArray.from_arrays(offsets(counts), titles, mask=pa.array(counts == 0))


def _engaged_queries(
    sampler: GroupSampler, queries: QueryLog, rng: np.random.Generator, topics: np.ndarray, present: np.ndarray
) -> pa.Array:
    """Up to 20 distinct train queries of the entity's topic, most searched first; null where absent."""
    counts = np.where(present, 1 + rng.binomial(19, 0.3, len(topics)), 0)
    owner = np.repeat(np.arange(len(topics)), counts)
    q = sampler.sample(topics[owner], rng)
    owner, q = owner[q >= 0], q[q >= 0]
    keep = first_unique_rows(np.column_stack([owner, q]))
    owner, q = owner[keep], q[keep]
    order = np.lexsort((-queries.frequency[q], owner))
    owner, q = owner[order], q[order]
    counts = np.bincount(owner, minlength=len(topics))
    return pa.ListArray.from_arrays(offsets(counts), queries.texts.take(pa.array(q)), mask=pa.array(counts == 0))


__all__ = ["Catalogue", "entity_block"]
