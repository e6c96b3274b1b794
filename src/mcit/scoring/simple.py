"""Per-sample scorers: exact, contains, choice, numeric, iou.

Each ``*_score(prediction, references, ...)`` returns 1.0 (correct) or 0.0 and never
raises on any prediction text; a prediction that cannot be parsed is simply wrong.
``references`` is the list of acceptable answers; the prediction is correct if it
matches any of them. See ``docs/scoring.md`` for the exact rules and where they come
from (CoIN's / LLaVA's evaluation scripts).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

__all__ = [
    "choice_score",
    "contains_score",
    "exact_score",
    "extract_choice",
    "iou",
    "iou_score",
    "normalize_exact",
    "parse_box",
    "parse_number",
    "numeric_score",
]


# --------------------------------------------------------------------------- exact
def normalize_exact(text: str) -> str:
    """Normalise for ``exact``/``contains``: strip surrounding whitespace, lower-case,
    drop trailing periods (``rstrip('.')``, as LLaVA/CoIN's GQA conversion does), and
    strip whitespace again (so a decoded ``"a red circle ."`` becomes ``"a red circle"``).
    Inner whitespace and other punctuation are kept as they are."""
    return text.strip().lower().rstrip(".").strip()


def exact_score(prediction: str, references: Sequence[str]) -> float:
    """1.0 if the normalised prediction equals any normalised reference."""
    pred = normalize_exact(prediction)
    return 1.0 if any(pred == normalize_exact(r) for r in references) else 0.0


# ------------------------------------------------------------------------ contains
def contains_score(prediction: str, references: Sequence[str], direction: str = "both") -> float:
    """Substring match after :func:`normalize_exact` on both sides.

    ``direction="both"`` (CoIN's ImageNet scorer): correct if the answer is contained in
    the prediction or the prediction in the answer. ``"answer_in_prediction"``: only the
    first (MCITlib's ImageNet-R reading). An empty (normalised) prediction is always
    wrong: the two-way rule would otherwise count ``""`` as contained in every answer.
    Matching is on characters, not words (``"cat"`` is found in ``"category"``).
    """
    pred = normalize_exact(prediction)
    if not pred:
        return 0.0
    for ref in references:
        ans = normalize_exact(ref)
        if not ans:
            continue
        if ans in pred or (direction == "both" and pred in ans):
            return 1.0
    return 0.0


# -------------------------------------------------------------------------- choice
_LETTER = r"([A-Za-z])"
# Tried in order; the first that matches gives the letter.
_CHOICE_PATTERNS = [
    # the whole answer is one letter, optionally wrapped: "B", "(b)", "B.", "[C]", "D)"
    re.compile(r"^\W*" + _LETTER + r"\W*$"),
    # "The answer is B", "answer: (C)", "Answer - D." (capital letter only: "the answer
    # is a cat" is not option A)
    re.compile(r"\b(?i:answer)\s*(?:(?i:is)|:|-)?\s*(?:(?i:option)\s*)?[\(\[]?\s*([A-Z])\b"),
    # "option B", "Choice (C)"
    re.compile(r"\b(?i:option|choice)\s*[\(\[]?\s*([A-Z])\b"),
    # leading letter followed by a delimiter: "B. a cat", "(C) the dog", "A: red", "b ) x"
    re.compile(r"^\s*[\(\[]?\s*" + _LETTER + r"\s*[\)\]\.:]"),
]


def extract_choice(text: str) -> str | None:
    """The option letter (upper case) a free-text answer names, or ``None``.

    A bare word like ``"A dog"`` is not read as option A: outside the "answer is X" /
    "option X" phrasings, a letter counts only alone or followed by ``.``, ``)``, ``]``
    or ``:``.
    """
    for pattern in _CHOICE_PATTERNS:
        m = pattern.search(text)
        if m:
            return m.group(1).upper()
    return None


def choice_score(prediction: str, references: Sequence[str]) -> float:
    """1.0 if the letter extracted from the prediction equals the reference letter."""
    pred = extract_choice(prediction)
    if pred is None:
        return 0.0
    return 1.0 if any(pred == extract_choice(r) for r in references) else 0.0


# ------------------------------------------------------------------------- numeric
_NUMBER_WORDS = {
    w: i
    for i, w in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen "
        "fourteen fifteen sixteen seventeen eighteen nineteen twenty".split()
    )
}
_NUMBER_RE = re.compile(
    r"(?<![\w.])([-+−]?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\s?\.\s?\d+)?|[-+−]?\.\d+)"
    r"|\b(" + "|".join(_NUMBER_WORDS) + r")\b",
    re.I,
)


def parse_number(text: str) -> float | None:
    """The first number in ``text`` (digits with optional sign, thousands commas and
    decimals, or an English number word zero..twenty), or ``None``."""
    m = _NUMBER_RE.search(text)
    if m is None:
        return None
    if m.group(2) is not None:
        return float(_NUMBER_WORDS[m.group(2).lower()])
    digits = re.sub(r"[\s,]", "", m.group(1)).replace("−", "-")
    try:
        value = float(digits)
    except ValueError:  # pragma: no cover - the regex only admits valid floats
        return None
    return value if math.isfinite(value) else None


def numeric_score(prediction: str, references: Sequence[str], tolerance: float = 0.0) -> float:
    """1.0 if the first number in the prediction is within ``tolerance`` of a reference
    number (``|p - r| <= tolerance``; the default 0 means exactly equal)."""
    pred = parse_number(prediction)
    if pred is None:
        return 0.0
    for ref in references:
        value = parse_number(ref)
        if value is not None and abs(pred - value) <= tolerance:
            return 1.0
    return 0.0


# ----------------------------------------------------------------------------- iou
_FLOAT = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"
_BOX_RE = re.compile(
    r"[\[\(]\s*("
    + _FLOAT
    + r")\s*,\s*("
    + _FLOAT
    + r")\s*,\s*("
    + _FLOAT
    + r")\s*,\s*("
    + _FLOAT
    + r")\s*[\]\)]"
)
# a decoded "0 . 25" -> "0.25" (word-level tokenizers put spaces around the point)
_SPACED_POINT = re.compile(r"(?<=\d)\s*\.\s*(?=\d)|(?<![\d.])\.\s+(?=\d)")


def parse_box(text: str) -> tuple[float, float, float, float] | None:
    """The first ``[x1, y1, x2, y2]`` (or ``(...)``) box in ``text``, or ``None``.

    Spaces around the brackets, commas and decimal points are allowed, as a
    word-level decode produces (``"[ 0 . 1 , 0.2 , 3 , 4 ]"``)."""
    m = _BOX_RE.search(_SPACED_POINT.sub(".", text))
    if m is None:
        return None
    try:
        box = tuple(float(g) for g in m.groups())
    except ValueError:  # pragma: no cover
        return None
    if not all(math.isfinite(v) for v in box):
        return None
    return box  # type: ignore[return-value]


def iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two ``[x1, y1, x2, y2]`` boxes (continuous
    coordinates, no +1 pixel convention). A box with x2 < x1 or y2 < y1 has area 0."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    area_a = max(0.0, a[2] - a[0]) * max(0.0, a[3] - a[1])
    area_b = max(0.0, b[2] - b[0]) * max(0.0, b[3] - b[1])
    union = area_a + area_b - inter
    if not union > 0.0 or not math.isfinite(union):
        return 0.0
    return min(1.0, max(0.0, inter / union))


def iou_score(prediction: str, references: Sequence[str], threshold: float = 0.5) -> float:
    """1.0 if the predicted box has IoU >= ``threshold`` with a reference box.
    An unparseable prediction is wrong (0.0)."""
    return 1.0 if best_iou(prediction, references) >= threshold else 0.0


def best_iou(prediction: str, references: Sequence[str]) -> float:
    """The best IoU of the predicted box with any parseable reference box (0.0 if the
    prediction has no box)."""
    pred = parse_box(prediction)
    if pred is None:
        return 0.0
    best = 0.0
    for ref in references:
        box = parse_box(ref)
        if box is not None:
            best = max(best, iou(pred, box))
    return best
