"""Two-level multigrid reduction in time (MGRIT) over a mesh axis, inside `jax.shard_map`.

The problem: U_{j+1} = Phi_j(U_j), j = 0 .. J-1, from a given U_0, where each fine propagator Phi_j
(several steps of a network or an ODE solver) is expensive and a coarse propagator Psi_j ~ Phi_j is
cheap. The J intervals are split evenly over the devices of a mesh axis, in order. One iteration
(Falgout, Friedhoff, Kolev, MacLachlan & Schroder 2014, "Parallel time integration with
multigrid", SIAM J. Sci. Comput. 36(6); with F-relaxation it is parareal, Lions, Maday & Turinici
2001, "Resolution d'EDP par un schema en temps parareel", C. R. Acad. Sci. 332):

- F-relaxation: E_j = Phi_j(U_j) for every interval at once (each device its own), the start of a
  device's first interval received from the previous device by `lax.ppermute`. FCF-relaxation
  first does C-relaxation U_{j+1} <- E_j and a second F-relaxation.
- Coarse-grid correction (FAS, so it holds for nonlinear propagators), serial over the intervals:
      V_0 = U_0,    V_{j+1} = Psi_j(V_j) + E_j - Psi_j(U_j),    U <- V.
  It is pipelined: device p steps its intervals once device p-1 has sent its last value. The
  initial guess is the coarse solve V_{j+1} = Psi_j(V_j).

The residual r_{j+1} = E_j - U_{j+1} after F-relaxation measures convergence and
rho_k = |r^k| / |r^(k-1)| is the convergence factor of iteration k. After k iterations U_0 .. U_k
are exact (U_0 .. U_2k with FCF), so J iterations reproduce the serial solve to rounding.

Convergence monitor: if the residual grows (rho > 1 above rounding) or `tol` is missed within the
iterations, the result is replaced by the serial solve (the same pipeline with Phi_j, the serial
wall time) and reported; without the fallback the iterations go on and `diverged` reports it.
Iterating stops early once the residual is down to `tol` or to rounding.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

RELAXATIONS = ("F", "FCF")


@dataclasses.dataclass(frozen=True)
class MGRIT:
    """Settings of two-level MGRIT, for a solve and for its adjoint.

    coarsening: m >= 2, fine steps (layers) per coarse interval.
    iterations: the most coarse-grid corrections of the forward solve, K.
    tol: stop once the residual 2-norm (over all C-points) is <= tol; None runs all K iterations.
    relaxation: "F" (parareal) or "FCF" (twice the fine work per iteration, exact in half as many).
    backward_iterations, backward_tol: the same for the adjoint solve.
    fallback: replace the result by the serial solve when the residual grows (stopping there) or
        `tol` is missed; False keeps the MGRIT iterate and only reports it.
    """

    coarsening: int = 4
    iterations: int = 2
    tol: float | None = None
    relaxation: str = "F"
    backward_iterations: int = 1
    backward_tol: float | None = None
    fallback: bool = True

    def __post_init__(self):
        if not isinstance(self.coarsening, int) or isinstance(self.coarsening, bool) \
                or self.coarsening < 2:
            raise ValueError(f"MGRIT.coarsening: expected an int >= 2, got {self.coarsening!r}")
        for name in ("iterations", "backward_iterations"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"MGRIT.{name}: expected an int >= 0, got {value!r}")
        for name in ("tol", "backward_tol"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and value > 0):
                raise ValueError(f"MGRIT.{name}: expected None or a number > 0, got {value!r}")
        if self.relaxation not in RELAXATIONS:
            raise ValueError(f"MGRIT.relaxation: expected one of {RELAXATIONS}, got "
                             f"{self.relaxation!r}")

    def backward(self) -> MGRIT:
        """The settings of the adjoint solve."""
        return dataclasses.replace(self, iterations=self.backward_iterations, tol=self.backward_tol)


class Ring(NamedTuple):
    """This device's place along the mesh axis, counted in the direction of the solve."""

    axis: str
    devices: int
    reverse: bool  # an adjoint runs from the last device to the first

    def position(self):
        index = lax.axis_index(self.axis)
        return self.devices - 1 - index if self.reverse else index

    def to_next(self, x):
        """Send x to the next device in solve order (the first one receives zeros)."""
        if self.devices == 1:
            return jnp.zeros_like(x)
        shift = -1 if self.reverse else 1
        perm = [(p, p + shift) for p in range(self.devices) if 0 <= p + shift < self.devices]
        return lax.ppermute(x, self.axis, perm)


def _norm(ring: Ring, x):
    """The 2-norm of x over all devices."""
    return jnp.sqrt(lax.psum(jnp.sum(x**2), ring.axis))


def _starts(ring: Ring, ends, u0):
    """The start of every local interval: the previous interval's end (the previous device's last
    one for the first; u0 on the first device)."""
    first = jnp.where(ring.position() == 0, u0, ring.to_next(ends[-1]))
    return jnp.concatenate([first[None], ends[:-1]])


def _varying_zeros(ring: Ring, shapes):
    """Zeros of the shapes and dtypes of `shapes` (a pytree), typed as differing between devices."""
    return jax.tree.map(lambda s: lax.pcast(jnp.zeros(s.shape, s.dtype), ring.axis, to="varying"),
                        shapes)


def sweep(ring: Ring, step: Callable, tau, u0):
    """V_{i+1} = end_i + tau_i with (end_i, extras_i) = step(i, V_i), over every interval in order
    from V_0 = u0: the serial part. Returns the V_{i+1} and the extras of this device's intervals.
    Pipelined: in round r the device at position r steps its intervals from the value the one
    before sent; the others wait (a `lax.cond`, so they spend no work)."""
    def local(v):
        def body(v, i):
            end, extras = step(i, v)
            v = end + tau[i]
            return v, (v, extras)
        return lax.scan(body, v, jnp.arange(tau.shape[0]))[1]

    if ring.devices == 1:
        return local(u0)
    position = ring.position()

    def one_round(r, carry):
        done, incoming = carry
        done = lax.cond(position == r, local, lambda _: done, incoming)
        return done, jnp.where(position == 0, u0, ring.to_next(done[0][-1]))

    initial = _varying_zeros(ring, jax.eval_shape(local, u0))
    return lax.fori_loop(0, ring.devices, one_round, (initial, u0))[0]


def solve(ring: Ring, fine: Callable, coarse: Callable, u0, intervals: int, settings: MGRIT):
    """Solve U_{i+1} = fine(i, U_i) over this device's `intervals` intervals by two-level MGRIT.

    fine(i, v) -> (end, extras): the fine steps of local interval i from v, with what the caller
    keeps from the last F-relaxation (states, gradients); coarse(i, v) -> end: its coarse step.
    Returns the interval ends (C-points), the extras and the statistics."""
    indices = jnp.arange(intervals)
    u0 = lax.pcast(u0, ring.axis, to="varying")  # equal everywhere, but mixed with what is not
    iterations, eps = settings.iterations, jnp.finfo(u0.dtype).eps

    def relax(ends):
        starts = _starts(ring, ends, u0)
        return (starts, *jax.vmap(fine)(indices, starts))

    def iterate(carry):
        # Coarse solve with the FAS correction tau (zero at first: the initial guess), then
        # F-relaxation; its residual decides whether to go on; then the next correction.
        tau, _, _, k, residuals, _, diverged = carry
        ends = sweep(ring, lambda i, v: (coarse(i, v), ()), tau, u0)[0]
        starts, relaxed, extras = relax(ends)
        residuals = residuals.at[k].set(_norm(ring, relaxed - ends))
        noise = 64 * eps * _norm(ring, ends)  # rounding, relative to the size of the solution
        grew = (k > 0) & (residuals[k] > residuals[k - 1]) & (residuals[k] > noise)
        diverged = diverged | grew
        done = (k >= iterations) | (residuals[k] <= jnp.maximum(noise, settings.tol or 0.0))
        if settings.fallback:  # the serial solve will replace the iterate: stop here
            done = done | diverged
        if settings.relaxation == "FCF":  # C-relaxation (U_{j+1} <- E_j), F-relaxation again
            starts, relaxed = lax.cond(done, lambda: (starts, relaxed),
                                       lambda: relax(relaxed)[:2])
        tau = relaxed - jax.vmap(coarse)(indices, starts)
        return tau, ends, extras, k + 1, residuals, done, diverged

    zeros = _varying_zeros(ring, jax.ShapeDtypeStruct((intervals,) + u0.shape, u0.dtype))
    extras = _varying_zeros(ring, jax.eval_shape(lambda: relax(zeros)[2]))
    residuals = jnp.full(iterations + 1, jnp.nan, u0.dtype)
    false = jnp.asarray(False)
    _, ends, extras, k, residuals, _, diverged = lax.while_loop(
        lambda carry: ~carry[-2], iterate, (zeros, zeros, extras, 0, residuals, false, false))
    k = k - 1  # corrections done: the index of the last residual
    unconverged = (residuals[k] > settings.tol) if settings.tol is not None else false
    fallback = false
    if settings.fallback:
        fallback = diverged | unconverged
        ends, extras = lax.cond(fallback, lambda: sweep(ring, fine, zeros, u0),
                                lambda: (ends, extras))
    stats = {"iterations": k, "residuals": residuals,
             "rho": residuals[1:] / residuals[:-1], "diverged": diverged,
             "unconverged": unconverged, "fallback": fallback}
    return ends, extras, stats
