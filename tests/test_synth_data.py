import hashlib
import json

import pytest

from mcit.data import load_benchmark, load_task_file, synth
from mcit.data.synth import BASE_PARTS, DEFAULT_STREAM, SCORERS, TASKS, generate_synth
from mcit.errors import DataError


def _digest(root):
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return generate_synth(tmp_path_factory.mktemp("a"), seed=3, train_size=40, test_size=10, base_size=30)


def test_deterministic_from_seed(small, tmp_path):
    again = generate_synth(tmp_path / "b", seed=3, train_size=40, test_size=10, base_size=30)
    other = generate_synth(tmp_path / "c", seed=4, train_size=40, test_size=10, base_size=30)
    assert _digest(small) == _digest(again)
    assert _digest(small) != _digest(other)


def test_changing_one_split_size_keeps_the_others(small, tmp_path):
    bigger = generate_synth(tmp_path / "d", seed=3, train_size=40, test_size=20, base_size=30)
    assert (small / "color/train.jsonl").read_bytes() == (bigger / "color/train.jsonl").read_bytes()
    first = (small / "color/test.jsonl").read_text().splitlines()
    assert (bigger / "color/test.jsonl").read_text().splitlines()[:10] == first


def test_llava_format_and_manifest(small):
    manifest = json.loads((small / "benchmark.json").read_text())
    assert [t["name"] for t in manifest["tasks"]] == TASKS + BASE_PARTS  # every base part is a task too
    assert manifest["general"] == synth.GENERAL and set(synth.GENERAL) <= set(BASE_PARTS)
    assert {t["name"]: t["scorer"] for t in manifest["tasks"]} == {k: v[0] for k, v in SCORERS.items()}
    rec = json.loads((small / "count/train.jsonl").read_text().splitlines()[0])
    assert set(rec) == {"id", "image", "conversations", "answers"}
    assert rec["conversations"][0]["from"] == "human" and rec["conversations"][0]["value"].startswith("<image>\n")
    assert rec["conversations"][1]["from"] == "gpt"
    assert (small / "count" / rec["image"]).is_file()


def test_tasks_have_paraphrases_and_answer_formats(small):
    bench = load_benchmark(small)
    for name in DEFAULT_STREAM:
        samples = bench.task(name).load("train")
        assert len(samples) == 40
        assert len({s.question for s in samples}) >= 3, name  # several instruction paraphrases
    counts = [int(s.answer) for s in bench.task("count").load("test")]
    assert all(1 <= c <= 6 for c in counts)
    caption = bench.task("caption").load("test")[0]
    assert len(caption.references) == 5 and caption.answer in caption.references
    box = bench.task("ground").load("test")[0].answer
    assert box.startswith("[") and len(json.loads(box)) == 4
    vqa = bench.task("color").load("test")[0]
    assert vqa.references == [vqa.answer] * 10


def test_base_parts_answer_from_the_scene_and_teach_no_stream_instruction(small, monkeypatch):
    import random

    bench = load_benchmark(small)
    assert sorted(bench.base) == sorted(BASE_PARTS)
    stream_questions = {s.question for t in TASKS for s in bench.task(t).load("train")}
    for part in BASE_PARTS:
        samples = bench.load_base(part)
        assert len(samples) == 30 and not {s.question for s in samples} & stream_questions, part
    scenes = []
    real = synth.shape_scene
    monkeypatch.setattr(synth, "shape_scene", lambda *a, **k: scenes.append(real(*a, **k)) or scenes[-1])
    rng = random.Random(0)
    for _ in range(200):
        _, question, answer, _ = synth.gen_tally(rng, 48)
        objs = scenes[-1][1]
        words = [w.strip(".?").rstrip("s") for w in question.lower().split()]
        (attr,) = [w for w in words if w in synth.COLORS or w in synth.SHAPES]  # the one colour or shape asked about
        assert int(answer) == sum(attr in (o.color, o.shape) for o in objs), question
    assert len({a for a in (synth.gen_tally(rng, 48)[2] for _ in range(200))}) >= 4  # several counts
    for _ in range(50):
        _, _, answer, _ = synth.gen_narrate(rng, 48)
        objs = scenes[-1][1]
        n = len(objs)
        assert answer.startswith("there is one shape :" if n == 1 else f"there are {synth.NUMBER_WORDS[n]} shapes :")
        assert all(f"a {o.name} on the {o.where}" in answer for o in objs)


def test_malformed_line_names_file_and_line(tmp_path):
    good = json.dumps({"id": 1, "image": "x.png", "conversations": [
        {"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]})
    (tmp_path / "x.png").write_bytes(b"")
    path = tmp_path / "t.jsonl"
    path.write_text(good + "\n" + '{"id": 2, "image": \n')
    with pytest.raises(DataError, match=rf"{path}:2: malformed JSON"):
        load_task_file(path)
    path.write_text(good + "\n" + json.dumps({"id": 2, "conversations": [{"from": "human", "value": "q"}]}) + "\n")
    with pytest.raises(DataError, match=rf"{path}:2: field 'conversations'"):
        load_task_file(path)


def test_missing_image_names_its_path(tmp_path):
    path = tmp_path / "t.json"
    path.write_text(json.dumps([{"id": "a", "image": "img/nope.png", "conversations": [
        {"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]}]))
    with pytest.raises(DataError, match=r"image not found: .*img/nope\.png"):
        load_task_file(path)


def test_base_parts_hold_the_skills_the_stream_asks_for(monkeypatch):
    """Known answers of the start's skills: the colour of the one object of a shape, the one object
    in a direction from another, and the object next to another."""
    import random

    scenes = []
    real = synth.shape_scene
    monkeypatch.setattr(synth, "shape_scene", lambda *a, **k: scenes.append(real(*a, **k)) or scenes[-1])
    rng = random.Random(1)
    kinds = set()
    for _ in range(400):
        _, question, answer, _ = synth.gen_attribute(rng, 48)
        objs = scenes[-1][1]
        asked = [sh for sh in synth.SHAPES for t in synth.ATTRIBUTE_BY_SHAPE_PROMPTS if t.format(shape=sh) in question]
        if asked:
            (obj,) = [o for o in objs if o.shape == asked[0]]  # asked only when that shape is unique
            assert answer == obj.color
            kinds.add("by shape")
    for _ in range(400):
        _, question, answer, _ = synth.gen_locate(rng, 48)
        objs = scenes[-1][1]
        for rel, holds in synth.RELATIONS.items():
            if f" {rel} the " in question:
                anchor_name = question.split(f" {rel} the ")[1].split(".")[0].split("?")[0]
                (anchor,) = [o for o in objs if o.name == anchor_name]
                assert [o.name for o in objs if o is not anchor and holds(o, anchor)] == [answer]
                kinds.add("relation")
        if "next to the" in question:
            anchor_name = question.split("next to the ")[1].split("?")[0]
            (anchor,) = [o for o in objs if o.name == anchor_name]
            assert [o.name for o in synth._neighbours(anchor, objs)] == [answer]
            kinds.add("near")
    assert kinds == {"by shape", "relation", "near"}
    assert all(q.endswith(synth.SHORT_ANSWER) for q in (synth.gen_color(rng, 48)[1], synth.gen_count(rng, 48)[1]))
