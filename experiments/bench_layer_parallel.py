"""Benchmark of layer-parallel depth (`neuralode.parallel.layer_parallel_solve`): a deep ResNet's
forward and forward+backward passes by two-level MGRIT (F-relaxation, parareal) over 1, 2, 8
devices against the serial network, beside a work model's predicted speed-up.

    python -m experiments.bench_layer_parallel [--quick] [--out DIR]

The network: N Euler steps u_{n+1} = u_n + h f_n(u_n), h = T / N, of a `DepthStack` of
`MLPField(width, hidden=width, layers=2)` (f_n(u) = W2 tanh(W1 u + b1) + b2, one set per layer) on
a batch of `batch` states, in float64; the loss of forward+backward is sum(w * u_N) for a fixed w,
differentiated with respect to every layer's parameters. Serial: `odeint(..., solver=Euler())`,
backprop through the steps. Layer-parallel: `layer_parallel_solve` with coarsening m, K forward and
K_b adjoint iterations (`jax.grad` through its custom_vjp), no fallback, so that each run does the
iterations it is timed for. Without accelerators the devices are host CPU devices made in this
process (`neuralode.parallel.host_devices`); they share the machine's `cores`.

Checks: N/m iterations (forward and adjoint) make MGRIT exact, so `forward_error_exact` (max
|layer-parallel - serial| over every state) and `gradient_error` (relative, `layer_parallel_vjp`'s
parameter gradients) are at rounding; where N/m > `probe_iterations` the probe gives the residual
per iteration only (the figure).

The work model (`experiments._mgrit_model`, where it is derived): MGRIT's wall time on P devices
from its two phases, each timed alone on the P devices in alternation with the runs (to see the
same load), none of it a layer-parallel solve: S_P, the pipelined coarse sweep (N/m Euler steps
of size m h passed along the devices), R_P, the F-relaxation (every device stepping its N/(mP)
intervals through their m layers at once), and lam_P, one hand-off,

    T_mgrit(P) = (K + 1) [ S_P + (1 + 1/m) R_P + 3 lam_P [P > 1] ],

the adjoint's from the same phases by vector-Jacobian products and K_b. Predicted speed-up =
serial time / T. `prediction_error` = max |predicted / measured speed-up - 1| over the measured
depths, device counts (P = 1 included: nothing is calibrated on a layer-parallel run) and both
passes. `predicted_speedup` extrapolates to P = 8 ... 1024 devices with a core each at depth
`predict_depth`: S_P = N/m serial steps (c_s, and c_s + c_b for the adjoint, from the serial
network of the largest measured depth) plus P hand-offs, R_P = N/P steps at the per-step cost of
the one-device relaxation with the nearest number of intervals per device, lam of the most devices
measured that had a core each; beside it `work_model_speedup` is the idealised S(P, m, K) =
N / (N/m + K (N/P + N/m)) (Guenther et al. 2020: equal step costs, no communication). Run times
exclude compilation (reported apart), block on results, and are medians of interleaved repeats.
"""
from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as Spec
from tqdm.auto import tqdm

import neuralode
from experiments._mgrit_model import (extrapolated_speedup, machine_measurements,
                                     phase_calls, predicted_seconds, ring_calls, step_costs,
                                     work_model_speedup)
from experiments.common import (blocking_calls, compile_all, flag, main, save_figure,
                                time_alternating)
from neuralode.parallel import (MGRIT, depth_mesh, host_devices, layer_parallel_solve,
                                layer_parallel_vjp, shard_layers)


@dataclasses.dataclass
class Config:
    out: str = flag("results", "directory of bench_layer_parallel.json and the figures")
    quick: bool = flag(False, "small settings (QUICK): under a minute on two cores")
    depths: tuple[int, ...] = flag((64, 256, 1024, 4096), "network depths N (Euler steps)")
    devices: tuple[int, ...] = flag((1, 2, 8), "device counts P on the mesh axis `depth` (host CPU "
                                    "devices, made at start, without accelerators)")
    width: int = flag(64, "features of the state and of the field's hidden layer")
    batch: int = flag(128, "states solved at once")
    horizon: float = flag(1.0, "depth T of the ODE: step h = T / N")
    coarsening: int = flag(4, "MGRIT coarsening factor m")
    iterations: int = flag(2, "forward MGRIT iterations K of the timed runs")
    backward_iterations: int = flag(1, "adjoint MGRIT iterations K_b of the timed runs")
    probe_iterations: int = flag(16, "the most iterations of the probe (exact where N/m <= it)")
    probe_max_depth: int = flag(4096, "the deepest network probed")
    predict_depth: int = flag(4096, "depth N of the extrapolated speed-ups")
    predict_devices: tuple[int, ...] = flag((8, 16, 32, 64, 128, 256, 512, 1024),
                                            "device counts P of the extrapolated speed-ups")
    repeats: int = flag(5, "timing samples (median)")
    seed: int = flag(0, "seed of the parameters, the states and w")


QUICK = {"depths": (64, 256), "repeats": 3, "probe_max_depth": 64}
PASSES = ("forward", "forward_backward")


# ---------------------------------------------------------------------------------------------
# The network, the timed functions, the measurements.

def make_field(cfg: Config, depth: int) -> neuralode.DepthStack:
    return neuralode.DepthStack(
        lambda rngs: neuralode.MLPField(cfg.width, hidden=cfg.width, layers=2,
                                        param_dtype=jnp.float64, rngs=rngs),
        depth, rngs=nnx.Rngs(cfg.seed))


def inputs(cfg: Config):
    """The initial states y0 and the loss weights w."""
    key_y, key_w = jax.random.split(jax.random.key(cfg.seed))
    return (jax.random.normal(key_y, (cfg.batch, cfg.width), jnp.float64),
            jax.random.normal(key_w, (cfg.batch, cfg.width), jnp.float64))


def pass_fns(cfg: Config, graphdef, mgrit: MGRIT | None = None, mesh=None) -> dict:
    """Jitted (params, y0, w) -> forward: (u_N, MGRIT iterations), forward_backward: (sum(w u_N),
    parameter gradients); serial for mgrit None, else layer-parallel on `mesh`."""
    def forward(params, y0, w):
        field = nnx.merge(graphdef, params)
        if mgrit is None:
            ys = neuralode.odeint(field, y0, jnp.array([0.0, cfg.horizon]),
                                  solver=neuralode.Euler(), substeps=field.depth)
            return ys[-1], jnp.zeros((), jnp.int32)
        sol = layer_parallel_solve(field, y0, 0.0, cfg.horizon, solver=neuralode.Euler(),
                                   mgrit=mgrit, mesh=mesh)
        return sol.y1, sol.stats["iterations"]

    def loss(params, y0, w):
        return jnp.sum(w * forward(params, y0, w)[0])

    return {"forward": jax.jit(forward), "forward_backward": jax.jit(jax.value_and_grad(loss))}


def placed(field, y0, w, mesh=None):
    """(field, y0, w) for a run on `mesh` (None: the default device): layers split by depth."""
    if mesh is None:
        return field, y0, w
    field = nnx.clone(field)
    shard_layers(field, mesh)
    replicated = NamedSharding(mesh, Spec())
    return field, jax.device_put(y0, replicated), jax.device_put(w, replicated)


def _max_error(a, b) -> float:
    return float(max(np.max(np.abs(np.asarray(x) - np.asarray(y)))
                     for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))))


def _relative_error(a, b) -> float:
    return float(max(_max_error(x, y) / np.max(np.abs(np.asarray(y)))
                     for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))))


def probe(cfg: Config, field, y0, w, devices: int) -> dict:
    """MGRIT forward and adjoint for min(N/m, probe_iterations) iterations each on `devices`,
    against the serial states and gradients: errors, residuals per iteration, rho."""
    depth, mesh = field.depth, depth_mesh(devices)
    iterations = min(depth // cfg.coarsening, cfg.probe_iterations)
    mgrit = MGRIT(cfg.coarsening, iterations, backward_iterations=iterations, fallback=False)
    ts = jnp.linspace(0.0, cfg.horizon, depth + 1)

    def serial(field, y0, w):
        def states(field):
            return neuralode.odeint(field, y0, ts, solver=neuralode.Euler())
        return states(field), nnx.grad(lambda field: jnp.sum(w * states(field)[-1]))(field)

    def parallel(field, y0, w):
        return layer_parallel_vjp(field, y0, 0.0, cfg.horizon, w, solver=neuralode.Euler(),
                                  mgrit=mgrit, mesh=mesh)

    states, grads = nnx.jit(serial)(field, y0, w)
    solution, (par_grads, _), backward = nnx.jit(parallel)(*placed(field, y0, w, mesh))
    stats = {f"{name}_{key}": np.asarray(s[key]).tolist() for key in ("residuals", "rho")
             for name, s in (("forward", solution.stats), ("backward", backward))}
    errors = {"forward_error": _max_error(solution.ys, states),
              "gradient_error": _relative_error(par_grads, nnx.state(grads, nnx.Param))}
    return {"devices": devices, "iterations": iterations,
            "exact": iterations * cfg.coarsening == depth, **errors, **stats}


def measure_depth(cfg: Config, depth: int, counts: list[int], ring: dict) -> dict:
    """Time serial and layer-parallel passes at one depth, in alternation with the work model's
    measurements (the `ring` calls, MGRIT's phases on each device count); errors after K (K_b)
    iterations; predicted times."""
    field, (y0, w) = make_field(cfg, depth), inputs(cfg)
    graphdef = nnx.graphdef(field)
    mgrit = MGRIT(coarsening=cfg.coarsening, iterations=cfg.iterations,
                  backward_iterations=cfg.backward_iterations, fallback=False)
    fns, args = {}, {}
    for p in ["serial", *counts]:
        mesh = None if p == "serial" else depth_mesh(p)
        field_p, y0_p, w_p = placed(field, y0, w, mesh)
        for name, fn in pass_fns(cfg, graphdef, None if mesh is None else mgrit, mesh).items():
            fns[p, name], args[p, name] = fn, (nnx.state(field_p), y0_p, w_p)
    compiled, compile_s = compile_all(fns, args)
    outputs = {key: compiled[key](*args[key]) for key in fns}
    rounds = cfg.iterations + 1
    phases = phase_calls(cfg, field, counts, rounds)
    times = time_alternating({**blocking_calls(compiled, args), **ring, **phases},
                             cfg.repeats, desc=f"N = {depth}")
    seconds = {p: {n: times[p, n]["run_s"] for n in PASSES} for p in ["serial", *counts]}
    costs = step_costs(depth, seconds["serial"])
    measured = machine_measurements(times, counts, rounds)
    consistent = costs["adjoint_sweep"] > costs["sweep"]  # else other work slowed the forward
    if not consistent:
        print(f"N = {depth}: backprop step cost <= 0 ({costs}): timings disturbed by other work")
    row = {"depth": depth, "serial_s": seconds["serial"], "step_costs_s": costs,
           "consistent": consistent, "machine": measured, "parallel": {},
           "serial_compile_s": {n: compile_s["serial", n] for n in PASSES}}
    for p in counts:
        predicted = predicted_seconds(cfg, p, measured[p])
        speedup = {n: seconds["serial"][n] / seconds[p][n] for n in PASSES}
        predicted_speedup = {n: seconds["serial"][n] / predicted[n] for n in PASSES}
        row["parallel"][p] = {
            "run_s": seconds[p], "predicted_s": predicted,
            "compile_s": {n: compile_s[p, n] for n in PASSES},
            "iterations": int(outputs[p, "forward"][1]),
            "final_error": _max_error(outputs[p, "forward"][0], outputs["serial", "forward"][0]),
            "final_gradient_error": _relative_error(outputs[p, "forward_backward"][1],
                                                    outputs["serial", "forward_backward"][1]),
            "speedup": speedup, "predicted_speedup": predicted_speedup,
            "prediction_ratio": {n: predicted_speedup[n] / speedup[n] for n in PASSES}}
    if depth <= cfg.probe_max_depth:
        row["probe"] = probe(cfg, field, y0, w, counts[-1])
    return row


def run(cfg: Config) -> dict:
    jax.config.update("jax_enable_x64", True)
    if 1 not in cfg.devices:
        raise ValueError(f"--devices must include 1 (its relaxation gives the extrapolation's "
                         f"costs), got {cfg.devices}")
    bad = [(d, p) for d in cfg.depths for p in cfg.devices if d % (cfg.coarsening * p)]
    if bad:
        raise ValueError(f"--depths: N = {bad[0][0]} is not divisible by coarsening m = "
                         f"{cfg.coarsening} times P = {bad[0][1]} devices")
    try:
        host_devices(max(cfg.devices))  # without accelerators; refused once JAX has run
    except RuntimeError:
        pass  # JAX already started in this process: the devices it has
    available = jax.device_count()
    counts = sorted(p for p in set(cfg.devices) if p <= available)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    platform = jax.default_backend()
    load, ring = os.getloadavg(), ring_calls(cfg, counts)  # other work slows runs unevenly
    print(f"{platform}: {available} devices, {cores} cores, load {load[0]:.1f}; P = {counts}")
    rows = [measure_depth(cfg, depth, counts, ring)
            for depth in tqdm(cfg.depths, desc="depths")]

    ratios = {f"N={row['depth']} P={p} {n}": entry["prediction_ratio"][n] for row in rows
              for p, entry in row["parallel"].items() for n in PASSES}
    prediction_error = max((abs(r - 1) for r in ratios.values()), default=None)
    exact, largest = [row["probe"] for row in rows if row.get("probe", {}).get("exact")], rows[-1]
    # P devices with a core each: lam of the most devices measured that had a core each.
    latency = largest["machine"][max(p for p in counts if p <= cores)]["latency_s"]
    predicted = extrapolated_speedup(cfg, cfg.predict_depth, cfg.predict_devices,
                                     largest["step_costs_s"],
                                     {row["depth"]: row["machine"][1] for row in rows}, latency)
    work = (cfg.iterations + 1) * (1 + 2 / cfg.coarsening)
    note = (f"{platform} devices" if platform != "cpu" else
            f"{available} host CPU devices in one process sharing {cores} cores: the relaxation of "
            f"P > {cores} devices runs on {cores} cores, and the forward MGRIT steps (K + 1)(1 + "
            f"2/m) = {work:g} times the serial network's steps")
    table = {p: {f"{n}_{kind}": round(e[key][n], 3) for n in PASSES
                 for kind, key in (("measured", "speedup"), ("predicted", "predicted_speedup"))}
             for p, e in largest["parallel"].items()}
    headline = {
        "platform": platform, "cores": cores, "load_average_at_start": round(load[0], 1),
        "devices": counts, "depth": largest["depth"], "speedup": table,
        "inconsistent_depths": [row["depth"] for row in rows if not row["consistent"]],
        "prediction_error": None if prediction_error is None else round(prediction_error, 3),
        "forward_error_exact": max((e["forward_error"] for e in exact), default=None),
        "gradient_error": max((e["gradient_error"] for e in exact), default=None),
        "final_error_K": largest["parallel"][counts[-1]]["final_error"],
        "predicted_forward_speedup": {p: round(predicted[p]["forward"], 3)
                                      for p in sorted({min(predicted), max(predicted)})}}
    results = {
        "headline": headline, "note": note, "platform": platform, "cores": cores,
        "devices_available": available, "devices_measured": counts,
        "load_average_1min": {"start": load[0], "end": os.getloadavg()[0]},
        "depths": rows,
        **{key: headline[key] for key in ("forward_error_exact", "gradient_error")},
        "prediction_error": prediction_error, "prediction_ratio": ratios,
        "predicted_speedup": predicted,
        "work_model_speedup": {p: work_model_speedup(p, cfg.coarsening, cfg.iterations)
                               for p in cfg.predict_devices}}
    plot(cfg, rows, counts)
    return results


def plot(cfg: Config, rows: list[dict], counts: list[int]) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for i, row in enumerate(r for r in rows if "probe" in r):
        for direction, style in (("forward", "-o"), ("backward", "--s")):
            r = np.asarray(row["probe"][f"{direction}_residuals"], dtype=float)
            ax.semilogy(np.arange(len(r)), r, style, color=f"C{i}", ms=3,
                        label=f"N = {row['depth']}, {direction}")
    ax.set(xlabel="MGRIT iteration (F-relaxation)", ylabel="residual norm (C-points)",
           title=f"m = {cfg.coarsening}, {counts[-1]} devices")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    save_figure(cfg, fig, "bench_layer_parallel_residuals")

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
    for ax, name in zip(axes, PASSES):
        for i, row in enumerate(rows):
            entries = [row["parallel"][p] for p in counts]
            ax.plot(counts, [e["speedup"][name] for e in entries], "o-", color=f"C{i}",
                    label=f"N = {row['depth']} measured")
            ax.plot(counts, [e["predicted_speedup"][name] for e in entries], "x:", color=f"C{i}",
                    label=f"N = {row['depth']} predicted")
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.minorticks_off()
        ax.set(xticks=counts, xticklabels=[str(p) for p in counts], xlabel="devices P",
               title=name.replace("_", "+"))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("speed-up over the serial network")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"layer-parallel vs serial: K = {cfg.iterations}, K_b = "
                 f"{cfg.backward_iterations}, m = {cfg.coarsening}, {jax.default_backend()}")
    save_figure(cfg, fig, "bench_layer_parallel_speedup")


if __name__ == "__main__":
    main(__name__, Config, run, QUICK)
