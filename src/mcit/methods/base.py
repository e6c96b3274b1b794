"""The method interface: a small class with optional lifecycle hooks.

The runner calls hooks and never looks at method names. A method declares its options as a
pydantic model (validated with the run config, before any work) and how it walks the stream
(``walk``; the method's ``stages`` and ``stage_steps`` turn it into the stage plan the runner runs):

- ``walk = "sequential"``: one training stage per task, evaluated after each (the default).
- ``walk = "joint"``: one stage on the union of the stream's tasks.
- ``walk = "none"``: no training (zero-shot).

Method state for checkpoints is ``(tensors, meta)``: tensors go to safetensors, meta to JSON.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:
    import torch

    from mcit.data.format import Sample


class MethodOptions(BaseModel):
    """Options common to every method; subclasses add their own fields."""

    model_config = ConfigDict(extra="forbid")


@dataclass
class TaskContext:
    """What hooks may read: the model, the stream, the current position and the data.

    At test time a method does not see which task a sample comes from (``task`` is the stage's
    training task): it routes by the sample alone, and evaluation scores the routing it reports.
    Only a method whose inference is task-aware by design (``Method.task_id_at_test``, reported in
    results.json) is told the task under evaluation, in ``oracle_task``.
    """

    model: Any
    accelerator: Any
    config: Any  # RunConfig
    tasks: list[str]
    train_data: dict[str, list[Sample]]  # every task's training samples (for replay, importance)
    stage: int = 0  # 1-based index of the task being trained; 0 before training
    task: str | None = None
    step: int = 0  # optimiser steps done in the current stage
    # the run's seed in setup; in a stage, that stage's seed (run seed x 1000 + stage), which is what
    # makes a resumed stage replay exactly; ``run_seed`` is the run's seed throughout
    seed: int = 0
    batch_samples: list[Sample] = field(default_factory=list)  # the samples of the batch being trained on
    encoder: Any = None  # the run's Encoder (prompts, batches)
    benchmark: Any = None  # the run's Benchmark (base-mix data for pre-trained subspaces, caches)
    oracle_task: str | None = None  # the task under evaluation: only for ``task_id_at_test`` methods
    run_seed: int | None = None  # default: ``seed`` as given at construction (the run's)

    def __post_init__(self):
        if self.run_seed is None:
            self.run_seed = self.seed

    @property
    def unwrapped(self):
        """The model without a DDP/FSDP wrapper: for side passes that must not sync gradients."""
        return self.accelerator.unwrap_model(self.model) if self.accelerator is not None else self.model

    def trainable_parameters(self) -> dict[str, torch.nn.Parameter]:
        """Trainable parameters by name (names of the unwrapped model, stable across wrappers)."""
        return {n: p for n, p in self.unwrapped.named_parameters() if p.requires_grad}


class Method:
    name: ClassVar[str] = ""
    Options: ClassVar[type[MethodOptions]] = MethodOptions
    walk: ClassVar[Literal["sequential", "joint", "none"]] = "sequential"
    summary: ClassVar[str] = ""
    paper: ClassVar[str] = ""

    def __init__(self, options: MethodOptions):
        self.options = options

    # --- the stage plan ------------------------------------------------------------------
    def stages(self, tasks: list[str]) -> list[tuple[str, list[str]]]:
        """The training stages in order, as (label, the tasks trained together); each is followed
        by a matrix row."""
        if self.walk == "none":
            return []
        if self.walk == "joint":
            return [("joint", list(tasks))]
        return [(t, [t]) for t in tasks]

    def stage_steps(self, n_samples: int, n_tasks: int, optim) -> int:
        """Optimiser steps of a stage training on ``n_samples`` (spanning ``n_tasks`` tasks)."""
        return optim.steps_for(n_samples)

    # --- lifecycle hooks; defaults do nothing -------------------------------------------
    def setup(self, model, ctx: TaskContext) -> None:
        """Freeze or add modules once, before the first stage."""

    def train_data(self, task: str, samples: list[Sample], ctx: TaskContext) -> list[Sample]:
        """The samples to train this stage on (e.g. the task's data plus replay)."""
        return samples

    def sample_weights(self, samples: list[Sample], ctx: TaskContext) -> torch.Tensor | None:
        """Sampling weights over ``samples`` (drawn with replacement), or None for shuffled epochs."""
        return None

    def before_task(self, task: str, samples: list[Sample], ctx: TaskContext) -> None:
        """Before a stage trains on ``samples`` (e.g. a teacher pass over them)."""

    def extra_loss(self, batch: dict, outputs, ctx: TaskContext) -> torch.Tensor | None:
        """A loss term added to the task loss (regularisers, distillation)."""
        return None

    def before_step(self, ctx: TaskContext) -> None:
        """Edit gradients after backward, before clipping and the optimiser step."""

    def after_task(self, task: str, ctx: TaskContext) -> None:
        """After a stage: importances, snapshots, bases."""

    # inference told the task of each test set (a task-aware method, e.g. a reference that passes
    # the task index at evaluation); recorded in results.json as ``task_id_at_test``
    @property
    def task_id_at_test(self) -> bool:
        return False

    def route(self, batch: dict, ctx: TaskContext) -> torch.Tensor | None:
        """Prepare the model for an inference batch (choose an expert or prompt). A method that
        routes returns a boolean ``(batch, len(ctx.tasks))`` tensor: which tasks' parameters each
        sample was routed to (one task for a task expert; every task sharing an expert; none for
        prompts of several tasks); evaluation scores it against the sample's true task
        (``routing_accuracy`` in ``method_report``: the share of a task's test samples routed to it)."""
        return None

    def eval_summary(self) -> dict[str, Any] | None:
        """What the method observed while the test set just evaluated was answered (e.g. mean
        router gates), JSON-able; evaluation files each key under ``method_report[key][row][task]``.
        Called after each task's evaluation; the method resets what it accumulates."""
        return None

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return {}, {}

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        pass

    def report(self) -> dict[str, Any]:
        """What results.json records of the method (``method_report``), e.g. routing accuracy."""
        return {}

    def extra_memory_bytes(self) -> int:
        """Memory held outside ``state_dict`` (e.g. precomputed teacher outputs), for benchmarks."""
        return 0
