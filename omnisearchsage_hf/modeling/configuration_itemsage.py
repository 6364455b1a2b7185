"""Configuration of ItemSage, the multimodal product embedding that feeds OmniSearchSage's product side."""

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig

from .configuration_entity import RESERVED_KEYS, check_hash_parameters, fill_hash_parameters
from .saved_folder import ConfigFileErrors

DEFAULT_PRODUCT_FIELDS = ("title", "description", "brand", "color", "product_type")


@strict
class ItemSageConfig(ConfigFileErrors, PreTrainedConfig):
    r"""Configuration of [`ItemSageModel`]: a small transformer over a product's images and text fields.

    ItemSage (Baltescu et al., KDD 2022) reads a learned [CLS] slot, up to ``max_images`` image embeddings
    (each projected to ``hidden_size``) and one slot per text field (the field's n-gram hash-embedding bag,
    as in the entity tower), runs a transformer encoder over the present slots, and maps the [CLS] output
    through an MLP to a unit vector of ``out_dim``.

    Args:
        vocab_size: Number of n-gram ids the entity tokenizer emits (sizes the per-token importance weights);
            unused (and may be 0) without text fields.
        text_fields: Names of the product's text fields, one slot each (a string or a list of strings).
        image_feature: Name of the input holding a product's image embeddings (a vector or a list of them);
            None reads no images (a text-only model).
        image_dim: Width of each image embedding.
        max_images: Most images per product (paper: 20); a product with more is an error.
        num_buckets, embedding_dim, num_hashes, hash_a, hash_b, hash_p, hash_seed: The text fields' hash
            embedding, as in [`OmniSearchSageEntityConfig`].
        hidden_size: Width of every slot and of the transformer.
        num_hidden_layers: Transformer encoder layers.
        num_attention_heads: Attention heads; must divide ``hidden_size``.
        intermediate_size: Width of each layer's feed-forward block.
        hidden_dropout_prob: Dropout on attention weights and residual branches while training.
        head_hidden_dims: Widths of the MLP's hidden layers between [CLS] and the output.
        out_dim: Output embedding size (the pin and query embeddings' width, for compatibility).
        layer_norm_eps: Epsilon of every LayerNorm.
        initializer_range: Standard deviation of the normal initialisation of linear and embedding weights.

    Example:
        ::

            from omnisearchsage_hf import ItemSageConfig, ItemSageModel

            config = ItemSageConfig(vocab_size=1000, num_buckets=512, embedding_dim=32, image_dim=8,
                                    hidden_size=32, num_attention_heads=2, intermediate_size=64, out_dim=16)
            model = ItemSageModel(config)
    """

    model_type = "itemsage"

    vocab_size: int = 1_264_000
    text_fields: list[str] | tuple[str, ...] = DEFAULT_PRODUCT_FIELDS
    image_feature: str | None = "image_embeddings"
    image_dim: int = 256
    max_images: int = 20
    num_buckets: int = 100_000
    embedding_dim: int = 256
    num_hashes: int = 2
    hash_a: list[int] | None = None
    hash_b: list[int] | None = None
    hash_p: list[int] | None = None
    hash_seed: int = 0
    hidden_size: int = 256
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    intermediate_size: int = 1024
    hidden_dropout_prob: float = 0.1
    head_hidden_dims: list[int] | tuple[int, ...] = (1024,)
    out_dim: int = 256
    layer_norm_eps: float = 1e-5
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        self.text_fields = list(self.text_fields)
        self.head_hidden_dims = list(self.head_hidden_dims)
        fill_hash_parameters(self)
        super().__post_init__(**kwargs)

    def vector_features(self) -> dict[str, int]:
        """Name → width of each vector input: ``{image_feature: image_dim}``, nothing for a text-only model."""
        return {self.image_feature: self.image_dim} if self.image_feature else {}

    def input_features(self) -> list[str]:
        """The product-dict keys the model reads: its text fields, then its image feature."""
        return [*self.text_fields, *self.vector_features()]

    def validate_architecture(self):
        """Part of `@strict`-powered validation: sizes, field names and hash parameters agree."""
        if self.text_fields and self.vocab_size < 1:
            raise ValueError(f"`vocab_size` must be >= 1 when there are text fields, got {self.vocab_size!r}.")
        for name in (
            "image_dim",
            "max_images",
            "num_buckets",
            "embedding_dim",
            "num_hashes",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
            "out_dim",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be >= 1, got {getattr(self, name)!r}.")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"`hidden_size` ({self.hidden_size}) must be a multiple of `num_attention_heads` "
                f"({self.num_attention_heads})."
            )
        if any(width < 1 for width in self.head_hidden_dims):
            raise ValueError(f"Every entry of `head_hidden_dims` must be >= 1, got {self.head_hidden_dims!r}.")
        if not 0 <= self.hidden_dropout_prob < 1:
            raise ValueError(f"`hidden_dropout_prob` must be in [0, 1), got {self.hidden_dropout_prob!r}.")
        names = self.input_features()
        if not names:
            raise ValueError("ItemSage needs at least one text field or an `image_feature`.")
        clashes = sorted({n for n in names if names.count(n) > 1} | (set(names) & set(RESERVED_KEYS)))
        if clashes:
            raise ValueError(f"Field names must be unique and not reserved {RESERVED_KEYS}; offending: {clashes}.")
        check_hash_parameters(self)


__all__ = ["ItemSageConfig"]
