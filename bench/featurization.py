"""Gradient featurization throughput: ours vs a LESS-style loop, and vs a plain training step.

Models (``--model``): the demo's tiny LLaVA (default), the same with a mid-size language
model (``--text-hidden``), or ``smollm2``: the tiny vision tower in front of the pretrained
SmolLM2-135M-Instruct (``demo/smollm2.py``; the largest real model that runs offline here),
built once into ``--model-cache`` and reused.

Baselines in the same run, same model, same records, same thread count:
- LESS-style: batch 1, backward, flatten ``.grad``, dense Rademacher projection as TRAK's
  BasicProjector does it on a CPU: ±1 entries from torch's generator, the whole D x d'
  matrix kept in memory when it fits in ``--dense-budget-gib``, else generated again for
  every sample block by block (the only option at LLaVA scale, where it would be TBs).
  At large D the loop is timed on the first ``--loop-records`` records (a per-sample rate);
- with ``--less-projector trak``, also the same loop projecting with TRAK's own
  ``BasicProjector`` (``traker``, the optional extra ``bench``), timed beside ours-dense
  sample by sample (see ``TrakBasicProjector`` for the regime it runs in);
- ours: batched per-sample gradients from LoRA hooks, CountSketch fused per module;
- a batch-1 loop with our CountSketch (separates batching from the cheaper projection);
- a plain training step (forward + backward of the batch loss) on the same batches;
- ours on batches in input order instead of length-grouped ones (the pipeline's default
  groups windows of 16 batches by length; this isolates what the grouping saves).
Ours, ours in input order and the training step run in alternating rounds; each ratio is
the median of the per-round ratios, so a noisy neighbour slows all sides of a round alike.

Usage: python bench/featurization.py [--records 64] [--batch 16] [--dim 1024] [--lora-r 8]
       [--threads 2] [--rounds 7] [--loop-records N] [--length-grouping 16]
       [--less-projector {ours-dense,trak}]   # trak: TRAK's BasicProjector loop too
       [--text-hidden 512 --text-layers 4]    # a mid-size language model instead of the demo's
       [--model smollm2 [--model-cache DIR]]  # SmolLM2-135M behind the tiny vision tower
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from icons_dagster.core.config import LoraSettings, ModelConfig  # noqa: E402
from icons_dagster.core.model.encoding import ConversationEncoder, collate, per_sample_loss  # noqa: E402
from icons_dagster.core.features.gradients import PerSampleGradients, loop_gradients, projected_features  # noqa: E402
from icons_dagster.core.model.loading import attach_new_lora, load_base_model, load_processor, resolve_placement  # noqa: E402
from icons_dagster.core.features.projection import make_projector  # noqa: E402
from icons_dagster.core.data.records import load_records  # noqa: E402
from icons_dagster.core.model.samples import SkipLog, encode_records, length_grouped_batches, padded_tokens  # noqa: E402
from icons_dagster.demo.build import ensure_demo_model  # noqa: E402
from icons_dagster.demo.data import demo_corpus, generate_demo  # noqa: E402
from icons_dagster.demo.smollm2 import build_smollm2_llava  # noqa: E402
from icons_dagster.demo.tiny_model import TinyModelSpec, build_tiny_llava  # noqa: E402


def seconds(fn, device: torch.device) -> float:
    """Wall time of fn(), waiting for the GPU's queued work on CUDA."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


class BasicDenseProjector:
    """TRAK BasicProjector-like Rademacher projection (the LESS baseline, not our projector).

    Rows of 4,096 input coordinates are drawn from a torch generator seeded by the row
    block; the whole matrix is kept when D x d' float32 fit in ``budget_bytes``.
    """

    rows_per_block = 4096

    def __init__(self, dimension: int, dim: int, seed: int, budget_bytes: int, device: torch.device):
        self.dimension, self.dim, self.seed, self.device = dimension, dim, seed, device
        self.keeps_matrix = dimension * dim * 4 <= budget_bytes
        self._blocks = [self._block(b) for b in range(self._count())] if self.keeps_matrix else None

    def _count(self) -> int:
        return -(-self.dimension // self.rows_per_block)

    def _block(self, b: int) -> torch.Tensor:
        rows = min(self.rows_per_block, self.dimension - b * self.rows_per_block)
        generator = torch.Generator(self.device).manual_seed(self.seed * 1_000_003 + b)
        signs = torch.randint(0, 2, (rows, self.dim), generator=generator, dtype=torch.float32, device=self.device)
        return signs.mul_(2.0).sub_(1.0).div_(self.dim**0.5)

    def project(self, flat: torch.Tensor) -> torch.Tensor:
        out = torch.zeros((flat.shape[0], self.dim), device=self.device)
        for b in range(self._count()):
            block = self._blocks[b] if self._blocks is not None else self._block(b)
            start = b * self.rows_per_block
            out.addmm_(flat[:, start : start + block.shape[0]], block)
        return out


def trak_projectors():
    """TRAK's projector classes; traker is an optional extra, so say how to get it."""
    try:
        from trak.projectors import BasicProjector, ProjectionType
    except ImportError as error:
        sys.exit(f"--less-projector trak needs TRAK's package (traker), the optional extra `bench`: pip install -e '.[bench]' ({error})")
    return BasicProjector, ProjectionType


class TrakBasicProjector:
    """TRAK's own ``BasicProjector`` as TRAKer sets it up where it has no ``fast_jl`` kernel.

    Regime (traker 0.3.2, ``trak/projectors.py``): it never holds the D x d' matrix. It keeps
    one D x ``block_size`` buffer (block_size 100 output columns by default) and, when d' >
    100, refills it from a seeded generator for each of the ceil(d'/100) column blocks on
    *every* ``project`` call, i.e. the whole matrix is generated again for every sample of a
    batch-1 loop, however much memory there is. Only with d' <= 100 (one block) is the matrix
    generated once and kept. ``max_batch_size`` belongs to its ``CudaProjector`` (the
    fast_jl kernel's batch limit); ``BasicProjector`` takes the whole [batch, D] input in
    one matmul per block. Entry type as TRAKer picks it: normal on a CPU (it avoids
    bernoulli there), rademacher on CUDA; it does not scale by 1/sqrt(d') (timing only).
    """

    def __init__(self, dimension: int, dim: int, seed: int, proj_type: str, device: torch.device):
        BasicProjector, ProjectionType = trak_projectors()
        if proj_type == "auto":
            proj_type = "normal" if device.type == "cpu" else "rademacher"
        self.proj_type = ProjectionType(proj_type)
        self.projector = BasicProjector(dimension, dim, seed, self.proj_type, device)  # generates the first block: setup
        self.dimension, self.dim = dimension, dim

    def describe(self) -> str:
        """The regime it ran in, for the printed line."""
        block, blocks = self.projector.block_size, self.projector.num_blocks
        whole = self.dimension * self.dim * 4 / 2**30
        if blocks == 1:
            return f"{self.proj_type.value}, whole D x d' matrix kept ({whole:.2f} GiB)"
        return (f"{self.proj_type.value}, D x {block} block ({self.dimension * block * 4 / 2**30:.2f} GiB) regenerated "
                f"{blocks}x per sample; the {whole:.1f} GiB D x d' matrix is never held")

    def project(self, flat: torch.Tensor) -> torch.Tensor:
        return self.projector.project(flat, model_id=0)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--lora-r", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", choices=("demo", "smollm2"), default="demo", help="demo: the demo's tiny LLaVA (or mid-size with --text-hidden); smollm2: SmolLM2-135M behind the tiny vision tower")
    parser.add_argument("--model-cache", default=str(Path(tempfile.gettempdir()) / "icons-bench-models"), help="where --model smollm2 is built once and reused")
    parser.add_argument("--text-hidden", type=int, help="language-model width (default: the demo model's 64)")
    parser.add_argument("--text-layers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7, help="alternating rounds of ours and the training step")
    parser.add_argument("--loop-records", type=int, help="time the batch-1 loops on this many records (default: all)")
    parser.add_argument("--device", default="auto", help="auto (CUDA + bf16 autocast when present), cpu, cuda, cuda:1, ...")
    parser.add_argument("--deterministic", action=argparse.BooleanOptionalAction, default=True, help="CUDA: deterministic kernels (the pipeline's default)")
    parser.add_argument("--dense-budget-gib", type=float, default=2.0, help="keep the dense matrix when it fits in this")
    parser.add_argument("--length-grouping", type=int, default=16, help="batches per length-sorted window (the pipeline's default; 1 = input order)")
    parser.add_argument("--less-projector", choices=("ours-dense", "trak"), default="ours-dense", help="trak: also time the LESS-style loop with TRAK's BasicProjector (pip install -e '.[bench]')")
    parser.add_argument("--trak-proj-type", choices=("auto", "normal", "rademacher"), default="auto", help="TRAK's entries; auto: as TRAKer picks (normal on CPU, rademacher on CUDA)")
    args = parser.parse_args()
    if args.model == "smollm2" and args.text_hidden:
        parser.error("--text-hidden builds a mid-size demo model; it does not apply to --model smollm2")
    if args.less_projector == "trak":
        trak_projectors()  # fail before minutes of model building
    torch.set_num_threads(args.threads)

    work = Path(tempfile.mkdtemp(prefix="icons-bench-"))
    demo = generate_demo(work / "demo", size="default")
    build_start = time.perf_counter()
    if args.model == "smollm2":
        model_dir = build_smollm2_llava(Path(args.model_cache) / "smollm2-llava")  # reused when its manifest matches
    elif args.text_hidden:
        spec = TinyModelSpec(text_hidden=args.text_hidden, text_layers=args.text_layers, intermediate=4 * args.text_hidden, text_heads=8, text_kv_heads=8)
        model_dir = build_tiny_llava(work / "model", demo_corpus("default"), spec)
    else:
        model_dir = ensure_demo_model(work)
    build_seconds = time.perf_counter() - build_start
    config = ModelConfig(str(model_dir), max_length=512, device=args.device, deterministic=args.deterministic)
    placement = resolve_placement(config)
    encoder = ConversationEncoder(load_processor(config), 512)
    base = load_base_model(config, placement)
    text_config = base.config.text_config
    if args.model == "smollm2":
        model_name = f"SmolLM2-135M-Instruct LLaVA (text hidden {text_config.hidden_size}, {text_config.num_hidden_layers} layers, tiny vision tower)"
    else:
        model_name = f"tiny LLaVA (text hidden {text_config.hidden_size}, {text_config.num_hidden_layers} layers)"
    model = attach_new_lora(base, LoraSettings(r=args.lora_r, alpha=2 * args.lora_r), seed=0)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.02 * torch.randn_like(p))
    model.eval()
    records = load_records(demo.pool, demo.image_root).records[: args.records]
    samples = list(encode_records(encoder, records, SkipLog()))
    pad = encoder.tokenizer.pad_token_id
    length = lambda sample: sample.input_ids.numel()  # noqa: E731
    grouped = list(length_grouped_batches(samples, args.batch, args.length_grouping, length))
    in_order = list(length_grouped_batches(samples, args.batch, 1, length))
    batches = [collate(b, pad) for b in grouped]
    batches_in_order = [collate(b, pad) for b in in_order]
    tokens = sum(length(s) for s in samples)
    padding = {name: 1 - tokens / sum(padded_tokens(length(s) for s in b) for b in parts) for name, parts in (("grouped", grouped), ("in order", in_order))}
    sketch = make_projector("countsketch", args.dim, seed=0)
    with PerSampleGradients(model) as hooks:
        dimension = hooks.dimension
    dense = BasicDenseProjector(dimension, args.dim, seed=0, budget_bytes=int(args.dense_budget_gib * 2**30), device=placement.device)
    trak = TrakBasicProjector(dimension, args.dim, 0, args.trak_proj_type, placement.device) if args.less_projector == "trak" else None
    loop_samples = samples[: args.loop_records or len(samples)]

    def ours(batches=batches) -> None:
        with PerSampleGradients(model) as hooks:
            for batch in batches:
                projected_features(hooks, batch, sketch, placement.device, placement.dtype)

    def ours_in_order() -> None:
        ours(batches_in_order)

    def less_loops() -> dict[str, float]:
        """Seconds of each LESS-style loop; with TRAK, the two alternate sample by sample (first
        one, then the other), so a noisy neighbour slows both alike."""
        projectors = {"ours-dense": dense} | ({"trak": trak} if trak else {})
        total = dict.fromkeys(projectors, 0.0)
        for i, sample in enumerate(loop_samples):
            for name in sorted(projectors, reverse=i % 2 == 1):
                total[name] += seconds(lambda p=projectors[name]: p.project(loop_gradients(model, [sample], pad, placement.device, placement.dtype)), placement.device)
        return total

    def loop_sketch() -> None:
        """Batch 1 like LESS, but with our CountSketch: isolates the batching gain."""
        for sample in loop_samples:
            flat = loop_gradients(model, [sample], pad, placement.device, placement.dtype)
            sketch.project_block(flat, 0, torch.zeros((1, args.dim), device=placement.device))

    def train_step() -> None:
        for batch in batches:
            model.zero_grad(set_to_none=True)
            with placement.forward_context():
                loss = per_sample_loss(model(**batch.model_inputs(placement.device, placement.dtype)).logits, batch.labels).mean()
            loss.backward()

    ours(), train_step(), loop_sketch()  # warm the projector caches and the allocator, as a long run would be
    rounds = [(seconds(ours, placement.device), seconds(train_step, placement.device), seconds(ours_in_order, placement.device)) for _ in range(args.rounds)]
    t_ours = statistics.median(o for o, _, _ in rounds)
    t_step = statistics.median(s for _, s, _ in rounds)
    ratios = sorted(o / s for o, s, _ in rounds)
    grouping_gain = statistics.median(u / o for o, _, u in rounds)
    t_loop_sketch = seconds(loop_sketch, placement.device)
    t_loops = less_loops()
    n, m = len(samples), len(loop_samples)
    per_ours, per_less, per_sketch = t_ours / n, t_loops["ours-dense"] / m, t_loop_sketch / m
    kept = "kept in memory" if dense.keeps_matrix else "generated per sample"
    gpu = f" ({torch.cuda.get_device_name(placement.device)}, {placement.dtype}, autocast {placement.autocast}, deterministic {args.deterministic})" if placement.device.type == "cuda" else ""
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, threads {args.threads}, device {placement.device}{gpu}")
    print(f"model: {model_name}, LoRA r={args.lora_r}, gradient dim {dimension:,} -> {args.dim}; {n} records, batch {args.batch}")
    if args.model == "smollm2":
        print(f"model folder: {model_dir} (ready in {build_seconds:.0f} s: built once, then reused)")
    print(f"padding share of the computed token positions: {padding['grouped']:.1%} length-grouped (windows of {args.length_grouping} batches), {padding['in order']:.1%} in input order")
    print(f"LESS-style loop (batch 1, dense matrix {kept}), {m} records: {1 / per_less:.3g} samples/s")
    if trak:
        per_trak = t_loops["trak"] / m
        print(f"LESS-style loop with TRAK's BasicProjector (batch 1, {trak.describe()}), {m} records: {1 / per_trak:.3g} samples/s")
    print(f"batch-1 loop with CountSketch, {m} records:                 {1 / per_sketch:.1f} samples/s")
    print(f"ours (batched hooks + CountSketch), median of {args.rounds} rounds:      {1 / per_ours:.1f} samples/s")
    print(f"plain training step on the same batches, median:         {n / t_step:.1f} samples/s")
    print(f"speed-up vs LESS-style loop: {per_less / per_ours:.1f}x (batching alone: {per_sketch / per_ours:.1f}x)")
    if trak:
        print(f"speed-up vs LESS-style loop with TRAK's BasicProjector: {per_trak / per_ours:.1f}x")
    print(f"length grouping vs input order (ours), median of per-round ratios: {grouping_gain:.2f}x")
    print(f"cost vs a training step: {statistics.median(ratios):.2f}x (rounds {ratios[0]:.2f}-{ratios[-1]:.2f})")

if __name__ == "__main__":
    main()
