"""Adjoints measured: memory, time and accuracy of the three ways `odeint` obtains a gradient.

- memory_bytes[adjoint][L]: compiled temporary memory (`memory_analysis().temp_size_in_bytes`, the
  buffers XLA allocates besides arguments and outputs) of d(sum y(1)^2)/d(theta, y0) for a weight-tied
  MLPField (width 256, batch 128, float32) solved with `cfg.solver` in L = 10, 100, 1000 steps
  between the two output times ts = [0, 1] (`substeps=L`). Compile-only, so it keeps these sizes
  under --quick. Goals: backsolve memory[1000]/memory[10] <= 1.1, discrete about linear,
  checkpoint (default ~sqrt(L) segments) memory[1000]/memory[10] <= 15.
- memory_bytes_every_step[adjoint][L]: the same with every step an output, ts = linspace(0, 1, L+1)
  (`substeps=1`; the layout of a ResNet that keeps every activation). The loss still reads y(1)
  only, but `odeint` returns all L+1 states, and the gradient holds them and their cotangents: this
  memory is O(len(ts)) for every adjoint (`every_step_bytes_per_output_in_states`: the growth per
  output time, in states of batch x width float32). What the continuous adjoint keeps constant is
  the memory of the steps *between* output times; checkpointing keeps about sqrt(substeps) of them.
- grad_time_s[adjoint][L]: run time of the same compiled gradients (compile excluded, blocked on,
  median of interleaved repeats, each sample >= `min_sample_s`). Goal: checkpoint <= 2 x discrete.
- grad_rel_error[L] = ||g_backsolve - g_discrete|| / ||g_discrete|| (gradient w.r.t. parameters and
  y0) for a ReLU ConvField (pre-activation ResNet branch, NHWC images) solved with `error_solver`:
  the continuous adjoint is not the gradient of the discrete network (Gholami et al. 2019, ANODE).
  The same for a tanh field with the same weights, for contrast, with fitted slopes of log error vs
  log h, and `backsolve_reconstruction_error` (how far the backwards solve lands from y0) vs h.
  The headline solver is Heun: on a smooth field its continuous adjoint matches backprop to O(h^3)
  (one order better than the method), while on the ReLU field df/dy jumps where a unit switches and
  the continuous adjoint evaluates it at other points than backprop does, so the error falls only at
  about O(h^2) and the ReLU/tanh gap widens with L (order reduction). With Euler and Midpoint both
  fields' errors are O(h^p) of similar size (the smooth mismatch dominates); with RK4 the tanh
  field's error reaches float32 rounding by L = 8 while the ReLU field's stays orders above it.
  `contrast_solvers` runs those sweeps too.
- nfe: forward and backward vector-field evaluations from `solve(...).stats`.

Memory, NFE and slopes are measured with `neuralode.measure`.
"""
from __future__ import annotations

import dataclasses
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import neuralode as no
from experiments.common import (blocking_calls, compile_all, flag, main, save_figure,
                                time_alternating)
from neuralode.measure import loglog_slope, memory_analysis, solve_stats
from neuralode.models import ADJOINTS, SOLVERS
from neuralode.models.spec import RUNGE_KUTTA

ACTIVATIONS = {"relu": jax.nn.relu, "tanh": jnp.tanh}


@dataclasses.dataclass
class Config:
    out: str = flag("results", "directory of adjoint.json and the figures")
    quick: bool = flag(False, "smaller timings and error sweep: the QUICK settings (explicit "
                              "flags still win)")
    solver: str = flag("Euler", "fixed-step solver of the memory and time measurements",
                       choices=RUNGE_KUTTA)
    depths: tuple[int, ...] = flag((10, 100, 1000), "steps L of the memory and time measurements "
                                   "(ts = [0, 1] with substeps = L; for memory also "
                                   "ts = linspace(0, 1, L + 1))")
    memory_width: int = flag(256, "MLP width for the memory analysis (compile only, so --quick "
                                  "keeps it)")
    memory_batch: int = flag(128, "batch for the memory analysis")
    width: int = flag(256, "MLP width for the timings")
    batch: int = flag(128, "batch for the timings")
    repeats: int = flag(7, "timing samples per adjoint and L (the median is reported)")
    min_sample_s: float = flag(0.05, "calls per timing sample are chosen so that one sample takes "
                                     "at least this long")
    error_solver: str = flag("Heun", "solver of the backsolve-vs-discrete error sweep (headline)",
                             choices=RUNGE_KUTTA)
    contrast_solvers: tuple[str, ...] = flag(("Euler", "Midpoint", "RK4"),
                                             "further solvers for the error sweep")
    error_steps: tuple[int, ...] = flag((2, 4, 8, 16, 32, 64), "steps L of the error sweep "
                                        "(h = 1 / L)")
    channels: int = flag(8, "channels of the ConvField of the error sweep")
    image_size: int = flag(16, "height = width of its images")
    images: int = flag(8, "batch of images of the error sweep")
    seed: int = flag(0, "seed of the fields' parameters and of the inputs")


QUICK = {"width": 64, "batch": 32, "repeats": 3, "min_sample_s": 0.05, "contrast_solvers": (),
         "error_steps": (2, 4, 8), "channels": 4, "image_size": 8, "images": 4}


def make_solver(name: str):
    if name not in RUNGE_KUTTA:
        raise ValueError(f"solver must be one of {RUNGE_KUTTA}, got {name!r}")
    return SOLVERS[name]()


ROUNDING = 8 * float(np.finfo(np.float32).eps)  # relative float32 level below which slopes stop


def slope(steps, values, floor: float = 0.0) -> float:
    """The observed order: slope of log(value) against log(h), h = 1 / steps (values at or below
    `floor` left out)."""
    return loglog_slope([1.0 / s for s in steps], values, floor)


def flat(tree) -> jax.Array:
    return jnp.concatenate([jnp.ravel(x) for x in jax.tree.leaves(tree)])


def time_grid(steps: int, every_step: bool) -> tuple[jax.Array, int]:
    """(ts, substeps) of L = `steps` solver steps over [0, 1]: two output times and L substeps, or
    every step an output time."""
    if every_step:
        return jnp.linspace(0.0, 1.0, steps + 1, dtype=jnp.float32), 1
    return jnp.array([0.0, 1.0], jnp.float32), steps


def gradient_fn(graphdef, solver, adjoint, ts, substeps: int):
    """d/d(params, y0) of sum(y(t1)^2) as a pure function of (params, y0)."""
    def loss(params, y0):
        ys = no.odeint(nnx.merge(graphdef, params), y0, ts, solver=solver, substeps=substeps,
                       adjoint=adjoint)
        return jnp.sum(ys[-1] ** 2)

    return jax.grad(loss, argnums=(0, 1))


def nfe_of(field, y0, ts, solver, adjoint, substeps: int) -> dict:
    stats = solve_stats(field, y0, ts, solver=solver, substeps=substeps, adjoint=adjoint)
    return {"nfe": stats["nfe"], "nfe_backward": stats["nfe_backward"]}


def mlp_problem(width: int, batch: int, seed: int):
    field = no.MLPField(width, width, rngs=nnx.Rngs(seed))
    y0 = jax.random.normal(jax.random.key(seed + 1), (batch, width), jnp.float32)
    graphdef, params = nnx.split(field)
    return field, graphdef, params, y0


def memory(cfg: Config, solver, every_step: bool = False) -> tuple[dict, dict, dict]:
    """Compiled memory statistics of every (adjoint, L) gradient (nothing is run), with ts = [0, 1]
    or, `every_step`, with every step an output time."""
    field, graphdef, params, y0 = mlp_problem(cfg.memory_width, cfg.memory_batch, cfg.seed)
    temp, analysis, nfe = {}, {}, {}
    for name, adjoint in ADJOINTS.items():
        temp[name], analysis[name], nfe[name] = {}, {}, {}
        for steps in cfg.depths:
            ts, substeps = time_grid(steps, every_step)
            analysis[name][steps] = memory_analysis(
                gradient_fn(graphdef, solver, adjoint(), ts, substeps), params, y0)
            temp[name][steps] = analysis[name][steps]["temp_size_in_bytes"]
            nfe[name][steps] = nfe_of(field, y0, ts, solver, adjoint(), substeps)
            print(f"memory {name:10s} L={steps:5d}{' (every step)' if every_step else ''}: "
                  f"temp {temp[name][steps] / 2**20:9.2f} MiB", flush=True)
    return temp, analysis, nfe


def timings(cfg: Config, solver) -> tuple[dict, dict]:
    """Per L, the three adjoints' gradients (ts = [0, 1], L substeps) timed in alternation
    (compile excluded)."""
    _, graphdef, params, y0 = mlp_problem(cfg.width, cfg.batch, cfg.seed)
    run_s = {name: {} for name in ADJOINTS}
    details = {name: {} for name in ADJOINTS}
    for steps in cfg.depths:
        args = {name: (params, y0) for name in ADJOINTS}
        ts, substeps = time_grid(steps, every_step=False)
        compiled, compile_s = compile_all(
            {name: jax.jit(gradient_fn(graphdef, solver, adjoint(), ts, substeps))
             for name, adjoint in ADJOINTS.items()}, args)
        calls = blocking_calls(compiled, args)
        single = []
        for call in calls.values():
            start = time.perf_counter()
            call()
            single.append(time.perf_counter() - start)
        # Enough calls per sample that the fastest adjoint's sample lasts >= min_sample_s.
        number = max(1, math.ceil(cfg.min_sample_s / max(min(single), 1e-6)))
        result = time_alternating(calls, repeats=cfg.repeats, number=number)
        for name in ADJOINTS:
            run_s[name][steps] = result[name]["run_s"]
            details[name][steps] = {"run_s": result[name]["run_s"], "runs_s": result[name]["runs_s"],
                                    "number": number, "compile_s": compile_s[name]}
        print(f"time L={steps:5d}: " + ", ".join(f"{k} {run_s[k][steps] * 1e3:.2f} ms"
                                                  for k in ADJOINTS), flush=True)
    return run_s, details


def error_sweep(cfg: Config, solver, ts) -> dict:
    """Backsolve vs discrete gradients and the reconstruction error of y0, per activation and L."""
    y0 = jax.random.normal(jax.random.key(cfg.seed + 2),
                           (cfg.images, cfg.image_size, cfg.image_size, cfg.channels), jnp.float32)
    out = {}
    for act_name, activation in ACTIVATIONS.items():
        # The same weights for both activations: only the nonlinearity differs.
        field = no.compiled_init(lambda: no.ConvField(cfg.channels, activation=activation,
                                                      rngs=nnx.Rngs(cfg.seed)))
        graphdef, params = nnx.split(field)
        errors, reconstruction, nfe = {}, {}, {}
        for steps in cfg.error_steps:
            def measure(params, y0):
                grads = [flat(jax.grad(lambda p, y: jnp.sum(no.odeint(
                    nnx.merge(graphdef, p), y, ts, solver=solver, substeps=steps,
                    adjoint=adjoint)[-1] ** 2), argnums=(0, 1))(params, y0))
                    for adjoint in (no.DiscreteAdjoint(), no.BacksolveAdjoint())]
                rel = jnp.linalg.norm(grads[1] - grads[0]) / jnp.linalg.norm(grads[0])
                rec = no.backsolve_reconstruction_error(nnx.merge(graphdef, params), y0, ts,
                                                        solver=solver, substeps=steps)[0]
                return rel, rec

            rel, rec = jax.jit(measure)(params, y0)
            errors[steps], reconstruction[steps] = float(rel), float(rec)
            nfe[steps] = nfe_of(field, y0, ts, solver, no.BacksolveAdjoint(), steps)
            print(f"error {type(solver).__name__} {act_name} L={steps:4d}: rel {errors[steps]:.3e}, "
                  f"reconstruction {reconstruction[steps]:.3e}", flush=True)
        steps_list = list(errors)
        # Slopes leave out points at float32 rounding (relative for the gradient, times max|y0|
        # for the reconstruction, which is an absolute error).
        rec_floor = ROUNDING * float(jnp.max(jnp.abs(y0)))
        out[act_name] = {"grad_rel_error": errors, "reconstruction_error": reconstruction,
                         "slope": slope(steps_list, list(errors.values()), ROUNDING),
                         "reconstruction_slope": slope(steps_list, list(reconstruction.values()),
                                                       rec_floor),
                         "slope_floor": ROUNDING, "reconstruction_slope_floor": rec_floor,
                         "nfe": nfe}
    return out


def ratio(table: dict, hi, lo) -> float:
    return table[hi] / table[lo]


def run(cfg: Config) -> dict:
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    solver = make_solver(cfg.solver)
    ts = jnp.array([0.0, 1.0], jnp.float32)
    lo, hi = min(cfg.depths), max(cfg.depths)

    memory_bytes, analysis, nfe = memory(cfg, solver)
    memory_ratio = {name: ratio(memory_bytes[name], hi, lo) for name in ADJOINTS}
    every_step, _, _ = memory(cfg, solver, every_step=True)
    every_step_ratio = {name: ratio(every_step[name], hi, lo) for name in ADJOINTS}
    # Bytes per extra step (output time), in units of one state (batch x width float32).
    state_bytes = cfg.memory_batch * cfg.memory_width * 4

    def per_step(table):
        return (table[hi] - table[lo]) / (hi - lo) / state_bytes

    discrete_per_step = per_step(memory_bytes["discrete"])
    every_step_per_output = {name: per_step(every_step[name]) for name in ADJOINTS}

    grad_time_s, timing_details = timings(cfg, solver)
    time_ratio = {steps: grad_time_s["checkpoint"][steps] / grad_time_s["discrete"][steps]
                  for steps in cfg.depths}
    backsolve_time_ratio = {steps: grad_time_s["backsolve"][steps] / grad_time_s["discrete"][steps]
                            for steps in cfg.depths}

    sweeps = {cfg.error_solver: error_sweep(cfg, make_solver(cfg.error_solver), ts)}
    for name in cfg.contrast_solvers:
        if name not in sweeps:
            sweeps[name] = error_sweep(cfg, make_solver(name), ts)
    main_sweep = sweeps[cfg.error_solver]
    smallest, largest = min(cfg.error_steps), max(cfg.error_steps)
    relu, tanh = main_sweep["relu"]["grad_rel_error"], main_sweep["tanh"]["grad_rel_error"]
    relu_over_tanh = {s: relu[s] / tanh[s] for s in cfg.error_steps}

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for index, name in enumerate(ADJOINTS):
        color = f"C{index}"
        axes[0].plot(cfg.depths, [memory_bytes[name][s] / 2**20 for s in cfg.depths], "o-",
                     color=color, label=f"{name}, ts = [0, 1] (x{memory_ratio[name]:.2f})")
        axes[0].plot(cfg.depths, [every_step[name][s] / 2**20 for s in cfg.depths], "s--",
                     color=color, label=f"{name}, every step in ts (x{every_step_ratio[name]:.1f})")
        axes[1].plot(cfg.depths, [grad_time_s[name][s] * 1e3 for s in cfg.depths], "o-",
                     color=color, label=name)
    axes[0].set(xscale="log", yscale="log", xlabel="steps L", ylabel="temp memory [MiB]",
                title=f"gradient temp memory, MLP {cfg.memory_width}x{cfg.memory_batch}, "
                      f"{cfg.solver}")
    axes[1].set(xscale="log", yscale="log", xlabel="steps L", ylabel="gradient time [ms]",
                title=f"gradient time, MLP {cfg.width}x{cfg.batch}")
    for ax in axes:
        ax.legend()
        ax.grid(True, which="both", alpha=0.3)
    save_figure(cfg, fig, "adjoint_memory_time")

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    styles = {"relu": "o-", "tanh": "s--"}
    for solver_name, sweep in sweeps.items():
        for act_name, res in sweep.items():
            h = [1.0 / s for s in res["grad_rel_error"]]
            axes[0].plot(h, list(res["grad_rel_error"].values()), styles[act_name],
                         label=f"{solver_name} {act_name} (slope {res['slope']:.2f})")
            axes[1].plot(h, list(res["reconstruction_error"].values()), styles[act_name],
                         label=f"{solver_name} {act_name} (slope {res['reconstruction_slope']:.2f})")
    axes[0].set(xscale="log", yscale="log", xlabel="step size h",
                ylabel="||g_backsolve - g_discrete|| / ||g_discrete||",
                title="continuous adjoint vs backprop (ConvField)")
    axes[1].set(xscale="log", yscale="log", xlabel="step size h", ylabel="max |y0 - y0~|",
                title="backsolve reconstruction error of y0")
    for ax in axes:
        ax.set_xticks([1.0 / s for s in cfg.error_steps], [f"1/{s}" for s in cfg.error_steps])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.legend(fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
    save_figure(cfg, fig, "adjoint_error")

    return {
        "device": str(jax.devices()[0]),
        "memory_bytes": memory_bytes,
        "memory_analysis": analysis,
        "memory_ratio": memory_ratio,
        "discrete_bytes_per_step_in_states": discrete_per_step,
        "memory_bytes_every_step": every_step,
        "memory_ratio_every_step": every_step_ratio,
        "every_step_bytes_per_output_in_states": every_step_per_output,
        "grad_time_s": grad_time_s,
        "checkpoint_time_ratio": time_ratio,
        "backsolve_time_ratio": backsolve_time_ratio,
        "timings": timing_details,
        "nfe": nfe,
        "grad_rel_error": main_sweep["relu"]["grad_rel_error"],
        "grad_rel_error_tanh": main_sweep["tanh"]["grad_rel_error"],
        "relu_over_tanh_error": relu_over_tanh,
        "error_sweeps": sweeps,
        "headline": {
            f"memory_ratio L={hi}/L={lo}": {
                "backsolve (goal <= 1.1)": round(memory_ratio["backsolve"], 3),
                "checkpoint (goal <= 15)": round(memory_ratio["checkpoint"], 2),
                "discrete (about linear)": round(memory_ratio["discrete"], 1)},
            f"memory MiB L={lo} -> L={hi}, every step in ts": {
                name: [round(every_step[name][s] / 2**20, 1) for s in (lo, hi)]
                for name in ADJOINTS},
            "checkpoint/discrete time (goal <= 2)": {s: round(r, 2) for s, r in time_ratio.items()},
            f"relu grad_rel_error {cfg.error_solver} L={smallest}":
                float(f"{main_sweep['relu']['grad_rel_error'][smallest]:.3g}"),
            f"tanh grad_rel_error {cfg.error_solver} L={smallest}":
                float(f"{main_sweep['tanh']['grad_rel_error'][smallest]:.3g}"),
            f"relu/tanh error ratio {cfg.error_solver} L={largest}":
                round(relu_over_tanh[largest], 1),
            "slopes relu/tanh": {name: (round(s["relu"]["slope"], 2), round(s["tanh"]["slope"], 2))
                                 for name, s in sweeps.items()},
        },
    }


if __name__ == "__main__":
    main(__name__, Config, run, QUICK)
