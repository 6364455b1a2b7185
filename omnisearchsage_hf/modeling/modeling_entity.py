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

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput

from .attached_tokenizer import AttachedTokenizerMixin
from .configuration_entity import RESERVED_KEYS, OmniSearchSageEntityConfig
from .encoding import check_batch, check_truncate_dim, encode_in_batches
from .modeling_hash_embedding import HashEmbeddingBag

Entity = Mapping[str, Any]


@dataclass
class OmniSearchSageEntityOutput(ModelOutput):
    """Output of [`OmniSearchSageEntityModel`].

    Args:
        embeddings: ``(batch_size, out_dim)`` L2-normalised entity embeddings.
    """

    embeddings: torch.Tensor | None = None


class FieldLayerNorm(nn.Module):
    """LayerNorm with its own scale and shift per text field; absent fields contribute zero.

    Inputs:
        bags: ``(num_fields, batch_size, dim)`` summed n-gram embeddings.
        present: ``(num_fields, batch_size)`` bool, False where a field's bag is empty.
    """

    def __init__(self, config: OmniSearchSageEntityConfig):
        super().__init__()
        self.eps = config.layer_norm_eps
        self.weight = nn.Parameter(torch.empty(len(config.text_fields), config.embedding_dim))
        self.bias = nn.Parameter(torch.empty(len(config.text_fields), config.embedding_dim))

    def forward(self, bags: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        normed = F.layer_norm(bags, bags.shape[-1:], eps=self.eps)  # (num_fields, batch_size, dim)
        normed = normed * self.weight[:, None, :] + self.bias[:, None, :]
        # Without the mask a missing field would still add its bias, so "no title" would look like a title.
        return normed * present[..., None].to(normed.dtype)


class EntityMLP(nn.Module):
    """Linear → ReLU → LayerNorm for each hidden width, then a Linear to ``out_dim``."""

    def __init__(self, config: OmniSearchSageEntityConfig):
        super().__init__()
        widths = [config.embedding_dim + sum(config.dense_features.values())] + list(config.hidden_dims)
        layers: list[nn.Module] = []
        for fan_in, fan_out in zip(widths, widths[1:]):
            layers += [nn.Linear(fan_in, fan_out), nn.ReLU(), nn.LayerNorm(fan_out, eps=config.layer_norm_eps)]
        layers.append(nn.Linear(widths[-1], config.out_dim))
        self.layers = nn.Sequential(*layers)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers(features)


class OmniSearchSageEntityPreTrainedModel(PreTrainedModel):
    config: OmniSearchSageEntityConfig
    config_class = OmniSearchSageEntityConfig
    base_model_prefix = "entity_tower"
    main_input_name = "input_ids"

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        if self.config.residual_features and module is self.mlp.layers[-1]:
            # The tower starts as the residual mix itself (see the config's `residual_features`).
            init.zeros_(module.weight)
            init.zeros_(module.bias)
            return
        if module is self and self.config.residual_features:
            init.copy_(module.residual_weights, torch.tensor(list(self.config.residual_features.values())))
            init.constant_(module.correction_scale, self.config.residual_correction_scale)
        super()._init_weights(module)
        if isinstance(module, HashEmbeddingBag):
            init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
            init.ones_(module.importance)
            init.copy_(module.bucket_table, module.bucket_ids(torch.arange(self.config.vocab_size)))
        elif isinstance(module, FieldLayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)


class OmniSearchSageEntityModel(AttachedTokenizerMixin, OmniSearchSageEntityPreTrainedModel):
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
        if config.residual_features:
            self.residual_weights = nn.Parameter(torch.empty(len(config.residual_features)))
            self.correction_scale = nn.Parameter(torch.empty(()))
        self.tokenizer = None
        self.post_init()

    def _check_tokenizer(self) -> None:
        if self.tokenizer is None:
            raise ValueError(
                "This entity tower has no tokenizer: set `model.tokenizer` (e.g. from `omnisearchsage_hf.build_vocab`) "
                "or load a saved folder with `from_pretrained`."
            )
        if self.tokenizer.vocab_size > self.config.vocab_size:
            raise ValueError(
                f"The tokenizer emits {self.tokenizer.vocab_size} ids but the model's `vocab_size` is "
                f"{self.config.vocab_size}; build the model with `vocab_size=tokenizer.vocab_size`."
            )

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
        if self.config.residual_features:
            embeddings = self.correction_scale * embeddings
        for weight, name in zip(getattr(self, "residual_weights", ()), self.config.residual_features):
            embeddings = embeddings + weight * dense[name]
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

    def prepare_inputs(self, entities: Sequence[Entity]) -> dict[str, Any]:
        """Validate entity dicts and turn them into ``forward`` inputs (tokenization included).

        Each entity maps text field names to a string, a list of strings or None, and dense feature
        names to a vector of the configured dim, a list of such vectors (masked mean), or None. Missing
        keys are missing features. An ``"id"`` key is allowed and ignored.
        """
        check_batch(entities, "entities")
        self._check_entities(entities)
        dense = self._stack_dense(entities)
        return {
            **self._text_inputs(entities),
            "dense_features": {name: values for name, (values, _) in dense.items()},
            "dense_masks": {name: mask for name, (_, mask) in dense.items()},
        }

    def _check_entities(self, entities: Sequence[Entity]) -> None:
        self._check_tokenizer()
        text_fields = set(self.config.text_fields)
        known = text_fields | set(self.config.dense_features) | set(RESERVED_KEYS)
        for index, entity in enumerate(entities):
            if not isinstance(entity, Mapping):
                raise TypeError(f"Entity {index} must be a dict of features, got {type(entity).__name__}.")
            if not known.issuperset(entity):
                unknown = sorted(set(entity) - known)
                raise ValueError(
                    f"Entity {index} has unknown feature(s) {unknown}. Text fields: {list(self.config.text_fields)}; "
                    f"dense features: {sorted(self.config.dense_features)}; also allowed: {list(RESERVED_KEYS)}."
                )
            for field in text_fields & entity.keys():
                if not isinstance(entity[field], str):
                    self.tokenizer.check_field(entity[field], field, index)

    def _text_inputs(self, entities: Sequence[Entity]) -> dict[str, torch.Tensor]:
        """Field-major ``input_ids`` and ``offsets`` for ``forward``."""
        bags = self.tokenizer.encode_fields(entities, self.config.text_fields)
        input_ids, offsets, start = [], [], 0
        for field in self.config.text_fields:
            input_ids.append(bags[field].input_ids)
            offsets.append(bags[field].offsets + start)
            start += len(bags[field].input_ids)
        empty = torch.zeros(0, dtype=torch.long)
        return {"input_ids": torch.cat(input_ids or [empty]), "offsets": torch.cat(offsets or [empty])}

    def _stack_dense(self, entities: Sequence[Entity]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per dense feature that any entity has: ``(values, presence mask)`` (see ``_stack_feature``)."""
        stacked = {}
        for name, dim in self.config.dense_features.items():
            values = [entity.get(name) for entity in entities]
            if any(v is not None for v in values):
                stacked[name] = _stack_feature(values, name, dim)
        return stacked

    @torch.inference_mode()
    def encode(
        self,
        entities: Entity | Sequence[Entity],
        *,
        batch_size: int = 256,
        show_progress_bar: bool | None = None,
        convert_to_numpy: bool = True,
        convert_to_tensor: bool = False,
        normalize_embeddings: bool = True,
        device: str | torch.device | None = None,
        truncate_dim: int | None = None,
    ) -> np.ndarray | torch.Tensor | list[torch.Tensor]:
        """Embed pins or products given as dicts of features.

        Args:
            entities: One entity dict or a list of them (see ``prepare_inputs`` for the keys).
            batch_size: Entities per forward pass.
            show_progress_bar: Show a progress bar; None shows it at INFO/DEBUG log level.
            convert_to_numpy: Return a float32 ``np.ndarray`` (the default).
            convert_to_tensor: Return a ``torch.Tensor`` instead (wins over ``convert_to_numpy``).
            normalize_embeddings: Renormalise to unit length (after truncation).
            device: Where to run; defaults to the model's device.
            truncate_dim: Keep the first ``truncate_dim`` dimensions.

        Returns:
            ``(n, out_dim)`` embeddings in input order, or ``(out_dim,)`` for a single dict.
        """
        single = isinstance(entities, Mapping)
        batch = [entities] if single else entities
        check_batch(batch, "entities")
        check_truncate_dim(truncate_dim, self.config.out_dim)
        # Validate everything first, so errors name the caller's indices and come before any work.
        self._check_entities(batch)
        dense = self._stack_dense(batch)
        device = torch.device(device) if device is not None else self.device

        def embed(indices: list[int]) -> torch.Tensor:
            rows = torch.tensor(indices)
            inputs = self._text_inputs([batch[i] for i in indices])
            inputs["dense_features"] = {name: values[rows] for name, (values, _) in dense.items()}
            inputs["dense_masks"] = {name: mask[rows] for name, (_, mask) in dense.items()}
            return self(**_to_device(inputs, device)).embeddings

        was_training = self.training
        self.eval()
        try:
            embeddings = encode_in_batches(
                list(range(len(batch))),
                embed,
                lengths=[_text_length(entity, self.config.text_fields) for entity in batch],
                batch_size=batch_size,
                show_progress_bar=show_progress_bar,
                convert_to_numpy=convert_to_numpy,
                convert_to_tensor=convert_to_tensor,
                normalize_embeddings=normalize_embeddings,
                truncate_dim=truncate_dim,
                desc="Encoding entities",
            )
        finally:
            self.train(was_training)
        return embeddings[0] if single else embeddings


def _text_length(entity: Entity, fields: Sequence[str]) -> int:
    total = 0
    for field in fields:
        value = entity.get(field)
        if isinstance(value, str):
            total += len(value)
        elif value:
            total += sum(len(text) for text in value)
    return total


def _to_device(inputs: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {
        k: ({n: t.to(device) for n, t in v.items()} if isinstance(v, dict) else v.to(device)) for k, v in inputs.items()
    }


def _stack_feature(values: list[Any], name: str, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack one dense feature of a batch into ``(batch, [num_items,] dim)`` float32 plus a presence mask."""
    arrays = []
    for index, value in enumerate(values):
        if value is None:
            arrays.append(None)
            continue
        try:
            array = np.asarray(value.detach().cpu() if isinstance(value, torch.Tensor) else value, dtype=np.float32)
        except (TypeError, ValueError):
            raise TypeError(
                f"Dense feature {name!r} of entity {index} must be numbers (a vector of {dim} or a list of such "
                f"vectors), got {type(value).__name__}."
            ) from None
        if array.ndim not in (1, 2) or array.shape[-1] != dim:
            raise ValueError(
                f"Dense feature {name!r} of entity {index} has shape {array.shape}; the model expects ({dim},) "
                f"or (num_items, {dim})."
            )
        arrays.append(array)
    if all(a is None or a.ndim == 1 for a in arrays):
        stacked = np.zeros((len(values), dim), dtype=np.float32)
        mask = np.array([a is not None for a in arrays])
        if mask.any():
            stacked[mask] = np.stack([a for a in arrays if a is not None])
    else:
        items = [a if a is None or a.ndim == 2 else a[None] for a in arrays]
        num_items = max(len(a) for a in items if a is not None)
        stacked = np.zeros((len(values), num_items, dim), dtype=np.float32)
        mask = np.zeros((len(values), num_items), dtype=bool)
        for index, array in enumerate(items):
            if array is not None:
                stacked[index, : len(array)], mask[index, : len(array)] = array, True
    finite = np.isfinite(stacked).reshape(len(values), -1).all(axis=1)  # (batch,); padding is zeros
    if not finite.all():
        index = int(np.flatnonzero(~finite)[0])
        raise ValueError(f"Dense feature {name!r} of entity {index} contains NaN or inf; replace or drop it.")
    return torch.from_numpy(stacked), torch.from_numpy(mask)


__all__ = ["OmniSearchSageEntityModel", "OmniSearchSageEntityOutput", "OmniSearchSageEntityPreTrainedModel"]
