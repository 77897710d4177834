"""neuralode.measure: parameter counts, NFE read, counted and run, compiled memory, accuracy, slope
fits and accuracy-cost fronts, each against what it must equal."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import neuralode as no
from neuralode.measure import (MEMORY_FIELDS, CallCounter, CountedField, accuracy, cheapest,
                               count_params, counted_nfe, forward_stats, gradient_memory_bytes,
                               loglog_slope, memory_analysis, pareto_front, solve_stats)
from neuralode.models import ODENet
from neuralode.train import classification_loss


def sequences(n=5, length=8, key=0):
    x = jax.random.normal(jax.random.key(key), (n, length, 1), jnp.float32)
    return x, jnp.arange(n, dtype=jnp.int32) % 3


def test_count_params_counts_every_entry():
    assert count_params(nnx.Linear(5, 3, rngs=nnx.Rngs(0))) == 5 * 3 + 3
    assert count_params(nnx.Sequential(nnx.Linear(2, 4, rngs=nnx.Rngs(0)),
                                       nnx.Linear(4, 1, rngs=nnx.Rngs(0)))) == 12 + 5


def test_solve_stats_reads_the_fixed_step_counts_without_running():
    calls = CallCounter()
    field = CountedField(no.MLPField(3, 8, rngs=nnx.Rngs(0)), calls)
    ts = jnp.array([0.0, 1.0])
    y0 = jnp.ones((2, 3))
    for solver, stages in ((no.Euler(), 1), (no.RK4(), 4)):
        stats = solve_stats(field, y0, ts, solver=solver, substeps=5)
        assert (stats["nfe"], stats["nfe_backward"]) == (5 * stages, 5 * stages)
    assert calls.calls == 0  # traced, never run


def test_counted_nfe_counts_every_field_call_and_leaves_the_model_alone():
    x, y = sequences()
    ode = ODENet(1, 3, channels=(2,), spatial_dims=1, rtol=1e-3, atol=1e-3, rngs=nnx.Rngs(0))
    forward, backward = counted_nfe(ode, classification_loss, x, y)
    # Dopri5: six evaluations per step and one more at the start; the backsolve adjoint solves
    # the augmented system backwards, evaluating the field again.
    assert forward == forward_stats(ode, x)["nfe"] and (forward - 1) % 6 == 0
    assert backward >= 7
    assert not any(isinstance(stage, CountedField) for stage in ode.stages)


class Deep(nnx.Module):
    """`depth` tanh layers: backprop keeps every layer's activations."""

    def __init__(self, depth: int, width: int = 64):
        self.layers = nnx.List([nnx.Linear(width, width, rngs=nnx.Rngs(k)) for k in range(depth)])

    def __call__(self, x):
        for layer in self.layers:
            x = jnp.tanh(layer(x))
        return x


def squared_error(model, x, y):
    return jnp.mean((model(x) - y) ** 2), {}


def test_memory_analysis_and_gradient_memory():
    stats = memory_analysis(lambda v: 2 * v, jax.ShapeDtypeStruct((1000,), jnp.float32))
    assert stats["argument_size_in_bytes"] == stats["output_size_in_bytes"] == 4000
    x = jnp.ones((256, 64), jnp.float32)
    shallow, deep = (gradient_memory_bytes(Deep(depth), squared_error, x, x) for depth in (1, 8))
    activation = x.size * 4
    assert deep - shallow >= 7 * activation  # at least one stored activation per extra layer
    # Compiled at the lowest backend optimisation, the statistics are those of optimised code.
    graphdef, state = nnx.split(Deep(8))

    def grad(state, x, y):
        return nnx.grad(lambda model: squared_error(model, x, y)[0])(nnx.merge(graphdef, state))

    optimised = jax.jit(grad).lower(state, x, x).compile(
        compiler_options={"xla_backend_optimization_level": 3}).memory_analysis()
    assert memory_analysis(grad, state, x, x) == {
        key: int(getattr(optimised, key)) for key in MEMORY_FIELDS if hasattr(optimised, key)}


def test_accuracy_in_batches_equals_the_whole_batch():
    x = np.asarray(jax.random.normal(jax.random.key(2), (7, 4), jnp.float32))
    y = np.array([0, 1, 2, 0, 1, 2, 0])
    model = nnx.Linear(4, 3, rngs=nnx.Rngs(1))
    expected = float(np.mean(np.argmax(np.asarray(model(x)), -1) == y))
    assert 0 < expected < 1
    assert accuracy(model, x, y, batch_size=3) == expected
    assert accuracy(model, x, y.astype(np.float32)) == expected  # integral floats are labels too
    # Labels counted from 1 were compared with class indices counted from 0 (a perfect model
    # scored 0), one-hot rows raised numpy's broadcasting error: both are refused, naming y.
    with pytest.raises(ValueError, match=r"y: labels in \[1, 3\], but the model has 3 classes, so "
                                         r"they must lie in \[0, 2\]"):
        accuracy(model, x, y + 1)
    with pytest.raises(ValueError, match=r"y: expected one integer class index per example, shape "
                                         r"\(N,\), got an array of shape \(7, 3\)"):
        accuracy(model, x, np.eye(3)[y])
    with pytest.raises(ValueError, match=r"y: expected one integer class index"):
        accuracy(model, x, y + 0.5)


class Noisy(nnx.Module):
    """A classifier with what `train()` and `eval()` switch: BatchNorm and Dropout."""

    def __init__(self):
        self.linear = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
        self.norm = nnx.BatchNorm(3, rngs=nnx.Rngs(0))
        self.dropout = nnx.Dropout(0.5, rngs=nnx.Rngs(1))

    def __call__(self, x):
        return self.dropout(self.norm(self.linear(x)))


def test_measurements_leave_the_model_in_the_mode_they_found_it():
    """accuracy, forward_stats and gradient_memory_bytes left a model in eval mode: a training
    loop of the user's that measured between steps went on without Dropout, BatchNorm's batch
    statistics or RNODE's regulariser (this ODE-Net's loss fell from 10.0 to 1.12, silently)."""
    x, y = sequences()
    rnode = ODENet(1, 3, channels=(2,), spatial_dims=1, kinetic_weight=1.0, rngs=nnx.Rngs(0))
    accuracy(rnode, x, y)
    forward_stats(rnode, x)
    gradient_memory_bytes(rnode, classification_loss, x, y)
    assert not rnode.deterministic
    assert classification_loss(rnode, x, y)[1]["regularisation"] > 0
    noisy = Noisy()
    modes = lambda: (noisy.norm.use_running_average, noisy.dropout.deterministic)  # noqa: E731
    for before in ((False, False), (True, True), (False, True)):  # train, eval, and mixed
        noisy.norm.use_running_average, noisy.dropout.deterministic = before
        accuracy(noisy, x[:, :4, 0], y)
        gradient_memory_bytes(noisy, lambda m, x, y: (jnp.mean(m(x)), {}), x[:, :4, 0], y)
        assert modes() == before


def test_measurements_raise_when_a_model_reports_a_failed_solve():
    model = ODENet(1, 3, channels=(4,), spatial_dims=1, rtol=1e-9, atol=1e-9, max_steps=3,
                   adjoint=no.CheckpointAdjoint(), rngs=nnx.Rngs(0))
    x = np.asarray(jax.random.normal(jax.random.key(3), (5, 8, 1), jnp.float32))
    y = np.zeros(5, np.int64)
    with pytest.raises(RuntimeError, match=r"accuracy: an ODE solve of the model failed \(failed_solves = 1"):
        accuracy(model, x, y)
    with pytest.raises(RuntimeError, match=r"forward_stats: an ODE solve of the model failed \(failed_solves = 1"):
        forward_stats(model, x)
    with pytest.raises(RuntimeError, match=r"counted_nfe: an ODE solve of the model failed \(failed_solves = 1"):
        counted_nfe(model, classification_loss, x, y)


def test_loglog_slope_recovers_a_power_law_above_the_floor():
    h = [0.5, 0.25, 0.125, 0.0625]
    assert math.isclose(loglog_slope(h, [3 * v**2 for v in h]), 2.0, rel_tol=1e-12)
    errors = [3 * v**3 for v in h[:3]] + [1e-9]  # the last one at "rounding"
    assert math.isclose(loglog_slope(h, errors, floor=1e-8), 3.0, rel_tol=1e-12)
    assert math.isnan(loglog_slope(h, [1.0, 1e-9, 1e-9, 1e-9], floor=1e-8))


def test_pareto_front_and_cheapest():
    points = [{"test_acc": 0.90, "nfe_forward": 8}, {"test_acc": 0.95, "nfe_forward": 8},
              {"test_acc": 0.97, "nfe_forward": 30}, {"test_acc": 0.96, "nfe_forward": 40},
              {"test_acc": 0.97, "nfe_forward": 30}]
    assert pareto_front(points) == [points[1], points[2], points[4]]  # ties both stay
    assert cheapest(points, 0.955) is points[2]
    assert cheapest(points, 0.9) is points[0]
    assert cheapest(points, 0.99) is None
