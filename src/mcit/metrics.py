"""Continual-learning metrics computed from the accuracy matrix.

The matrix ``A`` has ``T + 1`` rows and ``T`` columns: row 0 is the starting model
evaluated zero-shot on every task, row ``t`` (1..T) is the model after training task
``t``, and column ``i`` is task ``i``'s test score on a 0..100 scale (whatever that
task's scorer reports as its headline number).

With 1-based task indices as in ``docs/scoring.md`` and methods.md:

- ``MFT`` = mean_i A[i, i]                      (score right after learning each task)
- ``MFN`` = mean_i A[T, i]                      ("Last", final average)
- ``FAA_weighted`` = sum_i n_i / sum(n) * A[T, i] (DGG's final average, by test size)
- ``MAA`` = mean_{t=1..T} mean_{i<=t} A[t, i]   ("Avg", mean of the seen-task averages)
- ``BWT`` = mean_{i<T} (A[T, i] - A[i, i])        (negative = forgetting)
- ``forgetting`` = mean_{i<T} (max_{t>=i} A[t, i] - A[T, i])   (He et al.'s "BWT")
- ``FWT`` = mean_{i>1} (A[i-1, i] - A[0, i])      (transfer to a task before training it)

Undefined values are ``None`` (never NaN): with ``T = 1`` there is no earlier task, so
``BWT``, ``forgetting`` and ``FWT`` are ``None``; ``FAA_weighted`` is ``None`` when no
test sizes are given. Values are full float precision (no rounding).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

from mcit.errors import McitError

__all__ = ["GENERAL_METRIC_NAMES", "METRIC_NAMES", "continual_metrics", "general_metrics", "prediction_spread"]

METRIC_NAMES = ("MFT", "MFN", "MAA", "BWT", "FWT", "forgetting", "FAA_weighted")


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def _check_matrix(matrix: Sequence[Sequence[float]]) -> list[list[float]]:
    """Validate the shape and values; return a plain list-of-lists of floats."""
    try:
        rows = list(matrix)
    except TypeError as exc:
        raise McitError(
            f"accuracy matrix must be a list of rows, got {type(matrix).__name__}"
        ) from exc
    if len(rows) < 2:
        raise McitError(
            f"accuracy matrix needs T+1 >= 2 rows (row 0 = zero-shot, then one row per "
            f"task), got {len(rows)} row(s)"
        )
    n_tasks = len(rows) - 1
    checked: list[list[float]] = []
    for r, row in enumerate(rows):
        label = "row 0 (zero-shot)" if r == 0 else f"row {r} (after task {r})"
        if isinstance(row, (str, bytes)) or not isinstance(row, Sequence):
            try:
                row = list(row)
            except TypeError as exc:
                raise McitError(
                    f"accuracy matrix {label} is not a list of numbers: {row!r}"
                ) from exc
        if len(row) != n_tasks:
            raise McitError(
                f"accuracy matrix is ragged or wrongly shaped: {label} has {len(row)} "
                f"value(s), expected T = {n_tasks} (the matrix has T+1 = {len(rows)} rows)"
            )
        out_row = []
        for c, value in enumerate(row):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                try:
                    value = float(value)  # numpy scalars and the like
                except (TypeError, ValueError) as exc:
                    raise McitError(
                        f"accuracy matrix {label}, column {c + 1}: {value!r} is not a number"
                    ) from exc
            value = float(value)
            if not math.isfinite(value):
                raise McitError(
                    f"accuracy matrix {label}, column {c + 1}: value {value!r} is not finite"
                )
            out_row.append(value)
        checked.append(out_row)
    return checked


def _check_sizes(test_sizes: Sequence[float], n_tasks: int) -> list[float]:
    sizes = list(test_sizes)
    if len(sizes) != n_tasks:
        raise McitError(f"test_sizes has {len(sizes)} value(s), expected one per task ({n_tasks})")
    out = []
    for i, n in enumerate(sizes):
        if isinstance(n, bool) or not isinstance(n, (int, float)):
            raise McitError(f"test_sizes[{i}] = {n!r} is not a number")
        if not math.isfinite(n) or n < 0:
            raise McitError(f"test_sizes[{i}] = {n!r} must be a finite number >= 0")
        out.append(float(n))
    if sum(out) <= 0:
        raise McitError("test_sizes must not all be zero")
    return out


def continual_metrics(
    matrix: Sequence[Sequence[float]], test_sizes: Sequence[float] | None = None
) -> dict[str, float | None]:
    """Compute MFT, MFN, MAA, BWT, FWT, forgetting and FAA_weighted from the matrix.

    ``matrix`` is a list of ``T + 1`` rows of ``T`` finite numbers (row 0 = zero-shot).
    ``test_sizes`` (optional) gives each task's test-set size for ``FAA_weighted``.
    Raises :class:`McitError` on a ragged or wrongly shaped matrix or a non-finite
    value, naming the row.
    """
    a = _check_matrix(matrix)
    t_final = len(a) - 1  # T
    # 0-based column j is task j+1; row index = task number.
    diag = [a[j + 1][j] for j in range(t_final)]
    last = a[t_final]

    result: dict[str, float | None] = {
        "MFT": _mean(diag),
        "MFN": _mean(last),
        "MAA": _mean([_mean(a[t][:t]) for t in range(1, t_final + 1)]),
        "BWT": None,
        "FWT": None,
        "forgetting": None,
        "FAA_weighted": None,
    }
    if t_final > 1:
        old = range(t_final - 1)  # tasks 1..T-1
        result["BWT"] = _mean([last[j] - diag[j] for j in old])
        result["forgetting"] = _mean(
            [max(a[t][j] for t in range(j + 1, t_final + 1)) - last[j] for j in old]
        )
        result["FWT"] = _mean([a[j][j] - a[0][j] for j in range(1, t_final)])
    if test_sizes is not None:
        sizes = _check_sizes(test_sizes, t_final)
        total = sum(sizes)
        result["FAA_weighted"] = sum(n / total * s for n, s in zip(sizes, last, strict=True))
    return result


GENERAL_METRIC_NAMES = ("start", "final", "change", "lowest")


def general_metrics(rows: Sequence[Sequence[float]]) -> dict[str, float | None]:
    """How much of the start's general ability a run keeps, from the held-out general tasks'
    scores in every row (row 0 = the start): ``start`` and ``final`` are the mean over tasks of
    the first and last rows, ``change`` = final - start (negative = general ability lost),
    ``lowest`` the lowest row mean on the way. All ``None`` without general tasks."""
    means = [_mean(list(r)) for r in rows if len(r)]
    if not means:
        return dict.fromkeys(GENERAL_METRIC_NAMES)
    return {"start": means[0], "final": means[-1], "change": means[-1] - means[0], "lowest": min(means)}


COLLAPSE_SHARE = 0.9  # one answer above this share of a task's predictions looks like a collapsed model


def prediction_spread(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict:
    """How varied a task's predictions are: the most frequent one (case and surrounding spaces
    ignored), its share, the number of distinct predictions, and the share of the most frequent
    first reference (what the share would be if every prediction were right). ``collapsed`` flags
    one answer covering more than :data:`COLLAPSE_SHARE` of the predictions where the references
    are more varied than that."""
    from collections import Counter

    if not predictions:
        return {"top": None, "top_share": None, "distinct": 0, "reference_top_share": None, "collapsed": False}
    counts = Counter(p.strip().lower() for p in predictions)
    top, n = counts.most_common(1)[0]
    refs = Counter(r[0].strip().lower() for r in references if r)
    ref_share = refs.most_common(1)[0][1] / sum(refs.values()) if refs else None
    share = n / len(predictions)
    return {"top": top, "top_share": share, "distinct": len(counts), "reference_top_share": ref_share,
            "collapsed": share > COLLAPSE_SHARE and (ref_share is None or ref_share <= COLLAPSE_SHARE)}


def metrics_for(matrix: list[list[float]], test_sizes: list[int], walk: str) -> dict:
    """Continual metrics of a sequential run; for joint / zero-shot (one row after the start, or
    none) only the final-row metrics are defined."""
    if walk == "sequential" and len(matrix) == len(matrix[0]) + 1:
        return continual_metrics(matrix, test_sizes)
    last = matrix[-1]
    total = sum(test_sizes)
    out = dict.fromkeys(METRIC_NAMES)
    out["MFN"] = statistics.fmean(last)
    out["FAA_weighted"] = sum(n * a for n, a in zip(test_sizes, last, strict=True)) / total if total else None
    return out
