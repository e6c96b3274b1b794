"""Tuning modes: which parameters train.

- ``full``: the projector and the language model (the vision tower stays frozen, as in LLaVA).
- ``lora``: PEFT LoRA adapters on the language model's linear layers only; all else frozen.
- ``projector``: the vision-to-language projector only.

Each family names its parts differently (:mod:`mcit.models.families`); the names here are those
of the loaded model's family.
"""

from __future__ import annotations

import contextlib
import re

from mcit.errors import ConfigError

VISION = "vision_tower"


def llava_parts(model):
    """(the LLaVA model without a PEFT wrapper, its vision tower, its input embedding), for EProj,
    which replaces the projector with experts routed per sample: LLaVA-1.5 checkpoints only (one
    fixed-size image per sample reaches its projector as one row); any other family is refused in
    one line."""
    from mcit.models.families import family_of, unwrap

    base = unwrap(model)
    family = family_of(base)
    if not family.fixed_image_tokens:
        raise ConfigError(
            f"method.name: this method replaces the projector with experts routed per sample, which needs "
            f"LLaVA-1.5's one row of image features per sample; a {family.name} checkpoint's projector sees a "
            "batch's patches, tiles or crops at once, so it runs on LLaVA-1.5 checkpoints only")
    inner = getattr(base, "model", base)
    return base, getattr(inner, VISION), base.get_input_embeddings()


def apply_tuning(model, mode: str, lora_cfg=None, train_projector: bool = False):
    from mcit.models.families import family_of, is_projector, is_vision, lora_scope

    family = family_of(model)
    for p in model.parameters():
        p.requires_grad_(False)
    if mode == "full":
        for name, p in model.named_parameters():
            if not is_vision(name):
                p.requires_grad_(True)
        return model
    if mode == "projector":
        if family.projector is None:
            raise ConfigError(f"model.tuning: a {family.name} checkpoint has no separate projector; use lora or full")
        for name, p in model.named_parameters():
            if is_projector(name):
                p.requires_grad_(True)
        return model
    if mode == "lora":
        from peft import LoraConfig, get_peft_model

        targets = "|".join(re.escape(m) for m in lora_cfg.target_modules)
        # A regex so that only the language model's layers get adapters, never the vision tower.
        pattern = rf"{lora_scope(family)}\.({targets})"
        matched = [n for n, _ in model.named_modules() if re.fullmatch(pattern, n)]
        if not matched:
            raise ConfigError(
                f"model.lora.target_modules {lora_cfg.target_modules} match no module of the {family.name} "
                f"language model ({family.language_model})"
            )
        config = LoraConfig(
            r=lora_cfg.r,
            lora_alpha=lora_cfg.alpha,
            lora_dropout=lora_cfg.dropout,
            target_modules=pattern,
            bias="none",
        )
        model = get_peft_model(model, config)
        if train_projector:  # LLaVA-1.5's LoRA recipe trains the projector in full alongside the adapters
            for name, p in model.named_parameters():
                if is_projector(name) and "lora_" not in name:
                    p.requires_grad_(True)
        return model
    raise ConfigError(f"model.tuning: unknown mode {mode!r}; allowed: full, lora, projector")


@contextlib.contextmanager
def only_trainable(model, params):
    """Within the block only ``params`` require gradients (a side stage: a router, a gradient pass);
    afterwards every parameter that required them does again."""
    held = [p for p in model.parameters() if p.requires_grad]
    keep = set(map(id, params))
    for p in held:
        p.requires_grad_(id(p) in keep)
    for p in params:
        p.requires_grad_(True)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(False)
        for p in held:
            p.requires_grad_(True)


def trainable_state(model) -> dict:
    """The trainable tensors by parameter name (what a per-task checkpoint stores)."""
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model, tensors: dict) -> None:
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in tensors]
    unknown = [n for n in tensors if n not in params]
    if missing or unknown:
        raise ConfigError(
            f"checkpoint does not fit the model: missing {missing[:3]}, unexpected {unknown[:3]} "
            "(was it written by a run with another model or tuning config?)"
        )
    import torch

    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(value.to(params[name].device, params[name].dtype))


def mergeable_lora_layers(model) -> list:
    """The LoRA layers :func:`merged_lora` would fold, or [] when it would leave the model as it is:
    only a plain single-adapter LoRA (PEFT's ``default``, enabled) on float32 base weights (folded
    into bf16/fp16 weights, a small update would lose its low bits)."""
    import torch
    from peft.tuners.lora import LoraLayer

    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    plain = all(set(m.lora_A) == {"default"} and m.active_adapters == ["default"]
                and not m.disable_adapters and not m.merged
                and m.get_base_layer().weight.dtype == torch.float32 for m in layers)
    return layers if plain else []


@contextlib.contextmanager
def merged_lora(model):
    """Inference with each LoRA update folded into its base weight (one matmul per layer instead of
    three), the weights restored bit for bit afterwards (from a copy in host memory); yields whether
    it merged. It merges only a plain single-adapter LoRA (PEFT's ``default``, enabled) on float32
    base weights: expert banks with several adapters or their own forward hooks, and bf16/fp16
    weights, are left as they are (yields False)."""
    import torch

    layers = mergeable_lora_layers(model)
    if not layers:
        yield False
        return
    saved = []
    try:
        with torch.no_grad():
            for m in layers:
                weight = m.get_base_layer().weight
                saved.append((m, weight, weight.detach().to("cpu", copy=True)))  # host memory, not the GPU's
                weight += m.get_delta_weight("default").to(weight.dtype)
                m._disable_adapters = True  # the base layer alone now computes W + BA·scaling
        yield True
    finally:
        with torch.no_grad():
            for m, weight, original in saved:
                weight.copy_(original)
                m._disable_adapters = False
