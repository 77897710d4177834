"""Operators for -div(a grad u) on the grids, their coarse-grid hierarchies, and the residual f - A u.

`Poisson` (a = 1) is matrix-free with a static size; `Stencil` holds a 9-point stencil per vertex
(variable coefficients, Galerkin products). Coarse operators are rediscretised on the coarse grid
or Galerkin products A_c = R A P, which keep a 9-point stencil per coarse vertex and are the right
choice for variable coefficients (Alcouffe, Brandt, Dendy & Painter, SISC 1981).
"""
from __future__ import annotations

from typing import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from neuralode.multigrid.checks import check_grid_size
from neuralode.multigrid.transfers import bilinear, full_weighting, prolong, restrict


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


def _check_coarsenable(op) -> None:
    if op.n == 2:
        raise ValueError("the operator acts on one unknown (n = 2): there is no coarser grid")


class Poisson(eqx.Module):
    """-Laplace u = f with the (2 ndim + 1)-point stencil (2 ndim u_i - sum of neighbours) / h^2."""

    n: int = eqx.field(static=True)
    ndim: int = eqx.field(static=True)

    def __init__(self, n: int, ndim: int = 2):
        if ndim not in (1, 2):
            raise ValueError(f"ndim must be 1 or 2, got {ndim!r}")
        self.n, self.ndim = check_grid_size("n", n), ndim

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
        """Rediscretisation on the grid with n/2, or the Galerkin product R A P (galerkin=True), a
        9-point stencil in 2-D; in 1-D R A P is the rediscretised operator itself."""
        _check_coarsenable(self)
        if galerkin and self.ndim == 2:
            return galerkin_product(self, full_weighting(2), bilinear(2))
        return Poisson(self.n // 2, self.ndim)


def check_weights(name: str, weights) -> None:
    """`weights` must be one floating 3x3 stencil per interior vertex, shape (n - 1, n - 1, 3, 3)."""
    shape = tuple(getattr(weights, "shape", ()))
    m = shape[0] if shape else 0
    if len(shape) != 4 or shape != (m, m, 3, 3) or m < 1 or (m + 1) & m:
        batched = " (a batch of stencils: map over it with jax.vmap)" if len(shape) > 4 else ""
        raise ValueError(f"{name} must have shape (n - 1, n - 1, 3, 3), a 3x3 stencil per interior vertex "
                         f"of a grid with n a power of two, got {shape}{batched}")
    if not jnp.issubdtype(weights.dtype, jnp.floating):
        raise TypeError(f"{name} must be a floating-point array, got dtype {weights.dtype}")


class Stencil(eqx.Module):
    """A 2-D operator with a 9-point stencil per vertex: (A u)[i, j] = sum_ab w[i, j, a, b] u[i+a-1, j+b-1].

    `coefficients` is the cell field a when the stencil discretises -div(a grad u) (`diffusion` sets
    it), so that `coarsen(galerkin=False)` can rediscretise; None for other stencils (Galerkin
    products, `stencil_of`), which coarsen by Galerkin only.
    """

    weights: jax.Array  # (n - 1, n - 1, 3, 3)
    coefficients: jax.Array | None = None  # (n, n) cells, or None
    ndim = 2

    def __check_init__(self):
        check_weights("weights", self.weights)
        if self.coefficients is not None and jnp.shape(self.coefficients) != (self.n, self.n):
            raise ValueError(f"coefficients must be the (n, n) cells of the weights' grid, "
                             f"{(self.n, self.n)}, got shape {jnp.shape(self.coefficients)}")

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
        """The Galerkin product R A P (full weighting, bilinear), or with galerkin=False the same
        `diffusion` discretisation on the grid with n/2, each coarse cell taking the mean of the four
        fine cells it covers (only for stencils that carry their `coefficients`)."""
        _check_coarsenable(self)
        if galerkin:
            return galerkin_product(self, full_weighting(2), bilinear(2))
        if self.coefficients is None:
            raise ValueError("galerkin=False rediscretises the coefficient field, and this Stencil has none "
                             "(only diffusion(a) keeps its a); coarsen it with galerkin=True")
        m = self.n // 2
        return _diffusion_stencil(self.coefficients.reshape(m, 2, m, 2).mean(axis=(1, 3)))


def diffusion(a) -> Stencil:
    """-div(a grad u) with `a` given on the n x n cells; a face takes the mean of its two cells.

    Vertex (i, j) couples to its east neighbour with -(a[i, j-1] + a[i, j]) / (2 h^2) (the two cells
    sharing that edge), likewise north/south/west; the diagonal is minus the sum of the four.
    """
    a = jnp.asarray(a)
    if a.ndim != 2 or a.shape[0] != a.shape[1]:
        raise ValueError(f"a must be a square (n, n) array of cell coefficients, got shape {a.shape}")
    check_grid_size("a.shape[0] (the number of cells per side)", a.shape[0])
    if not jnp.issubdtype(a.dtype, jnp.floating):
        raise TypeError(f"a must be a floating-point array, got dtype {a.dtype}")
    if not isinstance(a, jax.core.Tracer) and not bool(np.all(np.asarray(a) > 0)):
        raise ValueError("a must be positive and finite everywhere (the diffusion coefficient)")
    return _diffusion_stencil(eqx.error_if(a, ~jnp.all(a > 0) | ~jnp.all(jnp.isfinite(a)),
                                           "a must be positive and finite"))


def _diffusion_stencil(a) -> Stencil:
    """`diffusion` without the checks of `a` (for coarse fields averaged from a checked one)."""
    n = a.shape[0]
    ax = (a[:, :-1] + a[:, 1:]) / 2  # edges along axis 0, (n, n - 1)
    ay = (a[:-1, :] + a[1:, :]) / 2  # edges along axis 1, (n - 1, n)
    east, west, north, south = ax[1:, :], ax[:-1, :], ay[:, 1:], ay[:, :-1]
    inside = jnp.ones((n - 1, n - 1), a.dtype)
    keep = lambda x, axis, offset: x * _shift(inside, axis, offset)  # no coupling to the boundary
    w = jnp.zeros((n - 1, n - 1, 3, 3), a.dtype)
    w = w.at[..., 1, 1].set(east + west + north + south)
    w = w.at[..., 0, 1].set(-keep(west, 0, -1)).at[..., 2, 1].set(-keep(east, 0, 1))
    w = w.at[..., 1, 0].set(-keep(south, 1, -1)).at[..., 1, 2].set(-keep(north, 1, 1))
    return Stencil(w * float(n**2), a)


def lognormal_coefficients(key, n: int, sigma: float = 1.0, length: float = 0.1, dtype=float):
    """A random cell field a = exp(sigma g), g a unit-variance Gaussian field with correlation length
    `length` (white noise filtered by a Gaussian in Fourier space, periodic), on n x n cells."""
    check_grid_size("n", n)
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


def galerkin_product(op, restriction, prolongation) -> Stencil:
    """A_c = R A P as a 9-point stencil (R, P given as 3x3 transfer stencils)."""
    m = op.n // 2 - 1
    dtype = op.weights.dtype if isinstance(op, Stencil) else jnp.asarray(restriction).dtype
    return stencil_of(lambda v: restrict(op(prolong(v, prolongation)), restriction), m, dtype)


def check_operator(name: str, op):
    """`op`, after checking it is a `Poisson` or a `Stencil` whose weights still have their shape."""
    if isinstance(op, Stencil):
        check_weights(f"{name}.weights", op.weights)
    elif not isinstance(op, Poisson):
        raise TypeError(f"{name} must be a multigrid Poisson or Stencil operator, got {type(op).__name__}")
    return op


def hierarchy(op, galerkin: bool | None = None) -> tuple:
    """Operators from `op`'s grid down to one unknown (n = 2), finest first.

    galerkin=True: Galerkin products R A P (full weighting, bilinear); False: rediscretised on each
    coarse grid (`Poisson` at n/2, a `diffusion` stencil from its averaged coefficients); None: each
    operator's default, rediscretised for `Poisson` and Galerkin for `Stencil`.
    """
    check_operator("op", op)
    if galerkin is not None and not isinstance(galerkin, (bool, np.bool_)):
        raise TypeError(f"galerkin must be True, False or None (each operator's default), got {galerkin!r}")
    levels = [op]
    while levels[-1].n > 2:
        levels.append(levels[-1].coarsen() if galerkin is None else levels[-1].coarsen(galerkin))
    return tuple(levels)


def check_levels(levels) -> tuple:
    """`levels` as a tuple, after checking it is a hierarchy: operators on grids n, n/2, ..., 2."""
    if not isinstance(levels, (tuple, list)) or not levels:
        raise ValueError("levels must be a non-empty sequence of operators from the finest grid down to "
                         f"one unknown, as hierarchy(op) returns them; got {levels!r}")
    for k, op in enumerate(levels):
        check_operator(f"levels[{k}]", op)
    ns = [op.n for op in levels]
    if ns[-1] != 2 or any(coarse != fine // 2 for fine, coarse in zip(ns, ns[1:])) or \
            len({op.ndim for op in levels}) != 1:
        raise ValueError("levels must halve n from the finest grid down to n = 2 (one unknown), finest "
                         f"first and of one dimension, as hierarchy(op) returns them; got n = {ns}")
    return tuple(levels)


def residual(op, u, f):
    """f - A u, computed from a zero-padded copy of u so that every neighbour is a plain slice.

    The restriction reads the residual with stride 2 and XLA fuses the two; with shifted
    concatenations (`_shift`) it would first materialise four shifted copies of u (about 4x
    slower at 2047^2, where they fall out of cache).
    """
    return f - op.apply_padded(jnp.pad(u, 1))
