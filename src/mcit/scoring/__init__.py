"""Task scorers, faithful to the official evaluation code (see docs/scoring.md).

Public API::

    from mcit.scoring import score_task, available_scorers, TaskScore
    from mcit.scoring import vqa_accuracy, vqa_accuracy_evalai, caption_scores

Registry names: vqa, vqa_evalai, exact, contains, choice, numeric, iou, caption.
"""

from mcit.scoring.caption import caption_scores, evaluate_captions, tokenize_fallback, tokenize_ptb
from mcit.scoring.registry import (
    Scorer,
    TaskScore,
    available_scorers,
    check_scorer,
    get_scorer,
    score_task,
)
from mcit.scoring.simple import (
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
)
from mcit.scoring.vqa import (
    format_vqa_report,
    normalize_evalai,
    normalize_vqa,
    vqa_accuracy,
    vqa_accuracy_evalai,
    vqa_corpus_accuracy,
)

__all__ = [
    "Scorer",
    "TaskScore",
    "available_scorers",
    "caption_scores",
    "check_scorer",
    "choice_score",
    "contains_score",
    "evaluate_captions",
    "exact_score",
    "extract_choice",
    "format_vqa_report",
    "get_scorer",
    "iou",
    "iou_score",
    "normalize_evalai",
    "normalize_exact",
    "normalize_vqa",
    "numeric_score",
    "parse_box",
    "parse_number",
    "score_task",
    "tokenize_fallback",
    "tokenize_ptb",
    "vqa_accuracy",
    "vqa_accuracy_evalai",
    "vqa_corpus_accuracy",
]
