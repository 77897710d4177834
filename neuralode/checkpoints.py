"""Checkpoints that are verified when restored: orbax files plus a JSON record with a checksum per array.

`CheckpointStore(directory, ...)` keeps the last `keep` checkpoints of a pytree of arrays (`state`)
and a JSON-able `record` (progress, settings) per step, through an orbax `CheckpointManager`. Each
save adds to the record, under `"arrays"`, the path, shape, dtype and SHA-256 of the bytes of every
leaf of `state`. A restore compares the restored arrays with those checksums, so a flipped bit on
disk is caught rather than trained on; a checkpoint that cannot be read, or does not verify, is
reported with a warning, set aside in `UNUSABLE_DIR` beside `directory` (never deleted), and the
previous one is tried.

Two refusals protect what is written: `save` never stores a state with a non-finite floating-point
value (a diverged run), and `check_writable` says before any work is done whether a checkpoint of
the state's size can be written at all.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import tempfile
import time
import warnings
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

ARRAYS_KEY = "arrays"  # where the record holds the per-array shapes, dtypes and checksums
UNUSABLE_DIR = "unusable_checkpoints"  # beside the store's directory: checkpoints that failed to restore
_HEADROOM_BYTES = 1 << 20  # orbax metadata and the JSON record, beyond the arrays themselves


def host_arrays(state: Any) -> dict[str, np.ndarray]:
    """The leaves of `state` as numpy arrays, by their path (`jax.tree_util.keystr`); PRNG keys as
    their key data."""
    leaves = jax.tree_util.tree_flatten_with_path(state)[0]
    arrays = {}
    for path, leaf in leaves:
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            leaf = jax.random.key_data(leaf)
        arrays[jax.tree_util.keystr(path)] = np.asarray(jax.device_get(leaf))
    return arrays


def describe_arrays(arrays: dict[str, np.ndarray]) -> dict[str, dict[str, Any]]:
    """Shape, dtype and SHA-256 of the bytes of each array."""
    return {path: {"shape": list(a.shape), "dtype": str(a.dtype),
                   "sha256": hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()}
            for path, a in arrays.items()}


def layout_differences(saved: dict[str, dict[str, Any]], state: Any) -> list[str]:
    """The leaves whose presence, shape or dtype differ between a saved record's `"arrays"` and
    `state` (e.g. a model built with another architecture), one line each."""
    current = {path: {"shape": list(a.shape), "dtype": str(a.dtype)} for path, a in _abstract(state).items()}
    lines = []
    for path in sorted(set(saved) | set(current)):
        old, new = saved.get(path), current.get(path)
        if old is None or new is None:
            lines.append(f"{path}: {'only in the checkpoint' if new is None else 'not in the checkpoint'}")
        elif (old["shape"], old["dtype"]) != (new["shape"], new["dtype"]):
            lines.append(f"{path}: checkpoint {tuple(old['shape'])} {old['dtype']}, "
                         f"now {tuple(new['shape'])} {new['dtype']}")
    return lines


def _abstract(state: Any) -> dict[str, jax.ShapeDtypeStruct]:
    """Shape and dtype of each leaf as `host_arrays` stores it, without moving data."""
    abstract = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            leaf = jax.eval_shape(jax.random.key_data, leaf)
        abstract[jax.tree_util.keystr(path)] = jax.ShapeDtypeStruct(leaf.shape, leaf.dtype)
    return abstract


class CheckpointStore:
    """An orbax `CheckpointManager` over one pytree `state` plus a JSON `record` per step.

    Use it as a context manager (or call `close`): the manager's background threads must be shut
    down on every path, errors included.
    """

    def __init__(self, directory: str | os.PathLike, *, keep: int, every: int):
        self.directory = os.path.abspath(os.fspath(directory))
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            save_interval_steps=every,
            enable_async_checkpointing=False,  # a save is complete on disk when save() returns
            cleanup_tmp_directories=True,  # partial saves of a killed run
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def __enter__(self) -> CheckpointStore:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        self.manager.close()

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def check_writable(self, state: Any) -> None:
        """Raise `OSError` unless a checkpoint of `state` can be written: the directory accepts a
        new file and its file system has room for the arrays (plus 1 MiB)."""
        needed = sum(a.size * np.dtype(a.dtype).itemsize for a in _abstract(state).values()) + _HEADROOM_BYTES
        try:
            os.makedirs(self.directory, exist_ok=True)
            with tempfile.TemporaryFile(dir=self.directory, prefix=".write_probe") as probe:
                probe.write(b"\0" * 4096)
                probe.flush()
                os.fsync(probe.fileno())
        except OSError as error:
            raise OSError(error.errno, f"checkpoint directory {self.directory} is not writable "
                                       f"({error.strerror}); nothing was trained") from error
        free = shutil.disk_usage(self.directory).free
        if free < needed:
            raise OSError(errno.ENOSPC, f"checkpoint directory {self.directory}: {free / 2**20:.1f} MiB "
                                        f"free, a checkpoint needs about {needed / 2**20:.1f} MiB; "
                                        "nothing was trained")

    def save(self, step: int, state: Any, record: dict[str, Any], *, force: bool = False) -> bool:
        """Save `state` and `record` as checkpoint `step` if one is due (every `every` steps) or
        `force`; a step already saved is not saved again. Returns whether it saved.

        Raises `FloatingPointError`, writing nothing, if a floating-point leaf of `state` holds a
        non-finite value: the step and that leaf's path are named.
        """
        if step in self.manager.all_steps() or not (force or self.manager.should_save(step)):
            return False
        arrays = host_arrays(state)
        for path, array in arrays.items():
            if np.issubdtype(array.dtype, np.inexact) and not np.isfinite(array).all():
                bad = int(np.size(array) - np.isfinite(array).sum())
                last = self.manager.latest_step()
                raise FloatingPointError(
                    f"training diverged: at step {step}, {path} holds {bad} non-finite value(s) of "
                    f"{array.size}; no checkpoint was written (the last one is "
                    f"{'of step ' + str(last) if last is not None else 'none'}); lower the "
                    "learning rate or clip the gradients")
        record = {**record, ARRAYS_KEY: describe_arrays(arrays)}
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), progress=ocp.args.JsonSave(record))
        self.manager.save(step, args=args, force=True)
        return True

    def newest_record(self) -> dict[str, Any] | None:
        """The JSON record of the newest checkpoint whose record can be read, without reading its
        arrays (None if no record can be read: `restore` then reports each checkpoint)."""
        steps = sorted(self.manager.all_steps(), reverse=True)
        if not steps:
            raise FileNotFoundError(
                f"resume=True but {self.directory} holds no checkpoint; nothing to resume "
                "(use resume=False and an empty workdir to start a new run)")
        for step in steps:
            try:
                return dict(self.manager.restore(step, args=ocp.args.Composite(
                    progress=ocp.args.JsonRestore())).progress)
            except Exception:  # restore() below reports it when it reaches this step
                continue
        return None

    def restore(self, target_state: Any) -> tuple[Any, dict[str, Any]]:
        """The newest checkpoint that reads and verifies, as `(state, record)`, falling back to older
        ones with a warning. `target_state` gives the structure, shapes and dtypes (its values are
        not used). Unusable newer checkpoints are moved aside so the resumed run can save its own
        steps again."""
        steps = sorted(self.manager.all_steps(), reverse=True)
        if not steps:
            self.newest_record()  # raises the "nothing to resume" error
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target_state)
        failures = []
        for step in steps:
            try:
                restored = self.manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract), progress=ocp.args.JsonRestore()))
                record = dict(restored.progress)
                if record.get("step") != step:
                    raise ValueError(f"its record says step {record.get('step')}, its directory {step}")
                _verify(restored.state, record.get(ARRAYS_KEY))
            except Exception as error:  # any failure: report it, then try the previous checkpoint
                failures.append(f"step {step}: {type(error).__name__}: {error}")
                warnings.warn(f"checkpoint {os.path.join(self.directory, str(step))} is unusable "
                              f"({type(error).__name__}: {error}); trying the previous one",
                              RuntimeWarning, stacklevel=3)
                continue
            self._set_aside([s for s in steps if s > step])
            return restored.state, record
        raise RuntimeError(
            f"resume=True but none of the {len(steps)} checkpoints in {self.directory} can be restored:\n  "
            + "\n  ".join(failures))

    def _set_aside(self, steps: list[int]) -> None:
        if not steps:
            return
        aside = os.path.join(os.path.dirname(self.directory), UNUSABLE_DIR)
        os.makedirs(aside, exist_ok=True)
        for step in steps:
            target = os.path.join(aside, f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
            shutil.move(os.path.join(self.directory, str(step)), target)
            warnings.warn(f"moved unusable checkpoint of step {step} to {target}", RuntimeWarning, stacklevel=4)
        self.manager.reload()


def _verify(state: Any, saved: dict[str, dict[str, Any]] | None) -> None:
    """Raise `ValueError` naming the first array of `state` whose checksum differs from the record
    (checkpoints written before checksums were recorded are not checked)."""
    if saved is None:
        return
    found = describe_arrays(host_arrays(state))
    for path, description in found.items():
        if saved.get(path, {}).get("sha256") != description["sha256"]:
            raise ValueError(f"the data of {path} do not match the checksum saved with them "
                             "(the file was corrupted on disk)")
