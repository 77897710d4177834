"""`odeint` and `solve`: validation, dispatch to the fixed-step loops or to diffrax, statistics.

Errors come in three tiers (docs/design.md, `neuralode.validation`): static misuse raises
ValueError/TypeError before tracing, naming the argument; values are checked eagerly when concrete;
traced values breaking a rule and solver failure (max_steps reached, a vector field that returns
nan/inf) are `Solution.result`, raised under `jit` by `equinox.error_if` unless
`solve(..., throw=False)`.

Eager calls are compiled once: the solve runs under an inner `equinox.filter_jit` keyed on the
static parts (the field's function or nnx graph, solver, adjoint, options, shapes), taking the
arrays (y0, ts, args, the field's parameters) as arguments; Python floats in args are made arrays
(a new value runs the same program, as under `jax.jit`), other Python objects in args are static.
Under an outer transformation (`jit`, `grad`, `vmap` with traced inputs) the solve is traced
inline. A plain-function field is keyed by identity and by the values it reads from its closure
and globals (`neuralode.freevalues`): a changed global compiles anew instead of reusing the old
value (values passed in `args` never recompile).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
from flax import nnx

from neuralode import adaptive, validation
from neuralode.adaptive import RESULTS, AdaptiveOptions
from neuralode.adjoints import AbstractAdjoint, DiscreteAdjoint
from neuralode.backsolve import (AdaptiveStepper, FixedStepper, is_differentiable,
                                 is_inexact_scalar, reconstruction_error, reporting)
from neuralode.fields import DepthStack
from neuralode.freevalues import free_values
from neuralode.solvers import AbstractSolver, Dopri5
from neuralode.stepping import Dynamics, hermite_interpolation

RTOL, ATOL = 1e-6, 1e-8


class Solution(NamedTuple):
    """What `solve` returns: the states `ys` at `ts` (leading axis len(ts)) and statistics.

    `stats` holds `num_steps`, `num_accepted_steps`, `num_rejected_steps`, `nfe` (vector-field
    evaluations of the forward solve, counted as they happen; -1 for a diffrax solver that is not
    an explicit Runge-Kutta method) and `nfe_backward` (evaluations or vector-Jacobian products of
    the backward pass of a fixed-step solve; -1 where diffrax decides it adaptively), each a jax
    int32 scalar on every path (a fixed-step solve's are concrete even while traced). `result` is the status (`neuralode.adaptive.RESULTS`:
    successful, max_steps_reached, nonfinite_field, event_occurred, ...), only seen other than
    successful with `throw=False`. `interpolation` (with `dense=True`) gives `evaluate(t)`;
    `event_mask` is diffrax's, with an `event`.
    """

    ts: jax.Array
    ys: Any
    stats: dict
    result: Any
    interpolation: Any = None
    event_mask: Any = None

    @property
    def max_steps_reached(self) -> jax.Array:
        return self.result == RESULTS.max_steps_reached

    def evaluate(self, t):
        """The solution at time `t` (a scalar or a 1-D array of times), from the dense output:
        diffrax's interpolation for a diffrax-stepped solve, cubic Hermite between fixed steps.
        Dense output interpolates and never extrapolates: a time outside [ts[0], ts[-1]] raises
        ValueError when `t` and `ts` are concrete, and gives nan under a transformation (as
        diffrax's interpolation does), on every path."""
        if self.interpolation is None:
            raise ValueError("Solution.evaluate needs the dense output: call solve(..., "
                             "dense=True)")
        t = jnp.asarray(t)
        low, high = jnp.minimum(self.ts[0], self.ts[-1]), jnp.maximum(self.ts[0], self.ts[-1])
        outside = (t < low) | (t > high)
        if not validation.is_traced((t, self.ts)) and bool(jnp.any(outside)):
            raise ValueError(f"t: {jnp.ravel(t)[jnp.argmax(jnp.ravel(outside))]} is outside the "
                             f"solved interval [{low}, {high}]; dense output does not extrapolate")
        like = jax.tree.map(lambda y: y[0], self.ys)

        def one(s, out):
            return jax.tree.map(lambda y, z: jnp.where(out, jnp.nan, y).astype(z.dtype),
                                self.interpolation.evaluate(s), like)

        return one(t, outside) if t.ndim == 0 else jax.vmap(one)(t, outside)


@dataclasses.dataclass(frozen=True)
class _FunctionField:
    """A field given as a function or an equinox module: its arrays travel as `tied`; `reads`,
    the values it reads from its closure and globals, is part of the eager cache's key (set only
    for an eager solve: a traced one reads them as it is traced)."""

    static: Any
    reads: tuple = ()

    def __call__(self, t, y, args, tied, layer):
        return eqx.combine(tied, self.static)(t, y, args)


@dataclasses.dataclass(frozen=True)
class _ModuleField:
    graphdef: Any

    def __call__(self, t, y, args, tied, layer):
        return nnx.merge(self.graphdef, tied)(t, y, args)


@dataclasses.dataclass(frozen=True)
class _StackField:
    graphdef: Any

    def __call__(self, t, y, args, tied, layer):
        return nnx.merge(self.graphdef, layer)(t, y, args)


def _split(f) -> tuple[Callable, Any, Any]:
    """The field as `(func, tied, stacked)`: a hashable `func(t, y, args, tied, layer)` and its
    parameters, shared by every step (`tied`) or one slice per step (`stacked`)."""
    if isinstance(f, DepthStack):
        validation.check_field_call(f.layers)
        graphdef, stacked = nnx.split(f.layers)
        return _StackField(graphdef), None, stacked
    if isinstance(f, nnx.Module):
        validation.check_field_call(f)
        graphdef, tied = nnx.split(f)
        return _ModuleField(graphdef), tied, None
    if callable(f):
        validation.check_field_call(f)
        tied, static = eqx.partition(f, eqx.is_array)
        return _FunctionField(static), tied, None
    raise TypeError(f"f must be a function f(t, y, args) or an nnx.Module field(t, y, args), "
                    f"got {f!r}")


class _Options(NamedTuple):
    """Everything of a solve but its arrays (static under the inner jit, except diffrax's arrays)."""

    func: Callable
    solver: Any
    adjoint: AbstractAdjoint
    substeps: int
    max_steps: int
    throw: bool
    controlled: Callable | None
    stepsize_controller: Any
    event: Any
    dense: bool
    check_finite: bool


def solve(f: Callable | nnx.Module, y0, ts, args=None, *, solver: AbstractSolver = Dopri5(),
          substeps: int = 1, adjoint: AbstractAdjoint = DiscreteAdjoint(), rtol: float = RTOL,
          atol: float = ATOL, max_steps: int = 4096, throw: bool = True,
          controlled: Callable | None = None, stepsize_controller=None, event=None,
          dense: bool = False, check_finite: bool = False) -> Solution:
    """Integrate dy/dt = f(t, y, args) from ts[0] and return a `Solution` with the states at `ts`.

    Arguments are those of `odeint`, plus:
    throw: whether a failed solve (max_steps reached, f returning nan/inf) or a traced argument
        that breaks a value rule (y0 not finite, ...) raises when the program runs (True, by an
        `equinox.error_if`: a host callback) or is reported in `Solution.result` (False: the
        program holds no callback of ours, so JAX's persistent compilation cache keeps it, and a
        step sharded over devices cannot stop on one of them alone; the caller must read the
        result). The models of `neuralode.models` solve with False and report failures in their
        stats (`failed_solves`), which `train` checks after every step.
    controlled (adaptive solvers only): a function of a state-shaped pytree returning the parts
        whose local error the step-size controller bounds (None: all of it). Leave out quadrature
        states, integrals carried along that the field never reads (RNODE's regularisers): their
        error does not feed back into the rest, so controlling it only buys smaller steps. With
        `BacksolveAdjoint` the backwards solve controls the same parts of the state and of its
        adjoint, and all parameter cotangents.
    stepsize_controller, event (diffrax-stepped solves): any diffrax step-size controller (in
        place of `PIDController(rtol, atol)`) and a `diffrax.Event` (the states after it are inf).
    dense: keep the dense output, for `Solution.evaluate(t)` (every solver; not with
        `BacksolveAdjoint`). A fixed-step solve then also stores the state of every step.
    check_finite: raise if the returned states, or the gradients reaching y0, args and the field's
        parameters, are not finite (two cheap `isfinite` reductions). Without it a fixed-step
        solve passes nan/inf through to its outputs and gradients; a diffrax-stepped one rejects
        non-finite steps and reports a field that stays non-finite (`RESULTS.nonfinite_field`).
    """
    adjoint = validation.check_options(
        solver, adjoint, substeps=substeps, max_steps=max_steps, rtol=rtol, atol=atol,
        throw=throw, controlled=controlled, stepsize_controller=stepsize_controller, event=event,
        dense=dense, check_finite=check_finite, defaults=(RTOL, ATOL))
    validation.check_tolerances(rtol, atol)
    y0 = validation.check_y0(y0, solver)
    ts = validation.check_ts(ts, validation.time_dtype(y0))
    func, tied, stacked = _split(f)
    intervals = ts.shape[0] - 1
    steps = intervals * int(substeps)
    if stacked is not None:
        if adaptive.is_diffrax_stepped(solver):
            raise ValueError("f is a DepthStack (one field per step), which needs a fixed-step "
                             f"solver such as Euler() or RK4(); got solver={solver!r}")
        if f.depth != steps:
            raise ValueError(f"f is a DepthStack of depth {f.depth}, but the solve takes "
                             f"(len(ts) - 1) * substeps = {intervals} * {substeps} = {steps} steps")
    if validation.fixed_steps(solver, stepsize_controller) and steps > max_steps:
        raise ValueError(f"the solve takes (len(ts) - 1) * substeps = {steps} steps, more than "
                         f"max_steps={max_steps}")
    options = _Options(func, solver, adjoint, int(substeps), int(max_steps), throw, controlled,
                       stepsize_controller, event, dense, check_finite)
    arrays = (y0, ts, args, tied, stacked, rtol, atol)
    # Traced inline; also where a backward report is collected, which a cached program would miss.
    if validation.is_traced((arrays, stepsize_controller, event)) or reporting():
        try:
            return _solve(options, *arrays)
        except TypeError as error:  # JAX's words for it name no argument
            if "forward-mode autodiff (jvp) to a custom_vjp" not in str(error):
                raise
            advice = ("adjoint=diffrax.ForwardMode() (a Hessian is then jax.jacfwd(jax.jacfwd(...)))"
                      if adaptive.is_diffrax_stepped(solver) else
                      "adjoint=DiscreteAdjoint() or CheckpointAdjoint(), which it enters")
            raise TypeError(f"adjoint: {adjoint!r} differentiates this solve in reverse mode only (a "
                            "custom_vjp), which forward mode (jax.jvp, jax.jacfwd, jax.hessian) cannot "
                            f"enter; pass {advice}") from error
    # A Python float in args would be static to the compiled program, one compilation per value;
    # as an array (weakly typed, as jax.jit makes it) every value runs the same program.
    args = jax.tree.map(lambda x: jnp.asarray(x) if is_inexact_scalar(x) else x, args)
    if isinstance(func, _FunctionField):  # the key of the cached program: what f reads now
        options = options._replace(func=dataclasses.replace(func, reads=free_values(f)))
    return _solve_compiled(options, y0, ts, args, tied, stacked, rtol, atol)


def _solve(options: _Options, y0, ts, args, tied, stacked, rtol, atol) -> Solution:
    invalid = validation.traced_value_checks(ts, y0, rtol, atol)
    if options.throw:  # the checks ride on the small ts, which every solve uses (on y0 they cost
        for bad, status in invalid:  # 5 % of a ResNet step: on the state's path both ways)
            ts = status.error_if(ts, bad)
    validation.check_field_output(options.func, ts, y0, args, tied, stacked)
    if options.check_finite:
        inexact, rest = eqx.partition((y0, args, tied, stacked), is_differentiable)
        y0, args, tied, stacked = eqx.combine(_check_cotangents(inexact), rest)
    dynamics = Dynamics(options.func, tied, stacked)
    solver, adjoint = options.solver, options.adjoint
    interpolation = event_mask = None
    if adaptive.is_diffrax_stepped(solver):
        adaptive_options = AdaptiveOptions(solver, options.stepsize_controller, options.controlled,
                                           options.max_steps, options.substeps, options.dense,
                                           options.event)
        ys, stats, result, interpolation, event_mask = adjoint.solve_adaptive(
            dynamics, y0, ts, args, (rtol, atol), adaptive_options)
        stats = dict(stats, nfe_backward=jnp.asarray(-1, jnp.int32))
    else:
        if options.dense:
            ys, grid = adjoint.integrate(dynamics, solver, y0, ts, args, options.substeps,
                                         every_step=True)
            interpolation = hermite_interpolation(dynamics, ts, grid, args, options.substeps)
        else:
            ys = adjoint.integrate(dynamics, solver, y0, ts, args, options.substeps)
        steps = (ts.shape[0] - 1) * options.substeps
        nfe = solver.evaluations(steps, depth_varying=stacked is not None)
        stats = {"num_steps": steps, "num_accepted_steps": steps, "num_rejected_steps": 0,
                 "nfe": nfe, "nfe_backward": adjoint.backward_evaluations(nfe)}
        with jax.ensure_compile_time_eval():  # known when traced: concrete even under jit
            stats = {k: jnp.asarray(v, jnp.int32) for k, v in stats.items()}
        result = RESULTS.successful
    # diffrax computes in the dtype of the times where it is wider; the states keep y0's dtypes.
    ys = jax.tree.map(lambda y, y0: y.astype(y0.dtype), ys, y0)
    if not options.throw:  # reported: the first broken value rule, else the solver's status
        for bad, status in reversed(invalid):
            result = RESULTS.where(bad, status, result)
    else:
        ok = (result == RESULTS.successful) | (result == RESULTS.event_occurred)
        ys = result.error_if(ys, ~ok)
    if options.check_finite:
        finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(y)) for y in jax.tree.leaves(ys)]))
        ys = eqx.error_if(ys, ~finite, "check_finite: the solve's states ys are not finite (nan "
                                       "or inf)")
    return Solution(ts, ys, stats, result, interpolation, event_mask)


_solve_compiled = eqx.filter_jit(_solve)


@jax.custom_vjp
def _check_cotangents(tree):
    """The identity on a pytree of floating arrays, whose backward pass raises if a cotangent is
    not finite."""
    return tree


def _check_cotangents_fwd(tree):
    return tree, None


def _check_cotangents_bwd(_, cotangents):
    finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(c)) for c in jax.tree.leaves(cotangents)]))
    return (eqx.error_if(cotangents, ~finite, "check_finite: the gradient with respect to y0, args "
                         "or the field's parameters is not finite (nan or inf)"),)


_check_cotangents.defvjp(_check_cotangents_fwd, _check_cotangents_bwd)


def backsolve_reconstruction_error(f: Callable | nnx.Module, y0, ts, args=None, *,
                                   solver: AbstractSolver = Dopri5(), substeps: int = 1,
                                   rtol: float = RTOL, atol: float = ATOL, max_steps: int = 4096):
    """How well the backwards solve of `BacksolveAdjoint` recovers the forward states.

    Returns, for each interval of `ts`, max |y(ts[i]) - y~(ts[i])| where y~ is y(ts[i+1])
    integrated backwards with the same solver (the same fixed steps, or adaptive steps at the same
    tolerances) (with `ts = [t0, t1]`: the reconstruction error of y0). Large values mean the
    continuous adjoint linearises around the wrong trajectory (Gholami et al. 2019).
    """
    sol = solve(f, y0, ts, args, solver=solver, substeps=substeps, rtol=rtol, atol=atol,
                max_steps=max_steps)
    func, tied, stacked = _split(f)
    if adaptive.is_diffrax_stepped(solver):
        stepper = AdaptiveStepper(AdaptiveOptions(solver, None, None, max_steps))
    else:
        stepper = FixedStepper(solver, int(substeps))
    return reconstruction_error(Dynamics(func, tied, stacked), stepper, sol.ys, sol.ts, args,
                                (rtol, atol))


def odeint(f: Callable | nnx.Module, y0, ts, args=None, *, solver: AbstractSolver = Dopri5(),
           substeps: int = 1, adjoint: AbstractAdjoint = DiscreteAdjoint(), rtol: float = RTOL,
           atol: float = ATOL, max_steps: int = 4096, **options):
    """Solve dy/dt = f(t, y, args) and return the states at `ts` (leading axis len(ts), ys[0] = y0).

    f: a pure function `f(t, y, args)` with `y` any pytree of arrays, or an `nnx.Module` field
        called as `field(t, y, args)` (its parameters are split out, so gradients reach them under
        every adjoint), or a `DepthStack` (one field per step: an L-step solve is an L-block
        network).
    ts: strictly monotone 1-D times (decreasing: integrate backwards in time). A fixed-step solver
        crosses each interval in `substeps` equal steps, so `ts = linspace(0, T, L + 1)` returns
        every activation of an L-block network. Times are computed in y0's (real) dtype.
    solver: Dopri5 (the default: adaptive, accurate to rtol/atol) or Tsit5, via
        `diffrax.diffeqsolve` with `PIDController(rtol, atol)`; any diffrax solver (e.g.
        `diffrax.Kvaerno5()` for stiff problems); or a fixed-step solver asked for by name:
        Euler/Midpoint/Heun/RK4/Leapfrog (a discrete-depth network).
    adjoint: DiscreteAdjoint (backprop through the steps), CheckpointAdjoint, BacksolveAdjoint, or
        any diffrax adjoint for a diffrax-stepped solve (`diffrax.ForwardMode()` for `jax.jacfwd`).
    rtol, atol: the adaptive solvers' tolerances (refused with a fixed-step solver, whose
        error only substeps changes).
    max_steps: the most steps allowed; an adaptive solve that needs more raises.
    options: those of `solve` (throw, controlled, stepsize_controller, event, dense,
        check_finite).

    For statistics (steps, NFE, failure status) and dense output call `solve`.
    """
    return solve(f, y0, ts, args, solver=solver, substeps=substeps, adjoint=adjoint, rtol=rtol,
                 atol=atol, max_steps=max_steps, **options).ys
