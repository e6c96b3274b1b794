"""RegLoRA, the regularisation half of SEFE (Chen et al., ICML 2025), as its reference code does it.

After each task, for every LoRA layer, the task's update ΔW = B·A (without the alpha/r scaling)
is taken and its ``ratio`` share of entries with the largest |ΔW| (per layer) become that task's
*key elements*; their positions join those of the earlier tasks (a concatenation: a position
chosen by several tasks counts several times, as in the reference). The update is then merged
into the layer's weight (W <- W + scaling·B·A) and a fresh LoRA starts the next task (A as PEFT
initialises it, seeded; B = 0). While later tasks train, the loss gets

    lam · (1 / L) · Σ_layers mean_{(i,j) in key positions} |(B·A)_ij|

(L: the number of LoRA layers), an L1 pull of the new update toward zero at the old tasks' key
positions, so the merged weights there stay as the old tasks left them, while the other entries
stay free. The projector, trained in full beside LoRA, is not regularised (as in the reference).

Sources (docs/methods.md): jinpeng0528/SEFE ``key_elements_identification.py`` (top 2% of |B@A|
per layer, index union over tasks), ``llava/model/language_model/modeling_llama.py`` (the L1
mean per module, summed over modules and divided by their count) and ``llava_llama.py``
(``loss_reg * 2.5e3``); MCITlib's ``LLaVA/RegLoRA`` copy is the same. The reference merges with
``scripts/merge_lora_weights.py`` and re-creates the adapter; we merge in place and keep every
task's factors in the method state, so a resumed run re-applies the same merges bit for bit.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field

from mcit.errors import ConfigError
from mcit.methods import register
from mcit.methods.base import Method, MethodOptions, TaskContext
from mcit.utils import stable_hash


class RegLoRAOptions(MethodOptions):
    ratio: float = Field(0.02, gt=0, le=1, description="share of each LoRA layer's |B@A| entries kept as key elements per task")
    lam: float = Field(2500.0, ge=0, description="weight of the L1 penalty on the new update at the key positions")


def lora_layers(model) -> dict[str, Any]:
    """The PEFT LoRA layers of ``model`` by module name (each with one adapter)."""
    from peft.tuners.lora import LoraLayer

    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer) and len(m.lora_A)}


def _factors(layer) -> tuple[torch.Tensor, torch.Tensor, float]:
    adapter = next(iter(layer.lora_A))
    return layer.lora_A[adapter].weight, layer.lora_B[adapter].weight, float(layer.scaling[adapter])


def merge_factors(model, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], scaling: dict[str, float]) -> None:
    """W <- W + scaling · B A in every LoRA layer named in ``factors``."""
    layers = lora_layers(model)
    with torch.no_grad():
        for name, (A, B) in factors.items():
            weight = layers[name].get_base_layer().weight
            delta = (B.to(weight.device).float() @ A.to(weight.device).float()) * scaling[name]
            weight.add_(delta.to(weight.dtype))


def merged_tensors(merged: list[dict[str, tuple[torch.Tensor, torch.Tensor]]]) -> dict[str, torch.Tensor]:
    """Every merged task's factors as flat checkpoint tensors (``merged.K.A.layer``, ``merged.K.B.layer``)."""
    out = {}
    for k, factors in enumerate(merged):
        for n, (A, B) in factors.items():
            out[f"merged.{k}.A.{n}"], out[f"merged.{k}.B.{n}"] = A, B
    return out


def merged_from(tensors: dict[str, torch.Tensor], count: int) -> list[dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    merged = []
    for k in range(count):
        a, b = f"merged.{k}.A.", f"merged.{k}.B."
        names = [n[len(a):] for n in tensors if n.startswith(a)]
        merged.append({n: (tensors[a + n], tensors[b + n]) for n in names})
    return merged


def key_positions(delta: torch.Tensor, ratio: float) -> torch.Tensor:
    """Flat indices of the ``ratio`` share (rounded down, at least 1) of entries largest in |delta|."""
    k = max(1, int(ratio * delta.numel()))
    return torch.topk(delta.detach().abs().flatten(), k).indices.sort().values


@register
class RegLoRA(Method):
    name = "reglora"
    Options = RegLoRAOptions
    summary = "RegLoRA (SEFE): after each task, merge its LoRA and pull later updates to zero at its key elements."
    paper = "Chen et al., SEFE: Superficial and Essential Forgetting Eliminator for MCIT, ICML 2025"

    def __init__(self, options: RegLoRAOptions):
        super().__init__(options)
        self.keys: dict[str, torch.Tensor] = {}  # module -> flat key positions of every finished task
        self.merged: list[dict[str, tuple[torch.Tensor, torch.Tensor]]] = []  # per task: module -> (A, B)
        self.scaling: dict[str, float] = {}
        self._model = None
        self._seed = 0
        self._layers: tuple[Any, dict[str, Any]] | None = None  # (model, its LoRA layers)

    def setup(self, model, ctx: TaskContext) -> None:
        self._model = ctx.unwrapped if ctx.accelerator is not None else model
        if not lora_layers(self._model):
            raise ConfigError("method.name: reglora needs LoRA layers to regularise; set model.tuning: lora")
        self._seed = ctx.seed

    # --- after a task: key elements, merge, a fresh adapter --------------------------------------
    def after_task(self, task: str, ctx: TaskContext) -> None:
        factors = {}
        for name, layer in lora_layers(ctx.unwrapped).items():
            A, B, scaling = _factors(layer)
            delta = (B.detach().float() @ A.detach().float())
            new = key_positions(delta, self.options.ratio).cpu()
            self.keys[name] = torch.cat([self.keys[name], new]) if name in self.keys else new
            factors[name] = (A.detach().cpu().clone(), B.detach().cpu().clone())
            self.scaling[name] = scaling
        self.merged.append(factors)
        merge_factors(ctx.unwrapped, factors, self.scaling)
        self._reset(ctx.unwrapped, len(self.merged))


    def _reset(self, model, tasks_done: int) -> None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(stable_hash([self._seed, tasks_done, "reglora-init"]), 16) % 2**63)
            for layer in lora_layers(model).values():
                layer.reset_lora_parameters(next(iter(layer.lora_A)), True)

    # --- the penalty ---------------------------------------------------------------------------
    def penalty(self, model) -> torch.Tensor | None:
        if not self.keys or self.options.lam == 0:
            return None
        if self._layers is None or self._layers[0] is not model:  # walked once, not every step
            self._layers = (model, lora_layers(model))
        layers = self._layers[1]
        terms = []
        for name, layer in layers.items():
            if name not in self.keys:
                continue
            A, B, _ = _factors(layer)
            idx = self.keys[name] = self.keys[name].to(A.device)
            terms.append((B.float() @ A.float()).flatten()[idx].abs().mean())
        if not terms:
            return None
        return self.options.lam * torch.stack(terms).sum() / len(layers)

    def extra_loss(self, batch: dict, outputs, ctx: TaskContext) -> torch.Tensor | None:
        return self.penalty(ctx.unwrapped)

    def report(self) -> dict:
        return {"key_elements": int(sum(v.numel() for v in self.keys.values())), "tasks_merged": len(self.merged)}

    # --- checkpoint ------------------------------------------------------------------------------
    def state_dict(self):
        tensors = {f"keys.{n}": v.cpu() for n, v in self.keys.items()}
        return {**tensors, **merged_tensors(self.merged)}, {"tasks_merged": len(self.merged), "scaling": self.scaling}

    def load_state_dict(self, tensors, meta) -> None:
        """Restore the key positions and re-apply every finished task's merge to the start's weights
        (``setup`` ran on the fresh model; the checkpoint's trainable state holds the fresh adapter)."""
        self.keys = {k[len("keys."):]: v for k, v in tensors.items() if k.startswith("keys.")}
        self.scaling = {n: float(s) for n, s in meta.get("scaling", {}).items()}
        self.merged = merged_from(tensors, int(meta.get("tasks_merged", 0)))
        if self._model is None:
            raise ConfigError("reglora: load_state_dict before setup; the merges need the model")
        for factors in self.merged:
            merge_factors(self._model, factors, self.scaling)
