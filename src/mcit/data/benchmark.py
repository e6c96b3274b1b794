"""A benchmark on disk: ``benchmark.json`` naming ordered tasks, their files and scorers.

```
{"name": "synth", "tasks": [{"name": "color", "train": "color/train.jsonl",
  "test": "color/test.jsonl", "scorer": "vqa", "scorer_options": {}}, ...],
 "base": {"describe": "base/describe.jsonl", ...}}
```
Paths are relative to the folder holding ``benchmark.json``; images are relative to each data
file's folder unless ``image_root`` is given (per task, as converters write it, or for the
whole benchmark). The synthetic generator and every converter
write this layout; :func:`load_benchmark` is the one reader.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from mcit.data.format import Sample, load_task_file
from mcit.errors import DataError

MANIFEST = "benchmark.json"


@dataclass
class TaskSpec:
    name: str
    train: Path
    test: Path
    scorer: str
    scorer_options: dict = field(default_factory=dict)
    max_new_tokens: int | None = None
    image_root: Path | None = None  # this task's images (a converter's --images); wins over the benchmark's

    def load(self, split: str, image_root: Path | None = None, check_images: bool = True) -> list[Sample]:
        return load_task_file(self.train if split == "train" else self.test, self.image_root or image_root,
                              self.name, check_images)


@dataclass
class Benchmark:
    name: str
    root: Path
    tasks: dict[str, TaskSpec]
    base: dict[str, Path]
    image_root: Path | None = None
    general: list[str] = field(default_factory=list)  # held-out general tasks a run evaluates by default

    def task(self, name: str) -> TaskSpec:
        if name not in self.tasks:
            raise DataError(
                f"benchmark {self.name!r} ({self.root}) has no task {name!r}; "
                f"available: {', '.join(self.tasks)}"
            )
        return self.tasks[name]

    def load_base(self, name: str) -> list[Sample]:
        if name not in self.base:
            raise DataError(
                f"benchmark {self.name!r} has no base-mix part {name!r}; available: "
                f"{', '.join(self.base) or '(none)'}; tasks can also be named: {', '.join(self.tasks)}"
            )
        return load_task_file(self.base[name], self.image_root, f"base:{name}")


def load_benchmark(root: str | Path) -> Benchmark:
    root = Path(root)
    manifest = root / MANIFEST
    if not manifest.is_file():
        raise DataError(f"{manifest}: benchmark manifest not found (is {root} a prepared benchmark?)")
    try:
        meta = json.loads(manifest.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{manifest}:{e.lineno}: malformed JSON ({e.msg})") from None
    image_root = Path(root / meta["image_root"]) if meta.get("image_root") else None
    tasks = {}
    for i, t in enumerate(meta.get("tasks", [])):
        missing = [k for k in ("name", "train", "test", "scorer") if k not in t]
        if missing:
            raise DataError(f"{manifest}: tasks[{i}] is missing field(s) {', '.join(missing)}")
        tasks[t["name"]] = TaskSpec(
            name=t["name"],
            train=root / t["train"],
            test=root / t["test"],
            scorer=t["scorer"],
            scorer_options=dict(t.get("scorer_options", {})),
            max_new_tokens=t.get("max_new_tokens"),
            image_root=root / t["image_root"] if t.get("image_root") else None,
        )
    if not tasks:
        raise DataError(f"{manifest}: field 'tasks' must list at least one task")
    base = {k: root / v for k, v in meta.get("base", {}).items()}
    general = list(meta.get("general", []))
    unknown = [t for t in general if t not in tasks]
    if unknown:
        raise DataError(f"{manifest}: field 'general' names tasks it does not list: {', '.join(unknown)}")
    return Benchmark(meta.get("name", root.name), root, tasks, base, image_root, general)
