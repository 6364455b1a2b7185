"""Configuration of the OmniSearchSage query tower: a pretrained text encoder, a pooling and a projection."""

from typing import Literal

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

from .saved_folder import ConfigFileErrors

PoolingMode = Literal["cls", "mean"]


@strict
class OmniSearchSageQueryConfig(ConfigFileErrors, PreTrainedConfig):
    """Configuration of :class:`OmniSearchSageQueryModel`, the query tower.

    The query tower embeds a search query with any Hugging Face encoder (the backbone), pools its token
    states into one vector, projects it to ``out_dim`` and L2-normalises it. One such embedding retrieves
    queries, pins and products from a shared space (paper §3.3). The backbone is a nested config, so the
    whole tower saves and loads as one folder.

    Args:
        backbone_config: Config of the encoder, as a ``PreTrainedConfig`` or its dict (which must name its
            ``model_type``). Default: a DistilBERT config with the vocabulary of
            ``distilbert-base-multilingual-cased``, the paper's backbone (random weights: use
            ``OmniSearchSageQueryModel.from_backbone`` to start from pretrained ones).
        pooling: How token states become one vector: ``"cls"`` takes the first token (the paper's
            choice), ``"mean"`` averages the non-padding tokens. Default ``"cls"``.
        out_dim: Size of the output embedding, >= 1. Default 256 (the paper's; the reference trains 512
            Matryoshka-style, any prefix then being usable through ``encode(truncate_dim=...)``).
        query_prefix: Text put before every query by ``encode``, e.g. ``"query: "`` for e5 backbones.
            Default ``""``.
        max_length: Longest tokenised query kept by ``encode``, in tokens including special tokens,
            >= 1. Default 64 (search queries are short; the bound also caps the cost of pasted text).
        initializer_range: Standard deviation of the normal init of the projection. Default 0.02.
        projection_init: ``"normal"`` (default) or ``"identity"``: the projection starts as the identity on
            the first ``out_dim`` pooled dimensions (needs ``out_dim <= hidden_size``), so a tower built with
            ``from_backbone`` starts out embedding exactly like its pretrained encoder (e.g. zero-shot e5)
            and fine-tuning starts from that quality instead of from a random projection.

    Relations:
        ``OmniSearchSageEntityConfig`` configures the tower on the other side; both must share
        ``out_dim`` to be scored against each other.

    Example:
        ```python
        from transformers import DistilBertConfig
        from omnisearchsage_hf import OmniSearchSageQueryConfig

        backbone = DistilBertConfig(vocab_size=1000, dim=32, n_layers=2, n_heads=2, hidden_dim=64)
        config = OmniSearchSageQueryConfig(backbone_config=backbone, pooling="mean", out_dim=16)
        print(config.backbone_config.model_type, config.backbone_config.hidden_size, config.out_dim)
        # distilbert 32 16
        ```
    """

    model_type = "omnisearchsage_query"
    sub_configs_defaults = {
        # The paper's backbone, distilbert-base-multilingual-cased: DistilBERT with mBERT's vocabulary.
        "backbone_config": SubConfigSpec(
            config_class=AutoConfig, model_type="distilbert", init_kwargs={"vocab_size": 119547}
        ),
    }

    backbone_config: dict | PreTrainedConfig | None = None
    pooling: PoolingMode = "cls"
    out_dim: int = 256
    query_prefix: str = ""
    max_length: int = 64
    initializer_range: float = 0.02
    projection_init: Literal["normal", "identity"] = "normal"

    def validate_out_dim(self):
        """Part of `@strict` validation: the projection needs at least one output."""
        if self.out_dim < 1:
            raise ValueError(f"`out_dim` must be >= 1, got {self.out_dim!r}.")

    def validate_max_length(self):
        """Part of `@strict` validation: `encode` must keep at least one token per query."""
        if self.max_length < 1:
            raise ValueError(f"`max_length` must be >= 1 (tokens per query), got {self.max_length!r}.")

    def validate_projection_init(self):
        """Part of `@strict` validation: an identity projection cannot widen the pooled vector."""
        hidden = getattr(self.backbone_config, "hidden_size", None)
        if self.projection_init == "identity" and hidden is not None and self.out_dim > hidden:
            raise ValueError(
                f"`projection_init='identity'` needs `out_dim` <= the backbone's hidden size ({hidden}), "
                f"got {self.out_dim}."
            )

    def validate_backbone(self):
        """Part of `@strict` validation: the projection is sized from the backbone's `hidden_size`."""
        if getattr(self.backbone_config, "hidden_size", None) is None:
            raise ValueError(
                f"`backbone_config` ({type(self.backbone_config).__name__}) has no `hidden_size`: use the config of "
                "a text encoder such as BERT, DistilBERT, XLM-R or e5."
            )


__all__ = ["OmniSearchSageQueryConfig", "PoolingMode"]
