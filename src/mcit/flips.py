"""What was forgotten, sample by sample: the test samples whose score changed between two rows of
a run's accuracy matrix, read from ``predictions/row_NN/<task>.jsonl``.

Between a reference row A (by default the row right after the task was learnt; row 0 for a
held-out general task or a run without sequential rows) and a later row B, over the rows A..B
that have predictions on disk:

- ``forgotten``: the score at B is below the score at A;
- ``recovered``: the score at B is back at (or above) A's, after falling below it on a row
  between them;
- ``learnt``: the score at B is above A's, without such a fall.

Samples whose score never moved are not flips. A sample's score is its scorer's per-sample
score (``score``); a caption task has none (its metric is corpus-level), so the headline metric
of the image alone (``image_score``) stands in.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from mcit.errors import McitError

CATEGORIES = ("forgotten", "recovered", "learnt")


@dataclass
class Flip:
    id: str
    category: str
    before: float  # the score at row A
    after: float  # the score at row B
    lowest: float  # the lowest score on rows A..B
    prediction_before: str
    prediction_after: str
    references: list[str]
    question: str | None = None
    image: str | None = None


@dataclass
class TaskFlips:
    task: str
    rows: tuple[int, int]
    samples: int  # test samples compared
    flips: dict[str, list[Flip]] = field(default_factory=lambda: {c: [] for c in CATEGORIES})
    skipped_rows: list[int] = field(default_factory=list)  # rows between A and B without predictions

    def counts(self) -> dict[str, int]:
        return {c: len(v) for c, v in self.flips.items()}


def row_file(run_dir: Path, row: int, task: str) -> Path:
    return Path(run_dir) / "predictions" / f"row_{row:02d}" / f"{task}.jsonl"


def read_row(run_dir: Path, row: int, task: str) -> dict[str, dict] | None:
    """A row's predictions of one task by sample id, or None when that row has none on disk."""
    path = row_file(run_dir, row, task)
    if not path.is_file():
        return None
    out = {}
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise McitError(f"{path}:{lineno}: malformed JSON ({e.msg})") from None
        out[str(rec["id"])] = rec
    return out


def sample_score(rec: dict) -> float | None:
    score = rec.get("score")
    return rec.get("image_score") if score is None else score


def run_rows(run_dir: Path) -> int:
    """How many rows of the matrix have predictions on disk (the highest row number + 1)."""
    folder = Path(run_dir) / "predictions"
    rows = [int(p.name[4:]) for p in folder.glob("row_*") if p.name[4:].isdigit()] if folder.is_dir() else []
    return max(rows) + 1 if rows else 0


def _run_record(run_dir: Path) -> dict:
    for name in ("results.json", "state.json"):
        path = Path(run_dir) / name
        if path.is_file():
            return json.loads(path.read_text())
    raise McitError(f"{run_dir}: neither results.json nor state.json (is it a run directory?)")


def run_tasks(run_dir: Path) -> tuple[list[str], list[str]]:
    """(stream tasks, general tasks) of a finished or unfinished run directory."""
    data = _run_record(run_dir)
    general = data.get("general") or []
    return list(data["tasks"]), list(general["tasks"] if isinstance(general, dict) else general)


def reference_row(run_dir: Path, task: str) -> int:
    """The row right after ``task`` was learnt (the row labelled with its name); 0 for a general
    task, or a run that learns no task on its own (joint, zero-shot)."""
    labels = _run_record(run_dir).get("row_labels") or []
    return labels.index(task) if task in labels else 0


def task_flips(run_dir: str | Path, task: str, rows: tuple[int, int] | None = None) -> TaskFlips:
    """The flips of one task between rows A and B (default: its reference row and the last row)."""
    run_dir = Path(run_dir)
    stream, general = run_tasks(run_dir)
    if task not in stream and task not in general:
        raise McitError(f"--task: the run has no task {task!r}; its tasks: {', '.join([*stream, *general])}")
    n_rows = run_rows(run_dir)
    a, b = rows if rows is not None else (reference_row(run_dir, task), n_rows - 1)
    if not 0 <= a <= b:
        raise McitError(f"--rows: expected two rows A,B with 0 <= A <= B, got {a},{b}")
    first, last = read_row(run_dir, a, task), read_row(run_dir, b, task)
    for row, data in ((a, first), (b, last)):
        if data is None:
            raise McitError(f"{row_file(run_dir, row, task)}: no predictions of {task!r} at row {row} "
                            f"(the run has rows 0..{n_rows - 1})")
    between = {r: read_row(run_dir, r, task) for r in range(a + 1, b)}
    return classify(task, (a, b), first, [d for d in between.values() if d is not None], last,
                    [r for r, d in between.items() if d is None])


def classify(task: str, rows: tuple[int, int], first: dict[str, dict], between: list[dict[str, dict]],
             last: dict[str, dict], skipped: list[int] | None = None) -> TaskFlips:
    """Sort the samples of row A (``first``) into the categories by their score at row B
    (``last``) and on the rows between."""
    out = TaskFlips(task, rows, len(first), skipped_rows=list(skipped or []))
    for sid, rec in first.items():
        end = last.get(sid)
        s0 = sample_score(rec)
        s1 = None if end is None else sample_score(end)
        if s0 is None or s1 is None:
            continue
        trail = [sample_score(d[sid]) for d in between if sid in d]
        lowest = min([s0, s1, *(s for s in trail if s is not None)])
        if s1 < s0:
            category = "forgotten"
        elif lowest < s0:
            category = "recovered"
        elif s1 > s0:
            category = "learnt"
        else:
            continue
        out.flips[category].append(Flip(sid, category, s0, s1, lowest, rec["prediction"], end["prediction"],
                                        list(rec.get("references", [])), rec.get("question"), rec.get("image")))
    for items in out.flips.values():  # the largest changes first, then by id
        items.sort(key=lambda f: (-abs(f.after - f.before), f.id))
    return out


def flip_counts(run_dir: str | Path) -> dict[str, dict[str, list[int | None]]]:
    """Per category (``forgotten_samples``, ``recovered_samples``, ``learnt_samples``), per task,
    per row: the flips between the task's reference row and that row (None up to the reference row)."""
    run_dir = Path(run_dir)
    stream, general = run_tasks(run_dir)
    n_rows = run_rows(run_dir)
    out: dict[str, dict[str, list[int | None]]] = {f"{c}_samples": {} for c in CATEGORIES}
    for task in [*stream, *general]:
        ref = reference_row(run_dir, task)
        per_row = {c: [None] * n_rows for c in CATEGORIES}
        first = read_row(run_dir, ref, task)
        seen: list[dict] = []  # the rows after the reference one that have predictions, in order
        for row in range(ref + 1, n_rows):
            data = read_row(run_dir, row, task)
            if first is None or data is None:
                continue
            counts = classify(task, (ref, row), first, seen, data).counts()
            seen.append(data)
            for c in CATEGORIES:
                per_row[c][row] = counts[c]
        for c in CATEGORIES:
            out[f"{c}_samples"][task] = per_row[c]
    return out


__all__ = ["CATEGORIES", "Flip", "TaskFlips", "classify", "flip_counts", "task_flips"]
