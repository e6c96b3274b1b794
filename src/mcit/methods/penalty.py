"""Importance-weighted quadratic penalties (EWC, MAS and what builds on them).

After each task a method estimates a per-parameter importance Ω on a seeded sample of that
task's training data and consolidates it; while training later tasks the loss gets
``lambda/2 * sum(Ω * (θ - anchor)^2)`` over the trainable parameters (full, LoRA or projector
alike; parameters that never received a gradient have Ω = 0 and are skipped).

Consolidation over tasks:

- ``separate`` (classic EWC): one penalty per old task, ``sum_k Ω_k (θ - θ_k)^2``. Stored
  exactly in constant memory as ``Ω = sum_k Ω_k`` and the Ω-weighted anchor
  ``μ = sum_k Ω_k θ_k / Ω``: the two forms differ by a constant, so gradients are identical.
- ``online`` (online EWC, Schwarz et al. 2018; MAS's accumulation): ``Ω <- γ Ω + Ω_new`` and
  the anchor is the parameters after the latest task.
"""

from __future__ import annotations

import random
from typing import Literal

import torch
from pydantic import Field

from mcit.data.format import Sample
from mcit.methods.base import Method, MethodOptions, TaskContext
from mcit.utils import stable_hash


class PenaltyOptions(MethodOptions):
    lam: float = Field(1.0, ge=0, description="penalty strength lambda in lambda/2 * sum(importance * (theta - anchor)^2)")
    samples: int = Field(200, ge=1, description="training samples of the finished task used to estimate importance")
    batch_size: int = Field(1, ge=1, description="samples per importance pass (1 = per-sample, the exact estimate)")
    normalize: Literal["none", "mean", "max"] = Field(
        "none", description="divide each task's importance by its mean or max over all parameters"
    )
    mode: Literal["separate", "online"] = Field(
        "separate", description="separate: a penalty per old task; online: decayed sum, anchor at the latest task"
    )
    gamma: float = Field(1.0, ge=0, le=1, description="decay of the accumulated importance (mode: online)")


def importance_sample(samples: list[Sample], n: int, seed: int, task: str) -> list[Sample]:
    """A seeded subset of ``n`` samples (all of them if there are fewer)."""
    if len(samples) <= n:
        return list(samples)
    rng = random.Random(int(stable_hash([seed, task, "importance"]), 16))
    return [samples[i] for i in sorted(rng.sample(range(len(samples)), n))]


def answer_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The logits that predict answer tokens: ``(positions, vocab)``, row-major over the batch."""
    return logits[:, :-1][labels[:, 1:] != -100]


class ImportancePenalty(Method):
    """Shared machinery; subclasses define :meth:`objective` and :meth:`accumulate`."""

    Options = PenaltyOptions

    def __init__(self, options: PenaltyOptions):
        super().__init__(options)
        self.omega: dict[str, torch.Tensor] = {}
        self.anchor: dict[str, torch.Tensor] = {}
        self.tasks_done: list[str] = []
        self._active: list[tuple[torch.nn.Parameter, torch.Tensor, torch.Tensor]] | None = None

    # --- what differs between EWC and MAS --------------------------------------------------
    def objective(self, batch: dict, outputs) -> torch.Tensor:
        raise NotImplementedError

    def accumulate(self, grad: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # --- importance -----------------------------------------------------------------------
    def estimate(self, samples: list[Sample], ctx: TaskContext) -> dict[str, torch.Tensor]:
        """Mean over passes of ``accumulate(grad of objective)``; zero where no gradient arrives."""
        model, encoder = ctx.unwrapped, ctx.encoder
        params = ctx.trainable_parameters()
        importance = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
        was_training = model.training
        model.eval()
        bs = self.options.batch_size
        world = getattr(ctx.accelerator, "num_processes", 1)
        rank = getattr(ctx.accelerator, "process_index", 0)
        passes = 0
        for k, i in enumerate(range(0, len(samples), bs)):
            if k % world != rank:  # with several processes each takes every world-th batch; summed below
                continue
            batch = {k: v.to(ctx.accelerator.device) for k, v in encoder.train_batch(samples[i : i + bs]).items()}
            model.zero_grad(set_to_none=True)
            self.objective(batch, model(**batch)).backward()
            for n, p in params.items():
                if p.grad is not None:
                    importance[n] += self.accumulate(p.grad.detach().float())
            passes += 1
        model.zero_grad(set_to_none=True)
        model.train(was_training)
        if world > 1:
            importance = {n: ctx.accelerator.reduce(v, "sum") for n, v in importance.items()}
            passes = int(ctx.accelerator.reduce(torch.tensor(passes, device=ctx.accelerator.device), "sum"))
        for n in importance:
            importance[n] /= max(1, passes)
        return self.normalized(importance)

    def normalized(self, importance: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.options.normalize == "none" or not importance:
            return importance
        flat = torch.cat([v.flatten() for v in importance.values()])
        scale = flat.mean() if self.options.normalize == "mean" else flat.max()
        if scale <= 0:
            return importance
        return {n: v / scale for n, v in importance.items()}

    def consolidate(self, new: dict[str, torch.Tensor], params: dict[str, torch.Tensor]) -> None:
        online = self.options.mode == "online"
        for n, p in params.items():
            theta = p.detach().float()
            omega_new = new[n].to(theta.device)
            if n not in self.omega:
                self.omega[n], self.anchor[n] = omega_new, theta.clone()
                continue
            omega_old, anchor_old = self.omega[n].to(theta.device), self.anchor[n].to(theta.device)
            if online:
                self.omega[n] = self.options.gamma * omega_old + omega_new
                self.anchor[n] = theta.clone()
            else:
                total = omega_old + omega_new
                weighted = omega_old * anchor_old + omega_new * theta
                self.anchor[n] = torch.where(total > 0, weighted / total.clamp_min(1e-30), theta)
                self.omega[n] = total

    def after_task(self, task: str, ctx: TaskContext) -> None:
        samples = importance_sample(ctx.train_data[task], self.options.samples, ctx.seed, task)
        self.consolidate(self.estimate(samples, ctx), ctx.trainable_parameters())
        self.tasks_done.append(task)
        self._active = None

    # --- the penalty ---------------------------------------------------------------------
    def bind(self, params: dict[str, torch.Tensor]) -> None:
        """Pair the parameters with their importance and anchor, once per consolidation rather than
        every step; parameters that never received a gradient (importance 0) are left out."""
        self._active = []
        for n, o in self.omega.items():
            if n in params and bool((o > 0).any()):
                device = params[n].device
                self.omega[n], self.anchor[n] = o.to(device), self.anchor[n].to(device)
                self._active.append((params[n], self.effective(n), self.anchor[n]))

    def effective(self, name: str) -> torch.Tensor:
        """The importance the penalty uses for a parameter (TIR rescales it by task similarity)."""
        return self.omega[name]

    def penalty(self, params: dict[str, torch.Tensor] | None = None) -> torch.Tensor | None:
        """``lam/2 * sum(Ω (θ - anchor)^2)``; ``params`` (re)binds the parameters first."""
        if not self.omega or self.options.lam == 0:
            return None
        if params is not None:
            self.bind(params)
        if not self._active:
            return None
        total = sum((omega * (p.float() - anchor) ** 2).sum() for p, omega, anchor in self._active)
        return 0.5 * self.options.lam * total

    def extra_loss(self, batch: dict, outputs, ctx: TaskContext) -> torch.Tensor | None:
        return self.penalty(ctx.trainable_parameters() if self._active is None else None)

    # --- checkpoint -----------------------------------------------------------------------
    def state_dict(self):
        tensors = {f"omega.{n}": v for n, v in self.omega.items()}
        tensors.update({f"anchor.{n}": v for n, v in self.anchor.items()})
        return tensors, {"tasks_done": self.tasks_done}

    def load_state_dict(self, tensors, meta) -> None:
        self.omega = {k[len("omega."):]: v for k, v in tensors.items() if k.startswith("omega.")}
        self.anchor = {k[len("anchor."):]: v for k, v in tensors.items() if k.startswith("anchor.")}
        self.tasks_done = list(meta.get("tasks_done", []))
        self._active = None
