"""Measuring models and solves: parameters, field evaluations, compiled memory, accuracy, fits.

- `count_params(model)`: entries of every `nnx.Param`.
- Field evaluations: `forward_stats(model, x)` runs a classifier's eval-mode `forward` (`nfe`, and
  `nfe_backward` of the fixed-step models); `solve_stats(field, y0, ts, ...)` reads the statistics
  a fixed-step `solve` knows at trace time, running nothing; `counted_nfe(model, loss_fn, x, y)`
  counts every call of the field in a loss and its gradient (`CountedField`: a
  `jax.debug.callback` per call), for adaptive solves whose steps are chosen at run time.
- Memory: `memory_analysis(fn, *args)` is XLA's account of the compiled `jax.jit(fn)` (nothing
  runs); `gradient_memory_bytes(model, loss_fn, x, y)` is the temporary memory of a model's
  training-mode parameter gradient.
- `accuracy(model, x, y)`: eval-mode top-1 accuracy in batches.
- `mode(model, train=...)`: the context every measurement runs the model in; a measurement leaves
  a model in the mode it found it (a user's training loop keeps its dropout and its regulariser).
- `loglog_slope(x, y, floor)`: least-squares slope of log y against log x (convergence orders).
- `pareto_front(points)`, `cheapest(points, at_least)`: accuracy-cost trade-offs of evaluations
  given as dicts with `test_acc` and `nfe_forward`.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from neuralode.data import batches, check_labels
from neuralode.fields import LOWEST_OPTIMISATION
from neuralode.integrate import solve
from neuralode.train_step import (check_failed_solves, check_step_metrics, logits_and_stats,
                                  metrics_and_gradients)

MODE_ATTRIBUTES = ("deterministic", "use_running_average")  # what nnx's train() and eval() set
MEMORY_FIELDS = ("temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes",
                 "alias_size_in_bytes", "generated_code_size_in_bytes", "peak_memory_in_bytes")


@contextlib.contextmanager
def mode(model: nnx.Module, *, train: bool) -> Iterator[nnx.Module]:
    """`model` in training (`model.train()`) or eval (`model.eval()`) mode inside the block, and
    afterwards in the mode each of its modules was in before: switching a model to eval mode for
    a measurement and leaving it there would turn off, for the training steps that follow in a
    loop of the user's, the Dropout, BatchNorm statistics or RNODE regulariser it trains with."""
    saved = [(module, {name: getattr(module, name) for name in MODE_ATTRIBUTES if hasattr(module, name)})
             for _, module in nnx.iter_modules(model)]
    model.train() if train else model.eval()
    try:
        yield model
    finally:
        for module, attributes in saved:
            for name, value in attributes.items():
                setattr(module, name, value)


def count_params(model: nnx.Module) -> int:
    """The number of parameters (entries of every `nnx.Param`) of `model`."""
    return int(sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param))))


# ---------------------------------------------------------------------------------------------
# Field evaluations

def forward_stats(model: nnx.Module, x) -> dict[str, float]:
    """The statistics of one eval-mode `model.forward(x)` (a classifier of `neuralode.models`):
    `nfe` (field evaluations of all stages) and, for the fixed-step models, `nfe_backward` (those
    of backprop); raises if a stage's solve failed. `model` keeps its mode."""
    with mode(model, train=False):
        stats = {k: float(v) for k, v in _forward_stats(model, jnp.asarray(x)).items()}
    check_failed_solves(stats.get("failed_solves", 0), "forward_stats")
    return stats


@nnx.jit
def _forward_stats(model: nnx.Module, x):  # one function, so equal models share its compilation
    return model.forward(x)[1]


def solve_stats(field, y0, ts, **solve_options) -> dict[str, Any]:
    """`solve(field, y0, ts, **solve_options).stats`, traced under `jax.eval_shape`: nothing runs.
    A fixed-step solve's counts (`nfe`, `nfe_backward`) are Python ints fixed at trace time; an
    adaptive solve's come back as shapes (count those with `counted_nfe`)."""
    stats = {}

    def forward(y0):
        sol = solve(field, y0, ts, **solve_options)
        stats.update(sol.stats)
        return sol.ys

    jax.eval_shape(forward, y0)
    return stats


class CallCounter:
    """A host-side count of calls (the target of `jax.debug.callback`)."""

    def __init__(self):
        self.calls = 0

    def __call__(self):
        self.calls += 1


class CountedField(nnx.Module):
    """`field` that reports every call to `counter` (a `jax.debug.callback` per evaluation, so the
    count is of evaluations at run time, adaptive steps and rejected steps included)."""

    def __init__(self, field: nnx.Module, counter: CallCounter):
        self.field, self.counter = field, counter

    def __call__(self, t, y, *args):
        jax.debug.callback(self.counter)
        return self.field(t, y, *args)


def counted_nfe(model: nnx.Module, loss_fn: Callable, x, y) -> tuple[int, int]:
    """(forward, backward) field evaluations of one training-mode `loss_fn(model, x, y)` (which
    returns `(loss, metrics)`, as `neuralode.train` losses do) and of its parameter gradient,
    counted on a copy of the classifier `model` whose stages (one field each, as in `ODENet`)
    report every call; `model` is not changed. Backward = the gradient's evaluations minus the
    forward ones it repeats. Meant for adaptive solves, whose steps are chosen at run time: under
    reverse mode through a `lax.scan` (the fixed-step solves) JAX does not replay the callbacks of
    the forward pass, so read those counts from `forward_stats` or `solve_stats` instead."""
    clone = nnx.clone(model)
    counter = CallCounter()
    for index in range(len(clone.stages)):
        clone.stages[index] = CountedField(clone.stages[index], counter)
    loss, grad, state = _loss_and_grad(clone, loss_fn)
    metrics = run_once(loss, state, x, y)[1]
    check_failed_solves(float(metrics.get("failed_solves", 0)), "counted_nfe")
    forward, counter.calls = counter.calls, 0
    check_step_metrics(jax.device_get(run_once(grad, state, x, y)[0]), "counted_nfe")
    return forward, counter.calls - forward


def run_once(fn: Callable, *args):
    """`jax.jit(fn)(*args)` compiled at XLA's lowest backend optimisation (`-O0`), for a program
    run once (a count, a measurement), where LLVM's optimisation would cost more than it saves."""
    return jax.jit(fn, compiler_options=LOWEST_OPTIMISATION)(*args)


def _loss_and_grad(model: nnx.Module, loss_fn: Callable):
    """The training-mode `loss_fn` output `(loss, metrics)` and the train step's `(metrics,
    parameter gradient)` (`metrics_and_gradients`: the backward report in the metrics, no host
    callback of `BacksolveAdjoint`) as pure functions of the model state (the RNODE noise counter
    may advance in the trace); `model` keeps its mode."""
    with mode(model, train=True):
        graphdef, state = nnx.split(model)

    def loss(state, x, y):
        return loss_fn(nnx.merge(graphdef, state), x, y)

    def grad(state, x, y):
        return metrics_and_gradients(loss_fn, nnx.merge(graphdef, state), x, y)

    return loss, grad, state


# ---------------------------------------------------------------------------------------------
# Memory

def memory_analysis(fn: Callable, *args) -> dict[str, int]:
    """XLA's memory statistics of `jax.jit(fn)` compiled for `args` (arrays or
    `jax.ShapeDtypeStruct`s), in bytes; nothing runs. `temp_size_in_bytes` is what the program
    allocates besides its arguments and outputs: for a gradient, the stored activations.

    Compiled at XLA's lowest backend optimisation: the statistics come from the buffer assignment
    of XLA's HLO passes, which LLVM does not change (the same bytes at every level, measured on
    ResNet, RK-Net and ODE-Net gradients), and the compilation takes 1.5-1.8x less time."""
    stats = jax.jit(fn).lower(*args).compile(LOWEST_OPTIMISATION).memory_analysis()
    return {key: int(getattr(stats, key)) for key in MEMORY_FIELDS if hasattr(stats, key)}


def gradient_memory_bytes(model: nnx.Module, loss_fn: Callable, x, y) -> int:
    """Compiled temporary memory of the training-mode parameter gradient of `loss_fn` (returning
    `(loss, metrics)`) over the batch `(x, y)`."""
    _, grad, state = _loss_and_grad(model, loss_fn)
    return memory_analysis(grad, state, x, y)["temp_size_in_bytes"]


# ---------------------------------------------------------------------------------------------
# Accuracy, fits, trade-offs

def accuracy(model: nnx.Module, x, y, batch_size: int = 1000) -> float:
    """Top-1 accuracy of the eval-mode classifier `model` on `(x, y)`, `batch_size` at a time.
    `y` holds one class index per example, in [0, classes) of the model's logits: one-hot rows or
    labels counted from 1 raise ValueError (they would score as wrong, silently). Raises if a
    classifier of `neuralode.models` reports a failed ODE solve on some batch. `model` keeps its
    mode."""
    y = np.asarray(y)
    if y.ndim != 1 or not np.array_equal(y, np.round(y)):
        raise ValueError(f"y: expected one integer class index per example, shape (N,), got an "
                         f"array of shape {y.shape} and dtype {y.dtype}")
    correct = 0
    with mode(model, train=False):
        for index, (xb, yb) in enumerate(batches(x, y, batch_size)):
            predicted, failed, classes = _predict(model, xb)
            check_failed_solves(float(failed), "accuracy")
            if index == 0:  # the classes are the logits' width: all of y, once
                check_labels("y", y, int(classes), "the model has")
            correct += int(np.sum(np.asarray(predicted) == yb))
    return correct / len(y)


@nnx.jit
def _predict(model: nnx.Module, x):
    """Predicted classes, the failed solves a model with `forward` reports (reported rather than
    raised inside the program, so that it holds no host callback and JAX's cache keeps it), and
    the number of classes."""
    logits, stats = logits_and_stats(model, x)
    return jnp.argmax(logits, axis=-1), stats.get("failed_solves", 0), logits.shape[-1]


def loglog_slope(x, y, floor: float = 0.0) -> float:
    """Least-squares slope of log y against log x over the points with y > `floor` (values at
    rounding level say nothing about an order); nan with fewer than two left. With x the step
    size h and y an error, the slope is the observed order p of error ~ C h^p."""
    keep = [(a, b) for a, b in zip(x, y) if b > floor]
    if len(keep) < 2:
        return float("nan")
    xs, ys = (np.asarray(v, dtype=float) for v in zip(*keep))
    return float(np.polyfit(np.log(xs), np.log(ys), 1)[0])


def pareto_front(points: list[dict]) -> list[dict]:
    """The evaluations (dicts with `test_acc`, `nfe_forward`) that no other is both as cheap and as
    accurate as, with at least one of the two strictly."""
    def dominates(q, p):
        return (q["nfe_forward"] <= p["nfe_forward"] and q["test_acc"] >= p["test_acc"]
                and (q["nfe_forward"], q["test_acc"]) != (p["nfe_forward"], p["test_acc"]))

    return [p for p in points if not any(dominates(q, p) for q in points)]


def cheapest(points: list[dict], at_least: float) -> dict | None:
    """The evaluation with the fewest `nfe_forward` among `points` whose `test_acc` is at least
    `at_least`, or None."""
    reached = [p for p in points if p["test_acc"] >= at_least]
    return min(reached, key=lambda p: p["nfe_forward"]) if reached else None
