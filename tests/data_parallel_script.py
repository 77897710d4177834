"""Data-parallel checks that need a fresh JAX: several host devices, or several processes.

    python tests/data_parallel_script.py mesh OUT.json
        one process, 8 host CPU devices: data-parallel train steps against one device, checkpoints
        moved between 8 devices and 1, bad input, non-finite input on one device
    python tests/data_parallel_script.py process ID PORT OUT.json
        process ID of 2 (4 host devices each) via jax.distributed on 127.0.0.1:PORT: 20 steps
        against one device; then process 1 exits and process 0 takes another step, which the
        coordination service must stop

Each writes its measurements to OUT.json; tests/test_data_parallel.py asserts on them.
"""
from __future__ import annotations

import functools
import json
import os
import shutil
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils

from neuralode.adjoints import BacksolveAdjoint
from neuralode.checkpoints import CheckpointStore
from neuralode.models import ODENet, ResNet, RKNet
from neuralode.parallel.data import (data_mesh, data_parallel_train_step, replicate,
                                     shard_batch)
from neuralode.parallel.distributed import host_devices, initialize
from neuralode.rundir import CHECKPOINTS_DIR, METRICS_FILE, read_metrics
from neuralode.train import TrainConfig, train
from neuralode.train_step import (classification_loss, classification_metrics, make_train_state,
                                  make_train_step)
from train_script import tiny_dataset

STEPS, BATCH = 20, 16
MODELS = {
    "resnet": lambda: ResNet(1, 10, channels=(4, 8), param_dtype=jnp.float64, rngs=nnx.Rngs(0)),
    "rknet": lambda: RKNet(1, 10, channels=(4, 8), param_dtype=jnp.float64, rngs=nnx.Rngs(0)),
    "odenet": lambda: ODENet(1, 10, channels=(4,), adjoint=BacksolveAdjoint(), rtol=1e-4,
                             atol=1e-4, param_dtype=jnp.float64, rngs=nnx.Rngs(0)),
}


def batches():
    """Examples growing in size along the batch, so devices further along solve stiffer problems."""
    rng, scale = np.random.default_rng(0), np.linspace(1, 4, BATCH)[:, None, None, None]
    return [(scale * rng.normal(size=(BATCH, 8, 8, 1)), rng.integers(0, 10, BATCH)) for _ in range(STEPS)]


def relative(a, b) -> float:
    """max |a - b| / max |a| over the floating-point leaves of two pytrees."""
    worst = 0.0
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        if jnp.issubdtype(u.dtype, jnp.floating):
            u, v = np.asarray(u), np.asarray(v)
            worst = max(worst, float(np.max(np.abs(u - v)) / max(np.max(np.abs(u)), 1e-300)))
    return worst


@functools.cache
def initial(name: str):
    """`make_train_state` of the model `name`, its variables drawn here with numpy (the
    initialisers run eagerly compile every operation on its own: 17 s for the ResNet)."""
    graphdef, abstract = nnx.split(nnx.eval_shape(MODELS[name]))
    rng = np.random.default_rng(1)

    def fill(leaf):
        if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            return jax.random.split(jax.random.key(0), max(leaf.size, 1)).reshape(leaf.shape)
        if jnp.issubdtype(leaf.dtype, jnp.floating):
            fan_in = np.prod(leaf.shape[:-1]) if len(leaf.shape) > 1 else 100  # kernels; biases, scales
            return jnp.asarray(rng.standard_normal(leaf.shape) / np.sqrt(fan_in), leaf.dtype)
        return jnp.zeros(leaf.shape, leaf.dtype)

    return make_train_state(nnx.merge(graphdef, jax.tree.map(fill, abstract)), optax.adam(1e-2))


def train_state(name: str, mesh=None):
    graphdef, state = initial(name)
    return graphdef, (state if mesh is None else replicate(mesh, state))


def run(step, state, data):
    """`state` after `step` over `data`, the state after the first step, and every step's metrics."""
    history, first = [], None
    for x, y in data:
        state, metrics = step(state, x, y)
        history.append({k: float(v) for k, v in metrics.items()})
        first = state if first is None else first
    return state, first, history


def micro_batch_step(graphdef, groups: int):
    """The one-device reference of a per-device adaptive solve: the batch cut into `groups` groups,
    each solved and differentiated on its own (`lax.map`), gradients and metrics averaged."""

    @jax.jit
    def step(state, x, y):
        parts = nnx.merge(graphdef, state)
        model, optimizer = parts["model"], parts["optimizer"]
        model_graph, params, rest = nnx.split(model, nnx.Param, ...)

        def one_group(xy):
            loss = lambda p: classification_loss(nnx.merge(model_graph, p, rest), *xy)  # noqa: E731
            return jax.value_and_grad(loss, has_aux=True)(params)

        split = lambda a: a.reshape(groups, -1, *a.shape[1:])  # noqa: E731
        (_, metrics), grads = jax.lax.map(one_group, (split(x), split(y)))
        with jax.numpy_dtype_promotion("standard"):
            optimizer.update(model, jax.tree.map(lambda g: g.mean(0), grads))
        return nnx.state(parts), {k: v.mean(0) for k, v in metrics.items()} | {
            "nfe_device_max": metrics["nfe"].max()}

    return step


class MLP(nnx.Module):
    """Flatten, dense, ReLU, dense: a model whose training compiles in a second."""

    def __init__(self, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(8, 16, param_dtype=jnp.float64, rngs=rngs)
        self.out = nnx.Linear(16, 4, param_dtype=jnp.float64, rngs=rngs)

    def __call__(self, x):
        return self.out(nnx.relu(self.hidden(x.reshape(x.shape[0], -1))))


def check_train(mesh) -> dict:
    """`train(..., mesh=mesh)` against `train(...)`: records and parameters; and each run stopped
    at a checkpoint in the middle of epoch 2, resumed on the other (1 device for 8 and back).
    Batches of 28 of the 160 examples: the last one of each epoch (20) does not divide by 8."""
    config = TrainConfig(epochs=2, batch_size=28, learning_rate=1e-2, checkpoint_every=4,
                         keep_checkpoints=100, progress=False)
    data = tiny_dataset()
    model = nnx.jit(MLP)(nnx.Rngs(0))  # one compiled initialisation (eager: one per operation)
    results, params, records = {}, {}, {}
    with tempfile.TemporaryDirectory() as directory:
        for label, where in (("one", None), ("mesh", mesh)):
            trained = nnx.clone(model)
            train(trained, data, config, os.path.join(directory, label), mesh=where)
            params[label] = nnx.state(trained, nnx.Param)
            records[label] = [{k: v for k, v in r.items() if "seconds" not in k}
                              for r in read_metrics(os.path.join(directory, label))]
        results["params"] = relative(params["one"], params["mesh"])
        results["records"] = max(abs(a[k] - b[k]) / max(abs(a[k]), 1e-300)
                                 for a, b in zip(records["one"], records["mesh"]) for k in a)
        results["record_keys"] = sorted(set(records["mesh"][0]) - set(records["one"][0]))
        for source, target in (("mesh", None), ("one", mesh)):
            stopped = os.path.join(directory, f"{source}_stopped")
            shutil.copytree(os.path.join(directory, source, CHECKPOINTS_DIR),
                            os.path.join(stopped, CHECKPOINTS_DIR),
                            ignore=lambda _, names: [n for n in names if n.isdigit() and int(n) > 8])
            with open(os.path.join(directory, source, METRICS_FILE)) as f:
                first_epoch = f.readline()
            with open(os.path.join(stopped, METRICS_FILE), "w") as f:
                f.write(first_epoch)
            resumed = nnx.clone(model)
            train(resumed, data, config, stopped, resume=True, mesh=target)
            label = "one" if target is None else "mesh"
            results[f"{source}_resumed_on_{label}"] = relative(params[label], nnx.state(resumed, nnx.Param))
    return results


class Noisy(nnx.Module):
    """w x + e with e ~ N(0, I) from its own random stream, as RNODE's Hutchinson noise."""

    def __init__(self):
        self.w = nnx.Param(jnp.ones((), jnp.float64))
        self.rngs = nnx.Rngs(noise=3)

    def __call__(self, x):
        return self.w * x + jax.random.normal(self.rngs.noise(), x.shape, x.dtype)


def noisy_loss(model, x):
    loss = jnp.mean(model(x) ** 2)
    return loss, {"loss": loss}


def check_random_streams(mesh) -> dict:
    """Device d draws from its stream's key folded with d: the data-parallel loss and gradient
    against those of the 8 shards, each on one device with the folded key; the stream's counter
    advances once, as on one device."""
    x = np.random.default_rng(2).normal(size=(16, 3))
    graphdef, state = make_train_state(Noisy(), optax.sgd(0.1))
    stepped, metrics = data_parallel_train_step(graphdef, noisy_loss, mesh)(state, x)
    losses, grads = [], []
    for d, shard in enumerate(np.split(x, 8)):
        model = nnx.merge(graphdef, state, copy=True)["model"]  # merge shares variables with `state`
        nnx.update(model, jax.tree.map(lambda k: jax.random.fold_in(k, d), nnx.state(model, nnx.RngKey)))
        (loss, _), grad = nnx.value_and_grad(noisy_loss, has_aux=True)(model, shard)
        losses.append(float(loss))
        grads.append(float(grad["w"][...]))
    w_expected = 1.0 - 0.1 * np.mean(grads)
    counts = [int(c) for c in jax.tree.leaves(nnx.state(nnx.merge(graphdef, stepped)["model"], nnx.RngCount))]
    return {"loss": abs(float(metrics["loss"]) - np.mean(losses)) / np.mean(losses),
            "w": abs(float(stepped["model"]["w"][...]) - w_expected) / abs(w_expected),
            "shards_differ": len(set(losses)) == 8, "counts": counts}


def check_mesh(out: str) -> None:
    host_devices(8)
    jax.config.update("jax_enable_x64", True)
    mesh, data, results = data_mesh(8), batches(), {}
    started = time.perf_counter()
    for name in ("resnet", "rknet", "odenet"):
        graphdef, state = train_state(name)
        reference = (micro_batch_step(graphdef, 8) if name == "odenet"
                     else make_train_step(graphdef, classification_loss))
        one_last, one_first, one_history = run(reference, state, data)
        graphdef, state = train_state(name, mesh)
        step = data_parallel_train_step(graphdef, classification_loss, mesh)
        last, first, history = run(step, state, data)
        results[name] = {
            "first_step": relative(one_first, first), "last_step": relative(one_last, last),
            "metrics": max(abs(a[k] - b[k]) / max(abs(a[k]), 1e-300)
                           for a, b in zip(one_history, history) for k in a),
            "nfe": history[0].get("nfe"), "nfe_device_max": history[0].get("nfe_device_max"),
            "reference_nfe_device_max": one_history[0].get("nfe_device_max"),
            "sharding": str(jax.tree.leaves(last)[0].sharding.spec), "cpu_s": time.process_time()}
        if name == "resnet":
            resnet = (reference, step, data)
    results["seconds_models"] = time.perf_counter() - started

    results["random_streams"] = check_random_streams(mesh)
    results["train"] = check_train(mesh)
    results["cpu_s_train"] = time.process_time()

    # Non-finite input in one shard: the models report it (one program, nothing raised); a loss
    # whose model raises it (model(x): a host callback, so two programs) raises, no abort.
    one, par, data = resnet
    graphdef, state = train_state("resnet", mesh)
    x = data[0][0].copy()
    x[13, 0, 0, 0] = np.nan
    results["nan_reported"] = float(par(state, x, data[0][1])[1]["failed_solves"])
    raising = data_parallel_train_step(
        graphdef, lambda model, x, y: classification_metrics(model(x), y), mesh)
    try:
        raising(state, x, data[0][1])
        results["nan_error"] = None
    except Exception as error:  # noqa: BLE001 - the type and message are what is checked
        results["nan_error"] = {"type": type(error).__name__, "notes": getattr(error, "__notes__", []),
                                "non_finite": "y0 contains non-finite values" in str(error)}

    errors = {}
    for label, call in (
            ("indivisible", lambda: shard_batch(mesh, np.zeros((10, 3)))),
            ("mesh_axis", lambda: data_parallel_train_step(
                graphdef, classification_loss, jax.sharding.Mesh(np.array(jax.devices()), ("batch",)))),
            ("too_many_devices", lambda: data_mesh(9))):
        try:
            call()
            errors[label] = None
        except (ValueError, TypeError) as error:
            errors[label] = f"{type(error).__name__}: {error}"
    results["errors"] = errors
    results["seconds"] = time.perf_counter() - started
    with open(out, "w") as f:
        json.dump(results, f, indent=1)


def check_process(process_id: int, port: int, out: str) -> None:
    host_devices(4)
    jax.config.update("jax_enable_x64", True)
    initialize(f"127.0.0.1:{port}", 2, process_id, heartbeat_timeout_s=5)
    mesh, data = data_mesh(8), batches()
    results = {"process_count": jax.process_count(), "devices": jax.device_count(),
               "local_devices": jax.local_device_count()}
    graphdef, state = train_state("resnet")
    step = data_parallel_train_step(graphdef, classification_loss, mesh)
    last, first, history = run(step, replicate(mesh, state), data)
    local = shard_batch(mesh, data[0][0])[0]
    results["rows_here"] = sorted({int(s.index[0].start) for s in local.addressable_shards})
    if process_id == 0:
        one_last, one_first, one_history = run(make_train_step(graphdef, classification_loss), state, data)
        results.update(first_step=relative(one_first, first), last_step=relative(one_last, last),
                       metrics=max(abs(a[k] - b[k]) / max(abs(a[k]), 1e-300)
                                   for a, b in zip(one_history, history) for k in a))
    try:
        data_mesh(3)
        results["odd_mesh_error"] = None
    except ValueError as error:
        results["odd_mesh_error"] = str(error)
    results["cpu_s"] = time.process_time()
    with open(out, "w") as f:
        json.dump(results, f, indent=1)
    multihost_utils.sync_global_devices("results written")
    if process_id == 1:
        os._exit(0)  # leaves without telling anyone, like a crashed process
    time.sleep(1)
    jax.block_until_ready(step(last, *data[0]))  # needs process 1: the coordination service must stop us
    print("process 0 was not stopped", flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "mesh":
        check_mesh(sys.argv[2])
    else:
        check_process(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
