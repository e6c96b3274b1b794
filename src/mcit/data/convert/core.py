"""The converter framework: read official dataset files, stream our task format out.

A converter is a generator of :class:`Item` (one question/answer about one image, with the
place it came from); :func:`prepare` checks each item's image, streams the records into
``OUT/<task>/{train,test}.jsonl`` through temporary files that replace the old ones only when
the whole conversion succeeded, and merges the tasks into ``OUT/benchmark.json``. Images are
referenced in place (the task's ``image_root``), never copied.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mcit.data.benchmark import MANIFEST
from mcit.data.format import to_record
from mcit.errors import DataError, McitError
from mcit.utils import atomic_write_json

SPLITS = ("train", "test")
SHORT_ANSWER = "Answer the question using a single word or phrase."
CHOICE_ANSWER = "Answer with the option's letter from the given choices directly."
CAPTION_PROMPT = "Provide a one-sentence caption for the provided image."
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


@dataclass(frozen=True)
class Item:
    task: str
    split: str  # "train" | "test"
    id: str
    image: str | None  # relative to the task's image root; None = text-only (skipped)
    question: str
    answer: str
    answers: list[str] | None  # references for the scorer; None = the answer alone
    origin: str  # "file: record KEY", for messages


@dataclass(frozen=True)
class TaskInfo:
    scorer: str
    scorer_options: dict = field(default_factory=dict)
    max_new_tokens: int | None = None


@dataclass(frozen=True)
class Option:
    default: Any
    parse: Callable[[str], Any]
    help: str


def read_json(path: Path) -> Any:
    """A JSON file, or a DataError naming the file, line and column."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise DataError(f"{path}: not found") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason})") from None


@dataclass
class Source:
    """What a converter reads: the source folder, the image folder and its options."""

    name: str
    src: Path
    images: Path
    options: dict[str, Any]
    skipped: Counter = field(default_factory=Counter)  # reason -> count, filled by converters

    def file(self, *candidates: str) -> Path:
        """The first candidate (relative to ``src``) that exists, or a clear error."""
        for c in candidates:
            p = self.src / c
            if p.is_file():
                return p
        raise DataError(f"{self.name}: none of {', '.join(candidates)} found in {self.src}")

    def json(self, path: Path) -> Any:
        return read_json(path)

    def jsonl(self, path: Path) -> Iterator[tuple[int, Any]]:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    yield lineno, json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno})") from None

    def records(self, path: Path) -> Iterator[tuple[str, Any]]:
        """(location, record) for a JSON array or a JSONL file."""
        if path.suffix == ".jsonl":
            for lineno, rec in self.jsonl(path):
                yield f"{path}:{lineno}", rec
            return
        data = self.json(path)
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON array of records, got {type(data).__name__}")
        for i, rec in enumerate(data):
            yield f"{path}: record {i}", rec


def need(rec: Any, key: str, kind: type | tuple[type, ...], where: str, allow_empty: bool = False) -> Any:
    """``rec[key]`` checked for presence and type, or a DataError naming file, record and field."""
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    if key not in rec:
        raise DataError(f"{where}: missing field {key!r}")
    value = rec[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        names = " or ".join(k.__name__ for k in kinds)
        raise DataError(f"{where}: field {key!r} must be {names}, got {type(value).__name__} {value!r:.60}")
    if isinstance(value, str) and not allow_empty and not value.strip():
        raise DataError(f"{where}: field {key!r} is empty")
    return value


def answer_list(values: Any, where: str, key: str = "answers") -> list[str]:
    """A list of answer strings, from strings or ``{"answer": ...}`` objects."""
    if not isinstance(values, list) or not values:
        raise DataError(f"{where}: field {key!r} must be a non-empty list")
    out = []
    for i, v in enumerate(values):
        if isinstance(v, dict):
            v = v.get("answer")
        if not isinstance(v, str):
            raise DataError(f"{where}: {key}[{i}] must be a string or an object with a string 'answer'")
        out.append(v)
    return out


def majority(answers: list[str]) -> str:
    """The most frequent answer (first seen wins ties): the training target for 10-answer VQA."""
    counts = Counter(a.strip() for a in answers)
    best = max(counts.values())
    return next(a.strip() for a in answers if counts[a.strip()] == best)


def options_block(choices: list[str]) -> str:
    if len(choices) > len(LETTERS):
        raise ValueError(f"{len(choices)} choices; at most {len(LETTERS)} are supported")
    return "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(choices))


def hash_split(key: str, test_fraction: float) -> str:
    """A stable train/test assignment for datasets without an official split."""
    import hashlib

    h = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64
    return "test" if h < test_fraction else "train"


@dataclass(frozen=True)
class Converter:
    name: str
    summary: str
    files: str  # what --src must hold (help text and README)
    tasks: Callable[[dict], dict[str, TaskInfo]]  # options -> ordered task name -> scorer
    items: Callable[[Source], Iterator[Item]]
    images: str = ""  # default image folder relative to --src ("" = --src itself)
    options: dict[str, Option] = field(default_factory=dict)


REGISTRY: dict[str, Converter] = {}


def register(conv: Converter) -> Converter:
    if conv.name in REGISTRY:  # a second converter of the same name would silently replace the first
        raise TypeError(f"converter {conv.name!r} is registered twice")
    REGISTRY[conv.name] = conv
    return conv


def get_converter(name: str) -> Converter:
    if name not in REGISTRY:
        raise McitError(f"unknown dataset {name!r}; available: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]


def parse_options(conv: Converter, pairs: dict[str, Any]) -> dict[str, Any]:
    opts = {k: o.default for k, o in conv.options.items()}
    for key, raw in pairs.items():
        if key not in conv.options:
            valid = ", ".join(f"{k} ({o.help})" for k, o in conv.options.items()) or "none"
            raise McitError(f"{conv.name}: unknown option {key!r}; options: {valid}")
        if isinstance(raw, str):
            try:
                raw = conv.options[key].parse(raw)
            except (ValueError, TypeError):
                raise McitError(f"{conv.name}: option {key}={raw!r}: expected {conv.options[key].help}") from None
        opts[key] = raw
    return opts


class _Sink:
    """Temporary JSONL files per (task, split), committed together or not at all."""

    def __init__(self, out: Path):
        self.out = out
        self.files: dict[tuple[str, str], Any] = {}
        self.tmp: dict[tuple[str, str], Path] = {}
        self.ids: dict[tuple[str, str], set[str]] = {}
        self.counts: Counter = Counter()
        self.images: dict[tuple[str, str], set[str]] = {}

    def write(self, item: Item) -> None:
        key = (item.task, item.split)
        if key not in self.files:
            final = self.out / item.task / f"{item.split}.jsonl"
            final.parent.mkdir(parents=True, exist_ok=True)
            tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
            self.tmp[key], self.files[key] = tmp, open(tmp, "w", encoding="utf-8")
            self.ids[key], self.images[key] = set(), set()
        if item.id in self.ids[key]:
            raise DataError(f"{item.origin}: duplicate id {item.id!r} in task {item.task!r} ({item.split})")
        self.ids[key].add(item.id)
        self.images[key].add(item.image)
        rec = to_record(item.id, item.image, item.question, item.answer, item.answers)
        self.files[key].write(json.dumps(rec, ensure_ascii=False) + "\n")
        self.counts[key] += 1

    def commit(self) -> None:
        for f in self.files.values():
            f.flush()
            os.fsync(f.fileno())
            f.close()
        for (task, split), tmp in self.tmp.items():
            os.replace(tmp, self.out / task / f"{split}.jsonl")

    def abort(self) -> None:
        for key, f in self.files.items():
            f.close()
            self.tmp[key].unlink(missing_ok=True)


def prepare(
    name: str,
    src: str | Path,
    out: str | Path,
    images: str | Path | None = None,
    options: dict[str, Any] | None = None,
    skip_missing: bool = False,
    progress: Callable[[int], None] | None = None,
) -> dict:
    """Convert dataset ``name`` from ``src`` into the prepared benchmark folder ``out``.

    Tasks already in ``out/benchmark.json`` from other datasets are kept, so several datasets
    can be prepared into one stream. Returns a report: counts per task and split, skipped
    records by reason, and the image root.
    """
    conv = get_converter(name)
    src, out = Path(src).resolve(), Path(out).resolve()
    if not src.is_dir():
        raise DataError(f"--src: {src} is not a folder (expected: {conv.files})")
    opts = parse_options(conv, options or {})
    tasks = conv.tasks(opts)
    image_root = Path(images).resolve() if images is not None else (src / conv.images if conv.images else src)
    if not image_root.is_dir():
        raise DataError(f"image folder {image_root} does not exist; pass --images DIR (expected: {conv.files})")
    source = Source(name, src, image_root, opts)
    sink = _Sink(out)
    seen: dict[str, bool] = {}
    missing: list[str] = []
    n = 0
    try:
        for item in conv.items(source):
            if item.task not in tasks:
                raise AssertionError(f"converter {name} produced unknown task {item.task!r}")
            if item.image is None:
                source.skipped["no image (text-only)"] += 1
                continue
            ok = seen.get(item.image)
            if ok is None:
                ok = seen[item.image] = (image_root / item.image).is_file()
            if not ok:
                if not skip_missing:
                    raise DataError(
                        f"{item.origin}: image not found: {image_root / item.image} "
                        "(check --images, or pass --skip-missing to leave such records out)"
                    )
                source.skipped["missing image"] += 1
                if len(missing) < 5:
                    missing.append(str(image_root / item.image))
                continue
            sink.write(item)
            n += 1
            if progress is not None and n % 1000 == 0:
                progress(n)
        for task in tasks:
            for split in SPLITS:
                if sink.counts[(task, split)] == 0:
                    raise DataError(f"{name}: no {split} records for task {task!r} in {src}")
        sink.commit()
    except BaseException:
        sink.abort()
        raise
    report = {
        "dataset": name,
        "src": str(src),
        "image_root": str(image_root),
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in opts.items()},
        "counts": {t: {s: sink.counts[(t, s)] for s in SPLITS} for t in tasks},
        "images": {t: {s: len(sink.images.get((t, s), ())) for s in SPLITS} for t in tasks},
        "skipped": dict(source.skipped),
        "missing_examples": missing,
    }
    _merge_manifest(out, tasks, image_root, report)
    return report


def _merge_manifest(out: Path, tasks: dict[str, TaskInfo], image_root: Path, report: dict) -> None:
    manifest = out / MANIFEST
    meta: dict = {"name": out.name, "tasks": []}
    if manifest.is_file():
        try:
            meta = json.loads(manifest.read_text())
        except json.JSONDecodeError as e:
            raise DataError(f"{manifest}:{e.lineno}: malformed JSON ({e.msg}); remove it or fix it") from None
    kept = [t for t in meta.get("tasks", []) if t.get("name") not in tasks]
    for task, info in tasks.items():
        entry = {
            "name": task,
            "train": f"{task}/train.jsonl",
            "test": f"{task}/test.jsonl",
            "scorer": info.scorer,
            "scorer_options": dict(info.scorer_options),
            "image_root": str(image_root),
            "source": {"dataset": report["dataset"], "src": report["src"], "options": report["options"],
                       "counts": report["counts"][task]},
        }
        if info.max_new_tokens is not None:
            entry["max_new_tokens"] = info.max_new_tokens
        kept.append(entry)
    meta["tasks"] = kept
    atomic_write_json(manifest, meta)
