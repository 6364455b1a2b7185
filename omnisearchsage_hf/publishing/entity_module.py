"""The entity tower as a sentence-transformers input module: entity dicts in, ``sentence_embedding`` out.

It is the ``document`` route of the asymmetric sentence-transformers model (see ``query_document.py``),
so ``model.encode_document(entities)`` embeds pins and products exactly as ``entity_tower.encode`` does.
It is custom code for sentence-transformers, so the saved model loads with ``trust_remote_code=True``.

This file is copied to the root of saved query–document models and imported from there, so it imports
only torch, transformers and sentence_transformers (never this package).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from sentence_transformers.base.modules import InputModule
from transformers import AutoModel, PreTrainedModel, PreTrainedTokenizerBase

# Feature keys are flat (sentence-transformers moves only top-level tensors to the device): one per dense
# feature and mask, named with these prefixes.
_DENSE, _MASK = "dense_features.", "dense_masks."


class OmniSearchSageEntityModule(InputModule):
    """Embed entity dicts (pins, products) with an ``OmniSearchSageEntityModel``.

    ``preprocess`` validates and tokenises the dicts with the tower's own ``prepare_inputs`` (same keys,
    same errors as ``entity_tower.encode``); ``forward`` runs the tower and writes its unit-norm
    embeddings to ``features["sentence_embedding"]``. Entities take no prompt: a non-empty one raises.

    Args:
        entity_tower: The tower, with its n-gram tokenizer attached (``entity_tower.tokenizer``).

    Example:
        ```python
        from sentence_transformers import SentenceTransformer

        model = SentenceTransformer("org/omnisearchsage", trust_remote_code=True)
        embeddings = model.encode_document([{"title": "copper bathroom sink", "board_titles": ["bathroom"]}])
        print(embeddings.shape)
        # (1, 256)
        ```
    """

    config_keys: list[str] = []

    def __init__(self, entity_tower: PreTrainedModel):
        super().__init__()
        self.entity_tower = entity_tower

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase | None:
        return self.entity_tower.tokenizer

    def preprocess(
        self, inputs: Sequence[Mapping[str, Any]], prompt: str | None = None, **kwargs: Any
    ) -> dict[str, torch.Tensor]:
        """Tokenise a batch of entity dicts into flat ``forward`` features."""
        if prompt:
            raise ValueError(
                f"Entities take no prompt, got prompt={prompt!r}: use `encode_document(entities)` without "
                "`prompt`/`prompt_name`, and `encode_query` for texts."
            )
        prepared = self.entity_tower.prepare_inputs(list(inputs))
        features = {"input_ids": prepared["input_ids"], "offsets": prepared["offsets"]}
        features.update({_DENSE + name: values for name, values in prepared["dense_features"].items()})
        features.update({_MASK + name: mask for name, mask in prepared["dense_masks"].items()})
        return features

    def forward(self, features: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        dense = {key[len(_DENSE) :]: value for key, value in features.items() if key.startswith(_DENSE)}
        masks = {key[len(_MASK) :]: value for key, value in features.items() if key.startswith(_MASK)}
        output = self.entity_tower(features["input_ids"], features["offsets"], dense, masks)
        features["sentence_embedding"] = output.embeddings  # (batch_size, out_dim)
        return features

    def get_embedding_dimension(self) -> int:
        return self.entity_tower.config.out_dim

    def save(self, output_path: str, *args: Any, safe_serialization: bool = True, **kwargs: Any) -> None:
        """Write the tower folder (weights, config, remote code, tokenizer) into ``output_path``."""
        self.entity_tower.save_pretrained(output_path)

    @classmethod
    def load(
        cls,
        model_name_or_path: str,
        subfolder: str = "",
        token: bool | str | None = None,
        cache_folder: str | None = None,
        revision: str | None = None,
        local_files_only: bool = False,
        trust_remote_code: bool = False,
        **kwargs: Any,
    ) -> OmniSearchSageEntityModule:
        """Load the tower folder ``subfolder`` of a local folder or Hub repo (its code needs ``trust_remote_code``)."""
        # transformers fetches remote code from a repo's root, never from `subfolder`: load the folder itself.
        folder = cls.load_dir_path(
            model_name_or_path,
            subfolder=subfolder,
            token=token,
            cache_folder=cache_folder,
            revision=revision,
            local_files_only=local_files_only,
        )
        entity_tower = AutoModel.from_pretrained(folder, trust_remote_code=trust_remote_code)
        return cls(entity_tower)


__all__ = ["OmniSearchSageEntityModule"]
