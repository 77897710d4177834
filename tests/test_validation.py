"""Bad input fails with a clear error naming the argument and the rule: before tracing for static
misuse and concrete values, when the program runs for traced values (equinox.error_if)."""
import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import neuralode as no
from neuralode.parallel.data import holds_host_callback

W = jnp.array([[0.5, -1.0, 0.2], [1.2, 0.3, -0.4], [0.1, 0.7, -0.6]])
T01 = jnp.array([0.0, 1.0])


def field(t, y, args):
    return jnp.tanh(W @ y + t)


def test_error_ts_not_monotone():
    with pytest.raises(ValueError, match=r"ts must be strictly monotone.*ts\[2\] = 1.0 after "
                                         r"ts\[1\] = 1.0"):
        no.odeint(field, jnp.ones(3), jnp.array([0.0, 1.0, 1.0]))


@pytest.mark.parametrize("ts", [[0.0, 2.0, 1.0], [0.0, jnp.nan], [0.0, jnp.inf]], ids=str)
@pytest.mark.parametrize("solver", [no.RK4(), no.Dopri5()], ids=repr)
def test_error_ts_under_jit(solver, ts):
    # Traced ts: a nan used to give nan (RK4) or inf with max_steps_reached False (Dopri5).
    run = eqx.filter_jit(lambda ts: no.odeint(field, jnp.ones(3), ts, solver=solver))
    with pytest.raises(eqx.EquinoxRuntimeError, match="ts must be finite and strictly monotone"):
        jax.block_until_ready(run(jnp.array(ts)))


@pytest.mark.parametrize("ts", [[0.0, jnp.inf], [jnp.nan, 1.0]], ids=str)
def test_error_ts_not_finite(ts):
    with pytest.raises(ValueError, match=r"ts must be finite, but ts\[\d\] = "):
        no.odeint(field, jnp.ones(3), jnp.array(ts), solver=no.RK4())


def test_error_ts_not_1d():
    with pytest.raises(ValueError, match="ts must be a 1-D array"):
        no.odeint(field, jnp.ones(3), jnp.ones((2, 2)))


def test_error_substeps():
    with pytest.raises(ValueError, match="substeps must be an int >= 1"):
        no.odeint(field, jnp.ones(3), T01, substeps=0)


@pytest.mark.parametrize("name, value, message", [
    ("rtol", 0.0, "rtol must be > 0"), ("rtol", -1e-3, "rtol must be > 0"),
    ("atol", -1e-9, "atol must be >= 0"), ("rtol", float("nan"), "rtol must be > 0"),
    ("max_steps", 0, "max_steps must be an int >= 1")])
def test_error_options(name, value, message):
    with pytest.raises(ValueError, match=message):
        no.odeint(field, jnp.ones(3), T01, **{name: value})


def test_error_traced_tolerance():
    run = eqx.filter_jit(lambda rtol: no.odeint(field, jnp.ones(3), T01, rtol=rtol))
    with pytest.raises(eqx.EquinoxRuntimeError, match="rtol must be > 0"):
        jax.block_until_ready(run(jnp.array(-1.0)))


def test_error_field_output_shape():
    with pytest.raises(ValueError, match="f must return dy/dt with the shape and dtype of y0"):
        no.odeint(lambda t, y, a: y[:2], jnp.ones(3), T01)


def test_error_field_output_structure():
    with pytest.raises(ValueError, match="f must return dy/dt with the structure of y0"):
        no.odeint(lambda t, y, a: y[0], (jnp.ones(3), jnp.ones(2)), T01)


def test_error_unknown_solver():
    with pytest.raises(TypeError, match="solver must be a neuralode solver .* or a diffrax solver"):
        no.odeint(field, jnp.ones(3), T01, solver="rk4")


def test_error_unknown_adjoint():
    with pytest.raises(TypeError, match="adjoint must be"):
        no.odeint(field, jnp.ones(3), T01, adjoint="backsolve")


def test_error_diffrax_adjoint_with_fixed_steps():
    with pytest.raises(ValueError, match="applies to diffrax-stepped solves"):
        no.odeint(field, jnp.ones(3), T01, solver=no.RK4(), adjoint=diffrax.ForwardMode())


def test_error_depth_mismatch():
    stack = no.DepthStack(lambda rngs: no.MLPField(3, 4, param_dtype=jnp.float64, rngs=rngs), 4,
                          rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"DepthStack of depth 4.*2 \* 3 = 6 steps"):
        no.odeint(stack, jnp.ones(3), jnp.linspace(0.0, 1.0, 3), solver=no.Euler(), substeps=3)


def test_error_depth_stack_with_adaptive_solver():
    stack = no.DepthStack(lambda rngs: no.MLPField(3, 4, param_dtype=jnp.float64, rngs=rngs), 1,
                          rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="needs a fixed-step solver"):
        no.odeint(stack, jnp.ones(3), T01, solver=no.Dopri5())


def test_error_non_finite_y0():
    # Concrete: a ValueError before anything is traced; traced: when the program runs.
    with pytest.raises(ValueError, match="y0 contains non-finite values"):
        no.odeint(field, jnp.array([1.0, jnp.nan, 0.0]), T01)
    with pytest.raises(eqx.EquinoxRuntimeError, match="y0 contains non-finite values"):
        jax.block_until_ready(eqx.filter_jit(lambda y0: no.odeint(field, y0, T01))(
            jnp.array([1.0, jnp.inf, 0.0])))


def test_error_max_steps_reached_raises_or_is_reported():
    stiff = lambda t, y, a: -1e6 * (y - jnp.cos(t))  # noqa: E731
    with pytest.raises(Exception, match="max_steps"):
        jax.block_until_ready(no.odeint(stiff, jnp.ones(1), T01, max_steps=16))
    sol = no.solve(stiff, jnp.ones(1), T01, max_steps=16, throw=False)
    assert bool(sol.max_steps_reached) and sol.result == no.RESULTS.max_steps_reached


@pytest.mark.parametrize("solver", [no.Euler(), no.Dopri5()], ids=repr)
def test_throw_false_reports_every_traced_value_rule_and_holds_no_host_callback(solver):
    # With throw=False a broken rule is the solve's result (the first broken one, before any
    # solver status), and the program holds no host callback, so JAX's compilation cache keeps it.
    def run(y0, ts, rtol):
        tolerance = dict(rtol=rtol) if solver.adaptive else {}  # fixed steps take none
        sol = no.solve(field, y0, ts, solver=solver, throw=False, **tolerance)
        return sol.ys, sol.result

    good = (jnp.ones(3), T01, 1e-6)
    cases = {"successful": good, "nonfinite_y0": (jnp.array([1.0, jnp.nan, 0.0]), T01, 1e-6),
             "invalid_ts": (jnp.ones(3), jnp.array([0.0, 0.0]), 1e-6)}
    if solver.adaptive:
        cases["invalid_rtol"] = (jnp.ones(3), T01, -1.0)
    for status, args in cases.items():
        assert jax.jit(run)(*args)[1] == getattr(no.RESULTS, status), status
    nan_y0_and_ts = (jnp.array([jnp.nan, 0.0, 0.0]), jnp.array([0.0, 0.0]), 1e-6)
    assert jax.jit(run)(*nan_y0_and_ts)[1] == no.RESULTS.invalid_ts
    inside = lambda y0: no.solve(field, y0, T01, solver=solver, throw=False).ys  # noqa: E731
    assert not holds_host_callback(jax.make_jaxpr(inside)(jnp.ones(3)))
    raising = lambda y0: no.solve(field, y0, T01, solver=solver).ys  # noqa: E731
    assert holds_host_callback(jax.make_jaxpr(raising)(jnp.ones(3)))


def test_error_fixed_steps_beyond_max_steps():
    with pytest.raises(ValueError, match="more than max_steps=10"):
        no.odeint(field, jnp.ones(3), T01, solver=no.RK4(), substeps=11, max_steps=10)


def test_error_substeps_with_adaptive_solver():
    with pytest.raises(ValueError, match="substeps applies to fixed-step solvers"):
        no.odeint(field, jnp.ones(3), T01, solver=no.Tsit5(), substeps=2)


def test_error_field_signature():
    """A torchdiffeq-style f(t, y), function or module, is named before tracing (it used to fail
    as Python's own "takes 2 positional arguments but 3 were given" from inside the solve)."""
    class TwoArguments(nnx.Module):
        def __call__(self, t, y):
            return -y

    def decay(t, y):
        return -y

    for f, name in ((TwoArguments(), r"TwoArguments.__call__"), (decay, "decay"),
                    (lambda t, y: -y, "<lambda>")):
        with pytest.raises(TypeError, match=rf"called as f\(t, y, args\).*: {name} must take "
                                            rf"\(t, y, args\).*got \(.*t, y\)"):
            no.odeint(f, jnp.ones(3), T01)
    # Unused or defaulted args, *args and a jitted field are accepted.
    for f in (lambda t, y, _: -y, lambda t, y, args=None: -y, lambda *a: -a[1],
              jax.jit(lambda t, y, args: -y)):
        assert no.odeint(f, jnp.ones(3), T01, solver=no.Euler()).shape == (2, 3)


@pytest.mark.parametrize("y0", [jnp.ones(3), (jnp.ones(3),), (jnp.ones(1),) * 3], ids=str)
def test_error_leapfrog_needs_a_pair(y0):
    with pytest.raises(TypeError, match=r"Leapfrog\(\) needs y0 given as a pair"):
        no.odeint(lambda t, y, a: y, y0, T01, solver=no.Leapfrog())


def test_error_integer_y0():
    with pytest.raises(TypeError, match="y0 must hold floating-point arrays"):
        no.odeint(field, jnp.ones(3, dtype=jnp.int32), T01)


def test_error_controlled():
    with pytest.raises(ValueError, match="controlled applies to adaptive solvers"):
        no.solve(field, jnp.ones(3), T01, solver=no.RK4(), controlled=lambda y: y)
    with pytest.raises(TypeError, match="controlled must be a function of the state"):
        no.solve(field, jnp.ones(3), T01, controlled=0)


def test_error_diffrax_options_with_fixed_steps():
    with pytest.raises(ValueError, match="stepsize_controller applies to diffrax-stepped solvers"):
        no.solve(field, jnp.ones(3), T01, solver=no.RK4(),
                 stepsize_controller=diffrax.PIDController(rtol=1e-3, atol=1e-3))
    with pytest.raises(ValueError, match="give the tolerances to it instead"):
        no.solve(field, jnp.ones(3), T01, rtol=1e-3,
                 stepsize_controller=diffrax.PIDController(rtol=1e-3, atol=1e-3))
    with pytest.raises(ValueError, match="event applies to diffrax-stepped solvers"):
        no.solve(field, jnp.ones(3), T01, solver=no.RK4(),
                 event=diffrax.Event(lambda t, y, args, **kw: y[0] < 0))
    # tolerances a fixed-step solve would ignore (its error is set by substeps alone)
    for solver in (no.RK4(), diffrax.Euler()):
        for tolerance in (dict(rtol=1e-9), dict(atol=1e-3)):
            with pytest.raises(ValueError, match=r"rtol and atol apply to adaptive solvers; .* takes fixed "
                                                 r"steps .* refine it by substeps"):
                no.odeint(field, jnp.ones(3), T01, solver=solver, **tolerance)


def test_error_backsolve_options():
    with pytest.raises(ValueError, match="dense=True is not available with "
                                         r"adjoint=BacksolveAdjoint\(\)"):
        no.solve(field, jnp.ones(3), T01, adjoint=no.BacksolveAdjoint(), dense=True)
    with pytest.raises(ValueError, match="on_mismatch must be 'warn', 'raise' or 'ignore'"):
        no.BacksolveAdjoint(on_mismatch="fail")
    with pytest.raises(ValueError, match="tolerance must be a number > 0"):
        no.BacksolveAdjoint(tolerance=0.0)


def test_error_evaluate_without_dense():
    sol = no.solve(field, jnp.ones(3), T01)
    with pytest.raises(ValueError, match=r"needs the dense output: call solve\(..., dense=True\)"):
        sol.evaluate(0.5)
