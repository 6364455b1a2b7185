"""Board titles: per entity, the (at most) 10 best titles of the boards it was saved to (paper §3.2.2).

Every save of an entity to a board is one record ``(entity_id, board_title)``. Titles are first collapsed
into near-duplicates: two titles are the same title when they have the same words, where words are read
the way the entity tokenizer reads them (Unicode NFKC, casefold, split on whitespace and punctuation,
every CJK ideograph a word of its own), so ``"Kitchen Ideas!"`` and ``"kitchen   ideas"`` are one title.
A collapsed title is written in the spelling it first appears with in the saves; titles without any
word (``"!!!"``, ``""``) are dropped.

Scoring (the paper names the two factors, frequency and word prevalence, but not the formula; this is
ours). Over all ``N`` kept saves, the prevalence of word ``w`` is ``df(w)``, the number of saves whose
title contains ``w``. For entity ``e`` and title ``t`` saved ``c(e, t)`` times::

    specificity(t) = mean over the distinct words w of t of ln(N / df(w))
    score(e, t)    = -ln(1 + c(e, t)) * specificity(t)

Lower is better: a title saved often, made of words that are not everywhere, comes first; a generic
title (``"ideas"``, ``"my pins"``: words in many saves, specificity near 0) comes last however often it
is used, and ``ln(1 + c)`` keeps a title seen once with rare words (often a typo or a name) from
outranking a title the entity is saved under a hundred times. Titles are ranked by score ascending,
then word count descending, then character length descending (of the normalised title, words joined by
one space), then spelling in codepoint order, and the first ``max_titles`` (paper: 10) are kept.

The work is vectorised: strings become 64-bit keys chunk by chunk (``keys.py``), only distinct titles go
through Python (to be normalised), and grouping is numpy sorting. Memory: 12 bytes per save plus the
distinct entity ids and titles.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from ..data.keys import StringCatalogue, encode_strings, group_starts, lexical_ranks, list_array, rank_within_groups
from ..data.tables import DEFAULT_BATCH_SIZE, ID_COLUMN, TableSource, iter_batches
from ..tokenization.ngrams import prepare, segment_batch, span_keys
from .columns import drop_null_rows

SAVE_COLUMNS = ("entity_id", "board_title")
MAX_TITLE_CHARS = 256  # characters of a title that are read: longer ones are descriptions, not titles
_SEGMENT_SLICE = 65_536  # titles segmented per numpy pass


def board_titles(
    saves: TableSource,
    *,
    max_titles: int = 10,
    batch_size: int = DEFAULT_BATCH_SIZE,
    show_progress_bar: bool = False,
) -> pa.Table:
    """Rank the board titles of every saved entity and keep the best ``max_titles``.

    See the module docstring for the exact near-duplicate rule and scoring formula.

    Args:
        saves: Save records with string columns ``entity_id`` and ``board_title`` (one row per save; rows
            with a null in either are skipped): a parquet file or folder, a ``pa.Table`` or record batches.
        max_titles: Titles kept per entity (default 10, the paper's; >= 1).
        batch_size: Rows read at a time.
        show_progress_bar: Show a tqdm bar over the saves.

    Returns:
        A table with ``id`` (entity id) and ``board_titles`` (``list<string>``, best first), one row per
        entity with at least one kept title, in no particular order.

    Example:
        ::

            saves = pa.table({"entity_id": ["p1", "p1", "p1", "p2"],
                              "board_title": ["Kitchen Ideas", "kitchen ideas!", "Ideas", "Garden"]})
            board_titles(saves).to_pylist()
            # [{'id': 'p1', 'board_titles': ['Kitchen Ideas', 'Ideas']}, {'id': 'p2', 'board_titles': ['Garden']}]
    """
    if not isinstance(max_titles, int) or max_titles < 1:
        raise ValueError(f"`max_titles` must be a positive int, got {max_titles!r}.")
    entities, raw_titles = StringCatalogue(), StringCatalogue()
    entity_parts, title_parts = [], []
    for batch in iter_batches(
        saves, SAVE_COLUMNS, batch_size=batch_size, show_progress_bar=show_progress_bar, desc="Board titles"
    ):
        batch = drop_null_rows(batch, SAVE_COLUMNS)
        entity_parts.append(encode_strings(batch.column("entity_id"), entities))
        title_parts.append(encode_strings(batch.column("board_title"), raw_titles))
    empty = pa.table({ID_COLUMN: pa.array([], pa.string()), "board_titles": pa.array([], pa.list_(pa.string()))})
    if not entity_parts or not len(raw_titles):
        return empty

    titles = _NormalisedTitles(raw_titles.strings())
    raw_row = raw_titles.lookup(np.concatenate(title_parts))  # (num_saves,)
    entity_row = entities.lookup(np.concatenate(entity_parts))  # (num_saves,)
    kept = titles.title_of_raw[raw_row] >= 0
    if not kept.any():
        return empty
    title, entity_row = titles.title_of_raw[raw_row[kept]], entity_row[kept]  # (num_kept,) each
    num_saves, num_titles = len(title), titles.count

    pair_codes, counts = np.unique(entity_row * num_titles + title, return_counts=True)  # (num_pairs,)
    pair_entity, pair_title = pair_codes // num_titles, pair_codes % num_titles
    saves_per_title = np.bincount(title, minlength=num_titles)  # (num_titles,)
    specificity = titles.specificity(saves_per_title, num_saves)  # (num_titles,)
    score = -np.log1p(counts) * specificity[pair_title]  # (num_pairs,)

    spelling_rank = lexical_ranks(titles.spellings)
    order = np.lexsort(
        (
            spelling_rank[pair_title],
            -titles.num_chars[pair_title],
            -titles.num_words[pair_title],
            score,
            pair_entity,
        )
    )
    order = order[rank_within_groups(pair_entity[order]) < max_titles]
    entity_sorted = pair_entity[order]
    starts = group_starts(entity_sorted)
    offsets = np.append(starts, len(order))
    values = titles.spellings.take(pa.array(pair_title[order]))
    return pa.table(
        {
            ID_COLUMN: entities.strings().take(pa.array(entity_sorted[starts])),
            "board_titles": list_array(offsets, values),
        }
    )


class _NormalisedTitles:
    """The collapsed titles behind a list of distinct raw titles, with their words.

    Attributes:
        title_of_raw: ``(num_raw,)`` collapsed-title index of each raw title, -1 for one without words.
        count: Number of collapsed titles.
        spellings: The first raw spelling of each collapsed title.
        num_words, num_chars: Word count and normalised character length of each collapsed title.
        word_title, word_key: The distinct words of every collapsed title, as parallel arrays.
    """

    def __init__(self, raw: pa.Array):
        word_keys, word_raw, word_length = [], [], []
        texts = raw.to_pylist()
        for start in range(0, len(texts), _SEGMENT_SLICE):
            prepared = [prepare(text, MAX_TITLE_CHARS) for text in texts[start : start + _SEGMENT_SLICE]]
            segments = segment_batch(prepared)
            word_keys.append(segments.unigram_keys)
            word_raw.append(segments.word_item + start)
            word_length.append(segments.word_ends - segments.word_starts)
        word_keys, word_raw = np.concatenate(word_keys), np.concatenate(word_raw)  # (num_words,) each
        word_length = np.concatenate(word_length)

        num_raw = len(texts)
        num_words = np.bincount(word_raw, minlength=num_raw)  # (num_raw,)
        first_word = np.cumsum(num_words) - num_words
        has_words = np.flatnonzero(num_words > 0)
        # A title's key hashes its word-key sequence, with the same polynomial hash as a word's characters.
        raw_key = span_keys(word_keys, first_word[has_words], first_word[has_words] + num_words[has_words])
        title_keys, title_of_kept = np.unique(raw_key, return_inverse=True)
        self.count = len(title_keys)
        self.title_of_raw = np.full(num_raw, -1, dtype=np.int64)
        self.title_of_raw[has_words] = title_of_kept
        _, first_raw = np.unique(title_of_kept, return_index=True)  # raw titles are in first-seen order
        representative = has_words[first_raw]  # (count,): raw row of each title's spelling
        self.spellings = raw.take(pa.array(representative))
        self.num_words = num_words[representative]
        chars_per_raw = np.bincount(word_raw, weights=word_length, minlength=num_raw).astype(np.int64)
        self.num_chars = chars_per_raw[representative] + self.num_words - 1

        is_representative = np.zeros(num_raw, dtype=bool)
        is_representative[representative] = True
        mine = is_representative[word_raw]
        pair_title, pair_word = self.title_of_raw[word_raw[mine]], word_keys[mine]
        order = np.lexsort((pair_word, pair_title))
        pair_title, pair_word = pair_title[order], pair_word[order]
        distinct = np.ones(len(order), dtype=bool)
        distinct[1:] = (pair_title[1:] != pair_title[:-1]) | (pair_word[1:] != pair_word[:-1])
        self.word_title, self.word_key = pair_title[distinct], pair_word[distinct]

    def specificity(self, saves_per_title: np.ndarray, num_saves: int) -> np.ndarray:
        """``(count,)`` mean of ``ln(num_saves / df(w))`` over each title's distinct words."""
        _, word = np.unique(self.word_key, return_inverse=True)
        document_frequency = np.bincount(word, weights=saves_per_title[self.word_title])  # (num_distinct_words,)
        idf = np.log(num_saves / document_frequency[word])  # (num_title_words,)
        return np.bincount(self.word_title, weights=idf, minlength=self.count) / np.bincount(
            self.word_title, minlength=self.count
        )


__all__ = ["MAX_TITLE_CHARS", "SAVE_COLUMNS", "board_titles"]
