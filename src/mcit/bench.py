"""``mcit bench overhead``: the training-step cost of each method against seqft, side by side.

Every method gets its own fresh copy of the starting model and is brought to the state it is
in while learning the second task of the stream (task 1 trained for a few steps, its
``after_task`` run, task 2's data, weights and ``before_task`` prepared), so penalties,
replay mixing and distillation are all active. The timed steps are then interleaved in small
chunks, rotating the order every round (A B C, B C A, ...), so that the machine's noise falls on
every method alike; the report is the median step time and its ratio to seqft's median from
the same run. One-off costs (``after_task`` of task 1, ``before_task`` of task 2: importance
estimation, teacher pass) are reported in seconds and as a fraction of one task's training
time at seqft's median step time.

``mcit bench framework`` puts mcit beside the code a user would write by hand: a bare PyTorch +
PEFT step (encode the batch, forward, backward, clip, AdamW, schedule; on the same batches as
mcit's seqft step) interleaved with seqft, replay, EWC and DGG; and one task's evaluation by
per-sample ``generate`` (what the anchors' eval scripts do) against mcit's batched evaluator,
with both predictions checked to be identical.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import torch

from mcit.errors import ConfigError
from mcit.methods import TaskContext, get_method
from mcit.progress import progress_bar


class BareLoop:
    """The training step a user writes by hand, on the index stream mcit's trainer draws."""

    def __init__(self, model, encoder, samples, optim, device, seed: int, steps: int, mixed_precision: str = "no"):
        from mcit.train import index_stream, make_scheduler

        self.model, self.encoder, self.samples, self.optim, self.device = model, encoder, samples, optim, device
        self.mixed_precision = mixed_precision
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=optim.lr, weight_decay=optim.weight_decay)
        self.scheduler = make_scheduler(self.optimizer, optim.schedule, steps, optim.warmup_ratio)
        self.batches = index_stream(len(samples), optim.batch_size, torch.Generator().manual_seed(seed))

    def run_steps(self, n: int) -> None:
        self.model.train()
        for _ in range(n):
            self.step()

    def step(self) -> torch.Tensor:
        from mcit.train import autocast

        batch = self.encoder.train_batch([self.samples[i] for i in next(self.batches)])
        with autocast(self.device, self.mixed_precision):
            loss = self.model(**{k: v.to(self.device) for k, v in batch.items()}).loss
        loss.backward()
        if self.optim.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.params, self.optim.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()


@dataclass
class _Lane:
    name: str
    method: object
    ctx: TaskContext
    trainer: object = None
    step_ms: list[float] = field(default_factory=list)
    one_off_s: float = 0.0
    cuda_peak_mb: float | None = None


def _cuda(device) -> bool:
    return torch.device(device).type == "cuda"


def _check_methods(methods: list[str]) -> None:
    if len(set(methods)) != len(methods) or not methods:
        raise ConfigError(f"--methods: give distinct method names, got {methods}")
    try:
        classes = {m: get_method(m) for m in methods}
    except ConfigError as e:  # name the option the user gave, not the config key
        raise ConfigError(f"--methods: {str(e).removeprefix('method.name: ')}") from None
    bad = [m for m, c in classes.items() if c.walk != "sequential"]
    if bad:
        raise ConfigError(f"--methods: {bad} do not train task by task; the benchmark times sequential methods")


class _Setup:
    """What every lane shares: the benchmark, the stream's first two tasks, their training data."""

    def __init__(self, cfg, show_progress: bool):
        from mcit.assembly import load_split, make_accelerator, prepare_benchmark, stream_tasks
        from mcit.utils import default_cache_dir

        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.cfg, self.show = cfg, show_progress
        self.cache_dir = default_cache_dir() if cfg.cache_dir is None else cfg.cache_dir
        self.bench = prepare_benchmark(cfg, self.cache_dir, show_progress)
        self.tasks = stream_tasks(cfg, self.bench)
        if len(self.tasks) < 2:
            raise ConfigError("benchmark.tasks: the benchmark needs a stream of at least two tasks")
        self.first, self.second = self.tasks[:2]
        self.train = load_split(cfg, self.bench, self.tasks, "train")
        self.accelerator = make_accelerator(cfg)
        self.device = self.accelerator.device
        self.built = 0

    def model(self):
        from mcit.assembly import prepare_model

        self.built += 1
        return prepare_model(self.cfg, self.bench, self.cache_dir, self.accelerator, self.train, self.tasks,
                             self.show and self.built == 1)

    def method_lane(self, name: str, warm_steps: int, chunk: int) -> _Lane:
        """A method brought to task 2 of the stream, its trainer warmed by ``chunk`` steps."""
        from mcit.assembly import begin_stage, build_method, end_stage
        from mcit.train import StageTrainer

        cfg, accelerator = self.cfg, self.accelerator
        model, encoder, ctx = self.model()
        # The config's options for the method it names; defaults for the others.
        method = build_method(cfg.method if cfg.method.get("name") == name else {"name": name})
        method.setup(model, ctx)
        lane = _Lane(name, method, ctx)
        # Stage 1: a few steps, then the method's end-of-task work (timed).
        samples, weights, _ = begin_stage(method, ctx, 1, self.first, [self.first])
        StageTrainer(model, encoder, samples, cfg.train, accelerator, ctx.seed, method, ctx, weights, warm_steps,
                     f"{name} warm-up").run_steps(warm_steps)
        lane.one_off_s += end_stage(method, ctx, self.first)
        # Stage 2: prepared (before_task timed), then the trainer whose steps are measured.
        samples, weights, seconds = begin_stage(method, ctx, 2, self.second, [self.second])
        lane.one_off_s += seconds
        lane.trainer = StageTrainer(model, encoder, samples, cfg.train, accelerator, ctx.seed, method, ctx,
                                    weights, cfg.train.steps, f"{name} timed")
        lane.trainer.run_steps(chunk)  # warm caches and allocator before timing
        return lane

    def bare_lane(self, chunk: int) -> _Lane:
        """The hand-written loop on task 2's data, drawing the batches seqft's trainer draws."""
        model, encoder, ctx = self.model()
        seed = self.cfg.seed * 1000 + 2  # the stage seed begin_stage gives task 2
        lane = _Lane("bare", None, ctx)
        lane.trainer = BareLoop(model, encoder, self.train[self.second], self.cfg.train, self.device, seed,
                                self.cfg.train.steps, self.cfg.mixed_precision)
        lane.trainer.run_steps(chunk)
        return lane


def _interleave(lanes: list[_Lane], steps: int, chunk: int, device, show_progress: bool) -> int:
    """Time ``steps`` steps of every lane in chunks, rotating the order each round; steps timed."""
    rounds = steps // chunk
    with progress_bar("bench", total=rounds * len(lanes), enabled=show_progress) as bar:
        for r in range(rounds):
            for k in range(len(lanes)):
                lane = lanes[(r + k) % len(lanes)]
                if _cuda(device):
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                for _ in range(chunk):
                    t0 = time.perf_counter()
                    lane.trainer.step()
                    if _cuda(device):
                        torch.cuda.synchronize()
                    lane.step_ms.append((time.perf_counter() - t0) * 1000)
                if _cuda(device):
                    peak = torch.cuda.max_memory_allocated() / 2**20
                    lane.cuda_peak_mb = max(lane.cuda_peak_mb or 0.0, peak)
                bar.advance()
    return rounds * chunk


def _rows(lanes: list[_Lane], task_steps: int) -> list[dict]:
    base_ms = statistics.median(lanes[0].step_ms)
    task_s = task_steps * base_ms / 1000
    rows = []
    for lane in lanes:
        med = statistics.median(lane.step_ms)
        q = statistics.quantiles(lane.step_ms, n=4)
        state_bytes = 0
        if lane.method is not None:
            tensors, _ = lane.method.state_dict()
            state_bytes = sum(t.numel() * t.element_size() for t in tensors.values()) + lane.method.extra_memory_bytes()
        rows.append({
            "method": lane.name,
            "step_ms_median": round(med, 3),
            "step_ms_iqr": [round(q[0], 3), round(q[2], 3)],
            "ratio": round(med / base_ms, 4),
            "one_off_s": round(lane.one_off_s, 3),
            "one_off_fraction": round(lane.one_off_s / task_s, 4),
            "method_state_mb": round(state_bytes / 2**20, 3),
            # trainable parameters (the LoRA experts of the expert methods live here, not in the state)
            "trainable_params": sum(p.numel() for p in lane.ctx.unwrapped.parameters() if p.requires_grad),
            "cuda_peak_mb": None if lane.cuda_peak_mb is None else round(lane.cuda_peak_mb, 1),
        })
    return rows


def overhead(cfg, methods: list[str], steps: int = 100, chunk: int = 5, warm_steps: int = 10,
             show_progress: bool = True) -> dict:
    """Time ``steps`` training steps of each method (the first is the baseline, normally seqft)."""
    from mcit.utils import environment_info

    _check_methods(methods)
    if steps < chunk:
        raise ConfigError(f"--steps {steps} must be at least the chunk size {chunk}")
    setup = _Setup(cfg, show_progress)
    lanes = [setup.method_lane(name, warm_steps, chunk) for name in methods]
    timed = _interleave(lanes, steps, chunk, setup.device, show_progress)
    return {
        "baseline": lanes[0].name,
        "steps": timed,
        "chunk": chunk,
        "task_steps": cfg.train.steps,
        "tasks": [setup.first, setup.second],
        "batch_size": cfg.train.batch_size,
        "rows": _rows(lanes, cfg.train.steps),
        "environment": environment_info(str(setup.device)),
    }


def _time_evaluation(model, encoder, samples, batch_size: int, max_new: int, device, rounds: int) -> dict:
    """Per-sample generation (batch 1, the samples' order) against the batched, length-sorted
    evaluator (and, for a plain LoRA, the batched evaluator with the LoRA merged: ``eval.merge_lora``),
    ``rounds`` passes each in rotated order; their predictions must agree."""
    from mcit.evaluate import generate
    from mcit.models.tuning import mergeable_lora_layers, merged_lora

    def merged():
        with merged_lora(model):
            return generate(model, encoder, samples, batch_size, max_new, device)

    runs = {
        "per_sample": lambda: generate(model, encoder, samples, 1, max_new, device, sort_by_length=False),
        "batched": lambda: generate(model, encoder, samples, batch_size, max_new, device),
    }
    mergeable = bool(mergeable_lora_layers(model))
    if mergeable:
        runs["batched_merged"] = merged
    seconds = {k: [] for k in runs}
    predictions = {}
    names = list(runs)
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            if _cuda(device):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            predictions[name] = runs[name]()
            if _cuda(device):
                torch.cuda.synchronize()
            seconds[name].append(time.perf_counter() - t0)
    same = sum(a == b for a, b in zip(predictions["per_sample"], predictions["batched"], strict=True))
    med = {k: statistics.median(v) for k, v in seconds.items()}
    merged_info = {}
    if mergeable:
        merged_info = {
            "merged_speedup_over_batched": round(med["batched"] / med["batched_merged"], 3),
            "merged_identical_predictions": sum(a == b for a, b in zip(predictions["per_sample"],
                                                                       predictions["batched_merged"], strict=True)),
        }
    return {
        "samples": len(samples),
        "batch_size": batch_size,
        "max_new_tokens": max_new,
        "rounds": rounds,
        "seconds_median": {k: round(v, 4) for k, v in med.items()},
        "samples_per_s": {k: round(len(samples) / v, 2) for k, v in med.items()},
        "speedup": round(med["per_sample"] / med["batched"], 3),
        "identical_predictions": same,
        "all_identical": same == len(samples),
        **merged_info,
    }


def framework(cfg, methods: list[str], steps: int = 100, chunk: int = 5, warm_steps: int = 10,
              eval_samples: int = 64, eval_rounds: int = 3, eval_task: str | None = None,
              show_progress: bool = True) -> dict:
    """The bare loop, then mcit's seqft and ``methods``, interleaved (ratios to the bare loop);
    then one task's evaluation (default: the stream's second) per sample against batched."""
    from mcit.errors import McitError
    from mcit.utils import environment_info

    names = ["seqft"] + [m for m in methods if m != "seqft"]
    _check_methods(names)
    if steps < chunk:
        raise ConfigError(f"--steps {steps} must be at least the chunk size {chunk}")
    if cfg.train.grad_accum != 1:
        raise ConfigError("train.grad_accum: the bare loop takes one batch per step; benchmark with grad_accum 1")
    setup = _Setup(cfg, show_progress)
    eval_task = eval_task or setup.second
    if eval_task not in setup.bench.tasks:
        raise ConfigError(f"--eval-task: benchmark {setup.bench.name!r} has no task {eval_task!r}; "
                          f"available: {', '.join(setup.bench.tasks)}")
    lanes = [setup.bare_lane(chunk)] + [setup.method_lane(name, warm_steps, chunk) for name in names]
    timed = _interleave(lanes, steps, chunk, setup.device, show_progress)

    seqft = lanes[1]
    spec = setup.bench.task(eval_task)
    test = spec.load("test", setup.bench.image_root)[: min(eval_samples, cfg.benchmark.max_test or eval_samples)]
    evaluation = _time_evaluation(seqft.ctx.unwrapped, seqft.trainer.encoder, test, cfg.eval.batch_size,
                                  spec.max_new_tokens or cfg.eval.max_new_tokens, setup.device, eval_rounds)
    evaluation["task"] = eval_task
    if not evaluation["all_identical"]:
        raise McitError(f"bench framework: batched evaluation changed {evaluation['samples'] - evaluation['identical_predictions']} "
                        f"of {evaluation['samples']} predictions against per-sample generation")
    return {
        "baseline": "bare",
        "steps": timed,
        "chunk": chunk,
        "tasks": [setup.first, setup.second],
        "batch_size": cfg.train.batch_size,
        "rows": _rows(lanes, cfg.train.steps),
        "evaluation": evaluation,
        "environment": environment_info(str(setup.device)),
    }
