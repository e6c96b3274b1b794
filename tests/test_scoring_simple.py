"""exact / contains / choice / numeric / iou scorers and the scorer registry."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mcit.errors import McitError
from mcit.scoring import (
    TaskScore,
    available_scorers,
    choice_score,
    contains_score,
    exact_score,
    extract_choice,
    iou,
    iou_score,
    normalize_exact,
    numeric_score,
    parse_box,
    parse_number,
    score_task,
)

REGISTRY_NAMES = {"vqa", "vqa_evalai", "exact", "contains", "choice", "numeric", "iou", "caption"}


# ------------------------------------------------------------------------ exact
@pytest.mark.parametrize(
    "pred, ref, expected",
    [
        ("Yes", "yes", 1.0),
        ("  yes \n", "Yes", 1.0),
        ("yes.", "yes", 1.0),
        ("a red circle .", "a red circle", 1.0),  # word-level decode: space before "."
        ("yes...", "yes", 1.0),  # rstrip('.') drops every trailing period
        ("yes!", "yes", 0.0),
        ("y es", "yes", 0.0),
        ("red  circle", "red circle", 0.0),  # inner whitespace is not collapsed
        ("3.5", "3.5", 1.0),
        ("3.", "3", 1.0),
        ("", "", 1.0),
        ("", "yes", 0.0),
        ("ÉCOLE", "école", 1.0),
    ],
)
def test_exact(pred, ref, expected):
    assert exact_score(pred, [ref]) == expected


def test_exact_any_reference_and_normaliser():
    assert exact_score("cat", ["dog", "Cat."]) == 1.0
    assert normalize_exact("  The Dog. ") == "the dog"


# --------------------------------------------------------------------- contains
def test_contains_both_directions():
    assert contains_score("It is a golden retriever.", ["golden retriever"]) == 1.0
    assert contains_score("retriever", ["golden retriever"]) == 1.0  # prediction in answer
    assert contains_score("retriever", ["golden retriever"], "answer_in_prediction") == 0.0
    assert contains_score("a category", ["cat"]) == 1.0  # characters, not words
    assert contains_score("dog", ["cat"]) == 0.0


def test_contains_empty_prediction_is_wrong():
    assert contains_score("", ["cat"]) == 0.0
    assert contains_score("  . ", ["cat"]) == 0.0
    assert contains_score("cat", [""]) == 0.0


# ----------------------------------------------------------------------- choice
@pytest.mark.parametrize(
    "text, letter",
    [
        ("B", "B"),
        ("b", "B"),
        ("(C)", "C"),
        ("D.", "D"),
        (" [A] ", "A"),
        ("B. a cat", "B"),
        ("(C) the dog", "C"),
        ("A: red", "A"),
        ("b ) the dog", "B"),
        ("The answer is B.", "B"),
        ("answer: (C)", "C"),
        ("I think the answer is option D", "D"),
        ("Option E is right", "E"),
        ("A dog", None),  # the article, not option A
        ("the answer is a cat", None),  # lower-case "a" after "answer is" is a word
        ("", None),
        ("none of these", None),
    ],
)
def test_extract_choice(text, letter):
    assert extract_choice(text) == letter


def test_choice_score():
    assert choice_score("The answer is B.", ["B"]) == 1.0
    assert choice_score("(b)", ["B"]) == 1.0
    assert choice_score("C", ["B"]) == 0.0
    assert choice_score("blue", ["B"]) == 0.0
    assert choice_score("A", ["(A) a dog"]) == 1.0


# ---------------------------------------------------------------------- numeric
@pytest.mark.parametrize(
    "text, value",
    [
        ("3", 3.0),
        ("There are 3 apples and 2 pears", 3.0),
        ("-2", -2.0),
        ("3.50", 3.5),
        ("1,000 people", 1000.0),
        ("twelve", 12.0),
        ("Zero", 0.0),
        ("3 . 5", 3.5),  # word-level decode
        (".5", 0.5),
        ("x3", None),
        ("none", None),
        ("", None),
    ],
)
def test_parse_number(text, value):
    assert parse_number(text) == value


def test_numeric_strict_by_default_and_tolerance():
    assert numeric_score("5", ["5"]) == 1.0
    assert numeric_score("5.0", ["5"]) == 1.0
    assert numeric_score("6", ["5"]) == 0.0
    assert numeric_score("6", ["5"], tolerance=1) == 1.0
    assert numeric_score("7", ["5"], tolerance=1) == 0.0
    assert numeric_score("five", ["5"]) == 1.0
    assert numeric_score("no idea", ["5"]) == 0.0


# -------------------------------------------------------------------------- iou
def test_parse_box_variants():
    assert parse_box("[0.1, 0.2, 0.3, 0.4]") == (0.1, 0.2, 0.3, 0.4)
    assert parse_box("[ 12 , 3 , 20 , 30 ]") == (12.0, 3.0, 20.0, 30.0)
    assert parse_box("the box is [ 0 . 25 , .5 , 1 , 1 ] ok") == (0.25, 0.5, 1.0, 1.0)
    assert parse_box("(1, 2, 3, 4)") == (1.0, 2.0, 3.0, 4.0)
    assert parse_box("[1, 2, 3]") is None
    assert parse_box("no box") is None
    assert parse_box("") is None
    assert parse_box("[1e999, 0, 1, 1]") is None  # inf is not a box


def test_iou_values():
    assert iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert iou((0, 0, 10, 10), (0, 0, 10, 5)) == 0.5
    assert iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert iou((0, 0, 1, 1), (2, 2, 3, 3)) == 0.0
    assert iou((0, 0, 0, 0), (0, 0, 0, 0)) == 0.0  # degenerate: no crash
    assert iou((5, 5, 0, 0), (0, 0, 5, 5)) == 0.0  # reversed corners have zero area


def test_iou_score_threshold_inclusive():
    assert iou_score("[0, 0, 10, 10]", ["[0, 0, 10, 5]"]) == 1.0  # IoU exactly 0.5
    assert iou_score("[0, 0, 10, 10]", ["[0, 0, 10, 5]"], threshold=0.51) == 0.0
    assert iou_score("garbage", ["[0, 0, 10, 5]"]) == 0.0


# ------------------------------------------------------------ properties (hypothesis)
@settings(max_examples=300, deadline=None)
@given(st.text(), st.text())
def test_simple_scorers_never_raise(pred, ref):
    for fn in (exact_score, contains_score, choice_score, numeric_score, iou_score):
        assert fn(pred, [ref]) in (0.0, 1.0)


coords = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False)


@settings(max_examples=300, deadline=None)
@given(st.tuples(coords, coords, coords, coords), st.tuples(coords, coords, coords, coords))
def test_iou_symmetric_and_in_range(a, b):
    v = iou(a, b)
    assert 0.0 <= v <= 1.0
    assert v == pytest.approx(iou(b, a))


@settings(max_examples=200, deadline=None)
@given(st.text(st.sampled_from(list("abc .")), max_size=10), st.sampled_from(["", " ", "\n"]))
def test_exact_surrounding_whitespace_invariance(text, pad):
    assert exact_score(pad + text + pad, [text]) == 1.0


# ------------------------------------------------------------------------ registry
def test_available_scorers_lists_every_name_with_options():
    names = available_scorers()
    assert set(names) == REGISTRY_NAMES
    assert "tolerance" in names["numeric"] and "threshold" in names["iou"]
    assert "headline" in names["caption"] and "tokenizer" in names["caption"]
    assert all(isinstance(v, str) and v for v in names.values())


def test_score_task_per_sample_scorers():
    out = score_task("exact", ["Yes", "no", "cat."], [["yes"], ["yes"], ["cat"]])
    assert isinstance(out, TaskScore)
    assert out.scorer == "exact"
    assert out.per_sample == [1.0, 0.0, 1.0]
    assert out.headline == pytest.approx(200 / 3)
    assert out.details == {"accuracy": out.headline}

    vqa = score_task("vqa", ["two"], [["2"] * 9 + ["3"]])
    assert vqa.headline == 100.0 and vqa.per_sample == [1.0]
    ev = score_task("vqa_evalai", ["Two."], [["2"] * 10])
    assert ev.headline == 100.0

    num = score_task("numeric", ["6", "7"], [["5"], ["5"]], {"tolerance": 1})
    assert num.per_sample == [1.0, 0.0]
    assert num.info["options"] == {"tolerance": 1.0}


def test_score_task_iou_with_decoded_spacing():
    out = score_task(
        "iou", ["[ 12 , 3 , 20 , 30 ]", "I cannot tell", "[0, 0, 1, 1]"],
        [["[12, 3, 20, 30]"], ["[0, 0, 5, 5]"], ["[0.5, 0, 1.5, 1]"]],
    )  # fmt: skip
    assert out.per_sample == [1.0, 0.0, 0.0]  # the last has IoU 1/3
    assert out.details["mean_iou"] == pytest.approx(100 * (1 + 0 + 1 / 3) / 3)
    with pytest.raises(McitError, match="reference 0 has no parseable box"):
        score_task("iou", ["[0, 0, 1, 1]"], [["nothing"]])


def test_references_that_cannot_parse_are_data_errors():
    with pytest.raises(McitError, match="'numeric': reference 1 has no parseable number"):
        score_task("numeric", ["1", "2"], [["1"], ["many"]])
    with pytest.raises(McitError, match="'choice': reference 0 has no parseable letter"):
        score_task("choice", ["A"], [["a dog"]])
    # ...while unparseable predictions are simply wrong
    assert score_task("numeric", ["many"], [["3"]]).per_sample == [0.0]
    assert score_task("choice", ["a dog"], [["B"]]).per_sample == [0.0]


@pytest.mark.parametrize("name", sorted(REGISTRY_NAMES))
def test_empty_task_scores_zero(name):
    out = score_task(name, [], [], {"tokenizer": "fallback"} if name == "caption" else None)
    assert out.headline == 0.0
    assert out.scorer == name
    assert math.isfinite(out.headline)


def test_unknown_scorer_lists_available():
    with pytest.raises(McitError) as info:
        score_task("bleu", ["a"], [["a"]])
    msg = str(info.value)
    assert "'bleu'" in msg
    for name in REGISTRY_NAMES:
        assert name in msg


@pytest.mark.parametrize(
    "name, options, fragments",
    [
        ("numeric", {"tol": 1}, ["'numeric'", "'tol'", "tolerance"]),
        ("numeric", {"tolerance": -1}, ["'numeric'", "'tolerance'", ">= 0", "-1"]),
        ("numeric", {"tolerance": "1"}, ["'tolerance'", "'1'"]),
        ("numeric", {"tolerance": True}, ["'tolerance'"]),
        ("iou", {"threshold": 1.5}, ["'iou'", "'threshold'", "[0, 1]"]),
        ("iou", {"threshold": float("nan")}, ["'threshold'"]),
        ("caption", {"headline": "SPICE"}, ["'caption'", "'headline'", "CIDEr", "mean"]),
        ("caption", {"tokenizer": "nltk"}, ["'tokenizer'", "auto", "ptb", "fallback"]),
        ("caption", {"headline": "METEOR"}, ["meteor: true"]),
        ("exact", {"anything": 1}, ["'exact'", "'anything'", "none"]),
        ("contains", {"direction": "left"}, ["'direction'", "answer_in_prediction"]),
    ],
)
def test_bad_options_name_scorer_option_and_allowed(name, options, fragments):
    with pytest.raises(McitError) as info:
        score_task(name, ["a"], [["a"]], options)
    for fragment in fragments:
        assert fragment in str(info.value)


def test_input_validation():
    with pytest.raises(McitError, match="2 predictions but 1 reference"):
        score_task("exact", ["a", "b"], [["a"]])
    with pytest.raises(McitError, match="prediction 0 is not a string"):
        score_task("exact", [None], [["a"]])
    with pytest.raises(McitError, match=r"references\[0\] must be a non-empty list"):
        score_task("vqa", ["a"], [[]])
    with pytest.raises(McitError, match="options must be a mapping"):
        score_task("exact", ["a"], [["a"]], options=["x"])
    # a bare string reference is accepted as a one-element list
    assert score_task("exact", ["a"], ["A"]).headline == 100.0
