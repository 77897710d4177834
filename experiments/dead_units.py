"""Inactive and dead units (D2): ReLU vs Leaky ReLU vs GELU, at initialisation and after training.

Inactive vs dead. A ReLU unit is *inactive on an input* when its pre-activation h <= 0 there; it is
*dead* when no example of the data set passes a gradient through it: max over the data of
|s'(h)| <= `dead_slope` (for ReLU: h <= 0 on every example). With zero biases and weights drawn
from a symmetric distribution, every pre-activation is symmetric about 0, so a unit is inactive on
a given input with probability exactly 1/2: "about half the units are inactive" holds per input.
It says nothing about dead units, which is what training with too large a learning rate creates:
a large step pushes a unit's bias and weights so that it is negative on every example, after which
ReLU gives it no gradient to come back. Leaky ReLU's slope is 0.01 everywhere, so no unit can die;
GELU's slope tends to 0 for h -> -inf, so its units can.

Measured: (1) the per-input inactive fraction at every layer of a deep He-initialised MLP on the
digits, beside the fraction dead on the whole data set; (2) an MLP trained on the digits with Adam
at several learning rates, ReLU vs Leaky ReLU (0.01) vs GELU from the same initial weights and
batches: dead units on the training set, units negative on every example, accuracy; (3) born-dead
nets (Lu et al. 2019, "Dying ReLU and initialization"): a bias-free ReLU net of L hidden layers of
width N on a 1-D input is *born dead* when its last hidden layer is zero for every input, i.e. the
net is constant. By positive homogeneity the net on x > 0 and on x < 0 is two chains of
non-negative vectors; given a non-zero non-negative v, each unit of W v is positive with probability
1/2 independently of the rest, so a chain dies at each layer with probability 2^-N independently of
its past and survives L layers with probability a = (1 - 2^-N)^L. Born dead means both chains died:

    1 - 2 a  <=  P(born dead)  <=  1 - a      (union bound; the + chain alone),

both -> 1 as L -> infinity at the rate Lu et al. prove. Measured over `born_dead_inits` nets per
(N, L) on a grid of inputs in [-1, 1].
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

from experiments._minibatch import fit
from experiments.common import flag, main, save_figure
from neuralode import compiled_init
from neuralode.data import load_dataset

F32 = jnp.float32
ACTIVATIONS: dict[str, Callable] = {"relu": jax.nn.relu, "leaky_relu": lambda h: jax.nn.leaky_relu(h, 0.01),
                                    "gelu": jax.nn.gelu}


@dataclasses.dataclass
class Config:
    out: str = flag("results", "directory for the JSON and the figures")
    quick: bool = flag(False, "small settings (fewer learning rates, depths and epochs)")
    seed: int = flag(0, "seed of the weights and the batch order")
    init_depth: int = flag(20, "hidden layers of the MLP whose inactive fractions are measured at init")
    init_width: int = flag(256, "units per hidden layer of that MLP")
    hidden: tuple[int, ...] = flag((128, 128, 128), "hidden widths of the trained MLP")
    learning_rates: tuple[float, ...] = flag((1e-3, 1e-2, 3e-2, 1e-1), "Adam learning rates of the sweep")
    large_learning_rate: float = flag(3e-2, "the 'too large' learning rate of the verdict (one of the sweep)")
    epochs: int = flag(20, "training epochs")
    batch_size: int = flag(64, "training batch size")
    dead_slope: float = flag(1e-4, "a unit is dead when max over the training set of |s'(h)| is at most this")
    born_dead_widths: tuple[int, ...] = flag((2, 3, 4), "widths N of the born-dead nets")
    born_dead_depths: tuple[int, ...] = flag((1, 2, 3, 5, 8, 12, 16, 24, 32, 48, 64), "depths L of the born-dead nets")
    born_dead_inits: int = flag(1000, "random initialisations per (N, L)")
    born_dead_inputs: int = flag(101, "grid points in [-1, 1] on which a net must be zero to count as dead")


QUICK = {"learning_rates": (1e-3, 3e-2), "epochs": 12, "born_dead_depths": (1, 2, 4, 8, 16, 32)}


class MLP(nnx.Module):
    """Dense layers with He-normal kernels and zero biases, `activation` between them."""

    def __init__(self, sizes, activation: Callable, rngs: nnx.Rngs):
        self.layers = nnx.List([nnx.Linear(a, b, kernel_init=nnx.initializers.he_normal(), param_dtype=F32, rngs=rngs)
                                for a, b in zip(sizes[:-1], sizes[1:])])
        self.activation = activation

    def pre_activations(self, x) -> tuple[jax.Array, list[jax.Array]]:
        """(output, [h_1, ..., h_{L-1}]): the output and the pre-activation of every hidden layer."""
        hidden = []
        for layer in self.layers[:-1]:
            hidden.append(layer(x))
            x = self.activation(hidden[-1])
        return self.layers[-1](x), hidden

    def __call__(self, x):
        return self.pre_activations(x)[0]


def unit_statistics(hidden: list[jax.Array], activation: Callable, dead_slope: float) -> dict:
    """Per hidden layer: mean fraction of units inactive per input (h <= 0), fraction negative on
    every input, fraction dead (max |s'(h)| over the inputs <= dead_slope)."""
    values = [[float(v) for v in _fractions(h, activation, dead_slope)] for h in hidden]
    return dict(zip(("inactive_per_input", "negative_on_all", "dead"), map(list, zip(*values))))


@functools.partial(jax.jit, static_argnums=(1, 2))  # compiled once per activation and layer shape
def _fractions(h, activation: Callable, dead_slope: float):
    slope = jax.vmap(jax.vmap(jax.grad(activation)))(h)
    return (jnp.mean(h <= 0), jnp.mean(jnp.all(h <= 0, axis=0)),
            jnp.mean(jnp.max(jnp.abs(slope), axis=0) <= dead_slope))


@nnx.jit
def _hidden_pre_activations(model: MLP, x: jax.Array) -> list[jax.Array]:
    return model.pre_activations(x)[1]


def pooled(stats: dict, key: str, widths) -> float:
    """A per-layer fraction pooled over all hidden units."""
    return float(np.dot(stats[key], widths) / np.sum(widths))


def inactive_at_init(cfg: Config, x: np.ndarray) -> dict:
    model = compiled_init(lambda: MLP([x.shape[1]] + [cfg.init_width] * cfg.init_depth + [10], jax.nn.relu,
                                      nnx.Rngs(cfg.seed)))
    hidden = _hidden_pre_activations(model, jnp.asarray(x, F32))
    stats = unit_statistics(hidden, jax.nn.relu, 0.0)
    per_input = np.array([np.asarray(jnp.mean(h <= 0, axis=1)) for h in hidden])  # (layers, inputs)
    return {**stats, "mean_inactive_per_input": float(per_input.mean()),
            "inactive_per_input_min": float(per_input.min()), "inactive_per_input_max": float(per_input.max())}


def train_sweep(cfg: Config, data) -> list[dict]:
    x, y = data.x_train.reshape(len(data.x_train), -1), data.y_train
    x_test, y_test = jnp.asarray(data.x_test.reshape(len(data.x_test), -1)), jnp.asarray(data.y_test)
    sizes = [x.shape[1], *cfg.hidden, data.num_classes]

    def loss(model, xb, yb, key, step):
        logits = model(xb)
        value = optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()
        return value, {"loss": value, "accuracy": jnp.mean(jnp.argmax(logits, -1) == yb)}

    rows = []
    runs = [(lr, name) for lr in cfg.learning_rates for name in ACTIVATIONS]
    for lr, name in tqdm(runs, desc="learning rates x activations"):
        activation = ACTIVATIONS[name]
        # the same initial weights for every run
        model = compiled_init(lambda: MLP(sizes, activation, nnx.Rngs(cfg.seed)))
        at_init = unit_statistics(_hidden_pre_activations(model, jnp.asarray(x)), activation, cfg.dead_slope)
        history = fit(model, loss, x, y, epochs=cfg.epochs, batch_size=cfg.batch_size, tx=optax.adam(lr),
                      seed=cfg.seed, desc=f"{name} lr={lr:g}")
        stats = unit_statistics(_hidden_pre_activations(model, jnp.asarray(x)), activation, cfg.dead_slope)
        rows.append({"learning_rate": lr, "activation": name, **{f"{k}_per_layer": v for k, v in stats.items()},
                     "dead": pooled(stats, "dead", cfg.hidden), "dead_at_init": pooled(at_init, "dead", cfg.hidden),
                     "negative_on_all": pooled(stats, "negative_on_all", cfg.hidden),
                     "train_accuracy": history[-1]["accuracy"],
                     "test_accuracy": float(jnp.mean(jnp.argmax(model(x_test), -1) == y_test))})
    return rows


def born_dead_by_depth(key, width, max_width: int, max_depth: int, xs) -> jax.Array:
    """For one bias-free He-initialised ReLU net of `max_depth` hidden layers of width N on the 1-D
    inputs xs: whether its first L layers end in a layer that is zero on every input, for every L
    (the net truncated to L hidden layers, plus any output layer, is then constant). Layers are
    padded to `max_width` units whose weights are zero, so one compilation serves every width."""
    units = (jnp.arange(max_width) < width).astype(F32)
    first_key, key = jax.random.split(key)
    h = jax.nn.relu(xs @ (jax.random.normal(first_key, (1, max_width), F32) * np.sqrt(2.0) * units))

    def layer(h, layer_key):
        w = jax.random.normal(layer_key, (max_width, max_width), F32) * jnp.sqrt(2.0 / width)
        h = jax.nn.relu(h @ (w * units[:, None] * units[None, :]))
        return h, jnp.all(h == 0)

    _, dead = jax.lax.scan(layer, h, jax.random.split(key, max_depth - 1))
    return jnp.concatenate([jnp.all(h == 0)[None], dead])


def born_dead(cfg: Config) -> list[dict]:
    """P(born dead) per (N, L) over `born_dead_inits` nets, with the bounds 1 - 2a and 1 - a and the
    binomial tail probabilities of the measured count under each bound."""
    from scipy.stats import binom

    xs = jnp.linspace(-1.0, 1.0, cfg.born_dead_inputs, dtype=F32)[:, None]
    n, max_depth, widths = cfg.born_dead_inits, max(cfg.born_dead_depths), cfg.born_dead_widths
    keys = jax.vmap(lambda w: jax.random.split(jax.random.fold_in(jax.random.key(cfg.seed), w), n))(jnp.asarray(widths))
    one = lambda k, w: born_dead_by_depth(k, w, max(widths), max_depth, xs)  # noqa: E731
    dead = np.asarray(jax.jit(jax.vmap(jax.vmap(one, (0, None))))(keys, jnp.asarray(widths, F32)))
    rows = []
    for width, dead_by_depth in zip(widths, dead):
        for depth in cfg.born_dead_depths:
            count = int(dead_by_depth[:, depth - 1].sum())
            alive = (1 - 2.0**-width) ** depth
            lower, upper = max(0.0, 1 - 2 * alive), 1 - alive
            rows.append({"width": width, "depth": depth, "born_dead": count / n, "lower_bound": lower,
                         "upper_bound": upper,
                         # P(count or more | p = upper bound) and P(count or fewer | p = lower bound)
                         "p_value_above_upper": float(binom.sf(count - 1, n, upper)),
                         "p_value_below_lower": float(binom.cdf(count, n, lower)) if lower > 0 else 1.0})
    return rows


def plot(cfg: Config, init: dict, sweep: list[dict], dead: list[dict]) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 4.6))
    layers = np.arange(1, cfg.init_depth + 1)
    axes[0].plot(layers, init["inactive_per_input"], "o-", label="inactive per input (mean)")
    axes[0].plot(layers, init["dead"], "s-", label="dead on the whole data set")
    axes[0].axhspan(0.47, 0.53, color="0.85", zorder=0)
    axes[0].set(xlabel="hidden layer", ylabel="fraction of units", ylim=(0, 1),
                title=f"ReLU MLP at init ({cfg.init_depth} x {cfg.init_width}, He), digits\ngrey band: 0.5 +- 0.03")
    axes[0].legend(fontsize=8)
    for name, marker in zip(ACTIVATIONS, "os^"):
        sel = [r for r in sweep if r["activation"] == name]
        line, = axes[1].semilogx([r["learning_rate"] for r in sel], [100 * r["dead"] for r in sel], marker + "-",
                                 label=f"{name}: dead")
        axes[1].semilogx([r["learning_rate"] for r in sel], [100 * r["negative_on_all"] for r in sel], marker + ":",
                         color=line.get_color(), alpha=0.6, label=f"{name}: negative on every input")
    axes[1].set(xlabel="Adam learning rate", ylabel="% of hidden units",
                title=f"after {cfg.epochs} epochs of Adam on digits\nMLP {list(cfg.hidden)}, same init and batches")
    axes[1].legend(fontsize=7)
    for width in cfg.born_dead_widths:
        sel = [r for r in dead if r["width"] == width]
        depths = [r["depth"] for r in sel]
        line, = axes[2].plot(depths, [r["born_dead"] for r in sel], "o", label=f"N = {width}, measured")
        axes[2].fill_between(depths, [r["lower_bound"] for r in sel], [r["upper_bound"] for r in sel],
                             color=line.get_color(), alpha=0.2)
    axes[2].set(xlabel="hidden layers L", ylabel="P(born dead)", ylim=(-0.02, 1.02),
                title=f"born dead: bias-free ReLU nets, {cfg.born_dead_inits} inits\nband: bounds 1 - 2a .. 1 - a, a = (1 - 2^-N)^L")
    axes[2].legend(fontsize=8)
    save_figure(cfg, fig, "dead_units_overview")


def run(cfg: Config) -> dict:
    if cfg.large_learning_rate not in cfg.learning_rates:
        raise ValueError(f"large_learning_rate: {cfg.large_learning_rate} must be one of learning_rates "
                         f"{cfg.learning_rates}")
    data = load_dataset("digits")
    init = inactive_at_init(cfg, data.x_test.reshape(len(data.x_test), -1))
    sweep = train_sweep(cfg, data)
    dead = born_dead(cfg)
    plot(cfg, init, sweep, dead)

    large = {r["activation"]: r for r in sweep if r["learning_rate"] == cfg.large_learning_rate}
    small = {r["activation"]: r for r in sweep if r["learning_rate"] == min(cfg.learning_rates)}
    leaky_dead = max(r["dead"] for r in sweep if r["activation"] == "leaky_relu")
    gelu_dying = [r["learning_rate"] for r in sweep if r["activation"] == "gelu" and r["dead"] > 0]
    half = abs(init["mean_inactive_per_input"] - 0.5) <= 0.03
    relu_dies = large["relu"]["dead"] > max(0.05, 2 * large["relu"]["dead_at_init"])
    gelu_text = (f"GELU has none at lr {cfg.large_learning_rate:g} but is not immune: its slope vanishes for "
                 f"h -> -inf and {100 * max(r['dead'] for r in sweep if r['activation'] == 'gelu'):.0f} % of its "
                 f"units die at lr {min(gelu_dying):g}" if gelu_dying and large["gelu"]["dead"] == 0 else
                 f"GELU {100 * large['gelu']['dead']:.1f} % dead at lr {cfg.large_learning_rate:g}")
    verdict = ("confirmed per input at init, and for Leaky ReLU; imprecise: half inactive per input is not dead, "
               f"dead units come from training (too large a step); {gelu_text}")
    if not (half and relu_dies and leaky_dead == 0):
        verdict = "refuted"
    worst_p = min(min(r["p_value_above_upper"], r["p_value_below_lower"]) for r in dead)
    within = worst_p > 1e-4
    deepest = {r["width"]: r for r in dead if r["depth"] == max(cfg.born_dead_depths)}
    claims = [
        {"id": "D2", "claim": "ReLU leaves about half the units inactive; Leaky ReLU keeps all alive",
         "source_figure": "fraction of dead units",
         "measured": f"at init (He, {cfg.init_depth} x {cfg.init_width}, digits) {init['mean_inactive_per_input']:.3f} of "
                     f"ReLU units inactive per input, {100 * np.mean(init['dead']):.0f} % dead on the whole set; "
                     f"same MLP from the same init ({100 * large['relu']['dead_at_init']:.1f} % of its ReLU units dead) after "
                     f"{cfg.epochs} epochs of Adam at lr {cfg.large_learning_rate:g}: ReLU {100 * large['relu']['dead']:.1f} "
                     f"% dead ({100 * small['relu']['dead']:.1f} % at lr {min(cfg.learning_rates):g}), "
                     f"Leaky ReLU {100 * large['leaky_relu']['dead']:.0f} % dead with "
                     f"{100 * large['leaky_relu']['negative_on_all']:.0f} % negative on every input, "
                     f"GELU {100 * large['gelu']['dead']:.1f} % dead",
         "verdict": verdict},
        {"id": "D2-born-dead", "claim": "deep narrow ReLU nets are born dead with probability -> 1 as depth grows "
                                        "(Lu et al. 2019)",
         "source_figure": "P(born dead) vs depth for widths 2, 3, 4 beside the bound",
         "measured": "; ".join(f"N = {n}: {r['born_dead']:.3f} at L = {r['depth']} (bounds {r['lower_bound']:.3f}.."
                               f"{r['upper_bound']:.3f})" for n, r in deepest.items())
                     + f"; {cfg.born_dead_inits} inits each; every (N, L) consistent with its bounds (smallest binomial "
                       f"tail probability {worst_p:.2g})",
         "verdict": "confirmed" if within else "refuted"},
    ]
    headline = {"inactive_per_input_at_init": init["mean_inactive_per_input"],
                "dead_at_large_lr": {name: r["dead"] for name, r in large.items()},
                "born_dead_deepest": {n: r["born_dead"] for n, r in deepest.items()}}
    return {"headline": headline, "claims": claims, "init": init, "sweep": sweep, "born_dead": dead}


if __name__ == "__main__":
    main(__name__, Config, run, QUICK)
