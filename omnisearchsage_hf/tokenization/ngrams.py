"""The entity tower's text tokenization: character trigrams, word unigrams and word bigrams.

OmniSearchSage embeds entity text (titles, board titles, engaged queries…) with a bag of hashed
n-grams instead of a transformer, so that a billion entities can be embedded cheaply. This module holds
the algorithm as plain functions and classes; ``tokenization_omnisearchsage.py`` adapts it to the
transformers tokenizer protocol.

Text is prepared once per item: UTF-16 surrogates joined or replaced by U+FFFD (they are not
characters and cannot be saved as UTF-8), Unicode NFKC, casefold, every whitespace run replaced by
``#`` and a ``#`` added at both ends (``"Red  Dress"`` → ``"#red#dress#"``). From that string:

- **trigrams** are all 3-character windows (``#re``, ``red``, ``ed#``, ``d#d``, …);
- **unigrams** are the words: maximal runs of characters that are neither whitespace, Unicode
  punctuation nor control characters, except that every CJK ideograph is a word on its own (Chinese
  has no spaces);
- **bigrams** join consecutive words of the same item with ``#`` (``red#dress``).

Everything after ``prepare`` runs vectorised with numpy over the codepoints of a whole batch: words are
found with a codepoint class table and identified by a 64-bit polynomial hash, and all three kinds are
looked up in open-addressing hash tables. That keeps tokenization cheaper than the model itself.

This file is copied next to the tokenizer when it is saved, so it imports only the standard library
and numpy.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np

BOUNDARY = "#"
# Joins the items of a batch; no n-gram crosses it.
_ITEM_SEPARATOR = "\x00"
# Unified and compatibility ideographs (BMP and supplementary planes), the ranges BERT also splits.
_CJK_RANGES = ((0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xF900, 0xFAFF), (0x20000, 0x2FA1F), (0x30000, 0x323AF))
_BOUNDARY_CLASS, _WORD_CLASS, _CJK_CLASS = 0, 1, 2
_WORD_HASH_BASE = np.uint64(0x100000001B3)
_LENGTH_MIX = np.uint64(0x9E3779B97F4A7C15)
_BIGRAM_MIX = np.uint64(0xD6E8FEB86659FD93)
_KIND_SALTS = {
    "trigram": np.uint64(0xA0761D6478BD642F),
    "unigram": np.uint64(0xE7037ED1A0B428DB),
    "bigram": np.uint64(0x8EBC6AF09C88C6E3),
}
KINDS = ("trigram", "unigram", "bigram")
_SURROGATE = re.compile("[\ud800-\udfff]")


def replace_surrogates(text: str) -> str:
    """``text`` with surrogate pairs joined and lone surrogates replaced by U+FFFD; one regex scan if none.

    (``modeling/encoding.py`` holds the same function for the query tower: each folder is self-contained.)
    """
    if _SURROGATE.search(text) is None:
        return text
    return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")


def prepare(text: str, max_chars: int) -> str:
    """Normalise ``text`` into the ``#``-delimited form all n-grams are read from.

    Args:
        text: Any string; surrogates (``"\\ud83d"`` from JSON, an emoji cut in half) are replaced, so
            every n-gram can be written to a UTF-8 vocabulary file.
        max_chars: Characters kept before and after normalisation, which bounds the cost of a
            10,000-character title (NFKC can expand a character, e.g. ``"ﬃ"`` → ``"ffi"``).

    Returns:
        ``"#w1#w2#…#"``, or ``""`` when the text has no non-whitespace character.
    """
    text = unicodedata.normalize("NFKC", replace_surrogates(text[:max_chars])).casefold()[:max_chars]
    words = text.replace(_ITEM_SEPARATOR, " ").split()
    if not words:
        return ""
    return BOUNDARY + BOUNDARY.join(words) + BOUNDARY


@functools.cache
def _char_classes() -> np.ndarray:
    """Class of every codepoint: boundary (whitespace, punctuation, control), word, or CJK ideograph."""
    classes = np.full(0x110000, _WORD_CLASS, dtype=np.uint8)
    # Every whitespace, punctuation and control codepoint lies below U+20000; scanning that far takes ~15 ms.
    for cp in range(0x20000):
        category = unicodedata.category(chr(cp))
        if category[0] == "P" or category == "Cc" or chr(cp).isspace():
            classes[cp] = _BOUNDARY_CLASS
    for lo, hi in _CJK_RANGES:
        classes[lo : hi + 1] = _CJK_CLASS
    return classes


@functools.cache
def _powers(n: int) -> np.ndarray:
    """``_WORD_HASH_BASE ** k`` mod 2**64 for k in [0, n)."""
    with np.errstate(over="ignore"):
        return np.concatenate([[np.uint64(1)], np.cumprod(np.full(n - 1, _WORD_HASH_BASE, dtype=np.uint64))])


def _mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser: a bijective, well-spread 64-bit hash (stable everywhere, unlike ``hash()``)."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def _codepoints(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32).astype(np.uint64)


def span_keys(codepoints: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """64-bit keys of the strings ``codepoints[starts[i]:ends[i]]`` (non-empty, non-overlapping, in order)."""
    if len(starts) == 0:
        return np.zeros(0, dtype=np.uint64)
    lengths = ends - starts
    first = np.cumsum(lengths) - lengths  # where each span begins among the concatenated span characters
    span_of_char = np.repeat(np.arange(len(starts)), lengths)  # (total_len,)
    positions = np.arange(len(span_of_char)) - first[span_of_char]  # (total_len,): offset within the span
    chars = codepoints[starts[span_of_char] + positions]
    with np.errstate(over="ignore"):
        terms = (chars + np.uint64(1)) * _powers(int(lengths.max()) + 1)[positions]  # (total_len,)
        sums = np.add.reduceat(terms, first)  # (num_spans,), wraps mod 2**64
        return _mix64(sums + lengths.astype(np.uint64) * _LENGTH_MIX)


def _bigram_keys(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        return _mix64(left * _BIGRAM_MIX + right)


class BatchSegments(NamedTuple):
    """The n-grams of a batch of prepared items, as arrays over the items joined by ``\\x00``.

    Attributes:
        joined: The items joined by ``\\x00``; positions below index into it.
        trigram_starts: Start of every trigram window; ``trigram_item`` is the item it belongs to.
        word_starts, word_ends: Span of every word; ``word_item`` is the item it belongs to.
        bigram_left: For every bigram, the index of its first word (the second is the next word).
        trigram_keys, unigram_keys, bigram_keys: 64-bit keys, the same as the vocabulary's.
    """

    joined: str
    trigram_starts: np.ndarray
    trigram_item: np.ndarray
    trigram_keys: np.ndarray
    word_starts: np.ndarray
    word_ends: np.ndarray
    word_item: np.ndarray
    unigram_keys: np.ndarray
    bigram_left: np.ndarray
    bigram_keys: np.ndarray


def segment_batch(items: Sequence[str]) -> BatchSegments:
    """Find every trigram, word and bigram of prepared ``items`` at once (see the module docstring)."""
    joined = _ITEM_SEPARATOR.join(items)
    cps = _codepoints(joined)  # (n,)
    n = len(cps)
    item_of_char = np.cumsum(cps == 0)  # (n,): separators belong to the item they start

    if n >= 3:
        valid = (cps[:-2] != 0) & (cps[1:-1] != 0) & (cps[2:] != 0)  # (n - 2,)
        trigram_starts = np.flatnonzero(valid)
        trigram_keys = _mix64(
            (cps[trigram_starts] << np.uint64(42))
            | (cps[trigram_starts + 1] << np.uint64(21))
            | cps[trigram_starts + 2]
        )
    else:
        trigram_starts, trigram_keys = np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.uint64)

    classes = _char_classes()[cps.astype(np.int64)]  # (n,)
    is_word, is_cjk = classes != _BOUNDARY_CLASS, classes == _CJK_CLASS
    joins_previous = np.zeros(n, dtype=bool)  # character continues the word before it
    joins_previous[1:] = is_word[1:] & is_word[:-1] & ~is_cjk[1:] & ~is_cjk[:-1]
    word_starts = np.flatnonzero(is_word & ~joins_previous)
    joins_next = np.zeros(n, dtype=bool)
    joins_next[:-1] = joins_previous[1:]
    word_ends = np.flatnonzero(is_word & ~joins_next) + 1
    word_item = item_of_char[word_starts]
    unigram_keys = span_keys(cps, word_starts, word_ends)

    bigram_left = np.flatnonzero(word_item[:-1] == word_item[1:])
    bigram_keys = _bigram_keys(unigram_keys[bigram_left], unigram_keys[bigram_left + 1])
    return BatchSegments(
        joined,
        trigram_starts,
        item_of_char[trigram_starts],
        trigram_keys,
        word_starts,
        word_ends,
        word_item,
        unigram_keys,
        bigram_left,
        bigram_keys,
    )


class NgramTokens(NamedTuple):
    """The n-grams of one prepared text, in order of occurrence (duplicates kept)."""

    trigrams: list[str]
    unigrams: list[str]
    bigrams: list[str]


def segment(prepared: str) -> NgramTokens:
    """All n-grams of one prepared text, as strings (the readable view of ``segment_batch``)."""
    seg = segment_batch([prepared])
    words = [prepared[s:e] for s, e in zip(seg.word_starts.tolist(), seg.word_ends.tolist(), strict=True)]
    return NgramTokens(
        trigrams=[prepared[i : i + 3] for i in seg.trigram_starts.tolist()],
        unigrams=words,
        bigrams=[words[i] + BOUNDARY + words[i + 1] for i in seg.bigram_left.tolist()],
    )


def token_keys(kind: str, tokens: Sequence[str]) -> np.ndarray:
    """The 64-bit keys ``segment_batch`` gives these vocabulary entries of ``kind``."""
    if kind == "trigram":
        bad = next((t for t in tokens if len(t) != 3), None)
        if bad is not None:
            raise ValueError(f"Every trigram must have exactly 3 characters, got {bad!r}.")
        cps = _codepoints("".join(tokens)).reshape(-1, 3)
        return _mix64((cps[:, 0] << np.uint64(42)) | (cps[:, 1] << np.uint64(21)) | cps[:, 2])
    if kind == "unigram":
        lengths = np.fromiter(map(len, tokens), dtype=np.int64, count=len(tokens))
        if len(tokens) and lengths.min() == 0:
            raise ValueError("A unigram vocabulary entry is empty; every entry must be a word.")
        ends = np.cumsum(lengths)
        return span_keys(_codepoints("".join(tokens)), ends - lengths, ends)
    if kind == "bigram":
        # Vectorised over the joined tokens (a paper-sized vocabulary has 1M bigrams): each must hold exactly one
        # boundary, with a word on either side of it.
        lengths = np.fromiter(map(len, tokens), dtype=np.int64, count=len(tokens))
        ends = np.cumsum(lengths)
        starts = ends - lengths
        codepoints = _codepoints("".join(tokens))
        marks = np.flatnonzero(codepoints == ord(BOUNDARY))  # (num_marks,) positions in the joined text
        token_of_mark = np.searchsorted(ends, marks, side="right")  # (num_marks,) which token holds each mark
        middle = np.full(len(tokens), -1, dtype=np.int64)
        middle[token_of_mark] = marks  # the boundary of each token that has one (tokens with more are refused)
        count = np.bincount(token_of_mark, minlength=len(tokens))
        bad = (count != 1) | (middle == starts) | (middle == ends - 1)
        if bad.any():
            first_bad = tokens[int(bad.argmax())]
            raise ValueError(f"Every bigram must be two words joined by {BOUNDARY!r}, got {first_bad!r}.")
        return _bigram_keys(span_keys(codepoints, starts, middle), span_keys(codepoints, middle + 1, ends))
    raise ValueError(f"Unknown n-gram kind {kind!r}; expected one of {KINDS}.")


class KeyTable:
    """An open-addressing hash table from 64-bit keys to ids, probed vectorised (load factor <= 0.5).

    Keys are already well mixed (``_mix64``), so their low bits index the table directly.
    """

    def __init__(self, keys: np.ndarray, ids: np.ndarray):
        size = 1 << max(4, (2 * len(keys)).bit_length())
        self._mask = np.uint64(size - 1)
        self._keys = np.zeros(size, dtype=np.uint64)
        self._ids = np.full(size, -1, dtype=np.int64)
        pending = np.arange(len(keys))
        slots = (keys & self._mask).astype(np.int64)
        while len(pending):
            free = self._ids[slots] < 0
            taken_slots, first = np.unique(slots[free], return_index=True)
            winners = pending[free][first]
            self._keys[taken_slots], self._ids[taken_slots] = keys[winners], ids[winners]
            placed = np.zeros(len(keys), dtype=bool)
            placed[winners] = True
            keep = ~placed[pending]
            pending, slots = pending[keep], (slots[keep] + 1) & int(self._mask)

    def lookup(self, keys: np.ndarray) -> np.ndarray:
        """Id of every key; -1 for keys not in the table."""
        found = np.full(len(keys), -1, dtype=np.int64)
        active = np.arange(len(keys))
        slots = (keys & self._mask).astype(np.int64)
        while len(active):
            ids, stored = self._ids[slots], self._keys[slots]
            hit = (ids >= 0) & (stored == keys[active])
            found[active[hit]] = ids[hit]
            go_on = (ids >= 0) & ~hit
            active, slots = active[go_on], (slots[go_on] + 1) & int(self._mask)
        return found


class NgramVocabulary:
    """Three frequency-ordered vocabularies in one id space, plus optional out-of-vocabulary buckets.

    Ids are laid out as ``[trigrams | unigrams | bigrams | oov buckets]``. An n-gram that is in none of
    the vocabularies is dropped, or, when ``oov_buckets > 0``, hashed (stably, across processes and
    machines) into one of the buckets, so that rare words still reach the model.

    Args:
        trigrams: Trigram strings, most frequent first; the position is the id.
        unigrams: Words, most frequent first.
        bigrams: ``"w1#w2"`` strings, most frequent first.
        oov_buckets: Number of extra ids for out-of-vocabulary n-grams (0 drops them).
        keys: ``{kind: token_keys(kind, tokens)}`` when the caller has computed them already (loading does, to
            name the file of a malformed token); None (default) computes them here.
    """

    def __init__(
        self,
        trigrams: Sequence[str],
        unigrams: Sequence[str],
        bigrams: Sequence[str],
        oov_buckets: int = 0,
        *,
        keys: Mapping[str, np.ndarray] | None = None,
    ):
        if not isinstance(oov_buckets, int) or oov_buckets < 0:
            raise ValueError(f"`oov_buckets` must be an int >= 0, got {oov_buckets!r}.")
        self.tokens = {"trigram": list(trigrams), "unigram": list(unigrams), "bigram": list(bigrams)}
        self.oov_buckets = oov_buckets
        self.offsets: dict[str, int] = {}
        self._tables: dict[str, KeyTable] = {}
        offset = 0
        for kind in KINDS:
            self.file_bytes(kind)  # raises now, not halfway through a save, if a token cannot be written
            kind_keys = token_keys(kind, self.tokens[kind]) if keys is None else keys[kind]
            if len(np.unique(kind_keys)) != len(kind_keys):
                raise ValueError(f"The {kind} vocabulary lists a token twice; each token must appear once.")
            self.offsets[kind] = offset
            self._tables[kind] = KeyTable(kind_keys, np.arange(offset, offset + len(kind_keys)))
            offset += len(kind_keys)
        self.oov_offset = offset

    def file_bytes(self, kind: str) -> bytes:
        """The ``kind`` vocabulary as saved: UTF-8, one token a line, each line ending in ``\\n``."""
        tokens = self.tokens[kind]
        try:
            return ("\n".join(tokens) + "\n").encode("utf-8") if tokens else b""
        except UnicodeEncodeError:
            bad = next(t for t in tokens if _SURROGATE.search(t))
            raise ValueError(
                f"The {kind} vocabulary holds {bad!r}, which has a UTF-16 surrogate and cannot be saved as UTF-8; "
                "build vocabularies with `build_vocab`, which replaces surrogates."
            ) from None

    @property
    def size(self) -> int:
        """Total number of ids, buckets included."""
        return self.oov_offset + self.oov_buckets

    def ids(self, kind: str, keys: np.ndarray) -> np.ndarray:
        """Ids of n-gram keys of ``kind``: a bucket id or -1 (dropped) where out of vocabulary."""
        ids = self._tables[kind].lookup(keys)
        if self.oov_buckets:
            oov = ids < 0
            bucket = _mix64(keys[oov] ^ _KIND_SALTS[kind]) % np.uint64(self.oov_buckets)
            ids[oov] = self.oov_offset + bucket.astype(np.int64)
        return ids

    def id_to_token(self, token_id: int) -> tuple[str, str]:
        """``(kind, token)`` of an id; OOV buckets come back as ``("oov", "<bucket>")``."""
        if not 0 <= token_id < self.size:
            raise ValueError(f"Token id {token_id} is outside the vocabulary [0, {self.size}).")
        for kind in reversed(KINDS):
            if token_id >= self.offsets[kind] and token_id < self.oov_offset:
                return kind, self.tokens[kind][token_id - self.offsets[kind]]
        return "oov", str(token_id - self.oov_offset)

    def encode(self, samples: Sequence[Sequence[str]]) -> tuple[np.ndarray, np.ndarray]:
        """EmbeddingBag input for a batch: one bag per sample, over all n-grams of all its items.

        Args:
            samples: Per sample, its prepared items (see ``prepare``); a list-valued field such as
                board titles gives several items, whose n-grams share the bag but never cross items.

        Returns:
            ``(input_ids, offsets)``: int64 arrays of shapes ``(num_tokens,)`` and ``(len(samples),)``;
            bag ``i`` is ``input_ids[offsets[i]:offsets[i + 1]]`` (its trigrams, then its unigrams, then
            its bigrams).
        """
        items = [item for sample in samples for item in sample if item]
        item_owner = np.repeat(np.arange(len(samples)), [sum(1 for item in s if item) for s in samples])
        seg = segment_batch(items)
        ids = np.concatenate(
            [
                self.ids("trigram", seg.trigram_keys),
                self.ids("unigram", seg.unigram_keys),
                self.ids("bigram", seg.bigram_keys),
            ]
        )
        owner = item_owner[np.concatenate([seg.trigram_item, seg.word_item, seg.word_item[seg.bigram_left]])]
        kept = ids >= 0
        ids, owner = ids[kept], owner[kept]
        # Each kind is already in sample order, so a stable sort groups the bags and keeps that order.
        order = np.argsort(owner, kind="stable")
        offsets = np.zeros(len(samples), dtype=np.int64)
        np.cumsum(np.bincount(owner, minlength=len(samples))[:-1], out=offsets[1:])
        return ids[order], offsets
