"""RegLoRA: key elements, the merge and fresh adapter, the penalty's reach, resume."""

import json

import pytest
import torch

from mcit.errors import ConfigError
from mcit.methods import TaskContext
from mcit.methods.reglora import RegLoRA, key_positions, lora_layers
from mcit.runner import run
from tests.conftest import kill_and_resume, make_tiny
from tests.test_methods import _method, _NoAccelerator


def test_key_positions_are_the_largest_entries_by_magnitude():
    delta = torch.tensor([[0.1, -5.0, 0.0], [3.0, 0.2, -0.3]])
    assert key_positions(delta, 2 / 6).tolist() == [1, 3]  # -5 and 3, in index order
    assert key_positions(delta, 0.01).tolist() == [1]  # at least one


def _lora_ctx(tmp_path):
    from mcit.config import LoraConfig
    from mcit.models.tuning import apply_tuning

    torch.manual_seed(0)
    model, _, enc, samples = make_tiny(tmp_path)
    model = apply_tuning(model, "lora", LoraConfig(r=2, alpha=4, dropout=0.0))
    ctx = TaskContext(model, _NoAccelerator(), None, ["a", "b"], {"a": samples, "b": samples}, seed=5)
    ctx.encoder = enc
    method = _method("reglora", ratio=0.25)
    method.setup(model, ctx)
    return method, model, enc, samples, ctx


def _randomise_lora(model, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            for p in (layer.lora_A["default"].weight, layer.lora_B["default"].weight):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


def test_after_a_task_the_update_is_merged_and_a_fresh_adapter_starts(tmp_path):
    method, model, enc, samples, ctx = _lora_ctx(tmp_path)
    _randomise_lora(model, 1)
    model.eval()
    batch = enc.train_batch(samples)
    before = model(**batch).logits
    name, layer = next(iter(lora_layers(model).items()))
    A, B = layer.lora_A["default"].weight.detach().clone(), layer.lora_B["default"].weight.detach().clone()
    w0 = layer.get_base_layer().weight.detach().clone()
    method.after_task("a", ctx)
    torch.testing.assert_close(layer.get_base_layer().weight, w0 + (B @ A) * layer.scaling["default"])
    assert torch.count_nonzero(layer.lora_B["default"].weight) == 0  # fresh: B = 0
    assert not torch.equal(layer.lora_A["default"].weight, A)  # A re-initialised
    torch.testing.assert_close(model(**batch).logits, before, rtol=1e-5, atol=1e-5)  # same function
    assert method.keys[name].numel() == int(0.25 * w0.numel())
    assert method.penalty(model) is None or float(method.penalty(model)) == 0.0


def test_the_penalty_reaches_only_the_key_positions(tmp_path):
    method, model, enc, samples, ctx = _lora_ctx(tmp_path)
    _randomise_lora(model, 2)
    method.after_task("a", ctx)
    layers = lora_layers(model)
    name, layer = next(iter(layers.items()))
    out_dim, in_dim = layer.get_base_layer().weight.shape
    keys = set(method.keys[name].tolist())
    free = next(i for i in range(out_dim * in_dim) if i not in keys)
    key = sorted(keys)[0]

    def set_update(flat_index, value):
        # B·A = value at one entry: A = e_col (row 0 of A), B = value·e_row (column 0 of B)
        with torch.no_grad():
            for other in layers.values():
                other.lora_A["default"].weight.zero_()
                other.lora_B["default"].weight.zero_()
            row, col = divmod(flat_index, in_dim)
            layer.lora_A["default"].weight[0, col] = 1.0
            layer.lora_B["default"].weight[row, 0] = value

    set_update(free, 0.7)
    assert float(method.penalty(model)) == 0.0  # an unselected element is free
    set_update(key, 0.7)
    expected = 2500.0 * 0.7 / len(method.keys[name]) / len(layers)
    assert float(method.penalty(model)) == pytest.approx(expected, rel=1e-6)
    method.penalty(model).backward()  # and its gradient pulls that entry back toward zero
    assert layer.lora_B["default"].weight.grad[key // in_dim, 0] > 0


def test_reglora_refuses_a_model_without_lora(tmp_path):
    from mcit.models.tuning import apply_tuning

    model, _, enc, samples = make_tiny(tmp_path)
    model = apply_tuning(model, "full")
    ctx = TaskContext(model, _NoAccelerator(), None, ["a"], {"a": samples}, seed=0)
    with pytest.raises(ConfigError, match="model.tuning: lora"):
        _method("reglora").setup(model, ctx)


def test_reglora_runs_the_smoke_stream_and_resumes_exactly(smoke_cfg, tmp_path, monkeypatch):
    cfg = smoke_cfg("method.name=reglora", "model.tuning=lora", "model.train_projector=true", "benchmark.general=[]")
    whole = run(cfg, tmp_path / "whole", show_progress=False)
    assert whole["method_report"]["tasks_merged"] == 3
    seqft = run(smoke_cfg("model.tuning=lora", "model.train_projector=true", "benchmark.general=[]"),
                tmp_path / "seqft", show_progress=False)
    assert whole["matrix"][1] == seqft["matrix"][1]  # task 1 has nothing to protect: as seqft
    resumed = kill_and_resume(cfg, tmp_path / "killed", RegLoRA, 3, 4, monkeypatch)
    assert resumed["matrix"] == whole["matrix"]
    meta = json.loads((tmp_path / "killed" / "checkpoints" / "stage_03_ocr" / "method.json").read_text())
    assert meta["tasks_merged"] == 3


def test_loading_the_state_reapplies_every_merge_bit_for_bit(tmp_path):
    for sub in "abc":
        (tmp_path / sub).mkdir()
    method, model, enc, samples, ctx = _lora_ctx(tmp_path / "a")
    for task, seed in (("a", 3), ("b", 4)):
        _randomise_lora(model, seed)
        method.after_task(task, ctx)
    tensors, meta = method.state_dict()
    fresh, other, *_ = _lora_ctx(tmp_path / "b")  # the start again, as a resumed run builds it
    fresh.load_state_dict({k: v.clone() for k, v in tensors.items()}, json.loads(json.dumps(meta)))
    ours, theirs = lora_layers(model), lora_layers(other)
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert torch.equal(ours[name].get_base_layer().weight, theirs[name].get_base_layer().weight), name
        assert torch.equal(method.keys[name], fresh.keys[name].to(method.keys[name].device))
    w0 = next(iter(lora_layers(_lora_ctx(tmp_path / "c")[1]).values())).get_base_layer().weight
    assert not torch.equal(next(iter(theirs.values())).get_base_layer().weight, w0)  # the merges did happen
