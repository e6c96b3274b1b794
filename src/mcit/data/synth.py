"""``synth``: a procedurally generated vision-language benchmark, deterministic from its seed.

Its tasks mirror the families of real MCIT streams, each with its own images, instruction
paraphrases, answer format and scorer:

=========  ==========================  ==========================  =============
task       mirrors                     answer                      scorer
=========  ==========================  ==========================  =============
caption    Flickr30k / COCO captions   a sentence (5 references)   caption (BLEU-4)
color      attribute VQA (VQAv2)       a colour word               vqa
count      CLEVR counting              a number                    numeric
ocr        OCR-VQA / TextVQA           the rendered word           vqa_evalai
spatial    GQA relations               "<colour> <shape>"          exact
ground     RefCOCO grounding           "[x1, y1, x2, y2]"          iou
=========  ==========================  ==========================  =============

The ``base`` parts are the starting model's own instruction mix: ``describe`` (list every object
and its place, or the word of a text image), ``narrate`` (one sentence about the scene),
``attribute`` (the colour or shape of the object at a place), ``tally`` (how many objects of one
colour or shape), ``read`` (the word), ``locate`` (the object at a place, the place of an object,
the object next to another) and ``box`` (the box of the object at a place). Together they teach
every skill and answer kind the stream needs under instructions of their own; each stream task
asks for a known skill in new words, formats or indexing (docs/synth.md). Every base part is
also a task (its test split held out from the start's training); ``GENERAL`` names the ones a run
evaluates as held-out general tasks.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from mcit.data.benchmark import MANIFEST
from mcit.data.format import to_record, write_jsonl
from mcit.utils import atomic_write_json

COLORS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (60, 100, 240),
    "yellow": (235, 220, 40),
    "purple": (165, 60, 210),
    "white": (240, 240, 240),
}
SHAPES = ["circle", "square", "triangle", "diamond"]
ROWS = ["top", "middle", "bottom"]
COLS = ["left", "center", "right"]
WORDS = (
    "cat dog sun car bus map pen cup box hat key bed fox owl cow pig egg ice jam art "
    "book tree fish bird milk rain road ship star wolf lamp door moon coin leaf rose "
    "gold king shop park"
).split()
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]

SYNTH_VERSION = 4  # bump when the generator's output changes: cached copies are keyed by it
TASKS = ["caption", "color", "count", "ocr", "spatial", "ground"]
DEFAULT_STREAM = ["caption", "color", "count", "ocr", "spatial"]
GENERAL = ["describe", "box"]  # the base parts a run evaluates as held-out general tasks
BASE_PARTS = ["describe", "locate", "attribute", "tally", "narrate", "read", "box"]

SCORERS = {
    # CIDEr-D saturates near 420-650 (x100) for a perfect caption against five references that
    # share their content words (measured), which would swamp every average: BLEU-4 is bounded.
    "caption": ("caption", {"headline": "BLEU-4"}),
    "color": ("vqa", {}),
    "count": ("numeric", {}),
    "ocr": ("vqa_evalai", {}),
    "spatial": ("exact", {}),
    "ground": ("iou", {"threshold": 0.5}),
    # the base parts, as general tasks
    "describe": ("exact", {}),
    "locate": ("exact", {}),
    "attribute": ("exact", {}),
    "tally": ("numeric", {}),
    "narrate": ("caption", {"headline": "BLEU-4"}),
    "read": ("exact", {}),
    "box": ("iou", {"threshold": 0.5}),
}
MAX_NEW_TOKENS = {"caption": 32, "color": 4, "count": 4, "ocr": 4, "spatial": 5, "ground": 12,
                  "describe": 36, "locate": 4, "attribute": 3, "tally": 3, "narrate": 36, "read": 3, "box": 12}


@dataclass(frozen=True)
class Obj:
    color: str
    shape: str
    row: int
    col: int
    box: tuple[int, int, int, int]

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"

    @property
    def where(self) -> str:
        if self.row == 1 and self.col == 1:
            return "center"
        if self.row == 1:
            return COLS[self.col]
        if self.col == 1:
            return ROWS[self.row]
        return f"{ROWS[self.row]} {COLS[self.col]}"


def _background(rng: random.Random, size: int) -> Image.Image:
    shade = rng.randint(20, 70)
    return Image.new("RGB", (size, size), (shade, shade, shade + rng.randint(0, 15)))


def _draw_shape(draw: ImageDraw.ImageDraw, obj: Obj) -> None:
    x1, y1, x2, y2 = obj.box
    fill = COLORS[obj.color]
    if obj.shape == "circle":
        draw.ellipse(obj.box, fill=fill)
    elif obj.shape == "square":
        draw.rectangle((x1, y1, x2 - 1, y2 - 1), fill=fill)
    elif obj.shape == "triangle":
        draw.polygon([((x1 + x2) / 2, y1), (x2, y2), (x1, y2)], fill=fill)
    else:  # diamond
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
        draw.polygon([(cx, y1), (x2, cy), (cx, y2), (x1, cy)], fill=fill)


def shape_scene(rng: random.Random, size: int, n: int, distinct: bool) -> tuple[Image.Image, list[Obj]]:
    """``n`` objects in distinct cells of a 3x3 grid; ``distinct``: no repeated shape or colour."""
    cell = size // 3
    obj_size = int(cell * 0.75)
    cells = rng.sample(range(9), n)
    shapes = rng.sample(SHAPES, n) if distinct else [rng.choice(SHAPES) for _ in range(n)]
    colors = rng.sample(list(COLORS), n) if distinct else [rng.choice(list(COLORS)) for _ in range(n)]
    img = _background(rng, size)
    draw = ImageDraw.Draw(img)
    objs = []
    for c, shape, color in zip(cells, shapes, colors, strict=True):
        row, col = divmod(c, 3)
        slack = cell - obj_size
        x1 = col * cell + rng.randint(0, slack)
        y1 = row * cell + rng.randint(0, slack)
        obj = Obj(color, shape, row, col, (x1, y1, x1 + obj_size, y1 + obj_size))
        _draw_shape(draw, obj)
        objs.append(obj)
    objs.sort(key=lambda o: (o.row, o.col))  # reading order: descriptions are canonical
    return img, objs


def text_image(rng: random.Random, size: int, word: str) -> tuple[Image.Image, str]:
    img = _background(rng, size)
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=max(8, size // 3))
    color = rng.choice(list(COLORS))
    left, top, right, bottom = draw.textbbox((0, 0), word, font=font)
    w, h = right - left, bottom - top
    # Centred with a small jitter: the tiny vision tower learns to read a word in one place
    # quickly, while anywhere in the image took far longer than the base budget (measured).
    x = (size - w) // 2 + rng.randint(-2, 2) - left
    y = (size - h) // 2 + rng.randint(-2, 2) - top
    draw.text((x, y), word, fill=COLORS[color], font=font)
    return img, color


# ---- task generators: each returns (image, question, answer, references) -------------------

# LLaVA-1.5's response-format prompt for short answers (its VQA data and evaluation prompts): the
# stream's short-answer tasks always end with it, the start's short-answer parts often do.
SHORT_ANSWER = " Answer the question using a single word or phrase."
CAPTION_PROMPTS = [
    "Describe the image briefly.",
    "Write a short caption for this picture.",
    "What does this image show? Answer with one sentence.",
    "Give a one-sentence description of the image.",
]
COLOR_PROMPTS = [
    "What color is the {shape}?",
    "What is the color of the {shape}?",
    "Which color does the {shape} have?",
    "Tell me the color of the {shape}.",
]
COUNT_PROMPTS = [
    "How many objects are there?",
    "How many shapes are in the image?",
    "Count the objects in the picture.",
    "What is the number of shapes shown?",
]
OCR_PROMPTS = [
    "What is written in the image?",
    "What word is shown?",
    "Read the text in the image.",
    "Which word appears in the picture?",
]
SPATIAL_PROMPTS = [
    "What is {rel} the {obj}?",
    "Which object is {rel} the {obj}?",
    "Name the shape {rel} the {obj}.",
]
GROUND_PROMPTS = [
    "Where is the {obj}? Answer with a bounding box.",
    "Give the bounding box of the {obj}.",
    "Locate the {obj} as [x1, y1, x2, y2].",
]
# The starting model's own instructions: several phrasings per part, each sometimes wrapped in a
# lead-in or a closing request, as an instruction-tuned model has seen many ways of asking. None
# is a stream task's instruction: a stream task asks for a known skill in words of its own.
DESCRIBE_PROMPTS = [
    "List what you see.",
    "List the objects in the picture.",
    "Name everything in the image and where it is.",
    "Enumerate the items you can see.",
    "What is in this picture? List it all.",
]
LOCATE_AT_PROMPTS = [
    "What is at the {where}?",
    "Which object sits at the {where}?",
    "Name the object at the {where}.",
    "What do you see at the {where}?",
]
LOCATE_NEAR_PROMPTS = ["What is next to the {obj}?", "Which object is beside the {obj}?", "Name the neighbour of the {obj}."]
LOCATE_REL_PROMPTS = [
    "What object do you find {rel} the {obj}?",
    "Tell me which thing sits {rel} the {obj}.",
    "Point out the object {rel} the {obj}.",
]
LOCATE_WHERE_PROMPTS = [
    "Where is the {obj}?",
    "In which part of the image is the {obj}?",
    "Tell me where the {obj} is.",
    "Where can the {obj} be found?",
]
ATTRIBUTE_COLOR_PROMPTS = [
    "What color is the object at the {where}?",
    "Name the color of the thing at the {where}.",
    "The object at the {where} has which color?",
    "What color is the {shape} at the {where}?",
    "Tell me the color of the {shape} at the {where}.",
]
ATTRIBUTE_BY_SHAPE_PROMPTS = [
    "The {shape} has which color?",
    "Say which color the {shape} is.",
    "Of which color is the {shape}?",
]
ATTRIBUTE_SHAPE_PROMPTS = [
    "What shape is at the {where}?",
    "Which shape do you see at the {where}?",
    "Name the shape of the object at the {where}.",
]
TALLY_PROMPTS = [
    "How many {color} things do you see?",
    "How many {shape}s do you see?",
    "Count the {color} things.",
    "How many {shape}s can you find?",
    "What is the number of {color} items?",
    "Count how many {shape}s there are.",
]
NARRATE_PROMPTS = [
    "Talk about the scene.",
    "Say something about this picture.",
    "Tell me about the image in a sentence.",
    "Describe the scene in a full sentence.",
]
READ_PROMPTS = [
    "What does the sign say?",
    "Read out the text.",
    "Which word is printed here?",
    "What text can you read?",
    "Tell me the word in the image.",
]
BOX_PROMPTS = [
    "Give the box of the object at the {where}.",
    "Mark the object at the {where} with a box.",
    "Where exactly is the object at the {where}? Give its box.",
]
LEAD_INS = ["", "", "", "Look at the image. ", "Here is a picture. ", "Question: "]
CLOSINGS = ["", "", "", " Please answer.", " Be brief.", " Answer now."]


def _instruct(rng: random.Random, prompts: list[str], short: bool = False, **fields) -> str:
    """One of a base part's phrasings, filled in, sometimes with a lead-in and a closing; a short
    answer's closing is LLaVA's response-format prompt half the time."""
    closing = SHORT_ANSWER if short and rng.random() < 0.5 else rng.choice(CLOSINGS)
    return rng.choice(LEAD_INS) + rng.choice(prompts).format(**fields) + closing


def _join(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def _captions(rng: random.Random, objs: list[Obj]) -> list[str]:
    """Five references in different styles, like five annotators of Flickr30k."""
    names = [f"a {o.name}" for o in objs]
    n = len(objs)
    count = NUMBER_WORDS[n]
    placed = [f"a {o.name} at the {o.where}" for o in objs]
    shuffled = names[:]
    rng.shuffle(shuffled)
    refs = [
        _join(names),
        f"{'one shape' if n == 1 else count + ' shapes'} : {_join(names)}",
        f"there is {_join(placed)}",
        f"a dark picture with {_join(shuffled)}",
        f"{_join(shuffled)} on a plain background",
    ]
    return refs


def gen_caption(rng, size):
    img, objs = shape_scene(rng, size, rng.randint(1, 3), distinct=True)
    refs = _captions(rng, objs)
    return img, rng.choice(CAPTION_PROMPTS), rng.choice(refs), refs


def gen_color(rng, size):
    img, objs = shape_scene(rng, size, rng.randint(2, 3), distinct=True)
    target = rng.choice(objs)
    return img, rng.choice(COLOR_PROMPTS).format(shape=target.shape) + SHORT_ANSWER, target.color, [target.color] * 10


def gen_count(rng, size):
    img, objs = shape_scene(rng, size, rng.randint(1, 6), distinct=False)
    answer = str(len(objs))
    return img, rng.choice(COUNT_PROMPTS) + SHORT_ANSWER, answer, [answer]


def gen_ocr(rng, size):
    word = rng.choice(WORDS)
    img, _ = text_image(rng, size, word)
    return img, rng.choice(OCR_PROMPTS) + SHORT_ANSWER, word, [word] * 10


RELATIONS = {
    "left of": lambda a, b: a.col < b.col and a.row == b.row,
    "right of": lambda a, b: a.col > b.col and a.row == b.row,
    "above": lambda a, b: a.row < b.row and a.col == b.col,
    "below": lambda a, b: a.row > b.row and a.col == b.col,
}


def gen_spatial(rng, size):
    while True:  # rejection-sample a scene with a relation that has exactly one answer
        img, objs = shape_scene(rng, size, rng.randint(2, 3), distinct=True)
        options = []
        for anchor in objs:
            for rel, holds in RELATIONS.items():
                hits = [o for o in objs if o is not anchor and holds(o, anchor)]
                if len(hits) == 1:
                    options.append((rel, anchor, hits[0]))
        if options:
            rel, anchor, answer = rng.choice(options)
            question = rng.choice(SPATIAL_PROMPTS).format(rel=rel, obj=anchor.name) + SHORT_ANSWER
            return img, question, answer.name, [answer.name]


def gen_ground(rng, size):
    img, objs = shape_scene(rng, size, rng.randint(2, 3), distinct=True)
    target = rng.choice(objs)
    return img, rng.choice(GROUND_PROMPTS).format(obj=target.name), _box(target), [_box(target)]


def gen_describe(rng, size):
    if rng.random() < 0.4:
        word = rng.choice(WORDS)
        img, color = text_image(rng, size, word)
        answer = f"the word {word} in {color}"
    else:
        img, objs = shape_scene(rng, size, rng.randint(1, 6), distinct=False)
        answer = " , ".join(f"{o.name} {o.where}" for o in objs)
    return img, _instruct(rng, DESCRIBE_PROMPTS), answer, [answer]


def _unique_target(rng, objs: list[Obj]) -> tuple[Obj, bool]:
    unique = [o for o in objs if sum(p.name == o.name for p in objs) == 1]
    return rng.choice(unique or objs), bool(unique)


def _neighbours(obj: Obj, objs: list[Obj]) -> list[Obj]:
    return [o for o in objs if abs(o.row - obj.row) + abs(o.col - obj.col) == 1]


def _relations(objs: list[Obj]) -> list[tuple[str, Obj, Obj]]:
    """(relation, anchor, the one object in that relation to it) for every uniquely named anchor."""
    out = []
    for anchor in objs:
        if sum(o.name == anchor.name for o in objs) != 1:
            continue
        for rel, holds in RELATIONS.items():
            hits = [o for o in objs if o is not anchor and holds(o, anchor)]
            if len(hits) == 1:
                out.append((rel, anchor, hits[0]))
    return out


def gen_locate(rng, size):
    """Bind a named object to its place and back, and name the object next to another or in one
    direction from it: what the base model needs to answer questions about one object among
    several, and to relate two."""
    img, objs = shape_scene(rng, size, rng.randint(1, 6), distinct=False)
    target, unique = _unique_target(rng, objs)
    kind = rng.random()
    if kind < 0.25:
        pairs = [(o, _neighbours(o, objs)) for o in objs if sum(p.name == o.name for p in objs) == 1]
        pairs = [(o, n[0]) for o, n in pairs if len(n) == 1]
        if pairs:  # "next to": the one object in a neighbouring cell (any side)
            anchor, near = rng.choice(pairs)
            return img, _instruct(rng, LOCATE_NEAR_PROMPTS, True, obj=anchor.name), near.name, [near.name]
    elif kind < 0.5:
        options = _relations(objs)
        if options:  # one direction: the one object left of / right of / above / below another
            rel, anchor, hit = rng.choice(options)
            return img, _instruct(rng, LOCATE_REL_PROMPTS, True, rel=rel, obj=anchor.name), hit.name, [hit.name]
    if not unique or kind < 0.75:
        return img, _instruct(rng, LOCATE_AT_PROMPTS, True, where=target.where), target.name, [target.name]
    question = _instruct(rng, LOCATE_WHERE_PROMPTS, True, obj=target.name)
    return img, question, target.where, [target.where]


def gen_attribute(rng, size):
    """One attribute (a colour or a shape word) of the object at a named place, or the colour of
    the one object of a named shape."""
    img, objs = shape_scene(rng, size, rng.randint(1, 6), distinct=False)
    target = rng.choice(objs)
    kind = rng.random()
    if kind < 0.3:
        single = [o for o in objs if sum(p.shape == o.shape for p in objs) == 1]
        if single:
            target = rng.choice(single)
            return img, _instruct(rng, ATTRIBUTE_BY_SHAPE_PROMPTS, True, shape=target.shape), target.color, [target.color]
    if kind < 0.7:
        question = _instruct(rng, ATTRIBUTE_COLOR_PROMPTS, True, where=target.where, shape=target.shape)
        return img, question, target.color, [target.color]
    return img, _instruct(rng, ATTRIBUTE_SHAPE_PROMPTS, True, where=target.where), target.shape, [target.shape]


def gen_tally(rng, size):
    """How many objects of one colour or of one shape (0 when the scene has none): digits,
    without the count task's question (all objects)."""
    img, objs = shape_scene(rng, size, rng.randint(1, 6), distinct=False)
    # mostly an attribute the scene has (answers 1-6 like counts), sometimes any (often 0)
    if rng.random() < 0.85:
        pick = rng.choice(objs)
        color, shape = pick.color, pick.shape
    else:
        color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
    prompt = rng.choice(TALLY_PROMPTS)
    by_color = "{color}" in prompt
    n = sum((o.color == color) if by_color else (o.shape == shape) for o in objs)
    question = _instruct(rng, [prompt], True, color=color, shape=shape)
    return img, question, str(n), [str(n)]


def gen_narrate(rng, size):
    """A sentence about a scene: how many shapes and where each one is, in one fixed style."""
    img, objs = shape_scene(rng, size, rng.randint(1, 3), distinct=True)
    n = len(objs)
    placed = [f"a {o.name} on the {o.where}" for o in objs]
    answer = f"there {'is one shape' if n == 1 else 'are ' + NUMBER_WORDS[n] + ' shapes'} : {_join(placed)}"
    return img, _instruct(rng, NARRATE_PROMPTS), answer, [answer]


def gen_read(rng, size):
    """The word of a text image, alone: light text centred on a dark background."""
    word = rng.choice(WORDS)
    img, _ = text_image(rng, size, word)
    return img, _instruct(rng, READ_PROMPTS, True), word, [word]


def _box(obj: Obj) -> str:
    return "[{}, {}, {}, {}]".format(*obj.box)


def gen_box(rng, size):
    """The bounding box of the object at a named place (pixels, as the ground task)."""
    img, objs = shape_scene(rng, size, rng.randint(1, 6), distinct=False)
    target = rng.choice(objs)
    return img, _instruct(rng, BOX_PROMPTS, where=target.where), _box(target), [_box(target)]


GENERATORS: dict[str, Callable] = {
    "caption": gen_caption,
    "color": gen_color,
    "count": gen_count,
    "ocr": gen_ocr,
    "spatial": gen_spatial,
    "ground": gen_ground,
    "describe": gen_describe,
    "locate": gen_locate,
    "attribute": gen_attribute,
    "tally": gen_tally,
    "narrate": gen_narrate,
    "read": gen_read,
    "box": gen_box,
}


def _write_split(root: Path, part: str, split: str, n: int, seed: int, size: int) -> str:
    # One independent stream per (part, split): changing one size never changes another split.
    rng = random.Random(f"{seed}/{part}/{split}")
    img_dir = root / part / f"{split}_images"
    img_dir.mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        img, question, answer, refs = GENERATORS[part](rng, size)
        name = f"{i:06d}.png"
        img.save(img_dir / name, format="PNG")
        records.append(to_record(f"{part}-{split}-{i}", f"{split}_images/{name}", question, answer, refs))
    rel = f"{part}/{split}.jsonl"
    write_jsonl(root / rel, records)
    return rel


def generate_synth(
    out: str | Path,
    seed: int = 0,
    train_size: int = 3000,
    test_size: int = 200,
    base_size: int = 500,
    image_size: int = 48,
    tasks: list[str] | None = None,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Write the benchmark to ``out`` (manifest written last, so a complete manifest means a
    complete benchmark). Every base part is also a task: its ``base_size`` training samples are
    the starting model's mix, its ``test_size`` test samples a general task a run can evaluate."""
    out = Path(out)
    tasks = list(tasks or TASKS)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown synth task(s) {unknown}; available: {', '.join(TASKS)}")
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)
    manifest = {"name": "synth", "version": SYNTH_VERSION, "seed": seed, "image_size": image_size, "tasks": [],
                "base": {}, "general": list(GENERAL)}
    for task in [*tasks, *BASE_PARTS]:
        if progress:
            progress(task)
        scorer, options = SCORERS[task]
        is_base = task in BASE_PARTS
        manifest["tasks"].append(
            {
                "name": task,
                "train": _write_split(out, task, "train", base_size if is_base else train_size, seed, image_size),
                "test": _write_split(out, task, "test", test_size, seed, image_size),
                "scorer": scorer,
                "scorer_options": options,
                "max_new_tokens": MAX_NEW_TOKENS[task],
            }
        )
        if is_base:
            manifest["base"][task] = manifest["tasks"][-1]["train"]
    atomic_write_json(out / MANIFEST, manifest)
    return out
