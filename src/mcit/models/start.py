"""Starting models: build one from a config, ship it, find it, check it.

A start is a llava-hf checkpoint folder (``config.json``, ``model.safetensors``, tokenizer and
processor files) plus ``manifest.json``: the config and data that built it, its training figures,
its zero-shot row and the SHA-256 of every file, so a copy can be checked against what was built.

- :func:`mcit.models.build.build_start` (``mcit base build CONFIG --out DIR``) builds a tiny
  LLaVA from ``model.tiny``, instruction-tunes it on the benchmark's ``base`` mix and evaluates it
  once (in its own module: it assembles a benchmark as a run does, which imports this one).
- Shipped starts live in the package (``mcit/starts/<name>/``); ``model.kind: start`` with
  ``model.start: NAME`` loads one through the same code as any local checkpoint, and with
  ``model.path: DIR`` a built start that is not shipped (:func:`start_folder`).
- ``model.kind: tiny`` (from scratch) builds the same way into the cache, keyed by everything
  that shapes it, for those who want a start of their own per config and seed.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import torch

from mcit.data.benchmark import Benchmark
from mcit.errors import ConfigError, McitError
from mcit.models import MANIFEST, STARTS_DIR, shipped_starts  # noqa: F401 (re-exported)
from mcit.progress import console
from mcit.utils import atomic_write_json, stable_hash, temporary_sibling

CACHE_DONE = "mcit_base.json"  # a cached from-scratch base is complete once this exists


# --- shipped starts ----------------------------------------------------------------------------

def resolve_start(name: str) -> Path:
    starts = shipped_starts()
    if name not in starts:
        raise ConfigError(f"model.start: no shipped start {name!r}; available: {', '.join(starts) or '(none)'}")
    return starts[name]


def start_folder(cfg) -> Path:
    """``model.kind: start``: the start's folder: ``model.path`` (a start built by ``mcit base
    build`` and not shipped) or the shipped start ``model.start``."""
    if cfg.model.path is not None:
        path = Path(cfg.model.path)
        if not (path / MANIFEST).is_file():
            raise ConfigError(f"model.path: {path} is not a start built by `mcit base build` (no {MANIFEST}); "
                              "for another checkpoint folder set model.kind: hf")
        return path
    return resolve_start(cfg.model.start)


def start_name(cfg) -> str:
    """The start's name: its manifest's (a built start's folder) or the shipped one's."""
    if cfg.model.path is None:
        return cfg.model.start
    return read_manifest(start_folder(cfg)).get("name") or Path(cfg.model.path).name


def read_manifest(path: Path) -> dict:
    file = Path(path) / MANIFEST
    try:
        return json.loads(file.read_text())
    except FileNotFoundError:
        raise McitError(f"{file}: not found (is {path} a start built by `mcit base build`?)") from None
    except json.JSONDecodeError as e:
        raise McitError(f"{file}:{e.lineno}: malformed JSON ({e.msg})") from None


def file_digests(path: Path) -> dict[str, str]:
    """SHA-256 of every file of a checkpoint folder but the manifest, by name."""
    out = {}
    for f in sorted(Path(path).iterdir()):
        if f.is_file() and f.name != MANIFEST:
            out[f.name] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def verify_start(path: Path) -> dict:
    """The manifest of a start whose files match it; raises naming the first file that does not."""
    manifest = read_manifest(path)
    recorded = manifest.get("files") or {}
    actual = file_digests(path)
    for name, digest in recorded.items():
        if name not in actual:
            raise McitError(f"{path}: {name} is missing (the manifest lists it)")
        if actual[name] != digest:
            raise McitError(f"{path}: {name} does not match its manifest (sha256 {actual[name][:12]} != {digest[:12]})")
    extra = sorted(set(actual) - set(recorded))
    if extra:
        raise McitError(f"{path}: files not in the manifest: {', '.join(extra)}")
    return manifest


# --- building ----------------------------------------------------------------------------------

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


def start_digest(cfg) -> str:
    """The SHA-256 of a start's weights, as its manifest records them."""
    return read_manifest(start_folder(cfg))["files"]["model.safetensors"]


def start_mix(cfg) -> dict[str, float]:
    """The instruction mix the run's start was tuned on: a built start's manifest says; a
    from-scratch or local start is described by ``base.mix``."""
    if cfg.model.kind == "start":
        return dict(read_manifest(start_folder(cfg))["data"]["mix"])
    return dict(cfg.base.mix)


def train_base_model(cfg, bench: Benchmark, device, show_progress: bool = True):
    """A tiny LLaVA built from ``model.tiny`` and instruction-tuned on ``base.mix``:
    (model on the CPU, processor, training stats or None)."""
    from mcit.models.encode import Encoder
    from mcit.models.tiny import build_tiny_llava, build_word_tokenizer
    from mcit.train import SingleProcess, train_stage

    samples, weights = base_mix(cfg, bench) if cfg.base.enabled else ([], None)
    tokenizer = build_word_tokenizer(_vocabulary_texts(bench, samples), [cfg.model.prompt_template])
    model, processor = build_tiny_llava(cfg.model.tiny, tokenizer)
    stats = None
    if cfg.base.enabled and cfg.base.steps:
        for p in model.parameters():  # the base model learns to see: the vision tower trains too
            p.requires_grad_(True)
        encoder = Encoder(processor, cfg.model.prompt_template, cfg.model.tiny.max_length)
        stats = train_stage(model.to(device), encoder, samples, cfg.base, SingleProcess(device), seed=cfg.seed,
                            weights=weights, desc="base", show_progress=show_progress)
    return model.to("cpu").eval(), processor, stats


def _final_loss(stats) -> float | None:
    if not stats or not stats.losses:
        return None
    tail = stats.losses[-50:]
    return sum(tail) / len(tail)


def _save_folder(model, processor, out: Path, extra: dict, name: str) -> Path:
    """Write a checkpoint folder and its JSON file ``name`` atomically: a temporary sibling renamed
    into place, so a folder that exists is complete. Returns ``out``."""

    tmp = temporary_sibling(out)
    try:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        if name == MANIFEST:
            extra = {**extra, "files": file_digests(tmp)}
        atomic_write_json(tmp / name, extra)
        if out.exists():
            if name == CACHE_DONE:  # a concurrent run cached the same base first; keep its copy
                shutil.rmtree(tmp)
                return out
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def base_settings(cfg) -> dict:
    """The ``base`` section as it shapes a from-scratch start (what its cache key hashes)."""
    settings = cfg.base.model_dump(mode="json")
    if settings.get("epochs") is None:  # added later: unset, it must not change existing cache keys
        settings.pop("epochs", None)
    return settings


def base_key(cfg, bench: Benchmark) -> str:
    """Everything that shapes a from-scratch starting model, hashed."""
    manifest = json.loads((bench.root / "benchmark.json").read_text())
    for task in manifest.get("tasks", []):  # how tasks are scored does not shape the model
        for key in ("scorer", "scorer_options", "max_new_tokens"):
            task.pop(key, None)
    return stable_hash(
        {
            "tiny": cfg.model.tiny.model_dump(mode="json"),
            "base": base_settings(cfg),
            "template": cfg.model.prompt_template,
            "benchmark": manifest,
            "seed": cfg.seed,
            # bump when the training code changes what a base trains to: the key cannot see code,
            # and a stale cached base silently differs from what a fresh clone trains
            "version": 1,
        }
    )


def ensure_tiny_base(cfg, bench: Benchmark, cache_dir: Path, device, show_progress: bool = True) -> Path:
    """``model.kind: tiny``: the from-scratch start of this config and seed, built once and cached."""
    key = base_key(cfg, bench)
    out = cache_dir / "base" / key
    if (out / CACHE_DONE).is_file():
        return out
    if cfg.base.enabled and cfg.base.steps and show_progress:
        console.print(f"[bold]Instruction-pretraining the starting model[/] (cached as base/{key})")
    model, processor, stats = train_base_model(cfg, bench, device, show_progress)
    out.parent.mkdir(parents=True, exist_ok=True)
    return _save_folder(model, processor, out, {
        "key": key, "steps": cfg.base.steps if cfg.base.enabled else 0,
        "train_s": stats.seconds if stats else 0.0, "final_loss": _final_loss(stats)}, CACHE_DONE)


def _data_digest(cfg, bench: Benchmark) -> str:
    """SHA-256 over the base mix's files (records and images), in a fixed order."""
    h = hashlib.sha256()
    for part in cfg.base.mix:
        path = bench.base.get(part) or bench.task(part).train
        h.update(path.name.encode())
        h.update(path.read_bytes())
        images = sorted((path.parent / f"{path.stem}_images").glob("*"))
        for img in images:
            h.update(img.read_bytes())
    return h.hexdigest()
