"""Deterministic demo data: a LLaVA-format candidate pool plus small benchmarks.

Why this exists: the pipeline must run offline (no downloads) and in tests, so we
synthesise a candidate pool whose records fall into clearly separable task
families -- the same families the ICONS paper's target benchmarks probe
(short VQA, POPE-like yes/no, multiple choice, OCR, counting, long captions).
Gradient-influence selection should then visibly prefer the families that match
a chosen benchmark, which is what the demo is meant to show.

Design: every record is first built as a *draft* (text + an image recipe) using
only cheap random draws; drawing pixels is a separate step.  That keeps
:func:`demo_corpus` (tokenizer training text) fast and guarantees the corpus
matches the files :func:`generate_demo` writes.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import shutil
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = [
    "BENCHMARK_NAMES",
    "DEMO_SIZES",
    "FAMILIES",
    "DemoPaths",
    "DemoSize",
    "demo_corpus",
    "generate_alignment_data",
    "generate_demo",
]

FORMAT_VERSION = 1

# --------------------------------------------------------------------------- sizes


@dataclass(frozen=True)
class DemoSize:
    """How many records to generate; one object so runs are reproducible by name."""

    pool_per_family: int  # records per (single-turn) family in the pool
    multi_turn: int
    text_only: int
    val_per_benchmark: int
    test_per_benchmark: int
    noisy_fraction: float = 0.05  # share of the family records given a wrong answer
    image_size: int = 32

    def __post_init__(self) -> None:
        for name in ("pool_per_family", "multi_turn", "text_only", "val_per_benchmark", "test_per_benchmark"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"DemoSize.{name} must be a non-negative int, got {value!r}")
        if not 0.0 <= self.noisy_fraction < 1.0:
            raise ValueError(f"DemoSize.noisy_fraction must be in [0, 1), got {self.noisy_fraction!r}")
        if not isinstance(self.image_size, int) or self.image_size < 8:
            raise ValueError(f"DemoSize.image_size must be an int >= 8, got {self.image_size!r}")


DEMO_SIZES: dict[str, DemoSize] = {
    "default": DemoSize(pool_per_family=100, multi_turn=60, text_only=60, val_per_benchmark=16, test_per_benchmark=40),
    "test": DemoSize(pool_per_family=24, multi_turn=12, text_only=12, val_per_benchmark=6, test_per_benchmark=8),
    # the evaluation's larger pool: each family (400) is several times what a 20% cut of a
    # family-balanced subset holds, so a selector has real choices (same benchmarks)
    "large": DemoSize(pool_per_family=400, multi_turn=120, text_only=120, val_per_benchmark=16, test_per_benchmark=40),
}


@dataclass(frozen=True)
class DemoPaths:
    """Where a generated demo lives; the layout other modules rely on."""

    root: Path
    pool: Path  # <root>/pool.json
    image_root: Path  # <root>/images
    benchmarks: Path  # <root>/benchmarks

    @classmethod
    def for_root(cls, root: str | Path) -> DemoPaths:
        root = Path(root)
        return cls(root=root, pool=root / "pool.json", image_root=root / "images", benchmarks=root / "benchmarks")


def _resolve_size(size: str | DemoSize) -> DemoSize:
    if isinstance(size, DemoSize):
        return size
    try:
        return DEMO_SIZES[size]
    except KeyError:
        raise ValueError(f"unknown demo size {size!r}; choose one of {sorted(DEMO_SIZES)} or pass a DemoSize") from None


# --------------------------------------------------------------------------- vocabulary

FAMILIES: tuple[str, ...] = ("vqa_short", "yes_no", "multiple_choice", "text_in_image", "counting", "long_answer")
BENCHMARK_NAMES: tuple[str, ...] = FAMILIES
SPLITS: tuple[str, ...] = ("val", "test")

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 220),
    "yellow": (235, 210, 20),
    "orange": (245, 130, 20),
    "purple": (140, 40, 180),
}
COLOR_NAMES = tuple(COLORS)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "gray": (128, 128, 128),
    "noisy": (128, 128, 128),  # mean of the noise
}
BACKGROUND_NAMES = tuple(BACKGROUNDS)
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
GRID = 3  # multi-object scenes place one shape per cell of a GRID x GRID layout (no overlaps)
CELL_NAMES = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
WORDS = (
    "CAT", "DOG", "SUN", "BOX", "RED", "MAP", "KEY", "CAR", "BUS", "EGG",
    "HAT", "PEN", "CUP", "OWL", "FOX", "SKY", "TOP", "ZOO", "ICE", "JAM",
)  # fmt: skip
LETTER = "ABCD"
DIGIT_ORDINALS = 80  # each label has >= 86 scans in either half of load_digits

# Only photos that ship inside scikit-image (others need a network download).
PHOTOS: dict[str, dict[str, Any]] = {
    "astronaut": {"subject": "an astronaut in a white spacesuit", "answer": "astronaut", "color": True},
    "chelsea": {"subject": "a tabby cat", "answer": "cat", "color": True},
    "coffee": {"subject": "a cup of coffee on a saucer", "answer": "coffee", "color": True},
    "rocket": {"subject": "a rocket on its launch pad", "answer": "rocket", "color": True},
    "camera": {"subject": "a man standing behind a camera", "answer": "man", "color": False},
    "coins": {"subject": "rows of old coins", "answer": "coins", "color": False},
    "moon": {"subject": "the cratered surface of the moon", "answer": "moon", "color": False},
}
PHOTO_NAMES = tuple(PHOTOS)

VQA_SUFFIX = "Answer the question using a single word or phrase."
YES_NO_SUFFIX = "Please answer yes or no."
MC_SUFFIX = "Answer with the option's letter from the given choices directly."
OCR_SUFFIX = "Answer with the exact text."
COUNT_SUFFIX = "Answer with a number word."
DESCRIBE = "Describe this image in detail."

# --------------------------------------------------------------------------- image recipes


@dataclass(frozen=True)
class _Shape:
    kind: str
    color: str
    cx: float  # centre, fraction of the image side
    cy: float
    r: float  # half extent, fraction of the image side
    cell: int = -1  # grid cell for multi-object scenes (-1: free placement)


@dataclass(frozen=True)
class _ShapeScene:
    background: str
    shapes: tuple[_Shape, ...]
    seed: int  # drives background noise only


@dataclass(frozen=True)
class _TextImage:
    text: str
    ink: tuple[int, int, int]
    paper: tuple[int, int, int]
    dx: float  # placement jitter, fraction of the image side
    dy: float
    fill: float  # fraction of the image width the text spans


def _jittered_text(rng: random.Random, text: str, ink: tuple[int, int, int], paper: tuple[int, int, int]) -> _TextImage:
    """``text`` at a random placement and size (the pool's, benchmarks' and captions' text images)."""
    return _TextImage(
        text=text,
        ink=ink,
        paper=paper,
        dx=round(rng.uniform(-0.06, 0.06), 4),
        dy=round(rng.uniform(-0.15, 0.15), 4),
        fill=round(rng.uniform(0.7, 0.9), 4),
    )


@dataclass(frozen=True)
class _DigitImage:
    label: int  # the digit shown
    ordinal: int  # which scan of that digit within this side's half of load_digits
    bench: bool  # pool and benchmarks use disjoint halves of the scans
    ink: tuple[int, int, int]
    paper: tuple[int, int, int]


@dataclass(frozen=True)
class _PhotoCrop:
    photo: str
    frac: float  # crop side / shorter photo side
    fx: float  # crop centre, fraction of the free range (0 = left/top edge)
    fy: float
    flip: bool


_ImageSpec = _ShapeScene | _TextImage | _DigitImage | _PhotoCrop

_FOLDER = {_ShapeScene: "shapes", _TextImage: "text", _DigitImage: "digits", _PhotoCrop: "photos"}


@dataclass
class _Draft:
    """A record before its image is drawn: the JSON dict plus the image recipe."""

    record: dict[str, Any]
    image: _ImageSpec | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # keys appended after "family"


# --------------------------------------------------------------------------- random helpers


def _stream_seed(seed: int, *keys: object) -> int:
    """A stable 63-bit seed per named stream (Python's hash() is salted per process)."""
    text = "|".join([str(seed), *map(str, keys)])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") >> 1


def _rng(seed: int, *keys: object) -> random.Random:
    return random.Random(_stream_seed(seed, *keys))


def _balanced(values: tuple | list, n: int, rng: random.Random) -> list:
    """n values cycling through `values`, shuffled: exact balance without periodic patterns."""
    out = [values[i % len(values)] for i in range(n)]
    rng.shuffle(out)
    return out


def _human(question: str, image_pos: str | None) -> str:
    if image_pos == "start":
        return f"<image>\n{question}"
    if image_pos == "end":
        return f"{question}\n<image>"
    return question


def _plural(kind: str, n: int) -> str:
    return kind if n == 1 else kind + "s"


def _single_shape(rng: random.Random, seed_rng: random.Random) -> _ShapeScene:
    r = rng.uniform(0.22, 0.34)
    shape = _Shape(
        kind=rng.choice(SHAPES),
        color=rng.choice(COLOR_NAMES),
        cx=rng.uniform(r + 0.04, 1 - r - 0.04),
        cy=rng.uniform(r + 0.04, 1 - r - 0.04),
        r=r,
    )
    return _ShapeScene(rng.choice(BACKGROUND_NAMES), (shape,), seed_rng.getrandbits(63))


def _grid_scene(rng: random.Random, items: list[tuple[str, str]], seed_rng: random.Random) -> _ShapeScene:
    """Place (kind, color) items in distinct grid cells so counts stay visually exact."""
    cells = rng.sample(range(GRID * GRID), len(items))
    step = 1.0 / GRID
    shapes = []
    for (kind, color), cell in zip(items, cells, strict=True):
        row, col = divmod(cell, GRID)
        r = step * rng.uniform(0.30, 0.42)
        jitter = step / 2 - r - 0.01
        shapes.append(
            _Shape(
                kind=kind,
                color=color,
                cx=(col + 0.5) * step + rng.uniform(-jitter, jitter),
                cy=(row + 0.5) * step + rng.uniform(-jitter, jitter),
                r=r,
                cell=cell,
            )
        )
    shapes.sort(key=lambda s: s.cell)
    return _ShapeScene(rng.choice(BACKGROUND_NAMES), tuple(shapes), seed_rng.getrandbits(63))


def _random_items(rng: random.Random, n: int) -> list[tuple[str, str]]:
    return [(rng.choice(SHAPES), rng.choice(COLOR_NAMES)) for _ in range(n)]


def _photo_crop(rng: random.Random) -> _PhotoCrop:
    return _PhotoCrop(
        photo=rng.choice(PHOTO_NAMES),
        frac=round(rng.uniform(0.3, 1.0), 4),
        fx=round(rng.random(), 4),
        fy=round(rng.random(), 4),
        flip=rng.random() < 0.5,
    )


def _other(rng: random.Random, options: tuple | list, correct: Any) -> Any:
    return rng.choice([o for o in options if o != correct])


# --------------------------------------------------------------------------- descriptions


def _describe_scene(scene: _ShapeScene) -> str:
    n = len(scene.shapes)
    bg = "a noisy gray" if scene.background == "noisy" else f"a plain {scene.background}"
    sentences = [f"The image shows {NUMBER_WORDS[n]} {_plural('shape', n)} on {bg} background."]
    if n == 1:
        s = scene.shapes[0]
        horiz = "left" if s.cx < 0.42 else "right" if s.cx > 0.58 else "middle"
        vert = "upper" if s.cy < 0.42 else "lower" if s.cy > 0.58 else "central"
        sentences.append(f"It is a {s.color} {s.kind} in the {vert} {horiz} part of the picture.")
        sentences.append(f"The {s.kind} is {'large' if s.r > 0.28 else 'medium sized'}.")
    else:
        parts = [f"a {s.color} {s.kind} in the {CELL_NAMES[s.cell]}" for s in scene.shapes]
        sentences.append("There is " + ", ".join(parts[:-1]) + " and " + parts[-1] + ".")
        kinds = sorted({s.kind for s in scene.shapes})
        if len(kinds) == 1:
            sentences.append(f"All of the shapes are {kinds[0]}s.")
        else:
            biggest = max(scene.shapes, key=lambda s: (s.r, -s.cell))
            sentences.append(f"The largest shape is the {biggest.color} {biggest.kind}.")
    return " ".join(sentences)


def _describe_photo(crop: _PhotoCrop) -> str:
    info = PHOTOS[crop.photo]
    zoom = "close-up" if crop.frac < 0.55 else "medium" if crop.frac < 0.8 else "wide"
    sentences = [f"This is a {zoom} crop of a photograph of {info['subject']}."]
    if crop.frac < 0.8:
        vert = ("top", "middle", "bottom")[min(2, int(crop.fy * 3))]
        horiz = ("left", "center", "right")[min(2, int(crop.fx * 3))]
        where = "center" if (vert, horiz) == ("middle", "center") else f"{vert} {horiz}".replace("middle ", "")
        sentences.append(f"The crop is taken from the {where} of the original picture.")
    sentences.append("The picture is in color." if info["color"] else "The picture is in black and white.")
    if crop.flip:
        sentences.append("The view is mirrored horizontally.")
    return " ".join(sentences)


# --------------------------------------------------------------------------- family generators
# Each returns (question, answer, wrong_answer, image_spec, subtask).  The wrong answer has the
# same format as the right one, so noisy records are only detectable by looking at the image.


def _gen_vqa_short(rng: random.Random, seed_rng: random.Random, kind: str) -> tuple:
    if kind == "photo":
        crop = _photo_crop(rng)
        answer = PHOTOS[crop.photo]["answer"]
        wrong = _other(rng, [p["answer"] for p in PHOTOS.values()], answer)
        return f"What is shown in this photo?\n{VQA_SUFFIX}", answer, wrong, crop, None
    scene = _single_shape(rng, seed_rng)
    s = scene.shapes[0]
    if kind == "color":
        return f"What color is the shape?\n{VQA_SUFFIX}", s.color, _other(rng, COLOR_NAMES, s.color), scene, None
    return f"What shape is shown?\n{VQA_SUFFIX}", s.kind, _other(rng, SHAPES, s.kind), scene, None


def _yes_no_question(rng: random.Random, scene: _ShapeScene, positive: bool) -> tuple[str, str, str]:
    present = {(s.color, s.kind) for s in scene.shapes}
    if positive:
        color, kind = rng.choice(sorted(present))
    else:
        color, kind = rng.choice(sorted({(c, k) for c in COLOR_NAMES for k in SHAPES} - present))
    answer = "Yes" if positive else "No"
    return f"Is there a {color} {kind} in the image?\n{YES_NO_SUFFIX}", answer, "No" if positive else "Yes"


def _gen_yes_no(rng: random.Random, seed_rng: random.Random, positive: bool) -> tuple:
    scene = _grid_scene(rng, _random_items(rng, rng.randint(1, 3)), seed_rng)
    q, a, w = _yes_no_question(rng, scene, positive)
    return q, a, w, scene, None


def _mc_question(rng: random.Random, subtask: str, correct: str, letter: str, lead: str) -> tuple[str, str, str]:
    pool = COLOR_NAMES if subtask == "color" else SHAPES
    distractors = rng.sample([o for o in pool if o != correct], 3)
    pos = LETTER.index(letter)
    options = distractors[:pos] + [correct] + distractors[pos:]
    lines = [lead] + [f"{LETTER[i]}. {opt}" for i, opt in enumerate(options)] + [MC_SUFFIX]
    return "\n".join(lines), letter, _other(rng, LETTER, letter)


def _gen_multiple_choice(rng: random.Random, seed_rng: random.Random, subtask: str, letter: str) -> tuple:
    scene = _single_shape(rng, seed_rng)
    s = scene.shapes[0]
    if subtask == "color":
        q, a, w = _mc_question(rng, "color", s.color, letter, "What color is the shape in the image?")
    else:
        q, a, w = _mc_question(rng, "shape", s.kind, letter, "Which shape is shown in the image?")
    return q, a, w, scene, subtask


def _contrasting_pair(rng: random.Random) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """Ink/paper colours far enough apart to keep rendered text legible at 32 px."""
    dark = tuple(rng.randint(0, 90) for _ in range(3))
    light = tuple(rng.randint(190, 255) for _ in range(3))
    return (dark, light) if rng.random() < 0.7 else (light, dark)


def _gen_text_in_image(rng: random.Random, seed_rng: random.Random, kind: str, bench: bool) -> tuple:
    ink, paper = _contrasting_pair(rng)
    if kind == "digit":
        label = rng.randrange(10)
        answer = str(label)
        spec: _ImageSpec = _DigitImage(label, rng.randrange(DIGIT_ORDINALS), bench, ink, paper)
        wrong = _other(rng, [str(d) for d in range(10)], answer)
        return f"What digit is written in the image?\n{OCR_SUFFIX}", answer, wrong, spec, None
    if rng.random() < 0.5:
        answer = rng.choice(WORDS)
        wrong = _other(rng, WORDS, answer)
    else:
        answer = str(rng.randint(10, 999))
        wrong = str((int(answer) + rng.randint(1, 89)) % 990 + 10)
    spec = _jittered_text(rng, answer, ink, paper)
    return f"What text is written in the image?\n{OCR_SUFFIX}", answer, wrong, spec, None


def _gen_counting(rng: random.Random, seed_rng: random.Random, count: int) -> tuple:
    target = rng.choice(SHAPES)
    others = [k for k in SHAPES if k != target]
    n_distract = rng.randint(0, min(2, GRID * GRID - count))
    items = [(target, rng.choice(COLOR_NAMES)) for _ in range(count)]
    items += [(rng.choice(others), rng.choice(COLOR_NAMES)) for _ in range(n_distract)]
    scene = _grid_scene(rng, items, seed_rng)
    answer = NUMBER_WORDS[count]
    wrong = NUMBER_WORDS[_other(rng, range(1, 6), count)]
    return f"How many {target}s are there in the image?\n{COUNT_SUFFIX}", answer, wrong, scene, None


def _gen_long_answer(rng: random.Random, seed_rng: random.Random, kind: str) -> tuple:
    if kind == "photo":
        spec: _ImageSpec = _photo_crop(rng)
        answer = _describe_photo(spec)
        wrong_spec = replace(spec, photo=_other(rng, PHOTO_NAMES, spec.photo))
        wrong = _describe_photo(wrong_spec)
    else:
        spec = _grid_scene(rng, _random_items(rng, rng.randint(1, 4)), seed_rng)
        answer = _describe_scene(spec)
        wrong_shapes = tuple(replace(s, color=_other(rng, COLOR_NAMES, s.color)) for s in spec.shapes)
        wrong = _describe_scene(replace(spec, shapes=wrong_shapes))
    return DESCRIBE, answer, wrong, spec, None


def _family_drafts(
    family: str, n: int, rng: random.Random, seed_rng: random.Random, bench: bool
) -> list[tuple]:
    """n (question, answer, wrong, spec, subtask) tuples with balanced answer/sub-type mixes."""
    if family == "vqa_short":
        kinds = _balanced(("color", "shape", "photo"), n, rng)
        return [_gen_vqa_short(rng, seed_rng, k) for k in kinds]
    if family == "yes_no":
        return [_gen_yes_no(rng, seed_rng, p) for p in _balanced((True, False), n, rng)]
    if family == "multiple_choice":
        subtasks = _balanced(("color", "shape"), n, rng)
        letters = _balanced(tuple(LETTER), n, rng)
        return [_gen_multiple_choice(rng, seed_rng, s, l) for s, l in zip(subtasks, letters, strict=True)]
    if family == "text_in_image":
        return [_gen_text_in_image(rng, seed_rng, k, bench) for k in _balanced(("text", "digit"), n, rng)]
    if family == "counting":
        return [_gen_counting(rng, seed_rng, c) for c in _balanced((1, 2, 3, 4), n, rng)]
    if family == "long_answer":
        return [_gen_long_answer(rng, seed_rng, k) for k in _balanced(("photo", "shapes"), n, rng)]
    raise ValueError(f"unknown family {family!r}")


def _gen_multi_turn(rng: random.Random, seed_rng: random.Random, image_pos: str) -> tuple[list[dict], _ShapeScene]:
    """2-3 QA rounds of different question types about one multi-shape scene."""
    scene = _grid_scene(rng, _random_items(rng, rng.randint(2, 4)), seed_rng)
    kinds = [s.kind for s in scene.shapes]
    colors = [s.color for s in scene.shapes]
    unique_kinds = sorted(k for k in set(kinds) if kinds.count(k) == 1)
    unique_colors = sorted(c for c in set(colors) if colors.count(c) == 1)

    def q_yes_no() -> tuple[str, str]:
        q, a, _ = _yes_no_question(rng, scene, rng.random() < 0.5)
        return q, a

    def q_count() -> tuple[str, str]:
        kind = rng.choice(sorted(set(kinds)))
        return f"How many {kind}s are there in the image?\n{COUNT_SUFFIX}", NUMBER_WORDS[kinds.count(kind)]

    def q_color() -> tuple[str, str]:
        kind = rng.choice(unique_kinds)
        return f"What color is the {kind}?\n{VQA_SUFFIX}", colors[kinds.index(kind)]

    def q_shape() -> tuple[str, str]:
        color = rng.choice(unique_colors)
        return f"What shape is the {color} object?\n{VQA_SUFFIX}", kinds[colors.index(color)]

    def q_mc() -> tuple[str, str]:
        kind = rng.choice(unique_kinds)
        q, a, _ = _mc_question(rng, "color", colors[kinds.index(kind)], rng.choice(LETTER), f"What color is the {kind}?")
        return q, a

    makers = [q_yes_no, q_count]
    if unique_kinds:
        makers += [q_color, q_mc]
    if unique_colors:
        makers.append(q_shape)
    rounds = rng.sample(makers, min(len(makers), rng.randint(2, 3)))
    conversations: list[dict] = []
    for i, make in enumerate(rounds):
        q, a = make()
        conversations.append({"from": "human", "value": _human(q, image_pos if i == 0 else None)})
        conversations.append({"from": "gpt", "value": a})
    return conversations, scene


def _gen_text_only(rng: random.Random) -> tuple[str, str]:
    kind = rng.choice(("add", "sub", "mul", "opposite", "letters", "reverse", "order"))
    if kind == "add":
        a, b = rng.randint(1, 50), rng.randint(1, 50)
        return f"What is {a} plus {b}?", str(a + b)
    if kind == "sub":
        a = rng.randint(5, 60)
        b = rng.randint(1, a)
        return f"What is {a} minus {b}?", str(a - b)
    if kind == "mul":
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        return f"What is {a} times {b}?", str(a * b)
    if kind == "opposite":
        pairs = (("hot", "cold"), ("big", "small"), ("up", "down"), ("light", "dark"), ("fast", "slow"),
                 ("open", "closed"), ("happy", "sad"), ("early", "late"), ("full", "empty"), ("wet", "dry"))  # fmt: skip
        a, b = rng.choice(pairs)
        if rng.random() < 0.5:
            a, b = b, a
        return f"What is the opposite of the word {a}?", b
    word = rng.choice(WORDS + ("APPLE", "HOUSE", "RIVER", "GARDEN", "PLANET")).lower()
    if kind == "letters":
        return f"How many letters are in the word {word}?", str(len(word))
    if kind == "reverse":
        return f"Spell the word {word} backwards.", word[::-1]
    x, y = rng.sample("abcdefghijklmnopqrstuvwxyz", 2)
    return f"Which letter comes first in the alphabet, {x} or {y}?", min(x, y)


# --------------------------------------------------------------------------- draft assembly


def _pool_drafts(size: DemoSize, seed: int) -> list[_Draft]:
    n_family = size.pool_per_family * len(FAMILIES)
    noisy_ids = set(_rng(seed, "pool", "noisy").sample(range(n_family), round(size.noisy_fraction * n_family)))
    drafts: list[_Draft] = []
    for f_idx, family in enumerate(FAMILIES):
        rng = _rng(seed, "pool", family)
        seed_rng = _rng(seed, "pool", family, "pixels")
        positions = _balanced(("start", "end"), size.pool_per_family, rng)
        items = _family_drafts(family, size.pool_per_family, rng, seed_rng, bench=False)
        for i, ((q, a, wrong, spec, _subtask), pos) in enumerate(zip(items, positions, strict=True)):
            noisy = f_idx * size.pool_per_family + i in noisy_ids
            record = {
                "id": f"{family}-{i:06d}",
                "conversations": [
                    {"from": "human", "value": _human(q, pos)},
                    {"from": "gpt", "value": wrong if noisy else a},
                ],
                "family": family,
            }
            drafts.append(_Draft(record, spec, {"noisy": True} if noisy else {}))

    rng = _rng(seed, "pool", "multi_turn")
    seed_rng = _rng(seed, "pool", "multi_turn", "pixels")
    for i, pos in enumerate(_balanced(("start", "end"), size.multi_turn, rng)):
        conversations, scene = _gen_multi_turn(rng, seed_rng, pos)
        drafts.append(_Draft({"id": f"multi_turn-{i:06d}", "conversations": conversations, "family": "multi_turn"}, scene))

    rng = _rng(seed, "pool", "text_only")
    for i in range(size.text_only):
        q, a = _gen_text_only(rng)
        conversations = [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
        drafts.append(_Draft({"id": f"text_only-{i:06d}", "conversations": conversations, "family": "text_only"}))

    # Deterministic image names per folder, in generation order (before shuffling).
    counters: dict[str, int] = {}
    for d in drafts:
        if d.image is not None:
            folder = _FOLDER[type(d.image)]
            counters[folder] = counters.get(folder, 0) + 1
            d.record = _with_image(d.record, f"{folder}/{counters[folder] - 1:06d}.png")
    _rng(seed, "pool", "order").shuffle(drafts)
    return drafts


def _with_image(record: dict[str, Any], path: str) -> dict[str, Any]:
    """Insert "image" right after "id" to keep the conventional LLaVA key order."""
    return {"id": record["id"], "image": path, **{k: v for k, v in record.items() if k != "id"}}


def _benchmark_drafts(size: DemoSize, seed: int) -> dict[str, dict[str, list[_Draft]]]:
    out: dict[str, dict[str, list[_Draft]]] = {}
    for name in BENCHMARK_NAMES:
        out[name] = {}
        for split in SPLITS:
            n = size.val_per_benchmark if split == "val" else size.test_per_benchmark
            rng = _rng(seed, "bench", name, split)
            seed_rng = _rng(seed, "bench", name, split, "pixels")
            positions = _balanced(("start", "end"), n, rng)
            items = _family_drafts(name, n, rng, seed_rng, bench=True)
            drafts = []
            for i, ((q, a, _wrong, spec, subtask), pos) in enumerate(zip(items, positions, strict=True)):
                record = {
                    "id": f"bench-{name}-{split}-{i:04d}",
                    "image": f"{split}/{i:04d}.png",
                    "conversations": [{"from": "human", "value": _human(q, pos)}, {"from": "gpt", "value": a}],
                    "family": name,
                }
                drafts.append(_Draft(record, spec, {"subtask": subtask} if subtask else {}))
            out[name][split] = drafts
    return out


def _final(d: _Draft) -> dict[str, Any]:
    return {**d.record, **d.extra}


def demo_corpus(size: str | DemoSize = "default", seed: int = 0) -> list[str]:
    """Every turn of the pool and benchmarks (``<image>`` removed), for tokenizer training.

    Builds only the text drafts -- no pixels -- so it is cheap, and it is exactly
    the text :func:`generate_demo` writes for the same arguments.
    """
    size = _resolve_size(size)
    drafts = list(_pool_drafts(size, seed))
    for splits in _benchmark_drafts(size, seed).values():
        for split in SPLITS:
            drafts.extend(splits[split])
    return [_strip_image(turn["value"]) for d in drafts for turn in d.record["conversations"]]


def _strip_image(text: str) -> str:
    return text.replace("<image>\n", "").replace("\n<image>", "").replace("<image>", "").strip()


# --------------------------------------------------------------------------- drawing


@lru_cache(maxsize=2)
def _digit_scans(bench: bool) -> dict[int, np.ndarray]:
    """Scans per label from one half of load_digits (even rows: pool, odd rows: benchmarks)."""
    from sklearn.datasets import load_digits  # local CSV shipped with sklearn; imported lazily (slow)

    d = load_digits()
    images, targets = d.images[int(bench) :: 2] / 16.0, d.target[int(bench) :: 2]
    return {label: images[targets == label] for label in range(10)}


@lru_cache(maxsize=None)
def _photo(name: str) -> Image.Image:
    from skimage import data as skdata  # only bundled images (see PHOTOS)

    arr = getattr(skdata, name)()
    img = Image.fromarray(arr)
    return img.convert("RGB")


@lru_cache(maxsize=1)
def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=40)  # scalable when Pillow has FreeType
    except (ImportError, TypeError, ValueError, OSError):
        return ImageFont.load_default()


def _draw_scene(scene: _ShapeScene, n: int) -> Image.Image:
    base = np.empty((n, n, 3), np.float32)
    base[:] = BACKGROUNDS[scene.background]
    if scene.background == "noisy":
        base += np.random.default_rng(scene.seed).normal(0.0, 40.0, size=(n, n, 1))
    background = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8)).convert("RGBA")

    ss = 4  # supersample so 32 px shapes get anti-aliased edges
    big = n * ss
    layer = Image.new("RGBA", (big, big), (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    for s in scene.shapes:
        cx, cy, r = s.cx * big, s.cy * big, s.r * big
        fill = COLORS[s.color] + (255,)
        if s.kind == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        elif s.kind == "square":
            q = r * 0.88
            draw.rectangle((cx - q, cy - q, cx + q, cy + q), fill=fill)
        elif s.kind == "triangle":
            draw.polygon([(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)], fill=fill)
        else:  # diamond
            draw.polygon([(cx, cy - r), (cx + r * 0.8, cy), (cx, cy + r), (cx - r * 0.8, cy)], fill=fill)
    layer = layer.resize((n, n), Image.Resampling.BOX)
    return Image.alpha_composite(background, layer).convert("RGB")


def _colorize(mask: Image.Image, ink: tuple[int, int, int], paper: tuple[int, int, int]) -> Image.Image:
    return Image.composite(Image.new("RGB", mask.size, ink), Image.new("RGB", mask.size, paper), mask)


def _draw_text(spec: _TextImage, n: int) -> Image.Image:
    font = _font()
    left, top, right, bottom = ImageDraw.Draw(Image.new("L", (1, 1))).textbbox((0, 0), spec.text, font=font)
    w, h = right - left, bottom - top
    glyphs = Image.new("L", (w + 2, h + 2), 0)
    ImageDraw.Draw(glyphs).text((1 - left, 1 - top), spec.text, fill=255, font=font)
    tw = max(1, round(n * spec.fill))
    th = max(1, min(n, round(tw * (h + 2) / (w + 2))))
    glyphs = glyphs.resize((tw, th), Image.Resampling.LANCZOS)
    mask = Image.new("L", (n, n), 0)
    x = round((n - tw) / 2 + spec.dx * n)
    y = round((n - th) / 2 + spec.dy * n)
    mask.paste(glyphs, (max(0, min(n - tw, x)), max(0, min(n - th, y))))
    return _colorize(mask, spec.ink, spec.paper)


def _draw_digit(spec: _DigitImage, n: int) -> Image.Image:
    arr = (_digit_scans(spec.bench)[spec.label][spec.ordinal] * 255).astype(np.uint8)
    mask = Image.fromarray(arr, "L").resize((n, n), Image.Resampling.BILINEAR)
    return _colorize(mask, spec.ink, spec.paper)


def _draw_photo(spec: _PhotoCrop, n: int) -> Image.Image:
    img = _photo(spec.photo)
    w, h = img.size
    side = max(8, round(min(w, h) * spec.frac))
    x0 = round((w - side) * spec.fx)
    y0 = round((h - side) * spec.fy)
    out = img.resize((n, n), Image.Resampling.LANCZOS, box=(x0, y0, x0 + side, y0 + side))
    return out.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if spec.flip else out


def _render(spec: _ImageSpec, n: int) -> Image.Image:
    if isinstance(spec, _ShapeScene):
        return _draw_scene(spec, n)
    if isinstance(spec, _TextImage):
        return _draw_text(spec, n)
    if isinstance(spec, _DigitImage):
        return _draw_digit(spec, n)
    return _draw_photo(spec, n)


def _nudge(img: Image.Image, key: int) -> Image.Image:
    """Change one pixel by one level: breaks an exact pool/benchmark collision invisibly."""
    arr = np.array(img)
    g = np.random.default_rng(key)
    y, x, c = (int(g.integers(0, s)) for s in arr.shape)
    arr[y, x, c] = arr[y, x, c] + 1 if arr[y, x, c] < 255 else 254
    return Image.fromarray(arr, "RGB")


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")  # no pnginfo => no timestamps or other metadata
    return buf.getvalue()


# --------------------------------------------------------------------------- writing


def _dump_json(path: Path, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, ensure_ascii=False, indent=None)
        fh.write("\n")


def _manifest(size: DemoSize, seed: int) -> dict[str, Any]:
    return {"format": FORMAT_VERSION, "seed": seed, "size": asdict(size)}


def _is_complete(root: Path, manifest: dict[str, Any], manifest_name: str = "demo.json") -> bool:
    if not (root / "DONE").is_file():
        return False
    try:
        with open(root / manifest_name, encoding="utf-8") as fh:
            return json.load(fh) == manifest
    except (OSError, ValueError):
        return False


def _build_folder(out: Path, manifest: dict[str, Any], manifest_name: str, write) -> None:
    """Run ``write(tmp)`` in ``<out>.tmp-<pid>``, mark it complete, and swap it into place.

    Crash-safe: readers only ever see a complete folder (``DONE`` is written last), and a
    folder a concurrent run finished first is kept.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        write(tmp)
        _dump_json(tmp / manifest_name, manifest)
        (tmp / "DONE").write_text("ok\n", encoding="utf-8")  # written last: marks completeness
        if _is_complete(out, manifest, manifest_name):  # a concurrent run finished first
            shutil.rmtree(tmp)
            return
        old = None
        if out.exists():  # stale/partial/different folder: move aside, then swap
            old = out.with_name(f"{out.name}.old-{os.getpid()}")
            if old.exists():
                shutil.rmtree(old)
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_all(tmp: Path, size: DemoSize, seed: int) -> None:
    n = size.image_size
    pool = _pool_drafts(size, seed)
    image_root = tmp / "images"
    pool_hashes: set[bytes] = set()
    for d in sorted(pool, key=lambda d: d.record["id"]):
        if d.image is None:
            continue
        img = _render(d.image, n)
        pool_hashes.add(hashlib.sha256(img.tobytes()).digest())
        path = image_root / d.record["image"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(_png_bytes(img))
    _dump_json(tmp / "pool.json", [_final(d) for d in pool])

    for name, splits in _benchmark_drafts(size, seed).items():
        bench_dir = tmp / "benchmarks" / name
        for split in SPLITS:
            for d in splits[split]:
                img = _render(d.image, n)
                attempt = 0
                while hashlib.sha256(img.tobytes()).digest() in pool_hashes:
                    img = _nudge(img, _stream_seed(seed, d.record["id"], attempt))
                    attempt += 1
                path = bench_dir / "images" / d.record["image"]
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(_png_bytes(img))
            _dump_json(bench_dir / f"{split}.json", [_final(d) for d in splits[split]])


def generate_demo(out_dir: str | Path, size: str | DemoSize = "default", seed: int = 0) -> DemoPaths:
    """Write the demo pool and benchmarks under ``out_dir``; byte-identical for equal arguments.

    Idempotent: a complete directory (``DONE`` marker, matching ``demo.json``) is
    returned untouched.  Crash-safe: everything is built in ``<out>.tmp-<pid>``
    and swapped in with ``os.replace``, so readers never see a half-written demo.
    """
    size = _resolve_size(size)
    paths = DemoPaths.for_root(out_dir)
    out = paths.root
    manifest = _manifest(size, seed)
    if not _is_complete(out, manifest):
        _build_folder(out, manifest, "demo.json", lambda tmp: _write_all(tmp, size, seed))
    return paths


# --------------------------------------------------------------------------- stage-1 alignment data
# Caption records for the tiny model's "stage 1" (LLaVA's feature-alignment pre-training):
# the same renderers and describers as the pool, but separate random streams ("align" keys),
# separate digit scans, and a pixel check against the demo's own images, so the pool and the
# benchmarks never leak into pre-training.

ALIGN_FORMAT_VERSION = 1
ALIGN_FILE = "align.json"
ALIGN_MANIFEST = "manifest.json"
ALIGN_PROMPTS: tuple[str, ...] = (
    "Describe the image briefly.",
    "What is in the image?",
    "Give a short description of the image.",
    "Write a caption for the image.",
)
# Kinds of alignment image, in proportion (grid scenes twice: they carry most of the words).
_ALIGN_KINDS = ("single", "grid", "grid", "photo", "text", "digit")
# load_digits has >= 86 scans per label in each half and the demo uses ordinals < DIGIT_ORDINALS,
# so ordinals DIGIT_ORDINALS..85 of either half are never shown by the pool or the benchmarks.
_ALIGN_DIGIT_ORDINALS = range(DIGIT_ORDINALS, 86)


def _describe_text(spec: _TextImage) -> str:
    return f"The image shows the text {spec.text}."


def _describe_digit(spec: _DigitImage) -> str:
    return f"The image shows the digit {spec.label}."


def _align_item(kind: str, rng: random.Random, seed_rng: random.Random) -> tuple[_ImageSpec, str]:
    """One (image recipe, caption) pair of the given kind."""
    if kind == "single":
        scene = _single_shape(rng, seed_rng)
        return scene, _describe_scene(scene)
    if kind == "grid":
        scene = _grid_scene(rng, _random_items(rng, rng.randint(1, 6)), seed_rng)
        return scene, _describe_scene(scene)
    if kind == "photo":
        crop = _photo_crop(rng)
        return crop, _describe_photo(crop)
    ink, paper = _contrasting_pair(rng)
    if kind == "digit":
        digit = _DigitImage(rng.randrange(10), rng.choice(_ALIGN_DIGIT_ORDINALS), rng.random() < 0.5, ink, paper)
        return digit, _describe_digit(digit)
    text = rng.choice(WORDS) if rng.random() < 0.5 else str(rng.randint(10, 999))
    spec = _jittered_text(rng, text, ink, paper)
    return spec, _describe_text(spec)


def _align_drafts(n: int, seed: int) -> list[_Draft]:
    rng = _rng(seed, "align", "items")
    seed_rng = _rng(seed, "align", "pixels")
    kinds = _balanced(_ALIGN_KINDS, n, rng)
    positions = _balanced(("start", "end"), n, rng)
    drafts = []
    for i, (kind, pos) in enumerate(zip(kinds, positions, strict=True)):
        spec, caption = _align_item(kind, rng, seed_rng)
        record = {
            "id": f"align-{i:06d}",
            "image": f"align/{i:06d}.png",
            "conversations": [
                {"from": "human", "value": _human(rng.choice(ALIGN_PROMPTS), pos)},
                {"from": "gpt", "value": caption},
            ],
            "family": "alignment",
            "kind": "scene" if kind in ("single", "grid") else kind,
        }
        drafts.append(_Draft(record, spec))
    return drafts


def _demo_image_hashes(seed: int) -> set[bytes]:
    """Pixel hashes of every image the demo writes for ``seed`` (all DEMO_SIZES), as written."""
    hashes: set[bytes] = set()
    for size in DEMO_SIZES.values():
        n = size.image_size
        pool_hashes = {hashlib.sha256(_render(d.image, n).tobytes()).digest() for d in _pool_drafts(size, seed) if d.image is not None}
        hashes |= pool_hashes
        for splits in _benchmark_drafts(size, seed).values():
            for split in SPLITS:
                for d in splits[split]:  # the same nudging as _write_all
                    img = _render(d.image, n)
                    attempt = 0
                    while hashlib.sha256(img.tobytes()).digest() in pool_hashes:
                        img = _nudge(img, _stream_seed(seed, d.record["id"], attempt))
                        attempt += 1
                    hashes.add(hashlib.sha256(img.tobytes()).digest())
    return hashes


def _align_manifest(n: int, seed: int, image_size: int, demo_seed: int) -> dict[str, Any]:
    return {"format": ALIGN_FORMAT_VERSION, "n": n, "seed": seed, "image_size": image_size, "demo_seed": demo_seed}


def _write_alignment(tmp: Path, n: int, seed: int, image_size: int, demo_seed: int) -> None:
    taken = _demo_image_hashes(demo_seed)
    drafts = _align_drafts(n, seed)
    for d in drafts:
        img = _render(d.image, image_size)
        attempt = 0
        while hashlib.sha256(img.tobytes()).digest() in taken:  # a demo image, or an earlier caption's
            img = _nudge(img, _stream_seed(seed, "align", d.record["id"], attempt))
            attempt += 1
        taken.add(hashlib.sha256(img.tobytes()).digest())
        path = tmp / "images" / d.record["image"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(_png_bytes(img))
    _dump_json(tmp / ALIGN_FILE, [_final(d) for d in drafts])


def generate_alignment_data(
    out_dir: str | Path, n: int, seed: int = 1000, *, image_size: int = 32, demo_seed: int = 0
) -> Path:
    """Write ``n`` caption records for stage-1 pre-training; return the folder holding them.

    Why separate data: the tiny model must learn to connect images to text before LoRA
    instruction tuning (LLaVA's stage 1), and that must not see the pool or the benchmarks.
    Images come from the pool's renderers and captions from its describers, on "align"
    random streams; no image repeats one the demo writes for ``demo_seed`` (any DEMO_SIZES)
    or an earlier caption's. The folder holds ``align.json`` and ``images/`` (load it with
    ``load_records(folder / "align.json", folder / "images")``). Byte-identical for equal
    arguments, idempotent (``DONE`` + matching ``manifest.json``) and built in a temporary
    folder swapped in with ``os.replace``, like :func:`generate_demo`.
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    if not isinstance(image_size, int) or image_size < 8:
        raise ValueError(f"image_size must be an int >= 8, got {image_size!r}")
    out = Path(out_dir)
    manifest = _align_manifest(n, seed, image_size, demo_seed)
    if not _is_complete(out, manifest, ALIGN_MANIFEST):
        _build_folder(out, manifest, ALIGN_MANIFEST, lambda tmp: _write_alignment(tmp, n, seed, image_size, demo_seed))
    return out
