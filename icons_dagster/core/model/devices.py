"""One GPU per run on a multi-GPU machine: a lease taken with a file lock.

Why: on one box, Dagster's run queue decides how many shard runs go at once
(``max_concurrent_runs`` or a tag limit = the number of GPUs) and launches each run as its
own process, but it does not say which GPU a run should use. With ``device:
"cuda:lease"`` each run process takes the first GPU whose lock file it can lock and holds
it until the process ends (the OS releases the lock even when the process is killed), so
two concurrent runs never share a GPU and a crashed run never leaves its GPU taken.
"""

from __future__ import annotations

import fcntl
import os
import tempfile
from pathlib import Path

LEASE_DEVICE = "cuda:lease"
LOCK_DIR_ENV = "ICONS_GPU_LOCK_DIR"

_held: dict[tuple[str, int], int] = {}  # (lock dir, device index) -> open file descriptor


def lock_dir() -> Path:
    return Path(os.environ.get(LOCK_DIR_ENV) or Path(tempfile.gettempdir()) / "icons-gpu-leases")


def lease_device(n_devices: int, directory: Path | None = None) -> int:
    """Index of a device this process now holds (the same one on later calls)."""
    folder = Path(directory or lock_dir())
    for (held_dir, index), _ in _held.items():
        if held_dir == str(folder):
            return index
    if n_devices < 1:
        raise RuntimeError("cuda:lease needs at least one CUDA device; none is visible")
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(n_devices):
        fd = os.open(folder / f"gpu-{index}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        _held[(str(folder), index)] = fd
        return index
    raise RuntimeError(
        f"all {n_devices} GPUs are leased by other runs (locks in {folder}); "
        "limit concurrent shard runs to the number of GPUs (deploy/single-machine/dagster.yaml)"
    )


def release_devices() -> None:
    """Give back every lease this process holds (tests; a process's exit does it too)."""
    for fd in _held.values():
        os.close(fd)
    _held.clear()
