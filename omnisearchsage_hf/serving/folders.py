"""Checked reading of the folders serving writes (embeddings, indexes): errors that name the file and the fix.

Every file of such a folder is written atomically and its manifest last, with the SHA-256 of the files
it lists; these readers refuse a missing, unparsable or altered file instead of loading it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..data.tables import file_sha256


def read_json(path: Path, fix: str) -> Any:
    """Parse a JSON file of a serving folder; invalid JSON is a ``ValueError`` naming the file and ``fix``."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{str(path)!r} is not valid JSON ({error}). {fix}") from None


def read_manifest(path: Path, missing: str) -> dict:
    """The JSON manifest a serving folder writes last; raises ``FileNotFoundError`` (``missing`` says why) if absent."""
    if not path.is_file():
        raise FileNotFoundError(f"No {path.name} in {str(path.parent)!r}: {missing}")
    manifest = read_json(path, "It is written last by the command that made the folder: run that command again.")
    if not isinstance(manifest, dict):
        raise ValueError(f"{str(path)!r} must hold a JSON object, got {type(manifest).__name__}. Rebuild the folder.")
    return manifest


def check_file_sha256(path: Path, expected: Any, fix: str) -> None:
    """Raise unless ``path`` exists and its bytes hash to ``expected``, the SHA-256 recorded when it was written."""
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} is missing. {fix}")
    actual = file_sha256(path)
    if actual != expected:
        raise ValueError(
            f"{str(path)!r} is not the file that was written there (SHA-256 {actual[:16]}…, recorded "
            f"{str(expected)[:16]}…): it was truncated, edited or replaced. {fix}"
        )


__all__ = ["check_file_sha256", "read_json", "read_manifest"]
