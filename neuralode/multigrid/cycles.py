"""Multigrid cycles (V, W, F), full multigrid, and `solve`: cycles as a defect correction to a tolerance.

Two-grid correction u <- u + P A_c^{-1} R (f - A u); a V/W/F cycle replaces the coarse solve by 1,
2 (W) or an F then a V cycle, recursively, down to one unknown, where it is exact (Briggs, Henson &
McCormick, "A Multigrid Tutorial", 2000, ch. 3; Trottenberg, Oosterlee & Schueller, "Multigrid",
2001, ch. 2).
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from neuralode.multigrid.checks import check_count, check_field, check_finite
from neuralode.multigrid.operators import check_levels, check_operator, hierarchy, residual
from neuralode.multigrid.smoothers import SMOOTHERS, smooth
from neuralode.multigrid.transfers import prolong, restrict

CYCLES = ("V", "W", "F")


def _check_options(kind, smoother, nu1, nu2) -> None:
    if kind not in CYCLES:
        raise ValueError(f"kind must be one of {CYCLES}, got {kind!r}")
    if smoother not in SMOOTHERS:
        raise ValueError(f"smoother must be one of {SMOOTHERS}, got {smoother!r}")
    check_count("nu1", nu1, 0)
    check_count("nu2", nu2, 0)


def cycle(levels, u, f, kind: str = "V", nu1: int = 2, nu2: int = 1, smoother: str = "gauss_seidel",
          omega: float = 2 / 3, level: int = 0):
    """One multigrid cycle on levels[level:]: nu1 pre-smoothing sweeps, coarse-grid correction, nu2
    post-smoothing sweeps.

    `levels` is a hierarchy (`hierarchy(op)`: grids n, n/2, ..., 2) and u, f live on the grid of
    levels[level]. The coarse correction solves A_c e = R (f - A u) from e = 0 with one cycle (V),
    two (W), or an F then a V cycle (F); on one unknown it is exact, e = r / A. `smoother` is one of
    SMOOTHERS; omega is the Jacobi weight (Gauss-Seidel has none).
    """
    levels = check_levels(levels)
    if not isinstance(level, int) or not 0 <= level < len(levels):
        raise ValueError(f"level must be an int in [0, {len(levels)}) (an index into levels), got {level!r}")
    for name, x in (("u", u), ("f", f)):
        if jnp.shape(x) != levels[level].shape:
            raise ValueError(f"{name} has shape {jnp.shape(x)}, but levels[{level}] acts on "
                             f"{levels[level].shape}: levels must start at the grid of u and f and halve "
                             "it down to one unknown, as hierarchy(op) returns them")
    _check_options(kind, smoother, nu1, nu2)
    return _cycle(levels, u, f, kind, nu1, nu2, smoother, omega, level)


def _cycle(levels, u, f, kind, nu1, nu2, smoother, omega, level):
    """`cycle` after its checks."""
    op = levels[level]
    if level == len(levels) - 1:
        return f / op.diagonal(f.dtype)
    u = smooth(op, u, f, nu1, smoother, omega)
    rc = restrict(residual(op, u, f))
    coarse = lambda k, e: _cycle(levels, e, rc, k, nu1, nu2, smoother, omega, level + 1)
    ec = jnp.zeros_like(rc)
    if kind == "V":
        ec = coarse("V", ec)
    elif kind == "W":
        ec = jax.lax.fori_loop(0, 2, lambda _, e: coarse("W", e), ec)
    else:
        ec = coarse("V", coarse("F", ec))
    u = u + prolong(ec)
    return smooth(op, u, f, nu2, smoother, omega)


def fmg(levels, f, nu1: int = 2, nu2: int = 1, smoother: str = "gauss_seidel", omega: float = 2 / 3,
        cycles: int = 1):
    """Full multigrid: solve on the coarsest grid, then interpolate up and apply `cycles` V-cycles per level.

    The right-hand sides of the coarse problems are full-weighting restrictions of f.
    """
    levels = check_levels(levels)
    f = check_field("f", f, levels[0].shape)
    _check_options("V", smoother, nu1, nu2)
    check_count("cycles", cycles, 1)
    rhs = [f]
    for _ in levels[1:]:
        rhs.append(restrict(rhs[-1]))
    rhs[-1] = check_finite(rhs[-1], f=f)  # every level's result depends on the coarsest one
    u = rhs[-1] / levels[-1].diagonal(f.dtype)
    for level in range(len(levels) - 2, -1, -1):
        u = prolong(u)
        step = lambda _, u: _cycle(levels, u, rhs[level], "V", nu1, nu2, smoother, omega, level)
        u = jax.lax.fori_loop(0, cycles, step, u)
    return u


class Solution(NamedTuple):
    u: jax.Array
    residuals: jax.Array  # ||f - A u_k|| / ||f|| for k = 0..max_cycles (0 for f = 0; NaN after convergence)
    cycles: jax.Array     # cycles taken
    converged: jax.Array


def solve(op, f, u0=None, *, kind: str = "V", nu1: int = 2, nu2: int = 1,
          smoother: str = "gauss_seidel", omega: float = 2 / 3, galerkin: bool | None = None,
          rtol: float = 1e-8, max_cycles: int = 50, cycle_dtype=None) -> Solution:
    """Multigrid cycles until ||f - A u|| <= rtol ||f|| or max_cycles, with the residual history.

    Written as defect correction, u <- u + C(f - A u) with C one cycle from a zero guess (the same
    iterate as cycling on u, since a cycle is affine in u). The residual and the update are computed
    in f's dtype; the cycle runs in `cycle_dtype` (default: f's), and the residual is kept rounded
    to that dtype, the only copy the cycle reads (the history's norms are then exact to its
    epsilon). A float32 cycle inside a float64 correction converges at the float64 rate down to
    float64 residuals, as long as one cycle's reduction (about 0.1) is far above float32 rounding,
    and moves half the bytes (mixed-precision multigrid: Goeddeke, Strzodka & Turek 2007; Tamstorf
    et al., SISC 2021). For f = 0 the solution is u = 0, returned in zero cycles whatever u0.
    `galerkin` chooses the coarse operators as in `hierarchy`.
    """
    check_operator("op", op)
    f = check_field("f", f, op.shape)
    given = {} if u0 is None else {"u0": check_field("u0", u0, op.shape).astype(f.dtype)}
    _check_options(kind, smoother, nu1, nu2)
    check_count("max_cycles", max_cycles, 1)
    if isinstance(rtol, (int, float)) and not rtol >= 0:
        raise ValueError(f"rtol must be >= 0, got {rtol!r}")
    try:
        cdtype = f.dtype if cycle_dtype is None else jnp.dtype(cycle_dtype)
    except TypeError:
        raise TypeError(f"cycle_dtype must be a floating-point dtype, got {cycle_dtype!r}") from None
    if not jnp.issubdtype(cdtype, jnp.floating):
        raise TypeError(f"cycle_dtype must be a floating-point dtype, got {cdtype}")
    levels = jax.tree.map(lambda w: w.astype(cdtype), hierarchy(op, galerkin))
    fnorm = check_finite(jnp.linalg.norm(f), f=f, **given)  # the stopping test reads fnorm
    solved = fnorm == 0  # f = 0: u = 0 exactly (its relative residual would be 0 / 0)
    u0 = jnp.where(solved, 0, given["u0"]) if given else jnp.zeros_like(f)
    r0 = (f - op(u0) if given else f).astype(cdtype)
    norm = lambda r: jnp.sqrt(jnp.sum(jnp.square(r.astype(f.dtype))))
    history = jnp.full((max_cycles + 1,), jnp.nan, f.dtype).at[0].set(jnp.where(solved, 0, norm(r0) / fnorm))

    def not_done(state):
        _, _, hist, k = state
        return (k < max_cycles) & (hist[k] > rtol)

    def step(state):
        u, r, hist, k = state
        u = u + _cycle(levels, jnp.zeros_like(r), r, kind, nu1, nu2, smoother, omega, 0).astype(f.dtype)
        r = (f - op(u)).astype(cdtype)
        return u, r, hist.at[k + 1].set(norm(r) / fnorm), k + 1

    init = (u0, r0, history, jnp.asarray(0))
    u, _, history, k = jax.lax.while_loop(not_done, step, init)
    return Solution(u, history, k, history[k] <= rtol)
