"""experiments.layer_parallel: its device flag and its network, on this process's one device (the
8-device numerics are in test_layer_parallel.py)."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import layer_parallel as experiment
from neuralode.data import load_dataset
from neuralode.parallel import MGRIT, depth_mesh


@pytest.mark.parametrize("argv, existing, expected", [
    (["--devices", "4"], "", "--xla_force_host_platform_device_count=4"),
    (["--quick", "--devices=2"], "--xla_cpu_foo", "--xla_force_host_platform_device_count=2"),
    ([], "", f"--xla_force_host_platform_device_count={experiment.Config.devices}"),
])
def test_devices_flag_asks_xla_for_host_devices(monkeypatch, argv, existing, expected):
    monkeypatch.setenv("XLA_FLAGS", existing)
    experiment._host_devices_flag(argv)
    flags = os.environ["XLA_FLAGS"]
    assert expected in flags and existing in flags


def test_devices_flag_leaves_one_device_and_an_explicit_count_alone(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=3")
    experiment._host_devices_flag(["--devices", "8"])
    assert os.environ["XLA_FLAGS"] == "--xla_force_host_platform_device_count=3"
    monkeypatch.setenv("XLA_FLAGS", "")
    experiment._host_devices_flag(["--devices", "1"])
    assert os.environ["XLA_FLAGS"] == ""


def test_layer_parallel_network_is_the_serial_one_at_convergence():
    # N / m = 2 iterations make MGRIT exact: the same logits as the serial network (float32).
    cfg = experiment.Config(width=4, blocks=4, coarsening=2, devices=1)
    dataset = load_dataset("mnist1d")
    mgrit = MGRIT(coarsening=2, iterations=2, backward_iterations=2)
    serial = experiment._model(cfg, dataset)
    parallel = experiment._model(cfg, dataset, mgrit, depth_mesh(1))
    x = jnp.asarray(dataset.x_train[:8])
    logits, stats = jax.jit(lambda model, x: model.forward(x))(parallel, x)
    np.testing.assert_allclose(logits, jax.jit(lambda model, x: model(x))(serial, x),
                               rtol=1e-5, atol=1e-5)
    assert not stats["mgrit_fallback"] and stats["mgrit_residual"] >= 0


def test_serial_network_reports_a_failed_solve_and_its_call_raises():
    """As the models do: `forward` reports a non-finite state in `failed_solves` (so the train step
    holds no host callback), calling the network raises it, and its accuracy refuses it."""
    import optax
    from flax import nnx

    from neuralode.measure import accuracy
    from neuralode.parallel.data import holds_host_callback
    from neuralode.train_step import classification_loss, make_train_state, make_train_step

    dataset = load_dataset("mnist1d")
    model = experiment._model(experiment.Config(width=4, blocks=4), dataset)
    x = np.array(dataset.x_test[:4])
    x[1, 3, 0] = np.nan
    assert int(nnx.jit(lambda m, x: m.forward(x))(model, x)[1]["failed_solves"]) == 1
    with pytest.raises(jax.errors.JaxRuntimeError, match="DeepResNet: the solve of its blocks failed"):
        jax.block_until_ready(nnx.jit(lambda m, x: m(x))(model, x))
    with pytest.raises(RuntimeError, match="accuracy: an ODE solve of the model failed"):
        accuracy(model, x, dataset.y_test[:4])
    graphdef, state = make_train_state(model, optax.adam(1e-3))
    step = make_train_step(graphdef, classification_loss)
    assert not holds_host_callback(jax.make_jaxpr(step)(state, x, dataset.y_test[:4]).jaxpr)
