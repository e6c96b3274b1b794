"""CL-MoE as its official code runs (Huai et al., CVPR 2025): MoE-LoRA experts behind an
instance-level router, and a momentum update of the experts after each task.

Training is :mod:`moelora`'s: ``experts`` LoRA experts per layer behind a dense, learned, bias-free
token router, all trained. While task t trains, every token's two most probable experts are
counted (summed over layers); the task's expert set idx(t) is its ``top_experts`` most counted.
After the task, with θ_{t-1} the experts as the task found them and θ'_t as it left them:

    θ_t = (1 - m) · θ_{t-1} + m · θ'_t     for experts in idx(t-1) but not in idx(t)
    θ_t =      m  · θ_{t-1} + (1 - m) · θ'_t   for every other expert           (m = ``momentum``)

(the router and the projector keep θ'_t). The first task has no predecessor and is kept as trained.

Sources (docs/methods.md): ECNU-ICALK/CL-MoE at a9eff1c: ``CLMoE/peft/tuners/clitmoelora.py``
(``CLMoEMOELoraLinear.forward``: the dense instance router; top-2 counts written for statistics),
``statistic.py`` (counts summed over layers, the 8 most counted experts kept), ``params.py`` (the
update above, ``alpha = 0.7``), ``scripts/CLMoE/Train_MOE/*.sh`` (r 32, alpha 64, 4 experts, lr 2e-4,
one epoch). The paper adds a task-level router G^T(t) mixed with the instance router by β; the
code's forward has only the instance router (the task-level term is a commented-out line whose
inputs are never computed), and MCITlib's and Prism's copies have no task router and no momentum
step. We follow the code, with two repairs that the code intends: its ``params.py`` matches keys
by a prefix (``loraA.{i}.``) that no real key starts with, so as shipped it never merges; and its
statistics are written only when the wall clock's second reads 30, which we replace by counting
every training token. With at most ``top_experts`` experts (4 in the reference scripts, 8 kept),
idx(t) holds every expert and each is updated with m = 0.7 toward its old value.
"""

from __future__ import annotations

import torch
from pydantic import Field

from mcit.methods import register
from mcit.methods.base import TaskContext
from mcit.methods.moelora import MoELoRA, MoELoRAOptions


class CLMoEOptions(MoELoRAOptions):
    momentum: float = Field(0.7, ge=0, le=1, description="weight m of the previous experts in the update after a task")
    top_experts: int = Field(8, ge=1, description="a task's expert set: its most counted experts (top-2 per token)")


def momentum_update(old: torch.Tensor, new: torch.Tensor, m: float, exclusive: bool) -> torch.Tensor:
    """The code's update of one expert tensor: ``m`` of the old for shared experts, ``1 - m`` for those
    the previous task used and this one does not."""
    return (1 - m) * old + m * new if exclusive else m * old + (1 - m) * new


@register
class CLMoE(MoELoRA):
    name = "clmoe"
    Options = CLMoEOptions
    summary = "CL-MoE (code): MoE-LoRA with a momentum update of the experts after each task, by their use."
    paper = "Huai et al., CL-MoE: Enhancing MLLMs with Dual Momentum Mixture-of-Experts for Continual VQA, CVPR 2025"

    def setup(self, model, ctx: TaskContext) -> None:
        super().setup(model, ctx)
        self.expert_sets: list[list[int]] = []
        self._before: dict[int, list[torch.Tensor]] = {}

    def before_task(self, task, samples, ctx: TaskContext) -> None:
        self.bank.usage = torch.zeros(self.bank.n, dtype=torch.long)
        self._before = {e: [p.detach().clone() for p in self.bank.expert_parameters(e)] for e in range(self.bank.n)}

    def after_task(self, task, ctx: TaskContext) -> None:
        usage, self.bank.usage = self.bank.usage, None
        if getattr(ctx.accelerator, "num_processes", 1) > 1:  # every process counted its share of the batches
            usage = ctx.accelerator.reduce(usage.to(ctx.accelerator.device), "sum").cpu()
        k = min(self.options.top_experts, self.bank.n)
        current = sorted(usage.topk(k).indices.tolist())
        if self.expert_sets:
            previous = set(self.expert_sets[-1])
            with torch.no_grad():
                for e in range(self.bank.n):
                    exclusive = e in previous and e not in current
                    for p, old in zip(self.bank.expert_parameters(e), self._before[e], strict=True):
                        p.copy_(momentum_update(old.to(p.device), p, self.options.momentum, exclusive))
        self.expert_sets.append(current)
        self._before = {}

    def report(self) -> dict:
        return {**super().report(), "expert_sets": self.expert_sets}

    def state_dict(self):
        tensors, meta = super().state_dict()
        return tensors, {**meta, "expert_sets": self.expert_sets}

    def load_state_dict(self, tensors, meta) -> None:
        super().load_state_dict(tensors, meta)
        self.expert_sets = [list(s) for s in meta.get("expert_sets", [])]
