"""The entity tower: hash embedding maths, per-field bags, dense features, persistence and bad input."""

import json

import numpy as np
import pytest
import torch
from huggingface_hub.errors import StrictDataclassError
from transformers import AutoConfig, AutoModel, AutoTokenizer

from omnisearchsage_hf import (
    HashEmbeddingBag,
    OmniSearchSageEntityConfig,
    OmniSearchSageEntityModel,
    OmniSearchSageTokenizer,
)


@pytest.fixture(scope="module")
def tower(make_entity_tower):
    return make_entity_tower()


class TestHashEmbedding:
    def test_equals_naive_per_token_loop(self, tower):
        bag = tower.embeddings
        torch.manual_seed(1)
        torch.nn.init.normal_(bag.importance)  # non-trivial importance weights
        cfg = tower.config
        ids = torch.tensor([3, 17, 3, 40, 5, 0, 2])
        offsets = torch.tensor([0, 3, 3, 6])  # bags: [3,17,3], [], [40,5,0], [2]
        expected = torch.zeros(4, cfg.embedding_dim)
        bounds = offsets.tolist() + [len(ids)]
        for b in range(4):
            for t in ids[bounds[b] : bounds[b + 1]].tolist():
                for i in range(cfg.num_hashes):
                    row = ((cfg.hash_a[i] * t + cfg.hash_b[i]) % cfg.hash_p[i]) % cfg.num_buckets
                    expected[b] += bag.importance[t, i] * bag.weight[row]
        assert torch.allclose(bag(ids, offsets), expected, atol=1e-6)
        torch.nn.init.ones_(bag.importance)

    def test_bucket_table_matches_hash_functions(self, tower):
        ids = torch.arange(tower.config.vocab_size)
        assert torch.equal(tower.embeddings.bucket_table, tower.embeddings.bucket_ids(ids))
        assert tower.embeddings.bucket_table.max() < tower.config.num_buckets

    def test_hash_parameters_are_stored_and_seeded(self):
        a = OmniSearchSageEntityConfig(vocab_size=100)
        assert a.hash_a == OmniSearchSageEntityConfig(vocab_size=100).hash_a
        assert a.hash_a != OmniSearchSageEntityConfig(vocab_size=100, hash_seed=1).hash_a
        assert all(p > 2**30 for p in a.hash_p) and len(a.hash_a) == a.num_hashes == 2
        assert OmniSearchSageEntityConfig.from_dict(a.to_dict()).hash_b == a.hash_b

    def test_gradient_reaches_every_parameter(self, tower, make_entity_tower, sample_entities):
        model = make_entity_tower()
        inputs = model.prepare_inputs(sample_entities)
        model(**inputs).embeddings.sum().backward()
        missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
        assert missing == []
        assert isinstance(model.embeddings, HashEmbeddingBag)


class TestFeatures:
    def test_output_is_unit_norm(self, tower, sample_entities):
        emb = tower.encode(sample_entities)
        assert emb.shape == (4, 8) and emb.dtype == np.float32
        assert np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)

    def test_featureless_entity_is_finite(self, tower):
        # Nothing to embed: the output is whatever the MLP's biases give (zero at init), never NaN.
        assert np.isfinite(tower.encode([{"title": "   "}, {}])).all()

    def test_missing_field_equals_none_and_blank(self, tower):
        base = {"title": "copper sink"}
        out = tower.encode(
            [base, {**base, "description": None}, {**base, "description": "   "}, {**base, "board_titles": []}]
        )
        assert np.allclose(out, out[0], atol=1e-6)

    def test_missing_field_is_not_an_empty_contribution_of_bias(self, tower, make_entity_tower):
        model = make_entity_tower()
        torch.nn.init.normal_(model.field_norm.bias)
        a, b = model.encode([{"title": "copper"}, {"title": "copper", "description": "zzzz qqqq"}])
        # "zzzz qqqq" hashes into OOV buckets, so the description bag is non-empty and must matter.
        assert not np.allclose(a, b)

    def test_missing_dense_feature_is_zero_filled(self, tower):
        a, b = tower.encode([{"title": "sink"}, {"title": "sink", "image_embedding": [0.0] * 4}])
        assert np.allclose(a, b, atol=1e-6)

    def test_per_image_list_is_masked_mean(self, tower):
        images = [[1.0, 1.0, 0.0, 0.0], [3.0, 1.0, 0.0, 2.0]]
        out = tower.encode(
            [
                {"title": "a", "image_embedding": images},
                {"title": "a", "image_embedding": np.mean(images, axis=0)},
                {"title": "a", "image_embedding": [[5.0, 0.0, 0.0, 1.0]]},
            ]
        )
        assert np.allclose(out[0], out[1], atol=1e-6)
        assert not np.allclose(out[0], out[2])

    def test_forward_masked_mean_ignores_padding(self, tower):
        inputs = tower.prepare_inputs([{"title": "a"}, {"title": "a"}])
        values = torch.tensor(
            [[[1.0, 2.0, 3.0, 4.0], [100.0, 100.0, 100.0, 100.0]], [[1.0, 2.0, 3.0, 4.0], [-7.0, 0.0, 7.0, 1.0]]]
        )
        mask = torch.tensor([[True, False], [True, False]])
        out = tower(inputs["input_ids"], inputs["offsets"], {"image_embedding": values}, {"image_embedding": mask})
        assert torch.allclose(out.embeddings[0], out.embeddings[1], atol=1e-6)

    def test_text_fields_only_and_dense_only_models(self, make_entity_tower):
        text_only = make_entity_tower(dense={})
        assert text_only.encode([{"title": "copper"}]).shape == (1, 8)
        dense_only = make_entity_tower(text_fields=[])
        assert dense_only.encode([{"image_embedding": [1.0, 2.0, 3.0, 4.0]}]).shape == (1, 8)

    def test_robust_text(self, tower):
        texts = [
            "",
            "🔥🔥 sale 👗",
            "ภาษาไทยง่ายนิดเดียว",
            "مرحبا بالعالم",
            "北京欢迎你",
            "Ünïcödé ﬁ",
            "x" * 10_000,
            "copper sink " * 1000,
        ]
        emb = tower.encode([{"title": t, "board_titles": [t, t]} for t in texts])
        assert np.isfinite(emb).all() and np.allclose(np.linalg.norm(emb[1:], axis=1), 1.0, atol=1e-5)

    def test_long_title_cost_is_bounded(self, tower):
        inputs = tower.prepare_inputs([{"title": "copper sink " * 5000}])
        assert len(inputs["input_ids"]) <= 3 * (tower.tokenizer.max_chars_per_field + 2)


class TestEncode:
    def test_order_restored_and_batch_size_invariant(self, tower, sample_entities):
        full = tower.encode(sample_entities, batch_size=3)
        one_by_one = tower.encode(sample_entities, batch_size=1)
        assert np.allclose(full, one_by_one, atol=1e-6)
        assert np.allclose(full[2], tower.encode(sample_entities[2]), atol=1e-6)

    def test_single_dict_returns_vector(self, tower, sample_entities):
        assert tower.encode(sample_entities[0]).shape == (8,)

    def test_tensor_and_truncation(self, tower, sample_entities):
        emb = tower.encode(sample_entities, convert_to_tensor=True, truncate_dim=4)
        assert isinstance(emb, torch.Tensor) and emb.shape == (4, 4)
        full = tower.encode(sample_entities, convert_to_tensor=True)
        assert torch.allclose(emb, torch.nn.functional.normalize(full[:, :4], dim=-1), atol=1e-6)

    def test_restores_training_mode(self, tower, sample_entities):
        tower.train()
        tower.encode(sample_entities[:1])
        assert tower.training
        tower.eval()


class TestBadInput:
    @pytest.mark.parametrize(
        ("entities", "error", "match"),
        [
            ([], ValueError, "empty"),
            ("copper", TypeError, "list"),
            ([{"title": "a", "colour": "red"}], ValueError, r"unknown feature\(s\) \['colour'\]"),
            (["just a string"], TypeError, "Entity 0 must be a dict"),
            ([{"title": 3}], TypeError, "'title' of item 0"),
            ([{"title": "ok"}, {"board_titles": ["ok", None]}], TypeError, "'board_titles' of item 1"),
            ([{"image_embedding": [1.0, 2.0]}], ValueError, r"'image_embedding' of entity 0 has shape \(2,\)"),
            ([{"title": "a"}, {"image_embedding": [1.0, float("nan"), 0.0, 0.0]}], ValueError, "entity 1 contains NaN"),
            ([{"image_embedding": [1.0, float("inf"), 0.0, 0.0]}], ValueError, "NaN or inf"),
            ([{"image_embedding": ["a", "b", "c", "d"]}], TypeError, "'image_embedding' of entity 0 must be numbers"),
        ],
    )
    def test_errors_name_the_field(self, tower, entities, error, match):
        with pytest.raises(error, match=match):
            tower.encode(entities)

    def test_bad_truncate_dim(self, tower, sample_entities):
        with pytest.raises(ValueError, match="truncate_dim"):
            tower.encode(sample_entities, truncate_dim=9)

    def test_no_tokenizer(self):
        model = OmniSearchSageEntityModel(
            OmniSearchSageEntityConfig(vocab_size=10, num_buckets=7, embedding_dim=4, hidden_dims=[4], out_dim=4)
        )
        with pytest.raises(ValueError, match="no tokenizer"):
            model.encode([{"title": "a"}])

    @pytest.mark.parametrize("extra", [+1, -1])
    def test_tokenizer_must_match_the_model_exactly(self, make_entity_tower, extra):
        # Smaller is as wrong as larger: another vocabulary maps words to other rows without an error.
        model = make_entity_tower()
        model.tokenizer = make_entity_tower(oov_buckets=3 + extra).tokenizer
        with pytest.raises(ValueError, match=rf"emits {model.config.vocab_size + extra} ids.*`vocab_size`"):
            model.encode([{"title": "a"}])

    @pytest.mark.parametrize("value", [3e38, -1e25])
    def test_dense_values_that_overflow_inside_the_tower_are_named(self, tower, value):
        # Finite in float32, but squared by the tower's LayerNorms: NaN embeddings without this check.
        entities = [{"title": "a", "image_embedding": [0.5, 0.1, 0.0, 1.0]}, {"image_embedding": [value, 0, 0, 0]}]
        with pytest.raises(ValueError, match=r"Entities \[1\].*'image_embedding' holds values up to .*Scale or clip"):
            tower.encode(entities)
        entities[1]["image_embedding"][0] = 1e3  # large but ordinary: embeds
        assert np.isfinite(tower.encode(entities)).all()

    def test_non_finite_weights_are_blamed_when_inputs_are_ordinary(self, make_entity_tower, sample_entities):
        model = make_entity_tower()
        with torch.no_grad():
            model.mlp.layers[0].weight[0, 0] = float("nan")
        with pytest.raises(ValueError, match=r"Entities \[0, 1, 2, 3\].*weights"):
            model.encode(sample_entities)

    def test_unknown_dense_feature_in_forward(self, tower):
        inputs = tower.prepare_inputs([{"title": "a"}])
        with pytest.raises(ValueError, match="Unknown dense features"):
            tower(inputs["input_ids"], inputs["offsets"], {"visual": torch.zeros(1, 4)})

    @pytest.mark.parametrize(
        "kwargs",
        [
            {"hash_p": [5, 7], "vocab_size": 10},
            {"hash_a": [1]},
            {"text_fields": ["title", "title"]},
            {"text_fields": ["id"]},
            {"out_dim": 0},
            {"dense_features": {"x": 0}},
            {"hash_p": [2147483647, 2147483647 - 2], "vocab_size": 10},  # 2**31 - 3 = 5 x 429496729: not prime
            {"num_buckets": "97"},  # field types are checked (strict needs real annotations, not strings)
            {"text_fields": 5},
            {"out_dim": 8.0},
        ],
    )
    def test_invalid_config(self, kwargs):
        with pytest.raises(StrictDataclassError):
            OmniSearchSageEntityConfig(**kwargs)

    def test_invalid_config_json_names_the_file_and_the_field(self, tower, tmp_path):
        tower.save_pretrained(tmp_path)
        config = json.loads((tmp_path / "config.json").read_text())
        (tmp_path / "config.json").write_text(json.dumps({**config, "embedding_dim": "16"}))
        with pytest.raises(ValueError, match=r"(?s)config\.json.*'embedding_dim'.*expected int.*re-download"):
            AutoModel.from_pretrained(tmp_path)


class TestPersistence:
    def test_save_load_every_tensor_and_encode(self, tower, tmp_path, sample_entities):
        tower.save_pretrained(tmp_path)
        files = {p.name for p in tmp_path.iterdir()}
        assert {"model.safetensors", "config.json", "trigrams.txt", "unigrams.txt", "bigrams.txt"} <= files
        assert not any(name.endswith((".bin", ".pkl", ".pt")) for name in files)
        assert {
            "modeling_entity.py",
            "configuration_entity.py",
            "modeling_hash_embedding.py",
            "encoding.py",
            "tokenization_omnisearchsage.py",
            "ngrams.py",
        } <= files

        assert isinstance(AutoConfig.from_pretrained(tmp_path), OmniSearchSageEntityConfig)
        assert isinstance(AutoTokenizer.from_pretrained(tmp_path), OmniSearchSageTokenizer)
        loaded = AutoModel.from_pretrained(tmp_path)
        assert isinstance(loaded, OmniSearchSageEntityModel)
        before = {**dict(tower.named_parameters()), **dict(tower.named_buffers())}
        after = {**dict(loaded.named_parameters()), **dict(loaded.named_buffers())}
        assert before.keys() == after.keys()
        for name in before:
            assert torch.equal(before[name], after[name]), name
        assert loaded.tokenizer.vocabulary.tokens == tower.tokenizer.vocabulary.tokens
        assert np.array_equal(loaded.encode(sample_entities), tower.encode(sample_entities))
        assert json.loads((tmp_path / "config.json").read_text())["hash_a"] == tower.config.hash_a

    def test_dense_feature_order_survives_reload(self, tmp_path, make_entity_tower):
        model = make_entity_tower(dense={"zeta": 2, "alpha": 3})
        assert list(model.config.dense_features) == ["alpha", "zeta"]
        entity = {"title": "sink", "zeta": [1.0, -2.0], "alpha": [0.5, 0.0, 3.0]}
        model.save_pretrained(tmp_path)
        assert np.allclose(AutoModel.from_pretrained(tmp_path).encode(entity), model.encode(entity), atol=1e-6)

    def test_trust_remote_code_without_package(self, tower, tmp_path, run_without_package, sample_entities):
        folder = tmp_path / "entity"
        tower.save_pretrained(folder)
        script = f"""
import json
from transformers import AutoModel, AutoTokenizer
entities = json.loads({json.dumps(json.dumps(sample_entities))})
model = AutoModel.from_pretrained({str(folder)!r}, trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained({str(folder)!r}, trust_remote_code=True)
assert "omnisearchsage_hf" not in type(model).__module__, type(model).__module__
print(json.dumps({{"emb": model.encode(entities).tolist(), "ids": tokenizer("copper sink")["input_ids"]}}))
"""
        out = json.loads(run_without_package(script).strip().splitlines()[-1])
        assert np.allclose(np.array(out["emb"]), tower.encode(sample_entities), atol=1e-6)
        assert out["ids"] == tower.tokenizer("copper sink")["input_ids"]

    def test_corrupted_weights_are_reported(self, tower, tmp_path):
        tower.save_pretrained(tmp_path)
        (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
        with pytest.raises(Exception, match="(?i)safetensors|header|deserializ|invalid|corrupt"):
            AutoModel.from_pretrained(tmp_path)


class TestResidualFeature:
    def test_starts_as_the_feature_then_learns(self, make_entity_tower):
        model = make_entity_tower(dense={"e5": 8, "ctx": 8}, residual_features={"e5": 1.0, "ctx": 0.5})
        vector = np.array([3.0, 0, 0, 4.0, 0, 0, 0, 0], dtype=np.float32)
        context = np.array([0, 0, 0, 0, 0, 0, 0, 10.0], dtype=np.float32)
        mix = (vector + 0.5 * context) / np.linalg.norm(vector + 0.5 * context)
        assert np.allclose(model.encode({"title": "copper sink", "e5": vector, "ctx": context}), mix, atol=1e-6)
        inputs = model.prepare_inputs([{"title": "copper sink", "e5": vector, "ctx": context}])
        model(**inputs).embeddings[0, 7].backward()
        assert model.mlp.layers[-1].weight.grad.abs().sum() > 0
        assert model.residual.weights.grad.abs().sum() > 0  # the mix is learned too

    def test_residual_weights_survive_save_and_load(self, tmp_path, make_entity_tower):
        model = make_entity_tower(dense={"e5": 8}, residual_features={"e5": 0.7}, residual_correction_scale=0.1)
        assert model.residual.correction_scale.item() == pytest.approx(0.1)
        with torch.no_grad():
            model.residual.weights.fill_(0.3)
            model.residual.correction_scale.fill_(0.5)
        model.save_pretrained(tmp_path)
        reloaded = AutoModel.from_pretrained(tmp_path)
        assert reloaded.config.residual_features == {"e5": 0.7}
        assert torch.equal(reloaded.residual.weights, model.residual.weights)
        assert torch.equal(reloaded.residual.correction_scale, model.residual.correction_scale)

    def test_residual_feature_must_match_out_dim(self):
        with pytest.raises(StrictDataclassError, match="residual_features"):
            OmniSearchSageEntityConfig(dense_features={"e5": 4}, out_dim=8, residual_features={"e5": 1.0})
