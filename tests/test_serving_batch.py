"""Batch entity inference: output equals `encode`, resume after an interruption, process split, plan checks, and
the `omnisearchsage-embed` command (a wrong model folder, two processes under `accelerate launch`, no datasets
cache). Corrupted tables, folders and indexes are in test_integrity.py."""

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

from omnisearchsage_hf import OmniSearchSageEntityModel, OmniSearchSageQueryModel
from omnisearchsage_hf.cli_errors import UsageError
from omnisearchsage_hf.serving.batch_inference import (
    EntityEmbeddings,
    embed_entity_table,
    model_fingerprint,
    process_chunks,
)
from omnisearchsage_hf.serving.cli import embed_main
from omnisearchsage_hf.serving.cli import main as serving_main

WORDS = ["copper", "sink", "red", "dress", "lamp", "wall", "art", "summer", "kitchen", "shoes"]


class FakeState:
    """The slice of accelerate's PartialState that batch inference reads, for one simulated process."""

    def __init__(self, process_index=0, num_processes=1):
        self.process_index, self.num_processes = process_index, num_processes
        self.is_main_process = process_index == 0
        self.device = torch.device("cpu")

    def wait_for_everyone(self):
        pass


def make_table(path: Path, n: int = 23) -> Path:
    rng = np.random.default_rng(0)
    titles = [" ".join(rng.choice(WORDS, size=3)) for _ in range(n)]
    table = pa.table(
        {
            "id": [f"pin{i}" for i in range(n)],
            "title": titles,
            "image_embedding": pa.array(
                list(rng.standard_normal((n, 4)).astype(np.float32)), pa.list_(pa.float32(), 4)
            ),
        }
    )
    pq.write_table(table, path)
    return path


@pytest.fixture(scope="module")
def tower(make_entity_tower):
    return make_entity_tower(WORDS, oov_buckets=0, text_fields=["title"], hidden_dims=[32]).eval()


class CountingTower:
    """Wraps the tower's `encode`: counts calls, and raises on call number `fail_at` (an interruption)."""

    def __init__(self, tower, fail_at=None):
        self.tower, self.fail_at, self.calls = tower, fail_at, 0
        self.config, self.tokenizer = tower.config, tower.tokenizer

    def encode(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.fail_at:
            raise KeyboardInterrupt("simulated kill")
        return self.tower.encode(*args, **kwargs)

    def to(self, device):
        return self

    def state_dict(self):
        return self.tower.state_dict()


def chunk_numbers(out):
    """Chunk numbers of the chunk files in `out` (files are named `<chunk>-<tag>.npy`)."""
    return sorted(int(p.name.split("-")[0]) for p in (out / "chunks").iterdir())


def expected(tower, table_path):
    rows = pq.read_table(table_path).to_pylist()
    return np.stack([tower.encode({k: v for k, v in row.items() if k != "id"}) for row in rows])


def test_output_matches_encode_in_table_order(tower, tmp_path):
    table = make_table(tmp_path / "pins.parquet")
    out = embed_entity_table(tower, table, tmp_path / "out", entity_type="pin", chunk_size=5, state=FakeState(),
                             show_progress_bar=False)  # fmt: skip
    loaded = EntityEmbeddings.load(out)
    assert loaded.entity_type == "pin" and loaded.ids == [f"pin{i}" for i in range(23)]
    np.testing.assert_allclose(loaded.embeddings, expected(tower, table), atol=1e-5)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["rows"] == 23 and manifest["dim"] == 8 and manifest["chunks"] == 5


def test_resume_after_interruption_recomputes_only_unfinished_chunks(tower, tmp_path):
    table, out = make_table(tmp_path / "pins.parquet"), tmp_path / "out"
    interrupted = CountingTower(tower, fail_at=3)  # chunks 0 and 1 finish, the kill lands in chunk 2
    with pytest.raises(KeyboardInterrupt):
        embed_entity_table(interrupted, table, out, entity_type="pin", chunk_size=5, state=FakeState(),
                           show_progress_bar=False)  # fmt: skip
    assert chunk_numbers(out) == [0, 1]
    assert not (out / "manifest.json").exists()
    with pytest.raises(FileNotFoundError, match="has not finished"):
        EntityEmbeddings.load(out)
    finished = {p.name: p.stat().st_mtime_ns for p in (out / "chunks").iterdir()}
    assert all("-" in name for name in finished)

    resumed = CountingTower(tower)
    embed_entity_table(resumed, table, out, entity_type="pin", chunk_size=5, state=FakeState(), show_progress_bar=False)
    assert resumed.calls == 3  # chunks 2, 3, 4 only
    assert all((out / "chunks" / name).stat().st_mtime_ns == mtime for name, mtime in finished.items())
    np.testing.assert_allclose(EntityEmbeddings.load(out).embeddings, expected(tower, table), atol=1e-5)

    again = CountingTower(tower)
    embed_entity_table(again, table, out, entity_type="pin", chunk_size=5, state=FakeState(), show_progress_bar=False)
    assert again.calls == 0  # a finished output is returned as is


def test_a_changed_plan_recomputes_and_another_output_is_refused(tower, tmp_path, caplog):
    """Chunk size or model changed: one warning line naming what changed, every chunk recomputed. Another table
    path or entity type in the same folder is a wrong --out folder: refused, nothing deleted."""
    table, out = make_table(tmp_path / "pins.parquet"), tmp_path / "out"
    embed_entity_table(tower, table, out, entity_type="pin", chunk_size=5, state=FakeState(), show_progress_bar=False)
    with caplog.at_level("WARNING", logger="omnisearchsage_hf.serving.batch_inference"):
        counting = CountingTower(tower)
        embed_entity_table(counting, table, out, entity_type="pin", chunk_size=6, state=FakeState(),
                           show_progress_bar=False)  # fmt: skip
    assert counting.calls == 4 and chunk_numbers(out) == [0, 1, 2, 3]
    assert [r.getMessage() for r in caplog.records if "recomputing every chunk" in r.getMessage()] == [
        f"{str(out)!r}: the chunk_size changed since its chunks were computed; recomputing every chunk."
    ]
    np.testing.assert_allclose(EntityEmbeddings.load(out).embeddings, expected(tower, table), atol=1e-5)

    other = OmniSearchSageEntityModel(tower.config)  # same config, other weights
    other.tokenizer = tower.tokenizer
    assert model_fingerprint(other) != model_fingerprint(tower)
    caplog.clear()
    with caplog.at_level("WARNING", logger="omnisearchsage_hf.serving.batch_inference"):
        embed_entity_table(other, table, out, entity_type="pin", chunk_size=6, state=FakeState(),
                           show_progress_bar=False)  # fmt: skip
    assert "the model changed" in caplog.text
    np.testing.assert_allclose(EntityEmbeddings.load(out).embeddings, expected(other, table), atol=1e-5)

    before = sorted(p.name for p in (out / "chunks").iterdir())
    moved = make_table(tmp_path / "pins_copy.parquet")  # same bytes, another path
    with pytest.raises(ValueError, match=r"holds the embeddings of another table .*Use a new --out folder"):
        embed_entity_table(other, moved, out, entity_type="pin", chunk_size=6, state=FakeState(),
                           show_progress_bar=False)  # fmt: skip
    with pytest.raises(ValueError, match=r"another entity_type \(entity_type 'pin'; now entity_type 'product'\)"):
        embed_entity_table(other, table, out, entity_type="product", chunk_size=6, state=FakeState(),
                           show_progress_bar=False)  # fmt: skip
    assert sorted(p.name for p in (out / "chunks").iterdir()) == before
    np.testing.assert_allclose(EntityEmbeddings.load(out).embeddings, expected(other, table), atol=1e-5)


def test_model_fingerprint_covers_config_and_tokenizer(make_entity_tower, tmp_path):
    """Same weights, another tokenizer vocabulary or setting: another fingerprint. Loading from a folder: the same."""
    tower = make_entity_tower(WORDS, oov_buckets=0, text_fields=["title"], hidden_dims=[32])
    fingerprint = model_fingerprint(tower)
    tower.save_pretrained(tmp_path / "tower")
    assert model_fingerprint(OmniSearchSageEntityModel.from_pretrained(tmp_path / "tower")) == fingerprint
    tower.tokenizer = make_entity_tower([*WORDS[:-1], "boots"], oov_buckets=0, text_fields=["title"]).tokenizer
    assert model_fingerprint(tower) != fingerprint
    tower.tokenizer = make_entity_tower(WORDS, oov_buckets=2, text_fields=["title"]).tokenizer
    assert model_fingerprint(tower) != fingerprint


def test_processes_split_the_chunks(tower, tmp_path):
    assert list(process_chunks(5, 0, 2)) == [0, 2, 4] and list(process_chunks(5, 1, 2)) == [1, 3]
    table, out = make_table(tmp_path / "pins.parquet"), tmp_path / "out"
    # No barrier between simulated processes: process 0 goes first and finds process 1's chunks missing.
    main = CountingTower(tower)
    with pytest.raises(RuntimeError, match="2 chunk\\(s\\) .* are missing"):
        embed_entity_table(main, table, out, entity_type="pin", chunk_size=5, state=FakeState(0, 2),
                           show_progress_bar=False)  # fmt: skip
    assert main.calls == 3  # chunks 0, 2, 4
    worker = CountingTower(tower)
    assert embed_entity_table(worker, table, out, entity_type="pin", chunk_size=5, state=FakeState(1, 2),
                              show_progress_bar=False) is None  # fmt: skip
    assert worker.calls == 2  # chunks 1, 3
    record = json.loads((out / "processes" / "1.json").read_text())
    assert record == {"process_index": 1, "num_processes": 2, "chunks": [1, 3], "embedded": [1, 3]}
    main = CountingTower(tower)
    out = embed_entity_table(main, table, out, entity_type="pin", chunk_size=5, state=FakeState(0, 2),
                             show_progress_bar=False)  # fmt: skip
    assert main.calls == 0
    np.testing.assert_allclose(EntityEmbeddings.load(out).embeddings, expected(tower, table), atol=1e-5)


def test_a_query_tower_is_refused(tiny_backbone_dir, tmp_path, capsys, monkeypatch):
    """The query tower is the usual wrong folder: one line says what it is and where it goes; no work starts."""
    monkeypatch.delenv("OMNISEARCHSAGE_DEBUG", raising=False)
    query_tower = OmniSearchSageQueryModel.from_backbone(tiny_backbone_dir, out_dim=8)
    query_tower.save_pretrained(tmp_path / "query_tower")
    table, out = make_table(tmp_path / "pins.parquet"), tmp_path / "out"
    argv = ["--entity-model", str(tmp_path / "query_tower"), "--table", str(table), "--entity-type", "pin",
            "--out", str(out), "--quiet"]  # fmt: skip
    capsys.readouterr()  # drop the save's progress bar
    assert embed_main(argv) == 2
    error = capsys.readouterr().err.splitlines()[0]
    assert error.startswith("omnisearchsage-embed: error: --entity-model needs an entity tower or ItemSage folder")
    assert str(tmp_path / "query_tower") in error and "'omnisearchsage_query' model" in error
    assert "omnisearchsage-serve --query-model" in error
    assert not out.exists()
    with pytest.raises(UsageError, match="needs an entity tower"):
        embed_main(argv + ["--debug"])
    argv[1] = str(tmp_path / "entity_towr")  # a typo is not tried as a Hub name
    assert embed_main(argv) == 2
    assert "entity_towr' is not a folder" in capsys.readouterr().err.splitlines()[0]
    with pytest.raises(ValueError, match="must be an entity tower or ItemSage model"):
        embed_entity_table(query_tower, table, out, entity_type="pin", state=FakeState(), show_progress_bar=False)


def test_cli_two_processes_split_the_chunks(tower, tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` on CPU: gloo, each process embeds its own chunks, and the
    merged output is byte for byte a one-process run's."""
    table = make_table(tmp_path / "pins.parquet", n=40)  # 6 chunks of 7 rows (the last has 5)
    tower.save_pretrained(tmp_path / "tower")
    # One thread each, so both runs compute every chunk the same way; no GPU, so the launch is a CPU one.
    # The datasets cache goes to an empty folder: the table is read through Arrow, so it must stay empty.
    datasets_cache = tmp_path / "datasets_cache"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "HF_DATASETS_CACHE": str(datasets_cache),
           "HF_HOME": str(tmp_path / "hf_home")}  # fmt: skip
    embed = ["-m", "omnisearchsage_hf.serving.cli", "embed", "--entity-model", str(tmp_path / "tower"),
             "--table", str(table), "--entity-type", "pin", "--chunk-size", "7", "--quiet"]  # fmt: skip
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    for command in (
        [*launch, *embed, "--out", str(tmp_path / "two")],
        [sys.executable, *embed, "--out", str(tmp_path / "one")],
    ):
        result = subprocess.run(command, env=env, timeout=300, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr

    assert not datasets_cache.exists() or not any(datasets_cache.rglob("*"))
    assert not (tmp_path / "hf_home" / "datasets").exists()
    records = [json.loads((tmp_path / "two" / "processes" / f"{rank}.json").read_text()) for rank in (0, 1)]
    assert [(r["num_processes"], r["embedded"]) for r in records] == [(2, [0, 2, 4]), (2, [1, 3, 5])]
    assert sorted(p.name for p in (tmp_path / "two" / "processes").iterdir()) == ["0.json", "1.json"]
    assert json.loads((tmp_path / "one" / "processes" / "0.json").read_text())["embedded"] == list(range(6))
    for name in ("embeddings.npy", "ids.json"):
        assert (tmp_path / "two" / name).read_bytes() == (tmp_path / "one" / name).read_bytes()
    np.testing.assert_allclose(EntityEmbeddings.load(tmp_path / "two").embeddings, expected(tower, table), atol=1e-5)

    # `python -m omnisearchsage_hf.serving.cli index` (the dispatcher `accelerate launch -m` also goes through).
    argv = ["index", "--embeddings", str(tmp_path / "two"), "--out", str(tmp_path / "index"), "--recall-queries", "20",
            "--quiet"]  # fmt: skip
    assert serving_main(argv) == 0
    assert json.loads((tmp_path / "index" / "index.json").read_text())["sizes"] == {"pin": 40}
