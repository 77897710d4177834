"""A tiny, fully determined training run, shared by test_train.py in-process and in subprocesses.

`python tests/train_script.py WORKDIR {fresh,resume} [HIDDEN]` trains, then writes the final
parameters to WORKDIR/final_params.npz. The model has Dropout, so its RNG stream must survive a
resume too. HIDDEN (default 32) is the hidden width: another one is another architecture.
"""

import os
import sys

import jax

jax.config.update("jax_enable_x64", True)  # as tests/conftest.py, so both runs compute alike

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from neuralode.data import Dataset  # noqa: E402
from neuralode.train import TrainConfig, train  # noqa: E402

CONFIG = TrainConfig(epochs=4, batch_size=16, learning_rate=1e-2, weight_decay=1e-3, seed=1,
                     checkpoint_every=7, keep_checkpoints=2, progress=False)


class MLP(nnx.Module):
    """Flatten, dense + ReLU + dropout, dense to logits."""

    def __init__(self, din: int, hidden: int, num_classes: int, *, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(din, hidden, param_dtype=jnp.float64, rngs=rngs)
        self.dropout = nnx.Dropout(0.1, rngs=rngs)
        self.out = nnx.Linear(hidden, num_classes, param_dtype=jnp.float64, rngs=rngs)

    def __call__(self, x):
        return self.out(self.dropout(nnx.relu(self.hidden(x.reshape(x.shape[0], -1)))))


def tiny_dataset() -> Dataset:
    """Four Gaussian blobs in 8 dimensions, as length-8 one-channel sequences: 160 train, 40 test."""
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(4, 8))
    y = rng.integers(0, 4, 200).astype(np.int32)
    x = (centers[y] + 0.7 * rng.normal(size=(200, 8))).astype(np.float32)[..., None]
    return Dataset(x[:160], y[:160], x[160:], y[160:], 4, "blobs")


def make_model(seed: int = 0, hidden: int = 32) -> MLP:
    return MLP(8, hidden, 4, rngs=nnx.Rngs(seed))


def flat_params(model: nnx.Module) -> dict[str, np.ndarray]:
    leaves = jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param))[0]
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in leaves}


def run(workdir: str, resume: bool = False, config: TrainConfig = CONFIG, hidden: int = 32) -> MLP:
    model = make_model(hidden=hidden)
    train(model, tiny_dataset(), config, workdir, resume=resume)
    return model


if __name__ == "__main__":
    workdir, mode, *hidden = sys.argv[1:]
    model = run(workdir, resume=mode == "resume", hidden=int(hidden[0]) if hidden else 32)
    np.savez(os.path.join(workdir, "final_params.npz"), **flat_params(model))
