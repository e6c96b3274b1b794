"""Captioning datasets: Flickr30k and COCO from Karpathy's split files, TextCaps.

One record per image: the first caption is the training target, all of an image's captions
are the references the COCO caption scorer compares against."""

from __future__ import annotations

from collections.abc import Iterator

from mcit.data.convert.core import CAPTION_PROMPT, Converter, Item, Source, TaskInfo, need, register
from mcit.errors import DataError

_KARPATHY_SPLITS = {"train": "train", "restval": "train", "test": "test"}  # "val" is left out


def _karpathy(task: str, filename: str, with_filepath: bool):
    def items(source: Source) -> Iterator[Item]:
        path = source.file(filename)
        images = need(source.json(path), "images", list, str(path))
        for i, rec in enumerate(images):
            where = f"{path}: images[{i}]"
            split = _KARPATHY_SPLITS.get(need(rec, "split", str, where))
            if split is None:
                source.skipped[f"Karpathy split {rec['split']!r}"] += 1
                continue
            name = need(rec, "filename", str, where)
            image = f"{need(rec, 'filepath', str, where)}/{name}" if with_filepath else name
            sentences = need(rec, "sentences", list, where)
            refs = []
            for j, s in enumerate(sentences):
                refs.append(need(s, "raw", str, f"{where}.sentences[{j}]").strip())
            if not refs:
                raise DataError(f"{where}: field 'sentences' is empty")
            sid = rec.get("cocoid", rec.get("imgid", name))
            yield Item(task, split, str(sid), image, CAPTION_PROMPT, refs[0], refs, where)

    return items


register(Converter(
    "flickr30k", "Flickr30k, Karpathy split (train / test); COCO caption metrics",
    "dataset_flickr30k.json (Karpathy); flickr30k-images/<filename>",
    lambda o: {"flickr30k": TaskInfo("caption", max_new_tokens=40)},
    _karpathy("flickr30k", "dataset_flickr30k.json", False), images="flickr30k-images",
))
register(Converter(
    "coco", "COCO captions, Karpathy split (train + restval / test); COCO caption metrics",
    "dataset_coco.json (Karpathy); images <filepath>/<filename> (train2014/, val2014/)",
    lambda o: {"coco": TaskInfo("caption", max_new_tokens=40)}, _karpathy("coco", "dataset_coco.json", True),
))


def _textcaps(source: Source) -> Iterator[Item]:
    for split, name in (("train", "train"), ("test", "val")):
        path = source.file(f"TextCaps_0.1_{name}.json")
        data = need(source.json(path), "data", list, str(path))
        seen: set[str] = set()
        for i, rec in enumerate(data):  # one entry per caption; the references repeat per image
            where = f"{path}: data[{i}]"
            image_id = need(rec, "image_id", str, where)
            if image_id in seen:
                continue
            seen.add(image_id)
            refs = [r.strip() for r in need(rec, "reference_strs", list, where) if isinstance(r, str)]
            if not refs:
                raise DataError(f"{where}: field 'reference_strs' must hold caption strings")
            yield Item("textcaps", split, image_id, f"{image_id}.jpg", CAPTION_PROMPT,
                       need(rec, "caption_str", str, where).strip(), refs, where)


register(Converter(
    "textcaps", "TextCaps (val is the test split; test has no captions); COCO caption metrics",
    "TextCaps_0.1_{train,val}.json; train_images/<image_id>.jpg",
    lambda o: {"textcaps": TaskInfo("caption", max_new_tokens=40)}, _textcaps, images="train_images",
))
