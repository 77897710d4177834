"""neuralode.models.spec: one name per solver and adjoint, a spec builds the model it describes,
`rebuild` changes a setting by building anew with the same parameters, clear errors."""
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import neuralode as no
from neuralode.data import Dataset
from neuralode.models import ADJOINTS, SOLVERS, ModelSpec, ODENet, PlainNet, ResNet, RKNet, build_model, rebuild
from neuralode.models.spec import ADAPTIVE, RUNGE_KUTTA


def sequences(n=6, length=12, channels=2, classes=3, seed=0) -> Dataset:
    """A small NWC data set: the models read only its shapes and number of classes."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, length, channels)).astype(np.float32)
    y = rng.integers(0, classes, n).astype(np.int32)
    return Dataset(x, y, x, y, classes, "sequences")


def abstract(spec, dataset):
    return nnx.eval_shape(lambda: build_model(spec, dataset))


def test_one_name_per_solver_and_adjoint():
    assert SOLVERS == {cls.__name__: cls for cls in (no.Euler, no.Midpoint, no.Heun, no.RK4,
                                                     no.Leapfrog, no.Dopri5, no.Tsit5)}
    assert all(not SOLVERS[n].adaptive for n in RUNGE_KUTTA) and all(SOLVERS[n].adaptive for n in ADAPTIVE)
    assert {name: type(cls()) for name, cls in ADJOINTS.items()} == {
        "discrete": no.DiscreteAdjoint, "checkpoint": no.CheckpointAdjoint, "backsolve": no.BacksolveAdjoint}


def test_a_spec_builds_the_model_it_describes():
    data = sequences()
    base = ModelSpec(channels=(4, 6), blocks=2, steps=3, stem_kernel_size=5, norm=False)
    resnet = abstract(base, data)
    assert type(resnet) is ResNet and resnet.blocks == 2 and resnet.spatial_dims == 1
    assert resnet.stem.kernel.shape == (5, 2, 4) and resnet.head.kernel.shape == (6, 3)
    assert type(abstract(dataclasses.replace(base, model="plainnet"), data)) is PlainNet
    rknet = abstract(dataclasses.replace(base, model="rknet"), data)
    assert type(rknet) is RKNet and rknet.steps == 3 and isinstance(rknet.solver, no.RK4)
    midpoint = abstract(dataclasses.replace(base, model="rknet", solver="Midpoint"), data)
    assert isinstance(midpoint.solver, no.Midpoint)
    ode = abstract(dataclasses.replace(base, model="odenet", rtol=1e-4, atol=1e-6, adjoint="checkpoint",
                                       kinetic_weight=0.1, augment_channels=2), data)
    assert type(ode) is ODENet and isinstance(ode.solver, no.Dopri5)
    assert isinstance(ode.adjoint, no.CheckpointAdjoint)
    assert (ode.rtol, ode.atol, ode.kinetic_weight, ode.jacobian_weight) == (1e-4, 1e-6, 0.1, 0.0)
    assert ode.regularised and ode.augment_channels == 2 and ode.head.kernel.shape == (6 + 2, 3)
    assert isinstance(abstract(dataclasses.replace(base, model="odenet", solver="Tsit5"), data).solver,
                      no.Tsit5)
    # A spec is what a run records: JSON and back gives the same spec.
    spec = dataclasses.replace(base, model="odenet", kinetic_weight=1e-4)
    assert ModelSpec(**json.loads(json.dumps(dataclasses.asdict(spec)))) == spec


@nnx.jit
def logits(model, x):  # one function: equal models (same class and settings) share a compilation
    return model(x)


def test_rebuild_changes_a_setting_and_keeps_the_parameters():
    data = sequences()
    x = jnp.asarray(data.x_test)
    spec = ModelSpec(model="odenet", channels=(2,), rtol=1e-2, atol=1e-2, norm=False, seed=3)
    model = build_model(spec, data)
    tight = dataclasses.replace(spec, rtol=1e-5, atol=1e-5)
    rebuilt = rebuild(model, tight, data)
    assert (model.rtol, rebuilt.rtol) == (1e-2, 1e-5)
    # The same seed builds the same parameters, so a model built at rtol 1e-5 is the reference.
    reference = build_model(tight, data)
    for net in (model, rebuilt, reference):
        net.eval()
    expected = logits(reference, x)
    np.testing.assert_array_equal(logits(rebuilt, x), expected)
    assert not np.array_equal(logits(model, x), expected)  # the tolerance did change the solve
    # The trained field stepped with fixed steps: an RK-Net holding the ODE-Net's parameters.
    stepped = dataclasses.replace(spec, model="rknet", solver="Euler", steps=2)
    np.testing.assert_array_equal(logits(rebuild(model, stepped, data), x),
                                  logits(build_model(stepped, data), x))
    # The rebuilt model owns its variables: changing the source leaves it alone.
    nnx.update(model, jax.tree.map(jnp.zeros_like, nnx.state(model, nnx.Param)))
    np.testing.assert_array_equal(logits(rebuilt, x), expected)
    with pytest.raises(ValueError, match="model: its parameters do not fit"):
        rebuild(model, dataclasses.replace(spec, channels=(5,)), data)
    with pytest.raises(ValueError, match="model: its parameters do not fit"):
        rebuild(model, dataclasses.replace(spec, model="resnet", blocks=1), data)


def test_bad_specs_name_the_setting():
    with pytest.raises(ValueError, match="model: unknown 'anode'"):
        ModelSpec(model="anode")
    with pytest.raises(ValueError, match="adjoint: unknown 'adjoint'"):
        ModelSpec(model="odenet", adjoint="adjoint")
    with pytest.raises(ValueError, match="solver: resnet takes none"):
        ModelSpec(model="resnet", solver="RK4")
    with pytest.raises(ValueError, match="solver: odenet takes one of \\('Dopri5', 'Tsit5'\\), got 'RK4'"):
        ModelSpec(model="odenet", solver="RK4")
    with pytest.raises(ValueError, match="solver: rknet takes one of .* got 'rk4'"):
        ModelSpec(model="rknet", solver="rk4")
    with pytest.raises(TypeError, match="spec: expected a ModelSpec"):
        build_model({"model": "resnet"}, sequences())
    with pytest.raises(ValueError, match="blocks must be a positive int"):  # the model's own check
        abstract(ModelSpec(channels=(2,), blocks=0), sequences())
    with pytest.raises(dataclasses.FrozenInstanceError):
        ModelSpec().rtol = 1e-6
