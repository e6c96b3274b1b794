"""SAME: the spectrum, the two gradient edits, the product of mixtures, masks, routing, resume."""

import pytest
import torch

from mcit.methods import TaskContext
from mcit.methods.same import (
    SAME,
    curvature_preconditioner,
    leading,
    minmax,
    range_finder,
    router_projection,
)
from mcit.runner import run
from tests.conftest import kill_and_resume
from tests.test_experts import _lora_model, _randomise
from tests.test_methods import _method, _NoAccelerator


def test_range_finder_recovers_a_known_spectrum():
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(4000, 2, generator=gen)
    x = torch.zeros(4000, 6)
    x[:, 0], x[:, 3] = 3.0 * z[:, 0], 1.0 * z[:, 1]  # std 3 along e0, 1 along e3, nothing else
    u, s = range_finder(x + 5.0, 4, torch.Generator().manual_seed(1))  # the mean is removed
    assert s[:2].tolist() == pytest.approx([3.0, 1.0], rel=0.05) and s[2:].abs().max() < 1e-4
    assert abs(float(u[0, 0])) == pytest.approx(1.0, abs=1e-4) and abs(float(u[3, 1])) == pytest.approx(1.0, abs=1e-4)


def test_leading_components_by_energy():
    assert leading(torch.tensor([3.0, 1.0, 0.0]), 0.9) == 2  # 9 / 10 reaches 0.9: the next one too
    assert leading(torch.tensor([3.0, 1.0, 0.0]), 0.5) == 1
    assert leading(torch.tensor([1.0, 1.0, 1.0, 1.0]), 0.9) == 4


def test_router_projection_damps_only_inside_the_subspace():
    u = torch.eye(4)
    s = torch.tensor([2.0, 1.0, 0.0, 0.0])  # V = e0, e1 (energy 0.8 < 0.9 after e0 -> both)
    g = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    out = router_projection(g, u, s, 0.9, 1)
    # c = clip(min(s)/s) = clip([0.5, 1]) = [0.8, 1]: e0's part x 0.8, e1's kept, outside kept
    assert out[0].tolist() == pytest.approx([0.8, 1.0, 1.0, 1.0])


def test_curvature_preconditioner_scales_inside_and_outside():
    u, s = torch.eye(3), torch.tensor([3.0, 0.0, 0.0])
    p = curvature_preconditioner(u, s, 0.9, 0.9)
    assert (torch.tensor([1.0, 0.0, 0.0]) @ p).tolist() == pytest.approx([1 / 3.9, 0, 0])
    assert (torch.tensor([0.0, 2.0, 0.0]) @ p).tolist() == pytest.approx([0, 2 / 0.9, 0])


def test_minmax_of_a_constant_is_zero():
    assert minmax(torch.tensor([2.0, 2.0])).tolist() == [0.0, 0.0]
    assert minmax(torch.tensor([1.0, 3.0, 2.0])).tolist() == [0.0, 1.0, 0.5]


def _same(tmp_path, **options):
    model, enc, samples = _lora_model(tmp_path)
    ctx = TaskContext(model, _NoAccelerator(), None, ["a", "b"], {"a": samples, "b": samples}, seed=5)
    method = _method("same", **options)
    method.setup(model, ctx)
    _randomise(method.bank, 12)
    return method, model, enc, samples, ctx


def test_same_experts_only_in_the_ffn_and_the_product_of_mixtures(tmp_path):
    method, model, enc, samples, ctx = _same(tmp_path)
    assert method.bank.layers and all(n.rsplit(".", 1)[-1] in ("gate_proj", "up_proj", "down_proj")
                                      for n in method.bank.layers)
    name, layer = next(iter(method.bank.layers.items()))
    x = torch.randn(2, 3, layer.in_features)
    g = torch.tensor([0.25, 0.75])
    (a0, b0, sc), (a1, b1, _) = method.bank.factors(0)[name], method.bank.factors(1)[name]
    want = sc * (x @ (0.25 * a0 + 0.75 * a1).T) @ (0.25 * b0 + 0.75 * b1).T
    torch.testing.assert_close(method._mix(layer, x, g), want.detach(), rtol=1e-5, atol=1e-6)


def test_same_inference_routing_in_a_padded_batch_equals_each_sample_alone(tmp_path):
    method, model, enc, samples, ctx = _same(tmp_path)
    method.started = True
    model.eval()
    batch = enc.generation_batch(samples)
    assert (batch["attention_mask"] == 0).any()  # left padding in the batch
    method.route(batch, ctx)
    together = model(**batch).logits[:, -1]
    for i in range(2):
        one = enc.generation_batch([samples[i]])
        method.route(one, ctx)
        torch.testing.assert_close(together[i], model(**one).logits[0, -1], rtol=1e-4, atol=1e-5)


def test_same_masks_low_scoring_experts_but_never_the_current_one(tmp_path):
    method, model, enc, samples, ctx = _same(tmp_path, tau=0.1)
    st = next(iter(method.state.values()))
    x = torch.zeros(1, 1, next(iter(method.bank.layers.values())).in_features)
    method.current = 0
    st.util, st.importance = torch.tensor([0.9, 0.1]), torch.tensor([0.0, 0.0])
    method._observe(st, x, torch.tensor([[[0.9, 0.1]]]))
    assert st.mask.tolist() == [1.0, 0.0] and st.locked  # expert 1 scores 0 < tau
    st.mask, st.locked = torch.ones(2), False
    method.current = 1  # now the low scorer is the current task's expert: never masked
    st.util, st.importance = torch.tensor([0.9, 0.1]), torch.tensor([0.0, 0.0])
    method._observe(st, x, torch.tensor([[[0.9, 0.1]]]))
    assert st.mask.tolist() == [1.0, 1.0] and not st.locked


def test_same_masked_experts_get_no_step(tmp_path):
    method, model, enc, samples, ctx = _same(tmp_path)
    ctx.stage = 1
    method.before_task("a", samples, ctx)
    for st in method.state.values():
        st.mask, st.locked = torch.tensor([1.0, 0.0]), True
    model.train()
    model(**enc.train_batch(samples)).loss.backward()
    method.before_step(ctx)
    layer = next(iter(method.bank.layers.values()))
    assert layer.lora_A["e1"].weight.grad is None and layer.lora_B["e1"].weight.grad is None
    assert layer.lora_B["e0"].weight.grad is not None


def test_low_rank_precondition_equals_the_full_matrix():
    from mcit.methods.same import precondition

    gen = torch.Generator().manual_seed(2)
    u, _ = torch.linalg.qr(torch.randn(6, 4, generator=gen))
    s = torch.tensor([3.0, 2.0, 0.5, 0.1])
    g = torch.randn(3, 6, generator=gen)
    torch.testing.assert_close(precondition(g, u, s, 0.9, 0.9), g @ curvature_preconditioner(u, s, 0.9, 0.9))


def test_same_runs_the_smoke_stream_and_resumes_exactly(smoke_cfg, tmp_path, monkeypatch):
    cfg = smoke_cfg("method.name=same", "model.tuning=lora", "model.train_projector=false", "benchmark.general=[]",
                    "benchmark.tasks=[color,count]",
                    "method.refresh=3", "method.start_step=2")
    whole = run(cfg, tmp_path / "whole", show_progress=False)
    assert whole["method_report"]["experts"] == 2
    resumed = kill_and_resume(cfg, tmp_path / "killed", SAME, 2, 4, monkeypatch)
    assert resumed["matrix"] == whole["matrix"]


def test_same_observes_once_per_forward_under_activation_checkpointing(tmp_path):
    """Checkpointing re-runs each layer in backward; SAME's statistics (the spectrum's random draw,
    the EMAs, the freeze mask) are taken in the forward only, and the re-run's gate is the forward's,
    so the gradients equal those without checkpointing."""
    grads = {}
    for checkpointing in (False, True):
        (tmp_path / str(checkpointing)).mkdir()
        method, model, enc, samples, ctx = _same(tmp_path / str(checkpointing), tau=0.3)
        ctx.stage = 1
        method.before_task("a", samples, ctx)
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        for _ in range(2):
            model.zero_grad()
            model(**enc.train_batch(samples)).loss.backward()
        assert all(st.count == 2 for st in method.state.values())  # two forwards: two observations per layer
        grads[checkpointing] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        if checkpointing:
            assert any(layer.training for layer in method.bank.layers.values())
    assert grads[True].keys() == grads[False].keys() and grads[True]
    for n in grads[True]:
        torch.testing.assert_close(grads[True][n], grads[False][n], rtol=1e-5, atol=1e-7)
