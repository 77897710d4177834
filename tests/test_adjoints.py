"""Adjoints: every gradient against finite differences, the discrete ones against each other and
against the hand-written co-state recursion (claim A2), the continuous adjoint's error shrinking
at the solver's order, in agreement with diffrax's BacksolveAdjoint, its gradient with respect to
the times, and its check of the backwards reconstruction."""
import warnings

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import neuralode as no
from helpers import convergence_order, oscillator_field

ADJOINTS = [no.DiscreteAdjoint(), no.CheckpointAdjoint(), no.CheckpointAdjoint(segments=3),
            no.BacksolveAdjoint()]
W = jnp.array([[0.5, -1.0, 0.2], [1.2, 0.3, -0.4], [0.1, 0.7, -0.6]])
Y0 = jnp.array([0.4, -0.8, 0.1])
TS = jnp.array([0.0, 0.4, 1.0])  # two outputs after the start: cotangents enter mid-solve


def field(t, y, w):
    return jnp.tanh(w @ y) + 0.3 * jnp.sin(t) * y


def loss_of(adjoint, solver=no.RK4(), substeps=100, **kwargs):
    def loss(y0, w):
        ys = no.odeint(field, y0, TS, w, solver=solver, substeps=substeps, adjoint=adjoint,
                       **kwargs)
        return jnp.sum(ys[1] ** 2) + jnp.sum(jnp.sin(ys[2]))
    return loss


def central_differences(loss, y0, w, eps=1e-6):
    """(loss(x + eps e_i) - loss(x - eps e_i)) / (2 eps) for every input, in one compiled call."""
    flat = jnp.concatenate([y0, w.ravel()])
    unflatten = lambda v: (v[:3], v[3:].reshape(3, 3))  # noqa: E731
    e = jnp.eye(flat.size)
    values = jax.jit(jax.vmap(lambda v: loss(*unflatten(v))))(
        jnp.concatenate([flat + eps * e, flat - eps * e]))
    return unflatten((values[: flat.size] - values[flat.size:]) / (2 * eps))


@pytest.mark.parametrize("adjoint", ADJOINTS, ids=repr)
def test_fixed_step_gradients_match_finite_differences(adjoint):
    # RK4 with h = 0.004-0.006: the continuous adjoint differs from the discrete gradient by
    # O(h^4) ~ 1e-9, far below the 1e-6 tolerance; central differences err by O(eps^2) + O(u/eps).
    loss = loss_of(adjoint)
    grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(Y0, W)
    for g, fd in zip(grads, central_differences(loss_of(no.DiscreteAdjoint()), Y0, W)):
        np.testing.assert_allclose(g, fd, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("solver, adjoint", [(no.Dopri5(), adjoint) for adjoint in ADJOINTS]
                         + [(no.Tsit5(), no.BacksolveAdjoint())], ids=repr)
def test_adaptive_gradients_match_finite_differences(solver, adjoint):
    loss = loss_of(adjoint, solver=solver, substeps=1, rtol=1e-11, atol=1e-12)
    grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(Y0, W)
    reference = loss_of(no.DiscreteAdjoint(), solver=solver, substeps=1, rtol=1e-11, atol=1e-12)
    for g, fd in zip(grads, central_differences(reference, Y0, W, eps=1e-5)):
        np.testing.assert_allclose(g, fd, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("adjoint, check_finite", [(no.BacksolveAdjoint(), False),
                                                   (no.DiscreteAdjoint(), True)], ids=repr)
def test_eager_gradient_reaches_a_python_float_argument(adjoint, check_finite):
    # Under an eager jax.grad a float argument reaches a custom derivative rule as the float
    # itself: BacksolveAdjoint's took it for a constant and returned 0 (check_finite's rule skipped
    # it). y' = -a y, so L(a) = |y(1)|^2 = |y0|^2 exp(-2a) and L'(a) = -2 |y0|^2 exp(-2a); rtol
    # 1e-10 bounds the solve's error, and the gradient's relative error with it, near 1e-10.
    def loss(rate):
        ys = no.odeint(lambda t, y, a: -a * y, Y0, jnp.array([0.0, 1.0]), rate,
                       solver=no.Dopri5(), adjoint=adjoint, rtol=1e-10, atol=1e-12,
                       check_finite=check_finite)
        return jnp.sum(ys[-1] ** 2)

    exact = -2 * jnp.sum(Y0**2) * np.exp(-1.0)
    np.testing.assert_allclose(jax.grad(loss)(0.5), exact, rtol=1e-8)


@pytest.mark.parametrize("solver", [no.Euler(), no.RK4(), no.Leapfrog()], ids=repr)
def test_checkpointed_equals_discrete(solver):
    if isinstance(solver, no.Leapfrog):
        def fld(t, y, w):
            return (y[1], -jnp.tanh(w @ y[0]))
        y0 = (Y0, 0.5 * Y0)
    else:
        fld, y0 = field, Y0
    ts = jnp.linspace(0.0, 1.0, 8)

    def loss(adjoint):
        return lambda y0, w: sum(jnp.sum(jnp.cos(leaf)) for leaf in jax.tree.leaves(
            no.odeint(fld, y0, ts, w, solver=solver, substeps=13, adjoint=adjoint)))

    reference = jax.grad(loss(no.DiscreteAdjoint()), argnums=(0, 1))(y0, W)
    for segments in [None, 1, 50]:  # sqrt, one segment, more segments than steps
        g = jax.grad(loss(no.CheckpointAdjoint(segments)), argnums=(0, 1))(y0, W)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-12), g, reference)


def stacked_field(depth, seed=0):
    return no.DepthStack(lambda rngs: no.MLPField(3, 6, time_dependent=True,
                                                  param_dtype=jnp.float64, rngs=rngs),
                         depth, rngs=nnx.Rngs(seed))


@pytest.mark.parametrize("adjoint", ADJOINTS, ids=repr)
def test_gradients_reach_depth_varying_and_tied_parameters(adjoint):
    """Parameters of nnx fields, stacked (one slice per step) or tied, get the same gradient under
    every adjoint (up to the continuous adjoint's O(h^4) with RK4: h = 1/64 makes it ~1e-7)."""
    for make, substeps in [(lambda: stacked_field(64), 32),
                           (lambda: no.MLPField(3, 6, param_dtype=jnp.float64, rngs=nnx.Rngs(1)),
                            32)]:
        def loss(model, adjoint):
            ys = no.odeint(model, Y0, jnp.linspace(0.0, 1.0, 3), solver=no.RK4(),
                           substeps=substeps, adjoint=adjoint)
            return jnp.sum(ys[1:] ** 2)

        reference = nnx.grad(lambda m: loss(m, no.DiscreteAdjoint()))(make())
        grads = nnx.grad(lambda m: loss(m, adjoint))(make())
        tolerance = 1e-6 if isinstance(adjoint, no.BacksolveAdjoint) else 1e-12
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=tolerance, atol=1e-10),
                     grads, reference)


def test_backprop_is_the_discrete_adjoint_recursion():
    """Claim A2: lambda_k = (d step_k / d y)^T lambda_{k+1}, lambda_L = dLoss/dy_L, gives dLoss/dy0."""
    stack, L = stacked_field(10, seed=3), 10
    ts = jnp.linspace(0.0, 1.0, L + 1)
    ys = no.odeint(stack, Y0, ts, solver=no.Euler())
    lam = 2 * ys[-1]  # d/dy of sum(y_L^2)
    for k in reversed(range(L)):
        block = stack.layer(k)
        step = lambda y: y + (1.0 / L) * block(ts[k], y)  # noqa: E731
        lam = jax.jacfwd(step)(ys[k]).T @ lam
    backprop = jax.grad(lambda y0: jnp.sum(no.odeint(stack, y0, ts, solver=no.Euler())[-1] ** 2))(Y0)
    np.testing.assert_allclose(backprop, lam, rtol=0, atol=1e-14)


@pytest.mark.parametrize("solver, rate", [(no.Euler(), 1), (no.Midpoint(), 2), (no.Heun(), 3),
                                          (no.RK4(), 4)], ids=repr)
def test_continuous_adjoint_error_shrinks_at_the_solver_order(solver, rate):
    """|backsolve - discrete| = O(h^p) at least. Heun (the explicit trapezoidal rule) does one
    order better: run backwards on the adjoint equation it reproduces its own discrete adjoint to
    O(h^3) (measured slopes 3.000 +- 0.001 for 16 to 256 steps)."""
    def grads(adjoint, steps):
        loss = lambda y0, w: jnp.sum(no.odeint(field, y0, jnp.array([0.0, 2.0]), w, solver=solver,
                                               substeps=steps, adjoint=adjoint)[-1] ** 2)  # noqa: E731
        return jnp.concatenate([g.ravel() for g in
                                jax.jit(jax.grad(loss, argnums=(0, 1)))(Y0, W)])

    steps = [32, 64, 128] if solver.order < 4 else [8, 16, 32]
    # Coarse steps reconstruct y0 to a few per cent (Euler): measured here, not warned about.
    differences = [float(jnp.max(jnp.abs(grads(no.BacksolveAdjoint(on_mismatch="ignore"), n)
                                         - grads(no.DiscreteAdjoint(), n)))) for n in steps]
    assert abs(convergence_order(steps, differences) - rate) < 0.2


@pytest.mark.parametrize("ours, theirs", [(no.Euler(), diffrax.Euler()),
                                          (no.Heun(), diffrax.Heun()),
                                          (no.Midpoint(), diffrax.Midpoint())], ids=repr)
def test_backsolve_agrees_with_diffrax(ours, theirs):
    T, L = 1.5, 30

    def ours_loss(y0, w):
        return jnp.sum(no.odeint(field, y0, jnp.array([0.0, T]), w, solver=ours, substeps=L,
                                 adjoint=no.BacksolveAdjoint(on_mismatch="ignore"))[-1] ** 2)

    def diffrax_loss(y0, w):
        sol = diffrax.diffeqsolve(diffrax.ODETerm(field), theirs, t0=0.0, t1=T, dt0=T / L, y0=y0,
                                  args=w, adjoint=diffrax.BacksolveAdjoint())
        return jnp.sum(sol.ys[-1] ** 2)

    for a, b in zip(jax.grad(ours_loss, argnums=(0, 1))(Y0, W),
                    jax.grad(diffrax_loss, argnums=(0, 1))(Y0, W)):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("solver, rate", [(no.Euler(), 1), (no.Heun(), 3)], ids=repr)
def test_backsolve_reconstruction_error_order(solver, rate):
    """A step of local error C h^(p+1) followed by the step back leaves C h^(p+1) + C (-h)^(p+1):
    the leading terms cancel for even p, so y0 is recovered to O(h^p) for odd p, O(h^(p+1)) for even."""
    steps = [20, 40, 80]
    errors = [float(no.backsolve_reconstruction_error(field, Y0, jnp.array([0.0, 2.0]), W,
                                                      solver=solver, substeps=n)[0])
              for n in steps]
    assert abs(convergence_order(steps, errors) - rate) < 0.2


def test_gradients_reach_closed_over_values():
    """BacksolveAdjoint closure-converts the field, so values it closes over get gradients too."""
    def loss(scale, adjoint):
        return jnp.sum(no.odeint(lambda t, y, a: -scale * y, Y0, jnp.array([0.0, 1.0]),
                                 solver=no.RK4(), substeps=50, adjoint=adjoint)[-1])

    exact = -jnp.sum(Y0) * jnp.exp(-0.7)  # d/ds sum(y0 e^{-s}) at s = 0.7
    for adjoint in ADJOINTS:
        assert float(jax.grad(loss)(0.7, adjoint)) == pytest.approx(float(exact), rel=1e-8)


def test_stats_of_the_backward_pass():
    for adjoint, factor in [(no.DiscreteAdjoint(), 1), (no.CheckpointAdjoint(), 2),
                            (no.BacksolveAdjoint(), 1)]:
        sol = no.solve(field, Y0, TS, W, solver=no.RK4(), substeps=5, adjoint=adjoint)
        assert sol.stats["nfe"] == 2 * 5 * 4 and sol.stats["nfe_backward"] == factor * 40


def test_error_unsupported_solver_adjoint_pair():
    with pytest.raises(ValueError, match=r"BacksolveAdjoint\(\) does not support solver=Leapfrog"):
        no.odeint(lambda t, y, a: (y[1], -y[0]), (jnp.ones(2), jnp.ones(2)), TS,
                  solver=no.Leapfrog(), adjoint=no.BacksolveAdjoint())


def test_error_bad_segments():
    with pytest.raises(ValueError, match="segments must be a positive int"):
        no.CheckpointAdjoint(segments=0)


@pytest.mark.parametrize("solver, substeps", [(no.RK4(), 256), (no.Dopri5(), 1)], ids=repr)
def test_backsolve_gradient_with_respect_to_the_end_times(solver, substeps):
    """q' = p, p' = -q from (1, 0): q(t1) = cos(t1 - t0), so at [t0, t1] = [0, 2] the gradient is
    (sin 2, -sin 2). BacksolveAdjoint used to return 0."""
    tolerances = dict(rtol=1e-10, atol=1e-10) if solver.adaptive else {}

    def q_end(ts, adjoint):
        q, _ = no.odeint(oscillator_field, (jnp.array(1.0), jnp.array(0.0)), ts, solver=solver,
                         substeps=substeps, adjoint=adjoint, **tolerances)
        return q[-1]

    np.testing.assert_allclose(jax.grad(q_end)(jnp.array([0.0, 2.0]), no.BacksolveAdjoint()),
                               [np.sin(2.0), -np.sin(2.0)], rtol=0, atol=1e-8)


def test_backsolve_gradient_with_respect_to_all_times():
    """Interior times and a time-dependent field (dL/dt_0 = -a(t_0) . f(t_0, y_0) is not the sum of
    the others): against central differences and against the discrete gradient, which the
    continuous one approaches at RK4's order."""
    def loss(ts, adjoint, substeps=200):
        ys = no.odeint(field, Y0, ts, W, solver=no.RK4(), substeps=substeps, adjoint=adjoint)
        return jnp.sum(ys[1] ** 2) + jnp.sum(jnp.sin(ys[2]))

    grad = jax.jit(jax.grad(loss), static_argnums=1)
    backsolve, discrete = grad(TS, no.BacksolveAdjoint()), grad(TS, no.DiscreteAdjoint())
    eps, e = 1e-6, jnp.eye(3)
    central = jnp.stack([(loss(TS + eps * e[i], no.DiscreteAdjoint())
                          - loss(TS - eps * e[i], no.DiscreteAdjoint())) / (2 * eps)
                         for i in range(3)])
    assert float(jnp.max(jnp.abs(backsolve))) > 0.1
    np.testing.assert_allclose(discrete, central, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(backsolve, discrete, rtol=1e-7, atol=1e-9)


def test_error_backsolve_times_of_a_depth_stack():
    stack = stacked_field(4)
    with pytest.raises(ValueError, match="does not differentiate ts for a depth-varying field"):
        jax.grad(lambda ts: jnp.sum(no.odeint(stack, Y0, ts, solver=no.Euler(), substeps=4,
                                              adjoint=no.BacksolveAdjoint())[-1]))(
            jnp.array([0.0, 1.0]))


def test_adaptive_backsolve_agrees_with_diffrax():
    """Ours integrates the adjoint system with diffrax over each interval; diffrax's
    BacksolveAdjoint does the same with its own bookkeeping: equal to the tolerance."""
    def ours(y0, w):
        return jnp.sum(no.odeint(field, y0, TS, w, adjoint=no.BacksolveAdjoint(), rtol=1e-10,
                                 atol=1e-10)[1:] ** 2)

    def theirs(y0, w):
        return jnp.sum(no.odeint(field, y0, TS, w, adjoint=diffrax.BacksolveAdjoint(), rtol=1e-10,
                                 atol=1e-10)[1:] ** 2)

    for a, b in zip(jax.grad(ours, argnums=(0, 1))(Y0, W), jax.grad(theirs, argnums=(0, 1))(Y0, W)):
        np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-10)


def van_der_pol(t, y, args):
    return jnp.stack([y[1], (1 - y[0] ** 2) * y[1] - y[0]])


def test_backsolve_reports_an_unstable_reconstruction():
    """Van der Pol (mu = 1) from (2, 0): the limit cycle attracts forwards, so the backwards solve
    drifts off it. Over [0, 14] at tolerance 1e-8 the continuous adjoint's gradient is 4 % off
    (over [0, 20] at 1e-10: 23 %; over [0, 20] at 1e-8 it has the wrong sign)."""
    ts, y0 = jnp.array([0.0, 14.0]), jnp.array([2.0, 0.0])
    with pytest.warns(no.ReconstructionWarning, match=r"Use adjoint=DiscreteAdjoint\(\)") as caught:
        continuous = jax.grad(lambda y: no.odeint(van_der_pol, y, ts, rtol=1e-8, atol=1e-8,
                                                  adjoint=no.BacksolveAdjoint())[-1, 0])(y0)
    assert 0.01 < caught[0].message.mismatch < 0.1
    # The exact gradient, to 1e-8: backprop through RK4 steps of h = 1/400.
    exact = jax.grad(lambda y: no.odeint(van_der_pol, y, ts, solver=no.RK4(),
                                         substeps=5600, max_steps=5600)[-1, 0])(y0)
    assert float(jnp.max(jnp.abs(continuous - exact) / jnp.abs(exact))) > 0.02


def test_backsolve_on_mismatch_options():
    """RK4 with 100 steps on Van der Pol over [0, 10] reconstructs y0 with a relative mismatch of
    0.4: "raise" raises (under jit too), "ignore" is silent; a stable solve never warns. "warn"
    warns once per process under Python's default filter, however many mismatches (a training
    loop would otherwise print one per step), and every time under "always"."""
    ts, y0 = jnp.array([0.0, 10.0]), jnp.array([2.0, 0.0])

    def grad(adjoint, y0=y0):
        return eqx.filter_jit(jax.grad(lambda y: no.odeint(van_der_pol, y, ts, solver=no.RK4(),
                                                    substeps=100, adjoint=adjoint)[-1, 0]))(y0)

    for action, shown in (("default", 1), ("always", 3)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter(action)
            for scale in (1.0, 1.1, 1.2):  # three different mismatches
                jax.block_until_ready(grad(no.BacksolveAdjoint(), scale * y0))
        mismatches = [w.message.mismatch for w in caught if w.category is no.ReconstructionWarning]
        assert len(mismatches) == shown and all(m > 0.1 for m in mismatches)
    assert len(set(mismatches)) == 3

    with pytest.raises(eqx.EquinoxRuntimeError, match="did not reconstruct the forward states"):
        jax.block_until_ready(grad(no.BacksolveAdjoint(on_mismatch="raise")))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        jax.block_until_ready(grad(no.BacksolveAdjoint(on_mismatch="ignore")))
        jax.block_until_ready(jax.grad(loss_of(no.BacksolveAdjoint(on_mismatch="raise")))(Y0, W))
