"""Dynamic Gradient Guidance: the update rule, its options and its exactness on resume."""

import json

import pytest
import torch

from mcit.errors import ConfigError
from mcit.methods import TaskContext
from mcit.runner import run
from tests.conftest import kill_and_resume
from tests.test_methods import _method, _NoAccelerator


def _setup(star, theta, grad, stage=2, tasks=("a", "b", "c"), **options):
    model = torch.nn.Module()
    model.w = torch.nn.Parameter(torch.tensor(theta))
    model.unused = torch.nn.Parameter(torch.zeros(2))  # never gets a gradient
    model.w.grad = torch.tensor(grad)
    ctx = TaskContext(model, _NoAccelerator(), None, list(tasks), {}, stage=stage, seed=0)
    m = _method("dgg", **options)
    m.setup(model, ctx)
    m.theta_star = {"w": torch.tensor(star), "unused": torch.ones(2)}
    return m, model, ctx


def test_alpha_one_without_scaling_adds_the_way_back():
    m, model, ctx = _setup([1.0, 1.0], [3.0, -1.0], [0.5, 0.5], alpha=1.0, scaling=False)
    m.before_step(ctx)
    torch.testing.assert_close(model.w.grad, torch.tensor([0.5 + 2.0, 0.5 - 2.0]))
    assert model.unused.grad is None and m.injected == 1


@pytest.mark.parametrize("norm", ["tensor", "global"])
def test_scaling_caps_the_guidance_at_the_gradient_norm(norm):
    m, model, ctx = _setup([0.0, 0.0], [30.0, 40.0], [0.6, 0.8], alpha=1.0, norm=norm)
    m.before_step(ctx)
    added = model.w.grad - torch.tensor([0.6, 0.8])
    torch.testing.assert_close(torch.linalg.vector_norm(added), torch.tensor(1.0))
    torch.testing.assert_close(added, torch.tensor([0.6, 0.8]))  # along d, shortened
    # a short d is used as is
    m, model, ctx = _setup([0.0, 0.0], [0.03, 0.04], [6.0, 8.0], alpha=1.0, norm=norm)
    m.before_step(ctx)
    torch.testing.assert_close(model.w.grad, torch.tensor([6.03, 8.04]))


def test_no_guidance_on_the_first_task_or_with_bernoulli_misses():
    m, model, ctx = _setup([0.0], [1.0], [0.0], stage=1, alpha=1.0)
    m.before_step(ctx)
    assert model.w.grad.item() == 0.0
    m, model, ctx = _setup([0.0], [1.0], [0.0], alpha=0.3, scaling=False)
    for _ in range(400):
        model.w.grad = torch.zeros(1)
        m.before_step(ctx)
    assert 80 < m.injected < 160  # ~ Bernoulli(0.3)
    m, model, ctx = _setup([0.0], [1.0], [0.0], alpha=0.3, bernoulli=False)
    for _ in range(10):
        m.before_step(ctx)
    assert m.injected == 10


def test_per_task_alpha_lists_are_honoured():
    for alpha in ([0.0, 1.0, 0.0], [1.0, 0.0]):  # T values, or T-1 for tasks 2..T
        m, model, ctx = _setup([0.0], [1.0], [0.0], alpha=alpha, scaling=False)
        ctx.stage = 2
        for _ in range(20):
            m.before_step(ctx)
        assert m.injected == 20
        ctx.stage = 3
        for _ in range(20):
            m.before_step(ctx)
        assert m.injected == 20
    with pytest.raises(ConfigError, match="method.alpha: 2 values for a stream of 4 tasks"):
        _setup([0.0], [1.0], [0.0], tasks=("a", "b", "c", "d"), alpha=[0.1, 0.2])


def test_alpha_zero_is_replay_bit_for_bit(smoke_cfg, tmp_path):
    from safetensors.torch import load_file

    rep = run(smoke_cfg("method.name=replay", "method.per_task=5"), tmp_path / "replay", show_progress=False)
    dgg = run(smoke_cfg("method.name=dgg", "method.per_task=5", "method.alpha=0"), tmp_path / "dgg",
              show_progress=False)
    assert dgg["matrix"] == rep["matrix"]
    a = load_file(str(tmp_path / "replay" / "checkpoints" / "stage_03_ocr" / "trainable.safetensors"))
    b = load_file(str(tmp_path / "dgg" / "checkpoints" / "stage_03_ocr" / "trainable.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_reproduces_the_bernoulli_draws(smoke_cfg, tmp_path, monkeypatch):
    from mcit.methods.dgg import DGG

    cfg = smoke_cfg("method.name=dgg", "method.per_task=5", "method.alpha=0.5")
    whole = run(cfg, tmp_path / "whole", show_progress=False)
    injected = json.loads((tmp_path / "whole" / "checkpoints" / "stage_03_ocr" / "method.json").read_text())["injected"]
    assert 0 < injected < 20  # two guided tasks of 10 steps, alpha 0.5
    resumed = kill_and_resume(cfg, tmp_path / "killed", DGG, 3, 4, monkeypatch)
    assert resumed["matrix"] == whole["matrix"]
    meta = json.loads((tmp_path / "killed" / "checkpoints" / "stage_03_ocr" / "method.json").read_text())
    assert meta["injected"] == injected
