"""Layer-parallel training of a deep ResNet on MNIST-1D: MGRIT over depth against serial training.

    python -m experiments.layer_parallel [--quick] [--out DIR] [--devices N]

The network: stem conv -> `blocks` residual blocks y_{k+1} = y_k + h F_k(y_k) (a `DepthStack` of
`ConvField`s, Euler steps of h = horizon / blocks) -> ReLU, mean pool -> dense. The same network,
from the same initial parameters, is trained twice for the same epochs: serially
(`odeint(..., solver=Euler())`, backprop) and layer-parallel (`neuralode.parallel.
layer_parallel_solve`: depth sharded over `devices` devices, `iterations` MGRIT iterations forward
and `backward_iterations` for the adjoint, torchbraid's inexact 2 and 1 by default; Guenther et al.
2020). The layer-parallel net is evaluated with its own (inexact) forward and with the serial one.

Also measured: the residual per iteration of the forward and the adjoint MGRIT solve, F- and
FCF-relaxation, up to N/m iterations (exact), for each of `probe_coarsenings`, on a batch of the
network's stem features at initialisation and after training; and the wall time per epoch of both
trainings. Training uses m = 2: as the network trains, its fields' Lipschitz constants grow, and
with m = 4 the coarse Euler step of size 4h of the trained network makes the first iteration grow
the residual (rho > 1 in the probes), so the monitor falls back to the serial solve on every step.

On host CPU devices (`--devices N` sets `--xla_force_host_platform_device_count=N` before JAX
starts when no accelerator is present) the devices share the machine's cores, so the layer-parallel
run is slower than the serial one: it does more work (the coarse solves and relaxations of MGRIT)
and only runs in parallel where there are cores to run on. The times are reported as measured.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import sys


def _host_devices_flag(argv: list[str]) -> None:
    """Ask XLA for `--devices` host CPU devices; must run before JAX is imported."""
    devices = Config.devices
    for i, arg in enumerate(argv):
        if arg == "--devices" and i + 1 < len(argv):
            devices = int(argv[i + 1])
        elif arg.startswith("--devices="):
            devices = int(arg.split("=", 1)[1])
    flags = os.environ.get("XLA_FLAGS", "")
    if devices > 1 and "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={devices}"


def _help(text: str, default):
    return dataclasses.field(default=default, metadata={"help": text})


@dataclasses.dataclass
class Config:
    out: str = _help("directory of layer_parallel.json and the figures", "results")
    quick: bool = _help("small settings (QUICK): a minute on two cores", False)
    devices: int = _help("devices on the mesh axis `depth` (host CPU devices without an "
                         "accelerator)", 8)
    width: int = _help("channels of the residual blocks", 16)
    blocks: int = _help("residual blocks N (divisible by coarsening * devices)", 32)
    horizon: float = _help("depth T of the ODE: step h = T / N", 4.0)
    coarsening: int = _help("MGRIT coarsening factor m in training", 2)
    iterations: int = _help("forward MGRIT iterations in training", 2)
    backward_iterations: int = _help("adjoint MGRIT iterations in training", 1)
    relaxation: str = dataclasses.field(default="F", metadata={
        "help": "relaxation in training", "choices": ("F", "FCF")})
    fallback: bool = _help("serial solve where MGRIT diverges, in training", True)
    probe_coarsenings: tuple[int, ...] = _help(
        "coarsening factors of the residual-per-iteration measurements", (2, 4))
    epochs: int = _help("training epochs of each run", 10)
    batch_size: int = _help("training batch size (dividing the 4,000 examples: one compilation)",
                            100)
    learning_rate: float = _help("peak learning rate (AdamW, cosine decay)", 1e-2)
    seed: int = _help("seed of the initial parameters and the data order", 0)
    progress: bool = _help("progress bars", True)


QUICK = {"blocks": 16, "width": 8, "epochs": 3, "probe_coarsenings": (2,)}


if __name__ == "__main__":
    _host_devices_flag(sys.argv[1:])

import time  # noqa: E402
from pathlib import Path  # noqa: E402

import equinox as eqx  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

import neuralode  # noqa: E402
from experiments.common import main, resume_or_clear, save_figure  # noqa: E402
from neuralode import compiled_init  # noqa: E402
from neuralode.data import load_dataset  # noqa: E402
from neuralode.parallel import (MGRIT, depth_mesh, layer_parallel_solve,  # noqa: E402
                                layer_parallel_vjp, shard_layers)
from neuralode.measure import accuracy as accuracy_of  # noqa: E402
from neuralode.train import TrainConfig, read_metrics, train  # noqa: E402


class DeepResNet(nnx.Module):
    """stem conv -> N Euler steps of a `DepthStack` of `ConvField`s over [0, T] -> pool -> dense;
    solved serially (`mgrit=None`) or by `layer_parallel_solve` on `mesh`."""

    def __init__(self, in_channels: int, classes: int, *, width: int, blocks: int, horizon: float,
                 mgrit: MGRIT | None = None, mesh=None, rngs: nnx.Rngs):
        self.stem = nnx.Conv(in_channels, width, (5,), padding="SAME", rngs=rngs)
        self.stack = neuralode.DepthStack(
            lambda r: neuralode.ConvField(width, spatial_dims=1, rngs=r), blocks, rngs=rngs)
        self.head = nnx.Linear(width, classes, rngs=rngs)
        self.horizon, self.mgrit, self.mesh = horizon, mgrit, mesh

    def features(self, x):
        return self.stem(x)

    def forward(self, x):
        y, stats = self.features(x), {}
        if self.mgrit is None:  # reported, not raised: the step holds no host callback
            ts = jnp.array([0.0, self.horizon], y.dtype)
            sol = neuralode.solve(self.stack, y, ts, solver=neuralode.Euler(),
                                  substeps=self.stack.depth, throw=False)
            y = sol.ys[-1]
            stats = {"failed_solves": (sol.result != neuralode.RESULTS.successful).astype(jnp.int32)}
        else:
            sol = layer_parallel_solve(self.stack, y, 0.0, self.horizon, solver=neuralode.Euler(),
                                       mgrit=self.mgrit, mesh=self.mesh)
            k = sol.stats["iterations"]
            y = sol.y1
            stats = {"mgrit_residual": sol.stats["residuals"][k],
                     "mgrit_fallback": sol.stats["fallback"]}
        return self.head(jnp.mean(jax.nn.relu(y), axis=1)), stats

    def __call__(self, x):
        """The logits; raises (when the program runs) if the serial solve failed."""
        logits, stats = self.forward(x)
        if "failed_solves" in stats:
            logits = eqx.error_if(logits, stats["failed_solves"] > 0,
                                  "DeepResNet: the solve of its blocks failed (a non-finite state)")
        return logits


def _model(cfg: Config, dataset, mgrit=None, mesh=None) -> DeepResNet:
    return compiled_init(lambda: DeepResNet(
        dataset.x_train.shape[-1], dataset.num_classes, width=cfg.width, blocks=cfg.blocks,
        horizon=cfg.horizon, mgrit=mgrit, mesh=mesh, rngs=nnx.Rngs(cfg.seed)))


def _residual_histories(model: DeepResNet, x, mgrit: MGRIT, mesh) -> tuple[dict, dict]:
    """Statistics of the forward and the adjoint MGRIT solve of the network's blocks on the stem
    features of x (the cotangent of the mean of the output)."""
    y0 = model.features(x)
    solution, _, backward = layer_parallel_vjp(
        model.stack, y0, 0.0, model.horizon, jnp.ones_like(y0) / y0.size,
        solver=neuralode.Euler(), mgrit=mgrit, mesh=mesh)
    return solution.stats, backward


def convergence_probes(cfg: Config, mesh) -> dict:
    """For each probed m, F and FCF: a jitted `(model, x) -> (forward stats, adjoint stats)` run
    to exactness (N/m iterations), without fallback so that growing residuals show."""
    def probe(m, relaxation):
        mgrit = MGRIT(coarsening=m, iterations=cfg.blocks // m, relaxation=relaxation,
                      backward_iterations=cfg.blocks // m, fallback=False)
        return nnx.jit(functools.partial(_residual_histories, mgrit=mgrit, mesh=mesh))

    return {(m, relaxation): probe(m, relaxation) for m in cfg.probe_coarsenings
            for relaxation in ("F", "FCF")}


def convergence(probes: dict, model: DeepResNet, x) -> dict:
    """{"m=<m>": {relaxation: residuals, rho, iterations and divergence of both solves}}."""
    out = {}
    for (m, relaxation), probe in probes.items():
        forward, backward = probe(model, x)
        out.setdefault(f"m={m}", {})[relaxation] = {
            f"{name}_{key}": np.asarray(stats[key]).tolist()
            for name, stats in (("forward", forward), ("backward", backward))
            for key in ("residuals", "rho", "iterations", "diverged")}
    return out


def _train(cfg: Config, model, dataset, workdir: Path) -> list[dict]:
    config = TrainConfig(epochs=cfg.epochs, batch_size=cfg.batch_size,
                         learning_rate=cfg.learning_rate, seed=cfg.seed, progress=cfg.progress,
                         checkpoint_every=10**9, keep_checkpoints=1)
    train(model, dataset, config, workdir, resume=resume_or_clear(workdir, resume=False))
    return read_metrics(workdir)


def _plots(cfg: Config, results: dict) -> None:
    import matplotlib.pyplot as plt

    probed = list(results["convergence"]["initial"])
    fig, axes = plt.subplots(len(probed), 2, figsize=(10, 3.4 * len(probed)), squeeze=False)
    for row, m in zip(axes, probed):
        for ax, when in zip(row, ("initial", "trained")):
            for relaxation, style in (("F", "-o"), ("FCF", "-s")):
                for direction, colour in (("forward", "C0"), ("backward", "C1")):
                    stats = results["convergence"][when][m][relaxation]
                    r = np.asarray(stats[f"{direction}_residuals"], dtype=float)
                    ax.semilogy(np.arange(len(r)), r, style, color=colour, ms=3,
                                alpha=1.0 if relaxation == "F" else 0.5,
                                label=f"{direction}, {relaxation}-relaxation")
            ax.set(title=f"{m}, {when} parameters", xlabel="MGRIT iteration",
                   ylabel="residual norm (C-points)")
            ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    fig.suptitle(f"MGRIT over depth, MNIST-1D ResNet: N = {cfg.blocks}, {cfg.devices} devices")
    fig.tight_layout()
    save_figure(cfg, fig, "layer_parallel_residuals")

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for name, style in (("serial", "-o"), ("layer_parallel", "-s")):
        history = results["history"][name]
        ax.plot([r["epoch"] for r in history], [100 * r["test_accuracy"] for r in history], style,
                label=name.replace("_", "-"))
    ax.set(xlabel="epoch", ylabel="test accuracy (%)",
           title=f"MNIST-1D, K = {cfg.iterations} forward, {cfg.backward_iterations} backward")
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(cfg, fig, "layer_parallel_accuracy")


def run(cfg: Config) -> dict:
    if len(jax.devices()) < cfg.devices:
        raise ValueError(f"--devices {cfg.devices}: JAX sees {len(jax.devices())} devices; run as "
                         f"`python -m experiments.layer_parallel`, which asks XLA for host devices "
                         f"before JAX starts")
    mesh = depth_mesh(cfg.devices)
    mgrit = MGRIT(coarsening=cfg.coarsening, iterations=cfg.iterations,
                  backward_iterations=cfg.backward_iterations, relaxation=cfg.relaxation,
                  fallback=cfg.fallback)
    dataset = load_dataset("mnist1d")
    batch = jnp.asarray(dataset.x_train[:cfg.batch_size])
    out = Path(cfg.out)

    serial = _model(cfg, dataset)
    parallel = _model(cfg, dataset, mgrit, mesh)
    shard_layers(parallel, mesh)  # each device holds its layers; trained inside jax.set_mesh
    probes = convergence_probes(cfg, mesh)
    results = {"devices": [str(d) for d in mesh.devices.flat], "cpu_cores": os.cpu_count(),
               "convergence": {"initial": convergence(probes, parallel, batch)}}
    history = {}
    for name, model in (("serial", serial), ("layer_parallel", parallel)):
        start = time.perf_counter()
        with jax.set_mesh(mesh) if model is parallel else contextlib.nullcontext():
            history[name] = _train(cfg, model, dataset, out / f"layer_parallel_{name}")
        results[f"{name}_train_s"] = time.perf_counter() - start
    results["history"] = history
    results["convergence"]["trained"] = convergence(probes, parallel, batch)

    # The layer-parallel weights in the serial network: the network the inexact solve approximates.
    check = _model(cfg, dataset)
    nnx.update(check, nnx.state(parallel, nnx.Param))
    accuracy = {"serial": history["serial"][-1]["test_accuracy"],
                "layer_parallel": history["layer_parallel"][-1]["test_accuracy"],
                "layer_parallel_weights_serial_forward": accuracy_of(check, dataset.x_test,
                                                                      dataset.y_test)}
    # Median epoch time without the first epoch, which compiles.
    epoch_s = {name: float(np.median([r["epoch_seconds"] for r in h[1:] or h]))
               for name, h in history.items()}
    gap = 100 * abs(accuracy["layer_parallel"] - accuracy["serial"])
    # The share of training steps whose forward solve fell back to the serial one, per epoch.
    fallbacks = [r["train_mgrit_fallback"] for r in history["layer_parallel"]]
    results.update(accuracy=accuracy, epoch_s=epoch_s, accuracy_gap_points=gap,
                   forward_fallback_share_per_epoch=fallbacks)
    results["headline"] = {
        "test_accuracy_serial": round(100 * accuracy["serial"], 2),
        "test_accuracy_layer_parallel": round(100 * accuracy["layer_parallel"], 2),
        "test_accuracy_layer_parallel_weights_serial_forward":
            round(100 * accuracy["layer_parallel_weights_serial_forward"], 2),
        "gap_points": round(gap, 2), "within_1_point": gap <= 1.0,
        "epoch_s_serial": round(epoch_s["serial"], 2),
        "epoch_s_layer_parallel": round(epoch_s["layer_parallel"], 2),
        "forward_fallback_share_of_steps": round(float(np.mean(fallbacks)), 4),
        "trained_forward_rho_first_iterations": {
            f"{m} {r}": [round(x, 2) for x in stats["forward_rho"][:3]]
            for m, by_relaxation in results["convergence"]["trained"].items()
            for r, stats in by_relaxation.items()},
        "devices": cfg.devices, "cpu_cores": os.cpu_count()}
    _plots(cfg, results)
    return results


if __name__ == "__main__":
    main(__name__, Config, run, QUICK)
