"""The continuous adjoint, solved backwards (`BacksolveAdjoint`), for fixed and adaptive steps.

One `jax.custom_vjp`: the forward pass is the ordinary solve; the backward pass integrates

    d/dt [y, a, a_theta] = [f, -a^T df/dy, -a^T df/dtheta]

from each time of `ts` back to the previous one, adding the incoming cotangent of each output to
a and restarting y from the stored forward state (Chen et al. 2018). A stepper says how an
interval is crossed: `FixedStepper` with the solver's steps (negative), `AdaptiveStepper` with one
diffrax solve per interval. At the start of every interval the reconstructed y is compared with
the forward state, and the gradient with respect to `ts` follows from a and f at the outputs.

The backward pass's failures (a backwards solve out of steps) and mismatches raise or warn from
inside the program, by host callbacks, unless a backward report is being collected
(`reporting_backward(probe)` while the gradient is traced, as `neuralode.train_step` does): then
they go into the cotangent of `probe`, the program holds no callback (so JAX's compilation cache
keeps it), and the caller checks the report on the host.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Callable, NamedTuple

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.custom_derivatives import CustomVJPPrimal, SymbolicZero

from neuralode import adaptive
from neuralode.adaptive import AdaptiveOptions
from neuralode.stepping import Dynamics, fixed_step_loop, per_interval


# The entries of a backward report, each summed over the solves that report into one probe.
REPORT_FIELDS = (
    "failed_backward_solves",   # backwards solves that failed (max_steps reached, non-finite)
    "reconstruction_errors",    # solves whose mismatch is above tolerance, on_mismatch="raise"
    "reconstruction_warnings",  # ... on_mismatch="warn"
    "reconstruction_mismatch",  # each solve's largest relative mismatch max|y~ - y| / max|y|
)
_REPORTING: contextvars.ContextVar = contextvars.ContextVar("backward_report", default=None)


@contextlib.contextmanager
def reporting_backward(probe: jax.Array):
    """While a gradient is traced inside this context, every `BacksolveAdjoint` solve reports its
    backward pass into the cotangent of `probe` (zeros of shape `(len(REPORT_FIELDS),)`, an input
    of the differentiated function), summed over the solves, instead of raising or warning from
    inside the program; a failed backwards solve also makes its gradients nan. Yields a list that
    is not empty once a solve reports there."""
    users: list = []
    token = _REPORTING.set((probe, users))
    try:
        yield users
    finally:
        _REPORTING.reset(token)


def reporting() -> bool:
    """Whether a backward report is being collected (`reporting_backward`)."""
    return _REPORTING.get() is not None


def _tree_zeros_like(tree):
    return jax.tree.map(jnp.zeros_like, tree)


def _tree_add(a, b):
    return jax.tree.map(jnp.add, a, b)


def relative_mismatch(y_reconstructed, y) -> jax.Array:
    """max |y~ - y| / max |y| over all leaves."""
    diff = jnp.max(jnp.stack([jnp.max(jnp.abs(a - b)) for a, b in
                              zip(jax.tree.leaves(y_reconstructed), jax.tree.leaves(y))]))
    scale = jnp.max(jnp.stack([jnp.max(jnp.abs(b)) for b in jax.tree.leaves(y)]))
    return diff / jnp.maximum(scale, jnp.finfo(scale.dtype).tiny)


class FixedStepper(NamedTuple):
    """The continuous adjoint's integrations with a fixed-step solver."""

    solver: object
    substeps: int

    def forward(self, dynamics, y0, ts, args, tols):
        return fixed_step_loop(dynamics, self.solver, y0, ts, args, self.substeps), None

    def layers(self, stacked, intervals):
        return per_interval(stacked, intervals, self.substeps)

    def back(self, augmented, state, t_end, t_start, layers, tols, throw):
        """Integrate `augmented(t, (y, a, a_theta, a_layer), layer)` from t_end back to t_start in
        `substeps` steps, with each step's layer; returns the state, each layer's cotangent and
        whether it failed (never: the steps are fixed)."""
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
        return (y, a, grad_theta), d_layers, jnp.asarray(False)


class AdaptiveStepper(NamedTuple):
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

    def back(self, augmented, state, t_end, t_start, layers, tols, throw):
        controller = self.options.controller or adaptive.backward_controller(
            *tols, self.options.controlled)
        state, failed = adaptive.solve_interval(
            lambda t, s, _: augmented(t, s, None)[:3], self.options.solver, state, t_end,
            t_start, controller=controller, max_steps=self.options.max_steps, throw=throw)
        return state, None, failed


def continuous_adjoint(checks, stepper, dynamics: Dynamics, y0, ts, args, tols):
    """The solve of `dynamics` by `stepper` (`(ys, aux)`), differentiated by the continuous adjoint.
    `checks` acts on the backward pass's largest relative reconstruction mismatch: inside the
    program `checks.report(mismatch, a)` (returns a), or into a backward report (see
    `reporting_backward`) `checks.reported(mismatch, failed)`, an array of `REPORT_FIELDS`."""
    layer0 = jax.tree.map(lambda x: x[0], dynamics.stacked)
    # Python ints, bools and other non-floats in args stay static (a loop count, a flag); the
    # rest is traced. Closed-over tracers of the field become explicit inputs, so gradients
    # reach them too.
    args, static = eqx.partition(args, lambda x: eqx.is_array(x) or is_inexact_scalar(x))
    field = lambda t, y, args, tied, layer: dynamics.func(  # noqa: E731
        t, y, eqx.combine(args, static), tied, layer)
    func, consts = jax.closure_convert(field, ts[0], y0, args, dynamics.tied, layer0)
    probe, users = _REPORTING.get() or (None, [])
    users.append(checks)
    return _backsolve_function(func, stepper, checks)(y0, ts, args, dynamics.tied,
                                                      dynamics.stacked, consts, tols, probe)


def is_inexact_scalar(x) -> bool:
    """A Python or NumPy float or complex scalar: a value that JAX differentiates, not an array."""
    return isinstance(x, (float, complex, np.inexact))


def is_differentiable(x) -> bool:
    """An inexact array or scalar: under an eager `jax.grad` a float argument reaches a custom
    derivative rule as the float itself, not as an array."""
    return eqx.is_inexact_array(x) or is_inexact_scalar(x)


def _backsolve_function(func, stepper, checks):
    """The solve as a `jax.custom_vjp` whose backward pass integrates the adjoint system."""

    def closed(tied, stacked, consts):
        return Dynamics(lambda t, y, args, tied, layer: func(t, y, args, tied, layer, *consts),
                        tied, stacked)

    def forward(y0, ts, args, tied, stacked, consts, tols, probe):
        return stepper.forward(closed(tied, stacked, consts), y0, ts, args, tols)

    def forward_with_residuals(*primals):
        is_primal = lambda x: isinstance(x, CustomVJPPrimal)  # noqa: E731
        y0, ts, args, tied, stacked, consts, tols, probe = jax.tree.map(
            lambda p: p.value, primals, is_leaf=is_primal)
        ts_perturbed = any(p.perturbed for p in jax.tree.leaves(primals[1], is_leaf=is_primal))
        reported = any(p.perturbed for p in jax.tree.leaves(primals[7], is_leaf=is_primal))
        if ts_perturbed and stacked is not None:
            raise ValueError("adjoint=BacksolveAdjoint() does not differentiate ts for a "
                             "depth-varying field (DepthStack); use DiscreteAdjoint()")
        out = forward(y0, ts, args, tied, stacked, consts, tols, probe)
        # Static flags, as an array or None: whether dL/dts is wanted, whether to report.
        marker = jnp.zeros(0) if ts_perturbed else None
        report_to = jnp.zeros(0, probe.dtype) if reported else None
        return out, (out[0], ts, args, tied, stacked, consts, tols, marker, report_to)

    def backward(residuals, cotangents):
        ys, ts, args, tied, stacked, consts, tols, marker, report_to = residuals
        ys_ct = jax.tree.map(lambda c, y: jnp.zeros_like(y) if isinstance(c, SymbolicZero) else c,
                             cotangents[0], ys, is_leaf=lambda c: isinstance(c, SymbolicZero))
        theta, static = eqx.partition((args, tied, consts), is_differentiable)

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
            (y, a, grad_theta), d_layers, failed = stepper.back(
                augmented, (y_end, a, grad_theta), t_end, t_start, layers, tols,
                throw=report_to is None)
            return (a, grad_theta), (d_layers, relative_mismatch(y, y_start), failed)

        (a, grad_theta), (d_layers, mismatch, failed) = lax.scan(
            back_interval, (jax.tree.map(lambda y: jnp.zeros_like(y[0]), ys),
                            _tree_zeros_like(theta)),
            (jax.tree.map(lambda y: y[1:], ys), jax.tree.map(lambda y: y[:-1], ys),
             jax.tree.map(lambda c: c[1:], ys_ct), ts[:-1], ts[1:],
             stepper.layers(stacked, ts.shape[0] - 1)), reverse=True)
        probe_cotangent = None
        if report_to is None:
            a = checks.report(jnp.max(mismatch), a)  # a = a(t_0), before the cotangent of ys[0]
        else:  # reported; a failed backwards solve leaves no number to trust
            failed = jnp.any(failed)
            probe_cotangent = checks.reported(jnp.max(mismatch), failed).astype(report_to.dtype)
            a, grad_theta, d_layers = jax.tree.map(
                lambda g: jnp.where(failed, jnp.nan, g), (a, grad_theta, d_layers))
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
                grad_stacked, grad_consts, None, probe_cotangent)

    function = jax.custom_vjp(forward)
    function.defvjp(forward_with_residuals, backward, symbolic_zeros=True)
    return function


def reconstruction_error(dynamics: Dynamics, stepper, ys, ts, args, tols=None):
    """Per interval, max |y(ts[i]) - y~(ts[i])| where y~ integrates y(ts[i+1]) backwards with the
    same solver and steps: the error `BacksolveAdjoint` makes in the y it linearises around."""
    if isinstance(stepper, AdaptiveStepper):
        controller = stepper.options.forward_controller(ts, *tols)

        def back_interval(y_end, t_end, t_start, _):
            return adaptive.solve_interval(lambda t, y, _: dynamics.func(t, y, args, dynamics.tied,
                                                                         None),
                                           stepper.options.solver, y_end, t_end, t_start,
                                           controller=controller,
                                           max_steps=stepper.options.max_steps)[0]
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
