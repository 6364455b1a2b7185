"""The synthetic world generator: determinism, the paper's coverage rates, popularity, splits, files."""

import json
import re

import datasets
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from omnisearchsage_hf import OmniSearchSageEntityConfig
from omnisearchsage_hf.data.synthetic import (
    ENTITY_METADATA_COLUMNS,
    PIN_ENGAGEMENTS,
    PRODUCT_ENGAGEMENTS,
    TASKS,
    SyntheticWorld,
    SyntheticWorldConfig,
    entity_features,
    generate_world,
)
from omnisearchsage_hf.data.synthetic.__main__ import main

SMALL = {
    "num_pins": 300,
    "num_products": 80,
    "num_queries": 200,
    "num_topics": 8,
    "embedding_dim": 16,
    "num_query_pin_pairs": 800,
    "num_query_product_pairs": 300,
    "num_query_query_pairs": 300,
}
CJK = re.compile(r"[\u4e00-\u9fff]")


@pytest.fixture(scope="module")
def world() -> SyntheticWorld:
    return generate_world(
        SyntheticWorldConfig(
            num_pins=4000, num_products=1000, num_queries=2000, num_topics=20, embedding_dim=32, seed=3
        )
    )


def _tables(world: SyntheticWorld) -> list:
    return [world.pins.table, world.products.table, world.queries.table] + [
        world.pairs[task][split].table for task in TASKS for split in ("train", "test")
    ]


def test_same_seed_gives_the_same_world_and_another_seed_does_not():
    first, second = generate_world(SyntheticWorldConfig(**SMALL)), generate_world(SyntheticWorldConfig(**SMALL))
    assert all(a.equals(b) for a, b in zip(_tables(first), _tables(second), strict=True))
    other = generate_world(SyntheticWorldConfig(**SMALL, seed=1))
    assert not any(a.equals(b) for a, b in zip(_tables(first), _tables(other), strict=True))


def test_pins_have_the_papers_coverage_rates(world):
    pins = world.pins.table.to_pandas()
    assert abs((pins.title.notna() | pins.description.notna()).mean() - 0.71) < 0.03
    assert abs(pins.board_titles.notna().mean() - 0.91) < 0.02
    assert abs(pins.engaged_queries.notna().mean() - 0.65) < 0.03
    assert pins.caption.notna().all()
    assert pins.board_titles.dropna().map(len).between(1, 10).all()
    assert pins.engaged_queries.dropna().map(len).between(1, 20).all()
    assert pins.board_titles.dropna().map(lambda titles: len(set(titles)) == len(titles)).all()
    products = world.products.table.to_pandas()
    assert products.title.notna().all() and products.caption.notna().all()
    assert 0.5 < products.description.notna().mean() < 0.7
    assert products.brand.notna().mean() > 0.7 and products.color.notna().mean() > 0.6


def test_engagements_follow_zipf_popularity(world):
    pairs = world.pairs["query_pin"]["train"].table.to_pandas()
    per_pin = pairs.groupby("candidate_id")["count"].sum().sort_values(ascending=False)
    top = per_pin.iloc[: len(world.pins) // 100].sum() / per_pin.sum()
    assert top > 0.2, f"the top 1% of pins get {top:.0%} of engagements"
    frequency = np.sort(world.queries.column("frequency"))[::-1]
    assert frequency[: len(frequency) // 100].sum() / frequency.sum() > 0.2


def test_pairs_reference_existing_ids_and_merge_repeats(world):
    ids = {
        "query_pin": set(world.pins.column("id")),
        "query_product": set(world.products.column("id")),
        "query_query": set(world.queries.column("text")),
    }
    allowed = {"query_pin": set(PIN_ENGAGEMENTS), "query_product": set(PRODUCT_ENGAGEMENTS), "query_query": {"click"}}
    texts = set(world.queries.column("text"))
    for task in TASKS:
        pairs = pd.concat([world.pairs[task][split].table.to_pandas() for split in ("train", "test")])
        assert len(pairs) > 0
        assert set(pairs["query"]) <= texts and set(pairs["candidate_id"]) <= ids[task]
        assert set(pairs["engagement"]) <= allowed[task] and (pairs["count"] >= 1).all()
        assert not pairs.duplicated(["query", "candidate_id", "engagement"]).any()
    assert {"add_to_cart", "checkout"} <= set(world.pairs["query_product"]["train"].column("engagement"))
    query_query = world.pairs["query_query"]["train"].table.to_pandas()
    assert (query_query["query"] != query_query["candidate_id"]).all()


def test_engagements_stay_mostly_on_topic(world):
    topic_of_query = dict(zip(world.queries.column("text"), world.queries.column("topic"), strict=True))
    topic_of_pin = dict(zip(world.pins.column("id"), world.pins.column("topic"), strict=True))
    pairs = world.pairs["query_pin"]["train"]
    on_topic = np.mean(
        [
            topic_of_query[q] == topic_of_pin[c]
            for q, c in zip(pairs.column("query"), pairs.column("candidate_id"), strict=True)
        ]
    )
    assert 0.85 < on_topic < 1.0  # off-topic noise: 5% of events


def test_test_queries_never_appear_in_train_pairs(world):
    split = dict(zip(world.queries.column("text"), world.queries.column("split"), strict=True))
    test_queries = {text for text, s in split.items() if s == "test"}
    assert len(test_queries) == round(0.1 * len(split))
    for task in TASKS:
        train, test = world.pairs[task]["train"], world.pairs[task]["test"]
        assert len(test) > 0 and set(test.column("query")) <= test_queries
        assert not test_queries & set(train.column("query"))
    assert not test_queries & set(world.pairs["query_query"]["train"].column("candidate_id"))
    engaged = world.pins.table.column("engaged_queries").combine_chunks().flatten().to_pylist()
    assert not test_queries & set(engaged), "engaged queries must not leak held-out queries"


def test_embeddings_are_unit_norm_and_carry_the_topic(world):
    topics = world.pins.column("topic")[:800]
    for name in ("pinsage_embedding", "visual_embedding"):
        vectors = world.pins.column(name)[:800]
        assert vectors.dtype == np.float32 and vectors.shape == (800, 32)
        np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
        cosine, same = vectors @ vectors.T, topics[:, None] == topics[None, :]
        off_diagonal = ~np.eye(len(topics), dtype=bool)
        assert cosine[same & off_diagonal].mean() > cosine[~same].mean() + 0.15
    itemsage = world.products.column("itemsage_embedding")
    np.testing.assert_allclose(np.linalg.norm(itemsage, axis=1), 1.0, atol=1e-5)


def test_some_products_have_several_images(world):
    images = [record["visual_embedding"] for record in world.products[:400]]
    counts = np.array([len(array) for array in images])
    assert all(array.shape[1:] == (32,) for array in images)
    assert counts.min() == 1 and counts.max() == 4 and 0.2 < (counts > 1).mean() < 0.4
    np.testing.assert_allclose(np.linalg.norm(np.concatenate(images), axis=1), 1.0, atol=1e-5)


def test_languages_differ_and_japanese_uses_cjk(world):
    queries = world.queries.table.to_pandas()
    assert set(queries.language) == {"en", "de", "fr", "es", "ja"}
    assert queries.text.is_unique
    assert queries[queries.language == "ja"].text.map(lambda t: bool(CJK.search(t))).mean() > 0.5
    assert not queries[queries.language != "ja"].text.map(lambda t: bool(CJK.search(t))).any()
    words = {code: {w for text in group.text for w in text.split()} for code, group in queries.groupby("language")}
    assert not words["en"] & words["de"] and not words["fr"] & words["es"]
    pins = world.pins.table.to_pandas()
    assert pins[(pins.language == "ja") & pins.title.notna()].title.map(lambda t: bool(CJK.search(t))).all()
    # Query lengths: 1..5 words for space-separated languages.
    lengths = queries[queries.language != "ja"].text.str.split().map(len)
    assert lengths.min() == 1 and lengths.max() == 5


def test_records_are_accepted_by_the_entity_tower(world, make_entity_tower):
    pins, products = world.pins[:50], world.products[:50]
    assert not set(ENTITY_METADATA_COLUMNS) & set(pins[0]) and pins[0]["id"] == "pin_000000"
    assert world.pins[-1]["id"] == world.pins.column("id")[-1]
    fields = ("title", "description", "caption", "board_titles", "engaged_queries")
    model = make_entity_tower(
        [p[f] for p in pins + products for f in fields],
        oov_buckets=0,
        text_fields=OmniSearchSageEntityConfig.text_fields,  # the default fields
        dense=dict.fromkeys(("pinsage_embedding", "visual_embedding", "itemsage_embedding"), 32),
        num_buckets=101,
        hidden_dims=[16],
    )
    assert model.encode(pins).shape == (50, 8)
    assert model.encode(products + pins[:5]).shape == (55, 8)


def test_save_writes_parquet_files_that_round_trip(tmp_path):
    world = generate_world(SyntheticWorldConfig(**SMALL))
    written = world.save(tmp_path)
    expected = {"pins.parquet", "products.parquet", "queries.parquet", "world.json"} | {
        f"pairs/{task}_{split}.parquet" for task in TASKS for split in ("train", "test")
    }
    assert set(written) == expected and all((tmp_path / name).is_file() for name in expected)
    assert not [p for p in tmp_path.rglob("*") if ".tmp-" in p.name]
    summary = json.loads((tmp_path / "world.json").read_text())
    assert SyntheticWorldConfig(**summary["config"]) == world.config and summary["counts"] == world.counts()

    for name, table in [("pins", world.pins), ("products", world.products), ("queries", world.queries)] + [
        (f"pairs/{task}_{split}", world.pairs[task][split]) for task in TASKS for split in ("train", "test")
    ]:
        assert pq.read_table(tmp_path / f"{name}.parquet").equals(table.table), name
    pairs = pd.read_parquet(tmp_path / "pairs/query_pin_train.parquet")
    assert pairs.to_dict("records") == world.pairs["query_pin"]["train"].to_records()

    # The trainer reads the files with HF `datasets`; its rows, stripped of metadata, feed the entity tower.
    products = datasets.load_dataset(
        "parquet", data_files=str(tmp_path / "products.parquet"), split="train", cache_dir=str(tmp_path / "cache")
    )
    row, record = entity_features(products[3]), world.products[3]
    assert list(row) == list(record) and row["title"] == record["title"]
    np.testing.assert_array_equal(np.asarray(row["visual_embedding"], np.float32), record["visual_embedding"])


def test_command_line_writes_a_world(tmp_path, capsys):
    assert (
        main(
            [
                "--out",
                str(tmp_path),
                "--quiet",
                "--num-pins",
                "40",
                "--num-products",
                "10",
                "--num-queries",
                "30",
                "--num-topics",
                "3",
                "--languages",
                "en,ja",
                "--embedding-dim",
                "8",
            ]
        )
        == 0
    )
    summary = json.loads((tmp_path / "world.json").read_text())
    assert summary["config"]["languages"] == ["en", "ja"] and summary["counts"]["pins"] == 40
    assert json.loads(capsys.readouterr().out)["pins"] == 40


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("num_pins", 0),
        ("num_queries", 2.5),
        ("words_per_topic", 2),
        ("num_query_pin_pairs", -1),
        ("seed", -1),
        ("noise_rate", 1.5),
        ("embedding_noise", -0.1),
        ("test_fraction", 1.0),
        ("max_images", True),
        ("languages", ("en", "xx")),
        ("languages", ("en", "en")),
        ("languages", ()),
    ],
)
def test_bad_config_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"`{field}`"):
        SyntheticWorldConfig(**{field: value})


def test_pin_product_pairs_for_itemsage():
    """Pin → product engagements: held-out pins, mostly on-topic, every product engagement type, many images."""
    config = SyntheticWorldConfig(**{**SMALL, "num_pin_product_pairs": 2000, "max_images": 20, "multi_image_rate": 0.8})
    world = generate_world(config)
    assert generate_world(SyntheticWorldConfig(**SMALL)).pairs.keys() == set(TASKS)  # off by default
    # The other tables do not change when pin → product pairs are added.
    plain = generate_world(SyntheticWorldConfig(**{**SMALL, "max_images": 20, "multi_image_rate": 0.8}))
    assert plain.pairs["query_product"]["train"].table.equals(world.pairs["query_product"]["train"].table)
    train = world.pairs["pin_product"]["train"].table.to_pandas()
    test = world.pairs["pin_product"]["test"].table.to_pandas()
    assert len(train) > 800 and len(test) > 50  # repeats of one (pin, product, engagement) merge
    pins, products = set(world.pins.column("id")), set(world.products.column("id"))
    assert set(train["query"]) | set(test["query"]) <= pins
    assert set(train["candidate_id"]) | set(test["candidate_id"]) <= products
    assert not set(train["query"]) & set(test["query"])  # split by pin
    assert set(train["engagement"]) == set(PRODUCT_ENGAGEMENTS)  # clicks, saves, add to cart, checkout, closeups
    topic_of_pin = dict(zip(world.pins.column("id"), world.pins.column("topic"), strict=True))
    topic_of_product = dict(zip(world.products.column("id"), world.products.column("topic"), strict=True))
    on_topic = np.mean(
        [topic_of_pin[p] == topic_of_product[c] for p, c in zip(train["query"], train["candidate_id"], strict=True)]
    )
    assert 0.85 < on_topic < 1.0
    images = [len(v) for v in world.products.table.column("visual_embedding").to_pylist()]
    assert max(images) == 20 and min(images) == 1
