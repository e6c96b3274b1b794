"""Task-similarity-informed regularisation (He et al., arXiv 2311.16206): TIR on EWC and MAS.

Importance is kept as the element-wise maximum over finished tasks, each task's importance
normalised first (``normalize``; the paper divides by the sum, we default to the mean, which
differs by a constant that lambda absorbs), and every element remembers the task that supplied
its maximum. Before training task t, each element's importance is scaled by (1 - s(owner)),
s = the task similarity of t to the owner (:mod:`mcit.similarity`): weights that mattered to a
task like the new one are freed, weights owned by unlike tasks are held. The anchor is the
parameters after the latest task (as online EWC).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator

from mcit.methods import register
from mcit.methods.base import TaskContext
from mcit.methods.ewc import EWC
from mcit.methods.mas import MAS
from mcit.methods.penalty import PenaltyOptions


class TIROptions(PenaltyOptions):
    normalize: Literal["none", "mean", "max"] = Field(
        "mean", description="each task's importance divided by its mean (or max) before the element-wise max")
    mode: Literal["tir"] = Field("tir", description="TIR's consolidation: element-wise max with owners (fixed)")
    similarity_samples: int = Field(1000, ge=1, description="training samples per task embedded for the similarity")

    @model_validator(mode="after")
    def _no_gamma(self):
        if self.gamma != 1.0:
            raise ValueError("gamma does not apply to TIR (importance is a max over tasks, not a decayed sum)")
        return self


class TIRMixin:
    """Max-importance with owners, rescaled by task similarity before each task."""

    def __init__(self, options):
        super().__init__(options)
        self.owner: dict[str, torch.Tensor] = {}
        self.scale: torch.Tensor | None = None  # per finished task: 1 - similarity to the current task
        self.similarities: list[float] = []
        self._embeddings = None

    def consolidate(self, new: dict[str, torch.Tensor], params: dict[str, torch.Tensor]) -> None:
        k = len(self.tasks_done)  # the task just finished (its index in the stream)
        for n, p in params.items():
            theta = p.detach().float()
            omega_new = new[n].to(theta.device)
            if n not in self.omega:
                self.omega[n] = omega_new
                self.owner[n] = torch.full_like(omega_new, k, dtype=torch.int16)
            else:
                omega_old = self.omega[n].to(theta.device)
                larger = omega_new > omega_old
                self.omega[n] = torch.where(larger, omega_new, omega_old)
                self.owner[n] = torch.where(larger, torch.full_like(self.owner[n], k), self.owner[n].to(theta.device))
            self.anchor[n] = theta.clone()

    def task_similarity(self, task: str, ctx: TaskContext) -> list[float]:
        """Similarity of ``task`` to each finished task, in stream order."""
        from mcit.similarity import for_run, similarity_to_finished

        if self._embeddings is None:
            self._embeddings = for_run(ctx, self.options.similarity_samples)
        return similarity_to_finished(self._embeddings, self.tasks_done, task, ctx)

    def before_task(self, task: str, samples, ctx: TaskContext) -> None:
        super().before_task(task, samples, ctx)
        if not self.tasks_done:
            return
        self.similarities = self.task_similarity(task, ctx)
        self.scale = 1.0 - torch.tensor(self.similarities, dtype=torch.float32)
        self._active = None  # rebind with the rescaled importance

    def effective(self, name: str) -> torch.Tensor:
        omega = self.omega[name]
        if self.scale is None:
            return omega
        return omega * self.scale.to(omega.device)[self.owner[name].to(omega.device).long()]

    def state_dict(self):
        tensors, meta = super().state_dict()
        tensors.update({f"owner.{n}": v for n, v in self.owner.items()})
        if self.scale is not None:
            tensors["tir_scale"] = self.scale
        return tensors, {**meta, "similarities": self.similarities}

    def load_state_dict(self, tensors, meta) -> None:
        super().load_state_dict({k: v for k, v in tensors.items() if not k.startswith(("owner.", "tir_scale"))}, meta)
        self.owner = {k[len("owner."):]: v for k, v in tensors.items() if k.startswith("owner.")}
        self.scale = tensors.get("tir_scale")
        self.similarities = list(meta.get("similarities", []))


@register
class TIREWC(TIRMixin, EWC):
    name = "tir_ewc"
    Options = TIROptions
    summary = "EWC with task-similarity-informed importance: max over tasks, scaled by 1 - similarity to its owner."
    paper = "He et al., Continual Instruction Tuning for Large Multimodal Models, arXiv 2311.16206"


@register
class TIRMAS(TIRMixin, MAS):
    name = "tir_mas"
    Options = TIROptions
    summary = "MAS with task-similarity-informed importance: max over tasks, scaled by 1 - similarity to its owner."
    paper = "He et al., Continual Instruction Tuning for Large Multimodal Models, arXiv 2311.16206"
