"""LoRA experts: the shared mechanism of the LoRA-expert methods (O-LoRA, MoE-LoRA, ...).

Every linear layer that the run's LoRA targets (the PEFT ``LoraLayer`` s of ``model.tuning:
lora``) gets ``n`` more PEFT adapters, ``e0`` .. ``e{n-1}``, added with PEFT's own
``add_adapter`` (so they are stored, named, initialised and saved as PEFT adapters are, on the
tiny model and on an hf checkpoint alike). What PEFT lacks is the combination: its active
adapters are summed with weight 1, and per-sample routing exists only as an ``adapter_names``
argument that transformers does not pass down to the layers, with no weights and no gradient.
So PEFT's own LoRA path is switched off in those layers (``enable_adapters(False)``: each
returns its base layer's output) and a forward hook adds

    y = base(x) + Σ_e  g_e · scaling_e · B_e A_e dropout_e(x)

where the gate ``g`` is one of (``ExpertBank.use`` / ``weights`` / ``route`` / ``router``):

- a fixed vector over experts (one expert, e.g. the task's own; or a fixed merge, e.g. the sum
  of every finished task's expert);
- one vector per sample (``route``: a task id, key or prototype similarity), constant over the
  sample's tokens and over the whole of a ``generate`` call, so routing inside a batch is the
  same as routing each sample alone;
- a learned token-level router per layer (``router``: softmax of a bias-free linear map of the
  layer's input, optionally kept to its top k and renormalised), as CoIN's MoE-LoRA does.

Experts with zero weight everywhere are skipped, so a gate of exactly one expert gives PEFT's
LoRA output bit for bit. Freezing is per expert: a frozen expert keeps ``requires_grad`` (so
the per-task checkpoint still holds it and DDP sees one set of parameters for the whole run)
and :meth:`ExpertBank.drop_frozen_grads`, called between backward and the optimiser step, sets
its gradients to None, which AdamW skips (no update, no weight decay): it does not change, bit
for bit. The PEFT ``default`` adapter stays in the model, frozen and unused.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from mcit.errors import ConfigError, McitError


def lora_target_layers(model) -> dict[str, Any]:
    """The PEFT LoRA layers of ``model`` (a PEFT model) by module name."""
    from peft.tuners.lora import LoraLayer

    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


class ExpertBank:
    """``n`` LoRA experts on every LoRA layer of a PEFT model, and the gate that combines them."""

    def __init__(self, model, n: int, rank: int | None = None, alpha: float | None = None,
                 init: str = "peft", router: bool = False, seed: int = 0, modules: list[str] | None = None):
        if not hasattr(model, "peft_config") or "default" not in model.peft_config:
            raise ConfigError("method.name: LoRA experts need the run's LoRA layers; set model.tuning: lora")
        if n < 1:
            raise ConfigError(f"method: the expert bank needs at least one expert, got {n}")
        base_cfg = model.peft_config["default"]
        self.rank = rank or base_cfg.r
        self.alpha = alpha if alpha is not None else base_cfg.lora_alpha * self.rank / base_cfg.r
        self.n = n
        self.names = [f"e{i}" for i in range(n)]
        cfg = dataclasses.replace(base_cfg, r=self.rank, lora_alpha=self.alpha)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # PEFT initialises A from the global RNG: make the bank the seed's
            for name in self.names:
                model.add_adapter(name, cfg)
        every = lora_target_layers(model)
        for layer in every.values():
            layer.enable_adapters(False)  # PEFT's own LoRA path off (and frozen): the hook adds the experts
        # ``modules``: experts only in these linear layers (e.g. the FFN); the others keep no LoRA at all
        self.layers = {n: m for n, m in every.items() if modules is None or n.rsplit(".", 1)[-1] in modules}
        if not self.layers:
            raise ConfigError(f"method: no LoRA layer to add experts to (model.lora.target_modules vs {modules})")
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 1)
            for layer in self.layers.values():
                for name in self.names:
                    if init == "normal":  # CoIN / MCITlib experts: A ~ N(0, 0.01), B = 0
                        nn.init.normal_(layer.lora_A[name].weight, mean=0.0, std=0.01)
                        nn.init.zeros_(layer.lora_B[name].weight)
                if router:
                    ref = layer.lora_A[self.names[0]].weight
                    layer.mcit_router = nn.Linear(layer.in_features, n, bias=False).to(ref.device, ref.dtype)
        self.has_router = router
        for p in self.parameters():
            p.requires_grad_(True)
        self.frozen: set[int] = set()
        self._fixed: torch.Tensor | None = torch.zeros(n)  # the gate: a fixed vector ...
        self._per_sample: torch.Tensor | None = None  # ... or one vector per sample
        self._router_top_k: int | None = None
        self._use_router = False
        self.record = False  # sum the router's gates in eval mode (take_gates reads and resets the sum)
        self.usage: torch.Tensor | None = None  # when set: per expert, tokens that rank it in their top 2 (training)
        self._gate_sum, self._gate_count = torch.zeros(n, dtype=torch.float64), 0
        self._layer_name = {id(layer): name for name, layer in self.layers.items()}
        self._merged: dict[str, tuple[str, list[int]]] = {}  # layer name -> (kind, experts): overrides the gate
        # a method's own combination, (layer, x, base output) -> output, in place of the gate (SMoLoRA)
        self.combiner = None
        self._hooks = [layer.register_forward_hook(self._hook) for layer in self.layers.values()]

    # --- parameters -------------------------------------------------------------------------------
    def expert_parameters(self, e: int) -> list[nn.Parameter]:
        name = self.names[e]
        return [p for layer in self.layers.values() for p in (layer.lora_A[name].weight, layer.lora_B[name].weight)]

    def router_parameters(self) -> list[nn.Parameter]:
        return [layer.mcit_router.weight for layer in self.layers.values()] if self.has_router else []

    def parameters(self) -> list[nn.Parameter]:
        return [p for e in range(self.n) for p in self.expert_parameters(e)] + self.router_parameters()

    def factors(self, e: int) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
        """Expert ``e``'s (A, B, scaling) per layer name."""
        name = self.names[e]
        return {n: (layer.lora_A[name].weight, layer.lora_B[name].weight, float(layer.scaling[name]))
                for n, layer in self.layers.items()}

    def freeze(self, e: int) -> None:
        """Add expert ``e`` to the frozen ones (the others keep their state)."""
        self.frozen.add(e)

    def train_only(self, experts: list[int]) -> None:
        """Freeze every expert but ``experts``, which train, even if frozen before (e.g. a later
        task's expert, frozen while an earlier task trained)."""
        self.frozen = set(range(self.n)) - set(experts)

    def drop_frozen_grads(self) -> None:
        """Between backward and the optimiser step: frozen experts get no update (grad None)."""
        for e in self.frozen:
            for p in self.expert_parameters(e):
                p.grad = None

    # --- the gate ---------------------------------------------------------------------------------
    def use(self, experts: int | list[int], weights: list[float] | None = None) -> None:
        """A fixed gate for every sample and token: ``experts`` with ``weights`` (default 1 each)."""
        experts = [experts] if isinstance(experts, int) else list(experts)
        weights = [1.0] * len(experts) if weights is None else list(weights)
        gate = torch.zeros(self.n)
        for e, w in zip(experts, weights, strict=True):
            gate[e] = w
        self._fixed, self._per_sample, self._use_router = gate, None, False

    def route(self, gates: torch.Tensor) -> None:
        """One gate vector per sample of the coming batch(es): shape (batch, n), held until changed."""
        if gates.dim() != 2 or gates.shape[1] != self.n:
            raise McitError(f"expert routing: expected gates of shape (batch, {self.n}), got {tuple(gates.shape)}")
        self._fixed, self._per_sample, self._use_router = None, gates, False

    def router(self, top_k: int | None = None) -> None:
        """The learned per-layer token router (dense softmax, or its top k renormalised)."""
        if not self.has_router:
            raise McitError("expert bank built without a router")
        self._fixed, self._per_sample, self._use_router, self._router_top_k = None, None, True, top_k

    def merge_layers(self, names, experts: list[int], kind: str = "mean") -> None:
        """Fixed merges in the layers ``names``, over ``experts``, whatever the gate says elsewhere:
        ``mean``: Σ_e ΔW_e / k; ``sum``: Σ_e ΔW_e; ``sum_product``: scaling · (Σ_e B_e)(Σ_e A_e), the
        cross terms B_i A_j included (HiDe-LLaVA's code). No ``names``: no merged layers."""
        if kind not in ("mean", "sum", "sum_product"):
            raise McitError(f"expert merge: unknown kind {kind!r}")
        unknown = [n for n in names if n not in self.layers]
        if unknown:
            raise McitError(f"expert merge: no LoRA layer {unknown[0]!r}")
        self._merged = {n: (kind, list(experts)) for n in names}

    def _gate(self, layer, x: torch.Tensor) -> torch.Tensor:
        if self._use_router:
            probs = torch.softmax(layer.mcit_router(x.to(layer.mcit_router.weight.dtype)), dim=-1)
            k = self._router_top_k
            if k is not None and k < self.n:
                top = probs.topk(k, dim=-1)
                probs = torch.zeros_like(probs).scatter(-1, top.indices, top.values)
                probs = probs / probs.sum(-1, keepdim=True)
            if self.usage is not None and layer.training:
                top = probs.detach().topk(min(2, self.n), dim=-1).indices.reshape(-1)
                self.usage += torch.bincount(top.cpu(), minlength=self.n)
            if self.record and not layer.training:
                self._gate_sum += probs.detach().reshape(-1, self.n).sum(0).double().cpu()
                self._gate_count += probs.shape[0] * probs.shape[1] if probs.dim() == 3 else probs.shape[0]
            return probs
        if self._per_sample is not None:
            if self._per_sample.shape[0] != x.shape[0]:
                raise McitError(f"expert routing: {self._per_sample.shape[0]} gates for a batch of {x.shape[0]}")
            return self._per_sample.to(x.device).unsqueeze(1)  # (batch, 1, n): every token of a sample
        return self._fixed

    def expert_delta(self, layer, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert ``e``'s output in one layer: scaling · B_e A_e dropout(x)."""
        name = self.names[e]
        A, B = layer.lora_A[name], layer.lora_B[name]
        return B(A(layer.lora_dropout[name](x.to(A.weight.dtype)))) * layer.scaling[name]

    def _hook(self, layer, args, output):
        x = args[0]
        if self.combiner is not None:
            return self.combiner(layer, x, output)
        merged = self._merged.get(self._layer_name[id(layer)]) if self._merged else None
        if merged is None:
            gate = self._gate(layer, x)
        else:
            kind, experts = merged
            if not experts:
                return output
            if kind == "sum_product":
                names = [self.names[e] for e in experts]
                A = torch.stack([layer.lora_A[n].weight for n in names]).sum(0)
                B = torch.stack([layer.lora_B[n].weight for n in names]).sum(0)
                xe = layer.lora_dropout[names[0]](x.to(A.dtype))
                delta = nn.functional.linear(nn.functional.linear(xe, A), B) * layer.scaling[names[0]]
                return (output + delta).to(output.dtype)
            gate = torch.zeros(self.n)
            gate[experts] = 1.0 / len(experts) if kind == "mean" else 1.0
        # a router's softmax reaches every expert: no per-layer device sync to find the active ones
        active = [True] * self.n if self._use_router and merged is None else (gate != 0).reshape(-1, self.n).any(0).tolist()
        result = output
        for e, on in enumerate(active):
            if not on:
                continue
            delta = self.expert_delta(layer, e, x)
            g = gate[e] if gate.dim() == 1 else gate[..., e : e + 1]
            result = result + (delta if gate.dim() == 1 and float(g) == 1.0 else delta * g.to(delta.dtype))
        return result.to(output.dtype)

    def take_gates(self) -> list[float] | None:
        """The router's mean gate per expert over every LoRA layer and token recorded since the
        last call (None if nothing was recorded); the sum starts again. Under several processes
        each answered its shard of the test set: the sums are all-reduced first (every process
        calls this, as evaluation asks every process for its summary)."""
        import torch.distributed as dist

        sums = torch.cat([self._gate_sum, torch.tensor([float(self._gate_count)], dtype=torch.float64)])
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            device = self.router_parameters()[0].device if self.has_router else torch.device("cpu")
            reduced = sums.to(device)
            dist.all_reduce(reduced)  # a sum
            sums = reduced.cpu()
        self._gate_sum, self._gate_count = torch.zeros(self.n, dtype=torch.float64), 0
        if not sums[-1]:
            return None
        mean = [round(float(v), 4) for v in sums[:-1] / sums[-1]]
        return mean

    def delta_weight(self, e: int, layer_name: str) -> torch.Tensor:
        """Expert ``e``'s update of one layer's weight, scaling · B A."""
        A, B, s = self.factors(e)[layer_name]
        return (B.detach().float() @ A.detach().float()) * s

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
