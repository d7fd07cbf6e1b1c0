"""What the test-size demo produces, pinned so a restructuring cannot change it unnoticed.

``python tests/demo_pin.py HOME`` rewrites ``tests/data/demo_test_pin.json`` from a home
where ``icons-dagster demo --size test`` ran; do that only for a change that is meant to
alter the selection, and say why in the commit.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import polars as pl

PIN_FILE = Path(__file__).parent / "data" / "demo_test_pin.json"


def demo_outputs(home: Path) -> dict:
    """The ICONS subset (ids in rank order, every record's influence and votes) and OFA's."""
    icons = pl.read_parquet(Path(home) / "exports" / "selected_subset.parquet").sort("id")
    benchmarks = sorted(c.removeprefix("influence__") for c in icons.columns if c.startswith("influence__"))
    ofa = pl.read_parquet(Path(home) / "exports" / "ofa_selected_subset.parquet").sort("id")
    return {
        "icons_selected_in_rank_order": icons.filter("selected").sort("rank")["id"].to_list(),
        "ids": icons["id"].to_list(),
        "influence": {b: icons[f"influence__{b}"].to_list() for b in benchmarks},
        "votes": icons["votes"].to_list(),
        "ofa_selected_in_rank_order": ofa.filter("selected").sort("rank")["id"].to_list(),
        "ofa_confidence": ofa["confidence"].to_list(),
    }


if __name__ == "__main__":
    PIN_FILE.write_text(json.dumps(demo_outputs(Path(sys.argv[1])), indent=0) + "\n", encoding="utf-8")
    print(f"wrote {PIN_FILE}")
