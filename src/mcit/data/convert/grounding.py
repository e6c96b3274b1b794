"""RefCOCO-family grounding: referring expressions to boxes, in CoIN's answer format.

The refs file is a Python pickle; unpickling runs code chosen by whoever wrote the file, so
the converter refuses it unless the user passes ``--trust-pickle``, and even then loads it
with an unpickler that accepts plain data only (no classes, no callables)."""

from __future__ import annotations

import io
import pickle
from collections.abc import Iterator

from mcit.data.convert.core import Converter, Item, Option, Source, TaskInfo, need, register
from mcit.errors import DataError

GROUNDING_PROMPT = "Please provide the bounding box coordinate of the region this sentence describes: {}"


class _DataOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module, name):  # any class or function reference is refused
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only plain data is allowed")


def load_refs(path, trusted: bool) -> list:
    if not trusted:
        raise DataError(
            f"{path} is a pickle, and loading a pickle can run arbitrary code; pass --trust-pickle "
            "if you trust where this file came from"
        )
    try:
        refs = _DataOnlyUnpickler(io.BytesIO(path.read_bytes())).load()
    except (pickle.UnpicklingError, EOFError, ValueError) as e:
        raise DataError(f"{path}: not a plain-data pickle of refs ({e})") from None
    if not isinstance(refs, list):
        raise DataError(f"{path}: expected a list of refs, got {type(refs).__name__}")
    return refs


def square_box(box: list[float], width: float, height: float) -> str:
    """COCO [x, y, w, h] in pixels -> "[x1, y1, x2, y2]" in the 0-1 frame of the image padded
    (centred) to a square, as LLaVA-1.5 and CoIN write grounding answers."""
    x, y, w, h = box
    side = max(width, height)
    dx, dy = (side - width) / 2, (side - height) / 2
    coords = [(x + dx) / side, (y + dy) / side, (x + w + dx) / side, (y + h + dy) / side]
    return "[" + ", ".join(f"{min(max(c, 0.0), 1.0):.2f}" for c in coords) + "]"


def _refcoco(source: Source) -> Iterator[Item]:
    refs_path = source.file(*source.options["refs"].split(","))
    inst_path = source.file("instances.json")
    refs = load_refs(refs_path, source.options["trust_pickle"])
    inst = source.json(inst_path)
    images = {}
    for i, im in enumerate(need(inst, "images", list, str(inst_path))):
        where = f"{inst_path}: images[{i}]"
        images[need(im, "id", int, where)] = (need(im, "file_name", str, where), need(im, "width", (int, float), where),
                                              need(im, "height", (int, float), where))
    boxes = {}
    for i, ann in enumerate(need(inst, "annotations", list, str(inst_path))):
        where = f"{inst_path}: annotations[{i}]"
        box = need(ann, "bbox", list, where)
        if len(box) != 4 or not all(isinstance(v, (int, float)) for v in box):
            raise DataError(f"{where}: field 'bbox' must be [x, y, w, h] numbers")
        boxes[need(ann, "id", int, where)] = box
    splits = {"train": "train", source.options["test_split"]: "test"}
    for i, ref in enumerate(refs):
        where = f"{refs_path}: refs[{i}]"
        split = splits.get(need(ref, "split", str, where))
        if split is None:
            continue
        ann_id, image_id = need(ref, "ann_id", int, where), need(ref, "image_id", int, where)
        if ann_id not in boxes or image_id not in images:
            raise DataError(f"{where}: ann_id {ann_id} / image_id {image_id} not in {inst_path}")
        file_name, width, height = images[image_id]
        answer = square_box(boxes[ann_id], width, height)
        for j, sent in enumerate(need(ref, "sentences", list, where)):
            text = need(sent, "sent", str, f"{where}.sentences[{j}]").strip()
            yield Item("refcoco", split, f"{need(ref, 'ref_id', int, where)}_{j}", file_name,
                       GROUNDING_PROMPT.format(text), answer, None, f"{where}.sentences[{j}]")


register(Converter(
    "refcoco", "RefCOCO/+/g referring expressions -> boxes in the padded-square 0-1 frame; IoU > 0.5",
    "refs(unc).p (or --option refs=NAME) and instances.json; COCO train2014 images (pass --images)",
    lambda o: {"refcoco": TaskInfo("iou", {"threshold": 0.5})}, _refcoco,
    options={
        "refs": Option("refs(unc).p,refs(umd).p,refs(google).p", str, "the refs pickle file name(s), comma-separated"),
        "test_split": Option("val", str, "the refs split used as test: val, testA, testB or test"),
        "trust_pickle": Option(False, lambda v: v.lower() in ("1", "true", "yes"), "true to allow loading the pickle"),
    },
))
