"""Get the starting model of a run.

``tiny``: build from config, instruction-pretrain on the benchmark's base mix, and cache the
result under ``<cache>/base/<hash>`` (hash of everything that shapes it), so reruns skip it.
``hf``: load a local checkpoint folder. Both end as ``from_pretrained`` of a folder, so the rest
of the run cannot tell them apart.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch

from mcit.data.benchmark import Benchmark
from mcit.errors import ConfigError
from mcit.progress import console
from mcit.utils import atomic_write_json, stable_hash

DONE = "mcit_base.json"


# A llava-hf style checkpoint folder: each requirement is satisfied by any one of its files.
HF_REQUIRED = {
    "model config": ("config.json",),
    "weights": ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json"),
    "tokenizer": ("tokenizer.json", "tokenizer.model"),
    "image processor": ("preprocessor_config.json", "processor_config.json"),
}


def check_checkpoint_dir(path: Path) -> None:
    """A clear error naming what a local checkpoint folder lacks (no hub access is ever tried)."""
    if not path.is_dir():
        raise ConfigError(f"model.path: {path} is not a folder (expected a llava-hf style checkpoint folder)")
    missing = [f"{what} ({' or '.join(files)})" for what, files in HF_REQUIRED.items()
               if not any((path / f).is_file() for f in files)]
    index = next((path / f for f in HF_REQUIRED["weights"] if f.endswith(".index.json") and (path / f).is_file()), None)
    if index is not None:
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError):
            raise ConfigError(f"model.path: {index} is not a weight index (no 'weight_map')") from None
        missing += [f"weight shard {s}" for s in shards if not (path / s).is_file()]
    if missing:
        raise ConfigError(f"model.path: {path} is incomplete; missing: {'; '.join(missing)}")


def load_pretrained(path: Path, dtype: str = "float32", gradient_checkpointing: bool = False):
    import os

    from transformers import LlavaForConditionalGeneration, LlavaProcessor

    check_checkpoint_dir(path)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local folder only: never reach for the hub
    try:
        processor = LlavaProcessor.from_pretrained(path, local_files_only=True)
        model = LlavaForConditionalGeneration.from_pretrained(path, dtype=getattr(torch, dtype), local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(f"model.path: cannot load a LLaVA checkpoint from {path}: {e}") from None
    if gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()  # adapters on a frozen embedding still need activations' grads
    model.eval()
    return model, processor


def prompt_template(cfg, processor) -> str:
    """The prompt format: ``model.prompt_template`` if the config sets it (or the model is tiny),
    else, for hf checkpoints, the processor's chat template rendered around ``{question}``."""
    chat = getattr(processor, "chat_template", None)
    if cfg.model.kind != "hf" or "prompt_template" in cfg.model.model_fields_set or not chat:
        return cfg.model.prompt_template
    sentinel = "\x00QUESTION\x00"
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": sentinel}]}]
    try:
        text = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    except Exception as e:  # a template that cannot render one user turn: say so, let the user set it
        raise ConfigError(f"model.path: the processor's chat template cannot render a prompt ({e}); "
                          "set model.prompt_template") from None
    bos = processor.tokenizer.bos_token
    if bos and text.startswith(bos):
        text = text[len(bos):]  # the encoder adds <s> itself
    text = text.replace("{", "{{").replace("}", "}}").replace(sentinel, "{question}")
    if "{question}" not in text:
        raise ConfigError("model.path: the chat template dropped the question; set model.prompt_template")
    return text.rstrip()


def _base_settings(cfg) -> dict:
    settings = cfg.base.model_dump(mode="json")
    if settings.get("epochs") is None:  # added later: unset, it must not change existing cache keys
        settings.pop("epochs", None)
    return settings


def base_key(cfg, bench: Benchmark) -> str:
    """Everything that shapes the starting model, hashed."""
    manifest = json.loads((bench.root / "benchmark.json").read_text())
    for task in manifest.get("tasks", []):  # how tasks are scored does not shape the model
        for key in ("scorer", "scorer_options", "max_new_tokens"):
            task.pop(key, None)
    return stable_hash(
        {
            "tiny": cfg.model.tiny.model_dump(mode="json"),
            "base": _base_settings(cfg),
            "template": cfg.model.prompt_template,
            "benchmark": manifest,
            "seed": cfg.seed,
            # bump when the training code changes what a base trains to: the key cannot see code,
            # and a stale cached base silently differs from what a fresh clone trains
            "version": 1,
        }
    )


def _vocabulary_texts(bench: Benchmark, base_samples) -> list[str]:
    texts = []
    for spec in bench.tasks.values():
        for split in ("train", "test"):
            for s in spec.load(split, bench.image_root):
                texts.append(s.question)
                texts.extend(s.references)
                texts.append(s.answer)
    texts.extend(s.question + " " + s.answer for s in base_samples)
    return texts


def base_mix(cfg, bench: Benchmark):
    """The base-mix samples and per-sample sampling weights (each part gets its share)."""
    samples, weights = [], []
    total = sum(cfg.base.mix.values())
    for part, weight in cfg.base.mix.items():
        if part in bench.base:
            part_samples = bench.load_base(part)
        elif part in bench.tasks:
            part_samples = bench.tasks[part].load("train", bench.image_root)
        else:
            bench.load_base(part)  # raises with the list of parts and tasks
        samples.extend(part_samples)
        weights.extend([weight / total / len(part_samples)] * len(part_samples))
    return samples, torch.tensor(weights, dtype=torch.double)


def ensure_tiny_base(cfg, bench: Benchmark, cache_dir: Path, accelerator, show_progress: bool = True) -> Path:
    from mcit.models.encode import Encoder
    from mcit.models.tiny import build_tiny_llava, build_word_tokenizer
    from mcit.models.tuning import apply_tuning
    from mcit.train import SingleProcess, train_stage

    key = base_key(cfg, bench)
    out = cache_dir / "base" / key
    if (out / DONE).is_file():
        return out
    samples, weights = base_mix(cfg, bench) if cfg.base.enabled else ([], None)
    tokenizer = build_word_tokenizer(_vocabulary_texts(bench, samples), [cfg.model.prompt_template])
    model, processor = build_tiny_llava(cfg.model.tiny, tokenizer)
    stats = None
    if cfg.base.enabled and cfg.base.steps:
        console.print(f"[bold]Instruction-pretraining the starting model[/] (cached as base/{key})")
        model = apply_tuning(model, "full")
        for p in model.parameters():  # the base model learns to see: the vision tower trains too
            p.requires_grad_(True)
        encoder = Encoder(processor, cfg.model.prompt_template, cfg.model.tiny.max_length)
        stats = train_stage(
            model.to(accelerator.device), encoder, samples, cfg.base, SingleProcess(accelerator.device), seed=cfg.seed,
            weights=weights, desc="base", show_progress=show_progress,
        )
    model = model.to("cpu")
    tmp = out.with_name(out.name + f".tmp{time.time_ns()}")
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    atomic_write_json(
        tmp / DONE,
        {"key": key, "steps": cfg.base.steps if cfg.base.enabled else 0,
         "train_s": stats.seconds if stats else 0.0,
         "final_loss": sum(stats.losses[-50:]) / len(stats.losses[-50:]) if stats and stats.losses else None},
    )
    if out.exists():  # a concurrent run finished first; keep its copy
        shutil.rmtree(tmp)
    else:
        tmp.rename(out)
    return out


def starting_model(cfg, bench: Benchmark, cache_dir: Path, accelerator, show_progress: bool = True):
    if cfg.model.kind == "tiny":
        path = ensure_tiny_base(cfg, bench, cache_dir, accelerator, show_progress)
    else:
        path = cfg.model.path
    return load_pretrained(Path(path), cfg.model.dtype, cfg.model.kind == "hf" and cfg.model.gradient_checkpointing)
