"""LoRA experts: the shared mechanism (gates, freezing, routing per sample) and O-LoRA, MoE-LoRA."""

import json

import pytest
import torch
from safetensors.torch import load_file

from mcit.errors import ConfigError
from mcit.methods import TaskContext
from mcit.methods.experts import ExpertBank
from mcit.methods.olora import OLoRA, orthogonality_loss
from mcit.methods.routing import RoutingTally
from mcit.runner import run
from tests.conftest import kill_and_resume, make_tiny
from tests.test_methods import _method, _NoAccelerator


def _lora_model(tmp_path, r=2):
    from mcit.config import LoraConfig
    from mcit.models.tuning import apply_tuning

    torch.manual_seed(0)
    model, _, enc, samples = make_tiny(tmp_path)
    return apply_tuning(model, "lora", LoraConfig(r=r, alpha=2 * r, dropout=0.0)), enc, samples


def _randomise(bank, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in bank.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


def test_one_expert_gives_peft_lora_bit_for_bit(tmp_path):
    model, enc, samples = _lora_model(tmp_path)
    bank = ExpertBank(model, 3, seed=1)
    _randomise(bank, 2)
    model.eval()
    batch = enc.train_batch(samples)
    bank.use(1)
    ours = model(**batch).logits
    with torch.no_grad():  # the same factors as PEFT's own adapter, PEFT's own path
        for layer in bank.layers.values():
            layer.lora_A["default"].weight.copy_(layer.lora_A["e1"].weight)
            layer.lora_B["default"].weight.copy_(layer.lora_B["e1"].weight)
            layer.enable_adapters(True)
    bank.use([])
    assert torch.equal(model(**batch).logits, ours)
    bank.use([])
    for layer in bank.layers.values():
        layer.enable_adapters(False)
    base = model(**batch).logits
    assert not torch.equal(base, ours)  # the expert did act


def test_a_fixed_merge_sums_the_experts_updates(tmp_path):
    model, enc, samples = _lora_model(tmp_path)
    bank = ExpertBank(model, 3, seed=1)
    _randomise(bank, 3)
    name, layer = next(iter(bank.layers.items()))
    x = torch.randn(2, 5, layer.in_features)
    bank.use([0, 2], [0.5, 2.0])
    merged = 0.5 * bank.delta_weight(0, name) + 2.0 * bank.delta_weight(2, name)
    expected = layer.get_base_layer()(x) + x @ merged.T
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)


def test_per_sample_routing_in_a_batch_equals_each_sample_alone(tmp_path):
    model, enc, samples = _lora_model(tmp_path)
    bank = ExpertBank(model, 3, seed=1)
    _randomise(bank, 4)
    model.eval()
    gates = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.3, 0.7]])
    batch = enc.generation_batch([samples[0], samples[1], samples[0]])
    bank.route(gates)
    together = model(**batch).logits
    for i in range(3):
        bank.route(gates[i : i + 1])
        alone = model(**{k: v[i : i + 1] for k, v in batch.items()}).logits
        torch.testing.assert_close(together[i : i + 1], alone, rtol=1e-5, atol=1e-6)
    bank.route(gates[:2])
    with pytest.raises(Exception, match="2 gates for a batch of 3"):
        model(**batch)


def test_top1_router_is_each_tokens_argmax_expert(tmp_path):
    model, enc, samples = _lora_model(tmp_path)
    bank = ExpertBank(model, 3, router=True, seed=1)
    _randomise(bank, 5)
    name, layer = next(iter(bank.layers.items()))
    x = torch.randn(2, 4, layer.in_features)
    bank.router(top_k=1)
    out = layer(x)
    choice = (x @ layer.mcit_router.weight.T).argmax(-1)
    base = layer.get_base_layer()(x)
    for b in range(2):
        for t in range(4):
            want = base[b, t] + bank.delta_weight(int(choice[b, t]), name) @ x[b, t]
            torch.testing.assert_close(out[b, t], want, rtol=1e-5, atol=1e-6)
    assert len(set(choice.flatten().tolist())) > 1  # the tokens did go to different experts


def test_frozen_experts_get_no_gradient(tmp_path):
    model, enc, samples = _lora_model(tmp_path)
    bank = ExpertBank(model, 2, seed=1)
    _randomise(bank, 6)
    bank.use([0, 1])
    bank.freeze(0)
    model(**enc.train_batch(samples)).loss.backward()
    assert all(p.grad is not None for p in bank.expert_parameters(0))
    bank.drop_frozen_grads()
    assert all(p.grad is None for p in bank.expert_parameters(0))
    assert all(p.grad is not None for p in bank.expert_parameters(1))
    bank.train_only([0])  # replaces the frozen set: expert 0 trains again, expert 1 is frozen
    assert bank.frozen == {1}
    model.zero_grad()
    model(**enc.train_batch(samples)).loss.backward()
    bank.drop_frozen_grads()
    assert all(p.grad is not None for p in bank.expert_parameters(0))
    assert all(p.grad is None for p in bank.expert_parameters(1))


def test_the_bank_needs_lora(tmp_path):
    from mcit.models.tuning import apply_tuning

    model, _, enc, samples = make_tiny(tmp_path)
    with pytest.raises(ConfigError, match="model.tuning: lora"):
        ExpertBank(apply_tuning(model, "full"), 2)


def test_routing_tally_known_answer():
    tally = RoutingTally()
    tally.add(1, "a", 3, 4)
    tally.add(1, "a", 0, 1)
    tally.add(2, "b", 2, 2)
    tally.add(2, "c", 0, 0)
    assert tally.report() == {"1": {"a": 60.0}, "2": {"b": 100.0}}
    again = RoutingTally()
    again.load(json.loads(json.dumps(tally.cells)))
    assert again.report() == tally.report()


# --- O-LoRA -------------------------------------------------------------------------------------
def test_olora_loss_is_zero_for_orthogonal_factors_and_grows_with_overlap(tmp_path):
    model, enc, samples = _lora_model(tmp_path)
    bank = ExpertBank(model, 2, seed=1)
    layers = list(bank.layers.values())
    d = layers[0].in_features

    def set_rows(new_rows, old_rows):
        with torch.no_grad():
            for layer in layers:
                a_new, a_old = layer.lora_A["e1"].weight, layer.lora_A["e0"].weight
                a_new.zero_(), a_old.zero_()
                for i, (j, v) in enumerate(new_rows):
                    a_new[i, j] = v
                for i, (j, v) in enumerate(old_rows):
                    a_old[i, j] = v

    set_rows([(0, 1.0), (1, 1.0)], [(2, 1.0), (3, 1.0)])
    assert float(orthogonality_loss(bank, 1, [0])) == 0.0
    set_rows([(0, 1.0), (1, 1.0)], [(0, 2.0), (3, 1.0)])  # one shared direction: |1 x 2| per layer
    assert float(orthogonality_loss(bank, 1, [0])) == pytest.approx(2.0 * len(layers))
    set_rows([(0, 1.0), (1, 1.0)], [(0, 2.0), (1, -3.0)])
    assert float(orthogonality_loss(bank, 1, [0])) == pytest.approx(5.0 * len(layers))
    assert orthogonality_loss(bank, 0, []) is None
    assert d > 3


def _two_task_ctx(tmp_path, name, **options):
    """Method ``name`` set up on the tiny LoRA model for a two-task stream (a, b)."""
    model, enc, samples = _lora_model(tmp_path)
    ctx = TaskContext(model, _NoAccelerator(), None, ["a", "b"], {"a": samples, "b": samples}, seed=5)
    ctx.encoder = enc
    method = _method(name, **options)
    method.setup(model, ctx)
    return method, model, enc, samples, ctx


def test_olora_trains_the_current_expert_and_sums_the_finished_ones(tmp_path):
    method, model, enc, samples, ctx = _two_task_ctx(tmp_path, "olora", lambda_orth=1.0, lambda_l2=0.5)
    ctx.stage = 2
    method.before_task("b", samples, ctx)
    assert method.bank.frozen == {0}
    batch = enc.train_batch(samples)
    outputs = model(**batch)
    extra = method.extra_loss(batch, outputs, ctx)
    (outputs.loss + extra).backward()
    method.before_step(ctx)
    assert all(p.grad is None for p in method.bank.expert_parameters(0))
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in method.bank.expert_parameters(1))
    method.after_task("b", ctx)
    assert method.done == 2 and method.bank.frozen == {0, 1}
    assert method.bank._fixed.tolist() == [1.0, 1.0]


def test_olora_runs_the_smoke_stream_freezes_old_experts_and_resumes_exactly(smoke_cfg, tmp_path, monkeypatch):
    cfg = smoke_cfg("method.name=olora", "model.tuning=lora", "model.train_projector=true", "benchmark.general=[]",
                    "benchmark.tasks=[color,count]")  # two tasks: the stream's cost in the suite
    whole = run(cfg, tmp_path / "whole", show_progress=False)
    ck = tmp_path / "whole" / "checkpoints"
    stage1 = load_file(str(next(ck.glob("stage_01_*")) / "trainable.safetensors"))
    stage2 = load_file(str(next(ck.glob("stage_02_*")) / "trainable.safetensors"))
    e0 = [k for k in stage1 if ".e0." in k]
    e1 = [k for k in stage1 if ".e1." in k]
    assert e0 and all(torch.equal(stage1[k], stage2[k]) for k in e0)  # frozen after task 1, bit for bit
    assert any(not torch.equal(stage1[k], stage2[k]) for k in e1)  # task 2's expert trained
    assert whole["method_report"]["tasks_done"] == 2
    assert 0 <= whole["method_report"]["mean_abs_cos_between_tasks"] < 1
    resumed = kill_and_resume(cfg, tmp_path / "killed", OLoRA, 2, 3, monkeypatch)
    assert resumed["matrix"] == whole["matrix"]
    meta = json.loads((tmp_path / "killed" / "checkpoints" / "stage_02_count" / "method.json").read_text())
    assert meta == {"done": 2}


# --- MoE-LoRA -----------------------------------------------------------------------------------
def test_moelora_with_one_expert_is_plain_lora(tmp_path):
    # a router over one expert gives it weight exactly 1: the model is PEFT's LoRA with its factors
    model, enc, samples = _lora_model(tmp_path)
    ctx = TaskContext(model, _NoAccelerator(), None, ["a"], {"a": samples}, seed=5)
    method = _method("moelora", experts=1, rank=2)
    method.setup(model, ctx)
    _randomise(method.bank, 7)
    model.eval()
    batch = enc.train_batch(samples)
    ours = model(**batch).logits
    with torch.no_grad():
        for layer in method.bank.layers.values():
            layer.lora_A["default"].weight.copy_(layer.lora_A["e0"].weight)
            layer.lora_B["default"].weight.copy_(layer.lora_B["e0"].weight)
    method.bank.remove()
    for layer in method.bank.layers.values():
        layer.enable_adapters(True)
    assert torch.equal(model(**batch).logits, ours)


def test_moelora_runs_the_smoke_stream_and_records_gates(smoke_cfg, tmp_path):
    cfg = smoke_cfg("method.name=moelora", "model.tuning=lora", "model.train_projector=true", "benchmark.general=[]",
                    "benchmark.tasks=[color,count]",
                    "method.experts=3")
    results = run(cfg, tmp_path / "r", show_progress=False)
    gates = results["method_report"]["mean_gate"]
    assert set(gates) == {"0", "1", "2"}
    for cells in gates.values():
        for mean in cells.values():
            assert len(mean) == 3 and sum(mean) == pytest.approx(1.0, abs=1e-3)
    assert any(k.endswith("mcit_router.weight") for k in
               load_file(str(next((tmp_path / "r" / "checkpoints").glob("stage_01_*")) / "trainable.safetensors")))


def test_recorded_gates_are_summed_over_processes(tmp_path, monkeypatch):
    """Under several processes each answers its shard of a test set: the mean gate is over every
    process's tokens (all-reduced sums), and a process that recorded nothing still joins in."""
    import torch.distributed as dist

    model, enc, samples = _lora_model(tmp_path)
    bank = ExpertBank(model, 3, router=True, seed=1)
    _randomise(bank, 4)
    model.eval()
    bank.router()
    bank.record = True
    with torch.no_grad():
        model(**enc.train_batch(samples))
    mine, count = bank._gate_sum.clone(), bank._gate_count
    assert count > 0
    other = torch.tensor([3.0 * count, 0.0, 0.0, 3.0 * count], dtype=torch.float64)  # 3x the tokens, all to expert 0
    calls = []
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "all_reduce", lambda t: (calls.append(t.clone()), t.add_(other)))
    gates = bank.take_gates()
    expected = (mine + other[:3]) / (4 * count)
    assert gates == [round(float(v), 4) for v in expected] and gates[0] > 0.75
    assert len(calls) == 1 and calls[0][-1] == count
    assert bank.take_gates() == [1.0, 0.0, 0.0]  # nothing recorded here: the other process's tokens only
    monkeypatch.setattr(dist, "get_world_size", lambda: 1)
    assert bank.take_gates() is None and len(calls) == 2


# --- MR-LoRA ------------------------------------------------------------------------------------
def test_mrlora_with_a_perfect_router_equals_the_tasks_own_expert(tmp_path):
    from mcit.methods.mrlora import MRLoRA

    method, model, enc, samples, ctx = _two_task_ctx(tmp_path, "mrlora")
    _randomise(method.bank, 8)
    method.done = 2
    model.eval()
    batch = enc.generation_batch(samples)
    method.choose = lambda batch, model: torch.tensor([1, 0])  # a router that is always right
    ctx.stage = 2
    assert method.route(batch, ctx).tolist() == [[False, True], [True, False]]  # sample 0 -> b's expert
    routed = model(**batch).logits
    for i, e in enumerate([1, 0]):
        method.bank.use(e)
        alone = model(**{k: v[i : i + 1] for k, v in batch.items()}).logits
        torch.testing.assert_close(routed[i : i + 1], alone, rtol=1e-5, atol=1e-6)
    assert isinstance(method, MRLoRA)


def test_mrlora_trains_only_the_current_tasks_expert(tmp_path):
    method, model, enc, samples, ctx = _two_task_ctx(tmp_path, "mrlora")
    _randomise(method.bank, 8)
    for stage, expected in ((1, {1, 2}), (2, {0, 2})):  # experts 0, 1 are the tasks', 2 the router
        ctx.stage = stage
        method.before_task("ab"[stage - 1], samples, ctx)
        assert method.bank.frozen == expected
        model.zero_grad()
        model(**enc.train_batch(samples)).loss.backward()
        method.before_step(ctx)
        grads = [any(p.grad is not None and p.grad.abs().sum() > 0 for p in method.bank.expert_parameters(e))
                 for e in range(3)]
        assert grads == [e == stage - 1 for e in range(3)]


def test_mrlora_router_set_is_labelled_and_stable(tmp_path):
    model, enc, samples = _lora_model(tmp_path)
    data = {"a": samples * 10, "b": samples * 10}
    for t, rows in data.items():
        data[t] = [type(s)(f"{t}{i}", s.image, s.question, s.answer, s.references, t) for i, s in enumerate(rows)]

    class Cfg:
        seed = 3

    ctx = TaskContext(model, _NoAccelerator(), Cfg(), ["a", "b"], data, seed=5)
    ctx.encoder = enc
    method = _method("mrlora", router_samples=4)
    method.setup(model, ctx)
    method.done = 1
    first = method.router_set(ctx)
    method.done = 2
    both = method.router_set(ctx)
    assert [s.answer for s in both] == ["1"] * 4 + ["2"] * 4
    assert [s.id for s in both[:4]] == [s.id for s in first]  # task a's few-shot set does not change
    assert all(s.task == "b" for s in both[4:])


def test_mrlora_runs_the_smoke_stream_routes_and_resumes_exactly(smoke_cfg, tmp_path, monkeypatch):
    from mcit.methods.mrlora import MRLoRA

    cfg = smoke_cfg("method.name=mrlora", "model.tuning=lora", "model.train_projector=false", "benchmark.general=[]",
                    "benchmark.tasks=[color,count]",
                    "method.router_epochs=3")
    whole = run(cfg, tmp_path / "whole", show_progress=False)
    report = whole["method_report"]
    assert report["tasks_done"] == 2 and len(report["router_steps"]) == 2
    assert set(report["routing_accuracy"]) == {"1", "2"}
    assert set(report["routing_accuracy"]["2"]) == {"color", "count"}
    ck = tmp_path / "whole" / "checkpoints"
    s1 = load_file(str(next(ck.glob("stage_01_*")) / "trainable.safetensors"))
    s2 = load_file(str(next(ck.glob("stage_02_*")) / "trainable.safetensors"))
    assert all(torch.equal(s1[k], s2[k]) for k in s1 if ".e0." in k)  # task 1's expert: untouched after it
    assert any(not torch.equal(s1[k], s2[k]) for k in s1 if ".e1." in k)  # task 2's expert: trained in task 2
    assert any(not torch.equal(s1[k], s2[k]) for k in s1 if ".e2." in k)  # the router: retrained
    resumed = kill_and_resume(cfg, tmp_path / "killed", MRLoRA, 2, 3, monkeypatch)
    assert resumed["matrix"] == whole["matrix"]
    assert resumed["method_report"]["routing_accuracy"] == report["routing_accuracy"]


# --- CL-MoE -------------------------------------------------------------------------------------
def test_clmoe_momentum_update_known_answers():
    from mcit.methods.clmoe import momentum_update

    old, new = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 10.0])
    assert momentum_update(old, new, 0.7, exclusive=False).tolist() == pytest.approx([0.7, 3.0])
    assert momentum_update(old, new, 0.7, exclusive=True).tolist() == pytest.approx([0.3, 7.0])


def test_clmoe_after_a_task_moves_experts_by_their_role(tmp_path):
    model, enc, samples = _lora_model(tmp_path)
    ctx = TaskContext(model, _NoAccelerator(), None, ["a", "b"], {"a": samples, "b": samples}, seed=5)
    method = _method("clmoe", experts=3, rank=2, top_experts=1, momentum=0.7)
    method.setup(model, ctx)
    bank = method.bank
    method.expert_sets = [[0]]  # task a used expert 0
    method.before_task("b", samples, ctx)
    before = [p.detach().clone() for p in bank.expert_parameters(0) + bank.expert_parameters(1)]
    _randomise(bank, 9)  # "training" on task b
    trained = [p.detach().clone() for p in bank.expert_parameters(0) + bank.expert_parameters(1)]
    bank.usage = torch.tensor([1, 50, 2])  # task b used expert 1: expert 0 is task a's alone
    method.after_task("b", ctx)
    assert method.expert_sets == [[0], [1]]
    after = bank.expert_parameters(0) + bank.expert_parameters(1)
    half = len(bank.expert_parameters(0))
    for i, (p, old, new) in enumerate(zip(after, before, trained, strict=True)):
        m = 0.3 if i < half else 0.7  # exclusive to the old task: 0.3 of the old; shared: 0.7
        torch.testing.assert_close(p.detach(), m * old + (1 - m) * new)


def test_clmoe_runs_the_smoke_stream_and_resumes_exactly(smoke_cfg, tmp_path, monkeypatch):
    from mcit.methods.clmoe import CLMoE

    cfg = smoke_cfg("method.name=clmoe", "model.tuning=lora", "benchmark.general=[]", "method.experts=3",
                    "benchmark.tasks=[color,count]",
                    "method.top_experts=1")
    whole = run(cfg, tmp_path / "whole", show_progress=False)
    sets = whole["method_report"]["expert_sets"]
    assert len(sets) == 2 and all(len(s) == 1 and 0 <= s[0] < 3 for s in sets)
    resumed = kill_and_resume(cfg, tmp_path / "killed", CLMoE, 2, 3, monkeypatch)
    assert resumed["matrix"] == whole["matrix"]
    assert resumed["method_report"]["expert_sets"] == sets


# --- HiDe-LLaVA and DISCO -----------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["mean", "sum", "sum_product"])
def test_merged_layers_known_answers(tmp_path, kind):
    model, enc, samples = _lora_model(tmp_path)
    bank = ExpertBank(model, 3, seed=1)
    _randomise(bank, 10)
    name, layer = next(iter(bank.layers.items()))
    other = list(bank.layers)[1]
    bank.route(torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 1.0]]))  # the gate elsewhere: expert 2 only
    bank.merge_layers([name], [0, 1], kind)
    x = torch.randn(2, 3, layer.in_features)
    d0, d1 = bank.delta_weight(0, name), bank.delta_weight(1, name)
    if kind == "sum_product":  # HiDe's code: scaling (B0 + B1)(A0 + A1), cross terms included
        (a0, b0, s), (a1, b1, _) = bank.factors(0)[name], bank.factors(1)[name]
        delta = s * (b0 + b1).detach() @ (a0 + a1).detach()
        assert not torch.allclose(delta, d0 + d1)  # not the sum of the updates
    else:
        delta = (d0 + d1) / 2 if kind == "mean" else d0 + d1
    torch.testing.assert_close(layer(x), layer.get_base_layer()(x) + x @ delta.T, rtol=1e-5, atol=1e-6)
    o = bank.layers[other]  # a layer not merged follows the gate
    x2 = torch.randn(2, 3, o.in_features)
    torch.testing.assert_close(o(x2), o.get_base_layer()(x2) + x2 @ bank.delta_weight(2, other).T, rtol=1e-5, atol=1e-6)


def test_hide_top_layer_is_the_last_decoder_layer(tmp_path):
    from mcit.config import LoraConfig
    from mcit.methods.hide import top_layer_names
    from mcit.models.tuning import apply_tuning

    model, _, enc, samples = make_tiny(tmp_path, text_layers=3)
    model = apply_tuning(model, "lora", LoraConfig(r=2, alpha=4, dropout=0.0))
    bank = ExpertBank(model, 2, seed=1)
    top = top_layer_names(bank, 1)
    assert top and all(".layers.2." in n for n in top)
    assert len(top) == len([n for n in bank.layers if ".layers.2." in n])
    assert set(top_layer_names(bank, 2)) == {n for n in bank.layers if ".layers.1." in n or ".layers.2." in n}


def test_anchor_similarities_and_weights(tmp_path):
    model, enc, samples = _lora_model(tmp_path)
    ctx = TaskContext(model, _NoAccelerator(), None, ["a", "b", "c"], {t: samples for t in "abc"}, seed=5)
    ctx.encoder = enc
    method = _method("hide", modalities="text", temperature=0.1)
    method.setup(model, ctx)
    q = method.text.cached([s.question for s in samples])
    method.text_anchor = torch.stack([q[1], q[0], q[0]])  # task a ~ sample 1, task b ~ sample 0
    method.image_anchor = torch.zeros(3, 16)
    method.done = 2
    batch = enc.generation_batch(samples)
    s = method.similarities(batch, samples)
    assert s[0, 1] == pytest.approx(1.0, abs=1e-5) and s[1, 0] == pytest.approx(1.0, abs=1e-5)
    assert s[:, 2].tolist() == [0.0, 0.0]  # task c is not trained: 0, as the reference's empty anchors
    ctx.batch_samples, ctx.stage = samples, 2
    routed = method.route(batch, ctx)
    w = method.bank._per_sample
    torch.testing.assert_close(w, torch.softmax(s / 0.1, dim=-1))
    assert routed.tolist() == [[False, True, False], [True, False, False]]  # sample 0 -> b, sample 1 -> a


@pytest.mark.parametrize("name", ["hide", "disco"])
def test_anchor_methods_run_the_smoke_stream_and_resume_exactly(smoke_cfg, tmp_path, monkeypatch, name):
    from mcit.methods import get_method

    # two decoder layers: HiDe's lower layer holds the merge (rebuilt on resume), the top one routes
    cfg = smoke_cfg(f"method.name={name}", "model.tuning=lora", "benchmark.general=[]", "benchmark.tasks=[color,count]",
                    "model.tiny.text_layers=2")
    whole = run(cfg, tmp_path / "whole", show_progress=False)
    report = whole["method_report"]
    assert report["tasks_done"] == 2 and set(report["routing_accuracy"]["2"]) == {"color", "count"}
    ck = tmp_path / "whole" / "checkpoints"
    s1 = load_file(str(next(ck.glob("stage_01_*")) / "trainable.safetensors"))
    s2 = load_file(str(next(ck.glob("stage_02_*")) / "trainable.safetensors"))
    assert all(torch.equal(s1[k], s2[k]) for k in s1 if ".e0." in k)  # task 1's expert: untouched after it
    assert any(not torch.equal(s1[k], s2[k]) for k in s1 if ".e1." in k)  # task 2's expert: trained in task 2
    resumed = kill_and_resume(cfg, tmp_path / "killed", get_method(name), 2, 3, monkeypatch)
    assert resumed["matrix"] == whole["matrix"]
    assert resumed["method_report"] == report


# --- SMoLoRA ------------------------------------------------------------------------------------
def _smolora(tmp_path, **options):
    model, enc, samples = _lora_model(tmp_path)
    ctx = TaskContext(model, _NoAccelerator(), None, ["a"], {"a": samples}, seed=5)
    method = _method("smolora", **options)
    method.setup(model, ctx)
    _randomise(method.bank, 11)
    return method, model, enc, samples, ctx


def test_smolora_layer_output_known_answer(tmp_path):
    method, model, enc, samples, ctx = _smolora(tmp_path, experts=4, rank=2)
    method.before_task("a", samples, ctx)
    name, layer = next(iter(method.bank.layers.items()))
    layer.eval()
    x = torch.randn(3, 5, layer.in_features)
    out = layer(x)
    base = layer.get_base_layer()(x)
    for b in range(3):
        vu = int(layer.mcit_vu_gate(x[b].mean(0)).argmax())
        ins = 2 + int(layer.mcit_if_gate(method.instruction[0]).argmax())
        h_vu = x[b] @ method.bank.delta_weight(vu, name).T
        h_if = x[b] @ method.bank.delta_weight(ins, name).T
        w = torch.softmax(torch.cat([layer.mcit_fc_vu(h_vu), layer.mcit_fc_if(h_if)], -1), -1)
        torch.testing.assert_close(out[b], base[b] + w[:, :1] * h_vu + w[:, 1:] * h_if, rtol=1e-5, atol=1e-6)


def test_smolora_routers_stay_fixed_and_the_fc_maps_train(tmp_path):
    method, model, enc, samples, ctx = _smolora(tmp_path, experts=4, rank=2)
    method.before_task("a", samples, ctx)
    model.train()
    model(**enc.train_batch(samples)).loss.backward()
    layer = next(iter(method.bank.layers.values()))
    assert layer.mcit_vu_gate.weight.grad is None and not layer.mcit_vu_gate.weight.requires_grad
    assert layer.mcit_fc_vu.weight.grad is not None and layer.mcit_fc_vu.weight.grad.abs().sum() > 0


def test_smolora_runs_the_smoke_stream_and_resumes_exactly(smoke_cfg, tmp_path, monkeypatch):
    from mcit.methods.smolora import SMoLoRA

    cfg = smoke_cfg("method.name=smolora", "model.tuning=lora", "benchmark.general=[]", "method.experts=4",
                    "benchmark.tasks=[color,count]")
    whole = run(cfg, tmp_path / "whole", show_progress=False)
    resumed = kill_and_resume(cfg, tmp_path / "killed", SMoLoRA, 2, 3, monkeypatch)
    assert resumed["matrix"] == whole["matrix"]
    trained = load_file(str(next((tmp_path / "whole" / "checkpoints").glob("stage_01_*")) / "trainable.safetensors"))
    assert any(k.endswith("mcit_fc_vu.weight") for k in trained)  # the fc maps train and are checkpointed
    assert not any("mcit_vu_gate" in k or "mcit_if_gate" in k for k in trained)  # the routers are fixed
    assert any(".lora_B.e" in k and v.abs().sum() > 0 for k, v in trained.items())  # experts trained


def test_mrlora_label_tokens_are_the_trained_answer_tokens():
    from mcit.methods.mrlora import label_tokens

    class Piece:  # SentencePiece-like: " 1" -> [▁, 1]; the encoder trains on " " + answer
        vocab = {"▁": 5, "1": 11, "2": 12, "▁1": 21}

        def __call__(self, text, add_special_tokens=False):
            ids = [self.vocab["▁"]] if text.startswith(" ") else []
            return {"input_ids": ids + [self.vocab[c] for c in text.strip()]}

    common, nexts = label_tokens(Piece(), ["1", "2"])
    assert common == [5] and nexts.tolist() == [11, 12]  # the shared ▁ is fed, then 1 vs 2 is read

    class Bpe:  # byte-level BPE: " 1" is one token, different from "1"
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [{" 1": 101, " 2": 102, "1": 1, "2": 2}[text]]}

    common, nexts = label_tokens(Bpe(), ["1", "2"])
    assert common == [] and nexts.tolist() == [101, 102]

    class Same:
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [7]}

    with pytest.raises(ConfigError, match="does not tell the task labels"):
        label_tokens(Same(), ["1", "2"])


def test_smolora_batched_generation_routes_as_each_sample_alone(tmp_path):
    method, model, enc, samples, ctx = _smolora(tmp_path, experts=4, rank=2)
    method.before_task("a", samples, ctx)
    model.eval()
    ctx.oracle_task, ctx.stage = "a", 1  # instruction: task is task-aware at test time, as the reference
    assert method.task_id_at_test
    batch = enc.generation_batch(samples)
    assert (batch["attention_mask"] == 0).any()  # left padding in the batch
    ctx.batch_samples = samples
    method.route(batch, ctx)
    together = model(**batch).logits[:, -1]
    for i in range(2):
        one = enc.generation_batch([samples[i]])
        ctx.batch_samples = [samples[i]]
        method.route(one, ctx)
        torch.testing.assert_close(together[i], model(**one).logits[0, -1], rtol=1e-4, atol=1e-5)


def test_smolora_prefill_pools_only_the_samples_own_tokens(tmp_path):
    method, model, enc, samples, ctx = _smolora(tmp_path, experts=4, rank=2)
    method.before_task("a", samples, ctx)
    layer = next(iter(method.bank.layers.values()))
    layer.eval()
    x = torch.randn(1, 5, layer.in_features)
    method.eval_mask = torch.ones(1, 5, dtype=torch.long)
    alone = layer(x)
    chosen = int(layer.mcit_vu_gate(x[0].mean(0)).argmax())
    pull = layer.mcit_vu_gate.weight[1 - chosen] - layer.mcit_vu_gate.weight[chosen]  # toward the other VU expert
    pad = (100.0 * pull).detach().expand(1, 3, -1)  # left padding that would flip an unmasked mean
    padded = torch.cat([pad, x], 1)
    method.eval_mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1]])
    torch.testing.assert_close(layer(padded)[:, 3:], alone, rtol=1e-5, atol=1e-6)
    method.eval_mask = None  # unmasked, the padding does flip it: the test can tell
    assert not torch.allclose(layer(padded)[:, 3:], alone, atol=1e-6)
