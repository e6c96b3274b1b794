"""Prompt pool and Fwd-Prompt: insertion, selection, projection, bases, resume."""

import json

import pytest
import torch

from mcit.methods.prompt import POOL_ATTR, extend_basis, project
from mcit.runner import run
from tests.conftest import kill_and_resume
from tests.test_methods import _method, _tiny_ctx


def _random_basis(d=16, ranks=(3, 2), seed=0):
    g = torch.Generator().manual_seed(seed)
    basis = None
    for r in ranks:
        rows = torch.randn(50, r, generator=g) @ torch.randn(r, d, generator=g)
        basis = extend_basis(basis, rows, 0.999)
    return basis


def test_projected_gradient_is_orthogonal_to_the_old_basis():
    old = _random_basis()
    pre = _random_basis(ranks=(4,), seed=1)
    grad = torch.randn(3, 5, 16, dtype=torch.float64)
    for residual_pretrained in (1.0, 0.0, 2.5):
        out = project(grad, old, pre, True, residual_pretrained)
        assert out.shape == grad.shape
        assert (out.reshape(-1, 16) @ old).abs().max() < 1e-5
    # the pre-trained component is reinforced: more of the result lies in U_pre than without it
    plain = project(grad, old, pre, True, 0.0).reshape(-1, 16)
    boosted = project(grad, old, pre, True, 1.0).reshape(-1, 16)
    assert (boosted @ pre).norm() > 1.5 * (plain @ pre).norm()
    # residual off, pre-trained only: g + beta * g U U^T
    only_pre = project(grad, old, pre, False, 1.0).reshape(-1, 16)
    g = grad.reshape(-1, 16)
    torch.testing.assert_close(only_pre, g + (g @ pre) @ pre.T)


def test_projection_with_empty_bases_is_the_identity():
    grad = torch.randn(2, 3, 8)
    assert torch.equal(project(grad, None, None, True, 1.0), grad)
    empty = torch.zeros(8, 0, dtype=torch.float64)
    torch.testing.assert_close(project(grad, empty, empty, True, 1.0), grad)


def test_bases_stay_orthonormal_and_capture_each_task():
    g = torch.Generator().manual_seed(3)
    basis, ranks = None, []
    for _ in range(5):
        rows = torch.randn(80, 3, generator=g) @ torch.randn(3, 24, generator=g) + 0.01 * torch.randn(80, 24, generator=g)
        basis = extend_basis(basis, rows, 0.95)
        ranks.append(basis.shape[1])
        torch.testing.assert_close(basis.T @ basis, torch.eye(basis.shape[1], dtype=torch.float64), atol=1e-10, rtol=0)
        inside = ((rows.double() @ basis) ** 2).sum() / (rows.double() ** 2).sum()
        assert inside >= 0.95
    assert ranks == sorted(ranks) and ranks[0] < ranks[-1] <= 24
    # a task inside the span adds nothing
    assert extend_basis(basis, basis.T[:2].float() * 5, 0.95).shape[1] == basis.shape[1]


def _prompted(tmp_path, name="prompt_pool", seed=7, **options):
    model, processor, enc, samples, ctx = _tiny_ctx(tmp_path)
    ctx.seed = seed
    m = _method(name, **{"pool_size": 4, "length": 2, "top_k": 2, **options})
    m.setup(model, ctx)
    return m, model, enc, samples, ctx


def test_only_the_pool_trains_and_its_prompts_fill_the_placeholders(tmp_path):
    m, model, enc, samples, ctx = _prompted(tmp_path)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        f"{POOL_ATTR}.prompts", f"{POOL_ATTR}.text_keys", f"{POOL_ATTR}.image_keys"}
    batch = enc.train_batch(samples)
    assert (batch["input_ids"][:, 1:5] == enc.tokenizer.pad_token_id).all() and batch["attention_mask"][:, 1:5].all()
    seen = {}
    lm = model.model.language_model
    handle = lm.register_forward_pre_hook(lambda mod, a, kw: seen.update(emb=kw["inputs_embeds"]), with_kwargs=True)
    out = model(**batch)
    handle.remove()
    chosen = m.last_selection
    expected = m.pool.prompts[chosen].reshape(2, 4, -1)
    torch.testing.assert_close(seen["emb"][:, 1:5], expected)
    loss = out.loss + m.extra_loss(batch, out, ctx)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert set(grads) == {f"{POOL_ATTR}.prompts", f"{POOL_ATTR}.text_keys", f"{POOL_ATTR}.image_keys"}
    unselected = [i for i in range(4) if i not in chosen.flatten().tolist()]
    assert all(m.pool.prompts.grad[i].abs().sum() == 0 for i in unselected)


def test_selection_is_deterministic_for_a_seed(tmp_path):
    picks = []
    for seed in (7, 7, 8):
        (tmp_path / str(len(picks))).mkdir()
        m, model, enc, samples, ctx = _prompted(tmp_path / str(len(picks)), seed=seed)
        batch = enc.generation_batch(samples)
        q = m.queries(batch["input_ids"], batch["attention_mask"], batch["pixel_values"])
        picks.append((m.select(*q).tolist(), m.pool.prompts.detach().clone()))
    assert picks[0][0] == picks[1][0] and torch.equal(picks[0][1], picks[1][1])
    assert not torch.equal(picks[0][1], picks[2][1])


def test_diversified_selection_gives_a_new_task_unused_entries(tmp_path):
    m, model, enc, samples, ctx = _prompted(tmp_path, pool_size=6)
    batch = enc.train_batch(samples)
    q = m.queries(batch["input_ids"], batch["attention_mask"], batch["pixel_values"])
    plain = m.select(*q)
    assert torch.equal(m.select(*q, diversify=True), plain)  # nothing used yet: the plain selection
    m.before_task("a", samples, ctx)
    model(**batch)  # a training forward (grad enabled) counts its selections
    m.after_task("a", ctx)
    assert m.usage.tolist() == torch.bincount(plain.flatten(), minlength=6).double().tolist()
    assert m.usage_by_task == {"a": [int(c) for c in m.usage.tolist()]}
    fresh = m.select(*q, diversify=True)
    assert not set(fresh.flatten().tolist()) & set(plain.flatten().tolist())  # entries task a left unused
    assert torch.equal(m.select(*q), plain)  # inference matches keys alone
    with torch.no_grad():  # an evaluation forward neither diversifies nor counts
        m.before_task("b", samples, ctx)
        model(**batch)
        m.after_task("b", ctx)
    assert torch.equal(m.last_selection, plain) and sum(m.usage_by_task["b"]) == 0
    # with diversity off, training selects as inference does
    off, model_off, *_ = _prompted(tmp_path, pool_size=6, diversity=False)
    off.usage = m.usage.clone()
    model_off(**batch)
    assert torch.equal(off.last_selection, plain)


def test_batched_generation_with_prompts_matches_one_by_one(tmp_path):
    from mcit.evaluate import generate

    m, model, enc, samples, ctx = _prompted(tmp_path)
    torch.manual_seed(1)
    with torch.no_grad():
        m.pool.prompts.mul_(50)  # make the prompts matter for the output
    seen = []
    lm = model.model.language_model
    handle = lm.register_forward_pre_hook(lambda mod, a, kw: seen.append(kw["inputs_embeds"].detach().clone()),
                                          with_kwargs=True)
    together = generate(model, enc, samples, 2, 6, torch.device("cpu"), m, ctx)
    handle.remove()
    prefill = seen[0]  # left-padded: each row's placeholders sit right after its <s>
    batch = enc.generation_batch(samples)
    for row in range(2):
        start = int((batch["attention_mask"][row] == 0).sum()) + 1
        got = prefill[row, start : start + 4]
        assert any(torch.allclose(got, m.pool.prompts[list(c)].reshape(4, -1))
                   for c in [(i, j) for i in range(4) for j in range(i + 1, 4)]), "prompts not in the prefill"
    assert all(e.shape[1] == 1 for e in seen[1:])  # decoding steps reuse the cache
    alone = [generate(model, enc, [s], 1, 6, torch.device("cpu"), m, ctx)[0] for s in samples]
    assert together == alone


@pytest.mark.parametrize("name", ["prompt_pool", "fwd_prompt"])
def test_prompt_methods_run_and_resume_exactly(smoke_cfg, tmp_path, monkeypatch, name):
    from mcit.methods import get_method

    cfg = smoke_cfg(f"method.name={name}", "train.lr=0.05")
    whole = run(cfg, tmp_path / "whole", show_progress=False)
    assert whole["parameters"]["trainable"] < 0.05 * whole["parameters"]["total"]
    resumed = kill_and_resume(cfg, tmp_path / "killed", get_method(name), 2, 3, monkeypatch)
    assert resumed["matrix"] == whole["matrix"]
    usage = whole["method_report"]["selections_per_entry"]
    assert list(usage) == ["color", "count", "ocr"] and resumed["method_report"] == whole["method_report"]
    assert sum(usage["color"]) == 10 * 16 * 2  # steps x batch x top_k
    if name == "fwd_prompt":
        meta = json.loads((tmp_path / "whole" / "checkpoints" / "stage_03_ocr" / "method.json").read_text())
        assert meta["old_rank"] >= 1 and meta["pre_rank"] >= 1
        from safetensors.torch import load_file

        a = load_file(str(tmp_path / "whole" / "checkpoints" / "stage_03_ocr" / "method.safetensors"))
        b = load_file(str(tmp_path / "killed" / "checkpoints" / "stage_03_ocr" / "method.safetensors"))
        assert torch.equal(a["old_basis"], b["old_basis"]) and torch.equal(a["pre_basis"], b["pre_basis"])
