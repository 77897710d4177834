"""Grid transfers: restriction is a stride-2 convolution with a 3^d stencil, prolongation its transpose.

With full weighting R and (bi)linear interpolation P, R = P^T / 2^d (Briggs, Henson & McCormick,
"A Multigrid Tutorial", 2000, ch. 3).
"""
from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np

from neuralode.multigrid.checks import check_square_grid


def full_weighting(ndim: int = 2) -> np.ndarray:
    """[1 2 1]/4 in 1-D, its tensor square [1 2 1; 2 4 2; 1 2 1]/16 in 2-D."""
    s = np.array([1.0, 2.0, 1.0]) / 4
    return s if ndim == 1 else np.outer(s, s)


def bilinear(ndim: int = 2) -> np.ndarray:
    """(Bi)linear interpolation as a stencil: 2^ndim times full weighting."""
    return full_weighting(ndim) * 2**ndim


def _transfer_stencil(stencil, default, x, x_name):
    """The 3^d transfer `stencil` (or `default(ndim)`) as an array of x's dtype, after checking
    that x is a square 1-D or 2-D grid and the stencil matches its dimension."""
    check_square_grid(x_name, x)
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
    if r.shape[0] % 2 == 0 or r.shape[0] < 3:
        raise ValueError(f"r must have an odd number 2m + 1 >= 3 of points per side (the n - 1 interior "
                         f"vertices of a grid with n intervals, n even), got shape {r.shape}")
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
