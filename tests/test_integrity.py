"""Saved folders verify themselves: a matrix of corrupted folders, none of which may load with wrong output.

Each case copies an intact saved folder (query tower, entity tower, ItemSage, or a tokenizer alone),
corrupts it the way files get corrupted in practice (a vocabulary line lost, a weight byte flipped, a
download cut short, a field edited by hand), then loads and embeds. Either that raises an error naming
the file (and the field, where there is one) and saying how to fix it, or, for a case that is provably
harmless, it gives exactly the intact folder's output. Loading is never allowed to succeed with other
output: every load that succeeds is compared with the intact folder.

To add a case, append a ``Case(kind, name, corrupt, match)`` to ``CASES``; ``match=None`` declares it
harmless. Corruptions are small composable functions of the folder.
"""

import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from omnisearchsage_hf import ItemSageConfig, ItemSageModel, OmniSearchSageQueryModel, build_vocab
from omnisearchsage_hf.modeling.saved_folder import CHECKSUMS_FILE, verify_folder

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
