"""The synthetic world's words: per-topic and generic pseudo-words in every language, and texts made of them."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .config import LANGUAGE_SCRIPTS, TEXT_SPECS, TOPIC_SKEW, Script, SyntheticWorldConfig
from .sampling import offsets, zipf_weights


@dataclass(frozen=True)
class Lexicon:
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
    def build(cls, config: SyntheticWorldConfig, rng: np.random.Generator) -> Lexicon:
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
            topic_p=zipf_weights(config.num_topics, TOPIC_SKEW, rng),
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
        lists = pa.ListArray.from_arrays(offsets(lengths), self.words.take(pa.array(word_ids)), mask=mask)
        return pc.binary_join(lists, self.separators.take(pa.array(languages)))

    def phrases(
        self,
        rng: np.random.Generator,
        topics: np.ndarray,
        languages: np.ndarray,
        kind: str,
        present: np.ndarray | None = None,
    ) -> pa.Array:
        """One text per row, with the length and topic share of ``TEXT_SPECS[kind]``."""
        low, high, share = TEXT_SPECS[kind]
        lengths = rng.integers(low, high + 1, len(topics))
        if present is not None:
            lengths = np.where(present, lengths, 0)
        rows = np.repeat(np.arange(len(topics)), lengths)
        return self.join(self.draw(rng, topics[rows], languages[rows], share), lengths, languages, present)


def _pseudo_words(script: Script, count: int, rng: np.random.Generator, taken: set[str]) -> list[str]:
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


__all__ = ["Lexicon"]
