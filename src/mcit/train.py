"""One training loop for every stage: base pretraining, each task, joint training.

Batches come from a seeded index stream (epoch-wise permutations, or weighted sampling for a
mix), so a stage is a pure function of (weights at its start, data, seed): that is what makes
``--resume`` exact. With several processes each takes its slice of every global batch.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from mcit.data.format import Sample
from mcit.errors import McitError
from mcit.models.encode import IGNORE_INDEX
from mcit.models.families import is_projector
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


def param_groups(named: list[tuple[str, torch.nn.Parameter]], optim) -> list[dict]:
    """AdamW's parameter groups: the projector at ``projector_lr`` when it is set and trains
    beside adapters (LLaVA-1.5's LoRA recipe), everything else at ``lr``."""
    projector = getattr(optim, "projector_lr", None)
    if projector is None or not any("lora_" in n for n, _ in named):
        return [{"params": [p for _, p in named]}]
    slow = [p for n, p in named if is_projector(n) and "lora_" not in n]
    rest = [p for n, p in named if not (is_projector(n) and "lora_" not in n)]
    return [g for g in ({"params": rest}, {"params": slow, "lr": projector}) if g["params"]]


def autocast(device, mixed_precision: str):
    """bf16 autocast on ``device`` when ``mixed_precision`` is ``bf16`` (weights, gradients and
    optimizer state stay float32); a no-op for ``no``."""
    if mixed_precision == "no":
        return nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)


def check_losses(losses: list[float], first_step: int, desc: str) -> None:
    """Raise on the first non-finite loss of steps ``first_step, first_step + 1, ...``."""
    for i, value in enumerate(losses):
        if not math.isfinite(value):
            raise TrainingError(
                f"{desc}: non-finite loss ({value}) at step {first_step + i}; lower the learning rate or check the data"
            )


@dataclass
class StageStats:
    steps: int = 0
    seconds: float = 0.0
    step_ms: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)


# Losses stay on the device between read-backs (a read is a host sync on a GPU): every this
# many steps, at each tracker logging step and at the end of a stage. On a GPU the step times
# of a block between read-backs are its mean (a step alone returns before the device is done).
READ_EVERY = 10


class SingleProcess:
    """The parts of an Accelerator the trainer uses, for work one process does alone (the tiny
    base model, built by the main process while the others wait)."""

    num_processes, process_index, is_main_process = 1, 0, True

    def __init__(self, device, mixed_precision: str = "no"):
        self.device = torch.device(device)
        self.mixed_precision = mixed_precision

    def autocast(self):
        return autocast(self.device, self.mixed_precision)

    @staticmethod
    def no_sync(model):
        return nullcontext()

    @staticmethod
    def backward(loss):
        loss.backward()

    @staticmethod
    def clip_grad_norm_(params, max_norm):
        return torch.nn.utils.clip_grad_norm_(params, max_norm)


class StageTrainer:
    """One stage's optimiser, schedule and batch stream; :meth:`step` runs one optimiser step.

    :func:`train_stage` runs all the steps; ``mcit bench overhead`` interleaves the steps of
    several methods' trainers to time them side by side.
    """

    def __init__(self, model, encoder, samples: list[Sample], optim, accelerator, seed: int, method=None, ctx=None,
                 weights: torch.Tensor | None = None, steps: int | None = None, desc: str = "train"):
        self.steps = optim.steps_for(len(samples)) if steps is None else steps
        self.model, self.encoder, self.samples, self.optim = model, encoder, samples, optim
        self.accelerator, self.method, self.ctx, self.desc = accelerator, method, ctx, desc
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.params = [p for _, p in named]
        if not self.params:
            raise McitError("no trainable parameters: check model.tuning")
        self.optimizer = torch.optim.AdamW(param_groups(named, optim), lr=optim.lr, weight_decay=optim.weight_decay)
        self.scheduler = make_scheduler(self.optimizer, optim.schedule, max(1, self.steps), optim.warmup_ratio)
        self.world, self.rank = accelerator.num_processes, accelerator.process_index
        if optim.batch_size % (self.world * optim.grad_accum):
            raise McitError(
                f"train batch_size {optim.batch_size} must be divisible by processes x grad_accum "
                f"({self.world} x {optim.grad_accum})"
            )
        self.micro = optim.batch_size // optim.grad_accum
        self.batches = index_stream(len(samples), optim.batch_size, torch.Generator().manual_seed(seed), weights)
        self.done = 0

    def run_steps(self, n: int) -> list[float]:
        """``n`` steps in training mode; their losses (read back once, at the end)."""
        self.model.train()
        first = self.done + 1
        losses = torch.stack([self.step() for _ in range(n)]).tolist() if n else []
        check_losses(losses, first, self.desc)
        return losses

    def step(self) -> torch.Tensor:
        """One optimiser step (with gradient accumulation); returns the mean loss as a detached
        0-dim tensor on the device, so that no step waits for the device to finish (read it back
        with ``.item()`` when it is needed; :func:`check_losses` names a non-finite one).

        With several processes, gradients are all-reduced once per step: the micro-batches before
        the last run under ``no_sync``."""
        optim, method, ctx = self.optim, self.method, self.ctx
        global_batch = next(self.batches)
        total = torch.zeros((), device=self.accelerator.device)
        for a in range(optim.grad_accum):
            chunk = global_batch[a * self.micro : (a + 1) * self.micro]
            local = [self.samples[i] for i in chunk[self.rank :: self.world]]
            batch = {k: v.to(self.accelerator.device) for k, v in self.encoder.train_batch(local).items()}
            if ctx is not None:
                ctx.batch_samples = local
            last = a == optim.grad_accum - 1
            with nullcontext() if last or self.world == 1 else self.accelerator.no_sync(self.model):
                with self.accelerator.autocast():
                    outputs = self.model(**batch)
                loss = outputs.loss
                if self.world > 1:
                    # The loss is a mean over this process's answer tokens and DDP averages gradients
                    # over processes; weighting by the token share makes the step the global token
                    # mean, as with one process on the whole batch.
                    tokens = (batch["labels"][:, 1:] != IGNORE_INDEX).sum().float()
                    total_tokens = self.accelerator.reduce(tokens.clone(), "sum")
                    loss = loss * tokens * self.world / total_tokens.clamp(min=1)
                if method is not None:
                    extra = method.extra_loss(batch, outputs, ctx)
                    if extra is not None:
                        loss = loss + extra
                self.accelerator.backward(loss / optim.grad_accum)
            total += loss.detach().float() / optim.grad_accum
        if method is not None:
            method.before_step(ctx)
        if optim.max_grad_norm:
            self.accelerator.clip_grad_norm_(self.params, optim.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.done += 1
        if ctx is not None:
            ctx.step = self.done
        return total


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
    log: tuple[int, int] | None = None,
) -> StageStats:
    """Train ``model`` for ``steps`` optimiser steps on ``samples`` (default: ``optim.steps``, or
    ``optim.epochs`` passes over ``samples`` when that is set). ``log = (offset, every)`` sends the
    loss and learning rate to the accelerator's trackers every ``every`` steps."""
    steps = optim.steps_for(len(samples)) if steps is None else steps
    stats = StageStats()
    if steps == 0 or not samples:
        return stats
    trainer = StageTrainer(model, encoder, samples, optim, accelerator, seed, method, ctx, weights, steps, desc)
    model.train()
    start = time.perf_counter()
    pending: list[torch.Tensor] = []
    queued_only = torch.device(accelerator.device).type == "cuda"  # a step returns before the device ends it
    block_start = time.perf_counter()
    with progress_bar(desc, total=steps, enabled=show_progress and accelerator.is_main_process) as bar:
        for _ in range(steps):
            t0 = time.perf_counter()
            pending.append(trainer.step())
            stats.step_ms.append((time.perf_counter() - t0) * 1000)
            logged = log is not None and trainer.done % log[1] == 0
            if trainer.done % READ_EVERY and not logged and trainer.done < steps:
                bar.advance()
                continue
            # a read-back point: the losses since the last one, checked, shown and logged
            read = torch.stack(pending).tolist()
            if queued_only:  # the read waited for the device: time the block, not the queueing
                block_ms = (time.perf_counter() - block_start) * 1000 / len(read)
                stats.step_ms[-len(read):] = [block_ms] * len(read)
            check_losses(read, trainer.done - len(read) + 1, desc)
            stats.losses.extend(read)
            pending = []
            if logged:  # (global step offset, every): to the trackers
                accelerator.log({"train/loss": read[-1], "train/lr": trainer.scheduler.get_last_lr()[0]},
                                step=log[0] + trainer.done)
            bar.advance(loss=read[-1])
            block_start = time.perf_counter()
    stats.steps = steps
    stats.seconds = time.perf_counter() - start
    model.eval()
    return stats
