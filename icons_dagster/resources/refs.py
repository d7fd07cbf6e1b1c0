"""An IO manager that passes small JSON references to artifacts between assets.

Assets write their real outputs (Parquet, npy, safetensors, JSON) into the store and
return a typed reference (``core/storage/refs.py``: fingerprint, path relative to the
store root, counts). This IO manager keeps it as JSON through the store, never a pickle.
A downstream input declared with ``ALL_PARTITIONS`` metadata always receives
``{partition_key: ref}``, even when one partition is mapped (UPathIOManager would hand over a bare object then); a missing
upstream partition is a clear error naming it. ``MATERIALIZED_PARTITIONS`` hands over only
the partitions materialized so far (the asset decides which it needs). An asset that
materializes several partitions in one run (a single-run backfill policy) returns
``PartitionRefs``, one reference per partition of the run, each stored on its own.

With a shared store (``remote``, an fsspec URL) the references are written there too and
read from there, so a run on another machine sees the upstream runs' outputs.
"""

from __future__ import annotations

import functools

from dagster import ConfigurableIOManager, InputContext, OutputContext

from icons_dagster.core.storage.artifacts import ArtifactStore
from icons_dagster.core.storage.refs import Ref

ALL_PARTITIONS = {"all_partitions": True}
MATERIALIZED_PARTITIONS = {"all_partitions": True, "materialized_only": True}


@functools.lru_cache(maxsize=8)
def _store(root: str, remote: str) -> ArtifactStore:
    """One store per (root, URL) for the process (the IO manager asks for it on every call)."""
    return ArtifactStore(root, remote or None)


class PartitionRefs(dict):
    """``{partition_key: ref}`` for every partition a run materialized (the type tells the
    IO manager it holds several references, not one)."""


class ArtifactRefIOManager(ConfigurableIOManager):
    root: str
    remote: str = ""  # fsspec URL of the shared store; empty = this machine only

    def _store(self) -> ArtifactStore:
        return _store(self.root, self.remote)

    def handle_output(self, context: OutputContext, obj: Ref | PartitionRefs) -> None:
        name = context.asset_key.to_user_string()
        if not isinstance(obj, (Ref, PartitionRefs)):
            raise TypeError(f"asset {name} must return a reference (storage/refs.py), got {type(obj).__name__}")
        keys = sorted(context.asset_partition_keys) if context.has_asset_partitions else [None]
        if isinstance(obj, PartitionRefs):
            if sorted(obj) != keys:
                raise ValueError(f"asset {name} returned references for {sorted(obj)} but the run materializes {keys}")
            refs = dict(obj)
        elif len(keys) == 1:
            refs = {keys[0]: obj}
        else:
            raise ValueError(f"asset {name} materializes {len(keys)} partitions in this run: return PartitionRefs, one reference each")
        for partition, ref in refs.items():  # all checked before any is written
            if not isinstance(ref, Ref):
                raise TypeError(f"asset {name}[{partition}] must return a reference (storage/refs.py), got {type(ref).__name__}")
        for partition, ref in refs.items():
            self._store().write_ref(name, partition, ref)

    def load_input(self, context: InputContext):
        name = context.asset_key.to_user_string()
        store = self._store()
        if not context.has_asset_partitions:
            return store.read_ref(name)
        keys = list(context.asset_partition_keys)
        metadata = context.definition_metadata or {}
        if metadata.get("all_partitions"):
            if metadata.get("materialized_only"):
                keys = [key for key in keys if store.has_ref(name, key)]
            return {key: store.read_ref(name, key) for key in sorted(keys)}
        if len(keys) != 1:
            raise ValueError(f"input {name} maps {len(keys)} partitions; declare it with ALL_PARTITIONS metadata")
        return store.read_ref(name, keys[0])
