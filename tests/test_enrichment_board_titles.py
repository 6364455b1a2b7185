"""Board-title ranking on hand-worked examples: near-duplicates, the score, ties, and the 10-title cap."""

import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from omnisearchsage_hf.data.keys import StringCatalogue, encode_strings, string_keys
from omnisearchsage_hf.enrichment import board_titles


def saves_table(rows: list[tuple[str, str | None]]) -> pa.Table:
    return pa.table(
        {
            "entity_id": pa.array([e for e, _ in rows], pa.string()),
            "board_title": pa.array([t for _, t in rows], pa.string()),
        }
    )


def as_dict(table: pa.Table) -> dict[str, list[str]]:
    return dict(zip(table.column("id").to_pylist(), table.column("board_titles").to_pylist(), strict=True))


def test_near_duplicates_collapse_and_the_score_trades_frequency_against_prevalence():
    saves = saves_table(
        [
            ("p1", "Kitchen Ideas"),
            ("p1", "kitchen  ideas!"),
            ("p1", "KITCHEN IDEAS"),
            ("p1", "Home"),
            ("p1", "DIY"),
            ("p2", "home"),
            ("p2", "Home"),
            ("p2", "Garden"),
        ]
    )
    # N = 8 saves; df: kitchen 3, ideas 3, home 3, diy 1, garden 1.
    # p1: kitchen ideas (c=3): -ln 4 * ln(8/3) = -1.360; home (c=1): -ln 2 * ln(8/3) = -0.680;
    #     diy (c=1): -ln 2 * ln 8 = -1.441  ->  DIY, Kitchen Ideas, Home.
    # p2: home (c=2): -ln 3 * ln(8/3) = -1.078; garden: -1.441  ->  Garden, Home.
    assert -math.log(2) * math.log(8) < -math.log(4) * math.log(8 / 3)  # the hand-computed order above
    result = as_dict(board_titles(saves))
    # Each collapsed title is written as first seen: "Kitchen Ideas" (p1's first) and "Home" (p1's, before p2's).
    assert result == {"p1": ["DIY", "Kitchen Ideas", "Home"], "p2": ["Garden", "Home"]}


def test_ties_break_by_word_count_then_length_then_spelling():
    titles = ["lamps", "tan coat", "red dress", "art", "Summer Beach Party", "big hats", "blue shoes"]
    # Every word occurs in one save and every title once: all scores are -ln 2 * ln 7, an exact tie.
    result = as_dict(board_titles(saves_table([("p1", t) for t in titles])))
    assert result["p1"] == ["Summer Beach Party", "blue shoes", "red dress", "big hats", "tan coat", "lamps", "art"]


def test_more_than_ten_titles_keeps_the_ten_best():
    # Title i is saved i times by p1 and 12 - i times by p2: every title has 12 saves and its own word, so all
    # titles have the same specificity ln(N / 12) and each entity's ranking is by its own count, most first.
    rows = []
    for i in range(1, 13):
        rows += [("p1", f"board{i}")] * i + [("p2", f"board{i}")] * (12 - i)
    result = as_dict(board_titles(saves_table(rows)))
    assert result["p1"] == [f"board{i}" for i in range(12, 2, -1)]
    assert result["p2"] == [f"board{i}" for i in range(1, 11)]  # counts 11..2; board11 (1) and board12 (0) go
    assert as_dict(board_titles(saves_table(rows), max_titles=3))["p1"] == ["board12", "board11", "board10"]


def test_titles_without_words_and_null_rows_are_dropped():
    saves = saves_table([("p1", "!!!"), ("p1", ""), ("p1", None), ("p2", "   "), ("p1", "Rustic décor 北京")])
    result = as_dict(board_titles(saves))
    assert result == {"p1": ["Rustic décor 北京"]}
    assert board_titles(saves_table([("p1", "?")])).num_rows == 0


def test_streamed_batches_and_parquet_files_give_the_same_result(tmp_path):
    rows = [(f"p{i % 7}", f"Board {i % 5} {'x' * (i % 3)}") for i in range(200)]
    saves = saves_table(rows)
    expected = as_dict(board_titles(saves))
    assert as_dict(board_titles(saves, batch_size=16)) == expected
    pq.write_table(saves, tmp_path / "saves.parquet", row_group_size=50)
    assert as_dict(board_titles(tmp_path / "saves.parquet", batch_size=30)) == expected
    assert len(expected) == 7 and all(1 <= len(titles) <= 10 for titles in expected.values())


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="max_titles"):
        board_titles(saves_table([("p1", "a")]), max_titles=0)
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['board_title'\]"):
        board_titles(pa.table({"entity_id": ["p1"], "title": ["a"]}))
    with pytest.raises(FileNotFoundError, match="missing.parquet"):
        board_titles(tmp_path / "missing.parquet")


def test_string_keys_are_stable_and_the_catalogue_keeps_first_seen_order():
    keys = string_keys(pa.array(["red", "red", "", "rouge", "ré"]))
    assert keys[0] == keys[1] and keys[2] == 0 and len(set(keys.tolist())) == 4
    # Hard-coded: the same string must hash the same in every process, on every machine, for both string types.
    assert keys[0] == 18158399025328476701
    assert string_keys(pa.array(["red"], pa.large_string()))[0] == keys[0]
    catalogue = StringCatalogue()
    first = encode_strings(pa.array(["b", "a", "b"]), catalogue)
    second = encode_strings(pa.array(["c", "a"]), catalogue)
    assert catalogue.strings().to_pylist() == ["b", "a", "c"]
    assert catalogue.lookup(first).tolist() == [0, 1, 0] and catalogue.lookup(second).tolist() == [2, 1]
    with pytest.raises(KeyError):
        catalogue.lookup(string_keys(pa.array(["never added"])))
