"""``mcit sweep``: several configs, and a grid of overrides over them, run one after another into
one folder, then compared: one command for a findings table (He et al.'s two starting conditions
x eight methods) or a sensitivity curve (DGG's alpha).

Every run's config is loaded and validated before the first one trains. A run folder that holds
a finished run is kept, one interrupted is continued (the runner's ``--resume``), so a sweep that
was stopped picks up where it was by running the same command again.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

from mcit.config import RunConfig
from mcit.errors import ConfigError


@dataclass(frozen=True)
class SweepRun:
    name: str  # the run's folder under the sweep's folder
    config: Path
    overrides: tuple[str, ...]
    cfg: RunConfig  # the validated config with its overrides


def parse_grid(grid: list[str]) -> list[tuple[str, list[str]]]:
    """``key=v1,v2`` options as (key, values); keys must differ and values be non-empty."""
    axes: list[tuple[str, list[str]]] = []
    for item in grid:
        key, sep, values = item.partition("=")
        vals = [v.strip() for v in values.split(",")] if sep else []
        if not key.strip() or not vals or any(not v for v in vals):
            raise ConfigError(f"--grid {item!r}: expected KEY=V1,V2,... (e.g. method.alpha=0,0.1,0.2)")
        if any(k == key.strip() for k, _ in axes):
            raise ConfigError(f"--grid: key {key.strip()!r} given twice")
        axes.append((key.strip(), vals))
    return axes


def plan_sweep(configs: list[Path], grid: list[str] | None = None, sets: list[str] | None = None) -> list[SweepRun]:
    """Every (config, grid point) as a run, each config validated with its overrides."""
    from mcit.config import load_config

    if not configs:
        raise ConfigError("sweep: name at least one config")
    axes = parse_grid(grid or [])
    seen: dict[str, SweepRun] = {}  # by folder name, in plan order
    for config in configs:
        for point in itertools.product(*(vals for _, vals in axes)) if axes else [()]:
            point_sets = tuple(f"{k}={v}" for (k, _), v in zip(axes, point, strict=True))
            overrides = (*(sets or []), *point_sets)
            cfg = load_config(config, list(overrides))
            name = "__".join([cfg.name or config.stem, *point_sets]).replace("/", "_")
            if name in seen:
                raise ConfigError(
                    f"sweep: {config} and {seen[name].config} would both write {name!r}; give the configs distinct "
                    "'name:' keys"
                )
            seen[name] = SweepRun(name, config, overrides, cfg)
    return list(seen.values())


def run_sweep(runs: list[SweepRun], out_dir: Path, show_progress: bool = True, on_start=None) -> list[Path]:
    """Run (or continue) each planned run under ``out_dir``; the run folders, in order."""
    from mcit.runner import run as run_stream

    dirs = []
    for i, r in enumerate(runs):
        target = out_dir / r.name
        if on_start is not None:
            on_start(i, r, target)
        run_stream(r.cfg, target, resume=True, show_progress=show_progress)
        dirs.append(target)
    return dirs


__all__ = ["SweepRun", "parse_grid", "plan_sweep", "run_sweep"]
