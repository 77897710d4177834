"""Posterior collapse (C5): a decoder with a direct path from the input can ignore the latent.

A VAE on the binarised 8x8 digits (pixels > 0.5), latent dimension 8, q(z|x) = N(mu(x), diag s(x)^2)
from an MLP encoder, prior N(0, I), Bernoulli pixels, trained on the ELBO

    ELBO(x) = E_q[log p(x|z)] - KL(q(z|x) || p(z))

with the same encoder, optimiser and schedule for every decoder:

(a) `mlp`: p(x|z) from an MLP of z alone (two hidden layers);
(b) `ar`: an autoregressive MADE (Germain et al. 2015): `ar_layers` masked hidden layers, pixel i
    sees pixels < i, plus a direct masked linear path x_{<i} -> logit_i (the skip around the
    latent); z enters the first hidden layer only;
(c) `skip`: the same decoder with z added to every hidden layer and to the logits (the skip-VAE of
    Dieng et al. 2019, "Avoiding latent variable collapse with generative skip models");
(d) `ar_annealed`: decoder (b) with the KL weight raised linearly from 0 to 1 over the first
    `anneal_fraction` of training (Bowman et al. 2016), the classical remedy;
(e) `ar_shallow`: decoder (b) with two hidden layers, to show what the depth of the latent's path
    does.

Reported on the test set: ELBO, reconstruction E_q log p(x|z) and KL in nats per image; active units
(Burda et al. 2016): dimensions u with Cov_x(E_q[z_u | x]) > 0.01; and the mutual information under
q, I(x; z) = E_x E_q(z|x)[log q(z|x) - log q(z)] with the aggregate posterior
q(z) = (1/N) sum_n q(z|x_n) (Hoffman & Johnson 2016), on the N training images, so at most log N.

Why (b) collapses while (c) does not: the information in z costs KL nats and reaches the logits of
(b) through `ar_layers` layers, while x_{<i} reaches them in one; early in training z is noise to the
decoder, its path carries a weak gradient, the decoder learns the pixels from x_{<i} and the
encoder settles on the prior. Feeding z to every layer gives it a path as short as the input's.
"""
from __future__ import annotations

import dataclasses

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
PIXELS = 64
DECODERS = {"mlp": "(a) MLP from z", "ar": "(b) MADE + direct path, z in layer 1",
            "skip": "(c) skip-VAE: z in every layer", "ar_annealed": "(d) = (b) with KL annealing",
            "ar_shallow": "(e) = (b) with 2 hidden layers"}


@dataclasses.dataclass
class Config:
    out: str = flag("results", "directory for the JSON and the figures")
    quick: bool = flag(False, "small settings (fewer epochs, larger batches)")
    seed: int = flag(0, "seed of the weights, masks, batch order and sampling noise")
    latent: int = flag(8, "latent dimension")
    hidden: int = flag(256, "width of every hidden layer (encoder and decoders)")
    ar_layers: int = flag(8, "masked hidden layers of the autoregressive decoders (b), (c), (d)")
    epochs: int = flag(200, "training epochs (Adam)")
    batch_size: int = flag(64, "training batch size")
    learning_rate: float = flag(1e-3, "Adam learning rate")
    anneal_fraction: float = flag(0.3, "fraction of training over which (d) raises the KL weight from 0 to 1")
    samples: int = flag(10, "posterior samples per test image for the reconstruction term")
    active_threshold: float = flag(0.01, "a latent unit is active when Cov_x(E_q[z_u]) exceeds this (Burda et al.)")
    decoders: tuple[str, ...] = flag(tuple(DECODERS), f"decoders to train, of {', '.join(DECODERS)} (the verdict "
                                                      "needs mlp, ar and skip)")


QUICK = {"epochs": 40, "batch_size": 128}


class MaskedLinear(nnx.Module):
    """x @ (W * mask) + b: a dense layer whose connections are restricted by a fixed 0/1 mask."""

    def __init__(self, mask: np.ndarray, rngs: nnx.Rngs):
        self.mask = nnx.Variable(jnp.asarray(mask, F32))
        self.kernel = nnx.Param(nnx.initializers.lecun_normal()(rngs.params(), mask.shape, F32))
        self.bias = nnx.Param(jnp.zeros(mask.shape[1], F32))

    def __call__(self, x):
        return x @ (self.kernel[...] * self.mask[...]) + self.bias[...]


def made_masks(pixels: int, hidden: int, layers: int, rng: np.random.Generator):
    """MADE masks (Germain et al. 2015) for the raster order: inputs have degree 1..D, hidden units a
    random degree in 1..D-1; hidden unit k sees what unit j of the layer below sees iff
    deg(k) >= deg(j), and output i sees hidden unit k iff i > deg(k), so logit_i depends on x_{<i}
    only. Also the strictly lower-triangular mask of the direct path x_{<i} -> logit_i."""
    degrees = [np.arange(1, pixels + 1)] + [rng.integers(1, pixels, size=hidden) for _ in range(layers)]
    hidden_masks = [(degrees[i + 1][None, :] >= degrees[i][:, None]) for i in range(layers)]
    output = degrees[0][None, :] > degrees[-1][:, None]
    direct = degrees[0][None, :] > degrees[0][:, None]
    return [m.astype(np.float32) for m in hidden_masks], output.astype(np.float32), direct.astype(np.float32)


class Encoder(nnx.Module):
    def __init__(self, latent: int, hidden: int, rngs: nnx.Rngs):
        self.hidden = nnx.List([nnx.Linear(PIXELS, hidden, rngs=rngs), nnx.Linear(hidden, hidden, rngs=rngs)])
        self.out = nnx.Linear(hidden, 2 * latent, rngs=rngs)

    def __call__(self, x):
        for layer in self.hidden:
            x = jax.nn.relu(layer(x))
        mean, log_variance = jnp.split(self.out(x), 2, axis=-1)
        return mean, log_variance


class MLPDecoder(nnx.Module):
    """(a): logits from z alone."""

    def __init__(self, latent: int, hidden: int, rngs: nnx.Rngs):
        self.hidden = nnx.List([nnx.Linear(latent, hidden, rngs=rngs), nnx.Linear(hidden, hidden, rngs=rngs)])
        self.out = nnx.Linear(hidden, PIXELS, rngs=rngs)

    def __call__(self, z, x):
        for layer in self.hidden:
            z = jax.nn.relu(layer(z))
        return self.out(z)


class MADEDecoder(nnx.Module):
    """(b)-(e): logit_i = MADE(x_{<i}, z) + direct(x_{<i}); z enters the first hidden layer, or with
    `z_everywhere` every hidden layer and the logits."""

    def __init__(self, latent: int, hidden: int, layers: int, z_everywhere: bool, rngs: nnx.Rngs, seed: int):
        masks, output, direct = made_masks(PIXELS, hidden, layers, np.random.default_rng(seed))
        self.hidden = nnx.List([MaskedLinear(m, rngs) for m in masks])
        self.out, self.direct = MaskedLinear(output, rngs), MaskedLinear(direct, rngs)
        sizes = [hidden] * layers + [PIXELS] if z_everywhere else [hidden]
        self.from_z = nnx.List([nnx.Linear(latent, s, use_bias=False, rngs=rngs) for s in sizes])

    def __call__(self, z, x):
        h = x
        for i, layer in enumerate(self.hidden):
            h = layer(h)
            if i < len(self.from_z):
                h = h + self.from_z[i](z)
            h = jax.nn.relu(h)
        logits = self.out(h) + self.direct(x)
        if len(self.from_z) > len(self.hidden):
            logits = logits + self.from_z[-1](z)
        return logits


class VAE(nnx.Module):
    def __init__(self, decoder: str, cfg: Config, rngs: nnx.Rngs):
        self.encoder = Encoder(cfg.latent, cfg.hidden, rngs)
        if decoder == "mlp":
            self.decoder = MLPDecoder(cfg.latent, cfg.hidden, rngs)
        else:
            layers = 2 if decoder == "ar_shallow" else cfg.ar_layers
            self.decoder = MADEDecoder(cfg.latent, cfg.hidden, layers, decoder == "skip", rngs, cfg.seed)

    def terms(self, x, key):
        """Per image: (log p(x|z) at one z ~ q(z|x), KL(q(z|x) || N(0, I)), mean, log-variance)."""
        mean, log_variance = self.encoder(x)
        z = mean + jnp.exp(0.5 * log_variance) * jax.random.normal(key, mean.shape, mean.dtype)
        log_likelihood = -optax.sigmoid_binary_cross_entropy(self.decoder(z, x), x).sum(-1)
        kl = 0.5 * jnp.sum(mean**2 + jnp.exp(log_variance) - 1.0 - log_variance, -1)
        return log_likelihood, kl, mean, log_variance


def negative_elbo(anneal_steps: float):
    """The training loss, -E_q log p(x|z) + beta KL, beta = min(1, step / anneal_steps) (1 if 0)."""

    def loss(model, x, y, key, step):
        log_likelihood, kl, _, _ = model.terms(x, key)
        beta = jnp.minimum(1.0, step / anneal_steps) if anneal_steps else 1.0
        return jnp.mean(-log_likelihood + beta * kl), {"reconstruction": log_likelihood.mean(), "kl": kl.mean()}

    return loss


def gaussian_log_density(z, mean, log_variance):
    return -0.5 * jnp.sum(np.log(2 * np.pi) + log_variance + (z - mean) ** 2 / jnp.exp(log_variance), -1)


def mutual_information(model: VAE, x: np.ndarray, key) -> float:
    """I(x; z) under q = E_n E_{z ~ q(z|x_n)} [log q(z|x_n) - log (1/N) sum_m q(z|x_m)], one z per x_n."""
    return float(_mutual_information(model.encoder, jnp.asarray(x), key))


@nnx.jit  # compiled once per encoder structure and data shape: every decoder's encoder shares it
def _mutual_information(encoder: nnx.Module, x: jax.Array, key) -> jax.Array:
    mean, log_variance = encoder(x)
    z = mean + jnp.exp(0.5 * log_variance) * jax.random.normal(key, mean.shape, mean.dtype)
    pairwise = jax.vmap(lambda zn: gaussian_log_density(zn, mean, log_variance))(z)  # (n, m): log q(z_n|x_m)
    aggregate = jax.nn.logsumexp(pairwise, axis=1) - np.log(len(x))
    return jnp.mean(jnp.diagonal(pairwise) - aggregate)


@nnx.jit
def _terms(model: VAE, x: jax.Array, key):
    return model.terms(x, key)


def evaluate(model: VAE, cfg: Config, x_test: np.ndarray, x_train: np.ndarray, key) -> dict:
    keys = jax.random.split(key, cfg.samples + 1)
    samples = [_terms(model, jnp.asarray(x_test), k) for k in keys[:-1]]
    reconstruction = float(np.mean([s[0].mean() for s in samples]))
    _, kl, mean, _ = samples[0]
    unit_activity = np.asarray(jnp.var(mean, axis=0))
    return {"elbo": reconstruction - float(kl.mean()), "reconstruction": reconstruction, "kl": float(kl.mean()),
            "active_units": int(np.sum(unit_activity > cfg.active_threshold)), "unit_activity": unit_activity,
            "mutual_information": mutual_information(model, x_train, keys[-1])}


def plot(cfg: Config, results: dict, histories: dict) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 4.4))
    for name in results:
        axes[0].plot([r["epoch"] for r in histories[name]], [r["kl"] for r in histories[name]], label=DECODERS[name])
    axes[0].set(xlabel="epoch", ylabel="KL(q(z|x) || p(z)) (nats, training batches)",
                title="KL during training (dotted: 0.5 nats)")
    axes[0].axhline(0.5, color="0.5", ls=":", lw=0.8)
    axes[0].legend(fontsize=8)
    names = list(results)
    positions = np.arange(len(names))
    for offset, key, label in ((-0.2, "kl", "KL (nats)"), (0.0, "mutual_information", "I(x; z) under q (nats)"),
                               (0.2, "active_units", "active units")):
        bars = axes[1].bar(positions + offset, [results[n][key] for n in names], width=0.2, label=label)
        axes[1].bar_label(bars, fmt="%.2g", fontsize=6)
    axes[1].set_xticks(positions, [n.split(")")[0] + ")" for n in map(DECODERS.get, names)])
    axes[1].set(title=f"test set; MI at most log N = {np.log(1437):.2f} (training images)")
    axes[1].legend(fontsize=8)
    for name in names:
        axes[2].semilogy(np.arange(1, cfg.latent + 1), np.maximum(results[name]["unit_activity"], 1e-8), "o-",
                         label=DECODERS[name].split(" ")[0])
    axes[2].axhline(cfg.active_threshold, color="k", ls="--", lw=0.8, label="active threshold")
    axes[2].set(xlabel="latent unit", ylabel="Cov_x(E_q[z_u])", title="activity per latent unit (Burda et al.)")
    axes[2].legend(fontsize=8)
    fig.suptitle(f"VAE on binarised 8x8 digits, latent {cfg.latent}, MADE decoders with {cfg.ar_layers} hidden layers")
    save_figure(cfg, fig, "vae_collapse")


def run(cfg: Config) -> dict:
    if not 0 <= cfg.anneal_fraction <= 1:
        raise ValueError(f"anneal_fraction: expected a value in [0, 1], found {cfg.anneal_fraction}")
    if not {"mlp", "ar", "skip"} <= set(cfg.decoders) <= set(DECODERS):
        raise ValueError(f"decoders: expected mlp, ar, skip and any of {tuple(DECODERS)}, found {cfg.decoders}")
    data = load_dataset("digits")
    binarise = lambda images: (images.reshape(len(images), -1) > 0.5).astype(np.float32)  # noqa: E731
    x_train, x_test = binarise(data.x_train), binarise(data.x_test)
    steps = cfg.epochs * (len(x_train) // cfg.batch_size)
    results, histories = {}, {}
    for name in tqdm(cfg.decoders, desc="decoders"):
        model = compiled_init(lambda: VAE(name, cfg, nnx.Rngs(cfg.seed)))
        anneal = cfg.anneal_fraction * steps if name == "ar_annealed" else 0.0
        histories[name] = fit(model, negative_elbo(anneal), x_train, np.zeros(len(x_train), np.int32),
                              epochs=cfg.epochs, batch_size=cfg.batch_size, tx=optax.adam(cfg.learning_rate),
                              seed=cfg.seed, desc=name)
        results[name] = evaluate(model, cfg, x_test, x_train, jax.random.key(cfg.seed + 1))
    plot(cfg, results, histories)

    a, b, c = (results[n] for n in ("mlp", "ar", "skip"))
    collapses = b["kl"] < 0.5 and b["active_units"] <= 1 and a["kl"] >= 5
    skip_helps = c["kl"] > b["kl"] and c["active_units"] > b["active_units"]
    fmt = lambda r: f"KL {r['kl']:.2f}, MI {r['mutual_information']:.2f}, AU {r['active_units']}"  # noqa: E731
    measured = (f"test nats per image, (a) MLP decoder: {fmt(a)}; (b) MADE with direct input path, z in layer 1 of "
                f"{cfg.ar_layers}: {fmt(b)}; (c) skip-VAE, z in every layer: {fmt(c)}")
    verdict = ("confirmed, with a condition: the latent is ignored when its path through the decoder is long and the "
               "input's short; z in every layer (skip-VAE) restores it")
    if "ar_annealed" in results:
        d = results["ar_annealed"]
        measured += f"; (b) with KL annealing: {fmt(d)}"
        verdict += (", KL annealing only partly" if d["kl"] < 0.5 * c["kl"] else ", and so does KL annealing")
    if "ar_shallow" in results:
        measured += f"; (b) with 2 hidden layers: {fmt(results['ar_shallow'])}"
        if results["ar_shallow"]["kl"] > 0.5:
            verdict += "; with 2 hidden layers the same decoder keeps its latent"
    measured += f"; ELBO (a) {a['elbo']:.2f}, (b) {b['elbo']:.2f}, (c) {c['elbo']:.2f}"
    claims = [{"id": "C5", "claim": "skips can cause posterior collapse in a VAE: a decoder with a direct path from "
                                    "the input ignores the latent",
               "source_figure": "KL term / mutual information with and without the skip",
               "measured": measured, "verdict": verdict if collapses and skip_helps else "refuted"}]
    headline = {name: {k: r[k] for k in ("elbo", "kl", "mutual_information", "active_units")}
                for name, r in results.items()}
    return {"headline": headline, "claims": claims, "models": results,
            "history": {name: [{"epoch": r["epoch"], "kl": r["kl"], "reconstruction": r["reconstruction"]}
                               for r in h] for name, h in histories.items()}}


if __name__ == "__main__":
    main(__name__, Config, run, QUICK)
