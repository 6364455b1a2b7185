"""Configurations and models: query tower, entity tower and its hash embedding, compatibility towers, ItemSage."""

from .compatibility import CompatibilityTower
from .configuration_entity import OmniSearchSageEntityConfig
from .configuration_itemsage import ItemSageConfig
from .configuration_query import OmniSearchSageQueryConfig
from .modeling_entity import OmniSearchSageEntityModel, OmniSearchSageEntityOutput
from .modeling_hash_embedding import HashEmbeddingBag
from .modeling_itemsage import ItemSageModel, ItemSageOutput
from .modeling_query import OmniSearchSageQueryModel

__all__ = [
    "CompatibilityTower",
    "HashEmbeddingBag",
    "ItemSageConfig",
    "ItemSageModel",
    "ItemSageOutput",
    "OmniSearchSageEntityConfig",
    "OmniSearchSageEntityModel",
    "OmniSearchSageEntityOutput",
    "OmniSearchSageQueryConfig",
    "OmniSearchSageQueryModel",
]
