"""Claims A4/A5: Jacobi is a slow residual update, a V-cycle is h-independent, the V-cycle is a U-Net
(exactly, with stencil weights), learning its stencils beats it, and its bottleneck is a low-pass filter.

Measured: residual histories of Jacobi, red-black Gauss-Seidel, V-cycle, FMG, the stencil U-Net and the
learned U-Net on a held-out log-normal diffusion problem; convergence factors (power iteration on the
error propagation) per method and grid size for 2-D Poisson, with the theory for the smoothers; the
learned/classical factor at equal cost on held-out coefficient fields; and the share of energy above
half the Nyquist frequency in what passes the bottleneck vs what the skips carry.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

from experiments.common import flag, main, save_figure
from neuralode import multigrid as mg
from neuralode.models import MultigridUNet
from neuralode.train_step import make_train_state, make_train_step


@dataclasses.dataclass
class Config:
    out: str = flag("results", "directory for the JSON and the figures")
    quick: bool = flag(False, "small and short: the QUICK settings (explicit flags still win)")
    n_poisson: tuple[int, ...] = flag((32, 64, 128, 256), "2-D Poisson grid sizes n (intervals per side, "
                                      "powers of 2) of the convergence factors; the largest also sets the "
                                      "spectrum's grid")
    n_train: int = flag(32, "grid size n of the training problems, the held-out comparison and the histories")
    nu1: int = flag(1, "pre-smoothing weighted-Jacobi sweeps per level of the U-Net cycles")
    nu2: int = flag(1, "post-smoothing weighted-Jacobi sweeps per level of the U-Net cycles")
    train_steps: int = flag(300, "Adam steps training the U-Net's relaxation weights and transfer stencils")
    batch: int = flag(16, "random diffusion problems (each with a random right-hand side) per training step")
    lr: float = flag(1e-2, "Adam learning rate")
    loss_cycles: int = flag(3, "U-Net cycles from u = 0 before the loss takes the log relative residual")
    sigma: float = flag(1.0, "log-normal coefficients a = exp(sigma g): standard deviation of log a")
    length: float = flag(0.1, "correlation length of the Gaussian field g, in units of the domain's side")
    held_out: int = flag(8, "held-out coefficient fields on which learned and classical factors are compared")
    history_steps: int = flag(20, "iterations (sweeps or cycles) in the residual histories")
    power_iterations: int = flag(60, "power-iteration steps per convergence factor of a cycle (the "
                                 "smoothers take ~n^2)")
    seed: int = flag(0, "seed of the training problems, the held-out fields and the spectrum's test signals")


QUICK = {"n_poisson": (16, 32), "n_train": 16, "train_steps": 150, "batch": 8, "held_out": 4,
         "power_iterations": 40, "history_steps": 12}


def problems(key, count: int, n: int, cfg: Config):
    """`count` diffusion operators with a = exp(sigma g), g Gaussian with correlation length cfg.length."""
    keys = jax.random.split(key, count)
    return jax.vmap(lambda k: mg.diffusion(mg.lognormal_coefficients(k, n, cfg.sigma, cfg.length)))(keys)


def factor_of(model: MultigridUNet, op, e0, iterations: int):
    """Spectral radius of one cycle's error propagation e -> model(0, op, e)."""
    zero = jnp.zeros_like(e0)
    return mg.convergence_factor(lambda e: model(zero, op, e, cycles=1), e0, iterations)


def train(cfg: Config):
    """Minimise the mean log relative residual after `loss_cycles` cycles from u = 0, random f."""
    n = cfg.n_train
    model = MultigridUNet(n, nu1=cfg.nu1, nu2=cfg.nu2, omega=0.8)

    def loss_fn(model, key):  # the batch is a key: problems and right-hand sides are drawn from it
        k_ops, k_f = jax.random.split(key)
        ops = problems(k_ops, cfg.batch, n, cfg)
        fs = jax.random.normal(k_f, (cfg.batch, n - 1, n - 1))
        residual = lambda f, op: jnp.linalg.norm(f - op(model(f, op, cycles=cfg.loss_cycles)))
        loss = jnp.mean(jnp.log(jax.vmap(residual)(fs, ops) / jnp.linalg.norm(fs, axis=(1, 2))))
        return loss, {"loss": loss}

    graphdef, state = make_train_state(model, optax.adam(cfg.lr))
    step = make_train_step(graphdef, loss_fn)
    losses = []
    key = jax.random.key(cfg.seed)
    for _ in (bar := tqdm(range(cfg.train_steps), desc="training U-Net stencils")):
        key, sub = jax.random.split(key)
        state, metrics = step(state, sub)
        losses.append(float(metrics["loss"]))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    nnx.update(model, state["model"])
    return model, np.array(losses)


def learned_vs_classical(cfg: Config, model: MultigridUNet):
    n = cfg.n_train
    ops = problems(jax.random.key(10_000 + cfg.seed), cfg.held_out, n, cfg)  # never seen in training
    e0 = jax.random.normal(jax.random.key(7), (n - 1, n - 1))
    rho = nnx.jit(lambda m: jax.vmap(lambda op: factor_of(m, op, e0, cfg.power_iterations))(ops))
    learned = np.asarray(rho(model))
    classical = {f"omega={w:.3g}": np.asarray(rho(MultigridUNet(n, nu1=cfg.nu1, nu2=cfg.nu2, omega=w)))
                 for w in (2 / 3, 0.8)}
    best = np.minimum(*classical.values())
    return {"learned": learned, "classical": classical, "ratio_per_field": learned / best,
            "ratio": float(np.mean(learned / best)), "goal": 0.8,
            "cost_note": "same V(nu1,nu2) structure, 3x3 transfer stencils, Jacobi sweeps and Galerkin "
                         "9-point coarse operators: identical work per cycle"}


def convergence_factors(cfg: Config):
    """Power-iteration factors for 2-D Poisson: smoothers (with theory) and cycles, per grid size."""
    out = {}
    for n in tqdm(cfg.n_poisson, desc="convergence factors"):
        op, zero = mg.Poisson(n), jnp.zeros((n - 1, n - 1))
        e0 = jax.random.normal(jax.random.key(n), (n - 1, n - 1))
        levels = mg.hierarchy(op)
        maps = {
            # the smoothers' two largest eigenvalues differ by O(h^2): power iteration needs O(n^2) sweeps
            "jacobi": (lambda e: mg.jacobi(op, e, zero, 2 / 3), n * n),
            "gauss_seidel": (lambda e: mg.gauss_seidel(op, e, zero), n * n // 2),
            "V(2,1) gauss_seidel": (lambda e: mg.cycle(levels, e, zero, "V", 2, 1), cfg.power_iterations),
            "V(2,1) jacobi": (lambda e: mg.cycle(levels, e, zero, "V", 2, 1, "jacobi", 0.8), cfg.power_iterations),
            "W(2,1) gauss_seidel": (lambda e: mg.cycle(levels, e, zero, "W", 2, 1), cfg.power_iterations),
            "F(2,1) gauss_seidel": (lambda e: mg.cycle(levels, e, zero, "F", 2, 1), cfg.power_iterations),
        }
        row = {name: float(jax.jit(lambda e: mg.convergence_factor(fn, e, its))(e0))
               for name, (fn, its) in maps.items()}
        c = math.cos(math.pi / n)
        row["jacobi_theory"] = 1 - 2 / 3 * (1 - c)
        row["gauss_seidel_theory"] = c**2  # red-black GS: the square of Jacobi's (omega = 1) radius
        out[n] = row
    return out


def histories(cfg: Config, model: MultigridUNet):
    """Relative residual per iteration (sweep or cycle) on one held-out diffusion problem."""
    n, k = cfg.n_train, cfg.history_steps
    op = jax.tree.map(lambda x: x[0], problems(jax.random.key(20_000 + cfg.seed), 1, n, cfg))
    f = jax.random.normal(jax.random.key(3), (n - 1, n - 1))
    zero = jnp.zeros_like(f)
    levels = mg.hierarchy(op)
    stencil_net = MultigridUNet(n, nu1=cfg.nu1, nu2=cfg.nu2, omega=0.8)
    steps = {
        "jacobi": lambda u: mg.jacobi(op, u, f, 0.8),
        "gauss_seidel": lambda u: mg.gauss_seidel(op, u, f),
        "V(2,1) gauss_seidel": lambda u: mg.cycle(levels, u, f),
        f"U-Net stencils V({cfg.nu1},{cfg.nu2})": lambda u: stencil_net(f, op, u),
        f"U-Net learned V({cfg.nu1},{cfg.nu2})": lambda u: model(f, op, u),
    }
    out = {name: np.asarray(nnx.jit(lambda: mg.residual_history(step, op, f, zero, k))())
           for name, step in steps.items()}
    u_fmg = jax.jit(lambda f: mg.fmg(levels, f))(f)
    rest = np.asarray(jax.jit(lambda u: mg.residual_history(lambda u: mg.cycle(levels, u, f), op, f, u, k - 1))(u_fmg))
    out["FMG + V(2,1)"] = np.concatenate([[1.0], rest])
    return out


def spectrum(cfg: Config):
    """What the encoder-decoder path passes (P_0 ... P_d R_d ... R_0 x) vs what the skip carries (x)."""
    n = max(cfg.n_poisson)
    rng = np.random.default_rng(cfg.seed)
    x = np.arange(1, n) / n
    X, Y = np.meshgrid(x, x, indexing="ij")
    signals = {"white_noise": rng.standard_normal((n - 1, n - 1)),
               "edges": ((X - 0.4) ** 2 + (Y - 0.5) ** 2 < 0.08) + (np.abs(X - 0.7) < 0.1) * (Y > 0.3)
               + 0.1 * rng.standard_normal((n - 1, n - 1))}
    out = {}
    for name, s in signals.items():
        s = jnp.asarray(s, jnp.float64)
        skip_share = float(mg.high_frequency_share(s))
        row = {"skip_hf_fraction": skip_share}
        for depth in (1, int(math.log2(n)) - 2):
            y = s
            for _ in range(depth):
                y = mg.restrict(y)
            for _ in range(depth):
                y = mg.prolong(y)
            share = float(mg.high_frequency_share(y))
            row[f"bottleneck_depth{depth}_hf_fraction"] = share
            row[f"bottleneck_depth{depth}_hf_energy_passed"] = share * float(jnp.sum(y**2)) / (
                skip_share * float(jnp.sum(s**2)))
        out[name] = row
    # gain of one restrict-prolong round trip on each 1-D sine mode (the low-pass transfer function)
    m = n - 1
    modes = np.sin(np.pi * np.outer(np.arange(1, n), np.arange(1, n)) / n)
    # (v^T P R v / v^T v = cos^4(k pi h / 2): 1 for smooth modes, 0 at half Nyquist and above it small)
    gain = np.array([float(jnp.vdot(mg.prolong(mg.restrict(jnp.asarray(v))), v) / np.dot(v, v))
                     for v in modes])
    out["round_trip_gain_1d"] = gain
    out["frequency"] = np.arange(1, n) / m
    return out


def _figures(cfg, hist, factors, comparison, spec, losses):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, h in hist.items():
        ax.semilogy(h, marker=".", label=name)
    ax.set(xlabel="iteration (sweep or cycle)", ylabel="||f - A u|| / ||f||",
           title=f"held-out log-normal diffusion, n = {cfg.n_train}")
    ax.legend(fontsize=7)
    save_figure(cfg, fig, "multigrid_histories")

    fig, ax = plt.subplots(figsize=(6, 4))
    ns = sorted(factors)
    for name in factors[ns[0]]:
        ax.plot(ns, [1 - factors[n][name] for n in ns], marker="o", ls="--" if "theory" in name else "-",
                label=name)
    ax.set(xscale="log", yscale="log", xlabel="n (grid intervals per side)", ylabel="1 - convergence factor",
           title="2-D Poisson: smoothers' rate O(h^2), cycles' rate h-independent")
    ax.legend(fontsize=7)
    save_figure(cfg, fig, "multigrid_factors")

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    axes[0].plot(losses)
    axes[0].set(xlabel="step", ylabel="mean log residual", title="training the U-Net stencils")
    idx = np.arange(len(comparison["learned"]))
    for k, (name, v) in enumerate(comparison["classical"].items()):
        axes[1].bar(idx + 0.25 * k, v, 0.25, label=f"classical {name}")
    axes[1].bar(idx + 0.5, comparison["learned"], 0.25, label="learned")
    axes[1].set(xlabel="held-out field", ylabel="convergence factor",
                title=f"learned / classical = {comparison['ratio']:.2f}")
    axes[1].legend(fontsize=7)
    save_figure(cfg, fig, "multigrid_learned")

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(spec["frequency"], spec["round_trip_gain_1d"])
    ax.axvline(0.5, color="k", ls=":", label="half Nyquist")
    ax.set(xlabel="frequency / Nyquist", ylabel="gain of P R", title="bottleneck = low-pass filter")
    ax.legend()
    save_figure(cfg, fig, "multigrid_spectrum")


def run(cfg: Config) -> dict:
    jax.config.update("jax_enable_x64", True)
    factors = convergence_factors(cfg)
    model, losses = train(cfg)
    comparison = learned_vs_classical(cfg, model)
    hist = histories(cfg, model)
    spec = spectrum(cfg)
    _figures(cfg, hist, factors, comparison, spec, losses)
    n_max = max(cfg.n_poisson)
    vc = [factors[n]["V(2,1) gauss_seidel"] for n in cfg.n_poisson]
    return {
        "convergence_factor": factors,
        "learned_vs_classical": comparison,
        "residual_histories": hist,
        "spectrum": spec,
        "training_loss": losses,
        "learned_stencils": {k: np.asarray(v[...]) for k, v in nnx.state(model, nnx.Param).items()},
        "headline": {
            "V(2,1) GS factor (max over n)": max(vc),
            "V-cycle factor max/min over n": max(vc) / min(vc),
            f"Jacobi factor n={n_max}": factors[n_max]["jacobi"],
            "learned/classical factor (goal <= 0.8)": comparison["ratio"],
            "HF share (> Nyquist/2) of white noise: skip vs bottleneck": [
                spec["white_noise"]["skip_hf_fraction"], spec["white_noise"]["bottleneck_depth1_hf_fraction"]],
        },
    }


if __name__ == "__main__":
    main(__name__, Config, run, QUICK)
