"""Training: an optax + `nnx.Optimizer` loop with orbax checkpoints that resume exactly.

`train(model, dataset, config, workdir)` fits any `nnx.Module` classifier in place and returns the
last epoch's metrics. What it writes under `workdir`:

- `metrics.jsonl`: one JSON record per epoch (train and test metrics, learning rate, timings).
- `checkpoints/<step>/`: the last `keep_checkpoints` checkpoints, one every `checkpoint_every`
  steps and one at the end. Each holds the model state (parameters and every other nnx variable:
  batch statistics, RNG streams), the optimiser state, and the progress (step, epoch, batch within
  the epoch, the epoch's running metric sums, the config).

The data order of epoch `e` is drawn from `np.random.default_rng([config.seed, e])`, so a run
resumed in the middle of an epoch regenerates that epoch's order and skips the batches already
seen: `train(..., resume=True)` after an interruption at any moment ends with the same parameters,
bit for bit, as a run that was never interrupted (on the same machine).

A custom `loss_fn(model, x, y) -> (loss, metrics)` replaces the default cross-entropy, e.g. to add
a regularisation term or to report solver statistics (NFE); every scalar in `metrics` is averaged
over the epoch, weighted by batch size, and logged with a `train_`/`test_` prefix.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from tqdm.auto import tqdm

from neuralode.data import Dataset, batches, num_batches, random_shift, validate_dataset

LossFn = Callable[[nnx.Module, jax.Array, jax.Array], tuple[jax.Array, dict[str, jax.Array]]]

SCHEDULES = ("constant", "cosine")
OPTIMIZERS = ("adamw", "sgd")
# Config fields that may change between a run and its resumption without changing the numbers.
_RESUMABLE_CHANGES = frozenset({"checkpoint_every", "keep_checkpoints", "progress"})


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a training run, besides the model and the data.

    `schedule` is "constant" or "cosine" (decay to 0 over the run), after `warmup_steps` of linear
    warm-up from 0. `optimizer` is "adamw" (decoupled `weight_decay`) or "sgd" (Nesterov momentum
    0.9, `weight_decay` added to the gradient). `grad_clip_norm` clips the global gradient norm.
    `augment_shift` > 0 translates every training example by a random offset of up to that many
    pixels (samples) per spatial axis, drawn from the `batch`-th child of the epoch's seed sequence
    `SeedSequence([seed, epoch])` (whose root draws the order), so a resumed run sees the same batches.
    """

    epochs: int = 10
    batch_size: int = 128
    learning_rate: float = 1e-3
    schedule: str = "cosine"
    warmup_steps: int = 0
    optimizer: str = "adamw"
    weight_decay: float = 1e-4
    grad_clip_norm: float | None = None
    augment_shift: int = 0
    seed: int = 0
    eval_batch_size: int = 1000
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    progress: bool = True

    def __post_init__(self):
        positive_ints = ("epochs", "batch_size", "eval_batch_size", "checkpoint_every", "keep_checkpoints")
        for name in positive_ints:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"TrainConfig.{name}: expected a positive integer, found {value!r}")
        for name in ("warmup_steps", "augment_shift"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"TrainConfig.{name}: expected an integer >= 0, found {value!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise ValueError(f"TrainConfig.seed: expected an integer >= 0, found {self.seed!r}")
        if not self.learning_rate > 0:
            raise ValueError(f"TrainConfig.learning_rate: expected > 0, found {self.learning_rate!r}")
        if not self.weight_decay >= 0:
            raise ValueError(f"TrainConfig.weight_decay: expected >= 0, found {self.weight_decay!r}")
        if self.grad_clip_norm is not None and not self.grad_clip_norm > 0:
            raise ValueError(f"TrainConfig.grad_clip_norm: expected None or > 0, found {self.grad_clip_norm!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"TrainConfig.schedule: unknown {self.schedule!r}, expected one of {SCHEDULES}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"TrainConfig.optimizer: unknown {self.optimizer!r}, expected one of {OPTIMIZERS}")


def learning_rate_schedule(config: TrainConfig, total_steps: int) -> optax.Schedule:
    """Linear warm-up over `config.warmup_steps`, then constant or cosine decay to 0 at the end."""
    peak = config.learning_rate
    warmup = min(config.warmup_steps, total_steps)
    if config.schedule == "cosine":
        after = optax.cosine_decay_schedule(peak, max(total_steps - warmup, 1))
    else:
        after = optax.constant_schedule(peak)
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


def make_optimizer(config: TrainConfig, total_steps: int) -> optax.GradientTransformation:
    """The optax transformation `config` describes, over a run of `total_steps` steps."""
    schedule = learning_rate_schedule(config, total_steps)
    if config.optimizer == "adamw":
        tx = optax.adamw(schedule, weight_decay=config.weight_decay)
    else:
        tx = optax.chain(
            optax.add_decayed_weights(config.weight_decay),
            optax.sgd(schedule, momentum=0.9, nesterov=True),
        )
    if config.grad_clip_norm is not None:
        tx = optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), tx)
    return tx


def classification_metrics(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean softmax cross-entropy of `logits` (batch, classes) against integer `labels`, and accuracy."""
    if logits.ndim != 2 or logits.shape[0] != labels.shape[0]:
        raise ValueError(
            f"logits: expected shape (batch, num_classes) with batch {labels.shape[0]}, found {logits.shape}"
        )
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    predicted = jnp.argmax(logits, axis=-1)
    accuracy = (predicted == labels.astype(predicted.dtype)).astype(logits.dtype).mean()
    return loss, {"loss": loss, "accuracy": accuracy}


def cross_entropy_loss(model: nnx.Module, x: jax.Array, y: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The default `loss_fn`: `model(x)` are the logits."""
    return classification_metrics(model(x), y)


def classification_loss(model: nnx.Module, x: jax.Array, y: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """`loss_fn` for the classifiers of `neuralode.models`: `model.forward(x)` gives `(logits,
    stats)`; the loss is the cross-entropy plus `stats["regularisation"]` (RNODE) where present, and
    every stat (NFE, regularisation terms) is logged as a metric beside `cross_entropy`."""
    logits, stats = model.forward(x)
    loss, metrics = classification_metrics(logits, y)
    metrics["cross_entropy"] = loss
    if "regularisation" in stats:
        loss = loss + stats["regularisation"]
        metrics["loss"] = loss
    metrics.update({name: jnp.asarray(value, logits.dtype) for name, value in stats.items()})
    return loss, metrics


def param_dtype(model: nnx.Module) -> np.dtype:
    """The dtype of the model's floating-point parameters, to which input batches are cast."""
    dtypes = {leaf.dtype for leaf in jax.tree.leaves(nnx.state(model, nnx.Param))
              if jnp.issubdtype(leaf.dtype, jnp.floating)}
    if len(dtypes) != 1:
        raise ValueError(f"model: expected floating parameters of one dtype, found {sorted(map(str, dtypes))}")
    return np.dtype(dtypes.pop())


def read_metrics(workdir: str | os.PathLike) -> list[dict[str, Any]]:
    """The per-epoch records of `workdir/metrics.jsonl`, in order.

    An incomplete last line (a process killed while writing it) is skipped with a warning; a
    resumed run rewrites the file without it.
    """
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        *lines, tail = f.read().split("\n")
    records = [json.loads(line) for line in lines if line.strip()]
    if tail.strip():
        try:
            records.append(json.loads(tail))
        except json.JSONDecodeError:
            warnings.warn(f"{path}: skipping an incomplete last line {tail[:40]!r}", RuntimeWarning, stacklevel=2)
    return records


def _write_metrics(workdir: str, records: list[dict[str, Any]]) -> None:
    """Replace metrics.jsonl atomically (a resumed run drops the records after its checkpoint)."""
    path = os.path.join(workdir, "metrics.jsonl")
    with open(path + ".tmp", "w") as f:
        f.writelines(json.dumps(record) + "\n" for record in records)
    os.replace(path + ".tmp", path)


def _append_metrics(workdir: str, record: dict[str, Any]) -> None:
    with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


class _Checkpoints:
    """An orbax `CheckpointManager` over {model, optimizer} state plus a JSON progress record."""

    def __init__(self, workdir: str, config: TrainConfig):
        self.workdir = workdir
        self.directory = os.path.join(workdir, "checkpoints")
        options = ocp.CheckpointManagerOptions(
            max_to_keep=config.keep_checkpoints,
            save_interval_steps=config.checkpoint_every,
            enable_async_checkpointing=False,  # a save is complete on disk when save() returns
            cleanup_tmp_directories=True,  # partial saves of a killed run
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def save(self, step: int, state: Any, progress: dict[str, Any], *, force: bool = False) -> None:
        if force or self.manager.should_save(step):
            args = ocp.args.Composite(state=ocp.args.StandardSave(state), progress=ocp.args.JsonSave(progress))
            self.manager.save(step, args=args, force=force)

    def restore(self, target_state: Any) -> tuple[Any, dict[str, Any]]:
        """The newest usable checkpoint, falling back to older ones with a warning.

        Unusable newer checkpoints are moved to `workdir/unusable_checkpoints/` (never deleted) so
        the resumed run can save its own steps again.
        """
        steps = sorted(self.manager.all_steps(), reverse=True)
        if not steps:
            raise FileNotFoundError(
                f"resume=True but {self.directory} holds no checkpoint; nothing to resume "
                "(use resume=False and an empty workdir to start a new run)"
            )
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target_state)
        failures = []
        for step in steps:
            try:
                restored = self.manager.restore(
                    step,
                    args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), progress=ocp.args.JsonRestore()),
                )
                progress = dict(restored.progress)
                saved_step = int(restored.state["optimizer"]["step"][...])
                if progress.get("step") != step or saved_step != step:
                    raise ValueError(
                        f"progress says step {progress.get('step')}, optimizer says {saved_step}, directory {step}"
                    )
            except Exception as error:  # any failure: report it, then try the previous checkpoint
                failures.append(f"step {step}: {type(error).__name__}: {error}")
                warnings.warn(
                    f"checkpoint {os.path.join(self.directory, str(step))} is unusable "
                    f"({type(error).__name__}: {error}); trying the previous one",
                    RuntimeWarning,
                    stacklevel=3,
                )
                continue
            self._set_aside([s for s in steps if s > step])
            return restored.state, progress
        raise RuntimeError(
            f"resume=True but none of the {len(steps)} checkpoints in {self.directory} can be restored:\n  "
            + "\n  ".join(failures)
        )

    def _set_aside(self, steps: list[int]) -> None:
        if not steps:
            return
        aside = os.path.join(self.workdir, "unusable_checkpoints")
        os.makedirs(aside, exist_ok=True)
        for step in steps:
            target = os.path.join(aside, f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
            shutil.move(os.path.join(self.directory, str(step)), target)
            warnings.warn(f"moved unusable checkpoint of step {step} to {target}", RuntimeWarning, stacklevel=4)
        self.manager.reload()

    def close(self) -> None:
        self.manager.close()


def _check_config_matches(saved: dict[str, Any], config: TrainConfig) -> None:
    current = dataclasses.asdict(config)
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    saved = {**defaults, **saved}  # a field added since the checkpoint was written has its default
    changed = {k: (saved[k], v) for k, v in current.items() if saved[k] != v and k not in _RESUMABLE_CHANGES}
    _refuse_changes("config", changed)


def _check_model_config_matches(saved: dict[str, Any] | None, current: dict[str, Any]) -> None:
    if saved is None:  # a checkpoint from before model configs were recorded: nothing to compare
        return
    names = sorted(set(saved) | set(current))
    _refuse_changes("model_config", {k: (saved.get(k), current.get(k)) for k in names
                                     if saved.get(k) != current.get(k)})


def _refuse_changes(argument: str, changed: dict[str, tuple[Any, Any]]) -> None:
    if changed:
        details = ", ".join(f"{k}: checkpoint {old!r}, now {new!r}" for k, (old, new) in changed.items())
        raise ValueError(f"{argument}: resuming with settings that differ from the checkpointed run ({details})")


def train(
    model: nnx.Module,
    dataset: Dataset,
    config: TrainConfig,
    workdir: str | os.PathLike,
    resume: bool = False,
    loss_fn: LossFn = cross_entropy_loss,
    model_config: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train `model` in place on `dataset`; return the last epoch's record of metrics.jsonl.

    `model` maps a batch of inputs (cast to its parameter dtype) to logits, or is whatever
    `loss_fn(model, x, y) -> (scalar loss, {name: scalar metric})` expects. Training calls
    `model.train()` and evaluation `model.eval()` (Dropout, BatchNorm); the model is left in eval
    mode. With `resume=True` the newest usable checkpoint in `workdir` is restored into `model`
    (built as for the original run) and training continues from exactly that point; without it,
    `workdir` must not hold an earlier run. `model_config` (JSON-able) records the settings outside
    `config` that change the numbers (the model's, the loss's): it is saved with every checkpoint,
    and resuming with different ones (or a different `config`) is refused, naming what changed.
    """
    validate_dataset(dataset)
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config: expected a TrainConfig, found {type(config).__name__}")
    workdir = os.path.abspath(os.fspath(workdir))
    if not resume and (_has_metrics(workdir) or _has_checkpoints(workdir)):
        raise FileExistsError(
            f"workdir {workdir} already holds a run (metrics.jsonl or checkpoints); "
            "pass resume=True to continue it, or use an empty workdir"
        )
    os.makedirs(workdir, exist_ok=True)

    dtype = param_dtype(model)
    steps_per_epoch = num_batches(len(dataset.x_train), config.batch_size)
    total_steps = config.epochs * steps_per_epoch
    schedule = learning_rate_schedule(config, total_steps)
    optimizer = nnx.Optimizer(model, make_optimizer(config, total_steps), wrt=nnx.Param)
    if loss_fn is cross_entropy_loss:
        logits = nnx.eval_shape(lambda m, x: m(x), model, dataset.x_train[:2].astype(dtype))
        found = getattr(logits, "shape", type(logits).__name__)
        if found != (2, dataset.num_classes):
            raise ValueError(
                f"model: maps a batch of 2 inputs {dataset.x_train.shape[1:]} to {found}, expected "
                f"logits of shape (2, {dataset.num_classes}) (or pass a loss_fn that knows its outputs)"
            )

    model.eval()
    eval_graphdef = nnx.graphdef(model)
    model.train()
    graphdef, state = nnx.split({"model": model, "optimizer": optimizer})

    @jax.jit
    def train_step(state, x, y):
        parts = nnx.merge(graphdef, state)
        step_model, step_optimizer = parts["model"], parts["optimizer"]
        (_, metrics), grads = nnx.value_and_grad(loss_fn, has_aux=True)(step_model, x, y)
        with jax.numpy_dtype_promotion("standard"):  # optax computes `decay ** count` (float ** int32)
            step_optimizer.update(step_model, grads)
        return nnx.state(parts), metrics

    @jax.jit
    def eval_step(model_state, x, y):
        return loss_fn(nnx.merge(eval_graphdef, model_state), x, y)[1]

    checkpoints = _Checkpoints(workdir, config)
    progress = {"step": 0, "epoch": 0, "batch": 0, "sums": {}, "examples": 0, "epoch_seconds": 0.0,
                "train_seconds": 0.0, "config": dataclasses.asdict(config), "dataset": _describe(dataset),
                "model_config": json.loads(json.dumps(model_config or {}))}  # tuples as the JSON lists
    if resume:
        state, saved = checkpoints.restore(state)
        _check_config_matches(saved["config"], config)
        _check_model_config_matches(saved.get("model_config"), progress["model_config"])
        if saved["dataset"] != progress["dataset"]:
            raise ValueError(f"dataset: checkpoint was trained on {saved['dataset']}, now {progress['dataset']}")
        progress = {**saved, "config": dataclasses.asdict(config), "model_config": progress["model_config"]}
        _write_metrics(workdir, [r for r in read_metrics(workdir) if r["epoch"] <= progress["epoch"]])

    def evaluate(model_state) -> dict[str, float]:
        sums, count = {}, 0
        for x, y in batches(dataset.x_test, dataset.y_test, config.eval_batch_size):
            _accumulate(sums, jax.device_get(eval_step(model_state, x.astype(dtype), y)), len(y))
            count += len(y)
        return {k: v / count for k, v in sums.items()}

    bar = tqdm(total=total_steps, initial=progress["step"], disable=not config.progress, desc="train")
    try:
        while progress["epoch"] < config.epochs:
            epoch = progress["epoch"]
            order = np.random.default_rng([config.seed, epoch])
            started = time.perf_counter()
            for x, y in batches(dataset.x_train, dataset.y_train, config.batch_size, order, start=progress["batch"]):
                if config.augment_shift:
                    shifts = np.random.SeedSequence([config.seed, epoch], spawn_key=(progress["batch"],))
                    x = random_shift(x, config.augment_shift, np.random.default_rng(shifts))
                state, metrics = train_step(state, x.astype(dtype), y)
                _accumulate(progress["sums"], jax.device_get(metrics), len(y))
                progress["examples"] += len(y)
                progress["step"] += 1
                progress["batch"] += 1
                bar.update()
                bar.set_postfix({k: f"{v / progress['examples']:.4f}" for k, v in progress["sums"].items()
                                 if k in ("loss", "accuracy")}, refresh=False)
                if progress["batch"] < steps_per_epoch:
                    elapsed = progress["epoch_seconds"] + time.perf_counter() - started
                    checkpoints.save(progress["step"], state, {**progress, "epoch_seconds": elapsed})
            seconds = progress["epoch_seconds"] + time.perf_counter() - started
            progress["train_seconds"] += seconds
            record = {"epoch": epoch + 1, "step": progress["step"],
                      "learning_rate": float(schedule(progress["step"] - 1))}
            record.update({f"train_{k}": v / progress["examples"] for k, v in progress["sums"].items()})
            record.update({f"test_{k}": v for k, v in evaluate(state["model"]).items()})
            record.update({"epoch_seconds": seconds, "train_seconds": progress["train_seconds"]})
            _append_metrics(workdir, record)
            progress.update(epoch=epoch + 1, batch=0, sums={}, examples=0, epoch_seconds=0.0)
            checkpoints.save(progress["step"], state, progress, force=progress["epoch"] == config.epochs)
    finally:
        bar.close()
        checkpoints.close()
    nnx.update(model, state["model"])
    model.eval()
    return read_metrics(workdir)[-1]


def _accumulate(sums: dict[str, float], metrics: dict[str, Any], count: int) -> None:
    for name, value in metrics.items():
        if np.ndim(value) != 0:
            raise ValueError(f"loss_fn: metric {name!r} has shape {np.shape(value)}, expected a scalar")
        sums[name] = sums.get(name, 0.0) + float(value) * count


def _describe(dataset: Dataset) -> dict[str, Any]:
    return {"name": dataset.name, "train": list(dataset.x_train.shape), "test": list(dataset.x_test.shape),
            "num_classes": int(dataset.num_classes)}


def _has_metrics(workdir: str) -> bool:
    path = os.path.join(workdir, "metrics.jsonl")
    return os.path.exists(path) and os.path.getsize(path) > 0


def _has_checkpoints(workdir: str) -> bool:
    directory = os.path.join(workdir, "checkpoints")
    return os.path.isdir(directory) and any(name.isdigit() for name in os.listdir(directory))
