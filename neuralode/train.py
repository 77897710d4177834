"""Training: an epoch loop around the train step of `neuralode.train_step` that resumes exactly.

`train(model, dataset, config, workdir)` fits a model in place and returns the last epoch's
metrics; `config` is a `TrainConfig` (with the optimiser it describes: `neuralode.train_config`).
In the run directory `workdir` (layout, lock and metrics file in `neuralode.rundir`) it
appends one JSON record per epoch to the metrics file and keeps the last `keep_checkpoints`
checkpoints (one every `checkpoint_every` steps and one at the end, verified by checksums on
restore: `neuralode.checkpoints`), each holding the model state (parameters and every other nnx
variable: batch statistics, RNG streams), the optimiser state, the progress (step, epoch, batch
within the epoch, the epoch's running metric sums) and the settings that identify the run
(`neuralode.resume`, which refuses to resume a checkpoint under other settings).

Every training batch holds `config.batch_size` examples: an epoch's last batch is completed by the
first examples of the epoch's order, so the train step is compiled for one batch shape (a smaller
last batch would compile it a second time: ~9 s for the quick ODE-Net of `experiments.classify`).
The data order of epoch `e` is drawn from `np.random.default_rng([config.seed, e])`, so a run
resumed in the middle of an epoch regenerates that epoch's order and skips the batches already
seen: `train(..., resume=True)` after an interruption at any moment (SIGKILL included) ends with the
same parameters, bit for bit, as a run that was never interrupted (on the same machine). SIGINT
(Ctrl-C) and SIGTERM let the current step finish, save a checkpoint of it, and stop: SIGINT raises
`KeyboardInterrupt`, SIGTERM exits with status 143 (a second signal stops at once, saving nothing).

The default loss is `classification_loss` (cross-entropy against integer labels, through
`model.forward` where the model has it, so RNODE's regulariser is trained). A custom
`loss_fn(model, x, y) -> (loss, metrics)` replaces it, for targets `y` of any shape (regression,
several outputs); every scalar in `metrics` is averaged over the epoch, weighted by batch size, and
logged with a `train_`/`test_` prefix.

Every step is checked on the host before anything of it is saved: a model reporting
`failed_solves > 0` (the models of `neuralode.models` report their solver failures instead of
raising them from inside the compiled step) raises `RuntimeError`, and so do parameters that are no
longer finite (`FloatingPointError`); the run directory keeps its last good checkpoint.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from neuralode import rundir
from neuralode.checkpoints import CheckpointStore
from neuralode.data import Dataset, batches, check_batch_size, num_batches, random_shift, validate_dataset
from neuralode.parallel.data import data_parallel_eval_step, data_parallel_train_step
from neuralode.resume import restore, run_identity
from neuralode.rundir import read_metrics
from neuralode.train_config import TrainConfig, learning_rate_schedule, make_optimizer
from neuralode.train_step import (LossFn, check_failed_solves, check_step_metrics, classification_loss,
                                  classification_metrics, make_eval_step, make_train_state,
                                  make_train_step, param_dtype)

__all__ = ["TrainConfig", "classification_loss", "classification_metrics", "learning_rate_schedule",
           "make_optimizer", "make_train_state", "make_train_step", "param_dtype", "read_metrics", "train"]


# --- the loop ------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Progress:
    """Where a run stands; saved with every checkpoint."""

    step: int = 0
    epoch: int = 0  # epochs finished
    batch: int = 0  # batches of the current epoch done
    sums: dict[str, float] = dataclasses.field(default_factory=dict)  # of metrics x batch size
    examples: int = 0  # in the current epoch
    epoch_seconds: float = 0.0  # spent on the current epoch before this process took it over
    train_seconds: float = 0.0  # of the finished epochs

    def add(self, metrics: dict[str, Any], count: int) -> None:
        for name, value in metrics.items():
            if np.ndim(value) != 0:
                raise ValueError(f"loss_fn: metric {name!r} has shape {np.shape(value)}, expected a scalar")
            self.sums[name] = self.sums.get(name, 0.0) + float(value) * count
        self.examples += count
        self.step += 1
        self.batch += 1

    def means(self) -> dict[str, float]:
        return {name: total / self.examples for name, total in self.sums.items()}


class _StopOnSignal:
    """Within the block, SIGINT and SIGTERM only set `received`; the loop saves and calls `stop`.
    A second signal acts as if this handler were not there (KeyboardInterrupt, termination)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopOnSignal:
        if threading.current_thread() is threading.main_thread():  # only there can Python catch signals
            for signum in self.SIGNALS:
                if signal.getsignal(signum) not in (signal.SIG_IGN, None):  # None: set outside Python
                    self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is None:
            self.received = signum
            return
        previous = self._previous.get(signum, signal.SIG_DFL)
        self.__exit__()
        if callable(previous):
            previous(signum, frame)
        else:
            os.kill(os.getpid(), signum)  # the default action, now restored

    def stop(self, step: int, directory: str) -> None:
        name = signal.Signals(self.received).name
        print(f"{name} received: saved the checkpoint of step {step} in {directory}; "
              "train(..., resume=True) continues from it", file=sys.stderr, flush=True)
        if self.received == signal.SIGINT:
            raise KeyboardInterrupt
        raise SystemExit(128 + self.received)


def train(
    model: nnx.Module,
    dataset: Dataset,
    config: TrainConfig,
    workdir: str | os.PathLike,
    resume: bool = False,
    loss_fn: LossFn = classification_loss,
    model_config: dict[str, Any] | None = None,
    mesh: jax.sharding.Mesh | None = None,
) -> dict[str, Any]:
    """Train `model` in place on `dataset`; return the last epoch's record of the metrics file.

    `model` maps a batch of inputs (cast to its parameter dtype) to logits (see
    `classification_loss`), or is whatever `loss_fn(model, x, y) -> (scalar loss, {name: scalar
    metric})` expects. Training calls `model.train()` and evaluation `model.eval()` (Dropout,
    BatchNorm); the model is left in eval mode. With `resume=True` the newest usable checkpoint in
    `workdir` is restored into `model` (built as for the original run) and training continues from
    exactly that point; without it, `workdir` must not hold an earlier run. One process at a time
    trains in a `workdir` (`neuralode.rundir.lock`). `model_config` (JSON-able) records the
    settings outside `config` that change the numbers (the model's, the loss's): it is saved with
    every checkpoint, and resuming with different ones (or a different `config`, data set or array
    shapes) is refused before anything is restored, naming what changed. With a `mesh` of this
    process's devices (`neuralode.parallel.data_mesh(8)`) training is data parallel
    (`neuralode.parallel.data`: each batch sharded over the mesh axis "data", the state replicated,
    every device its own adaptive solve); checkpoints are the same, so a run resumes on any mesh.
    """
    _check_arguments(model, dataset, config, loss_fn)
    workdir = os.path.abspath(os.fspath(workdir))
    dtype = param_dtype(model)
    steps_per_epoch = num_batches(len(dataset.x_train), config.batch_size)
    total_steps = config.epochs * steps_per_epoch
    if mesh is not None and jax.process_count() > 1:
        raise ValueError("mesh: train() runs in one process; with several processes, step "
                         "neuralode.parallel.data_parallel_train_step in a loop of your own")
    model.eval()
    eval_step = (make_eval_step(nnx.graphdef(model), loss_fn) if mesh is None
                 else data_parallel_eval_step(nnx.graphdef(model), loss_fn, mesh))
    model.train()
    graphdef, state = make_train_state(model, make_optimizer(config, total_steps))
    train_step = (make_train_step(graphdef, loss_fn) if mesh is None
                  else data_parallel_train_step(graphdef, loss_fn, mesh))
    identity = run_identity(config, dataset, model_config)

    with _StopOnSignal() as stop, rundir.lock(workdir), CheckpointStore(
            rundir.checkpoints_dir(workdir), keep=config.keep_checkpoints, every=config.checkpoint_every) as store:
        if not resume and rundir.holds_run(workdir):
            raise FileExistsError(f"workdir {workdir} already holds a run (metrics or checkpoints); "
                                  "pass resume=True to continue it, or use an empty workdir")
        store.check_writable(state)
        progress = _Progress()
        if resume:
            state, record = restore(store, state, identity)
            progress = _Progress(**{f.name: record[f.name] for f in dataclasses.fields(_Progress)})
            rundir.write_metrics(workdir, [r for r in read_metrics(workdir) if r["epoch"] <= progress.epoch])
        schedule = learning_rate_schedule(config, total_steps)
        bar = tqdm(total=total_steps, initial=progress.step, disable=not config.progress, desc="train")
        try:
            while progress.epoch < config.epochs:
                started = time.perf_counter()
                for x, y in _training_batches(dataset, config, progress.epoch, progress.batch):
                    state, metrics = train_step(state, x.astype(dtype), y)
                    metrics = jax.device_get(metrics)
                    check_step_metrics(metrics, f"step {progress.step + 1}", _UNSAVED)
                    progress.add(metrics, len(y))
                    bar.update()
                    bar.set_postfix({k: f"{v:.4f}" for k, v in progress.means().items()
                                     if k in ("loss", "accuracy")}, refresh=False)
                    if progress.batch < steps_per_epoch:  # the epoch's last step is saved after its record
                        _save(store, stop, state, progress, identity, started=started)
                seconds = progress.epoch_seconds + time.perf_counter() - started
                progress.train_seconds += seconds
                test = _evaluate(eval_step, state["model"], dataset, config.eval_batch_size, dtype)
                rundir.append_metrics(workdir, {
                    "epoch": progress.epoch + 1, "step": progress.step,
                    "learning_rate": float(schedule(progress.step - 1)),
                    **{f"train_{k}": v for k, v in progress.means().items()},
                    **{f"test_{k}": v for k, v in test.items()},
                    "epoch_seconds": seconds, "train_seconds": progress.train_seconds})
                progress = dataclasses.replace(progress, epoch=progress.epoch + 1, batch=0, sums={},
                                               examples=0, epoch_seconds=0.0)
                _save(store, stop, state, progress, identity, force=progress.epoch == config.epochs)
        finally:
            bar.close()
    nnx.update(model, state["model"])
    model.eval()
    return read_metrics(workdir)[-1]


def _check_arguments(model: nnx.Module, dataset: Dataset, config: TrainConfig, loss_fn: LossFn) -> None:
    """What can be refused before anything is written: the data set, the config against the data,
    and (for the default loss) the model's outputs."""
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config: expected a TrainConfig, found {type(config).__name__}")
    default_loss = loss_fn is classification_loss
    validate_dataset(dataset, labels=default_loss)
    check_batch_size(config.batch_size, len(dataset.x_train), fill=True)
    if config.augment_shift:
        spatial = dataset.x_train.shape[1:-1]
        if not spatial:
            raise ValueError(f"TrainConfig.augment_shift: shifts need channels-last inputs (N, *spatial, C), "
                             f"found x_train of shape {dataset.x_train.shape}")
        if config.augment_shift >= min(spatial):
            raise ValueError(f"TrainConfig.augment_shift: {config.augment_shift} is not below the spatial size "
                             f"{min(spatial)} of the inputs {dataset.x_train.shape[1:]}; a shift that large "
                             "moves whole examples out of the frame, leaving zeros")
    if default_loss:
        _check_logits(model, dataset)


def _check_logits(model: nnx.Module, dataset: Dataset) -> None:
    x = dataset.x_train[:2].astype(param_dtype(model))
    if hasattr(model, "forward"):
        out = nnx.eval_shape(lambda m, x: m.forward(x), model, x)
        if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], dict)):
            found = f"an array of shape {out.shape}" if hasattr(out, "shape") else type(out).__name__
            raise ValueError(
                f"model: the default loss calls `logits, stats = model.forward(x)` (the protocol of "
                f"neuralode.models), but {type(model).__name__}.forward returns {found}; "
                "pass a loss_fn that knows the model's outputs")
        out = out[0]
    else:
        out = nnx.eval_shape(lambda m, x: m(x), model, x)
    found = getattr(out, "shape", type(out).__name__)
    if found != (2, dataset.num_classes):
        raise ValueError(
            f"model: maps a batch of 2 inputs {dataset.x_train.shape[1:]} to {found}, expected "
            f"logits of shape (2, {dataset.num_classes}) (or pass a loss_fn that knows its outputs)")


def _training_batches(dataset: Dataset, config: TrainConfig, epoch: int, start: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The batches of `epoch` from batch `start` on, shifted if `config.augment_shift`."""
    order = np.random.default_rng([config.seed, epoch])
    for index, (x, y) in enumerate(batches(dataset.x_train, dataset.y_train, config.batch_size, order,
                                           start=start, fill=True), start):
        if config.augment_shift:
            shifts = np.random.SeedSequence([config.seed, epoch], spawn_key=(index,))
            x = random_shift(x, config.augment_shift, np.random.default_rng(shifts))
        yield x, y


def _evaluate(eval_step: Callable, model_state: nnx.State, dataset: Dataset, batch_size: int,
              dtype: np.dtype) -> dict[str, float]:
    """The test split's metrics, averaged over examples."""
    totals = _Progress()
    for x, y in batches(dataset.x_test, dataset.y_test, batch_size):
        metrics = jax.device_get(eval_step(model_state, x.astype(dtype), y))
        check_failed_solves(metrics.get("failed_solves", 0), "the evaluation on the test split",
                            _UNSAVED)
        totals.add(metrics, len(y))
    return totals.means() if totals.examples else {}


_UNSAVED = ("; nothing of this step was saved. Raise the model's max_steps or lower the learning "
            "rate, then resume")


def _save(store: CheckpointStore, stop: _StopOnSignal, state: nnx.State, progress: _Progress,
          identity: dict[str, Any], *, started: float | None = None, force: bool = False) -> None:
    """Checkpoint the step if one is due, or `force`d, or a stop signal came; then obey the signal.
    `started`: when this process began the current epoch (None at an epoch's end)."""
    elapsed = progress.epoch_seconds + (time.perf_counter() - started if started is not None else 0.0)
    record = {**dataclasses.asdict(progress), "epoch_seconds": elapsed, **identity}
    store.save(progress.step, state, record, force=force or stop.received is not None)
    if stop.received is not None:
        stop.stop(progress.step, store.directory)
