"""Gradient caching: the cached step computes the same loss and the same gradient as one big step.

The model mixes every kind of task (an entity task with random negatives, a query→query task, a
compatibility task), Matryoshka dims, duplicate ids (masked negatives) and logQ sketches, so the cached
path runs through the same scoring code that training uses.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file

from omnisearchsage_hf import OmniSearchSageQueryModel
from omnisearchsage_hf.training.batches import StepBatch, TaskBatch
from omnisearchsage_hf.training.config import LossConfig, TaskConfig
from omnisearchsage_hf.training.gradient_cache import RandomState, cached_backward
from omnisearchsage_hf.training.multitask import MultiTaskModel

QUERIES = [
    "antique copper sink",
    "red dress",
    "kitchen lamp",
    "summer shoes",
    "wall art",
    "red dress",
    "日本語",
    "lamp",
]
# Query→query candidates, appended after the queries in the query tower's rows.
QUERY_CANDIDATES = ["copper sink", "dress red", "lamp kitchen", "shoes", "art", "summer dress", "中文", "台灯"]
ENTITIES = [
    {"title": "Antique copper sink", "description": "bathroom", "image_embedding": [1.0, 0.0, 2.0, 0.5]},
    {"title": "red dress", "board_titles": ["summer", "Dress ideas"]},
    {"description": "北京欢迎你", "image_embedding": [[1.0, 1.0, 0.0, 0.0], [3.0, 1.0, 0.0, 2.0]]},
    {"title": "kitchen lamp", "description": "sink"},
    {"title": "summer shoes"},
    {"title": "wall art", "image_embedding": [0.0, 1.0, 1.0, 0.0]},
    {"description": "copper kettle"},
    {"title": "ภาษาไทย", "board_titles": ["mixed"]},
]
OUT_DIM = 8
ROOT = Path(__file__).parents[1]


@pytest.fixture
def model(tiny_backbone_dir, make_entity_tower) -> MultiTaskModel:
    torch.manual_seed(0)
    query_tower = OmniSearchSageQueryModel.from_backbone(tiny_backbone_dir, out_dim=OUT_DIM)  # dropout 0.1
    entity_tower = make_entity_tower()
    tasks = [
        TaskConfig(name="pin", candidate="entity:pin", share=4, num_random_negatives=4),
        TaskConfig(name="query_query", candidate="query", share=2),
        TaskConfig(name="legacy", candidate="compat:pin:legacy", share=2),
    ]
    loss = LossConfig(matryoshka_dims=[4, 8], sketch_width=1024)
    model = MultiTaskModel(query_tower, entity_tower, tasks, loss, {"legacy": OUT_DIM}, {"pin": 100, "legacy": 100})
    return model.train()  # as in training: dropout on, sketches updated


def step_batch(model: MultiTaskModel, chunk_size: int | None) -> StepBatch:
    """Eight pairs per task; the pin task has 4 random negatives, one of them a positive (masked)."""
    texts = QUERIES + QUERY_CANDIDATES
    entities = ENTITIES + [ENTITIES[0], ENTITIES[5], ENTITIES[6], ENTITIES[2]]  # positives, then negatives
    rows = torch.arange(8)
    query_ids = torch.tensor([0, 1, 2, 3, 4, 1, 5, 6])  # "red dress" twice: one query id
    tasks = {
        "pin": TaskBatch(
            queries=rows,
            candidates=rows,
            query_ids=query_ids,
            candidate_ids=torch.tensor([10, 11, 12, 13, 14, 15, 16, 11]),  # 11 twice: an accidental hit
            negatives=torch.arange(8, 12),
            negative_ids=torch.tensor([10, 15, 30, 31]),  # 10 and 15 are positives of other rows
            negative_log_q=torch.full((4,), -3.0),
        ),
        "query_query": TaskBatch(
            queries=rows, candidates=rows + 8, query_ids=query_ids, candidate_ids=torch.arange(100, 108)
        ),
        "legacy": TaskBatch(
            queries=rows,
            candidates=torch.zeros(0, dtype=torch.long),
            query_ids=query_ids,
            candidate_ids=torch.tensor([10, 11, 12, 13, 14, 15, 16, 11]),
            compat_candidates=torch.randn(8, OUT_DIM, generator=torch.Generator().manual_seed(3)),
        ),
    }
    size = chunk_size or 64
    return StepBatch(
        [model.query_tower.tokenize(texts[i : i + size]) for i in range(0, len(texts), size)],
        [model.entity_tower.prepare_inputs(entities[i : i + size]) for i in range(0, len(entities), size)],
        tasks,
    )


def gradients(model: MultiTaskModel) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def assert_same_gradients(expected: dict, actual: dict, atol: float = 1e-5) -> None:
    assert sorted(expected) == sorted(actual)
    for name, grad in expected.items():
        torch.testing.assert_close(actual[name], grad, atol=atol, rtol=1e-4, msg=name)


@pytest.mark.parametrize("chunk_size", [1, 3, 5, 64])
def test_cached_step_equals_uncached_loss_and_every_gradient(model, chunk_size):
    # Dropout is replayed, but an uncached pass draws other masks: compare without it (see the next test)
    model.query_tower.eval()
    uncached, cached = copy.deepcopy(model), copy.deepcopy(model)  # each with fresh logQ sketches

    loss, parts = uncached(step_batch(uncached, None))
    loss.backward()
    cached_loss, cached_parts = cached_backward(
        cached, step_batch(cached, chunk_size), backward=lambda value: value.backward()
    )

    torch.testing.assert_close(cached_loss, loss.detach(), atol=1e-5, rtol=0)
    assert sorted(parts) == sorted(cached_parts) and "pin/dim4/random" in parts
    expected = gradients(uncached)
    # Every tower and every loss's logit scale learns; the gradient reaches both towers' first layers.
    assert any(name.startswith("query_tower.backbone.embeddings") for name in expected)
    assert any(name.startswith("entity_tower.") for name in expected)
    assert {f"losses.{task}.logit_scale" for task in ("pin", "query_query", "legacy")} <= set(expected)
    assert_same_gradients(expected, gradients(cached))


def test_dropout_is_replayed(model):
    """With dropout on, the cached gradient is the gradient of the loss its own first pass computed."""
    assert model.query_tower.training
    reference, cached = copy.deepcopy(model), copy.deepcopy(model)
    batch = step_batch(model, 5)

    torch.manual_seed(7)  # the reference: each chunk with a graph, in the order the cached path uses
    query_out = torch.cat([reference.query_tower(**chunk).embeddings for chunk in batch.query_chunks])
    entity_out = torch.cat([reference.entity_tower(**chunk).embeddings for chunk in batch.entity_chunks])
    loss, _ = reference.score(batch, query_out, entity_out)
    loss.backward()
    after_reference = torch.get_rng_state()

    torch.manual_seed(7)
    cached_loss, _ = cached_backward(cached, batch, backward=lambda value: value.backward())
    torch.testing.assert_close(cached_loss, loss.detach(), atol=1e-5, rtol=0)
    assert_same_gradients(gradients(reference), gradients(cached))
    # The replay leaves the random state where one pass over the chunks leaves it.
    assert torch.equal(torch.get_rng_state(), after_reference)


def test_without_replayed_state_the_gradient_would_differ(model):
    """Guards the test above: dropout does change the embeddings from one pass to the next."""
    batch = step_batch(model, 5)
    state = RandomState(torch.device("cpu"))
    first = model.query_tower(**batch.query_chunks[0]).embeddings
    second = model.query_tower(**batch.query_chunks[0]).embeddings
    with state.replay():
        replayed = model.query_tower(**batch.query_chunks[0]).embeddings
    assert not torch.allclose(first, second)
    torch.testing.assert_close(replayed, first)


def test_scaled_backward_scales_every_gradient(model):
    """Gradient accumulation divides the loss: the cached gradients carry the factor to the parameters."""
    model.query_tower.eval()
    full, half = copy.deepcopy(model), copy.deepcopy(model)
    cached_backward(full, step_batch(full, 4), backward=lambda value: value.backward())
    cached_backward(half, step_batch(half, 4), backward=lambda value: (value / 2).backward())
    assert_same_gradients({k: v / 2 for k, v in gradients(full).items()}, gradients(half))


def test_a_frozen_tower_is_not_replayed(model):
    """A tower without trainable parameters (e.g. a fixed query encoder) gets no replay and no gradient."""
    model.query_tower.eval()
    model.query_tower.requires_grad_(False)
    uncached, cached = copy.deepcopy(model), copy.deepcopy(model)
    loss, _ = uncached(step_batch(uncached, None))
    loss.backward()
    cached_backward(cached, step_batch(cached, 3), backward=lambda value: value.backward())
    expected = gradients(uncached)
    assert not any(name.startswith("query_tower.") for name in expected)
    assert_same_gradients(expected, gradients(cached))


def test_bf16_autocast_cached_step_is_close_to_uncached(model):
    model.query_tower.eval()
    uncached, cached = copy.deepcopy(model), copy.deepcopy(model)

    def autocast():
        return torch.autocast("cpu", dtype=torch.bfloat16)

    with autocast():
        loss, _ = uncached(step_batch(uncached, None))
    loss.backward()
    cached_loss, _ = cached_backward(cached, step_batch(cached, 3), backward=lambda v: v.backward(), autocast=autocast)
    assert torch.isfinite(cached_loss) and abs(float(cached_loss) - loss.item()) < 0.05 * abs(loss.item())
    expected, actual = gradients(uncached), gradients(cached)
    assert sorted(expected) == sorted(actual)
    for name, grad in expected.items():  # bf16 keeps ~3 significant digits: compare directions
        if grad.norm() > 1e-3:
            assert F.cosine_similarity(grad.flatten(), actual[name].flatten(), dim=0) > 0.95, name


# ---------------------------------------------------------------- the trainer: one process vs two, cached or not


def _equivalence_config(folder: Path) -> Path:
    """tiny.yaml without randomness that differs by process: no dropout and no random negatives (random
    negatives are drawn per process, so two processes score against twice as many)."""
    config = yaml.safe_load((ROOT / "training" / "configs" / "tiny.yaml").read_text())
    for task in config["data"]["tasks"]:
        task["num_random_negatives"] = 0
    config["model"]["backbone_config"].update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    # Adam turns a gradient near its eps (1e-8) into a step of about the learning rate whatever its size, so
    # float rounding in such gradients moves parameters by up to ~lr/100: a small rate keeps that below 1e-5.
    config["train"].update(max_steps=3, warmup_steps=1, log_every=1, eval_every=0, save_every=0, learning_rate=1e-4)
    config["eval"].update(corpus_size=50, max_pairs=20)
    path = folder / "equivalence.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _train(config: Path, output_dir: Path, processes: int, *overrides: str) -> tuple[list[float], dict]:
    """Run the trainer; returns the logged loss of every step and every exported tensor."""
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    script = [str(ROOT / "training" / "train.py"), "--config", str(config), "--output_dir", str(output_dir)]
    command = [*(launch if processes == 2 else [sys.executable]), *script, *overrides]
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    history = [json.loads(line) for line in (output_dir / "logs" / "history.jsonl").read_text().splitlines()]
    losses = [entry["loss"] for entry in history if "loss" in entry]
    tensors = {
        f"{tower}/{name}": value
        for tower in ("query_tower", "entity_tower")
        for name, value in load_file(output_dir / tower / "model.safetensors").items()
    }
    return losses, tensors


def test_two_processes_with_half_the_batch_train_like_one_process_with_all(tmp_path):
    """Three optimizer steps: 1 process x 32 pairs == 2 processes x 16 == 2 processes x 16 with caching.

    In-batch negatives are gathered across processes (with gradient) and the logQ sketches see the
    gathered ids, so the global batch, its loss and its gradient are the same; DDP (or, with caching,
    ``all_reduce_gradients``) averages the processes' gradients."""
    config = _equivalence_config(tmp_path)
    one_losses, one = _train(config, tmp_path / "one", 1, "--train.batch_size", "32")
    # The prepared synthetic world is reused (a run keeps `data/`); everything else is built again.
    for name in ("two", "two_cached"):
        shutil.copytree(tmp_path / "one" / "data", tmp_path / name / "data")
    two_losses, two = _train(config, tmp_path / "two", 2, "--train.batch_size", "16")
    cached_losses, cached = _train(
        config, tmp_path / "two_cached", 2, "--train.batch_size", "16", "--train.gradient_cache_chunk_size", "7"
    )

    assert len(one_losses) == 3 and one_losses[0] != one_losses[-1]
    np.testing.assert_allclose(two_losses, one_losses, atol=1e-5, rtol=0)
    np.testing.assert_allclose(cached_losses, one_losses, atol=1e-5, rtol=0)
    assert sorted(one) == sorted(two) == sorted(cached)
    trained = 0
    for name, value in one.items():
        torch.testing.assert_close(two[name], value, atol=1e-5, rtol=0, msg=name)
        torch.testing.assert_close(cached[name], value, atol=1e-5, rtol=0, msg=name)
        trained += 1
    assert trained > 10


def test_cached_training_with_bf16_and_gradient_accumulation(tmp_path):
    """The cached path under the trainer's other options: bf16 autocast and two micro-steps per step."""
    config = _equivalence_config(tmp_path)
    losses, tensors = _train(
        config,
        tmp_path / "run",
        1,
        "--train.mixed_precision",
        "bf16",
        "--train.gradient_accumulation_steps",
        "2",
        "--train.gradient_cache_chunk_size",
        "5",
        "--train.batch_size",
        "16",
    )
    assert len(losses) == 3 and all(np.isfinite(losses))
    assert all(torch.isfinite(value).all() for value in tensors.values())
