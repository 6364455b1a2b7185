"""Atomic file writes: a file is either absent, the previous version, or complete; never half-written.

Every writer in the package (data preparation, batch inference, indices, enrichment tables, benchmark
results) goes through ``replace_atomically``: write to a temporary name in the same folder, then
``os.replace`` it onto the target, which is atomic on POSIX and Windows. A killed process leaves at most a
hidden ``.<name>.tmp-<pid>`` file behind, never a truncated target. (The modeling and tokenization files
keep their own copy of this, because they are copied into saved model folders and import nothing from
the package.)

The target gets the mode the process umask gives any new file (0o644 under the usual umask 022), whatever
the writer does: a writer that creates its file through ``tempfile`` or a rename of its own (safetensors
does) would otherwise leave 0o600, which survives the rename and hides the file from a service running
as another user.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np


def replace_atomically(path: str | os.PathLike, write: Callable[[str], Any]) -> Path:
    """Call ``write(temp_path)``, then rename the temporary file onto ``path``; returns ``path``.

    The parent folder must exist. If ``write`` raises, the temporary file is removed and ``path`` is
    left as it was. The result has the umask's mode for a new file (see the module docstring).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        # Creating the file first reads the umask (and any default ACL) as the kernel applies it, with none
        # of `os.umask`'s set-and-restore race against other threads.
        descriptor = os.open(tmp, os.O_CREAT | os.O_TRUNC | os.O_WRONLY, 0o666)
        try:
            mode = os.fstat(descriptor).st_mode & 0o777
        finally:
            os.close(descriptor)
        write(str(tmp))
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_text_atomically(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return replace_atomically(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def save_npy_atomically(path: str | os.PathLike, array: np.ndarray) -> Path:
    """Save ``array`` as ``.npy`` at ``path`` atomically, without pickle."""

    def write(tmp: str) -> None:
        with open(tmp, "wb") as handle:  # a handle, so numpy does not append ".npy" to the temporary name
            np.save(handle, array, allow_pickle=False)

    return replace_atomically(path, write)


__all__ = ["replace_atomically", "save_npy_atomically", "write_text_atomically"]
