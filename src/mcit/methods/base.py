"""The method interface: a small class with optional lifecycle hooks.

The runner calls hooks and never looks at method names. A method declares its options as a
pydantic model (validated with the run config, before any work) and how it walks the stream:

- ``schedule = "sequential"``: one training stage per task, evaluated after each (the default).
- ``schedule = "joint"``: one stage on the union of the stream's tasks.
- ``schedule = "none"``: no training (zero-shot).

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
    """What hooks may read: the model, the stream, the current position and the data."""

    model: Any
    accelerator: Any
    config: Any  # RunConfig
    tasks: list[str]
    train_data: dict[str, list[Sample]]  # every task's training samples (for replay, importance)
    stage: int = 0  # 1-based index of the task being trained; 0 before training
    task: str | None = None
    step: int = 0  # optimiser steps done in the current stage
    seed: int = 0
    batch_samples: list[Sample] = field(default_factory=list)  # the samples of the batch being trained on
    extras: dict[str, Any] = field(default_factory=dict)

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
    schedule: ClassVar[Literal["sequential", "joint", "none"]] = "sequential"
    summary: ClassVar[str] = ""
    paper: ClassVar[str] = ""

    def __init__(self, options: MethodOptions):
        self.options = options

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

    def route(self, batch: dict, ctx: TaskContext) -> None:
        """Prepare the model for an inference batch (choose an expert or prompt)."""

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
