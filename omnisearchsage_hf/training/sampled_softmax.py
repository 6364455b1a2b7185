"""The sampled-softmax cross-entropy: where logits, logQ corrections and accidental-hit masks meet.

Every negative set of ``SampledSoftmaxLoss`` (in-batch, random, hard) is scored by
:func:`sampled_softmax_cross_entropy` with its own mask from :func:`accidental_hits`, so the logit
formula and the masking rules exist once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def accidental_hits(
    positive_ids: Tensor,
    negative_ids: Tensor,
    row_query_ids: Tensor | None = None,
    negative_query_ids: Tensor | None = None,
) -> Tensor:
    """Which negatives must not count as negatives for each row: ``(B, K)`` bool.

    A negative is an accidental hit when it is the row's positive entity, or (in-batch only, when query
    ids are given) when it is another positive of the row's query: a query engaged twice, ``(q, p1)`` and
    ``(q, p2)``, must not push ``p2`` away from ``q``.

    Args:
        positive_ids: ``(B,)`` entity id of each row's positive.
        negative_ids: ``(K,)`` entity id of each negative column.
        row_query_ids: ``(B,)`` query id of each row, or None to skip the same-query test.
        negative_query_ids: ``(K,)`` query id each negative was paired with (in-batch candidates).
    """
    hits = negative_ids[None, :] == positive_ids[:, None]  # (B, K)
    if row_query_ids is not None and negative_query_ids is not None:
        hits = hits | (negative_query_ids[None, :] == row_query_ids[:, None])  # (B, K)
    return hits


def sampled_softmax_cross_entropy(
    positive_scores: Tensor,
    negative_scores: Tensor,
    *,
    scale: Tensor | float,
    hits: Tensor,
    positive_log_q: Tensor | None = None,
    negative_log_q: Tensor | None = None,
) -> Tensor:
    """Mean cross-entropy of each row's positive against its negatives, with logQ correction and masks.

    The one place where logits are built: row ``i``'s logits are ``[scale * s_i+ - log P_i, scale * s_ik -
    log Q_k for each negative k]``, accidental hits are set to the dtype's minimum (after the correction,
    so nothing overflows), and the target is column 0. Scores in half precision are promoted to float32.

    Args:
        positive_scores: ``(B,)`` similarity of each query with its positive.
        negative_scores: ``(B, K)`` similarity of each query with each negative.
        scale: Logit scale (inverse temperature), a float or 0-d tensor.
        hits: ``(B, K)`` bool, True where a negative is masked (see :func:`accidental_hits`).
        positive_log_q: ``(B,)`` subtracted from the positive logits (``log P(p|q)``), or None.
        negative_log_q: ``(K,)`` subtracted from every row's negative logits (``log Q(n)``), or None.

    Returns:
        0-d tensor, the mean over rows.
    """
    dtype = torch.promote_types(negative_scores.dtype, torch.float32)
    positive_logits = scale * positive_scores.to(dtype)  # (B,)
    negative_logits = scale * negative_scores.to(dtype)  # (B, K)
    if positive_log_q is not None:
        positive_logits = positive_logits - positive_log_q.to(dtype)  # (B,)
    if negative_log_q is not None:
        negative_logits = negative_logits - negative_log_q.to(dtype)[None, :]  # (B, K)
    negative_logits = negative_logits.masked_fill(hits, torch.finfo(negative_logits.dtype).min)
    logits = torch.cat([positive_logits[:, None], negative_logits], dim=1)  # (B, 1 + K)
    target = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    return F.cross_entropy(logits, target)


__all__ = ["accidental_hits", "sampled_softmax_cross_entropy"]
