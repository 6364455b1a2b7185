"""Synthetic captions with a tiny random BLIP loaded by folder: batching, selection, and the hash-keyed cache."""

import io
import struct
import zlib
from pathlib import Path

import pyarrow as pa
import pytest
from PIL import Image
from transformers import BlipForConditionalGeneration

from omnisearchsage_hf.enrichment import CaptionCache, CaptionConfig, build_captioner, caption_entities
from omnisearchsage_hf.enrichment import captions as captions_module


@pytest.fixture(scope="module")
def tiny_blip(tmp_path_factory, build_tiny_blip) -> str:
    return str(build_tiny_blip(tmp_path_factory.mktemp("blip")))


@pytest.fixture
def count_generate(monkeypatch) -> dict[str, int]:
    """Counts the model's generate calls and the images they caption (the model's real work)."""
    calls = {"calls": 0, "images": 0}
    original = BlipForConditionalGeneration.generate

    def counting(self, pixel_values=None, *args, **kwargs):
        calls["calls"] += 1
        calls["images"] += pixel_values.shape[0]
        return original(self, pixel_values, *args, **kwargs)

    monkeypatch.setattr(BlipForConditionalGeneration, "generate", counting)
    return calls


@pytest.fixture
def entities(tmp_path, write_image) -> pa.Table:
    images = [write_image(tmp_path / f"img{i}.png", i) for i in range(4)]
    shared = tmp_path / "copy_of_img2.png"
    shared.write_bytes(Path(images[2]).read_bytes())  # same bytes, another path: captioned once
    return pa.table(
        {
            "id": ["p0", "p1", "p2", "p3", "p4", "p5"],
            "title": ["Red dress", None, None, "  ", None, None],
            "description": [None, "A kitchen lamp", None, None, "", None],
            "image": [images[0], images[1], images[2], images[3], str(shared), None],
        }
    )


def test_captions_only_entities_without_text_and_batches_the_model(tiny_blip, entities, tmp_path, count_generate):
    config = CaptionConfig(model=tiny_blip, batch_size=2, max_new_tokens=6)
    captions = caption_entities(entities, config=config, cache_dir=tmp_path / "cache").to_pylist()
    # p0 and p1 have text, p5 has no image; p2 and p4 share image bytes; p3's blank title counts as missing.
    assert [c is not None for c in captions] == [False, False, True, True, True, False]
    assert all(isinstance(c, str) and c for c in captions if c is not None)
    assert captions[2] == captions[4]
    assert count_generate == {"calls": 1, "images": 2}  # img2 and img3, in one batch of 2

    # The captions are exactly what the same pipeline says for these images.
    pipe = build_captioner(config)
    direct = pipe(images=[Image.open(entities["image"][3].as_py()).convert("RGB")], text=[""], max_new_tokens=6)
    assert captions[3] == direct[0]["generated_text"].strip()

    everything = caption_entities(
        entities,
        config=CaptionConfig(model=tiny_blip, max_new_tokens=6, only_missing_text=False),
        cache_dir=tmp_path / "cache",
    ).to_pylist()
    assert [c is not None for c in everything] == [True] * 5 + [False]
    assert everything[2:5] == captions[2:5]


def test_a_rerun_uses_the_cache_and_never_loads_the_model(tiny_blip, entities, tmp_path, count_generate, monkeypatch):
    config = CaptionConfig(model=tiny_blip, batch_size=1, max_new_tokens=6)
    first = caption_entities(entities, config=config, cache_dir=tmp_path / "cache").to_pylist()
    assert count_generate["images"] == 2
    assert len(list((tmp_path / "cache").glob("captions-*.parquet"))) == 1  # one shard per batch, compacted

    builds = []
    monkeypatch.setattr(captions_module, "build_captioner", lambda config: builds.append(config))
    again = caption_entities(entities, config=config, cache_dir=tmp_path / "cache").to_pylist()
    assert again == first
    assert count_generate["images"] == 2 and builds == []  # nothing generated, no model even loaded

    # Another prompt is another captioner: its captions are not taken from the cache.
    monkeypatch.undo()
    reprompted = CaptionConfig(model=tiny_blip, batch_size=1, max_new_tokens=6, prompt="a photo of")
    assert len(CaptionCache(tmp_path / "cache", reprompted.captioner_key())) == 0
    assert len(CaptionCache(tmp_path / "cache", config.captioner_key())) == 2


def test_a_crashed_run_resumes_where_it_stopped(tiny_blip, entities, tmp_path, monkeypatch):
    calls = []
    original = BlipForConditionalGeneration.generate

    def crash_on_second(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("killed")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(BlipForConditionalGeneration, "generate", crash_on_second)
    config = CaptionConfig(model=tiny_blip, batch_size=1, max_new_tokens=6)
    with pytest.raises(RuntimeError, match="killed"):
        caption_entities(entities, config=config, cache_dir=tmp_path / "cache")
    assert len(CaptionCache(tmp_path / "cache", config.captioner_key())) == 1  # the first batch was saved

    calls.clear()
    resumed = caption_entities(entities, config=config, cache_dir=tmp_path / "cache").to_pylist()
    assert len(calls) == 1  # only the image the crashed run had not finished
    monkeypatch.undo()
    fresh = caption_entities(entities, config=config, cache_dir=tmp_path / "fresh_cache").to_pylist()
    assert resumed == fresh


def test_unreadable_images_raise_or_are_skipped(tiny_blip, entities, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    table = entities.set_column(3, "image", pa.array([None, None, str(broken), str(tmp_path / "gone.png"), None, None]))
    with pytest.raises(OSError, match=r"broken\.png.*on_error='skip'"):
        caption_entities(table, config=CaptionConfig(model=tiny_blip), cache_dir=tmp_path / "cache")
    skipped = caption_entities(
        table, config=CaptionConfig(model=tiny_blip, on_error="skip"), cache_dir=tmp_path / "cache"
    ).to_pylist()
    assert skipped == [None] * 6
    with pytest.raises(ValueError, match="no image column 'picture'"):
        caption_entities(entities, config=CaptionConfig(image_column="picture"), cache_dir=tmp_path / "cache")
    with pytest.raises(ValueError, match="batch_size"):
        CaptionConfig(batch_size=0)


def _png_claiming(width: int, height: int) -> bytes:
    """A valid 8x8 PNG whose header claims ``width`` x ``height`` pixels: a decompression bomb of ~70 bytes."""
    buffer = io.BytesIO()
    Image.new("L", (8, 8)).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    header = struct.pack(">II", width, height) + bytes(data[24:29])  # IHDR data: size, then depth, colour…
    data[16:29], data[29:33] = header, struct.pack(">I", zlib.crc32(b"IHDR" + header))
    return bytes(data)


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("bomb.png", _png_claiming(20_000, 20_000)),  # over 2x MAX_IMAGE_PIXELS: PIL raises DecompressionBombError
        ("big.png", _png_claiming(10_000, 10_000)),  # over MAX_IMAGE_PIXELS: PIL only warns; we refuse it too
        ("cut.png", None),  # a real PNG cut in half: PIL opens it, then fails to decode
    ],
)
def test_bombs_and_truncated_images_raise_or_are_skipped(tiny_blip, entities, tmp_path, write_image, name, content):
    image = tmp_path / name
    if content is None:
        whole = Path(write_image(tmp_path / "whole.png", 5)).read_bytes()
        content = whole[: len(whole) // 2]
    image.write_bytes(content)
    table = entities.set_column(3, "image", pa.array([None, None, str(image), None, None, None]))
    with pytest.raises(OSError, match=rf"{name}.*on_error='skip'"):
        caption_entities(table, config=CaptionConfig(model=tiny_blip), cache_dir=tmp_path / "cache")
    skipped = caption_entities(
        table, config=CaptionConfig(model=tiny_blip, on_error="skip", max_new_tokens=4), cache_dir=tmp_path / "cache"
    ).to_pylist()
    assert skipped == [None] * 6
