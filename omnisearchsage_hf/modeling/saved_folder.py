"""A saved model folder that verifies itself: checksums recorded at save time, checked at load time.

A model folder is data that travels (copied between machines, synced to buckets, edited by hand), and a
changed byte in it changes every embedding without an error: a vocabulary one line short, a flipped
weight, an edited hash parameter. So ``save_pretrained`` ends by writing ``checksums.json``, the size
and sha256 of every file it wrote (weights, config, tokenizer files, the sentence-transformers view),
and ``from_pretrained`` checks the files it reads against it before loading anything. Written last, the
manifest also marks a save that finished: an interrupted save over an older folder fails the check
instead of loading a mix of the two.

The cost is one sha256 pass over the files ``from_pretrained`` reads: about 0.13 s per 100 MB here
(750 MB/s), a fraction of reading the weights themselves. The recorded sha256 of a weights file is also
the Hub's LFS object id of that file.

A folder without ``checksums.json`` (saved before this check, or by another tool) still loads, with a
warning that it cannot be verified. To keep a deliberate edit (say, a new ``query_prefix`` in
``config.json``), delete ``checksums.json``, load, and ``save_pretrained`` again to record the new one.

Whatever the manifest says, every load also checks what can be checked locally: JSON files parse,
``config.json`` fields have their declared types and values (the error names the file and the field),
and each safetensors file's header is whole and covers the file exactly (a truncated download fails
here, naming the file, rather than deep inside the safetensors reader).

This file is copied next to the modeling files when a model is saved, so it imports only the standard
library and transformers (with its huggingface_hub).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from huggingface_hub.errors import StrictDataclassError
from transformers import PreTrainedConfig
from transformers.utils import cached_file, logging

logger = logging.get_logger(__name__)

CHECKSUMS_FILE = "checksums.json"
CHECKSUMS_FORMAT = 1
# The fix that every integrity error ends with.
REFETCH = "Re-download (or copy again) the whole folder, or save the model again with `save_pretrained`."

# `from_pretrained` keyword arguments that say where and how to fetch a file of the folder.
HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "proxies", "revision", "subfolder", "token")

Resolve = Callable[[str], "str | None"]
# Tokenizer files that are JSON, checked to parse whether or not the folder has checksums.
TOKENIZER_JSON_FILES = ("added_tokens.json", "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json")


def folder_resolver(pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any) -> Resolve:
    """``resolve(name) -> local path or None``: a file of a local folder or a Hub repo (fetched into the cache)."""
    hub_kwargs = {name: kwargs[name] for name in HUB_KWARGS if name in kwargs}

    def resolve(name: str) -> str | None:
        return cached_file(
            pretrained_model_name_or_path,
            name,
            _raise_exceptions_for_missing_entries=False,
            _raise_exceptions_for_connection_errors=False,
            **hub_kwargs,
        )

    return resolve


def local_resolver(folder: str | os.PathLike) -> Resolve:
    """``resolve(name) -> path or None`` for a local folder, without the Hub machinery."""
    folder = Path(folder)
    return lambda name: str(folder / name) if (folder / name).is_file() else None


def file_record(path: str | os.PathLike) -> dict[str, Any]:
    """``{"size": bytes, "sha256": hex}`` of a file, read in 1 MiB blocks."""
    with open(path, "rb") as handle:
        digest = hashlib.file_digest(handle, "sha256") if hasattr(hashlib, "file_digest") else _sha256(handle)
    return {"sha256": digest.hexdigest(), "size": os.path.getsize(path)}


def _sha256(handle) -> Any:  # Python 3.10 has no hashlib.file_digest
    digest = hashlib.sha256()
    while block := handle.read(1 << 20):
        digest.update(block)
    return digest


def new_file_mode(directory: str | os.PathLike) -> int:
    """The permission bits a plain ``open(path, "w")`` gives a new file in ``directory`` (0o644 under umask 022).

    Found by creating a probe file, which reads the umask (and any default ACL) without ``os.umask``'s
    set-and-restore, a race with every other thread creating files meanwhile.
    """
    probe = Path(directory) / f".mode-probe-{os.getpid()}"
    descriptor = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
    try:
        return os.fstat(descriptor).st_mode & 0o777
    finally:
        os.close(descriptor)
        probe.unlink()


def write_checksums(folder: str | os.PathLike, names: Iterable[str]) -> None:
    """Record ``names`` (paths relative to ``folder``) in ``checksums.json``, and give them the umask's mode.

    Writers such as safetensors create files with mode 0o600 (a temporary file renamed into place), so
    a service running as another user could not read them; every recorded file gets the mode a plain
    ``open`` would give instead. The manifest is written last, atomically.
    """
    folder = Path(folder)
    mode = new_file_mode(folder)
    files = {}
    for name in sorted(set(names)):
        os.chmod(folder / name, mode)
        files[name] = file_record(folder / name)
    text = json.dumps({"files": files, "format": CHECKSUMS_FORMAT}, indent=2, sort_keys=True) + "\n"
    tmp = folder / f".{CHECKSUMS_FILE}.tmp-{os.getpid()}"
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, folder / CHECKSUMS_FILE)
    finally:
        tmp.unlink(missing_ok=True)


def read_json_file(path: str | os.PathLike) -> Any:
    """Parse a JSON file; an error names the file, the position and the fix."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{os.fspath(path)!r} is not valid JSON ({error}); it is corrupted. {REFETCH}") from None


def read_checksums(resolve: Resolve, location: str) -> dict[str, dict[str, Any]] | None:
    """The ``files`` of the folder's ``checksums.json``; None (and a warning, once per folder) without one."""
    manifest_path = resolve(CHECKSUMS_FILE)
    if manifest_path is None:
        logger.warning_once(
            f"{location} has no {CHECKSUMS_FILE} (saved before integrity checks, by another tool, or by an "
            "interrupted `save_pretrained`): its files cannot be verified. Save it again to add checksums."
        )
        return None
    manifest = read_json_file(manifest_path)
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not all(
        isinstance(r, dict) and isinstance(r.get("size"), int) and isinstance(r.get("sha256"), str)
        for r in files.values()
    ):
        raise ValueError(f"{manifest_path!r} is not a checksums manifest (field 'files' is malformed). {REFETCH}")
    return files


def verify_checksums(resolve: Resolve, location: str, files: dict[str, dict[str, Any]], names: Iterable[str]) -> None:
    """Check the files ``names`` that the manifest ``files`` records; others are not checked.

    Raises:
        ValueError: A recorded file is missing, has another size (truncated, appended) or another
            sha256 (edited, flipped bytes).
    """
    for name in names:
        if name not in files:
            continue
        expected, path = files[name], resolve(name)
        if path is None:
            raise ValueError(
                f"{name!r} is missing from {location}, but {CHECKSUMS_FILE} records it "
                f"({expected['size']} bytes): the folder is incomplete. {REFETCH}"
            )
        found = file_record(path)
        if found != expected:
            what = (
                f"{found['size']} bytes where {expected['size']} were saved (truncated or appended)"
                if found["size"] != expected["size"]
                else f"sha256 {found['sha256'][:16]}… where {expected['sha256'][:16]}… was saved (its content changed)"
            )
            raise ValueError(
                f"{path!r} does not match {CHECKSUMS_FILE}: {what}. {REFETCH} If you edited it on purpose, delete "
                f"{CHECKSUMS_FILE}, load the folder and save it again to record the new checksums."
            )


def check_safetensors_file(path: str | os.PathLike) -> None:
    """Raise unless ``path`` has a whole safetensors header whose tensors end exactly at the end of the file.

    Reads only the header (a length, then JSON), so a truncated or header-corrupted download fails with
    the file named, before the safetensors reader sees it.
    """
    size = os.path.getsize(path)

    def corrupt(reason: str) -> ValueError:
        return ValueError(f"Weights file {os.fspath(path)!r} is corrupted or truncated: {reason}. {REFETCH}")

    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise corrupt(f"{size} bytes, shorter than the 8-byte header length")
        header_size = int.from_bytes(prefix, "little")
        if header_size > size - 8:
            raise corrupt(f"its header claims {header_size} bytes but the file has {size}")
        try:
            header = json.loads(handle.read(header_size))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise corrupt(f"its header is not JSON ({error})") from None
    if not isinstance(header, dict):
        raise corrupt("its header is not a JSON object")
    try:
        end = max((int(entry["data_offsets"][1]) for k, entry in header.items() if k != "__metadata__"), default=0)
    except (TypeError, KeyError, IndexError, ValueError):
        raise corrupt("its header has a tensor without valid `data_offsets`") from None
    if 8 + header_size + end != size:
        raise corrupt(f"its tensors end at byte {8 + header_size + end} but the file has {size} bytes")


class ConfigFileErrors:
    """Config mixin: an invalid config dict (in practice a saved ``config.json``) is an error naming that
    file and the field, with the fix.

    ``AutoModel.from_pretrained`` builds the config (``from_dict``) before any model code runs, so this is
    where a hand-edited ``config.json`` is first seen; the ``@strict`` field types and ``validate_*`` checks
    find the field, and this adds the file and the fix to their message.
    """

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any):
        try:
            return super().from_dict(config_dict, **kwargs)
        except (StrictDataclassError, ValueError, TypeError) as error:
            raise ValueError(
                f"Invalid config.json for {cls.__name__}: {error}\nFix that field in config.json, or "
                f"{REFETCH[0].lower()}{REFETCH[1:]}"
            ) from None


def check_config_file(config_class: type[PreTrainedConfig], path: str | os.PathLike) -> None:
    """Raise unless ``path`` is JSON that builds a ``config_class``; the error names the file and the field."""
    data = read_json_file(path)
    if not isinstance(data, dict):
        raise ValueError(f"{os.fspath(path)!r} must hold a JSON object, got {type(data).__name__}. {REFETCH}")
    try:
        config_class.from_dict(data)
    except ValueError as error:  # `ConfigFileErrors` has named the field and the fix; add the path
        raise ValueError(f"{os.fspath(path)!r}: {error}") from None


def weight_file_names(resolve: Resolve) -> list[str]:
    """Names of the safetensors files a folder's ``from_pretrained`` reads (one file or the index's shards)."""
    index_path = resolve("model.safetensors.index.json")
    if index_path is None:
        return ["model.safetensors"]
    weight_map = read_json_file(index_path).get("weight_map")
    if not isinstance(weight_map, dict):
        raise ValueError(f"{index_path!r} has no `weight_map` object. {REFETCH}")
    return ["model.safetensors.index.json", *sorted(set(weight_map.values()))]


def check_folder(resolve: Resolve, location: str, config_class: type[PreTrainedConfig]) -> None:
    """Everything a model load checks before reading weights: checksums, JSON, config fields, weight headers.

    Verified against ``checksums.json``: ``config.json``, the weights, and every other top-level file it
    records (the tokenizer's); files in subfolders (the sentence-transformers view) are read by other
    loaders, which ``verify_folder`` checks.

    Args:
        resolve: Maps a file name of the folder to a local path, or None where it is missing.
        location: The folder or repository, for messages.
        config_class: The model's config class, which validates ``config.json``.
    """
    # The specific checks first, so that an edited field or a cut download is named as such; then the
    # checksums, which catch every other change (a valid but different hash parameter, a flipped weight).
    files = read_checksums(resolve, location)
    top_level = [name for name in files or {} if "/" not in name]
    for name in sorted({*top_level, *TOKENIZER_JSON_FILES}):
        path = resolve(name) if name.endswith(".json") else None
        if path is not None:
            read_json_file(path)
    config_path = resolve("config.json")
    if config_path is None:
        raise ValueError(f"{location} has no config.json: it is not a saved model folder. {REFETCH}")
    check_config_file(config_class, config_path)
    weights = weight_file_names(resolve)
    for name in weights:
        path = resolve(name)
        if path is not None and name.endswith(".safetensors"):
            check_safetensors_file(path)
    if files is not None:
        verify_checksums(resolve, location, files, sorted({"config.json", *weights, *top_level}))


def verify_folder(folder: str | os.PathLike) -> None:
    """Check every file that a local folder's ``checksums.json`` records, subfolders included.

    Raises:
        ValueError: The folder has no ``checksums.json``, or a recorded file is missing or changed.
    """
    resolve = local_resolver(folder)
    if resolve(CHECKSUMS_FILE) is None:
        raise ValueError(f"{os.fspath(folder)!r} has no {CHECKSUMS_FILE}: nothing to verify it against.")
    files = read_checksums(resolve, os.fspath(folder))
    verify_checksums(resolve, os.fspath(folder), files, sorted(files))


__all__ = [
    "CHECKSUMS_FILE",
    "ConfigFileErrors",
    "check_config_file",
    "check_folder",
    "check_safetensors_file",
    "file_record",
    "folder_resolver",
    "local_resolver",
    "new_file_mode",
    "read_checksums",
    "read_json_file",
    "verify_checksums",
    "verify_folder",
    "write_checksums",
]
