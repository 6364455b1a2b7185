"""The entity tower's n-gram tokenizer and the vocabulary builder."""

from .tokenization_omnisearchsage import BagEncoding, OmniSearchSageTokenizer
from .vocabulary import build_vocab

__all__ = ["BagEncoding", "OmniSearchSageTokenizer", "build_vocab"]
