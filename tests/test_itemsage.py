"""ItemSage: slots and masking, gradients to every slot type, persistence, bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from huggingface_hub.errors import StrictDataclassError
from transformers import AutoConfig, AutoModel, AutoTokenizer

from omnisearchsage_hf import ItemSageConfig, ItemSageModel, OmniSearchSageTokenizer, build_vocab
from omnisearchsage_hf.training.config import load_config

FIELDS = ["title", "description", "brand"]
CORPUS = ["linen throw pillow", "copper kettle", "Acme", "red summer dress", "北京 欢迎你", "مرحبا"]
IMAGE_DIM = 6


def make_itemsage(seed=0, **config) -> ItemSageModel:
    torch.manual_seed(seed)
    tokenizer = build_vocab(CORPUS, oov_buckets=3, show_progress_bar=False)
    model = ItemSageModel(
        ItemSageConfig(
            **{
                "vocab_size": tokenizer.vocab_size,
                "text_fields": FIELDS,
                "image_dim": IMAGE_DIM,
                "num_buckets": 97,
                "embedding_dim": 16,
                "hidden_size": 16,
                "num_attention_heads": 2,
                "intermediate_size": 32,
                "head_hidden_dims": [32],
                "out_dim": 8,
                "hidden_dropout_prob": 0.0,
                **config,
            }
        )
    )
    model.tokenizer = tokenizer
    return model


def images(n, seed=0):
    return np.random.default_rng(seed).standard_normal((n, IMAGE_DIM)).astype(np.float32)


@pytest.fixture(scope="module")
def model():
    return make_itemsage().eval()


PRODUCTS = [
    {"id": "a", "title": "linen throw pillow", "brand": "Acme", "image_embeddings": images(3)},
    {"title": "copper kettle"},
    {"description": "北京欢迎你", "image_embeddings": images(1, seed=1)[0]},
    {"title": "red dress", "description": "summer", "brand": "Acme", "image_embeddings": images(20, seed=2)},
]


class TestMasking:
    def test_unit_vectors_in_input_order(self, model):
        out = model.encode(PRODUCTS, batch_size=2)
        assert out.shape == (4, 8)
        assert np.allclose(np.linalg.norm(out, axis=1), 1, atol=1e-5)
        for index, product in enumerate(PRODUCTS):
            assert np.allclose(model.encode(product), out[index], atol=1e-5)

    def test_zero_images_and_one_field_ignores_padding(self, model):
        """A product with no image and one field: padded image slots and empty fields change nothing."""
        alone = model.encode({"title": "copper kettle"})
        # Batched with a 20-image product, the kettle's row gets 20 masked image slots.
        batched = model.encode([{"title": "copper kettle"}, PRODUCTS[3]], batch_size=2)[0]
        assert np.allclose(alone, batched, atol=1e-5)
        # Whatever the padding holds, masked slots are not read.
        inputs = model.prepare_inputs([{"title": "copper kettle"}, PRODUCTS[3]])
        inputs["dense_features"]["image_embeddings"][0] = 1e3
        with torch.no_grad():
            garbage = model(**inputs).embeddings[0].numpy()
        assert np.allclose(garbage, alone, atol=1e-5)
        # An empty string is a missing field too (an empty bag), not a field of zeros.
        assert np.allclose(model.encode({"title": "copper kettle", "description": ""}), alone, atol=1e-5)

    def test_twenty_images_all_count(self, model):
        many = PRODUCTS[3]
        full = model.encode(many)
        fewer = model.encode({**many, "image_embeddings": many["image_embeddings"][:19]})
        assert not np.allclose(full, fewer, atol=1e-4)  # the 20th image is read
        shuffled = {**many, "image_embeddings": many["image_embeddings"][::-1].copy()}
        assert np.allclose(model.encode(shuffled), full, atol=1e-5)  # a set: image order does not matter

    def test_encode_runs_in_eval_mode_and_restores_each_submodule(self):
        training = make_itemsage(hidden_dropout_prob=0.5).train()
        training.head.eval()  # a frozen part stays frozen
        first = training.encode(PRODUCTS, device="cpu")
        assert np.array_equal(first, training.encode(PRODUCTS))  # no dropout inside encode
        assert training.training and training.layers[0].training and not training.head.training

    def test_image_only_and_text_only_variants(self):
        image_only = make_itemsage(text_fields=[], vocab_size=0)  # no text: the n-gram vocabulary may be empty
        out = image_only.encode([{"image_embeddings": images(2)}, {"image_embeddings": images(5, seed=3)}])
        assert out.shape == (2, 8) and not np.allclose(out[0], out[1])
        text_only = make_itemsage(image_feature=None)
        assert text_only.config.vector_features() == {}
        with pytest.raises(ValueError, match="unknown feature.*image_embeddings"):
            text_only.encode({"title": "kettle", "image_embeddings": images(1)})


class TestGradients:
    def test_every_slot_type_gets_a_gradient(self):
        model = make_itemsage().train()
        inputs = model.prepare_inputs(PRODUCTS)
        model(**inputs).embeddings.pow(3).sum().backward()
        for name, parameter in model.named_parameters():
            if name.endswith("bucket_table"):
                continue
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
        # Per slot type: CLS, image, and each text field's type embedding.
        assert (model.slot_types.weight.grad.abs().sum(1) > 0).all()

    def test_absent_field_gets_no_gradient(self):
        model = make_itemsage().train()
        model(**model.prepare_inputs([{"title": "copper kettle"}])).embeddings.sum().backward()
        grads = model.slot_types.weight.grad.abs().sum(1)
        assert grads[0] > 0 and grads[2] > 0  # CLS and title
        assert grads[1] == 0 and grads[3] == 0 and grads[4] == 0  # images, description, brand: masked


class TestPersistence:
    def test_save_load_every_tensor(self, model, tmp_path):
        model.save_pretrained(tmp_path)
        files = {p.name for p in tmp_path.iterdir()}
        assert {"model.safetensors", "config.json", "modeling_itemsage.py", "configuration_itemsage.py"} <= files
        assert not any(name.endswith((".bin", ".pkl", ".pt")) for name in files)
        assert isinstance(AutoConfig.from_pretrained(tmp_path), ItemSageConfig)
        assert isinstance(AutoTokenizer.from_pretrained(tmp_path), OmniSearchSageTokenizer)
        loaded = AutoModel.from_pretrained(tmp_path)
        assert isinstance(loaded, ItemSageModel)
        before = {**dict(model.named_parameters()), **dict(model.named_buffers())}
        after = {**dict(loaded.named_parameters()), **dict(loaded.named_buffers())}
        assert before.keys() == after.keys()
        for name in before:
            assert torch.equal(before[name], after[name]), name
        assert np.array_equal(loaded.encode(PRODUCTS), model.encode(PRODUCTS))
        assert json.loads((tmp_path / "config.json").read_text())["max_images"] == 20

    def test_trust_remote_code_without_package(self, model, tmp_path, run_without_package):
        model.save_pretrained(tmp_path)
        products = [{k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in p.items()} for p in PRODUCTS]
        script = f"""
import json
from transformers import AutoModel
model = AutoModel.from_pretrained({str(tmp_path)!r}, trust_remote_code=True)
assert "omnisearchsage_hf" not in type(model).__module__, type(model).__module__
print(json.dumps(model.encode(json.loads({json.dumps(json.dumps(products))})).tolist()))
"""
        out = np.array(json.loads(run_without_package(script).strip().splitlines()[-1]))
        assert np.allclose(out, model.encode(PRODUCTS), atol=1e-5)


class TestBadInput:
    def test_too_many_images_names_the_product_and_the_limit(self, model):
        with pytest.raises(ValueError, match=r"Product 1 has 21 images.*at most 20"):
            model.encode([PRODUCTS[0], {"title": "x", "image_embeddings": images(21)}])

    def test_wrong_image_width_nan_and_unknown_fields(self, model):
        with pytest.raises(ValueError, match=r"'image_embeddings' of entity 0 has shape \(2, 5\)"):
            model.encode({"image_embeddings": np.zeros((2, 5))})
        bad = images(2)
        bad[1, 0] = np.nan
        with pytest.raises(ValueError, match="NaN"):
            model.encode({"title": "x", "image_embeddings": bad})
        with pytest.raises(ValueError, match=r"unknown feature\(s\) \['colour'\]"):
            model.encode({"title": "x", "colour": "red"})
        with pytest.raises(TypeError, match="description"):
            model.encode({"title": "x", "description": 5})

    def test_long_and_non_latin_text(self, model):
        out = model.encode([{"title": "😀 " * 5000}, {"title": "北京" * 5000, "brand": "مرحبا"}])
        assert np.isfinite(out).all()

    def test_config_errors(self):
        with pytest.raises((ValueError, StrictDataclassError), match="multiple of `num_attention_heads`"):
            ItemSageConfig(hidden_size=10, num_attention_heads=3)
        with pytest.raises((ValueError, StrictDataclassError), match="at least one text field"):
            ItemSageConfig(text_fields=[], image_feature=None)
        with pytest.raises((ValueError, StrictDataclassError), match="unique"):
            ItemSageConfig(text_fields=["title", "title"])

    def test_without_tokenizer(self):
        model = make_itemsage()
        model.tokenizer = None
        with pytest.raises(ValueError, match="no tokenizer"):
            model.encode({"title": "x"})


ROOT = Path(__file__).parents[1]
ITEMSAGE_CONFIG = ROOT / "training" / "configs" / "itemsage.yaml"
# itemsage.yaml on a world small enough for the default suite.
SMALL_RUN = [
    "--data.synthetic.num_pins", "1500", "--data.synthetic.num_products", "400", "--data.synthetic.num_queries", "800",
    "--data.synthetic.num_topics", "8", "--data.synthetic.embedding_dim", "16", "--data.synthetic.max_images", "5",
    "--data.synthetic.num_query_product_pairs", "4000", "--data.synthetic.num_pin_product_pairs", "4000",
    "--model.entity.image_dim", "16", "--model.entity.out_dim", "16", "--model.entity.hidden_size", "16",
    "--model.query.out_dim", "16", "--model.entity.num_buckets", "2000", "--train.batch_size", "32",
    "--train.max_steps", "30", "--train.log_every", "10", "--train.learning_rate", "0.003",
    "--eval.corpus_size", "100", "--eval.max_pairs", "100",
]  # fmt: skip


def _run(*arguments: str) -> str:
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, str(ROOT / "training" / "train.py"), *arguments]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    return result.stdout + result.stderr


def _model_inputs(model, rows: list[dict]) -> list[dict]:
    """Table rows reduced to the columns the model reads (a null is a missing feature)."""
    return [{k: row[k] for k in model.config.input_features() if row[k] is not None} for row in rows]


@pytest.fixture(scope="module")
def itemsage_run(tmp_path_factory):
    """itemsage.yaml, small: query → product and pin → product (fixed PinSage side), one task per engagement."""
    output_dir = tmp_path_factory.mktemp("itemsage")
    log = _run("--config", str(ITEMSAGE_CONFIG), "--output_dir", str(output_dir), *SMALL_RUN)
    return output_dir, log


class TestTraining:
    def test_trains_per_engagement_type_and_exports_itemsage(self, itemsage_run):
        output_dir, log = itemsage_run
        logged = [json.loads(line) for line in log.splitlines() if line.startswith('{"step"')]
        losses = [entry["loss"] for entry in logged if "loss" in entry]
        assert len(losses) == 3 and losses[-1] < losses[0], losses
        metrics = json.loads((output_dir / "metrics.json").read_text())
        for surface in ("query_product", "pin_product"):
            for engagement in ("click", "save", "add_to_cart", "checkout"):
                assert 0 <= metrics[f"{surface}_{engagement}_recall@10"] <= 1
        # Chance is 0.1 in a corpus of 100: the fixed pin side is learnable in 30 steps.
        assert np.mean([metrics[f"pin_product_{e}_recall@10"] for e in ("click", "save")]) > 0.2
        model = AutoModel.from_pretrained(output_dir / "entity_tower")
        assert isinstance(model, ItemSageModel) and model.config.image_feature == "visual_embedding"
        # The resolved config (overrides included) is kept with the run.
        recorded = load_config(output_dir / "training_config.yaml")
        assert recorded.model.entity_architecture == "itemsage" and recorded.train.max_steps == 30
        product = {"title": "a product", "brand": "Acme", "visual_embedding": np.ones((3, 16), dtype=np.float32)}
        assert model.encode(product).shape == (16,)

    def test_engagement_filter_and_query_feature_read_the_right_pairs(self, itemsage_run, tmp_path):
        from omnisearchsage_hf.training.pairs import read_pairs

        output_dir, _ = itemsage_run
        path = output_dir / "data" / "pairs" / "pin_product_train.parquet"
        batches = list(read_pairs(path, task="t", engagements=["checkout"]))
        queries = [query for batch, _ in batches for query in batch.to_pylist()]
        candidates = [candidate for _, batch in batches for candidate in batch.to_pylist()]
        table = pq.read_table(path).to_pandas()
        assert len(queries) == (table["engagement"] == "checkout").sum() > 0
        assert all(q.startswith("pin_") for q in queries) and all(c.startswith("prod_") for c in candidates)
        with pytest.raises(ValueError, match=r"no pair .* has an engagement in \['chekout'\]; the file has"):
            list(read_pairs(path, task="t", engagements=["chekout"]))

    def test_itemsage_feeds_the_product_tower(self, itemsage_run, tmp_path):
        """An ItemSage folder as the source of the products' pre-existing embedding and its compat task."""
        itemsage_dir, _ = itemsage_run
        data = itemsage_dir / "data"
        task = {"name": "query_product_itemsage", "candidate": "compat:product:itemsage_embedding",
                "pairs": str(data / "pairs/query_product_train.parquet"),
                "eval_pairs": str(data / "pairs/query_product_test.parquet")}  # fmt: skip
        entity_task = {"name": "query_product", "candidate": "entity:product",
                       "pairs": str(data / "pairs/query_product_train.parquet")}  # fmt: skip
        output_dir = tmp_path / "omni"
        _run(
            "--config", str(ITEMSAGE_CONFIG), "--output_dir", str(output_dir), *SMALL_RUN,
            "--data.source", "files", "--data.entities", json.dumps({"product": str(data / "products.parquet")}),
            "--data.tasks", json.dumps([entity_task, task]),
            "--data.embedding_sources", json.dumps({"product.itemsage_embedding": str(itemsage_dir / "entity_tower")}),
            "--model.entity_architecture", "omnisearchsage", "--model.entity",
            json.dumps({"out_dim": 16, "num_buckets": 2000, "embedding_dim": 16, "hidden_dims": [32],
                        "dense_features": {"itemsage_embedding": 16, "visual_embedding": 16}}),
            "--train.max_steps", "5",
        )  # fmt: skip
        # The products table as the trainer read it: the ItemSage embeddings in place of the column.
        column = pq.read_table(output_dir / "data" / "embeddings" / "product.parquet").column("itemsage_embedding")
        stored = np.array(column.to_pylist(), dtype=np.float32)
        itemsage = AutoModel.from_pretrained(itemsage_dir / "entity_tower")
        products = pq.read_table(data / "products.parquet").to_pylist()
        wanted = itemsage.encode(
            [{k: p[k] for k in itemsage.config.input_features() if p[k] is not None} for p in products]
        )
        assert stored.shape == (len(products), 16) and np.allclose(stored, wanted, atol=1e-5)
        # The generated legacy column was replaced, not mixed in.
        legacy = np.array([p["itemsage_embedding"] for p in products], dtype=np.float32)
        assert not np.allclose(stored, legacy, atol=1e-2)
        entity = AutoModel.from_pretrained(output_dir / "entity_tower")
        assert "itemsage_embedding" in entity.config.dense_features
        assert "query_product_itemsage_recall@10" in json.loads((output_dir / "metrics.json").read_text())

    def test_batch_inference_writes_itemsage_embeddings(self, itemsage_run, tmp_path):
        pytest.importorskip("faiss")
        from omnisearchsage_hf.serving import EntityEmbeddings, embed_entity_table

        itemsage_dir, _ = itemsage_run
        model = AutoModel.from_pretrained(itemsage_dir / "entity_tower")
        table = itemsage_dir / "data" / "products.parquet"
        out = embed_entity_table(model, table, tmp_path / "emb", entity_type="product", chunk_size=150,
                                 show_progress_bar=False)  # fmt: skip
        loaded = EntityEmbeddings.load(out)
        products = pq.read_table(table).to_pylist()[:5]
        wanted = model.encode(_model_inputs(model, products))
        assert loaded.ids[:5] == [p["id"] for p in products]
        assert np.allclose(loaded.embeddings[:5], wanted, atol=1e-5)

    def test_fixed_query_embedding_trains_itemsage_alone(self, itemsage_run, tmp_path):
        """Query side = a fixed legacy query embedding: no query tower is trained or exported."""
        itemsage_dir, _ = itemsage_run
        data = itemsage_dir / "data"
        pairs = pq.read_table(data / "pairs/query_product_train.parquet")
        texts = sorted(set(pairs.column("query").to_pylist()))
        rng = np.random.default_rng(0)
        queries = {"id": texts, "legacy_embedding": list(rng.standard_normal((len(texts), 16)).astype(np.float32))}
        pq.write_table(pa.table(queries), tmp_path / "queries.parquet")
        task = {"name": "legacy_query_product", "candidate": "entity:product",
                "query_feature": "query:legacy_embedding", "num_random_negatives": 8,
                "pairs": str(data / "pairs/query_product_train.parquet")}  # fmt: skip
        entities = {"product": str(data / "products.parquet"), "query": str(tmp_path / "queries.parquet")}
        output_dir = tmp_path / "run"
        log = _run(
            "--config", str(ITEMSAGE_CONFIG), "--output_dir", str(output_dir), *SMALL_RUN,
            "--data.source", "files", "--data.entities", json.dumps(entities), "--data.tasks", json.dumps([task]),
            "--train.max_steps", "10", "--train.log_every", "5",
        )  # fmt: skip
        losses = [
            json.loads(line)["loss"] for line in log.splitlines() if line.startswith('{"step"') and "loss" in line
        ]
        assert len(losses) == 2 and all(np.isfinite(losses))
        assert isinstance(AutoModel.from_pretrained(output_dir / "entity_tower"), ItemSageModel)
        assert not (output_dir / "query_tower").exists()  # untrained: not exported
