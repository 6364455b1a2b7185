"""Tests of the query tower: config, forward maths, encode contract, persistence and remote-code loading."""

import json
import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from huggingface_hub.errors import StrictDataclassError
from transformers import AutoConfig, AutoModel, AutoTokenizer, BertModel, BertTokenizer, DistilBertConfig

from omnisearchsage_hf import OmniSearchSageQueryConfig, OmniSearchSageQueryModel
from omnisearchsage_hf.modeling.modeling_query import pool

QUERIES = ["antique copper bathroom sink", "lamp", "red summer dress shoes wall art kitchen", "日本語", ""]
ODD_QUERIES = {
    "empty": "",
    "emoji": "🙂🔥👗",
    "thai": "กขคงจ",
    "arabic": "مرحبا",
    "cjk": "台灯 中文字",
    "long_word": "a" * 10_000,
    "long_text": "copper sink " * 1_000,
}


@pytest.fixture
def tower(tiny_backbone_dir) -> OmniSearchSageQueryModel:
    torch.manual_seed(1)
    return OmniSearchSageQueryModel.from_backbone(tiny_backbone_dir, out_dim=16)


def record_backbone_input_ids(model: OmniSearchSageQueryModel) -> list[torch.Tensor]:
    """Return a list that fills with the ``input_ids`` of every backbone call."""
    calls = []
    model.backbone.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(kwargs["input_ids"]), with_kwargs=True
    )
    return calls


# ---------------------------------------------------------------- config


def test_default_config_is_the_papers_backbone():
    config = OmniSearchSageQueryConfig()
    assert config.backbone_config.model_type == "distilbert"
    assert config.backbone_config.vocab_size == 119547
    assert (config.pooling, config.out_dim, config.max_length, config.query_prefix) == ("cls", 256, 64, "")


def test_config_round_trips_through_json(tmp_path, tiny_backbone_config):
    config = OmniSearchSageQueryConfig(
        backbone_config=tiny_backbone_config, pooling="mean", out_dim=8, query_prefix="query: ", max_length=12
    )
    config.save_pretrained(tmp_path)
    loaded = OmniSearchSageQueryConfig.from_pretrained(tmp_path)
    assert (loaded.pooling, loaded.out_dim, loaded.query_prefix, loaded.max_length) == ("mean", 8, "query: ", 12)
    assert loaded.backbone_config.to_dict() == config.backbone_config.to_dict()


@pytest.mark.parametrize(
    ("field", "value"),
    [("out_dim", 0), ("max_length", 0), ("pooling", "max"), ("out_dim", "256"), ("query_prefix", None)],
)
def test_bad_config_raises_strict_error_naming_the_field(field, value, tiny_backbone_config):
    with pytest.raises(StrictDataclassError, match=field):
        OmniSearchSageQueryConfig(backbone_config=tiny_backbone_config, **{field: value})


# ---------------------------------------------------------------- forward maths


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_pooling_matches_a_hand_computation(pooling, tiny_backbone_dir):
    torch.manual_seed(2)
    model = OmniSearchSageQueryModel.from_backbone(tiny_backbone_dir, out_dim=16, pooling=pooling)
    queries = ["copper sink", "antique copper bathroom sink lamp", "red"]
    features = model.tokenizer(queries, padding=True, return_tensors="pt")
    with torch.no_grad():
        output = model(**features)
    hidden, lengths = output.last_hidden_state, features["attention_mask"].sum(dim=1)
    assert (features["attention_mask"] == 0).any(), "the batch must contain padding for this test to mean anything"
    for row, length in enumerate(lengths.tolist()):
        pooled = hidden[row, 0] if pooling == "cls" else hidden[row, :length].mean(dim=0)
        expected = F.normalize(model.projection(pooled), dim=-1)
        torch.testing.assert_close(output.embeddings[row], expected, atol=1e-6, rtol=1e-5)


def test_cls_and_mean_pooling_differ(tower):
    features = tower.tokenizer(["copper sink"], return_tensors="pt")
    with torch.no_grad():
        cls = tower(**features).embeddings
        tower.config.pooling = "mean"
        mean = tower(**features).embeddings
    assert not torch.allclose(cls, mean)


def test_forward_without_attention_mask_treats_every_token_as_real(tower):
    features = tower.tokenizer(["copper sink"], return_tensors="pt")
    tower.config.pooling = "mean"
    with torch.no_grad():
        torch.testing.assert_close(tower(features["input_ids"]).embeddings, tower(**features).embeddings)


def test_outputs_are_unit_vectors(tower):
    embeddings = tower.encode(QUERIES)
    assert embeddings.shape == (len(QUERIES), 16) and embeddings.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-6)


def test_every_parameter_gets_a_gradient(tower):
    # DDP fails on parameters that never get a gradient, such as BERT's unused pooler head.
    tower.train()
    features = tower.tokenizer(QUERIES, padding=True, return_tensors="pt")
    tower(**features).embeddings.sum().backward()
    assert [name for name, parameter in tower.named_parameters() if parameter.grad is None] == []


# ---------------------------------------------------------------- encode contract


def test_query_prefix_is_prepended_to_the_input_ids(tiny_backbone_dir):
    model = OmniSearchSageQueryModel.from_backbone(tiny_backbone_dir, out_dim=16, query_prefix="query: ")
    calls = record_backbone_input_ids(model)
    with_prefix = model.encode("copper sink")
    model.config.query_prefix = ""
    without_prefix = model.encode("copper sink")

    assert calls[0][0].tolist() == model.tokenizer("query: copper sink")["input_ids"]
    assert calls[1][0].tolist() == model.tokenizer("copper sink")["input_ids"]
    assert calls[0].shape[1] == calls[1].shape[1] + 2  # "query" and ":"
    assert not np.allclose(with_prefix, without_prefix)


def test_encode_equals_forward_on_the_tokenised_query(tower):
    features = tower.tokenizer(["antique copper bathroom sink"], return_tensors="pt")
    with torch.no_grad():
        expected = tower(**features).embeddings[0].numpy()
    np.testing.assert_allclose(tower.encode("antique copper bathroom sink"), expected, atol=1e-6)


def test_truncate_dim_returns_the_renormalised_prefix(tower):
    full = tower.encode(QUERIES)
    truncated = tower.encode(QUERIES, truncate_dim=4)
    expected = full[:, :4] / np.linalg.norm(full[:, :4], axis=1, keepdims=True)
    np.testing.assert_allclose(truncated, expected, atol=1e-6)
    raw = tower.encode(QUERIES, truncate_dim=4, normalize_embeddings=False)
    np.testing.assert_allclose(raw, full[:, :4], atol=1e-6)


def test_batches_are_returned_in_input_order(tower):
    one_by_one = tower.encode(QUERIES, batch_size=1)
    in_threes = tower.encode(QUERIES, batch_size=3)
    np.testing.assert_allclose(in_threes, one_by_one, atol=1e-5)
    for row, query in enumerate(QUERIES):
        np.testing.assert_allclose(tower.encode(query), one_by_one[row], atol=1e-5)
    # Distinct queries give distinct rows, so a scrambled order would have been caught above.
    assert len({tuple(np.round(row, 4)) for row in one_by_one}) == len(QUERIES)


def test_single_string_in_gives_one_vector_out(tower):
    vector = tower.encode("copper sink")
    assert isinstance(vector, np.ndarray) and vector.shape == (16,)
    np.testing.assert_allclose(vector, tower.encode(["copper sink"])[0], atol=1e-6)
    tensor = tower.encode("copper sink", convert_to_tensor=True)
    assert isinstance(tensor, torch.Tensor) and tensor.shape == (16,)
    listed = tower.encode(["copper sink", "lamp"], convert_to_numpy=False)
    assert isinstance(listed, list) and len(listed) == 2 and listed[0].shape == (16,)


def test_encode_runs_in_eval_mode_and_restores_the_training_flags(tower):
    tower.train()
    first, second = tower.encode(QUERIES), tower.encode(QUERIES)
    np.testing.assert_array_equal(first, second)  # dropout (p=0.1 in the backbone) is off
    assert all(module.training for module in tower.modules())
    tower.eval()
    tower.projection.train()  # a mixed state is restored module by module
    tower.encode(QUERIES)
    assert tower.projection.training and not tower.training and not tower.backbone.training


def test_encode_leaves_the_tower_trainable(tower):
    tower.encode(QUERIES, device="cpu")
    assert not any(parameter.is_inference() for parameter in tower.parameters())


def test_encode_on_an_explicit_device(tower):
    tensor = tower.encode(QUERIES, device="cpu", convert_to_tensor=True)
    assert tensor.device.type == "cpu" and tensor.shape == (len(QUERIES), 16)


@pytest.mark.parametrize("name", sorted(ODD_QUERIES))
def test_odd_queries_embed_to_finite_unit_vectors(name, tower):
    vector = tower.encode(ODD_QUERIES[name])
    assert np.isfinite(vector).all()
    np.testing.assert_allclose(np.linalg.norm(vector), 1.0, atol=1e-6)


def test_max_length_bounds_the_tokens_seen(tiny_backbone_dir):
    model = OmniSearchSageQueryModel.from_backbone(tiny_backbone_dir, out_dim=16, max_length=8)
    calls = record_backbone_input_ids(model)
    same_head = model.encode(["a b c d e f g h i j", "a b c d e f x y z"])
    assert all(ids.shape[1] <= 8 for ids in calls)
    # [CLS] + 6 words + [SEP]: the differing tails are cut, so the embeddings are identical.
    np.testing.assert_allclose(same_head[0], same_head[1], atol=1e-6)
    model.encode(ODD_QUERIES["long_text"])
    assert calls[-1].shape == (1, 8)


@pytest.mark.parametrize(
    ("queries", "error", "message"),
    [
        (["copper", 3], TypeError, r"queries\[1\].*int"),
        (["copper", None], TypeError, r"queries\[1\].*NoneType"),
        ([b"copper"], TypeError, r"queries\[0\].*bytes"),
        ([], ValueError, "queries"),
        (123, TypeError, "queries"),
    ],
)
def test_bad_queries_raise(queries, error, message, tower):
    with pytest.raises(error, match=message):
        tower.encode(queries)


@pytest.mark.parametrize("truncate_dim", [0, 17, -1, 2.5, "8"])
def test_bad_truncate_dim_raises(truncate_dim, tower):
    with pytest.raises(ValueError, match="truncate_dim"):
        tower.encode(QUERIES, truncate_dim=truncate_dim)


def test_bad_batch_size_raises(tower):
    with pytest.raises(ValueError, match="batch_size"):
        tower.encode(QUERIES, batch_size=0)


def test_tower_without_tokenizer_says_how_to_get_one(tiny_backbone_config):
    model = OmniSearchSageQueryModel(OmniSearchSageQueryConfig(backbone_config=tiny_backbone_config, out_dim=16))
    assert model.tokenizer is None
    with pytest.raises(ValueError, match=r"model\.tokenizer.*from_backbone"):
        model.encode("copper sink")


def test_distilbert_backbone_accepts_bert_tokenizer_output(tiny_backbone_dir):
    backbone = DistilBertConfig(vocab_size=200, dim=32, n_layers=2, n_heads=2, hidden_dim=64)
    model = OmniSearchSageQueryModel(OmniSearchSageQueryConfig(backbone_config=backbone, out_dim=16))
    model.tokenizer = AutoTokenizer.from_pretrained(tiny_backbone_dir)  # also emits token_type_ids
    np.testing.assert_allclose(np.linalg.norm(model.encode(QUERIES), axis=1), 1.0, atol=1e-6)


# ---------------------------------------------------------------- from_backbone and persistence


def test_from_backbone_copies_the_backbone_weights_exactly(tiny_backbone_dir):
    model = OmniSearchSageQueryModel.from_backbone(tiny_backbone_dir, out_dim=16)
    reference = BertModel.from_pretrained(tiny_backbone_dir, add_pooling_layer=False).state_dict()
    loaded = model.backbone.state_dict()
    assert loaded.keys() == reference.keys()
    for name, tensor in reference.items():
        assert torch.equal(loaded[name], tensor), name
    assert isinstance(model.tokenizer, BertTokenizer)
    with pytest.raises(ValueError, match="backbone_config"):
        OmniSearchSageQueryModel.from_backbone(tiny_backbone_dir, backbone_config={})


def test_save_then_load_restores_every_tensor_and_the_embeddings(tower, tmp_path):
    tower.config.query_prefix, tower.config.pooling = "query: ", "mean"
    tower.save_pretrained(tmp_path)
    loaded = OmniSearchSageQueryModel.from_pretrained(tmp_path)

    saved_state, loaded_state = tower.state_dict(), loaded.state_dict()
    assert loaded_state.keys() == saved_state.keys()
    for name, tensor in saved_state.items():
        assert torch.equal(loaded_state[name], tensor), name
    assert (loaded.config.query_prefix, loaded.config.pooling) == ("query: ", "mean")
    assert loaded.tokenizer is not None
    np.testing.assert_array_equal(loaded.encode(QUERIES), tower.encode(QUERIES))


def test_saved_folder_is_safetensors_with_code_and_tokenizer(tower, tmp_path):
    tower.save_pretrained(tmp_path)
    files = {path.name for path in tmp_path.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer_config.json"} <= files
    assert {"configuration_query.py", "modeling_query.py", "encoding.py"} <= files
    assert not [name for name in files if name.endswith((".bin", ".pt", ".pkl"))]
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert auto_map == {
        "AutoConfig": "configuration_query.OmniSearchSageQueryConfig",
        "AutoModel": "modeling_query.OmniSearchSageQueryModel",
    }


def test_auto_classes_return_our_classes(tower, tmp_path):
    tower.save_pretrained(tmp_path)
    assert type(AutoConfig.from_pretrained(tmp_path)) is OmniSearchSageQueryConfig
    model = AutoModel.from_pretrained(tmp_path)
    assert type(model) is OmniSearchSageQueryModel
    assert isinstance(AutoTokenizer.from_pretrained(tmp_path), BertTokenizer)
    np.testing.assert_array_equal(model.encode(QUERIES), tower.encode(QUERIES))


def test_surrogates_are_joined_or_replaced_not_an_error(tower):
    # From JSON such as "\\ud83d": not UTF-8 encodable, so fast tokenizers raise an unreadable TypeError.
    broken = ["lamp \ud83d", "red \ud83d\ude00 dress", "\udfff"]
    repaired = ["lamp \ufffd", "red \U0001f600 dress", "\ufffd"]
    np.testing.assert_array_equal(tower.encode(broken), tower.encode(repaired))


def test_fp32_save_loads_back_as_fp32(tower, tmp_path):
    tower.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "float32"
    loaded = AutoModel.from_pretrained(tmp_path)
    assert {parameter.dtype for parameter in loaded.parameters()} == {torch.float32}


def test_folder_without_tokenizer_loads_with_a_warning(tiny_backbone_config, tmp_path, caplog):
    model = OmniSearchSageQueryModel(OmniSearchSageQueryConfig(backbone_config=tiny_backbone_config, out_dim=16))
    model.save_pretrained(tmp_path)
    assert not (tmp_path / "tokenizer_config.json").exists()
    with caplog.at_level(logging.WARNING):
        loaded = OmniSearchSageQueryModel.from_pretrained(tmp_path)
    assert loaded.tokenizer is None
    assert "No tokenizer found" in caplog.text


def test_remote_code_load_without_the_package_gives_the_same_embeddings(tower, tmp_path, run_without_package):
    folder = tmp_path / "query_tower"
    tower.save_pretrained(folder)
    stdout = run_without_package(
        f"""
import json
from transformers import AutoModel
try:
    import omnisearchsage_hf
    raise SystemExit("omnisearchsage_hf should not be importable here")
except ImportError:
    pass
model = AutoModel.from_pretrained({str(folder)!r}, trust_remote_code=True)
embeddings = model.encode({QUERIES!r})
print(json.dumps({{"class": type(model).__module__ + "." + type(model).__name__,
                   "tokenizer": type(model.tokenizer).__name__,
                   "embeddings": embeddings.tolist()}}))
"""
    )
    result = json.loads(stdout.strip().splitlines()[-1])
    assert result["class"].startswith("transformers_modules.") and result["class"].endswith(
        "modeling_query.OmniSearchSageQueryModel"
    )
    assert result["tokenizer"] == "BertTokenizer"
    np.testing.assert_allclose(np.array(result["embeddings"]), tower.encode(QUERIES), atol=1e-6)


def test_identity_projection_starts_at_the_pretrained_encoder(tiny_backbone_dir):
    tower = OmniSearchSageQueryModel.from_backbone(
        tiny_backbone_dir, pooling="mean", out_dim=32, projection_init="identity"
    )
    inputs = tower.tokenize(["copper sink", "red dress"])
    with torch.no_grad():
        hidden = tower.backbone(**inputs).last_hidden_state
        expected = torch.nn.functional.normalize(pool(hidden, inputs["attention_mask"], "mean"), dim=-1)
    assert torch.allclose(tower.encode(["copper sink", "red dress"], convert_to_tensor=True), expected, atol=1e-6)
    with pytest.raises(StrictDataclassError, match="identity"):
        OmniSearchSageQueryModel.from_backbone(tiny_backbone_dir, out_dim=64, projection_init="identity")
