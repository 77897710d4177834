"""neuralode.analysis against closed forms and finite differences (float64)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from neuralode import analysis
from neuralode.solvers import RK4, Euler, Heun, Leapfrog, Midpoint

F64 = dict(param_dtype=jnp.float64)


def mlp(rngs, sizes=(4, 16, 16, 3)):
    return [nnx.Linear(a, b, rngs=rngs, **F64) for a, b in zip(sizes[:-1], sizes[1:])]


def test_layer_gradient_norms_equal_backprop_and_the_scalar_product():
    # A chain of 1-D linear layers with slope a multiplies the gradient by a per layer: |a|^l.
    layers = [nnx.Linear(1, 1, use_bias=False, rngs=nnx.Rngs(0), **F64) for _ in range(20)]
    for layer in layers:
        layer.kernel[...] = jnp.full((1, 1), 0.9)
    norms = analysis.layer_gradient_norms(layers, jnp.ones(1))
    np.testing.assert_allclose(norms, 0.9 ** np.arange(20, -1, -1), rtol=1e-14)

    lin = mlp(nnx.Rngs(1))
    stack = [lin[0], jnp.tanh, lin[1], jnp.tanh, lin[2]]
    x = jnp.linspace(-1.0, 1.0, 4)
    u = jnp.array([0.3, -1.0, 2.0])

    def loss(x):
        for layer in stack:
            x = layer(x)
        return jnp.vdot(u, x)

    norms = analysis.layer_gradient_norms(stack, x, cotangent=u)
    assert norms[0] == pytest.approx(float(jnp.linalg.norm(jax.grad(loss)(x))), rel=1e-13)
    assert norms[-1] == pytest.approx(float(jnp.linalg.norm(u)), rel=1e-15)


def test_parameter_gradient_norms_name_every_leaf():
    model = nnx.Linear(3, 2, rngs=nnx.Rngs(0), **F64)
    grads = nnx.grad(lambda m: jnp.sum(m(jnp.ones(3)) ** 2))(model)
    norms = analysis.parameter_gradient_norms(grads)
    assert len(norms) == 2
    kernel_norm = [v for k, v in norms.items() if "kernel" in k][0]
    assert kernel_norm == pytest.approx(float(jnp.linalg.norm(grads["kernel"][...])), rel=1e-14)


def test_jacobian_matches_central_differences_and_spectrum():
    lin = mlp(nnx.Rngs(2), (4, 8, 4))
    fn = lambda x: lin[1](jnp.tanh(lin[0](x)))
    x = jnp.array([0.1, -0.2, 0.3, 0.4])
    jac = np.asarray(analysis.jacobian_matrix(fn, x))
    eps = 1e-6
    fd = np.stack([(fn(x + eps * e) - fn(x - eps * e)) / (2 * eps) for e in jnp.eye(4)], axis=1)
    np.testing.assert_allclose(jac, fd, atol=1e-9)  # central differences: O(eps^2) + rounding/eps
    eigenvalues, singular_values = analysis.jacobian_spectrum(fn, x)
    np.testing.assert_allclose(np.prod(eigenvalues).real, np.linalg.det(jac), rtol=1e-10)
    np.testing.assert_allclose(singular_values, np.linalg.svd(jac, compute_uv=False), rtol=1e-12)
    assert analysis.jacobian_spectrum(lin[0], x)[0] is None  # 4 -> 8 is not square


def test_spectral_norm_of_dense_and_conv_layers():
    rngs = nnx.Rngs(3)
    dense = nnx.Linear(6, 9, rngs=rngs, **F64)
    sigma = analysis.spectral_norm(dense, jnp.zeros(6), tol=1e-14, iterations=2000)
    assert sigma == pytest.approx(np.linalg.norm(np.asarray(dense.kernel[...]), 2), rel=1e-10)
    conv = nnx.Conv(2, 3, (3, 3), rngs=rngs, **F64)
    x = jnp.zeros((1, 6, 6, 2))
    sigma = analysis.spectral_norm(conv, x, tol=1e-14, iterations=2000)
    dense_operator = np.asarray(analysis.jacobian_matrix(conv, x))
    assert sigma == pytest.approx(np.linalg.norm(dense_operator, 2), rel=1e-10)


def test_lipschitz_bound_dominates_every_measured_gain():
    lin = mlp(nnx.Rngs(4))
    model = nnx.Sequential(lin[0], jax.nn.relu, lin[1], jax.nn.relu, lin[2])
    assert analysis.linear_layers(model) == lin
    bound = analysis.lipschitz_upper_bound(lin, jnp.zeros(4))
    expected = np.prod([np.linalg.norm(np.asarray(layer.kernel[...]), 2) for layer in lin])
    assert bound == pytest.approx(expected, rel=1e-9)
    xs = jax.random.normal(jax.random.key(0), (50, 4), jnp.float64)
    gains = [analysis.jacobian_spectrum(model, x)[1][0] for x in xs]
    assert max(gains) <= bound
    assert analysis.residual_lipschitz_bound([0.5, 0.25], identity_scale=0.9, branch_scale=0.2) == \
        pytest.approx(1.0 * 0.95)


@pytest.mark.parametrize("solver, closed_form", [
    (Euler(), lambda z: 1 + z),
    (Midpoint(), lambda z: 1 + z + z**2 / 2),
    (Heun(), lambda z: 1 + z + z**2 / 2),
    (RK4(), lambda z: 1 + z + z**2 / 2 + z**3 / 6 + z**4 / 24),
])
def test_amplification_factor_is_the_truncated_exponential(solver, closed_form):
    z = np.array([-1.0, -2.0 + 1j, 0.5j, -2.785])
    np.testing.assert_allclose(analysis.amplification_factor(solver, z), np.abs(closed_form(z)), rtol=1e-14)
    assert analysis.in_stability_region(solver, -0.5)
    assert not analysis.in_stability_region(solver, 0.1)


def test_stability_region_boundaries():
    # Euler: the disc |1 + z| <= 1 touches the imaginary axis only at 0; RK4 reaches -2.785 on the
    # real axis and +-2.828 i on the imaginary axis; leapfrog is stable for h omega <= 2.
    assert not analysis.in_stability_region(Euler(), 0.01j)
    assert analysis.in_stability_region(RK4(), -2.78) and not analysis.in_stability_region(RK4(), -2.79)
    assert analysis.in_stability_region(RK4(), 2.82j) and not analysis.in_stability_region(RK4(), 2.83j)
    np.testing.assert_array_equal(analysis.in_stability_region(Leapfrog(), [1.0j, 1.99j, 2.01j]),
                                  [True, True, False])
    with pytest.raises(ValueError):
        analysis.amplification_factor(Leapfrog(), -1.0)


def test_count_linear_pieces_of_relu_sums_with_known_kinks():
    kinks = jnp.array([-0.7, -0.1, 0.2, 0.65])
    fn = lambda x: jnp.sum(jnp.array([1.0, -2.0, 3.0, -1.5]) * jax.nn.relu(x - kinks), keepdims=True)
    x0, x1 = jnp.array(-1.0), jnp.array(1.0)
    assert analysis.count_linear_pieces(fn, x0, x1, num=1000) == 5
    assert analysis.count_linear_pieces(lambda x: 3.0 * x, x0, x1, num=1000) == 1


def test_count_peaks():
    assert analysis.count_peaks([0, 1, 0, 2, 2, 0, 1, 1]) == 2
    assert analysis.count_peaks(np.sin(np.linspace(0, 6 * np.pi, 1001))) == 3
