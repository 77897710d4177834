"""Test problems with known solutions, the slope fit used to measure convergence orders, and the XLA
flags of a long subprocess."""
import os

import jax.numpy as jnp
import numpy as np
import scipy.linalg

# y' = A y with eigenvalues -0.1 +- 2i and -0.5: rotation with slow decay, plus a decaying mode.
A = jnp.array([[-0.1, -2.0, 0.0], [2.0, -0.1, 0.3], [0.0, 0.0, -0.5]])
Y0 = jnp.array([1.0, 0.5, -0.3])


def linear_field(t, y, args):
    return A @ y


def linear_exact(t):
    return jnp.asarray(scipy.linalg.expm(np.asarray(A) * t) @ np.asarray(Y0))


def riccati_field(t, y, args):
    """y' = -2 t y^2, non-autonomous and nonlinear, with y(t) = 1 / (1 + t^2) for y(0) = 1."""
    return -2.0 * t * y**2


def riccati_exact(t):
    return 1.0 / (1.0 + t**2)


def oscillator_field(t, y, args):
    """Harmonic oscillator q' = p, p' = -q as a separable pair (q, p)."""
    q, p = y
    return (p, -q)


def convergence_order(step_counts, errors) -> float:
    """Least-squares slope of log(error) against log(h), h = 1 / steps."""
    h = 1.0 / np.asarray(step_counts, dtype=float)
    return float(np.polyfit(np.log(h), np.log(np.asarray(errors, dtype=float)), 1)[0])


def xla_flags_for_long_runs() -> str:
    """conftest's XLA_FLAGS without optimisation level 0, for a subprocess whose runtime outweighs
    its compilation (quick training, init_variance's many forward passes). The fusion-emitter flag
    stays: it saves compilation and its code runs as fast."""
    return os.environ["XLA_FLAGS"].replace("--xla_backend_optimization_level=0", "").strip()
