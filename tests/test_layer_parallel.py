"""neuralode.parallel: layer-parallel depth by MGRIT against the serial solve, on 8 devices.

The numerical checks need several devices, so they run once, in one child process with 8 host CPU
devices (`--xla_force_host_platform_device_count=8`, set before JAX starts) in float64: this file
run as a script prints their numbers as JSON, and the tests below assert on them. Bad input is
checked in this process.
"""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import neuralode
from neuralode.parallel import (MGRIT, depth_mesh, layer_parallel_solve, layer_parallel_vjp,
                                shard_layers)

DEPTH, COARSENING, WIDTH, HORIZON = 32, 4, 8, 4.0


class DampedField(nnx.Module):
    """f(t, y) = tanh(W y + b) - y with |W| < 1: an Euler step of size h < 1 is a contraction."""

    def __init__(self, width: int, *, rngs: nnx.Rngs):
        self.linear = nnx.Linear(width, width, kernel_init=nnx.initializers.normal(0.15),
                                 bias_init=nnx.initializers.normal(0.5), param_dtype=jnp.float64,
                                 rngs=rngs)

    def __call__(self, t, y, args=None):
        return jnp.tanh(self.linear(y)) - y


def _field(depth=DEPTH):
    return neuralode.DepthStack(lambda rngs: DampedField(WIDTH, rngs=rngs), depth,
                                rngs=nnx.Rngs(0))


def _serial(field, y0, t1):
    ts = jnp.linspace(0.0, t1, field.depth + 1)
    return neuralode.odeint(field, y0, ts, solver=neuralode.Euler())


def _loss(y):
    return jnp.sum(jnp.sin(y))


def _error(a, b) -> float:
    """max |a - b| (on the host: a and b may live on different devices)."""
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


def _relative_error(a, b) -> float:
    pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b))
    return max(_error(x, y) / float(np.max(np.abs(np.asarray(y)))) for x, y in pairs)


def _iterations_to(residuals, tol) -> int:
    return int(np.argmax(np.asarray(residuals) <= tol))


def child_checks() -> dict:
    """Run in the child: every number the tests assert on."""
    field, mesh = _field(), depth_mesh(8)
    y0 = jax.random.normal(jax.random.key(1), (3, WIDTH))
    exact = DEPTH // COARSENING
    out = {"devices": len(jax.devices()), "x64": bool(jax.config.jax_enable_x64)}

    def solver(mgrit, mesh=mesh):
        return jax.jit(lambda field, y0, t1: layer_parallel_solve(
            field, y0, 0.0, t1, solver=neuralode.Euler(), mgrit=mgrit, mesh=mesh))

    serial = jax.jit(_serial)
    solve_f = solver(MGRIT(coarsening=COARSENING, iterations=exact, relaxation="F"))
    solve_fcf = solver(MGRIT(coarsening=COARSENING, iterations=exact // 2, relaxation="FCF",
                             fallback=False))
    for relaxation, solve in (("F", solve_f), ("FCF", solve_fcf)):
        sol = solve(field, y0, HORIZON)
        out[relaxation] = {"error": _error(sol.ys, serial(field, y0, HORIZON)),
                           "residuals": np.asarray(sol.stats["residuals"]).tolist(),
                           "iterations": int(sol.stats["iterations"]),
                           "to_1e-10": _iterations_to(sol.stats["residuals"], 1e-10)}

    # A coarse step m h = 5 is unstable (|1 - 5| > 1): the residual grows, the serial solve
    # takes over.
    unstable = 10 * HORIZON
    sol = solve_f(field, y0, unstable)
    out["fallback"] = {"error": _error(sol.ys, serial(field, y0, unstable)),
                       **{k: np.asarray(v).tolist() for k, v in sol.stats.items()}}

    # Gradients: jax.grad through the layer-parallel forward (custom_vjp, adjoint by MGRIT).
    converged = MGRIT(coarsening=COARSENING, iterations=exact, backward_iterations=exact,
                      fallback=False)

    def trajectory_loss(ys, inside):  # `inside` weighs C- and F-points before the last
        return _loss(ys[-1]) + inside * jnp.sum(ys[::3] ** 2) / 10

    def parallel_loss(field, y0):
        return trajectory_loss(layer_parallel_solve(
            field, y0, 0.0, HORIZON, solver=neuralode.Euler(), mgrit=converged, mesh=mesh).ys, 1.0)

    def serial_loss(field, y0, inside):
        return trajectory_loss(_serial(field, y0, HORIZON), inside)

    serial_grad = nnx.jit(nnx.grad(serial_loss, argnums=(0, 1)))
    grads = nnx.jit(nnx.grad(parallel_loss, argnums=(0, 1)))(field, y0)
    out["gradient_error"] = _relative_error(grads, serial_grad(field, y0, 1.0))

    # layer_parallel_vjp on 2 devices, m = 2 (16 coarse intervals): the forward stops at its
    # tolerance; the adjoint, allowed 2 iterations, misses it and falls back to the serial sweep.
    tol = 1e-8
    mgrit = MGRIT(coarsening=2, iterations=DEPTH // 2, tol=tol, backward_iterations=2,
                  backward_tol=tol)

    reference = serial_grad(field, y0, 0.0)  # the cotangent of y(t1) only

    @nnx.jit
    def vjp(field, y0):
        y1 = _serial(field, y0, HORIZON)[-1]
        return layer_parallel_vjp(field, y0, 0.0, HORIZON, jnp.cos(y1), solver=neuralode.Euler(),
                                  mgrit=mgrit, mesh=depth_mesh(2))

    sol, grads, backward = vjp(_field(), y0)  # `field` now lives on the 8 devices
    out["vjp"] = {"forward_error": _error(sol.ys[-1], serial(field, y0, HORIZON)[-1]),
                  "gradient_error": _relative_error(grads, reference),
                  "forward": {k: np.asarray(v).tolist() for k, v in sol.stats.items()},
                  "backward": {k: np.asarray(v).tolist() for k, v in backward.items()}}

    # shard_layers: a DepthStack's arrays split by layer over `depth`, the rest replicated.
    model = nnx.Dict(head=nnx.Linear(WIDTH, 2, rngs=nnx.Rngs(0)), stack=_field())
    shard_layers(model, mesh)
    spec = jax.sharding.PartitionSpec
    out["shard_layers"] = {
        "stack": model["stack"].layers.linear.kernel[...].sharding.spec == spec("depth"),
        "head": model["head"].kernel[...].sharding.spec == spec()}
    try:
        shard_layers(_field(12), mesh)
    except ValueError as error:
        out["shard_layers"]["error"] = str(error)
    return out


@pytest.fixture(scope="module")
def results() -> dict:
    env = dict(os.environ, JAX_ENABLE_X64="1", JAX_PLATFORMS="cpu",
               XLA_FLAGS=os.environ.get("XLA_FLAGS", "")
               + " --xla_force_host_platform_device_count=8")
    done = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_child_has_8_devices_in_float64(results):
    assert results["devices"] == 8 and results["x64"]


def test_forward_is_exact_after_n_over_m_iterations(results):
    # Parareal's exactness: after k iterations the first k C-points are exact (2k with FCF).
    assert results["F"]["iterations"] == DEPTH // COARSENING
    assert results["F"]["error"] <= 1e-12
    assert results["FCF"]["iterations"] <= DEPTH // (2 * COARSENING)
    assert results["FCF"]["error"] <= 1e-12


def test_residual_decreases_monotonically_on_a_contractive_field(results):
    for relaxation in ("F", "FCF"):
        residuals = [r for r in results[relaxation]["residuals"] if np.isfinite(r)]
        assert len(residuals) >= 4
        assert all(b < a for a, b in zip(residuals, residuals[1:])), residuals


def test_fcf_needs_fewer_iterations_than_f(results):
    f, fcf = results["F"]["to_1e-10"], results["FCF"]["to_1e-10"]
    print(f"iterations to a residual of 1e-10: F {f}, FCF {fcf} (N = {DEPTH}, m = {COARSENING})")
    assert 0 < fcf < f <= DEPTH // COARSENING


def test_divergence_falls_back_to_the_serial_solve(results):
    fallback = results["fallback"]
    assert fallback["diverged"] and fallback["fallback"]
    assert fallback["rho"][fallback["iterations"] - 1] > 1
    assert fallback["error"] <= 1e-12


def test_gradient_at_convergence_equals_backprop(results):
    assert results["gradient_error"] <= 1e-10


def test_vjp_reports_both_solves_tolerance_and_fallback(results):
    # m = 2 on 2 devices: 16 coarse intervals, tol 1e-8. For a contraction an iterate whose
    # residual is <= tol is within (number of intervals) * tol of the solution.
    vjp, intervals, tol = results["vjp"], DEPTH // 2, 1e-8
    forward, backward = vjp["forward"], vjp["backward"]
    assert 0 < forward["iterations"] < intervals
    assert forward["residuals"][forward["iterations"]] <= tol
    assert not (forward["unconverged"] or forward["diverged"] or forward["fallback"])
    assert forward["rho"][0] < 1
    assert vjp["forward_error"] <= intervals * tol
    # The adjoint's 2 iterations miss tol: the serial adjoint sweep gives the gradient instead.
    assert backward["iterations"] == 2 and backward["residuals"][2] > tol
    assert backward["unconverged"] and backward["fallback"] and not backward["diverged"]
    assert vjp["gradient_error"] <= intervals * tol


def test_shard_layers_splits_depth_stacks_and_replicates_the_rest(results):
    placed = results["shard_layers"]
    assert placed["stack"] and placed["head"]
    assert "depth 12 cannot be split over the 8 devices" in placed["error"]


# ---------------------------------------------------------------------------------------------
# Bad input (one device is enough).

def _solve(field, **options):
    settings = dict(solver=neuralode.Euler(), mgrit=MGRIT(coarsening=4), mesh=depth_mesh(1))
    settings.update(options)
    return layer_parallel_solve(field, jnp.ones((2, WIDTH)), 0.0, 1.0, **settings)


@pytest.fixture(scope="module")
def abstract_field():
    """A DepthStack of depth 6 without its arrays: every check below fails before using them."""
    return nnx.eval_shape(lambda: _field(6))


def test_depth_must_divide_into_coarse_intervals_per_device(abstract_field):
    with pytest.raises(ValueError, match="depth N = 6 must be divisible by coarsening m = 4"):
        _solve(abstract_field)


@pytest.mark.parametrize("settings, match", [
    (dict(coarsening=1), "coarsening"), (dict(iterations=-1), "iterations"),
    (dict(tol=0.0), "tol"), (dict(relaxation="C"), "relaxation")])
def test_mgrit_settings_are_checked(settings, match):
    with pytest.raises(ValueError, match=f"MGRIT.{match}"):
        MGRIT(**settings)


def test_only_euler_has_a_coarse_propagator(abstract_field):
    with pytest.raises(ValueError, match="solver must be Euler"):
        _solve(abstract_field, solver=neuralode.RK4())


def test_field_and_mesh_are_checked(abstract_field):
    with pytest.raises(TypeError, match="field must be a DepthStack"):
        _solve(nnx.eval_shape(lambda: DampedField(WIDTH, rngs=nnx.Rngs(0))))
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    with pytest.raises(ValueError, match="mesh must be a jax.sharding.Mesh with an axis named"):
        _solve(abstract_field, mesh=mesh)
    with pytest.raises(ValueError, match="devices must be an int"):
        depth_mesh(len(jax.devices()) + 1)


if __name__ == "__main__":
    print(json.dumps(child_checks()))
