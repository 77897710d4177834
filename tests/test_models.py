"""Classifiers: shapes, ResNet = hand-written residual blocks, PlainNet has no identity path, the
ODE-Net's adjoints agree, RNODE integrals equal quadrature, parameter counts, every class abstract or
final, clear errors."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.integrate
import scipy.linalg
from flax import nnx

import neuralode as no
from neuralode.models import ODENet, PlainNet, ResNet, RKNet
from neuralode.models.classifiers import _Classifier, _DepthStackNet, rnode_solve
from neuralode.parallel.data import holds_host_callback
from neuralode.train import classification_loss

F64 = jnp.float64
SMALL = dict(channels=(4, 6), param_dtype=F64)


def n_params(cls, *args, **options):
    """Parameters of `cls(*args, **options)`, built abstractly (shapes only, no initialisation)."""
    model = nnx.eval_shape(lambda: cls(*args, rngs=nnx.Rngs(0), **options))
    return sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param)))


def batch(spatial_dims, n=3, channels=1, key=0):
    shape = (n, 12, channels) if spatial_dims == 1 else (n, 6, 6, channels)
    return jax.random.normal(jax.random.key(key), shape, F64)


@pytest.mark.parametrize("cls, options, spatial_dims", [
    (ResNet, dict(blocks=2), 1), (ResNet, dict(blocks=2), 2), (PlainNet, dict(blocks=2), 1),
    (RKNet, dict(steps=2), 2), (ODENet, dict(rtol=1e-4, atol=1e-4), 1),
    (ODENet, dict(rtol=1e-4, atol=1e-4), 2), (ODENet, dict(augment_channels=2), 2)],
    ids=lambda v: getattr(v, "__name__", "") if not isinstance(v, int) else f"{v}d")
def test_shapes_1d_and_2d(cls, options, spatial_dims):
    model = cls(2, 7, spatial_dims=spatial_dims, rngs=nnx.Rngs(0), **SMALL, **options)
    logits, stats = nnx.jit(lambda m, x: m.forward(x))(model, batch(spatial_dims, channels=2))
    assert logits.shape == (3, 7) and logits.dtype == F64
    assert bool(jnp.all(jnp.isfinite(logits)))
    if cls in (ResNet, PlainNet):
        assert int(stats["nfe"]) == 2 * 2  # two stages of two blocks
    elif cls is RKNet:
        assert int(stats["nfe"]) == 2 * 2 * 4  # two stages, two RK4 steps of four stages
    else:  # Dopri5: 6 evaluations per step plus the first, per stage
        assert int(stats["nfe"]) >= 2 * 7 and (int(stats["nfe"]) - 2) % 6 == 0


def relu_pool_head(model, y):
    return model.head(jnp.mean(jax.nn.relu(y), axis=tuple(range(1, y.ndim - 1))))


def test_resnet_is_a_hand_written_loop_of_residual_blocks():
    model = ResNet(1, 5, blocks=3, spatial_dims=2, rngs=nnx.Rngs(1), **SMALL)
    x = batch(2)
    y = model.stem(x)
    for index, stack in enumerate(model.stages):
        if index > 0:  # downsample once: projection shortcut plus strided branch
            t = model.transitions[index - 1]
            y = t.projection(y) + t.conv2(jax.nn.relu(t.conv1(jax.nn.relu(y))))
        for k in range(3):
            y = y + stack.layer(k)(float(k), y)  # y_{k+1} = y_k + F_k(y_k)
    assert y.shape == (3, 3, 3, 6)  # 6x6 -> 3x3: one stride-2 transition
    np.testing.assert_allclose(model(x), relu_pool_head(model, y), rtol=0, atol=1e-12)
    blocks = [model.stages[0].layer(k).conv1.kernel[...] for k in range(2)]
    assert not np.allclose(blocks[0], blocks[1])  # depth-varying parameters


def test_plainnet_has_no_identity_path():
    resnet = ResNet(1, 5, blocks=2, spatial_dims=1, rngs=nnx.Rngs(2), **SMALL)
    plain = PlainNet(1, 5, blocks=2, spatial_dims=1, rngs=nnx.Rngs(2), **SMALL)
    same = jax.tree.map(np.array_equal, nnx.state(resnet, nnx.Param), nnx.state(plain, nnx.Param))
    assert all(jax.tree.leaves(same))  # same fields, same parameter layout
    y = batch(1, channels=4)
    expected = y
    for k in range(2):  # y_{k+1} = F_k(y_k)
        expected = plain.stages[0].layer(k)(float(k), expected)
    np.testing.assert_allclose(plain._stage(0, y)[0], expected, rtol=0, atol=1e-13)
    # With every block's parameters zero, F_k = 0: the ResNet stage is the identity, the plain
    # stage is zero.
    for model in (resnet, plain):
        stack = model.stages[0].layers
        nnx.update(stack, jax.tree.map(jnp.zeros_like, nnx.state(stack, nnx.Param)))
    np.testing.assert_array_equal(resnet._stage(0, y)[0], y)
    np.testing.assert_array_equal(plain._stage(0, y)[0], jnp.zeros_like(y))


def test_rknet_and_odenet_from_one_seed_share_parameters_and_agree():
    """RK-Net and ODE-Net are one field stepped two ways (notebook 01): built from the same seed they
    hold identical parameters and compute the same flow once both solvers are accurate."""
    f64 = jnp.float64
    rk_net = RKNet(1, 10, channels=(8,), steps=512, param_dtype=f64, rngs=nnx.Rngs(0))
    ode_net = ODENet(1, 10, channels=(8,), rtol=1e-9, atol=1e-9, max_steps=100_000, param_dtype=f64,
                     rngs=nnx.Rngs(0))
    rk_params, ode_params = (jax.tree.leaves(nnx.state(m, nnx.Param)) for m in (rk_net, ode_net))
    assert len(rk_params) == len(ode_params)
    for a, b in zip(rk_params, ode_params):
        np.testing.assert_array_equal(a, b)
    x = jax.random.normal(jax.random.key(1), (2, 8, 8, 1), f64)
    # The ReLU field's kinks cap RK4 at order 2 (measured: error 8e-7 at 32 steps, /4 per halving,
    # so ~3e-9 at 512); Dopri5 at rtol 1e-9 lands within 3e-8 of it. Logits are O(1).
    np.testing.assert_allclose(rk_net(x), ode_net(x), rtol=0, atol=1e-7)


def test_odenet_gradients_agree_between_adjoints():
    x, labels = batch(1, n=4), jnp.array([0, 1, 2, 1])
    grads = {}
    for adjoint in (no.BacksolveAdjoint(), no.CheckpointAdjoint()):
        # A smooth activation: with ReLU the adjoint ODE has a discontinuous right-hand side and
        # the two gradients agree only to ~1e-3 at rtol = 1e-9 (and ~1e-2 at 1e-6).
        model = ODENet(1, 3, channels=(4,), spatial_dims=1, rtol=1e-9, atol=1e-9,
                       adjoint=adjoint, activation=jnp.tanh, param_dtype=F64, rngs=nnx.Rngs(3))
        grad = nnx.grad(lambda m: classification_loss(m, x, labels)[0])(model)
        grads[type(adjoint).__name__] = jax.tree.leaves(grad)
    for back, check in zip(grads["BacksolveAdjoint"], grads["CheckpointAdjoint"]):
        assert float(jnp.max(jnp.abs(check))) > 0
        scale = float(jnp.max(jnp.abs(check)))
        np.testing.assert_allclose(back, check, rtol=1e-6, atol=1e-8 * scale)


class LinearField(nnx.Module):
    def __init__(self, a):
        self.a = nnx.Param(a)

    def __call__(self, t, y):
        return y @ self.a[...].T


def test_rnode_integrals_equal_quadrature_on_a_linear_field():
    a = np.array([[-0.3, 1.1, 0.0], [-0.9, -0.2, 0.4], [0.2, 0.0, -0.5]])
    y0 = np.array([[1.0, -0.5, 0.3], [0.2, 0.8, -1.0]])
    noise = np.array([[0.5, -1.2, 0.7], [1.5, 0.1, -0.3]])
    horizon = 1.5
    y1, kinetic, jacobian, stats, _ = rnode_solve(
        LinearField(jnp.asarray(a)), jnp.asarray(y0), jnp.asarray(noise), horizon,
        solver=no.Dopri5(), rtol=1e-10, atol=1e-12)
    for i in range(2):
        def energy(t):
            return float(np.sum((a @ scipy.linalg.expm(a * t) @ y0[i]) ** 2))

        quadrature = scipy.integrate.quad(energy, 0.0, horizon, epsabs=1e-13, epsrel=1e-12)[0]
        np.testing.assert_allclose(kinetic[i], quadrature, rtol=1e-8)
        # e^T df/dy = e^T A is constant in t: J = horizon * ||A^T e||^2
        np.testing.assert_allclose(jacobian[i], horizon * np.sum((a.T @ noise[i]) ** 2), rtol=1e-10)
        np.testing.assert_allclose(y1[i], scipy.linalg.expm(a * horizon) @ y0[i], rtol=1e-8)
    assert int(stats["nfe"]) > 7


def test_odenet_rnode_stats_and_noise_state():
    model = ODENet(1, 3, channels=(4,), spatial_dims=1, kinetic_weight=0.1, jacobian_weight=0.2,
                   param_dtype=F64, rngs=nnx.Rngs(4))
    x = batch(1)
    _, first = model.forward(x)
    _, second = model.forward(x)
    np.testing.assert_allclose(first["regularisation"],
                               0.1 * first["kinetic"] + 0.2 * first["jacobian"], rtol=1e-14)
    # The controller bounds the error of y alone, so the noise cannot move the steps: the same
    # kinetic energy, and the steps (NFE) of the evaluation solve, which integrates y alone.
    np.testing.assert_array_equal(first["kinetic"], second["kinetic"])
    assert float(first["jacobian"]) != float(second["jacobian"])  # fresh Hutchinson noise
    model.eval()
    _, evaluation = model.forward(x)
    assert set(evaluation) == {"nfe", "failed_solves"} and int(evaluation["nfe"]) == int(first["nfe"])


# One jitted function: calls with equal models and shapes share its compilation.
failed_solves = nnx.jit(lambda model, x: model.forward(x)[1]["failed_solves"])


def conv(kernel, cin, cout, spatial_dims):
    return kernel**spatial_dims * cin * cout + cout


@pytest.mark.parametrize("cls, options", [
    (ResNet, {}), (RKNet, {}), (ODENet, dict(adjoint=no.CheckpointAdjoint())), (ODENet, {})],
    ids=["ResNet", "RKNet", "ODENet-checkpoint", "ODENet-backsolve"])
def test_failed_solves_are_reported_by_forward_raised_by_call_and_the_step_has_no_callback(cls, options):
    # forward reports (the train step stays free of host callbacks: cacheable, and one program
    # over a mesh; BacksolveAdjoint's backward pass reports into the step's metrics); model(x)
    # raises the status of the first failed stage.
    model = cls(1, 3, rngs=nnx.Rngs(0), **SMALL, **options)
    x = batch(2)
    graphdef, state = no.make_train_state(model, optax.sgd(0.1))
    step = no.make_train_step(graphdef, classification_loss)
    assert not holds_host_callback(step.trace(state, x, jnp.array([0, 1, 2])).jaxpr)
    assert int(failed_solves(model, x)) == 0
    bad = x.at[1, 2, 3, 0].set(jnp.nan)  # both stages start from non-finite states
    assert int(failed_solves(model, bad)) == 2
    with pytest.raises(Exception, match="y0 contains non-finite values"):
        jax.block_until_ready(nnx.jit(lambda m, x: m(x))(model, bad))


def test_an_odenet_out_of_steps_reports_each_failed_stage_and_raises_max_steps():
    model = ODENet(1, 3, channels=(4, 6), rtol=1e-9, atol=1e-9, max_steps=3, param_dtype=F64,
                   rngs=nnx.Rngs(0))
    assert int(failed_solves(model, batch(2))) == 2
    with pytest.raises(Exception, match="max_steps"):
        jax.block_until_ready(nnx.jit(lambda m, x: m(x))(model, batch(2)))


@pytest.mark.parametrize("spatial_dims", [1, 2])
def test_parameter_counts_closed_form(spatial_dims):
    cin, classes, (c0, c1), d = 2, 10, (8, 16), spatial_dims
    shared = conv(3, cin, c0, d) + classes * (c1 + 1)
    transition = conv(1, c0, c1, d) + conv(3, c0, c1, d) + conv(3, c1, c1, d)
    options = dict(channels=(c0, c1), spatial_dims=d, param_dtype=F64)
    blocks = 3
    resnet = shared + transition + blocks * (2 * conv(3, c0, c0, d) + 2 * conv(3, c1, c1, d))
    assert n_params(ResNet, cin, classes, blocks=blocks, **options) == resnet
    assert n_params(PlainNet, cin, classes, blocks=blocks, **options) == resnet
    tied = shared + transition + 2 * conv(3, c0 + 1, c0, d) + 2 * conv(3, c1 + 1, c1, d)
    assert n_params(RKNet, cin, classes, **options) == tied
    assert n_params(ODENet, cin, classes, **options) == tied
    a = 4
    augmented = (conv(3, cin, c0, d) + classes * (c1 + a + 1) + conv(1, c0 + a, c1, d)
                 + conv(3, c0 + a, c1, d) + conv(3, c1, c1, d) + 2 * conv(3, c0 + a + 1, c0 + a, d)
                 + 2 * conv(3, c1 + a + 1, c1 + a, d))
    assert n_params(ODENet, cin, classes, augment_channels=a, **options) == augmented  # ANODE


def test_bad_input_names_the_argument():
    model = ResNet(1, 3, channels=(4,), spatial_dims=1, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="x must be a NWC batch"):
        model(jnp.ones((2, 8, 8, 1)))
    with pytest.raises(ValueError, match="x must be a NWC batch .* 1 channel"):
        model(jnp.ones((2, 8, 3)))
    with pytest.raises(ValueError, match="blocks"):
        ResNet(1, 3, blocks=0, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="spatial_dims"):
        ResNet(1, 3, spatial_dims=3, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="channels"):
        RKNet(1, 3, channels=(), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="solver must be an explicit Runge-Kutta method"):
        RKNet(1, 3, solver=no.Dopri5(), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="solver must be an adaptive solver"):
        ODENet(1, 3, solver=no.RK4(), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="augment_channels"):
        ODENet(1, 3, augment_channels=-1, rngs=nnx.Rngs(0))


def test_every_classifier_class_is_abstract_or_final():
    """The shared bases declare `_stage` abstract, so they cannot be built; the four models define
    it and subclass only the bases."""
    for base in (_Classifier, _DepthStackNet):
        with pytest.raises(TypeError, match="abstract"):
            base(1, 3, channels=(4,), spatial_dims=1, rngs=nnx.Rngs(0))
    models = (ResNet, PlainNet, RKNet, ODENet)
    for cls in models:
        assert not any(issubclass(cls, other) for other in models if other is not cls), cls
