"""What every run pays before any gradient, at LLaVA-665K scale: the ``training_pool`` stage.

Each run (adding a benchmark included) starts with the pool stage: it parses and validates
the pool file, stats every image and looks its sha256 up in the home's image-hash cache,
fingerprints the lot, and only then finds its artifact and reuses it. This bench measures
that fixed cost on a LLaVA-665K-shaped pool, against the floor any reader of the file pays
(``json.load`` alone) in the same run.

1. Generates (seeded, once, into --dir) a pool of --rows LLaVA-format records over --images
   image files in five source folders named as LLaVA-1.5's are; 6% of the records are
   text-only; 1-4 turns each, about as long as LLaVA's (the file is ~0.5 KB per record).
   The images are one tiny valid PNG written under every name (the stage reads their
   headers and hashes their bytes; their pixels do not matter here).
2. In fresh subprocesses (so one run's memory never counts in the next): ``json.load`` of the
   file; the first ``stage_pool`` on an empty home (every image hashed, every header read, the
   manifest written); the second (reused), twice, with its parts also timed alone:
   ``load_records``, the image-hash cache lookups and the stage as a whole.
3. With ``--baseline-rev REV``, the reused stage of the code at git revision REV too (a
   worktree, imported instead of this tree), interleaved with ours: a before/after in one run.

Usage: python bench/pool_scale.py [--rows 665000] [--images 300000] [--dir /tmp/icons-pool-scale]
       [--baseline-rev REV] [--keep]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import shutil
import subprocess
import time
from pathlib import Path

from consensus_scale import Meter, machine
from consensus_scale import spawn as run_child

DEFAULT_DIR = "/tmp/icons-pool-scale"
SOURCES = ("coco/train2017", "gqa/images", "ocr_vqa/images", "textvqa/train_images", "vg/VG_100K")
WORDS = "the a image shows what color is of on in left right person table car sign text written number how many there".split()


def _sentence(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def generate(root: Path, rows: int, images: int, seed: int = 0) -> dict:
    from PIL import Image

    t0 = time.perf_counter()
    rng = random.Random(seed)
    png = io.BytesIO()
    Image.new("RGB", (8, 8), (120, 30, 200)).save(png, format="PNG")
    names = [f"{SOURCES[k % len(SOURCES)]}/{k:09d}.png" for k in range(images)]
    for folder in SOURCES:
        (root / "images" / folder).mkdir(parents=True, exist_ok=True)
    for name in names:
        (root / "images" / name).write_bytes(png.getvalue())
    with open(root / "pool.json", "w", encoding="utf-8") as f:
        f.write("[")
        for i in range(rows):
            turns = []
            for t in range(rng.choice((1, 1, 2, 3, 4))):
                question = _sentence(rng, 6, 20) + "?"
                turns += [{"from": "human", "value": ("<image>\n" if t == 0 else "") + question}, {"from": "gpt", "value": _sentence(rng, 1, 40)}]
            record = {"id": f"r{i:09d}", "conversations": turns}
            if rng.random() >= 0.06:
                record["image"] = names[rng.randrange(images)]
            else:
                turns[0]["value"] = turns[0]["value"].replace("<image>\n", "")
            f.write(("," if i else "") + json.dumps(record))
        f.write("]")
    spec = {"rows": rows, "images": images, "seed": seed, "pool_bytes": (root / "pool.json").stat().st_size, "generation_s": time.perf_counter() - t0}
    (root / "spec.json").write_text(json.dumps(spec, indent=2))
    return spec


def child(cfg: dict) -> dict:
    from icons_dagster.core.data.image_hashes import ImageHashCache
    from icons_dagster.core.data.records import load_records
    from icons_dagster.core.stages.icons import stage_pool
    from icons_dagster.core.storage.artifacts import ArtifactStore

    root, home = Path(cfg["dir"]), Path(cfg["home"])
    pool, images = root / "pool.json", root / "images"
    meter = Meter()
    if cfg["mode"] == "json":
        meter.run("json.load of the pool file", lambda: len(json.loads(pool.read_bytes())))
    else:
        store = ArtifactStore(home)
        if cfg["mode"] == "parts":
            loaded = meter.run("load_records (parse, validate, stat images)", lambda: load_records(pool, images))
            meter.run("image-hash cache lookups", lambda: ImageHashCache(store.image_hash_cache).contents(loaded.records))
            del loaded
        result = meter.run("stage_pool", lambda: stage_pool(store, pool, images, num_shards=16))
        assert result.metadata["reused"] == (cfg["mode"] != "first"), result.metadata["reused"]
    return {"stages": meter.stages, "maxrss_mib": meter.process_peak_mib()}


def spawn(cfg: dict, source: Path | None = None) -> dict:
    """A child run importing ``icons_dagster`` from this tree, or from ``source`` (a worktree)."""
    env = {**os.environ, "PYTHONPATH": str(source)} if source is not None else None
    return run_child(cfg, __file__, env)


def baseline_tree(rev: str) -> Path:
    """A detached worktree of ``rev`` beside the data (its code only: this venv runs it)."""
    tree = Path(DEFAULT_DIR + "-baseline")
    subprocess.run(["git", "worktree", "remove", "--force", str(tree)], capture_output=True, check=False)
    subprocess.run(["git", "worktree", "add", "--detach", str(tree), rev], capture_output=True, check=True)
    return tree


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=665_000)
    parser.add_argument("--images", type=int, default=300_000)
    parser.add_argument("--dir", default=DEFAULT_DIR)
    parser.add_argument("--keep", action="store_true", help="keep the generated pool and images")
    parser.add_argument("--baseline-rev", help="also time the reused stage of this git revision, interleaved")
    parser.add_argument("--_child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._child:
        print(json.dumps(child(json.loads(args._child))))
        return
    root = Path(args.dir)
    spec_path = root / "spec.json"
    spec = json.loads(spec_path.read_text()) if spec_path.exists() else None
    if spec is None or (spec["rows"], spec["images"]) != (args.rows, args.images):
        shutil.rmtree(root, ignore_errors=True)
        print(f"generating {args.rows:,} records over {args.images:,} images under {root} ...", flush=True)
        spec = generate(root, args.rows, args.images)
    home = root / "home"
    shutil.rmtree(home, ignore_errors=True)
    base = {"dir": str(root), "home": str(home)}
    runs = {"json": spawn({**base, "mode": "json"}), "first": spawn({**base, "mode": "first"})}
    baseline = baseline_tree(args.baseline_rev) if args.baseline_rev else None
    runs["reused"], runs["baseline"] = [], []
    for _ in range(2):  # interleaved: ours, then the baseline's
        runs["reused"].append(spawn({**base, "mode": "reused"}))
        if baseline is not None:
            runs["baseline"].append(spawn({**base, "mode": "reused"}, baseline))
    runs["parts"] = spawn({**base, "mode": "parts"})

    print("\n## The pool stage at LLaVA-665K scale (`bench/pool_scale.py`)\n")
    print(f"Machine: {machine().format(threads=2)}.")
    print(
        f"Pool: {spec['rows']:,} records ({spec['pool_bytes'] / 2**20:.0f} MiB of JSON, 6% text-only) over {spec['images']:,} image files "
        f"in {len(SOURCES)} folders; generated in {spec['generation_s']:.0f} s. Page cache warm (the files were just written).\n"
    )
    print("| run | stage | wall | CPU | peak RSS |")
    print("|---|---|---|---|---|")
    labels = (("json", "floor: the file parsed, nothing else"), ("first", "first run: every image hashed and its header read"))
    for key, label in labels:
        for name, s in runs[key]["stages"].items():
            print(f"| {label} | {name} | {s['wall_s']:.2f} s | {s['cpu_s']:.2f} s | {s['peak_rss_mib']:.0f} MiB |")
    for i, run in enumerate(runs["reused"]):
        (s,) = run["stages"].values()
        print(f"| rerun {i + 1}: reused | stage_pool | {s['wall_s']:.2f} s | {s['cpu_s']:.2f} s | {s['peak_rss_mib']:.0f} MiB |")
    for i, run in enumerate(runs["baseline"]):
        (s,) = run["stages"].values()
        print(f"| rerun {i + 1}, the code at {args.baseline_rev}: reused | stage_pool | {s['wall_s']:.2f} s | {s['cpu_s']:.2f} s | {s['peak_rss_mib']:.0f} MiB |")
    for name, s in runs["parts"]["stages"].items():
        print(f"| rerun 3, its parts | {name} | {s['wall_s']:.2f} s | {s['cpu_s']:.2f} s | {s['peak_rss_mib']:.0f} MiB |")
    floor = runs["json"]["stages"]["json.load of the pool file"]["wall_s"]
    reuse = min(run["stages"]["stage_pool"]["wall_s"] for run in runs["reused"])
    first = runs["first"]["stages"]["stage_pool"]["wall_s"]
    print(f"\n- A rerun's pool stage (reused): {reuse:.2f} s, **{reuse / floor:.1f}x** the bare json.load ({floor:.2f} s) and "
          f"{first / reuse:.1f}x less than the first run ({first:.2f} s).")
    if baseline is not None:
        before = min(run["stages"]["stage_pool"]["wall_s"] for run in runs["baseline"])
        print(f"- Against the code at {args.baseline_rev} in the same run: {before:.2f} s, **{before / reuse:.2f}x** (best of two each).")
        subprocess.run(["git", "worktree", "remove", "--force", str(baseline)], capture_output=True, check=False)
    if not args.keep:
        shutil.rmtree(root)
        print(f"- deleted {root}")


if __name__ == "__main__":
    main()
