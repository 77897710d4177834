"""The multigrid U-Net with stencil weights is the classical V-cycle; its parameters train."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from neuralode import multigrid as mg
from neuralode.models import MultigridUNet


def _classical(op, f, galerkin, cycles, omega, nu1=2, nu2=1):
    levels = mg.hierarchy(op, galerkin)
    step = lambda _, u: mg.cycle(levels, u, f, "V", nu1, nu2, "jacobi", omega)
    return jax.lax.fori_loop(0, cycles, step, jnp.zeros_like(f))


@pytest.mark.parametrize("galerkin,variable", [(False, False), (True, False), (True, True)])
def test_the_initial_network_is_the_classical_vcycle(galerkin, variable):
    n, cycles, omega = 32, 3, 0.8
    op = mg.diffusion(mg.lognormal_coefficients(jax.random.key(1), n)) if variable else mg.Poisson(n)
    f = jnp.asarray(np.random.default_rng(0).standard_normal(op.shape))
    model = MultigridUNet(n, cycles=cycles, omega=omega, galerkin=galerkin)
    u_net = jax.jit(lambda f: model(f, op))(f)
    u_mg = jax.jit(lambda f: _classical(op, f, galerkin, cycles, omega))(f)
    np.testing.assert_allclose(u_net, u_mg, rtol=0, atol=1e-12 * float(jnp.max(jnp.abs(u_mg))))
    # and it is a solver: three V(2,1)-Jacobi cycles cut the residual by well over 10
    assert float(jnp.linalg.norm(f - op(u_net)) / jnp.linalg.norm(f)) < 0.1 ** 1.5


def test_error_propagation_factor_matches_residual_decay():
    # The U-Net with f = 0 is the error propagation; its spectral radius for V(2,1) weighted Jacobi
    # on 2-D Poisson is about 0.1-0.2 (Trottenberg et al. 2001, ch. 2), independent of the weights' origin.
    n = 32
    model = MultigridUNet(n, galerkin=False)
    op, zero = mg.Poisson(n), jnp.zeros((n - 1, n - 1))
    e0 = jnp.asarray(np.random.default_rng(1).standard_normal(op.shape))
    rho = float(jax.jit(lambda e: mg.convergence_factor(lambda e: model(zero, op, e), e, 40))(e0))
    assert 0.05 < rho < 0.25


def test_gradients_reach_every_stencil_and_one_step_lowers_the_loss():
    n = 8
    model = MultigridUNet(n, cycles=1, omega=0.5)
    keys = jax.random.split(jax.random.key(0), 4)
    ops = jax.vmap(lambda k: mg.diffusion(mg.lognormal_coefficients(k, n)))(keys)
    fs = jax.random.normal(jax.random.key(1), (4, n - 1, n - 1))

    def loss(model):
        res = jax.vmap(lambda f, op: jnp.linalg.norm(f - op(model(f, op))) / jnp.linalg.norm(f))(fs, ops)
        return jnp.mean(jnp.log(res))

    optimizer = nnx.Optimizer(model, optax.sgd(1e-2), wrt=nnx.Param)
    value_and_grad = nnx.jit(nnx.value_and_grad(loss))  # one compilation for both evaluations
    before, grads = value_and_grad(model)
    for leaf in jax.tree.leaves(nnx.state(grads, nnx.Param)):
        assert bool(jnp.all(jnp.isfinite(leaf))) and float(jnp.max(jnp.abs(leaf))) > 0
    optimizer.update(model, grads)
    assert float(value_and_grad(model)[0]) < float(before)


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="n must be a power of two"):
        MultigridUNet(24)
    with pytest.raises(ValueError, match="cycles must be"):
        MultigridUNet(16, cycles=0)
    with pytest.raises(TypeError, match="galerkin must be True or False"):
        MultigridUNet(16, galerkin="no")
    model = MultigridUNet(16)
    with pytest.raises(ValueError, match="cycles must be an int >= 1"):
        model(jnp.zeros((15, 15)), mg.Poisson(16), cycles=0)
    with pytest.raises(ValueError, match="galerkin=False rediscretises the coefficient field"):
        MultigridUNet(16, galerkin=False)(jnp.zeros((15, 15)), mg.Stencil(jnp.ones((15, 15, 3, 3))))
    with pytest.raises(ValueError, match="operator must be a 2-D operator on the grid with n = 16"):
        model(jnp.zeros((31, 31)), mg.Poisson(32))
    with pytest.raises(ValueError, match="f must have shape"):
        model(jnp.zeros((14, 14)), mg.Poisson(16))
    with pytest.raises(Exception, match="f must be finite"):
        jax.jit(lambda f: model(f, mg.Poisson(16)))(jnp.full((15, 15), jnp.inf))


def test_given_stencils_are_the_transfer_stencils_of_every_level():
    n = 16
    op = jax.jit(lambda key: mg.diffusion(mg.lognormal_coefficients(key, n)))(jax.random.key(2))
    f = jnp.asarray(np.random.default_rng(0).standard_normal(op.shape))
    trained = MultigridUNet(n, omega=0.7)  # stands for a trained network: other stencils on every level
    rng = np.random.default_rng(1)
    for param in (trained.restriction, trained.prolongation):
        param[...] = param[...] * (1 + 0.1 * rng.standard_normal(param.shape))
    copy = MultigridUNet(n, omega=0.7, restriction=trained.restriction[...],
                         prolongation=trained.prolongation[...])
    forward = nnx.jit(lambda model, f: model(f, op))  # one compilation for both models
    np.testing.assert_array_equal(forward(copy, f), forward(trained, f))
    shared = MultigridUNet(n, restriction=mg.full_weighting(2) / 2)
    np.testing.assert_array_equal(shared.restriction[...], np.broadcast_to(mg.full_weighting(2) / 2, (3, 3, 3)))
    with pytest.raises(ValueError, match=r"restriction must be a 3x3 stencil or one per level, shape \(3, 3"):
        MultigridUNet(n, restriction=np.ones((2, 3, 3)))


def test_rediscretised_coarse_operators_for_a_diffusion_stencil():
    # galerkin=False: the network coarsens the coefficient field like multigrid.hierarchy does, to
    # 5-point stencils (Galerkin products have 9 points); with the same operators its cycle is the
    # classical one (test_the_initial_network_is_the_classical_vcycle)
    n = 16
    op = jax.jit(lambda key: mg.diffusion(mg.lognormal_coefficients(key, n)))(jax.random.key(3))
    model = MultigridUNet(n, galerkin=False)
    mine, classical = jax.jit(lambda op: (model.operators(op), mg.hierarchy(op, galerkin=False)))(op)
    assert len(mine) == len(classical) == 4
    for ours, theirs in zip(mine[1:], classical[1:]):
        np.testing.assert_array_equal(ours.weights, theirs.weights)
        assert float(jnp.max(jnp.abs(ours.weights[..., ::2, ::2]))) == 0  # no corner couplings
        assert float(jnp.min(ours.weights[..., 1, 1])) > 0
