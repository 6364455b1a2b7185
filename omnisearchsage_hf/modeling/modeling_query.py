"""The OmniSearchSage query tower: a Hugging Face text encoder, pooled, projected and L2-normalised.

This file is copied into saved folders so that ``AutoModel.from_pretrained(folder, trust_remote_code=True)``
works without this package: it imports only torch, numpy, transformers and its sibling files.

A saved folder is also a sentence-transformers model (``SentenceTransformer(folder)``, no custom code):
see ``write_sentence_transformers_files``.
"""

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers import initialization as init
from transformers.utils import ModelOutput, logging

from .attached_tokenizer import AttachedTokenizerMixin
from .configuration_query import OmniSearchSageQueryConfig, PoolingMode
from .encoding import check_queries, encode_in_batches, evaluating, tokenize_queries
from .saved_folder import REFETCH
from .sentence_transformers_folder import write_sentence_transformers_files

logger = logging.get_logger(__name__)

# Tokenizer outputs that `forward` takes; `token_type_ids` only when the tokenizer emits them.
_MODEL_INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")


def _drop_pooler(backbone: PreTrainedModel) -> PreTrainedModel:
    """Remove a BERT-style pooler head, as ``add_pooling_layer=False`` would.

    The tower pools token states itself, so the pooler would get no gradient (which multi-process DDP
    training rejects) and would only add dead weights to every checkpoint.
    """
    if getattr(backbone, "pooler", None) is not None:
        backbone.pooler = None
    return backbone


@dataclass
class OmniSearchSageQueryOutput(ModelOutput):
    """Output of :class:`OmniSearchSageQueryModel`.

    Args:
        embeddings: ``(batch_size, out_dim)`` unit-norm query embeddings.
        last_hidden_state: ``(batch_size, seq_len, hidden_size)`` token states of the backbone, before pooling.
    """

    embeddings: torch.FloatTensor | None = None
    last_hidden_state: torch.FloatTensor | None = None


def pool(last_hidden_state: torch.Tensor, attention_mask: torch.Tensor, mode: PoolingMode) -> torch.Tensor:
    """Pool token states ``(bs, seq_len, hidden)`` into one vector per sequence ``(bs, hidden)``.

    ``"cls"`` takes the first token (right-padded batches, as BERT-family tokenizers produce);
    ``"mean"`` averages the tokens where ``attention_mask`` is 1.
    """
    if mode == "cls":
        return last_hidden_state[:, 0]  # (bs, hidden)
    if mode == "mean":
        mask = attention_mask.unsqueeze(-1).to(last_hidden_state.dtype)  # (bs, seq_len, 1)
        summed = (last_hidden_state * mask).sum(dim=1)  # (bs, hidden)
        counts = mask.sum(dim=1).clamp(min=1.0)  # (bs, 1); an all-padding row pools to zeros, not NaN
        return summed / counts  # (bs, hidden)
    raise ValueError(f"`pooling` must be 'cls' or 'mean', got {mode!r}.")


class OmniSearchSageQueryPreTrainedModel(PreTrainedModel):
    """Base class wiring the query tower into ``PreTrainedModel`` (config class, weight init, loading)."""

    config: OmniSearchSageQueryConfig
    base_model_prefix = "query_tower"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    # Attention lives in the backbone, which checks its own support; the tower itself adds none.
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module):
        """Initialise the projection; backbone modules are dispatched to the backbone's own `_init_weights`."""
        if isinstance(module, nn.Linear):
            if self.config.projection_init == "identity":
                init.eye_(module.weight)  # (out_dim, hidden): keeps the first out_dim pooled dimensions
            else:
                init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
            if module.bias is not None:
                init.zeros_(module.bias)


class OmniSearchSageQueryModel(AttachedTokenizerMixin, OmniSearchSageQueryPreTrainedModel):
    """The OmniSearchSage query tower: one unit vector per search query.

    A pretrained text encoder (the backbone) reads the query; its first token state (``pooling="cls"``,
    the paper's choice) or its mean token state (``pooling="mean"``) goes through a linear projection to
    ``out_dim`` and is L2-normalised, so that a dot product with an entity embedding is a cosine
    similarity. The tower carries the backbone's tokenizer as the plain attribute ``tokenizer``
    (``None`` for a tower built from a config alone); ``save_pretrained`` writes it into the model
    folder and ``from_pretrained`` reads it back, so ``encode`` works on raw strings after a reload.

    Args:
        config: The tower's configuration; ``config.backbone_config`` decides the encoder architecture.

    Inputs:

        +-------------------+-----------------------+-------------------------------------------------+
        | Argument          | Shape                 | Meaning                                         |
        +===================+=======================+=================================================+
        | ``input_ids``     | ``(bs, seq_len)``     | token ids from ``model.tokenizer``              |
        | ``attention_mask``| ``(bs, seq_len)``     | 1 for real tokens, 0 for padding (default: 1s)  |
        | ``token_type_ids``| ``(bs, seq_len)``     | optional, passed on only if given               |
        +-------------------+-----------------------+-------------------------------------------------+

    Relations:
        ``OmniSearchSageEntityModel`` embeds pins and products into the same space. The query tower
        needs no custom code at inference beyond this file: ``AutoModel.from_pretrained(folder)``
        returns it after ``import omnisearchsage_hf``, or with ``trust_remote_code=True`` without it.

    References:
        - OmniSearchSage: Multi-Task Multi-Entity Embeddings for Pinterest Search (WWW'24 Companion):
          https://arxiv.org/abs/2404.16260

    Example:
        ```python
        import torch
        from transformers import BertConfig
        from omnisearchsage_hf import OmniSearchSageQueryConfig, OmniSearchSageQueryModel

        backbone = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                              intermediate_size=64)
        model = OmniSearchSageQueryModel(OmniSearchSageQueryConfig(backbone_config=backbone, out_dim=16))
        input_ids = torch.tensor([[2, 17, 42, 3], [2, 9, 3, 0]])
        output = model(input_ids, attention_mask=(input_ids != 0).long())
        print(output.embeddings.shape, output.embeddings.norm(dim=-1))
        # torch.Size([2, 16]) tensor([1.0000, 1.0000], grad_fn=<LinalgVectorNormBackward0>)
        ```
    """

    def __init__(self, config: OmniSearchSageQueryConfig):
        super().__init__(config)
        self.backbone = _drop_pooler(AutoModel.from_config(config.backbone_config))
        self.projection = nn.Linear(config.backbone_config.hidden_size, config.out_dim)
        # Not a submodule: the tokenizer is saved next to the weights, never in the state dict.
        self.tokenizer: PreTrainedTokenizerBase | None = None
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> OmniSearchSageQueryOutput:
        """Embed a tokenised batch: ``(bs, seq_len)`` ids -> ``(bs, out_dim)`` unit vectors."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)  # (bs, seq_len)
        backbone_inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            backbone_inputs["token_type_ids"] = token_type_ids
        last_hidden_state = self.backbone(**backbone_inputs).last_hidden_state  # (bs, seq_len, hidden)
        pooled = pool(last_hidden_state, attention_mask, self.config.pooling)  # (bs, hidden)
        embeddings = F.normalize(self.projection(pooled), p=2, dim=-1)  # (bs, out_dim)
        return OmniSearchSageQueryOutput(embeddings=embeddings, last_hidden_state=last_hidden_state)

    @classmethod
    def from_backbone(cls, path: str | os.PathLike, **config_kwargs) -> "OmniSearchSageQueryModel":
        """Build a tower around a pretrained encoder folder (or Hub id) and its tokenizer.

        The backbone weights are loaded as saved in ``path``, in float32 (cast the tower afterwards for
        half-precision training), except a BERT-style pooler head, which the tower does not use; the
        projection is freshly initialised. Like ``from_pretrained``, the
        tower is returned in eval mode: call ``model.train()`` before training.

        Args:
            path: A folder or Hub id that ``AutoModel`` and ``AutoTokenizer`` can load.
            **config_kwargs: Other :class:`OmniSearchSageQueryConfig` fields, e.g. ``pooling="mean"``,
                ``out_dim=512`` or ``query_prefix="query: "``.

        Example:
            ```python
            model = OmniSearchSageQueryModel.from_backbone(folder, query_prefix="query: ")
            print(model.encode("copper sink").shape)
            # (256,)
            ```
        """
        if "backbone_config" in config_kwargs:
            raise ValueError("`backbone_config` comes from `path` in `from_backbone`: do not pass it.")
        backbone = AutoModel.from_pretrained(path, dtype=torch.float32)
        model = cls(cls.config_class(backbone_config=backbone.config, **config_kwargs))
        model.backbone = _drop_pooler(backbone)  # the pretrained module itself: its weights are exactly those saved
        model.tokenizer = AutoTokenizer.from_pretrained(path)
        return model.eval()

    def _save_extra_files(self, save_directory: Path) -> list[str]:
        """Called by ``save_pretrained`` after the weights and tokenizer: adds the sentence-transformers files."""
        return write_sentence_transformers_files(self, save_directory)

    def _check_loaded_tokenizer(self, location: str, resolve: Callable[[str], str | None]) -> None:
        """Raise unless the loaded tokenizer can be the backbone's: ids within its vocabulary, and more
        than special tokens (a folder without ``tokenizer.json`` loads a tokenizer of special tokens only,
        which maps every word to ``[UNK]``)."""
        size, vocab_size = len(self.tokenizer), self.config.backbone_config.vocab_size
        if size > vocab_size:
            raise ValueError(
                f"The tokenizer in {location} has {size} tokens but the backbone's vocabulary (`vocab_size` in "
                f"config.json) has {vocab_size}: it is another model's tokenizer. {REFETCH}"
            )
        if size <= len(set(self.tokenizer.all_special_ids)):
            files = sorted(set(self.tokenizer.vocab_files_names.values()))
            missing = [name for name in files if resolve(name) is None]
            raise ValueError(
                f"The tokenizer in {location} holds only its {size} special tokens, so every word would be "
                f"[UNK]: its vocabulary is missing (missing files: {missing} of {files}). {REFETCH}"
            )

    def encode(
        self,
        queries: str | list[str],
        *,
        batch_size: int = 32,
        show_progress_bar: bool | None = None,
        convert_to_numpy: bool = True,
        convert_to_tensor: bool = False,
        normalize_embeddings: bool = True,
        device: str | torch.device | None = None,
        truncate_dim: int | None = None,
    ) -> np.ndarray | torch.Tensor | list[torch.Tensor]:
        """Embed raw query strings, in length-sorted batches, in eval mode and under ``torch.inference_mode``.

        Each query gets ``config.query_prefix``, is tokenised with ``model.tokenizer`` and truncated to
        ``config.max_length`` tokens (so a pasted 10,000-character query costs no more than a long one).
        Dropout is off during the call; every submodule's train/eval mode is restored afterwards.

        Args:
            queries: One query or a non-empty list of queries. Empty strings are allowed; UTF-16
                surrogates (not characters, and not encodable) are joined or replaced by U+FFFD.
            batch_size: Queries per forward pass, >= 1. Default 32.
            show_progress_bar: Show a progress bar; ``None`` (default) shows it when logging is at INFO or DEBUG.
            convert_to_numpy: Return a float32 ``np.ndarray`` (default). If both this and ``convert_to_tensor``
                are False, return a list of 1-D tensors.
            convert_to_tensor: Return a ``torch.Tensor`` on ``device``; wins over ``convert_to_numpy``.
            normalize_embeddings: L2-normalise the (possibly truncated) embeddings. Default True.
            device: Where to run; the model is moved there. ``None`` (default) uses the model's device.
            truncate_dim: Keep only the first ``truncate_dim`` dimensions (a Matryoshka prefix), in
                ``[1, out_dim]``; ``None`` (default) keeps all.

        Returns:
            ``(n, dim)`` embeddings for a list, or ``(dim,)`` for a single string, in the input order.

        Raises:
            TypeError: ``queries`` is not a string or a list of strings (the message names the bad index).
            ValueError: ``queries`` is an empty list, ``truncate_dim`` is out of range, or the model has no
                tokenizer (set ``model.tokenizer`` or build it with ``from_backbone``).

        Example:
            ```python
            model = AutoModel.from_pretrained("org/omnisearchsage-query")
            embeddings = model.encode(["antique copper bathroom sink", "lámpara de techo"])
            print(embeddings.shape, embeddings.dtype)
            # (2, 256) float32
            ```
        """
        queries, single = check_queries(queries, self.config.out_dim, truncate_dim)
        if self.tokenizer is None:
            raise ValueError(
                "This query tower has no tokenizer (`model.tokenizer` is None): set `model.tokenizer` to the "
                "backbone's tokenizer, or build the tower with `OmniSearchSageQueryModel.from_backbone(path)`."
            )

        def embed_batch(batch: list[str]) -> torch.Tensor:
            inputs = {name: tensor.to(self.device) for name, tensor in self.tokenize(batch).items()}
            return self(**inputs).embeddings  # (len(batch), out_dim)

        with evaluating(self, device):
            embeddings = encode_in_batches(
                queries,
                embed_batch,
                lengths=[len(query) for query in queries],
                batch_size=batch_size,
                show_progress_bar=show_progress_bar,
                convert_to_numpy=convert_to_numpy,
                convert_to_tensor=convert_to_tensor,
                normalize_embeddings=normalize_embeddings,
                truncate_dim=truncate_dim,
                desc="Encoding queries",
            )
        return embeddings[0] if single else embeddings

    def tokenize(self, queries: list[str]) -> dict[str, torch.Tensor]:
        """Tokenizer inputs for ``forward``: ``config.query_prefix`` added, truncated to ``config.max_length``.

        ``encode`` and the trainer both go through here, so training sees exactly what inference sees.
        UTF-16 surrogates, which no tokenizer can encode, are joined or replaced (``replace_surrogates``).
        """
        features = tokenize_queries(
            self.tokenizer,
            queries,
            prefix=self.config.query_prefix,
            max_length=self.config.max_length,
            return_tensors="pt",
        )
        return {name: features[name] for name in _MODEL_INPUT_NAMES if name in features}


__all__ = [
    "OmniSearchSageQueryModel",
    "OmniSearchSageQueryOutput",
    "OmniSearchSageQueryPreTrainedModel",
    "pool",
]
