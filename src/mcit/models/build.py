"""Building a shipped start (``mcit base build CONFIG --out DIR``): a tiny LLaVA trained on the
benchmark's base mix by :mod:`mcit.models.start`, evaluated once, saved with its manifest."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from mcit.data.benchmark import Benchmark
from mcit.errors import ConfigError
from mcit.models.start import (
    MANIFEST,
    _data_digest,
    _final_loss,
    _save_folder,
    read_manifest,
    train_base_model,
)
from mcit.progress import console
from mcit.utils import environment_info


def zero_shot_row(model, processor, cfg, bench: Benchmark, tasks: list[str], device) -> dict[str, float]:
    """The start's headline score on each task's test split."""
    from mcit.evaluate import evaluate_task
    from mcit.models.encode import Encoder

    encoder = Encoder(processor, cfg.model.prompt_template, cfg.model.tiny.max_length)
    model = model.to(device)
    row = {}
    for t in tasks:
        spec = bench.task(t)
        samples = spec.load("test", bench.image_root)[: cfg.benchmark.max_test]
        row[t] = round(evaluate_task(model, encoder, spec, samples, cfg.eval, device).headline, 2)
    model.to("cpu")
    return row


def build_start(cfg, out: Path, command: str, show_progress: bool = True) -> dict:
    """Build the start a config describes into ``out`` (replacing it) and return its manifest."""
    from mcit.assembly import general_tasks, prepare_benchmark, stream_tasks
    from mcit.utils import default_cache_dir, seed_everything

    if cfg.model.kind != "tiny":
        raise ConfigError("model.kind: a start is built from model.tiny; set model.kind: tiny in the build config")
    if not (cfg.base.enabled and cfg.base.steps):
        raise ConfigError("base: a start is instruction-tuned; set base.enabled: true and base.steps > 0")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = torch.device("cuda" if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
    wall = time.perf_counter()
    bench = prepare_benchmark(cfg, cache_dir, show_progress)
    stream, general = stream_tasks(cfg, bench), general_tasks(cfg, bench)
    seed_everything(cfg.seed)
    model, processor, stats = train_base_model(cfg, bench, device, show_progress)
    if show_progress:
        console.print("Evaluating the start on the stream and the general tasks")
    row = zero_shot_row(model, processor, cfg, bench, [*stream, *general], device)
    manifest = {
        "name": cfg.name or out.name,
        "command": command,
        "config": json.loads(json.dumps(cfg.model_dump(mode="json"))),
        "data": {"benchmark": bench.name, "version": json.loads((bench.root / "benchmark.json").read_text()).get("version"),
                 "synth": cfg.benchmark.synth.model_dump(mode="json"), "mix": dict(cfg.base.mix),
                 "sha256": _data_digest(cfg, bench)},
        "steps": cfg.base.steps,
        "final_loss": _final_loss(stats),
        "train_s": round(stats.seconds, 1),
        "wall_s": round(time.perf_counter() - wall, 1),
        "parameters": sum(p.numel() for p in model.parameters()),
        "prompt_template": cfg.model.prompt_template,
        "max_length": cfg.model.tiny.max_length,
        "zero_shot": {"stream": {t: row[t] for t in stream}, "general": {t: row[t] for t in general}},
        "environment": environment_info(str(device)),
    }
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    _save_folder(model, processor, out, manifest, MANIFEST)
    return read_manifest(out)
