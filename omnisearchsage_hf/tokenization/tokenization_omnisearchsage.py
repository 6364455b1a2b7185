"""``OmniSearchSageTokenizer``: the entity tower's n-gram tokenizer as a transformers tokenizer.

A thin adapter over ``ngrams.py`` (the algorithm): it loads and saves the three vocabularies as plain
text, speaks the ``PreTrainedTokenizer`` protocol (``tokenize``, ``convert_tokens_to_ids``,
``__call__``, ``save_pretrained``, ``AutoTokenizer``), and adds the batch call the entity tower needs:
EmbeddingBag input (flat ids + offsets) per text field.

This file is copied into saved folders for ``trust_remote_code=True`` loading, so it imports only torch,
numpy, transformers and its sibling ``ngrams.py``.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from transformers import PreTrainedTokenizer
from transformers.utils import logging

from .ngrams import KINDS, NgramVocabulary, prepare, segment, token_keys

VOCAB_FILES_NAMES = {"trigram_file": "trigrams.txt", "unigram_file": "unigrams.txt", "bigram_file": "bigrams.txt"}
# Token strings carry their kind, since "cat" is both a possible trigram and a possible word.
_TAGS = {"trigram": "tri:", "unigram": "uni:", "bigram": "bi:"}
_OOV_TAG = "oov:"

TextValue = str | Sequence[str] | None

logger = logging.get_logger(__name__)


class BagEncoding(NamedTuple):
    """EmbeddingBag input for one text field of a batch.

    Attributes:
        input_ids: ``(num_tokens,)`` int64 token ids of all bags, concatenated.
        offsets: ``(batch_size,)`` int64 start of each bag in ``input_ids``; an empty bag (missing or
            blank field) has the same offset as the next one.
    """

    input_ids: torch.Tensor
    offsets: torch.Tensor


def _checksum(data: bytes) -> dict[str, Any]:
    """What ``tokenizer_config.json`` records of a vocabulary file: its line count and sha256."""
    return {"num_tokens": data.count(b"\n"), "sha256": hashlib.sha256(data).hexdigest()}


def _read_vocabulary_file(path: str | os.PathLike, expected: dict[str, Any] | None) -> tuple[list[str], bytes]:
    """The tokens of a vocabulary file and its bytes, checked against the checksum recorded at save time."""
    data = Path(path).read_bytes()
    if expected is not None and _checksum(data) != expected:
        found = _checksum(data)
        raise ValueError(
            f"Vocabulary file {str(path)!r} has {found['num_tokens']} tokens (sha256 {found['sha256'][:16]}…) but "
            f"tokenizer_config.json recorded {expected['num_tokens']} tokens (sha256 {expected['sha256'][:16]}…) "
            "when the tokenizer was saved: the file was shortened, reordered or edited since, and every id after "
            "the change would point at the wrong embedding. Re-download (or copy again) the whole folder, or "
            "rebuild the vocabulary with `build_vocab` and save it again."
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"Vocabulary file {str(path)!r} is not UTF-8 text ({error}); it is corrupted.") from None
    tokens = text.split("\n")
    return (tokens[:-1] if tokens and tokens[-1] == "" else tokens), data


def _check_checksums(checksums: Any) -> None:
    """Raise unless ``vocabulary_checksums`` (from ``tokenizer_config.json``) has the shape it was saved with."""
    valid = isinstance(checksums, dict) and all(
        isinstance(checksums.get(kind), dict)
        and isinstance(checksums[kind].get("num_tokens"), int)
        and isinstance(checksums[kind].get("sha256"), str)
        for kind in KINDS
    )
    if not valid:
        raise ValueError(
            f"Field 'vocabulary_checksums' of tokenizer_config.json is malformed ({checksums!r}); it maps each of "
            f"{KINDS} to {{'num_tokens': int, 'sha256': str}}. Re-download (or copy again) the whole folder."
        )


def _vocabulary_from_files(
    files: dict[str, str | None], oov_buckets: int, expected: dict[str, Any] | None, source: str
) -> tuple[NgramVocabulary, dict[str, dict[str, Any]]]:
    """The vocabulary in the three files, checked against ``expected`` checksums, and its own checksums.

    ``source`` is where ``oov_buckets`` and ``expected`` came from (a folder's tokenizer_config.json), or
    "" for files given by hand, which have no recorded checksums to warn about.
    """
    missing = [VOCAB_FILES_NAMES[key] for key, path in files.items() if path is None or not os.path.isfile(path)]
    if missing:
        raise ValueError(
            f"OmniSearchSageTokenizer needs its vocabulary files; missing: {missing}. Load a saved folder with "
            "`from_pretrained` (re-download it if a file is gone), or build vocabularies from text with "
            "`omnisearchsage_hf.build_vocab`."
        )
    if expected is not None:
        _check_checksums(expected)
    elif source:
        logger.warning_once(
            f"No `vocabulary_checksums`{source} (saved before they were added): the vocabulary files cannot be "
            "verified. Save the tokenizer again to add them."
        )
    lists, file_bytes, keys = {}, {}, {}
    for kind, path in zip(KINDS, files.values(), strict=True):
        lists[kind], file_bytes[kind] = _read_vocabulary_file(path, expected[kind] if expected else None)
        try:
            keys[kind] = token_keys(kind, lists[kind])
        except ValueError as error:
            raise ValueError(f"Vocabulary file {str(path)!r}: {error}") from None
    try:
        vocabulary = NgramVocabulary(lists["trigram"], lists["unigram"], lists["bigram"], oov_buckets, keys=keys)
    except ValueError as error:  # `oov_buckets` comes from tokenizer_config.json, the tokens from the files
        raise ValueError(f"{error}{source}") from None
    # A file that ends in a newline is byte for byte what `save_vocabulary` writes of its tokens.
    checksums = {
        kind: _checksum(data if data.endswith(b"\n") or not data else vocabulary.file_bytes(kind))
        for kind, data in file_bytes.items()
    }
    return vocabulary, checksums


def _write_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file renamed into place.

    The temporary file is created by ``open``, so it gets the mode the umask gives any new file (0o644
    by default), not the 0o600 of ``tempfile``, which would survive the rename and hide the vocabulary
    from a service running as another user. (``omnisearchsage_hf/atomic.py`` is the package's version;
    this folder imports nothing from the package.)
    """
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


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
        vocabulary_checksums: ``{kind: {"num_tokens", "sha256"}}`` of the three files, as
            ``save_pretrained`` records them in ``tokenizer_config.json``; when loading from files they must
            match, so a vocabulary file one line short, two lines swapped or emptied is an error naming
            the file instead of a silent shift of every id after the change. A folder saved without them
            loads with a warning. Never needed by hand: the tokenizer computes its own for saving.

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
        vocabulary_checksums: dict[str, dict[str, Any]] | None = None,
        **kwargs: Any,
    ) -> None:
        # Loaded by `from_pretrained`: these arguments come from the folder's tokenizer_config.json.
        source = ""
        if kwargs.get("name_or_path"):
            source = f" (in tokenizer_config.json of {kwargs['name_or_path']}: fix it there or re-download the folder)"
        if not isinstance(max_chars_per_field, int) or max_chars_per_field < 1:
            raise ValueError(f"`max_chars_per_field`{source} must be a positive int, got {max_chars_per_field!r}.")
        if vocabulary is None:
            files = {"trigram_file": trigram_file, "unigram_file": unigram_file, "bigram_file": bigram_file}
            vocabulary, checksums = _vocabulary_from_files(files, oov_buckets, vocabulary_checksums, source)
        else:
            checksums = {kind: _checksum(vocabulary.file_bytes(kind)) for kind in KINDS}
        self.vocabulary = vocabulary
        self.max_chars_per_field = max_chars_per_field
        super().__init__(
            oov_buckets=vocabulary.oov_buckets,
            max_chars_per_field=max_chars_per_field,
            vocabulary_checksums=checksums,
            **kwargs,
        )

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
        """Write the three vocabularies as UTF-8 text, one token a line, atomically; return their paths.

        Their checksums are already in ``tokenizer_config.json`` (``vocabulary_checksums``, computed from
        the same bytes when the tokenizer was built), which ``from_pretrained`` checks them against.
        """
        directory = Path(save_directory)
        if not directory.is_dir():
            raise ValueError(f"`save_directory` {save_directory!r} is not a directory.")
        paths = []
        for kind, name in zip(KINDS, VOCAB_FILES_NAMES.values(), strict=True):
            path = directory / ((filename_prefix + "-" if filename_prefix else "") + name)
            _write_atomically(path, self.vocabulary.file_bytes(kind))
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
