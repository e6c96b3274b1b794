"""Experience replay: a buffer of old-task samples mixed into every later task's training.

The buffer holds sample ids (not tensors), so it is small, exact on resume and readable in
``method.json``. Selection is a seeded random permutation of each task's training set (our
choice; methods.md): the buffer keeps its first ``per_task`` ids, or, with a total ``size``,
``size // tasks seen`` of each task, shrinking older tasks' shares to a prefix of the same
permutation when a task arrives.

Mixing: ``mix: ratio`` draws each batch with replacement so that a ``ratio`` share of it comes
from the buffer in expectation (He et al.'s code uses 0.2); ``mix: extra`` appends the buffer
to the task's data and shuffles by epochs.
"""

from __future__ import annotations

import random
from typing import Literal

import torch
from pydantic import Field, model_validator

from mcit.data.format import Sample
from mcit.errors import McitError
from mcit.methods import register
from mcit.methods.base import Method, MethodOptions, TaskContext
from mcit.utils import stable_hash


class ReplayOptions(MethodOptions):
    per_task: int | None = Field(150, ge=1, description="samples kept per finished task (ignored when size is set)")
    size: int | None = Field(None, ge=1, description="total buffer size, split evenly over the finished tasks")
    mix: Literal["ratio", "extra"] = Field(
        "ratio", description="ratio: a `ratio` share of each batch from the buffer; extra: buffer appended to the data"
    )
    ratio: float = Field(0.2, gt=0, lt=1, description="expected share of each batch drawn from the buffer (mix: ratio)")

    @model_validator(mode="after")
    def _quota(self):
        if self.per_task is None and self.size is None:
            raise ValueError("set per_task or size")
        return self


class ReplayBuffer:
    """Old-task sample ids by task, chosen by a seeded per-task permutation."""

    def __init__(self, per_task: int | None = None, size: int | None = None):
        self.per_task, self.size = per_task, size
        self.ids: dict[str, list[str]] = {}

    def quota(self, n_tasks: int) -> int:
        return self.size // n_tasks if self.size is not None else self.per_task

    def add(self, task: str, samples: list[Sample], seed: int) -> None:
        order = [s.id for s in samples]
        random.Random(int(stable_hash([seed, task]), 16)).shuffle(order)
        self.ids[task] = order
        q = self.quota(len(self.ids))
        for t in self.ids:
            self.ids[t] = self.ids[t][:q]

    def samples(self, train_data: dict[str, list[Sample]], exclude: str | None = None,
                only: str | None = None) -> list[Sample]:
        """The buffer's samples (of every task but ``exclude``, or of ``only``), in buffer order."""
        out = []
        for task, ids in self.ids.items():
            if task == exclude or (only is not None and task != only):
                continue
            if task not in train_data:
                raise McitError(f"replay buffer holds task {task!r}, which is not in this run's stream")
            by_id = {s.id: s for s in train_data[task]}
            missing = [i for i in ids if i not in by_id]
            if missing:
                raise McitError(f"replay buffer: sample ids {missing[:3]} of task {task!r} are not in its training data")
            out.extend(by_id[i] for i in ids)
        return out

    def __len__(self) -> int:
        return sum(len(v) for v in self.ids.values())

    def state(self) -> dict:
        return {"ids": self.ids}

    def load(self, meta: dict) -> None:
        self.ids = {t: list(v) for t, v in meta.get("ids", {}).items()}


def mix_weights(n_current: int, n_replay: int, ratio: float) -> torch.Tensor | None:
    """Sampling weights giving the replay part a ``ratio`` share of each batch in expectation."""
    if n_replay == 0 or n_current == 0:
        return None
    return torch.cat([torch.full((n_current,), (1 - ratio) / n_current), torch.full((n_replay,), ratio / n_replay)])


class ReplayPart:
    """Replay as a part: a buffer of finished tasks' sample ids and how it joins a stage's data.
    The ``replay`` method is this part alone; DGG holds one; a config's ``replay:`` section adds one
    to any other method (:class:`mcit.methods.parts.WithParts`)."""

    def __init__(self, options: ReplayOptions):
        self.options = options
        self.buffer = ReplayBuffer(options.per_task, options.size)
        self.n_current = 0

    def train_data(self, task: str, samples: list[Sample], ctx: TaskContext) -> list[Sample]:
        self.n_current = len(samples)
        return samples + self.buffer.samples(ctx.train_data, exclude=task)

    def sample_weights(self, samples: list[Sample]) -> torch.Tensor | None:
        if self.options.mix == "extra":
            return None
        return mix_weights(self.n_current, len(samples) - self.n_current, self.options.ratio)

    def after_task(self, task: str, ctx: TaskContext) -> None:
        self.buffer.add(task, ctx.train_data[task], ctx.seed)

    # as a part of another method (mcit.methods.parts.WithParts): its state and report entry
    key = "replay_part"

    def state(self) -> dict:
        return self.buffer.state()

    def load(self, meta: dict) -> None:
        self.buffer.load(meta)

    def report(self) -> dict:
        return {t: len(v) for t, v in self.buffer.ids.items()}


@register
class Replay(Method):
    name = "replay"
    Options = ReplayOptions
    summary = "Experience replay: a seeded buffer of old-task samples (ids) mixed into new-task batches."

    def __init__(self, options: ReplayOptions):
        super().__init__(options)
        self.replay = ReplayPart(options)

    @property
    def buffer(self) -> ReplayBuffer:
        return self.replay.buffer

    def train_data(self, task: str, samples: list[Sample], ctx: TaskContext) -> list[Sample]:
        return self.replay.train_data(task, samples, ctx)

    def sample_weights(self, samples: list[Sample], ctx: TaskContext) -> torch.Tensor | None:
        return self.replay.sample_weights(samples)

    def after_task(self, task: str, ctx: TaskContext) -> None:
        self.replay.after_task(task, ctx)

    def state_dict(self):
        return {}, self.buffer.state()

    def load_state_dict(self, tensors, meta) -> None:
        self.buffer.load(meta)
