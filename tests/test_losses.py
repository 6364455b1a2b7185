"""SampledSoftmaxLoss against logits and cross-entropies rebuilt by hand with Python loops."""

import math

import pytest
import torch
import torch.nn.functional as F

from omnisearchsage_hf.training.losses import SampledSoftmaxLoss
from omnisearchsage_hf.training.sampled_softmax import accidental_hits, sampled_softmax_cross_entropy

# One process, 4 pairs (query id, positive id): (5, 10), (6, 11), (7, 10), (6, 12); 5 random negatives.
QUERY_IDS = [5, 6, 7, 6]
CANDIDATE_IDS = [10, 11, 10, 12]
NEGATIVE_IDS = [11, 99, 10, 98, 12]
# Accidental hits, listed by hand as (row, column).
# In-batch: a column holding the row's positive entity, or paired with the row's query.
IN_BATCH_HITS = {(0, 0), (0, 2), (1, 1), (1, 3), (2, 0), (2, 2), (3, 1), (3, 3)}
# Random: a negative that is the row's positive entity (rows 0 and 2 share entity 10).
RANDOM_HITS = {(0, 2), (1, 0), (2, 2), (3, 4)}


def make_batch(dim: int = 4, query_dim: int | None = None, seed: int = 0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)

    def unit(rows, cols):
        return F.normalize(torch.randn(rows, cols, generator=generator, dtype=dtype), dim=-1)

    return {
        "queries": unit(4, query_dim or dim),
        "candidates": unit(4, dim),
        "negatives": unit(5, dim),
        "candidate_log_q": torch.randn(4, generator=generator, dtype=dtype),
        "positive_log_q": -torch.rand(4, generator=generator, dtype=dtype),
        "negative_log_q": torch.randn(5, generator=generator, dtype=dtype),
    }


def pure_loss(loss, batch, **overrides):
    kwargs = {
        "positive_index": torch.arange(4),
        "candidate_ids": torch.tensor(CANDIDATE_IDS),
        "query_ids": torch.tensor(QUERY_IDS),
        "candidate_log_q": batch["candidate_log_q"],
        "positive_log_q": batch["positive_log_q"],
        "negative_embeddings": batch["negatives"],
        "negative_ids": torch.tensor(NEGATIVE_IDS),
        "negative_log_q": batch["negative_log_q"],
    }
    kwargs.update(overrides)
    return loss.compute_loss_from_embeddings(batch["queries"], batch["candidates"], **kwargs)


def hand_loss(queries, positives, negatives, hits, scale, positive_log_q=None, negative_log_q=None) -> float:
    """Mean over rows of -log softmax of column 0 of [positive, unmasked negatives], in plain Python."""
    queries, positives, negatives = queries.tolist(), positives.tolist(), negatives.tolist()
    total = 0.0
    for i, query in enumerate(queries):

        def dot(a, b):
            return sum(x * y for x, y in zip(a, b, strict=False))

        logits = [scale * dot(query, positives[i]) - (positive_log_q[i] if positive_log_q is not None else 0.0)]
        for k, negative in enumerate(negatives):
            if (i, k) not in hits:
                logits.append(scale * dot(query, negative) - (negative_log_q[k] if negative_log_q is not None else 0.0))
        total += -logits[0] + math.log(sum(math.exp(logit) for logit in logits))
    return total / len(queries)


def hand_parts(batch, scale, *, positive_correction=True, logq=True, queries=None, candidates=None, negatives=None):
    queries = batch["queries"] if queries is None else queries
    candidates = batch["candidates"] if candidates is None else candidates
    negatives = batch["negatives"] if negatives is None else negatives
    positive_log_q = batch["positive_log_q"].tolist() if positive_correction else None
    in_batch = hand_loss(
        queries, candidates, candidates, IN_BATCH_HITS, scale, positive_log_q,
        batch["candidate_log_q"].tolist() if logq else None,
    )  # fmt: skip
    random = hand_loss(
        queries, candidates, negatives, RANDOM_HITS, scale, positive_log_q,
        batch["negative_log_q"].tolist() if logq else None,
    )  # fmt: skip
    return in_batch, random


def test_accidental_hits_match_the_hand_listed_masks():
    positives = torch.tensor(CANDIDATE_IDS)
    in_batch = accidental_hits(positives, positives, torch.tensor(QUERY_IDS), torch.tensor(QUERY_IDS))
    assert {tuple(ij) for ij in in_batch.nonzero().tolist()} == IN_BATCH_HITS
    random = accidental_hits(positives, torch.tensor(NEGATIVE_IDS))
    assert {tuple(ij) for ij in random.nonzero().tolist()} == RANDOM_HITS


def test_matches_hand_computation_with_all_corrections():
    batch = make_batch()
    loss = SampledSoftmaxLoss(positive_correction=True, sketch_width=64)
    total, parts = pure_loss(loss, batch)
    in_batch, random = hand_parts(batch, 1 / 0.07)
    assert loss.scale.item() == pytest.approx(1 / 0.07)
    assert parts["in_batch"].item() == pytest.approx(in_batch, rel=1e-5)
    assert parts["random"].item() == pytest.approx(random, rel=1e-5)
    assert total.item() == pytest.approx(in_batch + random, rel=1e-5)
    assert sorted(parts) == ["in_batch", "random"]


def test_disabled_corrections_ignore_given_log_q():
    batch = make_batch(seed=1)
    loss = SampledSoftmaxLoss(logq_correction=False, positive_correction=False, sketch_width=64)
    _, parts = pure_loss(loss, batch)
    in_batch, random = hand_parts(batch, 1 / 0.07, positive_correction=False, logq=False)
    assert parts["in_batch"].item() == pytest.approx(in_batch, rel=1e-5)
    assert parts["random"].item() == pytest.approx(random, rel=1e-5)
    assert loss.estimators == {}


def test_logq_lowers_popular_negatives():
    # A negative corrected by a large log Q barely counts: the loss approaches the one without it.
    batch = make_batch(seed=2)
    loss = SampledSoftmaxLoss(in_batch_negatives=False, sketch_width=64)
    no_correction, _ = pure_loss(loss, batch, negative_log_q=torch.zeros(5))
    popular_first = torch.tensor([50.0, 0.0, 0.0, 0.0, 0.0])
    corrected, _ = pure_loss(loss, batch, negative_log_q=popular_first)
    assert corrected < no_correction


@pytest.mark.parametrize("mode", ["in_batch", "random"])
def test_single_negative_set(mode):
    batch = make_batch(seed=3)
    loss = SampledSoftmaxLoss(in_batch_negatives=mode == "in_batch", random_negatives=mode == "random", sketch_width=64)
    overrides = {"negative_embeddings": None, "negative_ids": None} if mode == "in_batch" else {}
    total, parts = pure_loss(loss, batch, **overrides)
    in_batch, random = hand_parts(batch, 1 / 0.07, positive_correction=False)
    expected = in_batch if mode == "in_batch" else random
    assert list(parts) == [mode]
    assert total.item() == pytest.approx(expected, rel=1e-5)


def test_scale_is_capped():
    batch = make_batch(seed=4)
    loss = SampledSoftmaxLoss(max_scale=100.0, sketch_width=64)
    with torch.no_grad():
        loss.logit_scale.fill_(math.log(1000.0))
    assert loss.scale.item() == pytest.approx(100.0)
    total, _ = pure_loss(loss, batch)
    in_batch, random = hand_parts(batch, 100.0, positive_correction=False)
    assert total.item() == pytest.approx(in_batch + random, rel=1e-5)


def test_matryoshka_dims_weights_and_skipping():
    # 8-d queries against 4-d candidates: dim 8 is skipped, dims 2 and 4 use renormalised prefixes.
    batch = make_batch(dim=4, query_dim=8, seed=5)
    loss = SampledSoftmaxLoss(matryoshka_dims=[2, 4, 8], matryoshka_weights=[1.0, 0.5, 3.0], sketch_width=64)
    total, parts = pure_loss(loss, batch)
    assert sorted(parts) == ["dim2/in_batch", "dim2/random", "dim4/in_batch", "dim4/random"]
    expected = 0.0
    for dim, weight in ((2, 1.0), (4, 0.5)):
        prefixes = {name: F.normalize(batch[name][:, :dim], dim=-1) for name in ("queries", "candidates", "negatives")}
        in_batch, random = hand_parts(batch, 1 / 0.07, positive_correction=False, **prefixes)
        assert parts[f"dim{dim}/in_batch"].item() == pytest.approx(in_batch, rel=1e-5)
        assert parts[f"dim{dim}/random"].item() == pytest.approx(random, rel=1e-5)
        expected += weight * (in_batch + random)
    assert total.item() == pytest.approx(expected, rel=1e-5)


def test_matryoshka_dim_errors():
    batch = make_batch(dim=4, query_dim=2)
    with pytest.raises(ValueError, match="query_embeddings have only 2 dims"):
        pure_loss(SampledSoftmaxLoss(matryoshka_dims=[4], sketch_width=64), batch)
    with pytest.raises(ValueError, match="add a dim <= 4"):
        pure_loss(SampledSoftmaxLoss(matryoshka_dims=[8], sketch_width=64), make_batch(dim=4, query_dim=8))
    with pytest.raises(ValueError, match="set `matryoshka_dims`"):
        pure_loss(SampledSoftmaxLoss(sketch_width=64), make_batch(dim=4, query_dim=8))
    with pytest.raises(ValueError, match="matryoshka_weights"):
        SampledSoftmaxLoss(matryoshka_dims=[2, 4], matryoshka_weights=[1.0])


@pytest.mark.parametrize("matryoshka_dims", [None, (2, 3)])
def test_gradcheck(matryoshka_dims):
    batch = make_batch(dim=3, seed=6, dtype=torch.float64)
    loss = SampledSoftmaxLoss(
        positive_correction=True, init_scale=2.0, matryoshka_dims=matryoshka_dims, sketch_width=64
    )
    loss = loss.double()

    def total(queries, candidates, negatives):
        inputs = {**batch, "queries": queries, "candidates": candidates}
        return pure_loss(loss, inputs, negative_embeddings=negatives)[0]

    inputs = tuple(batch[name].clone().requires_grad_() for name in ("queries", "candidates", "negatives"))
    assert torch.autograd.gradcheck(total, inputs)

    # The log-scale parameter, by central finite differences.
    total(*inputs).backward()
    analytic, step = loss.logit_scale.grad.item(), 1e-6
    with torch.no_grad():
        loss.logit_scale += step
        upper = total(*inputs).item()
        loss.logit_scale -= 2 * step
        lower = total(*inputs).item()
    assert analytic == pytest.approx((upper - lower) / (2 * step), rel=1e-5)


def test_capped_scale_gets_no_gradient():
    batch = make_batch(seed=7)
    loss = SampledSoftmaxLoss(sketch_width=64)
    with torch.no_grad():
        loss.logit_scale.fill_(math.log(500.0))
    pure_loss(loss, batch)[0].backward()
    assert loss.logit_scale.grad.item() == 0.0


def forward_inputs(batch, requires_grad=False):
    inputs = {
        "query_embeddings": batch["queries"],
        "candidate_embeddings": batch["candidates"],
        "query_ids": torch.tensor(QUERY_IDS),
        "candidate_ids": torch.tensor(CANDIDATE_IDS),
        "negative_embeddings": batch["negatives"],
        "negative_ids": torch.tensor(NEGATIVE_IDS),
    }
    if requires_grad:
        for name in ("query_embeddings", "candidate_embeddings", "negative_embeddings"):
            inputs[name] = inputs[name].clone().requires_grad_()
    return inputs


def test_forward_estimates_log_q_from_the_sketches():
    batch = make_batch(seed=8)
    loss = SampledSoftmaxLoss(positive_correction=True, sketch_width=2**12)
    _, parts = loss(**forward_inputs(batch))
    # After this first step: in-batch counts {10: 2, 11: 1, 12: 1} of 4 ids in a batch of 4,
    # random counts 1 each of 5 in a batch of 5, and P(p|q) = C(q, p) / C(q).
    by_hand = {
        **batch,
        "candidate_log_q": torch.tensor([math.log(2 / 4 * 4), 0.0, math.log(2 / 4 * 4), 0.0]),
        "negative_log_q": torch.zeros(5),
        "positive_log_q": torch.tensor([0.0, math.log(1 / 2), 0.0, math.log(1 / 2)]),
    }
    in_batch, random = hand_parts(by_hand, 1 / 0.07)
    assert parts["in_batch"].item() == pytest.approx(in_batch, rel=1e-5)
    assert parts["random"].item() == pytest.approx(random, rel=1e-5)
    assert int(loss.estimators["in_batch"].sketch.total) == 4
    assert int(loss.estimators["random"].sketch.total) == 5
    assert int(loss.estimators["positive"].queries.total) == 4


def test_forward_uses_sampler_log_q_and_eval_does_not_update():
    batch = make_batch(seed=9)
    loss = SampledSoftmaxLoss(sketch_width=64)
    given = torch.tensor([0.1, -0.2, 0.3, 0.0, 1.0])
    total, _ = loss(**forward_inputs(batch), negative_log_q=given)
    assert int(loss.estimators["random"].sketch.total) == 0  # the sampler's log Q was used instead
    expected, _ = pure_loss(
        loss,
        {**batch, "negative_log_q": given},
        candidate_log_q=loss.estimators["in_batch"].log_prob(torch.tensor(CANDIDATE_IDS)),
    )
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)

    loss.eval()
    before = {key: value.clone() for key, value in loss.estimators.state_dict().items()}
    loss(**forward_inputs(batch))
    for key, value in loss.estimators.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_gradients_reach_every_input_and_the_scale():
    batch = make_batch(seed=10)
    loss = SampledSoftmaxLoss(positive_correction=True, matryoshka_dims=[2, 4], sketch_width=64)
    inputs = forward_inputs(batch, requires_grad=True)
    total, _ = loss(**inputs)
    total.backward()
    for name in ("query_embeddings", "candidate_embeddings", "negative_embeddings"):
        assert inputs[name].grad is not None and inputs[name].grad.abs().sum() > 0, name
    assert loss.logit_scale.grad is not None and loss.logit_scale.grad != 0


def test_estimators_are_checkpointed_apart_from_the_module(tmp_path):
    loss = SampledSoftmaxLoss(positive_correction=True, sketch_width=64)
    loss(**forward_inputs(make_batch(seed=11)))
    assert list(loss.state_dict()) == ["logit_scale"]  # sketches never land in model weights
    torch.save(loss.estimators.state_dict(), tmp_path / "estimators.pt")
    resumed = SampledSoftmaxLoss(positive_correction=True, sketch_width=64)
    resumed.estimators.load_state_dict(torch.load(tmp_path / "estimators.pt", weights_only=True))
    for key, value in resumed.estimators.state_dict().items():
        assert torch.equal(value, loss.estimators.state_dict()[key]), key


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"query_embeddings": torch.zeros(0, 4)}, "query_embeddings` is empty"),
        ({"query_embeddings": torch.zeros(4, 3)}, "make them equal or set `matryoshka_dims`"),
        ({"candidate_embeddings": torch.zeros(3, 4)}, "candidate_embeddings` must have 4 rows"),
        ({"candidate_embeddings": torch.full((4, 4), float("nan"))}, "candidate_embeddings` contains NaN"),
        ({"negative_embeddings": torch.full((5, 4), float("nan"))}, "negative_embeddings` contains NaN"),
        ({"negative_embeddings": torch.zeros(5, 3)}, "negative_embeddings` must have 4 dims"),
        ({"negative_ids": torch.tensor([1, 2])}, r"negative_ids` must have shape \(5,\)"),
        ({"candidate_ids": torch.tensor([1.0, 2.0, 3.0, 4.0])}, "candidate_ids` must be an int64"),
        ({"negative_embeddings": None}, "random_negatives=True needs"),
    ],
)
def test_forward_errors_name_the_argument(overrides, message):
    inputs = {**forward_inputs(make_batch()), **overrides}
    with pytest.raises(ValueError, match=message):
        SampledSoftmaxLoss(sketch_width=64)(**inputs)


def test_pure_method_requires_enabled_corrections():
    batch = make_batch()
    with pytest.raises(ValueError, match="positive_correction=True needs `positive_log_q`"):
        pure_loss(SampledSoftmaxLoss(positive_correction=True, sketch_width=64), batch, positive_log_q=None)
    with pytest.raises(ValueError, match="logq_correction=True needs `negative_log_q`"):
        pure_loss(SampledSoftmaxLoss(sketch_width=64), batch, negative_log_q=None)
    with pytest.raises(ValueError, match="positive_index` must lie in"):
        pure_loss(SampledSoftmaxLoss(sketch_width=64), batch, positive_index=torch.tensor([0, 1, 2, 4]))


def test_constructor_errors():
    with pytest.raises(ValueError, match="in_batch_negatives"):
        SampledSoftmaxLoss(in_batch_negatives=False, random_negatives=False)
    with pytest.raises(ValueError, match="init_scale"):
        SampledSoftmaxLoss(init_scale=200.0, max_scale=100.0)
    with pytest.raises(ValueError, match="duplicates"):
        SampledSoftmaxLoss(matryoshka_dims=[4, 4])


def test_half_precision_scores_are_promoted():
    scores = torch.tensor([[0.5, 0.1]], dtype=torch.bfloat16)
    loss = sampled_softmax_cross_entropy(
        torch.tensor([0.75], dtype=torch.bfloat16), scores, scale=10.0, hits=torch.tensor([[False, True]])
    )
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(math.log(1 + math.exp(10 * (0.5 - 0.75))), rel=1e-6)


def test_config_and_citation():
    loss = SampledSoftmaxLoss(matryoshka_dims=[64, 256], sketch_width=64)
    config = loss.get_config_dict()
    assert config["matryoshka_dims"] == (64, 256) and config["matryoshka_weights"] == (1.0, 1.0)
    assert config["init_scale"] == pytest.approx(1 / 0.07) and config["max_scale"] == 100.0
    assert SampledSoftmaxLoss(**config).get_config_dict() == config
    assert "2404.16260" in loss.citation and "Sampling-Bias-Corrected" in loss.citation
