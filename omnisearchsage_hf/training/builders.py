"""Building what a run trains: tokenizers, the query and entity towers, and which backbone blocks stay frozen.

Each builder takes the ``model`` section of the config and explicit inputs, so tests and benchmarks can
build the same towers the trainer does without running it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, PreTrainedTokenizerFast

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


def entity_config(
    model: ModelConfig, defaults: dict[str, Any] | None = None
) -> OmniSearchSageEntityConfig | ItemSageConfig:
    """The candidate tower's config from ``model.entity``, over ``defaults``."""
    config_class, _ = ENTITY_ARCHITECTURES[model.entity_architecture]
    return config_class(**{**(defaults or {}), **model.entity})


def train_wordpiece_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A BERT-style WordPiece tokenizer learned from ``texts``, for a query tower trained from scratch."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials))
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
    model: ModelConfig, tokenizer_dir: Path
) -> tuple[OmniSearchSageQueryModel, OmniSearchSageEntityModel | ItemSageModel]:
    """The query tower and the entity tower of a run, in training mode, with their tokenizers attached.

    The query tower comes from ``model.backbone`` (pretrained) or ``model.backbone_config`` (from
    scratch, with the WordPiece tokenizer ``build_tokenizers`` wrote); the entity tower is built from
    ``model.entity`` with the vocabulary size of the entity tokenizer. Freezing follows
    ``model.freeze_backbone_embeddings`` and ``model.freeze_backbone_layers``.
    """
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
    "table_texts",
    "train_wordpiece_tokenizer",
    "transformer_blocks",
]
