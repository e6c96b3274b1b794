"""SAME (Xie et al., ICML 2026): stabilised mixture of LoRA experts, as Prism's code runs it.

On the FFN linear layers (``modules``), one LoRA expert per stream task (rank ``rank``) behind a
bias-free linear router on the layer input. Per layer:

- **Training forward**: p_t = softmax(W_r x_t) per token, averaged over every token of the
  micro-batch into one vector ḡ; g = ḡ·m / Σ(ḡ·m) with the freeze mask m; the output is
  y = W₀x + s · (Σ_j g_j B_j)(Σ_i g_i A_i x) (a product of mixtures, cross terms included).
- **Inference**: p_t = softmax(W_r x_t / E), averaged over each sample's tokens of the call (the
  reference evaluates one sample at a time; we average over the sample's non-padding tokens, so a
  batch gives what one sample alone gives), its top 2 kept and renormalised, no mask.
- **Input spectrum**: every ``refresh`` training forwards, from the micro-batch's inputs X (tokens x
  d, centred), a randomised range finder: U = orth(Xᵀ(X Ω)) with Ω ~ N(0, I) of d x k,
  k = min(``max_components``, d), and s_j = ||X u_j|| / sqrt(n - 1); the directions sorted by s.
- **Router gradient** (after ``start_step`` forwards): with V the leading directions holding
  ``energy`` of Σ s², s̃ the ``window``-mean of s along the component index and
  c = clip(min(s̃) / s̃, 0.8, 1.2), G ← G(I - VVᵀ) + (GV) diag(c) Vᵀ: the part of the step inside the
  input's principal subspace is damped toward its weakest direction's scale.
- **Curvature-aware expert steps** (tasks after the first): with (U, s) the previous task's last
  spectrum cut at ``energy``, every expert's A gradient G ← G · [U diag(1/(s + μ)) Uᵀ + (I - UUᵀ)/μ]
  (μ = ``curvature_mu``).
- **Freezing by mask**: per training forward, EMAs (0.95) of each expert's mean routing weight u and
  of its input-energy-weighted routing h = mean_t p_t ||x_t||²; score = minmax(u) - minmax(h);
  experts scoring below ``tau`` are masked (routed zero weight, so no gradient) except the current
  task's; once every other expert is masked the mask stays. u and the mask restart each task; h
  and the spectrum snapshot carry over (the reference's carried buffers).

Sources (docs/methods.md): LAMDA-CL/Prism at 7154be2: ``PEFT/tuners/custom/same.py`` (``SAMELinear``:
``_same_forward_with_routing``, ``_update_router_covariance``, ``_spectral_aware_router_hook``,
``_make_curvature_hook``, ``_update_activation_metrics``, ``_apply_adaptive_freezing``,
``save_task_covariance_snapshot``), ``method/custom/same/integration.py``, ``config/methods/same.py``
(FFN targets, mu 0.9, window 3, 64 components, energy 0.9, tau 0.1; UCIT r 48 / alpha 96, lr 2e-4,
projector frozen). The two gradient edits are applied once per optimiser step to the accumulated
gradient (the reference: tensor hooks per backward; the same for one micro-batch per step).
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field

from mcit.methods import register
from mcit.methods.base import Method, MethodOptions, TaskContext
from mcit.methods.experts import ExpertBank
from mcit.utils import stable_seed

EMA = 0.95


class SAMEOptions(MethodOptions):
    rank: int | None = Field(None, ge=1, description="rank of each expert (default: model.lora.r // tasks, at least 1)")
    modules: list[str] = Field(["gate_proj", "up_proj", "down_proj"], description="linear layers that get experts (reference: FFN)")
    curvature_mu: float = Field(0.9, gt=0, description="damping mu of the curvature-aware scaling of expert steps")
    window: int = Field(3, ge=1, description="moving-average window over the spectrum's components")
    max_components: int = Field(64, ge=1, description="directions of the randomised range finder")
    energy: float = Field(0.9, gt=0, le=1, description="share of the input energy the principal directions hold")
    tau: float = Field(0.1, description="experts scoring below this are masked in training")
    refresh: int = Field(20, ge=1, description="training forwards between spectrum estimates (per layer)")
    start_step: int = Field(10, ge=0, description="training forwards before the router gradient is edited")


def range_finder(x: torch.Tensor, k: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(U: d x k orthonormal, s: k standard deviations along U) of the rows of ``x``, sorted by s."""
    xc = x - x.mean(0, keepdim=True)
    omega = torch.randn(xc.shape[1], k, generator=generator).to(xc)
    u, _ = torch.linalg.qr(xc.T @ (xc @ omega))
    s = ((xc @ u).pow(2).sum(0) / max(xc.shape[0] - 1, 1)).sqrt()
    order = s.argsort(descending=True)
    return u[:, order], s[order]


def leading(s: torch.Tensor, energy: float) -> int:
    """How many leading components hold ``energy`` of Σ s² (the first past it included)."""
    e = s.pow(2)
    share = e.cumsum(0) / e.sum().clamp(min=1e-30)
    return min(int((share <= energy).sum()) + 1, s.numel())


def router_projection(grad: torch.Tensor, u: torch.Tensor, s: torch.Tensor, energy: float, window: int) -> torch.Tensor:
    """G(I - VVᵀ) + (GV) diag(c) Vᵀ with c = clip(min(s̃) / s̃, 0.8, 1.2)."""
    k = leading(s, energy)
    v, sk = u[:, :k], s[:k]
    smooth = torch.stack([sk[max(0, i - window + 1) : i + 1].mean() for i in range(k)])
    c = (smooth.min() / smooth.clamp(min=1e-12)).clamp(0.8, 1.2)
    gv = grad @ v
    return grad - gv @ v.T + (gv * c) @ v.T


def curvature_preconditioner(u: torch.Tensor, s: torch.Tensor, energy: float, mu: float) -> torch.Tensor:
    """U diag(1 / (s + mu)) Uᵀ + (I - UUᵀ) / mu over the leading directions (d x d: for tests)."""
    k = leading(s, energy)
    v = u[:, :k]
    eye = torch.eye(u.shape[0], dtype=u.dtype, device=u.device)
    return (v * (1.0 / (s[:k] + mu))) @ v.T + (eye - v @ v.T) / mu


def precondition(grad: torch.Tensor, u: torch.Tensor, s: torch.Tensor, energy: float, mu: float) -> torch.Tensor:
    """grad · curvature_preconditioner(u, s), in low-rank form: G / mu + (G V) diag(1/(s+mu) - 1/mu) Vᵀ
    (never the d x d matrix: 11008² floats per FFN layer on a 7B model)."""
    k = leading(s, energy)
    v = u[:, :k]
    return grad / mu + ((grad @ v) * (1.0 / (s[:k] + mu) - 1.0 / mu)) @ v.T


def minmax(v: torch.Tensor) -> torch.Tensor:
    span = v.max() - v.min()
    return torch.zeros_like(v) if span <= 0 else (v - v.min()) / span


class _LayerState:
    def __init__(self, n: int):
        self.count = 0
        self.u: torch.Tensor | None = None  # current spectrum
        self.s: torch.Tensor | None = None
        self.u_prev: torch.Tensor | None = None  # the previous task's last spectrum
        self.s_prev: torch.Tensor | None = None
        self.util = torch.full((n,), 1.0 / n)
        self.importance = torch.zeros(n)
        self.mask = torch.ones(n)
        self.locked = False
        self.observed = -1  # the model forward this layer last observed (once per forward)


@register
class SAME(Method):
    name = "same"
    Options = SAMEOptions
    summary = "SAME (Prism): MoE-LoRA on the FFN with spectrum-damped router steps, curvature-scaled expert steps, masked experts."
    paper = "Xie et al., SAME: Stabilized Mixture-of-Experts for Multimodal Continual Instruction Tuning, ICML 2026"

    def setup(self, model, ctx: TaskContext) -> None:
        o = self.options
        n = len(ctx.tasks)
        base_r = ctx.unwrapped.peft_config["default"].r
        seed = stable_seed(ctx.seed, "same-init")
        self.bank = ExpertBank(ctx.unwrapped, n, o.rank or max(1, base_r // n), init="normal", router=True,
                               seed=seed, modules=o.modules)
        self.bank.combiner = self.combine
        self.state = {name: _LayerState(n) for name in self.bank.layers}
        self._names = {id(layer): name for name, layer in self.bank.layers.items()}
        self.generator = torch.Generator().manual_seed(seed + 3)
        self.current = 0
        self.started = False
        self.eval_mask: torch.Tensor | None = None  # (batch, tokens) of the prompt being generated from
        # Forwards of the whole model, counted by its pre-hook: activation checkpointing re-runs a
        # layer in backward, and the re-run must neither observe again (the spectrum's random draw,
        # the EMAs) nor see a mask the first run changed (its gate would differ from the forward's).
        self.forwards = 0
        ctx.unwrapped.register_forward_pre_hook(self._count_forward)

    def _count_forward(self, module, args) -> None:
        self.forwards += 1

    # --- forward ----------------------------------------------------------------------------------
    def _mix(self, layer, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """s · (Σ_j g_j B_j)(Σ_i g_i A_i x) with g (n,) or (batch, n)."""
        names = self.bank.names
        A = torch.stack([layer.lora_A[n].weight for n in names])  # (n, r, d_in)
        B = torch.stack([layer.lora_B[n].weight for n in names])  # (n, d_out, r)
        xe = x.to(A.dtype)  # the reference creates lora_dropout and never applies it
        if g.dim() == 1:
            a, b = torch.einsum("e,erd->rd", g.to(A.dtype), A), torch.einsum("e,eor->or", g.to(B.dtype), B)
            return (xe @ a.T) @ b.T * layer.scaling[names[0]]
        a, b = torch.einsum("be,erd->brd", g.to(A.dtype), A), torch.einsum("be,eor->bor", g.to(B.dtype), B)
        return torch.einsum("btr,bor->bto", torch.einsum("btd,brd->btr", xe, a), b) * layer.scaling[names[0]]

    def combine(self, layer, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        if not self.started:
            return output
        st = self.state[self._names[id(layer)]]
        router = layer.mcit_router
        if layer.training:
            xr = x.to(router.weight.dtype)
            p = torch.softmax(router(xr), dim=-1)
            mean = p.reshape(-1, p.shape[-1]).mean(0)
            if st.observed != self.forwards:
                st.observed = self.forwards
                with torch.no_grad():
                    self._observe(st, xr, p)
            g = mean * st.mask.to(mean)
            g = g / g.sum().clamp(min=1e-12)
        else:
            p = torch.softmax(router(x.to(router.weight.dtype)) / self.bank.n, dim=-1)
            mask = self.eval_mask
            if mask is not None and mask.shape[:2] == p.shape[:2]:
                w = mask.to(p.dtype).unsqueeze(-1)
                mean = (p * w).sum(1) / w.sum(1).clamp(min=1.0)
            else:
                mean = p.mean(1)
            top = mean.topk(min(2, self.bank.n), dim=-1)
            g = torch.zeros_like(mean).scatter(-1, top.indices, top.values)
            g = g / g.sum(-1, keepdim=True)
        return (output + self._mix(layer, x, g)).to(output.dtype)

    def _observe(self, st: _LayerState, x: torch.Tensor, p: torch.Tensor) -> None:
        """Per training forward: the spectrum (every ``refresh``), the EMAs and the freeze mask."""
        o = self.options
        flat = x.reshape(-1, x.shape[-1]).float()
        if st.count % o.refresh == 0 or st.u is None:
            st.u, st.s = range_finder(flat, min(o.max_components, flat.shape[1]), self.generator)
            st.u, st.s = st.u.cpu(), st.s.cpu()
        st.count += 1
        probs = p.reshape(-1, p.shape[-1]).float()
        st.util = EMA * st.util + (1 - EMA) * probs.mean(0).cpu()
        st.importance = EMA * st.importance + (1 - EMA) * (probs * flat.pow(2).sum(1, keepdim=True)).mean(0).cpu()
        if st.locked:
            return
        score = minmax(st.util) - minmax(st.importance)
        keep = min(self.current, self.bank.n - 1)
        mask = (score >= o.tau).float()
        mask[keep] = 1.0
        st.mask = mask
        if int(mask.sum()) == 1:
            st.locked = True

    # --- the stream ---------------------------------------------------------------------------------
    def before_task(self, task, samples, ctx: TaskContext) -> None:
        self.started = True
        self.current = ctx.stage - 1
        n = self.bank.n
        for st in self.state.values():  # the reference's runtime state restarts with each task
            st.count, st.u, st.s = 0, None, None
            st.util, st.mask, st.locked = torch.full((n,), 1.0 / n), torch.ones(n), False

    def before_step(self, ctx: TaskContext) -> None:
        o = self.options
        if getattr(ctx.accelerator, "num_processes", 1) > 1:
            self._share(ctx.accelerator)
        with torch.no_grad():
            for name, layer in self.bank.layers.items():
                st = self.state[name]
                w = layer.mcit_router.weight
                if w.grad is not None and st.u is not None and st.count > o.start_step:
                    u, s = st.u.to(w.grad), st.s.to(w.grad)
                    w.grad.copy_(router_projection(w.grad, u, s, o.energy, o.window))
                for e, expert in enumerate(self.bank.names):
                    A, B = layer.lora_A[expert].weight, layer.lora_B[expert].weight
                    if st.mask[e] == 0:  # masked: no step at all (a zero gradient would still move it under Adam)
                        A.grad = B.grad = None
                    elif self.current >= 1 and st.u_prev is not None and A.grad is not None:
                        A.grad.copy_(precondition(A.grad, st.u_prev.to(A.grad), st.s_prev.to(A.grad), o.energy,
                                                  o.curvature_mu))

    def _share(self, accelerator) -> None:
        """Several processes: every process takes process 0's statistics, so all edit the averaged
        gradient alike and keep one model (the reference edits each process's gradient with its own
        statistics before DDP averages them)."""
        from accelerate.utils import broadcast

        for st in self.state.values():
            if st.u is None:
                continue
            for field in ("u", "s", "mask", "util", "importance"):
                setattr(st, field, broadcast(getattr(st, field).to(accelerator.device)).cpu())
            st.locked = bool(broadcast(torch.tensor([float(st.locked)], device=accelerator.device)).item())

    def after_task(self, task, ctx: TaskContext) -> None:
        for st in self.state.values():
            if st.u is not None:
                st.u_prev, st.s_prev = st.u.clone(), st.s.clone()

    def route(self, batch, ctx: TaskContext) -> None:
        self.eval_mask = batch["attention_mask"]

    def report(self) -> dict:
        masked = {name: int((st.mask == 0).sum()) for name, st in self.state.items()}
        return {"experts": self.bank.n, "layers": len(self.bank.layers),
                "masked_experts_last_task": sum(masked.values()), "locked_layers": sum(st.locked for st in self.state.values())}

    # --- checkpoint ---------------------------------------------------------------------------------
    def state_dict(self):
        tensors: dict[str, torch.Tensor] = {}
        for name, st in self.state.items():
            tensors[f"importance.{name}"] = st.importance
            if st.u_prev is not None:
                tensors[f"u_prev.{name}"], tensors[f"s_prev.{name}"] = st.u_prev, st.s_prev
        meta: dict[str, Any] = {"started": self.started, "generator": self.generator.get_state().tolist()}
        return tensors, meta

    def load_state_dict(self, tensors, meta) -> None:
        for name, st in self.state.items():
            st.importance = tensors[f"importance.{name}"].clone()
            if f"u_prev.{name}" in tensors:
                st.u_prev, st.s_prev = tensors[f"u_prev.{name}"].clone(), tensors[f"s_prev.{name}"].clone()
        self.started = bool(meta.get("started", False))
        self.generator.set_state(torch.tensor(meta["generator"], dtype=torch.uint8))
