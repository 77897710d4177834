"""Every fixed-step solver shows its order; Leapfrog conserves energy and costs one force per step;
stability functions are right."""
from typing import NamedTuple

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import neuralode as no
from helpers import (Y0, convergence_order, linear_exact, linear_field, oscillator_field,
                     riccati_exact, riccati_field)

RK_SOLVERS = [no.Euler(), no.Midpoint(), no.Heun(), no.RK4()]
T = 2.0


def final_error(field, y0, exact, solver, steps):
    ys = no.odeint(field, y0, jnp.array([0.0, T]), solver=solver, substeps=steps)
    return float(jnp.max(jnp.abs(jax.tree.leaves(ys)[0][-1] - exact(T))))


@pytest.mark.parametrize("solver", RK_SOLVERS, ids=repr)
@pytest.mark.parametrize("problem", ["linear", "riccati"])
def test_order_of_convergence(solver, problem):
    field, y0, exact = {"linear": (linear_field, Y0, linear_exact),
                        "riccati": (riccati_field, jnp.array([1.0]), riccati_exact)}[problem]
    # Steps small enough for the asymptotic regime, large enough that errors stay far above rounding.
    steps = [40, 80, 160, 320] if solver.order < 4 else [20, 40, 80, 160]
    errors = [final_error(field, y0, exact, solver, n) for n in steps]
    assert abs(convergence_order(steps, errors) - solver.order) < 0.2


def test_leapfrog_order():
    exact = lambda t: jnp.cos(t)  # noqa: E731  (q(0) = 1, p(0) = 0)
    steps = [40, 80, 160, 320]
    errors = []
    for n in steps:
        q, _ = no.odeint(oscillator_field, (jnp.array(1.0), jnp.array(0.0)), jnp.array([0.0, T]),
                         solver=no.Leapfrog(), substeps=n)
        errors.append(abs(float(q[-1] - exact(T))))
    assert abs(convergence_order(steps, errors) - 2) < 0.2


def test_leapfrog_energy_has_no_secular_drift():
    """Over 10^4 steps the energy oscillates with a constant O(h^2) amplitude; Euler's grows."""
    h, steps = 0.1, 10_000
    ts = jnp.linspace(0.0, h * steps, steps + 1)
    q, p = no.odeint(oscillator_field, (jnp.array(1.0), jnp.array(0.0)), ts, solver=no.Leapfrog(),
                     max_steps=steps)
    deviation = np.abs(np.asarray(0.5 * (q**2 + p**2)) - 0.5)
    first, last = deviation[: steps // 10].max(), deviation[-steps // 10:].max()
    # Velocity Verlet conserves H~ = (p^2 + (1 - h^2/4) q^2) / 2 exactly, so |E - E0| <= h^2/4 E0 / (1 - h^2/4).
    assert last <= 0.5 * h**2 / 4 / (1 - h**2 / 4) + 1e-12
    assert abs(last / first - 1) < 0.01
    # Forward Euler on the same problem multiplies the energy by (1 + h^2) every step.
    y = no.odeint(lambda t, y, a: jnp.stack([y[1], -y[0]]), jnp.array([1.0, 0.0]), ts,
                  solver=no.Euler(), max_steps=steps)
    energy = 0.5 * jnp.sum(y[-1] ** 2)
    assert float(energy) == pytest.approx(0.5 * (1 + h**2) ** steps, rel=1e-9)


@pytest.mark.parametrize("solver", RK_SOLVERS, ids=repr)
def test_stability_function_is_the_one_step_amplification(solver):
    """R(h lambda) is exactly what one step does to y' = lambda y, for complex lambda."""
    lam, h = -0.7 + 1.3j, 0.4
    y1 = no.odeint(lambda t, y, a: lam * y, jnp.array([1.0 + 0.0j]), jnp.array([0.0, h]),
                   solver=solver)[-1, 0]
    assert complex(y1) == pytest.approx(complex(solver.stability_function(h * lam)), abs=1e-14)


def test_stability_functions_are_the_taylor_polynomials():
    """For these explicit methods with s = p stages, R(z) = sum_{j<=p} z^j / j!."""
    z = np.array([0.3 + 0.2j, -2.0, 1j])
    for solver in RK_SOLVERS:
        taylor = sum(z**j / float(np.prod(np.arange(1, j + 1))) for j in range(solver.order + 1))
        np.testing.assert_allclose(solver.stability_function(z), taylor, rtol=1e-14)


def test_leapfrog_amplification_matrix_is_symplectic_and_matches_a_step():
    x = 0.7
    m = no.Leapfrog.amplification_matrix(x)
    assert np.linalg.det(m) == pytest.approx(1.0, abs=1e-14)
    q, p = no.odeint(lambda t, y, a: (y[1], -y[0]), (jnp.array(0.3), jnp.array(-0.2)),
                     jnp.array([0.0, x]), solver=no.Leapfrog())
    np.testing.assert_allclose([q[-1], p[-1]], m @ np.array([0.3, -0.2]), atol=1e-15)


@pytest.mark.parametrize("ours, theirs", [(no.Euler(), diffrax.Euler()),
                                          (no.Midpoint(), diffrax.Midpoint()),
                                          (no.Heun(), diffrax.Heun())], ids=repr)
def test_fixed_step_solvers_equal_diffrax(ours, theirs):
    w = jnp.array([[0.5, -1.0], [1.2, 0.3]])
    field = lambda t, y, a: jnp.tanh(w @ y + t)  # noqa: E731
    L, y0 = 25, jnp.array([0.4, -0.8])
    ys = no.odeint(field, y0, jnp.linspace(0.0, T, L + 1), solver=ours)
    sol = diffrax.diffeqsolve(diffrax.ODETerm(field), theirs, t0=0.0, t1=T, dt0=T / L, y0=y0,
                              saveat=diffrax.SaveAt(ts=jnp.linspace(0.0, T, L + 1)))
    np.testing.assert_allclose(ys, sol.ys, rtol=0, atol=1e-12)


def counted_oscillator(counts):
    """q' = p, p' = -q with each half counted when its value is used: `jax.pure_callback` is pure,
    so XLA removes it (like the rest of a half) where a step does not use that half."""
    def counter(name):
        def count(x):
            counts[name] += 1
            return x
        return count

    def field(t, y, args):
        q, p = y
        velocity = jax.pure_callback(counter("V"), jax.ShapeDtypeStruct(p.shape, p.dtype), p)
        force = jax.pure_callback(counter("F"), jax.ShapeDtypeStruct(q.shape, q.dtype), -q)
        return velocity, force

    return field


def test_leapfrog_evaluates_one_force_per_step():
    """Velocity Verlet needs one new force per step (the last force of a step is the first of the
    next): a solve of n steps evaluates F n + 1 times and V n times (it used to evaluate F 2n times
    and V n times), and reports nfe = n + 1. A depth-varying field changes F between steps: 2n."""
    counts = {"V": 0, "F": 0}
    n = 25
    sol = no.solve(counted_oscillator(counts), (jnp.ones(2), jnp.zeros(2)),
                   jnp.linspace(0.0, 1.0, 6), solver=no.Leapfrog(), substeps=5)
    jax.block_until_ready(sol.ys)
    assert counts == {"V": n, "F": n + 1} and int(sol.stats["nfe"]) == n + 1
    np.testing.assert_allclose(sol.ys[0][-1], jnp.cos(1.0), atol=1e-4)  # h = 0.04, order 2

    stack = no.DepthStack(PairField, n, rngs=nnx.Rngs(0))
    sol = no.solve(stack, (jnp.ones(2), jnp.zeros(2)), jnp.array([0.0, 1.0]),
                   solver=no.Leapfrog(), substeps=n)
    assert int(sol.stats["nfe"]) == 2 * n


class PairField(nnx.Module):
    """A separable pair field from an MLP on q: (V, F) = (p, mlp(q))."""

    def __init__(self, rngs):
        self.mlp = no.MLPField(2, 4, param_dtype=jnp.float64, rngs=rngs)

    def __call__(self, t, y, args=None):
        return y[1], self.mlp(t, y[0])


@pytest.mark.parametrize("make", [list, lambda pair: Pair(*pair)], ids=["list", "namedtuple"])
def test_leapfrog_keeps_the_pair_container(make):
    y0 = make((jnp.array(1.0), jnp.array(0.0)))
    ys = no.odeint(lambda t, y, a: make((y[1], -y[0])), y0, jnp.array([0.0, 1.0]),
                   solver=no.Leapfrog(), substeps=100)
    assert type(ys) is type(y0)
    np.testing.assert_allclose(ys[0][-1], jnp.cos(1.0), atol=1e-4)


class Pair(NamedTuple):
    q: jax.Array
    p: jax.Array
