"""VQA accuracy, bit-faithful to the official evaluation code.

Two scorers share the leave-one-annotator-out rule and differ in normalisation:

``vqa`` -- the official VQAv2 evaluation (GT-Vision-Lab/VQA,
``PythonEvaluationTools/vqaEvaluation/vqaEval.py``, current master), per question:

1. prediction and every answer: ``\\n`` and ``\\t`` -> space, then ``str.strip()``;
2. only if the (stripped) answers are *not* all identical, the prediction and every
   answer go through :func:`process_punctuation` then :func:`process_digit_article`;
   otherwise the comparison is exact (case-sensitive, punctuation kept);
3. for each annotator position j: ``min(1, #other annotators equal to the prediction / 3)``;
   the question's accuracy is the mean over positions, summed left to right.

``vqa_evalai`` -- the EvalAI/m4c ``EvalAIAnswerProcessor`` (TextVQA, CoIN's TextVQA
scorer): prediction and answers are always normalised, by lower-casing, deleting every
``,`` and ``?``, ``'s`` -> `` 's``, whitespace cleanup, then the same punctuation and
digit/article steps.

All quirks are reproduced on purpose; ``docs/scoring.md`` lists them.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import lru_cache

from mcit.errors import McitError

__all__ = [
    "ARTICLES",
    "CONTRACTIONS",
    "NUMBER_MAP",
    "PUNCTUATION",
    "format_vqa_report",
    "normalize_evalai",
    "normalize_vqa",
    "process_digit_article",
    "process_punctuation",
    "vqa_accuracy",
    "vqa_accuracy_evalai",
    "vqa_corpus_accuracy",
]

# ---------------------------------------------------------------- official tables
# The contraction table of vqaEval.py, entries as they are (note the odd ones:
# "somebody'd" -> "somebodyd", and keys with capitals such as "Im" that can never match
# because the text is lower-cased first).
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've",
    "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's",
    "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't",
    "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll",
    "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at",
    "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's",
    "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've",
    "somethingll": "something'll", "thats": "that's", "thered": "there'd",
    "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're",
    "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're",
    "theyve": "they've", "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've",
    "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
    "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd",
    "whod've": "who'd've", "who'dve": "who'd've", "wholl": "who'll", "whos": "who's",
    "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all",
    "yall'll": "y'all'll", "y'allll": "y'all'll", "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}  # fmt: skip
# "none" maps to "0" too.
NUMBER_MAP = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
    "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
ARTICLES = frozenset({"a", "an", "the"})
# The official list, in its order. Not in it: ' : . * # $ % & ^ | ~ (the period has
# its own rule; the others are kept as they are).
PUNCTUATION = (
    ";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<",
    "@", "`", ",", "?", "!",
)  # fmt: skip

# vqaEval.py: commaStrip = "(\d)(\,)(\d)", searched anywhere in the text.
_COMMA_OFFICIAL = re.compile(r"\d,\d")
# m4c's EvalAIAnswerProcessor: "(?<=\d)(\,)+(?=\d)" (a run of commas between digits).
_COMMA_EVALAI = re.compile(r"(?<=\d),+(?=\d)")
# vqaEval.py: periodStrip = "(?!<=\d)(\.)(?!\d)". "(?!<=\d)" is a look-*ahead* for the
# literal "<=" plus a digit, which can never match where a "." starts, so the rule is
# just: remove a period not followed by a digit ("5." loses it, "2.5" and ".5" keep it).
_PERIOD = re.compile(r"\.(?!\d)")
# ...and the official call is periodStrip.sub("", text, re.UNICODE): re.UNICODE (= 32)
# lands in the *count* argument, so only the first 32 such periods are removed.
_PERIOD_COUNT = int(re.UNICODE)
_ANY_PUNCT = re.compile("[" + re.escape("".join(PUNCTUATION) + ".") + "]")


def process_punctuation(text: str, _comma: re.Pattern[str] = _COMMA_OFFICIAL) -> str:
    """The official ``processPunctuation``.

    For each listed mark present: if the *original* text has that mark next to a space
    (``p + " "`` or ``" " + p``), or has a comma between two digits anywhere (then for
    every mark), the mark is deleted; otherwise it becomes a space. Then periods not
    followed by a digit are removed (the first 32 only).
    """
    if _ANY_PUNCT.search(text) is None:
        return text
    delete_all = _comma.search(text) is not None
    out = text
    for p in PUNCTUATION:
        if p in text:
            if delete_all or (p + " ") in text or (" " + p) in text:
                out = out.replace(p, "")
            else:
                out = out.replace(p, " ")
    return _PERIOD.sub("", out, count=_PERIOD_COUNT)


def process_digit_article(text: str) -> str:
    """The official ``processDigitArticle``: lower-case, split on whitespace, number
    words zero..ten (and "none") to digits, drop a/an/the, contraction table, re-join
    with single spaces."""
    words = []
    for word in text.lower().split():
        word = NUMBER_MAP.get(word, word)
        if word not in ARTICLES:
            words.append(CONTRACTIONS.get(word, word))
    return " ".join(words)


def _clean(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


@lru_cache(maxsize=1 << 17)
def normalize_vqa(text: str) -> str:
    """Punctuation then digit/article step (applied by ``vqa`` only when the answers
    are not all identical). Expects text already cleaned of ``\\n``/``\\t`` and stripped."""
    return process_digit_article(process_punctuation(text))


@lru_cache(maxsize=1 << 17)
def normalize_evalai(text: str) -> str:
    """m4c's ``EvalAIAnswerProcessor.__call__``: always applied, to every string."""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = _clean(text)
    text = process_punctuation(text, _COMMA_EVALAI)
    return process_digit_article(text)


@lru_cache(maxsize=4096)
def _leave_one_out(matches: tuple[bool, ...]) -> float:
    """Mean over annotator positions of min(1, matches among the others / 3).

    Summed left to right like Python <= 3.11's ``sum`` (the official scripts' runtime;
    3.12's ``sum`` compensates rounding), so the last bit depends on *which* positions
    matched: two matches give 0.6, 0.5999999999999999 or 0.6000000000000001."""
    k = sum(matches)
    total = 0.0
    for m in matches:
        total += min(1.0, float(k - m) / 3)
    return total / len(matches)


def _check_answers(answers: Sequence[str]) -> None:
    if isinstance(answers, str):
        raise McitError("VQA answers must be a list of strings, not a single string")
    if len(answers) == 0:
        raise McitError("VQA accuracy needs at least one reference answer, got none")


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """Official VQAv2 accuracy of one prediction against its annotator answers (10 in
    VQAv2), in [0, 1]: 0, 0.3, 0.6, 0.9, 1.0 for 0, 1, 2, 3, >=4 matching annotators."""
    _check_answers(answers)
    pred = _clean(prediction)
    gts = [_clean(a) for a in answers]
    if len(set(gts)) > 1:
        pred = normalize_vqa(pred)
        gts = [normalize_vqa(a) for a in gts]
    return _leave_one_out(tuple(a == pred for a in gts))


def vqa_accuracy_evalai(prediction: str, answers: Sequence[str]) -> float:
    """TextVQA/EvalAI accuracy (m4c ``TextVQAAccuracyEvaluator``), in [0, 1]."""
    _check_answers(answers)
    pred = normalize_evalai(prediction)
    return _leave_one_out(tuple(normalize_evalai(a) == pred for a in answers))


def _plain_sum(values: Sequence[float]) -> float:
    total = 0.0
    for v in values:
        total += v
    return total


def _percent(values: Sequence[float], precision: int) -> float:
    return round(100 * _plain_sum(values) / len(values), precision)


def vqa_corpus_accuracy(
    predictions: Sequence[str],
    answers: Sequence[Sequence[str]],
    question_types: Sequence[str] | None = None,
    answer_types: Sequence[str] | None = None,
    precision: int = 2,
    evalai: bool = False,
) -> dict:
    """Corpus accuracy as the official ``VQAEval.evaluate`` reports it.

    Returns ``{"overall": float, "perQuestionType": {type: float}, "perAnswerType":
    {type: float}, "perQuestion": [float]}``, all percentages rounded to ``precision``
    decimals with ``round`` exactly like ``setAccuracy`` (types in first-seen order;
    the per-type dicts are empty when no types are given). An empty corpus gives
    ``overall`` 0.0. ``evalai=True`` scores with :func:`vqa_accuracy_evalai`.
    """
    n = len(predictions)
    if len(answers) != n:
        raise McitError(f"{n} predictions but {len(answers)} answer lists")
    for name, types in (("question_types", question_types), ("answer_types", answer_types)):
        if types is not None and len(types) != n:
            raise McitError(f"{n} predictions but {len(types)} {name}")
    score = vqa_accuracy_evalai if evalai else vqa_accuracy
    accs = [score(p, a) for p, a in zip(predictions, answers, strict=True)]
    result: dict = {
        "overall": _percent(accs, precision) if accs else 0.0,
        "perQuestionType": {},
        "perAnswerType": {},
        "perQuestion": [round(100 * a, precision) for a in accs],
    }
    for key, types in (("perQuestionType", question_types), ("perAnswerType", answer_types)):
        if types is None:
            continue
        groups: dict[str, list[float]] = {}
        for t, acc in zip(types, accs, strict=True):
            groups.setdefault(t, []).append(acc)
        result[key] = {t: _percent(v, precision) for t, v in groups.items()}
    return result


def format_vqa_report(result: dict) -> str:
    """The summary as the official demo script prints it (``%.02f`` throughout)."""
    lines = [f"Overall Accuracy is: {result['overall']:.2f}", ""]
    if result.get("perQuestionType"):
        lines.append("Per Question Type Accuracy is the following:")
        lines += [f"{k} : {v:.2f}" for k, v in result["perQuestionType"].items()]
        lines.append("")
    if result.get("perAnswerType"):
        lines.append("Per Answer Type Accuracy is the following:")
        lines += [f"{k} : {v:.2f}" for k, v in result["perAnswerType"].items()]
        lines.append("")
    return "\n".join(lines)
