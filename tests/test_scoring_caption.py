"""Caption metrics: hand-computed corpora, the fallback tokenizer (always), and a
cross-check against pycocoevalcap's own Java pipeline where Java is installed."""

from __future__ import annotations

import math
import shutil

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mcit.errors import McitError
from mcit.scoring import caption as caption_mod
from mcit.scoring import caption_scores, evaluate_captions, score_task, tokenize_fallback

HAS_JAVA = shutil.which("java") is not None
needs_java = pytest.mark.skipif(not HAS_JAVA, reason="the PTB tokenizer needs 'java' on PATH")

TINY, SMALL = 1e-15, 1e-9  # pycocoevalcap's BLEU smoothing constants
BETA2 = 1.2**2  # ROUGE-L beta


def fb(refs, cands):
    return caption_scores(refs, cands, tokenizer="fallback")


# ------------------------------------------------------------- hand-computed cases
def test_perfect_candidates_two_images():
    refs = {"1": ["a man rides a brown horse"], "2": ["two dogs play in snow"]}
    out = fb(refs, {"1": "A man rides a brown horse.", "2": "Two dogs play in snow"})
    for n in range(1, 5):
        assert out[f"BLEU-{n}"] == pytest.approx(1.0, abs=1e-8)
    assert out["ROUGE-L"] == 1.0
    # every n-gram occurs in one image of two: idf = log 2 > 0, cosine 1 for n = 1..4
    assert out["CIDEr"] == pytest.approx(10.0)


def test_cider_averages_over_n_1_to_4_even_for_short_captions():
    # "a b" has no 3- or 4-grams: those terms are 0, so a perfect match scores
    # 10 * (1 + 1 + 0 + 0) / 4 = 5.
    out = fb({"1": ["a b"], "2": ["c d"]}, {"1": "a b", "2": "c d"})
    assert out["CIDEr"] == pytest.approx(5.0)


def test_cider_single_image_corpus_is_zero():
    # idf = log(#images) - log(df) = log 1 - log 1 = 0 for every reference n-gram
    out = fb({"x": ["a man rides a horse"]}, {"x": "a man rides a horse"})
    assert out["CIDEr"] == 0.0
    assert out["ROUGE-L"] == 1.0


def test_cider_identical_vocabulary_across_images_is_zero():
    out = fb({"1": ["a cat"], "2": ["a cat"]}, {"1": "a cat", "2": "a cat"})
    assert out["CIDEr"] == 0.0  # df = 2 = #images for every n-gram


def test_empty_candidate():
    out = fb({"1": ["a cat on a mat"], "2": ["a dog"]}, {"1": "", "2": ""})
    assert out["BLEU-1"] == 0.0 and out["BLEU-4"] == 0.0
    assert out["ROUGE-L"] == 0.0
    assert out["CIDEr"] == 0.0


def test_repeated_words_bleu_and_rouge_by_hand():
    out = fb({"1": ["the cat is on the mat"]}, {"1": "the the the the"})
    # clipped unigram precision 2/4; brevity penalty exp(1 - 6/4)
    ratio = (4 + TINY) / (6 + SMALL)
    bp = math.exp(1 - 1 / ratio)
    assert out["BLEU-1"] == pytest.approx((2 + TINY) / (4 + SMALL) * bp, rel=1e-12)
    # no bigram matches: BLEU-2 = sqrt(p1 * tiny/(3 + small)) * bp
    p2 = (0 + TINY) / (3 + SMALL)
    assert out["BLEU-2"] == pytest.approx(math.sqrt((2 + TINY) / (4 + SMALL) * p2) * bp)
    # ROUGE-L: LCS = 2, precision 2/4, recall 2/6
    p, r = 2 / 4, 2 / 6
    assert out["ROUGE-L"] == pytest.approx((1 + BETA2) * p * r / (r + BETA2 * p))


def test_single_word_candidate_smoothing_quirk():
    # 0 bigrams guessed, 0 correct: (0 + 1e-15) / (0 + 1e-9) = 1e-6 per missing order
    out = fb({"1": ["dog"]}, {"1": "dog"})
    assert out["BLEU-1"] == pytest.approx(1.0)
    assert out["BLEU-2"] == pytest.approx(1e-3)
    assert out["BLEU-3"] == pytest.approx(1e-4)
    assert out["BLEU-4"] == pytest.approx(10**-4.5)
    assert out["ROUGE-L"] == 1.0


def test_bleu_closest_reference_length_and_identical_references():
    # candidate of 3 words; refs of 2 and 6 words: closest is 2 -> no brevity penalty
    out = fb({"1": ["red car", "a very long red car here"]}, {"1": "red car here"})
    assert out["BLEU-1"] == pytest.approx((3 + TINY) / (3 + SMALL))
    same = fb({"1": ["a red car", "a red car"]}, {"1": "a red car"})
    assert same["BLEU-3"] == pytest.approx(1.0, abs=1e-8)
    assert same["ROUGE-L"] == 1.0


def test_all_references_without_tokens_do_not_crash():
    out = fb({"1": ["."], "2": ["!"]}, {"1": "a", "2": "b"})
    assert out["CIDEr"] == 0.0


def test_keys_and_inputs_are_checked():
    with pytest.raises(McitError, match="different ids"):
        fb({"1": ["a"]}, {"2": "a"})
    with pytest.raises(McitError, match="non-empty list"):
        fb({"1": []}, {"1": "a"})
    with pytest.raises(McitError, match="non-empty list"):
        fb({"1": "a cat"}, {"1": "a"})
    assert fb({}, {}) == {m: 0.0 for m in caption_mod.CAPTION_METRICS}


# ----------------------------------------------------------------- fallback path
def test_fallback_tokenizer_rules():
    got = tokenize_fallback(
        [
            'A man\'s dog (big) "runs" fast.',
            "It's the dogs' bowl, isn't it?",
            "A dog... running!!! fast??",
            "50% off at 5:30 p.m. today",
            "Two--three people -- standing",
            "",
        ]
    )
    assert got == [
        "a man 's dog -lrb- big -rrb- runs fast",  # "-LRB-" in the list never matches
        "it 's the dogs bowl is n't it",
        "a dog running !!! fast ??",  # only single "!" "?" tokens are dropped
        "50 % off at 5:30 p.m. today",
        "two three people standing",
        "",
    ]


def test_fallback_path_records_tokenizer_and_matches_pretokenised_scores():
    refs = {"1": ["A man riding a horse.", "A person on a horse!"], "2": ["Two dogs, playing."]}
    cands = {"1": "a man on a horse", "2": "Two dogs play."}
    scores, info = evaluate_captions(refs, cands, tokenizer="fallback")
    assert info == {"tokenizer": "fallback"}
    pre = {"1": ["a man riding a horse", "a person on a horse"], "2": ["two dogs playing"]}
    assert scores == fb(pre, {"1": "a man on a horse", "2": "two dogs play"})
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    res = {"1": ["a man on a horse"], "2": ["two dogs play"]}
    bleu, _ = Bleu(4).compute_score(pre, res, verbose=0)
    assert [scores[f"BLEU-{i}"] for i in range(1, 5)] == bleu
    assert scores["CIDEr"] == Cider().compute_score(pre, res)[0]
    assert scores["ROUGE-L"] == Rouge().compute_score(pre, res)[0]


def test_auto_without_java_uses_fallback(monkeypatch):
    monkeypatch.setattr(caption_mod.shutil, "which", lambda name: None)
    _, info = evaluate_captions({"1": ["a cat"]}, {"1": "a cat"}, tokenizer="auto")
    assert info["tokenizer"] == "fallback"
    with pytest.raises(McitError, match="needs Java"):
        evaluate_captions({"1": ["a cat"]}, {"1": "a cat"}, tokenizer="ptb")


def test_auto_falls_back_loudly_when_java_fails(monkeypatch):
    monkeypatch.setattr(caption_mod, "java_available", lambda: True)

    def broken(sentences):
        raise McitError("java exploded")

    monkeypatch.setattr(caption_mod, "tokenize_ptb", broken)
    with pytest.warns(RuntimeWarning, match="java exploded"):
        _, info = evaluate_captions({"1": ["a cat"]}, {"1": "a cat"}, tokenizer="auto")
    assert info["tokenizer"] == "fallback" and "java exploded" in info["tokenizer_note"]
    with pytest.raises(McitError, match="java exploded"):
        evaluate_captions({"1": ["a cat"]}, {"1": "a cat"}, tokenizer="ptb")


def test_score_task_caption_headline_and_details():
    preds = ["a man riding a horse .", "two dogs play in the snow", "a red car"]
    refs = [
        ["a man rides a horse", "a person on a horse"],
        ["two dogs playing in snow", "dogs in the snow"],
        ["a red car parked", "a car that is red"],
    ]
    out = score_task("caption", preds, refs, {"tokenizer": "fallback"})
    assert out.scorer == "caption" and out.per_sample is None
    assert out.info["tokenizer"] == "fallback"
    assert set(out.details) == {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "CIDEr", "ROUGE-L"}
    assert out.headline == out.details["CIDEr"]
    raw = caption_scores(
        {str(i): r for i, r in enumerate(refs)},
        {str(i): p for i, p in enumerate(preds)},
        tokenizer="fallback",
    )
    assert out.details["CIDEr"] == pytest.approx(100 * raw["CIDEr"])
    mean = score_task("caption", preds, refs, {"tokenizer": "fallback", "headline": "mean"})
    assert mean.headline == pytest.approx(sum(out.details.values()) / 6)
    b4 = score_task("caption", preds, refs, {"tokenizer": "fallback", "headline": "BLEU-4"})
    assert b4.headline == out.details["BLEU-4"]


caption_text = st.text(max_size=40)


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.tuples(caption_text, st.lists(caption_text, min_size=1, max_size=3)), max_size=5)
)
def test_fallback_scores_in_range_on_arbitrary_text(items):
    refs = {str(i): r for i, (_, r) in enumerate(items)}
    cands = {str(i): c for i, (c, _) in enumerate(items)}
    out = fb(refs, cands)
    for name, value in out.items():
        assert math.isfinite(value) and value >= 0.0
        if name != "CIDEr":
            assert value <= 1.0 + 1e-9


# ---------------------------------------------------------------- Java PTB path
TYPICAL = [
    "A man riding a wave on top of a surfboard.",
    "Two dogs, one black and one white, playing in the snow!",
    "A woman's purse (red) sitting on a table.",
    'A sign that says "STOP" on a pole.',
    "It's a 3-year-old boy eating a hot-dog...",
    "People at St. Mark's square in the U.S. at 5:30 p.m.",
    "A plate of food: rice, beans; and a $5 drink.",
    "The cat isn't on the mat -- it's on the couch?",
    "Cafe\u0301 naïve \u2014 a \u201cfancy\u201d place\u2026",
    "A  man   with    extra spaces\tand a tab",
    "",
    "50% of the pizza is gone",
    "Mr. Smith and Dr. Who wait at the bus stop.",
    "A black-and-white photo of a 1950s car",
]


@needs_java
def test_ptb_tokenizer_equals_pycocoevalcap_wrapper():
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    sentences = TYPICAL + ["line\nbreak inside", "\u00e9t\u00e9 \U0001f600 emoji"]
    official = PTBTokenizer().tokenize({i: [{"caption": s}] for i, s in enumerate(sentences)})
    ours = caption_mod.tokenize_ptb(sentences)
    assert ours == [official[i][0] for i in range(len(sentences))]


@needs_java
def test_full_pipeline_equals_pycocoevalcap_with_ptb():
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    refs = {
        "1": ["A man riding a horse.", "A person on a brown horse!"],
        "2": ["Two dogs, playing in the snow.", "Dogs play in snow."],
        "3": ["A (red) car parked on the street.", "A red car."],
    }
    cands = {"1": "a man on a horse", "2": "Two dogs play in the snow.", "3": "a red car ."}
    tok = PTBTokenizer()
    gts = tok.tokenize({k: [{"caption": c} for c in v] for k, v in refs.items()})
    res = tok.tokenize({k: [{"caption": c}] for k, c in cands.items()})
    scores, info = evaluate_captions(refs, cands, tokenizer="ptb")
    assert info == {"tokenizer": "ptb"}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    assert [scores[f"BLEU-{i}"] for i in range(1, 5)] == bleu
    assert scores["CIDEr"] == Cider().compute_score(gts, res)[0]
    assert scores["ROUGE-L"] == Rouge().compute_score(gts, res)[0]
    _, auto_info = evaluate_captions(refs, cands, tokenizer="auto")
    assert auto_info["tokenizer"] == "ptb"


@needs_java
def test_fallback_agrees_with_ptb_on_typical_captions():
    assert tokenize_fallback(TYPICAL) == caption_mod.tokenize_ptb(TYPICAL)


@needs_java
def test_ptb_keeps_line_alignment_with_odd_line_breaks():
    sentences = [f"a\rb\u2028c\x0bd\x0ce\x85 marker{i}" for i in range(3)] + ["\ud800 lone"]
    out = caption_mod.tokenize_ptb(sentences)
    assert len(out) == 4 and all(out[i].endswith(f"marker{i}") for i in range(3))


@needs_java
def test_meteor_optional():
    refs = {"1": ["a man riding a horse", "a person on a horse"], "2": ["two dogs play"]}
    cands = {"1": "a man on a horse", "2": "a cat sleeping"}
    out = score_task(
        "caption",
        [cands["1"], cands["2"]],
        [refs["1"], refs["2"]],
        {"meteor": True, "headline": "mean"},
    )
    assert 0.0 < out.details["METEOR"] < 100.0
    assert len(out.details) == 7
    assert out.headline == pytest.approx(sum(out.details.values()) / 7)
