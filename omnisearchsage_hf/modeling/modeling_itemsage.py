"""ItemSage: one product embedding from a product's images and text fields (Baltescu et al., KDD 2022).

OmniSearchSage reads ItemSage as the pre-existing product embedding and trains a compatibility task
against it (paper §3.4.3). ItemSage treats a product as a set of slots (a learned [CLS], each of up to
20 image embeddings, and each text field as a bag of hashed n-grams), lets a small transformer encoder
mix them, and maps the [CLS] output to a unit vector. Missing images and fields are masked out of
attention rather than zero-filled, so "no description" is not a description of zeros. It is trained
multi-task (query → product and pin → product, per engagement type) against fixed or learned query and
pin embeddings, which keeps the product space compatible with theirs.

This file is copied into saved folders for ``trust_remote_code=True`` loading, so it imports only torch,
numpy, transformers and its flat siblings.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.utils import ModelOutput

from .attached_tokenizer import AttachedTokenizerMixin
from .configuration_itemsage import ItemSageConfig
from .entity_inputs import Entity, EntityInputsMixin
from .modeling_entity import mlp_layers
from .modeling_hash_embedding import FieldLayerNorm, HashEmbeddingBag, init_text_bags

CLS_SLOT, IMAGE_SLOT = 0, 1  # slot-type ids; text field f is slot type 2 + f


@dataclass
class ItemSageOutput(ModelOutput):
    """Output of [`ItemSageModel`].

    Args:
        embeddings: ``(batch_size, out_dim)`` L2-normalised product embeddings.
    """

    embeddings: torch.Tensor | None = None


class ItemSageEncoderLayer(nn.Module):
    """A pre-LayerNorm transformer layer whose attention skips absent slots.

    Inputs:
        hidden: ``(batch_size, num_slots, hidden_size)``.
        present: ``(batch_size, num_slots)`` bool, False for a missing image or field. The [CLS] slot is
            always present, so every row attends to something and no softmax is over an empty set.
    """

    def __init__(self, config: ItemSageConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.dropout_p = config.hidden_dropout_prob
        self.attention_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.attention_out = nn.Linear(config.hidden_size, config.hidden_size)
        self.feed_forward_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.feed_forward = nn.Sequential(
            nn.Linear(config.hidden_size, config.intermediate_size),
            nn.GELU(),
            nn.Linear(config.intermediate_size, config.hidden_size),
        )
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        batch_size, num_slots, width = hidden.shape
        qkv = self.qkv(self.attention_norm(hidden))  # (batch_size, num_slots, 3 * width)
        qkv = qkv.view(batch_size, num_slots, 3, self.num_heads, width // self.num_heads).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(
            qkv[0],
            qkv[1],
            qkv[2],
            attn_mask=present[:, None, None, :],  # (batch_size, 1, 1, num_slots): keys that exist
            dropout_p=self.dropout_p if self.training else 0.0,
        )  # (batch_size, heads, num_slots, head_dim)
        attended = attended.transpose(1, 2).reshape(batch_size, num_slots, width)
        hidden = hidden + self.dropout(self.attention_out(attended))
        return hidden + self.dropout(self.feed_forward(self.feed_forward_norm(hidden)))


class ItemSageHead(nn.Module):
    """LayerNorm of the [CLS] output, then Linear → ReLU → LayerNorm per hidden width, then Linear to ``out_dim``."""

    def __init__(self, config: ItemSageConfig):
        super().__init__()
        widths = [config.hidden_size, *config.head_hidden_dims]
        self.layers = nn.Sequential(
            nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps),
            *mlp_layers(widths, config.out_dim, config.layer_norm_eps),
        )

    def forward(self, cls: torch.Tensor) -> torch.Tensor:
        return self.layers(cls)


class ItemSagePreTrainedModel(PreTrainedModel):
    config: ItemSageConfig
    config_class = ItemSageConfig
    base_model_prefix = "itemsage"
    main_input_name = "input_ids"

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        init_text_bags(module, self.config)


class ItemSageModel(AttachedTokenizerMixin, EntityInputsMixin, ItemSagePreTrainedModel):
    """ItemSage: [CLS] + projected images + text-field bags → transformer encoder → MLP → unit vector.

    Inputs (``forward``; ``prepare_inputs`` builds them from product dicts, ``encode`` embeds them):
        input_ids: ``(num_tokens,)`` n-gram ids of every text field of every product, field-major.
        offsets: ``(num_fields * batch_size,)`` bag starts; bag ``f * batch_size + b`` is field ``f`` of
            product ``b``. An empty bag is a missing field, masked out.
        dense_features: ``{config.image_feature: (batch_size, num_images, image_dim)}`` (or
            ``(batch_size, image_dim)``, one image each); left out, no product has images.
        dense_masks: ``{config.image_feature: (batch_size, num_images)}`` bool, True for real images.
            Defaults to all present.

    A product dict holds the text fields (``config.text_fields``) and ``config.image_feature``: one
    vector or a list of up to ``config.max_images`` vectors. The tokenizer is the entity tower's n-gram
    tokenizer and travels with the model like the towers' (``model.tokenizer``).

    Example:
        ::

            embeddings = ItemSageModel.from_pretrained(folder).encode(
                [{"title": "linen throw pillow", "brand": "Acme", "image_embeddings": [[...], [...]]}]
            )  # (1, out_dim), unit norm
    """

    def __init__(self, config: ItemSageConfig):
        super().__init__(config)
        num_fields = len(config.text_fields)
        self.slot_types = nn.Embedding(2 + num_fields, config.hidden_size)
        if config.image_feature is not None:
            self.image_projection = nn.Linear(config.image_dim, config.hidden_size)
        if num_fields:
            self.embeddings = HashEmbeddingBag(config)
            self.field_norm = FieldLayerNorm(config)
            self.text_projection = nn.Linear(config.embedding_dim, config.hidden_size)
        self.layers = nn.ModuleList(ItemSageEncoderLayer(config) for _ in range(config.num_hidden_layers))
        self.head = ItemSageHead(config)
        self.tokenizer = None
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor,
        offsets: torch.Tensor,
        dense_features: Mapping[str, torch.Tensor] | None = None,
        dense_masks: Mapping[str, torch.Tensor] | None = None,
    ) -> ItemSageOutput:
        config = self.config
        dense_features, dense_masks = dict(dense_features or {}), dict(dense_masks or {})
        unknown = sorted(set(dense_features) - set(config.vector_features()))
        if unknown:
            raise ValueError(f"Unknown dense features {unknown}; this model reads {sorted(config.vector_features())}.")
        num_fields = len(config.text_fields)
        if offsets.ndim != 1 or (num_fields and len(offsets) % num_fields):
            raise ValueError(
                f"`offsets` must be 1-D with num_fields ({num_fields}) x batch_size entries, "
                f"got shape {tuple(offsets.shape)}."
            )
        images = dense_features.get(config.image_feature) if config.image_feature else None
        if num_fields:
            batch_size = len(offsets) // num_fields
        elif images is not None:
            batch_size = len(images)
        else:
            raise ValueError(f"A model without text fields needs `dense_features[{config.image_feature!r}]`.")

        slots, present = [self.slot_types.weight[CLS_SLOT].expand(batch_size, 1, -1)], [self._all(batch_size, 1)]
        if images is not None:
            image_slots, image_present = self._image_slots(images, dense_masks.get(config.image_feature), batch_size)
            slots.append(image_slots)
            present.append(image_present)
        if num_fields:
            bags = self.embeddings(input_ids, offsets).view(num_fields, batch_size, -1)  # (F, B, embedding_dim)
            bag_sizes = torch.diff(offsets, append=offsets.new_tensor([len(input_ids)]))
            field_present = (bag_sizes > 0).view(num_fields, batch_size)  # (F, B)
            text = self.text_projection(self.field_norm(bags, field_present)).transpose(0, 1)  # (B, F, hidden)
            slots.append(text + self.slot_types.weight[2:])
            present.append(field_present.T)
        hidden = torch.cat(slots, dim=1)  # (batch_size, num_slots, hidden_size)
        present = torch.cat(present, dim=1)  # (batch_size, num_slots)
        for layer in self.layers:
            hidden = layer(hidden, present)
        embeddings = self.head(hidden[:, 0])  # (batch_size, out_dim)
        return ItemSageOutput(embeddings=F.normalize(embeddings, p=2, dim=-1))

    def _all(self, batch_size: int, num_slots: int) -> torch.Tensor:
        return torch.ones(batch_size, num_slots, dtype=torch.bool, device=self.slot_types.weight.device)

    def _image_slots(
        self, images: torch.Tensor, mask: torch.Tensor | None, batch_size: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Projected image slots ``(batch_size, num_images, hidden_size)`` and their presence mask."""
        name, dim = self.config.image_feature, self.config.image_dim
        if images.ndim == 2:
            images, mask = images[:, None], (mask[:, None] if mask is not None else None)
        if images.ndim != 3 or images.shape[0] != batch_size or images.shape[-1] != dim:
            raise ValueError(
                f"Dense feature {name!r} must have shape ({batch_size}, num_images, {dim}) or ({batch_size}, {dim}), "
                f"got {tuple(images.shape)}."
            )
        if images.shape[1] > self.config.max_images:
            raise ValueError(
                f"Dense feature {name!r} holds {images.shape[1]} images per product; the model reads at most "
                f"`max_images` = {self.config.max_images}."
            )
        if mask is None:
            mask = self._all(batch_size, images.shape[1])
        projected = self.image_projection(images.to(self.image_projection.weight.dtype))
        return projected + self.slot_types.weight[IMAGE_SLOT], mask.bool()

    def _stack_dense(self, entities: Sequence[Entity]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        stacked = super()._stack_dense(entities)
        for name, (_, mask) in stacked.items():
            counts = mask.view(len(entities), -1).sum(1)  # images per product
            if counts.max() > self.config.max_images:
                index = int(torch.argmax(counts))
                raise ValueError(
                    f"Product {index} has {int(counts[index])} images in {name!r}; ItemSage reads at most "
                    f"{self.config.max_images} (`max_images`): keep its first {self.config.max_images}."
                )
        return stacked


__all__ = ["ItemSageModel", "ItemSageOutput", "ItemSagePreTrainedModel"]
