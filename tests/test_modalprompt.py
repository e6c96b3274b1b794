"""ModalPrompt: the task's own prompt in training, prototype selection at inference, resume."""

import torch

from mcit.methods import TaskContext
from mcit.methods.modalprompt import ModalPrompt
from mcit.runner import run
from tests.conftest import kill_and_resume, make_tiny
from tests.test_methods import _method, _NoAccelerator


def _modal(tmp_path):
    from mcit.models.tuning import apply_tuning

    torch.manual_seed(0)
    model, _, enc, samples = make_tiny(tmp_path)
    model = apply_tuning(model, "projector")
    ctx = TaskContext(model, _NoAccelerator(), None, ["a", "b", "c"], {t: samples for t in "abc"}, seed=3)
    ctx.encoder = enc
    method = _method("modalprompt", length=2)
    method.setup(model, ctx)
    return method, model, enc, samples, ctx


def test_training_uses_the_tasks_prompt_and_pulls_its_prototypes(tmp_path):
    method, model, enc, samples, ctx = _modal(tmp_path)
    assert method.options.pool_size == 3 and method.n_prefix == 2
    ctx.stage = 2
    method.before_task("b", samples, ctx)
    model.train()
    batch = enc.train_batch(samples)
    out = model(**batch)
    assert method.last_selection.tolist() == [[1], [1]]
    loss = out.loss + method.extra_loss(batch, out, ctx)
    loss.backward()
    grads = method.pool.prompts.grad
    assert grads[1].abs().sum() > 0 and grads[0].abs().sum() == 0 and grads[2].abs().sum() == 0
    assert all(p.grad is None for p in method.heads[0].parameters())
    assert all(p.grad is not None for p in method.heads[1].parameters())
    assert all(not p.requires_grad for n, p in model.named_parameters() if "mcit_" not in n)  # the model frozen


def test_inference_takes_the_nearest_finished_tasks_prompt(tmp_path):
    method, model, enc, samples, ctx = _modal(tmp_path)
    method.done = 2
    image_q = torch.randn(2, method.pool.image_keys.shape[-1])
    text_q = torch.randn(2, method.pool.text_keys.shape[-1])
    image_p, text_p = method.prototypes([0, 1])
    with torch.no_grad():
        q_img = torch.stack([image_p[1], image_p[0]])  # sample 0 looks like task b, sample 1 like task a
        q_txt = torch.stack([text_p[1], text_p[0]])
        assert method.select(q_img, q_txt).tolist() == [[1], [0]]
        method.done = 0
        assert method.select(image_q, text_q).tolist() == [[0], [0]]  # zero-shot row: the first prompt


def test_modalprompt_runs_the_smoke_stream_and_resumes_exactly(smoke_cfg, tmp_path, monkeypatch):
    cfg = smoke_cfg("method.name=modalprompt", "model.tuning=projector", "method.length=2", "benchmark.general=[]",
                    "benchmark.tasks=[color,count]")
    whole = run(cfg, tmp_path / "whole", show_progress=False)
    report = whole["method_report"]
    assert report["entries_of_task"] == {"color": [0], "count": [1]}
    assert set(report["routing_accuracy"]["2"]) == {"color", "count"}
    resumed = kill_and_resume(cfg, tmp_path / "killed", ModalPrompt, 2, 3, monkeypatch)
    assert resumed["matrix"] == whole["matrix"]


def test_with_one_task_it_is_a_plain_prompt_of_that_task(tmp_path):
    """One finished task: every sample takes its prompt, and the model's output equals the plain
    prompt pool's with one entry holding the same prompt (the same placeholders, nothing else)."""
    from mcit.models.tuning import apply_tuning

    outputs = []
    for name in ("modalprompt", "prompt_pool"):
        (tmp_path / name).mkdir()
        torch.manual_seed(0)
        model, _, enc, samples = make_tiny(tmp_path / name)
        model = apply_tuning(model, "projector")
        ctx = TaskContext(model, _NoAccelerator(), None, ["a"], {"a": samples}, seed=3)
        ctx.encoder = enc
        method = _method(name, length=2, pool_size=1, top_k=1)
        method.setup(model, ctx)
        if name == "modalprompt":
            method.done = 1
            prompt = torch.randn(method.pool.prompts.shape, generator=torch.Generator().manual_seed(5))
        with torch.no_grad():
            method.pool.prompts.copy_(prompt)
        model.eval()
        with torch.no_grad():
            outputs.append(model(**enc.train_batch(samples)).logits)
        assert method.last_selection.tolist() == [[0]] * len(samples)
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=0)
    assert outputs[0].abs().sum() > 0
