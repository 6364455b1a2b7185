"""The omnisearchsage-enrich command end to end: every step, the incremental state, and an atomic output."""

import json
import re
from importlib import import_module
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from omnisearchsage_hf.enrichment.cli import main

ROOT = Path(__file__).parents[1]


def test_the_console_entry_point_is_main():
    # pyproject.toml's [project.scripts] line (tomllib needs Python 3.11; the package supports 3.10).
    line = re.search(r'^omnisearchsage-enrich = "([\w.]+):(\w+)"$', (ROOT / "pyproject.toml").read_text(), re.M)
    module, function = line.groups()
    assert getattr(import_module(module), function) is main


def test_enrich_command_writes_every_field_and_updates_incrementally(
    tmp_path, capsys, monkeypatch, build_tiny_blip, write_image
):
    monkeypatch.delenv("OMNISEARCHSAGE_DEBUG", raising=False)
    image = write_image(tmp_path / "pin.png", 0)
    pq.write_table(
        pa.table(
            {
                "id": ["p1", "p2", "p3"],
                "title": ["Copper sink", None, None],
                "description": [None, None, "Lamp"],
                "caption": ["an old caption", None, None],
                "image": [image, image, None],
            }
        ),
        tmp_path / "entities.parquet",
    )
    pq.write_table(
        pa.table({"entity_id": ["p1", "p1", "p2", "unknown"], "board_title": ["Bathroom", "bathroom!", "Lamps", "X"]}),
        tmp_path / "saves.parquet",
    )
    pq.write_table(
        pa.table(
            {
                "entity_id": ["p1", "p1", "p3"],
                "query": ["copper sink", "sink", "desk lamp"],
                "engagement": ["click", "save", "click"],
                "count": [1, 1, 3],
                "date": ["2024-01-01", "2024-01-01", "2024-01-01"],
            }
        ),
        tmp_path / "logs_jan.parquet",
    )
    model = build_tiny_blip(tmp_path / "blip")
    common = ["--entities", str(tmp_path / "entities.parquet"), "--state", str(tmp_path / "state.parquet"), "--quiet"]
    argv = common + [
        "--out",
        str(tmp_path / "out" / "enriched.parquet"),
        "--board-saves",
        str(tmp_path / "saves.parquet"),
        "--engagements",
        str(tmp_path / "logs_jan.parquet"),
        "--as-of",
        "2024-01-31",
        "--half-life-days",
        "none",
        "--captions",
        "--caption-model",
        str(model),
        "--caption-cache",
        str(tmp_path / "cache"),
        "--caption-max-new-tokens",
        "5",
    ]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["entities"] == 3 and summary["captions"]["generated"] == 1
    out = pq.read_table(tmp_path / "out" / "enriched.parquet").to_pydict()
    assert out["id"] == ["p1", "p2", "p3"]
    assert out["board_titles"] == [["Bathroom"], ["Lamps"], []]
    assert out["engaged_queries"] == [["sink", "copper sink"], [], ["desk lamp"]]  # a save weighs 2 clicks
    # p2 is the only entity without a title or description that has an image; p1 keeps its own caption.
    assert out["caption"][0] == "an old caption" and isinstance(out["caption"][1], str) and out["caption"][2] is None
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["enriched.parquet"]  # no temporary file left

    # February's window is blended into the stored state: "copper sink" overtakes "sink" (2 + 3 > 3 clicks).
    pq.write_table(
        pa.table(
            {
                "entity_id": ["p1"],
                "query": ["copper sink"],
                "engagement": ["click"],
                "count": [2],
                "date": ["2024-02-10"],
            }
        ),
        tmp_path / "logs_feb.parquet",
    )
    argv = common + ["--out", str(tmp_path / "feb.parquet"), "--engagements", str(tmp_path / "logs_feb.parquet")]
    assert main(argv + ["--as-of", "2024-02-29"]) == 0
    feb = pq.read_table(tmp_path / "feb.parquet").to_pydict()
    assert feb["engaged_queries"] == [["copper sink", "sink"], [], ["desk lamp"]]
    assert "board_titles" not in feb  # only the steps given run

    # A user error is one line on stderr and exit status 2; --debug raises it with its traceback instead.
    capsys.readouterr()
    assert main(argv + ["--as-of", "2024-03-31", "--half-life-days", "30"]) == 2
    error = capsys.readouterr().err.splitlines()
    assert error[0].startswith("omnisearchsage-enrich: error: ") and "differs from the config the state" in error[0]
    assert "Traceback" not in "\n".join(error)
    with pytest.raises(ValueError, match="differs from the config the state was built with"):
        main(argv + ["--as-of", "2024-03-31", "--half-life-days", "30", "--debug"])
    no_as_of = common + ["--out", str(tmp_path / "x.parquet"), "--engagements", str(tmp_path / "logs_feb.parquet")]
    with pytest.raises(ValueError, match="`as_of`"):
        main(no_as_of + ["--debug"])
