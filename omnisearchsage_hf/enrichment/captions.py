"""Synthetic captions: an image-to-text model over the images of entities that lack text (paper §3.2.1).

About 30% of pins have no title or description; the paper captions every image with BLIP and adds the
caption as a text field. Here a captioning model is run through the transformers pipeline (any model
``pipeline("image-text-to-text")`` accepts: BLIP, BLIP-2, GIT, …; transformers 5 folded the old
``image-to-text`` task into it), by name or local folder (``CaptionConfig.model``), in batches, with a
progress bar.

Captions are cached by the SHA-256 of the image's bytes (and the model, prompt and generation length),
in parquet shards under a cache folder, one shard written atomically per batch: a rerun, or a run
resumed after a crash, captions only the images not yet done, and identical images shared by several
entities are captioned once. The model is loaded only when some image is missing from the cache.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import struct
import time
import urllib.request
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from ..data.tables import write_table_atomically

logger = logging.getLogger(__name__)

OnError = Literal["raise", "skip"]
_SHARD_GLOB = "captions-*.parquet"
# What reading and decoding an image raises for a bad one: OSError (also PIL's UnidentifiedImageError,
# truncated files and urllib's URLError), the errors PIL's parsers raise on malformed headers, and
# decompression bombs (added where PIL is imported: they are not OSErrors; the warning is made an error).
_UNREADABLE: tuple[type[BaseException], ...] = (OSError, EOFError, SyntaxError, ValueError, struct.error)
_CACHE_SCHEMA = pa.schema([("image_sha256", pa.string()), ("captioner", pa.string()), ("caption", pa.string())])


@dataclass
class CaptionConfig:
    """What captions which entities, and how.

    Args:
        model: Hub name or local folder of an image-captioning model (default: BLIP base, the paper's model).
        prompt: Text the caption starts from (BLIP's conditional captioning, e.g. ``"a picture of"``); ""
            for unconditional captions. The prompt is not part of the returned caption.
        max_new_tokens: Caption length limit in tokens.
        batch_size: Images per model call.
        only_missing_text: Caption only entities whose ``text_fields`` are all missing or blank (the
            paper's use); False captions every entity with an image.
        text_fields: The fields checked by ``only_missing_text``.
        image_column: Entity column with an image path or http(s) URL (or a list of them: the first is used).
        image_root: Folder relative paths are read from; None reads them from the working directory.
        device: Passed to ``pipeline`` (``"cpu"``, ``"cuda"``, ``0``…); None lets transformers choose.
        timeout: Seconds to wait for an image URL.
        on_error: ``"raise"`` stops at the first unreadable image; ``"skip"`` leaves its caption empty and
            logs how many were skipped. Unreadable means: the file or URL cannot be read, the bytes do not
            decode as an image (truncated, not an image), or the image is a decompression bomb (more
            pixels than ``PIL.Image.MAX_IMAGE_PIXELS``, 89M by default: a 48 KB PNG can claim 15 GB).
    """

    model: str = "Salesforce/blip-image-captioning-base"
    prompt: str = ""
    max_new_tokens: int = 30
    batch_size: int = 16
    only_missing_text: bool = True
    text_fields: tuple[str, ...] = ("title", "description")
    image_column: str = "image"
    image_root: str | None = None
    device: str | int | None = None
    timeout: float = 10.0
    on_error: OnError = "raise"

    def __post_init__(self):
        self.text_fields = tuple(self.text_fields)
        for name in ("max_new_tokens", "batch_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be a positive int, got {getattr(self, name)!r}.")
        if self.on_error not in ("raise", "skip"):
            raise ValueError(f"`on_error` must be 'raise' or 'skip', got {self.on_error!r}.")

    def captioner_key(self) -> str:
        """The settings a cached caption depends on, as sorted JSON."""
        return json.dumps(
            {"model": self.model, "prompt": self.prompt, "max_new_tokens": self.max_new_tokens}, sort_keys=True
        )


class CaptionCache:
    """Captions by image hash for one captioner, stored as parquet shards in ``directory``.

    Args:
        directory: The cache folder (created when missing); several captioners can share it.
        captioner_key: ``CaptionConfig.captioner_key()``: only captions made with these settings are used.

    Example:
        ::

            cache = CaptionCache("captions_cache", CaptionConfig().captioner_key())
            cache.add({"9f86d08…": "a red dress on a hanger"})   # one new shard
            cache.get("9f86d08…")                                # 'a red dress on a hanger'
    """

    def __init__(self, directory: str | os.PathLike, captioner_key: str):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.captioner_key = captioner_key
        self._captions: dict[str, str] = {}
        for table in self._shards():
            mine = table.filter(pc.equal(table.column("captioner"), captioner_key))
            self._captions.update(
                zip(mine.column("image_sha256").to_pylist(), mine.column("caption").to_pylist(), strict=True)
            )

    def __len__(self) -> int:
        return len(self._captions)

    def __contains__(self, image_sha256: str) -> bool:
        return image_sha256 in self._captions

    def get(self, image_sha256: str) -> str | None:
        """The cached caption of an image, or None."""
        return self._captions.get(image_sha256)

    def add(self, captions: dict[str, str]) -> None:
        """Remember ``{image_sha256: caption}`` and write them as one new shard."""
        if not captions:
            return
        self._captions.update(captions)
        table = pa.table(
            {
                "image_sha256": list(captions),
                "captioner": [self.captioner_key] * len(captions),
                "caption": list(captions.values()),
            },
            schema=_CACHE_SCHEMA,
        )
        write_table_atomically(table, self.directory / f"captions-{time.time_ns()}-{os.getpid()}.parquet")

    def compact(self) -> None:
        """Merge every shard (all captioners) into one, so the folder does not grow a file per batch."""
        paths = sorted(self.directory.glob(_SHARD_GLOB))
        if len(paths) < 2:
            return
        merged = pa.concat_tables(pq.read_table(path, schema=_CACHE_SCHEMA) for path in paths)
        write_table_atomically(merged, self.directory / f"captions-{time.time_ns()}-{os.getpid()}.parquet")
        for path in paths:
            path.unlink()

    def _shards(self) -> list[pa.Table]:
        return [pq.read_table(path, schema=_CACHE_SCHEMA) for path in sorted(self.directory.glob(_SHARD_GLOB))]


def build_captioner(config: CaptionConfig) -> Any:
    """The transformers ``image-text-to-text`` pipeline of ``config.model`` (a Hub name or a local folder)."""
    from transformers import pipeline

    return pipeline("image-text-to-text", model=config.model, device=config.device)


def caption_images(
    sources: Sequence[str | None],
    *,
    config: CaptionConfig,
    cache: CaptionCache,
    captioner: Any = None,
    show_progress_bar: bool = False,
) -> list[str | None]:
    """Caption every image in ``sources``, reusing ``cache`` and adding what is new to it.

    Args:
        sources: Image paths or http(s) URLs; None entries are skipped.
        config: Model, prompt, batch size and error policy.
        cache: Where captions are looked up and stored (one shard per model call).
        captioner: A ready pipeline; None builds ``build_captioner(config)`` when the first uncached image
            needs it.
        show_progress_bar: Show a tqdm bar over the images.

    Returns:
        One caption per source (None for a None source or, with ``on_error="skip"``, an unreadable image).

    Raises:
        OSError: With ``on_error="raise"``, the first unreadable image (``CaptionConfig.on_error`` says
            what counts), named.
    """
    from PIL import Image

    unreadable = (*_UNREADABLE, Image.DecompressionBombError, Image.DecompressionBombWarning)
    results: list[str | None] = [None] * len(sources)
    waiting: dict[str, list[int]] = {}  # image hash → positions that get its caption
    batch: list[tuple[str, Any]] = []
    skipped = 0

    def flush() -> None:
        nonlocal captioner
        if not batch:
            return
        if captioner is None:
            captioner = build_captioner(config)
        outputs = captioner(
            images=[image for _, image in batch],
            text=[config.prompt] * len(batch),
            max_new_tokens=config.max_new_tokens,
            return_full_text=False,
        )
        captions = {sha: output["generated_text"].strip() for (sha, _), output in zip(batch, outputs, strict=True)}
        cache.add(captions)
        for sha, caption in captions.items():
            for position in waiting.pop(sha):
                results[position] = caption
        batch.clear()

    for position, source in enumerate(tqdm(sources, desc="Captions", unit=" images", disable=not show_progress_bar)):
        if source is None:
            continue
        try:
            data = _read_image(source, config)
            sha = hashlib.sha256(data).hexdigest()
            if sha in cache:
                results[position] = cache.get(sha)
                continue
            if sha in waiting:
                waiting[sha].append(position)
                continue
            image = _decode_image(data)
        except unreadable as error:
            if config.on_error == "raise":
                raise OSError(
                    f"Cannot read image {source!r} ({type(error).__name__}: {error}); fix the image or set "
                    "`on_error='skip'`."
                ) from error
            skipped += 1
            continue
        waiting[sha] = [position]
        batch.append((sha, image))
        if len(batch) == config.batch_size:
            flush()
    flush()
    if skipped:
        logger.warning("Skipped %d unreadable images of %d; their captions are empty.", skipped, len(sources))
    return results


def caption_entities(
    entities: pa.Table,
    *,
    config: CaptionConfig,
    cache_dir: str | os.PathLike,
    captioner: Any = None,
    show_progress_bar: bool = False,
) -> pa.Array:
    """Synthetic captions of the entities ``config`` selects, aligned with ``entities`` (None elsewhere).

    Args:
        entities: The entity table; it must have ``config.image_column``.
        config: Which entities (``only_missing_text``, ``text_fields``) and how (model, batch size…).
        cache_dir: The caption cache folder; reruns skip images already captioned there.
        captioner: A ready pipeline (see ``caption_images``).
        show_progress_bar: Show a tqdm bar over the selected images.

    Returns:
        A string array of ``entities.num_rows`` captions.

    Example:
        ::

            config = CaptionConfig(model="Salesforce/blip-image-captioning-base", batch_size=32)
            captions = caption_entities(entities, config=config, cache_dir="runs/captions_cache")
    """
    if config.image_column not in entities.column_names:
        raise ValueError(
            f"The entity table has no image column {config.image_column!r} (`image_column`); "
            f"its columns: {entities.column_names}."
        )
    images = entities.column(config.image_column).to_pylist()
    images = [image[0] if isinstance(image, list) and image else image or None for image in images]
    if config.only_missing_text:
        present = [
            [isinstance(text, str) and bool(text.strip()) for text in entities.column(name).to_pylist()]
            for name in config.text_fields
            if name in entities.column_names
        ]
        images = [None if any(flags) else image for image, *flags in zip(images, *present, strict=True)]
    cache = CaptionCache(cache_dir, config.captioner_key())
    captions = caption_images(
        images, config=config, cache=cache, captioner=captioner, show_progress_bar=show_progress_bar
    )
    cache.compact()
    return pa.array(captions, pa.string())


def _decode_image(data: bytes) -> Any:
    """Decode image bytes to RGB, a decompression bomb (its warning included) being an error like bad bytes."""
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        return Image.open(io.BytesIO(data)).convert("RGB")


def _read_image(source: str, config: CaptionConfig) -> bytes:
    if source.startswith(("http://", "https://")):
        with urllib.request.urlopen(source, timeout=config.timeout) as response:
            return response.read()
    path = Path(source)
    if config.image_root is not None and not path.is_absolute():
        path = Path(config.image_root) / path
    return path.read_bytes()


__all__ = ["CaptionCache", "CaptionConfig", "build_captioner", "caption_entities", "caption_images"]
