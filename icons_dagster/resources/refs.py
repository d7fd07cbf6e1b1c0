"""An IO manager that passes small JSON references to artifacts between assets.

Assets write their real outputs (Parquet, npy, safetensors, JSON) into the store and
return a reference dict (fingerprint, path relative to the store root, counts). This IO
manager keeps that dict as JSON, never a pickle. A downstream input declared with
``ALL_PARTITIONS`` metadata always receives ``{partition_key: ref}``, even when one
partition is mapped (UPathIOManager would hand over a bare object then); a missing
upstream partition is a clear error naming it. ``MATERIALIZED_PARTITIONS`` hands over only
the partitions materialized so far (the asset decides which it needs). An asset that
materializes several partitions in one run (a single-run backfill policy) returns
``PartitionRefs``, one reference per partition of the run, each stored on its own.

With a shared store (``remote``, an fsspec URL) the references are written there too and
read from there, so a run on another machine sees the upstream runs' outputs.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

from dagster import ConfigurableIOManager, InputContext, OutputContext

from icons_dagster.core.store import RemoteStore, write_json

ALL_PARTITIONS = {"all_partitions": True}
MATERIALIZED_PARTITIONS = {"all_partitions": True, "materialized_only": True}
UNPARTITIONED = "__unpartitioned__"


@functools.lru_cache(maxsize=8)
def _remote_store(url: str) -> RemoteStore:
    """One RemoteStore per URL for the process (the IO manager asks for it on every call)."""
    return RemoteStore(url)


class PartitionRefs(dict):
    """``{partition_key: ref}`` for every partition a run materialized (a plain JSON dict
    underneath; the type tells the IO manager it holds several references, not one)."""


def read_ref(root: str | Path, asset: str, partition: str | None = None) -> dict:
    """The current reference of an asset (partition), as the IO manager stored it."""
    path = Path(root) / "refs" / asset / f"{partition or UNPARTITIONED}.json"
    if not path.is_file():
        raise FileNotFoundError(f"{asset}{f'[{partition}]' if partition else ''} has not been materialized yet (no reference at {path})")
    return json.loads(path.read_text(encoding="utf-8"))


class ArtifactRefIOManager(ConfigurableIOManager):
    root: str
    remote: str = ""  # fsspec URL of the shared store; empty = this machine only

    def _relative(self, asset_path: list[str], partition: str | None) -> str:
        return f"refs/{'/'.join(asset_path)}/{partition or UNPARTITIONED}.json"

    def _path(self, asset_path: list[str], partition: str | None) -> Path:
        return Path(self.root) / self._relative(asset_path, partition)

    def _remote(self) -> RemoteStore | None:
        return _remote_store(self.remote) if self.remote else None

    def handle_output(self, context: OutputContext, obj: dict) -> None:
        name = context.asset_key.to_user_string()
        if not isinstance(obj, dict):
            raise TypeError(f"asset {name} must return a reference dict, got {type(obj).__name__}")
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
            if not isinstance(ref, dict):
                raise TypeError(f"asset {name}[{partition}] must return a reference dict, got {type(ref).__name__}")
        for partition, ref in refs.items():
            path = self._path(context.asset_key.path, partition)
            path.parent.mkdir(parents=True, exist_ok=True)
            write_json(path, ref)
            if (remote := self._remote()) is not None:
                remote.write_text(self._relative(context.asset_key.path, partition), path.read_text(encoding="utf-8"))

    def _exists(self, asset_path: list[str], partition: str | None) -> bool:
        remote = self._remote()
        return remote.has_file(self._relative(asset_path, partition)) if remote else self._path(asset_path, partition).is_file()

    def _read(self, asset_path: list[str], partition: str | None, asset_name: str) -> dict:
        remote = self._remote()
        if remote is None:
            return read_ref(self.root, "/".join(asset_path), partition)
        relative = self._relative(asset_path, partition)
        if not remote.has_file(relative):
            raise FileNotFoundError(f"{asset_name}{f'[{partition}]' if partition else ''} has not been materialized yet (no reference at {remote.url}/{relative})")
        return json.loads(remote.read_text(relative))

    def load_input(self, context: InputContext):
        asset_path = context.asset_key.path
        name = context.asset_key.to_user_string()
        if not context.has_asset_partitions:
            return self._read(asset_path, None, name)
        keys = list(context.asset_partition_keys)
        metadata = context.definition_metadata or {}
        if metadata.get("all_partitions"):
            if metadata.get("materialized_only"):
                keys = [key for key in keys if self._exists(asset_path, key)]
            return {key: self._read(asset_path, key, name) for key in sorted(keys)}
        if len(keys) != 1:
            raise ValueError(f"input {name} maps {len(keys)} partitions; declare it with ALL_PARTITIONS metadata")
        return self._read(asset_path, keys[0], name)
