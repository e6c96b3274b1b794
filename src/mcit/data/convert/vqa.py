"""Visual question answering datasets: VQAv2 (whole, or VQACL's 10 question-type tasks), GQA,
TextVQA, VizWiz and OCR-VQA, from their official annotation files."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from mcit.data.convert.core import (
    SHORT_ANSWER,
    Converter,
    Item,
    Option,
    Source,
    TaskInfo,
    answer_list,
    majority,
    need,
    read_json,
    register,
)
from mcit.errors import DataError

# ------------------------------------------------------------------------------- VQAv2
VQAV2_SPLITS = {"train": "train2014", "test": "val2014"}

# VQACL's order (CVPR 2023), as used by CL-MoE and DGG.
VQACL_TASKS = ("recognition", "location", "judge", "commonsense", "count", "action", "color", "type",
               "subcategory", "causal")

# question_type (the annotation field) -> task. An approximation of VQACL's partition, whose
# generating script is not public: pass --task-map for its exact question-id -> task map.
_BY_TYPE = {
    **dict.fromkeys(["where is the", "where are the", "what room is"], "location"),
    **dict.fromkeys(["how many", "how many people are", "how many people are in", "what number is"], "count"),
    **dict.fromkeys(["what color is the", "what color are the", "what color", "what color is",
                     "what is the color of the"], "color"),
    **dict.fromkeys(["what kind of", "what type of"], "type"),
    **dict.fromkeys(["none of the above", "what time", "what sport is", "what animal is", "what brand"],
                    "subcategory"),
    **dict.fromkeys(["why", "why is the"], "causal"),
    **dict.fromkeys(["does the", "does this", "do", "has", "can you", "do you", "could"], "commonsense"),
    **dict.fromkeys(["what is the man", "is the man", "are they", "is he", "is the woman", "what is the woman",
                     "what is the person", "is the person", "is this person"], "action"),
}
_PEOPLE = frozenset(
    "man men woman women person people boy boys girl girls child children kid kids guy guys lady ladies "
    "player players skier skiers surfer surfers skateboarder rider riders he she they".split()
)


def vqacl_task(question_type: str, answer_type: str, question: str) -> str:
    """The VQACL task of a VQAv2 question by the documented rules (an approximation)."""
    qt = question_type.strip().lower()
    if qt in _BY_TYPE:
        return _BY_TYPE[qt]
    if qt in ("is this", "are the", "is the", "are these"):
        rest = question.lower().rstrip("?").split()[len(qt.split()):]
        if rest and rest[0] in _PEOPLE:
            return "action"
    if answer_type == "yes/no":
        return "judge"
    return "recognition"


def _load_task_map(path: Path) -> dict[str, str]:
    data = read_json(Path(path))
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object mapping question_id -> task")
    bad = sorted({str(v) for v in data.values()} - set(VQACL_TASKS))
    if bad:
        raise DataError(f"{path}: unknown task(s) {', '.join(bad[:5])}; expected one of {', '.join(VQACL_TASKS)}")
    return {str(k): v for k, v in data.items()}


def _vqav2_items(source: Source, assign) -> Iterator[Item]:
    for split, coco in VQAV2_SPLITS.items():
        qfile = source.file(f"v2_OpenEnded_mscoco_{coco}_questions.json")
        afile = source.file(f"v2_mscoco_{coco}_annotations.json")
        questions = need(source.json(qfile), "questions", list, str(qfile))
        annotations = need(source.json(afile), "annotations", list, str(afile))
        by_qid = {}
        for i, ann in enumerate(annotations):
            where = f"{afile}: annotations[{i}]"
            by_qid[need(ann, "question_id", int, where)] = (ann, where)
        for i, q in enumerate(questions):
            where = f"{qfile}: questions[{i}]"
            qid = need(q, "question_id", int, where)
            image_id = need(q, "image_id", int, where)
            text = need(q, "question", str, where).strip()
            if qid not in by_qid:
                raise DataError(f"{where}: question_id {qid} has no annotation in {afile}")
            ann, awhere = by_qid[qid]
            answers = answer_list(need(ann, "answers", list, awhere), awhere)
            target = need(ann, "multiple_choice_answer", str, awhere)
            task = assign(qid, ann, awhere, text)
            if task is None:
                source.skipped["not in --task-map"] += 1
                continue
            yield Item(task, split, str(qid), f"{coco}/COCO_{coco}_{image_id:012d}.jpg",
                       f"{text}\n{SHORT_ANSWER}", target, answers, where)


def _vqav2_whole(source: Source) -> Iterator[Item]:
    return _vqav2_items(source, lambda qid, ann, where, text: "vqav2")


def _vqav2_10(source: Source) -> Iterator[Item]:
    task_map = _load_task_map(source.options["task_map"]) if source.options["task_map"] else None

    def assign(qid, ann, where, text):
        if task_map is not None:
            return task_map.get(str(qid))
        return vqacl_task(need(ann, "question_type", str, where), need(ann, "answer_type", str, where), text)

    return _vqav2_items(source, assign)


_VQAV2_FILES = ("v2_OpenEnded_mscoco_{train2014,val2014}_questions.json, "
                "v2_mscoco_{train2014,val2014}_annotations.json; images train2014/COCO_train2014_<id:012d>.jpg, "
                "val2014/... (val2014 is the test split)")

register(Converter(
    "vqav2", "VQAv2 as one task (He et al.'s sequences); 10-answer VQA accuracy", _VQAV2_FILES,
    lambda o: {"vqav2": TaskInfo("vqa")}, _vqav2_whole,
))
register(Converter(
    "vqav2_10", "VQAv2 split into VQACL's 10 question-type tasks (rule-based approximation, or --task-map)",
    _VQAV2_FILES, lambda o: {t: TaskInfo("vqa") for t in VQACL_TASKS}, _vqav2_10,
    options={"task_map": Option(None, Path, "a JSON file question_id -> task, for VQACL's exact split")},
))


# --------------------------------------------------------------------------------- GQA
def _gqa(source: Source) -> Iterator[Item]:
    for split, name in (("train", "train"), ("test", source.options["test_split"])):
        path = source.file(f"{name}_balanced_questions.json", f"questions/{name}_balanced_questions.json")
        data = source.json(path)
        if not isinstance(data, dict):
            raise DataError(f"{path}: expected a JSON object keyed by question id")
        for qid, rec in data.items():
            where = f"{path}: question {qid}"
            image = need(rec, "imageId", str, where)
            yield Item("gqa", split, str(qid), f"{image}.jpg",
                       f"{need(rec, 'question', str, where).strip()}\n{SHORT_ANSWER}",
                       need(rec, "answer", str, where).strip(), None, where)


register(Converter(
    "gqa", "GQA balanced questions; CoIN's scorer (lower-case exact match, final period stripped)",
    "{train,testdev}_balanced_questions.json (or under questions/); images/<imageId>.jpg",
    lambda o: {"gqa": TaskInfo("exact")}, _gqa, images="images",
    options={"test_split": Option("testdev", str, "the official split used as test: testdev or val")},
))


# ----------------------------------------------------------------------------- TextVQA
def _textvqa(source: Source) -> Iterator[Item]:
    for split, name in (("train", "train"), ("test", "val")):
        path = source.file(f"TextVQA_0.5.1_{name}.json")
        data = need(source.json(path), "data", list, str(path))
        for i, rec in enumerate(data):
            where = f"{path}: data[{i}]"
            answers = answer_list(need(rec, "answers", list, where), where)
            yield Item("textvqa", split, str(need(rec, "question_id", int, where)),
                       f"{need(rec, 'image_id', str, where)}.jpg",
                       f"{need(rec, 'question', str, where).strip()}\n{SHORT_ANSWER}",
                       majority(answers), answers, where)


register(Converter(
    "textvqa", "TextVQA; EvalAI soft VQA accuracy", "TextVQA_0.5.1_{train,val}.json; train_images/<image_id>.jpg",
    lambda o: {"textvqa": TaskInfo("vqa_evalai")}, _textvqa, images="train_images",
))


# ------------------------------------------------------------------------------ VizWiz
def _vizwiz(source: Source) -> Iterator[Item]:
    for split, name in (("train", "train"), ("test", "val")):
        path = source.file(f"{name}.json", f"Annotations/{name}.json")
        for where, rec in source.records(path):
            answers = answer_list(need(rec, "answers", list, where), where)
            image = need(rec, "image", str, where)
            yield Item("vizwiz", split, Path(image).stem, f"{name}/{image}",
                       f"{need(rec, 'question', str, where).strip()}\n"
                       "When the provided information is insufficient, respond with 'Unanswerable'. "
                       f"{SHORT_ANSWER}",
                       majority(answers), answers, where)


register(Converter(
    "vizwiz", "VizWiz VQA; 10-answer VQA accuracy (CoIN scores exact match: set the scorer in the config)",
    "{train,val}.json (or under Annotations/); images train/<image>, val/<image>",
    lambda o: {"vizwiz": TaskInfo("vqa")}, _vizwiz,
))


# ----------------------------------------------------------------------------- OCR-VQA
def _ocrvqa(source: Source) -> Iterator[Item]:
    path = source.file("dataset.json")
    data = source.json(path)
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object keyed by book id")
    splits = {1: "train", 3: "test"}
    for book, rec in data.items():
        where = f"{path}: book {book}"
        questions = need(rec, "questions", list, where)
        answers = need(rec, "answers", list, where)
        if len(questions) != len(answers):
            raise DataError(f"{where}: {len(questions)} questions but {len(answers)} answers")
        split = splits.get(need(rec, "split", int, where))
        if split is None:
            source.skipped["validation split (2)"] += len(questions)
            continue
        ext = Path(str(rec.get("imageURL", ""))).suffix.lower() or ".jpg"
        for i, (q, a) in enumerate(zip(questions, answers, strict=True)):
            if not isinstance(q, str) or not isinstance(a, str):
                raise DataError(f"{where}: questions[{i}] and answers[{i}] must be strings")
            yield Item("ocrvqa", split, f"{book}_{i}", f"{book}{ext}", f"{q.strip()}\n{SHORT_ANSWER}",
                       a.strip(), None, f"{where}, question {i}")


register(Converter(
    "ocrvqa", "OCR-VQA (split 1 = train, 3 = test); lower-case exact match",
    "dataset.json (by book id: questions, answers, split, imageURL); images/<book id>.<ext of imageURL>",
    lambda o: {"ocrvqa": TaskInfo("exact")}, _ocrvqa, images="images",
))
