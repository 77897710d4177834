"""Solvers: explicit Runge-Kutta methods from Butcher tableaus, leapfrog, and diffrax's adaptive pairs.

A fixed-step solver is a `step(f, t, y, h, args) -> y_next` and its `order`: run on the grid
`t_k = t0 + k h`, it *is* a discrete-depth network (Euler = ResNet, RK4 = RK-Net, Leapfrog =
Hamiltonian net). An adaptive solver names the diffrax solver that `odeint` hands the problem to.

Every solver also tells the driver what it needs to know about it, so that the driver never asks
which solver it holds: `check_state(y0)` (the state structure it can step), `backsolve_refusal`
(why the continuous adjoint does not apply, or None) and, for fixed steps, `evaluations(steps,
depth_varying)` (the vector-field evaluations of a solve).

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
    backsolve_refusal: ClassVar[str | None] = None  # why BacksolveAdjoint cannot be used, if so

    def check_state(self, y0) -> None:
        """Raise TypeError if this solver cannot step a state with the structure of `y0`."""

    def __eq__(self, other):
        return type(self) is type(other)

    def __hash__(self):
        return hash(type(self))

    def __repr__(self):
        return f"{type(self).__name__}()"


class AbstractFixedStepSolver(AbstractSolver):
    """A fixed-step solver. `step` is one self-contained step; a solve runs `init` once and then
    `advance`, which may carry a state between steps (first-same-as-last: a field value the next
    step reuses). A depth-varying field changes between steps, so its solve calls `init` before
    every step."""

    adaptive = False
    evaluations_per_step: ClassVar[int]
    initial_evaluations: ClassVar[int] = 0  # evaluations of `init`

    @abc.abstractmethod
    def step(self, f: Callable, t, y, h, args):
        """One step of size `h` from `(t, y)`; `f(t, y, args)` is the vector field."""

    def init(self, f: Callable, t, y, args):
        """The state carried into the first step (None: nothing is carried)."""
        return None

    def advance(self, f: Callable, t, y, h, args, state):
        """One step that reads and returns the carried state: `(y_next, state_next)`."""
        return self.step(f, t, y, h, args), state

    def evaluations(self, steps: int, depth_varying: bool = False) -> int:
        """Vector-field evaluations of `steps` steps (a depth-varying field re-runs `init` per step)."""
        if depth_varying:
            return steps * (self.evaluations_per_step + self.initial_evaluations)
        return steps * self.evaluations_per_step + self.initial_evaluations


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
    """Heun's method (explicit trapezoidal rule), order 2:

        k_1 = f(t, y),   k_2 = f(t + h, y + h k_1),   y_next = y + h/2 (k_1 + k_2).
    """

    order = 2
    tableau = _tableau([[], [1]], [0.5, 0.5], [0, 1])
    evaluations_per_step = 2


class RK4(AbstractRungeKutta):
    """The classical fourth-order Runge-Kutta method, order 4 (one step is one RK-Net block):

        k_1 = f(t, y),                   k_2 = f(t + h/2, y + h/2 k_1),
        k_3 = f(t + h/2, y + h/2 k_2),   k_4 = f(t + h, y + h k_3),
        y_next = y + h/6 (k_1 + 2 k_2 + 2 k_3 + k_4).
    """

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

    Cost: the force F(t + h, q_next) that ends a step begins the next one (first-same-as-last), so
    a solve evaluates F once per step plus once at the start, and V once per step. Each call of f
    feeds only one of its two halves into the step; under `jit` XLA removes the unused half (dead
    code), so a step costs one evaluation of a separable field. `nfe` counts force evaluations:
    steps + 1 (2 per step for a depth-varying field, whose force changes between steps).
    Not available with `BacksolveAdjoint`: the augmented adjoint system is not separable.
    """

    order = 2
    evaluations_per_step = 1
    initial_evaluations = 1
    backsolve_refusal = ("the augmented adjoint system of Leapfrog() is not separable; use "
                         "DiscreteAdjoint() or CheckpointAdjoint()")

    def check_state(self, y0):
        if not (isinstance(y0, (tuple, list)) and len(y0) == 2):
            raise TypeError("solver=Leapfrog() needs y0 given as a pair (q, p) (a tuple or list of "
                            f"two parts), got {jax.tree.structure(y0)}")

    def init(self, f, t, y, args):
        return f(t, y, args)[1]

    def advance(self, f, t, y, h, args, force):
        q, p = y
        p_half = axpy(p, 0.5 * h, [(1.0, force)])
        q_next = axpy(q, h, [(1.0, f(t + 0.5 * h, _pair_like(y, q, p_half), args)[0])])
        force = f(t + h, _pair_like(y, q_next, p_half), args)[1]
        return _pair_like(y, q_next, axpy(p_half, 0.5 * h, [(1.0, force)])), force

    def step(self, f, t, y, h, args):
        return self.advance(f, t, y, h, args, self.init(f, t, y, args))[0]

    @staticmethod
    def amplification_matrix(x):
        """M(x), x = h omega, with (q, p/omega)_next = M (q, p/omega) on q'' = -omega^2 q; det M = 1."""
        return np.array([[1 - x**2 / 2, x], [-x * (1 - x**2 / 4), 1 - x**2 / 2]])


def _pair_like(y, q, p):
    """(q, p) in the container of the pair y (tuple, list or NamedTuple)."""
    if isinstance(y, tuple) and hasattr(y, "_fields"):
        return type(y)(q, p)
    return type(y)((q, p))


class AbstractAdaptiveSolver(AbstractSolver):
    """An embedded Runge-Kutta pair run by `diffrax.diffeqsolve` with a `PIDController(rtol, atol)`.
    `solve` counts its vector-field evaluations while it runs (`neuralode.adaptive`)."""

    adaptive = True

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

