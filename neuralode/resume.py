"""Resuming a run: what identifies it, and the checks that a checkpoint belongs to it.

A run is identified by its `TrainConfig`, its data set (name, array shapes, number of classes and
a checksum of its contents: another split, or Fashion-MNIST read from an MNIST directory, has the
name and shapes of the original),
the settings outside the config that change the numbers (`model_config`: the model's, the
loss's) and the layout of its state (path, shape and dtype of every array, which
`neuralode.checkpoints` records with each checkpoint). `train(..., resume=True)` compares a
checkpoint's record with the current run's identity before any array is read, and refuses to
resume under other settings, naming what changed. The config fields of `RESUMABLE_CHANGES` may
change (they do not change the numbers); a `TrainConfig` field added since the checkpoint was
written is taken to have had its default.
"""

from __future__ import annotations

import dataclasses
import json
import zlib
from typing import Any

import numpy as np

from neuralode.checkpoints import ARRAYS_KEY, CheckpointStore, layout_differences
from neuralode.data import Dataset
from neuralode.train_config import TrainConfig

RESUMABLE_CHANGES = frozenset({"checkpoint_every", "keep_checkpoints", "progress"})


def run_identity(config: TrainConfig, dataset: Dataset, model_config: dict[str, Any] | None) -> dict[str, Any]:
    """The JSON-able record of what a checkpoint must match to be resumed (tuples as JSON lists)."""
    return {"config": dataclasses.asdict(config),
            "dataset": {"name": dataset.name, "train": list(dataset.x_train.shape),
                        "test": list(dataset.x_test.shape), "num_classes": int(dataset.num_classes),
                        "checksum": data_checksum(dataset)},
            "model_config": json.loads(json.dumps(model_config or {}))}


def data_checksum(dataset: Dataset) -> int:
    """CRC-32 of the data set's four arrays: their dtypes, shapes and bytes (MNIST's 188 MB of
    float32 inputs in about 0.1 s)."""
    crc = 0
    for array in (dataset.x_train, dataset.y_train, dataset.x_test, dataset.y_test):
        array = np.ascontiguousarray(array)
        crc = zlib.crc32(array, zlib.crc32(f"{array.dtype}{array.shape}".encode(), crc))
    return crc


def restore(store: CheckpointStore, state: Any, identity: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """The newest usable checkpoint of `store` (state and record), after checking (on the newest
    record alone, before any array is read, then on the one restored) that it comes from the run
    `identity` describes, with arrays laid out as in `state`."""
    newest = store.newest_record()
    if newest is not None:
        check_resumable(newest, identity, state)
    state, record = store.restore(state)
    check_resumable(record, identity, state)
    return state, record


def check_resumable(record: dict[str, Any], identity: dict[str, Any], state: Any) -> None:
    """Raise ValueError, naming the argument and what changed, unless the checkpoint `record` has
    the config, model config and data set of `identity` and the array layout of `state`."""
    check_config_matches(record["config"], identity["config"])
    check_model_config_matches(record.get("model_config"), identity["model_config"])
    now = identity["dataset"]
    if "checksum" not in record["dataset"]:  # a checkpoint from before the checksum: not compared
        now = {key: value for key, value in now.items() if key != "checksum"}
    if record["dataset"] != now:
        raise ValueError(f"dataset: checkpoint was trained on {record['dataset']}, now {now}")
    differences = layout_differences(record.get(ARRAYS_KEY) or {}, state) if ARRAYS_KEY in record else []
    if differences:
        shown = differences[:8] + ([f"... and {len(differences) - 8} more"] if len(differences) > 8 else [])
        raise ValueError("model: its arrays differ from the checkpointed run's (built with other settings?):\n  "
                         + "\n  ".join(shown))


def check_config_matches(saved: dict[str, Any], current: dict[str, Any]) -> None:
    """The saved `TrainConfig` (as a dict) against the current one, outside `RESUMABLE_CHANGES`."""
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    saved = {**defaults, **saved}  # a field added since the checkpoint was written has its default
    changed = {k: (saved[k], v) for k, v in current.items() if saved[k] != v and k not in RESUMABLE_CHANGES}
    _refuse_changes("config", changed)


def check_model_config_matches(saved: dict[str, Any] | None, current: dict[str, Any]) -> None:
    """The saved model config against the current one; None (a checkpoint from before model
    configs were recorded) matches any."""
    if saved is None:
        return
    names = sorted(set(saved) | set(current))
    _refuse_changes("model_config", {k: (saved.get(k), current.get(k)) for k in names
                                     if saved.get(k) != current.get(k)})


def _refuse_changes(argument: str, changed: dict[str, tuple[Any, Any]]) -> None:
    if changed:
        details = ", ".join(f"{k}: checkpoint {old!r}, now {new!r}" for k, (old, new) in changed.items())
        raise ValueError(f"{argument}: resuming with settings that differ from the checkpointed run ({details})")
