"""The run directory of `neuralode.train.train`: its layout, its lock and its metrics file.

A run directory `workdir` holds

- `METRICS_FILE` (metrics.jsonl): one JSON record per finished epoch, appended as training goes;
- `CHECKPOINTS_DIR` (checkpoints/): the orbax checkpoints of `neuralode.checkpoints`;
- `LOCK_FILE` (run.lock): the exclusive lock of the process training in it, with that process's
  pid and host written inside;
- `neuralode.checkpoints.UNUSABLE_DIR` (unusable_checkpoints/): checkpoints that failed to restore
  or to verify, moved aside by a resumed run and kept for inspection.

Only one process may train in a run directory at a time: two runs writing the same metrics file and
checkpoints would interleave their records and mix their parameters. `lock` takes an exclusive
`fcntl.flock` on the lock file for the whole run. The kernel releases it when the holder exits,
however it exits (SIGKILL, power loss aside), so a lock file left behind by a dead process is stale
by construction and the next run simply takes it over; no pid needs to be checked by hand.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import time
import warnings
from collections.abc import Iterator
from typing import Any

METRICS_FILE = "metrics.jsonl"
CHECKPOINTS_DIR = "checkpoints"
LOCK_FILE = "run.lock"


class RunDirectoryLocked(RuntimeError):
    """Another process trains in this run directory."""


def metrics_path(workdir: str | os.PathLike) -> str:
    return os.path.join(os.fspath(workdir), METRICS_FILE)


def checkpoints_dir(workdir: str | os.PathLike) -> str:
    return os.path.join(os.fspath(workdir), CHECKPOINTS_DIR)


def has_checkpoints(workdir: str | os.PathLike) -> bool:
    """Whether `workdir` holds at least one checkpoint (a numbered step directory)."""
    directory = checkpoints_dir(workdir)
    return os.path.isdir(directory) and any(name.isdigit() for name in os.listdir(directory))


def holds_run(workdir: str | os.PathLike) -> bool:
    """Whether `workdir` holds (part of) an earlier run: metrics records or checkpoints."""
    path = metrics_path(workdir)
    return (os.path.exists(path) and os.path.getsize(path) > 0) or has_checkpoints(workdir)


@contextlib.contextmanager
def lock(workdir: str | os.PathLike) -> Iterator[None]:
    """Create `workdir` if needed and hold its exclusive lock for the duration of the block.

    Raises `RunDirectoryLocked`, naming the directory and the holder (pid, host, start time), if
    another process holds it; `PermissionError`/`OSError` naming the directory if it cannot be
    written at all.
    """
    workdir = os.fspath(workdir)
    path = os.path.join(workdir, LOCK_FILE)
    try:
        os.makedirs(workdir, exist_ok=True)
        handle = open(path, "a+")
    except OSError as error:
        raise type(error)(error.errno, f"workdir {workdir}: cannot create the run's lock file "
                                        f"({error.strerror})", path) from error
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            handle.seek(0)
            holder = handle.read().strip() or "a process that has not written its pid yet"
            raise RunDirectoryLocked(
                f"workdir {workdir} is in use by another training run ({holder}); wait for it to "
                f"finish, stop it, or train in another directory (lock file {path})"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on host {socket.gethostname()}, "
                     f"since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        handle.flush()
        try:
            yield
        finally:
            handle.seek(0)
            handle.truncate()  # nobody holds it now
            fcntl.flock(handle, fcntl.LOCK_UN)
    finally:
        handle.close()


def read_metrics(workdir: str | os.PathLike) -> list[dict[str, Any]]:
    """The per-epoch records of `workdir`'s metrics file, in order ([] if there is none).

    An incomplete last line (a process killed while writing it) is skipped with a warning; a
    resumed run rewrites the file without it. Any other line that is not a JSON record raises
    `ValueError` naming the file and the line.
    """
    path = metrics_path(workdir)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        *lines, tail = f.read().split("\n")
    records = []
    for number, line in enumerate(lines, start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}, line {number}: not a JSON record ({error}): {line[:60]!r}") from None
    if tail.strip():
        try:
            records.append(json.loads(tail))
        except json.JSONDecodeError:
            warnings.warn(f"{path}: skipping an incomplete last line {tail[:40]!r}", RuntimeWarning, stacklevel=2)
    return records


def write_metrics(workdir: str | os.PathLike, records: list[dict[str, Any]]) -> None:
    """Replace the metrics file atomically (a resumed run drops the records after its checkpoint)."""
    path = metrics_path(workdir)
    with open(path + ".tmp", "w") as f:
        f.writelines(json.dumps(record) + "\n" for record in records)
    os.replace(path + ".tmp", path)


def append_metrics(workdir: str | os.PathLike, record: dict[str, Any]) -> None:
    """Append one record and wait until it is on disk."""
    with open(metrics_path(workdir), "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())
