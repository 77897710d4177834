"""Data parallelism: the batch sharded over the mesh axis `data`, every device its own solve.

A train step on a mesh of N devices is one program, by JAX's own SPMD machinery:

1. `jax.shard_map` over `data`: each device takes its B/N examples, the replicated model and
   computes the loss, the metrics and the gradient of its own part, with no communication at all.
   An adaptive ODE block therefore runs its own step-size control on each device: no all-reduce
   of the error norm per adaptive step (diffrax issue 407), and its NFE is per device.
2. then the mean of the N gradients (an all-reduce XLA inserts) and the optimiser, with
   parameters and optimiser state replicated.

Unless part 1 holds a host callback (`holds_host_callback`): then it is two programs, with a host
wait between them. Value checks that raise from a host callback (`equinox.error_if`: `model(x)` of
a `neuralode.models` classifier, a solve with `throw=True`) cannot be left inside a
program with a collective: when one fires on one device, the other devices wait at the collective
until XLA aborts the process (measured with jax 0.10.2 on host devices: "Termination timeout for
all reduce ... Expected 4 threads, only 3 arrived", SIGABRT after 40 s), under `shard_map` as under
a plainly batch-sharded `jit` (which also moves the callback's operands to device 0, diffrax issues
247 and 403). Program 1 has no collective, and the host waits for it before it dispatches program
2, so such an error is an ordinary Python exception (`jax.errors.JaxRuntimeError` carrying
equinox's message). The price is a host wait and a second dispatch per step. The models'
`forward` (what the default loss calls) reports its solver failures as `failed_solves` instead,
and `BacksolveAdjoint`'s backward pass reports into the step's metrics
(`neuralode.train_step.metrics_and_gradients`), so their steps are one program.

What the numbers are. With equal shards, the mean of the per-device gradients of per-device mean
losses is the gradient of the batch mean, so a fixed-step model (ResNet, RK-Net) takes the
one-device step to rounding. An adaptive model takes the step of one device with the batch cut
into N micro-batches, each solved on its own (gradient accumulation), which differs from the
full-batch solve by the solver's tolerance. Random streams (`nnx.Rngs`: RNODE's Hutchinson noise,
dropout) are folded with the device index on meshes of more than one device (device d draws from
`fold_in(key, d)`), so the devices draw independent noise; their counters advance as on one device.
Floating-point variables other than parameters that the forward pass changes (BatchNorm averages)
become the mean over devices. Metrics are the means over devices; on more than one device each
metric whose name starts with `nfe` also gets `<name>_device_max`, the count of the slowest device,
which sets the step time.

A batch whose size the device count does not divide (the last, smaller batch of an epoch) is
computed whole on every device, without folding: the one-device step, at N times its work.

Multi-process (`neuralode.parallel.distributed.initialize` first): every process passes the same
global batch, and `shard_batch` hands the devices of each process only that process's rows
(`jax.make_array_from_process_local_data`).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.extend.core import ClosedJaxpr, Jaxpr
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as Spec

from neuralode.train_step import LossFn, apply_gradients, metrics_and_gradients

DATA = "data"


def data_mesh(devices: int | Sequence[jax.Device] | None = None) -> Mesh:
    """A one-axis mesh named `data`: over `devices` (a list), or the first `devices` of
    `jax.devices()` taking the same number from every process (an int), or all of them (None)."""
    available = jax.devices()
    if devices is None or isinstance(devices, (int, np.integer)) and not isinstance(devices, bool):
        count = len(available) if devices is None else int(devices)
        processes = jax.process_count()
        if not 1 <= count <= len(available) or count % processes:
            raise ValueError(f"devices: expected a multiple of the process count {processes} in "
                             f"[1, {len(available)}] (the devices JAX sees) or None, got {devices!r}")
        per_process = count // processes
        chosen = [d for p in range(processes)
                  for d in [d for d in available if d.process_index == p][:per_process]]
    elif isinstance(devices, Sequence) and devices and all(isinstance(d, jax.Device) for d in devices):
        chosen = list(devices)
    else:
        raise TypeError(f"devices: expected an int, a non-empty sequence of jax.Device or None, "
                        f"got {devices!r}")
    return Mesh(np.array(chosen), (DATA,), axis_types=(AxisType.Auto,))


def data_size(mesh: Mesh) -> int:
    """The number of devices along the mesh axis `data` (after checking that there is one)."""
    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh: expected a jax.sharding.Mesh, got {type(mesh).__name__}")
    if DATA not in mesh.axis_names:
        raise ValueError(f"mesh: expected an axis named {DATA!r} to shard the batch over, found axes "
                         f"{mesh.axis_names} (build one with neuralode.parallel.data_mesh)")
    return int(mesh.shape[DATA])


def replicate(mesh: Mesh, tree: Any) -> Any:
    """Every leaf of `tree` (arrays, identical in every process) replicated on all devices of `mesh`."""
    data_size(mesh)
    return jax.device_put(tree, NamedSharding(mesh, Spec()))


def shard_batch(mesh: Mesh, *arrays: Any) -> tuple[jax.Array, ...]:
    """The global batch `arrays` (the same host arrays in every process, one leading batch axis)
    sharded over the mesh axis `data`: each device holds B/N consecutive examples, and each process
    transfers only the rows of its own devices."""
    size, length = data_size(mesh), _batch_length(arrays)
    if length % size:
        raise ValueError(f"batch: {length} examples do not divide among the {size} devices of mesh "
                         f"axis {DATA!r}; use a batch size that is a multiple of {size}")
    return tuple(_put(mesh, Spec(DATA), np.asarray(a)) for a in arrays)


def _batch_length(arrays: tuple) -> int:
    """The common length of the leading (batch) axis of `arrays`."""
    lengths = {np.shape(a)[0] if np.ndim(a) else None for a in arrays}
    if not arrays or len(lengths) != 1 or None in lengths:
        raise ValueError(f"batch: expected arrays with one common leading batch axis, got shapes "
                         f"{[np.shape(a) for a in arrays]}")
    return lengths.pop()


def _put(mesh: Mesh, spec: Spec, array: np.ndarray) -> jax.Array:
    """`array` (global, the same in every process) placed by `spec`, from this process's part."""
    sharding = NamedSharding(mesh, spec)
    if jax.process_count() == 1:  # the process's part is all of it (and device_put is quicker)
        return jax.device_put(array, sharding)
    rows = [index[0] for index in sharding.addressable_devices_indices_map(array.shape).values()]
    start = min(r.start or 0 for r in rows)
    stop = max(array.shape[0] if r.stop is None else r.stop for r in rows)
    return jax.make_array_from_process_local_data(sharding, array[start:stop], array.shape)


def _local(graphdef: nnx.GraphDef, loss_fn: LossFn, fold: bool, gradients: bool) -> Callable:
    """One device's part of a step, for `shard_map`: (gradients, changed variables,) metrics, each
    leaf with a leading axis of 1 (the device's slice of the stacked result)."""

    def local(state, *batch):
        model = nnx.merge(graphdef, state)
        if fold:  # independent random streams per device
            keys = nnx.state(model, nnx.RngKey)
            device = jax.lax.axis_index(DATA)
            nnx.update(model, jax.tree.map(lambda key: jax.random.fold_in(key, device), keys))
        if gradients:
            metrics, grads = metrics_and_gradients(loss_fn, model, *batch)
            changed = nnx.state(model, nnx.Not(nnx.Any(nnx.Param, nnx.RngKey)))
            outputs = (grads, changed, metrics)
        else:
            outputs = (loss_fn(model, *batch)[1],)
        return jax.tree.map(lambda leaf: jnp.asarray(leaf)[None], outputs)

    return local


def _device_means(metrics: dict[str, jax.Array], size: int) -> dict[str, jax.Array]:
    """Metrics stacked over `size` devices (leading axis) as their means, plus `<nfe...>_device_max`."""
    means = {name: jnp.mean(value, axis=0) for name, value in metrics.items()}
    if size > 1:
        means.update({f"{name}_device_max": jnp.max(value, axis=0)
                      for name, value in metrics.items() if name.startswith("nfe")})
    return means


def _reduce_changed(value: jax.Array) -> jax.Array:
    """A non-parameter variable the forward pass changed, from its N per-device values: the mean
    for floating point (BatchNorm averages), device 0's otherwise (counters, equal everywhere)."""
    return jnp.mean(value, axis=0) if jnp.issubdtype(value.dtype, jnp.inexact) else value[0]


def _replicated(state: Any, sharding: NamedSharding) -> Any:
    """`state` on every device of `sharding`'s mesh (nothing moves where it is already)."""
    if any(getattr(leaf, "sharding", None) != sharding for leaf in jax.tree.leaves(state)):
        return jax.device_put(state, sharding)
    return state


def holds_host_callback(jaxpr) -> bool:
    """Whether a (closed) jaxpr calls back to the host anywhere (`jax.pure_callback`,
    `jax.debug.callback`, `io_callback`; equinox's `error_if` is one), nested jaxprs included."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    for eqn in jaxpr.eqns:
        if "callback" in eqn.primitive.name:
            return True
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                sub = sub.jaxpr if isinstance(sub, ClosedJaxpr) else sub
                if isinstance(sub, Jaxpr) and holds_host_callback(sub):
                    return True
    return False


class _MeshStep:
    """A model's (`graphdef`) step over `mesh`: the per-device part (`shard_map`) followed by
    `reduce` (the all-reduce and what follows it), compiled per kind of batch (sharded, or
    replicated when the device count does not divide it) as one program when the per-device part
    holds no host callback, and as two programs with a host wait between them when it does."""

    def __init__(self, mesh: Mesh, graphdef: nnx.GraphDef, loss_fn: LossFn, gradients: bool,
                 reduce: Callable):
        self.mesh, self.size = mesh, data_size(mesh)
        self.graphdef, self.loss_fn, self.gradients, self.reduce = graphdef, loss_fn, gradients, reduce
        self.programs = {}

    def _per_device(self, sharded: bool, arity: int) -> Callable:
        batch_spec = Spec(DATA) if sharded else Spec()
        local = _local(self.graphdef, self.loss_fn, sharded and self.size > 1, self.gradients)
        return jax.shard_map(local, mesh=self.mesh, in_specs=(Spec(),) + (batch_spec,) * arity,
                             out_specs=Spec(DATA), check_vma=False)

    def _programs(self, sharded: bool, state, batch) -> tuple[Callable, Callable | None]:
        """`(first, second)`: the fused step and None, or the per-device part and `reduce`."""
        key = (sharded, len(batch))
        if key not in self.programs:
            per_device, replicated = self._per_device(*key), NamedSharding(self.mesh, Spec())
            batch_sharding = NamedSharding(self.mesh, Spec(DATA) if sharded else Spec())
            fused = jax.jit(lambda state, *batch: self.reduce(state, *per_device(
                self._model(state), *batch)), out_shardings=replicated,
                in_shardings=(replicated,) + (batch_sharding,) * len(batch))
            if holds_host_callback(fused.trace(state, *batch).jaxpr):
                self.programs[key] = (jax.jit(per_device),
                                      jax.jit(self.reduce, out_shardings=replicated))
            else:
                self.programs[key] = (fused, None)
        return self.programs[key]

    def _model(self, state):
        return state["model"] if self.gradients else state

    def __call__(self, state, batch: tuple) -> Any:
        """The step on the replicated `state` and the global `batch`."""
        if not batch:
            raise ValueError("batch: expected at least one array")
        sharded = _batch_length(batch) % self.size == 0
        first, second = self._programs(sharded, state, batch)
        if second is None and jax.process_count() == 1:
            return first(state, *batch)  # jit places the host batch, as the plain step's does
        batch = (shard_batch(self.mesh, *batch) if sharded
                 else tuple(_put(self.mesh, Spec(), np.asarray(a)) for a in batch))
        if second is None:
            return first(state, *batch)
        outputs = first(self._model(state), *batch)
        try:  # wait for it before any collective: a device whose value check fired raises here
            jax.block_until_ready(jax.tree.leaves(outputs)[-1])  # one output spans every device
        except jax.errors.JaxRuntimeError as error:
            error.add_note(f"(raised on a device's part of the batch of a data-parallel step over "
                           f"{self.size} devices: a value check of the model failed there)")
            raise
        return second(state, *outputs)


def data_parallel_train_step(graphdef: nnx.GraphDef, loss_fn: LossFn, mesh: Mesh) -> Callable:
    """The data-parallel `step(state, *batch) -> (state, metrics)` of `make_train_state`'s
    `(graphdef, state)` (`neuralode.train_step`): the same optimiser step as `make_train_step`,
    with `state` replicated on `mesh` (`replicate`) and the global batch (host arrays, the same in
    every process) sharded over its axis `data`. Metrics are device means, plus
    `<nfe...>_device_max`; see the module docstring for what the numbers are."""
    size, replicated = data_size(mesh), NamedSharding(mesh, Spec())
    mesh_step = None  # made at the first call: its per-device part takes the model's state only

    def update(state, grads, changed, metrics):
        parts = nnx.merge(graphdef, state)
        nnx.update(parts["model"], jax.tree.map(_reduce_changed, changed))
        grads = jax.tree.map(lambda g: jnp.mean(g, axis=0), grads)  # the all-reduce
        return apply_gradients(parts, grads), _device_means(metrics, size)

    def step(state: nnx.State, *batch: Any) -> tuple[nnx.State, dict[str, jax.Array]]:
        nonlocal mesh_step
        state = _replicated(state, replicated)
        if mesh_step is None:
            model_graphdef = nnx.graphdef(nnx.merge(graphdef, state)["model"])
            mesh_step = _MeshStep(mesh, model_graphdef, loss_fn, True, update)
        return mesh_step(state, batch)

    return step


def data_parallel_eval_step(graphdef: nnx.GraphDef, loss_fn: LossFn, mesh: Mesh) -> Callable:
    """The data-parallel `evaluate(model_state, *batch) -> metrics` (device means, plus
    `<nfe...>_device_max`) of `loss_fn` for a model's graph definition, as `make_eval_step`."""
    size, replicated = data_size(mesh), NamedSharding(mesh, Spec())
    mesh_step = _MeshStep(mesh, graphdef, loss_fn, False,
                            lambda model_state, metrics: _device_means(metrics, size))
    return lambda model_state, *batch: mesh_step(_replicated(model_state, replicated), batch)
