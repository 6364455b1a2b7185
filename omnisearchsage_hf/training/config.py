"""The training configuration: typed sections read from YAML, with command-line overrides.

``training/train.py --config training/configs/tiny.yaml --train.max_steps 50 --output_dir runs/x``
reads the YAML into these dataclasses; any key can be overridden as ``--section.key value`` (values are
parsed as YAML, so ``--loss.matryoshka_dims [64,128]`` works). Unknown keys are errors that list the
valid ones, so a typo never silently trains the wrong model.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

DataSource = Literal["files", "synthetic", "xquad_r", "amazon_pqa"]
MixedPrecision = Literal["no", "bf16", "fp16"]
EntityArchitecture = Literal["omnisearchsage", "itemsage"]
# Paper §3.5: at most 50 training pairs per pin and 200 per product, so popular entities don't dominate.
DEFAULT_POPULARITY_CAPS = {"pin": 50, "product": 200}


CandidateKind = Literal["entity", "query", "compat"]


@dataclass(frozen=True)
class Candidate:
    """What embeds a task's candidates, parsed once from its config string.

    ``"entity:<table>"``: the learned entity tower over that entity table; ``"query"``: the query tower
    itself (query→query pairs); ``"compat:<table>:<feature>"``: a compatibility tower returning the
    table's pre-existing embedding ``feature``. ``str(candidate)`` gives the config string back.
    """

    kind: CandidateKind
    table: str | None = None
    feature: str | None = None

    @classmethod
    def parse(cls, text: str, *, task: str = "?") -> Candidate:
        parts = text.split(":") if isinstance(text, str) else []
        arity = {"entity": 2, "query": 1, "compat": 3}
        if not parts or parts[0] not in arity or len(parts) != arity[parts[0]] or not all(parts):
            raise ValueError(
                f"Task {task!r}: `candidate` {text!r} must be 'entity:<table>', 'query' or 'compat:<table>:<feature>'."
            )
        return cls(parts[0], *parts[1:])

    def __str__(self) -> str:
        return ":".join(part for part in (self.kind, self.table, self.feature) if part is not None)


@dataclass(frozen=True)
class QueryFeature:
    """A fixed query side: the pre-existing embedding ``feature`` of the entity table ``table``.

    Parsed from ``"<table>:<feature>"``; ``str()`` gives that string back.
    """

    table: str
    feature: str

    @classmethod
    def parse(cls, text: str, *, task: str = "?") -> QueryFeature:
        parts = text.split(":") if isinstance(text, str) else []
        if len(parts) != 2 or not all(parts):
            raise ValueError(f"Task {task!r}: `query_feature` {text!r} must be '<table>:<feature>'.")
        return cls(*parts)

    def __str__(self) -> str:
        return f"{self.table}:{self.feature}"


@dataclass
class TaskConfig:
    """One training task: a pair source, the tower that embeds its candidates, and its share of each batch.

    Args:
        name: Unique task name, used in logs and metric keys (``query_pin``).
        candidate: ``"entity:<table>"`` (the learned entity tower over that entity table), ``"query"``
            (the query tower itself: query→query pairs), or ``"compat:<table>:<feature>"`` (a compatibility
            tower returning the table's pre-existing embedding ``feature``).
        pairs: Training pairs file (parquet, jsonl or csv) with ``query`` and ``candidate_id`` columns.
        eval_pairs: Held-out pairs for the periodic Recall@10 (same columns), or None.
        share: Relative share of every batch (paper: pins 8 : products 4 : queries 2 : other 2).
        max_pairs_per_candidate: Popularity cap; None uses 50 for ``pin`` tables, 200 for ``product``
            tables and no cap otherwise.
        num_random_negatives: Catalogue negatives per process and step (0 disables the random-negative
            cross-entropy); sampled uniformly from the candidate table.
        query_feature: None (default): the ``query`` column is text for the query tower. ``"<table>:<feature>"``:
            the ``query`` column holds ids of that entity table, and the query side is their fixed
            pre-existing embedding ``feature`` (e.g. ``pin:pinsage_embedding`` for pin → product pairs, or a
            legacy query embedding), which keeps the candidate tower compatible with that space.
        engagements: Keep only the pairs whose ``engagement`` column is one of these (e.g. ``[checkout]``),
            for one task per engagement type; None keeps every pair.
        num_hard_negatives: Hard negatives drawn per pair and step (0, the default, disables them); each
            step draws them afresh from the pair's pool, without replacement and never the positive, and a
            pool with fewer gives fewer (see ``hard_negatives.py``). Needs one of the two pools below.
            Only for ``entity`` and ``compat`` candidates.
        hard_negatives: Pool per query: a table written by ``omnisearchsage-mine`` (``query``,
            ``negative_ids`` columns), ids of the candidate table. A relative path is relative to the
            working directory (like a model folder), not to the prepared data folder.
        hard_negatives_group: Pool per positive: the other entities of the candidate table with the same
            value in this column (e.g. ``paragraph``: sentences of the gold sentence's paragraph).
        hard_negatives_weight: Weight of the hard-negative cross-entropy in the task's loss (> 0).
    """

    name: str
    candidate: Candidate | str
    pairs: str | None = None
    eval_pairs: str | None = None
    share: float = 1.0
    max_pairs_per_candidate: int | None = None
    num_random_negatives: int = 0
    query_feature: QueryFeature | str | None = None
    engagements: list[str] | None = None
    num_hard_negatives: int = 0
    hard_negatives: str | None = None
    hard_negatives_group: str | None = None
    hard_negatives_weight: float = 1.0

    def __post_init__(self):
        if not isinstance(self.candidate, Candidate):
            self.candidate = Candidate.parse(self.candidate, task=self.name)
        if self.query_feature is not None and not isinstance(self.query_feature, QueryFeature):
            self.query_feature = QueryFeature.parse(self.query_feature, task=self.name)

    @property
    def table(self) -> str | None:
        """The entity table of the candidates (None for query→query tasks)."""
        return self.candidate.table

    def to_dict(self) -> dict[str, Any]:
        """The fields as they are written in YAML (candidate and query feature as strings)."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        values["candidate"] = str(self.candidate)
        values["query_feature"] = None if self.query_feature is None else str(self.query_feature)
        return values


@dataclass
class DataConfig:
    """Where pairs and entities come from.

    Args:
        source: ``files`` (paths given here), or a source prepared under ``<output_dir>/data``, to which the
            paths are then relative: ``synthetic`` (a generated world, see ``data.synthetic``), ``xquad_r`` or
            ``amazon_pqa`` (real data sets read from ``root``, see ``data.xquad_r`` and ``data.amazon_pqa``).
        entities: Entity table name → file (parquet, jsonl or csv) with an ``id`` column.
        tasks: The tasks trained together.
        synthetic: ``SyntheticWorldConfig`` fields for ``source: synthetic``.
        root: Folder of the real data sets, read in place; ``~`` and ``$VARS`` are expanded. The default,
            ``$OMNISEARCHSAGE_DATA``, is the environment variable that names it (README, "Data").
        options: Keyword options of the real source's table builder (``build_xquad_r_tables``,
            ``build_epqa_tables``), e.g. ``{compat_encoder: <folder>}`` or ``{engaged_queries: false}``.
        embedding_sources: ``"<table>.<feature>" → model folder``: before training, that model (e.g. a
            trained ItemSage) embeds every row of the table by batch inference, and its embeddings become
            the table's column ``feature``, replacing one of that name. The entity tower then reads them
            as a pre-existing embedding and ``compat:<table>:<feature>`` tasks train against them.
    """

    source: DataSource = "files"
    entities: dict[str, str] = field(default_factory=dict)
    tasks: list[TaskConfig] = field(default_factory=list)
    synthetic: dict[str, Any] = field(default_factory=dict)
    root: str = "$OMNISEARCHSAGE_DATA"
    options: dict[str, Any] = field(default_factory=dict)
    embedding_sources: dict[str, str] = field(default_factory=dict)


@dataclass
class ModelConfig:
    """The two towers.

    Args:
        backbone: Folder or Hub id of the query tower's pretrained encoder; None builds ``backbone_config``
            from scratch with a WordPiece tokenizer trained on the training queries (tests, tiny runs).
        backbone_config: Encoder config dict (with ``model_type``) for a from-scratch query tower.
        query_tokenizer_vocab_size: WordPiece vocabulary of a from-scratch query tower.
        query: Other ``OmniSearchSageQueryConfig`` fields (``pooling``, ``out_dim``, ``query_prefix``…).
        entity_architecture: The candidate tower of ``entity:`` tasks: ``omnisearchsage`` (the entity tower
            of the paper, pins and products) or ``itemsage`` (ItemSage, a transformer over a product's
            images and text fields; see ``ItemSageModel``).
        entity: Fields of that tower's config (``OmniSearchSageEntityConfig``: ``text_fields``,
            ``dense_features``…; ``ItemSageConfig``: ``text_fields``, ``image_feature``, ``hidden_size``…).
        tokenizer: Folder of a saved entity tokenizer; None builds one from the training entities' text.
        vocab: ``build_vocab`` arguments when the tokenizer is built.
        freeze_backbone_embeddings: Keep the query backbone's token embeddings fixed. A multilingual
            vocabulary is most of the backbone's weights (96M of multilingual-e5-small's 118M), so this
            makes each step several times cheaper and keeps rare tokens where pretraining put them.
        freeze_backbone_layers: Keep the query backbone's lowest N transformer blocks fixed too (with
            frozen embeddings, backpropagation then stops at block N): cheaper steps, and on a small data
            set less drift from what pretraining learned.
    """

    backbone: str | None = None
    backbone_config: dict[str, Any] | None = None
    query_tokenizer_vocab_size: int = 4000
    query: dict[str, Any] = field(default_factory=dict)
    entity_architecture: EntityArchitecture = "omnisearchsage"
    entity: dict[str, Any] = field(default_factory=dict)
    tokenizer: str | None = None
    vocab: dict[str, Any] = field(default_factory=dict)
    freeze_backbone_embeddings: bool = False
    freeze_backbone_layers: int = 0


@dataclass
class LossConfig:
    """``SampledSoftmaxLoss`` options shared by every task (see ``omnisearchsage_hf.training.losses``)."""

    logq_correction: bool = True
    positive_correction: bool = False
    matryoshka_dims: list[int] | None = None
    matryoshka_weights: list[float] | None = None
    init_scale: float = 1 / 0.07
    max_scale: float = 100.0
    sketch_width: int = 2**20
    sketch_depth: int = 2


@dataclass
class TrainConfig:
    """Optimisation and bookkeeping.

    Args:
        batch_size: Pairs per process and optimizer micro-step, split across tasks by share.
        gradient_accumulation_steps: Micro-steps per optimizer step.
        gradient_cache_chunk_size: Rows per tower pass with gradient caching (``gradient_cache.py``): the
            towers embed a micro-step's rows in chunks of this size without a graph, the loss runs over
            the whole global batch, and each chunk is re-run to backpropagate. Activation memory then
            depends on the chunk, not the batch, for about a third more compute. None (default): off.
        max_steps: Optimizer steps.
        learning_rate, weight_decay, warmup_steps, max_grad_norm: AdamW with linear warmup, cosine decay
            to zero, and gradient clipping.
        entity_learning_rate: Learning rate of the entity tower and logit scales (None: ``learning_rate``);
            a from-scratch hash embedding wants a larger one than a pretrained encoder.
        mixed_precision: ``no``, ``bf16`` or ``fp16`` (Accelerate autocast).
        seed: Seeds shuffling, negatives and initialisation.
        log_every, eval_every, save_every: In optimizer steps (0 disables eval/save).
        keep_checkpoints: Checkpoints kept on disk (oldest deleted first).
    """

    batch_size: int = 64
    gradient_accumulation_steps: int = 1
    gradient_cache_chunk_size: int | None = None
    max_steps: int = 1000
    learning_rate: float = 5e-5
    entity_learning_rate: float | None = None
    weight_decay: float = 0.01
    warmup_steps: int = 100
    max_grad_norm: float = 1.0
    mixed_precision: MixedPrecision = "no"
    seed: int = 0
    log_every: int = 10
    eval_every: int = 0
    save_every: int = 0
    keep_checkpoints: int = 2


@dataclass
class EvalConfig:
    """Periodic and final Recall@K on the held-out pairs."""

    corpus_size: int = 1000
    ks: list[int] = field(default_factory=lambda: [1, 10, 100])
    max_pairs: int = 2000


@dataclass
class TrainingConfig:
    """Everything a run needs; ``training/configs/*.yaml`` hold one each."""

    output_dir: str = "runs/omnisearchsage"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain values, as ``load_config`` reads them back (``training_config.yaml`` in a run folder)."""
        tree = dataclasses.asdict(self)
        tree["data"]["tasks"] = [task.to_dict() for task in self.data.tasks]
        return tree


def _build(cls: type, values: Any, where: str) -> Any:
    """Instantiate dataclass ``cls`` from a dict, recursing into nested dataclass fields."""
    if not isinstance(values, dict):
        raise ValueError(f"`{where}` must be a mapping, got {type(values).__name__}: {values!r}.")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(f"Unknown key(s) {unknown} in `{where}`; valid keys: {sorted(fields)}.")
    kwargs = {}
    for name, value in values.items():
        nested = (
            {
                "data": DataConfig,
                "model": ModelConfig,
                "loss": LossConfig,
                "train": TrainConfig,
                "eval": EvalConfig,
            }.get(name)
            if cls is TrainingConfig
            else None
        )
        if nested is not None:
            value = _build(nested, value, f"{where}.{name}".lstrip("."))
        elif cls is DataConfig and name == "tasks":
            value = [_build(TaskConfig, task, f"{where}.tasks[{i}]") for i, task in enumerate(value)]
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except TypeError as error:
        raise ValueError(f"`{where or 'config'}`: {error}") from None


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"Cannot set `{dotted}`: `{part}` is not a section.")
    node[leaf] = value


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> TrainingConfig:
    """Read a YAML config and apply ``{"section.key": value}`` overrides; validate everything."""
    tree: dict[str, Any] = {}
    if path is not None:
        with open(path, encoding="utf-8") as handle:
            tree = yaml.safe_load(handle) or {}
    for dotted, value in (overrides or {}).items():
        _set_dotted(tree, dotted, value)
    config = _build(TrainingConfig, tree, "")
    validate_config(config)
    return config


def parse_overrides(arguments: list[str]) -> dict[str, Any]:
    """``["--train.max_steps", "5", "--loss.logq_correction=false"]`` → ``{"train.max_steps": 5, …}``."""
    overrides, i = {}, 0
    while i < len(arguments):
        argument = arguments[i]
        if not argument.startswith("--"):
            raise ValueError(f"Expected `--section.key value`, got {argument!r}.")
        if "=" in argument:
            key, raw = argument[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(arguments):
                raise ValueError(f"Override {argument!r} has no value.")
            key, raw = argument[2:], arguments[i + 1]
            i += 2
        overrides[key] = yaml.safe_load(raw)
    return overrides


def validate_hard_negatives(task: TaskConfig) -> None:
    """The hard-negative keys of one task: a count, exactly one pool, an entity or compat candidate."""
    count, table, group = task.num_hard_negatives, task.hard_negatives, task.hard_negatives_group
    where, weight = f"Task {task.name!r}", task.hard_negatives_weight
    if not isinstance(count, int) or isinstance(count, bool) or count < 0:
        raise ValueError(f"{where}: `num_hard_negatives` must be an int >= 0 (0: off), got {count!r}.")
    for key, value in (("hard_negatives", table), ("hard_negatives_group", group)):
        if value is not None and (not isinstance(value, str) or not value):
            raise ValueError(f"{where}: `{key}` must be a non-empty string or null, got {value!r}.")
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0:
        raise ValueError(f"{where}: `hard_negatives_weight` must be a number > 0, got {weight!r}.")
    if count == 0 and table is None and group is None:
        return
    if task.candidate.kind == "query":
        raise ValueError(
            f"{where}: hard negatives need an entity or compat candidate, not {str(task.candidate)!r} (its candidates "
            "are texts, not table rows); remove `num_hard_negatives`, `hard_negatives` and `hard_negatives_group`."
        )
    if count == 0:
        key = "hard_negatives" if table is not None else "hard_negatives_group"
        raise ValueError(f"{where}: `{key}` is set but `num_hard_negatives` is 0; set it to how many to draw per pair.")
    if (table is None) == (group is None):
        raise ValueError(
            f"{where}: `num_hard_negatives` {count} needs exactly one pool: `hard_negatives` (a table mined by "
            f"omnisearchsage-mine) or `hard_negatives_group` (a column of table {task.table!r}), got "
            f"hard_negatives={table!r}, hard_negatives_group={group!r}."
        )


def validate_config(config: TrainingConfig) -> None:
    """Cross-field checks that dataclass typing cannot express; errors name the key and the fix."""
    train = config.train
    for name in ("batch_size", "gradient_accumulation_steps", "max_steps"):
        if not isinstance(getattr(train, name), int) or getattr(train, name) < 1:
            raise ValueError(f"`train.{name}` must be a positive int, got {getattr(train, name)!r}.")
    chunk = train.gradient_cache_chunk_size
    if chunk is not None and (not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1):
        raise ValueError(
            "`train.gradient_cache_chunk_size` must be a positive int (rows per tower pass) or null (off), "
            f"got {chunk!r}."
        )
    if not config.data.tasks:
        raise ValueError("`data.tasks` is empty: declare at least one task (name, candidate, share).")
    names = [task.name for task in config.data.tasks]
    if len(set(names)) != len(names):
        raise ValueError(f"Task names must be unique, got {names}.")
    if train.batch_size < len(config.data.tasks):
        raise ValueError(
            f"`train.batch_size` ({train.batch_size}) must give every one of the "
            f"{len(config.data.tasks)} tasks at least one pair per step."
        )
    for task in config.data.tasks:
        if task.share <= 0:
            raise ValueError(f"Task {task.name!r}: `share` must be > 0, got {task.share!r}.")
        if task.query_feature is not None and task.candidate.kind == "query":
            raise ValueError(
                f"Task {task.name!r}: `query_feature` {str(task.query_feature)!r} needs an entity or compat candidate."
            )
        engagements = task.engagements
        if engagements is not None and not (
            isinstance(engagements, list) and engagements and all(isinstance(e, str) for e in engagements)
        ):
            raise ValueError(f"Task {task.name!r}: `engagements` must be a non-empty list of names or null.")
        validate_hard_negatives(task)
    architecture = config.model.entity_architecture
    if architecture not in ("omnisearchsage", "itemsage"):
        raise ValueError(f"`model.entity_architecture` must be 'omnisearchsage' or 'itemsage', got {architecture!r}.")
    for key in config.data.embedding_sources:
        if key.count(".") != 1 or not all(key.split(".")):
            raise ValueError(f"`data.embedding_sources` key {key!r} must be '<table>.<feature>'.")
    if config.model.backbone is None and config.model.backbone_config is None:
        raise ValueError("Set `model.backbone` (a pretrained encoder folder) or `model.backbone_config`.")


__all__ = [
    "DEFAULT_POPULARITY_CAPS",
    "Candidate",
    "QueryFeature",
    "DataConfig",
    "EvalConfig",
    "LossConfig",
    "ModelConfig",
    "TaskConfig",
    "TrainConfig",
    "TrainingConfig",
    "load_config",
    "parse_overrides",
    "validate_config",
    "validate_hard_negatives",
]
