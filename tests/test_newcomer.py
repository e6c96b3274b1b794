"""What a new user trips over around a run: unfinished runs in compare, restarting a failed run,
errors that name where a bad value was given, stale temporaries."""

import csv
import io
import json
import os
import subprocess
import sys

import pytest

from mcit.config import load_config
from mcit.errors import ConfigError, McitError
from mcit.methods.seqft import SeqFT
from mcit.runner import run
from tests.conftest import SMOKE
from tests.test_cli import _assert_one_line_error


def _mcit(monkeypatch, capsys, *args):
    """Run the CLI in-process: (exit code, stdout, stderr); 0 when it returns normally."""
    from mcit.cli import main

    monkeypatch.setattr(sys, "argv", ["mcit", *args])
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code or 0
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def failed_run(smoke_cfg, tmp_path_factory):
    """A run that stopped on a non-finite loss in its first task: row 0 recorded, nothing else."""
    import torch

    from mcit.train import TrainingError

    out = tmp_path_factory.mktemp("failed") / "nan"
    mp = pytest.MonkeyPatch()
    mp.setattr(SeqFT, "extra_loss", lambda self, batch, outputs, ctx: torch.tensor(float("nan")))
    with pytest.raises(TrainingError):
        run(smoke_cfg(), out, show_progress=False)
    mp.undo()
    return out


# --- compare ---------------------------------------------------------------------------------

def test_compare_skips_unfinished_runs_and_lists_them(monkeypatch, capsys, smoke_run, failed_run, tmp_path):
    out, results = smoke_run
    code, text, err = _mcit(monkeypatch, capsys, "compare", str(out), str(failed_run), str(tmp_path / "nope"),
                            "--no-figure")
    assert code == 0
    assert f"skipped {failed_run}: no results.json (unfinished or failed run)" in " ".join(err.split())
    assert f"skipped {tmp_path / 'nope'}: does not exist" in " ".join(err.split())
    assert f"{results['metrics']['MFN']:.2f}" in text and text.count("seqft") == 1
    code, _, err = _mcit(monkeypatch, capsys, "compare", str(out), str(failed_run), "--strict")
    _assert_one_line_error(code, err, "--strict: 1 of 2 paths hold no finished run", str(failed_run))
    code, _, err = _mcit(monkeypatch, capsys, "compare", str(failed_run))
    _assert_one_line_error(code, err, "none of the 1 paths holds a finished run")


def test_compare_formats_and_figure_beside_the_runs(monkeypatch, capsys, smoke_run, tmp_path):
    out, results = smoke_run
    # a results.json path works as its run directory; the figure goes beside the runs
    code, text, err = _mcit(monkeypatch, capsys, "compare", str(out / "results.json"), "--format", "csv")
    assert code == 0 and (out.parent / "compare.png").read_bytes()[:4] == b"\x89PNG"
    rows = list(csv.DictReader(io.StringIO(text)))
    assert len(rows) == 1 and rows[0]["run"] == out.name and rows[0]["method"] == "seqft"
    assert float(rows[0]["MFN"]) == results["metrics"]["MFN"]  # full precision, not 2 decimals
    assert float(rows[0]["BWT"]) == results["metrics"]["BWT"]
    code, text, _ = _mcit(monkeypatch, capsys, "compare", str(out), "--format", "md", "--no-figure")
    lines = text.strip().splitlines()
    assert lines[0].startswith("| run | method | seed | MFT | MFN |") and lines[1].startswith("|---|---|---:|")
    mft, mfn = results["metrics"]["MFT"], results["metrics"]["MFN"]
    (lo, hi), (lo2, hi2) = results["intervals"]["metrics"]["MFT"], results["intervals"]["metrics"]["MFN"]
    assert lines[2].startswith(f"| {out.name} | seqft | 0 | {mft:.2f} [{lo:.2f}, {hi:.2f}] | {mfn:.2f} [{lo2:.2f}, {hi2:.2f}] |")
    assert float(rows[0]["MFN_ci_low"]) == lo2 and float(rows[0]["MFN_ci_high"]) == hi2
    code, _, err = _mcit(monkeypatch, capsys, "compare", str(out), "--format", "xml")
    _assert_one_line_error(code, err, "--format: expected 'table', 'md' or 'csv'")


def test_compare_never_cuts_values_on_a_pipe(smoke_run):
    out, results = smoke_run
    proc = subprocess.run([sys.executable, "-m", "mcit", "compare", str(out), "--no-figure"],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "60"})
    assert proc.returncode == 0, proc.stderr
    for m in ("MFT", "MFN", "BWT"):
        assert f"{results['metrics'][m]:.2f}" in proc.stdout
    assert "…" not in proc.stdout


def test_compare_by_warns_about_runs_that_differ_beyond_the_seed(monkeypatch, capsys, smoke_run, smoke_cfg, tmp_path):
    out, _ = smoke_run
    run(smoke_cfg("seed=1", "train.lr=0.002"), tmp_path / "other", show_progress=False)
    code, text, err = _mcit(monkeypatch, capsys, "compare", str(out), str(tmp_path / "other"), "--by", "method",
                            "--format", "md", "--no-figure")
    assert code == 0
    err = " ".join(err.split())
    assert "warning: --by method pools runs of 'seqft' whose configs differ beyond the seed: train.lr = 0.001 | 0.002" in err
    assert "seed" not in err.split("seed:")[1]  # the seed itself is what pooling is for
    assert " ± " in text and text.splitlines()[0].startswith("| method | runs | MFT |")


# --- restarting a failed run -----------------------------------------------------------------

def test_a_failed_run_says_how_to_go_on_and_restarts(smoke_run, smoke_cfg, failed_run):
    with pytest.raises(McitError, match=r"already holds a run \(0 of 3 tasks finished\); pass --resume .* --restart"):
        run(smoke_cfg(), failed_run, show_progress=False)
    with pytest.raises(McitError, match=r"another config \(train.lr: 0.001 -> 0.002\); .* --restart"):
        run(smoke_cfg("train.lr=0.002"), failed_run, resume=True, show_progress=False)
    with pytest.raises(McitError, match="--resume and --restart exclude each other"):
        run(smoke_cfg(), failed_run, resume=True, restart=True, show_progress=False)
    (failed_run / "checkpoints").mkdir(exist_ok=True)
    (failed_run / "checkpoints" / "stage_01_color.tmp").mkdir()  # what a killed checkpoint write leaves
    restarted = run(smoke_cfg(), failed_run, restart=True, show_progress=False)
    assert restarted["matrix"] == smoke_run[1]["matrix"]  # as a fresh run of that config
    assert not (failed_run / "checkpoints" / "stage_01_color.tmp").exists()


def test_a_run_that_recorded_nothing_starts_over_by_itself(smoke_run, smoke_cfg, tmp_path):
    out = tmp_path / "early"
    out.mkdir()
    (out / "config.yaml").write_text("seed: 5\n")  # failed before its zero-shot row: no state.json
    assert run(smoke_cfg(), out, show_progress=False)["matrix"] == smoke_run[1]["matrix"]
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(McitError, match=r"holds other files \(notes.txt\); choose another --out"):
        run(smoke_cfg(), other, show_progress=False)
    assert (other / "notes.txt").read_text() == "keep me"


def test_restart_from_the_command_line(monkeypatch, capsys, failed_run, cache_dir):
    code, text, _ = _mcit(monkeypatch, capsys, "run", str(SMOKE), "--out", str(failed_run), "--restart", "--quiet",
                          "--set", f"cache_dir={cache_dir}", "--set", "benchmark.tasks=[color]")
    assert code == 0 and "results:" in text
    assert json.loads((failed_run / "results.json").read_text())["tasks"] == ["color"]


# --- bad input names its source ----------------------------------------------------------------

def test_errors_name_the_override_or_the_file_and_line(tmp_path):
    with pytest.raises(ConfigError, match=r"^--set train.steps=0: train.steps: Input should be greater than or equal to 1"):
        load_config(SMOKE, ["train.steps=0"])
    with pytest.raises(ConfigError, match=r"^--set benchmark.tasks=\[\]: benchmark.tasks: List should have at least 1 item"):
        load_config(SMOKE, ["benchmark.tasks=[]"])
    with pytest.raises(ConfigError, match=r"^--set method.name=nope: method.name: unknown method 'nope'"):
        load_config(SMOKE, ["method.name=nope"])
    child = tmp_path / "child.yaml"
    child.write_text(f"extends: {SMOKE}\ntrain: {{lr: 0.01}}\nmodel:\n  tuning: qlora\n")
    with pytest.raises(ConfigError, match=rf"^{child}:4: model.tuning: Input should be"):
        load_config(child)
    # a value the parent file set is blamed on the parent's line
    parent = tmp_path / "parent.yaml"
    parent.write_text("seed: 0\ntrain:\n  batch_size: -1\n")
    (tmp_path / "kid.yaml").write_text("extends: parent.yaml\nseed: 1\n")
    with pytest.raises(ConfigError, match=rf"^{parent}:3: train.batch_size"):
        load_config(tmp_path / "kid.yaml")
    # an override of a key the file set takes the blame from the file
    with pytest.raises(ConfigError, match=r"^--set model.tuning=qlora: model.tuning"):
        load_config(SMOKE, ["model.tuning=qlora"])
    broken = tmp_path / "broken.yaml"
    broken.write_text("seed: 0\ntrain: {lr: [1,\n")
    with pytest.raises(ConfigError, match=rf"^{broken}:3: not valid YAML"):
        load_config(broken)


def test_two_sources_are_both_named(tmp_path):
    child = tmp_path / "c.yaml"
    child.write_text(f"extends: {SMOKE}\nmodel: {{tuning: qlora}}\n")
    with pytest.raises(ConfigError) as e:
        load_config(child, ["train.steps=0"])
    text = str(e.value)
    assert f"{child}:2: model.tuning" in text and "--set train.steps=0: train.steps" in text


# --- temporaries ------------------------------------------------------------------------------

def test_stale_temporaries_of_dead_writers_are_removed(tmp_path):
    from mcit.utils import atomic_write_text, remove_stale_temporaries

    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(done.stdout)  # a process that has exited
    live = os.getpid()
    (tmp_path / f"base.tmp{dead}-123").mkdir()
    (tmp_path / f"base.tmp{live}-456").mkdir()
    (tmp_path / f".results.json.{dead}.abc123.tmp").write_text("half")
    (tmp_path / f".results.json.{live}.def456.tmp").write_text("being written")
    (tmp_path / "stage_01.tmp").mkdir()
    (tmp_path / "model.tmpl").write_text("not a temporary")
    removed = {p.name for p in remove_stale_temporaries(tmp_path)}
    assert removed == {f"base.tmp{dead}-123", f".results.json.{dead}.abc123.tmp"}
    assert {p.name for p in remove_stale_temporaries(tmp_path, owned=True)} == {"stage_01.tmp"}
    assert (tmp_path / "model.tmpl").exists() and (tmp_path / f"base.tmp{live}-456").exists()
    atomic_write_text(tmp_path / "x.json", "{}")  # an atomic write names its writer
    assert oct((tmp_path / "x.json").stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_run_files_follow_the_umask(smoke_run):
    out, _ = smoke_run
    for name in ("results.json", "report.md", "state.json", "config.yaml"):
        assert (out / name).stat().st_mode & 0o777 == 0o666 & ~_umask(), name


def _options(command, path=()):
    """(command path, option name, annotation) of every valued option of the CLI."""
    if hasattr(command, "commands"):
        for name, sub in command.commands.items():
            yield from _options(sub, (*path, name))
        return
    for p in command.params:
        if p.opts[0].startswith("--") and not getattr(p, "is_flag", False):
            yield path, p.opts[0], p.type_descriptor.annotation


def test_every_numeric_option_refuses_a_wrong_value_in_one_line(monkeypatch, capsys):
    """Walk the CLI: every int option given a word, and (but --seed) a negative number, fails in one
    line naming the command and the option, exit 2, before any work."""
    import typer.main

    from mcit.cli import app

    numeric = [(path, opt) for path, opt, ann in _options(typer.main.get_command(app)) if ann in (int, float)]
    assert len(numeric) >= 9
    for path, opt in numeric:
        for bad in ("x", "-1") if opt != "--seed" else ("x",):
            code, _, err = _mcit(monkeypatch, capsys, *path, "ARG", opt, bad)
            _assert_one_line_error(code, err, f"mcit {' '.join(path)}: ", f"'{opt}'")
            assert code == 2 and len(err.strip().splitlines()) == 1, (path, opt, err)


def test_choice_and_usage_errors_are_one_line(monkeypatch, capsys, smoke_run):
    out, _ = smoke_run
    cases = [
        (("compare", str(out), "--by", "seed"), "--by: expected 'method', 'name' or 'run'"),
        (("compare", str(out), "--format", "json"), "--format: expected 'table', 'md' or 'csv'"),
        (("sweep", str(SMOKE), "--out", "/nonexistent/s", "--by", "x"), "--by: expected"),
        (("sweep", str(SMOKE), "--out", "/nonexistent/s", "--grid", "lr"), "--grid 'lr': expected KEY=V1,V2"),
        (("run", str(SMOKE), "--nope"), "mcit run: No such option: --nope"),
        (("run",), "mcit run: Missing argument 'config'"),
        (("frobnicate",), "No such command 'frobnicate'"),
        (("data", "prepare", "vqav2", "--out", "/nonexistent/p"), "Missing option '--src'"),
        (("run", str(SMOKE), "--set", "train"), "--set 'train': expected KEY=VALUE"),
        (("bench", "overhead", "--config", "/nonexistent.yaml"), "--config: /nonexistent.yaml does not exist"),
        (("base", "check", "/nonexistent"), "/nonexistent/manifest.json: not found"),
    ]
    for args, fragment in cases:
        code, _, err = _mcit(monkeypatch, capsys, *args)
        _assert_one_line_error(code, err, fragment)
        assert code == 2 and len(err.strip().splitlines()) == 1, (args, err)


def test_the_builtin_method_table_is_complete_and_keeps_errors_light():
    from mcit.methods import BUILTIN, available_methods

    assert set(available_methods()) == set(BUILTIN)
    # an unknown method, or a bad value, is reported without importing torch (the CLI's fast path)
    code = ("import sys; from mcit.config import load_config\n"
            "for o in ('method.name=nope', 'train.lr=-1'):\n"
            "    try: load_config(sys.argv[1], [o])\n"
            "    except Exception as e: print(e)\n"
            "print('torch' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code, str(SMOKE)], capture_output=True, text=True, timeout=120)
    lines = proc.stdout.strip().splitlines()
    assert lines[0].startswith("--set method.name=nope: method.name: unknown method 'nope'; available: clmoe, dgg, disco, eproj")
    assert lines[1].startswith("--set train.lr=-1: train.lr: Input should be greater than 0")
    assert lines[2] == "False"


def test_prediction_spread_known_answers():
    from mcit.metrics import prediction_spread

    refs = [["red"], ["blue"], ["green"], ["red"]] * 5
    s = prediction_spread(["White", "white ", "white", "red"] + ["white"] * 16, refs)
    assert s == {"top": "white", "top_share": 0.95, "distinct": 2, "reference_top_share": 0.5, "collapsed": True}
    # at most 90%, or references as uniform as the predictions: not a collapse
    assert not prediction_spread(["white"] * 18 + ["red", "blue"], refs)["collapsed"]
    assert not prediction_spread(["yes"] * 20, [["yes"]] * 19 + [["no"]])["collapsed"]
    assert prediction_spread([], [])["distinct"] == 0


def test_collapse_is_reported_per_row_and_task(smoke_run):
    from mcit.report import report_markdown

    out, results = smoke_run
    spread = results["prediction_spread"]
    assert len(spread) == len(results["matrix"])
    assert set(spread[0]) == {*results["tasks"], *results["general"]["tasks"]}
    for row, name in zip(spread, ["zero-shot", *results["tasks"]], strict=True):
        preds = [json.loads(line)["prediction"] for line in
                 (out / "predictions" / f"row_{spread.index(row):02d}" / "color.jsonl").read_text().splitlines()]
        top = max(set(p.strip().lower() for p in preds), key=[p.strip().lower() for p in preds].count)
        assert row["color"]["distinct"] == len({p.strip().lower() for p in preds}), name
        assert row["color"]["top_share"] == [p.strip().lower() for p in preds].count(top) / len(preds)
    fake = json.loads(json.dumps(results))
    fake["prediction_spread"][1]["count"] = {"top": "white", "top_share": 0.95, "distinct": 2,
                                             "reference_top_share": 0.3, "collapsed": True}
    text = report_markdown(fake)
    assert "| 1: color | count | white | 95.0% | 2 | 30.00% |" in text
    clean = json.loads(json.dumps(results))
    for row in clean["prediction_spread"]:
        for s in row.values():
            s["collapsed"] = False
    assert "Collapse check: no task's predictions are dominated by one answer" in report_markdown(clean)


def test_a_corrupt_image_fails_before_training_naming_its_record(monkeypatch, capsys, tmp_path, cache_dir):
    from mcit.data.synth import generate_synth

    root = generate_synth(tmp_path / "b", train_size=4, test_size=2, base_size=4, tasks=["color"])
    first = json.loads((root / "color" / "train.jsonl").read_text().splitlines()[2])
    image = root / "color" / first["image"]
    image.write_bytes(image.read_bytes()[:60])  # a truncated PNG: its header reads, its pixels do not
    args = ("run", str(SMOKE), "--out", str(tmp_path / "r"), "--set", f"benchmark.root={root}",
            "--set", "benchmark.tasks=[color]", "--set", "benchmark.general=[]", "--set", f"cache_dir={cache_dir}")
    code, _, err = _mcit(monkeypatch, capsys, *args)
    _assert_one_line_error(code, err, f"{root / 'color' / 'train.jsonl'}: record {first['id']!r}: image",
                           "cannot be opened")
    assert not (tmp_path / "r").exists()  # nothing written
    # header-only checking lets it through to training (where it would fail): the option is honoured
    from mcit.data.check import verify_images
    from mcit.data.format import load_task_file

    samples = load_task_file(root / "color" / "train.jsonl")
    assert verify_images({root / "color" / "train.jsonl": samples}, full=False) == 4
