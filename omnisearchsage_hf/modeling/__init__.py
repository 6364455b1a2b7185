"""Configurations and models: the query tower, the entity tower and its hash embedding, compatibility towers."""

from .compatibility import CompatibilityTower
from .configuration_entity import OmniSearchSageEntityConfig
from .configuration_query import OmniSearchSageQueryConfig
from .modeling_entity import OmniSearchSageEntityModel, OmniSearchSageEntityOutput
from .modeling_hash_embedding import HashEmbeddingBag
from .modeling_query import OmniSearchSageQueryModel

__all__ = [
    "CompatibilityTower",
    "HashEmbeddingBag",
    "OmniSearchSageEntityConfig",
    "OmniSearchSageEntityModel",
    "OmniSearchSageEntityOutput",
    "OmniSearchSageQueryConfig",
    "OmniSearchSageQueryModel",
]
