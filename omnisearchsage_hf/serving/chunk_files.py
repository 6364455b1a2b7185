"""Chunk files of batch inference: one ``.npy`` per chunk of table rows, bound to the run that computed it.

A chunk's file name carries a hash of the run's plan (table content, model, chunk size) and of the
file's own bytes, so a resumed run reuses only intact chunks of the same plan and never mixes runs.
"""

from __future__ import annotations

import hashlib
import io
import logging
from pathlib import Path

import numpy as np

from ..atomic import replace_atomically

logger = logging.getLogger(__name__)

CHUNKS = "chunks"  # the folder of chunk files inside a batch-inference output folder


def chunk_rows(num_rows: int, chunk_size: int, chunk: int) -> range:
    """The table rows of chunk number ``chunk``."""
    return range(chunk * chunk_size, min((chunk + 1) * chunk_size, num_rows))


def chunk_tag(plan_id: str, data: bytes) -> str:
    """Binds a chunk file's bytes to the plan they were computed under."""
    return hashlib.sha256(plan_id.encode() + data).hexdigest()[:16]


def write_chunk(output_dir: Path, chunk: int, plan_id: str, vectors: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.save(buffer, vectors, allow_pickle=False)
    data = buffer.getvalue()
    path = output_dir / CHUNKS / f"{chunk:06d}-{chunk_tag(plan_id, data)}.npy"
    replace_atomically(path, lambda tmp: Path(tmp).write_bytes(data))


def read_chunk(output_dir: Path, chunk: int, plan_id: str) -> np.ndarray | None:
    """The vectors of ``chunk`` if a file of it was written under this plan and is intact, else None.

    Any other file of the chunk (truncated, edited, of another plan) is removed with a warning.
    """
    found = None
    for path in sorted((output_dir / CHUNKS).glob(f"{chunk:06d}-*.npy")):
        data = path.read_bytes()
        if found is None and path.stem.split("-", 1)[1] == chunk_tag(plan_id, data):
            found = np.load(io.BytesIO(data), allow_pickle=False)
        else:
            logger.warning("%r is not an intact chunk of this run (corrupt or copied in); recomputing it.", str(path))
            path.unlink()
    return found


__all__ = ["CHUNKS", "chunk_rows", "chunk_tag", "read_chunk", "write_chunk"]
