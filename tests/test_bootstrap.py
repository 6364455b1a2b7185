"""The paired bootstrap, and the per-question ranks of the real-data evaluators it is fed with."""

import collections
import itertools
import zlib
from pathlib import Path

import numpy as np
import pytest

from omnisearchsage_hf.data.amazon_pqa import load_epqa
from omnisearchsage_hf.data.xquad_r import load_xquad_r
from omnisearchsage_hf.evaluation import bootstrap
from omnisearchsage_hf.evaluation.benchmarks import (
    QuestionRanks,
    evaluate_epqa,
    evaluate_xquad,
    rank_epqa,
    rank_xquad,
    xquad_metrics,
)
from omnisearchsage_hf.evaluation.bootstrap import paired_bootstrap, resample_indices
from omnisearchsage_hf.evaluation.comparison import compare_ranks, load_ranks, per_question_values, save_ranks
from omnisearchsage_hf.evaluation.scoring import DenseScorer

ROOT = Path(__file__).resolve().parents[2] / "shared" / "data"
real_data = pytest.mark.skipif(not (ROOT / "xquad_r").is_dir(), reason=f"real data not found under {ROOT}")


# ---- the bootstrap ---------------------------------------------------------------------------------


def test_hand_computed_three_questions():
    # b beats a on one question of three. A resample's mean difference is (times question 3 is drawn) / 3,
    # Binomial(3, 1/3): P = 8/27, 12/27, 6/27, 1/27 for 0, 1/3, 2/3, 1; cumulative 0.296, 0.741, 0.963, 1.
    a, b = [0.0, 0.0, 0.0], [0.0, 0.0, 1.0]
    exact = collections.Counter(sum(b[i] - a[i] for i in draw) / 3 for draw in itertools.product(range(3), repeat=3))
    assert exact == {0.0: 8, 1 / 3: 12, 2 / 3: 6, 1.0: 1}
    result = paired_bootstrap(a, b, resamples=20_000, seed=0, confidence=0.95)
    assert (result.mean_a, result.mean_b, result.difference) == (0.0, pytest.approx(1 / 3), pytest.approx(1 / 3))
    assert (result.low, result.high) == (0.0, 1.0)  # 2.5% < 0.296; 97.5% > 0.963
    narrower = paired_bootstrap(a, b, resamples=20_000, seed=0, confidence=0.9)
    assert (narrower.low, narrower.high) == (0.0, pytest.approx(2 / 3))  # 0.741 < 95% < 0.963
    assert (narrower.confidence, narrower.resamples) == (0.9, 20_000)


def test_matches_a_slow_loop_over_the_documented_draws_whatever_the_chunking(monkeypatch):
    rng = np.random.default_rng(5)
    a, b = rng.random(7), rng.random(7)
    draws = np.random.default_rng(3).integers(0, 7, size=(201, 7))
    means = sorted(sum(b[i] - a[i] for i in row) / 7 for row in draws)

    def percentile(q):  # linear interpolation between order statistics, written out
        position = q * (len(means) - 1)
        below = int(position)
        return means[below] + (position - below) * (means[min(below + 1, len(means) - 1)] - means[below])

    monkeypatch.setattr(bootstrap, "_CHUNK_ELEMENTS", 10)  # one resample per chunk
    result = paired_bootstrap(a, b, resamples=201, seed=3, confidence=0.8)
    assert result.low == pytest.approx(percentile(0.1)) and result.high == pytest.approx(percentile(0.9))
    monkeypatch.undo()
    assert paired_bootstrap(a, b, resamples=201, seed=3, confidence=0.8) == result
    assert paired_bootstrap(a, b, resamples=201, seed=4, confidence=0.8) != result


def test_identical_systems_differ_by_exactly_zero():
    values = np.random.default_rng(0).random(50)
    result = paired_bootstrap(values, values.copy())
    assert result.difference == result.low == result.high == 0.0
    assert result.mean_a == result.mean_b == pytest.approx(values.mean())


def test_a_uniformly_better_system_has_an_interval_above_zero():
    rng = np.random.default_rng(1)
    a = rng.random(300)
    shifted = paired_bootstrap(a, a + 0.05)
    assert shifted.low == pytest.approx(0.05) and shifted.high == pytest.approx(0.05)  # constant gain: no spread
    noisy = paired_bootstrap(a, a + rng.uniform(0.0, 0.1, size=300))
    assert 0.0 < noisy.low < noisy.difference < noisy.high < 0.1
    worse = paired_bootstrap(a + rng.uniform(0.0, 0.1, size=300), a)
    assert worse.high < 0.0


def test_pairing_gives_a_tighter_interval_than_the_questions_spread():
    # Per-question values vary widely (question difficulty) but b is a little better on each: the paired
    # interval is narrow because difficulty cancels in b - a.
    rng = np.random.default_rng(2)
    difficulty = rng.random(400)
    result = paired_bootstrap(difficulty, difficulty + rng.uniform(0.0, 0.02, size=400))
    assert 0.0 < result.low and result.high - result.low < 0.005 < difficulty.std() / np.sqrt(400)


def test_stratified_resamples_keep_every_group_count():
    groups = np.array(["en", "th", "en", "zh", "th", "en", "zh", "en"])
    strata = bootstrap._strata(groups, len(groups))
    indices = resample_indices(strata, 500, np.random.default_rng(0))  # (500, 8)
    assert indices.shape == (500, 8)
    expected = collections.Counter(groups.tolist())
    assert all(collections.Counter(groups[row].tolist()) == expected for row in indices)
    plain = resample_indices([np.arange(8)], 500, np.random.default_rng(0))
    assert any(collections.Counter(groups[row].tolist()) != expected for row in plain)
    # Columns come stratum by stratum (en, th, zh sorted), each drawn from its own members.
    assert set(indices[:, -2:].ravel()) == {3, 6} and set(indices[:, :4].ravel()) == {0, 2, 5, 7}


def test_stratification_removes_the_between_group_spread():
    # b beats a by 1 on every "y" question and ties on every "x" one: per group nothing varies, so the
    # stratified mean difference is always 5/8; unstratified, the number of "y" questions drawn varies.
    groups = ["x"] * 3 + ["y"] * 5
    a, b = np.zeros(8), np.array([0.0] * 3 + [1.0] * 5)
    stratified = paired_bootstrap(a, b, groups=groups)
    assert stratified.low == pytest.approx(5 / 8) and stratified.high == pytest.approx(5 / 8)
    plain = paired_bootstrap(a, b)
    assert plain.low < 5 / 8 < plain.high


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"a": [1.0, 2.0], "b": [1.0]}, "got 2 and 1 values"),
        ({"a": [], "b": []}, "`a` must be a non-empty 1-D"),
        ({"a": [[1.0], [2.0]], "b": [1.0, 2.0]}, r"`a` .* shape \(2, 1\)"),
        ({"a": [1.0, 2.0], "b": [1.0, float("nan")]}, "`b` must be finite; position 1"),
        ({"a": [float("inf"), 2.0], "b": [1.0, 2.0]}, "`a` must be finite; position 0 holds inf"),
        ({"a": [1.0], "b": [1.0], "resamples": 0}, "`resamples` must be an int >= 1"),
        ({"a": [1.0], "b": [1.0], "resamples": 10.0}, "`resamples` must be an int >= 1"),
        ({"a": [1.0], "b": [1.0], "resamples": True}, "`resamples` must be an int >= 1"),
        ({"a": [1.0], "b": [1.0], "confidence": 95}, r"`confidence` must lie in \(0, 1\)"),
        ({"a": [1.0], "b": [1.0], "confidence": 0.0}, r"`confidence` must lie in \(0, 1\)"),
        ({"a": [1.0, 2.0], "b": [1.0, 2.0], "groups": ["en"]}, r"`groups` must hold one label per question"),
    ],
)
def test_bad_inputs_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        paired_bootstrap(**kwargs)


# ---- per-question ranks of the evaluators ----------------------------------------------------------


def noise(keys, dim=4):
    """A fixed random vector per string (seeded by its CRC32), scaled to 0.1: unrelated texts, spread ranks."""
    return np.stack([np.random.default_rng(zlib.crc32(key.encode())).standard_normal(dim) * 0.1 for key in keys])


def planted_scorer(columns, query_ids, row_ids, sign):
    """Noise plus one-hots of ids: a question scores ``sign[id]`` (default 0) on the rows answering it, so its
    relevant row ranks first (+1), last (-1) or at random (0)."""

    def one_hots(id_sets, value):
        out = np.zeros((len(id_sets), len(columns)), dtype=np.float32)
        for row, ids in enumerate(id_sets):
            out[row, [columns[i] for i in ids]] = [value(i) for i in ids]
        return out

    return DenseScorer(
        lambda texts: np.hstack([one_hots([query_ids[t] for t in texts], lambda i: sign.get(i, 0.0)), noise(texts)]),
        lambda rows: np.hstack(
            [one_hots([row_ids[r["id"]] for r in rows], lambda i: 1.0), noise([r["id"] for r in rows])]
        ),
    )


@real_data
def test_xquad_per_question_ranks_align_with_ids_and_average_to_the_metrics():
    languages = ["en", "th"]
    data = load_xquad_r(ROOT, languages=languages)
    ids = sorted({q["id"] for q in data.questions})
    sign = {question_id: (1.0, -1.0, 0.0)[i % 3] for i, question_id in enumerate(ids)}
    query_ids, row_ids = collections.defaultdict(set), collections.defaultdict(set)
    for q in data.questions:
        query_ids[q["question"]].add(q["id"])
        row_ids[q["gold_id"]].add(q["id"])
    columns = {question_id: i for i, question_id in enumerate(ids)}
    scorer = planted_scorer(columns, query_ids, row_ids, sign)

    ranks = rank_xquad(scorer, ROOT, languages=languages)
    assert list(ranks.ranks) == list(ranks.pooled) == list(ranks.question_ids) == languages
    assert ranks.question_ids["en"] == ranks.question_ids["th"]  # parallel questions, one order
    pool = collections.Counter(s["language"] for s in data.sentences)
    for language in languages:
        planted = np.array([sign[i] for i in ranks.question_ids[language]])  # (n,)
        rank, pooled = ranks.ranks[language], ranks.pooled[language]
        assert len(rank) == len(pooled) == 374 and pooled.shape[1] == 2
        assert (rank[planted == 1.0] == 0).all()
        assert (rank[planted == -1.0] > pool[language] - 20).all()  # last but for a few excluded twins
        assert 10 < np.median(rank[planted == 0.0]) < pool[language] - 10
        np.testing.assert_array_equal(np.sort(pooled[planted == 1.0], axis=1), [[0, 1]] * (planted == 1.0).sum())

    metrics = evaluate_xquad(scorer, ROOT, languages=languages)
    assert xquad_metrics(ranks) == metrics
    for language in languages:
        rank = ranks.ranks[language]
        assert metrics[f"xquad_r_{language}_mrr"] == pytest.approx(np.mean(1.0 / (rank + 1)))
        for k in (1, 10, 100):
            assert metrics[f"xquad_r_{language}_recall@{k}"] == pytest.approx(np.mean(rank < k))
        per_question = (ranks.pooled[language] < 10).mean(axis=1)  # (n,) fraction of golds in the top 10
        assert metrics[f"xquad_r_pooled_{language}_recall@10"] == pytest.approx(per_question.mean())
    # Equal question counts per language: the mean over languages is the mean over all questions.
    assert metrics["xquad_r_mrr"] == pytest.approx(np.mean(1.0 / (np.concatenate(list(ranks.ranks.values())) + 1)))


@real_data
def test_xquad_metrics_refuses_a_pooled_k_without_pooled_ranks():
    ranks = rank_xquad(lambda texts, rows: np.zeros((len(texts), len(rows))), ROOT, languages=["th"], pooled=False)
    assert ranks.pooled == {} and ranks.ranks["th"].min() > 800  # all tie: ties count against the gold
    metrics = xquad_metrics(ranks, pooled_k=None)
    assert metrics["xquad_r_th_mrr"] == metrics["xquad_r_mrr"] < 0.002 and not any("pooled" in key for key in metrics)
    with pytest.raises(ValueError, match=r"`pooled_k=10` needs pooled ranks .* pooled=True"):
        xquad_metrics(ranks)


@real_data
def test_epqa_per_question_ranks_align_with_ids_and_average_to_the_metrics():
    data = load_epqa(ROOT)
    test = [q for q in data.questions if q["split"] == "test"]
    sign = {q["asin"]: 0.0 for q in test} | {q["asin"]: 1.0 for q in test[::4]}  # a product's questions agree
    columns = {p["id"]: i for i, p in enumerate(data.products)}
    query_ids = collections.defaultdict(set)
    for q in data.questions:
        query_ids[q["question"]].add(q["asin"])
    scorer = planted_scorer(columns, query_ids, {p["id"]: {p["id"]} for p in data.products}, sign)

    ranks = rank_epqa(scorer, ROOT)
    assert list(ranks.ranks) == ["en"] and ranks.pooled == {}
    assert ranks.question_ids["en"] == [q["qid"] for q in test]
    rank = ranks.ranks["en"]
    planted = np.array([sign[q["asin"]] for q in test])
    assert (rank[planted == 1.0] == 0).all() and (rank[planted == 0.0] > 0).mean() > 0.9
    metrics = evaluate_epqa(scorer, ROOT)
    assert metrics["epqa_mrr"] == pytest.approx(np.mean(1.0 / (rank + 1)))
    assert [metrics[f"epqa_recall@{k}"] for k in (1, 10, 100)] == pytest.approx(
        [np.mean(rank < k) for k in (1, 10, 100)]
    )


# ---- comparing two systems' ranks -------------------------------------------------------------------


def two_language_ranks(en: list[int], de: list[int], pooled: list[list[int]] | None = None) -> QuestionRanks:
    ids = [f"q{i}" for i in range(len(en))]
    result = QuestionRanks({"en": ids, "de": ids}, {"en": np.array(en), "de": np.array(de)})
    if pooled is not None:
        result.pooled.update({"en": np.array(pooled), "de": np.array(pooled)})
    return result


def test_compare_ranks_by_hand_averages_each_question_over_its_languages():
    # Question q0: ranks (0, 1) → reciprocal ranks (1, 1/2), mean 3/4; q1: (3, 0) → (1/4, 1), mean 5/8.
    reference = two_language_ranks([0, 3], [1, 0], pooled=[[0, 20], [30, 40]])
    system = two_language_ranks([0, 0], [0, 0], pooled=[[0, 1], [2, 40]])
    ids, values = per_question_values(reference, "mrr")
    assert ids == ["q0", "q1"] and values.tolist() == [0.75, 0.625]
    metrics = xquad_metrics(reference, ks=(1, 10))
    assert metrics["xquad_r_mrr"] == pytest.approx(values.mean())  # the languages' mean
    result = compare_ranks(reference, system, resamples=2000, seed=0)
    assert set(result) == {"mrr", "recall@1", "recall@10", "recall@100", "pooled_recall@10"}
    # System: every question at rank 0 → 1.0; differences per question 0.25 and 0.375.
    mrr = result["mrr"]
    assert (mrr.mean_a, mrr.mean_b, mrr.difference) == (0.6875, 1.0, pytest.approx(0.3125))
    # Two questions: a resample takes 0, 1 or 2 copies of q0 → means 0.375, 0.3125, 0.25; the interval spans them.
    assert (mrr.low, mrr.high) == (pytest.approx(0.25), pytest.approx(0.375))
    # Recall@1: reference hits (1, 0) for q0 and (0, 1) for q1 → 1/2 each; system 1 each.
    assert result["recall@1"].difference == pytest.approx(0.5) and result["recall@1"].low == pytest.approx(0.5)
    assert result["recall@100"].difference == 0.0
    # Pooled: fraction of the two golds in the top 10: reference (1/2, 0), system (1, 1/2).
    assert result["pooled_recall@10"].difference == pytest.approx(0.5)
    assert compare_ranks(reference, system, measures=["mrr"], resamples=2000, seed=0)["mrr"] == mrr


def test_compare_ranks_refuses_different_questions_and_missing_pooled_ranks():
    reference = two_language_ranks([0, 3], [1, 0])
    other = QuestionRanks({"en": ["q0", "q9"]}, {"en": np.array([0, 1])})
    with pytest.raises(ValueError, match=r"different questions \(e.g. \['q1', 'q9'\]\)"):
        compare_ranks(reference, other, measures=["mrr"])
    assert "pooled_recall@10" not in compare_ranks(reference, reference)
    with pytest.raises(ValueError, match="needs pooled ranks"):
        compare_ranks(reference, reference, measures=["pooled_recall@10"])
    with pytest.raises(ValueError, match="Unknown measure 'ndcg'"):
        per_question_values(reference, "ndcg")


def test_ranks_round_trip_through_npz_without_pickle(tmp_path):
    ranks = two_language_ranks([0, 3], [1, 0], pooled=[[0, 20], [30, 40]])
    save_ranks(ranks, tmp_path / "ranks.npz")
    loaded = load_ranks(tmp_path / "ranks.npz")
    assert loaded.question_ids == ranks.question_ids and list(loaded.ranks) == ["en", "de"]
    for language in ("en", "de"):
        np.testing.assert_array_equal(loaded.ranks[language], ranks.ranks[language])
        np.testing.assert_array_equal(loaded.pooled[language], ranks.pooled[language])
    assert not list(tmp_path.glob("*.tmp*")) and (tmp_path / "ranks.npz").stat().st_size > 0
