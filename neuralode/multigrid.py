"""Geometric multigrid for -div(a grad u) = f on the unit interval/square, Dirichlet u = 0.

Grids are cell-vertex: n intervals per side (n a power of two), h = 1/n, and the unknowns are the
n - 1 interior vertices per side, so an unbatched field has shape (n - 1,) or (n - 1, n - 1).
Coarsening halves n; coarse vertex I sits on fine vertex 2I + 1. Everything here is pure array code
on one right-hand side; batch with `jax.vmap` (operators are pytrees with static sizes).

Iteration for A u = f (Briggs, Henson & McCormick, "A Multigrid Tutorial", 2000; Trottenberg,
Oosterlee & Schueller, "Multigrid", 2001):
  weighted Jacobi      u <- u + omega D^{-1} (f - A u)              (a residual update)
  red-black GS         the same with omega = 1, first on red, then on black vertices
  two-grid correction  u <- u + P A_c^{-1} R (f - A u),  R = P^T / 2^d (full weighting, (bi)linear P)
  V/W/F cycles         the coarse solve replaced by 1, 2 (W) or an F then a V cycle, recursively
Coarse operators are rediscretised (constant Poisson) or Galerkin products A_c = R A P, which keep a
9-point stencil per coarse vertex and are the right choice for variable coefficients.
"""
from __future__ import annotations

import itertools
from typing import Callable, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

SMOOTHERS = ("jacobi", "gauss_seidel")
CYCLES = ("V", "W", "F")


def _check_size(name: str, n) -> int:
    if not isinstance(n, (int, np.integer)) or n < 2 or n & (n - 1):
        raise ValueError(f"{name} must be a power of two >= 2 so the grid can be halved down to one "
                         f"unknown; got {n!r}")
    return int(n)


def _check_field(name: str, x, shape: tuple[int, ...]):
    """x as an array, after the static checks (shape, floating dtype); `_finite` checks values."""
    x = jnp.asarray(x)
    if x.shape != shape:
        raise ValueError(f"{name} must have shape {shape} (the operator's interior grid), got {x.shape}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name} must be a floating-point array, got dtype {x.dtype}")
    return x


def _finite(carrier, **fields):
    """`carrier`, with a run-time error unless every named field is finite (`equinox.error_if`).

    The check should ride on a small array that every result depends on: put on a grid-sized
    array, error_if copies it (23 ms of a 0.44 s solve at 2047^2, float32 cycles, one core)."""
    for name, x in fields.items():
        carrier = eqx.error_if(carrier, ~jnp.all(jnp.isfinite(x)), f"{name} must be finite (found NaN or inf)")
    return carrier


def _shift(u, axis: int, offset: int):
    """v[i] = u[i + offset] along `axis` (offset in -1, 0, 1), zero outside (the Dirichlet boundary).

    Built by concatenating a zero slab: XLA on CPU fuses this into the consumer, while pad + slice
    ran about 5x slower in our sweeps (bench_multigrid).
    """
    if offset == 0:
        return u
    zero = jnp.zeros(u.shape[:axis] + (1,) + u.shape[axis + 1:], u.dtype)
    n = u.shape[axis]
    if offset > 0:
        return jnp.concatenate([jax.lax.slice_in_dim(u, 1, n, axis=axis), zero], axis)
    return jnp.concatenate([zero, jax.lax.slice_in_dim(u, 0, n - 1, axis=axis)], axis)


class Poisson(eqx.Module):
    """-Laplace u = f with the (2 ndim + 1)-point stencil (2 ndim u_i - sum of neighbours) / h^2."""

    n: int = eqx.field(static=True)
    ndim: int = eqx.field(static=True)

    def __init__(self, n: int, ndim: int = 2):
        if ndim not in (1, 2):
            raise ValueError(f"ndim must be 1 or 2, got {ndim!r}")
        self.n, self.ndim = _check_size("n", n), ndim

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.n - 1,) * self.ndim

    def __call__(self, u):
        out = 2 * self.ndim * u
        for axis in range(self.ndim):
            out = out - _shift(u, axis, 1) - _shift(u, axis, -1)
        return out * float(self.n**2)

    def apply_padded(self, up):
        """A u from u padded with one zero layer (the boundary values), neighbours as slices of it;
        `__call__` shifts u instead, which fuses better into elementwise consumers (see `residual`)."""
        inner = (slice(1, -1),) * self.ndim
        out = 2 * self.ndim * up[inner]
        for axis in range(self.ndim):
            for start in (0, 2):
                window = list(inner)
                window[axis] = slice(start, up.shape[axis] - 2 + start)
                out = out - up[tuple(window)]
        return out * float(self.n**2)

    def diagonal(self, dtype=float):
        return jnp.asarray(2 * self.ndim * self.n**2, dtype)

    def coarsen(self, galerkin: bool = False):
        """Rediscretisation on the grid with n/2; in 1-D the Galerkin product R A P is the same operator."""
        if galerkin and self.ndim == 2:
            return galerkin_product(self, full_weighting(2), bilinear(2))
        return Poisson(self.n // 2, self.ndim)


class Stencil(eqx.Module):
    """A 2-D operator with a 9-point stencil per vertex: (A u)[i, j] = sum_ab w[i, j, a, b] u[i+a-1, j+b-1]."""

    weights: jax.Array  # (n - 1, n - 1, 3, 3)
    ndim = 2

    @property
    def n(self) -> int:
        return self.weights.shape[0] + 1

    @property
    def shape(self) -> tuple[int, int]:
        return self.weights.shape[:2]

    def __call__(self, u):
        w = self.weights.astype(u.dtype)
        return sum(w[..., a, b] * _shift(_shift(u, 0, a - 1), 1, b - 1) for a in range(3) for b in range(3))

    def apply_padded(self, up):
        """A u from u padded with one zero layer (see `residual`)."""
        w, m = self.weights.astype(up.dtype), self.n - 1
        return sum(w[..., a, b] * up[a:a + m, b:b + m] for a in range(3) for b in range(3))

    def diagonal(self, dtype=float):
        return self.weights[..., 1, 1].astype(dtype)

    def coarsen(self, galerkin: bool = True):
        """Always the Galerkin product R A P (no coefficient field to rediscretise)."""
        return galerkin_product(self, full_weighting(2), bilinear(2))


def diffusion(a) -> Stencil:
    """-div(a grad u) with `a` given on the n x n cells; a face takes the mean of its two cells.

    Vertex (i, j) couples to its east neighbour with -(a[i, j-1] + a[i, j]) / (2 h^2) (the two cells
    sharing that edge), likewise north/south/west; the diagonal is minus the sum of the four.
    """
    a = jnp.asarray(a)
    if a.ndim != 2 or a.shape[0] != a.shape[1]:
        raise ValueError(f"a must be a square (n, n) array of cell coefficients, got shape {a.shape}")
    n = _check_size("a.shape[0] (the number of cells per side)", a.shape[0])
    if not jnp.issubdtype(a.dtype, jnp.floating):
        raise TypeError(f"a must be a floating-point array, got dtype {a.dtype}")
    if not isinstance(a, jax.core.Tracer) and not bool(np.all(np.asarray(a) > 0)):
        raise ValueError("a must be positive and finite everywhere (the diffusion coefficient)")
    a = eqx.error_if(a, ~jnp.all(a > 0) | ~jnp.all(jnp.isfinite(a)), "a must be positive and finite")
    ax = (a[:, :-1] + a[:, 1:]) / 2  # edges along axis 0, (n, n - 1)
    ay = (a[:-1, :] + a[1:, :]) / 2  # edges along axis 1, (n - 1, n)
    east, west, north, south = ax[1:, :], ax[:-1, :], ay[:, 1:], ay[:, :-1]
    inside = jnp.ones((n - 1, n - 1), a.dtype)
    keep = lambda x, axis, offset: x * _shift(inside, axis, offset)  # no coupling to the boundary
    w = jnp.zeros((n - 1, n - 1, 3, 3), a.dtype)
    w = w.at[..., 1, 1].set(east + west + north + south)
    w = w.at[..., 0, 1].set(-keep(west, 0, -1)).at[..., 2, 1].set(-keep(east, 0, 1))
    w = w.at[..., 1, 0].set(-keep(south, 1, -1)).at[..., 1, 2].set(-keep(north, 1, 1))
    return Stencil(w * float(n**2))


def lognormal_coefficients(key, n: int, sigma: float = 1.0, length: float = 0.1, dtype=float):
    """A random cell field a = exp(sigma g), g a unit-variance Gaussian field with correlation length
    `length` (white noise filtered by a Gaussian in Fourier space, periodic), on n x n cells."""
    _check_size("n", n)
    k = np.fft.fftfreq(n, 1 / n)
    kk = k[:, None] ** 2 + k[None, :] ** 2
    filt = jnp.asarray(np.exp(-0.5 * (2 * np.pi * length) ** 2 * kk / 4), dtype)
    spectrum = jnp.fft.fft2(jax.random.normal(key, (n, n), dtype))
    g = jnp.fft.ifft2(spectrum * filt.astype(spectrum.dtype)).real
    g = (g - g.mean()) / g.std()
    return jnp.exp(sigma * g).astype(dtype)


def stencil_of(apply: Callable, m: int, dtype=float) -> Stencil:
    """The 9-point stencil of a linear map on an m x m grid, read off by probing with 9 colourings.

    Vertices coloured by (i mod 3, j mod 3) never share a 3x3 neighbourhood, so one application to
    the indicator of a colour returns, at each vertex, the coupling to its neighbour of that colour.
    """
    i = np.arange(m)
    colour = (i[:, None] % 3) * 3 + i[None, :] % 3
    probes = jnp.asarray(colour[None] == np.arange(9)[:, None, None], dtype)
    out = jax.vmap(apply)(probes)  # (9, m, m)
    a = np.arange(3)
    ci = (i[:, None] + a[None, :] - 1) % 3  # (m, 3): colour index of neighbour row
    idx = ci[:, None, :, None] * 3 + ci[None, :, None, :]  # (m, m, 3, 3)
    w = out[idx, i[:, None, None, None], i[None, :, None, None]]
    inside = ((i[:, None] + a - 1 >= 0) & (i[:, None] + a - 1 < m))
    return Stencil(w * jnp.asarray(inside[:, None, :, None] & inside[None, :, None, :], dtype))


# ---------------------------------------------------------------------------------------------
# Transfers: restriction is a stride-2 convolution, prolongation its transpose.

def full_weighting(ndim: int = 2) -> np.ndarray:
    """[1 2 1]/4 in 1-D, its tensor square [1 2 1; 2 4 2; 1 2 1]/16 in 2-D."""
    s = np.array([1.0, 2.0, 1.0]) / 4
    return s if ndim == 1 else np.outer(s, s)


def bilinear(ndim: int = 2) -> np.ndarray:
    """(Bi)linear interpolation as a stencil: 2^ndim times full weighting."""
    return full_weighting(ndim) * 2**ndim


def _check_grid(name: str, x) -> None:
    if x.ndim not in (1, 2) or len(set(x.shape)) != 1:
        raise ValueError(f"{name} must be a 1-D or square 2-D grid, got shape {x.shape}")


def _transfer_stencil(stencil, default, x, x_name):
    """The 3^d transfer `stencil` (or `default(ndim)`) as an array of x's dtype, after checking
    that x is a square 1-D or 2-D grid and the stencil matches its dimension."""
    _check_grid(x_name, x)
    s = jnp.asarray(default(x.ndim) if stencil is None else stencil, x.dtype)
    if s.shape != (3,) * x.ndim:
        raise ValueError(f"stencil must have shape {(3,) * x.ndim} for a {x.ndim}-D grid, got {s.shape}")
    return s


def restrict(r, stencil=None):
    """Coarse value I = sum_a s[a] r[2I + a]: a stride-2 'VALID' convolution, (n-1) -> (n/2-1) per side.

    Computed as the sum over the 3^d taps of strided slices, which XLA fuses into one loop
    (XLA:CPU runs a one-channel `conv_general_dilated` slowly).
    """
    s = _transfer_stencil(stencil, full_weighting, r, "r")
    m = (r.shape[0] - 1) // 2
    out = jnp.zeros((m,) * r.ndim, r.dtype)
    for a in np.ndindex(*(3,) * r.ndim):
        out = out + s[a] * jax.lax.slice(r, a, tuple(i + 2 * m - 1 for i in a), (2,) * r.ndim)
    return out


def prolong(v, stencil=None):
    """Fine value 2I + a += s[a] v[I]: the transposed convolution of `restrict`, (m) -> (2m + 1) per side.

    Computed per parity class of the fine points: along an axis, fine 2K + 1 takes tap 1 from v[K],
    fine 2K takes tap 0 from v[K] and tap 2 from v[K - 1]; the 2^d classes are then interleaved
    (XLA:CPU runs a transposed, lhs-dilated one-channel convolution slowly).
    """
    s = _transfer_stencil(stencil, bilinear, v, "v")
    m, d = v.shape[0], v.ndim
    vp = jnp.pad(v, 1)  # vp[K + 1] = v[K], zero at K = -1 and K = m
    window = lambda a: slice(0, m + 1) if a == 2 else slice(1, m + 2)  # v[K - a // 2], K = 0..m
    taps = {0: (0, 2), 1: (1,)}
    classes = []
    for parity in itertools.product((0, 1), repeat=d):
        classes.append(sum(s[a] * vp[tuple(map(window, a))]
                           for a in itertools.product(*(taps[p] for p in parity))))
    out = jnp.stack(classes).reshape((2,) * d + (m + 1,) * d)  # (parity per axis, K per axis)
    out = out.transpose([j for i in range(d) for j in (d + i, i)]).reshape((2 * m + 2,) * d)
    return out[(slice(0, 2 * m + 1),) * d]


def galerkin_product(op, restriction, prolongation) -> Stencil:
    """A_c = R A P as a 9-point stencil (R, P given as 3x3 transfer stencils)."""
    m = op.n // 2 - 1
    dtype = op.weights.dtype if isinstance(op, Stencil) else jnp.asarray(restriction).dtype
    return stencil_of(lambda v: restrict(op(prolong(v, prolongation)), restriction), m, dtype)


def hierarchy(op, galerkin: bool | None = None) -> tuple:
    """Operators from the finest grid down to one unknown (n = 2). Galerkin defaults to variable stencils."""
    levels = [op]
    while levels[-1].n > 2:
        levels.append(levels[-1].coarsen() if galerkin is None else levels[-1].coarsen(galerkin))
    return tuple(levels)


# ---------------------------------------------------------------------------------------------
# Smoothers

def jacobi(op, u, f, omega: float = 2 / 3, sweeps: int = 1):
    """Weighted Jacobi: u <- u + omega D^{-1} (f - A u), `sweeps` times."""
    inv_d = omega / op.diagonal(u.dtype)
    return jax.lax.fori_loop(0, sweeps, lambda _, u: u + inv_d * (f - op(u)), u)


def gauss_seidel(op, u, f, sweeps: int = 1):
    """Red-black Gauss-Seidel: each colour set to D^{-1} (f - offdiag(A) u) with the others fixed.

    Red/black are the vertices with even/odd index sum, which decouples 3- and 5-point stencils;
    9-point (Galerkin) stencils need the four parity classes (i mod 2, j mod 2), ordered so that the
    first two are the red ones. Either way it is an exact Gauss-Seidel sweep in that ordering.
    """
    inv_d = 1 / op.diagonal(u.dtype)
    count = 4 if isinstance(op, Stencil) else 2

    def colour_is(k):
        # Colour k: index-sum parity k (count 2); (i + j) % 2 == k // 2 and i % 2 == k % 2 (count 4,
        # (0,0) (1,1) red). k enters before any iota-only term, so XLA cannot hoist a colour array
        # out of the loop (it would be read at every half-sweep, a third more bytes).
        idx = [jax.lax.broadcasted_iota(jnp.int32, u.shape, a) for a in range(u.ndim)]
        if count == 2:
            return (sum(idx, k) & 1) == 0
        i, j = idx
        return (((i + k // 2) + j) & 1 == 0) & ((i + k % 2) & 1 == 0)

    # One loop step per colour: XLA then applies each stencil to a materialised array; unrolled,
    # it fuses the colours and recomputes the previous one at every neighbour (measured 2-10x slower).
    def half_sweep(k, u):
        return jnp.where(colour_is(k % count), u + inv_d * (f - op(u)), u)
    return jax.lax.fori_loop(0, count * sweeps, half_sweep, u)


def residual(op, u, f):
    """f - A u, computed from a zero-padded copy of u so that every neighbour is a plain slice.

    The restriction reads the residual with stride 2 and XLA fuses the two; with shifted
    concatenations (`_shift`) it would first materialise four shifted copies of u (about 4x
    slower at 2047^2, where they fall out of cache).
    """
    return f - op.apply_padded(jnp.pad(u, 1))


def smooth(op, u, f, sweeps: int, smoother: str, omega: float):
    if smoother == "jacobi":
        return jacobi(op, u, f, omega, sweeps)
    return gauss_seidel(op, u, f, sweeps)


# ---------------------------------------------------------------------------------------------
# Cycles

def _check_cycle(kind, smoother, nu1, nu2):
    if kind not in CYCLES:
        raise ValueError(f"kind must be one of {CYCLES}, got {kind!r}")
    if smoother not in SMOOTHERS:
        raise ValueError(f"smoother must be one of {SMOOTHERS}, got {smoother!r}")
    for name, nu in (("nu1", nu1), ("nu2", nu2)):
        if not isinstance(nu, int) or nu < 0:
            raise ValueError(f"{name} must be a non-negative int (smoothing sweeps), got {nu!r}")


def cycle(levels, u, f, kind: str = "V", nu1: int = 2, nu2: int = 1, smoother: str = "gauss_seidel",
          omega: float = 2 / 3, level: int = 0):
    """One multigrid cycle on levels[level:]: pre-smooth, coarse-grid correction, post-smooth.

    The coarse correction solves A_c e = R (f - A u) from e = 0 with one cycle (V), two (W), or an
    F then a V cycle (F); on one unknown it is exact, e = r / A.
    """
    op = levels[level]
    if level == len(levels) - 1:
        return f / op.diagonal(f.dtype)
    u = smooth(op, u, f, nu1, smoother, omega)
    rc = restrict(residual(op, u, f))
    coarse = lambda k, e: cycle(levels, e, rc, k, nu1, nu2, smoother, omega, level + 1)
    ec = jnp.zeros_like(rc)
    if kind == "V":
        ec = coarse("V", ec)
    elif kind == "W":
        ec = jax.lax.fori_loop(0, 2, lambda _, e: coarse("W", e), ec)
    else:
        ec = coarse("V", coarse("F", ec))
    u = u + prolong(ec)
    return smooth(op, u, f, nu2, smoother, omega)


def fmg(levels, f, nu1: int = 2, nu2: int = 1, smoother: str = "gauss_seidel", omega: float = 2 / 3,
        cycles: int = 1):
    """Full multigrid: solve on the coarsest grid, then interpolate up and apply `cycles` V-cycles per level.

    The right-hand sides of the coarse problems are full-weighting restrictions of f.
    """
    f = _check_field("f", f, levels[0].shape)
    _check_cycle("V", smoother, nu1, nu2)
    rhs = [f]
    for _ in levels[1:]:
        rhs.append(restrict(rhs[-1]))
    rhs[-1] = _finite(rhs[-1], f=f)  # every level's result depends on the coarsest one
    u = rhs[-1] / levels[-1].diagonal(f.dtype)
    for level in range(len(levels) - 2, -1, -1):
        u = prolong(u)
        step = lambda _, u: cycle(levels, u, rhs[level], "V", nu1, nu2, smoother, omega, level)
        u = jax.lax.fori_loop(0, cycles, step, u)
    return u


class Solution(NamedTuple):
    u: jax.Array
    residuals: jax.Array  # ||f - A u_k|| / ||f|| for k = 0..max_cycles (NaN after convergence)
    cycles: jax.Array     # cycles taken
    converged: jax.Array


def solve(op, f, u0=None, *, kind: str = "V", nu1: int = 2, nu2: int = 1,
          smoother: str = "gauss_seidel", omega: float = 2 / 3, galerkin: bool | None = None,
          rtol: float = 1e-8, max_cycles: int = 50, cycle_dtype=None) -> Solution:
    """Multigrid cycles until ||f - A u|| <= rtol ||f|| or max_cycles, with the residual history.

    Written as defect correction, u <- u + C(f - A u) with C one cycle from a zero guess (the same
    iterate as cycling on u, since a cycle is affine in u). The residual and the update are computed
    in f's dtype; the cycle runs in `cycle_dtype` (default: f's), and the residual is kept rounded
    to that dtype, the only copy the cycle reads (the history's norms are then exact to its
    epsilon). A float32 cycle inside a float64 correction converges at the float64 rate down to
    float64 residuals, as long as one cycle's reduction (about 0.1) is far above float32 rounding,
    and moves half the bytes (mixed-precision multigrid: Goeddeke, Strzodka & Turek 2007; Tamstorf
    et al., SISC 2021).
    """
    f = _check_field("f", f, op.shape)
    given = {} if u0 is None else {"u0": _check_field("u0", u0, op.shape).astype(f.dtype)}
    _check_cycle(kind, smoother, nu1, nu2)
    if not isinstance(max_cycles, int) or max_cycles < 1:
        raise ValueError(f"max_cycles must be a positive int, got {max_cycles!r}")
    try:
        cdtype = f.dtype if cycle_dtype is None else jnp.dtype(cycle_dtype)
    except TypeError:
        raise TypeError(f"cycle_dtype must be a floating-point dtype, got {cycle_dtype!r}") from None
    if not jnp.issubdtype(cdtype, jnp.floating):
        raise TypeError(f"cycle_dtype must be a floating-point dtype, got {cdtype}")
    levels = jax.tree.map(lambda w: w.astype(cdtype), hierarchy(op, galerkin))
    fnorm = _finite(jnp.linalg.norm(f), f=f, **given)  # the stopping test reads fnorm
    u0 = given.get("u0", jnp.zeros_like(f))
    r0 = (f - op(u0) if given else f).astype(cdtype)
    norm = lambda r: jnp.sqrt(jnp.sum(jnp.square(r.astype(f.dtype))))
    history = jnp.full((max_cycles + 1,), jnp.nan, f.dtype).at[0].set(norm(r0) / fnorm)

    def not_done(state):
        _, _, hist, k = state
        return (k < max_cycles) & (hist[k] > rtol)

    def step(state):
        u, r, hist, k = state
        u = u + cycle(levels, jnp.zeros_like(r), r, kind, nu1, nu2, smoother, omega).astype(f.dtype)
        r = (f - op(u)).astype(cdtype)
        return u, r, hist.at[k + 1].set(norm(r) / fnorm), k + 1

    init = (u0, r0, history, jnp.asarray(0))
    u, _, history, k = jax.lax.while_loop(not_done, step, init)
    return Solution(u, history, k, history[k] <= rtol)


def residual_history(step: Callable, op, f, u0, num_steps: int):
    """Relative residuals ||f - A u_k|| / ||f||, k = 0..num_steps, of the iteration u_{k+1} = step(u_k)."""
    fnorm = jnp.linalg.norm(f)
    res = lambda u: jnp.linalg.norm(f - op(u)) / fnorm

    def body(u, _):
        u = step(u)
        return u, res(u)
    _, hist = jax.lax.scan(body, u0, None, length=num_steps)
    return jnp.concatenate([res(u0)[None], hist])


def sine_coefficients(x):
    """Coefficients of a grid function in the discrete sine modes sin(pi k i / n), k = 1..n-1 per
    axis (a DST-I as a matrix product; the modes are the eigenvectors of the constant-coefficient
    operators, k = n/2 is half the Nyquist frequency)."""
    _check_grid("x", x)
    k = np.arange(1, x.shape[0] + 1)
    s = jnp.asarray(np.sin(np.pi * np.outer(k, k) / (x.shape[0] + 1)), x.dtype)
    return s @ x if x.ndim == 1 else s @ x @ s.T


def high_frequency_share(x):
    """Share of the energy of x in sine modes above half the Nyquist frequency, max_axis k > n/2:
    what the smoother damps and coarse grids cannot represent (claim A5)."""
    energy = sine_coefficients(x) ** 2
    k = np.arange(1, x.shape[0] + 1)
    top = k if x.ndim == 1 else np.maximum.outer(k, k)
    return jnp.sum(jnp.where(top > (x.shape[0] + 1) / 2, energy, 0)) / jnp.sum(energy)


def convergence_factor(error_map: Callable, e0, iterations: int = 50):
    """Asymptotic convergence factor of a linear iteration: power iteration on e <- M e.

    M is the error propagation (the iteration applied with f = 0). The iterate is renormalised each
    step; the result is the geometric mean of ||M e_k|| / ||e_k|| over the last quarter of the
    `iterations`, which tends to the spectral radius of M (the mean also settles complex pairs).
    """
    def body(e, _):
        me = error_map(e / jnp.linalg.norm(e))
        return me, jnp.linalg.norm(me)
    _, ratios = jax.lax.scan(body, e0, None, length=iterations)
    return jnp.exp(jnp.mean(jnp.log(ratios[-max(iterations // 4, 1):])))
