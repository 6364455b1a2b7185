"""Configuration of the OmniSearchSage entity tower (pins and products)."""

import random

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig

from .saved_folder import ConfigFileErrors

DEFAULT_TEXT_FIELDS = ("title", "description", "caption", "board_titles", "engaged_queries", "brand", "color")
DEFAULT_DENSE_FEATURES = {"pinsage_embedding": 256, "visual_embedding": 256, "itemsage_embedding": 256}
# Keys an entity dict may carry besides its features; they are ignored by the model.
RESERVED_KEYS = ("id",)


def is_prime(n: int) -> bool:
    """Deterministic Miller-Rabin: exact for every n < 3.3e24 (far past any hash prime)."""
    if n < 2:
        return False
    bases = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41)
    if n in bases:
        return True
    if any(n % b == 0 for b in bases):
        return False
    d, r = n - 1, 0
    while d % 2 == 0:
        d, r = d // 2, r + 1
    for base in bases:
        x = pow(base, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(r - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def _primes_below(limit: int, count: int) -> list[int]:
    primes, candidate = [], limit - 1
    while len(primes) < count:
        if is_prime(candidate):
            primes.append(candidate)
        candidate -= 1
    return primes


def fill_hash_parameters(config: PreTrainedConfig) -> None:
    """Draw the universal hash parameters a config leaves as None (``hash_a``, ``hash_b``, ``hash_p``).

    Primes ``p_i`` just below 2**31 (> any vocabulary); ``a_i``, ``b_i`` from ``hash_seed``. Any config with
    the hash embedding's fields (``num_hashes``, ``hash_seed``, ``hash_a/b/p``) can use it.
    """
    if config.hash_p is None:
        config.hash_p = _primes_below(2**31, config.num_hashes)
    rng = random.Random(config.hash_seed)
    if config.hash_a is None:
        config.hash_a = [rng.randrange(1, p) for p in config.hash_p]
    if config.hash_b is None:
        config.hash_b = [rng.randrange(0, p) for p in config.hash_p]


def check_hash_parameters(config: PreTrainedConfig) -> None:
    """Raise unless each hash parameter has ``num_hashes`` entries, ``p`` is a prime > ``vocab_size``,
    ``1 <= a < p`` and ``0 <= b < p`` (what makes ``h(t) = ((a*t + b) mod p) mod B`` a universal hash).

    Any config with the hash embedding's fields can use it. An edit that keeps these true (another
    valid ``a``) still changes every bucket; the folder's ``checksums.json`` catches that one.
    """
    for name in ("hash_a", "hash_b", "hash_p"):
        if len(getattr(config, name)) != config.num_hashes:
            raise ValueError(f"`{name}` has {len(getattr(config, name))} entries; `num_hashes` is {config.num_hashes}.")
    for a, b, p in zip(config.hash_a, config.hash_b, config.hash_p, strict=True):
        if not (p > config.vocab_size and is_prime(p) and 1 <= a < p and 0 <= b < p):
            raise ValueError(
                f"Hash parameters need a prime p > vocab_size ({config.vocab_size}), 1 <= a < p and 0 <= b < p; "
                f"got a={a}, b={b}, p={p}."
            )


@strict
class OmniSearchSageEntityConfig(ConfigFileErrors, PreTrainedConfig):
    r"""Configuration of [`OmniSearchSageEntityModel`], the tower that embeds pins and products.

    The tower sums a hash embedding of each text field's n-grams (one bag per field, each LayerNorm-ed),
    concatenates named pre-existing embeddings (PinSage-like, visual, ItemSage-like; zeros when an entity
    lacks one), and maps the result through an MLP to a unit vector in the query tower's space.

    Args:
        vocab_size: Number of n-gram ids the tokenizer emits (trigrams + unigrams + bigrams + OOV
            buckets); sizes the per-token importance weights. Must be >= the tokenizer's ``vocab_size``.
        text_fields: Names of the text fields, each embedded as its own bag. A field may hold a string or
            a list of strings (board titles, engaged queries).
        dense_features: Name → dimension of each pre-existing embedding the tower reads (kept sorted by
            name, the order in which they are concatenated).
        num_buckets: Rows B of the shared hash embedding table (paper: 100,000).
        embedding_dim: Width d of the hash embedding table.
        num_hashes: Hash functions k per token (paper: 2).
        hash_a, hash_b, hash_p: Universal hash parameters, ``h_i(t) = ((a_i * t + b_i) mod p_i) mod B``.
            Stored so every process and every reload hashes identically; drawn from ``hash_seed`` when
            left as None, with primes ``p_i`` just below 2**31 (> any vocabulary).
        hash_seed: Seed that draws ``hash_a``/``hash_b`` when they are not given.
        hidden_dims: Widths of the MLP's hidden layers (paper: 1024, 1024).
        out_dim: Output embedding size; must match the query tower's.
        residual_features: Optional ``name → initial weight`` of dense features of width ``out_dim`` whose
            weighted sum is added to the MLP's output before normalisation, the MLP's last layer starting at
            zero and the weights learned from there: the tower then starts out as that mix of pre-existing
            embeddings (e.g. the zero-shot passage embedding of an entity's text and of its context) and
            learns a correction from the text n-grams, instead of learning the whole space from scratch.
            None or empty (default) is the paper's plain MLP.
        residual_correction_scale: Initial value of a learned scalar that multiplies the MLP's output when
            ``residual_features`` are set. Adam moves every weight of a wide layer at about the learning
            rate, so the correction of an unscaled MLP soon outweighs the unit-norm pre-existing embedding,
            however small that rate; a small scale keeps the tower near its starting point.
        layer_norm_eps: Epsilon of every LayerNorm.
        initializer_range: Standard deviation of the normal initialisation of linear and embedding weights.

    Example:
        ::

            from omnisearchsage_hf import OmniSearchSageEntityConfig, OmniSearchSageEntityModel

            config = OmniSearchSageEntityConfig(vocab_size=1000, num_buckets=512, embedding_dim=32,
                                                hidden_dims=[64, 64], out_dim=16,
                                                dense_features={"image_embedding": 8})
            model = OmniSearchSageEntityModel(config)
    """

    model_type = "omnisearchsage_entity"

    vocab_size: int = 1_264_000
    text_fields: list[str] | tuple[str, ...] = DEFAULT_TEXT_FIELDS
    dense_features: dict[str, int] | None = None
    num_buckets: int = 100_000
    embedding_dim: int = 256
    num_hashes: int = 2
    hash_a: list[int] | None = None
    hash_b: list[int] | None = None
    hash_p: list[int] | None = None
    hash_seed: int = 0
    hidden_dims: list[int] | tuple[int, ...] = (1024, 1024)
    out_dim: int = 256
    residual_features: dict[str, float] | None = None
    residual_correction_scale: float = 1.0
    layer_norm_eps: float = 1e-5
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        self.text_fields = list(self.text_fields)
        self.hidden_dims = list(self.hidden_dims)
        # Sorted by name: the model concatenates in this order, and saved JSON sorts dict keys anyway.
        self.dense_features = dict(sorted((self.dense_features or DEFAULT_DENSE_FEATURES).items()))
        self.residual_features = {name: float(w) for name, w in sorted((self.residual_features or {}).items())}
        fill_hash_parameters(self)
        super().__post_init__(**kwargs)

    def vector_features(self) -> dict[str, int]:
        """Name → width of each vector input: the pre-existing embeddings."""
        return dict(self.dense_features)

    def input_features(self) -> list[str]:
        """The entity-dict keys the tower reads: its text fields, then its vector features."""
        return [*self.text_fields, *self.vector_features()]

    def validate_architecture(self):
        """Part of `@strict`-powered validation: sizes, field names and hash parameters agree."""
        for name in ("vocab_size", "num_buckets", "embedding_dim", "num_hashes", "out_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be >= 1, got {getattr(self, name)!r}.")
        if any(width < 1 for width in self.hidden_dims):
            raise ValueError(f"Every entry of `hidden_dims` must be >= 1, got {self.hidden_dims!r}.")
        names = list(self.text_fields) + list(self.dense_features)
        if not names:
            raise ValueError("The entity tower needs at least one text field or dense feature.")
        clashes = sorted({n for n in names if names.count(n) > 1} | (set(names) & set(RESERVED_KEYS)))
        if clashes:
            raise ValueError(f"Feature names must be unique and not reserved {RESERVED_KEYS}; offending: {clashes}.")
        if any(not isinstance(d, int) or d < 1 for d in self.dense_features.values()):
            raise ValueError(f"`dense_features` must map names to positive int dims, got {self.dense_features!r}.")
        wrong = [name for name in self.residual_features if self.dense_features.get(name) != self.out_dim]
        if wrong:
            raise ValueError(
                f"`residual_features` {wrong} must be dense features of width out_dim ({self.out_dim}); "
                f"dense features: {self.dense_features}."
            )
        check_hash_parameters(self)


__all__ = ["OmniSearchSageEntityConfig", "check_hash_parameters", "fill_hash_parameters", "is_prime"]
