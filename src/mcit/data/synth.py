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

The ``base`` parts instruction-pretrain the starting model: ``describe`` lists every object of a
shape scene or the word of a text image in a fixed format, and ``locate`` names the object at a
place or the place of an object, teaching the model to see shapes, colours, positions and text
and to bind a named object to its place, without teaching any stream task's instruction or
answer format. The default mix is these two. ``tally`` (how many objects of one colour or one
shape: a digit) and ``narrate`` (a sentence about the scene) are for a broader start, like a
multi-task instruction-tuned model (InstructBLIP) whose answers already hold numbers and
sentences, though neither is a stream task's instruction or answer format.
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

SYNTH_VERSION = 3  # bump when the generator's output changes: cached copies are keyed by it
TASKS = ["caption", "color", "count", "ocr", "spatial", "ground"]
DEFAULT_STREAM = ["caption", "color", "count", "ocr", "spatial"]
BASE_PARTS = ["describe", "locate", "tally", "narrate"]

SCORERS = {
    # CIDEr-D saturates near 420-650 (x100) for a perfect caption against five references that
    # share their content words (measured), which would swamp every average: BLEU-4 is bounded.
    "caption": ("caption", {"headline": "BLEU-4"}),
    "color": ("vqa", {}),
    "count": ("numeric", {}),
    "ocr": ("vqa_evalai", {}),
    "spatial": ("exact", {}),
    "ground": ("iou", {"threshold": 0.5}),
}
MAX_NEW_TOKENS = {"caption": 24, "color": 4, "count": 4, "ocr": 4, "spatial": 5, "ground": 12}


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
DESCRIBE_PROMPT = "List what you see."
LOCATE_PROMPTS = ["What is at the {where}?", "Where is the {obj}?"]
TALLY_PROMPTS = ["How many {color} things do you see?", "How many {shape}s do you see?"]
NARRATE_PROMPT = "Talk about the scene."


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
    return img, rng.choice(COLOR_PROMPTS).format(shape=target.shape), target.color, [target.color] * 10


def gen_count(rng, size):
    img, objs = shape_scene(rng, size, rng.randint(1, 6), distinct=False)
    answer = str(len(objs))
    return img, rng.choice(COUNT_PROMPTS), answer, [answer]


def gen_ocr(rng, size):
    word = rng.choice(WORDS)
    img, _ = text_image(rng, size, word)
    return img, rng.choice(OCR_PROMPTS), word, [word] * 10


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
            question = rng.choice(SPATIAL_PROMPTS).format(rel=rel, obj=anchor.name)
            return img, question, answer.name, [answer.name]


def gen_ground(rng, size):
    img, objs = shape_scene(rng, size, rng.randint(2, 3), distinct=True)
    target = rng.choice(objs)
    box = "[{}, {}, {}, {}]".format(*target.box)
    return img, rng.choice(GROUND_PROMPTS).format(obj=target.name), box, [box]


def gen_describe(rng, size):
    if rng.random() < 0.4:
        word = rng.choice(WORDS)
        img, color = text_image(rng, size, word)
        answer = f"the word {word} in {color}"
    else:
        img, objs = shape_scene(rng, size, rng.randint(1, 6), distinct=False)
        answer = " , ".join(f"{o.name} {o.where}" for o in objs)
    return img, DESCRIBE_PROMPT, answer, [answer]


def gen_locate(rng, size):
    """Bind a named object to its place and back: what the base model needs to answer
    questions about one object among several, in a format no stream task uses."""
    img, objs = shape_scene(rng, size, rng.randint(1, 6), distinct=False)
    unique = [o for o in objs if sum(p.name == o.name for p in objs) == 1]
    target = rng.choice(unique or objs)
    if not unique or rng.random() < 0.5:
        question = LOCATE_PROMPTS[0].format(where=target.where)
        answer = target.name
    else:
        question = LOCATE_PROMPTS[1].format(obj=target.name)
        answer = target.where
    return img, question, answer, [answer]


def gen_tally(rng, size):
    """How many objects of one colour or of one shape (0 when the scene has none): digits,
    without the count task's question (all objects) or its scene statistics."""
    img, objs = shape_scene(rng, size, rng.randint(1, 6), distinct=False)
    # mostly an attribute the scene has (answers 1-6 like counts), sometimes any (often 0)
    if rng.random() < 0.85:
        pick = rng.choice(objs)
        color, shape = pick.color, pick.shape
    else:
        color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
    if rng.random() < 0.5:
        question, n = TALLY_PROMPTS[0].format(color=color), sum(o.color == color for o in objs)
    else:
        question, n = TALLY_PROMPTS[1].format(shape=shape), sum(o.shape == shape for o in objs)
    return img, question, str(n), [str(n)]


def gen_narrate(rng, size):
    """A sentence about a scene: how many shapes and where each one is, in one fixed style."""
    img, objs = shape_scene(rng, size, rng.randint(1, 3), distinct=True)
    n = len(objs)
    placed = [f"a {o.name} on the {o.where}" for o in objs]
    answer = f"this scene shows {NUMBER_WORDS[n]} {'shape' if n == 1 else 'shapes'} , {_join(placed)}"
    return img, NARRATE_PROMPT, answer, [answer]


GENERATORS: dict[str, Callable] = {
    "caption": gen_caption,
    "color": gen_color,
    "count": gen_count,
    "ocr": gen_ocr,
    "spatial": gen_spatial,
    "ground": gen_ground,
    "describe": gen_describe,
    "locate": gen_locate,
    "tally": gen_tally,
    "narrate": gen_narrate,
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
    base_size: int = 20000,
    image_size: int = 48,
    tasks: list[str] | None = None,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Write the benchmark to ``out`` (manifest written last, so a complete manifest means a
    complete benchmark)."""
    out = Path(out)
    tasks = list(tasks or TASKS)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown synth task(s) {unknown}; available: {', '.join(TASKS)}")
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)
    manifest = {"name": "synth", "version": SYNTH_VERSION, "seed": seed, "image_size": image_size, "tasks": [], "base": {}}
    for task in tasks:
        if progress:
            progress(task)
        scorer, options = SCORERS[task]
        manifest["tasks"].append(
            {
                "name": task,
                "train": _write_split(out, task, "train", train_size, seed, image_size),
                "test": _write_split(out, task, "test", test_size, seed, image_size),
                "scorer": scorer,
                "scorer_options": options,
                "max_new_tokens": MAX_NEW_TOKENS[task],
            }
        )
    for part in BASE_PARTS:
        if progress:
            progress(f"base:{part}")
        manifest["base"][part] = _write_split(out, part, "train", base_size, seed, image_size)
    atomic_write_json(out / MANIFEST, manifest)
    return out
