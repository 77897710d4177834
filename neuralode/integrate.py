"""`odeint` and `solve`: validation, dispatch to the fixed-step loops or to diffrax, statistics.

Errors come in three tiers (DESIGN.md): static misuse raises ValueError/TypeError at trace time
naming the argument; value checks under `jit` (non-finite y0, traced `ts` not increasing) use
`equinox.error_if`; solver failure (max_steps reached) is `Solution.max_steps_reached`, and raises
unless `solve(..., throw=False)`.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from neuralode.adjoints import AbstractAdjoint, DiscreteAdjoint, Dynamics, reconstruction_error
from neuralode.fields import DepthStack
from neuralode.solvers import RK4, AbstractAdaptiveSolver, AbstractSolver, Leapfrog


class Solution(NamedTuple):
    """What `solve` returns: the states `ys` at `ts` (leading axis len(ts)) and statistics.

    `stats` holds `num_steps`, `num_accepted_steps`, `num_rejected_steps`, `nfe` (vector-field
    evaluations of the forward solve) and `nfe_backward` (evaluations or vector-Jacobian products of
    the backward pass of a fixed-step solve; -1 where diffrax decides it adaptively).
    `max_steps_reached` is True when an adaptive solve stopped at `max_steps` (only seen with
    `throw=False`; otherwise that raises).
    """

    ts: jax.Array
    ys: Any
    stats: dict
    max_steps_reached: jax.Array


def _dynamics(f, args) -> Dynamics:
    """The field as `func(t, y, args, tied, layer)` with its parameters split out."""
    if isinstance(f, DepthStack):
        graphdef, stacked = nnx.split(f.layers)
        call = lambda t, y, args, tied, layer: nnx.merge(graphdef, layer)(t, y)  # noqa: E731
        return Dynamics(call, None, stacked)
    if isinstance(f, nnx.Module):
        graphdef, tied = nnx.split(f)
        call = lambda t, y, args, tied, layer: nnx.merge(graphdef, tied)(t, y)  # noqa: E731
        return Dynamics(call, tied, None)
    if callable(f):
        return Dynamics(lambda t, y, args, tied, layer: f(t, y, args), None, None)
    raise TypeError(f"f must be a function f(t, y, args) or an nnx.Module field(t, y), got {f!r}")


def _check_ts(ts) -> jax.Array:
    ts = jnp.asarray(ts)
    if ts.ndim != 1 or ts.shape[0] < 2:
        raise ValueError(f"ts must be a 1-D array of at least 2 times, got shape {ts.shape}")
    if not jnp.issubdtype(ts.dtype, jnp.floating):
        ts = ts.astype(jnp.result_type(float))
    if isinstance(ts, jax.core.Tracer):
        return eqx.error_if(ts, jnp.any(jnp.diff(ts) <= 0), "ts must be strictly increasing")
    steps = np.diff(np.asarray(ts))
    if not np.all(steps > 0):
        bad = int(np.argmax(steps <= 0))
        raise ValueError(f"ts must be strictly increasing, but ts[{bad + 1}] = {ts[bad + 1]} "
                         f"<= ts[{bad}] = {ts[bad]}")
    return ts


def _check_y0(y0, ts, solver):
    """y0 as arrays, after the static checks; returns (y0, ts) with the non-finite check attached."""
    leaves = jax.tree.leaves(y0)
    if not leaves:
        raise ValueError("y0 must contain at least one array")
    for leaf in leaves:
        if not jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):
            raise TypeError(f"y0 must hold floating-point arrays, got dtype {jnp.result_type(leaf)}")
    if isinstance(solver, Leapfrog) and not (isinstance(y0, (tuple, list)) and len(y0) == 2):
        raise TypeError("solver=Leapfrog() needs y0 given as a pair (q, p), got "
                        f"{jax.tree.structure(y0)}")
    y0 = jax.tree.map(jnp.asarray, y0)
    finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(y0)]))
    # The check rides on the small `ts`, which every solve uses: wrapping y0 itself put the error
    # primitive on the state's path through the forward and backward passes (5 % of a ResNet step).
    return y0, eqx.error_if(ts, ~finite, "y0 contains non-finite values (nan or inf)")


def _check_field_output(dynamics: Dynamics, ts, y0, args):
    layer = jax.tree.map(lambda x: x[0], dynamics.stacked)
    out = jax.eval_shape(dynamics.func, ts[0], y0, args, dynamics.tied, layer)
    expected = jax.tree.map(lambda y: jax.ShapeDtypeStruct(jnp.shape(y), jnp.result_type(y)), y0)
    if jax.tree.structure(out) != jax.tree.structure(expected):
        raise ValueError(f"f must return dy/dt with the structure of y0 {jax.tree.structure(y0)}, "
                         f"got {jax.tree.structure(out)}")
    for got, want in zip(jax.tree.leaves(out), jax.tree.leaves(expected)):
        if got.shape != want.shape or got.dtype != want.dtype:
            raise ValueError(f"f must return dy/dt with the shape and dtype of y0: expected "
                             f"{want.shape} {want.dtype}, got {got.shape} {got.dtype}")


def solve(f: Callable | nnx.Module, y0, ts, args=None, *, solver: AbstractSolver = RK4(),
          substeps: int = 1, adjoint: AbstractAdjoint = DiscreteAdjoint(), rtol: float = 1e-6,
          atol: float = 1e-8, max_steps: int = 4096, throw: bool = True,
          controlled: Callable | None = None) -> Solution:
    """Integrate dy/dt = f(t, y, args) from ts[0] and return a `Solution` with the states at `ts`.

    Arguments are those of `odeint`, plus `throw`: whether reaching `max_steps` raises (True) or is
    reported in `Solution.max_steps_reached` (False), and `controlled` (adaptive solvers only): a
    function of a state-shaped pytree returning the parts whose local error the step-size
    controller bounds (None: all of it). Leave out quadrature states, integrals carried along that
    the field never reads (RNODE's regularisers): their error does not feed back into the rest, so
    controlling it only buys smaller steps. With `BacksolveAdjoint` the backwards solve controls
    the same parts of the state and of its adjoint, and all parameter cotangents.
    """
    if not isinstance(solver, AbstractSolver):
        raise TypeError(f"solver must be a neuralode solver such as RK4() or Dopri5(), got "
                        f"{solver!r}")
    if not isinstance(adjoint, AbstractAdjoint):
        raise TypeError(f"adjoint must be DiscreteAdjoint(), CheckpointAdjoint() or "
                        f"BacksolveAdjoint(), got {adjoint!r}")
    if not isinstance(substeps, (int, np.integer)) or isinstance(substeps, bool) or substeps < 1:
        raise ValueError(f"substeps must be an int >= 1, got {substeps!r}")
    if not isinstance(max_steps, (int, np.integer)) or max_steps < 1:
        raise ValueError(f"max_steps must be an int >= 1, got {max_steps!r}")
    if isinstance(f, nnx.Module) and args is not None:
        raise ValueError("args must be None when f is an nnx.Module: a field is called as "
                         "field(t, y) and carries its own parameters")
    adjoint.check_solver(solver)
    ts = _check_ts(ts)
    y0, ts = _check_y0(y0, ts, solver)
    dynamics = _dynamics(f, args)
    intervals = ts.shape[0] - 1

    if controlled is not None and not callable(controlled):
        raise TypeError(f"controlled must be a function of the state or None, got {controlled!r}")
    if solver.adaptive:
        if substeps != 1:
            raise ValueError(f"substeps applies to fixed-step solvers; {solver!r} chooses its own "
                             f"steps, got substeps={substeps}")
        if dynamics.stacked is not None:
            raise ValueError("f is a DepthStack (one field per step), which needs a fixed-step "
                             f"solver; got solver={solver!r}")
        _check_field_output(dynamics, ts, y0, args)
        return _solve_adaptive(dynamics, solver, y0, ts, args, adjoint, rtol, atol, max_steps,
                               throw, controlled)
    if controlled is not None:
        raise ValueError(f"controlled applies to adaptive solvers; {solver!r} takes fixed steps")

    steps = intervals * int(substeps)
    if isinstance(f, DepthStack) and f.depth != steps:
        raise ValueError(f"f is a DepthStack of depth {f.depth}, but the solve takes "
                         f"(len(ts) - 1) * substeps = {intervals} * {substeps} = {steps} steps")
    if steps > max_steps:
        raise ValueError(f"the solve takes (len(ts) - 1) * substeps = {steps} steps, more than "
                         f"max_steps={max_steps}")
    _check_field_output(dynamics, ts, y0, args)
    ys = adjoint.integrate(dynamics, solver, y0, ts, args, int(substeps))
    nfe = steps * solver.evaluations_per_step
    stats = {"num_steps": steps, "num_accepted_steps": steps, "num_rejected_steps": 0, "nfe": nfe,
             "nfe_backward": adjoint.backward_evaluations(nfe)}
    return Solution(ts, ys, stats, jnp.asarray(False))


def _controllers(rtol, atol, controlled):
    """The forward PID controller and the backwards one of BacksolveAdjoint (None: the forward
    one), both with diffrax's default (RMS) norm restricted to the `controlled` parts of the state."""
    default = diffrax.PIDController(rtol=rtol, atol=atol)
    if controlled is None:
        return default, None
    norm = default.norm
    forward = diffrax.PIDController(rtol=rtol, atol=atol, norm=lambda e: norm(controlled(e)))
    # The backwards state is (y, a_y, a_args, a_terms) (diffrax.BacksolveAdjoint).
    backward = diffrax.PIDController(
        rtol=rtol, atol=atol, norm=lambda e: norm((controlled(e[0]), controlled(e[1]), e[2], e[3])))
    return forward, backward


def _solve_adaptive(dynamics, solver: AbstractAdaptiveSolver, y0, ts, args, adjoint, rtol, atol,
                    max_steps, throw, controlled) -> Solution:
    # Parameters travel in diffrax's `args`, so every diffrax adjoint differentiates them.
    def vector_field(t, y, args_and_tied):
        args, tied = args_and_tied
        return dynamics.func(t, y, args, tied, None)

    forward, backward = _controllers(rtol, atol, controlled)
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(vector_field), solver.diffrax_solver(), t0=ts[0], t1=ts[-1], dt0=None,
        y0=y0, args=(args, dynamics.tied), saveat=diffrax.SaveAt(ts=ts),
        stepsize_controller=forward, adjoint=adjoint.diffrax_adjoint(backward),
        max_steps=max_steps, throw=throw)
    steps = sol.stats["num_steps"]
    stats = {"num_steps": steps, "num_accepted_steps": sol.stats["num_accepted_steps"],
             "num_rejected_steps": sol.stats["num_rejected_steps"],
             "nfe": solver.initial_evaluations + solver.evaluations_per_step * steps,
             "nfe_backward": -1}
    return Solution(ts, sol.ys, stats, sol.result == diffrax.RESULTS.max_steps_reached)


def backsolve_reconstruction_error(f: Callable | nnx.Module, y0, ts, args=None, *,
                                   solver: AbstractSolver = RK4(), substeps: int = 1):
    """How well the backwards solve of `BacksolveAdjoint` recovers the forward states.

    Returns, for each interval of `ts`, max |y(ts[i]) - y~(ts[i])| where y~ is y(ts[i+1])
    integrated backwards with the same fixed-step solver and steps (with `ts = [t0, t1]`: the
    reconstruction error of y0). Large values mean the continuous adjoint linearises around the
    wrong trajectory (Gholami et al. 2019).
    """
    if solver.adaptive:
        raise ValueError(f"backsolve_reconstruction_error needs a fixed-step solver, got {solver!r}")
    sol = solve(f, y0, ts, args, solver=solver, substeps=substeps, adjoint=DiscreteAdjoint())
    return reconstruction_error(_dynamics(f, args), solver, sol.ys, sol.ts, args, int(substeps))


def odeint(f: Callable | nnx.Module, y0, ts, args=None, *, solver: AbstractSolver = RK4(),
           substeps: int = 1, adjoint: AbstractAdjoint = DiscreteAdjoint(), rtol: float = 1e-6,
           atol: float = 1e-8, max_steps: int = 4096):
    """Solve dy/dt = f(t, y, args) and return the states at `ts` (leading axis len(ts), ys[0] = y0).

    f: a pure function `f(t, y, args)` with `y` any pytree of arrays, or an `nnx.Module` field
        called as `field(t, y)` (its parameters are split out, so gradients reach them under every
        adjoint), or a `DepthStack` (one field per step: an L-step solve is an L-block network).
    ts: strictly increasing 1-D times. A fixed-step solver crosses each interval in `substeps` equal
        steps, so `ts = linspace(0, T, L + 1)` returns every activation of an L-block network.
    solver: Euler/Midpoint/Heun/RK4/Leapfrog (fixed step) or Dopri5/Tsit5 (adaptive, via
        `diffrax.diffeqsolve` with `PIDController(rtol, atol)`).
    adjoint: DiscreteAdjoint (backprop through the steps), CheckpointAdjoint, BacksolveAdjoint.
    max_steps: the most steps allowed; an adaptive solve that needs more raises.

    For statistics (steps, NFE, failure status) call `solve` with the same arguments.
    """
    return solve(f, y0, ts, args, solver=solver, substeps=substeps, adjoint=adjoint, rtol=rtol,
                 atol=atol, max_steps=max_steps).ys
