"""The Accelerate trainer: data, towers, the multi-task loop, checkpoints, evaluation and export.

One process or many (``accelerate launch --multi_gpu --num_processes 2`` on CPU gives two gloo
processes): every process reads its own shard of every task (``tasks.pair_indices``), the losses
gather candidates across processes with gradients, and DDP averages the gradients (so P processes with
a batch of B/P each compute the update of one process with B). With ``train.gradient_cache_chunk_size``
the towers run in chunks outside DDP (``gradient_cache.py``) and the gradients are averaged once per
step by ``distributed.all_reduce_gradients``. Runs are resumable: a checkpoint every
``train.save_every`` steps (safetensors and JSON only, never pickle; written to a temporary folder and
renamed when complete; ``checkpoints.py`` lists what is saved and how it is read), and ``resume=True``
continues from the newest one. Because the data order and the learning rate are pure functions of the
step, a resumed run reads the same pairs the killed run would have read. Logged values go to the
progress bar, TensorBoard and ``logs/history.jsonl``.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration, set_seed
from tqdm.auto import tqdm

from ..atomic import write_text_atomically
from ..devices import has_accelerator
from ..evaluation import RecallEvaluator
from .batches import StepBatch, collate
from .builders import build_tokenizers, build_towers, entity_config, table_texts
from .checkpoints import Checkpointer
from .config import TrainingConfig
from .distributed import all_reduce_gradients
from .gradient_cache import cached_backward
from .multitask import MultiTaskModel
from .pairs import TrainingData, load_training_data
from .run_files import (
    CONFIG_FILE,
    DATA,
    ENTITY_TOWER,
    HISTORY_FILE,
    LOGS,
    METRICS_FILE,
    QUERY_TOWER,
    TOKENIZERS,
    check_run_folder,
    clear_run_folder,
    latest_checkpoint,
)
from .sources import embed_sources, embedded_table_path, prepare_source
from .tasks import task_batch_sizes


def learning_rate(step: int, *, base: float, warmup_steps: int, max_steps: int) -> float:
    """Linear warmup to ``base`` over ``warmup_steps``, then cosine decay to 0 at ``max_steps``."""
    if step < warmup_steps:
        return base * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return base * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _unit_rows(vectors: np.ndarray | list[np.ndarray]) -> np.ndarray:
    stacked = np.stack(vectors)  # (n, dim)
    return stacked / np.maximum(np.linalg.norm(stacked, axis=1, keepdims=True), 1e-12)


class Trainer:
    """Train OmniSearchSage from a ``TrainingConfig`` (see ``training/train.py`` for the command line).

    Example:
        ::

            from omnisearchsage_hf.training.command import resolve_config
            from omnisearchsage_hf.training.config import load_config
            from omnisearchsage_hf.training.trainer import Trainer

            Trainer(load_config(resolve_config("tiny"), {"output_dir": "runs/tiny"})).train()
    """

    def __init__(self, config: TrainingConfig):
        self.config = config
        self.output_dir = Path(config.output_dir)
        train = config.train
        self.uses_entity_tower = any(task.candidate.kind == "entity" for task in config.data.tasks)
        self.uses_query_tower = any(t.query_feature is None or t.candidate.kind == "query" for t in config.data.tasks)
        # A tower without a task gets no gradient, which DDP rejects unless told to expect it.
        unused = not (self.uses_entity_tower and self.uses_query_tower)
        self.accelerator = Accelerator(
            # Accelerate only picks gloo multi-process training on CPU when told the run is a CPU run.
            cpu=not has_accelerator(),
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=unused)],
            mixed_precision=train.mixed_precision,
            log_with="tensorboard",
            project_config=ProjectConfiguration(
                project_dir=str(self.output_dir), logging_dir=str(self.output_dir / LOGS)
            ),
        )
        set_seed(train.seed)
        self.tasks = config.data.tasks
        self.batch_sizes = task_batch_sizes(train.batch_size, {t.name: t.share for t in self.tasks})
        self.data: TrainingData | None = None

    def _on_main_then_all(self, fn) -> None:
        """Run ``fn`` on the main process only, then let every process continue."""
        if self.accelerator.is_main_process:
            fn()
        self.accelerator.wait_for_everyone()

    def load_data(self) -> TrainingData:
        """Prepare the data source (main process), then read the tables and pairs (every process)."""
        config, data_dir = self.config, self.output_dir / DATA
        self._on_main_then_all(lambda: prepare_source(config, data_dir))
        base = Path(".") if config.data.source == "files" else data_dir
        self._on_main_then_all(lambda: embed_sources(config, base, data_dir))
        tables = {key.split(".")[0] for key in config.data.embedding_sources}
        entity_paths = {name: embedded_table_path(data_dir, name) for name in tables}
        self.data = load_training_data(
            config,
            base,
            entity_features=entity_config(config.model).input_features(),
            entity_paths=entity_paths,
            cache_dir=data_dir / "cache",
        )
        for name, pool in self.data.hard_negatives.items():  # a pool that is mostly empty trains nothing
            sizes = pool.sizes()
            mean = sizes.mean() if len(sizes) else 0.0
            self.accelerator.print(
                f"Hard negatives of task {name!r}: {len(sizes)} pools, {mean:.1f} entities each on average, "
                f"{int((sizes == 0).sum())} empty"
            )
        return self.data

    def collate(self, micro_step: int) -> StepBatch:
        """The pairs, negatives and tower inputs this process uses at ``micro_step`` (pure in the step)."""
        return collate(
            self.data,
            self.tasks,
            self.batch_sizes,
            micro_step=micro_step,
            seed=self.config.train.seed,
            query_tower=self.query_tower,
            entity_tower=self.entity_tower,
            rank=self.accelerator.process_index,
            world_size=self.accelerator.num_processes,
            chunk_size=self.config.train.gradient_cache_chunk_size,
        )

    def _build_towers(self) -> None:
        model, data, tokenizer_dir = self.config.model, self.data, self.output_dir / TOKENIZERS
        fields = entity_config(model).text_fields
        # Generators: the texts are only read when a tokenizer has to be built from them.
        query_texts = itertools.chain(
            (t for pairs in data.pairs.values() for t in pairs.queries(np.arange(len(pairs)))),
            (
                t
                for pairs in data.pairs.values()
                if pairs.candidate_texts is not None
                for t in pairs.candidate_texts.to_pylist()
            ),
        )
        self._on_main_then_all(
            lambda: build_tokenizers(
                model, tokenizer_dir, entity_texts=table_texts(data.tables.values(), fields), query_texts=query_texts
            )
        )
        # Seeded here: a cold zero-shot passage cache consumes random draws before the towers exist.
        self.query_tower, self.entity_tower = build_towers(model, tokenizer_dir, seed=self.config.train.seed)

    def evaluate(self) -> dict[str, float]:
        """Recall@K of every task with held-out pairs (main process; the towers in eval mode)."""
        metrics: dict[str, float] = {}
        data, query_tower = self.data, self.query_tower
        for task in self.tasks:
            if task.name not in data.eval_pairs:
                continue
            pairs, kind, table = data.eval_pairs[task.name], task.candidate.kind, data.candidate_table(task)
            # A legacy space narrower than the query embedding is compared with the query's Matryoshka prefix.
            dim = data.feature_dims.get(task.name) if kind == "compat" else None
            truncate = dim if dim is not None and dim < query_tower.config.out_dim else None
            encode_queries = functools.partial(query_tower.encode, batch_size=128, truncate_dim=truncate)
            if task.query_feature is not None:
                fixed = data.tables[task.query_feature.table].by_id(
                    task.query_feature.feature, data.feature_dims[f"{task.name}/query"]
                )

                def encode_queries(ids, fixed=fixed):
                    return _unit_rows([fixed[i] for i in ids])

            if kind == "entity":
                candidates = table.by_id()
                encode_candidates = functools.partial(self.entity_tower.encode, batch_size=256)
            elif kind == "query":
                texts = set(data.pairs[task.name].candidate_texts.to_pylist()) | {c for _, c in pairs}
                candidates, encode_candidates = {t: t for t in texts}, encode_queries
            else:
                candidates, encode_candidates = table.by_id(task.candidate.feature, dim), _unit_rows
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

    def save_checkpoint(self, step: int) -> None:
        """Write ``checkpoints/step_N`` (see ``checkpoints.py``), keeping the newest ``train.keep_checkpoints``."""
        self.checkpointer.save(self.output_dir, step, keep=self.config.train.keep_checkpoints)

    # ---- the loop --------------------------------------------------------------------------------
    def train(self, resume: bool = False, overwrite: bool = False) -> dict[str, float]:
        """Train for ``train.max_steps`` optimizer steps, export both towers, return the final metrics."""
        accelerator, train = self.accelerator, self.config.train
        check_run_folder(self.output_dir, resume=resume, overwrite=overwrite)  # every process, before any work
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            removed = clear_run_folder(self.output_dir, overwrite=overwrite)
            if removed:
                accelerator.print(f"Removed from {self.output_dir}: {', '.join(removed)}")
        accelerator.wait_for_everyone()
        accelerator.print(
            f"Training with {accelerator.num_processes} process(es) on {accelerator.device}; "
            f"per-process batch by task: {self.batch_sizes}"
        )
        if accelerator.is_main_process:  # the resolved config, overrides included: `publish` reads it for the cards
            self.output_dir.mkdir(parents=True, exist_ok=True)
            text = yaml.safe_dump(self.config.to_dict(), sort_keys=False, allow_unicode=True)
            write_text_atomically(self.output_dir / CONFIG_FILE, text)
        if self.data is None:
            self.load_data()
        self._build_towers()
        compat_dims = {t.name: self.data.feature_dims[t.name] for t in self.tasks if t.candidate.kind == "compat"}
        catalogue_sizes = {t.name: self.data.catalogue_size(t) for t in self.tasks}
        model = MultiTaskModel(
            self.query_tower, self.entity_tower, self.tasks, self.config.loss, compat_dims, catalogue_sizes
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
        estimators = {name: loss.estimators for name, loss in accelerator.unwrap_model(model).losses.items()}
        self.checkpointer = Checkpointer(accelerator, model, optimizer, estimators)

        start = 0
        checkpoint = latest_checkpoint(self.output_dir) if resume else None
        if checkpoint is not None:
            start = self.checkpointer.load(checkpoint)
            accelerator.print(f"Resumed from {checkpoint} at step {start}")
        accelerator.init_trackers("tensorboard", config=_flat_scalars(self.config.to_dict()))  # logs/tensorboard

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
                last = micro == train.gradient_accumulation_steps - 1
                loss, parts = self._micro_step(model, batch, sync=last)
                for key, value in {"loss": loss, **parts}.items():
                    totals[key] = totals.get(key, 0.0) + float(value) / train.gradient_accumulation_steps
            if train.gradient_cache_chunk_size is not None:  # the towers ran outside DDP: average by hand
                all_reduce_gradients(model.parameters())
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
                logged = dict(zip(keys, means.tolist(), strict=True))
                window, window_steps = {}, 0
                losses = accelerator.unwrap_model(model).losses
                scales = {f"{name}/scale": loss.scale.item() for name, loss in losses.items()}
                accelerator.log({**logged, **scales, "lr": optimizer.param_groups[0]["lr"]}, step=done)
                progress.set_postfix({k: f"{v:.3f}" for k, v in logged.items() if "/" not in k})
                if accelerator.is_main_process:  # through the bar, so the line is not glued onto it
                    progress.write(json.dumps({"step": done, **{k: round(v, 4) for k, v in logged.items()}}))
                    self._append_history({"step": done, **logged})
            if train.eval_every and done % train.eval_every == 0 and done < train.max_steps:
                self._evaluate_and_log(done)
            if train.save_every and done % train.save_every == 0 and done < train.max_steps:
                self.save_checkpoint(done)
        metrics = self._evaluate_and_log(train.max_steps)
        self._export(metrics)
        accelerator.end_training()
        return metrics

    def _micro_step(self, model: torch.nn.Module, batch: StepBatch, *, sync: bool) -> tuple[torch.Tensor, dict]:
        """Forward and backward of one micro-step; gradients accumulate in ``.grad``; returns the losses."""
        accelerator, steps = self.accelerator, self.config.train.gradient_accumulation_steps
        if self.config.train.gradient_cache_chunk_size is not None:
            return cached_backward(
                accelerator.unwrap_model(model),
                batch,
                backward=lambda loss: accelerator.backward(loss / steps),
                autocast=accelerator.autocast,
            )
        with accelerator.no_sync(model) if not sync else contextlib.nullcontext():
            with accelerator.autocast():
                loss, parts = model(batch)
            accelerator.backward(loss / steps)
        return loss.detach(), parts

    def _evaluate_and_log(self, step: int) -> dict[str, float]:
        metrics: dict[str, float] = {}
        if self.accelerator.is_main_process and self.data.eval_pairs:
            metrics = self.evaluate()
            self.query_tower.train()
            self.entity_tower.train()
            self.accelerator.log(metrics, step=step)
            tqdm.write(json.dumps({"step": step, **{k: round(v, 4) for k, v in metrics.items()}}))
            self._append_history({"step": step, **metrics})
        self.accelerator.wait_for_everyone()
        return metrics

    def _append_history(self, record: dict[str, float]) -> None:
        """One line of ``logs/history.jsonl`` (main process): logged values at full precision."""
        path = self.output_dir / LOGS / HISTORY_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")

    def _export(self, metrics: dict[str, float]) -> None:
        """Save the trained towers (with their tokenizers) and the final metrics under ``output_dir``."""
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            # A tower that no task trained is not exported: it would be a random model.
            if self.uses_query_tower:
                self.query_tower.save_pretrained(self.output_dir / QUERY_TOWER)
            if self.uses_entity_tower:
                self.entity_tower.save_pretrained(self.output_dir / ENTITY_TOWER)
            text = json.dumps(metrics, indent=2, sort_keys=True) + "\n"
            write_text_atomically(self.output_dir / METRICS_FILE, text)
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


__all__ = ["Trainer", "learning_rate"]
