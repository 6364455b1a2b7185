"""Saved folders verify themselves: a matrix of corrupted folders, none of which may load with wrong output.

Each case copies an intact saved folder (query tower, entity tower, ItemSage, or a tokenizer alone),
corrupts it the way files get corrupted in practice (a vocabulary line lost, a weight byte flipped, a
download cut short, a field edited by hand), then loads and embeds. Either that raises an error naming
the file (and the field, where there is one) and saying how to fix it, or, for a case that is provably
harmless, it gives exactly the intact folder's output. Loading is never allowed to succeed with other
output: every load that succeeds is compared with the intact folder.

To add a case, append a ``Case(kind, name, corrupt, match)`` to ``CASES``; ``match=None`` declares it
harmless. Corruptions are small composable functions of the folder.

The second half does the same for the folders serving reads and writes: entity tables (changed after a
run: recomputed; unusable: refused), embeddings folders and indexes (refused, naming the file and the fix).
"""

import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from omnisearchsage_hf import ItemSageConfig, ItemSageModel, OmniSearchSageQueryModel, build_vocab
from omnisearchsage_hf.modeling.saved_folder import CHECKSUMS_FILE, verify_folder
from omnisearchsage_hf.serving.ann_index import EntityIndex, build_entity_index
from omnisearchsage_hf.serving.batch_inference import EntityEmbeddings, embed_entity_table
from omnisearchsage_hf.serving.cli import embed_main, index_main

QUERIES = ["antique copper bathroom sink", "red dress", "日本語", ""]
PRODUCTS = [
    {"title": "linen throw pillow", "brand": "Acme", "image_embeddings": [[0.5] * 6, [1.0, 0, 0, 0, 0, 2.0]]},
    {"title": "copper kettle", "description": "北京 欢迎你"},
    {"brand": "مرحبا", "image_embeddings": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]},
]
ITEMSAGE_CORPUS = ["linen throw pillow", "copper kettle", "Acme", "red summer dress", "北京 欢迎你", "مرحبا"]
# Every error must say how to fix it.
FIX = r"(?i)re-download|save (it|the model|the tokenizer) again|build_vocab"

Corruption = Callable[[Path], None]


def changed(name: str) -> str:
    """The error for a file that differs from what was saved (checksums.json's or the tokenizer's own)."""
    return rf"{re.escape(name)}.*(was|were) saved"


# ---------------------------------------------------------------- corruptions


def lines(name: str, edit: Callable[[list[str]], list[str]]) -> Corruption:
    def corrupt(folder: Path) -> None:
        path = folder / name
        path.write_text("".join(line + "\n" for line in edit(path.read_text(encoding="utf-8").splitlines())))

    return corrupt


def drop_last_line(name: str) -> Corruption:
    return lines(name, lambda rows: rows[:-1])


def swap_lines(name: str, i: int = 0, j: int = 1) -> Corruption:
    def swap(rows: list[str]) -> list[str]:
        rows[i], rows[j] = rows[j], rows[i]
        return rows

    return lines(name, swap)


def duplicate_first_line(name: str) -> Corruption:
    return lines(name, lambda rows: [rows[0], *rows[:-1]])


def append_line(name: str, line: str) -> Corruption:
    return lines(name, lambda rows: [*rows, line])


def write(name: str, content: str | bytes) -> Corruption:
    def corrupt(folder: Path) -> None:
        (folder / name).write_bytes(content if isinstance(content, bytes) else content.encode())

    return corrupt


def delete(name: str) -> Corruption:
    def corrupt(folder: Path) -> None:
        path = folder / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()

    return corrupt


def crlf(name: str) -> Corruption:
    def corrupt(folder: Path) -> None:
        path = folder / name
        path.write_bytes(path.read_bytes().replace(b"\n", b"\r\n"))

    return corrupt


def edit_json(name: str, edit: Callable[[dict], None]) -> Corruption:
    def corrupt(folder: Path) -> None:
        path = folder / name
        data = json.loads(path.read_text())
        edit(data)
        path.write_text(json.dumps(data, indent=2))

    return corrupt


def set_field(name: str, key: str, value) -> Corruption:
    return edit_json(name, lambda data: data.__setitem__(key, value))


def set_hash_entry(key: str, index: int, change: Callable[[int], int]) -> Corruption:
    return edit_json("config.json", lambda data: data[key].__setitem__(index, change(data[key][index])))


def flip_byte(name: str, from_end: int = 17) -> Corruption:
    """Flip one bit of a byte ``from_end`` bytes before the end (tensor data, past the header)."""

    def corrupt(folder: Path) -> None:
        data = bytearray((folder / name).read_bytes())
        data[-from_end] ^= 0x10
        (folder / name).write_bytes(bytes(data))

    return corrupt


def truncate(name: str, keep: float = 0.6) -> Corruption:
    def corrupt(folder: Path) -> None:
        data = (folder / name).read_bytes()
        (folder / name).write_bytes(data[: int(len(data) * keep)])

    return corrupt


def overwrite_header(name: str, junk: bytes = b"\xff" * 16) -> Corruption:
    def corrupt(folder: Path) -> None:
        data = (folder / name).read_bytes()
        (folder / name).write_bytes(junk + data[len(junk) :])

    return corrupt


def forget_checksums(tokenizer_config: dict) -> None:
    """What a tokenizer saved before vocabulary checksums has in its tokenizer_config.json: none."""
    del tokenizer_config["vocabulary_checksums"]


def legacy(*corruptions: Corruption) -> Corruption:
    """A folder saved before checksums (no checksums.json), then ``corruptions``: the checks that remain."""
    return both(delete(CHECKSUMS_FILE), *corruptions)


def both(*corruptions: Corruption) -> Corruption:
    def corrupt(folder: Path) -> None:
        for corruption in corruptions:
            corruption(folder)

    return corrupt


# ---------------------------------------------------------------- the matrix


@dataclass(frozen=True)
class Case:
    """One corrupted folder: ``kind`` of folder, what is done to it, and the error it must raise.

    ``match`` is a regex the error message must match (name the file, and the field where there is one);
    None declares the corruption harmless: the folder must load and embed exactly as the intact one.
    The message must also say how to fix it (``FIX``), unless ``says_fix`` is False.
    """

    kind: str
    name: str
    corrupt: Corruption
    match: str | None
    # False only where transformers itself raises before any code of the package runs (AutoConfig
    # parsing config.json): its message names the file but suggests no fix.
    says_fix: bool = True


def entity_like_cases(kind: str) -> list[Case]:
    """Cases shared by the two towers that read n-gram vocabularies (entity tower and ItemSage)."""
    return [
        Case(kind, "unigrams_one_line_short", drop_last_line("unigrams.txt"), changed("unigrams.txt")),
        Case(kind, "trigrams_two_lines_swapped", swap_lines("trigrams.txt"), changed("trigrams.txt")),
        Case(kind, "unigrams_empty", write("unigrams.txt", ""), changed("unigrams.txt")),
        Case(kind, "bigrams_deleted", delete("bigrams.txt"), r"'bigrams\.txt' is missing"),
        Case(kind, "hash_a_edited_in_range", set_hash_entry("hash_a", 0, lambda a: a + 1), changed("config.json")),
        Case(kind, "hash_b_edited_in_range", set_hash_entry("hash_b", 1, lambda b: b - 7), changed("config.json")),
        Case(kind, "hash_p_not_prime", set_hash_entry("hash_p", 0, lambda p: p - 1), r"config\.json.*prime p"),
        Case(kind, "weights_byte_flipped", flip_byte("model.safetensors"), changed("model.safetensors")),
        Case(kind, "weights_truncated", truncate("model.safetensors"), r"model\.safetensors.*truncated"),
        Case(kind, "weights_header_corrupt", overwrite_header("model.safetensors"), r"model\.safetensors.*header"),
        Case(
            kind,
            Case(kind, "config_invalid_json", write("config.json", "{"), r"config\.json.*valid JSON", says_fix=False),
            write("config.json", '{"vocab_size": 9'),
            r"config\.json.*not a valid JSON",
            says_fix=False,
        ),
        Case(kind, "config_text_fields_int", set_field("config.json", "text_fields", 5), r"config\.json.*text_fields"),
        Case(kind, "config_vocab_size_str", set_field("config.json", "vocab_size", "96"), r"config\.json.*vocab_size"),
        Case(kind, "tokenizer_config_invalid_json", write("tokenizer_config.json", "{"), r"tokenizer_config\.json"),
        Case(kind, "oov_buckets_edited", set_field("tokenizer_config.json", "oov_buckets", 4), "tokenizer_config"),
        Case(kind, "checksums_invalid_json", write(CHECKSUMS_FILE, "[1, 2"), r"checksums\.json.*not valid JSON"),
        Case(kind, "weights_deleted", delete("model.safetensors"), r"'model\.safetensors' is missing"),
        # Without checksums.json (a folder saved before them), the other checks still hold.
        Case(kind, "legacy_unigrams_short", legacy(drop_last_line("unigrams.txt")), r"unigrams\.txt.*recorded \d+ tok"),
        Case(kind, "legacy_bigrams_swapped", legacy(swap_lines("bigrams.txt", 2, 5)), r"bigrams\.txt.*recorded"),
        Case(kind, "legacy_weights_truncated", legacy(truncate("model.safetensors")), r"model\.safetensors.*bytes"),
        Case(kind, "legacy_weights_header", legacy(overwrite_header("model.safetensors")), r"model\.safetensors"),
        Case(kind, "legacy_hash_p_not_prime", legacy(set_hash_entry("hash_p", 1, lambda p: p + 1)), r"config.*prime"),
        Case(
            kind,
            "legacy_oov_buckets_edited",
            legacy(set_field("tokenizer_config.json", "oov_buckets", 5)),
            r"unigrams\.txt.*tokenizer_config\.json.*config\.json",
        ),
        Case(
            kind,
            "legacy_checksums_field_malformed",
            legacy(set_field("tokenizer_config.json", "vocabulary_checksums", {"unigram": "x"})),
            r"vocabulary_checksums.*tokenizer_config\.json",
        ),
        # Harmless: nothing the model reads changes.
        Case(kind, "checksums_deleted", delete(CHECKSUMS_FILE), None),
        Case(kind, "readme_added", write("README.md", "# my model\n"), None),
        Case(kind, "remote_code_file_deleted", delete("ngrams.py"), None),  # the package's classes load here
    ]


CASES = [
    *entity_like_cases("entity"),
    Case("entity", "config_num_buckets_str", set_field("config.json", "num_buckets", "97"), r"config.*num_buckets"),
    Case("entity", "dense_dim_float", set_field("config.json", "dense_features", {"image_embedding": 4.0}), "dense"),
    Case("entity", "unigrams_crlf", crlf("unigrams.txt"), r"unigrams\.txt"),
    Case("entity", "tokenizer_config_deleted", delete("tokenizer_config.json"), r"'tokenizer_config\.json' is missing"),
    *entity_like_cases("itemsage"),
    Case("itemsage", "image_dim_str", set_field("config.json", "image_dim", "6"), r"config\.json.*image_dim"),
    Case("itemsage", "heads_not_dividing", set_field("config.json", "num_attention_heads", 3), r"config.*heads"),
    Case("query", "tokenizer_json_deleted", delete("tokenizer.json"), r"'tokenizer\.json' is missing"),
    Case(
        "query", "legacy_tokenizer_json_deleted", legacy(delete("tokenizer.json")), r"special tokens.*tokenizer\.json"
    ),
    Case("query", "tokenizer_json_invalid", write("tokenizer.json", '{"model": '), r"tokenizer\.json.*not valid JSON"),
    Case(
        "query",
        "tokenizer_vocab_entries_swapped",
        edit_json("tokenizer.json", lambda t: t["model"]["vocab"].update(red=t["model"]["vocab"]["lamp"], lamp=17)),
        changed("tokenizer.json"),
    ),
    Case("query", "tokenizer_config_invalid_json", write("tokenizer_config.json", "{,}"), r"tokenizer_config\.json"),
    Case("query", "tokenizer_config_deleted", delete("tokenizer_config.json"), r"'tokenizer_config\.json' is missing"),
    Case("query", "pooling_unknown", set_field("config.json", "pooling", "max"), r"config\.json.*pooling"),
    Case("query", "out_dim_str", set_field("config.json", "out_dim", "16"), r"config\.json.*out_dim"),
    Case("query", "max_length_zero", set_field("config.json", "max_length", 0), r"config\.json.*max_length"),
    Case("query", "query_prefix_edited", set_field("config.json", "query_prefix", "query: "), changed("config.json")),
    Case("query", "weights_byte_flipped", flip_byte("model.safetensors", 301), changed("model.safetensors")),
    Case("query", "weights_truncated", truncate("model.safetensors", 0.9), r"model\.safetensors.*truncated"),
    Case("query", "weights_header_corrupt", overwrite_header("model.safetensors", b"\x08" + b"\0" * 7), "safetensors"),
    Case("query", "weights_emptied", write("model.safetensors", b""), r"model\.safetensors"),
    Case("query", "legacy_weights_truncated", legacy(truncate("model.safetensors")), r"model\.safetensors.*bytes"),
    Case("query", "checksums_malformed", write(CHECKSUMS_FILE, '{"files": [1]}'), r"checksums\.json.*files"),
    Case("query", "checksums_deleted", delete(CHECKSUMS_FILE), None),
    Case("query", "sentence_transformers_view_deleted", both(delete("backbone"), delete("2_Dense")), None),
    Case("query", "file_modes_changed", lambda folder: os.chmod(folder / "config.json", 0o600), None),
    Case("tokenizer", "unigrams_one_line_short", drop_last_line("unigrams.txt"), r"unigrams\.txt.*recorded"),
    Case("tokenizer", "unigrams_line_appended", append_line("unigrams.txt", "zzz"), r"unigrams\.txt.*recorded"),
    Case("tokenizer", "trigrams_two_lines_swapped", swap_lines("trigrams.txt", 3, 4), r"trigrams\.txt.*recorded"),
    Case("tokenizer", "bigrams_line_duplicated", duplicate_first_line("bigrams.txt"), r"bigrams\.txt.*recorded"),
    Case("tokenizer", "unigrams_empty", write("unigrams.txt", ""), r"unigrams\.txt.*0 tokens"),
    Case("tokenizer", "unigrams_crlf", crlf("unigrams.txt"), r"unigrams\.txt.*recorded"),
    Case("tokenizer", "unigrams_not_utf8", write("unigrams.txt", b"\xff\xfe\x00x\n"), r"unigrams\.txt"),
    Case("tokenizer", "bigrams_deleted", delete("bigrams.txt"), r"bigrams\.txt"),
    Case(
        "tokenizer",
        "checksums_field_malformed",
        set_field("tokenizer_config.json", "vocabulary_checksums", [1]),
        r"vocabulary_checksums.*tokenizer_config\.json",
    ),
    Case("tokenizer", "oov_buckets_str", set_field("tokenizer_config.json", "oov_buckets", "3"), r"oov_buckets.*tok"),
    Case(
        "tokenizer", "max_chars_zero", set_field("tokenizer_config.json", "max_chars_per_field", 0), r"max_chars.*tok"
    ),
    Case(
        "tokenizer",
        "saved_before_checksums",
        edit_json("tokenizer_config.json", lambda c: c.pop("vocabulary_checksums")),
        None,
    ),
]


# ---------------------------------------------------------------- intact folders and how each kind is used


def _itemsage() -> ItemSageModel:
    torch.manual_seed(0)
    tokenizer = build_vocab(ITEMSAGE_CORPUS, oov_buckets=3, show_progress_bar=False)
    config = ItemSageConfig(
        vocab_size=tokenizer.vocab_size,
        text_fields=["title", "description", "brand"],
        image_dim=6,
        num_buckets=97,
        embedding_dim=16,
        hidden_size=16,
        num_attention_heads=2,
        intermediate_size=32,
        head_hidden_dims=[32],
        out_dim=8,
    )
    model = ItemSageModel(config)
    model.tokenizer = tokenizer
    return model


@pytest.fixture(scope="module")
def intact(tmp_path_factory, tiny_backbone_dir, make_entity_tower) -> dict[str, Path]:
    """One intact saved folder per kind."""
    root = tmp_path_factory.mktemp("intact")
    torch.manual_seed(0)
    models = {
        "query": OmniSearchSageQueryModel.from_backbone(tiny_backbone_dir, out_dim=16),
        "entity": make_entity_tower(),
        "itemsage": _itemsage(),
    }
    for kind, model in models.items():
        model.save_pretrained(root / kind)
    models["entity"].tokenizer.save_pretrained(root / "tokenizer")
    return {kind: root / kind for kind in (*models, "tokenizer")}


def load_and_embed(kind: str, folder: Path, sample_entities: list[dict]) -> np.ndarray:
    """What a user does with a folder of ``kind``: load it and embed (token ids, for a tokenizer)."""
    if kind == "tokenizer":
        tokenizer = AutoTokenizer.from_pretrained(folder)
        bags = tokenizer.encode_bags([e.get("title") for e in sample_entities] + QUERIES)
        return np.concatenate([bags.input_ids.numpy(), bags.offsets.numpy()])
    model = AutoModel.from_pretrained(folder)
    inputs = {"query": QUERIES, "entity": sample_entities, "itemsage": PRODUCTS}[kind]
    return model.encode(inputs)


@pytest.fixture(scope="module")
def expected(intact, sample_entities) -> dict[str, np.ndarray]:
    return {kind: load_and_embed(kind, folder, sample_entities) for kind, folder in intact.items()}


def test_the_matrix_is_big_and_names_are_unique():
    assert len(CASES) >= 40
    assert len({(case.kind, case.name) for case in CASES}) == len(CASES)
    assert {case.kind for case in CASES} == {"query", "entity", "itemsage", "tokenizer"}


@pytest.mark.parametrize("case", CASES, ids=[f"{case.kind}-{case.name}" for case in CASES])
def test_corrupted_folder_raises_a_named_error_or_embeds_identically(case, intact, expected, sample_entities, tmp_path):
    folder = tmp_path / case.kind
    shutil.copytree(intact[case.kind], folder)
    case.corrupt(folder)
    if case.match is None:
        np.testing.assert_array_equal(load_and_embed(case.kind, folder, sample_entities), expected[case.kind])
        return
    try:
        output = load_and_embed(case.kind, folder, sample_entities)
    except (ValueError, OSError) as error:
        message = str(error)
        assert any(token in message for token in ("config.json", ".txt", ".json", ".safetensors")), message
        assert re.search(case.match, message, flags=re.DOTALL), message
        assert re.search(FIX, message) or not case.says_fix, message
    else:
        same = output.shape == expected[case.kind].shape and np.array_equal(output, expected[case.kind])
        pytest.fail(f"{case.name} loaded without an error, with {'the same' if same else 'WRONG'} output")


# ---------------------------------------------------------------- beyond the matrix


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o027, 0o640)])
def test_saved_files_get_the_umask_mode_not_0600(tmp_path, tiny_backbone_dir, make_entity_tower, umask, mode):
    # safetensors and tempfile-based writers create 0o600 files; a service running as another user could
    # not read them. Code files are copied from the package with their own mode, so they are left out.
    previous = os.umask(umask)
    try:
        OmniSearchSageQueryModel.from_backbone(tiny_backbone_dir, out_dim=16).save_pretrained(tmp_path / "query")
        make_entity_tower().save_pretrained(tmp_path / "entity")
    finally:
        os.umask(previous)
    modes = {
        path.relative_to(tmp_path).as_posix(): oct(path.stat().st_mode & 0o777)
        for path in tmp_path.rglob("*")
        if path.is_file() and path.suffix != ".py"
    }
    assert "query/model.safetensors" in modes and "entity/unigrams.txt" in modes
    assert modes == dict.fromkeys(modes, oct(mode))


def test_folder_without_checksums_loads_with_one_warning(intact, expected, sample_entities, tmp_path, caplog):
    folder = tmp_path / "old"
    shutil.copytree(intact["entity"], folder)
    (folder / CHECKSUMS_FILE).unlink()
    with caplog.at_level(logging.WARNING):
        first = load_and_embed("entity", folder, sample_entities)
        load_and_embed("entity", folder, sample_entities)
    assert caplog.text.count(f"{folder} has no {CHECKSUMS_FILE}") == 1
    np.testing.assert_array_equal(first, expected["entity"])


def test_verify_folder_checks_the_files_other_loaders_read(intact, tmp_path):
    # `from_pretrained` checks what it reads; the sentence-transformers copy under backbone/ is checked by
    # `verify_folder` (or by sentence-transformers' own loading, which knows no checksums).
    folder = tmp_path / "query"
    shutil.copytree(intact["query"], folder)
    verify_folder(folder)
    flip_byte("backbone/model.safetensors")(folder)
    AutoModel.from_pretrained(folder)
    with pytest.raises(ValueError, match=r"backbone/model\.safetensors.*was saved"):
        verify_folder(folder)


# ================================================================ tables, embeddings folders, indexes

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


def expected_from_encode(tower, table: Path) -> np.ndarray:
    """``(rows, dim)``: the tower's `encode` of every row, read independently of batch inference."""
    rows = [{k: v for k, v in row.items() if k != "id"} for row in pq.read_table(table).to_pylist()]
    return tower.encode(rows, show_progress_bar=False)


def embed(tower, table: Path, out: Path, **kwargs) -> Path:
    return embed_entity_table(tower, table, out, entity_type="pin", chunk_size=CHUNK, show_progress_bar=False,
                              **kwargs)  # fmt: skip


def assert_output_is(tower, table: Path, out: Path) -> None:
    loaded = EntityEmbeddings.load(out)
    assert loaded.ids == pq.read_table(table, columns=["id"]).column("id").to_pylist()
    np.testing.assert_allclose(loaded.embeddings, expected_from_encode(tower, table), atol=1e-5)


def refused(call: Callable, *needles: str, error: type[Exception] = ValueError) -> str:
    """Run ``call``; it must raise ``error`` whose message holds every needle (file, field, fix)."""
    with pytest.raises(error) as info:
        call()
    message = str(info.value)
    missing = [needle for needle in needles if needle not in message]
    assert not missing, f"{missing} not in: {message}"
    return message


def flip_byte_at(path: Path, offset: int) -> None:
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

TABLE_CASES: dict[str, Callable] = {}


def table_case(function: Callable) -> Callable:
    TABLE_CASES[function.__name__] = function
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


@table_case
def table_rewritten_same_ids(tower, tmp_path, caplog):
    recomputed_after(lambda table, _: write_table(table, seed=1), tower, tmp_path, caplog, "table_sha256 changed")


@table_case
def table_rewritten_with_old_mtime(tower, tmp_path, caplog):
    """Metadata would not see it: same ids, same row count, the modification time put back."""

    def rewrite(table, _):
        stat = table.stat()
        write_table(table, image_scale=-1.0)  # every image vector negated, titles equal
        os.utime(table, ns=(stat.st_atime_ns, stat.st_mtime_ns))

    recomputed_after(rewrite, tower, tmp_path, caplog, "table_sha256 changed")


@table_case
def table_grew(tower, tmp_path, caplog):
    recomputed_after(lambda table, _: write_table(table, rows=ROWS + 4), tower, tmp_path, caplog,
                     "the table_sha256, rows changed")  # fmt: skip


@table_case
def feature_columns_renamed(tower, tmp_path, caplog):
    table = write_table(tmp_path / "pins.parquet", title=None, image_embedding=None, name=["x"] * ROWS)
    refused(lambda: embed(tower, table, tmp_path / "out"), str(table), "none of the columns the model reads",
            "['title', 'image_embedding']", "['id', 'name']", "Rename the table's columns")  # fmt: skip
    assert not (tmp_path / "out").exists()


@table_case
def feature_columns_all_null(tower, tmp_path, caplog):
    table = write_table(tmp_path / "pins.parquet", title=pa.nulls(ROWS, pa.string()),
                        image_embedding=pa.nulls(ROWS, pa.list_(pa.float32(), 4)))  # fmt: skip
    refused(lambda: embed(tower, table, tmp_path / "out"), str(table), "none of the columns the model reads",
            "(['title', 'image_embedding'] null in every row)", "Rename")  # fmt: skip


@table_case
def feature_column_missing(tower, tmp_path, caplog):
    """A tower reads what it finds: the run goes on, a warning counts what is missing, and the output is the
    tower's embedding of rows without that feature."""
    table = write_table(tmp_path / "pins.parquet", image_embedding=None)
    embed(tower, table, tmp_path / "out")
    assert "lacks 1 of the 2 features the model reads: ['image_embedding']" in caplog.text
    assert_output_is(tower, table, tmp_path / "out")


@table_case
def feature_column_all_null(tower, tmp_path, caplog):
    table = write_table(tmp_path / "pins.parquet", image_embedding=pa.nulls(ROWS, pa.list_(pa.float32(), 4)))
    embed(tower, table, tmp_path / "out")
    assert f"1 of the 2 features the model reads are null in all {ROWS} rows: ['image_embedding']" in caplog.text
    assert_output_is(tower, table, tmp_path / "out")


def dense_values(value: float, rows: list[int]) -> pa.Array:
    vectors = np.random.default_rng(0).standard_normal((ROWS, 4)).astype(np.float32)
    vectors[rows] = value
    return pa.array(list(vectors), pa.list_(pa.float32(), 4))


@table_case
def dense_values_1e25(tower, tmp_path, caplog):
    """Finite in float32 but overflowing inside the tower: refused, naming exactly the two rows' ids."""
    table = write_table(tmp_path / "pins.parquet", image_embedding=dense_values(1e25, [7, 8]))
    refused(lambda: embed(tower, table, tmp_path / "out"), str(table),
            "2 row(s) cannot be embedded: ids ['pin7', 'pin8']", "Fix or drop those rows")  # fmt: skip
    # Chunk 0 was finished before the bad rows' chunk: kept; nothing of the bad chunk was written.
    assert [p.name[:6] for p in chunk_files(tmp_path / "out")] == ["000000"]


@table_case
def dense_values_3e38(tower, tmp_path, caplog):
    table = write_table(tmp_path / "pins.parquet", image_embedding=dense_values(3e38, [0]))
    refused(lambda: embed(tower, table, tmp_path / "out"), "1 row(s) cannot be embedded: ids ['pin0']",
            "Fix or drop those rows")  # fmt: skip
    assert not (tmp_path / "out" / "manifest.json").exists()


@table_case
def dense_values_nan(tower, tmp_path, caplog):
    table = write_table(tmp_path / "pins.parquet", image_embedding=dense_values(np.nan, [12, 13, 14, 20, 21, 22]))
    refused(lambda: embed(tower, table, tmp_path / "out"), str(table),
            "3 row(s) cannot be embedded: ids ['pin12', 'pin13', 'pin14']", "image_embedding")  # fmt: skip
    assert not (tmp_path / "out" / "manifest.json").exists()


@table_case
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


@table_case
def chunk_truncated(tower, tmp_path, caplog):
    def truncate(out):
        first = chunk_files(out)[0]
        first.write_bytes(first.read_bytes()[:100])

    recomputed_after(damaged_chunk(truncate), tower, tmp_path, caplog, "000000-")
    assert "is not an intact chunk of this run (corrupt or copied in); recomputing it" in caplog.text


@table_case
def chunk_byte_flipped(tower, tmp_path, caplog):
    flip = damaged_chunk(lambda out: flip_byte_at(chunk_files(out)[1], -3))  # inside the last vector
    recomputed_after(flip, tower, tmp_path, caplog, "is not an intact chunk of this run")


@table_case
def chunk_of_another_table(tower, tmp_path, caplog):
    """A chunk file copied in from another table's output folder, under its own (valid) name."""
    other = write_table(tmp_path / "other.parquet", seed=5)
    embed(tower, other, tmp_path / "other")
    copy = damaged_chunk(lambda out: shutil.copy(chunk_files(tmp_path / "other")[0], out / "chunks"), keep=0)
    recomputed_after(copy, tower, tmp_path, caplog, "is not an intact chunk of this run")


@table_case
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


@table_case
def embeddings_truncated(tower, tmp_path, caplog):
    table, out = finished(tower, tmp_path)
    path = out / "embeddings.npy"
    path.write_bytes(path.read_bytes()[:-64])
    refused_then_repaired(tower, table, out, str(path), "truncated, edited or replaced", EMBED_FIX)
    assert "Merging its chunks again" in caplog.text


@table_case
def embeddings_byte_flipped(tower, tmp_path, caplog):
    table, out = finished(tower, tmp_path)
    flip_byte_at(out / "embeddings.npy", -10)
    refused_then_repaired(tower, table, out, str(out / "embeddings.npy"), EMBED_FIX)


@table_case
def embeddings_of_another_table(tower, tmp_path, caplog):
    """Same shape, other vectors: only the recorded hash can tell."""
    table, out = finished(tower, tmp_path)
    other = write_table(tmp_path / "other.parquet", seed=7)
    embed(tower, other, tmp_path / "other")
    shutil.copy(tmp_path / "other" / "embeddings.npy", out / "embeddings.npy")
    refused_then_repaired(tower, table, out, str(out / "embeddings.npy"), EMBED_FIX)


@table_case
def embeddings_ids_permuted(tower, tmp_path, caplog):
    table, out = finished(tower, tmp_path)
    rewrite_json(out / "ids.json", lambda ids: ids[1:] + ids[:1])
    refused_then_repaired(tower, table, out, str(out / "ids.json"), EMBED_FIX)


@table_case
def embeddings_ids_invalid_json(tower, tmp_path, caplog):
    table, out = finished(tower, tmp_path)
    (out / "ids.json").write_text('["pin0", ')
    refused_then_repaired(tower, table, out, str(out / "ids.json"), EMBED_FIX)


@table_case
def embeddings_manifest_invalid_json(tower, tmp_path, caplog):
    table, out = finished(tower, tmp_path)
    (out / "manifest.json").write_text("{")
    refused(lambda: EntityEmbeddings.load(out), str(out / "manifest.json"), "is not valid JSON", "run that command")


@table_case
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


@table_case
def index_ids_permuted(tower, tmp_path, caplog):
    folder = saved_index(tower, tmp_path)
    rewrite_json(folder / "pin.ids.json", lambda ids: ids[::-1])
    refused(lambda: EntityIndex.load(folder), str(folder / "pin.ids.json"), "truncated, edited or replaced", INDEX_FIX)


@table_case
def index_vector_bytes_flipped(tower, tmp_path, caplog):
    folder = saved_index(tower, tmp_path)
    flip_byte_at(folder / "pin.faiss", -20)  # the flat vectors come last: a float of the last vector
    refused(lambda: EntityIndex.load(folder), str(folder / "pin.faiss"), INDEX_FIX)


@table_case
def index_faiss_truncated(tower, tmp_path, caplog):
    folder = saved_index(tower, tmp_path)
    edit_index_file(folder, "pin.faiss", lambda data: data[: len(data) // 2], rehash=True)
    refused(lambda: EntityIndex.load(folder), str(folder / "pin.faiss"), "is not a faiss index", INDEX_FIX)


@table_case
def index_type_names_a_path_outside(tower, tmp_path, caplog):
    folder = saved_index(tower, tmp_path)
    rewrite_json(folder / "index.json", lambda m: {**m, "sizes": {"../outside": ROWS}})
    refused(lambda: EntityIndex.load(folder), str(folder / "index.json"), "'sizes'", "'../outside'", INDEX_FIX)


@table_case
def index_files_name_an_absolute_path(tower, tmp_path, caplog):
    folder = saved_index(tower, tmp_path)
    rewrite_json(folder / "index.json", lambda m: {**m, "files": {**m["files"], "/etc/passwd": "0" * 64}})
    refused(lambda: EntityIndex.load(folder), str(folder / "index.json"), "'files'", "/etc/passwd", INDEX_FIX)


@table_case
def index_file_symlinked_outside(tower, tmp_path, caplog):
    """Even the right bytes are refused when they live outside the folder."""
    folder = saved_index(tower, tmp_path)
    outside = tmp_path / "elsewhere.faiss"
    shutil.move(folder / "pin.faiss", outside)
    (folder / "pin.faiss").symlink_to(outside)
    refused(lambda: EntityIndex.load(folder), str(folder / "pin.faiss"), "leads out of the index folder", INDEX_FIX)


@table_case
def index_manifest_invalid_json(tower, tmp_path, caplog):
    folder = saved_index(tower, tmp_path)
    (folder / "index.json").write_text('{"dim": 8,')
    refused(lambda: EntityIndex.load(folder), str(folder / "index.json"), "is not valid JSON")


@table_case
def index_ids_invalid_json(tower, tmp_path, caplog):
    folder = saved_index(tower, tmp_path)
    edit_index_file(folder, "pin.ids.json", lambda data: data[:-5], rehash=True)
    refused(lambda: EntityIndex.load(folder), str(folder / "pin.ids.json"), "is not valid JSON", INDEX_FIX)


@table_case
def index_ids_count_mismatch(tower, tmp_path, caplog):
    folder = saved_index(tower, tmp_path)
    edit_index_file(folder, "pin.ids.json", lambda data: json.dumps(json.loads(data)[:-1]).encode(), rehash=True)
    refused(lambda: EntityIndex.load(folder), str(folder), f"has {ROWS - 1} ids", INDEX_FIX)


@table_case
def index_manifest_field_wrong_type(tower, tmp_path, caplog):
    folder = saved_index(tower, tmp_path)
    rewrite_json(folder / "index.json", lambda m: {**m, "dim": "8"})
    refused(lambda: EntityIndex.load(folder), str(folder / "index.json"), "`dim` must be a positive int", INDEX_FIX)


@table_case
def index_built_from_nan_vectors(tower, tmp_path, caplog):
    vectors = np.eye(4, dtype=np.float32)
    vectors[[1, 3], 0] = np.nan
    refused(lambda: build_entity_index({"pin": (["a", "b", "c", "d"], vectors)}, recall_queries=0),
            "entity type 'pin'", "2 row(s): ids ['b', 'd']", "Re-embed")  # fmt: skip


@pytest.mark.parametrize("name", sorted(TABLE_CASES))
def test_corruption_is_refused_or_recomputed(name, tower, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger=LOGGER)
    TABLE_CASES[name](tower, tmp_path, caplog)


def test_the_matrix_is_large_enough():
    assert len(TABLE_CASES) >= 15


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
    flip_byte_at(out / "embeddings.npy", -1)
    assert index_main(["--embeddings", str(out), "--out", str(tmp_path / "index"), "--quiet"]) == 2
    (error,) = error_lines(capsys.readouterr().err)
    assert error.startswith(f"omnisearchsage-index: error: {str(out / 'embeddings.npy')!r} is not the file")
    assert EMBED_FIX in error and not (tmp_path / "index").exists()
