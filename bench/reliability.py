"""Reliability: a corpus of bad inputs, checked at ``validate`` and end to end (issue 19).

    python bench/reliability.py [--out bench_out/reliability]

Builds the test-size demo world and the random tiny LLaVA under ``--out``, then a pool of
the demo's good records plus one bad record per case below (each with its own id), and
four whole files that cannot be read. Counts, per case:
  - ``validate``: the record (or file) is reported, by id (or file), with a reason;
  - end to end: ``icons-dagster run`` on that pool finishes, and the record is among the
    skipped ones of ``training_pool`` or of the gradient features (a body that only fails
    to decode), never in the subset; a bad whole file stops the run with one line naming it.
Kill points and corruptions are counted by ``tests/test_faults.py`` (nine SIGKILL points,
four kinds of damage); this script prints the input side. Two cores: a few minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from PIL import Image

REPO = Path(__file__).resolve().parents[1]
QUESTION = [{"from": "human", "value": "<image>\nWhat is shown?"}, {"from": "gpt", "value": "A shape."}]


def _cases(images: Path, outside: Path) -> list[tuple[str, dict, str]]:
    """(id, record, where it must be caught: "validate" = at validate and in training_pool)."""
    Image.new("RGB", (8, 8), "red").save(images / "ok.png")
    Image.new("RGB", (64, 64), "green").save(images / "full.png")
    (images / "truncated.png").write_bytes((images / "full.png").read_bytes()[:80])
    (images / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"garbage" * 20)
    (images / "empty.png").write_bytes(b"")
    (images / "text.png").write_text("not an image")
    Image.new("1", (9000, 5000)).save(images / "bomb.png")
    Image.new("RGB", (8, 8)).save(outside / "secret.png")
    (images / "escape_link.png").symlink_to(outside / "secret.png")
    (images / "folder.png").mkdir()
    text = [{"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "Hi."}]
    bad = {
        "missing id": {"image": "ok.png", "conversations": QUESTION},
        "empty id": {"id": "", "image": "ok.png", "conversations": QUESTION},
        "id is a list": {"id": ["x"], "image": "ok.png", "conversations": QUESTION},
        "duplicate id": {"id": "bad-duplicate", "image": "ok.png", "conversations": QUESTION},
        "no conversations": {"image": "ok.png"},
        "conversations not a list": {"image": "ok.png", "conversations": "hello"},
        "empty conversations": {"image": "ok.png", "conversations": []},
        "no answer turn": {"image": "ok.png", "conversations": QUESTION[:1]},
        "trailing human turn": {"image": "ok.png", "conversations": [*QUESTION, QUESTION[0] | {"value": "And?"}]},
        "unknown role": {"image": "ok.png", "conversations": [QUESTION[0], {"from": "system", "value": "x"}]},
        "value not a string": {"image": "ok.png", "conversations": [QUESTION[0], {"from": "gpt", "value": 3}]},
        "empty answer": {"image": "ok.png", "conversations": [QUESTION[0], {"from": "gpt", "value": ""}]},
        "no <image> in an image record": {"image": "ok.png", "conversations": text},
        "<image> in a text record": {"conversations": QUESTION},
        "two <image>": {"image": "ok.png", "conversations": [{"from": "human", "value": "<image>\n<image>\nQ?"}, QUESTION[1]]},
        "a list of images": {"image": ["ok.png", "ok.png"], "conversations": QUESTION},
        "absolute image path": {"image": str(outside / "secret.png"), "conversations": QUESTION},
        "'..' in the image path": {"image": "../outside/secret.png", "conversations": QUESTION},
        "symlink out of the root": {"image": "escape_link.png", "conversations": QUESTION},
        "missing image file": {"image": "nowhere.png", "conversations": QUESTION},
        "image path is a folder": {"image": "folder.png", "conversations": QUESTION},
        "corrupt JPEG": {"image": "corrupt.jpg", "conversations": QUESTION},
        "empty image file": {"image": "empty.png", "conversations": QUESTION},
        "text file named .png": {"image": "text.png", "conversations": QUESTION},
        "45M-pixel bomb": {"image": "bomb.png", "conversations": QUESTION},
        "truncated PNG body": {"image": "truncated.png", "conversations": QUESTION},
        "not an object": None,
    }
    cases = []
    for n, (name, record) in enumerate(bad.items()):
        rid = f"bad-{n:02d}"
        if record is not None and "id" not in record and name != "missing id":
            record = {"id": rid, **record}
        if name == "duplicate id":
            rid = "bad-duplicate"
        cases.append((name, record if record is not None else ["not", "an", "object"], rid))
    return cases


BAD_FILES = {
    "malformed JSON": '[{"id": "a", "conversations": [',
    "top level not a list": '{"id": "a"}',
    "not UTF-8": b"\xff\xfe[\x00]\x00",
    "unsupported extension": "[]",
}


def _cli(home: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "DAGSTER_DISABLE_TELEMETRY": "1"}
    return subprocess.run([sys.executable, "-m", "icons_dagster.cli", "--home", str(home), *args], env=env, cwd=REPO, capture_output=True, text=True, check=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench_out/reliability"))
    out = parser.parse_args().out.resolve()
    shutil.rmtree(out, ignore_errors=True)
    from icons_dagster.demo.build import ensure_demo_model
    from icons_dagster.demo.data import generate_demo

    demo = generate_demo(out / "demo", size="test")
    model = ensure_demo_model(out / "model")
    images, outside = demo.image_root, out / "outside"
    outside.mkdir()
    cases = _cases(images, outside)
    good = json.loads(demo.pool.read_text(encoding="utf-8"))
    duplicate_first = {"id": "bad-duplicate", "image": "ok.png", "conversations": QUESTION}
    pool = out / "pool.json"
    pool.write_text(json.dumps([*good, duplicate_first, *(record for _, record, _ in cases)]), encoding="utf-8")

    checked = _cli(out / "home", "validate", "--pool", str(pool), "--image-root", str(images))
    lines = checked.stdout.splitlines()
    at_validate = {}
    for n, (name, _, rid) in enumerate(cases):
        index = len(good) + 1 + n  # record number in the file
        at_validate[name] = any(f"record #{index} " in line for line in lines)
    files_at_validate = {}
    for name, content in BAD_FILES.items():
        path = out / ("bad.txt" if name == "unsupported extension" else f"bad-{len(files_at_validate)}.json")
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        result = _cli(out / "home", "validate", "--pool", str(path))
        files_at_validate[name] = (result.returncode != 0 and str(path) in result.stdout + result.stderr, path)

    home = out / "home"
    run = _cli(home, "run", "--pool", str(pool), "--image-root", str(images), "--benchmarks", str(demo.benchmarks),
               "--model", str(model), "--projection-dim", "256", "--shards", "2")  # fmt: skip
    end_to_end = {}
    if run.returncode == 0:
        manifest = next((home / "artifacts" / "training_pool").rglob("problems.json"))
        skipped_pool = {p["index"] for p in json.loads(manifest.read_text())}
        skipped_features = set()
        for report in (home / "artifacts" / "training_gradients").rglob("_COMPLETE.json"):
            skipped_features |= {entry["id"] for entry in json.loads(report.read_text())["metadata"].get("skipped", [])}
        subset = {r["id"] for r in json.loads((home / "exports" / "selected_subset.json").read_text())}
        for n, (name, _, rid) in enumerate(cases):
            index = len(good) + 1 + n
            handled = index in skipped_pool or rid in skipped_features
            end_to_end[name] = handled and (rid not in subset or name == "duplicate id")
    files_end_to_end = {}
    for name, (_, path) in files_at_validate.items():
        result = _cli(out / "home-files", "run", "--pool", str(path), "--image-root", str(images), "--benchmarks", str(demo.benchmarks),
                      "--model", str(model), "--projection-dim", "256")  # fmt: skip
        tail = [line for line in result.stderr.split("\n") if line.startswith("run: ")]
        files_end_to_end[name] = result.returncode == 1 and len(tail) == 1 and str(path) in tail[0] and "Traceback" not in result.stderr

    print(f"records: {len(cases)} bad cases in a pool of {len(good)} good ones; run exit {run.returncode}")
    print("| case | validate | end to end |\n|---|---|---|")
    for name, _, _ in cases:
        print(f"| {name} | {'yes' if at_validate[name] else 'NO'} | {'yes' if end_to_end.get(name) else 'NO'} |")
    for name in BAD_FILES:
        print(f"| file: {name} | {'yes' if files_at_validate[name][0] else 'NO'} | {'yes' if files_end_to_end[name] else 'NO'} |")
    n = len(cases) + len(BAD_FILES)
    print(f"handled at validate: {sum(at_validate.values()) + sum(v for v, _ in files_at_validate.values())} of {n}; "
          f"end to end: {sum(end_to_end.values()) + sum(files_end_to_end.values())} of {n}")  # fmt: skip
    if run.returncode != 0:
        print(run.stderr[-3000:])


if __name__ == "__main__":
    main()
