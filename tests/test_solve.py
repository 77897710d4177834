"""odeint: the three paths agree, depth-varying fields are ResNets, adaptive solves are diffrax's,
transformations work, statistics count real evaluations, and bad input fails with a clear error."""
import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.integrate
from flax import nnx

import neuralode as no
from helpers import A, Y0, linear_exact, linear_field

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


@pytest.mark.parametrize("solver", [no.Dopri5(), no.Tsit5()], ids=repr)
def test_adaptive_nfe_counts_real_calls(solver):
    calls = []

    def van_der_pol(t, y, args):
        jax.debug.callback(lambda: calls.append(1))
        return jnp.stack([y[1], 5.0 * (1 - y[0] ** 2) * y[1] - y[0]])

    sol = no.solve(van_der_pol, jnp.array([2.0, 0.0]), jnp.linspace(0.0, 5.0, 4), solver=solver)
    jax.block_until_ready(sol.ys)
    assert int(sol.stats["num_rejected_steps"]) > 0  # a problem that exercises rejections
    assert int(sol.stats["num_steps"]) == int(sol.stats["num_accepted_steps"]) + int(
        sol.stats["num_rejected_steps"])
    # 6 per attempted step + 1; the initial step-size selection costs one more call on some problems.
    assert 0 <= len(calls) - int(sol.stats["nfe"]) <= 1


def test_fixed_step_stats():
    sol = no.solve(field, jnp.ones(3), jnp.linspace(0.0, 1.0, 5), solver=no.RK4(), substeps=3)
    assert sol.stats["num_steps"] == 12 and sol.stats["nfe"] == 48
    assert sol.ys.shape == (5, 3) and not bool(sol.max_steps_reached)


def test_jit_vmap_grad():
    ts = jnp.linspace(0.0, 1.0, 5)
    run = jax.jit(lambda y0: no.odeint(field, y0, ts, substeps=4))
    batch = jax.random.normal(jax.random.key(0), (7, 3), jnp.float64)
    np.testing.assert_allclose(jax.vmap(run)(batch)[:, -1], jnp.stack([run(b)[-1] for b in batch]),
                               atol=1e-14)
    loss = lambda y0: jnp.sum(run(y0)[-1] ** 2)  # noqa: E731
    g, eps, e = jax.grad(loss)(batch[0]), 1e-6, jnp.eye(3)
    fd = jnp.stack([(loss(batch[0] + eps * e[i]) - loss(batch[0] - eps * e[i])) / (2 * eps)
                    for i in range(3)])
    np.testing.assert_allclose(g, fd, rtol=1e-7)


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
        return jnp.sum(no.odeint(model, jnp.ones(3), ts, substeps=5)[-1] ** 2)

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


# --- errors: one test per message, each naming the argument ------------------------------------


def test_error_ts_not_increasing():
    with pytest.raises(ValueError, match="ts must be strictly increasing"):
        no.odeint(field, jnp.ones(3), jnp.array([0.0, 1.0, 1.0]))


def test_error_ts_not_increasing_under_jit():
    with pytest.raises(Exception, match="ts must be strictly increasing"):
        jax.jit(lambda ts: no.odeint(field, jnp.ones(3), ts))(jnp.array([0.0, 2.0, 1.0]))


def test_error_ts_not_1d():
    with pytest.raises(ValueError, match="ts must be a 1-D array"):
        no.odeint(field, jnp.ones(3), jnp.ones((2, 2)))


def test_error_substeps():
    with pytest.raises(ValueError, match="substeps must be an int >= 1"):
        no.odeint(field, jnp.ones(3), jnp.array([0.0, 1.0]), substeps=0)


def test_error_field_output_shape():
    with pytest.raises(ValueError, match="f must return dy/dt with the shape and dtype of y0"):
        no.odeint(lambda t, y, a: y[:2], jnp.ones(3), jnp.array([0.0, 1.0]))


def test_error_field_output_structure():
    with pytest.raises(ValueError, match="f must return dy/dt with the structure of y0"):
        no.odeint(lambda t, y, a: y[0], (jnp.ones(3), jnp.ones(2)), jnp.array([0.0, 1.0]))


def test_error_unknown_solver():
    with pytest.raises(TypeError, match="solver must be a neuralode solver"):
        no.odeint(field, jnp.ones(3), jnp.array([0.0, 1.0]), solver=diffrax.Euler())


def test_error_unknown_adjoint():
    with pytest.raises(TypeError, match="adjoint must be"):
        no.odeint(field, jnp.ones(3), jnp.array([0.0, 1.0]), adjoint=diffrax.BacksolveAdjoint())


def test_error_depth_mismatch():
    stack = no.DepthStack(lambda rngs: no.MLPField(3, 4, param_dtype=jnp.float64, rngs=rngs), 4,
                          rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"DepthStack of depth 4.*2 \* 3 = 6 steps"):
        no.odeint(stack, jnp.ones(3), jnp.linspace(0.0, 1.0, 3), solver=no.Euler(), substeps=3)


def test_error_depth_stack_with_adaptive_solver():
    stack = no.DepthStack(lambda rngs: no.MLPField(3, 4, param_dtype=jnp.float64, rngs=rngs), 1,
                          rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="needs a fixed-step solver"):
        no.odeint(stack, jnp.ones(3), jnp.array([0.0, 1.0]), solver=no.Dopri5())


def test_error_non_finite_y0():
    with pytest.raises(Exception, match="y0 contains non-finite values"):
        jax.block_until_ready(no.odeint(field, jnp.array([1.0, jnp.nan, 0.0]), jnp.array([0.0, 1.0])))


def test_error_max_steps_reached_raises_or_is_reported():
    stiff = lambda t, y, a: -1e6 * (y - jnp.cos(t))  # noqa: E731
    with pytest.raises(Exception, match="max_steps"):
        jax.block_until_ready(no.odeint(stiff, jnp.ones(1), jnp.array([0.0, 1.0]),
                                        solver=no.Dopri5(), max_steps=16))
    sol = no.solve(stiff, jnp.ones(1), jnp.array([0.0, 1.0]), solver=no.Dopri5(), max_steps=16,
                   throw=False)
    assert bool(sol.max_steps_reached)


def test_error_fixed_steps_beyond_max_steps():
    with pytest.raises(ValueError, match="more than max_steps=10"):
        no.odeint(field, jnp.ones(3), jnp.array([0.0, 1.0]), substeps=11, max_steps=10)


def test_error_substeps_with_adaptive_solver():
    with pytest.raises(ValueError, match="substeps applies to fixed-step solvers"):
        no.odeint(field, jnp.ones(3), jnp.array([0.0, 1.0]), solver=no.Tsit5(), substeps=2)


def test_error_args_with_module_field():
    model = no.MLPField(3, 4, param_dtype=jnp.float64, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="args must be None when f is an nnx.Module"):
        no.odeint(model, jnp.ones(3), jnp.array([0.0, 1.0]), args=1.0)


def test_error_leapfrog_needs_a_pair():
    with pytest.raises(TypeError, match=r"Leapfrog\(\) needs y0 given as a pair"):
        no.odeint(field, jnp.ones(3), jnp.array([0.0, 1.0]), solver=no.Leapfrog())


def test_error_integer_y0():
    with pytest.raises(TypeError, match="y0 must hold floating-point arrays"):
        no.odeint(field, jnp.ones(3, dtype=jnp.int32), jnp.array([0.0, 1.0]))


def test_error_controlled():
    with pytest.raises(ValueError, match="controlled applies to adaptive solvers"):
        no.solve(field, jnp.ones(3), jnp.array([0.0, 1.0]), controlled=lambda y: y)
    with pytest.raises(TypeError, match="controlled must be a function of the state"):
        no.solve(field, jnp.ones(3), jnp.array([0.0, 1.0]), solver=no.Dopri5(), controlled=0)
