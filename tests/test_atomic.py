"""Atomic writes: a failed write leaves the previous file intact and no temporary file behind, and the
file gets the umask's mode whatever the writer does."""

import os
import tempfile

import numpy as np
import pytest

from omnisearchsage_hf.atomic import replace_atomically, save_npy_atomically, write_text_atomically


def test_failed_write_keeps_the_previous_file(tmp_path):
    target = write_text_atomically(tmp_path / "metrics.json", '{"recall@10": 0.5}')

    def crash(tmp):
        with open(tmp, "w") as handle:
            handle.write('{"recall@10": 0.')  # half a file, then the process "dies"
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        replace_atomically(target, crash)
    assert target.read_text() == '{"recall@10": 0.5}'
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_npy_keeps_its_name_and_loads_without_pickle(tmp_path):
    array = np.arange(6, dtype=np.float32).reshape(2, 3)
    path = save_npy_atomically(tmp_path / "chunk.npy", array)
    assert [p.name for p in tmp_path.iterdir()] == ["chunk.npy"]
    assert np.array_equal(np.load(path, allow_pickle=False), array)


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)])
def test_files_get_the_umask_mode_even_from_a_private_writer(tmp_path, umask, mode):
    def private_writer(tmp):  # like safetensors: write a 0o600 temporary file, rename it onto the target
        with tempfile.NamedTemporaryFile("w", dir=tmp_path, delete=False) as handle:
            handle.write("x")
        os.replace(handle.name, tmp)

    previous = os.umask(umask)
    try:
        paths = [
            replace_atomically(tmp_path / "private.txt", private_writer),
            write_text_atomically(tmp_path / "text.json", "{}"),
            save_npy_atomically(tmp_path / "array.npy", np.zeros(2)),
        ]
    finally:
        os.umask(previous)
    assert {path.name: oct(path.stat().st_mode & 0o777) for path in paths} == {path.name: oct(mode) for path in paths}
