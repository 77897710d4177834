"""The train step: a pure, jitted optimiser step over a model split into graph and state, and losses.

`graphdef, state = make_train_state(model, tx)` splits a model and its `nnx.Optimizer` into a graph
definition and a pytree of arrays; `step = make_train_step(graphdef, loss_fn)` is the jitted
`step(state, *batch) -> (state, metrics)` that takes one optimiser step on
`loss_fn(model, *batch) -> (loss, metrics)`. It is pure in `(state, batch)`: a training loop is a
`for` over batches (`neuralode.train.train` is one), and shardings can be applied to it from outside.
`nnx.update(model, state["model"])` writes the result back into the model:

    graphdef, state = make_train_state(model, optax.adam(1e-3))
    step = make_train_step(graphdef, lambda m, x, y: (loss := mse(m(x), y), {"loss": loss}))
    for x, y in data:
        state, metrics = step(state, x, y)
    nnx.update(model, state["model"])

`classification_loss` is the loss `train` uses by default.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from neuralode.adjoints import check_backward_report
from neuralode.backsolve import REPORT_FIELDS, reporting_backward
from neuralode.data import check_labels

LossFn = Callable[..., tuple[jax.Array, dict[str, jax.Array]]]
TrainStep = Callable[..., tuple[nnx.State, dict[str, jax.Array]]]


def classification_metrics(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean softmax cross-entropy of `logits` (batch, classes) against integer `labels`, and accuracy.

    Labels must lie in [0, classes): concrete ones outside raise ValueError; traced ones make the
    loss nan (a label -1, the usual "ignore", was read as the last class: a finite loss for the
    wrong target, without a word)."""
    if logits.ndim != 2 or logits.shape[0] != labels.shape[0]:
        raise ValueError(
            f"logits: expected shape (batch, num_classes) with batch {labels.shape[0]}, found {logits.shape}"
        )
    classes = logits.shape[-1]
    if not isinstance(labels, jax.core.Tracer):
        check_labels("labels", labels, classes, "the logits have")
    in_range = jnp.all((labels >= 0) & (labels < classes))
    loss = jnp.where(in_range, optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(),
                     jnp.nan)
    predicted = jnp.argmax(logits, axis=-1)
    accuracy = (predicted == labels.astype(predicted.dtype)).astype(logits.dtype).mean()
    return loss, {"loss": loss, "accuracy": accuracy}


def classification_loss(model: nnx.Module, x: jax.Array, y: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The default `loss_fn`: softmax cross-entropy of the model's logits against integer labels `y`.

    A model with a `forward(x) -> (logits, stats)` method (the classifiers of `neuralode.models`)
    is called through it: `stats["regularisation"]` (RNODE's kinetic and Jacobian terms, in
    training mode) is added to the loss, and every stat (NFE, the terms) is logged as a metric.
    Any other model's `model(x)` are the logits. Metrics: `loss` (what is minimised),
    `cross_entropy`, `accuracy`, and the stats, among them `failed_solves`: the models report a
    failed ODE solve there instead of raising it inside the compiled step, so a loop of its own
    over `make_train_step` must check it (`train` does, after every step).
    """
    logits, stats = logits_and_stats(model, x)
    loss, metrics = classification_metrics(logits, y)
    metrics["cross_entropy"] = loss
    if "regularisation" in stats:
        loss = loss + stats["regularisation"]
        metrics["loss"] = loss
    metrics.update({name: jnp.asarray(value, logits.dtype) for name, value in stats.items()})
    return loss, metrics


def logits_and_stats(model: nnx.Module, x: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """`model.forward(x)` for a model that has it (the classifiers of `neuralode.models`: logits and
    statistics, failures reported in `failed_solves`), else `model(x)` and no statistics."""
    return model.forward(x) if hasattr(model, "forward") else (model(x), {})


def check_step_metrics(metrics: dict[str, Any], where: str, advice: str = "") -> None:
    """Raise (or warn) on the host for what a step's program reports instead of raising itself:
    its `failed_solves` (`check_failed_solves`) and `BacksolveAdjoint`'s backward report
    (`neuralode.adjoints.check_backward_report`). `metrics` holds host values."""
    check_failed_solves(metrics.get("failed_solves", 0), where, advice)
    check_backward_report(metrics, where, advice)


def check_failed_solves(failed, where: str, advice: str = "") -> None:
    """Raise RuntimeError if `failed` (a host value: the `failed_solves` a classifier of
    `neuralode.models` reports instead of raising inside the compiled program) is above 0."""
    if np.ndim(failed) == 0 and failed > 0:
        raise RuntimeError(
            f"{where}: an ODE solve of the model failed (failed_solves = {float(failed):g}: "
            "max_steps reached, a vector field returning nan/inf, or a non-finite state entering "
            f"a stage); call model(x) on the batch for the solver's message{advice}")


def param_dtype(model: nnx.Module) -> np.dtype:
    """The dtype of the model's floating-point parameters, to which input batches are cast."""
    dtypes = {leaf.dtype for leaf in jax.tree.leaves(nnx.state(model, nnx.Param))
              if jnp.issubdtype(leaf.dtype, jnp.floating)}
    if len(dtypes) != 1:
        raise ValueError(f"model: expected floating parameters of one dtype, found {sorted(map(str, dtypes))}")
    return np.dtype(dtypes.pop())


def make_train_state(model: nnx.Module, tx: optax.GradientTransformation) -> tuple[nnx.GraphDef, nnx.State]:
    """`nnx.split` of `{"model": model, "optimizer": nnx.Optimizer(model, tx, wrt=nnx.Param)}`: the
    graph definition (with the model's train/eval mode as it is now) and the state `make_train_step`
    steps, a pytree of arrays `{"model": ..., "optimizer": ...}`."""
    return nnx.split({"model": model, "optimizer": nnx.Optimizer(model, tx, wrt=nnx.Param)})


def make_train_step(graphdef: nnx.GraphDef, loss_fn: LossFn,
                    gradient_metrics: Callable[[nnx.State], dict[str, jax.Array]] | None = None) -> TrainStep:
    """The jitted optimiser step `step(state, *batch) -> (state, metrics)` for the graph definition
    of `make_train_state`: the gradient of `loss_fn(model, *batch) -> (loss, metrics)` with respect
    to the parameters, applied by the optimiser. Pure: nothing outside `state` is read or changed.
    The metrics carry the failures the step reports instead of raising (`failed_solves`, and the
    backward report of `metrics_and_gradients`): a loop of its own checks them on the host
    with `check_step_metrics`, as `train` does.
    `gradient_metrics(grads) -> {name: array}` adds measurements of the gradient the step applies
    (an `nnx.State` like the model's parameters: per-layer norms, say) to the metrics."""

    @jax.jit
    def step(state: nnx.State, *batch: Any) -> tuple[nnx.State, dict[str, jax.Array]]:
        parts = nnx.merge(graphdef, state)
        metrics, grads = metrics_and_gradients(loss_fn, parts["model"], *batch)
        if gradient_metrics is not None:
            metrics = {**metrics, **gradient_metrics(grads)}
        return apply_gradients(parts, grads), metrics

    return step


def metrics_and_gradients(loss_fn: LossFn, model: nnx.Module, *batch: Any
                          ) -> tuple[dict[str, jax.Array], nnx.State]:
    """The metrics of `loss_fn(model, *batch) -> (loss, metrics)` and the loss's gradient with
    respect to the model's parameters. Where the loss solves with `BacksolveAdjoint`, its backward
    passes report into the metrics (`neuralode.backsolve.REPORT_FIELDS`: failed backwards solves,
    reconstruction mismatches), so that the program holds no host callback of theirs; check them
    with `check_step_metrics` (`train` does, after every step)."""
    reporters = []

    def loss(model, probe):
        with reporting_backward(probe) as users:
            out = loss_fn(model, *batch)
        reporters.extend(users)
        return out

    probe = jnp.zeros(len(REPORT_FIELDS))
    (_, metrics), (grads, report) = nnx.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
        model, probe)
    if reporters:
        metrics = {**metrics, **dict(zip(REPORT_FIELDS, report))}
    return metrics, grads


def apply_gradients(parts: dict[str, nnx.Module], grads: nnx.State) -> nnx.State:
    """The optimiser update of `parts = nnx.merge(graphdef, state)` (`make_train_state`'s model and
    optimizer) by the parameter gradient `grads`, in place; returns the new state."""
    with jax.numpy_dtype_promotion("standard"):  # optax computes `decay ** count` (float ** int32)
        parts["optimizer"].update(parts["model"], grads)
    return nnx.state(parts)


def make_eval_step(graphdef: nnx.GraphDef, loss_fn: LossFn) -> Callable[..., dict[str, jax.Array]]:
    """The jitted `metrics = evaluate(model_state, *batch)` of `loss_fn` for a model graph definition."""
    return jax.jit(lambda model_state, *batch: loss_fn(nnx.merge(graphdef, model_state), *batch)[1])
