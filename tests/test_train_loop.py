"""The training loop and the report on their own, against known answers: a bug applied the same
way to every run (a constant schedule, no division by grad_accum, no shuffling) must fail here,
since comparing two runs of the same code cannot see it."""

import math

import pytest
import torch
from PIL import Image

from mcit.config import OptimConfig
from mcit.data.format import Sample
from mcit.train import SingleProcess, StageTrainer, index_stream, make_scheduler, train_stage


def _factors(schedule: str, steps: int, warmup_ratio: float) -> list[float]:
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=1.0)
    sched = make_scheduler(opt, schedule, steps, warmup_ratio)
    out = []
    for _ in range(steps + 1):
        out.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    return out


def test_schedules_at_known_steps():
    cosine = _factors("cosine", 10, 0.2)  # 2 warmup steps, then 8 of cosine decay
    assert cosine[:3] == [0.5, 1.0, 1.0]
    assert cosine[6] == pytest.approx(0.5)  # halfway through the decay
    assert cosine[4] == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.25)))
    assert cosine[10] == pytest.approx(0.0)
    linear = _factors("linear", 10, 0.2)
    assert linear[:3] == [0.5, 1.0, 1.0] and linear[6] == pytest.approx(0.5) and linear[10] == pytest.approx(0.0)
    assert _factors("constant", 10, 0.2)[2:] == [1.0] * 9
    assert _factors("cosine", 4, 0.0)[:5] == pytest.approx([1.0, 0.5 * (1 + math.cos(math.pi / 4)), 0.5, 0.5 * (1 + math.cos(3 * math.pi / 4)), 0.0])
    assert linear[4] == pytest.approx(0.75) and cosine[4] != pytest.approx(0.75)  # off the midpoint they differ
    assert _factors("cosine", 2, 0.5) == pytest.approx([1.0, 1.0, 0.0])  # one decay step after one warmup step
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=1.0)
    sched = make_scheduler(opt, "cosine", 4, 0.0)
    for _ in range(6):  # stepped past its end, the schedule stays at 0
        opt.step()
        sched.step()
    assert sched.get_last_lr()[0] == pytest.approx(0.0)


def test_index_stream_shuffles_every_epoch_and_draws_by_weight():
    gen = torch.Generator().manual_seed(0)
    stream = index_stream(6, 4, gen)
    first, second, third = next(stream), next(stream), next(stream)
    reference = torch.Generator().manual_seed(0)
    epoch1, epoch2 = torch.randperm(6, generator=reference).tolist(), torch.randperm(6, generator=reference).tolist()
    assert first + second + third == epoch1 + epoch2  # epochs follow each other, each a fresh permutation
    assert sorted(epoch1) == list(range(6)) and epoch1 != list(range(6)) and epoch1 != epoch2
    weighted = index_stream(3, 500, torch.Generator().manual_seed(1), torch.tensor([1.0, 3.0, 0.0]))
    draws = next(weighted)
    assert 2 not in draws and 0.65 < draws.count(1) / 500 < 0.85  # about 3/4 from the weight-3 sample
    assert next(index_stream(3, 4, torch.Generator().manual_seed(2), torch.tensor([0.0, 0.0, 1.0]))) == [2, 2, 2, 2]
    # weighted draws come from the stream's own generator: the same seed gives the same draws
    w = torch.tensor([1.0, 2.0, 3.0, 4.0])
    a, b = (index_stream(4, 50, torch.Generator().manual_seed(9), w) for _ in range(2))
    torch.manual_seed(1)
    first = next(a)
    torch.manual_seed(2)
    assert next(b) == first


class _Recorder:
    """A method whose only hook records the gradients the step is about to apply."""

    def __init__(self):
        self.grads, self.seen = None, []

    def extra_loss(self, batch, outputs, ctx):
        self.seen.append((batch["input_ids"].shape[0], [s.id for s in ctx.batch_samples]))
        return None

    def before_step(self, ctx):
        self.grads = {n: p.grad.detach().clone() for n, p in ctx.named if p.grad is not None}


class _Ctx:
    def __init__(self, model):
        self.named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.step, self.batch_samples = 0, None


def _equal_length_samples(tmp_path):
    Image.new("RGB", (48, 48), (200, 10, 10)).save(tmp_path / "r.png")
    Image.new("RGB", (48, 48), (10, 10, 200)).save(tmp_path / "b.png")
    return [Sample(str(i), tmp_path / ("r.png" if i % 2 else "b.png"), "what color?", "red" if i % 2 else "blue",
                   ["x"], task="a") for i in range(4)]


def _four_colours(tmp_path):
    """Four samples, four images, answers of one token each: no half of a batch averages like the whole."""
    colours = {"red": (200, 10, 10), "blue": (10, 10, 200), "green": (10, 200, 10), "black": (0, 0, 0)}
    out = []
    for i, (name, rgb) in enumerate(colours.items()):
        Image.new("RGB", (48, 48), rgb).save(tmp_path / f"{name}.png")
        out.append(Sample(str(i), tmp_path / f"{name}.png", "what color?", name, [name], task="a"))
    return out


def test_grad_accum_two_gives_the_gradient_of_one(tmp_path):
    from tests.conftest import make_tiny

    grads, losses, seen = {}, {}, {}
    for accum in (1, 2):
        torch.manual_seed(0)
        model, _, enc, _ = make_tiny(tmp_path)
        samples = _four_colours(tmp_path)  # the same answer length: micro-batch means average exactly
        rec = _Recorder()
        optim = OptimConfig(steps=1, batch_size=4, lr=1e-3, grad_accum=accum, warmup_ratio=0.0)
        trainer = StageTrainer(model, enc, samples, optim, SingleProcess("cpu"), seed=0, method=rec, ctx=_Ctx(model))
        losses[accum] = trainer.step().item()
        grads[accum], seen[accum] = rec.grads, rec.seen
        assert all(p.grad is None for p in model.parameters())  # cleared for the next step (methods test for None)
    assert grads[1].keys() == grads[2].keys() and len(grads[1]) > 5
    for name, g in grads[1].items():
        torch.testing.assert_close(grads[2][name], g, rtol=1e-4, atol=1e-7)
    assert losses[2] == pytest.approx(losses[1], rel=1e-5)  # the step's loss: the mean over micro-batches
    # each micro-batch is its own half of the batch, and the method sees exactly those samples
    assert [n for n, _ in seen[1]] == [4] and [n for n, _ in seen[2]] == [2, 2]
    assert sorted(seen[2][0][1] + seen[2][1][1]) == sorted(seen[1][0][1]) == ["0", "1", "2", "3"]


def test_a_methods_extra_loss_is_added_to_the_task_loss(tmp_path):
    """extra_loss = sum of one bias + 2.5: its gradient is the task's plus one; the loss reported includes it."""
    from tests.conftest import make_tiny

    out = {}
    for with_extra in (False, True):
        torch.manual_seed(0)
        model, _, enc, _ = make_tiny(tmp_path)
        bias = next(p for n, p in model.named_parameters() if n.endswith("multi_modal_projector.linear_1.bias"))

        class Extra(_Recorder):
            def __init__(self, term):
                super().__init__()
                self.term = term

            def extra_loss(self, batch, outputs, ctx):
                return None if self.term is None else self.term.sum() + 2.5

        rec = Extra(bias if with_extra else None)
        trainer = StageTrainer(model, enc, _four_colours(tmp_path), OptimConfig(steps=1, batch_size=4, warmup_ratio=0.0),
                               SingleProcess("cpu"), seed=0, method=rec, ctx=_Ctx(model))
        name = next(n for n, p in model.named_parameters() if p is bias)
        before = float(bias.detach().sum())
        out[with_extra] = (trainer.step().item(), rec.grads[name], before)
    (plain_loss, plain_grad, _), (loss, grad, bias_sum) = out[False], out[True]
    torch.testing.assert_close(grad, plain_grad + 1.0)
    assert loss == pytest.approx(plain_loss + bias_sum + 2.5, rel=1e-6)


def test_trainer_settings_reach_the_optimizer_and_the_stream(tmp_path):
    from mcit.errors import McitError
    from tests.conftest import make_tiny

    model, _, enc, _ = make_tiny(tmp_path)
    samples = _four_colours(tmp_path)
    optim = OptimConfig(steps=40, batch_size=4, lr=1e-2, weight_decay=0.1, warmup_ratio=0.0)
    trainer = StageTrainer(model, enc, samples, optim, SingleProcess("cpu"), seed=0, steps=3)
    assert trainer.steps == 3 and trainer.optimizer.param_groups[0]["weight_decay"] == 0.1
    trainer.run_steps(3)
    assert trainer.scheduler.get_last_lr()[0] == pytest.approx(0.0)  # the cosine ends at the stage's 3 steps
    weighted = StageTrainer(model, enc, samples, optim, SingleProcess("cpu"), seed=0,
                            weights=torch.tensor([0.0, 0.0, 1.0, 0.0]))
    assert next(weighted.batches) == [2, 2, 2, 2]
    with pytest.raises(McitError, match=r"train batch_size 3 must be divisible by processes x grad_accum \(1 x 2\)"):
        StageTrainer(model, enc, samples, OptimConfig(batch_size=3, grad_accum=2), SingleProcess("cpu"), seed=0)
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(McitError, match="no trainable parameters: check model.tuning"):
        StageTrainer(model, enc, samples, optim, SingleProcess("cpu"), seed=0)


def test_training_reaches_a_known_accuracy(tmp_path):
    """A tiny LLaVA learns which colour a solid image shows (two colours) in 40 steps: greedy
    answers right on both, where the untrained model is right on neither."""
    from mcit.evaluate import generate
    from tests.conftest import make_tiny

    torch.manual_seed(0)
    model, _, enc, _ = make_tiny(tmp_path)
    samples = _equal_length_samples(tmp_path)
    probe = [samples[0], samples[1]]

    def answers():
        return generate(model, enc, probe, batch_size=2, max_new_tokens=2, device=torch.device("cpu"))

    before = answers()
    assert before != ["blue", "red"]
    stats = train_stage(model, enc, samples, OptimConfig(steps=40, batch_size=4, lr=1e-2, warmup_ratio=0.0),
                        SingleProcess("cpu"), seed=0, show_progress=False)
    assert answers() == ["blue", "red"]
    assert stats.steps == 40 and stats.losses[-1] < 0.1 < stats.losses[0]


def test_metrics_for_each_schedule():
    from mcit.report import metrics_for

    seq = metrics_for([[10.0, 20.0], [80.0, 30.0], [60.0, 90.0]], [100, 300], "sequential")
    assert seq["MFT"] == 85.0 and seq["MFN"] == 75.0 and seq["BWT"] == -20.0 and seq["FWT"] == 10.0
    assert seq["FAA_weighted"] == pytest.approx(0.25 * 60 + 0.75 * 90)
    joint = metrics_for([[10.0, 20.0], [70.0, 50.0]], [100, 300], "joint")
    assert joint["MFN"] == 60.0 and joint["FAA_weighted"] == pytest.approx(55.0)
    assert joint["MFT"] is None and joint["BWT"] is None and joint["FWT"] is None
    zero = metrics_for([[10.0, 20.0]], [1, 1], "none")
    assert zero["MFN"] == 15.0 and zero["MAA"] is None


def test_report_markdown_tables():
    from mcit.report import report_markdown

    results = {
        "method": "seqft", "benchmark": "b", "seed": 3, "tasks": ["a", "b"], "scorers": {"a": "exact", "b": "vqa"},
        "matrix": [[10.0, 20.0], [80.0, 30.0], [60.0, 90.0]], "row_labels": ["zero-shot", "a", "b"],
        "metrics": {"MFT": 85.0, "MFN": 75.0, "MAA": None, "BWT": -20.0, "FWT": 10.0, "forgetting": 20.0,
                    "FAA_weighted": 82.5},
        "timing": {"train_s": 1.0, "eval_s": 2.0, "step_ms_median": 3.0, "steps": 4},
        "memory": {"peak_rss_mb": 5.0}, "parameters": {"trainable": 1000, "total": 20000},
        "general": {"tasks": ["g"], "scorers": {"g": "exact"}, "matrix": [[50.0], [40.0], [45.0]],
                    "metrics": {"start": 50.0, "final": 45.0, "change": -5.0, "lowest": 40.0}},
    }
    text = report_markdown(results)
    assert "# seqft on b (seed 3)" in text
    assert "| value | 85.00 | 75.00 | n/a | -20.00 | 10.00 | 20.00 | 82.50 |" in text
    assert "| row | a (exact) | b (vqa) |" in text and "| 1: a | 80.00 | 30.00 |" in text
    assert "| 2: b | 45.00 | 45.00 |" in text  # the general table: the task, then the row's mean
    assert "General: start 50.00, final 45.00, change -5.00, lowest 40.00." in text
    assert "Training 1.0s over 4 steps (median 3.0 ms/step), evaluation 2.0s; peak RSS 5.0 MB; " \
           "trainable parameters 1,000 of 20,000." in text


def test_methods_own_their_stage_plan():
    from mcit.runner import build_method

    seq, zero = build_method({"name": "seqft"}), build_method({"name": "zeroshot"})
    joint = build_method({"name": "joint", "steps_factor": 0.5})
    assert seq.stages(["a", "b"]) == [("a", ["a"]), ("b", ["b"])]
    assert joint.stages(["a", "b"]) == [("joint", ["a", "b"])] and zero.stages(["a", "b"]) == []
    assert seq.stage_steps(100, 1, OptimConfig(steps=40)) == 40
    assert seq.stage_steps(100, 1, OptimConfig(epochs=1, batch_size=32)) == 4  # ceil(100 / 32)
    assert joint.stage_steps(200, 2, OptimConfig(steps=40)) == 40  # 0.5 x 40 per task x 2 tasks
    assert joint.stage_steps(200, 2, OptimConfig(epochs=1, batch_size=10)) == 10  # epochs span both tasks already
