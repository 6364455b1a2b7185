"""Hard negatives: the loss's "hard" part against logits rebuilt by hand, the pools and their seeded draw,
collation, gradient caching, the miner's rank range and false-negative filter, config errors, and short
trainer runs (group and mined pools) that resume exactly.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file
from transformers import AutoModel

from omnisearchsage_hf import OmniSearchSageQueryModel
from omnisearchsage_hf.data.hard_negatives import mine_hard_negatives, write_hard_negatives
from omnisearchsage_hf.data.tables import EntityTable
from omnisearchsage_hf.training.batches import StepBatch, TaskBatch, collate
from omnisearchsage_hf.training.config import LossConfig, TaskConfig, load_config
from omnisearchsage_hf.training.gradient_cache import cached_backward
from omnisearchsage_hf.training.hard_negatives import (
    MISSING,
    HardNegativePool,
    draw_hard_negatives,
    group_pool,
    mined_pool,
)
from omnisearchsage_hf.training.losses import SampledSoftmaxLoss
from omnisearchsage_hf.training.mine import main as mine_main
from omnisearchsage_hf.training.multitask import MultiTaskModel
from omnisearchsage_hf.training.pairs import TaskPairs, TrainingData

ROOT = Path(__file__).parents[1]
TINY = ROOT / "training" / "configs" / "tiny.yaml"

# ---------------------------------------------------------------- the loss's "hard" part

# 3 rows (query id, positive id): (1, 10), (2, 11), (3, 12); 4 hard-negative columns shared by every row.
POSITIVE_IDS = [10, 11, 12]
HARD_IDS = [20, 11, 21, 22]  # 11 is row 1's positive (another row's hard negative): masked for row 1 only


def unit(rows: int, cols: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)), dim=-1)


def hard_by_hand(queries, positives, hard, scale, masked, positive_log_q=None) -> float:
    """Mean over rows of -log softmax of [scale s+ - log P, scale s_h for each unmasked column]: no logQ."""
    total = 0.0
    for i in range(len(queries)):
        logits = [scale * float(queries[i] @ positives[i]) - (positive_log_q[i] if positive_log_q is not None else 0)]
        logits += [scale * float(queries[i] @ hard[k]) for k in range(len(hard)) if (i, k) not in masked]
        total += -logits[0] + math.log(sum(math.exp(value) for value in logits))
    return total / len(queries)


def hard_set(dim: int, candidates: torch.Tensor) -> torch.Tensor:
    """4 hard negatives; column 1 is entity 11, row 1's positive, so it has that row's candidate embedding."""
    hard = unit(4, dim, 2)
    hard[1] = candidates[1]
    return hard


def score(loss: SampledSoftmaxLoss, queries, candidates, hard, hard_ids=HARD_IDS, **extra):
    return loss.compute_loss_from_embeddings(
        queries,
        candidates,
        positive_index=torch.arange(3),
        candidate_ids=torch.tensor(POSITIVE_IDS),
        query_ids=torch.tensor([1, 2, 3]),
        candidate_log_q=torch.tensor([-1.0, -2.0, -3.0]),  # in-batch logQ: must not reach the hard part
        hard_negative_embeddings=hard,
        hard_negative_ids=torch.tensor(hard_ids, dtype=torch.long),
        **extra,
    )


@pytest.mark.parametrize("positive_correction", [False, True])
def test_hard_part_is_cross_entropy_over_positive_and_masked_hard_columns_without_logq(positive_correction):
    queries, candidates = unit(3, 4, 0), unit(3, 4, 1)
    hard = hard_set(4, candidates)
    loss = SampledSoftmaxLoss(
        random_negatives=False, hard_negatives=True, positive_correction=positive_correction, sketch_width=64
    )
    positive_log_q = torch.tensor([-0.5, -0.1, -0.25]) if positive_correction else None
    total, parts = score(loss, queries, candidates, hard, positive_log_q=positive_log_q)
    scale = loss.scale.item()
    expected = hard_by_hand(queries, candidates, hard, scale, masked={(1, 1)}, positive_log_q=positive_log_q)
    assert sorted(parts) == ["hard", "in_batch"]
    assert parts["hard"].item() == pytest.approx(expected, rel=1e-5)
    # Without the mask the loss differs: row 1's positive would compete with itself.
    unmasked = hard_by_hand(queries, candidates, hard, scale, masked=set(), positive_log_q=positive_log_q)
    assert unmasked - expected > 0.1
    torch.testing.assert_close(total, parts["in_batch"] + parts["hard"])


def test_hard_weight_scales_only_the_hard_part():
    queries, candidates, hard = unit(3, 4, 0), unit(3, 4, 1), unit(4, 4, 2)
    loss = SampledSoftmaxLoss(random_negatives=False, hard_negatives=True, hard_negatives_weight=0.25, sketch_width=64)
    total, parts = score(loss, queries, candidates, hard)
    torch.testing.assert_close(total, parts["in_batch"] + 0.25 * parts["hard"])


def test_no_hard_negative_columns_give_a_zero_hard_loss():
    """A step whose rows drew nothing (every pool empty) scores only the positive: -log 1 = 0."""
    queries, candidates = unit(3, 4, 0), unit(3, 4, 1)
    loss = SampledSoftmaxLoss(random_negatives=False, hard_negatives=True, sketch_width=64)
    total, parts = score(loss, queries, candidates, torch.zeros(0, 4), hard_ids=[])
    assert parts["hard"].item() == 0.0
    torch.testing.assert_close(total, parts["in_batch"])


def test_matryoshka_dims_apply_to_the_hard_part():
    queries, candidates = unit(3, 6, 3), unit(3, 6, 4)
    hard = hard_set(6, candidates)
    loss = SampledSoftmaxLoss(random_negatives=False, hard_negatives=True, matryoshka_dims=[2, 6], sketch_width=64)
    _, parts = score(loss, queries, candidates, hard)
    scale = loss.scale.item()
    for dim in (2, 6):
        prefix = [F.normalize(x[:, :dim], dim=-1) for x in (queries, candidates, hard)]
        expected = hard_by_hand(*prefix, scale, masked={(1, 1)})
        assert parts[f"dim{dim}/hard"].item() == pytest.approx(expected, rel=1e-5)


def test_hard_negative_inputs_are_checked():
    queries, candidates, hard = unit(3, 4, 0), unit(3, 4, 1), unit(4, 4, 2)
    with pytest.raises(ValueError, match="hard_negatives=True needs `hard_negative_embeddings`"):
        score(SampledSoftmaxLoss(random_negatives=False, hard_negatives=True), queries, candidates, None)
    with pytest.raises(ValueError, match="hard_negatives=False"):
        score(SampledSoftmaxLoss(random_negatives=False), queries, candidates, hard)
    with pytest.raises(ValueError, match="`hard_negative_ids` must have shape \\(4,\\)"):
        score(SampledSoftmaxLoss(random_negatives=False, hard_negatives=True), queries, candidates, hard, [1, 2])
    with pytest.raises(ValueError, match="`hard_negative_embeddings` must have 4 dims"):
        score(SampledSoftmaxLoss(random_negatives=False, hard_negatives=True), queries, candidates, unit(4, 3, 0))
    with pytest.raises(ValueError, match="`hard_negatives_weight` must be > 0"):
        SampledSoftmaxLoss(hard_negatives=True, hard_negatives_weight=0.0)


# ---------------------------------------------------------------- pools and the seeded draw


def test_draw_is_seeded_without_replacement_never_the_positive_and_leaves_missing_slots():
    # Pool 0: rows 4..9 (6 members); pool 1: rows 1, 2; pool 2: empty.
    pool = HardNegativePool(np.array([0, 6, 8, 8]), np.array([4, 5, 6, 7, 8, 9, 1, 2]))
    keys, positives = np.array([0, 0, 1, 2, -1]), np.array([5, 3, 2, 0, 0])
    args = {"count": 4, "seed": 7, "step": 3, "rank": 0, "task": 1}
    drawn = draw_hard_negatives(pool, keys, positives, **args)
    assert drawn.shape == (5, 4)
    np.testing.assert_array_equal(drawn, draw_hard_negatives(pool, keys, positives, **args))  # pure
    for row in drawn[:2]:
        assert len(set(row)) == 4 and set(row) <= {4, 5, 6, 7, 8, 9}
    assert 5 not in drawn[0]  # row 0's positive is in its pool but never drawn
    np.testing.assert_array_equal(drawn[2], [1, MISSING, MISSING, MISSING])  # pool of 2 less the positive
    assert (drawn[3:] == MISSING).all()  # an empty pool, and no pool
    other_steps = [draw_hard_negatives(pool, keys, positives, **{**args, "step": s})[0] for s in range(4, 10)]
    assert any(set(row) != set(drawn[0]) for row in other_steps)  # each step draws afresh


def test_group_pool_groups_rows_by_column_and_skips_nulls():
    table = EntityTable(
        pa.table({"id": ["a", "b", "c", "d", "e"], "paragraph": ["p1", "p2", "p1", None, "p1"]}), name="sentences"
    )
    pool = group_pool(table, "paragraph", task="t")
    keys = pool.keys(np.zeros(5, dtype=np.int64), np.arange(5))
    assert keys[3] == -1 and keys[0] == keys[2] == keys[4] != keys[1]
    members = {int(k): pool.members[pool.offsets[k] : pool.offsets[k + 1]].tolist() for k in set(keys) - {-1}}
    assert members[int(keys[0])] == [0, 2, 4] and members[int(keys[1])] == [1]
    with pytest.raises(ValueError, match=r"`hard_negatives_group` of entity table 'sentences' lacks column\(s\) "):
        group_pool(table, "article", task="t")


def _mined(path: Path, rows: dict) -> Path:
    table = pa.table({"query": list(rows), "negative_ids": list(rows.values())})
    return write_hard_negatives(table, path)


def test_mined_pool_maps_queries_and_ids(tmp_path, caplog):
    table = EntityTable(pa.table({"id": ["a", "b", "c", "d"]}), name="pin")
    queries = pa.array(["q1", "q2", "q3"])  # sorted, as TaskPairs holds them
    path = _mined(tmp_path / "mined.parquet", {"q3": ["d", "a"], "q1": ["b"], "other": ["c"]})
    with caplog.at_level("WARNING"):
        pool = mined_pool(path, queries, table, task="t")
    assert "1 of the task's 3 queries have no row" in caplog.text  # q2
    assert [pool.members[pool.offsets[k] : pool.offsets[k + 1]].tolist() for k in range(3)] == [[1], [], [3, 0]]
    np.testing.assert_array_equal(pool.keys(np.array([2, 0]), np.array([0, 0])), [2, 0])  # by query id

    with pytest.raises(ValueError, match="Id 'zz' in Task 't'.*was it mined for another entity table"):
        mined_pool(_mined(tmp_path / "ids.parquet", {"q1": ["a", "zz"]}), queries, table, task="t")
    with pytest.raises(ValueError, match="none of its 1 queries .* is a query of the task's pairs"):
        mined_pool(_mined(tmp_path / "queries.parquet", {"x": ["a"]}), queries, table, task="t")
    with pytest.raises(FileNotFoundError, match="omnisearchsage-mine"):
        mined_pool(tmp_path / "absent.parquet", queries, table, task="t")
    repeated = pa.table({"query": ["q1", "q1"], "negative_ids": [["a"], ["b"]]})
    with pytest.raises(ValueError, match="query 'q1' has more than one row"):
        mined_pool(write_hard_negatives(repeated, tmp_path / "rep.parquet"), queries, table, task="t")


# ---------------------------------------------------------------- collation and gradient caching

ENTITY_ROWS = [{"id": f"e{i}", "title": title} for i, title in enumerate(["red dress", "copper sink", "lamp"] * 3)]
GROUPS = ["g0", "g0", "g0", "g1", "g1", "g1", "g2", "g2", "g2"]


def small_data() -> TrainingData:
    table = EntityTable(
        pa.Table.from_pylist([{**row, "group": g} for row, g in zip(ENTITY_ROWS, GROUPS, strict=True)]),
        name="pin",
        metadata_columns=["group"],
    )
    pairs = TaskPairs(pa.array(["q0", "q1", "q2", "q3"]), np.array([0, 1, 2, 3]), np.array([0, 3, 4, 6]))
    return TrainingData({"pin": table}, {"pin": pairs}, hard_negatives={"pin": group_pool(table, "group", task="pin")})


def test_collate_adds_distinct_hard_negatives_as_entity_rows(tiny_backbone_dir, make_entity_tower):
    data, query_tower = small_data(), OmniSearchSageQueryModel.from_backbone(tiny_backbone_dir, out_dim=8)
    task = TaskConfig(name="pin", candidate="entity:pin", num_hard_negatives=2, hard_negatives_group="group")
    kwargs = {"micro_step": 5, "seed": 0, "query_tower": query_tower, "entity_tower": make_entity_tower()}
    batch = collate(data, [task], {"pin": 4}, **kwargs).tasks["pin"]
    positives = set(batch.candidate_ids.tolist())
    assert positives == {0, 3, 4, 6}
    hard = batch.hard_negative_ids.tolist()
    # Positive 0 draws 2 of {1, 2}; 3 and 4 (both g1) draw {4, 5} and {3, 5}; 6 draws 2 of {7, 8}; each once.
    assert sorted(hard) == [1, 2, 3, 4, 5, 7, 8]
    assert batch.hard_negatives.tolist() == list(range(4, 4 + len(hard)))  # after the 4 positives' rows
    again = collate(data, [task], {"pin": 4}, **kwargs).tasks["pin"]
    assert torch.equal(again.hard_negative_ids, batch.hard_negative_ids)


OUT_DIM = 8
TEXTS = ["antique copper sink", "red dress", "kitchen lamp", "summer shoes", "wall art", "red dress"]


@pytest.fixture
def model(tiny_backbone_dir, make_entity_tower) -> MultiTaskModel:
    torch.manual_seed(0)
    query_tower = OmniSearchSageQueryModel.from_backbone(tiny_backbone_dir, out_dim=OUT_DIM).eval()
    tasks = [
        TaskConfig(
            name="pin", candidate="entity:pin", num_random_negatives=2, num_hard_negatives=2, hard_negatives="x"
        ),
        TaskConfig(name="legacy", candidate="compat:pin:legacy", num_hard_negatives=1, hard_negatives_group="g"),
    ]
    loss = LossConfig(matryoshka_dims=[4, 8], sketch_width=1024)
    return MultiTaskModel(query_tower, make_entity_tower(), tasks, loss, {"legacy": OUT_DIM}, {"pin": 50, "legacy": 50})


def step_batch(model: MultiTaskModel, chunk_size: int | None) -> StepBatch:
    """6 pairs; entity rows: 6 positives, 2 random negatives, 3 hard negatives (one of them a positive)."""
    entities = [{"title": t} for t in TEXTS] + [{"title": "lamp"}, {"description": "kettle"}]
    entities += [{"title": "copper"}, {"title": "summer"}, {"title": "red dress"}]
    rows, generator = torch.arange(6), torch.Generator().manual_seed(3)
    tasks = {
        "pin": TaskBatch(
            queries=rows,
            candidates=rows,
            query_ids=torch.tensor([0, 1, 2, 3, 4, 1]),
            candidate_ids=torch.tensor([10, 11, 12, 13, 14, 15]),
            negatives=torch.tensor([6, 7]),
            negative_ids=torch.tensor([30, 31]),
            negative_log_q=torch.full((2,), -3.0),
            hard_negatives=torch.tensor([8, 9, 10]),
            hard_negative_ids=torch.tensor([40, 41, 11]),  # 11 is row 1's positive
        ),
        "legacy": TaskBatch(
            queries=rows,
            candidates=torch.zeros(0, dtype=torch.long),
            query_ids=torch.tensor([0, 1, 2, 3, 4, 1]),
            candidate_ids=torch.tensor([10, 11, 12, 13, 14, 15]),
            compat_candidates=torch.randn(6, OUT_DIM, generator=generator),
            hard_negative_ids=torch.tensor([42, 43]),
            compat_hard_negatives=torch.randn(2, OUT_DIM, generator=generator),
        ),
    }
    size = chunk_size or 64
    return StepBatch(
        [model.query_tower.tokenize(TEXTS[i : i + size]) for i in range(0, len(TEXTS), size)],
        [model.entity_tower.prepare_inputs(entities[i : i + size]) for i in range(0, len(entities), size)],
        tasks,
    )


@pytest.mark.parametrize("chunk_size", [2, 5])
def test_cached_step_with_hard_negatives_equals_uncached(model, chunk_size):
    uncached, cached = copy.deepcopy(model), copy.deepcopy(model)
    loss, parts = uncached(step_batch(uncached, None))
    loss.backward()
    cached_loss, cached_parts = cached_backward(
        cached, step_batch(cached, chunk_size), backward=lambda value: value.backward()
    )
    torch.testing.assert_close(cached_loss, loss.detach(), atol=1e-5, rtol=0)
    assert {"pin/dim4/hard", "pin/dim8/hard", "legacy/dim8/hard"} <= set(parts) and sorted(parts) == sorted(
        cached_parts
    )
    expected = {name: p.grad.clone() for name, p in uncached.named_parameters() if p.grad is not None}
    actual = {name: p.grad.clone() for name, p in cached.named_parameters() if p.grad is not None}
    assert sorted(expected) == sorted(actual) and any(name.startswith("entity_tower.") for name in expected)
    for name, grad in expected.items():  # float rounding, relative to the largest entry (up to ~400 here)
        torch.testing.assert_close(actual[name], grad, atol=1e-6 * max(1.0, grad.abs().max().item()), rtol=0, msg=name)


def test_hard_negatives_reach_the_entity_tower_gradient(model):
    """The hard rows (8-10 of the entity chunk) change the gradient: they are scored, not just carried."""
    with_hard, without = copy.deepcopy(model), copy.deepcopy(model)
    with_hard(step_batch(with_hard, None))[0].backward()
    batch = step_batch(without, None)
    batch.tasks["pin"].hard_negatives, batch.tasks["pin"].hard_negative_ids = (torch.zeros(0, dtype=torch.long),) * 2
    without(batch)[0].backward()
    name = next(n for n, p in with_hard.named_parameters() if n.startswith("entity_tower.") and p.grad is not None)
    assert not torch.allclose(
        dict(with_hard.named_parameters())[name].grad, dict(without.named_parameters())[name].grad
    )


# ---------------------------------------------------------------- mining

# One query [1, 0]; entity e_i at angle ANGLES[i], so its score is cos(angle). e0 is the positive (0.955);
# by score the others rank e1 (1.0), e2 (0.980), e3 (0.939), e4 (0.878), e5 (0.697), e6 (0.362), e7 (-0.416).
ANGLES = [0.3, 0.0, 0.2, 0.35, 0.5, 0.8, 1.2, 2.0]
ENTITY_IDS = [f"e{i}" for i in range(len(ANGLES))]


def mine(positives=("e0",), excluded=(), **options) -> dict:
    entities = np.array([[math.cos(a), math.sin(a)] for a in ANGLES]) * 3.0  # any scale: normalised inside
    options = {"rank_range": (0, 7), "num_negatives": 7, "show_progress_bar": False, **options}
    known = {"q": set(positives)}
    table = mine_hard_negatives(
        ["q"], np.array([[2.0, 0.0]]), ENTITY_IDS, entities, known, excluded={"q": excluded}, **options
    )
    return table.to_pylist()[0]


def test_mining_ranks_non_positives_and_keeps_the_rank_range():
    row = mine()
    assert row["negative_ids"] == ["e1", "e2", "e3", "e4", "e5", "e6", "e7"]  # e0, the positive, never
    np.testing.assert_allclose(row["negative_scores"], [math.cos(ANGLES[i]) for i in range(1, 8)], atol=1e-6)
    assert mine(rank_range=(2, 5), num_negatives=3)["negative_ids"] == ["e3", "e4", "e5"]
    assert mine(num_negatives=2)["negative_ids"] == ["e1", "e2"]
    # Ranks count non-positives only: with e2 also a positive, rank 2 is e4.
    assert mine(positives=("e0", "e2"), rank_range=(2, 4), num_negatives=2)["negative_ids"] == ["e4", "e5"]


def test_margins_drop_candidates_too_close_to_the_positive():
    positive = math.cos(0.3)  # 0.955
    # Absolute 0.05: drop s > 0.955 - 0.05 = 0.905: e1 (1.0), e2 (0.980), e3 (0.939).
    assert positive - 0.05 < math.cos(0.35) and math.cos(0.5) < positive - 0.05
    assert mine(absolute_margin=0.05)["negative_ids"] == ["e4", "e5", "e6", "e7"]
    # Relative 0.1: drop s > 0.955 - 0.1 * 0.955 = 0.860: also e4 (0.878).
    assert math.cos(0.8) < positive * 0.9 < math.cos(0.5)
    assert mine(relative_margin=0.1)["negative_ids"] == ["e5", "e6", "e7"]
    # Margin 0 keeps only negatives scored below the positive; the filter runs before the count.
    assert mine(absolute_margin=0.0, num_negatives=2)["negative_ids"] == ["e3", "e4"]
    # The positive score is the best of the query's positives: margin 0.03 cuts at 0.925 with e0 alone (e3,
    # 0.939, dropped) but at 0.950 with e2 (0.980) also positive (e3 kept).
    assert mine(absolute_margin=0.03)["negative_ids"] == ["e4", "e5", "e6", "e7"]
    assert mine(positives=("e0", "e2"), absolute_margin=0.03)["negative_ids"] == ["e3", "e4", "e5", "e6", "e7"]


def test_excluded_ids_are_never_mined_nor_ranked_and_do_not_set_the_positive_score():
    assert mine(excluded=("e1",), rank_range=(0, 2), num_negatives=2)["negative_ids"] == ["e2", "e3"]
    # As a positive, e2 (0.980) would raise the cut to 0.950 and keep e3 (0.939); excluded, the cut stays 0.925.
    assert mine(excluded=("e2",), absolute_margin=0.03)["negative_ids"] == ["e4", "e5", "e6", "e7"]


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"excluded": ("zz",)}, r"Excluded ids \['zz'\] of query 'q' are not in `entity_ids`"),
        ({"rank_range": (5, 5)}, "0 <= start < stop"),
        ({"rank_range": (0, 3), "num_negatives": 4}, r"`num_negatives` must be an int in \[1, 3\]"),
        ({"absolute_margin": -0.1}, "`absolute_margin` must be >= 0"),
        ({"relative_margin": 1.0}, r"`relative_margin` must be in \[0, 1\)"),
        ({"positives": ()}, "Query 'q' has no positive"),
        ({"positives": ("e0", "x9")}, r"Positives \['x9'\] of query 'q' are not in `entity_ids`"),
    ],
)
def test_mining_errors(options, match):
    with pytest.raises(ValueError, match=match):
        mine(**options)


# ---------------------------------------------------------------- config errors


def _tasks(**hard) -> dict:
    return {"data.tasks": [{"name": "query_pin", "candidate": "entity:pin", "pairs": "p.parquet", **hard}]}


@pytest.mark.parametrize(
    ("task", "match"),
    [
        ({"num_hard_negatives": 4}, "needs exactly one pool: `hard_negatives`"),
        ({"num_hard_negatives": 4, "hard_negatives": "m.parquet", "hard_negatives_group": "topic"}, "exactly one"),
        ({"hard_negatives_group": "topic"}, "`hard_negatives_group` is set but `num_hard_negatives` is 0"),
        ({"num_hard_negatives": -1, "hard_negatives_group": "topic"}, "`num_hard_negatives` must be an int >= 0"),
        ({"num_hard_negatives": 2, "hard_negatives_group": "t", "hard_negatives_weight": 0}, "must be a number > 0"),
        ({"num_hard_negatives": 2, "hard_negatives": ""}, "`hard_negatives` must be a non-empty string"),
        ({"candidate": "query", "num_hard_negatives": 2, "hard_negatives_group": "t"}, "need an entity or compat"),
    ],
)
def test_bad_hard_negative_config_names_the_key(task, match):
    with pytest.raises(ValueError, match=match):
        load_config(TINY, _tasks(**task))


def test_good_hard_negative_config_loads_and_round_trips():
    config = load_config(TINY, _tasks(num_hard_negatives=4, hard_negatives_group="topic", hard_negatives_weight=0.5))
    task = config.data.tasks[0]
    assert (task.num_hard_negatives, task.hard_negatives_group, task.hard_negatives_weight) == (4, "topic", 0.5)
    assert task.to_dict()["hard_negatives_group"] == "topic"


# ---------------------------------------------------------------- trainer runs: group pool, mining, resume

# tiny.yaml shrunk to the pins these tasks read: 6 steps, a checkpoint at step 3, no evaluation.
SMALL_RUN = {
    "data.synthetic.num_pins": 300,
    "data.synthetic.num_queries": 200,
    "data.synthetic.num_query_pin_pairs": 1000,
    "train.max_steps": 6,
    "train.save_every": 3,
    "train.eval_every": 0,
    "train.log_every": 3,
}
PAIRS = "pairs/query_pin_train.parquet"


def hard_tasks(**pool) -> str:
    """An entity task and a compat task over pins, both with hard negatives from ``pool``."""
    tasks = [
        {"name": "query_pin", "candidate": "entity:pin", "pairs": PAIRS, "share": 8, "num_random_negatives": 8},
        {"name": "query_pin_pinsage", "candidate": "compat:pin:pinsage_embedding", "pairs": PAIRS, "share": 2},
    ]
    return yaml.safe_dump([{**task, "num_hard_negatives": 3, **pool} for task in tasks], default_flow_style=True)


def small_run_arguments(output_dir: Path, tasks: str) -> list[str]:
    overrides = [arg for key, value in SMALL_RUN.items() for arg in (f"--{key}", str(value))]
    return ["--config", str(TINY), "--output_dir", str(output_dir), *overrides, "--data.tasks", tasks]


def train(output_dir: Path, tasks: str, *flags: str) -> list[dict]:
    """``training/train.py`` on the shrunk tiny config with these tasks; returns the logged loss lines."""
    command = [sys.executable, str(ROOT / "training" / "train.py"), *small_run_arguments(output_dir, tasks)]
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([*command, "--no-example", *flags], cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    lines = (output_dir / "logs" / "history.jsonl").read_text().splitlines()
    return [entry for entry in map(json.loads, lines) if "loss" in entry]


@pytest.fixture(name="group_run", scope="module")
def group_run_fixture(tmp_path_factory) -> Path:
    """A finished run whose pin tasks draw hard negatives from the positive's topic."""
    output_dir = tmp_path_factory.mktemp("group") / "run"
    history = train(output_dir, hard_tasks(hard_negatives_group="topic"))
    assert [entry["step"] for entry in history] == [3, 6]
    for key in ("query_pin/dim64/hard", "query_pin/dim32/hard", "query_pin_pinsage/dim32/hard"):
        assert all(np.isfinite(entry[key]) and entry[key] > 0 for entry in history), key
    return output_dir


def test_group_run_trains_with_a_hard_part(group_run):
    history = [json.loads(line) for line in (group_run / "logs" / "history.jsonl").read_text().splitlines()]
    losses = [entry["loss"] for entry in history if "loss" in entry]
    assert losses[-1] < losses[0]  # it learns
    assert (group_run / "entity_tower" / "model.safetensors").is_file()


def test_mine_with_a_run_then_train_and_resume_exactly(group_run, tmp_path, capsys):
    mined = tmp_path / "mined.parquet"
    arguments = small_run_arguments(group_run, hard_tasks(hard_negatives_group="topic"))
    code = mine_main([*arguments, "--task", "query_pin", "--run", str(group_run), "--out", str(mined),
                      "--rank-range", "2", "30", "--num-negatives", "6"])  # fmt: skip
    assert code == 0 and "hard_negatives: " in capsys.readouterr().out
    table = pq.read_table(mined).to_pylist()
    pairs = pq.read_table(group_run / "data" / PAIRS).to_pylist()
    positives = {}
    for pair in pairs:
        positives.setdefault(pair["query"], set()).add(pair["candidate_id"])
    pin_ids = set(pq.read_table(group_run / "data" / "pins.parquet", columns=["id"]).column("id").to_pylist())
    assert {row["query"] for row in table} == set(positives)
    for row in table:  # 300 pins, no margin: every query gets 6, none of them a positive
        assert len(set(row["negative_ids"])) == 6 and set(row["negative_ids"]) <= pin_ids - positives[row["query"]]
        assert row["negative_scores"] == sorted(row["negative_scores"], reverse=True)

    first = tmp_path / "first"
    shutil.copytree(group_run / "data", first / "data")  # the prepared world: reused, not regenerated
    tasks = hard_tasks(hard_negatives=str(mined))
    history = train(first, tasks)
    assert [entry["step"] for entry in history] == [3, 6] and history[-1]["query_pin/dim64/hard"] > 0

    resumed = tmp_path / "resumed"
    shutil.copytree(first, resumed)
    for name in ("query_tower", "entity_tower", "metrics.json"):  # as if killed after the step-3 checkpoint
        shutil.rmtree(resumed / name) if (resumed / name).is_dir() else (resumed / name).unlink()
    resumed_history = train(resumed, tasks, "--resume")
    assert resumed_history[-1] == history[-1]  # step 6: the same losses, every part, so the same hard negatives
    for tower in ("query_tower", "entity_tower"):
        want, got = load_file(first / tower / "model.safetensors"), load_file(resumed / tower / "model.safetensors")
        assert sorted(got) == sorted(want)
        for key, tensor in want.items():
            assert torch.equal(got[key], tensor), f"{tower}: {key}"


def test_mine_command_errors_name_the_problem(group_run, tmp_path, capsys):
    arguments = small_run_arguments(group_run, hard_tasks(hard_negatives_group="topic"))
    out = ["--out", str(tmp_path / "x.parquet"), "--run", str(group_run)]
    assert mine_main([*arguments, "--task", "nope", *out]) == 2
    assert "--task 'nope' is not a task of the config" in capsys.readouterr().err
    query_task = "[{name: query_query, candidate: query, pairs: pairs/query_query_train.parquet}]"
    assert mine_main([*arguments, "--data.tasks", query_task, "--task", "query_query", *out]) == 2
    assert "mining needs entity: or compat:" in capsys.readouterr().err
    assert mine_main([*arguments, "--task", "query_pin", "--num-negatives", "100", *out]) == 2
    assert "`num_negatives` must be an int in [1, 90]" in capsys.readouterr().err


def test_mine_excludes_candidates_sharing_a_column_value_with_a_positive(group_run, tmp_path):
    arguments = small_run_arguments(group_run, hard_tasks(hard_negatives_group="topic"))
    out = tmp_path / "other_topics.parquet"
    assert mine_main([*arguments, "--task", "query_pin", "--run", str(group_run), "--exclude-same", "topic",
                      "--rank-range", "0", "20", "--num-negatives", "5", "--out", str(out)]) == 0  # fmt: skip
    pins = pq.read_table(group_run / "data" / "pins.parquet", columns=["id", "topic"]).to_pylist()
    topic = {pin["id"]: pin["topic"] for pin in pins}
    positives = {}
    for pair in pq.read_table(group_run / "data" / PAIRS).to_pylist():
        positives.setdefault(pair["query"], set()).add(topic[pair["candidate_id"]])
    rows = pq.read_table(out).to_pylist()
    assert sum(len(row["negative_ids"]) for row in rows) == 5 * len(rows)
    assert all(topic[i] not in positives[row["query"]] for row in rows for i in row["negative_ids"])


def test_mine_zero_shot_and_compat_with_a_run(group_run, tiny_backbone_dir, tmp_path):
    """``--encoder`` embeds the queries and a text column; a compat task with ``--run`` mines in its fixed space."""
    arguments = small_run_arguments(group_run, hard_tasks(hard_negatives_group="topic"))
    zero_shot, compat = tmp_path / "zero_shot.parquet", tmp_path / "compat.parquet"
    options = ["--rank-range", "0", "20", "--num-negatives", "5"]
    assert mine_main([*arguments, "--task", "query_pin", "--encoder", str(tiny_backbone_dir), *options,
                      "--text-field", "title", "--out", str(zero_shot)]) == 0  # fmt: skip
    assert mine_main([*arguments, "--task", "query_pin_pinsage", "--run", str(group_run), *options,
                      "--out", str(compat)]) == 0  # fmt: skip
    pins = pq.read_table(group_run / "data" / "pins.parquet", columns=["id", "pinsage_embedding"]).to_pylist()
    vectors = {pin["id"]: np.asarray(pin["pinsage_embedding"]) for pin in pins}
    for path in (zero_shot, compat):
        rows = pq.read_table(path).to_pylist()
        assert len(rows) == 143 and all(len(row["negative_ids"]) == 5 for row in rows)
    # The compat scores are cosines with the query tower's 32-d prefix against the pinsage vectors.
    row = pq.read_table(compat).to_pylist()[0]
    query = AutoModel.from_pretrained(group_run / "query_tower").encode([row["query"]], truncate_dim=32)[0]
    expected = [float(query @ (vectors[i] / np.linalg.norm(vectors[i]))) for i in row["negative_ids"]]
    np.testing.assert_allclose(row["negative_scores"], expected, atol=1e-5)
