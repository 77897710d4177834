"""odeint: the three paths agree, depth-varying fields are ResNets, adaptive solves are diffrax's,
the default is accurate, transformations work, statistics count real evaluations, states keep
their dtype, time runs both ways, eager calls are compiled once, and non-finite values are caught.
(Errors for bad input: test_validation.py.)"""
import functools

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.integrate
from flax import nnx

import neuralode as no
from helpers import A, Y0, linear_exact, linear_field, oscillator_field

W = jnp.array([[0.5, -1.0, 0.2], [1.2, 0.3, -0.4], [0.1, 0.7, -0.6]])


def field(t, y, args):
    return jnp.tanh(W @ y + t)


def test_euler_odeint_equals_hand_loop_and_diffrax():
    T, L, y0 = 1.5, 40, jnp.array([0.4, -0.8, 0.1])
    ts = jnp.linspace(0.0, T, L + 1)
    ys = no.odeint(field, y0, ts, solver=no.Euler())
    h, y, loop = T / L, y0, [y0]
    for k in range(L):
        y = y + h * field(k * h, y, None)
        loop.append(y)
    sol = diffrax.diffeqsolve(diffrax.ODETerm(field), diffrax.Euler(), t0=0.0, t1=T, dt0=T / L,
                              y0=y0, saveat=diffrax.SaveAt(ts=ts))
    np.testing.assert_allclose(ys, jnp.stack(loop), rtol=0, atol=1e-12)
    np.testing.assert_allclose(ys, sol.ys, rtol=0, atol=1e-12)


def test_depth_stack_euler_solve_is_a_resnet():
    L, T = 6, 1.0
    stack = no.DepthStack(lambda rngs: no.MLPField(3, 8, param_dtype=jnp.float64, rngs=rngs), L,
                          rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (4, 3), jnp.float64)
    ys = no.odeint(stack, x, jnp.linspace(0.0, T, L + 1), solver=no.Euler())
    blocks = [stack.layer(k) for k in range(L)]
    assert not np.allclose(blocks[0].layers[0].kernel[...], blocks[1].layers[0].kernel[...])
    y = x
    for k, block in enumerate(blocks):  # y_{k+1} = y_k + h F_k(y_k): L separate residual blocks
        y = y + (T / L) * block(k * T / L, y)
    np.testing.assert_allclose(ys[-1], y, rtol=0, atol=1e-13)


def test_depth_stack_uses_slice_k_for_every_stage_of_step_k():
    L = 3
    stack = no.DepthStack(lambda rngs: no.MLPField(3, 8, param_dtype=jnp.float64, rngs=rngs), L,
                          rngs=nnx.Rngs(2))
    y0 = jnp.array([0.3, -0.1, 0.5])
    ys = no.odeint(stack, y0, jnp.linspace(0.0, 1.0, L + 1), solver=no.RK4())
    y = y0
    for k in range(L):
        block = stack.layer(k)
        y = no.odeint(block, y, jnp.array([k / L, (k + 1) / L]), solver=no.RK4())[-1]
    np.testing.assert_allclose(ys[-1], y, rtol=0, atol=1e-14)


@pytest.mark.parametrize("ours, theirs", [(no.Dopri5(), diffrax.Dopri5()),
                                          (no.Tsit5(), diffrax.Tsit5())], ids=repr)
def test_adaptive_equals_diffrax_and_is_accurate(ours, theirs):
    ts, rtol, atol = jnp.linspace(0.0, 3.0, 7), 1e-6, 1e-8
    ys = no.odeint(linear_field, Y0, ts, solver=ours, rtol=rtol, atol=atol)
    sol = diffrax.diffeqsolve(diffrax.ODETerm(linear_field), theirs, t0=0.0, t1=3.0, dt0=None,
                              y0=Y0, saveat=diffrax.SaveAt(ts=ts),
                              stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol),
                              max_steps=4096)
    np.testing.assert_array_equal(ys, sol.ys)
    exact = jnp.stack([linear_exact(float(t)) for t in ts])
    assert float(jnp.max(jnp.abs(ys - exact) / (atol + jnp.abs(exact)))) < 10 * rtol


def kepler(t, y, args):
    q, p = y[:2], y[2:]
    return jnp.concatenate([p, -q / jnp.sum(q**2) ** 1.5])


E = 0.9  # eccentricity: the first steps at the pericentre are rejected
KEPLER_Y0 = jnp.array([1 - E, 0.0, 0.0, np.sqrt((1 + E) / (1 - E))])


@pytest.mark.parametrize("solver, f, y0, ts, tol", [
    (no.Dopri5(), lambda t, y, a: jnp.stack([y[1], 5.0 * (1 - y[0] ** 2) * y[1] - y[0]]),
     jnp.array([2.0, 0.0]), jnp.linspace(0.0, 5.0, 4), 1e-6),
    (no.Tsit5(), kepler, KEPLER_Y0, jnp.array([0.0, 2.0]), 1e-8),
    (no.Dopri5(), lambda t, y, a: -1e3 * (y - jnp.cos(t)), jnp.ones(1), jnp.array([0.0, 0.05]),
     1e-6)], ids=["vdp", "kepler", "stiff"])
def test_adaptive_nfe_counts_real_calls(solver, f, y0, ts, tol):
    """nfe is exact: 6 per attempted step, plus the first stage on every attempt until a step is
    accepted (diffrax re-evaluates f(t0, y0) after each rejected first step)."""
    calls = []

    def counted(t, y, args):
        jax.debug.callback(lambda: calls.append(1))
        return f(t, y, args)

    sol = no.solve(counted, y0, ts, solver=solver, rtol=tol, atol=tol)
    jax.block_until_ready(sol.ys)
    assert int(sol.stats["num_rejected_steps"]) > 0  # a problem that exercises rejections
    assert int(sol.stats["num_steps"]) == int(sol.stats["num_accepted_steps"]) + int(
        sol.stats["num_rejected_steps"])
    assert int(sol.stats["nfe"]) == len(calls)


def test_default_solver_is_adaptive_and_accurate():
    """Without a solver, odeint is Dopri5 at rtol 1e-6, atol 1e-8: one RK4 step over [0, 10] (the
    old default) returned 7000 for 0.4."""
    ts = jnp.array([0.0, 10.0])
    exact = linear_exact(10.0)
    ys = no.odeint(linear_field, Y0, ts)
    np.testing.assert_allclose(ys[-1], exact, rtol=0, atol=1e-5)
    assert float(jnp.max(jnp.abs(no.odeint(linear_field, Y0, ts, solver=no.RK4())[-1]))) > 1e3


@pytest.mark.parametrize("solver, substeps", [(no.RK4(), 20), (no.Dopri5(), 1),
                                              (no.Leapfrog(), 20), (diffrax.Bosh3(), 1)],
                         ids=repr)
def test_states_keep_the_dtype_of_y0_and_stats_are_int32(solver, substeps):
    """A float32 y0 stays float32 on every path (ts given in float64 is computed in float32), and
    every statistic is a jax int32 scalar."""
    y0 = (jnp.ones(2, jnp.float32), jnp.zeros(2, jnp.float32))
    sol = no.solve(oscillator_field, y0, jnp.linspace(0.0, 1.0, 3, dtype=jnp.float64),
                   solver=solver, substeps=substeps)
    assert {leaf.dtype for leaf in jax.tree.leaves(sol.ys)} == {jnp.dtype(jnp.float32)}
    assert sol.ts.dtype == jnp.float32
    np.testing.assert_allclose(sol.ys[0][-1], jnp.cos(1.0), rtol=1e-3)
    for name, value in sol.stats.items():
        assert isinstance(value, jax.Array) and value.dtype == jnp.int32 and value.shape == (), name


def test_fixed_step_stats():
    sol = no.solve(field, jnp.ones(3), jnp.linspace(0.0, 1.0, 5), solver=no.RK4(), substeps=3)
    assert int(sol.stats["num_steps"]) == 12 and int(sol.stats["nfe"]) == 48
    assert sol.ys.shape == (5, 3) and not bool(sol.max_steps_reached)


def test_jit_vmap_grad():
    ts = jnp.linspace(0.0, 1.0, 5)
    run = jax.jit(lambda y0: no.odeint(field, y0, ts, solver=no.RK4(), substeps=4))
    batch = jax.random.normal(jax.random.key(0), (7, 3), jnp.float64)
    np.testing.assert_allclose(jax.vmap(run)(batch)[:, -1], jnp.stack([run(b)[-1] for b in batch]),
                               atol=1e-14)
    loss = lambda y0: jnp.sum(run(y0)[-1] ** 2)  # noqa: E731
    g, eps, e = jax.grad(loss)(batch[0]), 1e-6, jnp.eye(3)
    fd = jnp.stack([(loss(batch[0] + eps * e[i]) - loss(batch[0] - eps * e[i])) / (2 * eps)
                    for i in range(3)])
    np.testing.assert_allclose(g, fd, rtol=1e-7)


def test_python_ints_and_bools_in_args_stay_static_on_every_path():
    """A loop count and a flag in args: the field's shape check and the continuous adjoint traced
    them (TracerBoolConversionError), while the solve itself keeps them static. y(1) = e^{-2k}."""
    def decay(t, y, args):
        count, flip, k = args
        rate = sum(k for _ in range(count))
        return -rate * y if flip else rate * y

    # RK4 with h = 1/50: relative error ~ 50 (h/2)^5 / 120, far below 1e-9; Dopri5 at rtol 1e-6
    for solver, options, tol in ((no.RK4(), {"substeps": 50}, 1e-9), (no.Dopri5(), {}, 1e-5)):
        for adjoint in (no.DiscreteAdjoint(), no.BacksolveAdjoint()):
            def end(k):
                return no.odeint(decay, jnp.ones(1), jnp.array([0.0, 1.0]), (2, True, k),
                                 solver=solver, adjoint=adjoint, **options)[-1, 0]
            np.testing.assert_allclose(end(0.25), np.exp(-0.5), rtol=tol)
            np.testing.assert_allclose(jax.grad(end)(0.25), -2 * np.exp(-0.5), rtol=tol)


@pytest.mark.parametrize("solver", [no.RK4(), no.Tsit5()], ids=repr)
def test_pytree_states(solver):
    ts = jnp.linspace(0.0, 1.0, 3)
    tup = no.odeint(lambda t, y, a: (y[1], -y[0]), (jnp.array(1.0), jnp.array(0.0)), ts,
                    solver=solver, substeps=1 if solver.adaptive else 50)
    dic = no.odeint(lambda t, y, a: {"q": y["p"], "p": -y["q"]},
                    {"q": jnp.array(1.0), "p": jnp.array(0.0)}, ts, solver=solver,
                    substeps=1 if solver.adaptive else 50)
    np.testing.assert_allclose(tup[0], jnp.cos(ts), atol=1e-6)
    np.testing.assert_allclose(dic["q"], tup[0], atol=1e-14)
    np.testing.assert_allclose(dic["p"], -jnp.sin(ts), atol=1e-6)


def test_module_field_gradients_reach_parameters():
    model = no.MLPField(3, 8, time_dependent=True, param_dtype=jnp.float64, rngs=nnx.Rngs(0))
    ts = jnp.array([0.0, 1.0])

    def loss(model):
        return jnp.sum(no.odeint(model, jnp.ones(3), ts, solver=no.RK4(), substeps=5)[-1] ** 2)

    grads = nnx.grad(loss)(model)
    kernel, g = model.layers[0].kernel, grads["layers"][0]["kernel"][...]
    direction = jax.random.normal(jax.random.key(3), kernel.shape, jnp.float64)
    eps, base = 1e-6, kernel[...]
    kernel[...] = base + eps * direction
    up = loss(model)
    kernel[...] = base - eps * direction
    down = loss(model)
    kernel[...] = base
    assert float(jnp.sum(g * direction)) == pytest.approx(float((up - down) / (2 * eps)), rel=1e-7)


def with_energy(t, state, a):
    """y' = a y with the quadrature q' = |y|^2 carried along (nothing reads q)."""
    y, q = state
    return a @ y, jnp.sum(y**2)


def test_controlled_solve_steps_as_if_the_quadrature_were_absent():
    ts, rtol, atol = jnp.array([0.0, 3.0]), 1e-6, 1e-8
    options = dict(solver=no.Dopri5(), rtol=rtol, atol=atol)
    alone = no.solve(linear_field, Y0, ts, **options)
    sol = no.solve(with_energy, (Y0, jnp.zeros(())), ts, A, controlled=lambda s: s[0], **options)
    assert int(sol.stats["num_steps"]) == int(alone.stats["num_steps"])
    np.testing.assert_allclose(sol.ys[0], alone.ys, rtol=1e-14, atol=1e-15)
    # q is integrated by the same 5th-order weights on steps sized for y, so its relative error is
    # of the order of y's (measured: q 2.6 rtol, y 1.5 rtol; both grow with the global error).
    energy = scipy.integrate.quad(lambda t: float(np.sum(linear_exact(t) ** 2)), 0.0, 3.0,
                                  epsabs=1e-14, epsrel=1e-13)[0]
    np.testing.assert_allclose(sol.ys[1][-1], energy, rtol=10 * rtol)


def test_controlled_backsolve_gradients_equal_discrete_ones():
    # The backwards solve controls y, a_y and a_args, not q and a_q (a_q is constant: dL/dq).
    ts = jnp.array([0.0, 2.0])

    def loss(y0, a, adjoint, controlled):
        y, q = no.solve(with_energy, (y0, jnp.zeros(())), ts, a, solver=no.Dopri5(),
                        adjoint=adjoint, rtol=1e-10, atol=1e-12, controlled=controlled).ys
        return q[-1] + jnp.sum(jnp.sin(y[-1]))

    reference = jax.grad(loss, argnums=(0, 1))(Y0, A, no.DiscreteAdjoint(), None)
    got = jax.grad(loss, argnums=(0, 1))(Y0, A, no.BacksolveAdjoint(), lambda s: s[0])
    for g, r in zip(got, reference):
        np.testing.assert_allclose(g, r, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("solver, substeps, adjoint", [
    (no.RK4(), 40, no.DiscreteAdjoint()), (no.RK4(), 40, no.BacksolveAdjoint()),
    (no.Leapfrog(), 200, no.CheckpointAdjoint()), (no.Dopri5(), 1, no.DiscreteAdjoint()),
    (no.Tsit5(), 1, no.BacksolveAdjoint())], ids=repr)
def test_decreasing_ts_integrate_backwards(solver, substeps, adjoint):
    """q' = p, p' = -q from (cos 2, -sin 2) at t = 2 back to t = 0 lands on (1, 0); the gradient of
    q(0) with respect to (q(2), p(2)) is (cos 2, -sin 2) (the flow is a rotation)."""
    ts = jnp.array([2.0, 1.0, 0.0])
    start = (jnp.cos(2.0), -jnp.sin(2.0))
    options = dict(solver=solver, substeps=substeps)
    if solver.adaptive:
        options.update(rtol=1e-10, atol=1e-10)

    def q_end(y0):
        return no.odeint(oscillator_field, y0, ts, adjoint=adjoint, **options)[0][-1]

    tol = {2: 1e-4, 4: 1e-6}.get(solver.order, 1e-8)
    q, p = no.odeint(oscillator_field, start, ts, **options)
    np.testing.assert_allclose(q, jnp.cos(ts), atol=tol)
    np.testing.assert_allclose(p, -jnp.sin(ts), atol=tol)
    grad = jax.grad(q_end)(start)
    np.testing.assert_allclose(grad, (jnp.cos(2.0), -jnp.sin(2.0)), atol=tol)


RATE = 0.5


def _decay(y):
    return -RATE * y


def test_eager_calls_see_the_values_a_function_field_reads_now():
    """A function field's cached program held what it read from globals and closures: after
    `RATE = 2.0` an eager solve of y' = -RATE y still gave e^{-0.5} (silently). Rebound globals,
    closure cells, a helper's global, an nnx module's updated parameters, the attribute of a
    bound method's or a callable object's object and a partial's function's global are read
    anew; an unchanged field is not traced again."""
    global RATE
    ts, y0 = jnp.array([0.0, 1.0]), jnp.ones(2)
    TIGHT = dict(rtol=1e-10, atol=1e-12)  # noqa: N806
    direct = lambda t, y, args: -RATE * y  # noqa: E731
    through_helper = lambda t, y, args: _decay(y)  # noqa: E731
    for field in (direct, through_helper):
        RATE = 0.5
        np.testing.assert_allclose(no.odeint(field, y0, ts, **TIGHT)[-1], np.exp(-0.5), rtol=1e-8)
        RATE = 2.0
        np.testing.assert_allclose(no.odeint(field, y0, ts, **TIGHT)[-1], np.exp(-2.0), rtol=1e-8)

    rate = 1.0
    closure = lambda t, y, args: -rate * y  # noqa: E731
    np.testing.assert_allclose(no.odeint(closure, y0, ts, **TIGHT)[-1], np.exp(-1.0), rtol=1e-8)
    rate = 3.0
    np.testing.assert_allclose(no.odeint(closure, y0, ts, **TIGHT)[-1], np.exp(-3.0), rtol=1e-8)

    layer = nnx.Linear(2, 2, use_bias=False, param_dtype=jnp.float64, rngs=nnx.Rngs(0))
    layer.kernel[...] = -jnp.eye(2)
    module_closure = lambda t, y, args: layer(y)  # noqa: E731
    np.testing.assert_allclose(no.odeint(module_closure, y0, ts, **TIGHT)[-1], np.exp(-1.0), rtol=1e-8)
    layer.kernel[...] = -2 * jnp.eye(2)  # as an optimiser step replaces the parameters
    np.testing.assert_allclose(no.odeint(module_closure, y0, ts, **TIGHT)[-1], np.exp(-2.0), rtol=1e-8)

    class Decay:  # a field as a bound method of a plain object, and a partial of a function
        def __init__(self, rate):
            self.rate = rate

        def field(self, t, y, args):
            return -self.rate * y

        __call__ = field

    decay, callable_object = Decay(1.0), Decay(1.0)
    scaled = functools.partial(lambda t, y, args, scale: -RATE * scale * y, scale=2.0)
    RATE = 0.5
    for field, before, after, change in (
            (decay.field, 1.0, 2.5, lambda: setattr(decay, "rate", 2.5)),
            (callable_object, 1.0, 0.5, lambda: setattr(callable_object, "rate", 0.5)),
            (scaled, 1.0, 3.0, lambda: globals().update(RATE=1.5))):
        np.testing.assert_allclose(no.odeint(field, y0, ts, **TIGHT)[-1], np.exp(-before), rtol=1e-8)
        change()
        np.testing.assert_allclose(no.odeint(field, y0, ts, **TIGHT)[-1], np.exp(-after), rtol=1e-8)

    traces = []

    def counted(t, y, args):
        traces.append(1)
        return -rate * y

    no.odeint(counted, y0, ts)
    first = len(traces)
    no.odeint(counted, 2 * y0, ts)
    assert first > 0 and len(traces) == first  # nothing it reads changed: the same program


def test_eager_calls_are_compiled_once():
    """The second eager call with the same field, solver and shapes is not traced again (the
    field is traced only while compiling), and computes with its own inputs: y' = A y from a new
    y0 over a new [t0, t1] is e^{A (t1 - t0)} y0. An nnx field with new parameters neither."""
    traces = []

    def counted(t, y, args):
        traces.append(1)
        return A @ y

    for solver, substeps, tol in ((no.Dopri5(), 1, 1e-5), (no.RK4(), 50, 1e-5)):
        no.odeint(counted, Y0, jnp.array([0.0, 1.0]), solver=solver, substeps=substeps)
        first = len(traces)
        ys = no.odeint(counted, 2 * Y0, jnp.array([1.0, 3.0]), solver=solver, substeps=substeps)
        assert first > 0 and len(traces) == first
        np.testing.assert_allclose(ys[-1], 2 * linear_exact(2.0), rtol=tol)
        traces.clear()

    class Counted(nnx.Module):
        def __init__(self, a):
            self.a = nnx.Param(a)

        def __call__(self, t, y, args=None):
            traces.append(1)
            return self.a[...] @ y

    no.odeint(Counted(2 * A), Y0, jnp.array([0.0, 1.0]))
    first = len(traces)
    ys = no.odeint(Counted(A), Y0, jnp.array([0.0, 2.0]))
    assert first > 0 and len(traces) == first
    np.testing.assert_allclose(ys[-1], linear_exact(2.0), rtol=1e-5)
    traces.clear()

    def scaled(t, y, rate):  # a Python float argument is a value, not a new program: y = e^{-rt}
        traces.append(1)
        return -rate * y

    no.odeint(scaled, Y0, jnp.array([0.0, 1.0]), 0.5)
    first = len(traces)
    ys = no.odeint(scaled, Y0, jnp.array([0.0, 1.0]), 0.7)
    assert first > 0 and len(traces) == first
    np.testing.assert_allclose(ys[-1], np.exp(-0.7) * Y0, rtol=1e-5)


def test_nonfinite_field_is_reported_as_such():
    """A field returning nan under Dopri5 used to be reported as "maximum number of steps"."""
    def broken(t, y, args):
        return jnp.where(t > 0.5, jnp.nan, -y)

    with pytest.raises(eqx.EquinoxRuntimeError, match="vector field f returned non-finite values"):
        jax.block_until_ready(no.odeint(broken, jnp.ones(2), jnp.array([0.0, 1.0]), max_steps=256))
    sol = no.solve(broken, jnp.ones(2), jnp.array([0.0, 1.0]), max_steps=256, throw=False)
    assert sol.result == no.RESULTS.nonfinite_field and not bool(sol.max_steps_reached)
    stiff = no.solve(lambda t, y, a: -1e6 * y, jnp.ones(1), jnp.array([0.0, 1.0]), max_steps=16,
                     throw=False)
    assert stiff.result == no.RESULTS.max_steps_reached


def test_check_finite_catches_fixed_step_blow_up_and_gradients():
    """Fixed steps pass inf/nan through silently unless check_finite=True: Euler on y' = y^2 from
    y0 = 3 over [0, 1] overflows; sqrt(y) from y0 = 0 is finite but its gradient is not."""
    blow_up = dict(solver=no.Euler(), substeps=64)
    silent = no.odeint(lambda t, y, a: y**2, jnp.full(1, 3.0), jnp.array([0.0, 1.0]), **blow_up)
    assert not bool(jnp.isfinite(silent[-1, 0]))
    with pytest.raises(eqx.EquinoxRuntimeError, match="check_finite: the solve's states ys"):
        jax.block_until_ready(no.odeint(lambda t, y, a: y**2, jnp.full(1, 3.0),
                                        jnp.array([0.0, 1.0]), check_finite=True, **blow_up))

    def loss(y0, check):
        return jnp.sum(no.odeint(lambda t, y, a: jnp.sqrt(y), y0, jnp.array([0.0, 1.0]),
                                 solver=no.RK4(), check_finite=check)[-1])

    assert not bool(jnp.isfinite(jax.grad(loss)(jnp.zeros(1), False)[0]))
    with pytest.raises(eqx.EquinoxRuntimeError, match="check_finite: the gradient with respect "
                                                      "to y0"):
        jax.block_until_ready(jax.grad(loss)(jnp.zeros(1), True))
    np.testing.assert_allclose(jax.grad(loss)(jnp.ones(1), True), jax.grad(loss)(jnp.ones(1), False))
