"""Fixed-step integration: the loop over the grid, its checkpointed form, and dense output.

A solve with a fixed-step solver crosses each interval of `ts` in `substeps` equal steps. An outer
`lax.scan` over the intervals returns the state at every time in `ts`; an inner scan over the
substeps carries the state (and the solver's first-same-as-last value, see
`AbstractFixedStepSolver.advance`). `HermiteInterpolation` turns the states of every step and the
field's values there into a continuous solution.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
from jax import lax

from neuralode.solvers import AbstractFixedStepSolver


class Dynamics(NamedTuple):
    """A vector field in the form the integrators use: `func(t, y, args, tied, layer)`, with `tied`
    the parameters shared by every step and `stacked` the depth-varying ones (leading axis = number
    of steps; `layer` is one slice of it, None when there are none)."""

    func: Callable
    tied: object
    stacked: object

    def at(self, layer) -> Callable:
        """The field `f(t, y, args)` of one layer (None for a weight-tied field)."""
        return lambda t, y, args: self.func(t, y, args, self.tied, layer)


def per_interval(stacked, intervals: int, substeps: int):
    """Depth-varying parameters reshaped from (L, ...) to (intervals, substeps, ...)."""
    return jax.tree.map(lambda x: x.reshape((intervals, substeps) + x.shape[1:]), stacked)


def concat_initial(y0, ys):
    return jax.tree.map(lambda first, rest: jnp.concatenate([first[None], rest]), y0, ys)


def fixed_step_loop(dynamics: Dynamics, solver: AbstractFixedStepSolver, y0, ts, args,
                    substeps: int, scan: Callable = lax.scan, every_step: bool = False):
    """The states at `ts`, each interval crossed in `substeps` equal steps (negative for decreasing
    `ts`). With `every_step`, returns `(ys, grid_ys)`: also the state after every step (y0 first).
    `scan` has the signature of `lax.scan(body, carry, xs)`."""
    intervals = ts.shape[0] - 1
    hs = (ts[1:] - ts[:-1]) / substeps
    varying = dynamics.stacked is not None

    def interval(carry, xs):
        t_start, h, interval_layers = xs

        def substep(carry, xs):
            y, state = carry
            j, layer = xs
            f, t = dynamics.at(layer), t_start + j * h
            if varying:  # a new field every step: nothing carries over
                state = solver.init(f, t, y, args)
            y, state = solver.advance(f, t, y, h, args, state)
            return (y, None if varying else state), y if every_step else None

        carry, steps = scan(substep, carry, (jnp.arange(substeps, dtype=ts.dtype), interval_layers))
        return carry, (carry[0], steps)

    state = None if varying else solver.init(dynamics.at(None), ts[0], y0, args)
    _, (ys, steps) = scan(interval, (y0, state),
                          (ts[:-1], hs, per_interval(dynamics.stacked, intervals, substeps)))
    ys = concat_initial(y0, ys)
    if not every_step:
        return ys
    return ys, concat_initial(y0, jax.tree.map(lambda s: s.reshape((-1,) + s.shape[2:]), steps))


def checkpointed_scan(body, carry, xs, segments: int | None):
    """`lax.scan(body, carry, xs)` cut into `segments` segments (default ceil(sqrt(length))), each
    under `jax.checkpoint`: the backward pass stores segment boundaries and recomputes inside."""
    length = jax.tree.leaves(xs)[0].shape[0]
    segments = min(length, segments or math.ceil(math.sqrt(length)))
    size = math.ceil(length / segments)
    full, rest = divmod(length, size)

    @jax.checkpoint
    def segment(carry, xs_segment):
        return lax.scan(body, carry, xs_segment)

    xs_full = jax.tree.map(lambda x: x[: full * size].reshape((full, size) + x.shape[1:]), xs)
    carry, ys = lax.scan(segment, carry, xs_full)
    ys = jax.tree.map(lambda y: y.reshape((full * size,) + y.shape[2:]), ys)
    if rest:
        carry, ys_rest = segment(carry, jax.tree.map(lambda x: x[full * size:], xs))
        ys = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), ys, ys_rest)
    return carry, ys


def step_times(ts, substeps: int):
    """The grid of a fixed-step solve: ts[i] + j h_i for every interval i and j < substeps, then
    ts[-1] (the times at which `fixed_step_loop` starts its steps, and the end)."""
    hs = (ts[1:] - ts[:-1]) / substeps
    inner = ts[:-1, None] + jnp.arange(substeps, dtype=ts.dtype) * hs[:, None]
    return jnp.concatenate([inner.ravel(), ts[-1:]])


class HermiteInterpolation(eqx.Module):
    """The cubic Hermite interpolant of a fixed-step solve: on step k, from t_k to t_{k+1} = t_k + h,

        y(t_k + s h) = (2s^3 - 3s^2 + 1) y_k + (s^3 - 2s^2 + s) h f_k
                       + (3s^2 - 2s^3) y_{k+1} + (s^3 - s^2) h f'_{k+1},

    with f_k, f'_{k+1} the field of step k at its two ends (Hairer, Norsett & Wanner I, II.6). It
    matches the states and slopes at every step, and errs by O(h^4) beyond the solver's own error.
    """

    ts: jax.Array  # (K + 1,) step times
    ys: object  # states, leading axis K + 1
    left: object  # f_k at the start of each step, leading axis K
    right: object  # f'_{k+1} at the end of each step, leading axis K

    def evaluate(self, t):
        """The interpolated state at the scalar time `t` (extrapolated outside the grid, which
        `Solution.evaluate` refuses)."""
        forward = self.ts[-1] > self.ts[0]
        key = jnp.where(forward, self.ts, -self.ts)
        k = jnp.clip(jnp.searchsorted(key, jnp.where(forward, t, -t), side="right") - 1, 0,
                     self.ts.shape[0] - 2)
        h = self.ts[k + 1] - self.ts[k]
        s = (t - self.ts[k]) / h
        weights = (2 * s**3 - 3 * s**2 + 1, (s**3 - 2 * s**2 + s) * h, 3 * s**2 - 2 * s**3,
                   (s**3 - s**2) * h)

        def leaf(y, left, right):
            w = [jnp.asarray(c, y.dtype) for c in weights]
            return w[0] * y[k] + w[1] * left[k] + w[2] * y[k + 1] + w[3] * right[k]

        return jax.tree.map(leaf, self.ys, self.left, self.right)


def hermite_interpolation(dynamics: Dynamics, ts, grid_ys, args, substeps: int):
    """The dense output of a fixed-step solve from the states at every step: the field is
    evaluated at all step ends at once (vmap), with step k's layer at both ends of step k."""
    grid = step_times(ts, substeps)
    func = jax.vmap(dynamics.func, in_axes=(0, 0, None, None, 0 if dynamics.stacked is not None
                                            else None))
    first = jax.tree.map(lambda y: y[:-1], grid_ys)
    last = jax.tree.map(lambda y: y[1:], grid_ys)
    if dynamics.stacked is None:
        values = func(grid, grid_ys, args, dynamics.tied, None)
        left, right = (jax.tree.map(lambda v: v[:-1], values), jax.tree.map(lambda v: v[1:], values))
    else:
        left = func(grid[:-1], first, args, dynamics.tied, dynamics.stacked)
        right = func(grid[1:], last, args, dynamics.tied, dynamics.stacked)
    return HermiteInterpolation(grid, grid_ys, left, right)
