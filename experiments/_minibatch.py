"""Minibatch training of small nnx models for the trust experiments (C5, D2, D3).

`fit` steps `neuralode.train_step.make_train_step` over shuffled equal-size minibatches (the last
partial batch of each epoch is dropped, so every step has one shape and the step compiles once),
one jitted call per step (a `lax.scan` over an epoch would save the dispatch, but XLA's CPU
convolutions run about ten times slower inside a loop body). The loss is
`loss_fn(model, x, y, key, step) -> (loss, metrics)`: `key` is a fresh PRNG key per step (a VAE's
reparameterisation noise) and `step` the step number from 0 (a KL-annealing schedule). Variables
other than `nnx.Param` that the forward pass changes (the power-iteration vectors of spectral
normalisation) are carried from step to step.
"""
from __future__ import annotations

from typing import Callable

import jax
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from neuralode.train_step import make_train_state, make_train_step


def fit(model: nnx.Module, loss_fn: Callable, x: np.ndarray, y: np.ndarray, *, epochs: int,
        batch_size: int, tx: optax.GradientTransformation, seed: int, desc: str = "training",
        on_epoch: Callable[[int, nnx.Module], dict] | None = None) -> list[dict]:
    """Train `model` in place; returns one record per epoch (the mean training metrics, plus what
    `on_epoch(epoch, model)` returns, e.g. validation numbers). Batch order and keys come from `seed`."""
    if not 1 <= batch_size <= len(x):
        raise ValueError(f"batch_size: expected 1..{len(x)} (the number of examples), found {batch_size}")
    graphdef, state = make_train_state(model, tx)
    step = make_train_step(graphdef, lambda m, x, y, key, t: loss_fn(m, x, y, jax.random.fold_in(key, t), t))
    rng, key = np.random.default_rng(seed), jax.random.key(seed)  # batch order; loss noise
    steps = len(x) // batch_size
    history = []
    for epoch in tqdm(range(epochs), desc=desc, leave=False):
        order = rng.permutation(len(x))[: steps * batch_size].reshape(steps, batch_size)
        metrics = []
        for i, index in enumerate(order):
            state, m = step(state, x[index], y[index], key, np.int32(epoch * steps + i))
            metrics.append(m)
        metrics = jax.device_get(metrics)
        record = {"epoch": epoch + 1, **{k: float(np.mean([m[k] for m in metrics])) for k in metrics[0]}}
        if on_epoch is not None:
            nnx.update(model, state["model"])
            record.update(on_epoch(epoch + 1, model))
        history.append(record)
    nnx.update(model, state["model"])
    return history
