"""Stage-1 alignment pre-training of the tiny demo LLaVA: the demo's cached build of ``align``.

Why: the tiny model is randomly initialised, so LoRA instruction tuning on a selected subset
would start from a model that knows neither language nor images, and comparing selection
methods by the result would compare noise. LLaVA first trains on image-caption pairs; here
the vision tower stays frozen (as in LLaVA) while the projector *and* the language model
train (LLaVA keeps its LM frozen because it is pretrained; ours is random and must learn
language too). The captions are separate generated data (``generate_alignment_data``):
never the pool, never the benchmarks.

The recipe (loss, optimizer, schedule, frozen parts, held-out check) is
``core/model/alignment.py``, the one ``icons-dagster align`` runs; this module only builds
the demo's inputs (the random tiny model, generated captions and held-out captions) and keeps
the result under the demo folder. Deterministic on CPU for a fixed thread count: equal inputs
give byte-identical ``model.safetensors``.

Measured on the 2-core dev VM (defaults: 1200 steps, batch 16, lr 3e-3, 4000 alignment
records, 1 torch thread): ``ensure_stage1_model`` from an empty folder takes ~68 s (training
60 s, data 5 s, base model 2 s, held-out evaluation 3 s). Per-token answer loss on 200
held-out alignment records (seed 2000): 6.78 before (= ln of the 870-token vocabulary),
0.28 after; 0.73 after when each record is given another record's image, so about 0.45
nats per token come from reading the image (scene 0.30 vs 0.71, photo 0.09 vs 0.49,
text 0.68 vs 1.40, digit 0.30 vs 1.35). Alternatives measured: 600 steps on 2000 records
(31 s): 0.34 (0.61 mismatched); 1500 steps on 5000 records (73 s): 0.26 (0.75).
Threads: on the idle VM two torch threads take ~60 ms per step and one ~72 ms, but while
another process holds a core two threads are 4-15x slower (measured: 55-216 s for 200 steps
against 14 s), and a Dagster run or a parallel test session is exactly that; one thread also
makes the weights independent of the machine's core count. Hence BUILD_THREADS = 1.
Held-out caveat: held-out digits are the same spare load_digits scans as the training
digits (12 per label), in other colours; scenes, photos crops and texts are fresh draws.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from icons_dagster.core.data.records import Record, load_records
from icons_dagster.core.model.alignment import REPORT_FILE, AlignmentRecipe, align
from icons_dagster.demo.build import ensure_demo_model
from icons_dagster.demo.data import ALIGN_FILE, generate_alignment_data
from icons_dagster.demo.mix import TEXT_FORMATS
from icons_dagster.demo.tiny_model import TinyModelSpec, build_tiny_llava

__all__ = [
    "STAGE1_DIR",
    "STAGE1_FILE",
    "alignment_records",
    "ensure_mix_model",
    "ensure_stage1_model",
]

STAGE1_DIR = "tiny-llava-stage1"
STAGE1_FILE = REPORT_FILE
LEGACY_FILE = "stage1.json"  # the report of builds made before the recipe moved to core/
HELDOUT_SEED = 2000  # held-out alignment records: another seed, hence other random streams
HELDOUT_N = 200
# One thread: barely slower than two on the idle 2-core VM, many times faster when a core is
# busy, and the weights then do not depend on the machine's core count (module docstring).
BUILD_THREADS = 1
DEFAULT_STEPS = 1200
DEFAULT_RECORDS = 4000


def alignment_records(folder: Path) -> tuple[Record, ...]:
    """The records of a ``generate_alignment_data`` folder; any problem is an error (generated data)."""
    loaded = load_records(Path(folder) / ALIGN_FILE, Path(folder) / "images")
    if loaded.problems:
        raise ValueError(f"alignment data in {folder} has problems: {[str(p) for p in loaded.problems[:3]]}")
    return loaded.records


def ensure_stage1_model(
    demo_dir: str | Path,
    steps: int = DEFAULT_STEPS,
    n_records: int = DEFAULT_RECORDS,
    *,
    batch_size: int = 16,
    learning_rate: float = 3e-3,
    seed: int = 0,
    heldout: int = HELDOUT_N,
    progress: Callable[[int, int, float], None] | None = None,
) -> Path:
    """Build (or reuse) the stage-1 model at ``demo_dir/tiny-llava-stage1`` and return its path.

    ``align`` on ``n_records`` generated captions: projector + language model trained, on
    BUILD_THREADS torch threads, every caption trains. Reused when its ``alignment.json``
    carries the same key (the base model and captions by content, the recipe), else rebuilt
    in place. The report holds the answer loss on ``heldout`` generated captions of another
    seed, before, after, and after with every record given another record's image (the gap
    shows the model reads the image); ``heldout=0`` skips this.
    """
    demo_dir = Path(demo_dir)
    base_dir = Path(ensure_demo_model(demo_dir))
    align_dir = generate_alignment_data(demo_dir / "alignment", n_records)
    held_dir = generate_alignment_data(demo_dir / "alignment-heldout", heldout, seed=HELDOUT_SEED) if heldout else None
    out = demo_dir / STAGE1_DIR
    if (out / LEGACY_FILE).is_file() and not (out / STAGE1_FILE).is_file():
        shutil.rmtree(out)  # same weights, but align replaces only folders with its own report
    recipe = AlignmentRecipe(
        steps=steps, batch_size=batch_size, learning_rate=learning_rate, seed=seed, heldout_fraction=0.0, num_threads=BUILD_THREADS
    )
    result = align(
        align_dir / ALIGN_FILE,
        align_dir / "images",
        base_dir,
        out,
        recipe,
        heldout_captions=held_dir / ALIGN_FILE if held_dir else None,
        heldout_image_root=held_dir / "images" if held_dir else None,
        force=True,
        progress=progress,
    )
    if result.report["captions"]["n_problems"]:
        raise ValueError(f"alignment data in {align_dir} has problems: {result.report['captions']['problems'][:3]}")
    return out


# The mix world's base model (docs/preregistration-mix.md, section 3 and its change log): the
# tiny LLaVA with a tokenizer of the world's own texts, whose language model first learns text
# about the world (descriptions and questions in the benchmarks' formats, no image) in one or
# more phases, then aligned on captions of the same visual world.
MIX_CAPTIONS = {"mix": 8000, "mix-test": 64}
MIX_STEPS = {"mix": 4000, "mix-test": 40}
TEXT_SEED, TEXT_HELDOUT_SEED = 3000, 3001
TEXT_HELDOUT_N = 200
MIX_MODEL_SPEC = TinyModelSpec()


@dataclass(frozen=True)
class TextPhase:
    """One phase of the text stage: ``align --train lm`` on the texts of these formats."""

    name: str
    formats: tuple[str, ...]
    drafts: dict[str, int]  # text drafts per world size, of which the phase keeps its formats
    steps: dict[str, int]  # per world size
    learning_rate: float
    loss_mean: str = "token"  # "record": a one-token answer weighs as much as a long one


@dataclass(frozen=True)
class CaptionAlignment:
    """The caption alignment after the text phases: what trains, the loss mean, and the
    text formats (from ``rehearsal_drafts`` drafts) trained alongside the captions."""

    train: str = "projector+lm"
    loss_mean: str = "token"
    rehearsal_formats: tuple[str, ...] = ()
    rehearsal_drafts: int = 0


#: Gate attempt 2's text stage, every format, 4,000 steps at lr 3e-3: the best base model
#: measured so far. Attempt 4's two phases (closed formats on 40,000 texts, then every format
#: at lr 1e-3) stopped at their pre-check (change log); a phase tuple like theirs builds them.
MIX_TEXT_PHASES = (TextPhase("text", TEXT_FORMATS, {"mix": 8000, "mix-test": 64}, {"mix": 4000, "mix-test": 40}, 3e-3),)


def ensure_mix_model(
    demo_dir: str | Path,
    size: str,
    *,
    progress: Callable[[int, int, float], None] | None = None,
    world_seed: int = 0,
    spec: TinyModelSpec | None = None,
    text_phases: tuple[TextPhase, ...] = MIX_TEXT_PHASES,
    alignment: CaptionAlignment = CaptionAlignment(),
) -> Path:
    """Build (or reuse) the base model of the mix world (``size``, ``world_seed``) under ``demo_dir``.

    Folders, each reused when its inputs are unchanged: the random tiny LLaVA, its language
    model after each text phase (``align --train lm``), and that after caption alignment.
    Another world seed gets its own tokenizer and captions (no image of that world).
    ``spec``: the tiny LLaVA's sizes (default MIX_MODEL_SPEC); ``alignment``: how the
    caption alignment trains (``projector`` keeps the language model the text phases made).
    """
    from icons_dagster.demo.mix import CAPTIONS_FILE, TEXTS_FILE, generate_mix_captions, generate_mix_texts, mix_corpus

    demo_dir = Path(demo_dir)
    n = MIX_CAPTIONS[size]
    size_name = f"{size}-seed{world_seed}" if world_seed else size
    read = Path(build_tiny_llava(demo_dir / f"tiny-llava-{size_name}", mix_corpus(size, seed=world_seed, captions=n), spec or MIX_MODEL_SPEC))
    held_texts = generate_mix_texts(demo_dir / f"texts-{size}-heldout", TEXT_HELDOUT_N, seed=TEXT_HELDOUT_SEED)

    def texts_of(formats: tuple[str, ...], n_drafts: int) -> Path:
        return generate_mix_texts(demo_dir / f"texts-{n_drafts}-{'-'.join(formats)}", n_drafts, seed=TEXT_SEED, formats=formats)

    for phase in text_phases:
        texts = texts_of(phase.formats, phase.drafts[size])
        recipe = AlignmentRecipe(
            steps=phase.steps[size], learning_rate=phase.learning_rate, train="lm", heldout_fraction=0.0, num_threads=BUILD_THREADS,
            loss_mean=phase.loss_mean,
        )  # fmt: skip
        out = demo_dir / f"tiny-llava-{size_name}-{phase.name}"
        align(texts / TEXTS_FILE, texts, read, out, recipe, heldout_captions=held_texts / TEXTS_FILE, heldout_image_root=held_texts, force=True, progress=progress)
        read = out
    captions = generate_mix_captions(demo_dir / f"captions-{size_name}", n, world=size, world_seed=world_seed)
    held = generate_mix_captions(demo_dir / f"captions-{size_name}-heldout", min(HELDOUT_N, n), seed=HELDOUT_SEED, world=size, world_seed=world_seed)
    recipe = AlignmentRecipe(
        steps=MIX_STEPS[size], train=alignment.train, heldout_fraction=0.0, num_threads=BUILD_THREADS, loss_mean=alignment.loss_mean
    )
    rehearsal = texts_of(alignment.rehearsal_formats, alignment.rehearsal_drafts) / TEXTS_FILE if alignment.rehearsal_formats else None
    out = demo_dir / f"tiny-llava-{size_name}-aligned"
    align(
        captions / CAPTIONS_FILE, captions / "images", read, out, recipe, texts=rehearsal,
        heldout_captions=held / CAPTIONS_FILE, heldout_image_root=held / "images", force=True, progress=progress,
    )  # fmt: skip
    return out
