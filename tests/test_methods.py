"""The classic baselines: replay, EWC / online EWC, MAS, LwF, and the overhead benchmark."""

import json

import pytest
import torch

from mcit.methods import TaskContext, get_method
from mcit.runner import run
from tests.conftest import kill_and_resume, make_tiny


class _NoAccelerator:
    device = torch.device("cpu")

    @staticmethod
    def unwrap_model(model):
        return model


def _method(name, **options):
    cls = get_method(name)
    return cls(cls.Options.model_validate(options))


def _tiny_ctx(tmp_path, train=None, text_layers=1):
    from mcit.models.tuning import apply_tuning

    torch.manual_seed(0)
    model, processor, enc, samples = make_tiny(tmp_path, text_layers)
    model = apply_tuning(model, "full")
    ctx = TaskContext(model, _NoAccelerator(), None, ["a"], train or {"a": samples}, seed=7)
    ctx.encoder = enc
    return model, processor, enc, samples, ctx


# --- importance -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["ewc", "mas"])
def test_importance_is_zero_without_effect_and_positive_with(tmp_path, name):
    model, processor, enc, samples, ctx = _tiny_ctx(tmp_path)
    model.register_parameter("unused_extra", torch.nn.Parameter(torch.ones(3)))  # never in the graph
    importance = _method(name).estimate(samples, ctx)
    assert set(importance) == set(ctx.trainable_parameters())
    assert torch.count_nonzero(importance["unused_extra"]) == 0
    proj = [n for n in importance if "multi_modal_projector" in n and n.endswith("weight")]
    assert proj and all(importance[n].sum() > 0 for n in proj)
    # Embedding rows: zero for tokens absent from the inputs; positive for the prompt's words. (Padding
    # sits after the last token, the final end-of-sequence predicts nothing, image tokens are replaced.)
    emb = next(n for n in importance if n.endswith("embed_tokens.weight"))
    ids = enc.train_batch(samples)["input_ids"]
    row_has = set((importance[emb].abs().sum(-1) > 0).nonzero().flatten().tolist())
    assert row_has <= set(ids.flatten().tolist())
    tok = processor.tokenizer
    assert {tok.convert_tokens_to_ids(w) for w in ("what", "color", "circle")} <= row_has


def test_ewc_importance_is_the_mean_squared_per_sample_gradient(tmp_path):
    model, processor, enc, samples, ctx = _tiny_ctx(tmp_path)
    importance = _method("ewc").estimate(samples, ctx)
    name = next(n for n in importance if "multi_modal_projector" in n)
    param = dict(model.named_parameters())[name]
    expected = torch.zeros_like(param)
    for s in samples:
        model.zero_grad()
        model(**enc.train_batch([s])).loss.backward()
        expected += param.grad.pow(2) / len(samples)
    torch.testing.assert_close(importance[name], expected)


class _TwoRanks:
    """One of two processes: ``reduce`` hands back this rank's tensor plus, when ``peer`` (the other
    rank, run first) is given, the peer's tensor of the same call: an all-reduce, in two runs."""

    device = torch.device("cpu")
    num_processes = 2

    def __init__(self, rank, peer=None):
        self.process_index, self.peer, self.sent, self.ops = rank, peer, [], []

    @staticmethod
    def unwrap_model(model):
        return model

    def reduce(self, tensor, op):
        self.ops.append(op)
        self.sent.append(tensor.clone())
        return tensor if self.peer is None else tensor + self.peer.sent[len(self.sent) - 1]


def test_importance_over_two_processes_is_the_one_process_estimate(tmp_path):
    """Each rank takes every other batch and the sums (importance and pass count) are all-reduced:
    the result is the single-process mean; one pass alone is that sample's squared gradient."""
    model, processor, enc, samples, ctx = _tiny_ctx(tmp_path)
    whole = _method("ewc").estimate(samples, ctx)
    ctx.accelerator = one = _TwoRanks(1)
    alone = _method("ewc").estimate(samples, ctx)  # rank 1 without its peer: its own sample only
    ctx.accelerator = zero = _TwoRanks(0, peer=one)
    split = _method("ewc").estimate(samples, ctx)
    assert zero.ops == ["sum"] * (len(whole) + 1) and one.ops == zero.ops
    for n in whole:
        torch.testing.assert_close(split[n], whole[n])
    ctx.accelerator = _NoAccelerator()
    torch.testing.assert_close(alone, _method("ewc").estimate(samples[1:], ctx))
    name = next(n for n in whole if "multi_modal_projector" in n)
    model.zero_grad()
    model(**enc.train_batch(samples[:1])).loss.backward()
    expected = dict(model.named_parameters())[name].grad.pow(2)
    torch.testing.assert_close(_method("ewc").estimate(samples[:1], ctx)[name], expected)
    model.zero_grad()  # batch_size 2: one pass over both samples, the squared gradient of their batch
    model(**enc.train_batch(samples)).loss.backward()
    expected = dict(model.named_parameters())[name].grad.pow(2)
    torch.testing.assert_close(_method("ewc", batch_size=2).estimate(samples, ctx)[name], expected)


def test_penalty_binding_normalising_and_resuming_known_answers(tmp_path):
    m = _method("ewc", lam=2.0)
    m.consolidate({"w": torch.tensor([1.0, 0.5]), "z": torch.zeros(2)}, {"w": torch.zeros(2), "z": torch.ones(2)})
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    m.bind({"w": w})  # "z" is not among the parameters (and has no importance): left out, no error
    assert [p for p, _, _ in m._active] == [w]
    m.bind({"w": w, "z": torch.nn.Parameter(torch.ones(2))})
    assert [p for p, _, _ in m._active] == [w]  # zero importance: never in the penalty
    torch.testing.assert_close(m.penalty(), torch.tensor(0.5 * 2.0 * (1.0 + 0.5 * 4.0)))
    assert _method("ewc", lam=0.0).penalty() is None
    off = _method("ewc", lam=0.0)
    off.consolidate({"w": torch.ones(2)}, {"w": torch.zeros(2)})
    assert off.penalty({"w": w}) is None  # lambda 0: no term at all
    zeros = _method("mas", normalize="mean").normalized({"a": torch.zeros(2)})
    assert zeros["a"].tolist() == [0.0, 0.0]  # nothing to scale by: left as it is, no division by zero
    # after a resume the penalty binds to the model's parameters on its first step
    model, processor, enc, samples, ctx = _tiny_ctx(tmp_path)
    params = ctx.trainable_parameters()
    name = next(iter(params))
    m.omega, m.anchor, m.tasks_done = {name: torch.ones_like(params[name])}, {name: torch.zeros_like(params[name])}, ["a"]
    resumed = _method("ewc", lam=2.0)
    resumed.load_state_dict(*m.state_dict())
    assert resumed.tasks_done == ["a"] and torch.equal(resumed.omega[name], m.omega[name])
    loss = resumed.extra_loss(None, None, ctx)
    torch.testing.assert_close(loss, (params[name].detach().float() ** 2).sum())  # lam/2 * sum(1 * theta^2)


def test_after_task_estimates_on_the_seeded_sample_of_its_task(monkeypatch):
    from mcit.methods.penalty import ImportancePenalty, importance_sample

    data = {"a": _samples("a", 30), "b": _samples("b", 30)}
    ctx = TaskContext(torch.nn.Linear(2, 2), _NoAccelerator(), None, ["a", "b"], data, seed=11)
    seen = []
    monkeypatch.setattr(ImportancePenalty, "estimate", lambda self, samples, ctx: seen.append(samples) or
                        {n: torch.zeros_like(p) for n, p in ctx.trainable_parameters().items()})
    m = _method("ewc", samples=5)
    m.after_task("b", ctx)
    assert seen == [importance_sample(data["b"], 5, 11, "b")] and m.tasks_done == ["b"]
    assert seen[0] != importance_sample(data["b"], 5, 11, "a") and seen[0] != importance_sample(data["b"], 5, 12, "b")


# --- the penalty ------------------------------------------------------------------------------
def test_penalty_gradient_pulls_toward_the_anchor():
    method = _method("ewc", lam=2.0)
    p = torch.nn.Parameter(torch.tensor([1.0, 2.0, 3.0]))
    omega = torch.tensor([1.0, 0.5, 0.0])
    method.consolidate({"w": omega}, {"w": torch.tensor([0.0, 0.0, 0.0])})
    loss = method.penalty({"w": p})
    loss.backward()
    torch.testing.assert_close(p.grad, 2.0 * omega * p.detach())  # lam * omega * (theta - anchor)
    torch.testing.assert_close(loss, torch.tensor(0.5 * 2.0 * (1.0 + 0.5 * 4.0)))
    with torch.no_grad():
        moved = p - 0.1 * p.grad
    assert (moved[:2] - 0).abs().lt(p.detach()[:2].abs()).all()  # a descent step moves toward theta_old
    assert moved[2] == p.detach()[2]  # zero importance: free


def test_separate_mode_equals_one_penalty_per_task_and_online_decays():
    thetas = [torch.tensor([0.0, 1.0, -2.0]), torch.tensor([1.0, 1.0, 4.0])]
    omegas = [torch.tensor([1.0, 0.0, 2.0]), torch.tensor([3.0, 0.0, 0.5])]
    sep = _method("ewc", lam=1.0)
    for th, om in zip(thetas, omegas, strict=True):
        sep.consolidate({"w": om}, {"w": th})
    p = torch.nn.Parameter(torch.tensor([0.3, -0.7, 1.5]))
    sep.penalty({"w": p}).backward()
    explicit = sum(om * (p.detach() - th) for th, om in zip(thetas, omegas, strict=True))
    torch.testing.assert_close(p.grad, explicit)

    onl = _method("ewc", lam=1.0, mode="online", gamma=0.5)
    for th, om in zip(thetas, omegas, strict=True):
        onl.consolidate({"w": om}, {"w": th})
    torch.testing.assert_close(onl.omega["w"], 0.5 * omegas[0] + omegas[1])
    torch.testing.assert_close(onl.anchor["w"], thetas[1])


def test_separate_mode_anchor_is_the_importance_weighted_mean_known_answer():
    sep = _method("ewc", lam=1.0)
    sep.consolidate({"w": torch.tensor([0.25, 0.0, 0.1])}, {"w": torch.tensor([2.0, 5.0, 1.0])})
    sep.consolidate({"w": torch.tensor([0.25, 0.0, 0.3])}, {"w": torch.tensor([4.0, 7.0, 3.0])})
    # (0.25*2 + 0.25*4) / 0.5 = 3; no importance yet: the latest parameters; (0.1*1 + 0.3*3) / 0.4 = 2.5
    torch.testing.assert_close(sep.anchor["w"], torch.tensor([3.0, 7.0, 2.5]))
    torch.testing.assert_close(sep.omega["w"], torch.tensor([0.5, 0.0, 0.4]))
    again = _method("ewc")
    again.load_state_dict(*sep.state_dict())
    assert again.tasks_done == [] and torch.equal(again.anchor["w"], sep.anchor["w"])
    again.load_state_dict({}, {})  # a state from before any task finished
    assert again.tasks_done == [] and again.omega == {}


def test_importance_sample_and_answer_logits_known_answers():
    from mcit.methods.penalty import answer_logits, importance_sample

    samples = _samples("a", 10)
    chosen = [s.id for s in importance_sample(samples, 3, seed=0, task="a")]
    assert chosen == [s.id for s in importance_sample(samples, 3, seed=0, task="a")]  # seeded
    assert chosen == sorted(chosen, key=lambda i: int(i.split("-")[1])) and len(set(chosen)) == 3  # in data order
    assert chosen == ["a-0", "a-2", "a-3"]  # pinned: the permutation of (seed, task, "importance")
    assert importance_sample(samples, 10, seed=0, task="a") == samples
    logits = torch.arange(2 * 4 * 3, dtype=torch.float32).view(2, 4, 3)
    labels = torch.tensor([[-100, -100, 5, 6], [-100, 7, -100, -100]])
    # the logits at position t predict the label at t + 1: rows (0, 1), (0, 2) and (1, 0)
    torch.testing.assert_close(answer_logits(logits, labels), torch.stack([logits[0, 1], logits[0, 2], logits[1, 0]]))


def test_normalized_importance():
    m = _method("mas", normalize="max")
    out = m.normalized({"a": torch.tensor([1.0, 4.0]), "b": torch.tensor([2.0])})
    assert out["a"].tolist() == [0.25, 1.0] and out["b"].tolist() == [0.5]


def test_ewc_holds_important_weights_at_the_old_optimum(smoke_cfg, tmp_path):
    """The importance-weighted drift over task 2 is far smaller with the penalty than without."""
    from safetensors.torch import load_file

    def weights(out):
        return [load_file(str(c / "trainable.safetensors")) for c in sorted((out / "checkpoints").iterdir())]

    tasks = "benchmark.tasks=[color,count]"
    run(smoke_cfg("method.name=ewc", "method.lam=100", "method.normalize=mean", tasks), tmp_path / "ewc",
        show_progress=False)
    run(smoke_cfg(tasks), tmp_path / "seq", show_progress=False)
    stage1 = load_file(str(tmp_path / "ewc" / "checkpoints" / "stage_01_color" / "method.safetensors"))
    omega = {k.removeprefix("omega."): v for k, v in stage1.items() if k.startswith("omega.")}

    def weighted_drift(out):
        a, b = weights(out)
        return sum((omega[n] * (a[n] - b[n]) ** 2).sum() for n in a).item()

    assert weighted_drift(tmp_path / "ewc") < 0.1 * weighted_drift(tmp_path / "seq")
    meta = json.loads((tmp_path / "ewc" / "checkpoints" / "stage_02_count" / "method.json").read_text())
    assert meta["tasks_done"] == ["color", "count"]


def test_penalty_covers_lora_factors(smoke_cfg, tmp_path):
    from safetensors.torch import load_file

    run(smoke_cfg("method.name=ewc", "model.tuning=lora", "benchmark.tasks=[color,count]"), tmp_path / "lora",
        show_progress=False)
    state = load_file(str(tmp_path / "lora" / "checkpoints" / "stage_01_color" / "method.safetensors"))
    omegas = {k: v for k, v in state.items() if k.startswith("omega.")}
    # the LoRA factors and the projector (LLaVA-1.5's LoRA recipe trains it), never the frozen rest
    assert any("lora_" in k for k in omegas) and any("multi_modal_projector" in k for k in omegas)
    assert all("lora_" in k or "multi_modal_projector" in k for k in omegas)
    assert sum(v.sum() for v in omegas.values()) > 0


# --- replay -----------------------------------------------------------------------------------
def _samples(task, n):
    from mcit.data.format import Sample

    return [Sample(f"{task}-{i}", None, "q", "a", task=task) for i in range(n)]


def test_replay_buffer_quotas_and_seeded_selection():
    from mcit.methods.replay import ReplayBuffer

    data = {t: _samples(t, 50) for t in "abc"}
    per = ReplayBuffer(per_task=7)
    for t in "abc":
        per.add(t, data[t], seed=1)
    assert {t: len(v) for t, v in per.ids.items()} == {"a": 7, "b": 7, "c": 7}
    assert all(i.startswith(t) for t, ids in per.ids.items() for i in ids)

    total = ReplayBuffer(size=12)
    total.add("a", data["a"], seed=1)
    first_a = list(total.ids["a"])
    assert len(first_a) == 12
    total.add("b", data["b"], seed=1)
    total.add("c", data["c"], seed=1)
    assert len(total) == 12 and total.ids["a"] == first_a[:4]  # shrunk to a prefix of the same choice

    again = ReplayBuffer(per_task=7)
    again.add("a", data["a"], seed=1)
    other = ReplayBuffer(per_task=7)
    other.add("a", data["a"], seed=2)
    assert again.ids["a"] == per.ids["a"] and other.ids["a"] != per.ids["a"]
    assert [s.id for s in per.samples(data, exclude="c")] == per.ids["a"] + per.ids["b"]


def test_replay_buffer_known_answer_lookups_and_errors():
    from mcit.errors import McitError
    from mcit.methods.replay import ReplayBuffer, mix_weights

    data = {t: _samples(t, 10) for t in "ab"}
    buf = ReplayBuffer(per_task=3)
    buf.add("a", data["a"], seed=0)
    assert buf.ids == {"a": ["a-3", "a-7", "a-9"]}  # pinned: the seeded permutation of (seed, task)
    buf.add("b", data["b"], seed=0)
    assert [s.id for s in buf.samples(data, exclude="a")] == buf.ids["b"]  # the task after an excluded one
    assert [s.id for s in buf.samples(data, only="b")] == buf.ids["b"]
    assert [s.id for s in buf.samples(data)] == buf.ids["a"] + buf.ids["b"]
    with pytest.raises(McitError, match=r"^replay buffer holds task 'a', which is not in this run's stream$"):
        buf.samples({"b": data["b"]})
    with pytest.raises(McitError, match=r"^replay buffer: sample ids \['a-3', 'a-7', 'a-9'\] of task 'a' are not in its"):
        buf.samples({"a": data["a"][:2], "b": data["b"]})
    five = ReplayBuffer(per_task=5)
    five.add("a", data["a"], seed=0)
    with pytest.raises(McitError, match=r"sample ids \['[^']+', '[^']+', '[^']+'\] of task"):  # the first three
        five.samples({"a": []})
    again = ReplayBuffer(per_task=3)
    again.load(buf.state())
    assert again.ids == buf.ids
    again.load({})  # a checkpoint of a method that replayed nothing yet
    assert again.ids == {} and len(again) == 0
    torch.testing.assert_close(mix_weights(1, 2, 0.5), torch.tensor([0.5, 0.25, 0.25]))
    assert mix_weights(0, 2, 0.5) is None and mix_weights(3, 0, 0.5) is None


def test_replay_part_quota_exclusion_mix_and_seed():
    from mcit.methods.replay import Replay, ReplayBuffer, ReplayOptions, ReplayPart

    data = {t: _samples(t, 20) for t in "ab"}
    ctx = TaskContext(None, None, None, ["a", "b"], data, seed=5)
    part = ReplayPart(ReplayOptions(size=6))
    part.after_task("a", ctx)
    expected = ReplayBuffer(size=6)
    expected.add("a", data["a"], seed=5)
    assert part.buffer.ids == expected.ids and len(part.buffer) == 6  # the total size, the context's seed
    assert part.train_data("a", data["a"], ctx) == data["a"]  # a task is never replayed into itself
    mixed = part.train_data("b", data["b"], ctx)
    assert [s.id for s in mixed[20:]] == expected.ids["a"] and part.sample_weights(mixed) is not None
    extra = ReplayPart(ReplayOptions(per_task=4, mix="extra"))
    extra.after_task("a", ctx)
    assert len(extra.train_data("b", data["b"], ctx)) == 24 and extra.sample_weights(mixed) is None
    opts = ReplayOptions(per_task=4)
    method = Replay(opts)
    assert method.options is opts
    method.after_task("a", ctx)
    assert method.train_data("a", data["a"], ctx) == data["a"]


def test_replay_mixes_at_the_configured_ratio():
    m = _method("replay", per_task=10, ratio=0.25)
    data = {"a": _samples("a", 40), "b": _samples("b", 90)}
    ctx = TaskContext(None, None, None, ["a", "b"], data, seed=3)
    assert m.train_data("a", data["a"], ctx) == data["a"]  # nothing to replay yet
    assert m.sample_weights(data["a"], ctx) is None
    m.after_task("a", ctx)
    mixed = m.train_data("b", data["b"], ctx)
    assert len(mixed) == 100 and {s.task for s in mixed[90:]} == {"a"}
    w = m.sample_weights(mixed, ctx)
    assert w[90:].sum().item() == pytest.approx(0.25) and w.sum().item() == pytest.approx(1.0)
    assert _method("replay", mix="extra").sample_weights(mixed, ctx) is None


def test_replay_buffer_survives_resume(smoke_cfg, tmp_path, monkeypatch):
    from mcit.methods.replay import Replay

    cfg = smoke_cfg("method.name=replay", "method.per_task=5")
    whole = run(cfg, tmp_path / "whole", show_progress=False)
    meta = json.loads((tmp_path / "whole" / "checkpoints" / "stage_02_count" / "method.json").read_text())
    assert {t: len(v) for t, v in meta["ids"].items()} == {"color": 5, "count": 5}

    resumed = kill_and_resume(cfg, tmp_path / "killed", Replay, 3, 3, monkeypatch)
    assert resumed["matrix"] == whole["matrix"]
    final = json.loads((tmp_path / "killed" / "checkpoints" / "stage_03_ocr" / "method.json").read_text())
    assert final["ids"]["color"] == meta["ids"]["color"]


# --- lwf --------------------------------------------------------------------------------------
@pytest.mark.parametrize("top_k", [None, 3])
def test_lwf_loss_is_zero_while_student_equals_teacher(tmp_path, top_k):
    model, processor, enc, samples, ctx = _tiny_ctx(tmp_path)
    m = _method("lwf", top_k=top_k)
    ctx.stage = 2
    m.before_task("a", samples, ctx)
    assert set(m.teacher) == {"1", "2"}
    batch = enc.train_batch(samples)
    ctx.batch_samples = samples
    assert m.extra_loss(batch, model(**batch), ctx).item() == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():
        head = next(p for n, p in model.named_parameters() if "lm_head" in n)
        head.add_(0.5 * torch.randn(head.shape))
    assert m.extra_loss(batch, model(**batch), ctx).item() > 1e-4


def test_lwf_skips_the_first_task_unless_asked(tmp_path):
    model, processor, enc, samples, ctx = _tiny_ctx(tmp_path)
    ctx.stage = 1
    m = _method("lwf")
    m.before_task("a", samples, ctx)
    assert m.teacher == {} and m.extra_loss({}, None, ctx) is None
    m = _method("lwf", first_task=True)
    m.before_task("a", samples, ctx)
    assert len(m.teacher) == 2


def test_distillation_is_a_scaled_kl():
    from mcit.methods.lwf import distillation

    s, t = torch.tensor([[0.0, 1.0, 2.0]]), torch.tensor([[2.0, 1.0, 0.0]])
    p, q = torch.softmax(t / 2, -1), torch.softmax(s / 2, -1)
    expected = (p * (p.log() - q.log())).sum() * 4
    torch.testing.assert_close(distillation(s, t, 2.0), expected)
    assert distillation(t, t, 2.0).item() == pytest.approx(0.0, abs=1e-7)


# --- end to end and the benchmark -------------------------------------------------------------
@pytest.mark.parametrize("name", ["replay", "mas", "lwf"])
def test_methods_run_the_smoke_stream(smoke_cfg, tmp_path, name):
    res = run(smoke_cfg(f"method.name={name}"), tmp_path / name, show_progress=False)
    assert res["method"] == name and len(res["matrix"]) == 4
    if name != "replay":  # replay's bookkeeping takes milliseconds: nothing to assert about its time
        assert res["timing"]["method_s"] > 0


def test_bench_overhead_times_every_method_against_seqft(smoke_cfg, smoke_run, monkeypatch, capsys, tmp_path):
    import sys

    from mcit.cli import main
    from tests.conftest import SMOKE

    out = tmp_path / "bench.json"
    argv = ["mcit", "bench", "overhead", "--config", str(SMOKE), "--set", f"cache_dir={smoke_cfg().cache_dir}",
            "--steps", "4", "--chunk", "2", "--out", str(out), "--quiet"]
    monkeypatch.setattr(sys, "argv", [*argv, "--methods", "seqft,ewc,lwf"])
    main()
    report = json.loads(out.read_text())
    rows = {r["method"]: r for r in report["rows"]}
    assert list(rows) == ["seqft", "ewc", "lwf"] and report["steps"] == 4
    assert rows["seqft"]["ratio"] == 1.0 and rows["seqft"]["one_off_s"] == 0.0
    assert rows["ewc"]["one_off_s"] > 0 and rows["ewc"]["method_state_mb"] > 0
    assert rows["lwf"]["method_state_mb"] > 0  # the precomputed teacher logits
    assert all(r["step_ms_median"] > 0 for r in rows.values())
    assert rows["seqft"]["trainable_params"] == rows["ewc"]["trainable_params"] > 0  # same tuning, same count
    text = capsys.readouterr().out
    assert "ratio" in text and "trainable M" in text

    monkeypatch.setattr(sys, "argv", [*argv, "--methods", "seqft,joint"])
    with pytest.raises(SystemExit) as e:
        main()
    assert e.value.code == 2 and "do not train task by task" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["ewc", "mas", "tir_ewc", "dgg", "lwf"])
def test_gradient_methods_act_on_lora_parameters(smoke_cfg, tmp_path, name):
    """The shipped configs tune LoRA factors and the projector: every gradient-based method keeps its
    state for exactly those (some get no gradient on a batch: p.grad is None) and changes what they
    learn, against seqft from the same seed."""
    from safetensors.torch import load_file

    lora = ("model.tuning=lora", "model.train_projector=true", "benchmark.tasks=[color,count]", "benchmark.general=[]")
    extra = {"dgg": ("method.alpha=1.0", "method.bernoulli=false", "method.replay=false"),
             "lwf": ("method.first_task=true",)}
    run(smoke_cfg(*lora, f"method.name={name}", *extra.get(name, ())), tmp_path / name, show_progress=False)
    run(smoke_cfg(*lora), tmp_path / "seqft", show_progress=False)
    ckpt = tmp_path / name / "checkpoints"
    trainable = set(load_file(str(ckpt / "stage_01_color" / "trainable.safetensors")))
    assert any("lora_A" in n for n in trainable) and any("multi_modal_projector" in n for n in trainable)
    state = load_file(str(ckpt / "stage_01_color" / "method.safetensors"))
    prefix = {"ewc": "omega.", "mas": "omega.", "tir_ewc": "omega.", "dgg": "theta_star.", "lwf": None}[name]
    if prefix is not None:
        assert {k[len(prefix):] for k in state if k.startswith(prefix)} == trainable
    ours = load_file(str(ckpt / "stage_02_count" / "trainable.safetensors"))
    plain = load_file(str(tmp_path / "seqft" / "checkpoints" / "stage_02_count" / "trainable.safetensors"))
    lora_b = [n for n in ours if "lora_B" in n]
    assert all(torch.isfinite(ours[n]).all() for n in ours)
    assert max((ours[n] - plain[n]).abs().max().item() for n in lora_b) > 1e-7  # the method changed the update


def test_method_catalog_matches_the_registered_classes():
    # `mcit methods` reads catalog.json instead of importing every method (torch: seconds); a
    # changed summary, paper, option or default must be refreshed there, or this fails.
    from mcit.methods.catalog import build_catalog, load_catalog

    assert load_catalog() == build_catalog(), "refresh with: python -m mcit.methods.catalog"


def test_methods_listing_does_not_import_torch():
    import subprocess
    import sys

    code = ("import sys\nfrom typer.testing import CliRunner\nfrom mcit.cli import app\n"
            "r = CliRunner().invoke(app, ['methods'])\nassert r.exit_code == 0, r.output\n"
            "assert 'gem' in r.output and 'margin = 0.5' in r.output, r.output\n"
            "print('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


def test_bench_framework_against_a_bare_loop_and_per_sample_generation(smoke_cfg, smoke_run, monkeypatch, capsys,
                                                                        tmp_path):
    import sys

    from mcit.cli import main
    from tests.conftest import SMOKE

    out = tmp_path / "framework.json"
    monkeypatch.setattr(sys, "argv", ["mcit", "bench", "framework", "--config", str(SMOKE), "--set",
                                      f"cache_dir={smoke_cfg().cache_dir}", "--steps", "4", "--chunk", "2",
                                      "--methods", "replay,dgg", "--eval-samples", "12", "--eval-rounds", "1",
                                      "--out", str(out), "--quiet"])
    main()
    report = json.loads(out.read_text())
    rows = {r["method"]: r for r in report["rows"]}
    assert list(rows) == ["bare", "seqft", "replay", "dgg"] and report["baseline"] == "bare"
    assert rows["bare"]["ratio"] == 1.0 and all(r["step_ms_median"] > 0 for r in rows.values())
    ev = report["evaluation"]
    assert ev["task"] == "count" and ev["samples"] == 12 and ev["all_identical"] and ev["identical_predictions"] == 12
    assert ev["speedup"] > 0 and set(ev["samples_per_s"]) == {"per_sample", "batched"}
    text = capsys.readouterr().out
    assert "vs a bare PyTorch loop" in text and "12/12 predictions identical" in text


def test_the_bare_loop_takes_the_step_mcit_takes(tmp_path):
    """Same batches, same update: three steps of the hand-written loop and of mcit's trainer from
    the same weights land on the same weights (what the framework benchmark compares is cost only)."""
    from mcit.bench import BareLoop
    from mcit.config import OptimConfig
    from mcit.train import SingleProcess, StageTrainer
    from tests.conftest import make_tiny
    from tests.test_train_loop import _equal_length_samples

    optim = OptimConfig(steps=3, batch_size=2, lr=1e-2, warmup_ratio=0.34)
    finals, losses = [], []
    for kind in ("bare", "mcit"):
        torch.manual_seed(0)
        model, _, enc, _ = make_tiny(tmp_path)
        samples = _equal_length_samples(tmp_path) + [make_tiny(tmp_path)[3][1]]  # 5 samples: batches differ
        if kind == "bare":
            loop = BareLoop(model, enc, samples, optim, "cpu", seed=7, steps=3)
        else:
            loop = StageTrainer(model, enc, samples, optim, SingleProcess("cpu"), seed=7)
        model.train()
        losses.append([loop.step().item() for _ in range(3)])
        finals.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert losses[0] == losses[1] and len(set(losses[0])) == 3
    assert torch.equal(finals[0], finals[1])
