"""Entity dicts → tower inputs, and ``encode``, shared by the towers that embed pins and products.

The OmniSearchSage entity tower and ItemSage read the same kind of input: a dict per entity holding
text fields (a string or a list of strings, tokenized into n-gram bags) and named vectors (one vector,
or several, e.g. a product's images). This mixin validates such dicts with errors that name the entity
and the field, turns them into ``forward`` inputs (``input_ids``/``offsets`` field-major, plus
``dense_features``/``dense_masks``), and embeds lists of them in length-sorted batches.

This file is copied next to the modeling files when a model is saved, so it imports only torch, numpy,
transformers and its flat siblings.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from .configuration_entity import RESERVED_KEYS
from .encoding import check_batch, check_truncate_dim, encode_in_batches, evaluating
from .saved_folder import REFETCH

Entity = Mapping[str, Any]
# Dense values above this are named as the cause of a non-finite embedding (squared, they near float32's max).
_LARGEST_PLAUSIBLE_FEATURE = 1e6


class EntityInputsMixin:
    """``prepare_inputs`` and ``encode`` for a ``PreTrainedModel`` whose inputs are entity dicts.

    The model's config provides ``text_fields``, ``vocab_size`` and ``vector_features()`` (name → width of
    each vector input); the model has a ``tokenizer`` attribute (an ``OmniSearchSageTokenizer``), and its
    ``forward(input_ids, offsets, dense_features, dense_masks)`` returns an output with ``embeddings``.
    """

    def _check_tokenizer(self, location: str | None = None) -> None:
        """Raise unless the model has a tokenizer whose ids are exactly its ``vocab_size``.

        Equal, not merely within: a tokenizer with fewer ids than the model was trained with is another
        vocabulary (or a shortened file) and would map words to the wrong rows without any error.
        ``location`` is the folder both were loaded from, if any.
        """
        if not self.config.text_fields:
            return  # nothing to tokenize
        if self.tokenizer is None:
            raise ValueError(
                f"This {type(self).__name__} has no tokenizer: set `model.tokenizer` (e.g. from "
                "`omnisearchsage_hf.build_vocab`) or load a saved folder with `from_pretrained`."
            )
        if self.tokenizer.vocab_size != self.config.vocab_size:
            where = f"The tokenizer in {location}" if location else "The tokenizer"
            fix = REFETCH if location else "Use the tokenizer the model was built with (its vocab_size)."
            raise ValueError(
                f"{where} emits {self.tokenizer.vocab_size} ids (its trigrams.txt, unigrams.txt and bigrams.txt plus "
                f"`oov_buckets` of tokenizer_config.json) but the model's `vocab_size` (config.json) is "
                f"{self.config.vocab_size}: they do not belong together. {fix}"
            )

    def _check_loaded_tokenizer(self, location: str, resolve: Callable[[str], str | None]) -> None:
        """Run by ``from_pretrained`` on the tokenizer loaded with the model (see ``_check_tokenizer``)."""
        self._check_tokenizer(location)

    def _check_entities(self, entities: Sequence[Entity]) -> None:
        self._check_tokenizer()
        text_fields = set(self.config.text_fields)
        known = text_fields | set(self.config.vector_features()) | set(RESERVED_KEYS)
        for index, entity in enumerate(entities):
            if not isinstance(entity, Mapping):
                raise TypeError(f"Entity {index} must be a dict of features, got {type(entity).__name__}.")
            if not known.issuperset(entity):
                unknown = sorted(set(entity) - known)
                raise ValueError(
                    f"Entity {index} has unknown feature(s) {unknown}. Text fields: {list(self.config.text_fields)}; "
                    f"dense features: {sorted(self.config.vector_features())}; also allowed: {list(RESERVED_KEYS)}."
                )
            for field in text_fields & entity.keys():
                if not isinstance(entity[field], str):
                    self.tokenizer.check_field(entity[field], field, index)

    def _text_inputs(self, entities: Sequence[Entity]) -> dict[str, torch.Tensor]:
        """Field-major ``input_ids`` and ``offsets`` for ``forward``."""
        empty = torch.zeros(0, dtype=torch.long)
        if not self.config.text_fields:
            return {"input_ids": empty, "offsets": empty}
        bags = self.tokenizer.encode_fields(entities, self.config.text_fields)
        input_ids, offsets, start = [], [], 0
        for field in self.config.text_fields:
            input_ids.append(bags[field].input_ids)
            offsets.append(bags[field].offsets + start)
            start += len(bags[field].input_ids)
        return {"input_ids": torch.cat(input_ids), "offsets": torch.cat(offsets)}

    def _stack_dense(self, entities: Sequence[Entity]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per vector feature that any entity has: ``(values, presence mask)`` (see ``stack_feature``)."""
        stacked = {}
        for name, dim in self.config.vector_features().items():
            values = [entity.get(name) for entity in entities]
            if any(v is not None for v in values):
                stacked[name] = stack_feature(values, name, dim)
        return stacked

    def prepare_inputs(self, entities: Sequence[Entity]) -> dict[str, Any]:
        """Validate entity dicts and turn them into ``forward`` inputs (tokenization included).

        Each entity maps text field names to a string, a list of strings or None, and vector feature
        names to a vector of the configured width, a list of such vectors (several images), or None.
        Missing keys are missing features. An ``"id"`` key is allowed and ignored.
        """
        check_batch(entities, "entities")
        self._check_entities(entities)
        dense = self._stack_dense(entities)
        return {
            **self._text_inputs(entities),
            "dense_features": {name: values for name, (values, _) in dense.items()},
            "dense_masks": {name: mask for name, (_, mask) in dense.items()},
        }

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
            device: Where to run; the model is moved there. None (default) uses the model's device.
            truncate_dim: Keep the first ``truncate_dim`` dimensions.

        Returns:
            ``(n, out_dim)`` embeddings in input order, or ``(out_dim,)`` for a single dict.

        Raises:
            ValueError: A bad input (named by index and field), a tokenizer whose size is not the model's
                ``vocab_size``, or an entity that embeds to NaN or inf: a dense value finite in float32
                (3e38, 1e25) can still overflow inside the tower, so the output is checked and the error
                names the entities and the feature with the largest values.
        """
        single = isinstance(entities, Mapping)
        batch = [entities] if single else entities
        check_batch(batch, "entities")
        check_truncate_dim(truncate_dim, self.config.out_dim)
        # Validate everything first, so errors name the caller's indices and come before any work.
        self._check_entities(batch)
        dense = self._stack_dense(batch)

        def embed(indices: list[int]) -> torch.Tensor:
            rows = torch.tensor(indices)
            inputs = self._text_inputs([batch[i] for i in indices])
            inputs["dense_features"] = {name: values[rows] for name, (values, _) in dense.items()}
            inputs["dense_masks"] = {name: mask[rows] for name, (_, mask) in dense.items()}
            embeddings = self(**_to_device(inputs, self.device)).embeddings  # (len(indices), out_dim)
            finite = torch.isfinite(embeddings).all(dim=1).cpu()  # (len(indices),)
            if not finite.all():
                raise _non_finite_error([indices[i] for i in torch.nonzero(~finite).flatten().tolist()], dense)
            return embeddings

        with evaluating(self, device):
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
        return embeddings[0] if single else embeddings


def _non_finite_error(indices: list[int], dense: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> ValueError:
    """Why entities ``indices`` embed to NaN or inf: the dense feature with the largest values, or the weights.

    A value can be finite in float32 (3e38, 1e25) and still overflow in the tower's maths (LayerNorm
    squares its inputs), so the check is on the output; the message names the likely input.
    """
    index = indices[0]
    magnitudes = {name: float(values[index].abs().max()) for name, (values, _) in dense.items()}
    name = max(magnitudes, key=magnitudes.get, default=None)
    if name is not None and magnitudes[name] > _LARGEST_PLAUSIBLE_FEATURE:
        cause = (
            f"its dense feature {name!r} holds values up to {magnitudes[name]:.3g}, which overflow float32 inside "
            "the tower. Scale or clip that feature (pre-existing embeddings are usually of order 1)"
        )
    else:
        cause = "its inputs look ordinary, so the model's weights hold NaN or inf: re-download or retrain the model"
    return ValueError(f"Entities {indices[:10]} embed to NaN or inf (entity {index}: {cause}).")


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


def stack_feature(values: list[Any], name: str, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack one vector feature of a batch into ``(batch, [num_items,] dim)`` float32 plus a presence mask.

    All single vectors give ``(batch, dim)``; if any entity has a list of vectors, every entity's value
    becomes a list, padded with zeros to the longest and masked.
    """
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


__all__ = ["Entity", "EntityInputsMixin", "stack_feature"]
