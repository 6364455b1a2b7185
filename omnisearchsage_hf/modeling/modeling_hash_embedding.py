"""Hash embeddings (Svenstrup et al., 2017) summed into bags: the entity tower's text encoder.

A vocabulary of 1.26M n-grams would need a 1.26M x 256 table. A hash embedding instead keeps a shared
table of B rows (100k) and maps each token id t to k rows with universal hashes
``h_i(t) = ((a_i * t + b_i) mod p_i) mod B``, mixed by a learned importance weight per (token, hash).
Two tokens that collide in one row almost never collide in the other, so quality stays close to a full
table at a twelfth of the size. One ``F.embedding_bag`` call with ``per_sample_weights`` computes every
bag of a batch. Each field's bag is then LayerNorm-ed with its own scale and shift (``FieldLayerNorm``).
Both the entity tower and ItemSage embed text this way; any config with the hash fields (``vocab_size``,
``num_buckets``, ``embedding_dim``, ``num_hashes``, ``hash_a/b/p``, ``text_fields``) builds them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedConfig
from transformers import initialization as init


class HashEmbeddingBag(nn.Module):
    """Sum-pooled hash embedding of bags of token ids.

    Inputs:
        input_ids: ``(num_tokens,)`` int64 token ids of all bags, concatenated.
        offsets: ``(num_bags,)`` int64 start of each bag in ``input_ids``.

    Returns:
        ``(num_bags, embedding_dim)``: per bag, ``sum_t sum_i importance[t, i] * weight[h_i(t)]``
        (zeros for an empty bag).

    References:
        Svenstrup, Hansen, Winther. Hash Embeddings for Efficient Word Representations. NeurIPS 2017.
        https://arxiv.org/abs/1709.03933
    """

    def __init__(self, config: PreTrainedConfig):
        super().__init__()
        self.num_buckets = config.num_buckets
        self.num_hashes = config.num_hashes
        self.weight = nn.Parameter(torch.empty(config.num_buckets, config.embedding_dim))
        self.importance = nn.Parameter(torch.empty(config.vocab_size, config.num_hashes))
        self.hash_a, self.hash_b, self.hash_p = config.hash_a, config.hash_b, config.hash_p
        # Every token's rows, precomputed: one gather instead of int64 modulo arithmetic on every batch.
        # Derived from the config, so not saved; `_init_weights` fills it with `bucket_ids(arange(vocab_size))`.
        self.register_buffer(
            "bucket_table", torch.empty(config.vocab_size, config.num_hashes, dtype=torch.long), persistent=False
        )

    def bucket_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Rows of the shared table for each token, from the hash functions: ``(num_tokens, num_hashes)``."""
        a, b, p = (
            torch.tensor(v, dtype=torch.long, device=input_ids.device) for v in (self.hash_a, self.hash_b, self.hash_p)
        )
        # a < 2**31 and ids < p < 2**31, so a * t + b stays far below 2**63.
        return (input_ids[:, None] * a + b) % p % self.num_buckets

    def forward(self, input_ids: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        rows = self.bucket_table[input_ids].reshape(-1)  # (num_tokens * num_hashes,)
        # F.embedding, not indexing: its backward adds duplicate ids in a fixed order on every thread count,
        # so two runs with one seed train the same weights.
        weights = F.embedding(input_ids, self.importance).reshape(-1)  # (num_tokens * num_hashes,)
        return F.embedding_bag(
            rows, self.weight, offsets * self.num_hashes, mode="sum", per_sample_weights=weights.to(self.weight.dtype)
        )  # (num_bags, embedding_dim)


class FieldLayerNorm(nn.Module):
    """LayerNorm with its own scale and shift per text field; absent fields contribute zero.

    Inputs:
        bags: ``(num_fields, batch_size, dim)`` summed n-gram embeddings.
        present: ``(num_fields, batch_size)`` bool, False where a field's bag is empty.
    """

    def __init__(self, config: PreTrainedConfig):
        super().__init__()
        self.eps = config.layer_norm_eps
        self.weight = nn.Parameter(torch.empty(len(config.text_fields), config.embedding_dim))
        self.bias = nn.Parameter(torch.empty(len(config.text_fields), config.embedding_dim))

    def forward(self, bags: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        normed = F.layer_norm(bags, bags.shape[-1:], eps=self.eps)  # (num_fields, batch_size, dim)
        normed = normed * self.weight[:, None, :] + self.bias[:, None, :]
        # Without the mask a missing field would still add its bias, so "no title" would look like a title.
        return normed * present[..., None].to(normed.dtype)


@torch.no_grad()
def init_text_bags(module: nn.Module, config: PreTrainedConfig) -> None:
    """``_init_weights`` of a ``HashEmbeddingBag`` or ``FieldLayerNorm`` (other modules are left alone)."""
    if isinstance(module, HashEmbeddingBag):
        init.normal_(module.weight, mean=0.0, std=config.initializer_range)
        init.ones_(module.importance)
        init.copy_(module.bucket_table, module.bucket_ids(torch.arange(config.vocab_size)))
    elif isinstance(module, FieldLayerNorm):
        init.ones_(module.weight)
        init.zeros_(module.bias)


__all__ = ["FieldLayerNorm", "HashEmbeddingBag", "init_text_bags"]
