"""The backward report: inside a train step, `BacksolveAdjoint`'s backward pass reports its failures
and reconstruction mismatches into the step's metrics instead of raising or warning from inside the
program, so the program holds no host callback (JAX's compilation cache keeps it); `train` checks
the report on the host after every step."""
import dataclasses
import os
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import neuralode as no
from neuralode.adjoints import check_backward_report
from neuralode.models import ODENet
from neuralode.train import train
from neuralode.parallel.data import holds_host_callback
from neuralode.rundir import CHECKPOINTS_DIR
from neuralode.train_step import metrics_and_gradients

sys.path.insert(0, os.path.dirname(__file__))
import train_script  # noqa: E402

TS = jnp.array([0.0, 10.0])


def van_der_pol(t, y, args):
    return jnp.stack([y[1], (1 - y[0] ** 2) * y[1] - y[0]])


class Start(nnx.Module):
    def __init__(self):
        self.y0 = nnx.Param(jnp.array([2.0, 0.0]))


def step_of(loss_fn):
    """`metrics_and_gradients` of `loss_fn` for a `Start` model, as a function of its state."""
    graphdef = nnx.graphdef(Start())
    return lambda state: metrics_and_gradients(loss_fn, nnx.merge(graphdef, state))


def final_x(adjoint):
    """y(10)[0] of Van der Pol from the model's y0: with RK4 and 100 steps the backwards solve
    reconstructs y0 with a relative mismatch of 0.4 (see test_adjoints)."""
    def loss(model):
        sol = no.solve(van_der_pol, model.y0[...], TS, solver=no.RK4(), substeps=100,
                       adjoint=adjoint, throw=False)
        return sol.ys[-1, 0], {}
    return loss


@pytest.mark.parametrize("on_mismatch, counts", [
    ("warn", (0, 0, 1)), ("raise", (0, 1, 0)), ("ignore", (0, 0, 0))])
def test_the_report_holds_what_the_callbacks_would_say_and_the_gradient_is_the_same(
        on_mismatch, counts):
    state = nnx.state(Start())
    step = step_of(final_x(no.BacksolveAdjoint(on_mismatch=on_mismatch)))
    assert not holds_host_callback(jax.make_jaxpr(step)(state).jaxpr)
    metrics, grads = jax.jit(step)(state)
    assert tuple(int(metrics[name]) for name in (
        "failed_backward_solves", "reconstruction_errors", "reconstruction_warnings")) == counts
    # The same solve differentiated by jax.grad alone: the warning's mismatch, and the gradient.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plain = jax.jit(jax.grad(lambda y: no.odeint(
            van_der_pol, y, TS, solver=no.RK4(), substeps=100,
            adjoint=no.BacksolveAdjoint())[-1, 0]))(state["y0"][...])
        jax.block_until_ready(plain)
        jax.effects_barrier()
    warned = [w.message.mismatch for w in caught if w.category is no.ReconstructionWarning]
    assert len(warned) == 1 and 0.1 < warned[0] < 1
    np.testing.assert_allclose(float(metrics["reconstruction_mismatch"]), warned[0], rtol=1e-12)
    # Two programs, so rounding may differ (XLA fuses them apart). The backwards solve amplifies
    # a perturbation of each step as it amplifies RK4's local error (~h^5 = 1e-5 per step) into
    # the mismatch; rounding (eps per step) grows at most into eps / h^5 times the mismatch.
    np.testing.assert_allclose(grads["y0"][...], plain,
                               rtol=warned[0] * np.finfo(np.float64).eps / 0.1**5)


def test_a_failed_backwards_solve_is_reported_and_its_gradient_is_nan():
    # The cotangent d sqrt(0 y) / dy = 0 * inf is nan: every backwards step is rejected until
    # max_steps, while the forward solve succeeds.
    def loss(model):
        sol = no.solve(van_der_pol, model.y0[...], jnp.array([0.0, 1.0]), max_steps=50,
                       adjoint=no.BacksolveAdjoint(), throw=False)
        return jnp.sqrt(0.0 * sol.ys[-1, 0]), {"final": sol.ys[-1, 0]}

    metrics, grads = jax.jit(step_of(loss))(nnx.state(Start()))
    assert np.isfinite(metrics["final"]) and int(metrics["failed_backward_solves"]) == 1
    assert np.all(np.isnan(grads["y0"][...]))
    with pytest.raises(RuntimeError, match="step 3: a backwards solve of BacksolveAdjoint failed"):
        check_backward_report(jax.device_get(metrics), "step 3")


def test_the_host_check_raises_warns_or_passes():
    zeros = dict.fromkeys(no.backsolve.REPORT_FIELDS, 0.0)
    check_backward_report(zeros, "step 1")
    check_backward_report({"loss": 1.0}, "step 1")  # a loss without BacksolveAdjoint: no report
    with pytest.raises(RuntimeError, match=r"step 2: BacksolveAdjoint: the backwards solve did not "
                                           r"reconstruct the forward states \(relative mismatch "
                                           r"above the adjoint's tolerance\)"):
        check_backward_report({**zeros, "reconstruction_errors": 1.0}, "step 2")
    with pytest.warns(no.ReconstructionWarning) as caught:
        check_backward_report({**zeros, "reconstruction_warnings": 2.0,
                               "reconstruction_mismatch": 0.5}, "step 3")
    assert caught[0].message.mismatch == 0.5


def test_train_raises_a_mismatch_the_odenet_reports_before_the_step_is_saved(tmp_path):
    model = ODENet(1, 4, channels=(4,), spatial_dims=1, rngs=nnx.Rngs(0),
                   adjoint=no.BacksolveAdjoint(on_mismatch="raise", tolerance=1e-14))
    config = dataclasses.replace(train_script.CONFIG, checkpoint_every=1)
    with pytest.raises(RuntimeError, match="step 1: BacksolveAdjoint: the backwards solve did not "
                                           "reconstruct"):
        train(model, train_script.tiny_dataset(), config, tmp_path)
    checkpoints = tmp_path / CHECKPOINTS_DIR
    assert not checkpoints.exists() or not any(checkpoints.iterdir())
