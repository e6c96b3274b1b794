"""Intervals: the test-set bootstrap of cells and metrics, Student's t over seeds, paired
comparisons; on hand-built runs with known answers."""

import json
import math

import pytest

from mcit.errors import McitError
from mcit.intervals import run_intervals, t_interval
from mcit.report import metrics_for


def _run(path, scores: dict[int, dict[str, list[float]]], tasks=("a", "b"), seed=0, method="m", name=None):
    """A finished run directory: per row, per task, the per-sample scores (0/1)."""
    for row, per_task in scores.items():
        for task, values in per_task.items():
            f = path / "predictions" / f"row_{row:02d}" / f"{task}.jsonl"
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_text("".join(json.dumps({"id": f"{task}{i}", "prediction": "p", "references": ["r"], "score": v})
                                 + "\n" for i, v in enumerate(values)))
    n_rows = len(scores)
    matrix = [[100 * sum(scores[r][t]) / len(scores[r][t]) for t in tasks] for r in range(n_rows)]
    sizes = {t: len(scores[0][t]) for t in tasks}
    results = {"tasks": list(tasks), "scorers": dict.fromkeys(tasks, "exact"), "test_sizes": sizes, "seed": seed,
               "method": method, "matrix": matrix, "metrics": metrics_for(matrix, list(sizes.values()), "sequential"),
               "row_labels": ["zero-shot", *tasks]}
    (path / "results.json").write_text(json.dumps(results))
    (path / "config.yaml").write_text(f"seed: {seed}\n" + (f"name: {name}\n" if name else ""))
    return results


def test_a_cell_interval_matches_the_binomial_and_pins_certainty(tmp_path):
    half = [1.0] * 50 + [0.0] * 50
    results = _run(tmp_path / "r", {0: {"a": half, "b": [1.0] * 100}, 1: {"a": half, "b": [1.0] * 100},
                                    2: {"a": half, "b": [1.0] * 100}})
    iv = run_intervals(tmp_path / "r", results)
    lo, hi = iv["matrix"][0][0]
    se = 100 * math.sqrt(0.25 / 100)
    assert lo == pytest.approx(50 - 1.96 * se, abs=1.5) and hi == pytest.approx(50 + 1.96 * se, abs=1.5)
    assert iv["matrix"][2][1] == [100.0, 100.0]  # every sample right: no uncertainty
    # the same draw in every row: a column that never changes has BWT exactly 0 on every resample
    assert iv["metrics"]["BWT"] == [0.0, 0.0] and iv["metrics"]["forgetting"] == [0.0, 0.0]
    assert run_intervals(tmp_path / "r", results) == iv  # seeded


def test_intervals_shrink_as_test_sets_grow(tmp_path):
    widths = {}
    for n in (100, 1600):
        col = ([1.0] * 3 + [0.0]) * (n // 4)
        results = _run(tmp_path / str(n), {r: {"a": col, "b": col} for r in range(3)})
        lo, hi = run_intervals(tmp_path / str(n), results)["metrics"]["MFN"]
        widths[n] = hi - lo
    assert widths[100] / widths[1600] == pytest.approx(4.0, rel=0.2)  # 1/sqrt(n)


def test_metric_intervals_hold_the_point_estimate(tmp_path):
    import random

    rng = random.Random(0)
    scores = {r: {t: [float(rng.random() < p) for _ in range(200)] for t, p in (("a", 0.3 + 0.2 * r), ("b", 0.6))}
              for r in range(3)}
    results = _run(tmp_path / "r", scores)
    iv = run_intervals(tmp_path / "r", results)
    for name in ("MFT", "MFN", "BWT", "FWT", "forgetting", "MAA"):
        lo, hi = iv["metrics"][name]
        assert lo <= results["metrics"][name] <= hi, name
        assert hi - lo > 0.5 or name == "forgetting", name  # a's score only rises: no forgetting to vary


def test_t_interval_known_answers():
    assert t_interval([1.0]) is None
    lo, hi = t_interval([10.0, 12.0, 14.0])  # mean 12, sd 2, t(2) = 4.303
    assert (lo, hi) == pytest.approx((12 - 4.303 * 2 / math.sqrt(3), 12 + 4.303 * 2 / math.sqrt(3)))


def test_paired_differences_by_seed(tmp_path, monkeypatch, capsys):
    import sys

    from mcit.cli import main
    from mcit.report import paired_table

    runs = []
    for method, p in (("good", 0.8), ("bad", 0.5)):
        for seed in (0, 1, 2):
            col = [1.0] * int(100 * (p + 0.05 * seed)) + [0.0] * (100 - int(100 * (p + 0.05 * seed)))
            d = tmp_path / f"{method}{seed}"
            _run(d, {r: {"a": col, "b": col} for r in range(3)}, seed=seed, method=method)
            runs.append(d)
    ids, body = paired_table(runs, "method", "good", "bad")
    mfn = next(r for r in body if r[0] == "MFN")
    assert ids[:4] == ["metric", "seed 0", "seed 1", "seed 2"]
    assert mfn[1:4] == pytest.approx([30.0, 30.0, 30.0]) and mfn[4] == pytest.approx(30.0)
    assert mfn[5:7] == pytest.approx([30.0, 30.0])  # no spread over seeds
    assert mfn[7] < 30.0 < mfn[8] and mfn[7] > 15.0  # the paired bootstrap over test samples
    monkeypatch.setattr(sys, "argv", ["mcit", "compare", *map(str, runs), "--paired", "good,bad", "--no-figure",
                                      "--format", "md", "--by", "method"])
    main()
    text = capsys.readouterr().out
    assert "| MFN | 30.00 | 30.00 | 30.00 | 30.00 | 30.00 | 30.00 |" in text
    assert "| good | 3 |" in text and " ± " in text and " [" in text  # groups: mean ± std [t-interval]

    # two runs of one group and seed (e.g. an ablation that reports its method's name): refused, not guessed
    twin = tmp_path / "good0b"
    _run(twin, {r: {"a": [1.0] * 100, "b": [1.0] * 100} for r in range(3)}, seed=0, method="good")
    with pytest.raises(McitError, match="has two runs of seed 0"):
        paired_table([*runs, twin], "method", "good", "bad")


def test_a_run_records_its_intervals(smoke_run):
    out, results = smoke_run
    iv = results["intervals"]
    assert len(iv["matrix"]) == len(results["matrix"]) and iv["resamples"] == 1000
    for row, spans in zip(results["matrix"], iv["matrix"], strict=True):
        for v, (lo, hi) in zip(row, spans, strict=True):
            assert lo <= v + 1e-9 and v - 1e-9 <= hi
    assert len(iv["general"]["matrix"][0]) == 2
    assert "| 95% interval |" in (out / "report.md").read_text()
