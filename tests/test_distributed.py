"""Gathers and the loss in one process and in a real 2-process gloo group on CPU."""

import datetime
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from omnisearchsage_hf.training.distributed import (
    all_gather_no_grad,
    all_gather_with_grad,
    get_rank,
    get_world_size,
    is_distributed,
)
from omnisearchsage_hf.training.frequency import ConditionalFrequencyEstimator, FrequencyEstimator
from omnisearchsage_hf.training.losses import SampledSoftmaxLoss

WORLD_SIZE, ROWS, NEGATIVES, DIM = 2, 3, 4, 5
# The global batch: rank r holds pairs [r * ROWS, (r + 1) * ROWS). Query 2 and entity 10 occur on both
# ranks, so the same-query and same-entity masks must work across the process boundary.
QUERY_IDS = [1, 2, 3, 2, 4, 5]
CANDIDATE_IDS = [10, 11, 12, 13, 10, 14]
NEGATIVE_IDS = [[10, 20, 21, 22], [23, 13, 24, 20]]  # per rank
LOSS_OPTIONS = {"positive_correction": True, "matryoshka_dims": [2, 5], "sketch_width": 256}


def global_batch() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)

    def unit(*shape):
        return F.normalize(torch.randn(*shape, generator=generator, dtype=torch.float64), dim=-1)

    return {"queries": unit(6, DIM), "candidates": unit(6, DIM), "negatives": unit(WORLD_SIZE, NEGATIVES, DIM)}


def gradient_weights(rank: int) -> torch.Tensor:
    return (rank + 1) * torch.arange(12, dtype=torch.float64).view(6, 2)


def _worker(rank: int, folder: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{folder}/store",
        rank=rank,
        world_size=WORLD_SIZE,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        results = {"rank": get_rank(), "world_size": get_world_size()}

        local = (torch.arange(6, dtype=torch.float64).view(3, 2) + 100 * rank).requires_grad_()
        gathered = all_gather_with_grad(local)  # (6, 2)
        (gathered * gradient_weights(rank)).sum().backward()
        results.update(gathered=gathered.detach(), local_grad=local.grad)
        results["ids"] = all_gather_no_grad(torch.tensor([rank, 10 + rank]))
        try:
            all_gather_with_grad(torch.zeros(2 + rank, 2))
        except ValueError as error:
            results["uneven_error"] = str(error)

        batch, rows = global_batch(), slice(rank * ROWS, (rank + 1) * ROWS)
        inputs = {
            "query_embeddings": batch["queries"][rows].clone().requires_grad_(),
            "candidate_embeddings": batch["candidates"][rows].clone().requires_grad_(),
            "negative_embeddings": batch["negatives"][rank].clone().requires_grad_(),
        }
        loss = SampledSoftmaxLoss(**LOSS_OPTIONS).double()
        total, parts = loss(
            **inputs,
            query_ids=torch.tensor(QUERY_IDS[rows]),
            candidate_ids=torch.tensor(CANDIDATE_IDS[rows]),
            negative_ids=torch.tensor(NEGATIVE_IDS[rank]),
        )
        total.backward()
        results.update(
            loss=total.detach(),
            parts=parts,
            grads={name: tensor.grad for name, tensor in inputs.items()},
            scale_grad=loss.logit_scale.grad,
            estimators=loss.estimators.state_dict(),
        )
        torch.save(results, Path(folder) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory) -> list[dict]:
    folder = tmp_path_factory.mktemp("gloo")
    # Fork: the children inherit the imported modules (a spawned child re-imports torch and transformers,
    # ~10 s here). They run single-threaded (set first thing in `_worker`), so no OpenMP pool is shared.
    torch.multiprocessing.start_processes(
        _worker, args=(str(folder),), nprocs=WORLD_SIZE, join=True, start_method="fork"
    )
    return [torch.load(folder / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD_SIZE)]


def test_single_process_is_the_identity():
    assert not is_distributed() and get_rank() == 0 and get_world_size() == 1
    local = torch.randn(3, 2, requires_grad=True)
    gathered = all_gather_with_grad(local)
    assert gathered is local
    (gathered * 2).sum().backward()
    assert torch.equal(local.grad, torch.full((3, 2), 2.0))
    ids = all_gather_no_grad(local)
    assert torch.equal(ids, local) and not ids.requires_grad


def test_two_processes_gather_values_and_ids(two_process_results):
    expected = torch.cat([torch.arange(6, dtype=torch.float64).view(3, 2) + 100 * rank for rank in range(2)])
    for rank, result in enumerate(two_process_results):
        assert (result["rank"], result["world_size"]) == (rank, 2)
        assert torch.equal(result["gathered"], expected)  # rank r's rows at [3r, 3r + 3)
        assert result["ids"].tolist() == [0, 10, 1, 11]


def test_two_processes_gradient_reaches_each_local_slice(two_process_results):
    # Every rank's loss sends gradient to every slice; each slice's owner receives the sum.
    summed = gradient_weights(0) + gradient_weights(1)  # (6, 2)
    for rank, result in enumerate(two_process_results):
        assert torch.equal(result["local_grad"], summed[rank * 3 : rank * 3 + 3])


def test_two_processes_uneven_shapes_raise_everywhere(two_process_results):
    for result in two_process_results:
        assert "rank 0: (2, 2), rank 1: (3, 2)" in result["uneven_error"]


def test_two_process_loss_equals_one_process_with_the_global_batch(two_process_results):
    batch = global_batch()
    queries = batch["queries"].clone().requires_grad_()
    candidates = batch["candidates"].clone().requires_grad_()
    negatives = batch["negatives"].clone().requires_grad_()
    all_ids, all_query_ids = torch.tensor(CANDIDATE_IDS), torch.tensor(QUERY_IDS)
    # One process that saw the whole global batch, with sketches fed the same ids.
    in_batch = FrequencyEstimator(width=256)
    in_batch.update(all_ids)
    random = FrequencyEstimator(width=256)
    random.update(torch.tensor(NEGATIVE_IDS).reshape(-1))
    positive = ConditionalFrequencyEstimator(width=256)
    positive.update(all_query_ids, all_ids)
    reference = SampledSoftmaxLoss(**LOSS_OPTIONS).double()

    per_rank = []
    for rank in range(WORLD_SIZE):
        rows = torch.arange(rank * ROWS, (rank + 1) * ROWS)
        total, parts = reference.compute_loss_from_embeddings(
            queries[rows],
            candidates,
            positive_index=rows,
            candidate_ids=all_ids,
            query_ids=all_query_ids,
            candidate_log_q=in_batch.log_prob(all_ids),
            positive_log_q=positive.log_prob(all_query_ids[rows], all_ids[rows]),
            negative_embeddings=negatives[rank],
            negative_ids=torch.tensor(NEGATIVE_IDS[rank]),
            negative_log_q=random.log_prob(torch.tensor(NEGATIVE_IDS[rank])),
        )
        result = two_process_results[rank]
        assert result["loss"].item() == pytest.approx(total.item(), rel=1e-9)
        assert result["parts"].keys() == parts.keys()
        scale_grad = torch.autograd.grad(total, reference.logit_scale, retain_graph=True)[0]
        assert result["scale_grad"].item() == pytest.approx(scale_grad.item(), rel=1e-9)
        per_rank.append(total)

    # Gradient of the summed losses: what DDP sees (up to its 1 / world_size averaging).
    sum(per_rank).backward()
    for rank, result in enumerate(two_process_results):
        rows = slice(rank * ROWS, (rank + 1) * ROWS)
        torch.testing.assert_close(result["grads"]["query_embeddings"], queries.grad[rows])
        torch.testing.assert_close(result["grads"]["candidate_embeddings"], candidates.grad[rows])
        torch.testing.assert_close(result["grads"]["negative_embeddings"], negatives.grad[rank])


def test_two_processes_keep_identical_sketches(two_process_results):
    first, second = (result["estimators"] for result in two_process_results)
    assert (
        first.keys()
        == second.keys()
        == {
            f"{name}.{key}"
            for name in ("in_batch", "random", "positive.pairs", "positive.queries")
            for key in ("table", "total", "hash_a", "hash_b")
        }
    )
    for key in first:
        assert torch.equal(first[key], second[key]), key
    assert int(first["in_batch.total"]) == 6 and int(first["random.total"]) == 8
