"""Gradient featurization throughput: ours vs a LESS-style loop, and vs a plain training step.

Baselines in the same run, same model, same records, same thread count:
- LESS-style: batch 1, backward, flatten ``.grad``, dense Rademacher projection;
- ours: batched per-sample gradients from LoRA hooks, CountSketch fused per module;
- a plain training step (forward + backward of the batch loss) on the same batches.

Usage: python bench/featurization.py [--records 64] [--batch 16] [--dim 1024] [--threads 2]
       [--text-hidden 512 --text-layers 4]   # a mid-size language model instead of the demo's
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from icons_dagster.core.config import LoraSettings, ModelConfig  # noqa: E402
from icons_dagster.core.encoding import ConversationEncoder, collate, per_sample_loss  # noqa: E402
from icons_dagster.core.gradients import PerSampleGradients, loop_gradients, projected_features  # noqa: E402
from icons_dagster.core.model import attach_new_lora, load_base_model, load_processor, resolve_placement  # noqa: E402
from icons_dagster.core.projection import make_projector  # noqa: E402
from icons_dagster.core.records import load_records  # noqa: E402
from icons_dagster.core.samples import SkipLog, encode_records  # noqa: E402
from icons_dagster.demo.build import ensure_demo_model  # noqa: E402
from icons_dagster.demo.data import demo_corpus, generate_demo  # noqa: E402
from icons_dagster.demo.tiny_model import TinyModelSpec, build_tiny_llava  # noqa: E402


def timed(fn, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--lora-r", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--text-hidden", type=int, help="language-model width (default: the demo model's 64)")
    parser.add_argument("--text-layers", type=int, default=2)
    parser.add_argument("--skip-loop", action="store_true", help="skip the LESS-style loop (slow at large D)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    work = Path(tempfile.mkdtemp(prefix="icons-bench-"))
    demo = generate_demo(work / "demo", size="default")
    if args.text_hidden:
        spec = TinyModelSpec(text_hidden=args.text_hidden, text_layers=args.text_layers, intermediate=4 * args.text_hidden, text_heads=8, text_kv_heads=8)
        model_dir = build_tiny_llava(work / "model", demo_corpus("default"), spec)
    else:
        model_dir = ensure_demo_model(work)
    config = ModelConfig(str(model_dir), max_length=512)
    placement = resolve_placement(config)
    encoder = ConversationEncoder(load_processor(config), 512)
    model = attach_new_lora(load_base_model(config, placement), LoraSettings(r=args.lora_r, alpha=2 * args.lora_r), seed=0)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.02 * torch.randn_like(p))
    model.eval()
    records = load_records(demo.pool, demo.image_root).records[: args.records]
    samples = list(encode_records(encoder, records, SkipLog()))
    pad = encoder.tokenizer.pad_token_id
    batches = [collate(samples[i : i + args.batch], pad) for i in range(0, len(samples), args.batch)]
    sketch = make_projector("countsketch", args.dim, seed=0)
    dense = make_projector("rademacher", args.dim, seed=0)

    def ours() -> None:
        with PerSampleGradients(model) as hooks:
            for batch in batches:
                projected_features(hooks, batch, sketch, placement.device, placement.dtype)

    def less_loop() -> None:
        for sample in samples:
            flat = loop_gradients(model, [sample], pad, placement.device, placement.dtype)
            out = torch.zeros((1, args.dim))
            dense.project_block(flat, 0, out)

    def loop_sketch() -> None:
        """Batch 1 like LESS, but with our CountSketch: isolates the batching gain."""
        for sample in samples:
            flat = loop_gradients(model, [sample], pad, placement.device, placement.dtype)
            out = torch.zeros((1, args.dim))
            sketch.project_block(flat, 0, out)

    def train_step() -> None:
        for batch in batches:
            model.zero_grad(set_to_none=True)
            logits = model(**batch.model_inputs(placement.device, placement.dtype)).logits
            per_sample_loss(logits, batch.labels).mean().backward()

    ours()  # warm the projector caches and the allocator, as a long run would be
    t_ours, t_step = timed(ours), timed(train_step)
    loop_sketch()
    t_loop_sketch = timed(loop_sketch)
    t_less = float("nan") if args.skip_loop else timed(less_loop, repeats=1)
    with PerSampleGradients(model) as hooks:
        dimension = hooks.dimension
    n = len(samples)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads {args.threads}, device {placement.device}")
    print(f"model: tiny LLaVA (text hidden {args.text_hidden or 64}, {args.text_layers} layers), LoRA r={args.lora_r}, gradient dim {dimension:,} -> {args.dim}; {n} records, batch {args.batch}")
    print(f"LESS-style loop (batch 1, dense projection): {t_less:.3f} s ({n / t_less:.1f} samples/s)")
    print(f"ours (batched hooks + CountSketch):          {t_ours:.3f} s ({n / t_ours:.1f} samples/s)")
    print(f"batch-1 loop with CountSketch:               {t_loop_sketch:.3f} s ({n / t_loop_sketch:.1f} samples/s)")
    print(f"plain training step on the same batches:    {t_step:.3f} s")
    print(f"speed-up vs LESS-style loop: {t_less / t_ours:.1f}x (batching alone: {t_loop_sketch / t_ours:.1f}x); cost vs a training step: {t_ours / t_step:.2f}x")


if __name__ == "__main__":
    main()
