"""The synthetic query log: search intents rendered in one or more languages, with a frequency and a split."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .config import QUERY_LENGTH_P, REFINEMENT_SHARE, RELATED_QUERY_P, SyntheticWorldConfig
from .lexicon import Lexicon
from .sampling import GroupSampler, draw_by_weight, first_unique_rows, zipf_weights


def _intents(
    config: SyntheticWorldConfig, lexicon: Lexicon, count: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``count`` search intents: topic, local word ids ``(count, 5)``, length 1..5, and parent (or -1).

    A share of intents refines another intent: the same words plus one.
    """
    words = config.words_per_topic
    topics = rng.choice(config.num_topics, count, p=lexicon.topic_p)
    first = np.minimum(np.searchsorted(lexicon.word_cdf, rng.random(count)), words - 1)
    steps = rng.integers(1, words // 5 + 1, (count, 4))  # steps sum to < words: a query's words are distinct
    local = (first[:, None] + np.concatenate([np.zeros((count, 1), int), steps.cumsum(1)], axis=1)) % words
    lengths = rng.choice(5, count, p=QUERY_LENGTH_P) + 1
    base = np.flatnonzero(rng.random(count) >= REFINEMENT_SHARE)
    refined = np.setdiff1d(np.arange(count), base)
    parent = base[rng.integers(0, len(base), len(refined))] if len(base) else np.zeros(0, int)
    refined, parent = refined[lengths[parent] < 5], parent[lengths[parent] < 5]
    topics[refined], local[refined], lengths[refined] = topics[parent], local[parent], lengths[parent] + 1
    parents = np.full(count, -1)
    parents[refined] = parent
    return topics, local, lengths, parents


@dataclass
class QueryLog:
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
    def build(cls, config: SyntheticWorldConfig, lexicon: Lexicon, rng: np.random.Generator) -> QueryLog:
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
            keep = first_unique_rows(pc.dictionary_encode(texts).indices.to_numpy()[:, None])[: config.num_queries]
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
        weights = zipf_weights(len(keep), config.zipf_exponent, rng)
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
        return draw_by_weight(self.frequency, n, rng)

    def engaged_sampler(self, num_topics: int) -> GroupSampler:
        """Train queries by topic and frequency: held-out queries never become entity features."""
        train = np.flatnonzero(~self.is_test)
        return GroupSampler(self.topics[train], self.frequency[train], num_topics, members=train)

    def related(self, n: int, noise_rate: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """``n`` (query, related query) events, self pairs dropped (see ``generate_world``)."""
        q, num_languages = self.sample(n, rng), len(self.codes)
        mode = rng.choice(3, n, p=RELATED_QUERY_P)
        candidate = np.where(mode == 0, self._translations()[q], np.where(mode == 1, self._refinements()[q], -1))
        groups = self.topics * num_languages + self.languages
        nearby = GroupSampler(groups, self.frequency, int(groups.max()) + 1).sample(groups[q], rng)
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


__all__ = ["QueryLog"]
