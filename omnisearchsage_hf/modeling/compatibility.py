"""Compatibility towers: the pre-existing embedding itself, as a parameter-free candidate tower.

Paper §3.5: besides learning its own entity towers, OmniSearchSage trains the query embedding against
embeddings that already exist (PinSage for pins, ItemSage for products), so that one query vector also
retrieves in those legacy spaces and stays compatible with every system built on them. The "tower" for
such a task only looks the embedding up and renormalises it; the query tower does all the learning.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn


class CompatibilityTower(nn.Module):
    """Return the named pre-existing embedding of each candidate, L2-normalised.

    Args:
        feature: Name of the pre-existing embedding (e.g. ``"pinsage_embedding"``).
        dim: Its dimension; inputs of another width are rejected.

    Inputs:
        features: ``{feature: (batch_size, dim) float tensor}`` (other keys are ignored), or the
            ``(batch_size, dim)`` tensor itself.

    Returns:
        ``(batch_size, dim)`` unit vectors. An all-zero row (an entity without the embedding) stays zero,
        so it scores 0 against every query instead of a NaN.

    Example:
        ::

            tower = CompatibilityTower("pinsage_embedding", dim=2)
            tower({"pinsage_embedding": torch.tensor([[3.0, 4.0]])})
            # tensor([[0.6000, 0.8000]])
    """

    def __init__(self, feature: str, dim: int):
        super().__init__()
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"`dim` must be a positive int, got {dim!r}.")
        self.feature = feature
        self.dim = dim

    def forward(self, features: Mapping[str, torch.Tensor] | torch.Tensor) -> torch.Tensor:
        if isinstance(features, Mapping):
            if self.feature not in features:
                raise ValueError(f"Missing feature {self.feature!r}; got {sorted(features)}.")
            features = features[self.feature]
        if features.ndim != 2 or features.shape[-1] != self.dim:
            raise ValueError(
                f"Feature {self.feature!r} must have shape (batch_size, {self.dim}), got {tuple(features.shape)}."
            )
        if not torch.isfinite(features).all():
            raise ValueError(f"Feature {self.feature!r} contains NaN or inf; replace or drop those rows.")
        return F.normalize(features.float(), p=2, dim=-1)

    def get_config_dict(self) -> dict[str, int | str]:
        return {"feature": self.feature, "dim": self.dim}

    def extra_repr(self) -> str:
        return f"feature={self.feature!r}, dim={self.dim}"


__all__ = ["CompatibilityTower"]
