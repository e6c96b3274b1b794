"""GEM: the projection's known answers and KKT conditions, the method's step edit, resume."""

import itertools
import json

import pytest
import torch

from mcit.methods.gem import GEM, project_to_cone, solve_box_qp
from mcit.runner import run
from tests.conftest import kill_and_resume
from tests.test_methods import _method, _tiny_ctx


# --- the projection ---------------------------------------------------------------------------
def test_one_conflict_is_projected_onto_the_constraint_plane():
    # g = (1, 0), memory m = (-1, 1): g·m = -1. The closest g̃ with g̃·m >= 0 is (0.5, 0.5).
    g, m = torch.tensor([1.0, 0.0]), torch.tensor([[-1.0, 1.0]])
    out = project_to_cone(g, m)
    torch.testing.assert_close(out, torch.tensor([0.5, 0.5]))
    assert float(out @ m[0]) == pytest.approx(0.0, abs=1e-12)


def test_margin_bounds_the_dual_variable_from_below():
    # g = (1, 0), m = (-1, 2): the free optimum is v = 1/5; with margin 0.5, v = 0.5 and
    # g̃ = g + 0.5 m = (0.5, 1.0), which leans toward the memory (g̃·m = 1.5 > 0).
    g, m = torch.tensor([1.0, 0.0]), torch.tensor([[-1.0, 2.0]])
    torch.testing.assert_close(project_to_cone(g, m), torch.tensor([0.8, 0.4]))
    torch.testing.assert_close(project_to_cone(g, m, margin=0.5), torch.tensor([0.5, 1.0]))


def _kkt_by_enumeration(P, q, lower):
    """The box QP's solution by trying every active set (exact for a positive definite P)."""
    t = len(q)
    for active in itertools.product([False, True], repeat=t):
        free = torch.tensor([not a for a in active])
        v = torch.full((t,), lower, dtype=torch.float64)
        if free.any():
            rhs = -(q[free] + P[free][:, ~free] @ v[~free])
            v[free] = torch.linalg.solve(P[free][:, free], rhs)
        grad = P @ v + q
        if (v >= lower - 1e-10).all() and (grad[~free] >= -1e-10).all():
            return v
    raise AssertionError("no active set satisfies the KKT conditions")


@pytest.mark.parametrize("seed", range(6))
def test_several_conflicts_match_the_exact_solution_and_every_dot_product_is_non_negative(seed):
    gen = torch.Generator().manual_seed(seed)
    t, n = 4, 12
    memories = torch.randn(t, n, generator=gen, dtype=torch.float64)
    g = -memories.sum(0) + 0.3 * torch.randn(n, generator=gen, dtype=torch.float64)  # conflicts with most
    assert (memories @ g < 0).sum() >= 2
    P, q = memories @ memories.T, memories @ g
    v = solve_box_qp(P, q, 0.0)
    torch.testing.assert_close(v, _kkt_by_enumeration(P, q, 0.0))
    out = project_to_cone(g, memories)
    assert (memories @ out >= -1e-9).all()
    # it is the closest such vector: no feasible point on the segment toward g is nearer
    assert torch.linalg.vector_norm(out - g) <= torch.linalg.vector_norm(g) + 1e-9
    # with a margin, the reference's bias: every dual variable at least the margin
    assert (solve_box_qp(P + 1e-3 * torch.eye(t, dtype=torch.float64), q, 0.5) >= 0.5 - 1e-12).all()


# --- the method's step ------------------------------------------------------------------------
def _gem_ctx(tmp_path, **options):
    model, _, enc, samples, ctx = _tiny_ctx(tmp_path)
    ctx.train_data = {"a": samples, "b": samples}
    ctx.tasks, ctx.seed = ["a", "b"], 3
    gem = _method("gem", **options)
    gem.setup(model, ctx)
    gem.after_task("a", ctx)
    ctx.stage, ctx.task = 2, "b"
    return gem, model, enc, samples, ctx


def _memory_gradient(model, enc, samples):
    model.zero_grad(set_to_none=True)
    model(**enc.train_batch(samples)).loss.backward()
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def test_a_gradient_that_agrees_with_the_memory_is_left_alone(tmp_path):
    gem, model, enc, samples, ctx = _gem_ctx(tmp_path, margin=0.0, eps=0.0)
    model.train()
    mem = _memory_gradient(model, enc, samples)  # the memory holds both samples; the batch is both
    for n, p in model.named_parameters():
        p.grad = 2 * mem[n] if n in mem else None
    before = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    gem.before_step(ctx)
    assert gem.steps == 1 and gem.projected == 0
    assert all(torch.equal(p.grad, before[n]) for n, p in model.named_parameters() if p.grad is not None)


def test_a_conflicting_gradient_is_projected_to_a_non_negative_dot_product(tmp_path):
    gem, model, enc, samples, ctx = _gem_ctx(tmp_path, margin=0.0, eps=0.0)
    model.train()
    mem = _memory_gradient(model, enc, samples)
    gen = torch.Generator().manual_seed(0)
    for n, p in model.named_parameters():
        p.grad = (-mem[n] + 0.1 * torch.randn(mem[n].shape, generator=gen)) if n in mem else None
    raw = torch.cat([p.grad.reshape(-1) for n, p in model.named_parameters() if n in mem])
    flat_mem = torch.cat([mem[n].reshape(-1) for n, _ in model.named_parameters() if n in mem])
    assert float(raw @ flat_mem) < 0
    gem.before_step(ctx)
    new = torch.cat([p.grad.reshape(-1) for n, p in model.named_parameters() if n in mem])
    assert gem.projected == 1
    assert float(new @ flat_mem) == pytest.approx(0.0, abs=1e-4 * float(flat_mem @ flat_mem))
    # the projection of one constraint: g - (g·m / m·m) m
    expected = raw - (raw @ flat_mem) / (flat_mem @ flat_mem) * flat_mem
    torch.testing.assert_close(new, expected, rtol=1e-4, atol=1e-6)


def test_no_memory_on_the_first_task(tmp_path):
    model, _, _, samples, ctx = _tiny_ctx(tmp_path)
    gem = _method("gem")
    gem.setup(model, ctx)
    ctx.stage, ctx.task = 1, "a"
    gem.before_step(ctx)
    assert gem.steps == 0 and gem.report()["projected_share"] is None


# --- end to end ---------------------------------------------------------------------------------
def test_gem_runs_the_smoke_stream_and_resumes_exactly(smoke_cfg, tmp_path, monkeypatch):
    cfg = smoke_cfg("method.name=gem", "method.per_task=8", "method.memory_batch=4")
    whole = run(cfg, tmp_path / "whole", show_progress=False)
    report = whole["method_report"]
    assert report["steps_with_memory"] == 20 and report["memory"] == {"color": 8, "count": 8, "ocr": 8}
    assert 0 < report["steps_projected"] <= 20
    resumed = kill_and_resume(cfg, tmp_path / "killed", GEM, 3, 4, monkeypatch)
    assert resumed["matrix"] == whole["matrix"]
    meta = json.loads((tmp_path / "killed" / "checkpoints" / "stage_03_ocr" / "method.json").read_text())
    assert meta["projected"] == report["steps_projected"]
