"""UCIT and CoIN, which ship as LLaVA instruction JSON already: validate every record, index
the tasks in order, and attach the scorer each benchmark's own scripts use.

Train files hold LLaVA conversations (``id``, ``image``, ``conversations``); test files hold
``{question_id, image, text, answer}`` items (CoIN grounding: ``answer_bbox``). Caption
references come from the COCO-format file UCIT ships next to each caption test file, whose
image ids are 1..N in test-file order (the order UCIT's scorer pairs them in).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from mcit.data.convert.core import (
    Converter,
    Item,
    Option,
    Source,
    TaskInfo,
    answer_list,
    majority,
    need,
    register,
)
from mcit.data.format import MultiTurnError, single_turn
from mcit.errors import DataError


@dataclass(frozen=True)
class _Part:
    task: str
    folders: tuple[str, ...]  # accepted folder names, first match wins
    train: tuple[str, ...]
    test: tuple[str, ...]
    info: TaskInfo
    coco_refs: tuple[str, ...] = ()  # caption references file (UCIT)


def _train_items(source: Source, part: _Part, path: Path) -> Iterator[Item]:
    for where, rec in source.records(path):
        try:
            question, answer = single_turn(need(rec, "conversations", list, where), where)
        except MultiTurnError:
            source.skipped[f"{part.task}: multi-turn conversation"] += 1
            continue
        image = rec.get("image")
        if image is not None and not isinstance(image, str):
            raise DataError(f"{where}: field 'image' must be a string path")
        yield Item(part.task, "train", str(need(rec, "id", (str, int), where)), image, question, answer, None, where)


def _coco_references(source: Source, path: Path) -> dict[int, list[str]]:
    data = source.json(path)
    refs: dict[int, list[str]] = defaultdict(list)
    for i, ann in enumerate(need(data, "annotations", list, str(path))):
        where = f"{path}: annotations[{i}]"
        refs[need(ann, "image_id", int, where)].append(need(ann, "caption", str, where).strip())
    return refs


def _test_items(source: Source, part: _Part, path: Path, extra: dict[str, list[str]] | None) -> Iterator[Item]:
    coco = next((path.parent / c for c in part.coco_refs if (path.parent / c).is_file()), None)
    refs = _coco_references(source, coco) if coco is not None else None
    if part.coco_refs and coco is None:
        source.skipped[f"{part.task}: no {part.coco_refs[0]}, references = the 'answer' field only"] += 1
    for n, (where, rec) in enumerate(source.records(path)):
        qid = str(need(rec, "question_id", (str, int), where))
        text = need(rec, "text", str, where).replace("<image>", "").strip()
        if "answer_bbox" in rec:
            answer = need(rec, "answer_bbox", str, where).strip()
            answers = None
        elif extra is not None and qid in extra:
            answers = extra[qid]
            answer = majority(answers)
        else:
            value = need(rec, "answer", (str, int, list), where)
            answers = answer_list(value, where, "answer") if isinstance(value, list) else None
            answer = answers[0] if answers else str(value).strip()
        if refs is not None:
            answers = refs.get(n + 1)
            if not answers:
                raise DataError(f"{where}: no captions for image_id {n + 1} in {coco}")
        image = rec.get("image")
        yield Item(part.task, "test", qid, image if isinstance(image, str) else None, text, answer, answers, where)


def _textvqa_answers(source: Source, path: Path | None) -> dict[str, list[str]] | None:
    if path is None:
        return None
    data = need(source.json(Path(path)), "data", list, str(path))
    return {str(need(r, "question_id", int, f"{path}: data[{i}]")): answer_list(r.get("answers"), f"{path}: data[{i}]")
            for i, r in enumerate(data)}


def _llava_items(parts: tuple[_Part, ...], roots: tuple[str, ...]):
    def items(source: Source) -> Iterator[Item]:
        base = next((source.src / r for r in roots if (source.src / r).is_dir()), source.src)
        extras = {"textvqa": _textvqa_answers(source, source.options.get("textvqa_annotations"))}
        for part in parts:
            folder = next((base / f for f in part.folders if (base / f).is_dir()), None)
            if folder is None:
                raise DataError(f"{base}: no folder for task {part.task!r} (looked for {', '.join(part.folders)})")
            train = next((folder / f for f in part.train if (folder / f).is_file()), None)
            test = next((folder / f for f in part.test if (folder / f).is_file()), None)
            for kind, found, names in (("train", train, part.train), ("test", test, part.test)):
                if found is None:
                    raise DataError(f"{folder}: no {kind} file (looked for {', '.join(names)})")
            yield from _train_items(source, part, train)
            yield from _test_items(source, part, test, extras.get(part.task))

    return items


_EXACT = TaskInfo("exact")
_CAPTION = TaskInfo("caption", {"headline": "mean"}, max_new_tokens=40)
UCIT_PARTS = (
    _Part("imagenet_r", ("ImageNet-R",), ("train.json",), ("test_3000.json", "test.json"), _EXACT),
    _Part("arxivqa", ("ArxivQA",), ("train_4w.json", "train.json"), ("test_3000.json", "test.json"), _EXACT),
    _Part("vizwiz_caption", ("VizWiz-caption", "VizWiz"), ("train.json",), ("test_3000.json", "test.json"),
          _CAPTION, ("val_coco_type_3000.json",)),
    _Part("iconqa", ("IconQA",), ("train.json",), ("test_3000.json", "test.json"), _EXACT),
    _Part("clevr_math", ("CLEVR-Math", "CLEVR"), ("train_4w.json", "train.json"), ("test_3000.json", "test.json"), _EXACT),
    _Part("flickr30k", ("Flickr30k-cap", "Flickr30k"), ("train_brief_4w.json", "train.json"),
          ("test_3000.json", "test.json"), _CAPTION, ("val_coco_type_3000.json",)),
)
COIN_PARTS = (
    _Part("scienceqa", ("ScienceQA",), ("train.json",), ("test.json",), TaskInfo("choice", max_new_tokens=4)),
    _Part("textvqa", ("TextVQA",), ("train.json",), ("val.json", "test.json"), TaskInfo("vqa_evalai")),
    _Part("imagenet", ("ImageNet",), ("train.json",), ("test.json",), TaskInfo("contains", {"direction": "both"})),
    _Part("gqa", ("GQA",), ("train.json",), ("test.json",), _EXACT),
    _Part("vizwiz", ("VizWiz",), ("train.json",), ("test.json",), _EXACT),
    _Part("grounding", ("Grounding",), ("train.json",), ("test.json",), TaskInfo("iou", {"threshold": 0.5})),
    _Part("vqav2", ("VQAv2",), ("train.json",), ("test.json",), _EXACT),
    _Part("ocrvqa", ("OCRVQA",), ("train.json",), ("test_1.json", "test.json"), _EXACT),
)

register(Converter(
    "ucit", "UCIT (HiDe-LLaVA): 6 tasks in LLaVA JSON; exact match, captions = mean of the COCO metrics",
    "UCIT instruction folders (ImageNet-R, ArxivQA, VizWiz-caption, IconQA, CLEVR-Math, Flickr30k-cap), each "
    "train*.json + test_3000.json (+ val_coco_type_3000.json for captions); images under datasets/ (--images)",
    lambda o: {p.task: p.info for p in UCIT_PARTS}, _llava_items(UCIT_PARTS, ("instructions/UCIT", "UCIT")),
    images="datasets",
))
register(Converter(
    "coin", "CoIN: 8 tasks in LLaVA JSON, with the scorer of each task's CoIN eval script",
    "Instructions/<Task>/{train,test}.json for ScienceQA, TextVQA, ImageNet, GQA, VizWiz, Grounding, VQAv2, OCRVQA; "
    "images under cl_dataset/ (--images)",
    # soft accuracy needs the 10 annotator answers; with the test file's single answer it could give no
    # credit at all, so TextVQA falls back to exact match then
    lambda o: {p.task: p.info if p.task != "textvqa" or o["textvqa_annotations"] else _EXACT for p in COIN_PARTS},
    _llava_items(COIN_PARTS, ("playground/Instructions", "Instructions", "Instruction_Type1")),
    images="cl_dataset",
    options={"textvqa_annotations": Option(None, Path, "TextVQA_0.5.1_val.json: the 10 answers for TextVQA's soft "
                                                       "accuracy (without it, the test file's single answer)")},
))
