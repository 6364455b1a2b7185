"""Corrupted entity tables, embeddings folders and indexes: each case is either refused with an error that names the
file (and the field) and the fix, or recomputed to exactly what an intact run gives. No case may load or finish
silently with wrong output: every recomputation is compared with the tower's own `encode` of the table."""

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from omnisearchsage_hf.serving.ann_index import EntityIndex, build_entity_index
from omnisearchsage_hf.serving.batch_inference import EntityEmbeddings, embed_entity_table
from omnisearchsage_hf.serving.cli import embed_main, index_main

WORDS = ["copper", "sink", "red", "dress", "lamp", "wall", "art", "summer", "kitchen", "shoes"]
ROWS, CHUNK = 23, 5  # five chunks, the last of three rows
EMBED_FIX = "Run `omnisearchsage-embed` again with this --out folder"
INDEX_FIX = "Rebuild the index with `omnisearchsage-index`"
LOGGER = "omnisearchsage_hf.serving.batch_inference"


@pytest.fixture(scope="module")
def tower(make_entity_tower):
    return make_entity_tower(WORDS, oov_buckets=0, text_fields=["title"], hidden_dims=[32]).eval()


def write_table(path: Path, *, seed: int = 0, rows: int = ROWS, image_scale: float = 1.0, **columns) -> Path:
    """A pin table (id, title, 4-d image_embedding) with seeded content; ``columns`` replace or add columns
    (None drops one)."""
    rng = np.random.default_rng(seed)
    data = {
        "id": [f"pin{i}" for i in range(rows)],
        "title": [" ".join(rng.choice(WORDS, size=3)) for _ in range(rows)],
        "image_embedding": pa.array(
            list(image_scale * rng.standard_normal((rows, 4)).astype(np.float32)), pa.list_(pa.float32(), 4)
        ),
    }
    data.update(columns)
    pq.write_table(pa.table({name: value for name, value in data.items() if value is not None}), path)
    return path


def expected(tower, table: Path) -> np.ndarray:
    """``(rows, dim)``: the tower's `encode` of every row, read independently of batch inference."""
    rows = [{k: v for k, v in row.items() if k != "id"} for row in pq.read_table(table).to_pylist()]
    return tower.encode(rows, show_progress_bar=False)


def embed(tower, table: Path, out: Path, **kwargs) -> Path:
    return embed_entity_table(tower, table, out, entity_type="pin", chunk_size=CHUNK, show_progress_bar=False,
                              **kwargs)  # fmt: skip


def assert_output_is(tower, table: Path, out: Path) -> None:
    loaded = EntityEmbeddings.load(out)
    assert loaded.ids == pq.read_table(table, columns=["id"]).column("id").to_pylist()
    np.testing.assert_allclose(loaded.embeddings, expected(tower, table), atol=1e-5)


def refused(call: Callable, *needles: str, error: type[Exception] = ValueError) -> str:
    """Run ``call``; it must raise ``error`` whose message holds every needle (file, field, fix)."""
    with pytest.raises(error) as info:
        call()
    message = str(info.value)
    missing = [needle for needle in needles if needle not in message]
    assert not missing, f"{missing} not in: {message}"
    return message


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))


def rewrite_json(path: Path, edit: Callable) -> None:
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))


def chunk_files(out: Path) -> list[Path]:
    return sorted((out / "chunks").iterdir())


def interrupt(out: Path, keep: int = 2) -> None:
    """Leave ``out`` as a run killed after its first ``keep`` chunks: no manifest, the later chunks missing."""
    (out / "manifest.json").unlink()
    for path in chunk_files(out)[keep:]:
        path.unlink()


# ---------------------------------------------------------------- the matrix

CASES: dict[str, Callable] = {}


def case(function: Callable) -> Callable:
    CASES[function.__name__] = function
    return function


# Tables: content changed after a run (recomputed), or features the model cannot use (refused).


def recomputed_after(change: Callable[[Path, Path], None], tower, tmp_path: Path, caplog, warning: str) -> None:
    """Embed a table, ``change(table, out)``, embed again: the warning is logged and the output is the new truth."""
    table, out = write_table(tmp_path / "pins.parquet"), tmp_path / "out"
    embed(tower, table, out)
    change(table, out)
    embed(tower, table, out)
    assert warning in caplog.text
    assert_output_is(tower, table, out)


@case
def table_rewritten_same_ids(tower, tmp_path, caplog):
    recomputed_after(lambda table, _: write_table(table, seed=1), tower, tmp_path, caplog, "table_sha256 changed")


@case
def table_rewritten_with_old_mtime(tower, tmp_path, caplog):
    """Metadata would not see it: same ids, same row count, the modification time put back."""

    def rewrite(table, _):
        stat = table.stat()
        write_table(table, image_scale=-1.0)  # every image vector negated, titles equal
        os.utime(table, ns=(stat.st_atime_ns, stat.st_mtime_ns))

    recomputed_after(rewrite, tower, tmp_path, caplog, "table_sha256 changed")


@case
def table_grew(tower, tmp_path, caplog):
    recomputed_after(lambda table, _: write_table(table, rows=ROWS + 4), tower, tmp_path, caplog,
                     "the table_sha256, rows changed")  # fmt: skip


@case
def feature_columns_renamed(tower, tmp_path, caplog):
    table = write_table(tmp_path / "pins.parquet", title=None, image_embedding=None, name=["x"] * ROWS)
    refused(lambda: embed(tower, table, tmp_path / "out"), str(table), "none of the columns the model reads",
            "['title', 'image_embedding']", "['id', 'name']", "Rename the table's columns")  # fmt: skip
    assert not (tmp_path / "out").exists()


@case
def feature_columns_all_null(tower, tmp_path, caplog):
    table = write_table(tmp_path / "pins.parquet", title=pa.nulls(ROWS, pa.string()),
                        image_embedding=pa.nulls(ROWS, pa.list_(pa.float32(), 4)))  # fmt: skip
    refused(lambda: embed(tower, table, tmp_path / "out"), str(table), "none of the columns the model reads",
            "(['title', 'image_embedding'] null in every row)", "Rename")  # fmt: skip


@case
def feature_column_missing(tower, tmp_path, caplog):
    """A tower reads what it finds: the run goes on, a warning counts what is missing, and the output is the
    tower's embedding of rows without that feature."""
    table = write_table(tmp_path / "pins.parquet", image_embedding=None)
    embed(tower, table, tmp_path / "out")
    assert "lacks 1 of the 2 features the model reads: ['image_embedding']" in caplog.text
    assert_output_is(tower, table, tmp_path / "out")


@case
def feature_column_all_null(tower, tmp_path, caplog):
    table = write_table(tmp_path / "pins.parquet", image_embedding=pa.nulls(ROWS, pa.list_(pa.float32(), 4)))
    embed(tower, table, tmp_path / "out")
    assert f"1 of the 2 features the model reads are null in all {ROWS} rows: ['image_embedding']" in caplog.text
    assert_output_is(tower, table, tmp_path / "out")


def dense_values(value: float, rows: list[int]) -> pa.Array:
    vectors = np.random.default_rng(0).standard_normal((ROWS, 4)).astype(np.float32)
    vectors[rows] = value
    return pa.array(list(vectors), pa.list_(pa.float32(), 4))


@case
def dense_values_1e25(tower, tmp_path, caplog):
    """Finite in float32 but overflowing inside the tower: refused, naming exactly the two rows' ids."""
    table = write_table(tmp_path / "pins.parquet", image_embedding=dense_values(1e25, [7, 8]))
    refused(lambda: embed(tower, table, tmp_path / "out"), str(table),
            "2 row(s) cannot be embedded: ids ['pin7', 'pin8']", "Fix or drop those rows")  # fmt: skip
    # Chunk 0 was finished before the bad rows' chunk: kept; nothing of the bad chunk was written.
    assert [p.name[:6] for p in chunk_files(tmp_path / "out")] == ["000000"]


@case
def dense_values_3e38(tower, tmp_path, caplog):
    table = write_table(tmp_path / "pins.parquet", image_embedding=dense_values(3e38, [0]))
    refused(lambda: embed(tower, table, tmp_path / "out"), "1 row(s) cannot be embedded: ids ['pin0']",
            "Fix or drop those rows")  # fmt: skip
    assert not (tmp_path / "out" / "manifest.json").exists()


@case
def dense_values_nan(tower, tmp_path, caplog):
    table = write_table(tmp_path / "pins.parquet", image_embedding=dense_values(np.nan, [12, 13, 14, 20, 21, 22]))
    refused(lambda: embed(tower, table, tmp_path / "out"), str(table),
            "3 row(s) cannot be embedded: ids ['pin12', 'pin13', 'pin14']", "image_embedding")  # fmt: skip
    assert not (tmp_path / "out" / "manifest.json").exists()


@case
def duplicate_ids(tower, tmp_path, caplog):
    table = write_table(tmp_path / "pins.parquet", id=["pin0"] * 2 + [f"pin{i}" for i in range(2, ROWS)])
    refused(lambda: embed(tower, table, tmp_path / "out"), "`id` values must be unique; 'pin0' repeats")


# Interrupted runs whose finished chunks were damaged or replaced before the resume: recomputed.


def damaged_chunk(damage: Callable[[Path], None], *, keep: int = 2) -> Callable[[Path, Path], None]:
    """A change for ``recomputed_after``: the run killed after ``keep`` chunks, then ``damage(out)``."""

    def change(_, out):
        interrupt(out, keep)
        damage(out)

    return change


@case
def chunk_truncated(tower, tmp_path, caplog):
    def truncate(out):
        first = chunk_files(out)[0]
        first.write_bytes(first.read_bytes()[:100])

    recomputed_after(damaged_chunk(truncate), tower, tmp_path, caplog, "000000-")
    assert "is not an intact chunk of this run (corrupt or copied in); recomputing it" in caplog.text


@case
def chunk_byte_flipped(tower, tmp_path, caplog):
    flip = damaged_chunk(lambda out: flip_byte(chunk_files(out)[1], -3))  # inside the last vector
    recomputed_after(flip, tower, tmp_path, caplog, "is not an intact chunk of this run")


@case
def chunk_of_another_table(tower, tmp_path, caplog):
    """A chunk file copied in from another table's output folder, under its own (valid) name."""
    other = write_table(tmp_path / "other.parquet", seed=5)
    embed(tower, other, tmp_path / "other")
    copy = damaged_chunk(lambda out: shutil.copy(chunk_files(tmp_path / "other")[0], out / "chunks"), keep=0)
    recomputed_after(copy, tower, tmp_path, caplog, "is not an intact chunk of this run")


@case
def plan_invalid_json(tower, tmp_path, caplog):
    table, out = write_table(tmp_path / "pins.parquet"), tmp_path / "out"
    embed(tower, table, out)
    (out / "plan.json").write_text('{"table": ')
    refused(lambda: embed(tower, table, out), str(out / "plan.json"), "is not valid JSON", "Delete this folder")


# Finished embeddings folders damaged afterwards: loading refuses; running the command again repairs.


def finished(tower, tmp_path) -> tuple[Path, Path]:
    table, out = write_table(tmp_path / "pins.parquet"), tmp_path / "out"
    embed(tower, table, out)
    return table, out


def refused_then_repaired(tower, table: Path, out: Path, *needles: str) -> None:
    refused(lambda: EntityEmbeddings.load(out), *needles)
    embed(tower, table, out)
    assert_output_is(tower, table, out)


@case
def embeddings_truncated(tower, tmp_path, caplog):
    table, out = finished(tower, tmp_path)
    path = out / "embeddings.npy"
    path.write_bytes(path.read_bytes()[:-64])
    refused_then_repaired(tower, table, out, str(path), "truncated, edited or replaced", EMBED_FIX)
    assert "Merging its chunks again" in caplog.text


@case
def embeddings_byte_flipped(tower, tmp_path, caplog):
    table, out = finished(tower, tmp_path)
    flip_byte(out / "embeddings.npy", -10)
    refused_then_repaired(tower, table, out, str(out / "embeddings.npy"), EMBED_FIX)


@case
def embeddings_of_another_table(tower, tmp_path, caplog):
    """Same shape, other vectors: only the recorded hash can tell."""
    table, out = finished(tower, tmp_path)
    other = write_table(tmp_path / "other.parquet", seed=7)
    embed(tower, other, tmp_path / "other")
    shutil.copy(tmp_path / "other" / "embeddings.npy", out / "embeddings.npy")
    refused_then_repaired(tower, table, out, str(out / "embeddings.npy"), EMBED_FIX)


@case
def embeddings_ids_permuted(tower, tmp_path, caplog):
    table, out = finished(tower, tmp_path)
    rewrite_json(out / "ids.json", lambda ids: ids[1:] + ids[:1])
    refused_then_repaired(tower, table, out, str(out / "ids.json"), EMBED_FIX)


@case
def embeddings_ids_invalid_json(tower, tmp_path, caplog):
    table, out = finished(tower, tmp_path)
    (out / "ids.json").write_text('["pin0", ')
    refused_then_repaired(tower, table, out, str(out / "ids.json"), EMBED_FIX)


@case
def embeddings_manifest_invalid_json(tower, tmp_path, caplog):
    table, out = finished(tower, tmp_path)
    (out / "manifest.json").write_text("{")
    refused(lambda: EntityEmbeddings.load(out), str(out / "manifest.json"), "is not valid JSON", "run that command")


@case
def embeddings_manifest_rows_edited(tower, tmp_path, caplog):
    table, out = finished(tower, tmp_path)
    rewrite_json(out / "manifest.json", lambda manifest: {**manifest, "rows": ROWS - 1})
    refused(lambda: EntityEmbeddings.load(out), str(out), "is inconsistent", f"ids.json has {ROWS}", EMBED_FIX)


# Index folders: every file checked before it is parsed.


def saved_index(tower, tmp_path) -> Path:
    _, out = finished(tower, tmp_path)
    loaded = EntityEmbeddings.load(out)
    index = build_entity_index({"pin": (loaded.ids, loaded.embeddings)}, recall_queries=0)
    return index.save(tmp_path / "index")


def edit_index_file(folder: Path, name: str, edit: Callable[[bytes], bytes], *, rehash: bool) -> None:
    """Edit one index file; with ``rehash``, also record the new file's hash, as a careful forger would."""
    path = folder / name
    path.write_bytes(edit(path.read_bytes()))
    if rehash:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        rewrite_json(folder / "index.json", lambda manifest: {**manifest, "files": {**manifest["files"], name: digest}})


@case
def index_ids_permuted(tower, tmp_path, caplog):
    folder = saved_index(tower, tmp_path)
    rewrite_json(folder / "pin.ids.json", lambda ids: ids[::-1])
    refused(lambda: EntityIndex.load(folder), str(folder / "pin.ids.json"), "truncated, edited or replaced", INDEX_FIX)


@case
def index_vector_bytes_flipped(tower, tmp_path, caplog):
    folder = saved_index(tower, tmp_path)
    flip_byte(folder / "pin.faiss", -20)  # the flat vectors come last: a float of the last vector
    refused(lambda: EntityIndex.load(folder), str(folder / "pin.faiss"), INDEX_FIX)


@case
def index_faiss_truncated(tower, tmp_path, caplog):
    folder = saved_index(tower, tmp_path)
    edit_index_file(folder, "pin.faiss", lambda data: data[: len(data) // 2], rehash=True)
    refused(lambda: EntityIndex.load(folder), str(folder / "pin.faiss"), "is not a faiss index", INDEX_FIX)


@case
def index_type_names_a_path_outside(tower, tmp_path, caplog):
    folder = saved_index(tower, tmp_path)
    rewrite_json(folder / "index.json", lambda m: {**m, "sizes": {"../outside": ROWS}})
    refused(lambda: EntityIndex.load(folder), str(folder / "index.json"), "'sizes'", "'../outside'", INDEX_FIX)


@case
def index_files_name_an_absolute_path(tower, tmp_path, caplog):
    folder = saved_index(tower, tmp_path)
    rewrite_json(folder / "index.json", lambda m: {**m, "files": {**m["files"], "/etc/passwd": "0" * 64}})
    refused(lambda: EntityIndex.load(folder), str(folder / "index.json"), "'files'", "/etc/passwd", INDEX_FIX)


@case
def index_file_symlinked_outside(tower, tmp_path, caplog):
    """Even the right bytes are refused when they live outside the folder."""
    folder = saved_index(tower, tmp_path)
    outside = tmp_path / "elsewhere.faiss"
    shutil.move(folder / "pin.faiss", outside)
    (folder / "pin.faiss").symlink_to(outside)
    refused(lambda: EntityIndex.load(folder), str(folder / "pin.faiss"), "leads out of the index folder", INDEX_FIX)


@case
def index_manifest_invalid_json(tower, tmp_path, caplog):
    folder = saved_index(tower, tmp_path)
    (folder / "index.json").write_text('{"dim": 8,')
    refused(lambda: EntityIndex.load(folder), str(folder / "index.json"), "is not valid JSON")


@case
def index_ids_invalid_json(tower, tmp_path, caplog):
    folder = saved_index(tower, tmp_path)
    edit_index_file(folder, "pin.ids.json", lambda data: data[:-5], rehash=True)
    refused(lambda: EntityIndex.load(folder), str(folder / "pin.ids.json"), "is not valid JSON", INDEX_FIX)


@case
def index_ids_count_mismatch(tower, tmp_path, caplog):
    folder = saved_index(tower, tmp_path)
    edit_index_file(folder, "pin.ids.json", lambda data: json.dumps(json.loads(data)[:-1]).encode(), rehash=True)
    refused(lambda: EntityIndex.load(folder), str(folder), f"has {ROWS - 1} ids", INDEX_FIX)


@case
def index_manifest_field_wrong_type(tower, tmp_path, caplog):
    folder = saved_index(tower, tmp_path)
    rewrite_json(folder / "index.json", lambda m: {**m, "dim": "8"})
    refused(lambda: EntityIndex.load(folder), str(folder / "index.json"), "`dim` must be a positive int", INDEX_FIX)


@case
def index_built_from_nan_vectors(tower, tmp_path, caplog):
    vectors = np.eye(4, dtype=np.float32)
    vectors[[1, 3], 0] = np.nan
    refused(lambda: build_entity_index({"pin": (["a", "b", "c", "d"], vectors)}, recall_queries=0),
            "entity type 'pin'", "2 row(s): ids ['b', 'd']", "Re-embed")  # fmt: skip


@pytest.mark.parametrize("name", sorted(CASES))
def test_corruption_is_refused_or_recomputed(name, tower, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger=LOGGER)
    CASES[name](tower, tmp_path, caplog)


def test_the_matrix_is_large_enough():
    assert len(CASES) >= 15


# ---------------------------------------------------------------- the two scenarios of the issue, end to end


def test_rewriting_the_table_in_place_and_rerunning_the_command_recomputes(tower, tmp_path, caplog, capsys):
    """`omnisearchsage-embed`, the table rewritten in place with the same ids, the command run again: exit 0 and
    the new table's embeddings (it used to return the old ones)."""
    tower.save_pretrained(tmp_path / "tower")
    table, out = write_table(tmp_path / "pins.parquet"), tmp_path / "out"
    argv = ["--entity-model", str(tmp_path / "tower"), "--table", str(table), "--entity-type", "pin",
            "--out", str(out), "--chunk-size", str(CHUNK), "--quiet"]  # fmt: skip
    assert embed_main(argv) == 0
    before = np.array(EntityEmbeddings.load(out).embeddings)
    write_table(table, seed=3)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert embed_main(argv) == 0
    assert [r.getMessage() for r in caplog.records if r.name == LOGGER] == [
        f"{str(out)!r}: the table_sha256 changed since its chunks were computed; recomputing every chunk."
    ]
    assert_output_is(tower, table, out)
    assert not np.allclose(EntityEmbeddings.load(out).embeddings, before)


@pytest.mark.parametrize("change", ["table", "model"])
def test_a_resumed_run_never_mixes_old_and_new_chunks(change, tower, make_entity_tower, tmp_path, caplog):
    """Killed after two of five chunks; the table (or the model) changes; the resumed run recomputes every chunk,
    so each row is the new table's (model's) embedding: none is left from before."""
    table, out = write_table(tmp_path / "pins.parquet"), tmp_path / "out"
    embed(tower, table, out)
    old = np.array(EntityEmbeddings.load(out).embeddings)
    interrupt(out)
    resumed_with = tower
    if change == "table":
        write_table(table, seed=4)
    else:
        resumed_with = make_entity_tower(WORDS, oov_buckets=0, text_fields=["title"], hidden_dims=[32], seed=9).eval()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        embed(resumed_with, table, out)
    assert f"the {'table_sha256' if change == 'table' else 'model'} changed" in caplog.text
    assert_output_is(resumed_with, table, out)
    assert not np.isclose(EntityEmbeddings.load(out).embeddings, old, atol=1e-5).all(axis=1).any()


def error_lines(err: str) -> list[str]:
    """The command's error lines (a model load's progress bar may come first)."""
    return [line for line in err.splitlines() if ": error: " in line]


def test_commands_report_corruption_in_one_line(tower, tmp_path, capsys, monkeypatch):
    """Errors reach the user through the commands' one-line reporting: the file and the fix, exit status 2."""
    monkeypatch.delenv("OMNISEARCHSAGE_DEBUG", raising=False)
    tower.save_pretrained(tmp_path / "tower")
    table = write_table(tmp_path / "pins.parquet", title=None, image_embedding=None, name=["x"] * ROWS)
    argv = ["--entity-model", str(tmp_path / "tower"), "--table", str(table), "--entity-type", "pin",
            "--out", str(tmp_path / "out"), "--quiet"]  # fmt: skip
    capsys.readouterr()
    assert embed_main(argv) == 2
    (error,) = error_lines(capsys.readouterr().err)
    assert error.startswith(f"omnisearchsage-embed: error: Entity table {str(table)!r} has none of the columns")

    _, out = finished(tower, tmp_path)
    flip_byte(out / "embeddings.npy", -1)
    assert index_main(["--embeddings", str(out), "--out", str(tmp_path / "index"), "--quiet"]) == 2
    (error,) = error_lines(capsys.readouterr().err)
    assert error.startswith(f"omnisearchsage-index: error: {str(out / 'embeddings.npy')!r} is not the file")
    assert EMBED_FIX in error and not (tmp_path / "index").exists()
