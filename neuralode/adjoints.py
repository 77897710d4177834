"""Adjoints: how the gradient of a solve is obtained.

- `DiscreteAdjoint`: backpropagation through the `lax.scan` of steps. This *is* the discrete adjoint
  (co-state) recursion lambda_k = (d step_k / d y)^T lambda_{k+1} of optimal control, exact for the
  discretised problem. Memory grows linearly with the number of steps.
- `CheckpointAdjoint(segments)`: the same gradient, storing only segment boundaries and recomputing
  the steps inside a segment (`jax.checkpoint`); about sqrt(L) segments by default.
- `BacksolveAdjoint`: the continuous adjoint of Chen et al. 2018 (after Pontryagin): solve
      d/dt [y, a, a_theta] = [f, -a^T df/dy, -a^T df/dtheta]
  backwards from t1 to t0 with the same solver (fixed steps, or diffrax's adaptive stepping over
  each interval of `ts`). Constant memory in the number of steps, but the gradient is only an
  approximation of the discrete one (Gholami et al. 2019, ANODE), with an error that shrinks at
  the solver's order for smooth fields; a ReLU field makes the adjoint equation's right-hand side
  discontinuous and costs about one order (experiments/adjoint.py). The backwards solve of y can
  also be unstable: it is checked against the forward states (`on_mismatch`).

On the adaptive path `DiscreteAdjoint` and `CheckpointAdjoint` are diffrax's
`RecursiveCheckpointAdjoint`; any `diffrax.AbstractAdjoint` passes through as it is.
"""
from __future__ import annotations

import abc
import functools
import warnings
from typing import Callable, NamedTuple

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.custom_derivatives import CustomVJPPrimal, SymbolicZero

from neuralode import adaptive
from neuralode.stepping import Dynamics, checkpointed_scan, fixed_step_loop, per_interval


class AdaptiveOptions(NamedTuple):
    """What a diffrax-stepped solve needs besides the problem: the solver (ours or diffrax's), the
    step-size controller (None: built from rtol, atol and `controlled`), and diffrax's options."""

    solver: object
    controller: object
    controlled: Callable | None
    max_steps: int
    substeps: int = 1
    dense: bool = False
    event: object = None

    def forward_controller(self, ts, rtol, atol):
        if self.controller is not None:
            return self.controller
        return adaptive.default_controller(self.solver, ts, self.substeps, rtol, atol,
                                           self.controlled)


def _tree_zeros_like(tree):
    return jax.tree.map(jnp.zeros_like, tree)


def _tree_add(a, b):
    return jax.tree.map(jnp.add, a, b)


class AbstractAdjoint(abc.ABC):
    """How `odeint` differentiates a solve."""

    def __eq__(self, other):
        return type(self) is type(other) and vars(self) == vars(other)

    def __hash__(self):
        return hash((type(self), tuple(sorted(vars(self).items()))))

    def __repr__(self):
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({fields})"

    def check(self, solver, *, dense: bool, event) -> None:
        """Raise ValueError if this adjoint cannot differentiate a solve with these options."""

    @abc.abstractmethod
    def integrate(self, dynamics: Dynamics, solver, y0, ts, args, substeps: int,
                  every_step: bool = False):
        """The states at `ts` of a fixed-step solve (and with `every_step` the states of every
        step, as `fixed_step_loop`), differentiable by this adjoint's method."""

    @abc.abstractmethod
    def solve_adaptive(self, dynamics: Dynamics, y0, ts, args, tols, options: AdaptiveOptions):
        """A diffrax-stepped solve: `(ys, stats, result, interpolation, event_mask)` as
        `adaptive.diffrax_solve`, differentiable by this adjoint's method."""

    @abc.abstractmethod
    def backward_evaluations(self, forward_evaluations: int) -> int:
        """Vector-field evaluations (calls or vector-Jacobian products) of the backward pass of a
        fixed-step solve that made `forward_evaluations` in its forward pass."""


def _through_diffrax(diffrax_adjoint, dynamics, y0, ts, args, tols, options):
    return adaptive.diffrax_solve(
        dynamics, options.solver, y0, ts, args, controller=options.forward_controller(ts, *tols),
        adjoint=diffrax_adjoint, max_steps=options.max_steps, dense=options.dense,
        event=options.event)


class DiscreteAdjoint(AbstractAdjoint):
    """Backpropagation through the steps (the discrete adjoint): exact, memory O(steps). Forward
    mode (`jax.jvp`, `jax.jacfwd`) works through fixed steps; for adaptive ones pass
    `adjoint=diffrax.ForwardMode()`."""

    def integrate(self, dynamics, solver, y0, ts, args, substeps, every_step=False):
        return fixed_step_loop(dynamics, solver, y0, ts, args, substeps, every_step=every_step)

    def solve_adaptive(self, dynamics, y0, ts, args, tols, options):
        return _through_diffrax(diffrax.RecursiveCheckpointAdjoint(), dynamics, y0, ts, args,
                                tols, options)

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

    def integrate(self, dynamics, solver, y0, ts, args, substeps, every_step=False):
        def scan(body, carry, xs):
            return checkpointed_scan(body, carry, xs, self.segments)

        return fixed_step_loop(dynamics, solver, y0, ts, args, substeps, scan, every_step)

    def solve_adaptive(self, dynamics, y0, ts, args, tols, options):
        return _through_diffrax(diffrax.RecursiveCheckpointAdjoint(checkpoints=self.segments),
                                dynamics, y0, ts, args, tols, options)

    def backward_evaluations(self, forward_evaluations):
        return 2 * forward_evaluations  # recomputation plus one vector-Jacobian product per stage


@jax.tree_util.register_pytree_node_class
class DiffraxAdjoint(AbstractAdjoint):
    """Any `diffrax.AbstractAdjoint`, passed through to a diffrax-stepped solve (`solve` wraps it).
    A pytree, so that jit sees the diffrax adjoint's own parts (arrays, options)."""

    def __init__(self, adjoint: diffrax.AbstractAdjoint):
        self.adjoint = adjoint

    def tree_flatten(self):
        return (self.adjoint,), None

    @classmethod
    def tree_unflatten(cls, _, children):
        return cls(*children)

    def check(self, solver, *, dense, event):
        if not adaptive.is_diffrax_stepped(solver):
            raise ValueError(f"adjoint={self.adjoint!r} applies to diffrax-stepped solves; with "
                             f"solver={solver!r} use DiscreteAdjoint() (forward mode works through "
                             "it), CheckpointAdjoint() or BacksolveAdjoint()")

    def integrate(self, dynamics, solver, y0, ts, args, substeps, every_step=False):
        raise AssertionError("checked: a diffrax adjoint needs a diffrax-stepped solve")

    def solve_adaptive(self, dynamics, y0, ts, args, tols, options):
        return _through_diffrax(self.adjoint, dynamics, y0, ts, args, tols, options)

    def backward_evaluations(self, forward_evaluations):
        return -1


class ReconstructionWarning(UserWarning):
    """`BacksolveAdjoint`'s backwards solve did not reconstruct the forward states."""


class BacksolveAdjoint(AbstractAdjoint):
    """The continuous adjoint (Chen et al. 2018), solved backwards with the forward solver.

    At every time of `ts` (last to first) the incoming cotangent of that output is added to the
    adjoint state a, and the state y restarts from the stored forward output, so the backwards
    solve of y only has to be stable over one interval. Where it is not, the gradient is wrong: at
    the start of each interval the reconstructed y~ is compared with the forward state y, and a
    relative mismatch max|y~ - y| / max|y| above `tolerance` is reported by `on_mismatch`:
    "warn" (a `ReconstructionWarning`), "raise" (an error, also under `jit`) or "ignore".

    The gradient with respect to `ts` is the continuous one: dL/dt_i = c_i . f(t_i, y_i) for the
    output cotangents c_i (i >= 1: the jump of a at t_i) and dL/dt_0 = -a(t_0) . f(t_0, y_0)
    (N + 1 extra evaluations, made only when `ts` is differentiated; not available for a
    depth-varying field). Not available with `Leapfrog`, dense output or events.
    """

    def __init__(self, on_mismatch: str = "warn", tolerance: float = 1e-2):
        if on_mismatch not in ("warn", "raise", "ignore"):
            raise ValueError(f"on_mismatch must be 'warn', 'raise' or 'ignore', got "
                             f"{on_mismatch!r}")
        if not (isinstance(tolerance, (int, float)) and tolerance > 0):
            raise ValueError(f"tolerance must be a number > 0, got {tolerance!r}")
        self.on_mismatch, self.tolerance = on_mismatch, float(tolerance)

    def check(self, solver, *, dense, event):
        refusal = getattr(solver, "backsolve_refusal", None)
        if refusal:
            raise ValueError(f"adjoint=BacksolveAdjoint() does not support solver={solver!r}: "
                             f"{refusal}")
        if adaptive.is_diffrax_stepped(solver) and not isinstance(
                adaptive.diffrax_solver(solver), diffrax.AbstractAdaptiveSolver):
            raise ValueError(f"adjoint=BacksolveAdjoint() needs an adaptive diffrax solver, got "
                             f"{solver!r}; use neuralode's fixed-step solvers or "
                             "diffrax.BacksolveAdjoint()")
        if dense:
            raise ValueError("dense=True is not available with adjoint=BacksolveAdjoint(): the "
                             "dense output would not be differentiated; use DiscreteAdjoint()")
        if event is not None:
            raise ValueError("event is not available with adjoint=BacksolveAdjoint(); use "
                             "DiscreteAdjoint()")

    def integrate(self, dynamics, solver, y0, ts, args, substeps, every_step=False):
        return _continuous_adjoint(self, _FixedStepper(solver, substeps), dynamics, y0, ts, args,
                                   None)[0]

    def solve_adaptive(self, dynamics, y0, ts, args, tols, options):
        if options.controller is not None and not isinstance(
                options.controller, diffrax.AbstractAdaptiveStepSizeController):
            raise ValueError(f"adjoint=BacksolveAdjoint() solves backwards with the forward "
                             f"step-size controller, which must be adaptive; got "
                             f"{options.controller!r}")
        ys, aux = _continuous_adjoint(self, _AdaptiveStepper(options), dynamics, y0, ts, args,
                                      tols)
        stats, result = lax.stop_gradient(aux)  # integer statistics: no tangents
        return ys, stats, result, None, None

    def backward_evaluations(self, forward_evaluations):
        return forward_evaluations  # evaluations of the augmented field (f and a vjp each)

    def report(self, mismatch, a):
        """Apply `on_mismatch` to the largest relative mismatch; returns `a` (the check rides on it)."""
        if self.on_mismatch == "raise":
            return eqx.error_if(a, mismatch > self.tolerance, _mismatch_message(self.tolerance))
        if self.on_mismatch == "warn":
            jax.debug.callback(functools.partial(_warn_mismatch, self.tolerance), mismatch)
        return a


def _mismatch_message(tolerance) -> str:
    return (f"BacksolveAdjoint: the backwards solve did not reconstruct the forward states "
            f"(relative mismatch above tolerance={tolerance:g}), so the continuous adjoint is "
            "linearised around the wrong trajectory and its gradient is unreliable. Use "
            "adjoint=DiscreteAdjoint() or CheckpointAdjoint() (the exact gradient of the solve)")


def _warn_mismatch(tolerance, mismatch):
    worst = float(np.max(mismatch))
    if not worst <= tolerance:
        warnings.warn(f"{_mismatch_message(tolerance)}; mismatch = {worst:.3g}",
                      ReconstructionWarning, stacklevel=2)


def relative_mismatch(y_reconstructed, y) -> jax.Array:
    """max |y~ - y| / max |y| over all leaves."""
    diff = jnp.max(jnp.stack([jnp.max(jnp.abs(a - b)) for a, b in
                              zip(jax.tree.leaves(y_reconstructed), jax.tree.leaves(y))]))
    scale = jnp.max(jnp.stack([jnp.max(jnp.abs(b)) for b in jax.tree.leaves(y)]))
    return diff / jnp.maximum(scale, jnp.finfo(scale.dtype).tiny)


class _FixedStepper(NamedTuple):
    """The continuous adjoint's integrations with a fixed-step solver."""

    solver: object
    substeps: int

    def forward(self, dynamics, y0, ts, args, tols):
        return fixed_step_loop(dynamics, self.solver, y0, ts, args, self.substeps), None

    def layers(self, stacked, intervals):
        return per_interval(stacked, intervals, self.substeps)

    def back(self, augmented, state, t_end, t_start, layers, tols):
        """Integrate `augmented(t, (y, a, a_theta, a_layer), layer)` from t_end back to t_start in
        `substeps` steps, with each step's layer; returns the state and each layer's cotangent."""
        h = (t_end - t_start) / self.substeps

        def back_step(carry, layer):
            # j counts down the substeps: this step goes back from t_start + j h. Carrying j instead
            # of scanning an array of times keeps the backward memory independent of the steps.
            y, a, grad_theta, j = carry
            start = (y, a, _tree_zeros_like(grad_theta), _tree_zeros_like(layer))
            y, a, d_theta, d_layer = self.solver.step(lambda t, s, _: augmented(t, s, layer),
                                                      t_start + j * h, start, -h, None)
            return (y, a, _tree_add(grad_theta, d_theta), j - 1), d_layer

        (y, a, grad_theta, _), d_layers = lax.scan(
            back_step, state + (jnp.asarray(self.substeps, h.dtype),), layers,
            length=self.substeps, reverse=True)
        return (y, a, grad_theta), d_layers


class _AdaptiveStepper(NamedTuple):
    """The continuous adjoint's integrations with diffrax's adaptive stepping, one diffrax solve
    per interval of `ts` backwards (each starting afresh at the stored forward state)."""

    options: AdaptiveOptions

    def forward(self, dynamics, y0, ts, args, tols):
        ys, stats, result, _, _ = adaptive.diffrax_solve(
            dynamics, self.options.solver, y0, ts, args,
            controller=self.options.forward_controller(ts, *tols),
            adjoint=diffrax.RecursiveCheckpointAdjoint(), max_steps=self.options.max_steps)
        return ys, (stats, result)

    def layers(self, stacked, intervals):
        return None

    def back(self, augmented, state, t_end, t_start, layers, tols):
        controller = self.options.controller or adaptive.backward_controller(
            *tols, self.options.controlled)
        state = adaptive.solve_interval(lambda t, s, _: augmented(t, s, None)[:3],
                                        self.options.solver, state, t_end, t_start,
                                        controller=controller, max_steps=self.options.max_steps)
        return state, None


def _continuous_adjoint(adjoint: BacksolveAdjoint, stepper, dynamics: Dynamics, y0, ts, args,
                        tols):
    layer0 = jax.tree.map(lambda x: x[0], dynamics.stacked)
    # Closed-over tracers of the field become explicit inputs, so gradients reach them too.
    func, consts = jax.closure_convert(dynamics.func, ts[0], y0, args, dynamics.tied, layer0)
    return _backsolve_function(func, stepper, adjoint)(y0, ts, args, dynamics.tied,
                                                       dynamics.stacked, consts, tols)


def _backsolve_function(func, stepper, adjoint: BacksolveAdjoint):
    """The solve as a `jax.custom_vjp` whose backward pass integrates the adjoint system."""

    def closed(tied, stacked, consts):
        return Dynamics(lambda t, y, args, tied, layer: func(t, y, args, tied, layer, *consts),
                        tied, stacked)

    def forward(y0, ts, args, tied, stacked, consts, tols):
        return stepper.forward(closed(tied, stacked, consts), y0, ts, args, tols)

    def forward_with_residuals(*primals):
        is_primal = lambda x: isinstance(x, CustomVJPPrimal)  # noqa: E731
        y0, ts, args, tied, stacked, consts, tols = jax.tree.map(
            lambda p: p.value, primals, is_leaf=is_primal)
        ts_perturbed = any(p.perturbed for p in jax.tree.leaves(primals[1], is_leaf=is_primal))
        if ts_perturbed and stacked is not None:
            raise ValueError("adjoint=BacksolveAdjoint() does not differentiate ts for a "
                             "depth-varying field (DepthStack); use DiscreteAdjoint()")
        out = forward(y0, ts, args, tied, stacked, consts, tols)
        marker = jnp.zeros(0) if ts_perturbed else None  # whether dL/dts is wanted (static)
        return out, (out[0], ts, args, tied, stacked, consts, tols, marker)

    def backward(residuals, cotangents):
        ys, ts, args, tied, stacked, consts, tols, marker = residuals
        ys_ct = jax.tree.map(lambda c, y: jnp.zeros_like(y) if isinstance(c, SymbolicZero) else c,
                             cotangents[0], ys, is_leaf=lambda c: isinstance(c, SymbolicZero))
        theta, static = eqx.partition((args, tied, consts), eqx.is_inexact_array)

        def augmented(t, state, layer):
            # d/dt (y, a, a_theta, a_layer) = (f, -a^T df/dy, -a^T df/dtheta, -a^T df/dlayer)
            y, a = state[0], state[1]

            def f(y, theta, layer):
                args, tied, consts = eqx.combine(theta, static)
                return func(t, y, args, tied, layer, *consts)

            f_y, vjp = jax.vjp(f, y, theta, layer)
            return (f_y,) + tuple(jax.tree.map(jnp.negative, g) for g in vjp(a))

        def back_interval(carry, xs):
            a, grad_theta = carry
            y_end, y_start, c_end, t_start, t_end, layers = xs
            a = _tree_add(a, c_end)
            (y, a, grad_theta), d_layers = stepper.back(augmented, (y_end, a, grad_theta), t_end,
                                                        t_start, layers, tols)
            return (a, grad_theta), (d_layers, relative_mismatch(y, y_start))

        (a, grad_theta), (d_layers, mismatch) = lax.scan(
            back_interval, (jax.tree.map(lambda y: jnp.zeros_like(y[0]), ys),
                            _tree_zeros_like(theta)),
            (jax.tree.map(lambda y: y[1:], ys), jax.tree.map(lambda y: y[:-1], ys),
             jax.tree.map(lambda c: c[1:], ys_ct), ts[:-1], ts[1:],
             stepper.layers(stacked, ts.shape[0] - 1)), reverse=True)
        a = adjoint.report(jnp.max(mismatch), a)  # a = a(t_0), before the cotangent of ys[0]
        grad_args, grad_tied, grad_consts = grad_theta
        grad_stacked = jax.tree.map(lambda g: g.reshape((-1,) + g.shape[2:]), d_layers)
        grad_ts = None
        if marker is not None:
            values = jax.vmap(lambda t, y: func(t, y, args, tied, None, *consts))(ts, ys)
            dots = sum(jnp.real(jnp.sum(c * v, axis=tuple(range(1, c.ndim)))) for c, v in
                       zip(jax.tree.leaves(ys_ct), jax.tree.leaves(values)))
            start = sum(jnp.real(jnp.sum(x * v[0])) for x, v in
                        zip(jax.tree.leaves(a), jax.tree.leaves(values)))
            grad_ts = dots.at[0].set(-start).astype(ts.dtype)
        return (_tree_add(a, jax.tree.map(lambda c: c[0], ys_ct)), grad_ts, grad_args, grad_tied,
                grad_stacked, grad_consts, None)

    function = jax.custom_vjp(forward)
    function.defvjp(forward_with_residuals, backward, symbolic_zeros=True)
    return function


def reconstruction_error(dynamics: Dynamics, stepper, ys, ts, args, tols=None):
    """Per interval, max |y(ts[i]) - y~(ts[i])| where y~ integrates y(ts[i+1]) backwards with the
    same solver and steps: the error `BacksolveAdjoint` makes in the y it linearises around."""
    if isinstance(stepper, _AdaptiveStepper):
        controller = stepper.options.forward_controller(ts, *tols)

        def back_interval(y_end, t_end, t_start, _):
            return adaptive.solve_interval(lambda t, y, _: dynamics.func(t, y, args, dynamics.tied,
                                                                         None),
                                           stepper.options.solver, y_end, t_end, t_start,
                                           controller=controller,
                                           max_steps=stepper.options.max_steps)
    else:
        # Each interval runs the ordinary loop on the reversed grid [ts[i+1], ts[i]] (negative
        # steps), with its depth-varying layers in reverse order.
        def back_interval(y_end, t_end, t_start, interval_layers):
            back = Dynamics(dynamics.func, dynamics.tied, interval_layers)
            y = fixed_step_loop(back, stepper.solver, y_end, jnp.stack([t_end, t_start]), args,
                                stepper.substeps)
            return jax.tree.map(lambda leaf: leaf[-1], y)

    layers = jax.tree.map(lambda x: x[:, ::-1], stepper.layers(dynamics.stacked, ts.shape[0] - 1))
    starts = jax.vmap(back_interval)(jax.tree.map(lambda y: y[1:], ys), ts[1:], ts[:-1], layers)
    errors = [jnp.max(jnp.abs(a - b), axis=tuple(range(1, a.ndim))) for a, b in
              zip(jax.tree.leaves(starts), jax.tree.leaves(jax.tree.map(lambda y: y[:-1], ys)))]
    return jnp.max(jnp.stack(errors), axis=0)
