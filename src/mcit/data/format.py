"""Read and write the LLaVA conversation format.

A record is ``{"id", "image", "conversations": [{"from": "human", "value": "<image>\\n..."},
{"from": "gpt", "value": "..."}], "answers": [...]?}``. ``answers`` is our one extension: the
list of references a scorer compares against (10 annotator answers for VQA, several captions);
without it the gpt turn is the only reference. Files are a JSON array (LLaVA's ``.json``) or
one record per line (``.jsonl``). Every problem is reported with the file and line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from mcit.errors import DataError
from mcit.utils import atomic_write_text


@dataclass(frozen=True)
class Sample:
    id: str
    image: Path | None  # absolute path
    question: str  # the human turn, with "<image>" removed
    answer: str  # the gpt turn (training target)
    references: list[str] = field(default_factory=list)  # what the scorer compares against
    task: str = ""


def _where(path: Path, line: int | None) -> str:
    return f"{path}:{line}" if line is not None else str(path)


class MultiTurnError(DataError):
    """A conversation with more than one human or gpt turn (converters may skip these)."""


def single_turn(conv, where: str) -> tuple[str, str]:
    """(question without ``<image>``, answer) of a LLaVA ``conversations`` list of one exchange."""
    if not isinstance(conv, list) or len(conv) < 2:
        raise DataError(f"{where}: field 'conversations' must be a list of at least 2 turns")
    human = [t for t in conv if isinstance(t, dict) and t.get("from") == "human"]
    gpt = [t for t in conv if isinstance(t, dict) and t.get("from") == "gpt"]
    if not human or not isinstance(human[0].get("value"), str):
        raise DataError(f"{where}: 'conversations' has no human turn with a string 'value'")
    if not gpt or not isinstance(gpt[0].get("value"), str):
        raise DataError(f"{where}: 'conversations' has no gpt turn with a string 'value'")
    if len(human) > 1 or len(gpt) > 1:
        raise MultiTurnError(f"{where}: multi-turn conversations are not supported yet (one human, one gpt)")
    return human[0]["value"].replace("<image>", "").strip(), gpt[0]["value"].strip()


def _parse_record(rec, path: Path, line: int | None, image_root: Path, task: str) -> Sample:
    where = _where(path, line)
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    question, answer = single_turn(rec.get("conversations"), where)
    rid = rec.get("id", rec.get("question_id"))
    if rid is None:
        raise DataError(f"{where}: missing field 'id'")
    image = rec.get("image")
    image_path = None
    if image is not None:
        if not isinstance(image, str) or not image:
            raise DataError(f"{where}: field 'image' must be a non-empty string path")
        image_path = (image_root / image).resolve()
    refs = rec.get("answers")
    if refs is None:
        refs = [answer]
    elif not (isinstance(refs, list) and refs and all(isinstance(a, str) for a in refs)):
        raise DataError(f"{where}: field 'answers' must be a non-empty list of strings")
    return Sample(str(rid), image_path, question, answer, list(refs), task)


def load_task_file(
    path: str | Path, image_root: str | Path | None = None, task: str = "", check_images: bool = True
) -> list[Sample]:
    """Load a task file; image paths are relative to ``image_root`` (default: the file's folder)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: data file not found")
    root = Path(image_root) if image_root is not None else path.parent
    text = path.read_text(encoding="utf-8")
    samples: list[Sample] = []
    if path.suffix == ".jsonl":
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
            samples.append(_parse_record(rec, path, lineno, root, task))
    else:
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(records, list):
            raise DataError(f"{path}: expected a JSON array of records (or use .jsonl)")
        for i, rec in enumerate(records):
            samples.append(_parse_indexed(rec, path, i, root, task))
    if check_images:
        for s in samples:
            if s.image is not None and not s.image.is_file():
                raise DataError(f"{path}: record {s.id!r}: image not found: {s.image}")
    return samples


def _parse_indexed(rec, path: Path, index: int, root: Path, task: str) -> Sample:
    try:
        return _parse_record(rec, path, None, root, task)
    except DataError as e:
        raise DataError(str(e).replace(f"{path}:", f"{path}: record {index}:", 1)) from None


def to_record(sample_id: str, image: str | None, question: str, answer: str, answers: list[str] | None = None) -> dict:
    rec = {
        "id": sample_id,
        "image": image,
        "conversations": [
            {"from": "human", "value": f"<image>\n{question}" if image else question},
            {"from": "gpt", "value": answer},
        ],
    }
    if answers is not None:
        rec["answers"] = answers
    return rec


def write_jsonl(path: str | Path, records: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
