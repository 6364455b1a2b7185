"""Atomic writes: a failed write leaves the previous file intact and no temporary file behind."""

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
