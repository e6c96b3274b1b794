"""One training loop for every stage: base pretraining, each task, joint training.

Batches come from a seeded index stream (epoch-wise permutations, or weighted sampling for a
mix), so a stage is a pure function of (weights at its start, data, seed): that is what makes
``--resume`` exact. With several processes each takes its slice of every global batch.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from mcit.data.format import Sample
from mcit.errors import McitError
from mcit.progress import progress_bar


class TrainingError(McitError):
    """Training cannot go on (a non-finite loss)."""


def index_stream(
    n: int, batch_size: int, generator: torch.Generator, weights: torch.Tensor | None = None
) -> Iterator[list[int]]:
    """Infinite batches of indices: shuffled epochs, or weighted draws with replacement."""
    if weights is not None:
        while True:
            yield torch.multinomial(weights, batch_size, replacement=True, generator=generator).tolist()
    buffer: list[int] = []
    while True:
        while len(buffer) < batch_size:
            buffer.extend(torch.randperm(n, generator=generator).tolist())
        batch, buffer = buffer[:batch_size], buffer[batch_size:]
        yield batch


def make_scheduler(optimizer, schedule: str, steps: int, warmup_ratio: float):
    warmup = int(round(steps * warmup_ratio))

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, steps - warmup)
        if schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@dataclass
class StageStats:
    steps: int = 0
    seconds: float = 0.0
    step_ms: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)


def train_stage(
    model,
    encoder,
    samples: list[Sample],
    optim,
    accelerator,
    seed: int,
    method=None,
    ctx=None,
    weights: torch.Tensor | None = None,
    steps: int | None = None,
    desc: str = "train",
    show_progress: bool = True,
) -> StageStats:
    """Train ``model`` for ``steps`` (default ``optim.steps``) optimiser steps on ``samples``."""
    steps = optim.steps if steps is None else steps
    stats = StageStats()
    if steps == 0 or not samples:
        return stats
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise McitError("no trainable parameters: check model.tuning")
    optimizer = torch.optim.AdamW(params, lr=optim.lr, weight_decay=optim.weight_decay)
    scheduler = make_scheduler(optimizer, optim.schedule, steps, optim.warmup_ratio)
    generator = torch.Generator().manual_seed(seed)
    world, rank = accelerator.num_processes, accelerator.process_index
    if optim.batch_size % (world * optim.grad_accum):
        raise McitError(
            f"train batch_size {optim.batch_size} must be divisible by processes x grad_accum "
            f"({world} x {optim.grad_accum})"
        )
    micro = optim.batch_size // optim.grad_accum
    batches = index_stream(len(samples), optim.batch_size, generator, weights)
    model.train()
    start = time.perf_counter()
    with progress_bar(desc, total=steps, enabled=show_progress and accelerator.is_main_process) as bar:
        for step in range(steps):
            t0 = time.perf_counter()
            global_batch = next(batches)
            total = 0.0
            for a in range(optim.grad_accum):
                chunk = global_batch[a * micro : (a + 1) * micro]
                local = chunk[rank::world]
                batch = {k: v.to(accelerator.device) for k, v in encoder.train_batch([samples[i] for i in local]).items()}
                outputs = model(**batch)
                loss = outputs.loss
                if method is not None:
                    extra = method.extra_loss(batch, outputs, ctx)
                    if extra is not None:
                        loss = loss + extra
                if not torch.isfinite(loss):
                    raise TrainingError(
                        f"{desc}: non-finite loss ({loss.item()}) at step {step + 1}; "
                        "lower the learning rate or check the data"
                    )
                accelerator.backward(loss / optim.grad_accum)
                total += loss.item() / optim.grad_accum
            if method is not None:
                method.before_step(ctx)
            if optim.max_grad_norm:
                accelerator.clip_grad_norm_(params, optim.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if ctx is not None:
                ctx.step = step + 1
            stats.losses.append(total)
            stats.step_ms.append((time.perf_counter() - t0) * 1000)
            bar.advance(loss=total)
    stats.steps = steps
    stats.seconds = time.perf_counter() - start
    model.eval()
    return stats
