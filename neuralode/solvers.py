"""Solvers: explicit Runge-Kutta methods from Butcher tableaus, leapfrog, and diffrax's adaptive pairs.

A fixed-step solver is a `step(f, t, y, h, args) -> y_next` and its `order`: run on the grid
`t_k = t0 + k h`, it *is* a discrete-depth network (Euler = ResNet, RK4 = RK-Net, Leapfrog =
Hamiltonian net). An adaptive solver names the diffrax solver that `odeint` hands the problem to.

The state `y` may be any pytree of arrays; every update below is applied leaf by leaf.
"""
from __future__ import annotations

import abc
from typing import Callable, ClassVar, NamedTuple

import diffrax
import jax
import jax.numpy as jnp
import numpy as np


class ButcherTableau(NamedTuple):
    """Coefficients of an explicit s-stage Runge-Kutta method (Hairer, Norsett & Wanner, I.II.1):

        k_i = f(t + c_i h, y + h sum_{j<i} a_ij k_j),    y_next = y + h sum_i b_i k_i.
    """

    a: tuple[tuple[float, ...], ...]  # strictly lower-triangular rows
    b: tuple[float, ...]
    c: tuple[float, ...]


def axpy(y, h, terms):
    """y + h * sum_i coef_i k_i, leaf by leaf, for `terms = [(coef_i, k_i), ...]` (zero coefs skipped)."""
    terms = [(coef, k) for coef, k in terms if coef != 0.0]
    if not terms:
        return y

    def leaf(y_leaf, *k_leaves):
        total = sum(coef * k for (coef, _), k in zip(terms, k_leaves))
        return y_leaf + jnp.asarray(h, y_leaf.dtype) * total

    return jax.tree.map(leaf, y, *[k for _, k in terms])


class AbstractSolver(abc.ABC):
    """A solver: either fixed-step (`step`) or adaptive (`diffrax_solver`)."""

    order: ClassVar[int]
    adaptive: ClassVar[bool]

    def __eq__(self, other):
        return type(self) is type(other)

    def __hash__(self):
        return hash(type(self))

    def __repr__(self):
        return f"{type(self).__name__}()"


class AbstractFixedStepSolver(AbstractSolver):
    adaptive = False
    evaluations_per_step: ClassVar[int]

    @abc.abstractmethod
    def step(self, f: Callable, t, y, h, args):
        """One step of size `h` from `(t, y)`; `f(t, y, args)` is the vector field."""


class AbstractRungeKutta(AbstractFixedStepSolver):
    """An explicit Runge-Kutta method defined by its Butcher tableau."""

    tableau: ClassVar[ButcherTableau]

    @classmethod
    def stages(cls) -> int:
        return len(cls.tableau.b)

    def step(self, f, t, y, h, args):
        a, b, c = self.tableau
        ks = []
        for i in range(len(b)):
            y_stage = axpy(y, h, list(zip(a[i], ks)))
            ks.append(f(t + c[i] * h, y_stage, args))
        return axpy(y, h, list(zip(b, ks)))

    def stability_function(self, z):
        """R(z) with y_next = R(h lambda) y on y' = lambda y; for an explicit method the polynomial
        R(z) = 1 + sum_{j>=1} z^j b^T A^{j-1} 1 (Hairer & Wanner, II, IV.2)."""
        a = np.array([row + (0.0,) * (len(self.tableau.b) - len(row)) for row in self.tableau.a])
        b = np.array(self.tableau.b)
        z = np.asarray(z, dtype=complex)
        result, power = np.ones_like(z), np.ones(len(b))
        for j in range(1, len(b) + 1):
            result = result + z**j * (b @ power)
            power = a @ power
        return result


def _tableau(a, b, c) -> ButcherTableau:
    return ButcherTableau(tuple(tuple(map(float, row)) for row in a), tuple(map(float, b)),
                          tuple(map(float, c)))


class Euler(AbstractRungeKutta):
    """Forward Euler, y_next = y + h f(t, y): order 1. One step is one residual block."""

    order = 1
    tableau = _tableau([[]], [1], [0])
    evaluations_per_step = 1


class Midpoint(AbstractRungeKutta):
    """Explicit midpoint rule, y_next = y + h f(t + h/2, y + h/2 f(t, y)): order 2."""

    order = 2
    tableau = _tableau([[], [0.5]], [0, 1], [0, 0.5])
    evaluations_per_step = 2


class Heun(AbstractRungeKutta):
    """Heun's method (explicit trapezoidal rule): order 2."""

    order = 2
    tableau = _tableau([[], [1]], [0.5, 0.5], [0, 1])
    evaluations_per_step = 2


class RK4(AbstractRungeKutta):
    """The classical fourth-order Runge-Kutta method: order 4. One step is one RK-Net block."""

    order = 4
    tableau = _tableau([[], [0.5], [0, 0.5], [0, 0, 1]], [1 / 6, 1 / 3, 1 / 3, 1 / 6],
                       [0, 0.5, 0.5, 1])
    evaluations_per_step = 4


class Leapfrog(AbstractFixedStepSolver):
    """Velocity Verlet for a second-order system given as the pair y = (q, p):

        p_half = p + h/2 F(t, q),   q_next = q + h V(t + h/2, p_half),   p_next = p_half + h/2 F(t + h, q_next)

    where f(t, (q, p), args) = (V, F) must be separable: V may depend on p only and F on q only
    (e.g. a Hamiltonian H = T(p) + U(q)). Order 2, symplectic and time-reversible, so the energy of
    a harmonic oscillator oscillates but does not drift (Hairer, Lubich & Wanner, GNI I.1.4).
    Stable on q'' = -omega^2 q exactly for h omega < 2; see `amplification_matrix`.
    """

    order = 2
    evaluations_per_step = 3

    def step(self, f, t, y, h, args):
        q, p = y
        p_half = axpy(p, 0.5 * h, [(1.0, f(t, (q, p), args)[1])])
        q_next = axpy(q, h, [(1.0, f(t + 0.5 * h, (q, p_half), args)[0])])
        p_next = axpy(p_half, 0.5 * h, [(1.0, f(t + h, (q_next, p_half), args)[1])])
        return (q_next, p_next)

    @staticmethod
    def amplification_matrix(x):
        """M(x), x = h omega, with (q, p/omega)_next = M (q, p/omega) on q'' = -omega^2 q; det M = 1."""
        return np.array([[1 - x**2 / 2, x], [-x * (1 - x**2 / 4), 1 - x**2 / 2]])


class AbstractAdaptiveSolver(AbstractSolver):
    """An embedded Runge-Kutta pair run by `diffrax.diffeqsolve` with a `PIDController(rtol, atol)`.

    `evaluations_per_step` and `initial_evaluations` count the vector-field calls: both pairs are
    first-same-as-last, so every attempted step (accepted or rejected) costs 6 new evaluations,
    plus the first stage at the start. Counted against a host-side call counter
    (tests/test_solve.py) this is exact to within one evaluation: diffrax's initial step-size
    selection adds one more call on some problems.
    """

    adaptive = True
    evaluations_per_step = 6
    initial_evaluations = 1

    @abc.abstractmethod
    def diffrax_solver(self) -> diffrax.AbstractSolver:
        """The diffrax solver that does the work."""


class Dopri5(AbstractAdaptiveSolver):
    """Dormand-Prince 5(4), the classic adaptive solver of neural ODEs (Chen et al. 2018)."""

    order = 5

    def diffrax_solver(self):
        return diffrax.Dopri5()


class Tsit5(AbstractAdaptiveSolver):
    """Tsitouras 5(4): same cost as Dopri5, usually a little more accurate per step."""

    order = 5

    def diffrax_solver(self):
        return diffrax.Tsit5()

