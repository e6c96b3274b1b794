"""User-facing errors: one line, non-zero exit, no traceback; the listing commands."""

import json
import sys

import pytest

from mcit.cli import main
from tests.conftest import SMOKE


def _mcit(monkeypatch, capsys, *args):
    monkeypatch.setattr(sys, "argv", ["mcit", *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def _assert_one_line_error(code, err, *fragments):
    assert code not in (0, None)
    assert "Traceback" not in err
    text = " ".join(err.split())
    assert text.startswith("error:")
    for f in fragments:
        assert f in text, (f, text)


def test_bad_config_key(monkeypatch, capsys):
    code, _, err = _mcit(monkeypatch, capsys, "run", str(SMOKE), "--set", "train.learning_rate=1")
    _assert_one_line_error(code, err, "train.learning_rate: unknown key", "allowed:", "lr")


def test_bad_config_value(monkeypatch, capsys):
    code, _, err = _mcit(monkeypatch, capsys, "run", str(SMOKE), "--set", "model.tuning=qlora")
    _assert_one_line_error(code, err, "model.tuning", "'full', 'lora' or 'projector'")


def test_unknown_method(monkeypatch, capsys):
    code, _, err = _mcit(monkeypatch, capsys, "run", str(SMOKE), "--set", "method.name=nope")
    _assert_one_line_error(code, err, "unknown method 'nope'", "seqft")


def test_unknown_start_and_stream_task_name_their_source(monkeypatch, capsys, tmp_path, cache_dir):
    code, _, err = _mcit(monkeypatch, capsys, "run", str(SMOKE), "--set", "model.kind=start",
                         "--set", "model.start=nostart")
    _assert_one_line_error(code, err, "--set model.start=nostart: model.start: no shipped start 'nostart'",
                           "available: synth")
    code, _, err = _mcit(monkeypatch, capsys, "run", str(SMOKE), "--out", str(tmp_path / "r"),
                         "--set", f"cache_dir={cache_dir}", "--set", "benchmark.tasks=[colr]")
    assert err.count("error:") == 1  # after the benchmark's generation message (a fresh cache)
    _assert_one_line_error(code, err[err.index("error:"):], "benchmark.tasks: benchmark 'synth'", "has no task 'colr'")
    assert not (tmp_path / "r").exists()


def test_bench_names_the_methods_option(monkeypatch, capsys):
    code, _, err = _mcit(monkeypatch, capsys, "bench", "overhead", "--config", str(SMOKE), "--methods", "seqft,nope")
    _assert_one_line_error(code, err, "--methods: unknown method 'nope'; available:")


def _benchmark_with(tmp_path, line: str):
    from mcit.data.synth import generate_synth

    root = generate_synth(tmp_path / "b", train_size=4, test_size=2, base_size=4, tasks=["color"])
    path = root / "color" / "train.jsonl"
    path.write_text(path.read_text() + line + "\n")
    return root, path


def test_malformed_dataset_line(monkeypatch, capsys, tmp_path, cache_dir):
    root, path = _benchmark_with(tmp_path, '{"id": "broken", ')
    code, _, err = _mcit(monkeypatch, capsys, "run", str(SMOKE), "--out", str(tmp_path / "r"),
                         "--set", f"benchmark.root={root}", "--set", "benchmark.tasks=[color]",
                         "--set", f"cache_dir={cache_dir}")
    _assert_one_line_error(code, err, f"{path}:5", "malformed JSON")
    assert not (tmp_path / "r").exists()  # nothing started


def test_missing_image(monkeypatch, capsys, tmp_path, cache_dir):
    record = {"id": "x", "image": "train_images/gone.png",
              "conversations": [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "red"}]}
    root, path = _benchmark_with(tmp_path, json.dumps(record))
    code, _, err = _mcit(monkeypatch, capsys, "run", str(SMOKE), "--out", str(tmp_path / "r"),
                         "--set", f"benchmark.root={root}", "--set", "benchmark.tasks=[color]",
                         "--set", f"cache_dir={cache_dir}")
    _assert_one_line_error(code, err, "image not found", "gone.png")


def test_methods_lists_registered_methods(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["mcit", "methods"])
    main()
    out = capsys.readouterr().out
    for name in ("seqft", "joint", "zeroshot", "steps_factor"):
        assert name in out


def test_compare_table_and_figure(monkeypatch, capsys, smoke_run, tmp_path):
    out, results = smoke_run
    fig = tmp_path / "cmp.png"
    monkeypatch.setattr(sys, "argv", ["mcit", "compare", str(out), "--figure", str(fig)])
    main()
    text = capsys.readouterr().out
    assert "seqft" in text and f"{results['metrics']['MFN']:.2f}" in text
    assert fig.read_bytes()[:4] == b"\x89PNG"


def test_data_synth_writes_a_loadable_benchmark(monkeypatch, capsys, tmp_path):
    from mcit.data import load_benchmark

    monkeypatch.setattr(sys, "argv", ["mcit", "data", "synth", "--out", str(tmp_path / "s"),
                                      "--train-size", "3", "--test-size", "2", "--base-size", "2"])
    main()
    bench = load_benchmark(tmp_path / "s")
    from mcit.data.synth import BASE_PARTS

    assert len(bench.task("ocr").load("test")) == 2 and set(bench.base) == set(BASE_PARTS)


def test_compare_groups_seeds_and_plots_a_tradeoff(monkeypatch, capsys, smoke_run, smoke_cfg, tmp_path):
    from mcit.report import compare, group_rows
    from mcit.runner import run

    out, first = smoke_run
    other = run(smoke_cfg("seed=1"), tmp_path / "seed1", show_progress=False)
    rows = compare([out, tmp_path / "seed1"])
    (g,) = group_rows(rows, "method")
    mfn = [first["metrics"]["MFN"], other["metrics"]["MFN"]]
    assert g["runs"] == 2 and g["MFN"] == pytest.approx(sum(mfn) / 2)
    assert g["MFN_spread"] == pytest.approx(abs(mfn[0] - mfn[1]) / 2**0.5)
    assert rows[0]["old_final"] == pytest.approx(sum(first["matrix"][-1][:-1]) / 2)
    fig = tmp_path / "tradeoff.png"
    monkeypatch.setattr(sys, "argv", ["mcit", "compare", str(out), str(tmp_path / "seed1"), "--by", "method",
                                      "--tradeoff", "seed", "--figure", str(fig)])
    main()
    assert "± " in capsys.readouterr().out and fig.read_bytes()[:4] == b"\x89PNG"
    code, _, err = _mcit(monkeypatch, capsys, "compare", str(out), "--tradeoff", "method.nope")
    _assert_one_line_error(code, err, "config.yaml", "no key 'method.nope'")


def test_every_shipped_config_validates():
    from mcit.config import load_config
    from mcit.methods import get_method
    from mcit.runner import build_method

    root = SMOKE.parents[1]
    configs = sorted(p for p in root.rglob("*.yaml") if not p.name.startswith("_") and p.parent.name != "accelerate")
    assert len(configs) >= 12 + 5 * 8 + 8 - 13
    for path in configs:
        cfg = load_config(path, [])
        assert get_method(cfg.method["name"]).name == cfg.method["name"], path
        build_method(cfg.method)  # the method's options validate too
    # every method config of the default stream shares one base: the same start, tuning, data and budget
    base = load_config(root / "synth" / "_base.yaml").model_dump()
    for path in sorted((root / "synth").glob("*.yaml")):
        if path.name in ("smoke.yaml", "start.yaml", "start_caption.yaml", "_base.yaml"):
            continue
        cfg = load_config(path).model_dump()
        assert cfg["benchmark"] == base["benchmark"] and cfg["seed"] == base["seed"], path
        frozen = cfg["method"]["name"] in ("prompt_pool", "fwd_prompt", "modalprompt", "eproj", "eproj_sim")
        assert cfg["model"]["tuning"] == ("projector" if frozen else "lora"), path
        if not frozen:
            # the only departures: methods whose reference keeps the projector frozen (its config says why)
            own = {"mrlora": {"train_projector"}, "same": {"train_projector"}}.get(cfg["method"]["name"], set())
            model = {k: v for k, v in cfg["model"].items() if k not in own}
            assert model == {k: v for k, v in base["model"].items() if k not in own} and cfg["train"] == base["train"], path


def test_config_extends(tmp_path):
    from mcit.config import load_config
    from mcit.errors import ConfigError

    (tmp_path / "base.yaml").write_text("seed: 3\ntrain: {steps: 7, lr: 0.5}\nmethod: {name: replay, per_task: 5}\n")
    (tmp_path / "child.yaml").write_text("extends: base.yaml\ntrain: {steps: 9}\nmethod: {ratio: 0.5}\n")
    cfg = load_config(tmp_path / "child.yaml", ["train.batch_size=4"])
    assert (cfg.seed, cfg.train.steps, cfg.train.lr, cfg.train.batch_size) == (3, 9, 0.5, 4)
    assert (cfg.method["name"], cfg.method["per_task"], cfg.method["ratio"]) == ("replay", 5, 0.5)
    (tmp_path / "base.yaml").write_text("extends: child.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "child.yaml")
    (tmp_path / "child.yaml").write_text("extends: nope.yaml\n")
    with pytest.raises(ConfigError, match="nope.yaml: config file not found \\(extended by"):
        load_config(tmp_path / "child.yaml")


def test_zero_mix_weight_drops_a_base_part(tmp_path):
    from mcit.config import load_config
    from mcit.errors import ConfigError
    from mcit.models.start import base_settings as _base_settings

    (tmp_path / "multi.yaml").write_text("base: {mix: {describe: 0.6, locate: 0.4}}\n")
    (tmp_path / "caption.yaml").write_text("extends: multi.yaml\nbase: {mix: {describe: 1.0, locate: 0}}\n")
    (tmp_path / "plain.yaml").write_text("base: {mix: {describe: 1.0}}\n")
    caption, plain = load_config(tmp_path / "caption.yaml"), load_config(tmp_path / "plain.yaml")
    assert caption.base.mix == {"describe": 1.0}
    # the dropped part leaves no trace: the same cached starting model serves both spellings
    assert _base_settings(caption) == _base_settings(plain) != _base_settings(load_config(tmp_path / "multi.yaml"))
    with pytest.raises(ConfigError, match="base.mix weights must be >= 0"):
        load_config(tmp_path / "plain.yaml", ["base.mix.locate=-1"])
    with pytest.raises(ConfigError, match="at least one part"):
        load_config(tmp_path / "plain.yaml", ["base.mix.describe=0"])


def test_epochs_set_the_steps():
    from mcit.config import OptimConfig

    assert OptimConfig(steps=5).steps_for(1000) == 5
    assert OptimConfig(epochs=1, batch_size=16).steps_for(100) == 7
    assert OptimConfig(epochs=2, batch_size=16, grad_accum=2).steps_for(100) == 7
    assert OptimConfig(epochs=0.01, batch_size=16).steps_for(100) == 1


def test_sweep_plans_validates_and_names_runs(tmp_path):
    from mcit.errors import ConfigError
    from mcit.sweep import plan_sweep

    synth = SMOKE.parent
    runs = plan_sweep([synth / "ewc.yaml", synth / "mas.yaml"], ["method.lam=0.1,10"], ["seed=1"])
    assert [r.name for r in runs] == ["ewc__method.lam=0.1", "ewc__method.lam=10",
                                      "mas__method.lam=0.1", "mas__method.lam=10"]
    assert runs[1].overrides == ("seed=1", "method.lam=10")
    with pytest.raises(ConfigError, match="would both write 'ewc'"):
        plan_sweep([synth / "ewc.yaml", synth / "ewc.yaml"])
    with pytest.raises(ConfigError, match="expected KEY=V1,V2"):
        plan_sweep([synth / "ewc.yaml"], ["method.lam"])
    with pytest.raises(ConfigError, match="given twice"):
        plan_sweep([synth / "ewc.yaml"], ["seed=1", "seed=2"])
    with pytest.raises(ConfigError, match="nope"):  # every run is validated before any trains
        plan_sweep([synth / "ewc.yaml"], ["method.nope=1,2"])


def test_sweep_runs_each_grid_point_and_continues(smoke_cfg, tmp_path, monkeypatch, capsys):
    from mcit import runner
    from mcit.config import load_config

    out = tmp_path / "sweep"
    argv = ["mcit", "sweep", str(SMOKE), "--out", str(out), "--set", f"cache_dir={smoke_cfg().cache_dir}",
            "--set", "benchmark.tasks=[color,count]", "--grid", "train.lr=0.001,0.004", "--quiet"]
    monkeypatch.setattr(sys, "argv", argv)
    main()
    first = capsys.readouterr().out
    names = ["smoke__train.lr=0.001", "smoke__train.lr=0.004"]
    results = [json.loads((out / n / "results.json").read_text()) for n in names]
    assert [load_config(out / n / "config.yaml").train.lr for n in names] == [0.001, 0.004]
    assert results[0]["matrix"] != results[1]["matrix"]  # the grid value reached training
    assert "[2/2] smoke__train.lr=0.004" in first and (out / "compare.png").read_bytes()[:4] == b"\x89PNG"
    # a second call finds both runs finished: nothing trains again
    monkeypatch.setattr(runner, "train_stage", lambda *a, **k: pytest.fail("a finished run was trained again"))
    main()
    assert [json.loads((out / n / "results.json").read_text())["matrix"] for n in names] == [r["matrix"] for r in results]
