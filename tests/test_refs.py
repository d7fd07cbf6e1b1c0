"""The refs IO manager with several partitions in one run (a single-run backfill)."""

from __future__ import annotations

import json

import pytest
from dagster import BackfillPolicy, DagsterInstance, DynamicPartitionsDefinition, asset, materialize

from icons_dagster.partitions import partition_range_tags
from icons_dagster.resources.refs import ArtifactRefIOManager, PartitionRefs
from icons_dagster.core.storage.artifacts import ArtifactStore
from icons_dagster.core.storage.refs import InfluenceRef, make_ref


def ref(key: str) -> InfluenceRef:
    return InfluenceRef(stage="task_influence", fingerprint=f"fp-{key}", path=f"artifacts/task_influence/fp-{key}/{key}", benchmark=key)

PARTS = DynamicPartitionsDefinition(name="refs_test_benchmarks")


def _run(tmp_path, returned):
    @asset(partitions_def=PARTS, backfill_policy=BackfillPolicy.single_run(), io_manager_key="refs")
    def scored(context):
        return returned(context.partition_keys)

    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(PARTS.name, ["a", "b", "c"])
    return materialize(
        [scored], instance=instance, resources={"refs": ArtifactRefIOManager(root=str(tmp_path))},
        tags=partition_range_tags("a", "b"), raise_on_error=False,
    )


def _error(result) -> str:
    (failure,) = [e for e in result.all_events if e.is_step_failure]
    error = failure.step_failure_data.error
    return error.cause.message if error.cause else error.message


def test_each_partition_of_the_run_gets_its_own_reference(tmp_path):
    result = _run(tmp_path, lambda keys: PartitionRefs({k: ref(k) for k in keys}))
    assert result.success
    assert ArtifactStore(tmp_path).read_ref("scored", "a") == ref("a")  # typed again when read
    assert json.loads((tmp_path / "refs" / "scored" / "b.json").read_text())["fingerprint"] == "fp-b"
    assert not (tmp_path / "refs" / "scored" / "c.json").exists()  # not in the run's range


@pytest.mark.parametrize(
    ("returned", "message"),
    [
        (lambda keys: ref("a"), "materializes 2 partitions in this run: return PartitionRefs"),
        (lambda keys: PartitionRefs({"a": ref("a")}), "returned references for ['a'] but the run materializes ['a', 'b']"),
        (lambda keys: PartitionRefs({"a": ref("a"), "b": {"fingerprint": "x"}}), "scored[b] must return a reference (storage/refs.py), got dict"),
    ],
)
def test_a_run_that_returns_the_wrong_references_fails_clearly(tmp_path, returned, message):
    result = _run(tmp_path, returned)
    assert not result.success
    assert message in _error(result)
    assert not (tmp_path / "refs" / "scored").exists()  # nothing written, not even the valid partition


def test_a_reference_names_its_fields_and_a_misspelt_one_fails_the_writer():
    typed = make_ref("vote_table", "fp", "artifacts/vote_table/fp", True, {"benchmarks": ["a", "b"], "n_samples": 3})
    assert (type(typed).__name__, typed.benchmarks, typed.n_samples, typed.reused) == ("VoteTableRef", ["a", "b"], 3, True)
    with pytest.raises(TypeError, match=r"vote_table: VoteTableRef has no field\(s\) \['benchmark'\]"):
        make_ref("vote_table", "fp", "p", False, {"benchmark": ["a"]})
