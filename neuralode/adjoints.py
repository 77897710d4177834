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

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from neuralode import adaptive
from neuralode.adaptive import AdaptiveOptions
from neuralode.backsolve import AdaptiveStepper, FixedStepper, continuous_adjoint
from neuralode.stepping import Dynamics, checkpointed_scan, fixed_step_loop


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
    """`BacksolveAdjoint`'s backwards solve did not reconstruct the forward states; `mismatch` is
    the largest relative mismatch. The text is the same for every mismatch, so Python's default
    filter shows it once per process, not once per training step;
    `warnings.simplefilter("always", ReconstructionWarning)` shows every one."""

    def __init__(self, message: str, mismatch: float = float("nan")):
        super().__init__(message)
        self.mismatch = mismatch


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
        return continuous_adjoint(self, FixedStepper(solver, substeps), dynamics, y0, ts,
                                  args, None)[0]

    def solve_adaptive(self, dynamics, y0, ts, args, tols, options):
        if options.controller is not None and not isinstance(
                options.controller, diffrax.AbstractAdaptiveStepSizeController):
            raise ValueError(f"adjoint=BacksolveAdjoint() solves backwards with the forward "
                             f"step-size controller, which must be adaptive; got "
                             f"{options.controller!r}")
        ys, aux = continuous_adjoint(self, AdaptiveStepper(options), dynamics, y0, ts,
                                     args, tols)
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

    def reported(self, mismatch, failed):
        """The backward pass's entry of a backward report (`neuralode.backsolve.REPORT_FIELDS`),
        where `on_mismatch` is applied on the host (`check_backward_report`)."""
        above = (mismatch > self.tolerance) & (self.on_mismatch != "ignore")
        return jnp.stack([failed, above & (self.on_mismatch == "raise"),
                          above & (self.on_mismatch == "warn"), mismatch]).astype(mismatch.dtype)


def _mismatch_message(tolerance: float | None) -> str:
    above = f"tolerance={tolerance:g}" if tolerance is not None else "the adjoint's tolerance"
    return (f"BacksolveAdjoint: the backwards solve did not reconstruct the forward states "
            f"(relative mismatch above {above}), so the continuous adjoint is "
            "linearised around the wrong trajectory and its gradient is unreliable. Use "
            "adjoint=DiscreteAdjoint() or CheckpointAdjoint() (the exact gradient of the solve)")


def _warn_mismatch(tolerance, mismatch):
    worst = float(np.max(mismatch))
    if not worst <= tolerance:
        warnings.warn(ReconstructionWarning(_mismatch_message(tolerance), worst), stacklevel=2)


def check_backward_report(metrics: dict, where: str, advice: str = "") -> None:
    """Act on the backward report in `metrics` (host values; `neuralode.backsolve.REPORT_FIELDS`, as
    `neuralode.train_step.metrics_and_gradients` adds them): raise RuntimeError if a backwards
    solve of `BacksolveAdjoint` failed or a mismatch is above tolerance with on_mismatch="raise",
    warn (`ReconstructionWarning`, its `mismatch` the summed largest mismatches) with "warn"."""
    if float(metrics.get("failed_backward_solves", 0)) > 0:
        raise RuntimeError(
            f"{where}: a backwards solve of BacksolveAdjoint failed (max_steps reached or a "
            "non-finite adjoint state), so its gradients are nan; raise max_steps, loosen the "
            f"tolerances or use adjoint=CheckpointAdjoint(){advice}")
    if float(metrics.get("reconstruction_errors", 0)) > 0:
        raise RuntimeError(f"{where}: {_mismatch_message(None)}{advice}")
    if float(metrics.get("reconstruction_warnings", 0)) > 0:
        warnings.warn(ReconstructionWarning(_mismatch_message(None),
                                            float(metrics["reconstruction_mismatch"])),
                      stacklevel=2)
