"""Gradient Episodic Memory (Lopez-Paz & Ranzato, NeurIPS 2017), as Continual-NExT offers it.

An episodic memory keeps ``per_task`` training samples of every finished task (ids, chosen by
the replay buffer's seeded permutation). Memory samples are never trained on: at each optimiser
step of task t > 1, after backward, GEM computes the loss gradient g_k on a batch of each old
task's memory and, when the step's gradient g conflicts with any of them (g·g_k < 0), replaces
g by the closest vector that does not, through the dual quadratic programme of the paper
(Eq. 10-11), written as the reference code writes it:

    P = M Mᵀ + eps·I,  q = M g          (M: the old tasks' gradients, one row each)
    v = argmin ½ vᵀ P v + qᵀ v   s.t.  v ≥ margin
    g̃ = g + Mᵀ v

With ``margin = 0`` and ``eps = 0`` this is the paper's projection: g̃·g_k ≥ 0 for every k, and
g̃ = g when nothing conflicts. The reference code (facebookresearch/GradientEpisodicMemory,
``model/gem.py``: ``project2cone2``, ``memory_strength`` 0.5, ``eps`` 1e-3, ``n_memories`` 256
per task) bounds the dual variables below by ``memory_strength`` instead of 0, which biases the
step toward the memories ("favour backward transfer"); Avalanche's GEM and Continual-NExT
(``--GEM_memory_strength 0.5``) do the same, and so do we by default. The reference takes each
task's whole memory per step; we draw ``memory_batch`` samples of it (seeded, saved for resume),
since a full pass over 256 samples per old task per step would dominate the cost here.

The QP (t unknowns for t old tasks) is solved exactly by Murty's least-index principal pivoting
on the equivalent linear complementarity problem, in float64 (no quadprog dependency).

Memory gradients are taken with ``torch.autograd.grad`` on the unwrapped model: they never touch
``.grad`` and trigger no DDP reduction. Every process draws the same memory batches, so with
several processes each computes the same projection of the same all-reduced gradient.
Parameters without a gradient this step (``p.grad is None``) are left out of the projection.
"""

from __future__ import annotations

import torch
from pydantic import Field

from mcit.data.format import Sample
from mcit.errors import McitError
from mcit.methods import register
from mcit.methods.base import Method, MethodOptions, TaskContext
from mcit.methods.replay import ReplayBuffer
from mcit.utils import stable_hash


class GEMOptions(MethodOptions):
    per_task: int = Field(256, ge=1, description="memory samples kept per finished task (GEM's n_memories)")
    memory_batch: int = Field(
        32, ge=1, description="memory samples per old task for each step's reference gradient (GEM: the whole memory)"
    )
    margin: float = Field(
        0.5, ge=0, description="memory_strength: lower bound of the dual variables (0: the paper's projection)"
    )
    eps: float = Field(1e-3, ge=0, description="ridge added to the Gram matrix of the memory gradients")


def project_to_cone(g: torch.Tensor, memories: torch.Tensor, margin: float = 0.0, eps: float = 0.0) -> torch.Tensor:
    """GEM's projection of the flat gradient ``g`` (n,) given memory gradients ``memories`` (t, n):
    ``g + memoriesᵀ v`` with ``v`` solving the dual QP above. Computed in float64, returned in
    ``g``'s dtype."""
    m = memories.double()
    gram = m @ m.T
    P = gram + eps * torch.eye(gram.shape[0], dtype=torch.float64, device=gram.device)
    q = m @ g.double()
    v = solve_box_qp(P, q, margin)
    return (g.double() + m.T @ v).to(g.dtype)


def solve_box_qp(P: torch.Tensor, q: torch.Tensor, lower: float, max_pivots: int = 10_000) -> torch.Tensor:
    """``argmin ½ vᵀPv + qᵀv`` subject to ``v ≥ lower`` for a symmetric positive (semi)definite
    ``P``: with ``u = v - lower`` it is the LCP ``w = P u + c ≥ 0, u ≥ 0, uᵀw = 0`` with
    ``c = P·lower + q``, solved by Murty's least-index principal pivoting (finite for a positive
    definite ``P``)."""
    t = q.shape[0]
    c = P @ torch.full((t,), float(lower), dtype=P.dtype, device=P.device) + q
    scale = float(P.diagonal().abs().max()) if t else 0.0
    tol = 1e-12 * max(1.0, scale, float(c.abs().max()) if t else 0.0)
    free = torch.zeros(t, dtype=torch.bool, device=P.device)  # u basic (may be > 0); else w basic
    for _ in range(max_pivots):
        u = torch.zeros(t, dtype=P.dtype, device=P.device)
        if free.any():
            sub = P[free][:, free]
            u[free] = torch.linalg.lstsq(sub, -c[free].unsqueeze(1)).solution.squeeze(1)
        w = P @ u + c
        bad = (free & (u < -tol)) | (~free & (w < -tol))
        if not bad.any():
            return u.clamp_min(0) + lower
        i = int(bad.nonzero()[0])
        free[i] = ~free[i]
    raise McitError(f"gem: the projection QP did not converge after {max_pivots} pivots; set method.eps > 0")


@register
class GEM(Method):
    name = "gem"
    Options = GEMOptions
    summary = "Gradient Episodic Memory: each step's gradient projected so no old task's memory loss increases."
    paper = "Lopez-Paz & Ranzato, Gradient Episodic Memory for Continual Learning, NeurIPS 2017"

    def __init__(self, options: GEMOptions):
        super().__init__(options)
        self.buffer = ReplayBuffer(per_task=options.per_task)
        self.generator = torch.Generator()
        self._memory: dict[str, list[Sample]] | None = None
        self.steps = 0  # optimiser steps with at least one old task
        self.projected = 0  # steps whose gradient conflicted with a memory and was projected

    def setup(self, model, ctx: TaskContext) -> None:
        # Seeded here; a resumed run then restores the saved state in load_state_dict.
        self.generator.manual_seed(int(stable_hash([ctx.seed, "gem-memory"]), 16) % 2**63)

    def after_task(self, task: str, ctx: TaskContext) -> None:
        self.buffer.add(task, ctx.train_data[task], ctx.seed)
        self._memory = None

    def memory(self, ctx: TaskContext) -> dict[str, list[Sample]]:
        """The old tasks' memory samples, by task (resolved once per task, not every step)."""
        if self._memory is None:
            self._memory = {}
            for task in self.buffer.ids:
                if task != ctx.task:
                    self._memory[task] = self.buffer.samples(ctx.train_data, only=task)
        return self._memory

    def draw(self, samples: list[Sample]) -> list[Sample]:
        n = min(self.options.memory_batch, len(samples))
        order = torch.randperm(len(samples), generator=self.generator)[:n].tolist()
        return [samples[i] for i in sorted(order)]

    def before_step(self, ctx: TaskContext) -> None:
        memory = self.memory(ctx)
        if not memory:
            return
        self.steps += 1
        batches = {task: self.draw(samples) for task, samples in memory.items()}  # drawn every step: same stream on resume
        params = [p for p in ctx.trainable_parameters().values() if p.grad is not None]
        if not params:
            return
        g = torch.cat([p.grad.detach().reshape(-1) for p in params])
        model, encoder, device = ctx.unwrapped, ctx.encoder, ctx.accelerator.device
        rows = []
        for samples in batches.values():
            batch = {k: v.to(device) for k, v in encoder.train_batch(samples).items()}
            grads = torch.autograd.grad(model(**batch).loss, params, allow_unused=True)
            rows.append(torch.cat([(torch.zeros_like(p) if gr is None else gr.detach()).reshape(-1)
                                   for p, gr in zip(params, grads, strict=True)]))
        memories = torch.stack(rows)
        if not bool(((memories.double() @ g.double()) < 0).any()):
            return
        new = project_to_cone(g, memories, self.options.margin, self.options.eps)
        offset = 0
        with torch.no_grad():
            for p in params:
                p.grad.copy_(new[offset : offset + p.numel()].view_as(p.grad))
                offset += p.numel()
        self.projected += 1

    def report(self) -> dict:
        return {"steps_with_memory": self.steps, "steps_projected": self.projected,
                "projected_share": round(self.projected / self.steps, 4) if self.steps else None,
                "memory": {t: len(v) for t, v in self.buffer.ids.items()}}

    def state_dict(self):
        return {"memory_draws": self.generator.get_state()}, {
            **self.buffer.state(), "steps": self.steps, "projected": self.projected}

    def load_state_dict(self, tensors, meta) -> None:
        self.buffer.load(meta)
        if "memory_draws" in tensors:
            self.generator.set_state(tensors["memory_draws"])
        self.steps, self.projected = int(meta.get("steps", 0)), int(meta.get("projected", 0))
        self._memory = None
