"""Why is a sample in (or out of) the subset: its per-benchmark influence, votes and rank."""

from __future__ import annotations

import json
from typing import Any

import polars as pl

from icons_dagster.core.stages.icons import SUBSET_PARQUET
from icons_dagster.core.storage.artifacts import ArtifactStore
from icons_dagster.core.storage.refs import SubsetRef, VoteTableRef


def explain_sample(store: ArtifactStore, subset_ref: SubsetRef, vote_ref: VoteTableRef, sample_id: str) -> dict[str, Any]:
    """A sample's per-benchmark influence, threshold, vote and percentile, its votes and rank."""
    subset_dir = store.absolute(subset_ref.path)
    frame = pl.read_parquet(subset_dir / SUBSET_PARQUET)
    row = frame.filter(pl.col("id") == sample_id)
    if row.height == 0:
        raise KeyError(f"sample {sample_id!r} is not in the scored pool ({subset_dir / SUBSET_PARQUET})")
    thresholds = json.loads((store.absolute(vote_ref.path) / "thresholds.json").read_text(encoding="utf-8"))
    record = row.row(0, named=True)
    per_benchmark = {}
    for name in vote_ref.benchmarks:
        column = frame[f"influence__{name}"].to_numpy()
        value = record[f"influence__{name}"]
        per_benchmark[name] = {
            "influence": value,
            "threshold": thresholds[name],
            "vote": bool(record[f"vote__{name}"]),
            "percentile": float((column < value).mean()),
        }
    manifest = store.read_manifest(subset_dir)["metadata"]
    return {
        "id": sample_id,
        "selected": bool(record["selected"]),
        "rank": int(record["rank"]),
        "votes": int(record["votes"]),
        "n_pool": frame.height,
        "n_selected": manifest["n_selected"],
        "aggregation": manifest["aggregation"],
        "cutoff_value": manifest["cutoff_value"],
        "mean_percentile_rank": float(record["mean_percentile_rank"]),
        "reason": record.get("reason"),  # absent from subsets written before it (SUBSET_VERSION 1)
        "benchmarks": per_benchmark,
    }


def explanation_markdown(explanation: dict[str, Any]) -> str:
    verdict = "selected" if explanation["selected"] else "not selected"
    why = f" ({explanation['reason']})" if explanation.get("reason") else ""
    lines = [
        f"**{explanation['id']}**: {verdict}{why}, rank {explanation['rank']} of {explanation['n_pool']} "
        f"(the subset is the top {explanation['n_selected']}; the cutoff among the records not reserved by coverage: "
        f"{explanation['aggregation']} = {explanation['cutoff_value']}), "
        f"{explanation['votes']} vote(s), mean percentile rank {explanation['mean_percentile_rank']:.3f}",
        "",
        "| benchmark | influence | threshold | vote | percentile |",
        "|---|---|---|---|---|",
    ]
    for name, item in explanation["benchmarks"].items():
        lines.append(f"| {name} | {item['influence']:.4f} | {item['threshold']:.4f} | {'yes' if item['vote'] else 'no'} | {item['percentile']:.3f} |")
    return "\n".join(lines)
