"""Count-min sketches and the logQ / P(p|q) estimators built on them, against exact counts."""

import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from omnisearchsage_hf.training.frequency import (
    ConditionalFrequencyEstimator,
    CountMinSketch,
    EstimatorGroup,
    FrequencyEstimator,
)


def zipf_stream(num_ids: int = 50_000, num_draws: int = 200_000, exponent: float = 1.1, seed: int = 0):
    """``(ids, draws)``: distinct random int64 ids (both signs) and Zipf-distributed draws of them."""
    rng = np.random.default_rng(seed)
    ids = np.unique(rng.integers(-(2**63), 2**63 - 1, size=num_ids + 100, dtype=np.int64))[:num_ids]
    ids = rng.permutation(ids)  # popularity unrelated to id order
    probs = 1.0 / np.arange(1, num_ids + 1) ** exponent
    ranks = rng.choice(num_ids, size=num_draws, p=probs / probs.sum())
    return ids, ids[ranks]


@pytest.mark.parametrize("depth", [1, 2, 4])
def test_error_bound_on_zipf_stream(depth):
    ids, draws = zipf_stream()
    width = 1024
    sketch = CountMinSketch(width=width, depth=depth, seed=3)
    for batch in np.array_split(draws, 200):  # streamed batch by batch, like training steps
        sketch.update(torch.from_numpy(batch))
    assert int(sketch.total) == len(draws)

    universe, true_counts = np.unique(draws, return_counts=True)
    never_drawn = np.setdiff1d(ids, universe)
    estimates = sketch.query(torch.from_numpy(np.concatenate([universe, never_drawn]))).numpy()
    truth = np.concatenate([true_counts, np.zeros(len(never_drawn), dtype=np.int64)])
    overcount = estimates - truth
    assert overcount.min() >= 0, "a count-min sketch never underestimates"
    within_bound = np.mean(overcount <= math.e / width * len(draws))
    assert within_bound >= 1 - math.exp(-depth), (depth, within_bound)


def test_exact_without_collisions_and_repeated_keys():
    sketch = CountMinSketch(width=2**16, depth=3)
    sketch.update(torch.tensor([5, 5, -7, 2**62, 5]))
    sketch.update(torch.tensor([-7], dtype=torch.int32))
    assert sketch.query(torch.tensor([5, -7, 2**62, 6])).tolist() == [3, 2, 1, 0]
    assert int(sketch.total) == 6
    assert sketch.memory_bytes == 3 * 2**16 * 8


def test_hashing_is_pinned_by_the_seed():
    # Fixed values: sketches saved by one run must hash identically in any later process or version.
    sketch = CountMinSketch(width=1024, depth=2, seed=0)
    keys = torch.tensor([0, 1, -1, 2**62, -(2**63)])
    assert sketch.buckets(keys).tolist() == [[93, 769, 575, 521, 949], [436, 594, 79, 134, 856]]
    assert CountMinSketch(width=1024, depth=2, seed=0).buckets(keys).tolist() == sketch.buckets(keys).tolist()
    assert CountMinSketch(width=1024, depth=2, seed=1).buckets(keys).tolist() != sketch.buckets(keys).tolist()


def test_pair_keys_are_ordered():
    sketch = CountMinSketch(width=2**16, depth=2, key_size=2)
    sketch.update(torch.tensor([[1, 2], [1, 2], [2, 1]]))
    assert sketch.query(torch.tensor([[1, 2], [2, 1], [1, 1]])).tolist() == [2, 1, 0]


@pytest.mark.parametrize(
    ("kwargs", "keys", "message"),
    [
        ({"width": 0}, None, "width"),
        ({"width": 2**31}, None, "width"),
        ({"depth": 0}, None, "depth"),
        ({}, torch.tensor([1.0, 2.0]), "integer"),
        ({}, torch.tensor([True]), "integer"),
        ({}, torch.tensor([[1, 2]]), r"\(n,\)"),
        ({"key_size": 2}, torch.tensor([1, 2]), r"\(n, 2\)"),
    ],
)
def test_invalid_arguments(kwargs, keys, message):
    with pytest.raises(ValueError, match=message):
        CountMinSketch(**{"width": 64, **kwargs}).update(keys)


def test_state_dict_round_trip(tmp_path):
    ids, draws = zipf_stream(num_ids=1000, num_draws=5000)
    sketch = CountMinSketch(width=128, depth=2, seed=7)
    sketch.update(torch.from_numpy(draws))
    save_file(sketch.state_dict(), tmp_path / "sketch.safetensors")  # as checkpoints store it

    restored = CountMinSketch(width=128, depth=2, seed=999)  # the saved hash parameters win
    restored.load_state_dict(load_file(tmp_path / "sketch.safetensors"))
    probe = torch.from_numpy(ids)
    assert torch.equal(restored.query(probe), sketch.query(probe))
    assert int(restored.total) == int(sketch.total)
    # Both keep counting identically after the resume.
    sketch.update(probe[:100])
    restored.update(probe[:100])
    assert torch.equal(restored.table, sketch.table)


def test_load_state_dict_errors():
    state = CountMinSketch(width=128, depth=2).state_dict()
    with pytest.raises(ValueError, match=r"width"):
        CountMinSketch(width=256, depth=2).load_state_dict(state)
    with pytest.raises(ValueError, match=r"missing keys \['total'\]"):
        CountMinSketch(width=128, depth=2).load_state_dict({k: v for k, v in state.items() if k != "total"})
    with pytest.raises(ValueError, match="key_size"):
        CountMinSketch(width=128, depth=2, key_size=2).load_state_dict(state)


def test_frequency_estimator_log_prob_formula():
    estimator = FrequencyEstimator(width=2**16, depth=2)
    estimator.update(torch.tensor([1, 1, 1, 2]))
    estimator.update(torch.tensor([2, 3, 1, 1]))  # counts {1: 5, 2: 2, 3: 1}, total 8
    expected = [math.log(c) - math.log(8) + math.log(3) for c in (5, 2, 1, 1)]  # id 4 unseen: counts as 1
    assert estimator.log_prob(torch.tensor([1, 2, 3, 4]), num_draws=3).tolist() == pytest.approx(expected)
    default_draws = estimator.log_prob(torch.tensor([1, 2]))  # num_draws defaults to len(ids) = 2
    assert default_draws.tolist() == pytest.approx([math.log(5 / 8 * 2), math.log(2 / 8 * 2)])
    assert default_draws.dtype == torch.float32
    # Before any update: no log(0), just log(num_draws).
    assert FrequencyEstimator(width=64).log_prob(torch.tensor([9])).tolist() == pytest.approx([0.0])


def test_conditional_estimator_formula():
    estimator = ConditionalFrequencyEstimator(width=2**16, depth=2)
    estimator.update(torch.tensor([5, 5, 5, 6, 6]), torch.tensor([1, 1, 2, 1, 3]))
    got = estimator.log_prob(torch.tensor([5, 5, 6, 6, 7]), torch.tensor([1, 2, 1, 3, 1]))
    expected = [math.log(2 / 3), math.log(1 / 3), math.log(1 / 2), math.log(1 / 2), 0.0]
    assert got.tolist() == pytest.approx(expected)
    with pytest.raises(ValueError, match="candidate_ids"):
        estimator.update(torch.tensor([1, 2]), torch.tensor([1]))


def test_estimator_group_state_dict_round_trip():
    group = EstimatorGroup(in_batch=FrequencyEstimator(width=64), positive=ConditionalFrequencyEstimator(width=64))
    group["in_batch"].update(torch.tensor([1, 2, 2]))
    group["positive"].update(torch.tensor([1, 1]), torch.tensor([3, 4]))
    state = group.state_dict()
    assert sorted(state) == sorted(
        [f"in_batch.{k}" for k in ("table", "total", "hash_a", "hash_b")]
        + [f"positive.{part}.{k}" for part in ("pairs", "queries") for k in ("table", "total", "hash_a", "hash_b")]
    )
    fresh = EstimatorGroup(in_batch=FrequencyEstimator(width=64), positive=ConditionalFrequencyEstimator(width=64))
    fresh.load_state_dict(state)
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, state[key]), key
    with pytest.raises(ValueError, match="unexpected keys"):
        EstimatorGroup(in_batch=FrequencyEstimator(width=64)).load_state_dict(state)
