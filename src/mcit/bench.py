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
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import torch

from mcit.errors import ConfigError
from mcit.methods import TaskContext, get_method
from mcit.progress import progress_bar


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


def overhead(cfg, methods: list[str], steps: int = 100, chunk: int = 5, warm_steps: int = 10,
             show_progress: bool = True) -> dict:
    """Time ``steps`` training steps of each method (the first is the baseline, normally seqft)."""
    from mcit.runner import (
        begin_stage,
        build_method,
        end_stage,
        load_split,
        make_accelerator,
        prepare_benchmark,
        prepare_model,
        stream_tasks,
    )
    from mcit.train import StageTrainer
    from mcit.utils import default_cache_dir, environment_info

    if len(set(methods)) != len(methods) or not methods:
        raise ConfigError(f"--methods: give distinct method names, got {methods}")
    try:
        classes = {m: get_method(m) for m in methods}
    except ConfigError as e:  # name the option the user gave, not the config key
        raise ConfigError(f"--methods: {str(e).removeprefix('method.name: ')}") from None
    bad = [m for m, c in classes.items() if c.schedule != "sequential"]
    if bad:
        raise ConfigError(f"--methods: {bad} do not train task by task; the overhead benchmark times sequential methods")
    if steps < chunk:
        raise ConfigError(f"--steps {steps} must be at least the chunk size {chunk}")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    cache_dir = default_cache_dir() if cfg.cache_dir is None else cfg.cache_dir
    bench = prepare_benchmark(cfg, cache_dir, show_progress)
    tasks = stream_tasks(cfg, bench)
    if len(tasks) < 2:
        raise ConfigError("benchmark.tasks: the overhead benchmark needs a stream of at least two tasks")
    first, second = tasks[:2]
    train = load_split(cfg, bench, tasks, "train")
    accelerator = make_accelerator(cfg)
    device = accelerator.device

    lanes: list[_Lane] = []
    for i, name in enumerate(methods):
        model, encoder, ctx = prepare_model(cfg, bench, cache_dir, accelerator, train, tasks, show_progress and i == 0)
        # The config's options for the method it names; defaults for the others.
        method = build_method(cfg.method if cfg.method.get("name") == name else {"name": name})
        method.setup(model, ctx)
        lane = _Lane(name, method, ctx)
        # Stage 1: a few steps, then the method's end-of-task work (timed).
        samples, weights, _ = begin_stage(method, ctx, 1, first, [first])
        StageTrainer(model, encoder, samples, cfg.train, accelerator, ctx.seed, method, ctx, weights, warm_steps,
                     f"{name} warm-up").run_steps(warm_steps)
        lane.one_off_s += end_stage(method, ctx, first)
        # Stage 2: prepared (before_task timed), then the trainer whose steps are measured.
        samples, weights, seconds = begin_stage(method, ctx, 2, second, [second])
        lane.one_off_s += seconds
        lane.trainer = StageTrainer(model, encoder, samples, cfg.train, accelerator, ctx.seed, method, ctx,
                                    weights, cfg.train.steps, f"{name} timed")
        lane.trainer.run_steps(chunk)  # warm caches and allocator before timing
        lanes.append(lane)

    rounds = steps // chunk
    with progress_bar("bench overhead", total=rounds * len(lanes), enabled=show_progress) as bar:
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

    base_ms = statistics.median(lanes[0].step_ms)
    task_s = cfg.train.steps * base_ms / 1000
    rows = []
    for lane in lanes:
        med = statistics.median(lane.step_ms)
        q = statistics.quantiles(lane.step_ms, n=4)
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
    return {
        "baseline": lanes[0].name,
        "steps": rounds * chunk,
        "chunk": chunk,
        "task_steps": cfg.train.steps,
        "tasks": [first, second],
        "batch_size": cfg.train.batch_size,
        "rows": rows,
        "environment": environment_info(str(device)),
    }
