"""Benchmark of the dynamics core: what `odeint` costs over hand-written JAX and over diffrax.

- overhead_ratio: forward+backward of an Euler ResNet through `odeint` (MLPField, depth-varying
  blocks) over a hand-written `lax.scan` of the same math (goal <= 1.05).
- vs_diffrax: our time / diffrax's for Euler, Midpoint and Heun on the same fixed steps, forward +
  backward (goal <= 1.0); diffrax stores every step (RecursiveCheckpointAdjoint(checkpoints=L)),
  as our DiscreteAdjoint does.
- compile_s for L = 10, 100, 1000 and compile_ratio = compile_s[1000] / compile_s[10] (goal <= 1.5:
  the steps are a scan, not unrolled).
- eager_calls: wall time of the first and the second eager `odeint(f, y0, ts, solver=Dopri5())`
  with the same f and shapes (a 3-dimensional tanh field), and of the same `diffrax.diffeqsolve`;
  eager_speedup = first / second (goal >= 100: the second call reuses the compilation).
Apart from eager_calls, run times exclude compilation, block on results, and are medians of interleaved repeats.
"""
from __future__ import annotations

import dataclasses
import statistics
import time

import diffrax
import jax
import jax.numpy as jnp
from flax import nnx

import neuralode as no
from experiments.common import flag, main, save_figure, time_compiled, time_interleaved


@dataclasses.dataclass
class Config:
    out: str = flag("results", "directory of bench_solvers.json and the figure")
    quick: bool = flag(False, "smaller net, fewer repeats: the QUICK settings (explicit flags still win)")
    width: int = flag(128, "features of the MLP field (and of the state)")
    batch: int = flag(256, "rows of the initial state y0 in the timed forward + backward passes")
    depth: int = flag(64, "blocks L of the ResNet (Euler steps of size 1/L) in the overhead and "
                      "vs-diffrax timings")
    compile_depths: tuple[int, ...] = flag((10, 100, 1000), "depths L whose compile time is measured; "
                                           "compile_ratio = largest's / smallest's")
    compile_repeats: int = flag(5, "fresh compiles per depth (median)")
    repeats: int = flag(15, "timing samples per function (median)")
    number: int = flag(20, "calls averaged per timing sample")
    seed: int = flag(0, "seed of the ResNet's parameters and of the initial state y0")


QUICK = {"width": 64, "batch": 64, "depth": 32, "repeats": 5, "number": 10, "compile_repeats": 3}


def resnet(cfg: Config, depth: int):
    return no.DepthStack(lambda rngs: no.MLPField(cfg.width, cfg.width, rngs=rngs), depth,
                         rngs=nnx.Rngs(cfg.seed))


def odeint_loss(depth: int):
    def loss(stack, y0):
        ys = no.odeint(stack, y0, jnp.array([0.0, 1.0]), solver=no.Euler(), substeps=depth)
        return jnp.sum(ys[-1] ** 2)

    return jax.jit(nnx.grad(loss, argnums=(0, 1)))


def hand_written_loss(depth: int):
    """The same ResNet written directly: y <- y + h (W2 tanh(W1 y + b1) + b2), scanned over blocks."""
    h = 1.0 / depth

    def loss(params, y0):
        def block(y, p):
            hidden = jnp.tanh(y @ p["k1"] + p["b1"])
            return y + h * (hidden @ p["k2"] + p["b2"]), None

        y, _ = jax.lax.scan(block, y0, params)
        return jnp.sum(y**2)

    return jax.jit(jax.grad(loss, argnums=(0, 1)))


def stacked_params(stack):
    first, second = stack.layers.layers[0], stack.layers.layers[1]
    return {"k1": first.kernel[...], "b1": first.bias[...], "k2": second.kernel[...],
            "b2": second.bias[...]}


def tied_field(t, y, p):
    return jnp.tanh(y @ p["k1"] + p["b1"]) @ p["k2"] + p["b2"]


def solver_losses(ours, theirs, depth: int):
    def our_loss(params, y0):
        ys = no.odeint(tied_field, y0, jnp.array([0.0, 1.0]), params, solver=ours, substeps=depth)
        return jnp.sum(ys[-1] ** 2)

    def diffrax_loss(params, y0):
        sol = diffrax.diffeqsolve(diffrax.ODETerm(tied_field), theirs, t0=0.0, t1=1.0,
                                  dt0=1.0 / depth, y0=y0, args=params,
                                  adjoint=diffrax.RecursiveCheckpointAdjoint(checkpoints=depth))
        return jnp.sum(sol.ys[-1] ** 2)

    grad = lambda loss: jax.jit(jax.grad(loss, argnums=(0, 1)))  # noqa: E731
    return grad(our_loss), grad(diffrax_loss)


def eager_calls() -> dict:
    """Wall times of two eager calls of the same small adaptive solve, ours and diffrax's."""
    w = jnp.array([[0.5, -1.0, 0.2], [1.2, 0.3, -0.4], [0.1, 0.7, -0.6]])
    y0, ts = jnp.array([0.4, -0.8, 0.1]), jnp.array([0.0, 1.0])

    def field(t, y, args):
        return jnp.tanh(w @ y + t)

    calls = {"odeint": lambda: no.odeint(field, y0, ts, solver=no.Dopri5()),
             "diffrax": lambda: diffrax.diffeqsolve(
                 diffrax.ODETerm(field), diffrax.Dopri5(), 0.0, 1.0, None, y0,
                 stepsize_controller=diffrax.PIDController(rtol=1e-6, atol=1e-8)).ys}
    out = {}
    for name, call in calls.items():
        seconds = []
        for _ in range(2):
            start = time.perf_counter()
            jax.block_until_ready(call())
            seconds.append(time.perf_counter() - start)
        out[name] = {"first_s": seconds[0], "second_s": seconds[1],
                     "speedup": seconds[0] / seconds[1]}
        print(f"eager {name}: first {seconds[0]:.3f} s, second {seconds[1] * 1e3:.2f} ms")
    return out


def run(cfg: Config) -> dict:
    import matplotlib.pyplot as plt

    eager = eager_calls()

    y0 = jax.random.normal(jax.random.key(cfg.seed), (cfg.batch, cfg.width), jnp.float32)
    stack = resnet(cfg, cfg.depth)
    timings = time_interleaved(
        {"odeint": odeint_loss(cfg.depth), "hand_written": hand_written_loss(cfg.depth)},
        {"odeint": (stack, y0), "hand_written": (stacked_params(stack), y0)}, repeats=cfg.repeats,
        number=cfg.number)
    overhead = timings["odeint"]["run_s"] / timings["hand_written"]["run_s"]
    print(f"overhead_ratio = {overhead:.3f}")

    tied = jax.tree.map(lambda x: x[0], stacked_params(stack))
    vs_diffrax, solver_timings = {}, {}
    for ours, theirs in [(no.Euler(), diffrax.Euler()), (no.Midpoint(), diffrax.Midpoint()),
                         (no.Heun(), diffrax.Heun())]:
        our_grad, diffrax_grad = solver_losses(ours, theirs, cfg.depth)
        t = time_interleaved({"ours": our_grad, "diffrax": diffrax_grad},
                             {"ours": (tied, y0), "diffrax": (tied, y0)}, repeats=cfg.repeats,
                             number=cfg.number)
        name = type(ours).__name__
        vs_diffrax[name] = t["ours"]["run_s"] / t["diffrax"]["run_s"]
        solver_timings[name] = t
        print(f"vs_diffrax[{name}] = {vs_diffrax[name]:.3f}")

    compile_s = {}
    for depth in cfg.compile_depths:  # median of fresh compiles: one is too noisy at ~0.5 s
        stack_l = resnet(cfg, depth)
        compile_s[depth] = statistics.median(
            time_compiled(odeint_loss(depth), stack_l, y0, repeats=1)["compile_s"]
            for _ in range(cfg.compile_repeats))
        print(f"compile_s[{depth}] = {compile_s[depth]:.2f}")
    depths = sorted(compile_s)
    compile_ratio = compile_s[depths[-1]] / compile_s[depths[0]]

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    names = ["overhead (odeint / scan)"] + [f"{k} / diffrax" for k in vs_diffrax]
    axes[0].barh(names, [overhead] + list(vs_diffrax.values()))
    axes[0].axvline(1.0, color="k", lw=0.8)
    axes[0].set_xlabel("time ratio (forward + backward)")
    axes[1].plot(depths, [compile_s[d] for d in depths], "o-")
    axes[1].set(xscale="log", xlabel="depth L", ylabel="compile time [s]",
                title=f"compile_ratio = {compile_ratio:.2f}")
    save_figure(cfg, fig, "bench_solvers")

    return {
        "device": str(jax.devices()[0]),
        "overhead_ratio": overhead,
        "vs_diffrax": vs_diffrax,
        "compile_s": compile_s,
        "compile_ratio": compile_ratio,
        "eager_calls": eager,
        "timings": {"resnet": timings, "solvers": solver_timings},
        "headline": {"overhead_ratio (goal <= 1.05)": round(overhead, 3),
                     "vs_diffrax (goal <= 1.0)": {k: round(v, 3) for k, v in vs_diffrax.items()},
                     "compile_ratio (goal <= 1.5)": round(compile_ratio, 3),
                     "eager_speedup (goal >= 100)": round(eager["odeint"]["speedup"], 1)},
    }


if __name__ == "__main__":
    main(__name__, Config, run, QUICK)
