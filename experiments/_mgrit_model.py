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
from neuralode.parallel import depth_mesh
from neuralode.parallel.mgrit import Ring, sweep

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
    compiled loop, by (phase, P): "relax", every device stepping its N/(mP) intervals through their
    m layers of `field` (a `DepthStack` of depth N, Euler steps of size T/N) at once, and
    "sweep", the pipelined coarse sweep (`neuralode.parallel.mgrit.sweep`: one Euler step of size
    m h per interval, interval after interval along the devices); "adjoint_relax" and
    "adjoint_sweep" the same by the steps' vector-Jacobian products, from the last device."""
    graphdef, params, rest = nnx.split(field, nnx.Param, ...)
    m, h = cfg.coarsening, cfg.horizon / field.depth

    def step(params, rest, u, size):
        return u + size * nnx.merge(graphdef, params, rest).layers(0.0, u)

    def varying(tree):
        return jax.tree.map(lambda x: lax.pcast(jnp.zeros(x.shape, x.dtype), "depth",
                                                to="varying"), tree)

    def on_device(layers, u, phase, devices):
        n, adjoint = u.shape[0], phase.startswith("adjoint")  # n: this device's intervals
        layers = jax.tree.map(lambda x: x.reshape((n, m) + x.shape[1:]), layers)

        def propagate(i, v, s, size):  # v: a state, or a cotangent at the state u[i]
            params, rest = jax.tree.map(lambda x: x[i, s], layers)
            if not adjoint:
                return step(params, rest, v, size), v
            return jax.vjp(lambda u, params: step(params, rest, u, size), u[i], params)[1](v)

        def interval(i, v):  # m steps, as MGRIT's fine propagator: (end, what it keeps)
            return lax.scan(lambda v, s: propagate(i, v, s, h), v, jnp.arange(m), reverse=adjoint)

        if phase.endswith("relax"):
            def one_round(_, carry):
                return jax.vmap(interval)(jnp.arange(n), carry[0])
            kept = jax.eval_shape(lambda: jax.vmap(interval)(jnp.arange(n), u)[1])
            return lax.fori_loop(0, rounds, one_round, (u, varying(kept)))  # all it keeps
        ring = Ring("depth", devices, reverse=adjoint)

        def coarse(i, v):  # one step of size m h with the interval's first layer
            return propagate(n - 1 - i if adjoint else i, v, 0, m * h)[0], ()
        return lax.fori_loop(0, rounds, lambda _, v: sweep(ring, coarse, varying(u), v[0])[0],
                             varying(u))

    fns, args = {}, {}
    dtype = jax.tree.leaves(params)[0].dtype
    states = jnp.full((field.depth // m, cfg.batch, cfg.width), 0.1, dtype)
    for p in counts:
        mesh, spec = depth_mesh(p), Spec("depth")
        placed = jax.device_put(((params, rest), states), NamedSharding(mesh, spec))
        for phase in PHASES:
            fns[phase, p] = jax.jit(jax.shard_map(
                lambda layers, u, phase=phase, p=p: on_device(layers, u, phase, p),
                mesh=mesh, in_specs=spec, out_specs=spec))
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
