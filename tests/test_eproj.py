"""EProj: projector experts, key routing per sample, similarity-informed expansion."""

import json

import pytest
import torch
from torch import nn

from mcit.methods.eproj import ProjectorExperts
from mcit.runner import run
from tests.conftest import kill_and_resume
from tests.test_methods import _method, _tiny_ctx


def test_each_sample_goes_through_its_own_expert():
    torch.manual_seed(0)
    bank = ProjectorExperts(nn.Linear(4, 3), 3, 5, 6)
    for i, e in enumerate(bank.experts):
        nn.init.constant_(e.weight, float(i))
    x = torch.randn(4, 7, 4)
    bank.route = torch.tensor([2, 0, 2, 1])
    out = bank(x)
    for row, e in enumerate([2, 0, 2, 1]):
        torch.testing.assert_close(out[row], bank.experts[e](x[row]))
    assert bank.route is None  # consumed by one forward
    bank.current = 1
    torch.testing.assert_close(bank(x), bank.experts[1](x))


def test_key_phase_pulls_keys_to_the_task_queries(tmp_path):
    model, processor, enc, samples, ctx = _tiny_ctx(tmp_path)
    ctx.tasks = ["a", "b"]
    m = _method("eproj", key_steps=200, keys=1)  # the paper's single key: the queries' mean direction
    m.setup(model, ctx)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("multi_modal_projector.experts" in n for n in trainable)
    q = torch.randn(50, 16) + 3.0
    t = torch.randn(50, 32) - 2.0
    m.fit_keys(1, q, t)
    mean_q = nn.functional.normalize(nn.functional.normalize(q, dim=-1).mean(0), dim=0)
    assert nn.functional.cosine_similarity(m.bank.image_keys[1, 0], mean_q, dim=0) > 0.999
    assert m.bank.image_keys[0].abs().sum() == 0  # the other expert's keys are untouched


def test_several_keys_route_a_task_asked_in_several_phrasings(tmp_path):
    """Expert 0's task comes in two phrasings (directions e0, e1); expert 1's sits between them.
    One key per expert cannot tell them apart; two keys find both phrasings."""
    from mcit.methods.query import key_scores

    model, processor, enc, samples, ctx = _tiny_ctx(tmp_path)
    ctx.tasks = ["a", "b"]
    g = torch.Generator().manual_seed(0)
    e0, e1 = torch.eye(32)[0], torch.eye(32)[1]
    a_text = torch.cat([e0 + 0.05 * torch.randn(40, 32, generator=g), e1 + 0.05 * torch.randn(40, 32, generator=g)])
    b_text = (e0 + e1) / 2 + 0.05 * torch.randn(40, 32, generator=g)
    image = torch.ones(80, 16)  # images alike: the instruction has to decide
    accuracy = {}
    for keys in (1, 2):
        m = _method("eproj", key_steps=300, keys=keys)
        m.setup(model, ctx)
        m.fit_keys(0, image, a_text)
        m.fit_keys(1, image[:40], b_text)
        assert m.bank.text_keys.shape == (2, keys, 32)
        probe = torch.stack([e0, e1, (e0 + e1) / 2])
        choice = key_scores(image[:3], probe, m.bank.image_keys, m.bank.text_keys).argmax(-1)
        accuracy[keys] = (choice == torch.tensor([0, 0, 1])).float().mean().item()
    assert accuracy[2] == 1.0 and accuracy[1] < 1.0


def test_eproj_routes_learns_and_resumes(smoke_cfg, tmp_path, monkeypatch):
    from mcit.methods.eproj import EProj

    cfg = smoke_cfg("method.name=eproj", "method.key_samples=32", "method.key_steps=20")
    seen, route = [], EProj.route
    monkeypatch.setattr(EProj, "route", lambda self, batch, ctx: seen.append(ctx.oracle_task) or route(self, batch, ctx))
    whole = run(cfg, tmp_path / "whole", show_progress=False)
    assert seen and set(seen) == {None}  # the task under evaluation never reaches a task-agnostic method
    monkeypatch.setattr(EProj, "route", route)
    report = whole["method_report"]
    assert report["experts_created"] == 3 and report["expert_of_task"] == {"color": 0, "count": 1, "ocr": 2}
    acc = report["routing_accuracy"]
    assert set(acc) == {"1", "2", "3"} and set(acc["3"]) == {"color", "count", "ocr"}
    assert acc["1"] == {"color": 100.0}  # one expert: everything goes to it
    assert all(0 <= v <= 100 for row in acc.values() for v in row.values())
    resumed = kill_and_resume(cfg, tmp_path / "killed", EProj, 3, 4, monkeypatch)
    assert resumed["matrix"] == whole["matrix"] and resumed["method_report"] == report


@pytest.mark.parametrize(("threshold", "experts"), [(0.01, 1), (0.99, 3)])
def test_eproj_sim_reuses_experts_above_the_threshold(smoke_cfg, tmp_path, threshold, experts):
    cfg = smoke_cfg("method.name=eproj_sim", f"method.threshold={threshold}", "method.similarity_samples=32",
                    "method.key_samples=32", "method.key_steps=10")
    res = run(cfg, tmp_path / "run", show_progress=False)
    report = res["method_report"]
    assert report["experts_created"] == experts
    assert set(report["similarities"]) == {"count", "ocr"}
    meta = json.loads((tmp_path / "run" / "checkpoints" / "stage_03_ocr" / "method.json").read_text())
    assert meta["n_used"] == experts
