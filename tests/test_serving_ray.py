"""Batch inference on Ray Data: the same output folder as the single-machine engine (same ids, order, manifest,
vectors within 1e-6), resuming from that engine's chunks, the same refusals, and a clear error without Ray.

Runs on a local Ray of 2 CPUs, started once for the module."""

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from omnisearchsage_hf.serving.batch_inference import EntityEmbeddings, embed_entity_table
from omnisearchsage_hf.serving.cli import embed_main
from omnisearchsage_hf.serving.cli import main as serving_main
from omnisearchsage_hf.serving.ray_inference import RAY_EXTRA, embed_entity_table_with_ray

pytest.importorskip("ray.data", reason=f"the Ray engine needs the ray extra: {RAY_EXTRA}")

WORDS = ["copper", "sink", "red", "dress", "lamp", "wall", "art", "summer", "kitchen", "shoes"]
# Two actors of half a CPU each leave one of the two CPUs to Ray Data's readers.
POOL = {"num_actors": 2, "num_cpus_per_actor": 0.5}


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def tower(make_entity_tower):
    return make_entity_tower(WORDS, oov_buckets=0, text_fields=["title"], hidden_dims=[32]).eval()


def pins(first: int, n: int, image: np.ndarray | None = None) -> pa.Table:
    """Pins ``pin<first>`` … with seeded titles and 4-d image embeddings (``image`` replaces them)."""
    rng = np.random.default_rng(first)
    image = rng.standard_normal((n, 4)).astype(np.float32) if image is None else image
    return pa.table(
        {
            "id": [f"pin{i}" for i in range(first, first + n)],
            "title": [" ".join(rng.choice(WORDS, size=3)) for _ in range(n)],
            "image_embedding": pa.array(list(image), pa.list_(pa.float32(), 4)),
        }
    )


def split_table(folder: Path) -> Path:
    """40 pins in four parquet files whose sorted names are not their numeric order (part-10 before part-2)."""
    folder.mkdir()
    for part, (first, n) in zip([0, 1, 10, 2], [(0, 9), (9, 12), (21, 6), (27, 13)], strict=True):
        pq.write_table(pins(first, n), folder / f"part-{part}.parquet")
    return folder


def test_ray_output_equals_the_single_machine_output_and_resumes_its_chunks(tower, tmp_path):
    """Blocks of 5 rows over two actors, chunks of 7: same ids in the same order, same manifest (fingerprints,
    counts), vectors within 1e-6; `omnisearchsage-index` takes the folder. Then a single-machine run killed after
    some chunks is finished by the Ray engine, which embeds only the missing chunks."""
    table = split_table(tmp_path / "pins")
    local = embed_entity_table(tower, table, tmp_path / "local", entity_type="pin", chunk_size=7,
                               show_progress_bar=False)  # fmt: skip
    out = embed_entity_table_with_ray(tower, table, tmp_path / "ray", entity_type="pin", chunk_size=7,
                                      rows_per_call=5, show_progress_bar=False, **POOL)  # fmt: skip
    expected, got = EntityEmbeddings.load(local), EntityEmbeddings.load(out)
    order = pq.read_table(table, columns=["id"]).column("id").to_pylist()
    assert got.ids == expected.ids == order and order[21] == "pin21" and order[27] == "pin27"  # part-10 3rd
    assert got.entity_type == "pin"
    np.testing.assert_allclose(got.embeddings, expected.embeddings, atol=1e-6, rtol=0)
    assert (out / "ids.json").read_bytes() == (local / "ids.json").read_bytes()
    manifests = [json.loads((folder / "manifest.json").read_text()) for folder in (local, out)]
    assert manifests[0]["chunks"] == 6 and manifests[0]["table"] == str(table.resolve())
    assert {k: v for k, v in manifests[1].items() if k != "files"} == {
        k: v for k, v in manifests[0].items() if k != "files"
    }
    assert sorted(p.name[:6] for p in (out / "chunks").iterdir()) == [f"{c:06d}" for c in range(6)]
    argv = ["index", "--embeddings", str(out), "--out", str(tmp_path / "index"), "--recall-queries", "10", "--quiet"]
    assert serving_main(argv) == 0
    assert json.loads((tmp_path / "index" / "index.json").read_text())["sizes"] == {"pin": 40}

    # The single-machine run "killed" after chunks 0, 1 and 4: the Ray engine computes 2, 3 and 5 only.
    (local / "manifest.json").unlink()
    for path in (local / "chunks").iterdir():
        if int(path.name[:6]) in (2, 3, 5):
            path.unlink()
    kept = {p.name: p.stat().st_mtime_ns for p in (local / "chunks").iterdir()}
    embed_entity_table_with_ray(tower, table, local, entity_type="pin", chunk_size=7, rows_per_call=5,
                                show_progress_bar=False, **POOL)  # fmt: skip
    record = json.loads((local / "processes" / "0.json").read_text())
    assert record == {"process_index": 0, "num_processes": 1, "chunks": list(range(6)), "embedded": [2, 3, 5]}
    assert all((local / "chunks" / name).stat().st_mtime_ns == mtime for name, mtime in kept.items())
    resumed = EntityEmbeddings.load(local)
    assert resumed.ids == order
    np.testing.assert_allclose(resumed.embeddings, expected.embeddings, atol=1e-6, rtol=0)


def test_rows_that_ray_returns_in_any_order_land_in_their_own_rows(tower, tmp_path, monkeypatch):
    """Ray Data may return blocks out of file order (its parquet reader lists files in parallel): rows handed
    to the driver one by one in a shuffled order give the single-machine output; a row returned twice, or rows
    missing, are errors that write nothing of the chunk concerned."""
    from omnisearchsage_hf.serving import ray_inference

    table = split_table(tmp_path / "pins")
    local = embed_entity_table(tower, table, tmp_path / "local", entity_type="pin", chunk_size=7,
                               show_progress_bar=False)  # fmt: skip
    returned = ray_inference._embedded

    def rows_shuffled(*args):
        rows = [{key: value[i : i + 1] for key, value in batch.items()} for batch in returned(*args)
                for i in range(len(batch["id"]))]  # fmt: skip
        np.random.default_rng(0).shuffle(rows)
        assert [row["id"][0] for row in rows[:3]] != ["pin0", "pin1", "pin2"]
        yield from rows

    monkeypatch.setattr(ray_inference, "_embedded", rows_shuffled)
    out = embed_entity_table_with_ray(tower, table, tmp_path / "ray", entity_type="pin", chunk_size=7,
                                      rows_per_call=5, show_progress_bar=False, **POOL)  # fmt: skip
    expected, got = EntityEmbeddings.load(local), EntityEmbeddings.load(out)
    assert got.ids == expected.ids
    np.testing.assert_allclose(got.embeddings, expected.embeddings, atol=1e-6, rtol=0)

    def first_row_twice(*args):
        batches = list(returned(*args))
        yield {key: value[:1] for key, value in batches[0].items()}
        yield from batches

    def last_row_lost(*args):
        batches = list(returned(*args))
        yield from batches[:-1]
        yield {key: value[:-1] for key, value in batches[-1].items()}

    # Which chunk the doubled or lost row is in depends on the order Ray returns blocks in: read it off the error.
    for name, returns, pattern in [
        ("twice", first_row_twice, r"returned a row of chunk (\d) twice; nothing of that chunk was written"),
        ("lost", last_row_lost, r"fewer rows than the table has left to embed \(chunks \[(\d)\] incomplete\)"),
    ]:
        monkeypatch.setattr(ray_inference, "_embedded", returns)
        with pytest.raises(RuntimeError, match=pattern) as error:
            embed_entity_table_with_ray(tower, table, tmp_path / name, entity_type="pin", chunk_size=7,
                                        rows_per_call=5, show_progress_bar=False, **POOL)  # fmt: skip
        chunk = int(re.search(pattern, str(error.value)).group(1))
        assert not list((tmp_path / name / "chunks").glob(f"{chunk:06d}*"))
        assert not (tmp_path / name / "manifest.json").exists()


def test_rows_that_cannot_be_embedded_are_named_as_the_single_machine_engine_names_them(tower, tmp_path):
    image = np.random.default_rng(0).standard_normal((23, 4)).astype(np.float32)
    image[[7, 8]] = np.nan
    table = tmp_path / "pins.parquet"
    pq.write_table(pins(0, 23, image), table)
    with pytest.raises(ValueError) as local:
        embed_entity_table(tower, table, tmp_path / "local", entity_type="pin", show_progress_bar=False)
    with pytest.raises(ValueError) as remote:
        embed_entity_table_with_ray(tower, table, tmp_path / "ray", entity_type="pin", show_progress_bar=False)
    assert "2 row(s) cannot be embedded: ids ['pin7', 'pin8']" in str(remote.value)
    assert str(remote.value) == str(local.value)
    assert not (tmp_path / "ray" / "manifest.json").exists()


def test_refusals_before_any_work(tower, tmp_path):
    """A table without the tower's features (the single-machine message), a format Ray Data is not given, and an
    actor pool this 2-CPU, GPU-less Ray cannot hold."""
    renamed = tmp_path / "renamed.parquet"
    pq.write_table(pins(0, 5).rename_columns(["id", "name", "picture"]), renamed)
    with pytest.raises(ValueError) as local:
        embed_entity_table(tower, renamed, tmp_path / "local", entity_type="pin", show_progress_bar=False)
    with pytest.raises(ValueError) as remote:
        embed_entity_table_with_ray(tower, renamed, tmp_path / "ray", entity_type="pin", **POOL)
    assert "none of the columns the model reads" in str(remote.value) and str(remote.value) == str(local.value)

    jsonl = tmp_path / "pins.jsonl"
    jsonl.write_text('{"id": "pin0", "title": "red lamp"}\n')
    with pytest.raises(
        ValueError, match=r"reads parquet .* not '\.jsonl' files\. Convert it to parquet .*--engine local"
    ):
        embed_entity_table_with_ray(tower, jsonl, tmp_path / "ray", entity_type="pin", **POOL)

    table = tmp_path / "pins.parquet"
    pq.write_table(pins(0, 5), table)
    with pytest.raises(ValueError, match=r"2 actors x 1 CPU reserve 2 of the Ray cluster's 2 CPUs.*--num-actors"):
        embed_entity_table_with_ray(tower, table, tmp_path / "ray", entity_type="pin", num_actors=2)
    with pytest.raises(ValueError, match=r"2 actors x 1 GPU need 2 GPUs; the Ray cluster has 0.*--num-gpus-per-actor"):
        embed_entity_table_with_ray(tower, table, tmp_path / "ray", entity_type="pin", num_gpus_per_actor=1, **POOL)
    assert not (tmp_path / "ray").exists()


def test_without_ray_the_package_imports_and_the_engine_names_the_extra():
    script = (
        "import sys\n"
        "sys.modules['ray'] = None  # as if Ray were not installed\n"
        "from omnisearchsage_hf.serving import ray_inference\n"
        "try:\n"
        "    ray_inference.import_ray()\n"
        "except ImportError as error:\n"
        "    print(error)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    assert "The Ray engine of batch inference needs Ray Data" in result.stdout
    assert 'pip install "omnisearchsage-hf[ray]"' in result.stdout


def test_the_embed_command_runs_either_engine_into_the_same_folder(tower, tmp_path, capsys):
    """`omnisearchsage-embed --engine ray` writes what `--engine local` writes; a Ray flag alone is refused."""
    tower.save_pretrained(tmp_path / "tower")
    table = split_table(tmp_path / "pins")
    argv = ["--entity-model", str(tmp_path / "tower"), "--table", str(table), "--entity-type", "pin",
            "--chunk-size", "7", "--quiet"]  # fmt: skip
    assert embed_main([*argv, "--out", str(tmp_path / "local")]) == 0
    ray_flags = ["--engine", "ray", "--num-actors", "2", "--num-cpus-per-actor", "0.5", "--rows-per-call", "5"]
    assert embed_main([*argv, "--out", str(tmp_path / "ray"), *ray_flags]) == 0
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [p["shape"] for p in printed] == [[40, 8], [40, 8]] and printed[1]["out"] == str(tmp_path / "ray")
    local, ray_out = EntityEmbeddings.load(tmp_path / "local"), EntityEmbeddings.load(tmp_path / "ray")
    assert ray_out.ids == local.ids
    np.testing.assert_allclose(ray_out.embeddings, local.embeddings, atol=1e-6, rtol=0)

    assert embed_main([*argv, "--out", str(tmp_path / "other"), "--num-actors", "2"]) == 2
    error = capsys.readouterr().err
    assert "omnisearchsage-embed: error: --num-actors configure the Ray engine: add --engine ray" in error
    assert embed_main([*argv, "--out", str(tmp_path / "other"), "--engine", "ray", "--num-actors", "2"]) == 2
    assert "2 actors x 1 CPU reserve 2 of the Ray cluster's 2 CPUs" in capsys.readouterr().err
    assert not (tmp_path / "other").exists()
