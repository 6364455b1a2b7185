"""Sampled softmax with logQ correction: the per-task training loss of OmniSearchSage (paper §3.5).

Each task (a dataset of query-entity pairs plus a candidate tower) treats retrieval as classification
over the whole catalogue, and approximates the softmax's denominator with samples of it, whose
cross-entropies are summed: the positives of the (global) batch, and random entities of the catalogue.
Both samples are biased towards what they were drawn from, so each negative's logit is corrected by
``-log Q(n)`` (Yi et al., 2019), with Q estimated by count-min sketches (``frequency.py``). A third,
optional set, hard negatives (mined offline or drawn from the positive's group), is scored without that
correction: see ``SampledSoftmaxLoss``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .distributed import all_gather_no_grad, all_gather_with_grad, get_rank
from .frequency import ConditionalFrequencyEstimator, EstimatorGroup, FrequencyEstimator
from .loss_inputs import check_finite_and_index, check_ids, check_matrix, check_vector
from .sampled_softmax import accidental_hits, sampled_softmax_cross_entropy


class SampledSoftmaxLoss(nn.Module):
    """Sampled softmax over in-batch, random and hard negatives, with logQ correction, for one task.

    For each query, the positive entity competes with up to three sets of negatives, each in its own
    softmax: the positives of every other pair in the global batch (gathered across processes, with
    gradient), random entities of the catalogue, and hard negatives. Popular entities appear often as
    in-batch negatives, so each in-batch and random negative's logit is lowered by ``log Q(n)``, the log
    probability it was sampled, from a streaming count-min sketch over the gathered candidate ids (or
    given by the random-negative sampler). As in the
    reference code, the positive (column 0 of every row) is not logQ-corrected, unlike eq. 3 of the paper;
    optionally it is lowered by ``log P(p|q)`` instead ("positive correction"). Negatives that are the
    row's own positive, or (in-batch) another positive of the same query, are masked. The scale is
    learned in log space and capped. With Matryoshka dims, the same losses are computed on the
    renormalised first ``d`` dims of every embedding, weighted, and summed.

    Hard negatives (``hard_negatives=True``) are entities close to a query but not engaged with it:
    mined offline by an encoder (``data.hard_negatives.mine_hard_negatives``) or drawn from the positive's
    group (same paragraph, same category). This process's rows bring ``K`` of them (up to ``H`` per row),
    and every row's softmax gets all ``K`` as columns, ``[s+, s_h1 ... s_hK]``: a query is pushed away from
    its own hard negatives and, for free, from those of the other rows, as sentence-transformers'
    ``MultipleNegativesRankingLoss`` does with hard-negative columns. A column is masked for a row when it
    is that row's positive (another row's hard negative can be it); a row with fewer than ``H`` negatives
    just brings fewer columns (a missing slot is masked for every row), never duplicates. They are **not**
    logQ-corrected: they were not drawn by popularity, so ``-log Q`` would not remove a sampling bias; it
    would raise the logit of every rarely-seen hard negative by ``-log Q``, undoing what mining selected
    them for. The positive logit is the same as in the other parts (same scale, same positive
    correction), and Matryoshka dims apply as to the other parts. Hard negatives stay on their process.

    Args:
        in_batch_negatives: Use the global batch's positives as negatives (eq. 3 of the paper).
        random_negatives: Use random catalogue entities as negatives (eq. 4-5); ``forward`` then needs
            ``negative_embeddings`` and ``negative_ids``. At least one of the two must be on.
        hard_negatives: Add the hard-negative cross-entropy (above); ``forward`` then needs
            ``hard_negative_embeddings`` and ``hard_negative_ids`` (possibly 0 rows).
        hard_negatives_weight: Weight of that part in the total (> 0; default 1.0).
        logq_correction: Subtract ``log Q(n)`` from negative logits.
        positive_correction: Subtract ``log P(p|q)`` (from two more sketches) from positive logits.
        matryoshka_dims: Prefix sizes ``d`` to train, e.g. ``(16, 32, ..., 512)``; None trains the full
            embeddings (query and candidate widths must then match). Dims wider than the candidate
            embedding are skipped, so a 512-d query trains its first 256 dims against a 256-d legacy space.
        matryoshka_weights: One non-negative weight per dim; default all 1.0.
        init_scale: Initial logit scale (inverse temperature). Default ``1 / 0.07``.
        max_scale: Cap on the scale; the learned log-scale is clamped to ``log(max_scale)`` when used.
        sketch_width, sketch_depth: Size of each count-min sketch (``8 * depth * width`` bytes each;
            up to four per loss). The overcount is at most ``e / width`` of all ids seen, with
            probability ``1 - e**-depth``.
        sketch_seed: Hash seed of the sketches; must be equal on every process.
        catalogue_size: Size of the candidate pool, when known; the frequency estimators then start from
            the uniform estimate instead of from nothing (see ``FrequencyEstimator``).

    Inputs (``forward``, keyword-only):
        +--------------------------+----------------------+----------------------------------------------+
        | Argument                 | Shape                | Meaning                                      |
        +==========================+======================+==============================================+
        | ``query_embeddings``     | ``(B, Dq)``          | unit query embeddings of this process        |
        | ``candidate_embeddings`` | ``(B, Dc)``          | unit embeddings of each query's positive     |
        | ``query_ids``            | ``(B,)`` int64       | stable query ids (same-query mask, P(p|q))   |
        | ``candidate_ids``        | ``(B,)`` int64       | stable entity ids (masks, logQ sketches)     |
        | ``negative_embeddings``  | ``(M, Dc)`` or None  | random catalogue entities of this process    |
        | ``negative_ids``         | ``(M,)`` or None     | their entity ids                             |
        | ``negative_log_q``       | ``(M,)`` or None     | their ``log Q`` if the sampler knows it;     |
        |                          |                      | None estimates it with a sketch              |
        | ``hard_negative_         | ``(K, Dc)`` or None  | hard negatives of this process's rows        |
        | embeddings``             |                      | (``K`` may be 0)                             |
        | ``hard_negative_ids``    | ``(K,)`` or None     | their entity ids                             |
        +--------------------------+----------------------+----------------------------------------------+

    Returns ``(total, parts)``: the 0-d weighted total, and detached per-part losses for logging, keyed
    ``"in_batch"``/``"random"``/``"hard"``, or ``"dim64/in_batch"``, ... with Matryoshka dims.

    Distributed: ``forward`` is a collective (every process calls it, same order, same ``B`` and ``M``, and
    ``negative_log_q`` given on all processes or none). Random negatives stay local to their process. The
    sketches are updated (in training mode only) with ids gathered from all processes, so they stay
    identical everywhere; checkpoint ``loss.estimators`` with the training state (``checkpoints.py`` does).
    ``logit_scale`` is a parameter: optimise it, and keep its gradient synchronised (e.g. hold the loss
    inside the module that DDP wraps).

    References:
        - Agarwal et al. OmniSearchSage: Multi-Task Multi-Entity Embeddings for Pinterest Search.
          WWW'24 Companion. https://arxiv.org/abs/2404.16260
        - Yi et al. Sampling-Bias-Corrected Neural Modeling for Large Corpus Item Recommendations.
          RecSys 2019. https://doi.org/10.1145/3298689.3346996

    Example:
        ::

            import torch, torch.nn.functional as F
            from omnisearchsage_hf.training.losses import SampledSoftmaxLoss

            loss = SampledSoftmaxLoss(random_negatives=False, sketch_width=1024)
            queries, pins = F.normalize(torch.randn(4, 8), dim=-1), F.normalize(torch.randn(4, 8), dim=-1)
            total, parts = loss(query_embeddings=queries, candidate_embeddings=pins,
                                query_ids=torch.tensor([1, 2, 3, 4]), candidate_ids=torch.tensor([10, 11, 12, 13]))
            sorted(parts), total.ndim
            # (['in_batch'], 0)
    """

    def __init__(
        self,
        *,
        in_batch_negatives: bool = True,
        random_negatives: bool = True,
        hard_negatives: bool = False,
        hard_negatives_weight: float = 1.0,
        logq_correction: bool = True,
        positive_correction: bool = False,
        matryoshka_dims: Sequence[int] | None = None,
        matryoshka_weights: Sequence[float] | None = None,
        init_scale: float = 1 / 0.07,
        max_scale: float = 100.0,
        sketch_width: int = 2**20,
        sketch_depth: int = 2,
        sketch_seed: int = 0,
        catalogue_size: int | None = None,
    ):
        super().__init__()
        if not (in_batch_negatives or random_negatives):
            raise ValueError("Set `in_batch_negatives` or `random_negatives` (or both) to True: no negatives left.")
        if not hard_negatives_weight > 0:
            raise ValueError(f"`hard_negatives_weight` must be > 0, got {hard_negatives_weight!r}.")
        if not 0 < init_scale <= max_scale:
            raise ValueError(
                f"Need 0 < `init_scale` <= `max_scale`, got init_scale={init_scale!r}, max_scale={max_scale!r}."
            )
        if matryoshka_dims is not None:
            matryoshka_dims = tuple(matryoshka_dims)
            if not matryoshka_dims or any(not isinstance(d, int) or d < 1 for d in matryoshka_dims):
                raise ValueError(f"`matryoshka_dims` must be positive ints, got {matryoshka_dims!r}.")
            if len(set(matryoshka_dims)) != len(matryoshka_dims):
                raise ValueError(f"`matryoshka_dims` has duplicates: {matryoshka_dims!r}.")
            weights = (1.0,) * len(matryoshka_dims) if matryoshka_weights is None else tuple(matryoshka_weights)
            if len(weights) != len(matryoshka_dims) or any(w < 0 for w in weights):
                raise ValueError(
                    f"`matryoshka_weights` needs one non-negative weight per dim of {matryoshka_dims!r}, "
                    f"got {weights!r}."
                )
            matryoshka_weights = tuple(float(w) for w in weights)
        elif matryoshka_weights is not None:
            raise ValueError("`matryoshka_weights` needs `matryoshka_dims`; set both or neither.")
        self.in_batch_negatives = in_batch_negatives
        self.random_negatives = random_negatives
        self.hard_negatives, self.hard_negatives_weight = hard_negatives, float(hard_negatives_weight)
        self.logq_correction = logq_correction
        self.positive_correction = positive_correction
        self.matryoshka_dims = matryoshka_dims
        self.matryoshka_weights = matryoshka_weights
        self.init_scale, self.max_scale = float(init_scale), float(max_scale)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(init_scale)))
        self.sketch_width, self.sketch_depth, self.sketch_seed = sketch_width, sketch_depth, sketch_seed
        # Training state, deliberately not a buffer: checkpointed on its own, never saved with model weights.
        sketch = {"width": sketch_width, "depth": sketch_depth, "seed": sketch_seed}
        self.estimators = EstimatorGroup()
        if logq_correction and in_batch_negatives:
            self.estimators["in_batch"] = FrequencyEstimator(**sketch, catalogue_size=catalogue_size)
        if logq_correction and random_negatives:
            self.estimators["random"] = FrequencyEstimator(**sketch, catalogue_size=catalogue_size)
        if positive_correction:
            self.estimators["positive"] = ConditionalFrequencyEstimator(**sketch)

    @property
    def scale(self) -> Tensor:
        """The logit scale in use, ``exp(min(logit_scale, log(max_scale)))`` (0-d, differentiable)."""
        return self.logit_scale.clamp(max=math.log(self.max_scale)).exp()

    def forward(
        self,
        *,
        query_embeddings: Tensor,
        candidate_embeddings: Tensor,
        query_ids: Tensor,
        candidate_ids: Tensor,
        negative_embeddings: Tensor | None = None,
        negative_ids: Tensor | None = None,
        negative_log_q: Tensor | None = None,
        hard_negative_embeddings: Tensor | None = None,
        hard_negative_ids: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        batch_size = check_matrix("query_embeddings", query_embeddings)
        check_matrix("candidate_embeddings", candidate_embeddings, rows=batch_size)
        check_ids("query_ids", query_ids, batch_size)
        check_ids("candidate_ids", candidate_ids, batch_size)
        if self.random_negatives:
            if negative_embeddings is None or negative_ids is None:
                raise ValueError(
                    "random_negatives=True needs `negative_embeddings` and `negative_ids` (random catalogue "
                    "entities); pass them or build the loss with random_negatives=False."
                )
            num_negatives = check_matrix("negative_embeddings", negative_embeddings, cols=candidate_embeddings.shape[1])
            check_ids("negative_ids", negative_ids, num_negatives)
        elif negative_embeddings is not None:
            raise ValueError("`negative_embeddings` were given but random_negatives=False; drop them or enable it.")

        # Ids of the global batch; rank r's rows sit at [r * B, (r + 1) * B).
        query_ids_all = all_gather_no_grad(query_ids)  # (N,)  also checks B agrees across processes
        candidate_ids_all = all_gather_no_grad(candidate_ids, check_shapes=False)  # (N,)
        if self.in_batch_negatives:
            candidates = all_gather_with_grad(candidate_embeddings, check_shapes=False)  # (N, Dc)
            offset, ids, qids = get_rank() * batch_size, candidate_ids_all, query_ids_all
        else:
            candidates, offset, ids, qids = candidate_embeddings, 0, candidate_ids, query_ids
        positive_index = torch.arange(offset, offset + batch_size, device=candidates.device)  # (B,)
        estimate_negatives = "random" in self.estimators and negative_log_q is None
        if estimate_negatives:
            negative_ids_all = all_gather_no_grad(negative_ids)  # (world_size * M,)

        if self.training:
            if "in_batch" in self.estimators:
                self.estimators["in_batch"].update(candidate_ids_all)
            if "positive" in self.estimators:
                self.estimators["positive"].update(query_ids_all, candidate_ids_all)
            if estimate_negatives:
                self.estimators["random"].update(negative_ids_all)

        candidate_log_q = positive_log_q = None
        if "in_batch" in self.estimators:
            candidate_log_q = self.estimators["in_batch"].log_prob(ids, num_draws=ids.shape[0])  # (N,)
        if "positive" in self.estimators:
            positive_log_q = self.estimators["positive"].log_prob(query_ids, candidate_ids)  # (B,)
        if estimate_negatives:
            negative_log_q = self.estimators["random"].log_prob(negative_ids)  # (M,) M draws on this process
        return self.compute_loss_from_embeddings(
            query_embeddings,
            candidates,
            positive_index=positive_index,
            candidate_ids=ids,
            query_ids=qids,
            candidate_log_q=candidate_log_q,
            positive_log_q=positive_log_q,
            negative_embeddings=negative_embeddings,
            negative_ids=negative_ids,
            negative_log_q=negative_log_q,
            hard_negative_embeddings=hard_negative_embeddings,
            hard_negative_ids=hard_negative_ids,
        )

    def compute_loss_from_embeddings(
        self,
        query_embeddings: Tensor,
        candidate_embeddings: Tensor,
        *,
        positive_index: Tensor,
        candidate_ids: Tensor,
        query_ids: Tensor,
        candidate_log_q: Tensor | None = None,
        positive_log_q: Tensor | None = None,
        negative_embeddings: Tensor | None = None,
        negative_ids: Tensor | None = None,
        negative_log_q: Tensor | None = None,
        hard_negative_embeddings: Tensor | None = None,
        hard_negative_ids: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Score embeddings that are already gathered; pure (no collectives, no sketch updates).

        Args:
            query_embeddings: ``(B, Dq)`` this process's queries.
            candidate_embeddings: ``(N, Dc)`` the candidates of the global batch (``N = B`` in one process),
                each the positive of one query; in-batch negatives are drawn from them.
            positive_index: ``(B,)`` int64, the row of ``candidate_embeddings`` holding query ``i``'s positive.
            candidate_ids: ``(N,)`` entity id of each candidate.
            query_ids: ``(N,)`` query id each candidate was paired with.
            candidate_log_q: ``(N,)`` ``log Q`` of each candidate; required when in-batch negatives and
                logQ correction are on, ignored otherwise.
            positive_log_q: ``(B,)`` ``log P(p|q)``; required with positive correction, ignored otherwise.
            negative_embeddings: ``(M, Dc)`` random negatives; required when random negatives are on.
            negative_ids: ``(M,)`` their entity ids.
            negative_log_q: ``(M,)`` their ``log Q``; required with random negatives and logQ correction.
            hard_negative_embeddings: ``(K, Dc)`` hard negatives, ``K >= 0``; required with hard negatives.
            hard_negative_ids: ``(K,)`` their entity ids.

        Returns:
            ``(total, parts)`` as in the class docstring.
        """
        batch_size = check_matrix("query_embeddings", query_embeddings)
        num_candidates = check_matrix("candidate_embeddings", candidate_embeddings)
        check_ids("positive_index", positive_index, batch_size)
        check_ids("candidate_ids", candidate_ids, num_candidates)
        check_ids("query_ids", query_ids, num_candidates)
        use_candidate_log_q = self.in_batch_negatives and self.logq_correction
        check_vector("candidate_log_q", candidate_log_q, num_candidates, use_candidate_log_q, "logq_correction")
        check_vector("positive_log_q", positive_log_q, batch_size, self.positive_correction, "positive_correction")
        finite = [("query_embeddings", query_embeddings), ("candidate_embeddings", candidate_embeddings)]
        if self.random_negatives:
            if negative_embeddings is None or negative_ids is None:
                raise ValueError("random_negatives=True needs `negative_embeddings` and `negative_ids`.")
            num_negatives = check_matrix("negative_embeddings", negative_embeddings, cols=candidate_embeddings.shape[1])
            check_ids("negative_ids", negative_ids, num_negatives)
            check_vector("negative_log_q", negative_log_q, num_negatives, self.logq_correction, "logq_correction")
            finite.append(("negative_embeddings", negative_embeddings))
        if self.hard_negatives:
            if hard_negative_embeddings is None or hard_negative_ids is None:
                raise ValueError(
                    "hard_negatives=True needs `hard_negative_embeddings` and `hard_negative_ids` (0 rows when "
                    "no row has any); pass them or build the loss with hard_negatives=False."
                )
            num_hard = hard_negative_embeddings.shape[0]
            if num_hard:  # a step whose rows have no hard negative scores an empty set: a zero loss
                check_matrix("hard_negative_embeddings", hard_negative_embeddings, cols=candidate_embeddings.shape[1])
                finite.append(("hard_negative_embeddings", hard_negative_embeddings))
            check_ids("hard_negative_ids", hard_negative_ids, num_hard)
        elif hard_negative_embeddings is not None:
            raise ValueError("`hard_negative_embeddings` were given but hard_negatives=False; drop them or enable it.")
        check_finite_and_index(finite, positive_index, num_candidates)
        plan = self._matryoshka_plan(query_embeddings.shape[1], candidate_embeddings.shape[1])

        positive_ids, row_query_ids = candidate_ids[positive_index], query_ids[positive_index]  # (B,), (B,)
        scale = self.scale
        if not self.positive_correction:
            positive_log_q = None
        # Sampled sets scored against every row: (name, embeddings, ids, log Q). Hard negatives were not drawn
        # by popularity, so they get no logQ correction (see the class docstring).
        sampled = [("random", negative_embeddings, negative_ids, negative_log_q)] if self.random_negatives else []
        sampled += [("hard", hard_negative_embeddings, hard_negative_ids, None)] if self.hard_negatives else []
        parts: dict[str, Tensor] = {}
        total = query_embeddings.new_zeros((), dtype=torch.promote_types(query_embeddings.dtype, torch.float32))
        for prefix, dim, weight in plan:
            queries = _prefix(query_embeddings, dim)  # (B, d)
            candidates = _prefix(candidate_embeddings, dim)  # (N, d)
            positive_scores = (queries * candidates[positive_index]).sum(dim=-1)  # (B,)
            losses = {}
            if self.in_batch_negatives:
                losses["in_batch"] = sampled_softmax_cross_entropy(
                    positive_scores,
                    queries @ candidates.T,  # (B, N)
                    scale=scale,
                    hits=accidental_hits(positive_ids, candidate_ids, row_query_ids, query_ids),
                    positive_log_q=positive_log_q,
                    negative_log_q=candidate_log_q if self.logq_correction else None,
                )
            for name, embeddings, ids, log_q in sampled:
                losses[name] = sampled_softmax_cross_entropy(
                    positive_scores,
                    queries @ _prefix(embeddings, dim).T,  # (B, M) random or (B, K) hard
                    scale=scale,
                    hits=accidental_hits(positive_ids, ids),
                    positive_log_q=positive_log_q,
                    negative_log_q=log_q if self.logq_correction else None,
                )
            for name, loss in losses.items():
                part_weight = self.hard_negatives_weight if name == "hard" else 1.0
                total = total + weight * part_weight * loss
                parts[prefix + name] = loss.detach()
        return total, parts

    def _matryoshka_plan(self, query_dim: int, candidate_dim: int) -> list[tuple[str, int | None, float]]:
        """``[(key prefix, prefix dim or None for the full embedding, weight)]`` for these widths."""
        if self.matryoshka_dims is None:
            if query_dim != candidate_dim:
                raise ValueError(
                    f"query_embeddings have {query_dim} dims but candidate_embeddings have {candidate_dim}; "
                    "make them equal or set `matryoshka_dims` to train a shared prefix."
                )
            return [("", None, 1.0)]
        plan = []
        for dim, weight in zip(self.matryoshka_dims, self.matryoshka_weights, strict=False):
            if dim > candidate_dim:
                continue  # e.g. 512 against a 256-d legacy embedding: only the prefixes it has are trained
            if dim > query_dim:
                raise ValueError(
                    f"`matryoshka_dims` has {dim} but query_embeddings have only {query_dim} dims; drop that dim."
                )
            plan.append((f"dim{dim}/", dim, weight))
        if not plan:
            raise ValueError(
                f"No `matryoshka_dims` {self.matryoshka_dims!r} fits candidate_embeddings of {candidate_dim} dims; "
                f"add a dim <= {candidate_dim}."
            )
        return plan

    def get_config_dict(self) -> dict[str, Any]:
        return {
            "in_batch_negatives": self.in_batch_negatives,
            "random_negatives": self.random_negatives,
            "hard_negatives": self.hard_negatives,
            "hard_negatives_weight": self.hard_negatives_weight,
            "logq_correction": self.logq_correction,
            "positive_correction": self.positive_correction,
            "matryoshka_dims": self.matryoshka_dims,
            "matryoshka_weights": self.matryoshka_weights,
            "init_scale": self.init_scale,
            "max_scale": self.max_scale,
            "sketch_width": self.sketch_width,
            "sketch_depth": self.sketch_depth,
            "sketch_seed": self.sketch_seed,
        }

    def extra_repr(self) -> str:
        return ", ".join(f"{key}={value!r}" for key, value in self.get_config_dict().items())

    @property
    def citation(self) -> str:
        return """
@inproceedings{agarwal2024omnisearchsage,
      title={OmniSearchSage: Multi-Task Multi-Entity Embeddings for Pinterest Search},
      author={Prabhat Agarwal and Minhazul Islam Sk and Nikil Pancha and Kurchi Subhra Hazra
              and Jiajing Xu and Chuck Rosenberg},
      booktitle={Companion Proceedings of the ACM Web Conference 2024},
      year={2024},
      eprint={2404.16260},
      archivePrefix={arXiv},
      url={https://arxiv.org/abs/2404.16260},
}
@inproceedings{yi2019samplingbias,
      title={Sampling-Bias-Corrected Neural Modeling for Large Corpus Item Recommendations},
      author={Xinyang Yi and Ji Yang and Lichan Hong and Derek Zhiyuan Cheng and Lukasz Heldt
              and Aditee Kumthekar and Zhe Zhao and Li Wei and Ed Chi},
      booktitle={Proceedings of the 13th ACM Conference on Recommender Systems},
      year={2019},
      url={https://doi.org/10.1145/3298689.3346996},
}
"""


def _prefix(embeddings: Tensor, dim: int | None) -> Tensor:
    """The first ``dim`` dims renormalised to unit length, or ``embeddings`` unchanged when ``dim`` is None."""
    return embeddings if dim is None else F.normalize(embeddings[:, :dim], p=2, dim=-1)  # (n, dim)


__all__ = ["SampledSoftmaxLoss"]
