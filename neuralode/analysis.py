"""Measuring what a network does to signals and gradients: the tools behind the claims in docs/claims.md.

Everything here differentiates real functions (nnx modules, `odeint` solves) with JAX's autodiff;
the closed forms these measurements are checked against live in the tests and experiments.

- Gradient flow: ||dL/dx_l|| at every layer of a stack (backprop one layer at a time, which is the
  discrete adjoint recursion lambda_l = J_l^T lambda_{l+1}), and per-parameter gradient norms.
- Linearisation: the Jacobian of a field or a step as a matrix, its eigenvalues and singular values,
  and its spectral norm by matrix-free power iteration on J^T J.
- Lipschitz upper bounds: Lip(A_L o s o ... o s o A_1) <= Lip(s)^(L-1) prod_i ||A_i||_2, and
  Lip(x + g_i(x) composed) <= prod_i (1 + Lip(g_i)).
- Stability: the amplification factor |R(h lambda)| of a fixed-step solver (Hairer & Wanner II, IV.2).
- Piecewise-linear geometry: linear pieces (breakpoints) of a ReLU network along a segment of inputs,
  and peaks of a sampled function.
"""
from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.flatten_util import ravel_pytree

from neuralode.fields import DepthStack
from neuralode.integrate import odeint

# ---------------------------------------------------------------------------------------------
# Gradient flow


def layer_activations(layers: Sequence[Callable], x) -> list:
    """[x_0, x_1, ..., x_L] with x_{l+1} = layers[l](x_l)."""
    xs = [x]
    for layer in layers:
        xs.append(layer(xs[-1]))
    return xs


def layer_gradient_norms(layers: Sequence[Callable], x, cotangent=None) -> np.ndarray:
    """||lambda_l|| for l = 0..L, the gradient of <cotangent, x_L> with respect to each activation x_l.

    The backward recursion lambda_L = cotangent, lambda_l = J_l(x_l)^T lambda_{l+1} is backprop
    (and the discrete adjoint of optimal control); each J_l^T is applied with `jax.vjp`, so the result
    equals `jax.grad` through the whole stack. The default cotangent is the all-ones vector scaled to
    unit norm, so entry 0 is the gain ||J^T u|| of the whole network for that u.
    """
    xs, pullbacks = [x], []
    for layer in layers:
        y, pullback = jax.vjp(layer, xs[-1])
        xs.append(y)
        pullbacks.append(pullback)
    if cotangent is None:
        cotangent = jnp.ones_like(xs[-1]) / np.sqrt(xs[-1].size)
    adjoint, norms = cotangent, [float(jnp.linalg.norm(cotangent))]
    for pullback in reversed(pullbacks):
        (adjoint,) = pullback(adjoint)
        norms.append(float(jnp.linalg.norm(adjoint)))
    return np.array(norms[::-1])


def parameter_gradient_norms(grads) -> dict[str, float]:
    """{path: ||g||_F} for every leaf of a gradient pytree (e.g. an `nnx.State` from `nnx.grad`)."""
    leaves = jax.tree_util.tree_leaves_with_path(grads)
    return {jax.tree_util.keystr(path): float(jnp.linalg.norm(jnp.ravel(leaf))) for path, leaf in leaves}


def solve_gradient_norms(f, y0, ts, cotangent=None, **odeint_kwargs) -> np.ndarray:
    """||dL/dy(t_k)|| for every k of an `odeint` solve, with L = <cotangent, y(t_N)>.

    Each interval [t_k, t_{k+1}] is treated as one layer y(t_k) -> y(t_{k+1}) and differentiated by
    the solve's own adjoint. Correct for fields that depend on t, not on the step counter, so a
    `DepthStack` (slice k for step k) is refused: each re-started interval would use slice 0.
    """
    if isinstance(f, DepthStack):
        raise TypeError("solve_gradient_norms needs a weight-tied field; for a DepthStack use "
                        "layer_gradient_norms on its per-step Euler blocks")
    ts = jnp.asarray(ts)
    layers = [lambda y, k=k: odeint(f, y, ts[k:k + 2], **odeint_kwargs)[-1] for k in range(len(ts) - 1)]
    return layer_gradient_norms(layers, y0, cotangent)


# ---------------------------------------------------------------------------------------------
# Linearisation


def jacobian_matrix(fn: Callable, x) -> jax.Array:
    """The Jacobian of `fn` at `x` as an (out.size, x.size) matrix (forward mode, `jax.jacfwd`)."""
    flat_x, unravel = ravel_pytree(x)
    return jax.jacfwd(lambda v: ravel_pytree(fn(unravel(v)))[0])(flat_x)


def jacobian_spectrum(fn: Callable, x) -> tuple[np.ndarray | None, np.ndarray]:
    """(eigenvalues, singular values) of the Jacobian of `fn` at `x`; eigenvalues None if not square.

    Eigenvalues h lambda of a field's Jacobian are what a solver's stability region must contain;
    the largest singular value bounds the local gain of a block.
    """
    jac = np.asarray(jacobian_matrix(fn, x))
    eigenvalues = np.linalg.eigvals(jac) if jac.shape[0] == jac.shape[1] else None
    return eigenvalues, np.linalg.svd(jac, compute_uv=False)


def spectral_norm(fn: Callable, x, *, key=None, iterations: int = 200, tol: float = 1e-12) -> float:
    """||J||_2 of `fn` at `x` by power iteration on J^T J, matrix-free (one jvp and one vjp per step).

    For a linear or affine `fn` (a dense or convolutional layer) this is its operator norm, which no
    dense matrix is formed for. Converges at the rate (sigma_2 / sigma_1)^2 per iteration; stops when
    the estimate changes by less than `tol` relative.
    """
    y, pushforward = jax.linearize(fn, x)
    pullback = jax.linear_transpose(pushforward, x)
    key = jax.random.key(0) if key is None else key
    leaves, treedef = jax.tree.flatten(x)
    keys = jax.random.split(key, len(leaves))
    v = treedef.unflatten([jax.random.normal(k, leaf.shape, leaf.dtype) for k, leaf in zip(keys, leaves)])

    def normalise(tree):
        norm = jnp.sqrt(sum(jnp.vdot(leaf, leaf).real for leaf in jax.tree.leaves(tree)))
        return jax.tree.map(lambda leaf: leaf / norm, tree), norm

    v, _ = normalise(v)
    sigma = 0.0
    for _ in range(iterations):
        (w,) = pullback(pushforward(v))
        v, norm = normalise(w)
        new_sigma = float(jnp.sqrt(norm))
        if abs(new_sigma - sigma) <= tol * new_sigma:
            return new_sigma
        sigma = new_sigma
    return sigma


# ---------------------------------------------------------------------------------------------
# Lipschitz bounds


def lipschitz_upper_bound(affine_layers: Sequence[Callable], x, activation_lipschitz: float = 1.0,
                          **power_iteration) -> float:
    """Upper bound on the Lipschitz constant (2-norm) of A_L o s o ... o s o A_1 at any input:

        Lip <= Lip(s)^(L-1) prod_i ||A_i||_2,

    with ||A_i||_2 the operator norm of affine layer i (dense or convolutional), found by power
    iteration at an input of the right shape (`x` is passed through the layers to get the shapes;
    the activation in between does not change shapes). Tight only when the top singular directions
    of consecutive layers align; it is an upper bound, never an estimate from below.
    """
    bound, h = 1.0, x
    for i, layer in enumerate(affine_layers):
        bound *= spectral_norm(layer, h, **power_iteration)
        h = layer(h)
    return bound * activation_lipschitz ** (len(affine_layers) - 1)


def linear_layers(module: nnx.Module) -> list[nnx.Module]:
    """Every `nnx.Linear` and `nnx.Conv` inside `module`, in the order nnx visits them."""
    return [node for _, node in nnx.iter_graph(module) if isinstance(node, (nnx.Linear, nnx.Conv))]


def residual_lipschitz_bound(branch_bounds: Sequence[float], identity_scale: float = 1.0,
                             branch_scale: float = 1.0) -> float:
    """Lip of the composition of blocks x -> c x + alpha g_i(x): at most prod_i (|c| + |alpha| Lip(g_i)).

    With c = 1 - beta and alpha <= beta / Lip(g) every factor is at most 1 (the scaled block of B4).
    """
    return float(np.prod([abs(identity_scale) + abs(branch_scale) * k for k in branch_bounds]))


# ---------------------------------------------------------------------------------------------
# Stability of fixed-step solvers


def amplification_factor(solver, z) -> np.ndarray:
    """How much one step multiplies a mode with h lambda = z: |R(z)| for a Runge-Kutta method.

    For `Leapfrog` (on q'' = -omega^2 q, eigenvalues +-i omega) the factor is the spectral radius of
    its amplification matrix at x = h omega, so `z` must be purely imaginary. A mode is stable when
    the factor is at most 1 (the stability region, Hairer & Wanner II, IV.2).
    """
    z = np.asarray(z, dtype=complex)
    if hasattr(solver, "stability_function"):
        return np.abs(solver.stability_function(z))
    if hasattr(solver, "amplification_matrix"):
        if np.any(z.real != 0):
            raise ValueError(f"{solver!r} is defined on purely imaginary h lambda; got real parts {z.real}")
        return np.vectorize(
            lambda x: np.max(np.abs(np.linalg.eigvals(solver.amplification_matrix(x)))))(z.imag)
    raise TypeError(f"{solver!r} has neither a stability function nor an amplification matrix")


def in_stability_region(solver, z, tol: float = 1e-12) -> np.ndarray:
    """Whether each h lambda = z lies in the solver's (closed) stability region, |R(z)| <= 1."""
    return amplification_factor(solver, z) <= 1.0 + tol


# ---------------------------------------------------------------------------------------------
# Piecewise-linear geometry


def directional_slopes(fn: Callable, x0, x1, num: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact derivatives d/ds fn(x0 + s (x1 - x0)) at the midpoints s of `num` equal cells of [0, 1].

    Returns (s, slopes) with slopes of shape (num, out.size); computed with `jax.jvp`, so for a
    piecewise-linear fn they are the exact slopes of the pieces the midpoints fall in.
    """
    s = (np.arange(num) + 0.5) / num
    direction = x1 - x0

    def slope(si):
        _, tangent = jax.jvp(fn, (x0 + si * direction,), (direction,))
        return jnp.ravel(tangent)

    return s, np.asarray(jax.vmap(slope)(jnp.asarray(s, dtype=jnp.result_type(x0))))


def count_linear_pieces(fn: Callable, x0, x1, num: int = 100_000, rtol: float = 1e-9) -> int:
    """Number of linear pieces of a piecewise-linear fn along the segment x0 -> x1 (breakpoints + 1).

    Counts changes of the exact slope between consecutive cell midpoints; a piece shorter than a
    cell can be missed, so the count is a lower bound that is exact once it stops growing with `num`.
    Slopes count as equal when they differ by less than `rtol` times the largest slope.
    """
    _, slopes = directional_slopes(fn, x0, x1, num)
    scale = max(float(np.max(np.abs(slopes))), np.finfo(slopes.dtype).tiny)
    changes = np.max(np.abs(np.diff(slopes, axis=0)), axis=1) > rtol * scale
    return int(np.sum(changes)) + 1


def count_peaks(values) -> int:
    """Strict interior local maxima of a sampled function, a flat top counting once."""
    v = np.asarray(values)
    v = v[np.concatenate([[True], np.diff(v) != 0])]  # collapse runs of equal values
    return int(np.sum((v[1:-1] > v[:-2]) & (v[1:-1] > v[2:])))
