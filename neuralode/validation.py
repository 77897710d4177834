"""The checks of `solve`'s arguments, in the error tiers of the design:

1. static misuse (types, shapes, options that do not go together) raises ValueError/TypeError
   before anything is traced, naming the argument and the rule;
2. values (y0 finite, ts finite and strictly monotone, rtol > 0, atol >= 0) are checked eagerly
   when they are concrete, with the same ValueError; when they are traced (under `jit`) they are
   a status of the solve (`Solution.result`), as is
3. solver failure; a status other than success raises when the program runs (`equinox.error_if`,
   a host callback), or with `throw=False` is only reported, and the program has no callback.
"""
from __future__ import annotations

import inspect
from typing import Callable

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from neuralode import adaptive
from neuralode.adjoints import AbstractAdjoint, DiffraxAdjoint


def is_traced(tree) -> bool:
    return any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(tree))


def fixed_steps(solver, stepsize_controller) -> bool:
    """Whether the solve takes `substeps` equal steps per interval of `ts`."""
    if not adaptive.is_diffrax_stepped(solver):
        return True
    return stepsize_controller is None and not isinstance(
        adaptive.diffrax_solver(solver), diffrax.AbstractAdaptiveSolver)


def check_options(solver, adjoint, *, substeps, max_steps, rtol, atol, throw, controlled,
                  stepsize_controller, event, dense, check_finite, defaults) -> AbstractAdjoint:
    """The static checks; returns the adjoint as one of ours (a diffrax adjoint wrapped)."""
    adaptive.check_solver(solver)
    if isinstance(adjoint, diffrax.AbstractAdjoint):
        adjoint = DiffraxAdjoint(adjoint)
    if not isinstance(adjoint, AbstractAdjoint):
        raise TypeError(f"adjoint must be DiscreteAdjoint(), CheckpointAdjoint(), "
                        f"BacksolveAdjoint() or a diffrax adjoint, got {adjoint!r}")
    if not isinstance(substeps, (int, np.integer)) or isinstance(substeps, bool) or substeps < 1:
        raise ValueError(f"substeps must be an int >= 1, got {substeps!r}")
    if not isinstance(max_steps, (int, np.integer)) or isinstance(max_steps, bool) or max_steps < 1:
        raise ValueError(f"max_steps must be an int >= 1, got {max_steps!r}")
    for name, value in (("throw", throw), ("dense", dense), ("check_finite", check_finite)):
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be True or False, got {value!r}")
    diffrax_stepped = adaptive.is_diffrax_stepped(solver)
    tolerances_given = any(not isinstance(value, (int, float)) or value != default
                           for value, default in zip((rtol, atol), defaults))
    if tolerances_given and fixed_steps(solver, stepsize_controller):
        raise ValueError(f"rtol and atol apply to adaptive solvers; {solver!r} takes fixed steps "
                         f"(substeps equal steps per interval of ts), which no tolerance changes: "
                         f"refine it by substeps, or use an adaptive solver such as Dopri5()")
    if substeps != 1 and not fixed_steps(solver, stepsize_controller):
        raise ValueError(f"substeps applies to fixed-step solvers; {solver!r} chooses its own "
                         f"steps, got substeps={substeps}")
    if stepsize_controller is not None:
        if not diffrax_stepped:
            raise ValueError(f"stepsize_controller applies to diffrax-stepped solvers; "
                             f"{solver!r} takes fixed steps")
        if not isinstance(stepsize_controller, diffrax.AbstractStepSizeController):
            raise TypeError(f"stepsize_controller must be a diffrax step-size controller, got "
                            f"{stepsize_controller!r}")
        if isinstance(stepsize_controller, diffrax.ConstantStepSize):
            raise ValueError("stepsize_controller=ConstantStepSize() needs a dt0, which solve does "
                             "not take: without a stepsize_controller, a diffrax solver without "
                             "an error estimate takes substeps equal steps per interval of ts")
        if tolerances_given:
            raise ValueError("rtol and atol set the default PIDController; with "
                             "stepsize_controller=... give the tolerances to it instead")
    if controlled is not None:
        if not callable(controlled):
            raise TypeError(f"controlled must be a function of the state or None, got "
                            f"{controlled!r}")
        if fixed_steps(solver, stepsize_controller) or stepsize_controller is not None:
            raise ValueError(f"controlled applies to adaptive solvers with the default "
                             f"step-size controller; {solver!r} takes fixed steps"
                             if fixed_steps(solver, stepsize_controller) else
                             "controlled builds the default controller's norm; with "
                             "stepsize_controller=... give the norm to it instead")
    if event is not None:
        if not diffrax_stepped:
            raise ValueError(f"event applies to diffrax-stepped solvers; {solver!r} takes fixed "
                             "steps")
        if not isinstance(event, diffrax.Event):
            raise TypeError(f"event must be a diffrax.Event, got {event!r}")
    adjoint.check(solver, dense=dense, event=event)
    return adjoint


def check_tolerances(rtol, atol) -> None:
    """rtol > 0 and atol >= 0, checked now when concrete (see `attach_value_checks` otherwise)."""
    for name, value, rule, ok in (("rtol", rtol, "> 0", lambda v: v > 0),
                                  ("atol", atol, ">= 0", lambda v: v >= 0)):
        if is_traced(value):
            continue
        if np.ndim(value) != 0 or not np.isreal(value):
            raise TypeError(f"{name} must be a real number, got {value!r}")
        if not (np.isfinite(value) and ok(float(value))):
            raise ValueError(f"{name} must be {rule} (and finite), got {value!r}")


def time_dtype(y0):
    """The dtype of the times: the widest real dtype among y0's leaves (complex128 -> float64)."""
    return jnp.result_type(*[jnp.finfo(jnp.result_type(leaf)).dtype
                             for leaf in jax.tree.leaves(y0)])


def check_y0(y0, solver):
    """y0 as a pytree of floating arrays; concrete non-finite values raise now."""
    leaves = jax.tree.leaves(y0)
    if not leaves:
        raise ValueError("y0 must contain at least one array")
    for leaf in leaves:
        if not jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):
            raise TypeError(f"y0 must hold floating-point arrays, got dtype {jnp.result_type(leaf)}")
    if hasattr(solver, "check_state"):
        solver.check_state(y0)
    y0 = jax.tree.map(jnp.asarray, y0)
    if not is_traced(y0):
        with jax.ensure_compile_time_eval():  # concrete: computed now, even inside a trace
            finite = all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(y0))
        if not finite:
            raise ValueError("y0 contains non-finite values (nan or inf)")
    return y0


def check_ts(ts, dtype):
    """ts as a 1-D array of at least 2 times in `dtype`; concrete ones must be finite and strictly
    monotone (increasing, or decreasing to integrate backwards in time)."""
    if not is_traced(ts):
        ts = np.asarray(ts)
    if np.ndim(ts) != 1 or np.shape(ts)[0] < 2:
        raise ValueError(f"ts must be a 1-D array of at least 2 times, got shape {np.shape(ts)}")
    if not jnp.issubdtype(ts.dtype, jnp.floating) and not jnp.issubdtype(ts.dtype, jnp.integer):
        raise TypeError(f"ts must hold real times, got dtype {ts.dtype}")
    if is_traced(ts):
        return ts.astype(dtype)
    ts = ts.astype(dtype)
    if not np.all(np.isfinite(ts)):
        bad = int(np.argmin(np.isfinite(ts)))
        raise ValueError(f"ts must be finite, but ts[{bad}] = {ts[bad]}")
    steps = np.diff(ts)
    if not (np.all(steps > 0) or np.all(steps < 0)):
        sign = np.sign(steps[0]) or 1.0
        bad = int(np.argmax(~(sign * steps > 0)))
        order = "increasing" if sign > 0 else "decreasing"
        raise ValueError(f"ts must be strictly monotone (increasing, or decreasing to integrate "
                         f"backwards), but ts is {order} from ts[0] and ts[{bad + 1}] = "
                         f"{ts[bad + 1]} after ts[{bad}] = {ts[bad]}")
    return jnp.asarray(ts)


def traced_value_checks(ts, y0, rtol, atol) -> list[tuple[jax.Array, adaptive.RESULTS]]:
    """The value rules for those of `solve`'s arguments that are traced (concrete ones were checked
    eagerly): `(bad, status)` pairs, `bad` a scalar bool and `status` the `RESULTS` item naming the
    rule. `solve` raises them (`status.error_if`) or, with `throw=False`, reports them as its result."""
    checks = []
    if is_traced(ts):
        steps = jnp.diff(ts)
        bad = ~(jnp.all(steps > 0) | jnp.all(steps < 0)) | ~jnp.all(jnp.isfinite(ts))
        checks.append((bad, adaptive.RESULTS.invalid_ts))
    if is_traced(y0):
        finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(y0)]))
        checks.append((~finite, adaptive.RESULTS.nonfinite_y0))
    if is_traced(rtol):
        checks.append((~(rtol > 0), adaptive.RESULTS.invalid_rtol))
    if is_traced(atol):
        checks.append((~(atol >= 0), adaptive.RESULTS.invalid_atol))
    return checks


def check_field_call(f: Callable) -> None:
    """A field, function or nnx module, is called as f(t, y, args), as a diffrax vector field (a
    torchdiffeq-style f(t, y) would otherwise fail deep inside the solve)."""
    call = f.__call__ if isinstance(f, nnx.Module) else f
    try:
        signature = inspect.signature(call)
    except (TypeError, ValueError):  # no signature to read (a builtin): the call will tell
        return
    try:
        signature.bind(0.0, None, None)
    except TypeError:
        name = (f"{type(f).__name__}.__call__" if isinstance(f, nnx.Module)
                else getattr(f, "__name__", type(f).__name__))
        raise TypeError(f"f is called as f(t, y, args), like a diffrax vector field: {name} must "
                        f"take (t, y, args) (args may go unused, or default to None), got "
                        f"{signature}") from None


def check_field_output(func: Callable, ts, y0, args, tied, stacked) -> None:
    """f returns dy/dt with the structure, shapes and dtypes of y0 (traced once, at trace time)."""
    layer = jax.tree.map(lambda x: x[0], stacked)
    out = eqx.filter_eval_shape(func, ts[0], y0, args, tied, layer)  # Python ints, bools stay static
    expected = jax.tree.map(lambda y: jax.ShapeDtypeStruct(jnp.shape(y), jnp.result_type(y)), y0)
    if jax.tree.structure(out) != jax.tree.structure(expected):
        raise ValueError(f"f must return dy/dt with the structure of y0 {jax.tree.structure(y0)}, "
                         f"got {jax.tree.structure(out)}")
    for got, want in zip(jax.tree.leaves(out), jax.tree.leaves(expected)):
        if got.shape != want.shape or got.dtype != want.dtype:
            raise ValueError(f"f must return dy/dt with the shape and dtype of y0: expected "
                             f"{want.shape} {want.dtype}, got {got.shape} {got.dtype}")
