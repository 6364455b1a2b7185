"""The multi-task objective: both towers, one sampled-softmax loss per task, summed.

Paper §3.5: one query embedding is trained against several candidate towers at once — the learned
entity tower for pins and for products, the query tower itself for query→query pairs, and parameter-free
compatibility towers for the pre-existing (legacy) embeddings. Every step embeds all tasks' queries in
one query-tower call and all tasks' entity candidates in one entity-tower call, then scores each task
with its own ``SampledSoftmaxLoss`` (its own logit scale and frequency estimators).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..modeling import CompatibilityTower, OmniSearchSageEntityModel, OmniSearchSageQueryModel
from .batches import StepBatch
from .config import LossConfig, TaskConfig
from .losses import SampledSoftmaxLoss


class MultiTaskModel(nn.Module):
    """Query tower + entity tower + one loss per task; ``forward(step_batch)`` returns the summed loss.

    Args:
        query_tower: The query tower being trained.
        entity_tower: The entity tower being trained (shared by pin and product tasks).
        tasks: Task declarations, in the order every process evaluates them (collectives inside the
            losses must line up across processes).
        loss_config: Options of every task's ``SampledSoftmaxLoss``.
        compat_dims: For each ``compat`` task, the dimension of its pre-existing embedding.
        catalogue_sizes: For each task, the number of candidates it can draw (the logQ prior).
    """

    def __init__(
        self,
        query_tower: OmniSearchSageQueryModel,
        entity_tower: OmniSearchSageEntityModel,
        tasks: Sequence[TaskConfig],
        loss_config: LossConfig,
        compat_dims: Mapping[str, int] | None = None,
        catalogue_sizes: Mapping[str, int] | None = None,
    ):
        super().__init__()
        self.query_tower = query_tower
        self.entity_tower = entity_tower
        self.task_kinds = {task.name: task.candidate.kind for task in tasks}
        self.losses = nn.ModuleDict(
            {
                task.name: SampledSoftmaxLoss(
                    in_batch_negatives=True,
                    random_negatives=task.num_random_negatives > 0,
                    hard_negatives=task.num_hard_negatives > 0,
                    hard_negatives_weight=task.hard_negatives_weight,
                    logq_correction=loss_config.logq_correction,
                    positive_correction=loss_config.positive_correction,
                    matryoshka_dims=loss_config.matryoshka_dims,
                    matryoshka_weights=loss_config.matryoshka_weights,
                    init_scale=loss_config.init_scale,
                    max_scale=loss_config.max_scale,
                    sketch_width=loss_config.sketch_width,
                    sketch_depth=loss_config.sketch_depth,
                    catalogue_size=(catalogue_sizes or {}).get(task.name),
                )
                for task in tasks
            }
        )
        self.compat_towers = {
            task.name: CompatibilityTower(task.candidate.feature, (compat_dims or {})[task.name])
            for task in tasks
            if self.task_kinds[task.name] == "compat"
        }

    def embed(self, batch: StepBatch) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The step's query-tower and entity-tower outputs, chunk by chunk, concatenated (None: no rows)."""
        return tower_embeddings(self.query_tower, batch.query_chunks), tower_embeddings(
            self.entity_tower, batch.entity_chunks
        )

    def forward(self, batch: StepBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.score(batch, *self.embed(batch))

    def score(
        self, batch: StepBatch, query_out: torch.Tensor | None, entity_out: torch.Tensor | None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Every task's loss from the towers' outputs (``embed``), summed; with per-part losses for logging.

        Args:
            batch: The step's rows.
            query_out: ``(num_query_rows, out_dim)`` query-tower output, or None.
            entity_out: ``(num_entity_rows, out_dim)`` entity-tower output, or None.
        """
        total = torch.zeros(())
        parts: dict[str, torch.Tensor] = {}
        for name, task in batch.tasks.items():
            kind, loss_fn = self.task_kinds[name], self.losses[name]
            hard = None
            if kind == "compat":
                tower = self.compat_towers[name]
                candidates = tower(task.compat_candidates)  # (n, dim)
                negatives = tower(task.compat_negatives) if task.compat_negatives is not None else None
                if loss_fn.hard_negatives:
                    hard = tower(task.compat_hard_negatives)  # (k, dim)
            else:
                source = query_out if kind == "query" else entity_out
                candidates = source[task.candidates]  # (n, out_dim)
                negatives = source[task.negatives] if len(task.negatives) else None  # (m, out_dim)
                if loss_fn.hard_negatives:
                    hard = source[task.hard_negatives]  # (k, out_dim), k may be 0
            has_negatives = negatives is not None and len(negatives) > 0
            if task.query_vectors is not None:
                queries = F.normalize(task.query_vectors.float(), p=2, dim=-1)  # fixed: no gradient
            else:
                queries = query_out[task.queries]  # (n, out_dim)
            loss, task_parts = loss_fn(
                query_embeddings=queries,
                candidate_embeddings=candidates,
                query_ids=task.query_ids,
                candidate_ids=task.candidate_ids,
                negative_embeddings=negatives if has_negatives else None,
                negative_ids=task.negative_ids if has_negatives else None,
                negative_log_q=task.negative_log_q if has_negatives else None,
                hard_negative_embeddings=hard,
                hard_negative_ids=task.hard_negative_ids if hard is not None else None,
            )
            total = total + loss
            parts[name] = loss.detach()
            parts.update({f"{name}/{k}": v.detach() for k, v in task_parts.items()})
        return total, parts


def tower_embeddings(tower: nn.Module, chunks: Sequence[Mapping[str, object]]) -> torch.Tensor | None:
    """``tower``'s embeddings of every chunk of inputs, concatenated in order; None without chunks."""
    if not chunks:
        return None
    outputs = [tower(**chunk).embeddings for chunk in chunks]  # each (chunk_rows, out_dim)
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs)  # (num_rows, out_dim)


__all__ = ["MultiTaskModel", "tower_embeddings"]
