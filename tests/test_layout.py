"""The package's layering: consumers of a finished run never load the trainer or the world generator."""

import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parents[1] / "omnisearchsage_hf"


@pytest.mark.parametrize("consumer", ["omnisearchsage_hf.serving", "omnisearchsage_hf.publishing"])
def test_consumers_do_not_import_the_trainer(consumer):
    script = (
        f"import {consumer}, sys\n"
        "loaded = [m for m in ('omnisearchsage_hf.training.trainer', 'omnisearchsage_hf.data.synthetic') "
        "if m in sys.modules]\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True)


def test_no_module_is_a_grab_bag():
    sizes = {path.relative_to(PACKAGE).as_posix(): len(path.read_text().splitlines()) for path in PACKAGE.rglob("*.py")}
    assert max(sizes.values()) <= 460, sorted(sizes.items(), key=lambda item: -item[1])[:3]


def test_data_is_the_lowest_floor_it_can_be():
    """``data/`` reads and makes tables; it imports neither training, evaluation, publishing nor serving."""
    for path in (PACKAGE / "data").rglob("*.py"):
        text = path.read_text()
        for floor in ("training", "evaluation", "publishing", "serving"):
            assert f"from ..{floor}" not in text and f"from ...{floor}" not in text, (path.name, floor)
