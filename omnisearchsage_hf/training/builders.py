"""Building what a run trains: tokenizers, the query and entity towers, and which backbone blocks stay frozen.

Each builder takes the ``model`` section of the config and explicit inputs, so tests and benchmarks can
build the same towers the trainer does without running it.
"""

from __future__ import annotations

import heapq
import itertools
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, PreTrainedTokenizerFast, set_seed

from ..data.encoders import resolve_model
from ..data.tables import EntityTable
from ..modeling import (
    ItemSageConfig,
    ItemSageModel,
    OmniSearchSageEntityConfig,
    OmniSearchSageEntityModel,
    OmniSearchSageQueryConfig,
    OmniSearchSageQueryModel,
)
from ..tokenization import OmniSearchSageTokenizer, build_vocab
from .config import ModelConfig

# `model.entity_architecture` → the config and model of the candidate tower of `entity:` tasks.
ENTITY_ARCHITECTURES = {
    "omnisearchsage": (OmniSearchSageEntityConfig, OmniSearchSageEntityModel),
    "itemsage": (ItemSageConfig, ItemSageModel),
}
ENTITY_TOKENIZER = "entity"
QUERY_TOKENIZER = "query"
WORDPIECE_SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def entity_config(
    model: ModelConfig, defaults: dict[str, Any] | None = None
) -> OmniSearchSageEntityConfig | ItemSageConfig:
    """The candidate tower's config from ``model.entity``, over ``defaults``."""
    config_class, _ = ENTITY_ARCHITECTURES[model.entity_architecture]
    return config_class(**{**(defaults or {}), **model.entity})


def train_wordpiece_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A BERT-style WordPiece tokenizer learned from ``texts``, for a query tower trained from scratch.

    The same texts always give the same vocabulary, in the same order, in any process. (The ``tokenizers``
    trainer does not: it numbers its ``##`` tokens in hash-map order and breaks ties between equally
    frequent merges by those numbers, huggingface/tokenizers#1794, so two runs learned different
    vocabularies.) Words come from the BERT normalizer and pre-tokenizer; the vocabulary from
    :func:`learn_wordpiece_vocab`.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    normalizer, pre_tokenizer = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    word_counts = Counter(
        word for text in texts for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text))
    )
    vocab = learn_wordpiece_vocab(word_counts, vocab_size, special_tokens=WORDPIECE_SPECIAL_TOKENS)
    tokenizer = Tokenizer(models.WordPiece({token: i for i, token in enumerate(vocab)}, unk_token="[UNK]"))
    tokenizer.normalizer, tokenizer.pre_tokenizer = normalizer, pre_tokenizer
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )


def learn_wordpiece_vocab(
    word_counts: Mapping[str, int], vocab_size: int, *, special_tokens: Sequence[str] = (), prefix: str = "##"
) -> list[str]:
    """A WordPiece vocabulary learned by byte-pair merges over ``word_counts``, with deterministic ties.

    As in BERT's and the ``tokenizers`` trainer: every word starts as its characters, all but the first
    marked as continuations (``"cat"`` → ``c ##a ##t``); the most frequent adjacent pair is merged into a
    new token (``##a ##t`` → ``##at``), over and over, until the vocabulary holds ``vocab_size`` tokens
    or no pair is left. Ties between equally frequent pairs go to the lexicographically smallest pair,
    so the result depends on the counts only, never on hash or iteration order.

    Args:
        word_counts: ``{word: count}`` of pre-tokenized words.
        vocab_size: Target size, special tokens and the alphabet included (they are kept even past it).
        special_tokens: Tokens placed first, in this order.
        prefix: Marks a piece that continues a word.

    Returns:
        The tokens in id order: ``special_tokens``, the characters by code point, the continuation
        characters by code point, then the merged tokens in the order they were learned.
    """
    words = sorted(word_counts)  # a fixed order, so the pair -> word index below is reproducible
    counts = [word_counts[word] for word in words]
    pieces = [[word[0], *(prefix + char for char in word[1:])] for word in words if word]
    counts = [count for word, count in zip(words, counts, strict=True) if word]
    alphabet = sorted({piece for word in pieces for piece in word}, key=lambda p: (p.startswith(prefix), p))
    vocab = [*special_tokens, *(piece for piece in alphabet if piece not in special_tokens)]
    known = set(vocab)
    pair_counts: Counter[tuple[str, str]] = Counter()
    pair_words: dict[tuple[str, str], set[int]] = defaultdict(set)
    for index, (word, count) in enumerate(zip(pieces, counts, strict=True)):
        for pair in itertools.pairwise(word):
            pair_counts[pair] += count
            pair_words[pair].add(index)
    # Max-heap on count, min on the pair; entries go stale when a count changes and are skipped then.
    heap = [(-count, pair) for pair, count in pair_counts.items()]
    heapq.heapify(heap)
    while len(vocab) < vocab_size and heap:
        negative_count, pair = heapq.heappop(heap)
        if pair_counts[pair] != -negative_count or negative_count == 0:
            continue
        merged = pair[0] + pair[1].removeprefix(prefix)
        if merged not in known:  # two pairs can spell the same token: it keeps its first id
            vocab.append(merged)
            known.add(merged)
        changed: set[tuple[str, str]] = set()
        for index in sorted(pair_words.pop(pair)):
            word, count = pieces[index], counts[index]
            for old in itertools.pairwise(word):
                pair_counts[old] -= count
                changed.add(old)
            pieces[index] = word = _merge_pair(word, pair, merged)
            for new in itertools.pairwise(word):
                pair_counts[new] += count
                pair_words[new].add(index)
                changed.add(new)
        for key in sorted(changed - {pair}):
            heapq.heappush(heap, (-pair_counts[key], key))
        del pair_counts[pair]
    return vocab


def _merge_pair(word: list[str], pair: tuple[str, str], merged: str) -> list[str]:
    """``word`` with every non-overlapping occurrence of ``pair``, left to right, replaced by ``merged``."""
    out, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            out.append(merged)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return out


def table_texts(tables: Iterable[EntityTable], fields: Iterable[str]) -> Iterator[Any]:
    """Every value of the text ``fields`` of ``tables`` (strings, or lists of them), chunk by chunk."""
    fields = list(fields)
    for table in tables:
        for name in fields:
            if name in table.table.column_names:
                for chunk in table.table.column(name).chunks:
                    yield from chunk.to_pylist()


def build_tokenizers(
    model: ModelConfig, tokenizer_dir: Path, *, entity_texts: Iterable[Any], query_texts: Iterable[str]
) -> None:
    """Write the run's tokenizers under ``tokenizer_dir`` unless they are already there (a resumed run).

    The entity tokenizer is ``model.tokenizer`` when given, else built by ``build_vocab`` from
    ``entity_texts``; a query tower trained from scratch (``model.backbone`` None) gets a WordPiece
    tokenizer learned from ``query_texts``. Run it on one process, then load with ``build_towers``.
    """
    if not (tokenizer_dir / ENTITY_TOKENIZER).is_dir():
        if model.tokenizer is not None:
            tokenizer = OmniSearchSageTokenizer.from_pretrained(resolve_model(model.tokenizer))
        else:
            tokenizer = build_vocab(entity_texts, **{"show_progress_bar": True, **model.vocab})
        tokenizer.save_pretrained(tokenizer_dir / ENTITY_TOKENIZER)
    if model.backbone is None and not (tokenizer_dir / QUERY_TOKENIZER).is_dir():
        tokenizer = train_wordpiece_tokenizer(list(query_texts), model.query_tokenizer_vocab_size)
        tokenizer.save_pretrained(tokenizer_dir / QUERY_TOKENIZER)


def build_towers(
    model: ModelConfig, tokenizer_dir: Path, *, seed: int | None = None
) -> tuple[OmniSearchSageQueryModel, OmniSearchSageEntityModel | ItemSageModel]:
    """The query tower and the entity tower of a run, in training mode, with their tokenizers attached.

    The query tower comes from ``model.backbone`` (pretrained) or ``model.backbone_config`` (from
    scratch, with the WordPiece tokenizer ``build_tokenizers`` wrote); the entity tower is built from
    ``model.entity`` with the vocabulary size of the entity tokenizer. Freezing follows
    ``model.freeze_backbone_embeddings`` and ``model.freeze_backbone_layers``.

    With ``seed``, the random generators (Python, numpy, torch, every CUDA device) are seeded with it
    first, so the initial weights depend on the seed alone, not on what drew random numbers before
    (loading a zero-shot encoder to fill a cold passage cache does, a warm cache does not). With None
    the generators are used as they are.
    """
    if seed is not None:
        set_seed(seed)
    entity_tokenizer = OmniSearchSageTokenizer.from_pretrained(tokenizer_dir / ENTITY_TOKENIZER)
    _, entity_class = ENTITY_ARCHITECTURES[model.entity_architecture]
    entity_tower = entity_class(entity_config(model, {"vocab_size": entity_tokenizer.vocab_size}))
    entity_tower.tokenizer = entity_tokenizer
    if model.backbone is not None:
        query_tower = OmniSearchSageQueryModel.from_backbone(resolve_model(model.backbone), **model.query)
    else:
        query_tokenizer = PreTrainedTokenizerFast.from_pretrained(tokenizer_dir / QUERY_TOKENIZER)
        backbone = AutoConfig.for_model(**{**model.backbone_config, "vocab_size": len(query_tokenizer)})
        query_tower = OmniSearchSageQueryModel(OmniSearchSageQueryConfig(backbone_config=backbone, **model.query))
        query_tower.tokenizer = query_tokenizer
    freeze_backbone(query_tower, embeddings=model.freeze_backbone_embeddings, layers=model.freeze_backbone_layers)
    return query_tower.train(), entity_tower.train()


def freeze_backbone(query_tower: OmniSearchSageQueryModel, *, embeddings: bool, layers: int) -> None:
    """Keep the backbone's token embeddings (``embeddings``) and its lowest ``layers`` blocks fixed."""
    if embeddings:
        query_tower.backbone.get_input_embeddings().weight.requires_grad_(False)
    if layers:
        blocks = transformer_blocks(query_tower.backbone)
        if layers > len(blocks):
            raise ValueError(f"`model.freeze_backbone_layers` is {layers} but the backbone has {len(blocks)} blocks.")
        for block in blocks[:layers]:
            block.requires_grad_(False)


def transformer_blocks(backbone: torch.nn.Module) -> torch.nn.ModuleList:
    """The backbone's stack of transformer blocks: its longest ``ModuleList`` (``encoder.layer`` in BERT)."""
    lists = [module for module in backbone.modules() if isinstance(module, torch.nn.ModuleList)]
    if not lists:
        raise ValueError(f"Found no stack of transformer blocks in {type(backbone).__name__}.")
    return max(lists, key=len)


__all__ = [
    "ENTITY_ARCHITECTURES",
    "build_tokenizers",
    "build_towers",
    "entity_config",
    "freeze_backbone",
    "learn_wordpiece_vocab",
    "table_texts",
    "train_wordpiece_tokenizer",
    "transformer_blocks",
]
