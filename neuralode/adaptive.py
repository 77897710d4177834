"""Solves stepped by diffrax: our adaptive solvers (Dopri5, Tsit5) and any `diffrax` solver, step-size
controller, adjoint and `Event`, passed through to `diffrax.diffeqsolve`.

Two things are added on the way: a count of the vector-field evaluations (`CountingController`,
which wraps the adaptive step-size controller and sees every attempted step) and a status that
tells a vector field returning nan/inf apart from a solve that merely ran out of steps (`RESULTS`).
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import diffrax
import jax
import jax.numpy as jnp

from neuralode.solvers import AbstractAdaptiveSolver, AbstractSolver
from neuralode.stepping import Dynamics, step_times


class RESULTS(diffrax.RESULTS):
    """diffrax's statuses, plus one for a vector field that returns non-finite values and one per
    value rule of `solve`'s traced arguments (reported, not raised, with `throw=False`)."""

    nonfinite_field = ("the vector field f returned non-finite values (nan or inf): the solve "
                       "stopped at max_steps with most of its rejected steps non-finite, so f is "
                       "not finite near the solution, or the solution blows up. Check f (and its "
                       "parameters) for nan/inf")
    invalid_ts = "ts must be finite and strictly monotone (increasing, or decreasing to integrate backwards)"
    nonfinite_y0 = "y0 contains non-finite values (nan or inf)"
    invalid_rtol = "rtol must be > 0 (and finite)"
    invalid_atol = "atol must be >= 0 (and finite)"


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
        return default_controller(self.solver, ts, self.substeps, rtol, atol,
                                           self.controlled)


def diffrax_solver(solver) -> diffrax.AbstractSolver:
    """The diffrax solver behind `solver` (ours or one of diffrax's, passed through)."""
    if isinstance(solver, AbstractAdaptiveSolver):
        return solver.diffrax_solver()
    return solver


def is_diffrax_stepped(solver) -> bool:
    return isinstance(solver, (AbstractAdaptiveSolver, diffrax.AbstractSolver))


def default_controller(solver, ts, substeps: int, rtol, atol, controlled: Callable | None):
    """`PIDController(rtol, atol)` for a solver with an error estimate (its norm restricted to the
    `controlled` parts of the state), else `StepTo` the grid of `substeps` equal steps per interval."""
    if not isinstance(diffrax_solver(solver), diffrax.AbstractAdaptiveSolver):
        return diffrax.StepTo(ts=step_times(ts, substeps))
    default = diffrax.PIDController(rtol=rtol, atol=atol)
    if controlled is None:
        return default
    return diffrax.PIDController(rtol=rtol, atol=atol,
                                 norm=lambda e, norm=default.norm: norm(controlled(e)))


def backward_controller(rtol, atol, controlled: Callable | None):
    """The controller of a continuous adjoint's backwards solve of (y, a, a_theta): diffrax's
    default norm over all of it, or over the `controlled` parts of y and a and all of a_theta."""
    default = diffrax.PIDController(rtol=rtol, atol=atol)
    if controlled is None:
        return default
    return diffrax.PIDController(
        rtol=rtol, atol=atol,
        norm=lambda e, norm=default.norm: norm((controlled(e[0]), controlled(e[1]), e[2])))


class CountingController(diffrax.AbstractAdaptiveStepSizeController):
    """An adaptive step-size controller, unchanged, that also counts the steps on which an explicit
    Runge-Kutta solver evaluates its first stage, and the attempted steps that were not finite.

    A first-same-as-last pair (Dopri5, Tsit5) reuses the last stage of an accepted step as the first
    of the next; it evaluates the first stage afresh on the first attempt and on every retry until
    a step is accepted (diffrax keeps the solver state of the last accepted step), and after a jump.
    So a solve of n attempted steps makes (stages - 1) n + (those first-stage evaluations) calls.
    """

    controller: diffrax.AbstractAdaptiveStepSizeController

    @property
    def rtol(self):
        return self.controller.rtol

    @property
    def atol(self):
        return self.controller.atol

    @property
    def norm(self):
        return self.controller.norm

    def wrap(self, direction):
        return CountingController(self.controller.wrap(direction))

    def init(self, terms, t0, t1, y0, dt0, args, func, error_order):
        t1, state = self.controller.init(terms, t0, t1, y0, dt0, args, func, error_order)
        zero = jnp.asarray(0, jnp.int32)
        return t1, (state, zero, jnp.asarray(True), zero)

    def adapt_step_size(self, t0, t1, y0, y1_candidate, args, y_error, error_order,
                        controller_state):
        state, first_stages, pending, nonfinite = controller_state
        keep, next_t0, next_t1, made_jump, state, result = self.controller.adapt_step_size(
            t0, t1, y0, y1_candidate, args, y_error, error_order, state)
        first_stages = first_stages + pending.astype(jnp.int32)
        pending = jnp.where(keep, made_jump, pending)
        finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf))
                                    for leaf in jax.tree.leaves(y1_candidate)]))
        nonfinite = nonfinite + (~finite).astype(jnp.int32)
        return keep, next_t0, next_t1, made_jump, (state, first_stages, pending, nonfinite), result


def _stages(solver: diffrax.AbstractSolver) -> tuple[int, bool] | None:
    """(stages, first-same-as-last) of an explicit Runge-Kutta solver; None if not one."""
    if isinstance(solver, diffrax.Euler):
        return 1, False
    if isinstance(solver, diffrax.AbstractERK):
        return len(solver.tableau.c) + 1, bool(solver.tableau.fsal)
    return None


def diffrax_solve(dynamics: Dynamics, solver, y0, ts, args, *, controller, adjoint, max_steps: int,
                  dense: bool = False, event=None):
    """`diffrax.diffeqsolve` from ts[0] to ts[-1], saving at `ts`; the field's parameters travel in
    diffrax's `args`, so every diffrax adjoint differentiates them. Never raises on failure:
    returns `(ys, stats, result, interpolation, event_mask)`, with `stats["nfe"]` the
    vector-field evaluations (-1 for a solver other than an explicit Runge-Kutta method)."""
    solver = diffrax_solver(solver)

    def vector_field(t, y, args_and_tied):
        return dynamics.func(t, y, args_and_tied[0], args_and_tied[1], None)

    counting = isinstance(controller, diffrax.AbstractAdaptiveStepSizeController)
    if counting:
        controller = CountingController(controller)
    # Two times are saved as t0 and t1: SaveAt(ts=...) checks its traced ts with a host callback
    # (equinox's error_if), which would keep the program out of JAX's compilation cache.
    where = dict(t0=True, t1=True) if ts.shape[0] == 2 and event is None else dict(ts=ts)
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(vector_field), solver, t0=ts[0], t1=ts[-1], dt0=None, y0=y0,
        args=(args, dynamics.tied), saveat=diffrax.SaveAt(**where, dense=dense,
                                                          controller_state=counting),
        stepsize_controller=controller, adjoint=adjoint, max_steps=max_steps, event=event,
        throw=False)
    steps = sol.stats["num_steps"]
    stages = _stages(solver)
    nonfinite = jnp.asarray(False)  # most rejected steps not finite
    if stages is None:
        nfe = jnp.asarray(-1, jnp.int32)
    elif stages[1]:
        first_stages = sol.controller_state[1] if counting else 1
        nfe = (stages[0] - 1) * steps + first_stages
    else:
        nfe = stages[0] * steps
    if counting:
        nonfinite = 2 * sol.controller_state[3] > sol.stats["num_rejected_steps"]
    result = RESULTS.where(nonfinite & (sol.result == diffrax.RESULTS.max_steps_reached),
                           RESULTS.nonfinite_field, RESULTS.promote(sol.result))
    stats = {"num_steps": steps, "num_accepted_steps": sol.stats["num_accepted_steps"],
             "num_rejected_steps": sol.stats["num_rejected_steps"], "nfe": nfe}
    stats = {k: jnp.asarray(v, jnp.int32) for k, v in stats.items()}
    return sol.ys, stats, result, sol.interpolation, sol.event_mask


def solve_interval(vector_field: Callable, solver, state, t_start, t_end, *, controller,
                   max_steps: int, throw: bool = True):
    """The state at `t_end` of dy/dt = vector_field(t, y, None) from `state` at `t_start` (either
    direction), and whether the solve failed: it raises instead (diffrax's message) with `throw`."""
    sol = diffrax.diffeqsolve(diffrax.ODETerm(vector_field), diffrax_solver(solver), t0=t_start,
                              t1=t_end, dt0=None, y0=state, saveat=diffrax.SaveAt(t1=True),
                              stepsize_controller=controller, max_steps=max_steps, throw=throw)
    return jax.tree.map(lambda x: x[0], sol.ys), sol.result != diffrax.RESULTS.successful


def check_solver(solver) -> None:
    """Raise TypeError unless `solver` is one of ours or any diffrax solver."""
    if not isinstance(solver, (AbstractSolver, diffrax.AbstractSolver)):
        raise TypeError(f"solver must be a neuralode solver such as RK4() or Dopri5(), or a "
                        f"diffrax solver such as diffrax.Kvaerno5(), got {solver!r}")

