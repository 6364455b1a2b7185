"""Zero-shot dense baselines: a local pretrained encoder folder as a sentence-transformers model.

The quality benchmarks compare OmniSearchSage with off-the-shelf encoders used the way their authors
intend (multilingual-e5: mean pooling with ``query: ``/``passage: `` prefixes; all-MiniLM-L6-v2: its own
sentence-transformers pipeline). ``omnisearchsage_hf.data.encoders.load_sentence_encoder`` builds
either from a local folder, and ``zero_shot_scorer`` turns one into a ``DenseScorer`` over any text of a
corpus row.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from .scoring import DenseScorer


def zero_shot_scorer(
    encoder,
    text: Callable[[Mapping[str, Any]], str],
    *,
    query_prefix: str = "",
    passage_prefix: str = "",
    batch_size: int = 64,
) -> DenseScorer:
    """Score queries against corpus rows with one pretrained encoder on both sides.

    Args:
        encoder: A ``SentenceTransformer`` (e.g. from ``data.encoders.load_sentence_encoder``).
        text: ``row → str``, the passage text of a corpus row.
        query_prefix, passage_prefix: Prepended to each side (``"query: "``/``"passage: "`` for e5).
        batch_size: Encoding batch size.

    Example:
        ::

            e5 = load_sentence_encoder(e5_folder)
            scorer = zero_shot_scorer(e5, lambda r: r["sentence"], query_prefix="query: ", passage_prefix="passage: ")
    """

    def encode(texts: list[str]) -> np.ndarray:
        return encoder.encode(texts, batch_size=batch_size, normalize_embeddings=True, show_progress_bar=False)

    return DenseScorer(
        lambda queries: encode([query_prefix + q for q in queries]),
        lambda rows: encode([passage_prefix + text(row) for row in rows]),
    )


__all__ = ["zero_shot_scorer"]
