"""Stage-1 alignment (LLaVA's feature-alignment pre-training) of an image-text checkpoint.

Why: ICONS selects data for the visual instruction tuning of a model that already connects
images to text (the paper's LLaVA-1.5 after its stage 1). A checkpoint whose projector (or
whole language model) is untrained gives gradients of noise, so the selection and its
evaluation compare noise. ``align`` takes a LLaVA-format caption file and a checkpoint and
writes the aligned checkpoint: the regime the paper starts from, reachable on any world
(``icons-dagster align``). The demo's stage-1 model is this recipe on generated captions.

Recipe: the vision tower (and every module that is neither projector nor language model)
stays frozen; the projector trains, and with ``train="projector+lm"`` the language model and
its output head too (a random LM must learn language; LLaVA keeps a *pretrained* LM frozen:
``train="projector"``). ``train="lm"`` trains the language model and its head alone and also
takes text-only records: a first stage that teaches a random LM the world's language and
answer formats before any image (text-only records are skipped and listed otherwise). Loss: the answer-token loss of the warm-up (``ConversationEncoder``
labels, ``per_sample_loss``, token mean over the batch, as HF's loss in LLaVA's script;
``loss_mean="record"`` weighs every record equally instead, so that one-token answers
are not drowned by long ones in a mixed batch). ``texts``: text-only records (LLaVA
format, e.g. ShareGPT's) trained alongside the captions whenever the language model
trains, as LLaVA-1.5's mix carries text-only chat, so that a stage keeps a text skill.
AdamW (betas 0.9/0.999, no weight decay), linear warm-up over 3% of the steps then cosine to
0, gradient norm clipped at 1; records visited in a seeded shuffled order, epoch after epoch.
fp32 weights; on CPU a pinned torch thread count makes equal inputs, seed and thread count
give byte-identical ``model.safetensors``. ``device="cuda"`` trains on the GPU with bf16
autocast (a real checkpoint's stage 1 does not fit a CPU budget), deterministic kernels on.

Held-out check: a seeded share of the caption file's *images* (all their captions; at most
HELDOUT_MAX_IMAGES) or a separate caption file never trains; its per-token answer loss is
measured on the base model, on the aligned one, and on the aligned one with every record
given another record's image. The gap between the last two is what reading the image is
worth; a model that ignores the image shows none.

Memory: every training record is encoded once and kept (the tiny model steps faster than
images decode), so pixel values of all captions sit in memory; fine for the CPU-sized
worlds this runs on (8,000 captions of the tiny model: ~0.1 GB), not for LLaVA-558K.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from icons_dagster.core.config import ModelConfig
from icons_dagster.core.data.records import Record, RecordFileError, RecordProblem, load_records
from icons_dagster.core.model.encoding import ConversationEncoder, EncodedSample, collate, per_sample_loss
from icons_dagster.core.model.loading import (
    Placement, check_model_source, language_model_path, load_base_model, load_processor, no_progress_bars, resolve_placement,
)  # fmt: skip
from icons_dagster.core.model.samples import SkipLog, encode_records
from icons_dagster.core.storage.artifacts import write_json
from icons_dagster.core.storage.fingerprint import canonical_json, checkpoint_identity

__all__ = [
    "LOSS_MEANS",
    "REPORT_FILE",
    "TRAIN_CHOICES",
    "AlignmentInputError",
    "AlignmentRecipe",
    "AlignmentResult",
    "align",
    "answer_loss",
    "learning_rate_at",
    "mismatched_images",
    "split_heldout",
    "train_alignment",
]

#: Bump when the recipe computes something different, so finished outputs are not reused.
ALIGNMENT_VERSION = 1
REPORT_FILE = "alignment.json"
TRAIN_CHOICES = ("projector+lm", "projector", "lm")
DEVICE_CHOICES = ("cpu", "cuda")
TEXT_TRAIN = "lm"  # the choice that trains on text-only records too
LOSS_MEANS = ("token", "record")
#: Module names of the projector across architectures (LLaVA, LLaVA-style mm_projector,
#: Idefics3/SmolVLM, Qwen2.5-VL's merger inside its vision tower).
PROJECTOR_NAMES = ("multi_modal_projector", "mm_projector", "connector", "merger")
WARMUP_RATIO = 0.03
MAX_GRAD_NORM = 1.0
CURVE_EVERY = 10
EVAL_BATCH_SIZE = 32
HELDOUT_MAX_IMAGES = 1000
HELDOUT_STREAM = 1  # the held-out split's random stream: (seed, 1); the visiting order uses seed alone
PROBLEMS_LISTED = 50


class AlignmentInputError(ValueError):
    """Bad input (caption file, image root, model, out folder): the message names it and what is wrong."""


class NothingEncoded(AlignmentInputError):
    """No record of a set could be encoded (the caller names the file)."""


@dataclass(frozen=True)
class AlignmentRecipe:
    """Everything besides the inputs that decides the aligned weights (and the held-out split)."""

    steps: int = 1200
    batch_size: int = 16
    learning_rate: float = 3e-3
    seed: int = 0
    train: str = "projector+lm"
    heldout_fraction: float = 0.05  # of the caption file's images; ignored with a held-out caption file
    num_threads: int = 1
    max_length: int = 512
    device: str = "cpu"  # the weights differ by device, so it is part of the recipe (and the reuse key)
    loss_mean: str = "token"  # "record": each record's answer-token mean weighs the same

    def identity(self) -> dict[str, Any]:
        """The recipe in the reuse key; a default-valued newer field is left out, so older keys stay valid."""
        document = dataclasses.asdict(self)
        if document["loss_mean"] == "token":
            del document["loss_mean"]
        return document

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or not self.learning_rate > 0:
            raise AlignmentInputError(f"steps and batch size must be >= 1 and the learning rate > 0, got {self.steps}, {self.batch_size}, {self.learning_rate}")
        if self.train not in TRAIN_CHOICES:
            raise AlignmentInputError(f"train must be one of {TRAIN_CHOICES}, got {self.train!r}")
        if not 0.0 <= self.heldout_fraction < 1.0:
            raise AlignmentInputError(f"held-out fraction must be in [0, 1), got {self.heldout_fraction}")
        if self.device not in DEVICE_CHOICES:
            raise AlignmentInputError(f"device must be one of {DEVICE_CHOICES}, got {self.device!r}")
        if self.loss_mean not in LOSS_MEANS:
            raise AlignmentInputError(f"loss mean must be one of {LOSS_MEANS}, got {self.loss_mean!r}")
        if self.num_threads < 1 or self.max_length < 16:
            raise AlignmentInputError(f"threads must be >= 1 and max length >= 16, got {self.num_threads}, {self.max_length}")


@dataclass(frozen=True)
class AlignmentResult:
    out: Path
    report: dict[str, Any]
    reused: bool  # an identical finished alignment was already there


@contextlib.contextmanager
def threads(num_threads: int | None) -> Iterator[None]:
    """Pin torch's intra-op threads for the block (the weights depend on the thread count)."""
    if num_threads is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# --------------------------------------------------------------------------- model


def load_model(source: str | Path, *, revision: str | None = None, trust_remote_code: bool = False, device: str = "cpu"):
    """(processor, fp32 model, placement) through the project's loader; a failure names the model."""
    if device == "cuda" and not torch.cuda.is_available():
        raise AlignmentInputError("device cuda: no CUDA device is available here")
    config = ModelConfig(name_or_path=str(source), revision=revision, trust_remote_code=trust_remote_code, device=device, dtype="float32")
    placement = resolve_placement(config)  # CPU: fp32, no autocast; CUDA: bf16 autocast, deterministic kernels
    try:
        with no_progress_bars():
            processor = load_processor(config)
            model = load_base_model(config, placement)
    except (OSError, ValueError, ImportError) as error:
        raise AlignmentInputError(f"model {source}: cannot be loaded: {_first_line(error)}") from error
    return processor, model, placement


def _first_line(error: BaseException) -> str:
    text = str(error).strip().strip("'\"")
    return text.splitlines()[0] if text else type(error).__name__


def _module_name(model, module) -> str:
    return next(name for name, m in model.named_modules() if m is module)


def trained_prefixes(model, train: str) -> tuple[str, ...]:
    """Module paths that train: the projector(s), the language model and its output head, or (``lm``) the last two."""
    if train == TEXT_TRAIN:
        return _language_prefixes(model)
    found = [name for name, _ in model.named_modules() if name.rsplit(".", 1)[-1] in PROJECTOR_NAMES]
    projectors = [n for n in found if not any(n.startswith(other + ".") for other in found)]
    if not projectors:
        raise AlignmentInputError(
            f"{type(model).__name__} has no projector (a module named one of {', '.join(PROJECTOR_NAMES)}): "
            "alignment trains an image-text checkpoint's projector"
        )
    if train == "projector":
        return tuple(projectors)
    return (*projectors, *_language_prefixes(model))


def _language_prefixes(model) -> tuple[str, ...]:
    try:
        language = language_model_path(model)
    except ValueError as error:
        raise AlignmentInputError(f"{type(model).__name__}: {error}") from error
    head = model.get_output_embeddings()
    return (language, *([_module_name(model, head)] if head is not None else []))


def _under(name: str, prefixes: Sequence[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _frozen_roots(model) -> list[str]:
    """The outermost modules with parameters none of which trains (e.g. ``model.vision_tower``)."""
    roots: list[str] = []
    for name, module in model.named_modules():
        params = list(module.parameters())
        if name and params and not any(p.requires_grad for p in params) and not _under(name, roots):
            roots.append(name)
    return roots


def learning_rate_at(step: int, total_steps: int, peak: float) -> float:
    """LR of optimizer step ``step`` (0-based): linear warm-up over 3% of the steps, then cosine to 0."""
    warmup = max(1, math.ceil(WARMUP_RATIO * total_steps))
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    return peak * 0.5 * (1.0 + math.cos(math.pi * progress))


def _encode_all(encoder: ConversationEncoder, records: Sequence[Record]) -> tuple[list[EncodedSample], SkipLog]:
    """Encode once: batches of every epoch reuse these (decoding images is the slow part on CPU)."""
    skips = SkipLog()
    samples = list(encode_records(encoder, records, skips))
    if not samples:
        first = f" (first: id {skips.entries[0][0]!r}: {skips.entries[0][1]})" if skips.entries else ""
        raise NothingEncoded(f"none of the {len(records)} records could be encoded{first}")
    return samples, skips


def _batch_loss(model, samples: Sequence[EncodedSample], pad_id: int, placement: Placement, loss_mean: str = "token") -> tuple[torch.Tensor, int]:
    """Answer loss of one batch (token mean, or ``record`` mean) and its answer-token count."""
    batch = collate(samples, pad_id)
    with placement.forward_context():
        outputs = model(**batch.model_inputs(placement.device, placement.dtype))
    losses = per_sample_loss(outputs.logits.float(), batch.labels.to(placement.device))
    weights = (batch.labels[:, 1:] != -100).sum(dim=1).to(losses)
    if loss_mean == "record":
        return losses.mean(), int(weights.sum())
    return (losses * weights).sum() / weights.sum(), int(weights.sum())


def train_alignment(
    model_source: str | Path,
    records: Sequence[Record],
    out_dir: str | Path,
    recipe: AlignmentRecipe = AlignmentRecipe(),
    progress: Callable[[int, int, float], None] | None = None,
    *,
    revision: str | None = None,
    trust_remote_code: bool = False,
) -> dict[str, Any]:
    """Train on ``records`` (``recipe.heldout_fraction`` is not applied here); save and describe.

    ``out_dir`` gets ``save_pretrained`` weights (safetensors) and the processor; the return
    value describes the run (parts trained, record counts, skips, loss curve, seconds).
    ``progress(step, steps, loss)`` is called after every optimizer step.
    """
    started = time.perf_counter()
    steps, batch_size = recipe.steps, recipe.batch_size
    with threads(recipe.num_threads), torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        processor, model, placement = load_model(model_source, revision=revision, trust_remote_code=trust_remote_code, device=recipe.device)
        prefixes = trained_prefixes(model, recipe.train)
        encoder = ConversationEncoder(processor, recipe.max_length)
        samples, skips = _encode_all(encoder, records)
        pad_id = encoder.tokenizer.pad_token_id

        trainable = []
        for name, param in model.named_parameters():  # named_parameters' order: the clipping norm's order
            param.requires_grad_(_under(name, prefixes))
            if param.requires_grad:
                trainable.append(param)
        model.train()
        for name, module in model.named_modules():
            if name and not _under(name, prefixes) and not any(p.requires_grad for p in module.parameters()):
                module.eval()  # frozen: no dropout or other train-mode behaviour
        optimizer = torch.optim.AdamW(trainable, lr=recipe.learning_rate, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
        order_rng = np.random.default_rng(recipe.seed)
        order: list[int] = []
        losses: list[float] = []
        epochs = 0
        for step in range(steps):
            if len(order) < batch_size:  # next epoch; a batch never mixes two epochs' leftovers
                order = [int(i) for i in order_rng.permutation(len(samples))]
                epochs += 1
            chunk, order = order[:batch_size], order[batch_size:]
            for group in optimizer.param_groups:
                group["lr"] = learning_rate_at(step, steps, recipe.learning_rate)
            loss, _ = _batch_loss(model, [samples[i] for i in chunk], pad_id, placement, recipe.loss_mean)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, MAX_GRAD_NORM)
            optimizer.step()
            losses.append(float(loss.detach()))
            if progress is not None:
                progress(step + 1, steps, losses[-1])
        model.eval()
        frozen = _frozen_roots(model)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with no_progress_bars():
        model.save_pretrained(str(out), safe_serialization=True)
        processor.save_pretrained(str(out))
    curve = [
        {"step": end, "loss": float(np.mean(losses[start:end]))}
        for start, end in ((s, min(s + CURVE_EVERY, steps)) for s in range(0, steps, CURVE_EVERY))
    ]
    return {
        "trained": list(prefixes),
        "frozen": frozen,
        "trainable_parameters": int(sum(p.numel() for p in trainable)),
        "n_records": len(records),
        "n_encoded": len(samples),
        "skips": skips.as_metadata(),
        "epochs_started": epochs,
        "first_loss": losses[0],
        "final_loss": losses[-1],
        "final_window_loss": curve[-1]["loss"],
        "loss_curve": curve,  # mean loss over each window of CURVE_EVERY steps, keyed by its last step
        "train_seconds": round(time.perf_counter() - started, 2),
    }


# --------------------------------------------------------------------------- held-out loss


def _mean_loss(model, encoder: ConversationEncoder, records: Sequence[Record], batch_size: int, placement: Placement) -> tuple[float, int]:
    samples, _ = _encode_all(encoder, records)
    pad_id = encoder.tokenizer.pad_token_id
    total, tokens = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(samples), batch_size):
            loss, count = _batch_loss(model, samples[start : start + batch_size], pad_id, placement)
            total += float(loss) * count
            tokens += count
    return total / tokens, len(samples)


def answer_loss(
    model_source: str | Path,
    records: Sequence[Record],
    batch_size: int = EVAL_BATCH_SIZE,
    *,
    num_threads: int | None = None,
    max_length: int = 512,
    revision: str | None = None,
    trust_remote_code: bool = False,
    device: str = "cpu",
) -> float:
    """Mean per-token answer loss of the checkpoint on ``records`` (eval mode, no grad)."""
    return _losses(model_source, records, batch_size, num_threads, max_length, revision, trust_remote_code, device, mismatched=False)["loss"]


def _losses(model_source, records, batch_size, num_threads, max_length, revision, trust_remote_code, device, *, mismatched: bool) -> dict[str, Any]:
    """Answer loss on ``records`` and (``mismatched``) on them with swapped images, one load."""
    with threads(num_threads):
        processor, model, placement = load_model(model_source, revision=revision, trust_remote_code=trust_remote_code, device=device)
        encoder = ConversationEncoder(processor, max_length)
        loss, n_encoded = _mean_loss(model, encoder, records, batch_size, placement)
        swapped = mismatched_images(records) if mismatched else None
        loss_swapped = _mean_loss(model, encoder, swapped, batch_size, placement)[0] if swapped else None
    return {"loss": loss, "n_encoded": n_encoded, "loss_mismatched": loss_swapped}


def mismatched_images(records: Sequence[Record]) -> list[Record] | None:
    """Each record with the image of the next record (cyclically) that has another image: the
    loss of a model that ignores the image. None when all records share one image or any has none."""
    images = [r.image_path for r in records]
    if len(set(images)) < 2 or None in images:
        return None
    out = []
    for i, record in enumerate(records):
        j = (i + 1) % len(records)
        while images[j] == images[i]:
            j = (j + 1) % len(records)
        out.append(dataclasses.replace(record, image_path=images[j]))
    return out


def split_heldout(records: Sequence[Record], fraction: float, seed: int) -> tuple[list[Record], list[Record]]:
    """(train, held-out): a seeded ``fraction`` of the distinct images (at most HELDOUT_MAX_IMAGES),
    with every caption of those images, is held out; a text-only record counts as its own
    image. Both keep file order."""
    group = [str(r.image_path) if r.image_path is not None else f"\0{r.index}" for r in records]
    images = sorted(set(group))
    if fraction <= 0:
        return list(records), []
    n = min(HELDOUT_MAX_IMAGES, max(1, round(fraction * len(images))))
    if n >= len(images):
        raise AlignmentInputError(f"a held-out fraction of {fraction} leaves no image to train on ({len(images)} images)")
    chosen = {images[i] for i in np.random.default_rng([seed, HELDOUT_STREAM]).choice(len(images), size=n, replace=False)}
    return [r for r, g in zip(records, group, strict=True) if g not in chosen], [r for r, g in zip(records, group, strict=True) if g in chosen]


# --------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class Captions:
    """A caption file's usable records and every problem (skipped, with its reason)."""

    path: Path
    image_root: Path
    records: tuple[Record, ...]
    problems: tuple[RecordProblem, ...]
    sha256: str

    def identity(self) -> dict[str, Any]:
        """What the weights depend on: the file's bytes and the images' sizes (not where they sit)."""
        digest = hashlib.sha256()
        for r in self.records:
            if r.image_path is not None:
                digest.update(f"{r.image}\0{r.image_path.stat().st_size}\n".encode())
        return {"sha256": self.sha256, "image_sizes_sha256": digest.hexdigest()}

    def summary(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "image_root": str(self.image_root),
            "sha256": self.sha256,
            "n_entries": len(self.records) + len(self.problems),
            "n_usable": len(self.records),
            "n_problems": len(self.problems),
            "problems": [str(p) for p in self.problems[:PROBLEMS_LISTED]],
        }


def load_captions(path: str | Path, image_root: str | Path, *, text_only: bool = False) -> Captions:
    """A LLaVA-format caption file: bad records (and text-only ones, unless ``text_only``) are
    counted and listed; an unreadable file, a missing image root, or no usable record is an
    error naming the file."""
    path, image_root = Path(path).expanduser().resolve(), Path(image_root).expanduser().resolve()
    if not path.is_file():
        raise AlignmentInputError(f"{path}: no such caption file")
    if not image_root.is_dir():
        raise AlignmentInputError(f"{image_root}: no such image folder (the image root of {path.name})")
    try:
        loaded = load_records(path, image_root, subtasks="ignore")
    except (RecordFileError, OSError) as error:
        raise AlignmentInputError(_first_line(error)) from error
    problems = list(loaded.problems)
    records = []
    for r in loaded.records:
        if r.image_path is None and not text_only:
            problems.append(RecordProblem(str(path), r.index, r.id, "no image: alignment trains on image-caption pairs"))
        else:
            records.append(r)
    problems.sort(key=lambda p: p.index)
    if not records:
        if not problems:
            raise AlignmentInputError(f"{path}: holds no records")
        first = problems[0]
        raise AlignmentInputError(f"{path}: none of its {len(problems)} records is usable (first: record #{first.index}, id {first.record_id!r}: {first.reason})")
    return Captions(path, image_root, tuple(records), tuple(problems), loaded.content_sha256)


def _load_texts(path: str | Path, image_root: str | Path, recipe: AlignmentRecipe) -> Captions:
    """The text-only records of ``align(texts=...)``; one with an image is refused, by file and id."""
    if recipe.train == "projector":
        raise AlignmentInputError(f"{path}: text-only records train the language model, which train='projector' keeps frozen")
    texts = load_captions(path, image_root, text_only=True)
    with_image = next((r for r in texts.records if r.image_path is not None), None)
    if with_image is not None:
        raise AlignmentInputError(f"{texts.path}: record #{with_image.index}, id {with_image.id!r}: has an image; the texts file holds text-only records")
    return texts


def _stored_report(out: Path) -> dict[str, Any] | None:
    try:
        report = json.loads((out / REPORT_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return report if isinstance(report, dict) else None


def _check_out(out: Path, key: str, force: bool, model: str) -> dict[str, Any] | None:
    """The finished report to reuse, None to build; refuse to replace what is not ours to replace."""
    if Path(model).exists() and Path(model).resolve() == out:
        raise AlignmentInputError(f"{out}: the out folder is the model folder; choose another --out")
    if not out.exists():
        return None
    if not out.is_dir():
        raise AlignmentInputError(f"{out}: exists and is not a folder")
    stored = _stored_report(out)
    if stored is not None and stored.get("key") == key:
        return stored
    if stored is None and any(out.iterdir()):
        raise AlignmentInputError(f"{out}: exists and holds no {REPORT_FILE} (not an alignment output); choose another --out")
    if stored is not None and not force:
        raise AlignmentInputError(f"{out}: holds an alignment of other inputs or another recipe; pass --force to replace it, or choose another --out")
    return None


def alignment_key(
    captions: Captions, heldout: Captions | None, model: str, revision: str | None, trust_remote_code: bool, recipe: AlignmentRecipe,
    texts: Captions | None = None,
) -> str:
    """What the output is a function of: the inputs by content, the model's identity, the recipe."""
    document = {
        "alignment_version": ALIGNMENT_VERSION,
        "captions": captions.identity(),
        "heldout_captions": heldout.identity() if heldout is not None else None,
        "model": checkpoint_identity(model, revision),
        "trust_remote_code": trust_remote_code,
        "recipe": recipe.identity(),
        **({"texts": texts.identity()} if texts is not None else {}),
    }
    return hashlib.sha256(canonical_json(document).encode("utf-8")).hexdigest()


def align(
    captions: str | Path,
    image_root: str | Path,
    model: str | Path,
    out: str | Path,
    recipe: AlignmentRecipe = AlignmentRecipe(),
    *,
    heldout_captions: str | Path | None = None,
    heldout_image_root: str | Path | None = None,
    texts: str | Path | None = None,
    force: bool = False,
    progress: Callable[[int, int, float], None] | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
) -> AlignmentResult:
    """Align ``model`` on the caption file into ``out`` (or reuse an identical finished one).

    ``model``: a local checkpoint folder or a hub id. Held out: ``heldout_captions`` (images
    under ``heldout_image_root``, default ``image_root``) or ``recipe.heldout_fraction`` of the
    caption file's images (0: no held-out check). ``texts``: a file of text-only records
    trained alongside the captions (the language model must train). ``out`` gets the checkpoint and
    ``alignment.json``; it is built in ``<out>.tmp-<pid>`` and renamed into place, so a crash
    never leaves a folder a later run trusts. An ``out`` holding another alignment is replaced
    only with ``force``; one holding anything else never. Raises AlignmentInputError for bad input.
    """
    started = time.perf_counter()
    out = Path(out).expanduser().resolve()
    source = str(Path(model).expanduser().resolve()) if Path(model).expanduser().is_dir() else str(model)
    try:
        check_model_source(source)
    except (ValueError, OSError) as error:
        raise AlignmentInputError(_first_line(error)) from error
    text_only = recipe.train == TEXT_TRAIN
    caps = load_captions(captions, image_root, text_only=text_only)
    held_caps = load_captions(heldout_captions, heldout_image_root or image_root, text_only=text_only) if heldout_captions is not None else None
    text_caps = _load_texts(texts, image_root, recipe) if texts is not None else None
    key = alignment_key(caps, held_caps, source, revision, trust_remote_code, recipe, text_caps)
    stored = _check_out(out, key, force, source)
    if stored is not None:
        return AlignmentResult(out, stored, reused=True)

    if held_caps is not None:
        train_records, held = list(caps.records), list(held_caps.records)
    else:
        train_records, held = split_heldout(caps.records, recipe.heldout_fraction, recipe.seed)
    if text_caps is not None:
        train_records += text_caps.records
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        try:
            training = train_alignment(source, train_records, tmp, recipe, progress, revision=revision, trust_remote_code=trust_remote_code)
        except NothingEncoded as error:
            raise AlignmentInputError(f"{caps.path}: {error}") from error
        evaluated = time.perf_counter()
        heldout = None
        if held:
            args = (EVAL_BATCH_SIZE, recipe.num_threads, recipe.max_length, revision, trust_remote_code, recipe.device)
            try:
                before = _losses(source, held, *args, mismatched=False)
            except NothingEncoded as error:
                raise AlignmentInputError(f"{held_caps.path if held_caps else caps.path} (held out): {error}") from error
            after = _losses(tmp, held, *args, mismatched=True)
            heldout = {
                "n_records": len(held),
                "n_encoded": after["n_encoded"],
                "loss_before": before["loss"],
                "loss_after": after["loss"],
                "loss_after_mismatched_images": after["loss_mismatched"],
            }
        report = {
            "alignment_version": ALIGNMENT_VERSION,
            "key": key,
            "model": source,
            "revision": revision,
            "trust_remote_code": trust_remote_code,
            "recipe": dataclasses.asdict(recipe),
            "captions": caps.summary(),
            "texts": text_caps.summary() if text_caps is not None else None,
            "heldout_captions": held_caps.summary() if held_caps is not None else None,
            "heldout_source": str(held_caps.path) if held_caps is not None else f"fraction {recipe.heldout_fraction} of the captions' images",
            **training,
            "heldout": heldout,  # per answer token; None without a held-out set
            "versions": {"torch": torch.__version__, "transformers": _transformers_version()},
            "heldout_seconds": round(time.perf_counter() - evaluated, 2),
            "seconds": round(time.perf_counter() - started, 2),
        }
        write_json(tmp / REPORT_FILE, report)
        old = out.with_name(f"{out.name}.old-{os.getpid()}")
        if out.exists():
            concurrent = _stored_report(out)
            if concurrent is not None and concurrent.get("key") == key:  # an identical run finished first
                return AlignmentResult(out, concurrent, reused=True)
            os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return AlignmentResult(out, report, reused=False)


def _transformers_version() -> str:
    import transformers

    return transformers.__version__
