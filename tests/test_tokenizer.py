"""The entity n-gram tokenizer: hand-worked golden examples, batch path vs string path, vocabularies."""

import json
import os
import random
import subprocess
import sys

import pytest
import torch
from transformers import AutoTokenizer

from omnisearchsage_hf import OmniSearchSageTokenizer, build_vocab
from omnisearchsage_hf.tokenization.ngrams import NgramVocabulary, prepare, segment, segment_batch, token_keys


def ngrams(text: str, max_chars: int = 1024):
    return segment(prepare(text, max_chars))


class TestGoldenExamples:
    def test_latin_with_accents(self):
        tokens = ngrams("Café  Crème")
        assert tokens.trigrams == ["#ca", "caf", "afé", "fé#", "é#c", "#cr", "crè", "rèm", "ème", "me#"]
        assert tokens.unigrams == ["café", "crème"]
        assert tokens.bigrams == ["café#crème"]

    def test_nfkc_and_casefold(self):
        # Ligature, full-width letters and German sharp s normalise to plain lowercase ASCII.
        assert ngrams("ﬁne ＡＢＣ Straße").unigrams == ["fine", "abc", "strasse"]

    def test_decomposed_accent_composes(self):
        assert ngrams("Cafe\u0301").unigrams == ngrams("Café").unigrams == ["café"]

    def test_cjk_ideographs_are_words(self):
        tokens = ngrams("北京欢迎你")
        assert tokens.unigrams == ["北", "京", "欢", "迎", "你"]
        assert tokens.bigrams == ["北#京", "京#欢", "欢#迎", "迎#你"]
        assert tokens.trigrams == ["#北京", "北京欢", "京欢迎", "欢迎你", "迎你#"]

    def test_cjk_next_to_latin(self):
        assert ngrams("iPhone手机壳").unigrams == ["iphone", "手", "机", "壳"]

    def test_thai_run_is_one_word(self):
        tokens = ngrams("ภาษาไทย")
        assert tokens.unigrams == ["ภาษาไทย"]
        assert tokens.trigrams == ["#ภา", "ภาษ", "าษา", "ษาไ", "าไท", "ไทย", "ทย#"]

    def test_arabic(self):
        assert ngrams("مرحبا بالعالم").unigrams == ["مرحبا", "بالعالم"]

    def test_emoji_are_word_characters(self):
        tokens = ngrams("I ❤️ NY")
        assert tokens.unigrams == ["i", "\u2764\ufe0f", "ny"]
        assert tokens.bigrams == ["i#\u2764\ufe0f", "\u2764\ufe0f#ny"]

    def test_punctuation_only(self):
        tokens = ngrams("!!! ...")
        assert tokens.trigrams == ["#!!", "!!!", "!!#", "!#.", "#..", "...", "..#"]
        assert tokens.unigrams == [] and tokens.bigrams == []

    def test_punctuation_splits_words_but_not_bigrams(self):
        tokens = ngrams("red,blue-green")
        assert tokens.unigrams == ["red", "blue", "green"]
        assert tokens.bigrams == ["red#blue", "blue#green"]

    def test_whitespace_runs_become_one_boundary(self):
        assert prepare(" a\t\n b  ", 100) == "#a#b#"

    @pytest.mark.parametrize("text", ["", "   ", "\n\t"])
    def test_blank_text_has_no_tokens(self, text):
        assert prepare(text, 100) == ""
        assert ngrams(text) == ([], [], [])

    def test_single_character(self):
        assert ngrams("a") == (["#a#"], ["a"], [])


@pytest.fixture(scope="module")
def corpus():
    rng = random.Random(0)
    pieces = ["copper", "sink", "Antique", "kettle", "北京", "欢迎", "ภาษา", "مرحبا", "❤️", "café", "!!", "a-b", "x"]
    return [" ".join(rng.choice(pieces) for _ in range(rng.randint(0, 8))) for _ in range(300)]


@pytest.fixture(scope="module")
def tokenizer(corpus):
    return build_vocab(corpus[:200], trigram_size=60, unigram_size=8, bigram_size=20, show_progress_bar=False)


def _bag_multisets(bags):
    ends = bags.offsets.tolist()[1:] + [len(bags.input_ids)]
    return [sorted(bags.input_ids[s:e].tolist()) for s, e in zip(bags.offsets.tolist(), ends, strict=True)]


class TestBatchPath:
    @pytest.mark.parametrize("oov_buckets", [0, 7])
    def test_batch_ids_equal_string_path(self, corpus, oov_buckets):
        tok = build_vocab(
            corpus[:200],
            trigram_size=60,
            unigram_size=8,
            bigram_size=20,
            oov_buckets=oov_buckets,
            show_progress_bar=False,
        )
        texts = corpus[200:]  # unseen texts: plenty of OOV n-grams
        bags = tok.encode_bags(texts)
        expected = [sorted(tok(text)["input_ids"]) for text in texts]
        assert _bag_multisets(bags) == expected
        assert any(expected)

    def test_list_field_shares_a_bag_without_crossing_items(self, tokenizer):
        bags = tokenizer.encode_bags([["copper sink", "kettle"]])
        expected = sorted(tokenizer("copper sink")["input_ids"] + tokenizer("kettle")["input_ids"])
        assert _bag_multisets(bags) == [expected]

    def test_missing_and_blank_give_empty_bags(self, tokenizer):
        bags = tokenizer.encode_bags([None, "", "copper", []])
        sizes = [len(b) for b in _bag_multisets(bags)]
        assert sizes[0] == sizes[1] == sizes[3] == 0 and sizes[2] > 0
        assert bags.input_ids.dtype == bags.offsets.dtype == torch.long

    def test_encode_fields(self, tokenizer):
        out = tokenizer.encode_fields([{"title": "copper"}, {"title": "sink", "brand": "x"}], ["title", "brand"])
        assert set(out) == {"title", "brand"}
        assert [len(b) for b in _bag_multisets(out["brand"])][0] == 0
        assert _bag_multisets(out["title"])[1] == sorted(tokenizer("sink")["input_ids"])

    def test_oov_dropped_without_buckets(self, tokenizer):
        assert tokenizer.encode_bags(["zzzzqqq"]).input_ids.numel() == 0

    def test_oov_buckets_in_range_and_stable_across_processes(self, corpus, tmp_path):
        tok = build_vocab(corpus, oov_buckets=5, show_progress_bar=False)
        ids = tok.encode_bags(["zzzzqqq wwwvvv"]).input_ids
        assert ids.numel() > 0 and all(tok.vocabulary.oov_offset <= i < tok.vocab_size for i in ids.tolist())
        tok.save_pretrained(tmp_path)
        script = (
            "import sys, json; sys.path.insert(0, {!r})\n"
            "from omnisearchsage_hf import OmniSearchSageTokenizer\n"
            "t = OmniSearchSageTokenizer.from_pretrained({!r})\n"
            "print(json.dumps(t.encode_bags(['zzzzqqq wwwvvv']).input_ids.tolist()))"
        ).format(str(__import__("pathlib").Path(__file__).parents[1]), str(tmp_path))
        env = {"PYTHONHASHSEED": "12345", "PATH": "/usr/bin:/bin"}
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True)
        assert json.loads(out.stdout.strip().splitlines()[-1]) == ids.tolist()

    def test_max_chars_bounds_a_huge_title(self, tokenizer):
        tok = OmniSearchSageTokenizer(vocabulary=tokenizer.vocabulary, max_chars_per_field=100)
        bags = tok.encode_bags(["copper sink " * 1000, ["copper " * 50, "sink " * 50, "kettle"]])
        sizes = [len(b) for b in _bag_multisets(bags)]
        assert 0 < sizes[0] <= 3 * 102 and 0 < sizes[1] <= 3 * 102

    @pytest.mark.parametrize("bad", [[1], [["ok", 2]], [{"a": 1}]])
    def test_non_string_text_names_the_field(self, tokenizer, bad):
        with pytest.raises(TypeError, match="'title' of item 0"):
            tokenizer.encode_bags(bad, field="title")


class TestVocabulary:
    def test_frequency_order_and_ties(self):
        tok = build_vocab(["b a", "b c", "b a"], show_progress_bar=False)
        assert tok.vocabulary.tokens["unigram"] == ["b", "a", "c"]  # 3, 2, 1 occurrences
        assert tok.vocabulary.tokens["bigram"] == ["b#a", "b#c"]
        # "#a#" and "b#a" both occur twice: the tie is broken by the string, so "#" (0x23) comes first.
        assert tok.vocabulary.tokens["trigram"][:3] == ["#b#", "#a#", "b#a"]

    def test_sizes_and_min_count(self):
        tok = build_vocab(["x y z", "x y", "x"], unigram_size=2, min_count=2, show_progress_bar=False)
        assert tok.vocabulary.tokens["unigram"] == ["x", "y"]
        tok = build_vocab(["x y z", "x y", "x"], min_count=2, show_progress_bar=False)
        assert tok.vocabulary.tokens["unigram"] == ["x", "y"]

    def test_reads_any_iterable_once(self):
        tok = build_vocab((t for t in ["copper sink", ["kettle"], None]), batch_size=1, show_progress_bar=False)
        assert set(tok.vocabulary.tokens["unigram"]) == {"copper", "sink", "kettle"}

    def test_pruning_keeps_the_head(self):
        texts = ["common"] * 50 + [f"rare{i}" for i in range(200)]
        tok = build_vocab(texts, unigram_size=3, prune_factor=2, batch_size=10, show_progress_bar=False)
        assert tok.vocabulary.tokens["unigram"][0] == "common" and len(tok.vocabulary.tokens["unigram"]) == 3

    @pytest.mark.parametrize("kwargs", [{"trigram_size": -1}, {"batch_size": 0}, {"min_count": 0}])
    def test_bad_arguments(self, kwargs):
        with pytest.raises(ValueError, match=next(iter(kwargs))):
            build_vocab(["a"], show_progress_bar=False, **kwargs)

    def test_duplicate_entries_rejected(self):
        with pytest.raises(ValueError, match="twice"):
            NgramVocabulary([], ["a", "a"], [])

    def test_bigram_entries_key_as_the_segmenter_keys_them(self):
        texts = [prepare(t, 1024) for t in ("café crème brûlée", "北京欢迎你", "i \u2764\ufe0f ny", "red-blue, green")]
        bigrams = [bigram for text in texts for bigram in segment(text).bigrams]
        assert len(bigrams) == 10
        assert token_keys("bigram", bigrams).tolist() == segment_batch(texts).bigram_keys.tolist()

    @pytest.mark.parametrize("bad", ["ab", "#b", "a#", "a#b#c", "a##b", ""])
    def test_malformed_bigram_entries_are_named(self, bad):
        with pytest.raises(ValueError, match=f"two words joined by '#', got {bad!r}"):
            token_keys("bigram", ["x#y", bad, "z#w"])


class TestSaveLoad:
    def test_round_trip_is_plain_text_and_identical(self, tokenizer, tmp_path, corpus):
        paths = tokenizer.save_vocabulary(str(tmp_path))
        assert [p.split("/")[-1] for p in paths] == ["trigrams.txt", "unigrams.txt", "bigrams.txt"]
        tokenizer.save_pretrained(tmp_path)
        assert (tmp_path / "unigrams.txt").read_text(encoding="utf-8").splitlines() == tokenizer.vocabulary.tokens[
            "unigram"
        ]
        assert not list(tmp_path.glob("*.bin")) and not list(tmp_path.glob("*.pkl"))
        loaded = AutoTokenizer.from_pretrained(tmp_path)
        assert isinstance(loaded, OmniSearchSageTokenizer)
        assert loaded.vocabulary.tokens == tokenizer.vocabulary.tokens
        assert loaded.max_chars_per_field == tokenizer.max_chars_per_field
        for a, b in zip(loaded.encode_bags(corpus), tokenizer.encode_bags(corpus), strict=True):
            assert torch.equal(a, b)
        assert loaded.get_vocab() == tokenizer.get_vocab() and len(loaded) == tokenizer.vocab_size

    def test_corrupted_vocabulary_file_is_named(self, tokenizer, tmp_path):
        tokenizer.save_pretrained(tmp_path)
        (tmp_path / "trigrams.txt").write_bytes(b"\xff\xfe\x00garbage")
        with pytest.raises(ValueError, match="trigrams.txt"):
            OmniSearchSageTokenizer.from_pretrained(tmp_path)

    def test_malformed_trigram_line_is_named(self, tokenizer, tmp_path):
        # Hand-made files (no recorded checksums): the line itself is checked.
        paths = tokenizer.save_vocabulary(str(tmp_path))
        (tmp_path / "trigrams.txt").write_text("abcd\n", encoding="utf-8")
        with pytest.raises(ValueError, match="trigrams.txt.*'abcd'"):
            OmniSearchSageTokenizer(*paths)

    def test_surrogates_never_reach_the_vocabulary_files(self, tmp_path):
        # A lone surrogate (from JSON, or an emoji cut in half) used to make save_pretrained fail halfway.
        tokenizer = build_vocab(["red \ud83d dress", "cup \ud83d\ude00"], show_progress_bar=False)
        assert "\ufffd" in tokenizer.vocabulary.tokens["unigram"]
        assert "\U0001f600" in tokenizer.vocabulary.tokens["unigram"]  # a pair is joined into its character
        tokenizer.save_pretrained(tmp_path)
        loaded = AutoTokenizer.from_pretrained(tmp_path)
        assert loaded.vocabulary.tokens == tokenizer.vocabulary.tokens
        for a, b in zip(loaded.encode_bags(["red \ud83d"]), loaded.encode_bags(["red \ufffd"]), strict=True):
            assert torch.equal(a, b)

    def test_a_vocabulary_that_cannot_be_saved_is_refused_before_any_file_is_written(self, tmp_path):
        with pytest.raises(ValueError, match="unigram vocabulary holds 'a\\\\ud800'.*surrogate"):
            NgramVocabulary([], ["a\ud800"], [])

    def test_files_are_readable_by_others_as_the_umask_allows(self, tokenizer, tmp_path):
        previous = os.umask(0o022)
        try:
            tokenizer.save_pretrained(tmp_path)
        finally:
            os.umask(previous)
        assert {p.name: oct(p.stat().st_mode & 0o777) for p in tmp_path.glob("*.txt")} == {
            name: "0o644" for name in ("trigrams.txt", "unigrams.txt", "bigrams.txt")
        }

    def test_missing_files(self):
        with pytest.raises(ValueError, match="build_vocab"):
            OmniSearchSageTokenizer()

    def test_token_strings_round_trip(self, tokenizer):
        ids = tokenizer("copper sink")["input_ids"]
        tokens = tokenizer.convert_ids_to_tokens(ids)
        assert tokenizer.convert_tokens_to_ids(tokens) == ids
        assert {t.split(":")[0] for t in tokens} == {"tri", "uni", "bi"}
        assert tokenizer.convert_tokens_to_string(tokens) == "copper sink"
        with pytest.raises(ValueError, match="kind tag"):
            tokenizer.convert_tokens_to_ids("copper")
