"""Building the entity tokenizer's three vocabularies from a corpus, by frequency.

Pinterest's reference code ships no vocabularies; here they are counted from any iterable of entity
texts (the trainer passes the training entities' text fields). Counting runs on the same vectorised
segmentation the tokenizer uses, so building a vocabulary over millions of titles takes minutes, not
hours, and memory stays bounded: when a count table grows past ``prune_factor`` times its target size,
only its most frequent entries are kept (approximate counts for the long tail, exact for the head).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from itertools import islice

import numpy as np
from tqdm.auto import tqdm

from .ngrams import KINDS, NgramVocabulary, segment_batch
from .tokenization_omnisearchsage import OmniSearchSageTokenizer, TextValue


class _Counts:
    """Counts of one n-gram kind keyed by 64-bit key, remembering each key's string."""

    def __init__(self, capacity: int, prune_factor: int):
        self.capacity, self.prune_factor = capacity, prune_factor
        self.counts: dict[int, int] = {}
        self.strings: dict[int, str] = {}

    def add(self, keys: np.ndarray, string_at) -> None:
        unique, first, counts = np.unique(keys, return_index=True, return_counts=True)
        for key, index, count in zip(unique.tolist(), first.tolist(), counts.tolist(), strict=True):
            if key in self.counts:
                self.counts[key] += count
            else:
                self.counts[key] = count
                self.strings[key] = string_at(index)
        if len(self.counts) > self.prune_factor * max(self.capacity, 1):
            self._keep(self.capacity * (self.prune_factor // 2 or 1))

    def _keep(self, n: int) -> None:
        kept = sorted(self.counts, key=self.counts.__getitem__, reverse=True)[:n]
        self.counts = {k: self.counts[k] for k in kept}
        self.strings = {k: self.strings[k] for k in kept}

    def most_common(self, min_count: int) -> list[str]:
        """At most ``capacity`` strings with count >= ``min_count``, by count then string (deterministic)."""
        ranked = sorted((-c, self.strings[k]) for k, c in self.counts.items() if c >= min_count)
        return [s for _, s in ranked[: self.capacity]]


def _batches(texts: Iterable[TextValue], size: int) -> Iterator[list[TextValue]]:
    iterator = iter(texts)
    while batch := list(islice(iterator, size)):
        yield batch


def build_vocab(
    texts: Iterable[TextValue],
    *,
    trigram_size: int = 64_000,
    unigram_size: int = 200_000,
    bigram_size: int = 1_000_000,
    min_count: int = 1,
    oov_buckets: int = 0,
    max_chars_per_field: int = 1024,
    batch_size: int = 10_000,
    prune_factor: int = 8,
    show_progress_bar: bool = True,
) -> OmniSearchSageTokenizer:
    """Count n-grams over ``texts`` and return a tokenizer with the most frequent of each kind.

    Args:
        texts: Any iterable (a list, a generator, a ``datasets`` column) of strings, lists of strings
            (e.g. one entity's board titles) or None. Read once.
        trigram_size: Maximum character trigrams kept (default 64k, the paper's).
        unigram_size: Maximum words kept (default 200k).
        bigram_size: Maximum word bigrams kept (default 1M).
        min_count: Drop n-grams seen fewer times than this (default 1 keeps everything that fits).
        oov_buckets: Extra ids into which out-of-vocabulary n-grams are hashed (default 0 drops them).
        max_chars_per_field: Passed to the tokenizer; also bounds what is counted per text.
        batch_size: Texts segmented per vectorised call.
        prune_factor: A count table larger than this many times its target size is cut back to the
            most frequent entries, which bounds memory on corpora of any size.
        show_progress_bar: Show a tqdm bar over the texts.

    Returns:
        An ``OmniSearchSageTokenizer`` whose ids are ordered by frequency within each vocabulary.
    """
    limits = {
        "trigram_size": (trigram_size, 0),
        "unigram_size": (unigram_size, 0),
        "bigram_size": (bigram_size, 0),
        "min_count": (min_count, 1),
        "batch_size": (batch_size, 1),
        "prune_factor": (prune_factor, 1),
    }
    for name, (value, lowest) in limits.items():
        if not isinstance(value, int) or value < lowest:
            raise ValueError(f"`{name}` must be an int >= {lowest}, got {value!r}.")
    # An empty vocabulary still needs a tokenizer to prepare text the way it will be encoded.
    preparer = OmniSearchSageTokenizer(vocabulary=NgramVocabulary([], [], []), max_chars_per_field=max_chars_per_field)
    counts = {
        kind: _Counts(size, prune_factor)
        for kind, size in zip(KINDS, (trigram_size, unigram_size, bigram_size), strict=True)
    }
    progress = tqdm(desc="Counting n-grams", unit=" texts", disable=not show_progress_bar)
    for batch in _batches(texts, batch_size):
        items = [item for i, value in enumerate(batch) for item in preparer.prepare_field(value, "texts", i) if item]
        seg = segment_batch(items)

        def word(j: int, seg=seg) -> str:
            return seg.joined[seg.word_starts[j] : seg.word_ends[j]]

        def trigram(i: int, seg=seg) -> str:
            return seg.joined[seg.trigram_starts[i] : seg.trigram_starts[i] + 3]

        counts["trigram"].add(seg.trigram_keys, trigram)
        counts["unigram"].add(seg.unigram_keys, word)
        counts["bigram"].add(
            seg.bigram_keys, lambda i, seg=seg: f"{word(seg.bigram_left[i])}#{word(seg.bigram_left[i] + 1)}"
        )
        progress.update(len(batch))
    progress.close()
    vocabulary = NgramVocabulary(*(counts[kind].most_common(min_count) for kind in KINDS), oov_buckets=oov_buckets)
    return OmniSearchSageTokenizer(vocabulary=vocabulary, max_chars_per_field=max_chars_per_field)
