"""``OmniSearchSageTokenizer``: the entity tower's n-gram tokenizer as a transformers tokenizer.

A thin adapter over ``ngrams.py`` (the algorithm): it loads and saves the three vocabularies as plain
text, speaks the ``PreTrainedTokenizer`` protocol (``tokenize``, ``convert_tokens_to_ids``,
``__call__``, ``save_pretrained``, ``AutoTokenizer``), and adds the batch call the entity tower needs:
EmbeddingBag input (flat ids + offsets) per text field.

This file is copied into saved folders for ``trust_remote_code=True`` loading, so it imports only torch,
numpy, transformers and its sibling ``ngrams.py``.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from transformers import PreTrainedTokenizer

from .ngrams import KINDS, NgramVocabulary, prepare, segment, token_keys

VOCAB_FILES_NAMES = {"trigram_file": "trigrams.txt", "unigram_file": "unigrams.txt", "bigram_file": "bigrams.txt"}
# Token strings carry their kind, since "cat" is both a possible trigram and a possible word.
_TAGS = {"trigram": "tri:", "unigram": "uni:", "bigram": "bi:"}
_OOV_TAG = "oov:"

TextValue = str | Sequence[str] | None


class BagEncoding(NamedTuple):
    """EmbeddingBag input for one text field of a batch.

    Attributes:
        input_ids: ``(num_tokens,)`` int64 token ids of all bags, concatenated.
        offsets: ``(batch_size,)`` int64 start of each bag in ``input_ids``; an empty bag (missing or
            blank field) has the same offset as the next one.
    """

    input_ids: torch.Tensor
    offsets: torch.Tensor


def _read_vocabulary_file(path: str | os.PathLike) -> list[str]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"Vocabulary file {str(path)!r} is not UTF-8 text ({error}); it is corrupted.") from None
    tokens = text.split("\n")
    return tokens[:-1] if tokens and tokens[-1] == "" else tokens


def _write_text_atomically(path: Path, text: str) -> None:
    with tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=path.parent, delete=False, suffix=".tmp") as handle:
        handle.write(text)
    os.replace(handle.name, path)


class OmniSearchSageTokenizer(PreTrainedTokenizer):
    """Character-trigram, word-unigram and word-bigram tokenizer for entity text (OmniSearchSage §3.3).

    Text is NFKC-normalised and casefolded; its n-grams are looked up in three frequency-ordered
    vocabularies that share one id space (``ngrams.py`` documents the exact rules). Out-of-vocabulary
    n-grams are dropped, or hashed into ``oov_buckets`` extra ids. Build the vocabularies from a corpus
    with ``omnisearchsage_hf.build_vocab``.

    Token strings are tagged with their kind: ``tri:#ca``, ``uni:café``, ``bi:café#crème``.

    Args:
        trigram_file: Path of ``trigrams.txt`` (one trigram a line, most frequent first).
        unigram_file: Path of ``unigrams.txt`` (one word a line).
        bigram_file: Path of ``bigrams.txt`` (one ``w1#w2`` a line).
        vocabulary: An in-memory ``NgramVocabulary`` instead of the three files.
        oov_buckets: Extra ids for out-of-vocabulary n-grams when loading from files (default 0: drop
            them). With ``vocabulary``, the vocabulary's own setting is used.
        max_chars_per_field: Characters of one field (summed over the items of a list field) that are
            tokenized; the rest is ignored. Bounds the tokens of a field to about 3x this number.

    Example:
        ::

            from omnisearchsage_hf import build_vocab

            tokenizer = build_vocab(["Antique copper sink", "Copper kettle"], show_progress_bar=False)
            tokenizer.tokenize("copper sink")[-3:]
            # ['uni:copper', 'uni:sink', 'bi:copper#sink']
            bags = tokenizer.encode_bags(["copper sink", None, ["kettle", "sink"]])
            bags.offsets
            # tensor([ 0, 14, 14])
    """

    vocab_files_names = VOCAB_FILES_NAMES
    model_input_names = ["input_ids", "offsets"]

    def __init__(
        self,
        trigram_file: str | None = None,
        unigram_file: str | None = None,
        bigram_file: str | None = None,
        *,
        vocabulary: NgramVocabulary | None = None,
        oov_buckets: int = 0,
        max_chars_per_field: int = 1024,
        **kwargs: Any,
    ) -> None:
        if not isinstance(max_chars_per_field, int) or max_chars_per_field < 1:
            raise ValueError(f"`max_chars_per_field` must be a positive int, got {max_chars_per_field!r}.")
        if vocabulary is None:
            files = {"trigram_file": trigram_file, "unigram_file": unigram_file, "bigram_file": bigram_file}
            missing = [name for name, path in files.items() if path is None or not os.path.isfile(path)]
            if missing:
                raise ValueError(
                    f"OmniSearchSageTokenizer needs its vocabulary files; missing: {missing}. Load a saved folder "
                    "with `from_pretrained`, or build vocabularies from text with `omnisearchsage_hf.build_vocab`."
                )
            lists = {}
            for kind, path in zip(KINDS, files.values(), strict=True):
                try:
                    lists[kind] = _read_vocabulary_file(path)
                    token_keys(kind, lists[kind])
                except ValueError as error:
                    raise ValueError(f"Vocabulary file {str(path)!r}: {error}") from None
            vocabulary = NgramVocabulary(lists["trigram"], lists["unigram"], lists["bigram"], oov_buckets)
        self.vocabulary = vocabulary
        self.max_chars_per_field = max_chars_per_field
        super().__init__(oov_buckets=vocabulary.oov_buckets, max_chars_per_field=max_chars_per_field, **kwargs)

    @property
    def vocab_size(self) -> int:
        return self.vocabulary.size

    def _update_total_vocab_size(self) -> None:
        # The base class counts `get_vocab()`, which would build a dict of ~1.3M strings at every load.
        self.total_vocab_size = self.vocab_size + len(self._added_tokens_decoder)

    def get_vocab(self) -> dict[str, int]:
        vocab = {
            _TAGS[kind] + token: self.vocabulary.offsets[kind] + i
            for kind in KINDS
            for i, token in enumerate(self.vocabulary.tokens[kind])
        }
        vocab.update({f"{_OOV_TAG}{b}": self.vocabulary.oov_offset + b for b in range(self.vocabulary.oov_buckets)})
        vocab.update(self._added_tokens_encoder)
        return vocab

    def _tokenize(self, text: str, **kwargs: Any) -> list[str]:
        tokens = segment(prepare(text, self.max_chars_per_field))
        tagged = []
        for kind, strings in zip(KINDS, tokens, strict=True):
            ids = self.vocabulary.ids(kind, token_keys(kind, strings))
            tagged += [_TAGS[kind] + s for s, i in zip(strings, ids.tolist(), strict=True) if i >= 0]
        return tagged

    def _convert_token_to_id(self, token: str) -> int:
        for kind, tag in _TAGS.items():
            if token.startswith(tag):
                token_id = int(self.vocabulary.ids(kind, token_keys(kind, [token[len(tag) :]]))[0])
                if token_id < 0:
                    raise ValueError(f"Token {token!r} is not in the vocabulary and there are no OOV buckets.")
                return token_id
        if token.startswith(_OOV_TAG) and token[len(_OOV_TAG) :].isdigit():
            return self.vocabulary.oov_offset + int(token[len(_OOV_TAG) :])
        raise ValueError(f"Token {token!r} has no kind tag; tokens look like 'tri:abc', 'uni:word' or 'bi:w1#w2'.")

    def _convert_id_to_token(self, index: int) -> str:
        kind, token = self.vocabulary.id_to_token(index)
        return (_OOV_TAG if kind == "oov" else _TAGS[kind]) + token

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        """The words of ``tokens``, space-separated (trigrams and bigrams only repeat them)."""
        return " ".join(t[len(_TAGS["unigram"]) :] for t in tokens if t.startswith(_TAGS["unigram"]))

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str, ...]:
        """Write the three vocabularies as UTF-8 text, one token a line, atomically; return their paths."""
        directory = Path(save_directory)
        if not directory.is_dir():
            raise ValueError(f"`save_directory` {save_directory!r} is not a directory.")
        paths = []
        for kind, name in zip(KINDS, VOCAB_FILES_NAMES.values(), strict=True):
            path = directory / ((filename_prefix + "-" if filename_prefix else "") + name)
            _write_text_atomically(path, "".join(token + "\n" for token in self.vocabulary.tokens[kind]))
            paths.append(str(path))
        return tuple(paths)

    @staticmethod
    def check_field(value: Any, field: str, index: int) -> None:
        """Raise unless ``value`` is a string, a list or tuple of strings, or None."""
        if value is None or isinstance(value, str):
            return
        if not isinstance(value, (list, tuple)):
            raise TypeError(
                f"Field {field!r} of item {index} must be a string, a list of strings or None, "
                f"got {type(value).__name__}."
            )
        for position, text in enumerate(value):
            if not isinstance(text, str):
                raise TypeError(
                    f"Field {field!r} of item {index} holds a {type(text).__name__} at position {position}; "
                    "list fields must hold strings only."
                )

    def prepare_field(self, value: TextValue, field: str, index: int) -> list[str]:
        """Prepared items of one field value, within the field's character budget."""
        if isinstance(value, str):  # the common case first: this runs once per field of every entity
            return [prepare(value, self.max_chars_per_field)]
        self.check_field(value, field, index)
        if value is None:
            return []
        items, budget = [], self.max_chars_per_field
        for text in value:
            if budget <= 0:
                break
            items.append(prepare(text, budget))
            budget -= len(items[-1])
        return items

    def encode_bags(self, texts: Sequence[TextValue], *, field: str = "text") -> BagEncoding:
        """EmbeddingBag input for a batch of one text field.

        Args:
            texts: One value per sample: a string, a list of strings (its n-grams share the bag but never
                span two strings), or None (an empty bag).
            field: The field's name, used in error messages.

        Returns:
            A ``BagEncoding`` with ``len(texts)`` bags.
        """
        if not isinstance(texts, (list, tuple)):
            raise TypeError(f"`texts` for field {field!r} must be a list, got {type(texts).__name__}.")
        samples = [self.prepare_field(value, field, i) for i, value in enumerate(texts)]
        input_ids, offsets = self.vocabulary.encode(samples)
        return BagEncoding(torch.from_numpy(input_ids), torch.from_numpy(offsets))

    def encode_fields(self, entities: Sequence[Mapping[str, Any]], fields: Sequence[str]) -> dict[str, BagEncoding]:
        """EmbeddingBag input per text field for a batch of entity dicts (a missing key is an empty bag)."""
        return {field: self.encode_bags([entity.get(field) for entity in entities], field=field) for field in fields}


__all__ = ["BagEncoding", "OmniSearchSageTokenizer"]
