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


def load_pretrained(path: Path, dtype: str = "float32"):
    from transformers import LlavaForConditionalGeneration, LlavaProcessor

    if not path.is_dir():
        raise ConfigError(f"model.path: {path} is not a folder with a checkpoint")
    try:
        processor = LlavaProcessor.from_pretrained(path)
        model = LlavaForConditionalGeneration.from_pretrained(path, dtype=getattr(torch, dtype))
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.path: cannot load a LLaVA checkpoint from {path}: {e}") from None
    model.eval()
    return model, processor


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
    from mcit.train import train_stage

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
            model.to(accelerator.device), encoder, samples, cfg.base, accelerator, seed=cfg.seed,
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
    return load_pretrained(Path(path), cfg.model.dtype)
