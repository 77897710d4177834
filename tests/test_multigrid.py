"""Multigrid numerics: smoothing factors from theory, h-independent V-cycles, FMG to discretisation error."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from neuralode import multigrid as mg


def _random(shape, seed=0, dtype=jnp.float64):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


def _lognormal(n, seed=0, sigma=1.0):
    return _lognormal_jit(jax.random.key(seed), n, sigma, 0.1)


_lognormal_jit = jax.jit(mg.lognormal_coefficients, static_argnums=(1, 2, 3))


@functools.cache
def _poisson_solver(n):
    """One compiled V(2,1) red-black solver per grid size, shared by the tests below."""
    op = mg.Poisson(n)
    return jax.jit(lambda f, rtol: mg.solve(op, f, rtol=rtol, max_cycles=40))


def _asymptotic_ratio(residuals, tail=3):
    h = np.asarray(residuals)
    h = h[~np.isnan(h)]
    return float(np.exp(np.mean(np.log(h[-tail:] / h[-tail - 1:-1]))))


@pytest.mark.parametrize("ndim,n", [(1, 16), (2, 16)])
@pytest.mark.parametrize("omega", [0.5, 2 / 3])
def test_jacobi_factor_matches_eigenvalues(ndim, n, omega):
    # Error propagation I - omega D^{-1} A has eigenvalues 1 - omega (1 - mean_k cos(j_k pi h));
    # for 0 < omega <= 1 the largest in modulus is j = (1, ..., 1): 1 - omega (1 - cos(pi h)).
    op = mg.Poisson(n, ndim)
    theory = 1 - omega * (1 - np.cos(np.pi / n))
    zero = jnp.zeros(op.shape)
    rho = mg.convergence_factor(lambda e: mg.jacobi(op, e, zero, omega), _random(op.shape), 800)
    # 1 - rho is the rate; matching it to 1 % is much stronger than matching rho to 1 %.
    np.testing.assert_allclose(1 - float(rho), 1 - theory, rtol=1e-2)


def test_red_black_gauss_seidel_factor_is_jacobi_squared():
    # For consistently ordered matrices rho(GS) = rho(Jacobi)^2 = cos^2(pi h) (Young 1971).
    op = mg.Poisson(16)
    zero = jnp.zeros(op.shape)
    rho = mg.convergence_factor(lambda e: mg.gauss_seidel(op, e, zero), _random(op.shape), 800)
    np.testing.assert_allclose(1 - float(rho), 1 - np.cos(np.pi / 16) ** 2, rtol=1e-2)


def _pointwise_gauss_seidel(matrix, u, f, colours):
    """Gauss-Seidel one unknown at a time, colour by colour, in row-major order within a colour."""
    u = u.copy()
    for c in range(colours.max() + 1):
        for p in np.flatnonzero(colours == c):
            u[p] += (f[p] - matrix[p] @ u) / matrix[p, p]
    return u


@pytest.mark.parametrize("make", [lambda: mg.Poisson(8, 1), lambda: mg.Poisson(8, 2),
                                  lambda: jax.jit(mg.diffusion)(_lognormal(8)).coarsen()])
def test_gauss_seidel_is_pointwise_gauss_seidel_in_colour_order(make):
    op = make()
    size = int(np.prod(op.shape))
    matrix = np.asarray(jax.vmap(op)(jnp.eye(size).reshape(size, *op.shape))).reshape(size, size)
    idx = np.indices(op.shape)
    if isinstance(op, mg.Stencil):  # (0,0) (1,1) (0,1) (1,0): i % 2 == k % 2, (i + j) % 2 == k // 2
        colours = 2 * (idx.sum(0) % 2) + idx[0] % 2
    else:
        colours = idx.sum(0) % 2
    u, f = _random(op.shape, 0), _random(op.shape, 1)
    expected = np.asarray(u).ravel()
    for _ in range(2):
        expected = _pointwise_gauss_seidel(matrix, expected, np.asarray(f).ravel(), colours.ravel())
    np.testing.assert_allclose(np.asarray(mg.gauss_seidel(op, u, f, sweeps=2)).ravel(), expected,
                               rtol=1e-12, atol=1e-12)


def test_vcycle_gauss_seidel_factor_is_small_and_h_independent():
    factors = []
    for n in (32, 64, 128, 256, 512):
        sol = _poisson_solver(n)(_random((n - 1, n - 1), n), 1e-9)
        assert 8 <= int(sol.cycles) <= 10
        factors.append(_asymptotic_ratio(sol.residuals))
    assert max(factors) <= 0.1, factors
    assert max(factors) / min(factors) <= 1.5, factors


@pytest.mark.parametrize("kind", ["W", "F"])
def test_w_and_f_cycles_at_least_as_fast_as_v(kind):
    op = mg.Poisson(32)
    f = _random(op.shape, 1)
    run = lambda k: _asymptotic_ratio(mg.solve(op, f, kind=k, rtol=1e-9, max_cycles=20).residuals)
    assert run(kind) <= run("V") * 1.05


def test_variable_coefficient_galerkin_vcycle_converges():
    # log-normal a, sigma = 1, correlation length 0.1 (contrast max/min a ~ 300): Galerkin coarse
    # operators with bilinear P still converge, slower than for Poisson (measured factor ~0.25).
    op = mg.diffusion(_lognormal(64, seed=3))
    sol = jax.jit(lambda f: mg.solve(op, f, rtol=1e-10, max_cycles=30))(_random(op.shape, 2))
    assert bool(sol.converged)
    assert _asymptotic_ratio(sol.residuals) <= 0.35


def test_jacobi_smoothed_vcycle_converges():
    op = mg.Poisson(32)
    sol = mg.solve(op, _random(op.shape, 3), smoother="jacobi", nu1=2, nu2=2, omega=0.8, rtol=1e-10)
    assert bool(sol.converged) and int(sol.cycles) <= 15


def _manufactured(n):
    """u = x(1-x) e^x sin(2 pi y); f = -Laplace u = -p'' q + 4 pi^2 p q with p'' = -e^x (3x + x^2)."""
    x = np.arange(1, n) / n
    X, Y = np.meshgrid(x, x, indexing="ij")
    p, q = X * (1 - X) * np.exp(X), np.sin(2 * np.pi * Y)
    f = np.exp(X) * (3 * X + X**2) * q + 4 * np.pi**2 * p * q
    return jnp.asarray(p * q), jnp.asarray(f)


def test_fmg_reaches_discretisation_error_in_one_cycle():
    errors = {}
    for n in (64, 256):
        op = mg.Poisson(n)
        u_true, f = _manufactured(n)
        discretisation = float(jnp.max(jnp.abs(_poisson_solver(n)(f, 1e-13).u - u_true)))
        u_fmg = jax.jit(lambda f: mg.fmg(mg.hierarchy(op), f))(f)
        assert float(jnp.max(jnp.abs(u_fmg - u_true))) <= 2 * discretisation
        errors[n] = discretisation
    # the 5-point scheme is second order: a quarter of h gives a sixteenth of the error (+- h^2 terms)
    assert 15 <= errors[64] / errors[256] <= 17, errors


@pytest.mark.parametrize("ndim", [1, 2])
def test_restriction_is_scaled_adjoint_of_prolongation(ndim):
    n = 16
    r, v = _random((n - 1,) * ndim, 0), _random((n // 2 - 1,) * ndim, 1)
    lhs = jnp.vdot(mg.restrict(r), v)
    np.testing.assert_allclose(lhs, jnp.vdot(r, mg.prolong(v)) / 2**ndim, rtol=1e-13)
    s = _random((3,) * ndim, 2)  # any stencil: restriction with s is the transpose of prolongation with s
    np.testing.assert_allclose(jnp.vdot(mg.restrict(r, s), v), jnp.vdot(r, mg.prolong(v, s)), rtol=1e-12)
    # (bi)linear interpolation reproduces piecewise-linear hats with kinks on coarse vertices
    # (in 2-D P = P1 (x) P1, so the product of hats maps to the product of fine hats)
    x, xf = np.arange(1, n // 2) / (n // 2), np.arange(1, n) / n
    hat, fine = np.minimum(x, 1 - x), np.minimum(xf, 1 - xf)
    if ndim == 2:
        hat, fine = np.outer(hat, hat), np.outer(fine, fine)
    np.testing.assert_allclose(mg.prolong(jnp.asarray(hat)), fine, atol=1e-15)


@pytest.mark.parametrize("ndim", [1, 2])
def test_transfers_equal_strided_and_transposed_convolutions(ndim):
    """restrict/prolong are computed from slices and padding; they are the 'VALID' stride-2
    convolution and its transpose (lhs-dilated convolution with the flipped stencil), any stencil."""
    r, v, s = _random((15,) * ndim, 0), _random((7,) * ndim, 1), _random((3,) * ndim, 2)
    conv = lambda x, k, **kw: jax.lax.conv_general_dilated(
        x[None, None], jnp.asarray(k)[None, None], precision=jax.lax.Precision.HIGHEST, **kw)[0, 0]
    np.testing.assert_allclose(mg.restrict(r, s), conv(r, s, window_strides=(2,) * ndim, padding="VALID"),
                               rtol=1e-13, atol=1e-14)
    np.testing.assert_allclose(mg.prolong(v, s), conv(v, np.flip(s), window_strides=(1,) * ndim,
                                                      padding=[(2, 2)] * ndim, lhs_dilation=(2,) * ndim),
                               rtol=1e-13, atol=1e-14)
    assert mg.restrict(r.astype(jnp.float32)).dtype == mg.prolong(v.astype(jnp.float32)).dtype == jnp.float32
    with pytest.raises(ValueError, match=r"r must be a 1-D or square 2-D grid"):
        mg.restrict(jnp.ones((7, 5)))
    with pytest.raises(ValueError, match=r"stencil must have shape"):
        mg.prolong(v, jnp.ones((5,) * ndim))


def test_high_frequency_share_of_sine_modes_and_of_noise():
    from scipy.fft import dstn

    n = 16
    i = np.arange(1, n)
    mode = lambda k: np.sin(np.pi * k * i / n)
    for k, share in ((1, 0.0), (8, 0.0), (9, 1.0), (15, 1.0)):  # above half Nyquist: k > n / 2
        assert float(mg.high_frequency_share(jnp.asarray(mode(k)))) == pytest.approx(share, abs=1e-12)
        assert float(mg.high_frequency_share(jnp.asarray(np.outer(mode(2), mode(k))))) == pytest.approx(share, abs=1e-12)
    x = _random((n - 1, n - 1), 4)
    np.testing.assert_allclose(mg.sine_coefficients(x), dstn(np.asarray(x), type=1) / 4, rtol=1e-12, atol=1e-12)
    # white noise has iid N(0, 1) mode coefficients: the expected share is the fraction of modes
    # with max(kx, ky) > 128, 1 - (128/255)^2; the sampling spread is sqrt(2 p (1 - p) / 255^2) = 0.0024
    noise = jax.random.normal(jax.random.key(0), (255, 255), jnp.float64)
    assert float(mg.high_frequency_share(noise)) == pytest.approx(1 - (128 / 255) ** 2, abs=3 * 0.0024)
    with pytest.raises(ValueError, match=r"x must be a 1-D or square 2-D grid"):
        mg.high_frequency_share(jnp.ones((3, 3, 3)))


def test_mixed_precision_cycles_reach_float64_residuals_at_the_float64_rate():
    """Float32 cycles inside the float64 defect correction: the float64 residual falls to 1e-10
    (far below float32 rounding) in the same number of cycles as float64 cycles, because each
    cycle only has to reduce the current residual by ~0.1, not to float64 accuracy."""
    for op in (mg.Poisson(128), mg.diffusion(_lognormal(64))):
        f = _random(op.shape, 3)
        exact = jax.jit(lambda f: mg.solve(op, f, rtol=1e-10))(f)
        mixed = jax.jit(lambda f: mg.solve(op, f, rtol=1e-10, cycle_dtype=jnp.float32))(f)
        assert bool(mixed.converged) and mixed.u.dtype == jnp.float64
        assert int(mixed.cycles) == int(exact.cycles)
        assert float(jnp.linalg.norm(f - op(mixed.u)) / jnp.linalg.norm(f)) <= 1e-10
        k = int(exact.cycles)  # per-cycle factors agree to float32 rounding of each cycle's work
        np.testing.assert_allclose(mixed.residuals[:k + 1], exact.residuals[:k + 1], rtol=1e-4)
    for bad in (jnp.int32, "flaot32"):
        with pytest.raises(TypeError, match="cycle_dtype must be a floating-point dtype"):
            mg.solve(mg.Poisson(8), jnp.ones((7, 7)), cycle_dtype=bad)


OPERATORS = [lambda: mg.Poisson(16, 1), lambda: mg.Poisson(16, 2), lambda: jax.jit(mg.diffusion)(_lognormal(16)),
             lambda: jax.jit(lambda a: mg.diffusion(a).coarsen())(_lognormal(16)),
             lambda: jax.jit(lambda: mg.Poisson(16).coarsen(galerkin=True))()]


@pytest.mark.parametrize("make", OPERATORS)
def test_operators_are_symmetric_positive(make):
    op = make()
    u, v = _random(op.shape, 0), _random(op.shape, 1)
    np.testing.assert_allclose(jnp.vdot(op(u), v), jnp.vdot(u, op(v)), rtol=1e-12)
    assert float(jnp.vdot(op(u), u)) > 0


@pytest.mark.parametrize("make", OPERATORS)
def test_residual_from_padded_field_equals_operator(make):
    # the cycles' residual reads neighbours as slices of a zero-padded u; op(u) shifts u instead
    op = make()
    u, f = _random(op.shape, 0), _random(op.shape, 1)
    scale = float(jnp.max(jnp.abs(op(u))))
    np.testing.assert_allclose(mg.residual(op, u, f), f - op(u), rtol=0, atol=1e-14 * scale)


def test_stencils_and_galerkin_product():
    op = mg.Poisson(16)
    u = _random(op.shape)
    np.testing.assert_allclose(mg.stencil_of(op, 15)(u), op(u), rtol=1e-13, atol=1e-10)
    np.testing.assert_allclose(mg.diffusion(jnp.ones((16, 16)))(u), op(u), rtol=1e-13, atol=1e-10)
    # four-colour Gauss-Seidel on a 5-point stencil is red-black Gauss-Seidel
    f = _random(op.shape, 2)
    np.testing.assert_allclose(mg.gauss_seidel(mg.stencil_of(op, 15), u, f, 2), mg.gauss_seidel(op, u, f, 2),
                               rtol=1e-12, atol=1e-12)
    # R A P for the 5-point Laplacian with full weighting / bilinear: [-1 -2 -1; -2 12 -2; -1 -2 -1] / (4 H^2)
    coarse = op.coarsen(galerkin=True)
    expected = np.array([[-1, -2, -1], [-2, 12, -2], [-1, -2, -1]]) / (4 * (1 / 8) ** 2)
    np.testing.assert_allclose(coarse.weights[3, 4], expected, rtol=1e-13)
    v = _random(coarse.shape, 1)
    np.testing.assert_allclose(coarse(v), mg.restrict(op(mg.prolong(v))), rtol=1e-12, atol=1e-9)


def test_vmap_over_right_hand_sides_and_float32():
    op = mg.Poisson(16)
    fs = _random((3, *op.shape))
    solver = jax.jit(lambda f: mg.solve(op, f, rtol=1e-10).u)
    np.testing.assert_allclose(jax.vmap(solver)(fs)[1], solver(fs[1]), rtol=1e-12, atol=1e-14)
    a32 = _lognormal(8).astype(jnp.float32)
    sol32 = jax.jit(lambda f: mg.solve(mg.diffusion(a32), f, rtol=1e-5))(fs[0, :7, :7].astype(jnp.float32))
    assert sol32.u.dtype == jnp.float32 and bool(sol32.converged)


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="n must be a power of two"):
        mg.Poisson(48)
    op = mg.Poisson(32)
    with pytest.raises(ValueError, match=r"f must have shape \(31, 31\)"):
        mg.solve(op, jnp.zeros((30, 30)))
    with pytest.raises(ValueError, match="u0 must have shape"):
        mg.solve(op, jnp.zeros((31, 31)), jnp.zeros((15, 15)))
    with pytest.raises(ValueError, match="a.shape"):
        mg.diffusion(jnp.ones((31, 31)))
    with pytest.raises(ValueError, match="f must have shape"):
        mg.solve(mg.diffusion(jnp.ones((16, 16))), jnp.zeros((31, 31)))
    with pytest.raises(ValueError, match="a must be positive"):
        mg.diffusion(jnp.ones((16, 16)).at[3, 4].set(0.0))
    with pytest.raises(ValueError, match="kind must be one of"):
        mg.solve(op, jnp.ones((31, 31)), kind="X")
    with pytest.raises(TypeError, match="f must be a floating-point"):
        mg.solve(op, jnp.ones((31, 31), jnp.int32))
    bad = jnp.ones((31, 31)).at[2, 2].set(jnp.nan)
    with pytest.raises(Exception, match="f must be finite"):
        jax.jit(lambda f: mg.solve(op, f).u)(bad)
    with pytest.raises(Exception, match="u0 must be finite"):
        jax.jit(lambda u0: mg.solve(op, jnp.ones((31, 31)), u0).u)(bad)
    with pytest.raises(Exception, match="f must be finite"):
        jax.jit(lambda f: mg.fmg(mg.hierarchy(op), f))(bad)
    with pytest.raises(Exception, match="a must be positive"):
        jax.jit(lambda a: mg.diffusion(a).weights)(-jnp.ones((16, 16)))


def test_unknown_options_are_named_and_each_option_does_what_it_says():
    op = mg.Poisson(16)
    levels, u, f = mg.hierarchy(op), _random(op.shape, 0), _random(op.shape, 1)
    with pytest.raises(ValueError, match=r"kind must be one of \('V', 'W', 'F'\), got 'X'"):
        mg.cycle(levels, u, f, kind="X")
    with pytest.raises(ValueError, match=r"smoother must be one of \('jacobi', 'gauss_seidel'\), got 'sor'"):
        mg.cycle(levels, u, f, smoother="sor")
    with pytest.raises(ValueError, match="smoother must be one of"):
        mg.smooth(op, u, f, 1, "sor", 0.8)
    with pytest.raises(ValueError, match="nu1 must be an int >= 0"):
        mg.cycle(levels, u, f, nu1=-1)
    with pytest.raises(TypeError, match="galerkin must be True, False or None"):
        mg.hierarchy(op, galerkin="yes")
    with pytest.raises(ValueError, match="cycles must be an int >= 1"):
        mg.fmg(levels, f, cycles=0)
    out = jax.jit(lambda u, f: {
        "smooth jacobi": mg.smooth(op, u, f, 2, "jacobi", 0.8), "jacobi": mg.jacobi(op, u, f, 0.8, 2),
        "smooth gauss_seidel": mg.smooth(op, u, f, 2, "gauss_seidel", 0.8),
        "gauss_seidel": mg.gauss_seidel(op, u, f, 2), **{k: mg.cycle(levels, u, f, k) for k in mg.CYCLES}})(u, f)
    for name in ("jacobi", "gauss_seidel"):
        np.testing.assert_array_equal(out[f"smooth {name}"], out[name])
    # three different cycles (with four levels or more: on three, W = F = V as the coarsest solve is exact)
    for a, b in (("V", "W"), ("W", "F"), ("F", "V")):
        assert not np.allclose(out[a], out[b], rtol=1e-6), (a, b)


def test_rediscretised_hierarchy_of_a_diffusion_stencil():
    # a = 1: rediscretising gives the 5-point Laplacian on every coarse grid, Galerkin the 9-point
    # [-1 -2 -1; -2 12 -2; -1 -2 -1] / (4 H^2) (test_stencils_and_galerkin_product)
    both = jax.jit(lambda op: (mg.hierarchy(op, galerkin=False), mg.hierarchy(op)))
    rediscretised, galerkin = both(jax.jit(mg.diffusion)(jnp.ones((16, 16))))
    assert [op.n for op in rediscretised] == [16, 8, 4, 2]
    for coarse in rediscretised[1:]:
        v = _random(coarse.shape, coarse.n)
        np.testing.assert_allclose(coarse(v), mg.Poisson(coarse.n)(v), rtol=1e-13, atol=1e-10)
    assert float(jnp.max(jnp.abs(galerkin[1].weights[..., 0, 0]))) == pytest.approx(1 / (4 * (1 / 8) ** 2))
    assert float(jnp.max(jnp.abs(rediscretised[1].weights[..., 0, 0]))) == 0
    # variable a: coarse cells average the four fine cells; V-cycles still converge, more slowly than
    # with Galerkin operators for this contrast (max/min a ~ 300; measured factors 0.39 vs 0.29)
    op = jax.jit(mg.diffusion)(_lognormal(16, seed=3))
    f = _random(op.shape, 2)
    solve = jax.jit(lambda f, galerkin: mg.solve(op, f, galerkin=galerkin, rtol=1e-10, max_cycles=30),
                    static_argnums=1)
    redisc, rap = solve(f, False), solve(f, True)
    assert bool(redisc.converged) and bool(rap.converged)
    assert _asymptotic_ratio(rap.residuals) < _asymptotic_ratio(redisc.residuals) <= 0.45
    with pytest.raises(ValueError, match="galerkin=False rediscretises the coefficient field"):
        galerkin[1].coarsen(galerkin=False)  # a Galerkin product has no coefficient field


def test_cycle_checks_its_levels_against_u_and_f():
    op = mg.Poisson(32)
    levels, f = mg.hierarchy(op), _random(op.shape, 1)
    with pytest.raises(ValueError, match=r"levels must halve n .* got n = \[2, 4, 8, 16, 32\]"):
        mg.cycle(levels[::-1], jnp.zeros_like(f), f)
    with pytest.raises(ValueError, match=r"u has shape \(31, 31\), but levels\[0\] acts on \(63, 63\)"):
        mg.cycle(mg.hierarchy(mg.Poisson(64)), jnp.zeros_like(f), f)
    with pytest.raises(ValueError, match="levels must be a non-empty sequence"):
        mg.cycle((), jnp.zeros_like(f), f)
    with pytest.raises(ValueError, match=r"f has shape \(31, 31\), but levels\[1\] acts on \(15, 15\)"):
        mg.cycle(levels, jnp.zeros((15, 15)), f, level=1)
    with pytest.raises(ValueError, match="level must be an int in"):
        mg.cycle(levels, jnp.zeros_like(f), f, level=5)
    with pytest.raises(ValueError, match="levels must halve n"):
        mg.fmg(levels[:-1], f)  # stops above one unknown


def test_transfer_and_stencil_shapes_are_checked():
    with pytest.raises(ValueError, match=r"r must have an odd number 2m \+ 1 >= 3 of points per side"):
        mg.restrict(jnp.ones((8, 8)))
    for shape in ((15, 15, 9), (15, 15, 3, 4), (14, 14, 3, 3), (3, 3, 15, 15)):
        bad = jnp.ones(shape)
        with pytest.raises(ValueError, match=r"weights must have shape \(n - 1, n - 1, 3, 3\)"):
            mg.Stencil(bad)
    with pytest.raises(ValueError, match="a batch of stencils: map over it with jax.vmap"):
        mg.Stencil(jnp.ones((2, 15, 15, 3, 3)))
    with pytest.raises(TypeError, match="weights must be a floating-point array"):
        mg.Stencil(jnp.ones((15, 15, 3, 3), jnp.int32))
    # weights reshaped after construction are caught where the operator enters
    op = mg.diffusion(jnp.ones((16, 16)))
    bad = jax.tree.map(lambda x: x[..., :2, :] if x.ndim == 4 else x, op)
    with pytest.raises(ValueError, match=r"op.weights must have shape"):
        mg.solve(bad, jnp.ones(op.shape))
    with pytest.raises(ValueError, match=r"levels\[0\].weights must have shape"):
        mg.cycle((bad, *mg.hierarchy(op)[1:]), jnp.ones(op.shape), jnp.ones(op.shape))
    with pytest.raises(ValueError, match="coefficients must be the"):
        mg.Stencil(op.weights, jnp.ones((8, 8)))


def test_zero_right_hand_side_is_solved_by_zero_in_zero_cycles():
    op = mg.diffusion(_lognormal(8))
    zero = jnp.zeros(op.shape)
    for u0 in (None, _random(op.shape, 0)):  # from any u0: the solution of A u = 0 is u = 0
        sol = jax.jit(lambda f: mg.solve(op, f, u0))(zero)
        assert int(sol.cycles) == 0 and bool(sol.converged)
        assert float(sol.residuals[0]) == 0 and float(jnp.max(jnp.abs(sol.u))) == 0
