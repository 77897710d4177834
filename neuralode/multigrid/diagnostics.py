"""Measuring iterations: residual histories, convergence factors, and the sine-mode content of grid
functions (what a smoother damps and a coarse grid cannot represent)."""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from neuralode.multigrid.checks import check_count, check_square_grid


def residual_history(step: Callable, op, f, u0, num_steps: int):
    """Relative residuals ||f - A u_k|| / ||f||, k = 0..num_steps, of the iteration u_{k+1} = step(u_k)."""
    check_count("num_steps", num_steps, 0)
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
    check_square_grid("x", x)
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
    check_count("iterations", iterations, 1)

    def body(e, _):
        me = error_map(e / jnp.linalg.norm(e))
        return me, jnp.linalg.norm(me)
    _, ratios = jax.lax.scan(body, e0, None, length=iterations)
    return jnp.exp(jnp.mean(jnp.log(ratios[-max(iterations // 4, 1):])))
