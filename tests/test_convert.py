"""``mcit data prepare`` / ``mcit data check`` on fixture files in each official format."""

from __future__ import annotations

import json
import shutil

import pytest

from mcit.data.benchmark import load_benchmark
from mcit.data.check import check_benchmark
from mcit.data.convert import available_converters, prepare
from mcit.errors import DataError, McitError
from tests.official_fixtures import WRITERS, png

NAMES = sorted(WRITERS)


def _prepare(fx, out, **kw):
    return prepare(fx.name, fx.src, out, fx.images, dict(fx.options), **kw)


def test_every_converter_has_a_fixture():
    assert set(available_converters()) == set(WRITERS)


@pytest.mark.parametrize("name", NAMES)
def test_convert_normal_records(name, tmp_path):
    fx = WRITERS[name](tmp_path / "raw")
    out = tmp_path / "bench"
    report = _prepare(fx, out)
    assert {t: (c["train"], c["test"]) for t, c in report["counts"].items()} == fx.counts
    bench = load_benchmark(out)
    assert list(bench.tasks) == list(fx.counts)  # the stream order of the dataset
    for task, (n_train, n_test) in fx.counts.items():
        spec = bench.task(task)
        train, test = spec.load("train"), spec.load("test")  # images resolve through the task's image_root
        assert (len(train), len(test)) == (n_train, n_test)
        assert all(s.image.is_file() for s in train + test)
    if fx.sample is not None:
        task, split, question_part, answer = fx.sample
        samples = bench.task(task).load(split)
        assert any(question_part in s.question and s.answer == answer for s in samples), \
            [(s.question, s.answer) for s in samples]
    check = check_benchmark(out)
    assert check.ok, check.problems
    assert all(r.self_score is not None for r in check.rows)


@pytest.mark.parametrize("name", NAMES)
def test_convert_missing_image_fails_or_is_skipped(name, tmp_path):
    fx = WRITERS[name](tmp_path / "raw")
    out = tmp_path / "bench"
    fx.remove_image()
    with pytest.raises(DataError, match="image not found") as e:
        _prepare(fx, out)
    assert fx.image.name in str(e.value) and "--skip-missing" in str(e.value)
    assert not (out / "benchmark.json").exists()  # nothing half-written
    report = _prepare(fx, out, skip_missing=True)
    assert report["skipped"]["missing image"] >= 1
    total = sum(c["train"] + c["test"] for c in report["counts"].values())
    assert total == sum(a + b for a, b in fx.counts.values()) - report["skipped"]["missing image"]


@pytest.mark.parametrize("name", NAMES)
def test_convert_malformed_record_names_file_and_field(name, tmp_path):
    fx = WRITERS[name](tmp_path / "raw")
    out = tmp_path / "bench"
    _prepare(fx, out)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    filename, field = fx.malform()
    with pytest.raises(McitError) as e:
        _prepare(fx, out)
    assert filename in str(e.value) and field in str(e.value), str(e.value)
    after = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before  # a failed conversion leaves the previous one intact


def test_vqav2_10_rule_split_and_task_map(tmp_path):
    from tests.official_fixtures import VQAV2_ROWS

    fx = WRITERS["vqav2_10"](tmp_path / "raw")
    out = tmp_path / "bench"
    _prepare(fx, out)
    bench = load_benchmark(out)
    got = {s.question: t for t in bench.tasks for s in bench.task(t).load("train")}
    assert {k.split("\n")[0]: v for k, v in got.items()} == {row[2]: row[4] for row in VQAV2_ROWS}
    train = bench.task("color").load("train")[0]
    assert train.answer == "red" and len(train.references) == 10 and "other" in train.references
    # an exact question-id map overrides the rules; unmapped questions are counted and left out
    task_map = tmp_path / "map.json"
    task_map.write_text(json.dumps({"1": "causal", "12": "causal"}))
    with pytest.raises(DataError, match="no train records for task 'recognition'"):
        prepare("vqav2_10", fx.src, tmp_path / "b2", options={"task_map": str(task_map)})
    task_map.write_text(json.dumps({"1": "nonsense"}))
    with pytest.raises(DataError, match="unknown task"):
        prepare("vqav2_10", fx.src, tmp_path / "b2", options={"task_map": str(task_map)})


def test_vqacl_rules():
    from mcit.data.convert.vqa import vqacl_task

    assert vqacl_task("what color is the", "other", "What color is the car?") == "color"
    assert vqacl_task("are the", "yes/no", "Are the people walking?") == "action"
    assert vqacl_task("are the", "yes/no", "Are the lights on?") == "judge"
    assert vqacl_task("what is", "other", "What is this?") == "recognition"
    assert vqacl_task("how many people are", "number", "How many people are there?") == "count"


def test_prepare_merges_datasets_into_one_stream(tmp_path):
    out = tmp_path / "cit"
    for name in ("flickr30k", "textcaps", "gqa"):
        fx = WRITERS[name](tmp_path / "raw")
        _prepare(fx, out)
    bench = load_benchmark(out)
    assert list(bench.tasks) == ["flickr30k", "textcaps", "gqa"]
    assert bench.task("gqa").scorer == "exact" and bench.task("flickr30k").scorer == "caption"
    # preparing a dataset again replaces its task in place, keeping the others
    _prepare(WRITERS["textcaps"](tmp_path / "raw2"), out)
    assert list(load_benchmark(out).tasks) == ["flickr30k", "gqa", "textcaps"]


def test_refcoco_refuses_pickle_without_trust(tmp_path):
    fx = WRITERS["refcoco"](tmp_path / "raw")
    with pytest.raises(DataError, match="--trust-pickle"):
        prepare("refcoco", fx.src, tmp_path / "b", fx.images)
    # even trusted, a pickle that references code is refused
    import os
    import pickle

    (fx.src / "refs(unc).p").write_bytes(pickle.dumps([os.getcwd]))
    with pytest.raises(DataError, match="plain-data"):
        prepare("refcoco", fx.src, tmp_path / "b", fx.images, {"trust_pickle": "true"})


def test_square_box():
    from mcit.data.convert.grounding import square_box

    assert square_box([0, 0, 100, 50], 100, 50) == "[0.00, 0.25, 1.00, 0.75]"
    assert square_box([10, 20, 30, 40], 100, 100) == "[0.10, 0.20, 0.40, 0.60]"


def test_prepare_errors_are_clear(tmp_path):
    with pytest.raises(McitError, match="unknown dataset 'nope'; available: arxivqa"):
        prepare("nope", tmp_path, tmp_path / "b")
    with pytest.raises(DataError, match="is not a folder"):
        prepare("gqa", tmp_path / "missing", tmp_path / "b")
    fx = WRITERS["gqa"](tmp_path / "raw")
    with pytest.raises(McitError, match="unknown option 'test_splt'.*test_split"):
        prepare("gqa", fx.src, tmp_path / "b", options={"test_splt": "val"})
    with pytest.raises(DataError, match="val_balanced_questions.json"):
        prepare("gqa", fx.src, tmp_path / "b", options={"test_split": "val"})
    with pytest.raises(McitError, match=r"test_fraction='2': expected .*\(0, 1\)"):
        prepare("arxivqa", fx.src, tmp_path / "b", options={"test_fraction": "2"})


def test_ucit_caption_references_come_from_the_coco_file(tmp_path):
    fx = WRITERS["ucit"](tmp_path / "raw")
    out = tmp_path / "bench"
    _prepare(fx, out)
    bench = load_benchmark(out)
    test = bench.task("flickr30k").load("test")
    assert test[1].references == ["caption 1 0", "caption 1 1", "caption 1 2"]
    assert bench.task("flickr30k").scorer_options == {"headline": "mean"}
    assert [t for t in bench.tasks] == ["imagenet_r", "arxivqa", "vizwiz_caption", "iconqa", "clevr_math", "flickr30k"]


def test_data_check_reports_problems(tmp_path):
    fx = WRITERS["clevr_math"](tmp_path / "raw")
    out = tmp_path / "bench"
    _prepare(fx, out)
    fx.image.unlink()  # missing after preparation
    other = fx.image.with_name("CLEVR_test_000000.png")
    other.write_bytes(b"not a png")  # unreadable
    rec = json.loads((out / "clevr_math" / "train.jsonl").read_text().splitlines()[0])
    rec["conversations"][1]["value"] = " "
    lines = (out / "clevr_math" / "train.jsonl").read_text().splitlines()
    (out / "clevr_math" / "train.jsonl").write_text("\n".join([json.dumps(rec), *lines[1:]]) + "\n")
    report = check_benchmark(out)
    assert not report.ok
    rows = {(r.task, r.split): r for r in report.rows}
    assert rows[("clevr_math", "test")].missing == 1 and rows[("clevr_math", "test")].unreadable == 1
    assert rows[("clevr_math", "train")].empty == 1
    assert any("cannot be opened" in p for p in report.problems)
    # a scorer that cannot read the references is reported, not crashed on
    meta = json.loads((out / "benchmark.json").read_text())
    meta["tasks"][0]["scorer"] = "iou"
    (out / "benchmark.json").write_text(json.dumps(meta))
    report = check_benchmark(out)
    assert not any(r.scorer_ok for r in report.rows)
    assert any("scorer 'iou' does not accept" in p for p in report.problems)
    # a scorer that cannot give credit to these references (VQA accuracy with one answer) is flagged
    meta["tasks"][0]["scorer"] = "vqa"
    (out / "benchmark.json").write_text(json.dumps(meta))
    report = check_benchmark(out)
    assert any("gives 0 even to the reference answers" in p for p in report.problems)


def test_fixture_benchmark_runs_end_to_end(tmp_path, cache_dir):
    """A converted benchmark runs through ``mcit run`` with the tiny model (CPU)."""
    from mcit.cli import _quiet_libraries
    from mcit.config import load_config
    from mcit.runner import run

    out = tmp_path / "cit"
    for name in ("gqa", "textcaps"):
        _prepare(WRITERS[name](tmp_path / "raw"), out)
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(
        f"name: fixture\nseed: 0\nbenchmark: {{name: fixture, root: {out}, tasks: [gqa, textcaps],"
        " scorers: {gqa: contains}}\n"
        "model: {kind: tiny, tiny: {text_hidden: 32, text_layers: 1, vision_hidden: 16, vision_layers: 1,"
        " text_heads: 2, vision_heads: 2, max_length: 64}}\n"
        "base: {mix: {gqa: 1.0}, steps: 4, batch_size: 2}\ntrain: {steps: 3, batch_size: 2}\n"
        "eval: {batch_size: 2, max_new_tokens: 6}\nmethod: {name: seqft}\n"
    )
    _quiet_libraries()
    cfg = load_config(cfg_path, [f"cache_dir={cache_dir}"])
    results = run(cfg, tmp_path / "run", show_progress=False)
    assert results["tasks"] == ["gqa", "textcaps"]
    assert results["scorers"] == {"gqa": "contains", "textcaps": "caption"}
    assert len(results["matrix"]) == 3 and all(len(r) == 2 for r in results["matrix"])


def test_scorer_override_is_validated(tmp_path, cache_dir):
    from mcit.config import load_config
    from mcit.errors import ConfigError
    from mcit.runner import prepare_benchmark

    out = tmp_path / "b"
    _prepare(WRITERS["gqa"](tmp_path / "raw"), out)
    cfg = load_config(None, [f"benchmark.root={out}", "benchmark.scorers.gqa.name=iou",
                             "benchmark.scorers.gqa.options.threshold=3"])
    with pytest.raises(ConfigError, match="benchmark.scorers.gqa.*threshold"):
        prepare_benchmark(cfg, cache_dir, False)
    cfg = load_config(None, [f"benchmark.root={out}", "benchmark.scorers.ocr=exact"])
    with pytest.raises(McitError, match="no task 'ocr'"):
        prepare_benchmark(cfg, cache_dir, False)


def test_images_are_referenced_not_copied(tmp_path):
    fx = WRITERS["gqa"](tmp_path / "raw")
    out = tmp_path / "bench"
    _prepare(fx, out)
    assert not list(out.rglob("*.jpg"))
    meta = json.loads((out / "benchmark.json").read_text())
    assert meta["tasks"][0]["image_root"] == str((fx.src / "images").resolve())
    shutil.move(fx.src / "images", tmp_path / "moved")
    png(tmp_path / "unused.png")
    report = check_benchmark(out)
    assert not report.ok and all(r.missing == r.records for r in report.rows if r.records)


BENCHMARK_SOURCES = {
    "vqav2_10": ["vqav2_10"], "ucit": ["ucit"], "coin": ["coin"],
    "cit_b1": ["flickr30k", "textcaps", "vqav2", "ocrvqa", "gqa"], "cit_b2": ["flickr30k", "vizwiz", "textvqa", "gqa"],
}


@pytest.mark.parametrize("bench", sorted(BENCHMARK_SOURCES))
def test_shipped_benchmark_configs_match_their_converters(bench, tmp_path, cache_dir):
    """Each shipped benchmark config names the tasks its converters write, and every task's scorer
    (after the config's overrides) accepts and credits the converted references."""
    from mcit.config import load_config
    from mcit.runner import prepare_benchmark, stream_tasks
    from mcit.scoring import score_task
    from tests.conftest import ROOT

    out = tmp_path / bench
    for i, name in enumerate(BENCHMARK_SOURCES[bench]):
        _prepare(WRITERS[name](tmp_path / f"raw{i}"), out)
    for path in sorted((ROOT / "configs" / bench).glob("[!_]*.yaml")):
        cfg = load_config(path, [f"benchmark.root={out}"])
        b = prepare_benchmark(cfg, cache_dir, False)
        assert stream_tasks(cfg, b) == list(cfg.benchmark.tasks), path
    for task in stream_tasks(cfg, b):
        spec = b.task(task)
        refs = [s.references for s in spec.load("test")]
        assert score_task(spec.scorer, [r[0] for r in refs], refs, spec.scorer_options).headline > 0, (path, task)


def test_coin_textvqa_takes_the_ten_answers_when_given(tmp_path):
    fx = WRITERS["coin"](tmp_path / "raw")
    out = tmp_path / "bench"
    _prepare(fx, out)
    assert load_benchmark(out).task("textvqa").scorer == "exact"  # one answer: soft accuracy could not credit it
    val = fx.src / "playground" / "Instructions" / "TextVQA" / "val.json"
    items = json.loads(val.read_text())
    for i, item in enumerate(items):
        item["question_id"] = 7 + i
    val.write_text(json.dumps(items))
    ann = tmp_path / "TextVQA_0.5.1_val.json"
    ann.write_text(json.dumps({"data": [{"question_id": 7 + i, "answers": ["nike"] * 6 + ["nikes"] * 4}
                                        for i in range(2)]}))
    prepare("coin", fx.src, out, options={"textvqa_annotations": str(ann)})
    spec = load_benchmark(out).task("textvqa")
    assert spec.scorer == "vqa_evalai"
    assert spec.load("test")[0].references == ["nike"] * 6 + ["nikes"] * 4


def _mcit(monkeypatch, capsys, *args):
    """(exit code, stdout, stderr) of ``mcit ARGS``; code None when the command returned normally."""
    import sys

    from mcit.cli import main

    monkeypatch.setattr(sys, "argv", ["mcit", *args])
    code = None
    try:
        main()
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_prepare_check_and_list(tmp_path, monkeypatch, capsys):
    from tests.test_cli import _assert_one_line_error

    fx = WRITERS["refcoco"](tmp_path / "raw")
    out = tmp_path / "bench"
    code, _, err = _mcit(monkeypatch, capsys, "data", "prepare", "refcoco", "--src", str(fx.src), "--out", str(out),
                         "--images", str(fx.images))
    _assert_one_line_error(code, err, "is a pickle", "--trust-pickle")
    code, _, err = _mcit(monkeypatch, capsys, "data", "prepare", "gqa", "--src", str(fx.src), "--out", str(out),
                         "--trust-pickle")
    _assert_one_line_error(code, err, "--trust-pickle applies to refcoco only")
    code, text, _ = _mcit(monkeypatch, capsys, "data", "prepare", "refcoco", "--src", str(fx.src), "--out", str(out),
                          "--images", str(fx.images), "--trust-pickle", "--option", "test_split=testA")
    assert code in (0, None) and "refcoco" in text and "mcit data check" in text
    assert load_benchmark(out).task("refcoco").load("test")[0].id == "3_0"  # the testA ref
    code, text, _ = _mcit(monkeypatch, capsys, "data", "check", str(out))
    assert code in (0, None) and "all checks passed" in text
    fx.image.unlink()
    code, text, _ = _mcit(monkeypatch, capsys, "data", "check", str(out))
    assert code == 1 and "problem:" in text and fx.image.name in " ".join(text.split())
    code, text, _ = _mcit(monkeypatch, capsys, "data", "list")
    assert all(name in text for name in WRITERS)


def test_a_second_converter_of_the_same_name_is_refused():
    from dataclasses import replace

    from mcit.data.convert.core import REGISTRY, register

    available_converters()
    name, conv = next(iter(REGISTRY.items()))
    with pytest.raises(TypeError, match=f"converter {name!r} is registered twice"):
        register(replace(conv))
    assert REGISTRY[name] is conv
