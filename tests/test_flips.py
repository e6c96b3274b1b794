"""Flips on hand-built run directories: every category, ties, a missing row, caption tasks."""

import json

import pytest

from mcit.errors import McitError
from mcit.flips import flip_counts, task_flips


def _run(tmp_path, rows: dict[int, dict[str, list[tuple[str, float]]]], tasks=("a", "b"), general=("g",),
         labels=None):
    """A run directory whose row R holds, per task, (prediction, score) for samples s0, s1, ..."""
    run = tmp_path / "run"
    for row, per_task in rows.items():
        for task, samples in per_task.items():
            path = run / "predictions" / f"row_{row:02d}" / f"{task}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(json.dumps({"id": f"s{i}", "prediction": p, "references": ["ref"], "score": s,
                                                "question": f"q{i}?", "image": None}) + "\n"
                                    for i, (p, s) in enumerate(samples)))
    labels = labels or ["zero-shot", *tasks]
    (run / "state.json").write_text(json.dumps({"tasks": list(tasks), "general": list(general), "row_labels": labels}))
    return run


def test_every_category_and_ties(tmp_path):
    # task a is learnt at row 1; rows 2 and 3 follow. s0 stays right (a tie: no flip), s1 is
    # forgotten, s2 dips at row 2 and recovers, s3 is learnt later, s4 dips and ends above its start
    a = {1: [("x", 1.0), ("x", 1.0), ("x", 1.0), ("y", 0.0), ("z", 0.3)],
         2: [("x", 1.0), ("w", 0.0), ("w", 0.0), ("y", 0.0), ("w", 0.0)],
         3: [("x", 1.0), ("w", 0.0), ("x", 1.0), ("x", 1.0), ("x", 1.0)]}
    run = _run(tmp_path, {r: {"a": s} for r, s in a.items()} | {0: {"a": [("n", 0.0)] * 5}})
    result = task_flips(run, "a")
    assert result.rows == (1, 3) and result.samples == 5
    assert {c: [f.id for f in v] for c, v in result.flips.items()} == {
        "forgotten": ["s1"], "recovered": ["s4", "s2"], "learnt": ["s3"]}
    s1 = result.flips["forgotten"][0]
    assert (s1.before, s1.after, s1.prediction_before, s1.prediction_after, s1.question) == (1.0, 0.0, "x", "w", "q1?")
    # recovered samples sort by the size of their change: s4 moved 0.7, s2 did not move at all
    assert [f.lowest for f in result.flips["recovered"]] == [0.0, 0.0]
    # between two adjacent rows nothing can recover
    assert task_flips(run, "a", (1, 2)).counts() == {"forgotten": 3, "recovered": 0, "learnt": 0}
    # the same rows: nothing changed
    assert task_flips(run, "a", (3, 3)).counts() == {"forgotten": 0, "recovered": 0, "learnt": 0}


def test_a_missing_row_is_left_out_and_named(tmp_path):
    rows = {0: {"a": [("n", 0.0)]}, 1: {"a": [("x", 1.0)]}, 3: {"a": [("x", 1.0)]}}
    run = _run(tmp_path, rows, tasks=("a", "b", "c"))
    result = task_flips(run, "a")
    assert result.rows == (1, 3) and result.skipped_rows == [2] and result.counts()["forgotten"] == 0
    with pytest.raises(McitError, match=r"row_02/a.jsonl: no predictions of 'a' at row 2 \(the run has rows 0..3\)"):
        task_flips(run, "a", (1, 2))
    with pytest.raises(McitError, match="--task: the run has no task 'z'; its tasks: a, b, c, g"):
        task_flips(run, "z")
    with pytest.raises(McitError, match="--rows: expected two rows A,B with 0 <= A <= B"):
        task_flips(run, "a", (3, 1))


def test_counts_per_task_and_row(tmp_path):
    rows = {
        0: {"a": [("n", 0.0), ("n", 0.0)], "g": [("r", 1.0), ("r", 1.0)]},
        1: {"a": [("x", 1.0), ("x", 1.0)], "g": [("r", 1.0), ("w", 0.0)]},
        2: {"a": [("w", 0.0), ("x", 1.0)], "b": [("x", 1.0)], "g": [("w", 0.0), ("r", 1.0)]},
    }
    counts = flip_counts(_run(tmp_path, rows))
    assert counts["forgotten_samples"] == {"a": [None, None, 1], "b": [None, None, None], "g": [None, 1, 1]}
    # g's s1 fell at row 1 and is back at row 2
    assert counts["recovered_samples"]["g"] == [None, 0, 1]
    assert counts["learnt_samples"]["a"] == [None, None, 0]


def test_joint_runs_compare_with_the_start(tmp_path):
    rows = {0: {"a": [("n", 0.0)], "b": [("m", 1.0)]}, 1: {"a": [("x", 1.0)], "b": [("w", 0.0)]}}
    run = _run(tmp_path, rows, general=(), labels=["zero-shot", "joint"])
    assert task_flips(run, "a").counts() == {"forgotten": 0, "recovered": 0, "learnt": 1}
    assert task_flips(run, "b").counts()["forgotten"] == 1


def test_caption_tasks_use_each_images_own_score():
    from mcit.scoring import score_task

    refs = [["a red circle on the left"], ["a blue square"]]
    result = score_task("caption", ["a red circle on the left", "nothing here"], refs, {"headline": "BLEU-4"})
    assert result.per_sample is None and len(result.per_image) == 2
    assert result.per_image[0]["score"] == pytest.approx(1.0) and result.per_image[1]["score"] < 0.01
    cider = score_task("caption", ["a red circle on the left", "nothing here"], refs, {})
    # CIDEr-D and ROUGE-L: the corpus scores are the means of the images'
    assert sum(i["score"] for i in cider.per_image) / 2 == pytest.approx(cider.details["CIDEr"] / 100)
    assert sum(i["ROUGE-L"] for i in cider.per_image) / 2 == pytest.approx(cider.details["ROUGE-L"] / 100)


def test_flips_of_a_real_run(smoke_run, monkeypatch, capsys):
    import sys

    from mcit.cli import main

    out, results = smoke_run
    assert results["forgotten_samples"][results["tasks"][-1]] == [None] * 4  # learnt last: nothing after it
    for task in results["tasks"][:-1]:
        counts = task_flips(out, task).counts()
        assert results["forgotten_samples"][task][-1] == counts["forgotten"]
        assert results["recovered_samples"][task][-1] == counts["recovered"]
    monkeypatch.setattr(sys, "argv", ["mcit", "flips", str(out), "--task", "color", "--rows", "0,1"])
    main()
    text = capsys.readouterr().out
    assert text.startswith("color rows 0 -> 1 (16 samples):")


def test_summed_bleu_statistics_give_the_corpus_bleu_exactly():
    """Resampling images needs BLEU from per-image statistics: on the whole corpus it must be
    pycocoevalcap's own number, and on a subset that subset's corpus BLEU."""
    import random

    from mcit.scoring.caption import corpus_bleu, evaluate_captions

    rng = random.Random(0)
    words = "a red blue green circle square on the left right top of and".split()
    refs = {str(i): [" ".join(rng.choices(words, k=rng.randint(3, 9))) for _ in range(3)] for i in range(40)}
    cands = {k: " ".join(rng.choices(words, k=rng.randint(2, 10))) for k in refs}
    each: dict = {}
    scores, _ = evaluate_captions(refs, cands, tokenizer="fallback", per_image=each)
    totals = [sum(col) for col in zip(*each["bleu_stats"], strict=True)]
    assert corpus_bleu(totals) == [scores[f"BLEU-{n}"] for n in range(1, 5)]  # bit for bit
    subset = [str(i) for i in range(0, 40, 3)]
    sub_scores, _ = evaluate_captions({k: refs[k] for k in subset}, {k: cands[k] for k in subset}, tokenizer="fallback")
    sub_totals = [sum(each["bleu_stats"][int(k)][j] for k in subset) for j in range(10)]
    assert corpus_bleu(sub_totals) == pytest.approx([sub_scores[f"BLEU-{n}"] for n in range(1, 5)], rel=1e-12)
