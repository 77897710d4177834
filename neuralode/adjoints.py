"""Adjoints: how the gradient of a solve is obtained.

- `DiscreteAdjoint`: backpropagation through the `lax.scan` of steps. This *is* the discrete adjoint
  (co-state) recursion lambda_k = (d step_k / d y)^T lambda_{k+1} of optimal control, exact for the
  discretised problem. Memory grows linearly with the number of steps.
- `CheckpointAdjoint(segments)`: the same gradient, storing only segment boundaries and recomputing
  the steps inside a segment (`jax.checkpoint`); about sqrt(L) segments by default.
- `BacksolveAdjoint`: the continuous adjoint of Chen et al. 2018 (after Pontryagin): solve
      d/dt [y, a, a_theta] = [f, -a^T df/dy, -a^T df/dtheta]
  backwards from t1 to t0 with the same solver. Constant memory in the number of steps, but the
  gradient is only an approximation of the discrete one (Gholami et al. 2019, ANODE), with an error
  that shrinks at the solver's order for smooth fields; a ReLU field makes the adjoint equation's
  right-hand side discontinuous and costs about one order (experiments/adjoint.py). The backwards
  solve of y can also be unstable.

For the adaptive solvers each adjoint names its diffrax counterpart.
"""
from __future__ import annotations

import abc
import math
from typing import Callable, NamedTuple

import diffrax
import jax
import jax.numpy as jnp
from jax import lax

from neuralode.solvers import AbstractFixedStepSolver, Leapfrog


class Dynamics(NamedTuple):
    """A vector field in the form the integrators use: `func(t, y, args, tied, layer)`, with `tied`
    the parameters shared by every step and `stacked` the depth-varying ones (leading axis = number
    of steps; `layer` is one slice of it, None when there are none)."""

    func: Callable
    tied: object
    stacked: object


def _tree_zeros_like(tree):
    return jax.tree.map(jnp.zeros_like, tree)


def _tree_add(a, b):
    return jax.tree.map(jnp.add, a, b)


def _tree_neg(tree):
    return jax.tree.map(jnp.negative, tree)


def _concat_initial(y0, ys):
    return jax.tree.map(lambda first, rest: jnp.concatenate([first[None], rest]), y0, ys)


def _per_interval(stacked, intervals: int, substeps: int):
    """Depth-varying parameters reshaped from (L, ...) to (intervals, substeps, ...)."""
    return jax.tree.map(lambda x: x.reshape((intervals, substeps) + x.shape[1:]), stacked)


def fixed_step_loop(dynamics: Dynamics, solver: AbstractFixedStepSolver, y0, ts, args,
                    substeps: int, scan: Callable = lax.scan):
    """Integrate over the grid: each interval of `ts` is crossed in `substeps` equal steps.

    An outer scan over the intervals returns the state at every time in `ts`; an inner scan over the
    substeps carries only the state. `scan` has the signature of `lax.scan(body, carry, xs)`.
    """
    intervals = ts.shape[0] - 1
    hs = (ts[1:] - ts[:-1]) / substeps
    layers = _per_interval(dynamics.stacked, intervals, substeps)

    def field(layer):
        return lambda t, y, args: dynamics.func(t, y, args, dynamics.tied, layer)

    def interval(y, xs):
        t_start, h, interval_layers = xs

        def substep(y, xs):
            j, layer = xs
            return solver.step(field(layer), t_start + j * h, y, h, args), None

        y, _ = scan(substep, y, (jnp.arange(substeps, dtype=ts.dtype), interval_layers))
        return y, y

    _, ys = scan(interval, y0, (ts[:-1], hs, layers))
    return _concat_initial(y0, ys)


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


class AbstractAdjoint(abc.ABC):
    """How `odeint` differentiates a solve."""

    def __eq__(self, other):
        return type(self) is type(other) and vars(self) == vars(other)

    def __hash__(self):
        return hash((type(self), tuple(sorted(vars(self).items()))))

    def __repr__(self):
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({fields})"

    def check_solver(self, solver) -> None:
        """Raise ValueError if this adjoint cannot differentiate `solver`."""

    @abc.abstractmethod
    def integrate(self, dynamics: Dynamics, solver: AbstractFixedStepSolver, y0, ts, args,
                  substeps: int):
        """The states at `ts` of a fixed-step solve, differentiable by this adjoint's method."""

    @abc.abstractmethod
    def diffrax_adjoint(self, backward_controller=None) -> diffrax.AbstractAdjoint:
        """The diffrax adjoint used with the adaptive solvers; `backward_controller` is the step
        controller of a backwards adjoint solve (None: the forward one)."""

    @abc.abstractmethod
    def backward_evaluations(self, forward_evaluations: int) -> int:
        """Vector-field evaluations (calls or vector-Jacobian products) of the backward pass of a
        fixed-step solve that made `forward_evaluations` in its forward pass."""


class DiscreteAdjoint(AbstractAdjoint):
    """Backpropagation through the steps (the discrete adjoint): exact, memory O(steps)."""

    def integrate(self, dynamics, solver, y0, ts, args, substeps):
        return fixed_step_loop(dynamics, solver, y0, ts, args, substeps)

    def diffrax_adjoint(self, backward_controller=None):
        return diffrax.RecursiveCheckpointAdjoint()

    def backward_evaluations(self, forward_evaluations):
        return forward_evaluations  # one vector-Jacobian product per stage


class CheckpointAdjoint(AbstractAdjoint):
    """Backpropagation with recomputation: the scans over the intervals of `ts` and over the
    substeps are each cut into `segments` checkpointed segments (None: about sqrt of their length).
    The same gradient as `DiscreteAdjoint` for about one extra forward pass."""

    def __init__(self, segments: int | None = None):
        if segments is not None and (not isinstance(segments, int) or segments < 1):
            raise ValueError(f"segments must be a positive int or None, got {segments!r}")
        self.segments = segments

    def integrate(self, dynamics, solver, y0, ts, args, substeps):
        def scan(body, carry, xs):
            return checkpointed_scan(body, carry, xs, self.segments)

        return fixed_step_loop(dynamics, solver, y0, ts, args, substeps, scan)

    def diffrax_adjoint(self, backward_controller=None):
        return diffrax.RecursiveCheckpointAdjoint(checkpoints=self.segments)

    def backward_evaluations(self, forward_evaluations):
        return 2 * forward_evaluations  # recomputation plus one vector-Jacobian product per stage


class BacksolveAdjoint(AbstractAdjoint):
    """The continuous adjoint (Chen et al. 2018), solved backwards with the forward solver.

    At every time of `ts` (last to first) the incoming cotangent of that output is added to the
    adjoint state a, and the state y restarts from the stored forward output, so the backwards
    solve of y only has to be stable over one interval. Gradients with respect to `ts` are not
    computed (zero). Not available for `Leapfrog`, whose augmented system is not separable.
    """

    def check_solver(self, solver):
        if isinstance(solver, Leapfrog):
            raise ValueError("adjoint=BacksolveAdjoint() does not support solver=Leapfrog(): the "
                             "augmented adjoint system is not separable; use DiscreteAdjoint or "
                             "CheckpointAdjoint")

    def integrate(self, dynamics, solver, y0, ts, args, substeps):
        layer0 = jax.tree.map(lambda x: x[0], dynamics.stacked)
        # Closed-over tracers of the field become explicit inputs, so gradients reach them too.
        func, consts = jax.closure_convert(dynamics.func, ts[0], y0, args, dynamics.tied, layer0)
        return _backsolve(func, solver, substeps, y0, ts, args, dynamics.tied, dynamics.stacked,
                          consts)

    def diffrax_adjoint(self, backward_controller=None):
        if backward_controller is None:
            return diffrax.BacksolveAdjoint()
        return diffrax.BacksolveAdjoint(stepsize_controller=backward_controller)

    def backward_evaluations(self, forward_evaluations):
        return forward_evaluations  # evaluations of the augmented field (f and a vjp each)


def _backsolve_forward(func, solver, substeps, y0, ts, args, tied, stacked, consts):
    def closed(t, y, args, tied, layer):
        return func(t, y, args, tied, layer, *consts)

    return fixed_step_loop(Dynamics(closed, tied, stacked), solver, y0, ts, args, substeps)


_backsolve = jax.custom_vjp(_backsolve_forward, nondiff_argnums=(0, 1, 2))


def _backsolve_fwd(func, solver, substeps, y0, ts, args, tied, stacked, consts):
    ys = _backsolve_forward(func, solver, substeps, y0, ts, args, tied, stacked, consts)
    return ys, (ys, ts, args, tied, stacked, consts)


def _backsolve_bwd(func, solver, substeps, residuals, ys_cotangent):
    ys, ts, args, tied, stacked, consts = residuals
    intervals = ts.shape[0] - 1
    hs = (ts[1:] - ts[:-1]) / substeps
    theta = (args, tied, consts)  # everything shared by all steps

    def augmented(t, state, layer):
        # d/dt (y, a, a_theta, a_layer) = (f, -a^T df/dy, -a^T df/dtheta, -a^T df/dlayer)
        y, a = state[0], state[1]
        f_y, vjp = jax.vjp(lambda y, theta, layer: func(t, y, theta[0], theta[1], layer,
                                                        *theta[2]), y, theta, layer)
        return (f_y,) + tuple(_tree_neg(g) for g in vjp(a))

    def back_interval(carry, xs):
        a, grad_theta = carry
        y_end, y_start_cotangent, t_start, h, interval_layers = xs

        def back_step(carry, layer):
            # j counts down the substeps: this step goes back from t_start + j h. Carrying j instead
            # of scanning an array of times keeps the backward memory independent of the steps.
            y, a, grad_theta, j = carry
            start = (y, a, _tree_zeros_like(theta), _tree_zeros_like(layer))
            y, a, d_theta, d_layer = solver.step(lambda t, s, _: augmented(t, s, layer),
                                                 t_start + j * h, start, -h, None)
            return (y, a, _tree_add(grad_theta, d_theta), j - 1), d_layer

        (_, a, grad_theta, _), d_layers = lax.scan(
            back_step, (y_end, a, grad_theta, jnp.asarray(substeps, ts.dtype)), interval_layers,
            length=substeps, reverse=True)
        return (_tree_add(a, y_start_cotangent), grad_theta), d_layers

    last = jax.tree.map(lambda c: c[-1], ys_cotangent)
    (a, (grad_args, grad_tied, grad_consts)), grad_layers = lax.scan(
        back_interval, (last, _tree_zeros_like(theta)),
        (jax.tree.map(lambda y: y[1:], ys), jax.tree.map(lambda c: c[:-1], ys_cotangent),
         ts[:-1], hs, _per_interval(stacked, intervals, substeps)), reverse=True)
    grad_stacked = jax.tree.map(lambda g: g.reshape((-1,) + g.shape[2:]), grad_layers)
    return a, jnp.zeros_like(ts), grad_args, grad_tied, grad_stacked, grad_consts


_backsolve.defvjp(_backsolve_fwd, _backsolve_bwd)


def reconstruction_error(dynamics: Dynamics, solver: AbstractFixedStepSolver, ys, ts, args,
                         substeps: int):
    """Per interval, max |y(ts[i]) - y~(ts[i])| where y~ integrates y(ts[i+1]) backwards with the
    same solver and steps: the error `BacksolveAdjoint` makes in the y it linearises around."""
    # Each interval runs the ordinary loop on the reversed grid [ts[i+1], ts[i]] (negative steps),
    # with its depth-varying layers in reverse order.
    layers = jax.tree.map(lambda x: x[:, ::-1],
                          _per_interval(dynamics.stacked, ts.shape[0] - 1, substeps))

    def back_interval(y_end, t_end, t_start, interval_layers):
        back = Dynamics(dynamics.func, dynamics.tied, interval_layers)
        y = fixed_step_loop(back, solver, y_end, jnp.stack([t_end, t_start]), args, substeps)
        return jax.tree.map(lambda leaf: leaf[-1], y)

    starts = jax.vmap(back_interval)(jax.tree.map(lambda y: y[1:], ys), ts[1:], ts[:-1], layers)
    errors = [jnp.max(jnp.abs(a - b), axis=tuple(range(1, a.ndim))) for a, b in
              zip(jax.tree.leaves(starts), jax.tree.leaves(jax.tree.map(lambda y: y[:-1], ys)))]
    return jnp.max(jnp.stack(errors), axis=0)
