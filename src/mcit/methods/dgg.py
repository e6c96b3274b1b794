"""Dynamic Gradient Guidance (Li et al., arXiv 2511.15164, CVPR 2026).

The joint-training gradient is the sum of per-task gradients; sequential training misses the
old tasks' terms. DGG stands in for them with the direction back to the previous optimum
θ* (the trainable parameters at the end of the previous task). At each optimiser step of task
t > 1, after backward on a batch that mixes the task's data with replay:

    d = θ - θ*
    ĝ = d · ‖g‖ / ‖d‖  if ‖d‖ > ‖g‖  else d        (``scaling``; per tensor or ``global``)
    b ~ Bernoulli(α_t);  the step uses g + b·ĝ     (``bernoulli: false`` injects every step)

A descent step along ĝ pulls θ back toward θ*. No new parameters; the memory cost is one
copy of θ* (on the parameters' device and dtype). Ablations by option: ``replay: false``
(g-only), ``alpha: 0`` (replay only), ``scaling: false``, ``bernoulli: false``.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, field_validator

from mcit.data.format import Sample
from mcit.errors import ConfigError
from mcit.methods import register
from mcit.methods.base import Method, TaskContext
from mcit.methods.replay import ReplayOptions, ReplayPart
from mcit.utils import stable_hash


class DGGOptions(ReplayOptions):
    alpha: float | list[float] = Field(
        0.2, description="Bernoulli probability of injecting the guidance: one value, or one per task "
        "(T values, or T-1 values for tasks 2..T)"
    )
    norm: Literal["tensor", "global"] = Field("tensor", description="norms in the scaling: per parameter tensor, or global")
    scaling: bool = Field(True, description="scale the guidance down to the gradient's norm when it is longer")
    bernoulli: bool = Field(True, description="gate the guidance by a Bernoulli(alpha) draw per step (false: every step)")
    replay: bool = Field(True, description="mix the replay buffer into batches (false: the g-only ablation)")

    @field_validator("alpha")
    @classmethod
    def _alpha(cls, v):
        values = v if isinstance(v, list) else [v]
        if not values or any(not 0 <= a <= 1 for a in values):
            raise ValueError(f"alpha must be in [0, 1] (a number or a non-empty list), got {v}")
        return v


@register
class DGG(Method):
    name = "dgg"
    Options = DGGOptions
    summary = "Dynamic Gradient Guidance: replay plus the direction back to the previous optimum, gated by Bernoulli(alpha)."
    paper = "Li et al., Dynamic Gradient Guidance, arXiv 2511.15164 (CVPR 2026)"

    def __init__(self, options: DGGOptions):
        super().__init__(options)
        # the replay part (its buffer stays empty in the g-only ablation, replay: false)
        self.replay = ReplayPart(options)
        self.theta_star: dict[str, torch.Tensor] = {}
        self.generator = torch.Generator()
        self._pairs: list[tuple[torch.nn.Parameter, torch.Tensor]] | None = None
        self.injected = 0  # steps that used the guidance (for logs and tests)

    def setup(self, model, ctx: TaskContext) -> None:
        alpha = self.options.alpha
        if isinstance(alpha, list) and len(alpha) not in (len(ctx.tasks), len(ctx.tasks) - 1):
            raise ConfigError(
                f"method.alpha: {len(alpha)} values for a stream of {len(ctx.tasks)} tasks; give one value, "
                f"{len(ctx.tasks)} (one per task) or {len(ctx.tasks) - 1} (tasks 2..{len(ctx.tasks)})"
            )
        # Seeded here; a resumed run then restores the saved state in load_state_dict.
        self.generator.manual_seed(int(stable_hash([ctx.seed, "dgg-bernoulli"]), 16) % 2**63)

    def alpha_for(self, stage: int, n_tasks: int) -> float:
        alpha = self.options.alpha
        if not isinstance(alpha, list):
            return alpha
        return alpha[stage - 1] if len(alpha) == n_tasks else alpha[stage - 2]

    # --- data: replay unless ablated ------------------------------------------------------
    def train_data(self, task: str, samples: list[Sample], ctx: TaskContext) -> list[Sample]:
        return self.replay.train_data(task, samples, ctx) if self.options.replay else samples

    def sample_weights(self, samples: list[Sample], ctx: TaskContext) -> torch.Tensor | None:
        return self.replay.sample_weights(samples) if self.options.replay else None

    def after_task(self, task: str, ctx: TaskContext) -> None:
        if self.options.replay:
            self.replay.after_task(task, ctx)
        self.theta_star = {n: p.detach().clone() for n, p in ctx.trainable_parameters().items()}
        self._pairs = None

    # --- the guidance ---------------------------------------------------------------------
    def before_step(self, ctx: TaskContext) -> None:
        if not self.theta_star or ctx.stage <= 1:
            return
        alpha = self.alpha_for(ctx.stage, len(ctx.tasks))
        if self.options.bernoulli:
            # Always draw, so the sequence of draws does not depend on alpha.
            if not bool(torch.rand((), generator=self.generator) < alpha):
                return
        elif alpha == 0:
            return
        if self._pairs is None:
            # (parameter, θ*) once per task, not every step; θ* moved to the parameter's device and
            # dtype once (it arrives on the CPU after a resume).
            params = ctx.trainable_parameters()
            self._pairs = []
            for n, star in self.theta_star.items():
                if n in params:
                    self.theta_star[n] = star.to(params[n].device, params[n].dtype)
                    self._pairs.append((params[n], self.theta_star[n]))
        pairs = [(p, star) for p, star in self._pairs if p.grad is not None]  # no gradient: nothing to guide
        if not pairs:
            return
        with torch.no_grad():
            deltas = [p.detach() - star for p, star in pairs]
            if self.options.scaling:
                g_norms = [torch.linalg.vector_norm(p.grad.float()) for p, _ in pairs]
                d_norms = [torch.linalg.vector_norm(d.float()) for d in deltas]
                if self.options.norm == "global":
                    factor = _shrink(torch.linalg.vector_norm(torch.stack(g_norms)),
                                     torch.linalg.vector_norm(torch.stack(d_norms)))
                    factors = [factor] * len(deltas)
                else:
                    factors = [_shrink(g, d) for g, d in zip(g_norms, d_norms, strict=True)]
                deltas = [d * f.to(d.dtype) for d, f in zip(deltas, factors, strict=True)]
            for (p, _), d in zip(pairs, deltas, strict=True):
                p.grad.add_(d)
        self.injected += 1

    # --- checkpoint -----------------------------------------------------------------------
    def state_dict(self):
        tensors, meta = {}, self.replay.buffer.state()
        tensors = {**tensors, **{f"theta_star.{n}": v for n, v in self.theta_star.items()}}
        tensors["bernoulli_state"] = self.generator.get_state()
        return tensors, {**meta, "injected": self.injected}

    def load_state_dict(self, tensors, meta) -> None:
        self.replay.buffer.load(meta)
        self.theta_star = {k[len("theta_star."):]: v for k, v in tensors.items() if k.startswith("theta_star.")}
        if "bernoulli_state" in tensors:
            self.generator.set_state(tensors["bernoulli_state"])
        self._pairs = None
        self.injected = int(meta.get("injected", 0))


def _shrink(g_norm: torch.Tensor, d_norm: torch.Tensor) -> torch.Tensor:
    """``‖g‖/‖d‖`` where ``‖d‖ > ‖g‖``, else 1: computed on the device, no host sync per tensor."""
    return torch.where(d_norm > g_norm, g_norm / d_norm, torch.ones_like(d_norm))
