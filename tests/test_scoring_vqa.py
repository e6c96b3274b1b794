"""VQA accuracy: hand-derived cases for every rule and quirk of the official code, plus
property tests against a literal, unoptimised reading of the official algorithm."""

from __future__ import annotations

import functools
import operator
import re
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mcit.errors import McitError
from mcit.scoring import (
    format_vqa_report,
    normalize_evalai,
    normalize_vqa,
    vqa_accuracy,
    vqa_accuracy_evalai,
    vqa_corpus_accuracy,
)
from mcit.scoring.vqa import CONTRACTIONS, NUMBER_MAP, PUNCTUATION, process_punctuation


# ----------------------------------------------------------------- reference oracle
# A deliberately literal reading of vqaEval.py (GT-Vision-Lab master) and of m4c's
# EvalAIAnswerProcessor: per-annotator dicts, the original regexes, the 10 x 9
# comparisons, and Python <= 3.11 left-to-right ``sum``. The fast implementation must
# agree with it bit for bit.
def _py311_sum(values):
    return functools.reduce(operator.add, values, 0)


_O_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")  # as written in the official code
_O_COMMA = re.compile(r"(\d)(\,)(\d)")
_O_COMMA_EVALAI = re.compile(r"(?<=\d)(\,)+(?=\d)")


def _o_punct(in_text, comma=_O_COMMA):
    out_text = in_text
    for p in PUNCTUATION:
        if (p + " " in in_text or " " + p in in_text) or (re.search(comma, in_text) is not None):
            out_text = out_text.replace(p, "")
        else:
            out_text = out_text.replace(p, " ")
    return _O_PERIOD.sub("", out_text, re.UNICODE)  # re.UNICODE lands in `count`


def _o_digit_article(in_text):
    manual_map = dict(NUMBER_MAP)
    out = []
    for word in in_text.lower().split():
        word = manual_map.setdefault(word, word)
        if word not in ["a", "an", "the"]:
            out.append(word)
    for i, word in enumerate(out):
        if word in CONTRACTIONS:
            out[i] = CONTRACTIONS[word]
    return " ".join(out)


def _o_leave_one_out(answers, res_ans):
    gt_acc = []
    for datum in answers:
        others = [item for item in answers if item != datum]
        matching = [item for item in others if item["answer"] == res_ans]
        gt_acc.append(min(1, float(len(matching)) / 3))
    return float(_py311_sum(gt_acc)) / len(gt_acc)


def oracle_vqa(prediction, raw_answers):
    answers = [{"answer": a, "answer_id": i + 1} for i, a in enumerate(raw_answers)]
    for d in answers:
        d["answer"] = d["answer"].replace("\n", " ").replace("\t", " ").strip()
    res_ans = prediction.replace("\n", " ").replace("\t", " ").strip()
    if len({d["answer"] for d in answers}) > 1:
        for d in answers:
            d["answer"] = _o_digit_article(_o_punct(d["answer"]))
        res_ans = _o_digit_article(_o_punct(res_ans))
    return _o_leave_one_out(answers, res_ans)


def oracle_evalai_norm(item):
    item = item.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    item = item.replace("\n", " ").replace("\t", " ").strip()
    return _o_digit_article(_o_punct(item, _O_COMMA_EVALAI))


def oracle_evalai(prediction, raw_answers):
    answers = [oracle_evalai_norm(a) for a in raw_answers]
    gt = list(enumerate(answers))
    scores = {}
    for unique in set(answers):
        accs = []
        for g in gt:
            others = [item for item in gt if item != g]
            accs.append(min(1, float(len([o for o in others if o[1] == unique])) / 3))
        scores[unique] = _py311_sum(accs) / len(accs)
    return scores.get(oracle_evalai_norm(prediction), 0.0)


# --------------------------------------------------------------- matching count k
EXPECTED_BY_K = [0.0, 0.3, 0.6, 0.9, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]


@pytest.mark.parametrize("k", range(11))
def test_k_matching_annotators(k):
    answers = ["cat"] * k + ["dog"] * (10 - k)
    assert vqa_accuracy("cat", answers) == pytest.approx(EXPECTED_BY_K[k], abs=1e-12)
    assert vqa_accuracy_evalai("cat", answers) == pytest.approx(EXPECTED_BY_K[k], abs=1e-12)


def test_leave_one_out_is_by_position_and_float_sum_is_left_to_right():
    # Two matches: positions change the float sum's last bit, as in the official code
    # (acc per position is 1/3 for a matching annotator, 2/3 for the others).
    assert vqa_accuracy("cat", ["cat", "cat"] + ["dog"] * 8) == 0.6
    assert vqa_accuracy("cat", ["dog"] * 8 + ["cat", "cat"]) == 0.5999999999999999
    assert _py311_sum([2 / 3] * 8 + [1 / 3] * 2) / 10 == 0.5999999999999999
    # Three matches: 0.9 or 0.8999999999999998
    assert vqa_accuracy("cat", ["cat"] * 3 + ["dog"] * 7) == 0.9
    assert vqa_accuracy("cat", ["cat", "cat"] + ["dog"] * 7 + ["cat"]) == 0.8999999999999998
    # Duplicated answer strings are still separate annotators.
    assert vqa_accuracy("dog", ["dog"] * 9 + ["cat"]) == 1.0


# ------------------------------------------------------------- all-identical rule
def test_all_identical_answers_compare_exactly():
    assert vqa_accuracy("yes", ["yes"] * 10) == 1.0
    assert vqa_accuracy("Yes", ["yes"] * 10) == 0.0  # no lower-casing
    assert vqa_accuracy("yes.", ["yes"] * 10) == 0.0  # no period rule
    assert vqa_accuracy("two", ["2"] * 10) == 0.0  # no number words
    assert vqa_accuracy("the dog", ["dog"] * 10) == 0.0  # no articles
    assert vqa_accuracy(" yes\n", ["yes"] * 10) == 1.0  # but \n, \t and strip always
    assert vqa_accuracy("yes", ["yes "] + ["yes"] * 9) == 1.0  # identical after strip
    assert vqa_accuracy("Yes", ["Yes"] * 10) == 1.0


def test_not_all_identical_normalises_both_sides():
    answers = ["yes"] * 9 + ["no"]
    assert vqa_accuracy("Yes", answers) == 1.0
    assert vqa_accuracy("yes.", answers) == 1.0
    assert vqa_accuracy("two", ["2"] * 9 + ["3"]) == 1.0
    assert vqa_accuracy("2", ["Two"] * 9 + ["3"]) == 1.0
    assert vqa_accuracy("the dog", ["dog"] * 9 + ["cat"]) == 1.0


def test_evalai_always_normalises_even_identical_answers():
    assert vqa_accuracy_evalai("Yes.", ["yes"] * 10) == 1.0
    assert vqa_accuracy_evalai("two", ["2"] * 10) == 1.0
    assert vqa_accuracy("Yes.", ["yes"] * 10) == 0.0


# ------------------------------------------------------------------ punctuation
@pytest.mark.parametrize("p", PUNCTUATION)
def test_each_listed_mark_becomes_space_or_is_deleted(p):
    assert process_punctuation(f"ab{p}cd") == "ab cd"  # not next to a space: -> space
    assert process_punctuation(f"ab{p} cd") == "ab cd"  # next to a space: deleted
    assert process_punctuation(f"ab {p}cd") == "ab cd"
    assert process_punctuation(f"x{p}y {p}") == "xy "  # adjacency anywhere deletes all


def test_punctuation_list_is_the_official_one():
    assert "".join(PUNCTUATION) == ';/[]"{}()=+\\_-><@`,?!'
    # not in it: apostrophe, colon and friends are kept
    for kept in ["it's", "5:30", "#1", "50%", "a&b", "a*b", "a|b", "a~b", "a^b", "$5"]:
        assert process_punctuation(kept) == kept
        assert normalize_vqa(kept) == kept.lower()


def test_digit_comma_rule_deletes_every_mark():
    assert normalize_vqa("1,000") == "1000"
    assert normalize_vqa("red,blue") == "red blue"
    assert normalize_vqa("red,blue 1,5") == "redblue 15"  # comma between digits anywhere
    assert normalize_vqa("a-b 1,5") == "ab 15"  # ... and it applies to every mark
    assert normalize_vqa("x-y 1, 5") == "x y 1 5"  # "1, 5" has no digit,digit
    # Unicode digits count as \d (Python 3 regex semantics)
    assert normalize_vqa("a-b \u0661,\u0662") == "ab \u0661\u0662"


def test_period_rule():
    assert normalize_vqa("3.5") == "3.5"  # followed by a digit: kept
    assert normalize_vqa(".5") == ".5"
    assert normalize_vqa("5.") == "5"  # the (?!<=\d) "lookbehind" is a no-op lookahead
    assert normalize_vqa("end.") == "end"
    assert normalize_vqa("a.b") == "ab"  # removed, not replaced by a space
    assert normalize_vqa("U.S.") == "us"
    assert normalize_vqa("a . b") == "b"  # "a" is an article once the period is gone


def test_period_rule_stops_after_32_periods():
    # periodStrip.sub("", text, re.UNICODE): re.UNICODE == 32 is taken as `count`
    assert normalize_vqa("." * 40) == "." * 8
    assert normalize_vqa("x." * 33) == "x" * 33 + "."
    assert normalize_evalai("." * 40) == "." * 8


def test_number_words_articles_contractions():
    assert normalize_vqa("Two") == "2"
    assert normalize_vqa("none") == "0"
    assert normalize_vqa("zero") == "0"
    assert normalize_vqa("ten") == "10"
    assert normalize_vqa("eleven") == "eleven"  # only zero..ten
    assert normalize_vqa("twenty-one") == "twenty 1"  # "-" -> space, then "one" -> "1"
    assert normalize_vqa("a dog") == "dog"
    assert normalize_vqa("An apple and THE pear") == "apple and pear"
    assert normalize_vqa("another theme") == "another theme"
    assert normalize_vqa("the") == ""
    assert normalize_vqa("dont") == "don't"
    assert normalize_vqa("isnt it") == "isn't it"
    assert normalize_vqa("Im") == "im"  # the table's "Im" key never matches lower case
    assert normalize_vqa("somebody'd") == "somebodyd"  # the table maps it backwards
    assert normalize_vqa("don't") == "don't"  # apostrophe is not in the list
    assert normalize_vqa("one two three") == "1 2 3"


def test_whitespace_newlines_tabs():
    answers = ["red car"] * 9 + ["blue car"]
    assert vqa_accuracy("\tred\ncar \n", answers) == 1.0
    assert vqa_accuracy("red   car", answers) == 1.0  # split() collapses runs
    assert vqa_accuracy("red\u3000car", answers) == 1.0  # unicode whitespace too


def test_unicode_and_empty_strings():
    assert vqa_accuracy("Café", ["café"] * 9 + ["tea"]) == 1.0
    assert vqa_accuracy("", [""] * 10) == 1.0
    assert vqa_accuracy("", ["yes"] * 10) == 0.0
    assert vqa_accuracy("", ["", "", "", "yes", "no", "no", "no", "no", "no", "no"]) == 0.9
    assert vqa_accuracy("?", ["", "", "", "yes", "no", "no", "no", "no", "no", "no"]) == 0.9
    assert vqa_accuracy("\U0001f600", ["\U0001f600"] * 10) == 1.0


def test_very_long_strings():
    long = "the " + "word, " * 20000 + "end."
    t0 = time.perf_counter()
    assert vqa_accuracy(long, ["yes"] * 9 + ["no"]) == 0.0
    assert vqa_accuracy(long, [long] * 4 + ["x"] * 6) == 1.0
    assert vqa_accuracy_evalai(long, [long] * 4 + ["x"] * 6) == 1.0
    assert time.perf_counter() - t0 < 5.0


def test_evalai_normaliser():
    assert normalize_evalai("1,000") == "1000"
    assert normalize_evalai("What's that?") == "what 's that"
    assert normalize_evalai("a-b 1,5") == "b 15"  # comma rule dead: commas already gone
    assert normalize_evalai("Two Dogs.") == "2 dogs"
    assert normalize_evalai("  Coca-Cola\n") == "coca cola"


def test_bad_answer_lists_raise():
    with pytest.raises(McitError):
        vqa_accuracy("yes", [])
    with pytest.raises(McitError):
        vqa_accuracy("yes", "yes")


# ----------------------------------------------------------------- corpus report
def test_corpus_accuracy_like_the_official_report():
    preds = ["yes", "2", "red", "no"]
    answers = [["yes"] * 10, ["2"] * 1 + ["3"] * 9, ["blue"] * 10, ["no"] * 2 + ["yes"] * 8]
    out = vqa_corpus_accuracy(
        preds,
        answers,
        question_types=["is the", "how many", "what color", "is the"],
        answer_types=["yes/no", "number", "other", "yes/no"],
    )
    # per question: 1.0, 0.3, 0.0, 0.6
    assert out["perQuestion"] == [100.0, 30.0, 0.0, 60.0]
    assert out["overall"] == round(100 * (1.0 + 0.3 + 0.0 + 0.6) / 4, 2) == 47.5
    assert out["perQuestionType"] == {"is the": 80.0, "how many": 30.0, "what color": 0.0}
    assert out["perAnswerType"] == {"yes/no": 80.0, "number": 30.0, "other": 0.0}
    text = format_vqa_report(out)
    assert "Overall Accuracy is: 47.50" in text
    assert "how many : 30.00" in text and "yes/no : 80.00" in text


def test_corpus_rounding_and_empty():
    out = vqa_corpus_accuracy(["a", "b", "c"], [["a"] * 10, ["x"] * 10, ["x"] * 10])
    assert out["overall"] == 33.33
    assert vqa_corpus_accuracy([], [])["overall"] == 0.0
    with pytest.raises(McitError):
        vqa_corpus_accuracy(["a"], [])


# ---------------------------------------------------------------- property tests
_ALPHABET = st.sampled_from(
    list("abcXYZ019 ") + list(PUNCTUATION) + [".", "'", ":", "\n", "\t", "\u00e9", "\u0661"]
)
_text = st.text(_ALPHABET, max_size=14)
_words = st.sampled_from(
    ["yes", "Yes", "no", "2", "two", "the dog", "dog.", "1,000", "1000", "red/blue", "a"]
)
_answer = st.one_of(_words, _text)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(_words, _text), st.lists(_answer, min_size=1, max_size=10))
def test_matches_literal_official_algorithm(prediction, answers):
    assert vqa_accuracy(prediction, answers) == oracle_vqa(prediction, answers)
    assert vqa_accuracy_evalai(prediction, answers) == oracle_evalai(prediction, answers)


@settings(max_examples=300, deadline=None)
@given(st.text(), st.lists(st.text(), min_size=1, max_size=10))
def test_arbitrary_text_never_raises_and_stays_in_range(prediction, answers):
    for fn in (vqa_accuracy, vqa_accuracy_evalai):
        value = fn(prediction, answers)
        assert 0.0 <= value <= 1.0


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=20), st.lists(st.text(max_size=8), min_size=10, max_size=10))
def test_arbitrary_text_matches_oracle(prediction, answers):
    assert vqa_accuracy(prediction, answers) == oracle_vqa(prediction, answers)
    assert vqa_accuracy_evalai(prediction, answers) == oracle_evalai(prediction, answers)


_ws = st.text(st.sampled_from([" ", "\n", "\t"]), max_size=4)


@settings(max_examples=200, deadline=None)
@given(st.one_of(_words, _text), st.lists(_answer, min_size=10, max_size=10), _ws, _ws)
def test_surrounding_whitespace_and_newline_invariance(prediction, answers, left, right):
    base = vqa_accuracy(prediction, answers)
    assert vqa_accuracy(left + prediction + right, answers) == base
    # inner "\n" and "\t" are spaces to the official code
    assert vqa_accuracy(prediction.replace(" ", "\n"), answers) == base
    assert vqa_accuracy(prediction.replace(" ", "\t"), answers) == base
    base_e = vqa_accuracy_evalai(prediction, answers)
    assert vqa_accuracy_evalai(left + prediction + right, answers) == base_e


@settings(max_examples=200, deadline=None)
@given(st.one_of(_words, _text), st.lists(_words, min_size=10, max_size=10), st.randoms())
def test_monotone_in_number_of_matching_annotators(prediction, others, rnd):
    # Replace non-matching annotators one at a time by the prediction itself: the score
    # never goes down.
    answers = [a if a.strip() != prediction.strip() else "zzz" for a in others]
    order = list(range(10))
    rnd.shuffle(order)
    previous = vqa_accuracy(prediction, answers)
    for i in order:
        answers[i] = prediction
        current = vqa_accuracy(prediction, answers)
        assert current >= previous
        previous = current
    assert previous == 1.0
