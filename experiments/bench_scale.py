"""Benchmark of data parallelism (`neuralode.parallel.data`): its overhead, weak scaling, and what
the per-device adaptive solve saves over a plainly batch-sharded `jit`.

    python -m experiments.bench_scale [--quick] [--out DIR] [--devices N]

- sharded_overhead: a ResNet train step through `data_parallel_train_step` on a mesh of one device
  over `make_train_step` on that device, same batch (goal <= 1.05).
- weak_scaling: ResNet and ODE-Net train steps on 1, 2, 4, ... devices with the batch per device
  fixed: time per step, examples per second per device, and its ratio to one device (1.0 is
  perfect scaling). Without accelerators the devices are host CPU devices that share this
  machine's cores (`cores` in the JSON): beyond the core count each device gets a smaller share,
  so the per-device throughput falls by design of the machine, not of the code.
- ode_shard_map_vs_jit: the ODE-Net on the most devices, its step by `data_parallel_train_step`
  (each device its own adaptive solve, NFE per device) against `make_train_step`'s jitted step
  fed the same batch-sharded arrays (XLA partitions one solve over all devices: an all-reduce of
  the error norm every step, and equinox's error checks gather their operands on device 0), and
  against that step on one device with the whole batch.
Run times exclude compilation, block on results, and are medians of interleaved repeats.
"""
from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np
import optax
from flax import nnx

from experiments.common import flag, main, save_figure, time_alternating
from neuralode.data import load_dataset
from neuralode.models import ODENet, ResNet
from neuralode.parallel.data import (data_mesh, data_parallel_train_step, replicate,
                                     shard_batch)
from neuralode.parallel.distributed import host_devices
from neuralode.train_step import (check_step_metrics, classification_loss, make_train_state,
                                  make_train_step)


@dataclasses.dataclass
class Config:
    out: str = flag("results", "directory of bench_scale.json and the figure")
    quick: bool = flag(False, "fewer devices, smaller nets and batches: the QUICK settings (explicit "
                       "flags still win)")
    devices: int = flag(8, "the most devices: weak scaling runs on 1, 2, 4, ... up to it (host CPU devices, "
                        "made at start, unless JAX finds accelerators)")
    channels: tuple[int, ...] = flag((32, 64), "widths of the stages of the ResNet and the ODE-Net")
    batch_per_device: int = flag(32, "examples per device in weak scaling and in shard_map vs jit")
    overhead_batch: int = flag(128, "batch of the one-device overhead measurement")
    rtol: float = flag(1e-3, "ODE-Net tolerances (rtol = atol)")
    repeats: int = flag(7, "timing samples per train step (median)")
    number: int = flag(3, "train steps averaged per timing sample")
    seed: int = flag(0, "seed of the initial parameters")


QUICK = {"devices": 4, "channels": (8, 16), "batch_per_device": 16, "overhead_batch": 64,
         "repeats": 3, "number": 2}


def build(cfg: Config, name: str) -> nnx.Module:
    options = dict(channels=tuple(cfg.channels), norm=True, rngs=nnx.Rngs(cfg.seed))
    if name == "resnet":
        return ResNet(1, 10, blocks=2, **options)
    return ODENet(1, 10, rtol=cfg.rtol, atol=cfg.rtol, **options)


def timed(cfg: Config, calls: dict, desc: str) -> dict:
    for call in calls.values():  # compile and warm up
        call()
    return {key: t["run_s"] for key, t in time_alternating(calls, cfg.repeats, cfg.number, desc=desc).items()}


def step_call(step, state, x, y):
    """A zero-argument call of `step` that blocks on its result, and the result's metrics (after
    checking that no ODE solve of the model failed, forwards or backwards: timings of a failed step
    mean nothing)."""
    call = lambda: jax.block_until_ready(step(state, x, y))  # noqa: E731
    metrics = {k: float(v) for k, v in call()[1].items()}
    check_step_metrics(metrics, "a step of the benchmark")
    return call, metrics


def run(cfg: Config) -> dict:
    try:
        host_devices(cfg.devices)  # a no-op for accelerators; refused once JAX has started
    except RuntimeError:
        pass  # JAX already started (another experiment in this process): its devices
    available = jax.device_count()
    counts = [n for n in (1, 2, 4, 8, 16, 32) if n <= min(cfg.devices, available)]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    data = load_dataset("digits")
    x_all, y_all = data.x_train.astype(np.float32), data.y_train

    # Overhead of the data-parallel path on one device.
    graphdef, state = make_train_state(build(cfg, "resnet"), optax.adam(1e-3))
    x, y = x_all[:cfg.overhead_batch], y_all[:cfg.overhead_batch]
    mesh = data_mesh(1)  # the state replicated once, as a training loop's steps return it
    calls = {"plain": step_call(make_train_step(graphdef, classification_loss), state, x, y)[0],
             "sharded": step_call(data_parallel_train_step(graphdef, classification_loss, mesh),
                                  replicate(mesh, state), x, y)[0]}
    overhead = timed(cfg, calls, "overhead")

    # Weak scaling.
    scaling, most = {}, {}  # most: each model's step on the most devices, reused below
    for name in ("resnet", "odenet"):
        graphdef, state = make_train_state(build(cfg, name), optax.adam(1e-3))
        rows = []
        for n in counts:
            batch = n * cfg.batch_per_device
            mesh = data_mesh(n)
            call, metrics = step_call(data_parallel_train_step(graphdef, classification_loss, mesh),
                                      replicate(mesh, state), x_all[:batch], y_all[:batch])
            most[name] = graphdef, state, call, metrics
            seconds = timed(cfg, {n: call}, f"{name} on {n}")[n]
            rows.append({"devices": n, "batch": batch, "step_s": seconds,
                         "examples_per_s_per_device": batch / seconds / n,
                         "nfe": metrics["nfe"], "nfe_device_max": metrics.get("nfe_device_max", metrics["nfe"])})
        for row in rows:
            row["efficiency"] = row["examples_per_s_per_device"] / rows[0]["examples_per_s_per_device"]
        scaling[name] = rows

    # The ODE-Net on the most devices: per-device solves (its weak-scaling step) against one solve
    # partitioned by XLA.
    n = counts[-1]
    mesh, batch = data_mesh(n), n * cfg.batch_per_device
    graphdef, state, per_device, per_device_metrics = most["odenet"]
    x, y = x_all[:batch], y_all[:batch]
    plain = make_train_step(graphdef, classification_loss)
    partitioned, partitioned_metrics = step_call(plain, replicate(mesh, state), *shard_batch(mesh, x, y))
    one_device, one_device_metrics = step_call(plain, state, x, y)
    times = timed(cfg, {"shard_map": per_device, "jit": partitioned, "one_device": one_device},
                  "odenet shard_map vs jit")
    ode = {"devices": n, "batch": batch,
           "shard_map": {"step_s": times["shard_map"], "nfe_mean": per_device_metrics["nfe"],
                         "nfe_device_max": per_device_metrics.get("nfe_device_max", per_device_metrics["nfe"])},
           "jit": {"step_s": times["jit"], "nfe": partitioned_metrics["nfe"]},
           "one_device": {"step_s": times["one_device"], "nfe": one_device_metrics["nfe"]},
           "time_ratio_jit_over_shard_map": times["jit"] / times["shard_map"],
           "time_ratio_one_device_over_shard_map": times["one_device"] / times["shard_map"]}

    figure = plot(cfg, scaling, cores)
    platform = jax.default_backend()
    note = (f"{platform} devices" if platform != "cpu" else
            f"{available} host CPU devices sharing {cores} cores: beyond {cores} devices the per-device "
            "throughput falls because the devices split the same cores")
    headline = {"platform": platform, "cores": cores, "devices": counts[-1],
                "sharded_overhead": overhead["sharded"] / overhead["plain"],
                **{f"{name}_efficiency_at_{counts[-1]}": rows[-1]["efficiency"] for name, rows in scaling.items()},
                "odenet_jit_over_shard_map": ode["time_ratio_jit_over_shard_map"],
                "odenet_one_device_over_shard_map": ode["time_ratio_one_device_over_shard_map"],
                "odenet_nfe_shard_map_mean_max": (ode["shard_map"]["nfe_mean"], ode["shard_map"]["nfe_device_max"]),
                "odenet_nfe_jit": ode["jit"]["nfe"]}
    return {"headline": headline, "note": note, "platform": platform, "cores": cores,
            "devices_available": available,
            "overhead": {"batch": cfg.overhead_batch, "plain_step_s": overhead["plain"],
                         "sharded_step_s": overhead["sharded"],
                         "sharded_overhead": overhead["sharded"] / overhead["plain"]},
            "weak_scaling": scaling, "ode_shard_map_vs_jit": ode, "figure": str(figure)}


def plot(cfg: Config, scaling: dict, cores: int):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for name, rows in scaling.items():
        ax.plot([r["devices"] for r in rows], [r["efficiency"] for r in rows], "o-", label=name)
    ax.axvline(cores, color="gray", ls=":", label=f"{cores} cores")
    ax.set(xscale="log", xlabel="devices (batch per device fixed)", ylabel="throughput per device / one device's",
           title=f"weak scaling on {jax.default_backend()} devices")
    ax.set_xticks([r["devices"] for r in next(iter(scaling.values()))], minor=False)
    ax.get_xaxis().set_major_formatter(plt.ScalarFormatter())
    ax.grid(alpha=0.3)
    ax.legend()
    return save_figure(cfg, fig, "bench_scale")


if __name__ == "__main__":
    main(__name__, Config, run, QUICK)
