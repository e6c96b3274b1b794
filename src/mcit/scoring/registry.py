"""The scorer registry: a task names its scorer, ``score_task`` runs it.

Every scorer takes the predictions (one string each) and, for each, the list of its
reference answers, validates its options, and returns a :class:`TaskScore` whose
``headline`` (0..100) goes into the accuracy matrix and whose ``scorer`` name is what
results.json records for the task.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import mcit.scoring.simple as simple
from mcit.errors import McitError
from mcit.scoring.caption import CAPTION_METRICS, TOKENIZERS, evaluate_captions
from mcit.scoring.vqa import vqa_accuracy, vqa_accuracy_evalai

__all__ = ["Scorer", "TaskScore", "available_scorers", "check_scorer", "get_scorer", "score_task"]


@dataclass
class TaskScore:
    scorer: str  # registry name, e.g. "vqa"
    headline: float  # 0..100 (caption: CIDEr x 100 by default, may exceed 100)
    details: dict[str, float]  # every sub-metric, 0..100 scale
    per_sample: list[float] | None  # per-prediction score in [0, 1], mean = headline; None for captions
    info: dict = field(default_factory=dict)
    # captions, per image: "score" = the headline metric of that image alone (0..1 scale; a
    # per-sample view for flips, never averaged into the headline), "CIDEr" and "ROUGE-L" of the
    # image (their corpus scores are the means), "bleu" = its BLEU sufficient statistics (summed
    # over images, they give the corpus BLEU): what resampling images needs
    per_image: list[dict] | None = None


@dataclass(frozen=True)
class Option:
    default: Any
    allowed: str  # human-readable, for messages and available_scorers()
    check: Callable[[Any], Any]  # returns the (normalised) value or raises ValueError


@dataclass(frozen=True)
class Scorer:
    name: str
    description: str
    options: dict[str, Option]
    run: Callable[[list[str], list[list[str]], dict[str, Any]], TaskScore]


# ------------------------------------------------------------------ option checks
def _one_of(*choices: str) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        if value not in choices:
            raise ValueError
        return value

    return check


def _number(low: float, high: float = math.inf) -> Callable[[Any], float]:
    def check(value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError
        if not (math.isfinite(value) and low <= value <= high):
            raise ValueError
        return float(value)

    return check


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError
    return value


# ---------------------------------------------------------------------- runners
def _plain_sum(values: Sequence[float]) -> float:
    total = 0.0
    for v in values:
        total += v
    return total


def _percent(values: Sequence[float]) -> float:
    return 100.0 * _plain_sum(values) / len(values) if values else 0.0


def _check_references(name: str, refs: list[list[str]], parse: Callable, what: str) -> None:
    """A reference list in which nothing parses is a data error, not a wrong answer."""
    for i, r in enumerate(refs):
        if not any(parse(x) is not None for x in r):
            raise McitError(f"scorer {name!r}: reference {i} has no parseable {what}: {r!r}")


def _per_sample(
    fn: Callable[..., float], note: str, parse: tuple[str, Callable, str] | None = None
) -> Callable[..., TaskScore]:
    def run(preds: list[str], refs: list[list[str]], opts: dict[str, Any]) -> TaskScore:
        if parse is not None:
            _check_references(parse[0], refs, parse[1], parse[2])
        per = [fn(p, r, **opts) for p, r in zip(preds, refs, strict=True)]
        acc = _percent(per)
        return TaskScore("", acc, {"accuracy": acc}, per, {"n": len(per), "rule": note})

    return run


def _run_iou(preds: list[str], refs: list[list[str]], opts: dict[str, Any]) -> TaskScore:
    _check_references("iou", refs, simple.parse_box, "box [x1, y1, x2, y2]")
    ious = [simple.best_iou(p, r) for p, r in zip(preds, refs, strict=True)]
    per = [1.0 if v >= opts["threshold"] else 0.0 for v in ious]
    acc = _percent(per)
    details = {"accuracy": acc, "mean_iou": _percent(ious)}
    return TaskScore("", acc, details, per, {"n": len(per), "threshold": opts["threshold"]})


def _run_caption(preds: list[str], refs: list[list[str]], opts: dict[str, Any]) -> TaskScore:
    references = {str(i): list(r) for i, r in enumerate(refs)}
    candidates = {str(i): p for i, p in enumerate(preds)}
    each: dict[str, list[float]] = {}
    scores, info = evaluate_captions(
        references, candidates, tokenizer=opts["tokenizer"], meteor=opts["meteor"], per_image=each
    )
    details = {name: 100.0 * value for name, value in scores.items()}
    if opts["headline"] == "mean":
        headline = _plain_sum(list(details.values())) / len(details)
        alone = [_plain_sum(v) / len(v) for v in zip(*(each[m] for m in CAPTION_METRICS), strict=True)]
    else:
        headline = details[opts["headline"]]
        alone = each.get(opts["headline"])  # METEOR has none
    per_image = None
    if each:
        per_image = [{"score": None if alone is None else alone[i], "CIDEr": each["CIDEr"][i],
                      "ROUGE-L": each["ROUGE-L"][i], "bleu": each["bleu_stats"][i]} for i in range(len(preds))]
    info = dict(info, n=len(preds), headline=opts["headline"])
    return TaskScore("", headline, details, None, info, per_image)


_HEADLINES = (*CAPTION_METRICS, "METEOR", "mean")

_REGISTRY: dict[str, Scorer] = {}


def _register(name: str, description: str, run: Callable, **options: Option) -> None:
    _REGISTRY[name] = Scorer(name, description, dict(options), run)


_register(
    "vqa",
    "official VQAv2 accuracy (vqaEval.py normalisation, min(1, matches/3) averaged over "
    "leave-one-annotator-out subsets); references = the annotator answers",
    _per_sample(vqa_accuracy, "official VQAv2 vqaEval.py"),
)
_register(
    "vqa_evalai",
    "TextVQA/EvalAI soft accuracy (m4c EvalAIAnswerProcessor normalisation, always "
    "applied); references = the annotator answers",
    _per_sample(vqa_accuracy_evalai, "m4c EvalAIAnswerProcessor"),
)
_register(
    "exact",
    "exact match after strip, lower-case and dropping trailing periods, against any reference",
    _per_sample(simple.exact_score, "strip().lower().rstrip('.').strip()"),
)
_register(
    "contains",
    "substring match after the exact normalisation (answer in prediction, or either way)",
    _per_sample(simple.contains_score, "substring after exact normalisation"),
    direction=Option(
        "both", "one of both, answer_in_prediction", _one_of("both", "answer_in_prediction")
    ),
)
_register(
    "choice",
    "option letter read from free text ('B', '(B)', 'B. ...', 'The answer is B') equals the reference letter",
    _per_sample(simple.choice_score, "option letter", ("choice", simple.extract_choice, "letter")),
)
_register(
    "numeric",
    "first number in the prediction within tolerance of the reference number (|p - r| <= tolerance)",
    _per_sample(
        simple.numeric_score,
        "first number, |p - r| <= tolerance",
        ("numeric", simple.parse_number, "number"),
    ),
    tolerance=Option(0.0, "a number >= 0", _number(0.0)),
)
_register(
    "iou",
    "box '[x1, y1, x2, y2]' parsed from the prediction has IoU >= threshold with the reference box",
    _run_iou,
    threshold=Option(0.5, "a number in [0, 1]", _number(0.0, 1.0)),
)
_register(
    "caption",
    "COCO caption metrics (BLEU-1..4, CIDEr-D, ROUGE-L; METEOR optional), corpus-level, x100",
    _run_caption,
    headline=Option("CIDEr", "one of " + ", ".join(_HEADLINES), _one_of(*_HEADLINES)),
    tokenizer=Option("auto", "one of " + ", ".join(TOKENIZERS), _one_of(*TOKENIZERS)),
    meteor=Option(False, "true or false (METEOR needs Java)", _boolean),
)


# ---------------------------------------------------------------------- public API
def available_scorers() -> dict[str, str]:
    """Registry name -> one-line description, with the accepted options."""
    out = {}
    for name, scorer in _REGISTRY.items():
        if scorer.options:
            opts = "; ".join(
                f"{k}: {o.allowed} (default {o.default!r})" for k, o in scorer.options.items()
            )
            out[name] = f"{scorer.description}. Options: {opts}"
        else:
            out[name] = f"{scorer.description}. No options"
    return out


def get_scorer(name: str) -> Scorer:
    if name not in _REGISTRY:
        raise McitError(
            f"unknown scorer {name!r}; available scorers: {', '.join(sorted(_REGISTRY))}"
        )
    return _REGISTRY[name]


def check_scorer(name: str, options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Validate a scorer name and its options up front; returns the options with defaults."""
    return _resolve_options(get_scorer(name), options)


def _resolve_options(scorer: Scorer, options: Mapping[str, Any] | None) -> dict[str, Any]:
    if options is None:
        options = {}
    if not isinstance(options, Mapping):
        raise McitError(f"scorer {scorer.name!r}: options must be a mapping, got {options!r}")
    resolved = {k: o.default for k, o in scorer.options.items()}
    for key, value in options.items():
        if key not in scorer.options:
            allowed = ", ".join(scorer.options) or "none"
            raise McitError(
                f"scorer {scorer.name!r} has no option {key!r}; allowed options: {allowed}"
            )
        try:
            resolved[key] = scorer.options[key].check(value)
        except ValueError:
            raise McitError(
                f"scorer {scorer.name!r}, option {key!r}: expected "
                f"{scorer.options[key].allowed}, got {value!r}"
            ) from None
    if scorer.name == "caption" and resolved["headline"] == "METEOR" and not resolved["meteor"]:
        raise McitError("scorer 'caption', option 'headline': 'METEOR' needs option meteor: true")
    return resolved


def _check_inputs(name: str, predictions: Any, references: Any) -> tuple[list, list]:
    if isinstance(predictions, str) or not isinstance(predictions, Sequence):
        raise McitError(f"scorer {name!r}: predictions must be a list of strings")
    if isinstance(references, str) or not isinstance(references, Sequence):
        raise McitError(f"scorer {name!r}: references must be a list of answer lists")
    if len(predictions) != len(references):
        raise McitError(
            f"scorer {name!r}: {len(predictions)} predictions but {len(references)} "
            "reference lists (they must match one to one)"
        )
    preds, refs = [], []
    for i, (p, r) in enumerate(zip(predictions, references, strict=True)):
        if not isinstance(p, str):
            raise McitError(f"scorer {name!r}: prediction {i} is not a string: {p!r}")
        if isinstance(r, str):
            r = [r]  # a single reference given bare
        if not isinstance(r, Sequence) or not r or not all(isinstance(x, str) for x in r):
            raise McitError(
                f"scorer {name!r}: references[{i}] must be a non-empty list of strings, got {r!r}"
            )
        preds.append(p)
        refs.append(list(r))
    return preds, refs


def score_task(
    name: str,
    predictions: list[str],
    references: list[list[str]],
    options: dict | None = None,
) -> TaskScore:
    """Score one task's predictions with the named scorer.

    ``references[i]`` lists the reference answers of prediction ``i`` (10 annotator
    answers for ``vqa``, one answer for ``exact`` etc., several captions for
    ``caption``). Raises :class:`McitError` for an unknown scorer, an unknown option or
    bad option value, or mismatched lengths. An empty task scores 0.0.
    """
    scorer = get_scorer(name)
    opts = _resolve_options(scorer, options)
    preds, refs = _check_inputs(name, predictions, references)
    result = scorer.run(preds, refs, opts)
    result.scorer = name
    result.info.setdefault("options", opts)
    return result
