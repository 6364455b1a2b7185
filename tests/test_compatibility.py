"""Compatibility towers: the pre-existing embedding, renormalised, with no parameters."""

import pytest
import torch

from omnisearchsage_hf import CompatibilityTower


def test_returns_the_named_embedding_renormalised():
    tower = CompatibilityTower("pinsage_embedding", dim=2)
    features = {"pinsage_embedding": torch.tensor([[3.0, 4.0], [0.0, -2.0]]), "other": torch.zeros(2, 5)}
    assert torch.allclose(tower(features), torch.tensor([[0.6, 0.8], [0.0, -1.0]]))
    assert torch.allclose(tower(features["pinsage_embedding"]), tower(features))


def test_has_no_parameters_and_passes_gradient_through():
    tower = CompatibilityTower("itemsage_embedding", dim=3)
    assert list(tower.parameters()) == []
    x = torch.tensor([[1.0, 2.0, 2.0]], requires_grad=True)
    tower(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_missing_embedding_row_stays_zero():
    assert torch.equal(CompatibilityTower("e", dim=2)(torch.zeros(1, 2)), torch.zeros(1, 2))


@pytest.mark.parametrize(
    ("features", "match"),
    [
        ({"visual": torch.ones(1, 2)}, "Missing feature 'e'"),
        (torch.ones(1, 3), r"shape \(batch_size, 2\)"),
        (torch.ones(2), r"shape \(batch_size, 2\)"),
        (torch.tensor([[float("nan"), 1.0]]), "NaN or inf"),
    ],
)
def test_bad_input_names_the_feature(features, match):
    with pytest.raises(ValueError, match=match):
        CompatibilityTower("e", dim=2)(features)


def test_bad_dim():
    with pytest.raises(ValueError, match="dim"):
        CompatibilityTower("e", dim=0)


def test_config_and_repr():
    tower = CompatibilityTower("pinsage_embedding", dim=256)
    assert tower.get_config_dict() == {"feature": "pinsage_embedding", "dim": 256}
    assert "pinsage_embedding" in repr(tower)
