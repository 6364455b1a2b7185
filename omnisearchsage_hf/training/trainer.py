"""The Accelerate trainer: data, towers, the multi-task loop, checkpoints, evaluation and export.

One process or many (``accelerate launch --multi_gpu --num_processes 2`` on CPU gives two gloo
processes): every process reads its own shard of every task (``tasks.pair_indices``), the losses
gather candidates across processes with gradients, and DDP averages the gradients. Runs are
resumable: a checkpoint every ``train.save_every`` steps (``accelerator.save_state``, written to a
temporary folder and renamed when complete), and ``resume=True`` continues from the newest one. Because
the data order and the learning rate are pure functions of the step, a resumed run reads the same pairs
the killed run would have read.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, set_seed
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModel, PreTrainedTokenizerFast

from ..atomic import save_npy_atomically, write_text_atomically
from ..evaluation import RecallEvaluator
from ..modeling import (
    ItemSageConfig,
    ItemSageModel,
    OmniSearchSageEntityConfig,
    OmniSearchSageEntityModel,
    OmniSearchSageQueryConfig,
    OmniSearchSageQueryModel,
)
from ..tokenization import OmniSearchSageTokenizer, build_vocab
from .config import TaskConfig, TrainingConfig
from .data import EntityTable, TaskPairs, held_out_pairs, load_pairs, popularity_cap, read_table
from .multitask import MultiTaskModel, StepBatch, TaskBatch
from .sources import prepare_source
from .tasks import pair_indices, random_negative_indices, task_batch_sizes

CHECKPOINTS = "checkpoints"
CONFIG_FILE = "training_config.yaml"  # written into output_dir at the start of every run
# `model.entity_architecture` → the config and model of the candidate tower of `entity:` tasks.
ENTITY_ARCHITECTURES = {
    "omnisearchsage": (OmniSearchSageEntityConfig, OmniSearchSageEntityModel),
    "itemsage": (ItemSageConfig, ItemSageModel),
}
SOURCE_EMBEDDINGS = "embeddings"  # under <output_dir>/data: the columns computed from `data.embedding_sources`


def learning_rate(step: int, *, base: float, warmup_steps: int, max_steps: int) -> float:
    """Linear warmup to ``base`` over ``warmup_steps``, then cosine decay to 0 at ``max_steps``."""
    if step < warmup_steps:
        return base * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return base * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint folder (``checkpoints/step_N``), or None."""
    folder = Path(output_dir) / CHECKPOINTS
    steps = [p for p in folder.glob("step_*") if p.is_dir() and p.name[5:].isdigit()] if folder.is_dir() else []
    return max(steps, key=lambda p: int(p.name[5:]), default=None)


def train_wordpiece_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A BERT-style WordPiece tokenizer learned from ``texts``, for a query tower trained from scratch."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials))
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )


class _FeatureColumn(Mapping[str, np.ndarray]):
    """``id → pre-existing embedding`` view of an entity table (zeros where an entity lacks it)."""

    def __init__(self, table: EntityTable, feature: str, dim: int):
        self.table, self.feature, self.dim = table, feature, dim

    def __getitem__(self, entity_id: str) -> np.ndarray:
        return _dense_rows(self.table, self.feature, self.dim, [self.table.row_of[entity_id]])[0]

    def __iter__(self):
        return iter(self.table)

    def __len__(self) -> int:
        return len(self.table)


def _has_accelerator() -> bool:
    return (
        torch.cuda.is_available()
        or torch.backends.mps.is_available()
        or (hasattr(torch, "xpu") and torch.xpu.is_available())
    )


def _unit_rows(vectors: list[np.ndarray]) -> np.ndarray:
    stacked = np.stack(vectors)  # (n, dim)
    return stacked / np.maximum(np.linalg.norm(stacked, axis=1, keepdims=True), 1e-12)


def _feature_dim(table: EntityTable, feature: str) -> int:
    """Width of a pre-existing embedding column, read from its first non-empty value."""
    for start in range(0, len(table), 1024):
        for value in table.column(feature, range(start, min(start + 1024, len(table)))):
            if value is not None and len(value):
                return np.asarray(value, dtype=np.float32).shape[-1]
    raise ValueError(f"Entity table {table.name!r} has no value in column {feature!r}.")


def _rows_of(table: EntityTable, ids: list[str], task: str) -> list[int]:
    """Rows of entity ids that a ``query_feature`` task names in its ``query`` column."""
    unknown = next((i for i in ids if i not in table.row_of), None)
    if unknown is not None:
        raise ValueError(f"Task {task!r}: query {unknown!r} is not an id of entity table {table.name!r}.")
    return [table.row_of[i] for i in ids]


def _dense_rows(table: EntityTable, feature: str, dim: int, rows: np.ndarray | list[int]) -> np.ndarray:
    """``(len(rows), dim)`` float32 pre-existing embeddings; per-image lists are averaged, missing → 0."""
    out = np.zeros((len(rows), dim), dtype=np.float32)
    for i, value in enumerate(table.column(feature, rows)):
        if value is not None and len(value):
            array = np.asarray(value, dtype=np.float32)
            out[i] = array.mean(0) if array.ndim == 2 else array
    return out


class Trainer:
    """Train OmniSearchSage from a ``TrainingConfig`` (see ``training/train.py`` for the command line).

    Example:
        ::

            from omnisearchsage_hf.training import Trainer, load_config

            Trainer(load_config("training/configs/tiny.yaml")).train()
    """

    def __init__(self, config: TrainingConfig):
        self.config = config
        self.output_dir = Path(config.output_dir)
        train = config.train
        self.uses_entity_tower = any(task.candidate.startswith("entity:") for task in config.data.tasks)
        self.uses_query_tower = any(t.query_feature is None or t.candidate == "query" for t in config.data.tasks)
        # A tower without a task gets no gradient, which DDP rejects unless told to expect it.
        unused = not (self.uses_entity_tower and self.uses_query_tower)
        self.accelerator = Accelerator(
            # Accelerate only picks gloo multi-process training on CPU when told the run is a CPU run.
            cpu=not _has_accelerator(),
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=unused)],
            mixed_precision=train.mixed_precision,
            log_with="tensorboard",
            project_dir=str(self.output_dir),
        )
        set_seed(train.seed)
        self.tasks: list[TaskConfig] = config.data.tasks
        self.batch_sizes = task_batch_sizes(train.batch_size, {t.name: t.share for t in self.tasks})

    # ---- setup -----------------------------------------------------------------------------------
    def _on_main_then_all(self, fn) -> None:
        """Run ``fn`` on the main process only, then let every process continue."""
        if self.accelerator.is_main_process:
            fn()
        self.accelerator.wait_for_everyone()

    def _entity_config(self, defaults: dict[str, Any] | None = None) -> OmniSearchSageEntityConfig | ItemSageConfig:
        """The candidate tower's config from ``model.entity``, over ``defaults``."""
        config_class, _ = ENTITY_ARCHITECTURES[self.config.model.entity_architecture]
        return config_class(**{**(defaults or {}), **self.config.model.entity})

    def _load_data(self) -> None:
        config = self.config
        data_dir = self.output_dir / "data"
        self._on_main_then_all(lambda: prepare_source(config, data_dir))
        base = Path(".") if config.data.source == "files" else data_dir
        self._on_main_then_all(lambda: self._embed_sources(base, data_dir))
        features = self._entity_config().input_features()
        candidate_tables = {
            t.candidate.split(":")[1] for t in self.tasks if t.candidate.split(":")[0] in ("entity", "compat")
        }
        query_tables = {t.query_feature.split(":")[0] for t in self.tasks if t.query_feature is not None}
        missing = sorted((candidate_tables | query_tables) - set(config.data.entities))
        if missing:
            raise ValueError(f"Tasks use entity table(s) {missing}; declare them under `data.entities`.")
        extra = [t.candidate.split(":")[2] for t in self.tasks if t.candidate.startswith("compat:")]
        extra += [t.query_feature.split(":")[1] for t in self.tasks if t.query_feature is not None]
        self.tables = {
            name: EntityTable(self._read_entities(name, base, data_dir), features + extra, name)
            for name in sorted(candidate_tables | query_tables)
        }
        self.pairs: dict[str, TaskPairs] = {}
        self.eval_pairs: dict[str, list[tuple[str, str]]] = {}
        self.query_rows: dict[str, np.ndarray] = {}  # query_feature tasks: row of each pair's query entity
        self.query_dims: dict[str, int] = {}
        for index, task in enumerate(self.tasks):
            if task.pairs is None:
                raise ValueError(f"Task {task.name!r} has no `pairs` file.")
            table = self._table(task)
            self.pairs[task.name] = load_pairs(
                base / task.pairs,
                table.row_of if table is not None else None,
                task=task.name,
                max_per_candidate=popularity_cap(task),
                seed=config.train.seed + index,
                engagements=task.engagements,
            )
            if task.query_feature is not None:
                query_table, feature = self._query_table(task), task.query_feature.split(":")[1]
                self.query_rows[task.name] = np.array(
                    _rows_of(query_table, self.pairs[task.name].queries, task.name), dtype=np.int64
                )
                self.query_dims[task.name] = _feature_dim(query_table, feature)
            if task.eval_pairs:
                self.eval_pairs[task.name] = held_out_pairs(
                    base / task.eval_pairs,
                    task=task.name,
                    max_pairs=config.eval.max_pairs,
                    seed=config.train.seed,
                    engagements=task.engagements,
                )

    def _embed_sources(self, base: Path, data_dir: Path) -> None:
        """Embed each ``data.embedding_sources`` table with its model into ``data/embeddings/<table>.<feature>.npy``.

        Recomputed at every start (a resumed run included): the source model is fixed, so the same file
        comes out, and no stale cache can outlive a retrained source model.
        """
        for key, folder in self.config.data.embedding_sources.items():
            table, _ = key.split(".")
            if table not in self.config.data.entities:
                raise ValueError(f"`data.embedding_sources` names table {table!r}; declare it under `data.entities`.")
            model = AutoModel.from_pretrained(os.path.expanduser(folder))
            if not hasattr(model, "encode") or not hasattr(model.config, "input_features"):
                raise ValueError(
                    f"`data.embedding_sources[{key!r}]`: {folder} is a {type(model).__name__}; expected a model "
                    "that embeds entity dicts (an ItemSage or entity tower folder)."
                )
            rows = EntityTable(
                read_table(base / self.config.data.entities[table]), model.config.input_features(), table
            )
            vectors = model.encode(rows.rows(range(len(rows))), batch_size=256, show_progress_bar=True)
            path = data_dir / SOURCE_EMBEDDINGS / f"{key}.npy"
            path.parent.mkdir(parents=True, exist_ok=True)
            save_npy_atomically(path, vectors)
            self.accelerator.print(f"Embedded {len(rows)} rows of {table!r} with {folder} into {path}")

    def _read_entities(self, name: str, base: Path, data_dir: Path) -> Any:
        """Entity table ``name``, with the columns ``data.embedding_sources`` computes for it put in place."""
        dataset = read_table(base / self.config.data.entities[name])
        for key in self.config.data.embedding_sources:
            table, feature = key.split(".")
            if table == name:
                vectors = np.load(data_dir / SOURCE_EMBEDDINGS / f"{key}.npy", allow_pickle=False)
                if feature in dataset.column_names:
                    dataset = dataset.remove_columns(feature)
                dataset = dataset.add_column(feature, list(vectors))
        return dataset

    def _table(self, task: TaskConfig) -> EntityTable | None:
        kind, _, rest = task.candidate.partition(":")
        return self.tables[rest.split(":")[0]] if kind in ("entity", "compat") else None

    def _query_table(self, task: TaskConfig) -> EntityTable:
        return self.tables[task.query_feature.split(":")[0]]

    def _build_towers(self) -> tuple[OmniSearchSageQueryModel, OmniSearchSageEntityModel]:
        model_config = self.config.model
        tokenizer_dir = self.output_dir / "tokenizers"

        def build_tokenizers() -> None:
            if not (tokenizer_dir / "entity").is_dir():
                if model_config.tokenizer is not None:
                    tokenizer = OmniSearchSageTokenizer.from_pretrained(os.path.expanduser(model_config.tokenizer))
                else:
                    fields = self._entity_config().text_fields
                    texts = (
                        value
                        for table in self.tables.values()
                        for field in fields
                        if field in table.columns
                        for value in table.dataset[field]
                    )
                    tokenizer = build_vocab(texts, **{"show_progress_bar": True, **model_config.vocab})
                tokenizer.save_pretrained(tokenizer_dir / "entity")
            if model_config.backbone is None and not (tokenizer_dir / "query").is_dir():
                texts = [q for pairs in self.pairs.values() for q in pairs.queries]
                texts += [t for pairs in self.pairs.values() for t in pairs.candidate_texts or []]
                train_wordpiece_tokenizer(texts, model_config.query_tokenizer_vocab_size).save_pretrained(
                    tokenizer_dir / "query"
                )

        self._on_main_then_all(build_tokenizers)
        entity_tokenizer = OmniSearchSageTokenizer.from_pretrained(tokenizer_dir / "entity")
        _, entity_class = ENTITY_ARCHITECTURES[model_config.entity_architecture]
        entity_tower = entity_class(self._entity_config({"vocab_size": entity_tokenizer.vocab_size}))
        entity_tower.tokenizer = entity_tokenizer
        if model_config.backbone is not None:
            query_tower = OmniSearchSageQueryModel.from_backbone(
                os.path.expanduser(model_config.backbone), **model_config.query
            )
        else:
            query_tokenizer = PreTrainedTokenizerFast.from_pretrained(tokenizer_dir / "query")
            backbone = AutoConfig.for_model(**{**model_config.backbone_config, "vocab_size": len(query_tokenizer)})
            query_tower = OmniSearchSageQueryModel(
                OmniSearchSageQueryConfig(backbone_config=backbone, **model_config.query)
            )
            query_tower.tokenizer = query_tokenizer
        if model_config.freeze_backbone_embeddings:
            query_tower.backbone.get_input_embeddings().weight.requires_grad_(False)
        if model_config.freeze_backbone_layers:
            blocks = _transformer_blocks(query_tower.backbone)
            if model_config.freeze_backbone_layers > len(blocks):
                raise ValueError(
                    f"`model.freeze_backbone_layers` is {model_config.freeze_backbone_layers} but the backbone has "
                    f"{len(blocks)} blocks."
                )
            for block in blocks[: model_config.freeze_backbone_layers]:
                block.requires_grad_(False)
        return query_tower.train(), entity_tower.train()

    # ---- one step of data ------------------------------------------------------------------------
    def collate(self, micro_step: int) -> StepBatch:
        """The pairs, negatives and tower inputs this process uses at ``micro_step`` (pure in the step)."""
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        seed = self.config.train.seed
        query_texts: list[str] = []
        entity_rows: list[dict[str, Any]] = []
        tasks: dict[str, TaskBatch] = {}

        def add(rows: list, items: list) -> torch.Tensor:
            rows.extend(items)
            return torch.arange(len(rows) - len(items), len(rows))

        for index, task in enumerate(self.tasks):
            pairs = self.pairs[task.name]
            picked = pair_indices(
                len(pairs),
                step=micro_step,
                count=self.batch_sizes[task.name],
                seed=seed + index,
                rank=rank,
                world_size=world,
            )
            candidates = pairs.candidates[picked]
            kind = task.candidate.split(":")[0]
            table = self._table(task)
            pool = len(pairs.candidate_texts) if kind == "query" else len(table)
            negatives = random_negative_indices(
                pool, count=task.num_random_negatives, seed=seed, step=micro_step, rank=rank, task=index
            )
            if task.query_feature is None:
                queries, query_vectors = add(query_texts, [pairs.queries[i] for i in picked]), None
            else:
                feature = task.query_feature.split(":")[1]
                rows = self.query_rows[task.name][picked]
                queries = torch.zeros(0, dtype=torch.long)
                query_vectors = torch.from_numpy(
                    _dense_rows(self._query_table(task), feature, self.query_dims[task.name], rows)
                )
            batch = TaskBatch(
                queries=queries,
                query_vectors=query_vectors,
                candidates=torch.zeros(0, dtype=torch.long),
                query_ids=torch.from_numpy(pairs.query_ids[picked]),
                candidate_ids=torch.from_numpy(candidates),
                negative_ids=torch.from_numpy(negatives),
                # Uniform sampling: each draw picks a given candidate with probability 1 / pool.
                negative_log_q=torch.full((len(negatives),), math.log(max(len(negatives), 1) / pool)),
            )
            if kind == "query":
                batch.candidates = add(query_texts, [pairs.candidate_texts[i] for i in candidates])
                batch.negatives = add(query_texts, [pairs.candidate_texts[i] for i in negatives])
            elif kind == "entity":
                batch.candidates = add(entity_rows, table.rows(candidates))
                batch.negatives = add(entity_rows, table.rows(negatives)) if len(negatives) else batch.negatives
            else:
                feature, dim = task.candidate.split(":")[2], self.compat_dims[task.name]
                batch.compat_candidates = torch.from_numpy(_dense_rows(table, feature, dim, candidates))
                if len(negatives):
                    batch.compat_negatives = torch.from_numpy(_dense_rows(table, feature, dim, negatives))
            tasks[task.name] = batch
        entity_inputs = self.entity_tower.prepare_inputs(entity_rows) if entity_rows else None
        query_inputs = self.query_tower.tokenize(query_texts) if query_texts else None
        return StepBatch(query_inputs, entity_inputs, tasks)

    # ---- evaluation ------------------------------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        """Recall@K of every task with held-out pairs (main process; the towers in eval mode)."""
        metrics: dict[str, float] = {}
        query_tower, entity_tower = self.query_tower, self.entity_tower
        for task in self.tasks:
            if task.name not in self.eval_pairs:
                continue
            pairs, kind, table = self.eval_pairs[task.name], task.candidate.split(":")[0], self._table(task)
            # A legacy space narrower than the query embedding is compared with the query's Matryoshka prefix.
            dim = self.compat_dims.get(task.name)
            truncate = dim if dim is not None and dim < query_tower.config.out_dim else None
            encode_queries = functools.partial(query_tower.encode, batch_size=128, truncate_dim=truncate)
            if task.query_feature is not None:
                query_table, feature = self._query_table(task), task.query_feature.split(":")[1]

                def encode_queries(ids, table=query_table, feature=feature, dim=self.query_dims[task.name], task=task):
                    return _unit_rows(list(_dense_rows(table, feature, dim, _rows_of(table, ids, task.name))))

            if kind == "entity":
                candidates, encode_candidates = table, functools.partial(entity_tower.encode, batch_size=256)
            elif kind == "query":
                texts = set(self.pairs[task.name].candidate_texts) | {c for _, c in pairs}
                candidates, encode_candidates = {t: t for t in texts}, encode_queries
            else:
                candidates, encode_candidates = _FeatureColumn(table, task.candidate.split(":")[2], dim), _unit_rows
            evaluator = RecallEvaluator(
                pairs,
                candidates,
                corpus_size=self.config.eval.corpus_size,
                ks=self.config.eval.ks,
                name=task.name,
                seed=self.config.train.seed,
            )
            metrics.update(evaluator(encode_queries, encode_candidates))
        return metrics

    # ---- checkpoints -----------------------------------------------------------------------------
    def save_checkpoint(self, step: int) -> None:
        """``accelerator.save_state`` into ``checkpoints/step_N``: written under a temporary name first."""
        final = self.output_dir / CHECKPOINTS / f"step_{step}"
        partial = final.with_name(final.name + ".partial")
        self.accelerator.save_state(str(partial), safe_serialization=True)
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            (partial / "step.json").write_text(json.dumps({"step": step}))
            os.replace(partial, final)
            kept = sorted(
                (p for p in final.parent.glob("step_*") if p.name[5:].isdigit()), key=lambda p: int(p.name[5:])
            )
            for old in kept[: -self.config.train.keep_checkpoints]:
                shutil.rmtree(old)
        self.accelerator.wait_for_everyone()

    # ---- the loop --------------------------------------------------------------------------------
    def train(self, resume: bool = False) -> dict[str, float]:
        """Train for ``train.max_steps`` optimizer steps, export both towers, return the final metrics."""
        accelerator, train = self.accelerator, self.config.train
        accelerator.print(
            f"Training with {accelerator.num_processes} process(es) on {accelerator.device}; "
            f"per-process batch by task: {self.batch_sizes}"
        )
        if accelerator.is_main_process:  # the resolved config, overrides included: `publish` reads it for the cards
            self.output_dir.mkdir(parents=True, exist_ok=True)
            text = yaml.safe_dump(self.config.to_dict(), sort_keys=False, allow_unicode=True)
            write_text_atomically(self.output_dir / CONFIG_FILE, text)
        self._load_data()
        self.query_tower, self.entity_tower = self._build_towers()
        self.compat_dims = {
            t.name: _feature_dim(self._table(t), t.candidate.split(":")[2])
            for t in self.tasks
            if t.candidate.startswith("compat:")
        }
        catalogue_sizes = {
            t.name: len(self.pairs[t.name].candidate_texts) if t.candidate == "query" else len(self._table(t))
            for t in self.tasks
        }
        model = MultiTaskModel(
            self.query_tower, self.entity_tower, self.tasks, self.config.loss, self.compat_dims, catalogue_sizes
        )
        entity_lr = train.entity_learning_rate or train.learning_rate
        # (params, lr, weight decay): decaying the log logit scales would pull every scale towards 1.
        groups = [
            ([p for p in self.query_tower.parameters() if p.requires_grad], train.learning_rate, train.weight_decay),
            (list(self.entity_tower.parameters()), entity_lr, train.weight_decay),
            (list(model.losses.parameters()), entity_lr, 0.0),
        ]
        optimizer = torch.optim.AdamW(
            [{"params": p, "lr": lr, "base_lr": lr, "weight_decay": decay} for p, lr, decay in groups]
        )
        model, optimizer = accelerator.prepare(model, optimizer)
        for loss in accelerator.unwrap_model(model).losses.values():
            accelerator.register_for_checkpointing(loss.estimators)

        start = 0
        checkpoint = latest_checkpoint(self.output_dir) if resume else None
        if checkpoint is not None:
            accelerator.load_state(str(checkpoint))
            start = int(checkpoint.name[5:])
            accelerator.print(f"Resumed from {checkpoint} at step {start}")
        accelerator.init_trackers("omnisearchsage", config=_flat_scalars(self.config.to_dict()))

        window: dict[str, float] = {}
        window_steps = 0
        progress = tqdm(
            range(start, train.max_steps),
            initial=start,
            total=train.max_steps,
            desc="Training",
            disable=not accelerator.is_main_process,
        )
        for step in progress:
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(
                    step, base=group["base_lr"], warmup_steps=train.warmup_steps, max_steps=train.max_steps
                )
            totals: dict[str, float] = {}
            for micro in range(train.gradient_accumulation_steps):
                batch = self.collate(step * train.gradient_accumulation_steps + micro).to(accelerator.device)
                sync = micro == train.gradient_accumulation_steps - 1
                with accelerator.no_sync(model) if not sync else contextlib.nullcontext():
                    with accelerator.autocast():
                        loss, parts = model(batch)
                    accelerator.backward(loss / train.gradient_accumulation_steps)
                for key, value in {"loss": loss.detach(), **parts}.items():
                    totals[key] = totals.get(key, 0.0) + float(value) / train.gradient_accumulation_steps
            if train.max_grad_norm:
                accelerator.clip_grad_norm_(model.parameters(), train.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad()
            done = step + 1
            for key, value in totals.items():
                window[key] = window.get(key, 0.0) + value
            window_steps += 1
            if done % train.log_every == 0 or done == train.max_steps:
                # Mean over the steps since the last log and over processes: one step of one process is noisy.
                keys = sorted(window)
                means = accelerator.reduce(
                    torch.tensor([window[k] / window_steps for k in keys], device=accelerator.device), "mean"
                )
                logged = dict(zip(keys, means.tolist()))
                window, window_steps = {}, 0
                losses = accelerator.unwrap_model(model).losses
                scales = {f"{name}/scale": loss.scale.item() for name, loss in losses.items()}
                accelerator.log({**logged, **scales, "lr": optimizer.param_groups[0]["lr"]}, step=done)
                progress.set_postfix({k: f"{v:.3f}" for k, v in logged.items() if "/" not in k})
                accelerator.print(json.dumps({"step": done, **{k: round(v, 4) for k, v in logged.items()}}))
            if train.eval_every and done % train.eval_every == 0 and done < train.max_steps:
                self._evaluate_and_log(done)
            if train.save_every and done % train.save_every == 0 and done < train.max_steps:
                self.save_checkpoint(done)
        metrics = self._evaluate_and_log(train.max_steps)
        self._export(metrics)
        accelerator.end_training()
        return metrics

    def _evaluate_and_log(self, step: int) -> dict[str, float]:
        metrics: dict[str, float] = {}
        if self.accelerator.is_main_process and self.eval_pairs:
            metrics = self.evaluate()
            self.query_tower.train()
            self.entity_tower.train()
            self.accelerator.log(metrics, step=step)
            self.accelerator.print(json.dumps({"step": step, **{k: round(v, 4) for k, v in metrics.items()}}))
        self.accelerator.wait_for_everyone()
        return metrics

    def _export(self, metrics: dict[str, float]) -> None:
        """Save the trained towers (with their tokenizers) and the final metrics under ``output_dir``."""
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            # A tower that no task trained is not exported: it would be a random model.
            if self.uses_query_tower:
                self.query_tower.save_pretrained(self.output_dir / "query_tower")
            if self.uses_entity_tower:
                self.entity_tower.save_pretrained(self.output_dir / "entity_tower")
            write_text_atomically(
                self.output_dir / "metrics.json", json.dumps(metrics, indent=2, sort_keys=True) + "\n"
            )
        self.accelerator.wait_for_everyone()


def _flat_scalars(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """TensorBoard hparams take scalars only: flatten nested sections, stringify lists."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flat_scalars(value, name + "."))
        elif isinstance(value, (int, float, str, bool)):
            flat[name] = value
        elif value is not None:
            flat[name] = str(value)
    return flat


def _transformer_blocks(backbone: torch.nn.Module) -> torch.nn.ModuleList:
    """The backbone's stack of transformer blocks: its longest ``ModuleList`` (``encoder.layer`` in BERT)."""
    lists = [module for module in backbone.modules() if isinstance(module, torch.nn.ModuleList)]
    if not lists:
        raise ValueError(f"Found no stack of transformer blocks in {type(backbone).__name__}.")
    return max(lists, key=len)


__all__ = ["Trainer", "latest_checkpoint", "learning_rate", "train_wordpiece_tokenizer"]
