"""KeepLoRA: the protected subspace, the residual A, B-only training, the merge, resume."""

import pytest
import torch

from mcit.methods import TaskContext
from mcit.methods.keeplora import KeepLoRA, extend_basis, principal_rows, residual
from mcit.methods.reglora import _factors, lora_layers
from mcit.runner import run
from tests.conftest import kill_and_resume
from tests.test_experts import _lora_model
from tests.test_methods import _method, _NoAccelerator


def test_principal_rows_hold_the_weight_energy():
    w = torch.zeros(4, 5)
    w[0, 2], w[1, 4] = 3.0, 1.0  # S = [3, 1]: shares 0.9, 1.0
    rows = principal_rows(w, 0.6)
    assert rows.shape == (1, 5) and abs(float(rows[0, 2])) == pytest.approx(1.0)
    assert principal_rows(w, 1.0).shape[0] == 1  # the reference counts shares strictly below the threshold
    w[2, 0] = 1.0  # S = [3, 1, 1]: shares 0.82, 0.91, 1.0
    assert principal_rows(w, 0.85).shape[0] == 1 and principal_rows(w, 0.95).shape[0] == 2


def test_residual_removes_the_protected_directions():
    basis = torch.tensor([[1.0, 0.0, 0.0]])
    assert residual(torch.tensor([[2.0, 3.0, 4.0]]), basis).tolist() == [[0.0, 3.0, 4.0]]


def test_extend_basis_by_gpm_energy():
    basis = torch.tensor([[1.0, 0.0, 0.0]])
    g = torch.tensor([[0.0, 2.0, 0.0], [0.0, 0.0, 1.0]])  # energy 4 along e1, 1 along e2
    two = extend_basis(basis, g, 0.7)  # e1 keeps 0.8 >= 0.7
    assert two.shape == (2, 3) and abs(float(two[1, 1])) == pytest.approx(1.0)
    three = extend_basis(basis, g, 0.99)
    assert three.shape == (3, 3)
    assert extend_basis(three, g, 0.99).shape == (3, 3)  # nothing left outside: unchanged


def test_before_a_task_a_reads_only_the_residual_and_only_b_learns(tmp_path):
    model, enc, samples = _lora_model(tmp_path)

    class Cfg:
        class train:
            batch_size = 2

    ctx = TaskContext(model, _NoAccelerator(), Cfg(), ["a"], {"a": samples * 5}, seed=5)
    ctx.encoder = enc
    method = _method("keeplora", weight_energy=0.6)
    method.setup(model, ctx)
    method.before_task("a", samples, ctx)
    for name, layer in lora_layers(model).items():
        A, B, _ = _factors(layer)
        assert torch.count_nonzero(B) == 0
        assert (A.detach() @ method.basis[name].T).abs().max() < 1e-4  # orthogonal to the protected rows
    model.train()
    model(**enc.train_batch(samples)).loss.backward()
    method.before_step(ctx)
    layer = next(iter(lora_layers(model).values()))
    assert _factors(layer)[0].grad is None and _factors(layer)[1].grad is not None
    assert not any(layer.get_base_layer().weight.requires_grad for layer in lora_layers(model).values())


def test_keeplora_runs_the_smoke_stream_merges_and_resumes_exactly(smoke_cfg, tmp_path, monkeypatch):
    cfg = smoke_cfg("method.name=keeplora", "model.tuning=lora", "benchmark.general=[]", "benchmark.tasks=[color,count]")
    whole = run(cfg, tmp_path / "whole", show_progress=False)
    report = whole["method_report"]
    assert report["tasks_merged"] == 2 and report["protected_dims_mean"] >= 1
    resumed = kill_and_resume(cfg, tmp_path / "killed", KeepLoRA, 2, 3, monkeypatch)
    assert resumed["matrix"] == whole["matrix"]
    assert resumed["method_report"] == report
