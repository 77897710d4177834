"""The multigrid U-Net: a V-cycle written as a U-Net, with stencils that can be set or learned.

One forward pass runs `cycles` V(nu1, nu2)-cycles for A u = f on a hierarchy of grids n, n/2, ..., 2:

  encoder, level l   nu1 smoothing blocks   one `multigrid.jacobi` sweep each, weight omega_{l,s}
                     restriction conv       f_{l+1} = R_l * (f_l - A_l u)   (3x3, stride 2)
  bottleneck         one unknown            e = f_L / A_L                   (exact coarse solve)
  decoder, level l   long skip + prolong    u <- u + P_l *^T e_{l+1}        (3x3 transposed conv)
                     nu2 smoothing blocks   as in the encoder

Each smoothing block is a residual block whose "field" is the preconditioned residual; A_l u is a
convolution with the operator's stencil (constant for Poisson, a per-vertex 9-point stencil for
variable coefficients). The skip carries the fine-level state u across the coarse levels and the
coarse-grid correction is added to it. The smoother mirrored is weighted Jacobi: it is a
convolution, whereas red-black Gauss-Seidel is two masked half-sweeps and not a single conv.

Parameters (per level, all of them stencils of the classical method): relaxation weights
omega_{l,s} for every pre- and post-smoothing sweep, restriction stencils R_l and prolongation
stencils P_l. They start at the classical cycle's (omega, full weighting, bilinear interpolation),
where the forward pass equals the classical V-cycle to rounding (tests: 1e-12); the constructor
takes other transfer stencils.

Variable coefficients: the network takes the fine operator as an input (the physics, not learned)
and builds its coarse operators as Galerkin products A_{l+1} = R_l A_l P_l from its own current
transfer stencils, so the coarse problems stay consistent with whatever R, P it learns and any
coefficient field is handled without feeding it as an image channel. Learning follows Katrutsa,
Daulbaev & Oseledets, "Deep multigrid: learning prolongation and restriction matrices" (2017), and
Greenfeld, Galun, Kimmel, Yavneh & Basri, "Learning to optimize multigrid PDE solvers" (ICML 2019):
minimise the residual after a few cycles over random log-normal diffusion problems. The cost of a
cycle is that of the classical one (same stencil sizes, same sweeps); only the numbers change.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from neuralode import multigrid as mg


class MultigridUNet(nnx.Module):
    """V(nu1, nu2)-cycles for A u = f with learnable relaxation weights and transfer stencils.

    `__call__(f, operator, u0=None)`: f of shape (n - 1, n - 1), operator a `multigrid.Poisson(n)` or
    `multigrid.Stencil` on that grid; returns u after `cycles` V-cycles started from u0 (default 0).
    """

    def __init__(self, n: int, *, nu1: int = 2, nu2: int = 1, cycles: int = 1, omega: float = 0.8,
                 galerkin: bool = True, restriction=None, prolongation=None):
        """V(nu1, nu2)-cycles with relaxation weight omega for every sweep and the given transfer
        stencils: one 3x3 stencil for every level, or one per level, shape (depth, 3, 3), depth =
        log2(n) - 1. None (the default) is full weighting / bilinear interpolation on every level,
        so `MultigridUNet(n, omega=w)` is the classical cycle with Jacobi weight w, where learning
        starts. With galerkin=True the coarse operators are the Galerkin products of the network's
        own transfer stencils; with False they are rediscretised, as in
        `multigrid.hierarchy(op, galerkin=False)`."""
        mg.check_grid_size("n", n)
        for name, v, minimum in (("nu1", nu1, 0), ("nu2", nu2, 0), ("cycles", cycles, 1)):
            mg.check_count(name, v, minimum)
        if not isinstance(galerkin, bool):
            raise TypeError(f"galerkin must be True or False, got {galerkin!r}")
        self.n, self.nu1, self.nu2, self.cycles, self.galerkin = n, nu1, nu2, cycles, galerkin
        depth = int(math.log2(n)) - 1  # levels with a coarser level below them
        self.pre_omega = nnx.Param(jnp.asarray(np.full((depth, nu1), omega)))  # not weak-typed
        self.post_omega = nnx.Param(jnp.asarray(np.full((depth, nu2), omega)))
        self.restriction = nnx.Param(_per_level("restriction", restriction, mg.full_weighting(2), depth))
        self.prolongation = nnx.Param(_per_level("prolongation", prolongation, mg.bilinear(2), depth))

    def operators(self, operator) -> list:
        """The operator on every level, finest first."""
        ops = [operator]
        for level in range(self.restriction.shape[0]):
            if self.galerkin:
                ops.append(mg.galerkin_product(ops[-1], self.restriction[level], self.prolongation[level]))
            else:
                ops.append(ops[-1].coarsen(galerkin=False))
        return ops

    def smoothing_block(self, op, u, f, omega):
        """A residual block: one `multigrid.jacobi` sweep with weight omega."""
        return mg.relax(op, u, f, omega / op.diagonal(u.dtype))

    def v_cycle(self, ops, u, f, level: int = 0):
        op = ops[level]
        if level == len(ops) - 1:  # bottleneck: one unknown, solved exactly
            return f / op.diagonal(f.dtype)
        pre, post = self.pre_omega[level].astype(f.dtype), self.post_omega[level].astype(f.dtype)
        for s in range(self.nu1):
            u = self.smoothing_block(op, u, f, pre[s])
        coarse_f = mg.restrict(mg.residual(op, u, f), self.restriction[level].astype(f.dtype))
        coarse_e = self.v_cycle(ops, jnp.zeros_like(coarse_f), coarse_f, level + 1)
        u = u + mg.prolong(coarse_e, self.prolongation[level].astype(f.dtype))  # long skip + correction
        for s in range(self.nu2):
            u = self.smoothing_block(op, u, f, post[s])
        return u

    def __call__(self, f, operator, u0=None, cycles: int | None = None):
        cycles = self.cycles if cycles is None else mg.check_count("cycles", cycles, 1)
        mg.check_operator("operator", operator)
        if operator.ndim != 2 or operator.n != self.n:
            raise ValueError(f"operator must be a 2-D operator on the grid with n = {self.n}, "
                             f"got ndim={operator.ndim}, n={operator.n}")
        f = mg.check_field("f", f, operator.shape)
        given = {} if u0 is None else {"u0": mg.check_field("u0", u0, operator.shape).astype(f.dtype)}
        f = mg.check_finite(f, f=f, **given)  # every cycle reads f (grids here are small: no copy to avoid)
        u0 = given.get("u0", jnp.zeros_like(f))
        ops = self.operators(operator)
        return jax.lax.fori_loop(0, cycles, lambda _, u: self.v_cycle(ops, u, f), u0)


def _per_level(name: str, stencil, default: np.ndarray, depth: int) -> jax.Array:
    """`stencil` (None: `default`), a 3x3 stencil or one per level, as an array (depth, 3, 3) of
    the default's dtype."""
    default = jnp.asarray(default)
    value = default if stencil is None else jnp.asarray(stencil, default.dtype)
    if value.shape not in ((3, 3), (depth, 3, 3)):
        raise ValueError(f"{name} must be a 3x3 stencil or one per level, shape {(depth, 3, 3)}, "
                         f"got {value.shape}")
    return jnp.broadcast_to(value, (depth, 3, 3))
