"""The OmniSearchSage entity tower: pins and products → unit vectors in the query tower's space.

Paper §3.4: entities are embedded without a transformer so that billions of them can be refreshed
daily. Each text field (title, description, caption, board titles, engaged queries, brand, …) becomes a
bag of hashed n-gram embeddings, LayerNorm-ed per field and summed; pre-existing embeddings (PinSage,
visual, ItemSage) are concatenated; an MLP maps the result to the output space. Pins and products go
through the same model, with the fields they have.

This file is copied into saved folders for ``trust_remote_code=True`` loading, so it imports only torch,
numpy, transformers and its flat siblings.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput

from .attached_tokenizer import AttachedTokenizerMixin
from .configuration_entity import OmniSearchSageEntityConfig
from .entity_inputs import EntityInputsMixin
from .modeling_hash_embedding import FieldLayerNorm, HashEmbeddingBag, init_text_bags


@dataclass
class OmniSearchSageEntityOutput(ModelOutput):
    """Output of [`OmniSearchSageEntityModel`].

    Args:
        embeddings: ``(batch_size, out_dim)`` L2-normalised entity embeddings.
    """

    embeddings: torch.Tensor | None = None


class ZeroInitLinear(nn.Linear):
    """A ``Linear`` that starts at zero (``_init_weights`` recognises the type): a correction that starts off."""


def mlp_layers(widths: list[int], out_dim: int, eps: float, *, zero_output: bool = False) -> list[nn.Module]:
    """Linear → ReLU → LayerNorm from each width in ``widths`` to the next, then a Linear to ``out_dim``.

    With ``zero_output`` the last Linear is a ``ZeroInitLinear``, so the stack outputs zeros until trained.
    """
    layers: list[nn.Module] = []
    for fan_in, fan_out in itertools.pairwise(widths):
        layers += [nn.Linear(fan_in, fan_out), nn.ReLU(), nn.LayerNorm(fan_out, eps=eps)]
    return [*layers, (ZeroInitLinear if zero_output else nn.Linear)(widths[-1], out_dim)]


class EntityMLP(nn.Module):
    """Linear → ReLU → LayerNorm for each hidden width, then a Linear to ``out_dim``."""

    def __init__(self, config: OmniSearchSageEntityConfig):
        super().__init__()
        widths = [config.embedding_dim + sum(config.dense_features.values())] + list(config.hidden_dims)
        # With a residual mix, the tower starts as the mix itself (see `ResidualMix`).
        zero_output = bool(config.residual_features)
        self.layers = nn.Sequential(*mlp_layers(widths, config.out_dim, config.layer_norm_eps, zero_output=zero_output))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers(features)


class ResidualMix(nn.Module):
    """The tower's output as a learned mix of pre-existing embeddings plus a scaled MLP correction.

    ``correction_scale * mlp_out + sum_i weights[i] * dense[name_i]`` over ``config.residual_features``
    (pre-existing embeddings of width ``out_dim``, e.g. an e5 passage embedding). With the MLP's last
    layer started at zero, an untrained tower returns the mix itself: training starts from the
    pretrained space instead of from a random one.
    """

    def __init__(self, config: OmniSearchSageEntityConfig):
        super().__init__()
        self.names = list(config.residual_features)
        self.weights = nn.Parameter(torch.empty(len(self.names)))  # (num_residual_features,)
        self.correction_scale = nn.Parameter(torch.empty(()))

    def forward(self, mlp_out: torch.Tensor, dense: Mapping[str, torch.Tensor]) -> torch.Tensor:
        mixed = self.correction_scale * mlp_out  # (batch_size, out_dim)
        for weight, name in zip(self.weights, self.names, strict=True):
            mixed = mixed + weight * dense[name]
        return mixed


class OmniSearchSageEntityPreTrainedModel(PreTrainedModel):
    config: OmniSearchSageEntityConfig
    config_class = OmniSearchSageEntityConfig
    base_model_prefix = "entity_tower"
    main_input_name = "input_ids"

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, ZeroInitLinear):
            init.zeros_(module.weight)
            init.zeros_(module.bias)
            return
        if isinstance(module, ResidualMix):
            init.copy_(module.weights, torch.tensor(list(self.config.residual_features.values())))
            init.constant_(module.correction_scale, self.config.residual_correction_scale)
        super()._init_weights(module)
        init_text_bags(module, self.config)


class OmniSearchSageEntityModel(AttachedTokenizerMixin, EntityInputsMixin, OmniSearchSageEntityPreTrainedModel):
    """The entity tower: text-field bags + pre-existing embeddings → MLP → unit vector.

    Inputs (``forward``; ``prepare_inputs`` builds them from entity dicts):
        input_ids: ``(num_tokens,)`` n-gram ids of every field of every entity, field-major.
        offsets: ``(num_fields * batch_size,)`` bag starts; bag ``f * batch_size + b`` is field ``f`` of
            entity ``b``.
        dense_features: name → ``(batch_size, dim)`` or ``(batch_size, num_items, dim)`` float tensor
            (several images of a product); a name left out is all zeros.
        dense_masks: name → ``(batch_size,)`` or ``(batch_size, num_items)`` bool, True where present;
            per-item features are averaged over present items only. Defaults to all present.

    The tokenizer that produced the ids travels with the model as ``model.tokenizer``: ``from_pretrained``
    loads it from the same folder and ``save_pretrained`` writes it there.
    """

    def __init__(self, config: OmniSearchSageEntityConfig):
        super().__init__(config)
        self.embeddings = HashEmbeddingBag(config)
        self.field_norm = FieldLayerNorm(config)
        self.mlp = EntityMLP(config)
        self.residual = ResidualMix(config) if config.residual_features else None
        self.tokenizer = None
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor,
        offsets: torch.Tensor,
        dense_features: Mapping[str, torch.Tensor] | None = None,
        dense_masks: Mapping[str, torch.Tensor] | None = None,
    ) -> OmniSearchSageEntityOutput:
        num_fields = len(self.config.text_fields)
        if offsets.ndim != 1 or len(offsets) % max(num_fields, 1):
            raise ValueError(
                f"`offsets` must be 1-D with num_fields ({num_fields}) x batch_size entries, "
                f"got shape {tuple(offsets.shape)}."
            )
        dense_features, dense_masks = dict(dense_features or {}), dict(dense_masks or {})
        unknown = sorted(set(dense_features) - set(self.config.dense_features))
        if unknown:
            raise ValueError(
                f"Unknown dense features {unknown}; this model reads {sorted(self.config.dense_features)}."
            )
        batch_size = len(offsets) // num_fields if num_fields else self._dense_batch_size(dense_features)

        parts = [self._embed_text(input_ids, offsets, batch_size)]  # [(batch_size, embedding_dim)]
        dense = {
            name: self._pool_dense(name, dim, dense_features.get(name), dense_masks.get(name), batch_size)
            for name, dim in self.config.dense_features.items()
        }  # name -> (batch_size, dim)
        embeddings = self.mlp(torch.cat(parts + list(dense.values()), dim=-1))  # (batch_size, out_dim)
        if self.residual is not None:
            embeddings = self.residual(embeddings, dense)  # (batch_size, out_dim)
        return OmniSearchSageEntityOutput(embeddings=F.normalize(embeddings, p=2, dim=-1))

    @staticmethod
    def _dense_batch_size(dense_features: Mapping[str, torch.Tensor]) -> int:
        if not dense_features:
            raise ValueError("A model without text fields needs at least one tensor in `dense_features`.")
        return len(next(iter(dense_features.values())))

    def _embed_text(self, input_ids: torch.Tensor, offsets: torch.Tensor, batch_size: int) -> torch.Tensor:
        num_fields = len(self.config.text_fields)
        if num_fields == 0:
            return self.embeddings.weight.new_zeros(batch_size, self.config.embedding_dim)
        bags = self.embeddings(input_ids, offsets)  # (num_fields * batch_size, embedding_dim)
        bags = bags.view(num_fields, batch_size, -1)  # (num_fields, batch_size, embedding_dim)
        bag_sizes = torch.diff(offsets, append=offsets.new_tensor([len(input_ids)]))  # (num_fields * batch_size,)
        present = (bag_sizes > 0).view(num_fields, batch_size)
        return self.field_norm(bags, present).sum(dim=0)  # (batch_size, embedding_dim)

    def _pool_dense(
        self, name: str, dim: int, values: torch.Tensor | None, mask: torch.Tensor | None, batch_size: int
    ) -> torch.Tensor:
        dtype = self.embeddings.weight.dtype
        if values is None:
            return self.embeddings.weight.new_zeros(batch_size, dim)
        if values.shape[0] != batch_size or values.shape[-1] != dim or values.ndim not in (2, 3):
            raise ValueError(
                f"Dense feature {name!r} must have shape ({batch_size}, {dim}) or ({batch_size}, "
                f"num_items, {dim}), got {tuple(values.shape)}."
            )
        values = values.to(dtype)
        if mask is None:
            mask = torch.ones(values.shape[:-1], dtype=torch.bool, device=values.device)
        weights = mask.to(dtype)[..., None]  # (batch_size, [num_items,] 1)
        if values.ndim == 2:
            return values * weights  # (batch_size, dim)
        # Masked mean over items; an entity with no item gets zeros rather than 0/0.
        return (values * weights).sum(1) / weights.sum(1).clamp(min=1.0)  # (batch_size, dim)


__all__ = ["OmniSearchSageEntityModel", "OmniSearchSageEntityOutput", "OmniSearchSageEntityPreTrainedModel"]
