"""The work model of `experiments.bench_layer_parallel`: the wall time of two-level MGRIT over P
devices from its phases, each timed alone on the P devices, never from a layer-parallel solve.

Counted from `neuralode.parallel.mgrit.solve`: K corrections are K + 1 rounds (the first coarse
sweep is the initial guess) of
- the coarse sweep, serial: N/m coarse steps, pipelined (`mgrit.sweep`: each device steps its
  N/(mP) intervals once the one before has sent its last value; P hand-offs), time S_P;
- the F-relaxation, on every device at once: its N/(mP) intervals through their m layers each
  (vmap over the intervals, scan over the layers), time R_P; and the coarse steps of the FAS
  correction, one per interval, 1/m of the relaxation's steps;
- three collectives (the hand-off of interval starts, two norms) of latency lam_P:

    T_mgrit(P) = (K + 1) [ S_P + (1 + 1/m) R_P + 3 lam_P [P > 1] ].

S_P and R_P are measured with the network's own layers on the P devices, each phase K + 1 times in
one compiled loop (as MGRIT runs them, reusing its buffers), divided by K + 1; lam_P by a ring of
`ppermute`s. The phases hold what per-step costs from one device cannot: here 8 host devices share
2 cores, a single device's batched step already runs on several cores and is bound by memory
traffic once the intervals' states and layers leave the cache, and waiting devices slow the one
that steps the sweep. The adjoint is the same by the steps' vector-Jacobian products, from the last
device to the first, K_b for K.

Extrapolated to P devices with a core each: S_P = (N/m) c_s + P lam (c_s = serial forward time / N,
c_s + c_b for the adjoint with c_b = (serial forward+backward - serial forward) / N), R_P = N/P
steps at the per-step cost of the one-device relaxation measured with the nearest number of
intervals (the same working set).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as Spec

from experiments.common import blocking_calls, compile_all
from neuralode.parallel import MGRIT, depth_mesh
from neuralode.parallel.layer import _setup as layer_problem  # the solve's own propagators
from neuralode.parallel.mgrit import Ring, _varying_zeros, sweep
from neuralode.solvers import Euler

RING_STEPS = 1024  # hand-offs per latency measurement
PHASES = ("sweep", "relax", "adjoint_sweep", "adjoint_relax")


def work_model_speedup(devices: float, coarsening: float, iterations: float) -> float:
    """S(P, m, K) = N / (N/m + K (N/P + N/m)): F-relaxation, equal step costs, no communication."""
    return 1.0 / (1.0 / coarsening + iterations * (1.0 / devices + 1.0 / coarsening))


def mgrit_seconds(devices: int, coarsening: int, iterations: int, sweep_s: float, relax_s: float,
                  latency_s: float = 0.0) -> float:
    """T_mgrit(P) of the docstring: the predicted wall time of one MGRIT solve from the times of
    its phases on the P devices."""
    collectives = 3 * latency_s if devices > 1 else 0.0
    return (iterations + 1) * (sweep_s + (1 + 1 / coarsening) * relax_s + collectives)


def step_costs(depth: int, serial_s: dict) -> dict:
    """c_s and c_s + c_b (seconds) from the serial network's forward and forward+backward times."""
    step = serial_s["forward"] / depth
    return {"sweep": step,
            "adjoint_sweep": step + (serial_s["forward_backward"] - serial_s["forward"]) / depth}


def predicted_seconds(cfg, devices: int, phases: dict) -> dict:
    """Predicted layer-parallel forward and forward+backward seconds from the phases' times on the
    devices (`machine_measurements`' entry of P)."""
    forward, adjoint = (mgrit_seconds(devices, cfg.coarsening, k, phases[f"{prefix}sweep_s"],
                                      phases[f"{prefix}relax_s"], phases["latency_s"])
                        for prefix, k in (("", cfg.iterations),
                                          ("adjoint_", cfg.backward_iterations)))
    return {"forward": forward, "forward_backward": forward + adjoint}


def ring_calls(cfg, counts: list[int], steps: int = RING_STEPS) -> dict:
    """Compiled blocking calls by ("ring", P), P > 1: `steps` ppermutes of a C-point (batch x
    width) around P devices."""
    fns, args = {}, {}
    for p in (p for p in counts if p > 1):
        mesh, spec = depth_mesh(p), Spec("depth")
        perm = [(i, (i + 1) % p) for i in range(p)]

        def loop(u, perm=perm):
            return lax.fori_loop(0, steps, lambda _, u: lax.ppermute(u, "depth", perm), u)
        fns["ring", p] = jax.jit(jax.shard_map(loop, mesh=mesh, in_specs=spec, out_specs=spec))
        args["ring", p] = (jax.device_put(jnp.ones((p * cfg.batch, cfg.width)),
                                          NamedSharding(mesh, spec)),)
    return blocking_calls(compile_all(fns, args)[0], args)


def phase_calls(cfg, field: nnx.Module, counts: list[int], rounds: int) -> dict:
    """Compiled blocking calls of MGRIT's two phases on P devices, each run `rounds` times in one
    compiled loop, by (phase, P), with the propagators `layer_parallel_solve` runs
    (`neuralode.parallel.layer`: the network's own layers of `field`, a `DepthStack` of depth N,
    Euler steps of size T/N): "relax", every device stepping its N/(mP) intervals through their m
    layers at once, and "sweep", the pipelined coarse sweep (`neuralode.parallel.mgrit.sweep`: one
    Euler step of size m h per interval, interval after interval along the devices);
    "adjoint_relax" and "adjoint_sweep" the same by the steps' vector-Jacobian products, from the
    last device."""
    y0 = jnp.full((cfg.batch, cfg.width), 0.1, jax.tree.leaves(nnx.state(field, nnx.Param))[0].dtype)

    def on_device(problem, layers, states, t0, h, phase):
        adjoint, n = phase.startswith("adjoint"), problem.intervals
        fine, coarse = (problem.adjoint_propagators(layers, states, jnp.zeros_like(states), t0, h)
                        if adjoint else problem.propagators(layers, t0, h))
        starts = states.reshape((n, -1) + states.shape[1:])[:, 0]  # the intervals' first states
        ring = Ring("depth", problem.devices, reverse=adjoint)
        if phase.endswith("relax"):
            def one_round(_, carry):
                return jax.vmap(fine)(jnp.arange(n), carry[0])
            kept = jax.eval_shape(lambda: jax.vmap(fine)(jnp.arange(n), starts)[1])
            return lax.fori_loop(0, rounds, one_round,
                                 (starts, _varying_zeros(ring, kept)))  # all it keeps
        zeros = _varying_zeros(ring, starts)
        return lax.fori_loop(0, rounds, lambda _, v: sweep(ring, lambda i, v: (coarse(i, v), ()),
                                                           zeros, v[0])[0], zeros)

    fns, args = {}, {}
    for p in counts:
        mesh, spec = depth_mesh(p), Spec("depth")
        problem, layers, flat_y0, t0, t1 = layer_problem(field, y0, 0.0, cfg.horizon, Euler(),
                                                         MGRIT(coarsening=cfg.coarsening), mesh)
        states = jnp.tile(flat_y0, (field.depth, 1))  # u_0 .. u_{N-1}, flat as the solve has them
        placed = jax.device_put((layers, states), NamedSharding(mesh, spec))
        for phase in PHASES:
            def call(layers, states, problem=problem, t0=t0, t1=t1, phase=phase):
                return on_device(problem, layers, states, t0, (t1 - t0) / problem.depth, phase)
            fns[phase, p] = jax.jit(problem.shard_map(call, (spec, spec), spec))
            args[phase, p] = placed
    return blocking_calls(compile_all(fns, args)[0], args)


def machine_measurements(times: dict, counts: list[int], rounds: int,
                         steps: int = RING_STEPS) -> dict:
    """{P: latency_s (lam_P), and the seconds of one round of each of the `PHASES`} from the
    timings of `ring_calls` and `phase_calls`."""
    return {p: {"latency_s": times["ring", p]["run_s"] / steps if p > 1 else 0.0,
                **{f"{phase}_s": times[phase, p]["run_s"] / rounds for phase in PHASES}}
            for p in counts}


def extrapolated_speedup(cfg, depth: int, devices: list[int], costs: dict, one_device: dict,
                         latency_s: float) -> dict:
    """Predicted speed-ups at `depth` on P devices with a core each: the sweeps are N/m steps at
    the serial network's step costs `costs` plus P hand-offs of `latency_s`; the relaxations N/P
    steps at the per-step cost of the one-device relaxation (`one_device` maps the measured depths
    to their one-device `machine_measurements`) with the nearest number of intervals."""
    serial = {"forward": depth * costs["sweep"], "forward_backward": depth * costs["adjoint_sweep"]}
    result = {}
    for p in devices:
        nearest = min(one_device, key=lambda d: abs(np.log(d) - np.log(depth / p)))
        phases = {"latency_s": latency_s, **{
            f"{prefix}relax_s": one_device[nearest][f"{prefix}relax_s"] / nearest * depth / p
            for prefix in ("", "adjoint_")}, **{
            f"{prefix}sweep_s": depth / cfg.coarsening * costs[f"{prefix}sweep"] + p * latency_s
            for prefix in ("", "adjoint_")}}
        seconds = predicted_seconds(cfg, p, phases)
        result[p] = {name: serial[name] / t for name, t in seconds.items()}
    return result
