"""OmniSearchSage as Hugging Face models: one query embedding for queries, pins and products.

Importing the package registers the towers, ItemSage and the entity tokenizer with ``AutoConfig``,
``AutoModel`` and ``AutoTokenizer``, so ``AutoModel.from_pretrained(folder)`` returns our classes.
"""

from transformers import AutoConfig, AutoModel, AutoTokenizer

from .modeling import (
    CompatibilityTower,
    HashEmbeddingBag,
    ItemSageConfig,
    ItemSageModel,
    ItemSageOutput,
    OmniSearchSageEntityConfig,
    OmniSearchSageEntityModel,
    OmniSearchSageEntityOutput,
    OmniSearchSageQueryConfig,
    OmniSearchSageQueryModel,
)
from .tokenization import BagEncoding, OmniSearchSageTokenizer, build_vocab

for _config, _model in (
    (OmniSearchSageQueryConfig, OmniSearchSageQueryModel),
    (OmniSearchSageEntityConfig, OmniSearchSageEntityModel),
    (ItemSageConfig, ItemSageModel),
):
    AutoConfig.register(_config.model_type, _config)
    AutoModel.register(_config, _model)
    # Saved folders then carry an `auto_map` and the code files, so they also load without this package.
    _config.register_for_auto_class()
    _model.register_for_auto_class("AutoModel")
for _config in (OmniSearchSageEntityConfig, ItemSageConfig):  # both read text through the n-gram tokenizer
    AutoTokenizer.register(_config, OmniSearchSageTokenizer)
OmniSearchSageTokenizer.register_for_auto_class("AutoTokenizer")

__version__ = "0.1.0"

__all__ = [
    "BagEncoding",
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
    "OmniSearchSageTokenizer",
    "build_vocab",
]
