"""Geometric multigrid for -div(a grad u) = f on the unit interval/square, Dirichlet u = 0.

Grids are cell-vertex: n intervals per side (n a power of two), h = 1/n, and the unknowns are the
n - 1 interior vertices per side, so an unbatched field has shape (n - 1,) or (n - 1, n - 1).
Coarsening halves n; coarse vertex I sits on fine vertex 2I + 1. Everything here is pure array code
on one right-hand side; batch with `jax.vmap` (operators are pytrees with static sizes).

  operators    `Poisson`, `Stencil` (`diffusion`, `galerkin_product`), `hierarchy`, `residual`
  smoothers    `jacobi` (its update rule, `relax`, is every smoothing step here), red-black
               `gauss_seidel`
  transfers    `restrict` (full weighting), `prolong` (bilinear), any 3^d stencil
  cycles       `cycle` (V, W, F), `fmg`, `solve` (cycles as a defect correction to a tolerance)
  diagnostics  `residual_history`, `convergence_factor`, `sine_coefficients`, `high_frequency_share`
  checks       argument checks, shared with the multigrid U-Net (`neuralode.models.MultigridUNet`)
"""
from neuralode.multigrid.cycles import CYCLES, Solution, cycle, fmg, solve
from neuralode.multigrid.diagnostics import (convergence_factor, high_frequency_share, residual_history,
                                             sine_coefficients)
from neuralode.multigrid.checks import check_count, check_field, check_finite, check_grid_size
from neuralode.multigrid.operators import (Poisson, Stencil, check_levels, check_operator, diffusion,
                                           galerkin_product, hierarchy, lognormal_coefficients, residual,
                                           stencil_of)
from neuralode.multigrid.smoothers import SMOOTHERS, gauss_seidel, jacobi, relax, smooth
from neuralode.multigrid.transfers import bilinear, full_weighting, prolong, restrict

__all__ = [
    "CYCLES", "SMOOTHERS", "Poisson", "Solution", "Stencil", "bilinear", "check_count", "check_field",
    "check_finite", "check_grid_size", "check_levels", "check_operator", "convergence_factor", "cycle",
    "diffusion", "fmg", "full_weighting", "galerkin_product", "gauss_seidel", "hierarchy",
    "high_frequency_share", "jacobi", "lognormal_coefficients", "prolong", "relax", "residual",
    "residual_history", "restrict", "sine_coefficients", "smooth", "solve", "stencil_of",
]
