"""The evaluation suite on a user's own pool, benchmarks and checkpoint, not the demo's layout.

The files are rewritten from the test-size demo into what a user would hand us: a JSONL pool
with other ids and no task families, two benchmarks under other names (JSONL splits, images
in each benchmark's own folder), the model named by its local folder, and a chosen subset of
methods. Everything goes through the CLI (`run`, then `evaluate --methods`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import polars as pl
import pytest

from icons_dagster.cli import main
from icons_dagster.core.stages.evaluation import TABLE_FILE
from icons_dagster.core.storage.artifacts import ArtifactStore

RENAMED = {"vqa_short": "what_is_it", "long_answer": "describe"}
METHODS = ["full", "random-0", "icons", "icons-cover-50", "ofa"]


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def user_files(demo_paths, folder: Path) -> tuple[Path, Path]:
    """A JSONL pool (ids 'u<n>', no family field) and a benchmarks folder with renamed tasks."""
    pool = json.loads(Path(demo_paths.pool).read_text())
    write_jsonl(folder / "pool.jsonl", [{k: v for k, v in r.items() if k != "family"} | {"id": f"u{i}"} for i, r in enumerate(pool)])
    benchmarks = folder / "benchmarks"
    for name, new_name in RENAMED.items():
        source, target = Path(demo_paths.benchmarks) / name, benchmarks / new_name
        shutil.copytree(source / "images", target / "images")
        for split in ("val", "test"):
            records = json.loads((source / f"{split}.json").read_text())
            write_jsonl(target / f"{split}.jsonl", [{k: v for k, v in r.items() if k != "family"} | {"id": f"{new_name}-{split}-{i}"} for i, r in enumerate(records)])
    return folder / "pool.jsonl", benchmarks


@pytest.fixture(scope="module")
def user_home(demo_paths, tiny_model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("user")
    pool, benchmarks = user_files(demo_paths, folder)
    home = folder / "home"
    common = ["--home", str(home)]
    run = [
        "run", "--pool", str(pool), "--image-root", str(demo_paths.image_root), "--benchmarks", str(benchmarks),
        "--model", str(tiny_model_dir), "--method", "both", "--lora-r", "8", "--lora-alpha", "16",
        "--projection-dim", "256", "--warmup-ratio", "0.2", "--shards", "4",
    ]
    assert main(common + run) == 0
    assert main(common + ["evaluate", "--methods", ",".join(METHODS), "--epochs", "1"]) == 0
    return home


def test_the_suite_runs_on_a_users_pool_benchmarks_and_checkpoint(user_home, tiny_model_dir, capsys):
    table = pl.read_parquet(user_home / ArtifactStore(user_home).read_ref("evaluation_table").path / TABLE_FILE)
    # only the chosen methods, one column per user benchmark, Rel. relative to full
    assert sorted(table["method"].unique()) == sorted([*METHODS, "random (mean)"])
    assert sorted(table["benchmark"].unique()) == sorted(RENAMED.values())
    assert table.filter(pl.col("method") == "full")["rel"].unique().to_list() == [pytest.approx(1.0)]
    config = json.loads((user_home / "icons.json").read_text())
    assert config["model"]["name_or_path"] == str(tiny_model_dir)
    assert config["evaluation"]["methods"] == METHODS
    # the benchmarks' metrics come from their answers, not their names
    scores = json.loads((user_home / ArtifactStore(user_home).read_ref("benchmark_scores", "full").path / "scores.json").read_text())
    assert {b: s["metric"] for b, s in scores.items()} == {"what_is_it": "exact_match", "describe": "token_f1"}
    subsets = ArtifactStore(user_home).read_ref("evaluation_subsets")
    assert subsets.methods == METHODS
    # the pool has no families: the subsets report coverage, not family shares
    composition = json.loads((user_home / subsets.path / "_COMPLETE.json").read_text())["metadata"]
    assert "family_shares" not in composition and set(composition["benchmark_coverage"]) == set(METHODS) - {"full"}


def test_methods_outside_the_partitions_are_refused(tmp_path):
    from icons_dagster.resources import EvaluationResource

    with pytest.raises(ValueError, match="not evaluation partitions"):
        EvaluationResource(methods=["full", "random-9"]).config().partition_methods()
    with pytest.raises(ValueError, match="'full'"):
        EvaluationResource(methods=["icons"]).config()
    assert EvaluationResource(methods=["ofa", "full"]).config().partition_methods() == ("full", "ofa")  # partition order
