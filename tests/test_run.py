"""End-to-end runs of the smoke config: outputs, determinism, resume, baselines."""

import json
import math

import pytest

from mcit.methods.seqft import SeqFT
from mcit.runner import run

METRICS = {"MFT", "MFN", "MAA", "BWT", "FWT", "forgetting", "FAA_weighted"}


def test_run_directory_holds_everything(smoke_run):
    out, results = smoke_run
    saved = json.loads((out / "results.json").read_text())
    assert saved == json.loads(json.dumps(results))
    for key in ("schema", "benchmark", "method", "seed", "config_hash", "tasks", "scorers", "test_sizes",
                "matrix", "metrics", "timing", "memory", "environment"):
        assert key in saved, key
    tasks = saved["tasks"]
    assert tasks == ["color", "count", "ocr"]
    assert len(saved["matrix"]) == len(tasks) + 1 and all(len(r) == len(tasks) for r in saved["matrix"])
    assert set(saved["metrics"]) == METRICS
    assert all(v is None or math.isfinite(v) for v in saved["metrics"].values())
    assert saved["scorers"] == {"color": "vqa", "count": "numeric", "ocr": "vqa_evalai"}
    assert saved["test_sizes"] == {t: 16 for t in tasks}
    assert set(saved["timing"]) == {"train_s", "eval_s", "method_s", "step_ms_median", "steps"} and saved["timing"]["steps"] == 30
    assert saved["timing"]["method_s"] < 0.1  # seqft has no one-off passes
    assert set(saved["environment"]) >= {"mcit", "torch", "transformers", "peft", "python", "device", "git"}
    assert (out / "config.yaml").is_file() and (out / "report.md").is_file()
    assert (out / "matrix.png").read_bytes()[:4] == b"\x89PNG"
    for row in range(len(tasks) + 1):
        for t in tasks:
            lines = (out / "predictions" / f"row_{row:02d}" / f"{t}.jsonl").read_text().splitlines()
            assert len(lines) == 16 and {"id", "prediction", "references", "score"} <= set(json.loads(lines[0]))
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts == ["stage_01_color", "stage_02_count", "stage_03_ocr"]
    assert {p.name for p in (out / "checkpoints" / ckpts[0]).iterdir()} == {
        "trainable.safetensors", "method.safetensors", "method.json"}
    assert not list(out.rglob("*.pt")) and not list(out.rglob("*.pkl"))


def test_same_config_and_seed_give_the_same_matrix(smoke_run, smoke_cfg, tmp_path):
    _, first = smoke_run
    again = run(smoke_cfg(), tmp_path / "again", show_progress=False)
    assert again["matrix"] == first["matrix"]


def test_resume_after_a_kill_mid_task_gives_the_same_matrix(smoke_run, smoke_cfg, tmp_path, monkeypatch):
    _, uninterrupted = smoke_run

    def killed(self, ctx):
        if ctx.stage == 2 and ctx.step == 4:
            raise KeyboardInterrupt

    monkeypatch.setattr(SeqFT, "before_step", killed)
    out = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):
        run(smoke_cfg(), out, show_progress=False)
    state = json.loads((out / "state.json").read_text())
    assert len(state["rows"]) == 2 and not (out / "results.json").exists()
    monkeypatch.undo()
    resumed = run(smoke_cfg(), out, resume=True, show_progress=False)
    assert resumed["matrix"] == uninterrupted["matrix"]


def test_resume_refuses_another_config(smoke_run, smoke_cfg):
    from mcit.errors import McitError

    out, _ = smoke_run
    with pytest.raises(McitError, match="another config"):
        run(smoke_cfg("train.lr=0.5"), out, resume=True, show_progress=False)
    with pytest.raises(McitError, match="--resume"):
        run(smoke_cfg(), out, show_progress=False)


def test_joint_and_zeroshot_rows(smoke_run, smoke_cfg, tmp_path):
    _, seq = smoke_run
    zs = run(smoke_cfg("method.name=zeroshot"), tmp_path / "zs", show_progress=False)
    assert zs["matrix"] == [seq["matrix"][0]]  # the same starting model, evaluated once
    assert zs["timing"]["steps"] == 0
    joint = run(smoke_cfg("method.name=joint"), tmp_path / "joint", show_progress=False)
    assert len(joint["matrix"]) == 2 and joint["row_labels"] == ["zero-shot", "joint"]
    assert joint["timing"]["steps"] == 30  # same total budget as the sequential run
    assert joint["metrics"]["MFN"] == pytest.approx(sum(joint["matrix"][1]) / 3)
    assert joint["metrics"]["BWT"] is None and joint["metrics"]["MFT"] is None


@pytest.mark.parametrize("tuning", ["lora", "lora+projector", "projector"])
def test_tuning_modes_train_only_their_parameters(smoke_cfg, tmp_path, tuning):
    from safetensors.torch import load_file

    mode, _, projector = tuning.partition("+")
    res = run(smoke_cfg(f"model.tuning={mode}", f"model.train_projector={bool(projector)}", "benchmark.tasks=[color]"),
              tmp_path / tuning, show_progress=False)
    names = list(load_file(str(tmp_path / tuning / "checkpoints" / "stage_01_color" / "trainable.safetensors")))
    assert names
    lora = [n for n in names if "lora_" in n and "language_model" in n]
    proj = [n for n in names if "multi_modal_projector" in n and "lora_" not in n]
    if mode == "lora":
        assert lora and sorted(lora + proj) == sorted(names) and bool(proj) == bool(projector)
    else:
        assert proj == names
    assert res["parameters"]["trainable"] < res["parameters"]["total"] / 2


def test_non_finite_loss_stops_with_a_clear_error(smoke_cfg, tmp_path, monkeypatch):
    import torch

    from mcit.train import TrainingError

    monkeypatch.setattr(SeqFT, "extra_loss", lambda self, batch, outputs, ctx: torch.tensor(float("nan")))
    with pytest.raises(TrainingError, match=r"task 1/3 color: non-finite loss \(nan\) at step 1"):
        run(smoke_cfg(), tmp_path / "nan", show_progress=False)
    # the zero-shot row was finished and kept
    assert len(json.loads((tmp_path / "nan" / "state.json").read_text())["rows"]) == 1


def test_trackers_log_losses_rows_and_metrics(smoke_cfg, tmp_path, monkeypatch):
    """What the runner sends to accelerate's trackers (a capturing tracker stands in for TensorBoard)."""
    from accelerate.tracking import GeneralTracker

    import mcit.runner as runner

    logged, configs = [], []

    class Capture(GeneralTracker):
        name, requires_logging_directory, main_process_only = "capture", False, True

        def __init__(self):
            super().__init__()

        @property
        def tracker(self):
            return self

        def store_init_configuration(self, values):
            configs.append(values)

        def log(self, values, step=None, **kwargs):
            logged.append((step, dict(values)))

    import mcit.assembly as assembly

    monkeypatch.setattr(assembly, "resolve_trackers", lambda names: [Capture()])
    res = runner.run(smoke_cfg("log_every=5"), tmp_path / "run", show_progress=False)
    assert configs and configs[0]["method/name"] == "seqft" and configs[0]["train/steps"] == 10
    losses = [(s, v) for s, v in logged if "train/loss" in v]
    assert [s for s, _ in losses] == [5, 10, 15, 20, 25, 30] and losses[0][1]["train/lr"] > 0  # cosine: 0 at the end
    rows = [v for _, v in logged if "eval/row" in v]
    assert [r["eval/row"] for r in rows] == [0, 1, 2, 3]
    assert [[r[f"eval/{t}"] for t in res["tasks"]] for r in rows] == res["matrix"]
    final = logged[-1][1]
    assert final["metrics/MFN"] == res["metrics"]["MFN"]


def test_tracker_names_are_checked(monkeypatch):
    import accelerate.utils

    from mcit.errors import ConfigError
    from mcit.runner import resolve_trackers

    monkeypatch.setattr(accelerate.utils, "is_tensorboard_available", lambda: False)
    monkeypatch.setattr(accelerate.utils, "is_wandb_available", lambda: False)
    assert resolve_trackers(["auto"]) == []
    with pytest.raises(ConfigError, match="'wandb' is not installed"):
        resolve_trackers(["wandb"])
    monkeypatch.setattr(accelerate.utils, "is_tensorboard_available", lambda: True)
    assert resolve_trackers(["auto", "tensorboard"]) == ["tensorboard"]


def test_projector_lr_sets_the_projectors_group_beside_lora(tmp_path):
    import torch

    from mcit.config import LoraConfig, OptimConfig
    from mcit.models.tuning import apply_tuning
    from mcit.train import StageTrainer, param_groups
    from tests.conftest import make_tiny

    model, _, enc, samples = make_tiny(tmp_path)
    model = apply_tuning(model, "lora", LoraConfig(r=2), train_projector=True)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    plain, slow = param_groups(named, OptimConfig(lr=1e-3, projector_lr=1e-4))
    assert "lr" not in plain and slow["lr"] == 1e-4
    projector = {id(p) for n, p in named if "multi_modal_projector" in n}
    assert {id(p) for p in slow["params"]} == projector and not projector & {id(p) for p in plain["params"]}
    assert len(param_groups(named, OptimConfig(lr=1e-3))) == 1  # unset: one group at lr
    trainer = StageTrainer(model, enc, samples, OptimConfig(steps=4, batch_size=2, lr=1e-3, projector_lr=1e-4,
                                                            warmup_ratio=0.0, schedule="constant"),
                           __import__("mcit.train", fromlist=["x"]).SingleProcess("cpu"), seed=0)
    assert [g["lr"] for g in trainer.optimizer.param_groups] == [1e-3, 1e-4]
    before = {n: p.detach().clone() for n, p in named}
    trainer.step()
    moved = {n: (p.detach() - before[n]).abs().max().item() for n, p in named}
    assert all(v > 0 for n, v in moved.items() if "multi_modal_projector" in n)
    assert torch.isfinite(torch.tensor(list(moved.values()))).all()


def test_config_hash_survives_options_added_at_their_defaults():
    """Run directories made before `mixed_precision` and `eval.merge_lora` existed still resume:
    the shipped seqft config hashes as it did then (12 hex digits recorded in a run of that time);
    setting either option is a different run."""
    from mcit.config import load_config
    from mcit.runner import config_hash
    from tests.test_start import SYNTH_CONFIGS

    seqft = SYNTH_CONFIGS / "seqft.yaml"
    assert config_hash(load_config(seqft)) == "92e0da393ccf"
    assert config_hash(load_config(seqft, ["mixed_precision=bf16"])) != "92e0da393ccf"
    assert config_hash(load_config(seqft, ["eval.merge_lora=true"])) != "92e0da393ccf"
