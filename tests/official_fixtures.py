"""Small datasets written in each benchmark's official format (field names as in
docs/benchmarks.md), for the converter tests. Each writer returns a :class:`Fixture`: where
the files are, what a conversion must produce, one image to delete and one way to break a
record (which must be reported with its file and field)."""

from __future__ import annotations

import json
import pickle
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image


@dataclass
class Fixture:
    name: str
    src: Path
    counts: dict[str, tuple[int, int]]  # task -> (train, test) records
    image: Path  # one image a record needs
    malform: Callable[[], tuple[str, str]]  # breaks a record; returns (file name, field) the error must name
    images: Path | None = None  # --images; None = the converter's default
    options: dict = field(default_factory=dict)
    sample: tuple[str, str, str, str] | None = None  # (task, split, expected question part, expected answer)
    lose_image: Callable[[], None] | None = None  # how an image goes missing (default: deleted)

    def remove_image(self) -> None:
        (self.lose_image or self.image.unlink)()


def png(path: Path, color=(200, 30, 30), size=(24, 16)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, format="PNG" if path.suffix == ".png" else "JPEG")
    return path


def dump(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in obj))
    else:
        path.write_text(json.dumps(obj))
    return path


def edit(path: Path, fn) -> None:
    """Apply ``fn`` to the parsed JSON of ``path`` and write it back."""
    if path.suffix == ".jsonl":
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        fn(rows)
        dump(path, rows)
    else:
        data = json.loads(path.read_text())
        fn(data)
        dump(path, data)


def ten(answer: str) -> list[dict]:
    return [{"answer": answer, "answer_confidence": "yes", "answer_id": i + 1} for i in range(10)]


# ------------------------------------------------------------------------------ VQA family
VQAV2_ROWS = [  # (question_type, answer_type, question, answer, expected task)
    ("what is", "other", "What is on the table?", "cake", "recognition"),
    ("where is the", "other", "Where is the cat?", "sofa", "location"),
    ("is there a", "yes/no", "Is there a dog?", "no", "judge"),
    ("does the", "yes/no", "Does the sun shine?", "yes", "commonsense"),
    ("how many", "number", "How many cars are there?", "2", "count"),
    ("is the man", "yes/no", "Is the man running?", "yes", "action"),
    ("is this", "yes/no", "Is this person happy?", "yes", "action"),
    ("what color is the", "other", "What color is the bus?", "red", "color"),
    ("what type of", "other", "What type of food is this?", "pizza", "type"),
    ("what sport is", "other", "What sport is this?", "tennis", "subcategory"),
    ("why", "other", "Why is he wet?", "rain", "causal"),
]


def vqav2(root: Path, name: str = "vqav2_10") -> Fixture:
    src = root / "vqav2"
    qid = 0
    for coco in ("train2014", "val2014"):
        questions, annotations = [], []
        for i, (qtype, atype, question, answer, _) in enumerate(VQAV2_ROWS):
            qid += 1
            image_id = 100 + i
            png(src / coco / f"COCO_{coco}_{image_id:012d}.jpg")
            questions.append({"image_id": image_id, "question": question, "question_id": qid})
            answers = ten(answer)
            answers[0]["answer"] = "other"
            annotations.append({"question_id": qid, "image_id": image_id, "question_type": qtype,
                                "answer_type": atype, "multiple_choice_answer": answer, "answers": answers})
        dump(src / f"v2_OpenEnded_mscoco_{coco}_questions.json", {"questions": questions})
        dump(src / f"v2_mscoco_{coco}_annotations.json", {"annotations": annotations})

    def malform():
        edit(src / "v2_mscoco_val2014_annotations.json", lambda d: d["annotations"][3].pop("multiple_choice_answer"))
        return "v2_mscoco_val2014_annotations.json", "multiple_choice_answer"

    n = len(VQAV2_ROWS)
    counts = {"vqav2": (n, n)} if name == "vqav2" else {
        t: (c, c) for t, c in _count(r[4] for r in VQAV2_ROWS).items()}
    sample = ("color", "test", "What color is the bus?", "red") if name == "vqav2_10" else \
        ("vqav2", "train", "Why is he wet?", "rain")
    return Fixture(name, src, counts, src / "val2014" / f"COCO_val2014_{105:012d}.jpg", malform, sample=sample)


def _count(items) -> dict[str, int]:
    out: dict[str, int] = {}
    for x in items:
        out[x] = out.get(x, 0) + 1
    return out


def gqa(root: Path) -> Fixture:
    src = root / "gqa"
    for split in ("train", "testdev"):
        data = {}
        for i in range(2):
            image = f"{split[0]}{i}"
            png(src / "images" / f"{image}.jpg")
            data[f"{split}{i}"] = {"imageId": image, "question": f"Is the {split} box left {i}?",
                                   "answer": "yes", "fullAnswer": "Yes, it is.", "types": {"structural": "verify"}}
        dump(src / f"{split}_balanced_questions.json", data)

    def malform():
        edit(src / "train_balanced_questions.json", lambda d: d["train1"].update(imageId=7))
        return "train_balanced_questions.json", "imageId"

    return Fixture("gqa", src, {"gqa": (2, 2)}, src / "images" / "t1.jpg", malform,
                   sample=("gqa", "test", "Is the testdev box left 0?", "yes"))


def textvqa(root: Path) -> Fixture:
    src = root / "textvqa"
    for split in ("train", "val"):
        data = []
        for i in range(2):
            image_id = f"{split}_{i:04d}"
            png(src / "train_images" / f"{image_id}.jpg")
            data.append({"question_id": len(data) + (0 if split == "train" else 100), "question": "What brand is it?",
                         "image_id": image_id, "answers": ["nike"] * 7 + ["adidas"] * 3})
        dump(src / f"TextVQA_0.5.1_{split}.json", {"dataset_type": split, "data": data})

    def malform():
        edit(src / "TextVQA_0.5.1_val.json", lambda d: d["data"][1].update(answers="nike"))
        return "TextVQA_0.5.1_val.json", "answers"

    return Fixture("textvqa", src, {"textvqa": (2, 2)}, src / "train_images" / "val_0001.jpg", malform,
                   sample=("textvqa", "test", "What brand is it?", "nike"))


def vizwiz(root: Path) -> Fixture:
    src = root / "vizwiz"
    for split in ("train", "val"):
        rows = []
        for i in range(2):
            image = f"VizWiz_{split}_{i:08d}.jpg"
            png(src / split / image)
            answers = ten("soup")
            answers[0]["answer"] = "unanswerable"
            rows.append({"image": image, "question": "What is in this can?", "answers": answers,
                         "answerable": 1, "answer_type": "other"})
        dump(src / "Annotations" / f"{split}.json", rows)

    def malform():
        edit(src / "Annotations" / "train.json", lambda d: d[0].pop("question"))
        return "train.json", "question"

    return Fixture("vizwiz", src, {"vizwiz": (2, 2)}, src / "train" / "VizWiz_train_00000001.jpg", malform,
                   sample=("vizwiz", "train", "What is in this can?", "soup"))


def ocrvqa(root: Path) -> Fixture:
    src = root / "ocrvqa"
    data = {}
    for i, split in enumerate((1, 1, 2, 3)):
        book = f"b{i}"
        png(src / "images" / f"{book}.jpg")
        data[book] = {"imageURL": f"http://example.org/{book}.jpg", "title": f"Book {i}", "genre": "Travel",
                      "questions": ["Who wrote this book?", "What is the genre of this book?"],
                      "answers": [f"Author {i}", "Travel"], "split": split}
    dump(src / "dataset.json", data)

    def malform():
        edit(src / "dataset.json", lambda d: d["b1"].update(split="train"))
        return "dataset.json", "split"

    return Fixture("ocrvqa", src, {"ocrvqa": (4, 2)}, src / "images" / "b0.jpg", malform,
                   sample=("ocrvqa", "test", "Who wrote this book?", "Author 3"))


# ------------------------------------------------------------------------------- captions
def karpathy(root: Path, name: str) -> Fixture:
    src = root / name
    images = []
    for i, split in enumerate(("train", "restval", "val", "test", "test")):
        if name == "coco":
            filepath, filename = ("val2014", f"COCO_val2014_{i:012d}.jpg")
            png(src / filepath / filename)
        else:
            filepath, filename = None, f"{1000 + i}.jpg"
            png(src / "flickr30k-images" / filename)
        rec = {"filename": filename, "imgid": i, "split": split,
               "sentences": [{"raw": f"A dog runs number {i}.", "tokens": []}, {"raw": "A dog.", "tokens": []}]}
        if filepath:
            rec.update(filepath=filepath, cocoid=500 + i)
        images.append(rec)
    dump(src / f"dataset_{name}.json", {"images": images, "dataset": name})

    def malform():
        edit(src / f"dataset_{name}.json", lambda d: d["images"][3]["sentences"][0].pop("raw"))
        return f"dataset_{name}.json", "raw"

    image = src / ("val2014/COCO_val2014_000000000004.jpg" if name == "coco" else "flickr30k-images/1004.jpg")
    return Fixture(name, src, {name: (2, 2)}, image, malform,
                   sample=(name, "test", "caption", "A dog runs number 3."))


def textcaps(root: Path) -> Fixture:
    src = root / "textcaps"
    for split in ("train", "val"):
        data = []
        for i in range(2):
            image_id = f"{split}{i}"
            png(src / "train_images" / f"{image_id}.jpg")
            refs = [f"a sign that says {split} {i}", "a sign"]
            for c in refs:  # one entry per caption, as the official file has it
                data.append({"image_id": image_id, "caption_str": c, "reference_strs": refs,
                             "image_path": f"train/{image_id}.jpg"})
        dump(src / f"TextCaps_0.1_{split}.json", {"dataset_type": split, "data": data})

    def malform():
        edit(src / "TextCaps_0.1_train.json", lambda d: d["data"][2].pop("caption_str"))
        return "TextCaps_0.1_train.json", "caption_str"

    return Fixture("textcaps", src, {"textcaps": (2, 2)}, src / "train_images" / "val1.jpg", malform,
                   sample=("textcaps", "test", "caption", "a sign that says val 0"))


# ------------------------------------------------------------------------ choice and others
def scienceqa(root: Path) -> Fixture:
    src = root / "scienceqa"
    problems = {}
    for i, split in enumerate(("train", "train", "test", "test", "train")):
        pid = str(10 + i)
        image = "image.png" if i < 4 else None  # the last one is text-only
        if image:
            png(src / "images" / split / pid / image)
        problems[pid] = {"question": f"Which is warmer {i}?", "choices": ["ice", "fire", "snow"], "answer": 1,
                         "hint": "Think." if i == 0 else "", "image": image, "split": split, "subject": "natural"}
    dump(src / "problems.json", problems)

    def malform():
        edit(src / "problems.json", lambda d: d["12"].update(answer=5))
        return "problems.json", "answer"

    return Fixture("scienceqa", src, {"scienceqa": (2, 2)}, src / "images" / "test" / "13" / "image.png", malform,
                   sample=("scienceqa", "test", "B. fire", "B"))


def iconqa(root: Path) -> Fixture:
    src = root / "iconqa"
    base = src / "iconqa_data" / "iconqa"
    for split in ("train", "test"):
        for qtype, i in (("choose_txt", 1), ("fill_in_blank", 2), ("choose_img", 3)):
            d = base / split / qtype / f"{split}{i}"
            png(d / "image.png")
            if qtype == "choose_txt":
                rec = {"question": "Which shape is it?", "choices": ["circle", "square"], "answer": 1,
                       "ques_type": "choose_txt", "grade": "grade1", "label": ""}
            elif qtype == "fill_in_blank":
                rec = {"question": "How many dots are there?", "answer": "7", "ques_type": "fill_in_blank"}
            else:
                rec = {"question": "Which picture?", "choices": ["a.png", "b.png"], "answer": 0, "ques_type": "choose_img"}
            dump(d / "data.json", rec)

    def malform():
        edit(base / "train" / "choose_txt" / "train1" / "data.json", lambda d: d.pop("choices"))
        return "data.json", "choices"

    return Fixture("iconqa", src, {"iconqa": (2, 2)}, base / "test" / "fill_in_blank" / "test2" / "image.png",
                   malform, sample=("iconqa", "test", "B. square", "B"))


def arxivqa(root: Path) -> Fixture:
    src = root / "arxivqa"
    rows = []
    for i in range(40):
        png(src / "images" / f"2101.{i:05d}_0.jpg")
        rows.append({"id": f"2101.{i:05d}", "image": f"images/2101.{i:05d}_0.jpg", "question": "Which curve rises?",
                     "options": ["A. red", "B. blue", "C. green"], "label": "B" if i % 2 else "C) green",
                     "rationale": "because"})
    dump(src / "arxivqa.jsonl", rows)
    from mcit.data.convert.core import hash_split

    n_test = sum(hash_split(r["id"], 0.25) == "test" for r in rows)

    def malform():
        edit(src / "arxivqa.jsonl", lambda d: d[5].update(label="blue"))
        return "arxivqa.jsonl", "label"

    return Fixture("arxivqa", src, {"arxivqa": (40 - n_test, n_test)}, src / "images" / "2101.00007_0.jpg", malform,
                   options={"test_fraction": "0.25"})


def clevr_math(root: Path) -> Fixture:
    src = root / "clevr"
    for split in ("train", "test"):
        qs = []
        for i in range(2):
            image = f"CLEVR_{split}_{i:06d}.png"
            png(src / "CLEVR_v1.0" / "images" / split / image)
            qs.append({"split": split, "image_filename": image, "question": "Subtract all cubes. How many objects are left?",
                       "answer": 3 + i, "template_filename": "subtraction.json"})
        dump(src / f"clevr-math-{split}.json", {"info": {}, "questions": qs})

    def malform():
        edit(src / "clevr-math-train.json", lambda d: d["questions"][1].update(answer="three"))
        return "clevr-math-train.json", "answer"

    return Fixture("clevr_math", src, {"clevr_math": (2, 2)}, src / "CLEVR_v1.0/images/test/CLEVR_test_000001.png",
                   malform, sample=("clevr_math", "test", "How many objects are left?", "4"))


def imagenet_r(root: Path) -> Fixture:
    src = root / "imagenet-r"
    for wnid in ("n01443537", "n01484850"):
        for i in range(12):
            png(src / wnid / f"art_{i}.jpg")
    (src / "n01443537" / "readme.txt").write_text("not an image")
    names = dump(root / "names.json", {"n01443537": "goldfish, Carassius auratus", "n01484850": "great_white_shark"})
    from mcit.data.convert.core import hash_split

    files = [f"{w}/art_{i}.jpg" for w in ("n01443537", "n01484850") for i in range(12)]
    n_test = sum(hash_split(f, 0.2) == "test" for f in files)

    def malform():
        names.write_text('["goldfish"]')
        return "names.json", "folder name -> class name"

    image = src / "n01484850" / "art_3.jpg"

    def lose_image():  # the folder is the index: a dangling link (a moved dataset) is how an image goes missing
        image.unlink()
        image.symlink_to(root / "elsewhere" / "art_3.jpg")

    return Fixture("imagenet_r", src, {"imagenet_r": (24 - n_test, n_test)}, image, malform,
                   options={"class_names": str(names)}, lose_image=lose_image)


def refcoco(root: Path) -> Fixture:
    src = root / "refcoco"
    images = root / "coco_train2014"
    inst = {"images": [], "annotations": []}
    refs = []
    for i, split in enumerate(("train", "train", "val", "testA")):
        file_name = f"COCO_train2014_{i:012d}.jpg"
        png(images / file_name, size=(200, 100))
        inst["images"].append({"id": i, "file_name": file_name, "width": 200, "height": 100})
        inst["annotations"].append({"id": 50 + i, "image_id": i, "bbox": [20, 10, 100, 50], "category_id": 1})
        refs.append({"ref_id": i, "ann_id": 50 + i, "image_id": i, "split": split, "file_name": file_name,
                     "sentences": [{"sent": "left dog", "tokens": ["left", "dog"]}, {"sent": "the dog"}]})
    dump(src / "instances.json", inst)
    (src / "refs(unc).p").write_bytes(pickle.dumps(refs))

    def malform():
        edit(src / "instances.json", lambda d: d["annotations"][1].update(bbox=[1, 2]))
        return "instances.json", "bbox"

    return Fixture("refcoco", src, {"refcoco": (4, 2)}, images / "COCO_train2014_000000000001.jpg", malform,
                   images=images, options={"trust_pickle": "true"},
                   sample=("refcoco", "test", "left dog", "[0.10, 0.30, 0.60, 0.55]"))


# ------------------------------------------------------------------------------ UCIT, CoIN
def _llava_task(folder: Path, images: Path, task: str, train_name: str, test_name: str, answer: str,
                caption: bool = False, bbox: bool = False) -> Path:
    train, test = [], []
    for i in range(2):
        rel = f"{task}/img{i}.png"
        png(images / rel)
        train.append({"id": f"{task}-tr{i}", "image": rel, "conversations": [
            {"from": "human", "value": f"<image>\nWhat about {task} {i}?"}, {"from": "gpt", "value": answer}]})
        item = {"question_id": f"{task}-te{i}", "image": rel, "text": f"What about {task} {i}?"}
        item.update({"answer_bbox": "[0.1, 0.2, 0.5, 0.6]", "size": [24, 16]} if bbox else {"answer": answer})
        test.append(item)
    dump(folder / train_name, train)
    dump(folder / test_name, test)
    if caption:
        dump(folder / "val_coco_type_3000.json", {
            "images": [{"id": n + 1, "file_name": f"img{n}.png"} for n in range(2)],
            "annotations": [{"image_id": n + 1, "id": 10 * n + k, "caption": f"caption {n} {k}"}
                            for n in range(2) for k in range(3)]})
    return folder / train_name


def ucit(root: Path) -> Fixture:
    src = root / "ucit_root"
    inst, images = src / "instructions" / "UCIT", src / "datasets"
    specs = [("imagenet_r", "ImageNet-R", "train.json", "goldfish", False),
             ("arxivqa", "ArxivQA", "train_4w.json", "B", False),
             ("vizwiz_caption", "VizWiz-caption", "train.json", "a can", True),
             ("iconqa", "IconQA", "train.json", "3", False),
             ("clevr_math", "CLEVR", "train_4w.json", "4", False),
             ("flickr30k", "Flickr30k-cap", "train_brief_4w.json", "a dog", True)]
    trains = {t: _llava_task(inst / folder, images, t, tr, "test_3000.json", a, cap) for t, folder, tr, a, cap in specs}

    def malform():
        edit(trains["iconqa"], lambda d: d[1]["conversations"][1].pop("value"))
        return "train.json", "value"

    return Fixture("ucit", src, {t[0]: (2, 2) for t in specs}, images / "clevr_math" / "img1.png", malform,
                   sample=("flickr30k", "test", "What about flickr30k 1?", "a dog"))


def coin(root: Path) -> Fixture:
    src = root / "coin_root"
    inst, images = src / "playground" / "Instructions", src / "cl_dataset"
    specs = [("scienceqa", "ScienceQA", "test.json", "B"), ("textvqa", "TextVQA", "val.json", "nike"),
             ("imagenet", "ImageNet", "test.json", "goldfish"), ("gqa", "GQA", "test.json", "yes"),
             ("vizwiz", "VizWiz", "test.json", "soup"), ("grounding", "Grounding", "test.json", "[0.1, 0.2, 0.5, 0.6]"),
             ("vqav2", "VQAv2", "test.json", "2"), ("ocrvqa", "OCRVQA", "test_1.json", "Travel")]
    for task, folder, test_name, answer in specs:
        _llava_task(inst / folder, images, task, "train.json", test_name, answer, bbox=task == "grounding")

    def malform():
        edit(inst / "GQA" / "test.json", lambda d: d[0].pop("question_id"))
        return "test.json", "question_id"

    return Fixture("coin", src, {t[0]: (2, 2) for t in specs}, images / "vqav2" / "img0.png", malform,
                   sample=("grounding", "test", "What about grounding 0?", "[0.1, 0.2, 0.5, 0.6]"))


WRITERS: dict[str, Callable[[Path], Fixture]] = {
    "vqav2": lambda r: vqav2(r, "vqav2"), "vqav2_10": vqav2, "gqa": gqa, "textvqa": textvqa, "vizwiz": vizwiz,
    "ocrvqa": ocrvqa, "flickr30k": lambda r: karpathy(r, "flickr30k"), "coco": lambda r: karpathy(r, "coco"),
    "textcaps": textcaps, "scienceqa": scienceqa, "iconqa": iconqa, "arxivqa": arxivqa, "clevr_math": clevr_math,
    "imagenet_r": imagenet_r, "refcoco": refcoco, "ucit": ucit, "coin": coin,
}
