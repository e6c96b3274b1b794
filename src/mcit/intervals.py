"""Uncertainty of a run's numbers: a percentile bootstrap over its test samples.

Every resample draws each task's test samples with replacement (``RESAMPLES`` times, from a
fixed seed), and uses the same draw in every row of the matrix: the rows score one test set, so
a resample moves a task's column as a whole and the metrics built from differences of rows (BWT,
FWT, forgetting) keep their pairing. From the per-sample scores in ``predictions/`` each
resample recomputes every cell's headline (a caption task recomputes its corpus metric: BLEU from
the images' summed n-gram statistics, CIDEr-D and ROUGE-L as the mean of the images' scores, with
the document frequencies of the whole test set), then every metric. A cell's or a metric's 95%
interval is the 2.5th and 97.5th percentiles of its resampled values.

This is the variation due to the finite test set only; the variation due to training (seeds) is
what ``mcit compare --by`` shows, with its own interval over seeds.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np

from mcit.errors import McitError

RESAMPLES = 1000
SEED = 0
LEVEL = 0.95
DESCRIPTION = (f"percentile bootstrap over test samples: each task's samples drawn with replacement, the same "
               f"draw in every row; {RESAMPLES} resamples, seed {SEED}")


def headline_resampler(records: list[dict], scorer: str, options: dict) -> Callable[[np.ndarray], np.ndarray]:
    """A function from resampled indices ``[B, n]`` to the task's headline (0..100) on each of
    the B resamples, from one row's prediction records of one task."""
    if records and all(r.get("score") is not None for r in records):
        scores = np.array([r["score"] for r in records], dtype=np.float64)
        return lambda idx: 100.0 * scores[idx].mean(axis=1)
    if records and all("caption_stats" in r for r in records):
        return _caption_resampler(records, options.get("headline", "CIDEr"))
    raise McitError(f"scorer {scorer!r}: its predictions hold no per-sample scores to resample "
                    "(predictions written before mcit recorded them?)")


def _caption_resampler(records: list[dict], headline: str) -> Callable[[np.ndarray], np.ndarray]:
    from mcit.scoring.caption import corpus_bleu

    stats = np.array([r["caption_stats"]["bleu"] for r in records], dtype=np.float64)  # [n, 10]
    means = {m: np.array([r["caption_stats"][m] for r in records], dtype=np.float64) for m in ("CIDEr", "ROUGE-L")}

    def metrics(idx: np.ndarray) -> dict[str, np.ndarray]:
        totals = stats[idx].sum(axis=1)  # [B, 10]
        bleu = np.array([corpus_bleu(t) for t in totals])  # [B, 4]
        out = {f"BLEU-{k + 1}": 100.0 * bleu[:, k] for k in range(4)}
        out.update({m: 100.0 * v[idx].mean(axis=1) for m, v in means.items()})
        return out

    if headline == "mean":
        return lambda idx: np.mean(np.stack(list(metrics(idx).values())), axis=0)
    if headline not in ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "CIDEr", "ROUGE-L"):
        raise McitError(f"caption headline {headline!r} cannot be resampled (METEOR keeps no per-image scores)")
    return lambda idx: metrics(idx)[headline]


def _interval(values: np.ndarray) -> list[float]:
    lo, hi = np.percentile(values, [100 * (1 - LEVEL) / 2, 100 * (1 + LEVEL) / 2])
    return [round(float(lo), 4), round(float(hi), 4)]


def draws(results: dict, resamples: int = RESAMPLES, seed: int = SEED) -> dict[str, np.ndarray]:
    """Each task's resampled test-sample indices ``[B, n]``: one draw per task, shared by its rows
    (and, in a paired comparison, by the other run on the same test set)."""
    general = results.get("general") or {}
    rng = np.random.default_rng(seed)
    sizes = {**results["test_sizes"], **(general.get("test_sizes") or {})}
    return {t: rng.integers(0, sizes[t], size=(resamples, sizes[t]))
            for t in [*results["tasks"], *(general.get("tasks") or [])]}


def resampled_cells(run_dir: str | Path, results: dict, indices: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per task, its headline on every row and resample: ``[rows, B]``."""
    from mcit.flips import read_row

    general = results.get("general") or {}
    scorers = {**results["scorers"], **(general.get("scorers") or {})}
    options = results.get("scorer_options") or {}
    out = {}
    for task, idx in indices.items():
        rows = []
        for row in range(len(results["matrix"])):
            data = read_row(Path(run_dir), row, task)
            if data is None:
                raise McitError(f"{run_dir}: no predictions of {task!r} at row {row}")
            if len(data) != idx.shape[1]:
                raise McitError(f"{run_dir}: {task!r} has {len(data)} predictions at row {row}, not {idx.shape[1]}")
            rows.append(headline_resampler(list(data.values()), scorers[task], options.get(task, {}))(idx))
        out[task] = np.stack(rows)
    return out


def resampled_metrics(results: dict, cells: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every defined metric on every resample of the stream's matrix."""
    from mcit.metrics import metrics_for

    tasks = results["tasks"]
    n_rows, resamples = cells[tasks[0]].shape
    sizes = [results["test_sizes"][t] for t in tasks]
    walk = "sequential" if n_rows == len(tasks) + 1 else "joint"
    per_metric: dict[str, list[float]] = {}
    for b in range(resamples):
        matrix = [[float(cells[t][row, b]) for t in tasks] for row in range(n_rows)]
        for name, value in metrics_for(matrix, sizes, walk).items():
            if value is not None:
                per_metric.setdefault(name, []).append(value)
    return {name: np.array(v) for name, v in per_metric.items()}


def run_intervals(run_dir: str | Path, results: dict, resamples: int = RESAMPLES, seed: int = SEED) -> dict:
    """The 95% intervals of every cell of the stream's and the general tasks' matrices and of every
    metric of a run (``results`` as results.json holds it, predictions on disk)."""
    general = results.get("general") or {}
    tasks, gtasks = list(results["tasks"]), list(general.get("tasks") or [])
    cells = resampled_cells(run_dir, results, draws(results, resamples, seed))
    rows = range(len(results["matrix"]))
    out = {"method": DESCRIPTION, "level": LEVEL, "resamples": resamples, "seed": seed,
           "matrix": [[_interval(cells[t][r]) for t in tasks] for r in rows],
           "metrics": {name: _interval(v) for name, v in resampled_metrics(results, cells).items()}}
    if gtasks:
        means = np.stack([cells[t] for t in gtasks]).mean(axis=0)  # [rows, B]: each row's general mean
        out["general"] = {"matrix": [[_interval(cells[t][r]) for t in gtasks] for r in rows],
                          "final": _interval(means[-1]), "change": _interval(means[-1] - means[0])}
    return out


def paired_bootstrap(pairs: list[tuple[Path, dict, Path, dict]], metric: str, resamples: int = RESAMPLES,
                     seed: int = SEED) -> dict | None:
    """The difference A - B of ``metric`` between two methods over runs paired by seed (each pair
    scored on the same test set), resampling test samples jointly in both runs of a pair: the mean
    over pairs of the resampled difference, and its 95% interval. None when the metric is undefined,
    or when a run is archived without its ``predictions/`` (results.json and config.yaml kept: the
    seeds' Student's t interval still reads them)."""
    return contrast_bootstrap([[(dir_a, res_a, 1.0), (dir_b, res_b, -1.0)] for dir_a, res_a, dir_b, res_b in pairs],
                              metric, resamples, seed)


def contrast_bootstrap(groups: list[list[tuple[Path, dict, float]]], metric: str, resamples: int = RESAMPLES,
                       seed: int = SEED, label: str = "--paired") -> dict | None:
    """A weighted sum of ``metric`` over the runs of each group (one group a seed, every run of a
    group scored on the same test set; e.g. weights +1, -1 for a paired difference, +1, -1, -1, +1
    for a difference of differences), resampling test samples jointly in all runs of a group: the
    mean over groups of the resampled sum, and its 95% interval. None as :func:`paired_bootstrap`."""
    if not all((Path(d) / "predictions").is_dir() for group in groups for d, _, _ in group):
        return None
    sums, values = [], []
    for k, group in enumerate(groups):
        first_dir, first, _ = group[0]
        total, value = 0.0, 0.0
        for run_dir, res, _ in group:
            if res["tasks"] != first["tasks"] or res["test_sizes"] != first["test_sizes"]:
                raise McitError(f"{label}: {first_dir} and {run_dir} are not scored on the same tasks and test sets")
        idx = draws(first, resamples, seed + k)
        for run_dir, res, weight in group:
            resampled = resampled_metrics(res, resampled_cells(run_dir, res, idx)).get(metric)
            if resampled is None:
                return None
            total = total + weight * resampled
            value += weight * res["metrics"][metric]
        sums.append(total)
        values.append(value)
    return {"mean": float(np.mean(values)), "interval": _interval(np.mean(np.stack(sums), axis=0)),
            "pairs": len(groups), "resamples": resamples}


# two-sided 97.5% quantiles of Student's t, by degrees of freedom (1..30; beyond, the normal's)
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042]


def t_interval(values: list[float]) -> list[float] | None:
    """The 95% interval of the mean of ``values`` (runs over seeds) by Student's t; None for fewer
    than two values."""
    n = len(values)
    if n < 2:
        return None
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = (_T975[n - 2] if n - 1 <= len(_T975) else 1.96) * sd / math.sqrt(n)
    return [mean - half, mean + half]


__all__ = ["DESCRIPTION", "contrast_bootstrap", "draws", "headline_resampler", "paired_bootstrap", "resampled_cells", "resampled_metrics",
           "run_intervals", "t_interval"]
