"""The LLaVA-665K-shaped world (``--size mix``): a redundant, noisy pool with off-target data.

Why: every other demo world is the regime least favourable to a selector (six disjoint
task families, one per benchmark, nothing redundant or off-target). This world mirrors
LLaVA-1.5's instruction mix instead, as pre-registered in docs/preregistration-mix.md:
twelve sources in LLaVA's proportions, several questions per image, templates reused
across images, 10% wrong answers in every image source, a fifth of the pool answered with
box coordinates that no benchmark asks for, text-only chat, and ten benchmarks that share
skills the way the paper's ten do (one, ``vizwiz_b``, on images no pool source has).

Every pool record carries ``source`` and ``fact`` (the image its question is about: records
that share it are redundant), and ``wrong: true`` where its answer is deliberately wrong;
the tool ignores them when it selects, the evaluation reports subsets by them. A caption
set of the same visual world (``generate_mix_captions``) feeds the base-model alignment;
it shares no image with the pool or the benchmarks.

Images come from the demo's renderers (``demo/data.py``) plus two-line "covers" and
blurred digit scans drawn here. Same arguments give byte-identical files.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageFilter

from icons_dagster.demo import data as demo
from icons_dagster.demo.data import (
    COLOR_NAMES,
    COUNT_SUFFIX,
    LETTER,
    MC_SUFFIX,
    NUMBER_WORDS,
    OCR_SUFFIX,
    PHOTO_NAMES,
    PHOTOS,
    SHAPES,
    VQA_SUFFIX,
    WORDS,
    DemoPaths,
    _Draft,
    _ShapeScene,
    _balanced,
    _contrasting_pair,
    _describe_photo,
    _describe_scene,
    _human,
    _jittered_text,
    _other,
    _photo_crop,
    _random_items,
    _rng,
    _stream_seed,
)

__all__ = [
    "MIX_BENCHMARKS",
    "MIX_SOURCES",
    "OFF_TARGET_SOURCES",
    "MixSize",
    "generate_mix",
    "generate_mix_captions",
    "generate_mix_texts",
    "mix_corpus",
]

MIX_FORMAT_VERSION = 1
MANIFEST = "mix.json"
CAPTIONS_FILE = "captions.json"
CAPTIONS_MANIFEST = "manifest.json"
YES_NO_SUFFIX = "Please answer yes or no."

#: Pool sources and their shares of the pool (LLaVA-1.5's mix, rounded; the pre-registration's table).
MIX_SOURCES: dict[str, float] = {
    "conv": 0.08,
    "detail": 0.08,
    "reason": 0.08,
    "vqa_scene": 0.10,
    "gqa_tmpl": 0.08,
    "photo_vqa": 0.07,
    "ocr_word": 0.08,
    "ocr_title": 0.07,
    "mc": 0.10,
    "ref_box": 0.12,
    "vg_region": 0.08,
    "text_chat": 0.06,
}
#: Sources no benchmark asks for: box coordinates (RefCOCO, Visual Genome) and text-only chat.
OFF_TARGET_SOURCES = ("ref_box", "vg_region", "text_chat")
#: Questions per image of the redundant sources (VQAv2 asks several per image, GQA repeats templates).
QUESTIONS_PER_IMAGE = {"vqa_scene": 4, "gqa_tmpl": 3, "mc": 2, "photo_vqa": 2}
#: The ten benchmarks, the answer format each declares (``benchmark.json``) and what it mirrors.
MIX_BENCHMARKS: dict[str, str] = {
    "vqa_scene_b": "short_answer",  # VQAv2
    "gqa_b": "short_answer",  # GQA
    "vizwiz_b": "short_answer",  # VizWiz: blurred, noisy digit scans no pool source has
    "textvqa_b": "short_answer",  # TextVQA
    "pope_b": "yes_no",  # POPE
    "mme_b": "yes_no",  # MME, subtasks colour / count / position / OCR
    "sqa_b": "multiple_choice",  # SQA-I
    "mmbench_b": "multiple_choice",  # MMBench, subtasks
    "llava_w_b": "long_answer",  # LLaVA-W
    "mmvet_b": "long_answer",  # MM-Vet: OCR and reasoning, long answers
}
AUTHORS = ("ANN", "BOB", "EVA", "LEO", "MIA", "SAM", "TOM", "ZOE", "IDA", "MAX")
DETAIL_PROMPTS = (
    "Describe this image in detail.",
    "What do you see in this picture? Describe it thoroughly.",
    "Give a detailed description of the image.",
)
_CORNERS = {"circle": 0, "triangle": 3, "square": 4, "diamond": 4}


@dataclass(frozen=True)
class MixSize:
    """How many records the world holds; one object so a world is reproducible by name."""

    pool: int = 3000
    val_per_benchmark: int = 16
    test_per_benchmark: int = 200
    wrong_fraction: float = 0.10  # of each image source's records
    image_size: int = 32

    def __post_init__(self) -> None:
        for name in ("pool", "val_per_benchmark", "test_per_benchmark"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"MixSize.{name} must be a positive int, got {value!r}")
        if not 0.0 <= self.wrong_fraction < 1.0:
            raise ValueError(f"MixSize.wrong_fraction must be in [0, 1), got {self.wrong_fraction!r}")

    def source_counts(self) -> dict[str, int]:
        """Records per source: the shares of ``pool``, rounded to whole images, summing to ``pool``."""
        counts = {}
        for source, share in MIX_SOURCES.items():
            per_image = QUESTIONS_PER_IMAGE.get(source, 1)
            counts[source] = max(per_image, round(share * self.pool / per_image) * per_image)
        counts["ref_box"] += self.pool - sum(counts.values())  # rounding goes to a one-per-image source
        return counts


MIX_SIZES = {"mix": MixSize(), "mix-test": MixSize(pool=240, val_per_benchmark=4, test_per_benchmark=8)}


# --------------------------------------------------------------------------- new image kinds


@dataclass(frozen=True)
class _Cover:
    """A book cover: a title line over an author line (OCR-VQA)."""

    title: str
    author: str
    ink: tuple[int, int, int]
    paper: tuple[int, int, int]


@dataclass(frozen=True)
class _BlurredDigit:
    """A digit scan under blur and noise (VizWiz: photos taken by people who cannot see them)."""

    digit: demo._DigitImage
    blur: float
    noise_seed: int


def _render(spec: Any, n: int) -> Image.Image:
    if isinstance(spec, _Cover):
        top = demo._draw_text(demo._TextImage(spec.title, spec.ink, spec.paper, 0.0, 0.0, 0.8), n)
        bottom = demo._draw_text(demo._TextImage(spec.author, spec.ink, spec.paper, 0.0, 0.0, 0.5), n)
        out = Image.new("RGB", (n, n), spec.paper)
        out.paste(top.resize((n, n // 2), Image.Resampling.BOX), (0, 0))
        out.paste(bottom.resize((n, n - n // 2), Image.Resampling.BOX), (0, n // 2))
        return out
    if isinstance(spec, _BlurredDigit):
        img = demo._draw_digit(spec.digit, n).filter(ImageFilter.GaussianBlur(spec.blur))
        arr = np.asarray(img, dtype=np.float32) + np.random.default_rng(spec.noise_seed).normal(0.0, 30.0, (n, n, 1))
        return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
    return demo._render(spec, n)


def _folder(spec: Any) -> str:
    return {_Cover: "covers", _BlurredDigit: "blurred"}.get(type(spec)) or demo._FOLDER[type(spec)]


# --------------------------------------------------------------------------- scene facts


def _box(s: demo._Shape) -> list[float]:
    return [round(max(0.0, s.cx - s.r), 2), round(max(0.0, s.cy - s.r), 2), round(min(1.0, s.cx + s.r), 2), round(min(1.0, s.cy + s.r), 2)]


def _box_text(box: list[float]) -> str:
    return "[" + ", ".join(f"{v:.2f}" for v in box) + "]"


def _shifted(rng: random.Random, box: list[float]) -> list[float]:
    """The box moved off its object by 0.25-0.4 of the image (a wrong grounding answer)."""
    dx = rng.choice((-1, 1)) * rng.uniform(0.25, 0.4)
    dy = rng.choice((-1, 1)) * rng.uniform(0.25, 0.4)
    w, h = box[2] - box[0], box[3] - box[1]
    x0 = min(max(0.0, box[0] + dx), 1.0 - w)
    y0 = min(max(0.0, box[1] + dy), 1.0 - h)
    return [round(x0, 2), round(y0, 2), round(x0 + w, 2), round(y0 + h, 2)]


def _scene(rng: random.Random, seed_rng: random.Random, low: int, high: int) -> _ShapeScene:
    return demo._grid_scene(rng, _random_items(rng, rng.randint(low, high)), seed_rng)


def _unique(values: list[str]) -> list[str]:
    return sorted(v for v in set(values) if values.count(v) == 1)


def _recoloured(rng: random.Random, scene: _ShapeScene) -> _ShapeScene:
    """The same layout with every colour changed: what a wrong description describes."""
    return replace(scene, shapes=tuple(replace(s, color=_other(rng, COLOR_NAMES, s.color)) for s in scene.shapes))


def _neighbour(scene: _ShapeScene, s: demo._Shape, direction: str) -> demo._Shape | None:
    row, col = divmod(s.cell, demo.GRID)
    target = {"left": (row, col - 1), "right": (row, col + 1), "above": (row - 1, col), "below": (row + 1, col)}[direction]
    return next((t for t in scene.shapes if divmod(t.cell, demo.GRID) == target), None)


# Each question maker returns (question, answer, wrong answer) about one scene.


def _q_exists(rng: random.Random, scene: _ShapeScene, suffix: str = VQA_SUFFIX) -> tuple[str, str, str]:
    present = sorted({(s.color, s.kind) for s in scene.shapes})
    if rng.random() < 0.5:
        color, kind = rng.choice(present)
        return f"Is there a {color} {kind} in the image?\n{suffix}", "Yes", "No"
    color, kind = rng.choice(sorted({(c, k) for c in COLOR_NAMES for k in SHAPES} - set(present)))
    return f"Is there a {color} {kind} in the image?\n{suffix}", "No", "Yes"


def _named_by(rng: random.Random, scene: _ShapeScene, attribute: str) -> demo._Shape | None:
    """A random shape whose ``attribute`` ("kind" or "color") no other shape of the scene shares:
    a question naming it by that attribute has one answer. None when no shape has one."""
    values = [getattr(s, attribute) for s in scene.shapes]
    if not (unique := _unique(values)):
        return None
    return scene.shapes[values.index(rng.choice(unique))]


def _q_color(rng: random.Random, scene: _ShapeScene) -> tuple[str, str, str] | None:
    if (s := _named_by(rng, scene, "kind")) is None:
        return None
    return f"What color is the {s.kind}?\n{VQA_SUFFIX}", s.color, _other(rng, COLOR_NAMES, s.color)


def _q_shape(rng: random.Random, scene: _ShapeScene) -> tuple[str, str, str] | None:
    if (s := _named_by(rng, scene, "color")) is None:
        return None
    return f"What shape is the {s.color} object?\n{VQA_SUFFIX}", s.kind, _other(rng, SHAPES, s.kind)


def _q_count(rng: random.Random, scene: _ShapeScene) -> tuple[str, str, str]:
    n = len(scene.shapes)
    return f"How many shapes are there in the image?\n{COUNT_SUFFIX}", NUMBER_WORDS[n], NUMBER_WORDS[_other(rng, range(1, 6), n)]


def _q_relation(rng: random.Random, scene: _ShapeScene) -> tuple[str, str, str] | None:
    """GQA's templates: what is next to what, in which direction."""
    pairs = [(s, d, t) for s in scene.shapes for d in ("left", "right", "above", "below") if (t := _neighbour(scene, s, d))]
    if not pairs:
        return None
    s, direction, t = rng.choice(pairs)
    where = {"left": "to the left of", "right": "to the right of", "above": "above", "below": "below"}[direction]
    if rng.random() < 0.5:
        return f"What shape is {where} the {s.color} {s.kind}?\n{VQA_SUFFIX}", t.kind, _other(rng, SHAPES, t.kind)
    return f"What color is the shape {where} the {s.color} {s.kind}?\n{VQA_SUFFIX}", t.color, _other(rng, COLOR_NAMES, t.color)


def _q_mc(rng: random.Random, scene: _ShapeScene, lead_kind: str, letter: str | None = None) -> tuple[str, str, str] | None:
    """A four-option question with the correct option at ``letter`` (default: a random one)."""
    letter = letter or rng.choice(LETTER)
    single = len(scene.shapes) == 1
    if lead_kind == "color":
        if (s := _named_by(rng, scene, "kind")) is None:
            return None
        return demo._mc_question(rng, "color", s.color, letter, "What color is the shape?" if single else f"What color is the {s.kind}?")
    if lead_kind == "shape":
        if (s := _named_by(rng, scene, "color")) is None:
            return None
        return demo._mc_question(rng, "shape", s.kind, letter, "Which shape is shown in the image?" if single else f"Which shape is {s.color}?")
    n = len(scene.shapes)
    options = [NUMBER_WORDS[n], *rng.sample([NUMBER_WORDS[k] for k in range(1, 7) if k != n], 3)]
    return _options("How many shapes are there in the image?", options, letter, rng)


def _options(lead: str, options: list[str], letter: str, rng: random.Random) -> tuple[str, str, str]:
    """``options[0]`` is correct; it is placed at ``letter``, the others keep their order."""
    correct, others = options[0], options[1:]
    pos = LETTER.index(letter)
    ordered = others[:pos] + [correct] + others[pos:]
    lines = [lead] + [f"{LETTER[i]}. {o}" for i, o in enumerate(ordered)] + [MC_SUFFIX]
    return "\n".join(lines), letter, _other(rng, LETTER, letter)


def _reasoning(rng: random.Random, scene: _ShapeScene) -> tuple[str, str]:
    """A "what would happen" / "why" question with a long answer that follows from the scene."""
    shapes = scene.shapes
    kind = rng.choice(("remove", "corners", "colourful"))
    if kind == "remove" and len(shapes) > 1:
        gone = rng.choice(shapes)
        left = [s for s in shapes if s is not gone]
        parts = " and ".join(f"a {s.color} {s.kind} in the {demo.CELL_NAMES[s.cell]}" for s in left)
        n = len(left)
        return (
            f"What would happen if the {gone.color} {gone.kind} were removed from the picture?",
            f"If the {gone.color} {gone.kind} were removed, {NUMBER_WORDS[n]} {demo._plural('shape', n)} would remain: {parts}. "
            f"The {demo.CELL_NAMES[gone.cell]} of the picture would be empty.",
        )
    if kind == "corners":
        best = max(shapes, key=lambda s: (_CORNERS[s.kind], -s.cell))
        total = sum(_CORNERS[s.kind] for s in shapes)
        return (
            "Which shape in the image has the most corners, and why?",
            f"The {best.color} {best.kind} has the most corners, because a {best.kind} has {NUMBER_WORDS[_CORNERS[best.kind]]} corners. "
            f"Together the shapes in the picture have {total} corners.",
        )
    colours = sorted({s.color for s in shapes})
    verdict = "colourful" if len(colours) > 1 else "plain"
    return (
        "Why might someone call this picture colourful or plain?",
        f"Someone might call it {verdict}, because it shows {NUMBER_WORDS[len(colours)]} {demo._plural('colour', len(colours))}: "
        f"{', '.join(colours)}. There {'is' if len(shapes) == 1 else 'are'} {NUMBER_WORDS[len(shapes)]} {demo._plural('shape', len(shapes))} in all.",
    )


# --------------------------------------------------------------------------- pool sources
# Each source builds a list of (image_key, spec, conversations, wrong) for its share of the pool.


def _turns(qas: list[tuple[str, str]], pos: str | None) -> list[dict[str, str]]:
    out = []
    for i, (q, a) in enumerate(qas):
        out.append({"from": "human", "value": _human(q, pos if i == 0 else None)})
        out.append({"from": "gpt", "value": a})
    return out


def _per_image(rng: random.Random, seed_rng: random.Random, n: int, per: int, make_image, makers) -> list[tuple]:
    """``per`` single-question records per image; makers that do not apply to a scene are skipped."""
    out = []
    while len(out) < n:
        spec = make_image()
        chosen: list[tuple[str, str, str]] = []
        for make in rng.sample(makers, len(makers)):
            if len(chosen) == per:
                break
            if (qa := make(spec)) is not None and qa[0] not in {c[0] for c in chosen}:
                chosen.append(qa)
        if len(chosen) < per:
            continue  # a scene that cannot carry ``per`` distinct questions: draw another
        out.extend((spec, [qa]) for qa in chosen)
    return out[:n]


def _source_items(source: str, n: int, rng: random.Random, seed_rng: random.Random) -> list[tuple]:
    """(spec, [(question, answer, wrong), ...]) items of one source; an item with one image per ``fact``."""
    if source == "vqa_scene":
        makers = [lambda s: _q_exists(rng, s), lambda s: _q_color(rng, s), lambda s: _q_shape(rng, s), lambda s: _q_count(rng, s), lambda s: _q_exists(rng, s)]
        return _per_image(rng, seed_rng, n, 4, lambda: _scene(rng, seed_rng, 1, 4), makers)
    if source == "gqa_tmpl":
        makers = [lambda s: _q_relation(rng, s)] * 3
        return _per_image(rng, seed_rng, n, 3, lambda: _scene(rng, seed_rng, 3, 5), makers)
    if source == "mc":
        makers = [lambda s: _q_mc(rng, s, "color"), lambda s: _q_mc(rng, s, "shape"), lambda s: _q_mc(rng, s, "count")]
        return _per_image(rng, seed_rng, n, 2, lambda: _scene(rng, seed_rng, 1, 3), makers)
    if source == "photo_vqa":
        def subject(c):
            answer = PHOTOS[c.photo]["answer"]
            return f"What is shown in this photo?\n{VQA_SUFFIX}", answer, _other(rng, [p["answer"] for p in PHOTOS.values()], answer)

        def colour(c):
            answer = "No" if PHOTOS[c.photo]["color"] else "Yes"
            return f"Is this photo in black and white?\n{VQA_SUFFIX}", answer, "Yes" if answer == "No" else "No"

        return _per_image(rng, seed_rng, n, 2, lambda: _photo_crop(rng), [subject, colour])
    items = []
    for _ in range(n):
        if source == "conv":
            scene = _scene(rng, seed_rng, 2, 4)
            makers = [lambda: _q_exists(rng, scene), lambda: _q_color(rng, scene), lambda: _q_shape(rng, scene),
                      lambda: _q_count(rng, scene), lambda: _q_relation(rng, scene)]  # fmt: skip
            qas = [qa for make in rng.sample(makers, len(makers)) if (qa := make()) is not None][: rng.randint(2, 4)]
            items.append((scene, qas))
        elif source == "detail":
            if rng.random() < 0.5:
                crop = _photo_crop(rng)
                wrong = _describe_photo(replace(crop, photo=_other(rng, PHOTO_NAMES, crop.photo)))
                items.append((crop, [(rng.choice(DETAIL_PROMPTS), _describe_photo(crop), wrong)]))
            else:
                scene = _scene(rng, seed_rng, 1, 4)
                items.append((scene, [(rng.choice(DETAIL_PROMPTS), _describe_scene(scene), _describe_scene(_recoloured(rng, scene)))]))
        elif source == "reason":
            scene = _scene(rng, seed_rng, 2, 4)
            recoloured = _recoloured(random.Random(rng.getrandbits(64)), scene)
            state = rng.getstate()
            q, a = _reasoning(rng, scene)
            rng.setstate(state)  # the wrong answer: the same kind of question about the recoloured scene
            _, wrong = _reasoning(rng, recoloured)
            items.append((scene, [(q, a, wrong)]))
        elif source == "ocr_word":
            ink, paper = _contrasting_pair(rng)
            word = rng.choice(WORDS) if rng.random() < 0.6 else str(rng.randint(10, 99))
            wrong = _other(rng, WORDS, word) if word in WORDS else str((int(word) + rng.randint(1, 80)) % 90 + 10)
            items.append((_jittered_text(rng, word, ink, paper), [(f"What word is written in the image?\n{OCR_SUFFIX}", word, wrong)]))
        elif source == "ocr_title":
            ink, paper = _contrasting_pair(rng)
            cover = _Cover(rng.choice(WORDS), rng.choice(AUTHORS), ink, paper)
            if rng.random() < 0.5:
                qa = (f"What is the title of this book?\n{VQA_SUFFIX}", cover.title, _other(rng, WORDS, cover.title))
            else:
                qa = (f"Who wrote this book?\n{VQA_SUFFIX}", cover.author, _other(rng, AUTHORS, cover.author))
            items.append((cover, [qa]))
        elif source == "ref_box":
            scene = _scene(rng, seed_rng, 2, 5)
            target = rng.choice([s for s in scene.shapes if [(t.color, t.kind) for t in scene.shapes].count((s.color, s.kind)) == 1] or list(scene.shapes))
            box = _box(target)
            q = f"Please provide the bounding box coordinate of the region this sentence describes: the {target.color} {target.kind}."
            items.append((scene, [(q, _box_text(box), _box_text(_shifted(rng, box)))]))
        elif source == "vg_region":
            scene = _scene(rng, seed_rng, 2, 5)
            target = rng.choice(scene.shapes)
            box = _box(target)
            if rng.random() < 0.5:
                q = f"Please provide a short description for this region: {_box_text(box)}."
                wrong = f"A {_other(rng, COLOR_NAMES, target.color)} {target.kind}."
                items.append((scene, [(q, f"A {target.color} {target.kind}.", wrong)]))
            else:
                q = f"Please provide the bounding box coordinate of the region this sentence describes: a {target.kind} in the {demo.CELL_NAMES[target.cell]}."
                items.append((scene, [(q, _box_text(box), _box_text(_shifted(rng, box)))]))
        elif source == "text_chat":
            q, a = demo._gen_text_only(rng)
            items.append((None, [(q, a, a)]))
        else:
            raise ValueError(f"unknown mix source {source!r}")
    return items


def _pool_drafts(size: MixSize, seed: int) -> list[_Draft]:
    drafts: list[_Draft] = []
    for source, n in size.source_counts().items():
        rng = _rng(seed, "mix", "pool", source)
        seed_rng = _rng(seed, "mix", "pool", source, "pixels")
        items = _source_items(source, n, rng, seed_rng)
        noise_rng = _rng(seed, "mix", "pool", source, "wrong")
        wrong = set(noise_rng.sample(range(n), round(size.wrong_fraction * n))) if source != "text_chat" else set()
        positions = _balanced(("start", "end"), n, rng)
        image_index: dict[int, int] = {}
        for i, ((spec, qas), pos) in enumerate(zip(items, positions, strict=True)):
            fact = image_index.setdefault(id(spec) if spec is not None else -i - 1, len(image_index))
            if i in wrong:  # one answer of the record is wrong (a multi-turn record: a random turn)
                k = noise_rng.randrange(len(qas))
                pairs = [(q, w if j == k else a) for j, (q, a, w) in enumerate(qas)]
            else:
                pairs = [(q, a) for q, a, _w in qas]
            record: dict[str, Any] = {
                "id": f"{source}-{i:05d}",
                "conversations": _turns(pairs, pos if spec is not None else None),
                "source": source,
                "fact": f"{source}-{fact:05d}",
            }
            if i in wrong:
                record["wrong"] = True
            drafts.append(_Draft(record, spec))
    _name_images(drafts, prefix="")
    _rng(seed, "mix", "pool", "order").shuffle(drafts)
    return drafts


def _name_images(drafts: list[_Draft], prefix: str) -> None:
    """One file per image spec (records about the same image share it), named per folder in order."""
    names: dict[int, str] = {}
    counters: dict[str, int] = {}
    for d in drafts:
        if d.image is None:
            continue
        if id(d.image) not in names:
            folder = _folder(d.image)
            counters[folder] = counters.get(folder, 0) + 1
            names[id(d.image)] = f"{prefix}{folder}/{counters[folder] - 1:06d}.png"
        d.record = demo._with_image(d.record, names[id(d.image)])


# --------------------------------------------------------------------------- benchmarks


def _bench_item(name: str, i: int, rng: random.Random, seed_rng: random.Random) -> tuple[Any, str, str, str | None]:
    """(spec, question, answer, subtask) of one benchmark record."""
    if name == "vqa_scene_b":
        scene = _scene(rng, seed_rng, 1, 4)
        makers = [lambda: _q_color(rng, scene), lambda: _q_shape(rng, scene), lambda: _q_count(rng, scene)]
        q, a, _ = next(qa for make in rng.sample(makers, 3) if (qa := make()) is not None)
        return scene, q, a, None
    if name == "gqa_b":
        while (qa := _q_relation(rng, scene := _scene(rng, seed_rng, 3, 5))) is None:
            pass
        return scene, qa[0], qa[1], None
    if name == "vizwiz_b":
        ink, paper = _contrasting_pair(rng)
        digit = demo._DigitImage(i % 10, rng.randrange(demo.DIGIT_ORDINALS), True, ink, paper)
        spec = _BlurredDigit(digit, round(rng.uniform(0.6, 1.2), 3), seed_rng.getrandbits(63))
        return spec, f"What number is written here?\n{VQA_SUFFIX}", str(digit.label), None
    if name == "textvqa_b":
        ink, paper = _contrasting_pair(rng)
        word = WORDS[i % len(WORDS)]
        return _jittered_text(rng, word, ink, paper), f"What does the text in the image say?\n{VQA_SUFFIX}", word, None
    if name == "pope_b":
        scene = _scene(rng, seed_rng, 1, 3)
        positive = i % 2 == 0
        present = sorted({(s.color, s.kind) for s in scene.shapes})
        if positive:
            color, kind = rng.choice(present)
        else:
            color, kind = rng.choice(sorted({(c, k) for c in COLOR_NAMES for k in SHAPES} - set(present)))
        return scene, f"Is there a {color} {kind} in the image?\n{VQA_SUFFIX}", "Yes" if positive else "No", None
    if name == "mme_b":
        subtask = ("color", "count", "position", "ocr")[i % 4]
        yes = (i // 4) % 2 == 0
        if subtask == "ocr":
            ink, paper = _contrasting_pair(rng)
            word = rng.choice(WORDS)
            asked = word if yes else _other(rng, WORDS, word)
            return _jittered_text(rng, word, ink, paper), f"Does the image show the word {asked}?\n{YES_NO_SUFFIX}", "Yes" if yes else "No", subtask
        scene = _scene(rng, seed_rng, 1, 4) if subtask != "color" else demo._grid_scene(rng, _random_items(rng, 1), seed_rng)
        if subtask == "color":
            s = scene.shapes[0]
            asked = s.color if yes else _other(rng, COLOR_NAMES, s.color)
            return scene, f"Is the {s.kind} {asked}?\n{YES_NO_SUFFIX}", "Yes" if yes else "No", subtask
        if subtask == "count":
            n = len(scene.shapes)
            asked = n if yes else _other(rng, range(1, 6), n)
            return scene, f"Are there {NUMBER_WORDS[asked]} shapes in the image?\n{YES_NO_SUFFIX}", "Yes" if yes else "No", subtask
        s = rng.choice(scene.shapes)
        cell = s.cell if yes else _other(rng, range(demo.GRID * demo.GRID), s.cell)
        return scene, f"Is the {s.color} {s.kind} in the {demo.CELL_NAMES[cell]} of the image?\n{YES_NO_SUFFIX}", "Yes" if yes else "No", subtask
    if name == "sqa_b":
        letter = LETTER[(i // 2) % 4]
        scene = _scene(rng, seed_rng, 2, 4)
        if i % 2 == 0:
            corners = lambda sc: sorted((_CORNERS[s.kind] for s in sc.shapes), reverse=True)  # noqa: E731
            while len(c := corners(scene)) > 1 and c[0] == c[1]:  # the most corners must be one shape's
                scene = _scene(rng, seed_rng, 2, 4)
            best = max(scene.shapes, key=lambda s: _CORNERS[s.kind])
            others = [f"the {s.color} {s.kind}" for s in scene.shapes if s is not best]
            fillers = [f"the {c} {k}" for c in COLOR_NAMES for k in SHAPES if f"the {c} {k}" not in others and (c, k) != (best.color, best.kind)]
            options = [f"the {best.color} {best.kind}", *(others + rng.sample(fillers, 3))[:3]]
            q, a, _ = _options("Context: a triangle has three corners, a square and a diamond four, a circle none.\n"
                               "Question: Which shape in the image has the most corners?", options, letter, rng)  # fmt: skip
            return scene, q, a, "corners"
        gone = rng.choice(scene.shapes)
        n = len(scene.shapes) - 1
        options = [NUMBER_WORDS[n], *rng.sample([NUMBER_WORDS[k] for k in range(0, 6) if k != n], 3)]
        q, a, _ = _options(f"Question: How many shapes would be left if the {gone.color} {gone.kind} were removed?", options, letter, rng)
        return scene, q, a, "removal"
    if name == "mmbench_b":
        subtask = ("color", "shape", "count", "photo")[i % 4]
        letter = LETTER[(i // 4) % 4]
        if subtask == "photo":
            crop = _photo_crop(rng)
            answer = PHOTOS[crop.photo]["answer"]
            options = [answer, *rng.sample([p["answer"] for p in PHOTOS.values() if p["answer"] != answer], 3)]
            q, a, _ = _options("What is shown in this photo?", options, letter, rng)
            return crop, q, a, subtask
        while (qa := _q_mc(rng, scene := _scene(rng, seed_rng, 1, 3), subtask, letter)) is None:
            pass
        return scene, qa[0], qa[1], subtask
    if name == "llava_w_b":
        if i % 3 == 0:
            crop = _photo_crop(rng)
            return crop, rng.choice(DETAIL_PROMPTS), _describe_photo(crop), "detail"
        scene = _scene(rng, seed_rng, 2, 4)
        if i % 3 == 1:
            return scene, rng.choice(DETAIL_PROMPTS), _describe_scene(scene), "detail"
        q, a = _reasoning(rng, scene)
        return scene, q, a, "reasoning"
    if name == "mmvet_b":
        if i % 2 == 0:
            ink, paper = _contrasting_pair(rng)
            word = rng.choice(WORDS)
            tone = "dark text on a light background" if sum(ink) < sum(paper) else "light text on a dark background"
            return (
                _jittered_text(rng, word, ink, paper),
                "What is written in the image, and how is it printed? Answer in full sentences.",
                f"The image shows the word {word}. It is printed as {tone}.",
                "ocr",
            )
        scene = _scene(rng, seed_rng, 2, 4)
        q, a = _reasoning(rng, scene)
        return scene, q, a, "reasoning"
    raise ValueError(f"unknown mix benchmark {name!r}")


def _benchmark_drafts(size: MixSize, seed: int) -> dict[str, dict[str, list[_Draft]]]:
    out: dict[str, dict[str, list[_Draft]]] = {}
    for name in MIX_BENCHMARKS:
        out[name] = {}
        for split in demo.SPLITS:
            n = size.val_per_benchmark if split == "val" else size.test_per_benchmark
            rng = _rng(seed, "mix", "bench", name, split)
            seed_rng = _rng(seed, "mix", "bench", name, split, "pixels")
            positions = _balanced(("start", "end"), n, rng)
            drafts = []
            for i, pos in enumerate(positions):
                spec, q, a, subtask = _bench_item(name, i, rng, seed_rng)
                record = {
                    "id": f"bench-{name}-{split}-{i:04d}",
                    "image": f"{split}/{i:04d}.png",
                    "conversations": _turns([(q, a)], pos),
                }
                drafts.append(_Draft(record, spec, {"subtask": subtask} if subtask else {}))
            out[name][split] = drafts
    return out


# --------------------------------------------------------------------------- writing


def _resolve(size: str | MixSize) -> MixSize:
    if isinstance(size, MixSize):
        return size
    try:
        return MIX_SIZES[size]
    except KeyError:
        raise ValueError(f"unknown mix size {size!r}; choose one of {sorted(MIX_SIZES)} or pass a MixSize") from None


def _sha(img: Image.Image) -> bytes:
    return hashlib.sha256(img.tobytes()).digest()


def _distinct(img: Image.Image, taken: set[bytes], seed: int, *keys: object) -> Image.Image:
    """``img``, nudged by a pixel until no earlier image of the world has the same pixels."""
    attempt = 0
    while _sha(img) in taken:
        img = demo._nudge(img, _stream_seed(seed, *keys, attempt))
        attempt += 1
    taken.add(_sha(img))
    return img


def _world_images(pool: list[_Draft], benchmarks: dict[str, dict[str, list[_Draft]]], size: MixSize, seed: int) -> Iterator[tuple[str, Image.Image]]:
    """(path under the world's folder, image) of every image ``generate_mix`` writes, once per
    file, each nudged until no earlier image of the world has its pixels."""
    taken: set[bytes] = set()
    written: set[str] = set()
    for d in sorted(pool, key=lambda d: d.record["id"]):
        if d.image is None or d.record["image"] in written:
            continue
        written.add(d.record["image"])
        yield f"images/{d.record['image']}", _distinct(_render(d.image, size.image_size), taken, seed, "mix", d.record["image"])
    for name, splits in benchmarks.items():
        for split in demo.SPLITS:
            for d in splits[split]:
                image = _distinct(_render(d.image, size.image_size), taken, seed, "mix", d.record["id"])
                yield f"benchmarks/{name}/images/{d.record['image']}", image


def _write_world(tmp: Path, size: MixSize, seed: int) -> None:
    pool, benchmarks = _pool_drafts(size, seed), _benchmark_drafts(size, seed)
    for relative, image in _world_images(pool, benchmarks, size, seed):
        path = tmp / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(demo._png_bytes(image))
    demo._dump_json(tmp / "pool.json", [demo._final(d) for d in pool])
    for name, splits in benchmarks.items():
        folder = tmp / "benchmarks" / name
        for split in demo.SPLITS:
            demo._dump_json(folder / f"{split}.json", [demo._final(d) for d in splits[split]])
        demo._dump_json(folder / "benchmark.json", {"answers": MIX_BENCHMARKS[name]})


def _manifest(size: MixSize, seed: int) -> dict[str, Any]:
    return {"format": MIX_FORMAT_VERSION, "seed": seed, "size": asdict(size)}


def generate_mix(out_dir: str | Path, size: str | MixSize = "mix", seed: int = 0) -> DemoPaths:
    """Write the mix world's pool and benchmarks under ``out_dir``; byte-identical for equal arguments.

    Idempotent and crash-safe like ``generate_demo`` (built in a temporary folder, ``DONE``
    written last, swapped in with ``os.replace``). No two images of the world, pool or
    benchmark, have the same pixels, except records that ask about the same image.
    """
    size = _resolve(size)
    paths = DemoPaths.for_root(out_dir)
    manifest = _manifest(size, seed)
    if not demo._is_complete(paths.root, manifest, MANIFEST):
        demo._build_folder(paths.root, manifest, MANIFEST, lambda tmp: _write_world(tmp, size, seed))
    return paths


def mix_corpus(size: str | MixSize = "mix", seed: int = 0, captions: int = 0) -> list[str]:
    """Every turn of the world (and of ``captions`` caption records), for tokenizer training."""
    size = _resolve(size)
    drafts = list(_pool_drafts(size, seed))
    for splits in _benchmark_drafts(size, seed).values():
        for split in demo.SPLITS:
            drafts.extend(splits[split])
    if captions:
        drafts.extend(_caption_drafts(captions, seed))
    return [demo._strip_image(turn["value"]) for d in drafts for turn in d.record["conversations"]]


# --------------------------------------------------------------------------- captions (stage 1)
# The base model's alignment data: captions of the same visual world (scenes with every
# shape's place, photo crops, words, covers and digits), on their own random streams.

CAPTION_PROMPTS = demo.ALIGN_PROMPTS
_CAPTION_KINDS = ("single", "grid", "grid", "grid", "photo", "text", "cover", "digit")


def _caption_item(kind: str, rng: random.Random, seed_rng: random.Random) -> tuple[Any, str]:
    if kind == "cover":
        ink, paper = _contrasting_pair(rng)
        cover = _Cover(rng.choice(WORDS), rng.choice(AUTHORS), ink, paper)
        return cover, f"The image shows a book cover with the title {cover.title} by {cover.author}."
    if kind == "digit" and rng.random() < 0.3:
        ink, paper = _contrasting_pair(rng)
        digit = demo._DigitImage(rng.randrange(10), rng.choice(demo._ALIGN_DIGIT_ORDINALS), False, ink, paper)
        return digit, demo._describe_digit(digit)
    return demo._align_item(kind, rng, seed_rng)


def _caption_drafts(n: int, seed: int) -> list[_Draft]:
    rng = _rng(seed, "mix", "captions")
    seed_rng = _rng(seed, "mix", "captions", "pixels")
    kinds = _balanced(_CAPTION_KINDS, n, rng)
    positions = _balanced(("start", "end"), n, rng)
    drafts = []
    for i, (kind, pos) in enumerate(zip(kinds, positions, strict=True)):
        spec, caption = _caption_item(kind, rng, seed_rng)
        record = {
            "id": f"caption-{i:06d}",
            "image": f"captions/{i:06d}.png",
            "conversations": _turns([(rng.choice(CAPTION_PROMPTS), caption)], pos),
        }
        drafts.append(_Draft(record, spec))
    return drafts


def _world_hashes(size: MixSize, seed: int) -> set[bytes]:
    """Pixel hashes of every image ``generate_mix`` writes."""
    return {_sha(image) for _, image in _world_images(_pool_drafts(size, seed), _benchmark_drafts(size, seed), size, seed)}


def generate_mix_captions(out_dir: str | Path, n: int, seed: int = 1000, *, world: str | MixSize = "mix", world_seed: int = 0) -> Path:
    """Write ``n`` caption records of the mix world's visual world; return the folder.

    The folder holds ``captions.json`` (LLaVA format) and ``images/``: the input of
    ``icons-dagster align``. No caption image has the pixels of an image of the world
    (``world``, ``world_seed``) or of an earlier caption. Idempotent and crash-safe.
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    size = _resolve(world)
    out = Path(out_dir)
    manifest = {"format": MIX_FORMAT_VERSION, "n": n, "seed": seed, "world": asdict(size), "world_seed": world_seed}

    def write(tmp: Path) -> None:
        taken = _world_hashes(size, world_seed)
        drafts = _caption_drafts(n, seed)
        for d in drafts:
            img = _distinct(_render(d.image, size.image_size), taken, seed, "caption", d.record["id"])
            path = tmp / "images" / d.record["image"]
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(demo._png_bytes(img))
        demo._dump_json(tmp / CAPTIONS_FILE, [demo._final(d) for d in drafts])

    if not demo._is_complete(out, manifest, CAPTIONS_MANIFEST):
        demo._build_folder(out, manifest, CAPTIONS_MANIFEST, write)
    return out


# --------------------------------------------------------------------------- texts (attempt 2's first stage)
# Text about the same world with no image: a description where the image would be, then a
# question in one of the benchmarks' formats about what it describes. It teaches a random
# language model the world's answer formats (and to answer from the content it was given)
# before it sees an image; on its own random streams, sharing no image with anything.

TEXTS_FILE = "texts.json"
TEXT_FORMATS = ("short", "yes_no", "mc", "long")


def _yes_no(question: str, yes: bool) -> tuple[str, str]:
    return f"{question}\n{YES_NO_SUFFIX}", "Yes" if yes else "No"


def _first(makers: list) -> tuple[str, str, str]:
    return next(qa for make in makers if (qa := make()) is not None)


def _scene_question(fmt: str, scene: _ShapeScene, rng: random.Random) -> tuple[str, str]:
    shapes = scene.shapes
    if fmt == "short":
        makers = [lambda: _q_color(rng, scene), lambda: _q_shape(rng, scene), lambda: _q_count(rng, scene),
                  lambda: _q_relation(rng, scene), lambda: _q_exists(rng, scene)]  # fmt: skip
        return _first(rng.sample(makers, len(makers)))[:2]
    if fmt == "yes_no":  # MME's kinds: colour (one shape), count, position (grid scenes); POPE's existence
        yes, s = rng.random() < 0.5, rng.choice(shapes)
        ask = rng.choice(("exists", "color", "count") if s.cell < 0 else ("exists", "count", "position"))
        if ask == "exists":
            return _q_exists(rng, scene, YES_NO_SUFFIX)[:2]
        if ask == "color":
            return _yes_no(f"Is the {s.kind} {s.color if yes else _other(rng, COLOR_NAMES, s.color)}?", yes)
        if ask == "count":
            n = len(shapes)
            return _yes_no(f"Are there {NUMBER_WORDS[n if yes else _other(rng, range(1, 7), n)]} shapes in the image?", yes)
        cell = s.cell if yes else _other(rng, range(demo.GRID * demo.GRID), s.cell)
        return _yes_no(f"Is the {s.color} {s.kind} in the {demo.CELL_NAMES[cell]} of the image?", yes)
    if fmt == "mc":
        makers = [lambda: _q_mc(rng, scene, "color"), lambda: _q_mc(rng, scene, "shape"), lambda: _q_mc(rng, scene, "count")]
        return _first(rng.sample(makers, len(makers)))[:2]
    return _reasoning(rng, scene)


def _choice(lead: str, correct: str, values, rng: random.Random) -> tuple[str, str]:
    """(question, letter): ``correct`` and three other ``values``, at a random letter."""
    options = [correct, *rng.sample([v for v in values if v != correct], 3)]
    return _options(lead, options, rng.choice(LETTER), rng)[:2]


def _text_question(fmt: str, spec: Any, caption: str, rng: random.Random) -> tuple[str, str]:
    """(question, answer) of format ``fmt`` about the content ``caption`` describes."""
    if isinstance(spec, _ShapeScene):
        return _scene_question(fmt, spec, rng)
    if fmt == "long":
        return rng.choice(DETAIL_PROMPTS), caption
    if isinstance(spec, demo._PhotoCrop):
        answer, others = PHOTOS[spec.photo]["answer"], [p["answer"] for p in PHOTOS.values()]
        if fmt == "short":
            if rng.random() < 0.5:
                return f"What is shown in this photo?\n{VQA_SUFFIX}", answer
            return f"Is this photo in black and white?\n{VQA_SUFFIX}", "No" if PHOTOS[spec.photo]["color"] else "Yes"
        if fmt == "yes_no":
            yes = rng.random() < 0.5
            return _yes_no(f"Is this a photo of {answer if yes else _other(rng, others, answer)}?", yes)
        return _choice("What is shown in this photo?", answer, others, rng)
    if isinstance(spec, _Cover):
        if fmt == "short":
            if rng.random() < 0.5:
                return f"What is the title of this book?\n{VQA_SUFFIX}", spec.title
            return f"Who wrote this book?\n{VQA_SUFFIX}", spec.author
        if fmt == "yes_no":
            yes = rng.random() < 0.5
            return _yes_no(f"Was this book written by {spec.author if yes else _other(rng, AUTHORS, spec.author)}?", yes)
        return _choice("Who wrote this book?", spec.author, AUTHORS, rng)
    if isinstance(spec, demo._DigitImage):
        label = str(spec.label)
        if fmt == "short":
            return f"What number is written here?\n{VQA_SUFFIX}", label
        if fmt == "yes_no":
            yes = rng.random() < 0.5
            return _yes_no(f"Is the number {label if yes else _other(rng, [str(d) for d in range(10)], label)} written here?", yes)
        return _choice("What number is written here?", label, [str(d) for d in range(10)], rng)
    text = spec.text  # a word or a number
    pool = list(WORDS) if text in WORDS else [str(v) for v in range(10, 1000)]
    if fmt == "short":
        if rng.random() < 0.5:
            return f"What word is written in the image?\n{OCR_SUFFIX}", text
        return f"What does the text in the image say?\n{VQA_SUFFIX}", text
    if fmt == "yes_no":
        yes = rng.random() < 0.5
        return _yes_no(f"Does the image show the word {text if yes else _other(rng, pool, text)}?", yes)
    return _choice("What word is written in the image?", text, pool, rng)


def _text_drafts(n: int, seed: int) -> list[_Draft]:
    rng = _rng(seed, "mix", "texts")
    seed_rng = _rng(seed, "mix", "texts", "pixels")  # scene noise seeds: drawn as for captions, never rendered
    kinds = _balanced(_CAPTION_KINDS, n, rng)
    formats = _balanced(TEXT_FORMATS, n, rng)
    positions = _balanced(("start", "end"), n, rng)
    drafts = []
    for i, (kind, fmt, pos) in enumerate(zip(kinds, formats, positions, strict=True)):
        spec, caption = _caption_item(kind, rng, seed_rng)
        question, answer = _text_question(fmt, spec, caption, rng)
        human = f"{caption}\n{question}" if pos == "start" else f"{question}\n{caption}"
        record = {"id": f"text-{i:06d}", "conversations": [{"from": "human", "value": human}, {"from": "gpt", "value": answer}]}
        drafts.append(_Draft(record, None, {"kind": kind, "format": fmt}))
    return drafts


def generate_mix_texts(out_dir: str | Path, n: int, seed: int = 3000, formats: tuple[str, ...] = TEXT_FORMATS) -> Path:
    """Write the text-only records among ``n`` drafts about the mix world's content whose
    format is in ``formats``; return the folder.

    ``texts.json`` (LLaVA format, no image): a description of a scene, photo crop, word,
    cover or digit in the captions' words, and a question about it in one of four formats
    (short answer, yes/no, multiple choice, long answer), balanced over the n drafts (so
    ``formats=("yes_no", "mc")`` keeps half of them, the same records as the full set's).
    The input of ``icons-dagster align --train lm``. Idempotent and crash-safe.
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    if not formats or set(formats) - set(TEXT_FORMATS):
        raise ValueError(f"formats must be among {TEXT_FORMATS}, got {formats!r}")
    out = Path(out_dir)
    manifest = {"format": MIX_FORMAT_VERSION, "kind": "texts", "n": n, "seed": seed, **({} if formats == TEXT_FORMATS else {"formats": list(formats)})}
    drafts = lambda: [demo._final(d) for d in _text_drafts(n, seed) if d.extra["format"] in formats]  # noqa: E731
    if not demo._is_complete(out, manifest, CAPTIONS_MANIFEST):
        demo._build_folder(out, manifest, CAPTIONS_MANIFEST, lambda tmp: demo._dump_json(tmp / TEXTS_FILE, drafts()))
    return out
