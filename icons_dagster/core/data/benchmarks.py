"""Which benchmark folders are usable, new, invalid or gone (for the folder sensor and the CLI)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from icons_dagster.core.config import DEFAULT_MAX_IMAGE_PIXELS
from icons_dagster.core.data.records import LoadedRecords, RecordFileError, benchmark_image_root, load_records, screen_images, split_file


@dataclass(frozen=True)
class BenchmarkScan:
    present: list[str] = field(default_factory=list)  # valid benchmark folders, sorted
    new: list[str] = field(default_factory=list)  # valid and not yet registered
    removed: list[str] = field(default_factory=list)  # registered but the folder is gone
    invalid: dict[str, str] = field(default_factory=dict)  # folder -> why it is not registered


def load_benchmark(
    benchmarks_dir: Path, name: str, default_image_root: Path | None, split: str = "val", max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
) -> LoadedRecords:
    """A benchmark's split (validation by default), images resolved against its own images/ or
    the shared root, each image's header checked against the pixel limit (as the pool's)."""
    folder = Path(benchmarks_dir) / name
    path = split_file(folder, split)
    if path is None:
        raise FileNotFoundError(f"no {split}.json or {split}.jsonl in {folder}")
    return screen_images(load_records(path, benchmark_image_root(folder, default_image_root)), max_image_pixels)


# A benchmark folder's own description: {"answers": <kind>} names how its test split is
# scored (core/evaluation/metrics.py ANSWER_KINDS) instead of inferring it from the answers.
DESCRIPTION_FILE = "benchmark.json"


def declared_answers(folder: Path) -> str | None:
    """The answer kind ``<folder>/benchmark.json`` declares, or None (inferred from the answers)."""
    path = Path(folder) / DESCRIPTION_FILE
    if not path.is_file():
        return None
    try:
        description = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: malformed JSON ({error})") from error
    if not isinstance(description, dict) or set(description) - {"answers"}:
        raise ValueError(f'{path}: expected {{"answers": <kind>}}, got {description!r}')
    answers = description.get("answers")
    if answers is not None and not isinstance(answers, str):
        raise ValueError(f"{path}: answers must be a string naming an answer kind, got {answers!r}")
    return answers


def benchmark_problem(folder: Path, default_image_root: Path | None) -> str | None:
    """Why ``folder`` cannot serve as a benchmark, or None when its validation set is usable."""
    try:
        declared_answers(folder)
        loaded = load_benchmark(folder.parent, folder.name, default_image_root)
    except (RecordFileError, OSError, ValueError) as error:
        return str(error)
    if not loaded.records:
        first = "; ".join(str(p) for p in loaded.problems[:3])
        return f"{loaded.path}: no valid validation record ({len(loaded.problems)} invalid, e.g. {first})"
    return None


def scan_benchmarks(benchmarks_dir: str | Path, default_image_root: Path | None, registered: Iterable[str]) -> BenchmarkScan:
    """Validate only folders that are not registered yet (a tick stays cheap); report the rest."""
    root = Path(benchmarks_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"benchmarks folder not found: {root}")
    known = set(registered)
    folders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    present, new, invalid = [], [], {}
    for name in folders:
        if name in known:
            present.append(name)
            continue
        problem = benchmark_problem(root / name, default_image_root)
        if problem is None:
            present.append(name)
            new.append(name)
        else:
            invalid[name] = problem
    removed = sorted(known - set(folders))
    return BenchmarkScan(present=present, new=new, removed=removed, invalid=invalid)
