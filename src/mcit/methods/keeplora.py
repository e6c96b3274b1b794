"""KeepLoRA (Luo et al., ICLR 2026): LoRA whose A reads only the residual of a protected input
subspace, the pre-trained weights' principal directions plus earlier tasks' gradient directions;
merged after every task. As the reference's LLaVA code runs it.

Per LoRA layer (weight W, out x in), with M the protected subspace (rows: orthonormal input
directions):

- **Start**: M = the leading right singular vectors of W holding ``weight_energy`` of Σ S²
  (the pre-trained principal subspace).
- **Before each task**: the gradient G = ∂L/∂W averaged over ``data_ratio`` of the task's training
  samples (evenly spaced) at the current weights; its residual R = G (I - MᵀM); A = the top
  ``r`` right singular vectors of R (rows), B = 0. A stays fixed while the task trains (its
  gradients are dropped, so it remains in the checkpoint); only B (and the projector, as in the
  reference) train: ΔW = scaling · B A maps only the residual directions.
- **After each task**: ΔW merged into W (the factors kept in the method state, so a resumed run
  re-applies them bit for bit); the gradient pass again on the merged weights; M grows by GPM's
  rule: the residual's leading directions until the kept share of G's energy reaches
  ``energy``.

Sources (docs/methods.md): MaolinLuo/KeepLoRA at a17f9c2, ``MCITlib/KeepLoRA/llava/train/
extract_weights.py`` (SVD of Wᵀ, threshold 0.6), ``extract_gradients.py`` (``extract_gradients``,
``merge_gradient_chunks``: 20% of the data, residual, ``svd_lowrank``; ``energy`` mode, 0.99),
``train.py`` (``initialize_lora_weights_custom``, ``freeze_lora_A_matrices``),
``scripts/merge_lora_weights.py``, ``configs/model_configs/LLaVA/UCIT/*`` (r 32, alpha r / 4,
lr 2e-4, one epoch). The reference takes per-sample gradients (batch 1) and a randomised SVD; we
average per-batch gradients of the run's batch size and take an exact SVD (deterministic).
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field

from mcit.data.format import Sample
from mcit.errors import ConfigError
from mcit.methods import register
from mcit.methods.base import Method, MethodOptions, TaskContext
from mcit.methods.reglora import _factors, lora_layers, merge_factors, merged_from, merged_tensors
from mcit.models.tuning import only_trainable


class KeepLoRAOptions(MethodOptions):
    weight_energy: float = Field(0.6, gt=0, le=1, description="share of each weight's Σ S² its protected principal directions hold")
    energy: float = Field(0.99, gt=0, le=1, description="GPM threshold: the share of a task's gradient energy the subspace keeps")
    data_ratio: float = Field(0.2, gt=0, le=1, description="share of a task's training samples in each gradient pass")


def principal_rows(weight: torch.Tensor, energy: float) -> torch.Tensor:
    """The right singular vectors of ``weight`` (as rows) before the cumulative share of S² reaches
    ``energy`` (at least one): the reference's ``k = max(1, #{cumsum(S²)/ΣS² < energy})``."""
    _, s, vh = torch.linalg.svd(weight.float(), full_matrices=False)
    share = (s**2).cumsum(0) / (s**2).sum()
    k = max(1, int((share < energy).sum()))
    return vh[:k]


def residual(grad: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """G (I - MᵀM): the gradient with its protected input directions removed."""
    return grad - (grad @ basis.T) @ basis


def extend_basis(basis: torch.Tensor, grad: torch.Tensor, energy: float) -> torch.Tensor:
    """GPM's rule on a gradient: add the residual's leading right singular vectors until the kept
    share of G's total energy reaches ``energy`` (the reference's ``energy`` mode)."""
    total = torch.linalg.svdvals(grad).pow(2).sum()
    res = residual(grad, basis)
    _, s, vh = torch.linalg.svd(res, full_matrices=False)
    kept = (total - s.pow(2).sum()) / total.clamp(min=1e-30)
    ratios = s.pow(2) / total.clamp(min=1e-30)
    add = 0
    while kept < energy and add < s.numel():
        kept = kept + ratios[add]
        add += 1
    if add == 0:
        return basis
    grown = torch.cat([basis, vh[:add]])
    return grown[: grad.shape[1]]


@register
class KeepLoRA(Method):
    name = "keeplora"
    Options = KeepLoRAOptions
    summary = "KeepLoRA: LoRA A fixed to the residual gradient directions off the protected subspace; merged after each task."
    paper = "Luo et al., KeepLoRA: Continual Learning with Residual Gradient Adaptation, ICLR 2026"

    def __init__(self, options):
        super().__init__(options)
        self.basis: dict[str, torch.Tensor] = {}  # layer -> protected input directions (rows)
        self.merged: list[dict[str, tuple[torch.Tensor, torch.Tensor]]] = []
        self.scaling: dict[str, float] = {}
        self._model = None

    def setup(self, model, ctx: TaskContext) -> None:
        self._model = ctx.unwrapped
        layers = lora_layers(self._model)
        if not layers:
            raise ConfigError("method.name: keeplora needs LoRA layers; set model.tuning: lora")
        self._a = [_factors(layer)[0] for layer in layers.values()]  # the step's hook, without a model walk
        for name, layer in layers.items():
            self.basis[name] = principal_rows(layer.get_base_layer().weight.detach(), self.options.weight_energy).cpu()
            self.scaling[name] = _factors(layer)[2]

    # --- the gradient pass -------------------------------------------------------------------------
    def gradients(self, samples: list[Sample], ctx: TaskContext) -> dict[str, torch.Tensor]:
        """∂L/∂W per LoRA layer, averaged over batches of ``data_ratio`` of ``samples`` (evenly spaced)."""
        model, encoder = ctx.unwrapped, ctx.encoder
        n = max(1, int(round(self.options.data_ratio * len(samples))))
        picked = [samples[int(i)] for i in torch.linspace(0, len(samples) - 1, n).round().long().unique().tolist()]
        layers = lora_layers(model)
        weights = {name: layer.get_base_layer().weight for name, layer in layers.items()}
        for w in weights.values():
            w.grad = None
        was_training = model.training
        model.eval()  # no dropout: the gradient of the weights as they are
        size = ctx.config.train.batch_size if ctx.config is not None else 8
        batches = 0
        totals = {name: torch.zeros(w.shape, dtype=torch.float32, device=w.device) for name, w in weights.items()}
        with only_trainable(model, list(weights.values())):
            for i in range(0, len(picked), size):
                batch = {k: v.to(ctx.accelerator.device) for k, v in encoder.train_batch(picked[i : i + size]).items()}
                model(**batch).loss.backward()
                for name, w in weights.items():  # summed in float32, not in the weights' dtype (bf16 on GPUs)
                    totals[name] += w.grad.float()
                    w.grad = None
                batches += 1
        model.train(was_training)
        return {name: (t / max(batches, 1)).cpu() for name, t in totals.items()}

    # --- the stream ----------------------------------------------------------------------------------
    def before_task(self, task: str, samples: list[Sample], ctx: TaskContext) -> None:
        grads = self.gradients(ctx.train_data[task], ctx)
        with torch.no_grad():
            for name, layer in lora_layers(ctx.unwrapped).items():
                A, B, _ = _factors(layer)
                r = A.shape[0]
                _, _, vh = torch.linalg.svd(residual(grads[name], self.basis[name]), full_matrices=False)
                rows = vh[:r]
                if rows.shape[0] < r:  # fewer residual directions than the rank: pad with zeros
                    rows = torch.cat([rows, rows.new_zeros(r - rows.shape[0], rows.shape[1])])
                A.copy_(rows.to(A))
                B.zero_()

    def before_step(self, ctx: TaskContext) -> None:
        for a in self._a:
            a.grad = None  # A is fixed: only B learns

    def after_task(self, task: str, ctx: TaskContext) -> None:
        model = ctx.unwrapped
        factors = {}
        for name, layer in lora_layers(model).items():
            A, B, _ = _factors(layer)
            factors[name] = (A.detach().cpu().clone(), B.detach().cpu().clone())
        self.merged.append(factors)
        merge_factors(model, factors, self.scaling)
        with torch.no_grad():
            for layer in lora_layers(model).values():
                _factors(layer)[1].zero_()  # merged: the adapter adds nothing until the next task sets it
        grads = self.gradients(ctx.train_data[task], ctx)
        for name, g in grads.items():
            self.basis[name] = extend_basis(self.basis[name], g, self.options.energy)

    def report(self) -> dict:
        dims = [b.shape[0] for b in self.basis.values()]
        return {"tasks_merged": len(self.merged), "protected_dims_mean": round(sum(dims) / max(len(dims), 1), 2)}

    # --- checkpoint ----------------------------------------------------------------------------------
    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors = {f"basis.{n}": b for n, b in self.basis.items()}
        return {**tensors, **merged_tensors(self.merged)}, {"tasks_merged": len(self.merged), "scaling": self.scaling}

    def load_state_dict(self, tensors, meta) -> None:
        self.basis = {k[len("basis."):]: v for k, v in tensors.items() if k.startswith("basis.")}
        self.scaling = {n: float(s) for n, s in meta.get("scaling", {}).items()}
        self.merged = merged_from(tensors, int(meta.get("tasks_merged", 0)))
        for factors in self.merged:  # setup ran on the start's weights: re-apply every merge
            merge_factors(self._model, factors, self.scaling)
