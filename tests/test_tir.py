"""TIR (He et al.): max importance with owners, rescaled by task similarity before each task."""

import pytest
import torch

from mcit.runner import run
from tests.conftest import kill_and_resume
from tests.test_methods import _method


def test_importance_is_the_max_over_tasks_with_its_owner():
    m = _method("tir_ewc")
    params = {"w": torch.zeros(4)}
    m.consolidate({"w": torch.tensor([1.0, 5.0, 0.0, 2.0])}, params)
    m.tasks_done.append("a")
    params = {"w": torch.ones(4)}
    m.consolidate({"w": torch.tensor([3.0, 1.0, 0.0, 2.0])}, params)
    m.tasks_done.append("b")
    assert m.omega["w"].tolist() == [3.0, 5.0, 0.0, 2.0]
    assert m.owner["w"].tolist() == [1, 0, 0, 0]  # a tie keeps the earlier owner
    assert m.anchor["w"].tolist() == [1.0, 1.0, 1.0, 1.0]  # the latest parameters


def test_similarity_frees_weights_owned_by_similar_tasks(monkeypatch):
    m = _method("tir_mas", lam=2.0)
    m.omega, m.owner = {"w": torch.tensor([3.0, 5.0, 1.0])}, {"w": torch.tensor([1, 0, 0], dtype=torch.int16)}
    m.anchor, m.tasks_done = {"w": torch.zeros(3)}, ["a", "b"]
    monkeypatch.setattr(type(m), "task_similarity", lambda self, task, ctx: [0.9, 0.2])
    m.before_task("c", [], None)
    torch.testing.assert_close(m.effective("w"), torch.tensor([3.0 * 0.8, 5.0 * 0.1, 1.0 * 0.1]))
    w = torch.nn.Parameter(torch.tensor([1.0, 1.0, 1.0]))
    expected = 0.5 * 2.0 * (3.0 * 0.8 + 5.0 * 0.1 + 1.0 * 0.1)
    assert m.penalty({"w": w}).item() == pytest.approx(expected)


def test_gamma_is_refused():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="gamma does not apply"):
        _method("tir_ewc", gamma=0.5)


def test_tir_runs_and_resumes_exactly(smoke_cfg, tmp_path, monkeypatch):
    import json

    from mcit.methods.tir import TIREWC

    cfg = smoke_cfg("method.name=tir_ewc", "method.lam=10", "method.similarity_samples=32")
    whole = run(cfg, tmp_path / "whole", show_progress=False)
    meta = json.loads((tmp_path / "whole" / "checkpoints" / "stage_03_ocr" / "method.json").read_text())
    sims = meta["similarities"]  # of ocr (the last task) to color and count
    assert len(sims) == 2 and all(0 < s < 1 for s in sims)
    resumed = kill_and_resume(cfg, tmp_path / "killed", TIREWC, 3, 4, monkeypatch)
    assert resumed["matrix"] == whole["matrix"]
