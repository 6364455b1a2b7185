"""Publishing: Hub pushes with generated model cards (or the same folders written locally), and the
sentence-transformers query–document model.
"""

from .entity_module import OmniSearchSageEntityModule
from .hub import card_kind, publish, push_folder, push_to_hub
from .model_card import CARD_KINDS, eval_results, load_template, model_card
from .query_document import save_query_document_model

__all__ = [
    "CARD_KINDS",
    "OmniSearchSageEntityModule",
    "card_kind",
    "eval_results",
    "load_template",
    "model_card",
    "publish",
    "push_folder",
    "push_to_hub",
    "save_query_document_model",
]
