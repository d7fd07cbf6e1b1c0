"""Stage-1 alignment pre-training of the tiny demo LLaVA (LLaVA's feature-alignment stage).

Why: the tiny model is randomly initialised, so LoRA instruction tuning on a selected subset
would start from a model that knows neither language nor images, and comparing selection
methods by the result would compare noise. LLaVA first trains on image-caption pairs; here
the vision tower stays frozen (as in LLaVA) while the projector *and* the language model
train (LLaVA keeps its LM frozen because it is pretrained; ours is random and must learn
language too). The captions are separate generated data (``generate_alignment_data``):
never the pool, never the benchmarks.

Loss: the answer-token loss of the warm-up (``ConversationEncoder`` labels, ``per_sample_loss``,
token mean over the batch). AdamW with a short linear warm-up then cosine decay, gradient
norm clipped at 1. Deterministic on CPU for a fixed thread count: equal inputs give
byte-identical ``model.safetensors``.

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

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from icons_dagster.core.model.loading import no_progress_bars
from icons_dagster.core.model.encoding import ConversationEncoder, EncodedSample, collate, per_sample_loss
from icons_dagster.core.data.records import Record, load_records
from icons_dagster.core.model.samples import SkipLog, encode_records
from icons_dagster.demo.build import ensure_demo_model
from icons_dagster.demo.data import ALIGN_FILE, ALIGN_MANIFEST, generate_alignment_data
from icons_dagster.demo.tiny_model import MANIFEST_NAME as BASE_MANIFEST

__all__ = [
    "STAGE1_DIR",
    "STAGE1_FILE",
    "alignment_records",
    "answer_loss",
    "ensure_stage1_model",
    "train_stage1",
]

#: Bump when the training recipe changes so cached stage-1 models are not reused.
STAGE1_VERSION = 1
STAGE1_DIR = "tiny-llava-stage1"
STAGE1_FILE = "stage1.json"
MAX_LENGTH = 512  # the tiny model's max_position; alignment records are ~60 tokens
WARMUP_RATIO = 0.03
MAX_GRAD_NORM = 1.0
CURVE_EVERY = 10
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


@contextlib.contextmanager
def _threads(num_threads: int | None) -> Iterator[None]:
    """Pin torch's intra-op threads for the block (results depend on the thread count)."""
    if num_threads is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _load(model_dir: Path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    with no_progress_bars():
        processor = AutoProcessor.from_pretrained(str(model_dir))
        model = AutoModelForImageTextToText.from_pretrained(str(model_dir), dtype=torch.float32)
    return processor, model


def _encode_all(encoder: ConversationEncoder, records: Sequence[Record]) -> tuple[list[EncodedSample], SkipLog]:
    """Encode once: the tiny model steps faster than images decode, so batches reuse these."""
    skips = SkipLog()
    samples = list(encode_records(encoder, records, skips))
    if not samples:
        raise ValueError(f"none of the {len(records)} records could be encoded: {skips.as_metadata(3)}")
    return samples, skips


def _token_mean(model, samples: Sequence[EncodedSample], pad_id: int) -> tuple[torch.Tensor, int]:
    """Token-mean answer loss of one batch (as HF's loss in LLaVA's training script) and its token count."""
    batch = collate(samples, pad_id)
    outputs = model(**batch.model_inputs(torch.device("cpu"), torch.float32))
    losses = per_sample_loss(outputs.logits, batch.labels)
    weights = (batch.labels[:, 1:] != -100).sum(dim=1).to(losses)
    return (losses * weights).sum() / weights.sum(), int(weights.sum())


def learning_rate_at(step: int, total_steps: int, peak: float) -> float:
    """LR of optimizer step ``step`` (0-based): linear warm-up over 3% of the steps, then cosine to 0."""
    warmup = max(1, math.ceil(WARMUP_RATIO * total_steps))
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    return peak * 0.5 * (1.0 + math.cos(math.pi * progress))


def _is_vision(name: str) -> bool:
    return "vision_tower" in name


def train_stage1(
    base_model_dir: str | Path,
    records: Sequence[Record],
    out_dir: str | Path,
    steps: int,
    batch_size: int = 16,
    learning_rate: float = 3e-3,
    seed: int = 0,
    progress: Callable[[int, int, float], None] | None = None,
    *,
    num_threads: int | None = None,
    freeze_language_model: bool = False,
) -> Path:
    """Train projector + language model (vision tower frozen) on caption records; save a checkpoint.

    ``freeze_language_model``: train the projector only (LLaVA's own stage 1, for a
    pretrained language model such as SmolLM2).

    Records are visited in a seeded shuffled order, epoch after epoch, until ``steps``
    optimizer steps are done. ``out_dir`` gets ``save_pretrained`` weights (safetensors),
    the processor, and ``stage1.json`` (steps, losses, seeds, record counts, thread count).
    ``progress(step, steps, loss)`` is called after every step.
    """
    if steps < 1 or batch_size < 1 or learning_rate <= 0:
        raise ValueError(f"steps and batch_size must be >= 1 and learning_rate > 0, got {steps}, {batch_size}, {learning_rate}")
    out = Path(out_dir)
    started = time.perf_counter()
    with _threads(num_threads), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        processor, model = _load(Path(base_model_dir))
        encoder = ConversationEncoder(processor, MAX_LENGTH)
        samples, skips = _encode_all(encoder, records)
        pad_id = encoder.tokenizer.pad_token_id

        trainable = []
        frozen = _is_vision if not freeze_language_model else (lambda name: "multi_modal_projector" not in name)
        for name, param in model.named_parameters():
            param.requires_grad_(not frozen(name))
            if param.requires_grad:
                trainable.append(param)
        model.train()
        for name, module in model.named_modules():
            if name and frozen(name) and not any(p.requires_grad for p in module.parameters()):
                module.eval()  # frozen: no dropout or other train-mode behaviour
        optimizer = torch.optim.AdamW(trainable, lr=learning_rate, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
        order_rng = np.random.default_rng(seed)
        order: list[int] = []
        losses: list[float] = []
        epochs = 0
        for step in range(steps):
            if len(order) < batch_size:  # next epoch; a batch never mixes two epochs' leftovers
                order = [int(i) for i in order_rng.permutation(len(samples))]
                epochs += 1
            chunk, order = order[:batch_size], order[batch_size:]
            for group in optimizer.param_groups:
                group["lr"] = learning_rate_at(step, steps, learning_rate)
            loss, _ = _token_mean(model, [samples[i] for i in chunk], pad_id)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, MAX_GRAD_NORM)
            optimizer.step()
            losses.append(float(loss.detach()))
            if progress is not None:
                progress(step + 1, steps, losses[-1])
        model.eval()
        threads = torch.get_num_threads()

    out.mkdir(parents=True, exist_ok=True)
    with no_progress_bars():
        model.save_pretrained(str(out), safe_serialization=True)
        processor.save_pretrained(str(out))
    curve = [
        {"step": end, "loss": float(np.mean(losses[start:end]))}
        for start, end in ((s, min(s + CURVE_EVERY, steps)) for s in range(0, steps, CURVE_EVERY))
    ]
    info = {
        "stage1_version": STAGE1_VERSION,
        "base_model": str(base_model_dir),
        "steps": steps,
        "epochs_started": epochs,
        "batch_size": batch_size,
        "learning_rate": learning_rate,
        "seed": seed,
        "n_records": len(records),
        "n_encoded": len(samples),
        "skips": skips.as_metadata(),
        "trained": "multi_modal_projector" + ("" if freeze_language_model else " + language_model + lm_head") + " (vision tower frozen)",
        "trainable_parameters": int(sum(p.numel() for p in trainable)),
        "first_loss": losses[0],
        "final_loss": losses[-1],
        "final_window_loss": curve[-1]["loss"],
        "loss_curve": curve,  # mean loss over each window of CURVE_EVERY steps, keyed by its last step
        "num_threads": threads,
        "train_seconds": round(time.perf_counter() - started, 2),
    }
    (out / STAGE1_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return out


def answer_loss(model_dir: str | Path, records: Sequence[Record], batch_size: int = 32, *, num_threads: int | None = None) -> float:
    """Mean per-token answer loss of the checkpoint on ``records`` (eval mode, no grad)."""
    with _threads(num_threads):
        processor, model = _load(Path(model_dir))
        model.eval()
        encoder = ConversationEncoder(processor, MAX_LENGTH)
        samples, _ = _encode_all(encoder, records)
        pad_id = encoder.tokenizer.pad_token_id
        total, tokens = 0.0, 0
        with torch.no_grad():
            for start in range(0, len(samples), batch_size):
                loss, count = _token_mean(model, samples[start : start + batch_size], pad_id)
                total += float(loss) * count
                tokens += count
    return total / tokens


def _mismatched(records: Sequence[Record]) -> list[Record]:
    """Each record with the next record's image: the loss a model gets when it ignores the image."""
    images = [r.image_path for r in records]
    return [dataclasses.replace(r, image_path=images[(i + 1) % len(images)]) for i, r in enumerate(records)]


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _stage1_key(base_dir: Path, align_dir: Path, steps: int, batch_size: int, learning_rate: float, seed: int) -> str:
    """Cache key: what the base model and the data were built from, and the recipe."""
    recipe = {
        "stage1_version": STAGE1_VERSION,
        "base_manifest": _file_sha256(base_dir / BASE_MANIFEST),
        "alignment_manifest": _file_sha256(align_dir / ALIGN_MANIFEST),
        "steps": steps,
        "batch_size": batch_size,
        "learning_rate": learning_rate,
        "seed": seed,
        "num_threads": BUILD_THREADS,
    }
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()


def _stored_key(out: Path) -> str | None:
    try:
        return json.loads((out / STAGE1_FILE).read_text(encoding="utf-8")).get("key")
    except (OSError, ValueError, AttributeError):
        return None


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

    Reused when its ``stage1.json`` carries the same key (base model manifest, alignment
    data manifest, steps, batch size, lr, seed). Trained in ``<out>.tmp-<pid>`` and renamed
    into place, so a crash never leaves a folder a later run trusts. ``stage1.json`` also
    records the answer loss on ``heldout`` alignment records of another seed, before and after,
    and after with every record given its neighbour's image (the gap shows the model reads the
    image); ``heldout=0`` skips this. Trains on BUILD_THREADS torch threads.
    """
    started = time.perf_counter()
    demo_dir = Path(demo_dir)
    base_dir = Path(ensure_demo_model(demo_dir))
    align_dir = generate_alignment_data(demo_dir / "alignment", n_records)
    out = demo_dir / STAGE1_DIR
    key = _stage1_key(base_dir, align_dir, steps, batch_size, learning_rate, seed)
    if _stored_key(out) == key:
        return out

    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        train_stage1(
            base_dir, alignment_records(align_dir), tmp, steps, batch_size, learning_rate, seed, progress,
            num_threads=BUILD_THREADS,
        )
        info = json.loads((tmp / STAGE1_FILE).read_text(encoding="utf-8"))
        info["key"] = key
        info["base_model"] = str(base_dir)
        info["alignment_data"] = str(align_dir)
        if heldout:
            held = alignment_records(generate_alignment_data(demo_dir / "alignment-heldout", heldout, seed=HELDOUT_SEED))
            info["heldout"] = {
                "n_records": len(held),
                "seed": HELDOUT_SEED,
                "loss_before": answer_loss(base_dir, held, num_threads=BUILD_THREADS),
                "loss_after": answer_loss(tmp, held, num_threads=BUILD_THREADS),
                "loss_after_mismatched_images": answer_loss(tmp, _mismatched(held), num_threads=BUILD_THREADS),
            }
        info["build_seconds"] = round(time.perf_counter() - started, 2)
        (tmp / STAGE1_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")  # the key last
        old = out.with_name(f"{out.name}.old-{os.getpid()}")
        if out.exists():
            if _stored_key(out) == key:  # a concurrent build finished first
                return out
            os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
