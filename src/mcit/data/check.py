"""``mcit data check``: validate a prepared benchmark before spending compute on it.

Per task and split: every record parses, has a non-empty question and answer, every image
exists and opens (header read; ``full=True`` decodes the pixels too), and the task's scorer
accepts its references (run with the first reference as the prediction, which must score)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from mcit.data.benchmark import load_benchmark
from mcit.data.format import Sample
from mcit.errors import DataError, McitError
from mcit.scoring import score_task

MAX_PROBLEMS = 20


@dataclass
class SplitCheck:
    task: str
    split: str
    records: int = 0
    images: int = 0
    missing: int = 0
    unreadable: int = 0
    empty: int = 0
    scorer: str = ""
    scorer_ok: bool = True
    self_score: float | None = None  # the scorer's headline with reference 1 as the prediction

    @property
    def ok(self) -> bool:
        return self.records > 0 and not (self.missing or self.unreadable or self.empty) and self.scorer_ok


@dataclass
class CheckReport:
    root: Path
    rows: list[SplitCheck] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    more_problems: int = 0

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.rows) and not self.problems

    def problem(self, text: str) -> None:
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(text)
        else:
            self.more_problems += 1


def check_benchmark(root: str | Path, full: bool = False, progress: Callable[[str], None] | None = None) -> CheckReport:
    bench = load_benchmark(root)
    report = CheckReport(Path(root))
    opened: dict[Path, str | None] = {}  # image -> None (fine) or the reason it is not
    for spec in bench.tasks.values():
        for split in ("train", "test"):
            if progress is not None:
                progress(f"{spec.name} {split}")
            row = SplitCheck(spec.name, split, scorer=spec.scorer)
            report.rows.append(row)
            try:
                samples = spec.load(split, bench.image_root, check_images=False)
            except McitError as e:  # a malformed file: the rest of the benchmark is still checked
                report.problem(str(e))
                row.scorer_ok = False
                continue
            row.records = len(samples)
            where = spec.train if split == "train" else spec.test
            seen = set()
            for s in samples:
                if not s.question.strip() or not s.answer.strip():
                    row.empty += 1
                    report.problem(f"{where}: record {s.id!r}: empty question or answer")
                if s.image is None:
                    continue
                if s.image not in seen:
                    seen.add(s.image)
                    row.images += 1
                if s.image not in opened:
                    opened[s.image] = image_problem(s.image, full)
                reason = opened[s.image]
                if reason is not None:
                    if reason == "missing":
                        row.missing += 1
                    else:
                        row.unreadable += 1
                    report.problem(f"{where}: record {s.id!r}: image {s.image}: {reason}")
            if samples:
                try:
                    result = score_task(spec.scorer, [s.references[0] for s in samples],
                                        [s.references for s in samples], spec.scorer_options)
                    row.self_score = float(result.headline)
                    if row.self_score == 0.0:  # e.g. 'vqa' needs several annotators; one answer scores 0
                        row.scorer_ok = False
                        report.problem(f"{where}: scorer {spec.scorer!r} gives 0 even to the reference answers "
                                       "themselves; pick a scorer that fits these references (e.g. 'exact')")
                except McitError as e:
                    row.scorer_ok = False
                    report.problem(f"{where}: scorer {spec.scorer!r} does not accept the references: {e}")
    return report


def image_problem(path: Path, full: bool) -> str | None:
    """Why an image cannot be used (missing, or not opened / decoded), or None when it is fine."""
    if not path.is_file():
        return "missing"
    try:
        with Image.open(path) as im:
            if full:
                im.load()
            else:
                im.size  # noqa: B018 - the header is parsed by open; size proves it made sense
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        return f"cannot be opened ({e})"
    return None


def verify_images(files: dict[Path, list[Sample]], full: bool = True, workers: int = 8) -> int:
    """Open every distinct image of the given task files (``full``: decode its pixels), in threads;
    raise naming the file, the record and the image of the first that fails. Returns the number of
    distinct images checked."""
    from concurrent.futures import ThreadPoolExecutor

    owners: dict[Path, tuple[Path, str]] = {}  # image -> (task file, record id) of its first use
    for file, samples in files.items():
        for s in samples:
            if s.image is not None:
                owners.setdefault(s.image, (file, s.id))
    images = list(owners)
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(images)))) as pool:
        for image, reason in zip(images, pool.map(lambda p: image_problem(p, full), images), strict=True):
            if reason is not None:
                file, rid = owners[image]
                raise DataError(f"{file}: record {rid!r}: image {image}: {reason}")
    return len(images)
