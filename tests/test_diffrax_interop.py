"""diffrax all the way through: any diffrax solver, step-size controller, adjoint and Event pass
through `solve`; dense output on every path; a field is a diffrax vector field as it is, with
gradients reaching its parameters under every diffrax adjoint."""
import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import optimistix as optx
import pytest
import scipy.integrate
from flax import nnx

import neuralode as no
from helpers import A, Y0, convergence_order, linear_exact, linear_field, oscillator_field

MU = 1000.0


def stiff_van_der_pol(t, y, args):
    return jnp.stack([y[1], MU * (1 - y[0] ** 2) * y[1] - y[0]])


def test_stiff_van_der_pol_with_kvaerno5_matches_radau():
    """mu = 1000 over [0, 1000] (through the first relaxation jump, near t = 807): an implicit
    diffrax solver passes straight through, against scipy's Radau at 1e-9."""
    ts = jnp.linspace(0.0, 1000.0, 6)
    sol = no.solve(stiff_van_der_pol, jnp.array([2.0, 0.0]), ts, solver=diffrax.Kvaerno5(),
                   rtol=1e-6, atol=1e-6)
    reference = scipy.integrate.solve_ivp(
        lambda t, y: [y[1], MU * (1 - y[0] ** 2) * y[1] - y[0]], (0.0, 1000.0), [2.0, 0.0],
        method="Radau", t_eval=np.asarray(ts), rtol=1e-9, atol=1e-9,
        jac=lambda t, y: [[0.0, 1.0], [-2 * MU * y[0] * y[1] - 1, MU * (1 - y[0] ** 2)]])
    assert reference.y[0, -1] < 0  # past the jump
    np.testing.assert_allclose(sol.ys, reference.y.T, rtol=0, atol=1e-5)
    assert int(sol.stats["nfe"]) == -1  # an implicit solver's evaluations are not counted


def test_stepsize_controller_and_fixed_step_diffrax_solvers_pass_through():
    ts = jnp.linspace(0.0, 2.0, 5)
    controller = diffrax.PIDController(rtol=1e-7, atol=1e-9, pcoeff=0.3, icoeff=0.4)
    ours = no.solve(linear_field, Y0, ts, solver=no.Tsit5(), stepsize_controller=controller)
    theirs = diffrax.diffeqsolve(diffrax.ODETerm(linear_field), diffrax.Tsit5(), 0.0, 2.0, None,
                                 Y0, saveat=diffrax.SaveAt(ts=ts), stepsize_controller=controller)
    np.testing.assert_array_equal(ours.ys, theirs.ys)
    assert int(ours.stats["num_steps"]) == int(theirs.stats["num_steps"])
    # A diffrax solver without an error estimate takes our fixed grid (substeps per interval).
    euler = no.solve(linear_field, Y0, ts, solver=diffrax.Euler(), substeps=10)
    np.testing.assert_allclose(euler.ys, no.odeint(linear_field, Y0, ts, solver=no.Euler(),
                                                   substeps=10), rtol=0, atol=1e-14)
    assert int(euler.stats["nfe"]) == 40


def test_event_stops_the_solve():
    """A ball dropped from 10 m hits the ground at sqrt(2 h / g) = 1.43 s: the solve stops there
    (located by a root find on the height), the states after it are inf, and the status is
    event_occurred (no error)."""
    def fall(t, y, args):
        return jnp.stack([y[1], -9.81])

    ts = jnp.linspace(0.0, 2.0, 5)
    event = diffrax.Event(lambda t, y, args, **kwargs: y[0],
                          root_finder=optx.Newton(rtol=1e-8, atol=1e-8))
    sol = no.solve(fall, jnp.array([10.0, 0.0]), ts, event=event)
    assert bool(sol.event_mask) and sol.result == no.RESULTS.event_occurred
    np.testing.assert_allclose(sol.ys[:3, 0], 10.0 - 9.81 * ts[:3] ** 2 / 2, rtol=1e-10)
    assert not bool(jnp.any(jnp.isfinite(sol.ys[3:])))


def test_dense_output_adaptive_is_diffrax_interpolation():
    sol = no.solve(linear_field, Y0, jnp.array([0.0, 3.0]), solver=no.Dopri5(), dense=True)
    theirs = diffrax.diffeqsolve(diffrax.ODETerm(linear_field), diffrax.Dopri5(), 0.0, 3.0, None,
                                 Y0, saveat=diffrax.SaveAt(dense=True),
                                 stepsize_controller=diffrax.PIDController(rtol=1e-6, atol=1e-8))
    t = jnp.array([0.1, 1.234, 2.9])
    np.testing.assert_array_equal(sol.evaluate(t), jax.vmap(theirs.evaluate)(t))
    np.testing.assert_allclose(sol.evaluate(1.234), linear_exact(1.234), rtol=0, atol=1e-5)


def test_dense_output_between_fixed_steps_is_cubic_hermite():
    """At the step times the interpolant is the solve's states; between them its error shrinks
    at order 4 (the states' own RK4 error is of the same order)."""
    def midpoint_error(steps):
        sol = no.solve(linear_field, Y0, jnp.array([0.0, 2.0]), solver=no.RK4(), substeps=steps,
                       dense=True)
        mids = (jnp.arange(steps) + 0.5) * (2.0 / steps)
        exact = jnp.stack([linear_exact(float(t)) for t in mids])
        return float(jnp.max(jnp.abs(sol.evaluate(mids) - exact))), sol

    errors, sols = zip(*[midpoint_error(n) for n in (8, 16, 32)])
    assert abs(convergence_order([8, 16, 32], errors) - 4) < 0.3
    np.testing.assert_allclose(sols[0].evaluate(2.0), sols[0].ys[-1], rtol=0, atol=1e-14)
    # Backwards in time, and a pair state (Leapfrog).
    sol = no.solve(oscillator_field, (jnp.array(1.0), jnp.array(0.0)), jnp.array([0.0, -2.0]),
                   solver=no.Leapfrog(), substeps=400, dense=True)
    q, p = sol.evaluate(jnp.array([-0.5, -1.7]))
    np.testing.assert_allclose(q, jnp.cos(jnp.array([-0.5, -1.7])), atol=1e-5)


def test_dense_output_refuses_times_outside_the_solve_on_every_path():
    """Outside [ts[0], ts[-1]] the fixed-step interpolant extrapolated a plausible wrong value
    (y' = -y/2 from y(0) = 1, solved on [0, 1] by RK4: 0.365 at t = 2, where y = e^{-1} = 0.368):
    concrete times raise, traced ones give nan, as diffrax's interpolation does; the ends are
    inside."""
    decay = lambda t, y, args: -y  # noqa: E731
    for ts in (jnp.array([0.0, 1.0]), jnp.array([1.0, 0.0])):
        for options in (dict(solver=no.RK4(), substeps=8), dict(solver=no.Dopri5())):
            sol = no.solve(decay, jnp.array([1.0, 2.0]), ts, dense=True, **options)
            np.testing.assert_allclose(sol.evaluate(ts[-1]), sol.ys[-1], rtol=1e-12)
            np.testing.assert_allclose(sol.evaluate(ts[0]), sol.ys[0], rtol=1e-12)
            for t in (2.0, -1.0, jnp.array([0.5, 1.5])):
                with pytest.raises(ValueError, match=r"t: .* is outside the solved interval \[0.0, 1.0\]"):
                    sol.evaluate(t)
            inside, outside = jax.jit(sol.evaluate)(jnp.array([0.5, 1.5]))
            np.testing.assert_allclose(inside, sol.evaluate(0.5), rtol=1e-12)
            assert bool(jnp.all(jnp.isnan(outside)))


def test_forward_mode_through_an_adaptive_solve():
    """`adjoint=diffrax.ForwardMode()` makes jax.jacfwd work (RecursiveCheckpointAdjoint is
    reverse-mode only): the same Jacobian as reverse mode, e^{A t} for y' = A y."""
    ts = jnp.array([0.0, 1.5])
    jac = jax.jacfwd(lambda y0: no.odeint(linear_field, y0, ts, adjoint=diffrax.ForwardMode(),
                                          rtol=1e-10, atol=1e-10)[-1])(Y0)
    np.testing.assert_allclose(jac, jax.scipy.linalg.expm(A * 1.5), rtol=1e-8, atol=1e-10)
    # A reverse-mode adjoint names itself and the way out (JAX's message named neither).
    for solver, adjoint, advice in ((no.Dopri5(), no.DiscreteAdjoint(), r"adjoint=diffrax\.ForwardMode\(\)"),
                                    (no.RK4(), no.BacksolveAdjoint(), r"adjoint=DiscreteAdjoint\(\) or "
                                                                      r"CheckpointAdjoint\(\)")):
        with pytest.raises(TypeError, match=rf"adjoint: {type(adjoint).__name__}\(.*\) differentiates this "
                                            rf"solve in reverse mode only .* pass {advice}"):
            jax.jacfwd(lambda y0: no.odeint(linear_field, y0, ts, solver=solver, adjoint=adjoint)[-1])(Y0)


ADJOINTS = [diffrax.RecursiveCheckpointAdjoint(), diffrax.BacksolveAdjoint(),
            diffrax.DirectAdjoint()]


def test_nnx_field_gradients_through_diffeqsolve_with_every_diffrax_adjoint():
    """The recipe: a field is a vector field, `diffrax.ODETerm(field)`; an nnx module is a pytree,
    so every diffrax adjoint differentiates its parameters (`nnx.grad` for reverse mode,
    `jax.jacfwd` over `nnx.split`'s state for `ForwardMode`). All agree with `odeint`'s gradient."""
    field = no.MLPField(3, 8, time_dependent=True, param_dtype=jnp.float64, rngs=nnx.Rngs(0))

    def loss(field, adjoint):
        sol = diffrax.diffeqsolve(diffrax.ODETerm(field), diffrax.Tsit5(), 0.0, 1.0, None, Y0,
                                  stepsize_controller=diffrax.PIDController(rtol=1e-10,
                                                                            atol=1e-10),
                                  adjoint=adjoint)
        return jnp.sum(sol.ys[-1] ** 2)

    reference = nnx.grad(lambda f: jnp.sum(no.odeint(f, Y0, jnp.array([0.0, 1.0]), rtol=1e-10,
                                                     atol=1e-10)[-1] ** 2))(field)
    graphdef, params = nnx.split(field)
    grads = [nnx.grad(loss)(field, adjoint) for adjoint in ADJOINTS]
    grads.append(jax.jacfwd(lambda p: loss(nnx.merge(graphdef, p), diffrax.ForwardMode()))(params))
    for grad in grads:
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-7, atol=1e-10), grad,
                     reference)


def test_diffrax_solver_with_our_continuous_adjoint():
    """Our adjoints work with a diffrax solver too (here Bosh3, an explicit 3(2) pair)."""
    def loss(y0):
        return jnp.sum(no.odeint(linear_field, y0, jnp.array([0.0, 1.0]), solver=diffrax.Bosh3(),
                                 adjoint=no.BacksolveAdjoint(), rtol=1e-10, atol=1e-10)[-1])

    np.testing.assert_allclose(jax.grad(loss)(Y0),
                               jnp.sum(jax.scipy.linalg.expm(A), axis=0), rtol=1e-7)
