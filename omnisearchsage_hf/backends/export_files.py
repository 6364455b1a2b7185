"""Where a saved query tower keeps its ONNX and OpenVINO exports, and how they join its ``checksums.json``.

The files sit where sentence-transformers looks for them, inside the folder of the tower's
``Transformer`` module (``backbone/``, see ``modeling/sentence_transformers_folder.py``), under the names
its own export functions give them::

    backbone/onnx/model.onnx                              ONNX, float32
    backbone/onnx/model_qint8_quantized.onnx              ONNX, dynamic int8
    backbone/openvino/openvino_model.xml (+ .bin)         OpenVINO, float32
    backbone/openvino/openvino_model_qint8_quantized.xml  OpenVINO, static int8 (+ .bin)

Each export is recorded in the folder's ``checksums.json`` like every file ``save_pretrained`` wrote, so the
folder still verifies (``saved_folder.verify_folder``) and a changed export is refused when loaded.
"""

from __future__ import annotations

import importlib
import os
import shutil
from pathlib import Path
from typing import Literal

from ..atomic import replace_atomically
from ..modeling.saved_folder import (
    CHECKSUMS_FILE,
    local_resolver,
    read_checksums,
    verify_checksums,
    verify_folder,
    write_checksums,
)
from ..modeling.sentence_transformers_folder import SENTENCE_TRANSFORMERS_BACKBONE

Backend = Literal["torch", "onnx", "openvino"]
ExportBackend = Literal["onnx", "openvino"]
Quantize = Literal["int8"]
BACKENDS: tuple[Backend, ...] = ("torch", "onnx", "openvino")
EXPORT_BACKENDS: tuple[ExportBackend, ...] = ("onnx", "openvino")

# File name of each (backend, quantize) export, inside `backbone/<backend>/`.
EXPORT_NAMES: dict[tuple[str, str | None], str] = {
    ("onnx", None): "model.onnx",
    ("onnx", "int8"): "model_qint8_quantized.onnx",
    ("openvino", None): "openvino_model.xml",
    ("openvino", "int8"): "openvino_model_qint8_quantized.xml",
}
# The module each backend runs on; the package's extra named after the backend installs it and the exporters.
RUNTIMES = {"onnx": "onnxruntime", "openvino": "openvino"}
EXPORT_COMMAND = "python -m omnisearchsage_hf.backends.cli"


def check_backend(backend: str, allowed: tuple[str, ...] = BACKENDS) -> None:
    """Raise a ``ValueError`` naming ``backend`` and the choices unless it is one of ``allowed``."""
    if backend not in allowed:
        raise ValueError(f"`backend` must be one of {list(allowed)}, got {backend!r}.")


def export_name(backend: ExportBackend, quantize: Quantize | None = None) -> str:
    """The file name of an export, e.g. ``export_name("onnx", "int8") == "model_qint8_quantized.onnx"``."""
    check_backend(backend, EXPORT_BACKENDS)
    if quantize not in (None, "int8"):
        raise ValueError(f"`quantize` must be None (float32) or 'int8', got {quantize!r}.")
    return EXPORT_NAMES[backend, quantize]


def export_path(backend: ExportBackend, file_name: str) -> str:
    """The path of an export inside a tower folder, e.g. ``backbone/onnx/model.onnx``."""
    return f"{SENTENCE_TRANSFORMERS_BACKBONE}/{backend}/{file_name}"


def export_members(backend: ExportBackend, file_name: str) -> list[str]:
    """Every file an export consists of, relative to the tower folder (OpenVINO keeps its weights in a ``.bin``)."""
    path = export_path(backend, file_name)
    return [path, str(Path(path).with_suffix(".bin"))] if backend == "openvino" else [path]


def export_command(folder: str | os.PathLike, backend: ExportBackend, file_name: str) -> str:
    """The command that writes ``file_name`` (one of ``EXPORT_NAMES``) into ``folder``."""
    quantized = [q for (b, q), name in EXPORT_NAMES.items() if b == backend and name == file_name and q]
    flags = f" --quantize {quantized[0]}" if quantized else ""
    flags += " --calibration-queries queries.txt" if backend == "openvino" and quantized else ""
    return f"{EXPORT_COMMAND} {os.fspath(folder)} --backend {backend}{flags}"


def exported_files(folder: str | os.PathLike) -> list[str]:
    """The export files present in ``folder`` (relative paths, sorted)."""
    folder = Path(folder)
    return sorted(
        path.relative_to(folder).as_posix()
        for backend in EXPORT_BACKENDS
        for path in (folder / SENTENCE_TRANSFORMERS_BACKBONE / backend).glob("*")
        if path.is_file() and not path.name.startswith(".")
    )


def import_runtime(module: str, backend: ExportBackend) -> object:
    """Import ``module``, which ``backend`` needs; its absence is an error naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(
            f"The {backend!r} backend needs the `{module}` package: pip install 'omnisearchsage-hf[{backend}]'."
        ) from None


def record_files(folder: str | os.PathLike, names: list[str]) -> None:
    """Add ``names`` (relative paths) to ``folder``'s ``checksums.json``, keeping every file it already records."""
    recorded = read_checksums(local_resolver(folder), os.fspath(folder)) or {}
    write_checksums(folder, [*recorded, *names])


def check_recorded(folder: str | os.PathLike, names: list[str]) -> None:
    """Verify ``names`` against ``folder``'s ``checksums.json``; refuse one it does not record.

    A folder without ``checksums.json`` is loaded with a warning, as ``from_pretrained`` does; but an export
    missing from an existing manifest was not written by ``export_query_tower`` (or the folder was saved
    again after it), so it is refused rather than loaded unverified.
    """
    location = os.fspath(folder)
    files = read_checksums(local_resolver(folder), location)
    if files is None:
        return
    unrecorded = [name for name in names if name not in files and (Path(folder) / name).is_file()]
    if unrecorded:
        raise ValueError(
            f"{unrecorded} in {location!r} are not recorded in {CHECKSUMS_FILE}: they were not written by the "
            f"export command, or the folder was saved again after them. Export again with {EXPORT_COMMAND}."
        )
    verify_checksums(local_resolver(folder), location, files, names)


def copy_exports(source: str | os.PathLike, target: str | os.PathLike) -> list[str]:
    """Copy the exports of the tower folder ``source`` into the tower folder ``target``, with their checksums.

    For a folder written anew from a loaded tower (``publish`` saves the tower again, which writes no
    exports): the exports are verified against ``source``'s manifest, copied atomically, and added to
    ``target``'s ``checksums.json``.

    Returns:
        The copied files, relative to both folders (empty when ``source`` has no exports).
    """
    names = exported_files(source)
    if not names:
        return []
    check_recorded(source, names)
    verify_folder(target)
    source, target = Path(source), Path(target)
    for name in names:
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        replace_atomically(target / name, lambda tmp, name=name: shutil.copyfile(source / name, tmp))
    record_files(target, names)
    return names


__all__ = [
    "BACKENDS",
    "EXPORT_BACKENDS",
    "EXPORT_NAMES",
    "Backend",
    "ExportBackend",
    "Quantize",
    "RUNTIMES",
    "copy_exports",
    "export_command",
    "export_name",
    "exported_files",
]
