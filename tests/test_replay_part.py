"""A replay part on any method (the config's ``replay:`` section)."""

import pytest
import torch
from safetensors.torch import load_file

from mcit.errors import ConfigError


def test_seqft_with_a_replay_part_is_the_replay_method(smoke_cfg, tmp_path):
    """The part is the replay method's data half: seqft + replay part trains on the same batches
    as the replay method, so weights and matrix agree bit for bit; the buffer is in its own key."""
    import json

    from mcit.runner import run

    part = run(smoke_cfg("replay.per_task=5", "replay.ratio=0.3"), tmp_path / "part", show_progress=False)
    method = run(smoke_cfg("method.name=replay", "method.per_task=5", "method.ratio=0.3"), tmp_path / "method",
                 show_progress=False)
    assert part["matrix"] == method["matrix"] and part["method"] == "seqft"
    ckpt = "checkpoints/stage_03_ocr/trainable.safetensors"
    a, b = load_file(str(tmp_path / "part" / ckpt)), load_file(str(tmp_path / "method" / ckpt))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    meta = json.loads((tmp_path / "part" / "checkpoints" / "stage_03_ocr" / "method.json").read_text())
    assert {t: len(v) for t, v in meta["replay_part"]["ids"].items()} == {"color": 5, "count": 5, "ocr": 5}
    assert part["method_report"]["replay_part"] == {"color": 5, "count": 5, "ocr": 5}


def test_ewc_with_replay_trains_on_the_buffer_and_resumes_exactly(smoke_cfg, tmp_path, monkeypatch):
    from mcit.methods.ewc import EWC
    from mcit.runner import run
    from tests.conftest import kill_and_resume

    seen = {}
    original = EWC.before_task

    def spy(self, task, samples, ctx):  # the stage's data as the method sees it: the task's and the buffer's
        seen[task] = sorted({s.task for s in samples})
        original(self, task, samples, ctx)

    monkeypatch.setattr(EWC, "before_task", spy)
    cfg = smoke_cfg("method.name=ewc", "replay.per_task=8")
    whole = run(cfg, tmp_path / "whole", show_progress=False)
    monkeypatch.undo()
    assert seen == {"color": ["color"], "count": ["color", "count"], "ocr": ["color", "count", "ocr"]}
    run(smoke_cfg("method.name=ewc"), tmp_path / "plain", show_progress=False)
    ckpt = "checkpoints/stage_03_ocr/trainable.safetensors"
    a, b = load_file(str(tmp_path / "whole" / ckpt)), load_file(str(tmp_path / "plain" / ckpt))
    assert any(not torch.equal(a[k], b[k]) for k in a)  # the replayed samples changed what was learnt
    resumed = kill_and_resume(cfg, tmp_path / "killed", EWC, 3, 2, monkeypatch)
    assert resumed["matrix"] == whole["matrix"]
    c = load_file(str(tmp_path / "killed" / ckpt))
    assert all(torch.equal(a[k], c[k]) for k in a)


@pytest.mark.parametrize("method, why", [
    ("replay", "replays already; set its own options under method:$"),
    ("dgg", "replays already; set its own options under method:$"),
    ("joint", r"does not train task after task \(joint\); there is nothing to replay$"),
    ("zeroshot", r"does not train task after task \(none\); there is nothing to replay$")])
def test_replay_part_is_refused_where_it_means_nothing(method, why, smoke_cfg, tmp_path):
    from mcit.runner import run

    with pytest.raises(ConfigError, match=rf"^replay: method '{method}' {why}"):
        run(smoke_cfg(f"method.name={method}", "replay.per_task=4"), tmp_path / "r", show_progress=False)
    assert not (tmp_path / "r").exists()  # refused before the run directory


def test_bad_replay_options_name_the_key(smoke_cfg):
    with pytest.raises(ConfigError, match=r"^--set replay.ratio=2: replay.ratio: Input should be less than 1"):
        smoke_cfg("replay.ratio=2")
    with pytest.raises(ConfigError, match=r"replay.bogus"):
        smoke_cfg("replay.bogus=1")


def test_with_parts_hands_every_hook_to_the_method_and_its_parts():
    """WithParts forwards each hook, with its arguments, to the method and returns the method's
    answer, except where a part acts: train_data through the parts in order, sample_weights from
    the first part that draws batches, after_task, state and report under each part's key."""
    from mcit.methods.base import Method
    from mcit.methods.parts import WithParts

    calls = []
    forwarded = ("stages", "stage_steps", "setup", "before_task", "extra_loss", "before_step", "route",
                 "eval_summary", "extra_memory_bytes", "sample_weights", "after_task")

    class Inner(Method):
        name, walk = "inner", "sequential"

        def train_data(self, task, samples, ctx):
            calls.append(("train_data", (task, ctx)))
            return [*samples, "inner"]

        def state_dict(self):
            return {"t": 1}, {"own": 2}

        def load_state_dict(self, tensors, meta):
            calls.append(("load_state_dict", (tensors, meta)))

        def report(self):
            return {"own": 3}

    def recorder(hook):
        def hooked(self, *args):
            calls.append((hook, args))
            return f"{hook}-result"
        return hooked

    for hook in forwarded:
        setattr(Inner, hook, recorder(hook))

    class Rewrite:
        key = "rw"

        def train_data(self, task, samples, ctx):
            return [*samples, f"rw-{task}"]

        def report(self):
            return {"n": 1}

    class Draw:
        key = "draw"
        loaded = None

        def train_data(self, task, samples, ctx):
            return [*samples, "drawn"]

        def sample_weights(self, samples):
            return ("weights", len(samples))

        def after_task(self, task, ctx):
            calls.append(("draw.after_task", (task, ctx)))

        def state(self):
            return {"ids": [1]}

        def load(self, meta):
            self.loaded = meta

        def report(self):
            return {"a": 1}

    inner, draw = Inner(object()), Draw()
    m = WithParts(inner, [draw, Rewrite()])
    assert (m.name, m.walk) == ("inner", "sequential") and m.part("draw") is draw and m.part("nope") is None
    assert m.options is inner.options
    ctx, batch, outputs = object(), object(), object()
    for hook, args in [("stages", (["a"],)), ("stage_steps", (10, 2, "optim")), ("setup", ("model", ctx)),
                       ("before_task", ("a", ["s"], ctx)), ("extra_loss", (batch, outputs, ctx)),
                       ("before_step", (ctx,)), ("route", (batch, ctx)), ("eval_summary", ()),
                       ("extra_memory_bytes", ())]:
        calls.clear()
        result = getattr(m, hook)(*args)
        assert calls == [(hook, args)], hook
        assert result == (None if hook in ("setup", "before_task", "before_step") else f"{hook}-result"), hook
    calls.clear()
    assert m.train_data("a", ["s"], ctx) == ["s", "inner", "drawn", "rw-a"]  # the method's, then each part's
    assert calls == [("train_data", ("a", ctx))]
    assert m.sample_weights(["x", "y"], ctx) == ("weights", 2)
    calls.clear()
    m.after_task("a", ctx)
    assert calls == [("after_task", ("a", ctx)), ("draw.after_task", ("a", ctx))]
    assert m.state_dict() == ({"t": 1}, {"own": 2, "draw": {"ids": [1]}})
    assert m.report() == {"own": 3, "draw": {"a": 1}, "rw": {"n": 1}}
    calls.clear()
    m.load_state_dict({"t": 1}, {"own": 2, "draw": {"ids": [7]}})
    assert draw.loaded == {"ids": [7]} and calls == [("load_state_dict", ({"t": 1}, {"own": 2}))]
    m.load_state_dict({}, {"own": 2})  # a checkpoint from before the part was added: it starts empty
    assert draw.loaded == {}
    calls.clear()
    assert WithParts(inner, [Rewrite()]).sample_weights(["x"], ctx) == "sample_weights-result"  # no part draws
    from mcit.methods.parts import with_parts

    assert with_parts(inner) is inner and with_parts(inner, None, {}) is inner  # no part: the method itself
    assert calls == [("sample_weights", (["x"], ctx))]
