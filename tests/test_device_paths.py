"""The paths that matter on a GPU, checked for correctness on the CPU: one all-reduce per step
under gradient accumulation (``no_sync``), bf16 autocast, losses read back only at read points,
and evaluation batches formed by prompt length without changing any prediction."""

from contextlib import contextmanager

import pytest
import torch

from mcit.config import OptimConfig
from mcit.train import SingleProcess, StageTrainer, TrainingError, train_stage
from tests.test_train_loop import _Ctx, _equal_length_samples


class _TwoRanks(SingleProcess):
    """Rank 0 of two whose peer holds the same tokens; records when gradients would be synced."""

    num_processes, process_index = 2, 0

    def __init__(self):
        super().__init__("cpu")
        self.events: list[str] = []

    def reduce(self, tensor, op):
        assert op == "sum"
        return tensor * 2

    @contextmanager
    def _quiet(self):
        self.events.append("no_sync")
        yield

    def no_sync(self, model):
        self.synced_model = model
        return self._quiet()

    def backward(self, loss):
        self.events.append("backward")
        loss.backward()


def test_gradient_accumulation_syncs_once_per_step(tmp_path):
    from tests.conftest import make_tiny

    model, _, enc, _ = make_tiny(tmp_path)
    samples = _equal_length_samples(tmp_path) * 2
    accel = _TwoRanks()
    trainer = StageTrainer(model, enc, samples, OptimConfig(steps=2, batch_size=8, grad_accum=4, warmup_ratio=0.0),
                           accel, seed=0)
    trainer.step()
    # micro-batches 1-3 accumulate locally; the 4th backward all-reduces the accumulated gradient
    assert accel.events == ["no_sync", "backward"] * 3 + ["backward"] and accel.synced_model is model
    accel.events.clear()
    StageTrainer(model, enc, samples, OptimConfig(steps=2, batch_size=8, grad_accum=1, warmup_ratio=0.0),
                 accel, seed=0).step()
    assert accel.events == ["backward"]


class _Dtypes:
    """Records the logits' dtype the loss sees, and the gradients' dtype."""

    def __init__(self):
        self.logits, self.grads = set(), set()

    def extra_loss(self, batch, outputs, ctx):
        self.logits.add(outputs.logits.dtype)

    def before_step(self, ctx):
        self.grads |= {p.grad.dtype for _, p in ctx.named if p.grad is not None}


def test_bf16_autocast_trains_like_float32(tmp_path):
    """bf16 autocast: the forward runs in bf16, weights and gradients stay float32, and 10 steps
    land within a stated tolerance of float32 (measured: losses <= 0.04% apart, the weight change's
    cosine with float32's 0.9993; the bounds are 1% and 0.99)."""
    from tests.conftest import make_tiny

    deltas, losses, seen = {}, {}, {}
    for precision in ("no", "bf16"):
        torch.manual_seed(0)
        model, _, enc, _ = make_tiny(tmp_path)
        start = torch.cat([p.detach().flatten().clone() for p in model.parameters() if p.requires_grad])
        rec = _Dtypes()
        optim = OptimConfig(steps=10, batch_size=4, lr=3e-3, warmup_ratio=0.0)
        stats = train_stage(model, enc, _equal_length_samples(tmp_path), optim, SingleProcess("cpu", precision),
                            seed=0, method=rec, ctx=_Ctx(model), show_progress=False)
        after = torch.cat([p.detach().flatten() for p in model.parameters() if p.requires_grad])
        assert {p.dtype for p in model.parameters()} == {torch.float32}
        deltas[precision], losses[precision], seen[precision] = after - start, stats.losses, rec
    assert seen["no"].logits == {torch.float32} and seen["bf16"].logits == {torch.bfloat16}
    assert seen["no"].grads == seen["bf16"].grads == {torch.float32}
    for a, b in zip(losses["no"], losses["bf16"], strict=True):
        assert b == pytest.approx(a, rel=0.01)
    cosine = torch.nn.functional.cosine_similarity(deltas["no"], deltas["bf16"], dim=0).item()
    assert cosine > 0.99
    assert not torch.equal(deltas["no"], deltas["bf16"])  # bf16 did change the arithmetic


def test_mixed_precision_is_a_config_choice(smoke_cfg):
    from mcit.errors import ConfigError

    assert smoke_cfg().mixed_precision == "no"
    assert smoke_cfg("mixed_precision=bf16").mixed_precision == "bf16"
    with pytest.raises(ConfigError, match="mixed_precision"):
        smoke_cfg("mixed_precision=fp16")
    with pytest.raises(ConfigError, match="eval.merge_lora folds the LoRA into float32 weights"):
        smoke_cfg("mixed_precision=bf16", "eval.merge_lora=true")


def test_losses_stay_on_the_device_until_a_read_point(tmp_path, monkeypatch):
    """A step returns its loss as a tensor (no host sync); the stage reads them back in blocks
    and still names the first non-finite step exactly."""
    import mcit.train as train
    from tests.conftest import make_tiny

    model, _, enc, _ = make_tiny(tmp_path)
    samples = _equal_length_samples(tmp_path)
    trainer = StageTrainer(model, enc, samples, OptimConfig(steps=3, batch_size=4), SingleProcess("cpu"), seed=0)
    loss = trainer.step()
    assert isinstance(loss, torch.Tensor) and loss.dim() == 0 and not loss.requires_grad

    reads = []
    real_check = train.check_losses
    monkeypatch.setattr(train, "check_losses", lambda losses, *a: reads.append(len(losses)) or real_check(losses, *a))
    stats = train_stage(model, enc, samples, OptimConfig(steps=23, batch_size=4), SingleProcess("cpu"), seed=0,
                        show_progress=False)
    assert reads == [10, 10, 3] and len(stats.losses) == 23  # read every READ_EVERY steps and at the end

    class Logging(SingleProcess):
        def __init__(self):
            super().__init__("cpu")
            self.logged = []

        def log(self, values, step):
            self.logged.append(step)

    reads.clear()
    accel = Logging()
    train_stage(model, enc, samples, OptimConfig(steps=23, batch_size=4), accel, seed=0, show_progress=False,
                log=(100, 7))
    assert reads == [7, 3, 4, 6, 1, 2] and accel.logged == [107, 114, 121]  # every 10 steps and at each log step

    class _NanAt:
        def extra_loss(self, batch, outputs, ctx):
            return torch.tensor(float("nan")) if ctx.step == 11 else None  # ctx.step: steps done before

        def before_step(self, ctx):
            pass

    with pytest.raises(TrainingError, match=r"stage: non-finite loss \(nan\) at step 12;"):
        train_stage(model, enc, samples, OptimConfig(steps=20, batch_size=4), SingleProcess("cpu"), seed=0,
                    method=_NanAt(), ctx=_Ctx(model), show_progress=False, desc="stage")


def test_length_sorted_batches_give_the_per_sample_answers(smoke_cfg):
    """The shipped start answers a mix of tasks (prompts of different lengths) in batches formed by
    prompt length: the same answers as one sample at a time, in the samples' order."""
    from mcit.evaluate import generate
    from mcit.models.encode import Encoder
    from mcit.models.load import load_pretrained
    from mcit.models.start import read_manifest, resolve_start
    from mcit.runner import prepare_benchmark

    cfg = smoke_cfg()
    bench = prepare_benchmark(cfg, cfg.cache_dir, show_progress=False)
    samples = [s for t in ("caption", "color", "count", "ocr", "spatial")
               for s in bench.task(t).load("test", bench.image_root)[:5]]
    path = resolve_start("synth")
    model, processor = load_pretrained(path)
    manifest = read_manifest(path)
    enc = Encoder(processor, manifest["prompt_template"], manifest["max_length"])
    lengths = [len(enc.prompt_ids(s)) for s in samples]
    assert len(set(lengths)) >= 3 and lengths != sorted(lengths)  # sorting does regroup the batches
    one_by_one = generate(model, enc, samples, batch_size=1, max_new_tokens=12, device="cpu", sort_by_length=False)
    batched = generate(model, enc, samples, batch_size=8, max_new_tokens=12, device="cpu")
    assert batched == one_by_one
    assert len(set(batched)) >= 5  # real, varied answers, not one string repeated


def _shipped_start_with_lora():
    from mcit.config import LoraConfig
    from mcit.models.encode import Encoder
    from mcit.models.load import load_pretrained
    from mcit.models.start import read_manifest, resolve_start
    from mcit.models.tuning import apply_tuning

    path = resolve_start("synth")
    model, processor = load_pretrained(path)
    manifest = read_manifest(path)
    torch.manual_seed(0)
    model = apply_tuning(model, "lora", LoraConfig(r=8, alpha=16), train_projector=False)
    with torch.no_grad():  # a LoRA that has learnt something: B no longer zero
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    return model, Encoder(processor, manifest["prompt_template"], manifest["max_length"])


def test_merged_lora_evaluation_answers_alike_and_restores_the_weights(smoke_cfg):
    from mcit.evaluate import generate
    from mcit.models.tuning import merged_lora
    from mcit.runner import prepare_benchmark

    cfg = smoke_cfg()
    bench = prepare_benchmark(cfg, cfg.cache_dir, show_progress=False)
    samples = [s for t in ("caption", "color", "count", "ocr") for s in bench.task(t).load("test", bench.image_root)[:6]]
    model, enc = _shipped_start_with_lora()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    plain = generate(model, enc, samples, batch_size=8, max_new_tokens=12, device="cpu")
    with merged_lora(model) as merged:
        assert merged
        inside = generate(model, enc, samples, batch_size=8, max_new_tokens=12, device="cpu")
        name = next(n for n in before if n.endswith("base_layer.weight"))
        assert not torch.equal(dict(model.named_parameters())[name], before[name])  # folded in
    assert inside == plain and len(set(plain)) >= 5
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n  # bit for bit
    from peft.tuners.lora import LoraLayer

    assert not any(m.disable_adapters for m in model.modules() if isinstance(m, LoraLayer))
    assert generate(model, enc, samples[:4], batch_size=4, max_new_tokens=12, device="cpu") == plain[:4]


def test_merged_lora_leaves_expert_banks_alone(tmp_path):
    from mcit.config import LoraConfig
    from mcit.methods.experts import ExpertBank
    from mcit.models.tuning import apply_tuning, merged_lora
    from tests.conftest import make_tiny

    model, _, _, _ = make_tiny(tmp_path)
    model = apply_tuning(model, "lora", LoraConfig(r=2), train_projector=False)
    ExpertBank(model, 2, rank=2, seed=0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with merged_lora(model) as merged:
        assert not merged
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    plain = apply_tuning(make_tiny(tmp_path)[0], "lora", LoraConfig(r=2), train_projector=False).to(torch.bfloat16)
    with merged_lora(plain) as merged:
        assert not merged  # bf16 weights would lose a small update's bits: left unmerged


def test_merge_lora_in_a_run_changes_no_result(smoke_cfg, tmp_path):
    """``eval.merge_lora``: every row evaluated merged, and training goes on from the exact weights
    (the last stage's trainable state is bit-identical to a run without it)."""
    from safetensors.torch import load_file

    from mcit.runner import run

    lora = ("model.tuning=lora", "benchmark.tasks=[color,count]", "benchmark.general=[]", "html_report=false")
    plain = run(smoke_cfg(*lora), tmp_path / "plain", show_progress=False)
    merged = run(smoke_cfg(*lora, "eval.merge_lora=true"), tmp_path / "merged", show_progress=False)
    assert merged["matrix"] == plain["matrix"]
    ckpt = "checkpoints/stage_02_count/trainable.safetensors"
    a, b = load_file(str(tmp_path / "plain" / ckpt)), load_file(str(tmp_path / "merged" / ckpt))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_each_process_weights_its_loss_by_its_share_of_answer_tokens(tmp_path):
    """Rank 0 of two, its peer holding as many answer tokens: the loss it back-propagates is its own
    mean (tokens x 2 / (2 x tokens) = 1), so DDP's average is the global token mean."""
    from tests.conftest import make_tiny
    from tests.test_train_loop import _four_colours

    losses = {}
    for name, accel, batch in (("two", _TwoRanks(), 4), ("one", SingleProcess("cpu"), 2)):
        torch.manual_seed(0)
        model, _, enc, _ = make_tiny(tmp_path)
        samples = _four_colours(tmp_path)
        trainer = StageTrainer(model, enc, samples, OptimConfig(steps=1, batch_size=batch, warmup_ratio=0.0), accel,
                               seed=0)
        if name == "one":  # rank 0's share of the two-process batch: every other sample of it
            two_batch = next(StageTrainer(model, enc, samples, OptimConfig(batch_size=4), SingleProcess("cpu"),
                                          seed=0).batches)
            trainer.batches = iter([two_batch[0::2]])
        losses[name] = trainer.step().item()
    assert losses["two"] == pytest.approx(losses["one"], rel=1e-6)

    class Uneven(_TwoRanks):
        def reduce(self, tensor, op):  # the peer holds three times as many answer tokens
            return tensor * 4

    torch.manual_seed(0)
    model, _, enc, _ = make_tiny(tmp_path)
    trainer = StageTrainer(model, enc, _four_colours(tmp_path), OptimConfig(steps=1, batch_size=4, warmup_ratio=0.0),
                           Uneven(), seed=0)
    assert trainer.step().item() == pytest.approx(losses["one"] * 2 / 4, rel=1e-6)  # tokens x world / total



def test_framework_benchmark_refuses_what_the_bare_loop_does_not_do(smoke_cfg):
    from mcit.bench import framework
    from mcit.errors import ConfigError

    with pytest.raises(ConfigError, match="train.grad_accum: the bare loop takes one batch per step"):
        framework(smoke_cfg("train.grad_accum=2"), ["replay"], show_progress=False)
