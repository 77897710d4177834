"""Attention's short gradient paths and their price (B11; Vaswani et al. 2017, Table 1).

Gradient vs distance. One self-attention layer (one head of width d, Y = softmax(Q K^T / sqrt(d)) V
with Q, K, V = X W_q, X W_k, X W_v, weights N(0, 1/d), inputs N(0, I)) and a tanh RNN
(h_t = tanh(W h_{t-1} + V x_t), W ~ N(0, sigma^2/d)). For L = <u, y_n> (u a random unit vector) the
norm ||dL/dx_t|| against the distance n - t, averaged over random draws of weights, inputs and u.
Every input reaches y_n through one softmax-weighted sum, so the attention gradient does not decay
with distance (its size is about 1/n at every position: the weights sum to 1); through the
recurrence it is a product of n - t Jacobians and decays exponentially (at sigma = 1).

Path length, counted in the computation graph: the layer and the cell are jitted functions, so each
call is one equation of the traced jaxpr; the fewest such calls on any path from x_t to y_n, by a
breadth-first search over the jaxpr's variables. Attention: 1 for every t; recurrence: n - t + 1.

Cost. FLOPs from XLA's cost analysis of the compiled forward pass (float32) against n. XLA counts
a while loop's body once (it does not know the trip count), so the RNN's FLOPs are those of the
compiled scan plus (n - 1) times those of one compiled cell (`tests/test_attention.py` checks this
against the unrolled loop). Beside them: the median wall time of the forward pass and the memory
of the compiled gradient program (XLA's arguments, outputs and temporary buffers).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from collections import deque

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from experiments.common import blocking_calls, flag, main, save_figure, time_alternating

F64 = jnp.float64


@dataclasses.dataclass
class Config:
    out: str = flag("results", "directory of attention.json and the figures")
    quick: bool = flag(False, "fewer timing repeats: the QUICK settings (explicit flags still win)")
    seed: int = flag(0, "seed of the random draws")
    width: int = flag(32, "model width = head width d")
    lengths: tuple[int, ...] = flag((16, 32, 64, 128, 256, 512, 1024, 2048),
                                    "sequence lengths n of the gradient-vs-distance curves")
    draws: int = flag(8, "random draws (weights, inputs, u) averaged per length; short sequences get "
                         "draws * max(lengths) / n, so that every slope is fitted to as many "
                         "(draw, position) samples")
    rnn_sigma: float = flag(1.0, "weight scale sigma of the tanh RNN")
    cost_lengths: tuple[int, ...] = flag((512, 1024, 2048, 4096), "sequence lengths n of the cost "
                                                                  "measurements")
    repeats: int = flag(5, "timing samples per length (the median is reported)")


QUICK = {"repeats": 3}


# ---------------------------------------------------------------------------------------------
# The two sequence models, on X of shape (n, d)


def init_attention(key, width: int, dtype=F64):
    return tuple(jax.random.normal(k, (width, width), dtype) / math.sqrt(width)
                 for k in jax.random.split(key, 3))


def attention_layer(params, x):
    """One self-attention head: softmax(Q K^T / sqrt(d)) V, all n outputs."""
    w_q, w_k, w_v = params
    scores = (x @ w_q) @ (x @ w_k).T / math.sqrt(x.shape[1])
    return jax.nn.softmax(scores, axis=-1) @ (x @ w_v)


def attention_last(params, x):
    """The last row of `attention_layer` alone (its query is x_n): the same y_n at O(n d^2)."""
    w_q, w_k, w_v = params
    scores = (x @ w_k) @ (x[-1] @ w_q) / math.sqrt(x.shape[1])
    return jax.nn.softmax(scores) @ (x @ w_v)


def init_rnn(key, width: int, sigma: float, dtype=F64):
    k_w, k_v = jax.random.split(key)
    return (sigma * jax.random.normal(k_w, (width, width), dtype) / math.sqrt(width),
            jax.random.normal(k_v, (width, width), dtype) / math.sqrt(width))


def rnn_cell(params, h, x):
    w, v = params
    return jnp.tanh(w @ h + v @ x)


def rnn_layer(params, x):
    """Every state h_1..h_n of the tanh RNN from h_0 = 0."""
    def step(h, x_t):
        h = rnn_cell(params, h, x_t)
        return h, h

    return jax.lax.scan(step, jnp.zeros(x.shape[1], x.dtype), x)[1]


def rnn_last(params, x):
    return rnn_layer(params, x)[-1]


def row_norms(g):
    """||g_t|| per row, scaled first so that gradients below 1e-154 do not underflow when squared."""
    scale = jnp.max(jnp.abs(g), axis=-1, keepdims=True)
    safe = jnp.where(scale > 0, scale, 1.0)
    return scale[..., 0] * jnp.sqrt(jnp.sum((g / safe) ** 2, axis=-1))


@functools.partial(jax.jit, static_argnames=("layer",))
def mean_input_gradients(layer, params, x, u):
    """Mean over draws (leading axes) of ||d<u, y_n>/dx_t|| for t = 1..n (index t - 1), with
    y_n = layer(params, x)."""
    def one(params, x, u):
        return row_norms(jax.grad(lambda x: jnp.vdot(u, layer(params, x)))(x))

    return jnp.mean(jax.vmap(one)(params, x, u), axis=0)


def random_draws(rng: np.random.Generator, draws: int, n: int, width: int, matrices: int, scales):
    """Weights N(0, scale^2 / d), inputs N(0, I) and unit vectors u, for `draws` draws (drawn with
    numpy: jax.random inside the jitted function tripled its compile time)."""
    params = tuple(jnp.asarray(scale * rng.standard_normal((draws, width, width)) / math.sqrt(width))
                   for scale in scales[:matrices])
    u = rng.standard_normal((draws, width))
    return params, jnp.asarray(rng.standard_normal((draws, n, width))), jnp.asarray(u / np.linalg.norm(u, axis=1, keepdims=True))


def gradient_vs_distance(cfg: Config) -> dict:
    models = {"attention": (attention_last, (1.0, 1.0, 1.0)), "rnn": (rnn_last, (cfg.rnn_sigma, 1.0))}
    out = {name: {} for name in models}
    for n in tqdm(cfg.lengths, desc="gradient vs distance"):
        draws = max(cfg.draws, cfg.draws * max(cfg.lengths) // n)
        for i, (name, (layer, scales)) in enumerate(models.items()):
            rng = np.random.default_rng([cfg.seed, n, i])
            params, x, u = random_draws(rng, draws, n, cfg.width, len(scales), scales)
            norms = np.asarray(mean_input_gradients(layer, params, x, u))
            by_distance = norms[::-1]  # index n - t
            distance = np.arange(1, n)
            row = {"draws": draws, "norm_by_distance": by_distance}
            if name == "attention":  # distance 0 (the query itself) has the extra query path
                row["loglog_slope"] = float(np.polyfit(np.log(distance), np.log(by_distance[1:]), 1)[0])
                row["n_times_mean_norm"] = float(n * by_distance[1:].mean())
            else:
                normal = distance[by_distance[1:] > 1e-300]
                fit, residuals, *_ = np.polyfit(normal, np.log10(by_distance[normal]), 1, full=True)
                total = np.sum((np.log10(by_distance[normal]) - np.log10(by_distance[normal]).mean()) ** 2)
                row["log10_gain_per_step"] = float(fit[0])
                row["semilog_r2"] = float(1 - residuals[0] / total) if normal.size > 2 else float("nan")
                row["far_over_near"] = float(by_distance[-1] / by_distance[1])
            out[name][n] = row
    return out


# ---------------------------------------------------------------------------------------------
# Path length in the computation graph


def graph_path_lengths(fn, inputs, layer_names: set[str]) -> list[int]:
    """For each input of `fn(*inputs)`, the fewest calls of the named jitted functions on any path
    to the output in the traced jaxpr (0-1 breadth-first search over its variables)."""
    jaxpr = jax.make_jaxpr(fn)(*inputs).jaxpr
    consumers = {}
    for eqn in jaxpr.eqns:
        cost = int(eqn.params.get("name") in layer_names)
        for var in eqn.invars:
            if isinstance(var, jax.extend.core.Var):
                consumers.setdefault(var, []).extend((out, cost) for out in eqn.outvars)
    target = jaxpr.outvars[0]
    lengths = []
    for source in jaxpr.invars:
        best, queue = {source: 0}, deque([source])
        while queue:
            var = queue.popleft()
            for out, cost in consumers.get(var, []):
                if best[var] + cost < best.get(out, math.inf):
                    best[out] = best[var] + cost
                    (queue.append if cost else queue.appendleft)(out)
        lengths.append(best.get(target, -1))
    return lengths


def path_lengths(n: int, width: int) -> dict:
    """Path lengths from x_1 (the farthest input) and the longest over all t, attention vs RNN."""
    xs = [jnp.zeros(width, F64)] * n
    attention_params = init_attention(jax.random.key(0), width)
    rnn_params = init_rnn(jax.random.key(0), width, 1.0)
    attention = jax.jit(attention_layer)
    cell = jax.jit(rnn_cell)

    def attention_output(*xs):
        return attention(attention_params, jnp.stack(xs))[-1]

    def rnn_output(*xs):
        h = jnp.zeros(width, F64)
        for x in xs:
            h = cell(rnn_params, h, x)
        return h

    out = {}
    for name, fn, layer in [("attention", attention_output, "attention_layer"), ("rnn", rnn_output, "rnn_cell")]:
        lengths = graph_path_lengths(fn, xs, {layer})
        out[name] = {"from_first_input": lengths[0], "max": max(lengths), "min": min(lengths)}
    return out


# ---------------------------------------------------------------------------------------------
# Cost


def compiled_flops(compiled) -> float:
    analysis = compiled.cost_analysis()
    return float((analysis[0] if isinstance(analysis, list) else analysis)["flops"])


def rnn_flops(params, x, unroll: bool = False) -> float:
    """FLOPs of the compiled RNN forward pass: the scan's count (body once) plus (n - 1) cells.
    With `unroll`, the unrolled loop's own count (no correction), for checking."""
    if unroll:
        unrolled = lambda p, x: jax.lax.scan(lambda h, x_t: (rnn_cell(p, h, x_t),) * 2,  # noqa: E731
                                             jnp.zeros(x.shape[1], x.dtype), x, unroll=True)[1]
        return compiled_flops(jax.jit(unrolled).lower(params, x).compile())
    scan = compiled_flops(jax.jit(rnn_layer).lower(params, x).compile())
    cell = compiled_flops(jax.jit(rnn_cell).lower(params, x[0], x[0]).compile())
    return scan + (x.shape[0] - 1) * cell


def gradient_memory(layer, params, x) -> int:
    """Bytes of the compiled gradient of sum(layer(params, x)^2) with respect to x: arguments,
    outputs and XLA's temporary buffers."""
    grad = jax.jit(jax.grad(lambda p, x: jnp.sum(layer(p, x) ** 2), argnums=1))
    memory = grad.lower(params, x).compile().memory_analysis()
    return int(memory.argument_size_in_bytes + memory.output_size_in_bytes + memory.temp_size_in_bytes)


def cost(cfg: Config) -> dict:
    key = jax.random.key(cfg.seed)
    params = {"attention": init_attention(key, cfg.width, jnp.float32),
              "rnn": init_rnn(key, cfg.width, cfg.rnn_sigma, jnp.float32)}
    layers = {"attention": attention_layer, "rnn": rnn_layer}
    out = {name: {"n": list(cfg.cost_lengths), "flops": [], "wall_s": [], "gradient_memory_bytes": []}
           for name in layers}
    for n in tqdm(cfg.cost_lengths, desc="cost"):
        x = jax.random.normal(jax.random.fold_in(key, n), (n, cfg.width), jnp.float32)
        compiled = {name: jax.jit(layer).lower(params[name], x).compile() for name, layer in layers.items()}
        times = time_alternating(blocking_calls(compiled, {name: (params[name], x) for name in layers}),
                                 repeats=cfg.repeats, warmup=True, desc=f"timing n = {n}")
        for name, layer in layers.items():
            flops = rnn_flops(params[name], x) if name == "rnn" else compiled_flops(compiled[name])
            out[name]["flops"].append(flops)
            out[name]["wall_s"].append(times[name]["run_s"])
            out[name]["gradient_memory_bytes"].append(gradient_memory(layer, params[name], x))
    for row in out.values():
        for key in ("flops", "wall_s", "gradient_memory_bytes"):
            row[f"{key}_loglog_slope"] = float(np.polyfit(np.log(row["n"]), np.log(row[key]), 1)[0])
    return out


# ---------------------------------------------------------------------------------------------


def plot(cfg: Config, grads: dict, paths: dict, costs: dict) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    for n in cfg.lengths:
        att, rnn = grads["attention"][n]["norm_by_distance"], grads["rnn"][n]["norm_by_distance"]
        axes[0].loglog(np.arange(1, n), att[1:], label=f"n = {n} (slope {grads['attention'][n]['loglog_slope']:+.3f})")
        axes[1].semilogy(np.arange(n), rnn, label=f"n = {n}")
    axes[0].set(xlabel="distance n - t", ylabel="mean ||d<u, y_n>/dx_t||",
                title="one self-attention layer: flat in distance (size ~ 1/n)")
    axes[1].set(xlabel="distance n - t", ylabel="mean ||d<u, h_n>/dx_t||", xlim=(0, 400),
                title=f"tanh RNN (sigma = {cfg.rnn_sigma:g}): exponential decay\n(to float64's underflow)")
    lengths = list(paths)
    for name, marker in [("attention", "o"), ("rnn", "s")]:
        axes[2].loglog(lengths, [paths[n][name]["max"] for n in lengths], marker + "-", label=name)
    axes[2].set(xlabel="sequence length n", ylabel="fewest layer/cell calls from x_1 to y_n",
                title="path length in the traced computation graph")
    for ax in axes:
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.suptitle(f"Gradient of the last output with respect to each input (mean of >= {cfg.draws} draws, width {cfg.width})")
    save_figure(cfg, fig, "attention_gradients")

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for name, row in costs.items():
        for ax, key, label in zip(axes, ("flops", "wall_s", "gradient_memory_bytes"),
                                  ("FLOPs (XLA cost analysis)", "forward wall time (s)", "gradient memory (bytes)")):
            ax.loglog(row["n"], row[key], "o-", label=f"{name}: slope {row[key + '_loglog_slope']:.2f}")
            ax.set(xlabel="sequence length n", ylabel=label, xscale="log", yscale="log")
            ax.set_xticks(row["n"], [str(n) for n in row["n"]])
            ax.minorticks_off()
    axes[0].set_title(f"forward FLOPs, head width {cfg.width}")
    axes[1].set_title("forward pass, median wall time")
    axes[2].set_title("compiled gradient: arguments + outputs + temporaries")
    for ax in axes:
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle("Cost of one layer vs sequence length: attention O(n^2 d), recurrence O(n d^2)")
    save_figure(cfg, fig, "attention_cost")


def run(cfg: Config) -> dict:
    jax.config.update("jax_enable_x64", True)
    grads = gradient_vs_distance(cfg)
    paths = {n: path_lengths(n, cfg.width) for n in tqdm(cfg.lengths, desc="path lengths")}
    costs = cost(cfg)
    plot(cfg, grads, paths, costs)

    att, rnn = grads["attention"], grads["rnn"]
    slopes = [att[n]["loglog_slope"] for n in cfg.lengths]
    rates = [rnn[n]["log10_gain_per_step"] for n in cfg.lengths]
    checks = {
        "attention_slopes_within_0.1": max(abs(s) for s in slopes) <= 0.1,
        "rnn_exponential_decay": all(rnn[n]["semilog_r2"] > 0.95 for n in cfg.lengths) and max(rates) < 0,
        "path_length_attention_1": all(paths[n]["attention"]["max"] == 1 for n in cfg.lengths),
        "path_length_rnn_n": all(paths[n]["rnn"]["from_first_input"] == n for n in cfg.lengths),
        "attention_flops_slope_at_least_1.8": costs["attention"]["flops_loglog_slope"] >= 1.8,
        "rnn_flops_slope_1_within_0.1": abs(costs["rnn"]["flops_loglog_slope"] - 1) <= 0.1,
    }
    longest = max(cfg.lengths)
    n_times = [att[n]["n_times_mean_norm"] for n in cfg.lengths]
    claims = [{
        "id": "B11", "claim": "attention makes the gradient path length O(1) instead of O(L), at quadratic "
                              "cost in sequence length",
        "source_figure": "Vaswani et al. 2017, Table 1: per-layer O(n^2 d) vs O(n d^2), max path O(1) vs O(n)",
        "measured": f"n = {min(cfg.lengths)}..{longest}: path length in the jaxpr 1 (attention) vs n (RNN); "
                    f"log-log slope of the attention gradient vs distance {min(slopes):+.3f}..{max(slopes):+.3f}, "
                    f"its size n x mean = {min(n_times):.2f}..{max(n_times):.2f}; tanh RNN decays "
                    f"10^({np.mean(rates):.3f}) per step (semi-log R^2 >= "
                    f"{min(rnn[n]['semilog_r2'] for n in cfg.lengths):.3f}); FLOPs vs n = "
                    f"{min(cfg.cost_lengths)}..{max(cfg.cost_lengths)}: slope "
                    f"{costs['attention']['flops_loglog_slope']:.2f} (attention) vs "
                    f"{costs['rnn']['flops_loglog_slope']:.2f} (RNN); gradient memory slope "
                    f"{costs['attention']['gradient_memory_bytes_loglog_slope']:.2f} vs "
                    f"{costs['rnn']['gradient_memory_bytes_loglog_slope']:.2f}",
        "verdict": ("confirmed: one hop from every input, a gradient that does not decay with distance "
                    "(but is spread over the n positions, ~1/n each), and FLOPs and memory quadratic in n")
        if all(checks.values()) else "refuted: " + ", ".join(k for k, v in checks.items() if not v)}]
    headline = {"attention_loglog_slopes": dict(zip(map(str, cfg.lengths), slopes)),
                "rnn_log10_gain_per_step": float(np.mean(rates)),
                "path_length": {name: [paths[n][name]["max"] for n in cfg.lengths] for name in ("attention", "rnn")},
                "flops_loglog_slope": {name: c["flops_loglog_slope"] for name, c in costs.items()},
                "gradient_memory_loglog_slope": {name: c["gradient_memory_bytes_loglog_slope"]
                                                 for name, c in costs.items()}}
    curves = {f"{name}_n{n}": grads[name][n]["norm_by_distance"] for name in grads for n in cfg.lengths}
    return {"headline": headline, "claims": claims, "checks": checks, "gradient_vs_distance": curves,
            "gradient_fits": {name: {n: {k: v for k, v in row.items() if k != "norm_by_distance"}
                                     for n, row in rows.items()} for name, rows in grads.items()},
            "path_lengths": paths, "cost": costs}


if __name__ == "__main__":
    main(__name__, Config, run, QUICK)
