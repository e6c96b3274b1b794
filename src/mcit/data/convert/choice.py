"""Multiple-choice and classification datasets: ScienceQA, IconQA, ArxivQA, CLEVR-Math and
ImageNet-R, in the prompt formats of LLaVA / UCIT."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from mcit.data.convert.core import (
    CHOICE_ANSWER,
    LETTERS,
    SHORT_ANSWER,
    Converter,
    Item,
    Option,
    Source,
    TaskInfo,
    hash_split,
    need,
    options_block,
    read_json,
    register,
)
from mcit.errors import DataError


def _fraction(v: str) -> float:
    f = float(v)
    if not 0.0 < f < 1.0:
        raise ValueError
    return f


# ---------------------------------------------------------------------------- ScienceQA
def _scienceqa(source: Source) -> Iterator[Item]:
    path = source.file("problems.json", "data/problems.json")
    data = source.json(path)
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object keyed by problem id")
    splits = {"train": "train", source.options["test_split"]: "test"}
    for pid, rec in data.items():
        where = f"{path}: problem {pid}"
        split = splits.get(need(rec, "split", str, where))
        if split is None:
            continue
        choices = need(rec, "choices", list, where)
        answer = need(rec, "answer", int, where)
        if not choices or not all(isinstance(c, str) for c in choices):
            raise DataError(f"{where}: field 'choices' must be a non-empty list of strings")
        if not 0 <= answer < len(choices):
            raise DataError(f"{where}: field 'answer' ({answer}) is not an index into its {len(choices)} choices")
        image = rec.get("image")
        hint = rec.get("hint") or ""
        question = need(rec, "question", str, where).strip()
        context = f"Context: {hint.strip()}\n" if isinstance(hint, str) and hint.strip() else ""
        yield Item("scienceqa", split, str(pid), f"{rec['split']}/{pid}/{image}" if image else None,
                   f"{context}{question}\n{options_block(choices)}\n{CHOICE_ANSWER}", LETTERS[answer], None, where)


register(Converter(
    "scienceqa", "ScienceQA, questions with an image (text-only ones are counted and left out); option letter",
    "problems.json (by pid: question, choices, answer index, image, split, hint); images/<split>/<pid>/image.png",
    lambda o: {"scienceqa": TaskInfo("choice", max_new_tokens=4)}, _scienceqa, images="images",
    options={"test_split": Option("test", str, "the split used as test: test, val, minitest or minival")},
))


# ---------------------------------------------------------------------------- ImageNet-R
_IMAGE_EXT = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif"}


def _class_names(path: Path | None) -> dict[str, str]:
    if path is None:
        return {}
    path = Path(path)
    if not path.is_file():
        raise DataError(f"--option class_names: {path} not found")
    if path.suffix == ".json":
        data = read_json(path)
        if not isinstance(data, dict):
            raise DataError(f"{path}: expected a JSON object folder name -> class name")
        return {str(k): str(v) for k, v in data.items()}
    names = {}
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            parts = line.split(maxsplit=1)
            if len(parts) != 2:
                raise DataError(f"{path}:{lineno}: expected '<folder> <class name>'")
            names[parts[0]] = parts[1].strip()
    return names


def _imagenet_r(source: Source) -> Iterator[Item]:
    names = _class_names(source.options["class_names"])
    frac = source.options["test_fraction"]
    folders = sorted(p for p in source.images.iterdir() if p.is_dir())
    if not folders:
        raise DataError(f"{source.images}: expected one folder per class (e.g. n01443537/)")
    for folder in folders:
        label = names.get(folder.name, folder.name).split(",")[0].replace("_", " ").strip()
        for f in sorted(folder.iterdir()):
            if f.suffix.lower() not in _IMAGE_EXT or f.is_dir():
                continue
            rel = f"{folder.name}/{f.name}"
            yield Item("imagenet_r", hash_split(rel, frac), rel, rel,
                       f"What is the object in the image?\n{SHORT_ANSWER}", label, None, str(f))


register(Converter(
    "imagenet_r", "ImageNet-R (one folder per class; a seeded hash split); exact match on the class name",
    "imagenet-r/<wnid>/<image> (pass the class folders' parent as --src); optional class-name file",
    lambda o: {"imagenet_r": TaskInfo("exact")}, _imagenet_r,
    options={
        "class_names": Option(None, Path, "a JSON {folder: name} or '<folder> <name>' lines file"),
        "test_fraction": Option(0.2, _fraction, "the share of images held out as test, in (0, 1)"),
    },
))


# ------------------------------------------------------------------------------- IconQA
def _iconqa(source: Source) -> Iterator[Item]:
    base = next((p for p in (source.src, source.src / "iconqa", source.src / "iconqa_data" / "iconqa")
                 if (p / "train").is_dir()), None)
    if base is None:
        raise DataError(f"{source.src}: expected train/ and test/ folders (iconqa_data/iconqa/{{train,test}}/<type>/<pid>)")
    for split, name in (("train", "train"), ("test", source.options["test_split"])):
        if not (base / name).is_dir():
            raise DataError(f"{base / name}: split folder not found")
        for qtype_dir in sorted(p for p in (base / name).iterdir() if p.is_dir()):
            if qtype_dir.name == "choose_img":  # the choices are images: not a text answer
                source.skipped["choose_img (image choices)"] += sum(1 for p in qtype_dir.iterdir() if p.is_dir())
                continue
            for pid_dir in sorted(p for p in qtype_dir.iterdir() if p.is_dir()):
                path = pid_dir / "data.json"
                if not path.is_file():
                    raise DataError(f"{pid_dir}: data.json not found")
                rec, where = source.json(path), str(path)
                question = need(rec, "question", str, where).strip()
                rel = f"{pid_dir.relative_to(source.images)}/image.png" if pid_dir.is_relative_to(source.images) \
                    else str(pid_dir / "image.png")
                if qtype_dir.name == "choose_txt":
                    choices = need(rec, "choices", list, where)
                    answer = need(rec, "answer", int, where)
                    if not 0 <= answer < len(choices):
                        raise DataError(f"{where}: field 'answer' ({answer}) is not an index into 'choices'")
                    prompt = f"{question}\n{options_block([str(c) for c in choices])}\n{CHOICE_ANSWER}"
                    target = LETTERS[answer]
                else:
                    prompt = f"{question}\n{SHORT_ANSWER}"
                    target = str(need(rec, "answer", (str, int, float), where)).strip()
                yield Item("iconqa", split, f"{name}_{pid_dir.name}", rel, prompt, target, None, where)


register(Converter(
    "iconqa", "IconQA choose_txt (option letter) and fill_in_blank (the answer); choose_img left out; exact match",
    "iconqa_data/iconqa/{train,test}/{choose_txt,fill_in_blank}/<pid>/{image.png,data.json}",
    lambda o: {"iconqa": TaskInfo("exact")}, _iconqa,
    options={"test_split": Option("test", str, "the split folder used as test: test or val")},
))


# ------------------------------------------------------------------------------ ArxivQA
def _letter(label: str, where: str) -> str:
    head = label.strip()[:1].upper()
    rest = label.strip()[1:2]
    if head not in LETTERS or rest not in ("", ".", ")", " ", ":"):
        raise DataError(f"{where}: field 'label' must name an option letter ('A', 'A.', 'A) ...'), got {label!r}")
    return head


def _arxivqa(source: Source) -> Iterator[Item]:
    path = source.file("arxivqa.jsonl", "arxivqa.json")
    frac = source.options["test_fraction"]
    for where, rec in source.records(path):
        rid = str(need(rec, "id", (str, int), where))
        options = need(rec, "options", list, where)
        if not options or not all(isinstance(o, str) for o in options):
            raise DataError(f"{where}: field 'options' must be a non-empty list of strings")
        lettered = all(o.strip()[:1].upper() == LETTERS[i] and o.strip()[1:2] in (".", ")", ":")
                       for i, o in enumerate(options))
        block = "\n".join(o.strip() for o in options) if lettered else options_block(options)
        yield Item("arxivqa", hash_split(rid, frac), rid, need(rec, "image", str, where),
                   f"{need(rec, 'question', str, where).strip()}\n{block}\n{CHOICE_ANSWER}",
                   _letter(need(rec, "label", str, where), where), None, where)


register(Converter(
    "arxivqa", "ArxivQA (a seeded hash split by id); option letter, exact match as UCIT scores it",
    "arxivqa.jsonl (id, image, question, options, label) and images/",
    lambda o: {"arxivqa": TaskInfo("exact", max_new_tokens=4)}, _arxivqa,
    options={"test_fraction": Option(0.1, _fraction, "the share of records held out as test, in (0, 1)")},
))


# ---------------------------------------------------------------------------- CLEVR-Math
def _clevr_math(source: Source) -> Iterator[Item]:
    for split, name in (("train", "train"), ("test", source.options["test_split"])):
        path = source.file(f"clevr-math-{name}.json")
        questions = need(source.json(path), "questions", list, str(path))
        for i, rec in enumerate(questions):
            where = f"{path}: questions[{i}]"
            image = need(rec, "image_filename", str, where)
            answer = need(rec, "answer", int, where)
            yield Item("clevr_math", split, f"{name}_{i}", f"{name}/{image}",
                       f"{need(rec, 'question', str, where).strip()}\n{SHORT_ANSWER}", str(answer), None, where)


register(Converter(
    "clevr_math", "CLEVR-Math (answers are integers); exact match (numeric with tolerance via the config)",
    "clevr-math-{train,test}.json ({questions: [{image_filename, question, answer}]}); "
    "images CLEVR_v1.0/images/{train,test}/<image_filename> (--images: the folder holding train/ and test/)",
    lambda o: {"clevr_math": TaskInfo("exact", max_new_tokens=6)}, _clevr_math, images="CLEVR_v1.0/images",
    options={"test_split": Option("test", str, "the split used as test: test or val")},
))
