"""Train one classifier of `neuralode.models` on digits, MNIST-1D or local MNIST.

    python -m experiments.classify --dataset {digits,mnist1d,mnist} \\
        --model {resnet,plainnet,rknet,odenet,anode} [--mnist-dir DIR] [--quick] [--out DIR] \\
        [--resume]

Every model is the same stem / stages / transitions / head around one `ConvField`: Euler steps of a
depth-varying stack (ResNet), the same without the identity (PlainNet), RK4 steps of a weight-tied
time-conditioned field (RK-Net), or that field integrated adaptively (ODE-Net, ANODE; Chen et al.
2018, Dupont et al. 2019), optionally RNODE-regularised (Finlay et al. 2020). Training runs in
`<out>/classify_<dataset>_<model>/` (metrics.jsonl, orbax checkpoints; `--resume` continues it);
results go to `<out>/classify.json` and the curves to `<out>/classify_<dataset>_<model>.png`.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from experiments.common import main, save_figure
from neuralode.adjoints import BacksolveAdjoint, CheckpointAdjoint
from neuralode.data import DATASET_NAMES, Dataset, load_dataset
from neuralode.models import AugmentedODENet, ODENet, PlainNet, ResNet, RKNet
from neuralode.solvers import Dopri5, Tsit5
from neuralode.train import TrainConfig, classification_loss, train

MODELS = ("resnet", "plainnet", "rknet", "odenet", "anode")
ADJOINTS = {"backsolve": BacksolveAdjoint, "checkpoint": CheckpointAdjoint}
SOLVERS = {"dopri5": Dopri5, "tsit5": Tsit5}


def _choice(default, choices, help_text):
    return dataclasses.field(default=default, metadata={"choices": choices, "help": help_text})


@dataclasses.dataclass
class Config:
    out: str = "results"
    quick: bool = False
    resume: bool = False
    dataset: str = _choice("digits", DATASET_NAMES, "data set")
    model: str = _choice("resnet", MODELS, "model")
    mnist_dir: str = dataclasses.field(default="", metadata={
        "help": "directory of the MNIST IDX files (needed for --dataset mnist)"})
    channels: tuple[int, ...] = (32, 64)
    blocks: int = 3  # residual blocks per stage (resnet, plainnet)
    rk_steps: int = 1  # RK4 steps per stage (rknet)
    stem_kernel_size: int = 3
    norm: bool = True  # GroupNorm in the fields
    solver: str = _choice("dopri5", tuple(SOLVERS), "adaptive solver (odenet, anode)")
    adjoint: str = _choice("backsolve", tuple(ADJOINTS), "gradient of the ODE solve")
    rtol: float = 1e-3
    atol: float = 1e-3
    augment_channels: int = 8  # anode
    kinetic_weight: float = 0.0  # RNODE (odenet, anode)
    jacobian_weight: float = 0.0
    epochs: int = 30
    batch_size: int = 128
    learning_rate: float = 3e-3
    weight_decay: float = 1e-4
    augment_shift: int = 1  # random translations of up to this many pixels (samples) in training
    seed: int = 0
    progress: bool = True


QUICK = {"channels": (8, 16), "blocks": 2, "epochs": 10, "batch_size": 64, "rtol": 1e-2,
         "atol": 1e-2, "learning_rate": 1e-2, "progress": False}


def build_model(cfg: Config, dataset: Dataset) -> nnx.Module:
    """The classifier `cfg.model` for the inputs of `dataset` (1-D convs for NWC, 2-D for NHWC)."""
    common = dict(channels=tuple(cfg.channels), spatial_dims=dataset.x_train.ndim - 2,
                  stem_kernel_size=cfg.stem_kernel_size, norm=cfg.norm,
                  rngs=nnx.Rngs(cfg.seed))
    in_channels, classes = dataset.x_train.shape[-1], dataset.num_classes
    if cfg.model in ("resnet", "plainnet"):
        cls = ResNet if cfg.model == "resnet" else PlainNet
        return cls(in_channels, classes, blocks=cfg.blocks, **common)
    if cfg.model == "rknet":
        return RKNet(in_channels, classes, steps=cfg.rk_steps, **common)
    if cfg.model in ("odenet", "anode"):
        ode = dict(solver=SOLVERS[cfg.solver](), adjoint=ADJOINTS[cfg.adjoint](), rtol=cfg.rtol,
                   atol=cfg.atol, kinetic_weight=cfg.kinetic_weight,
                   jacobian_weight=cfg.jacobian_weight, seed=cfg.seed)
        if cfg.model == "anode":
            return AugmentedODENet(in_channels, classes, augment_channels=cfg.augment_channels,
                                   **ode, **common)
        return ODENet(in_channels, classes, **ode, **common)
    raise ValueError(f"model: unknown {cfg.model!r}, expected one of {MODELS}")


def count_params(model: nnx.Module) -> int:
    return int(sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param))))


def forward_stats(model: nnx.Module, x: np.ndarray) -> dict[str, float]:
    """The statistics of one evaluation-mode forward pass over the batch `x`: `nfe` (field
    evaluations of all stages) and, for the fixed-step models, `nfe_backward` (those of backprop)."""
    model.eval()
    return {k: float(v) for k, v in _forward_stats(model, x).items()}


@nnx.jit
def _forward_stats(model: nnx.Module, x):  # one function, so equal models share its compilation
    return model.forward(x)[1]


def load(cfg: Config) -> Dataset:
    if cfg.dataset == "mnist" and not cfg.mnist_dir:
        raise SystemExit("--dataset mnist needs --mnist-dir DIR, a local directory holding "
                         "train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte "
                         "and t10k-labels-idx1-ubyte (raw or .gz); nothing is downloaded")
    return load_dataset(cfg.dataset, cfg.mnist_dir or None)


def train_config(cfg: Config) -> TrainConfig:
    return TrainConfig(epochs=cfg.epochs, batch_size=cfg.batch_size,
                       learning_rate=cfg.learning_rate, weight_decay=cfg.weight_decay,
                       augment_shift=cfg.augment_shift, seed=cfg.seed, progress=cfg.progress)


def model_config(cfg: Config) -> dict:
    """The settings of `cfg` that `train_config` leaves out and that change the numbers: the
    model's and its loss's (a resumed run must keep them)."""
    left_out = {"out", "quick", "resume", "mnist_dir", "progress", *dataclasses.asdict(train_config(cfg))}
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in left_out}


def plot_history(cfg: Config, history: list[dict], name: str) -> Path:
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in history]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for split in ("train", "test"):
        axes[0].plot(epochs, [r[f"{split}_cross_entropy"] for r in history], label=split)
        axes[1].plot(epochs, [100 * r[f"{split}_accuracy"] for r in history], label=split)
    axes[0].set(xlabel="epoch", ylabel="cross-entropy", yscale="log")
    axes[1].set(xlabel="epoch", ylabel="accuracy (%)")
    for ax in axes:
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle(f"{cfg.model} on {cfg.dataset}")
    return save_figure(cfg, fig, name)


def train_one(cfg: Config, dataset: Dataset, name: str | None = None) -> tuple[nnx.Module, dict]:
    """Build and train `cfg.model` in `<out>/<name>/` (default `classify_<dataset>_<model>`);
    return the model and its results (test accuracy, parameters, forward NFE, backward NFE of the
    fixed-step models (None for the adaptive ones: counted by experiments.table), training time,
    per-epoch history)."""
    from neuralode.train import read_metrics

    model = build_model(cfg, dataset)
    name = name or f"classify_{cfg.dataset}_{cfg.model}"
    workdir = Path(cfg.out) / name
    last = train(model, dataset, train_config(cfg), workdir, resume=cfg.resume,
                 loss_fn=classification_loss, model_config=model_config(cfg))
    history = read_metrics(workdir)
    figure = plot_history(cfg, history, name)
    stats = forward_stats(model, dataset.x_test[:cfg.batch_size])
    results = {"test_acc": last["test_accuracy"], "params": count_params(model),
               "nfe_forward": stats["nfe"], "nfe_backward": stats.get("nfe_backward"),
               "train_s": last["train_seconds"],
               "epochs": last["epoch"], "workdir": str(workdir), "figure": str(figure),
               "history": history}
    return model, results


def run(cfg: Config) -> dict:
    dataset = load(cfg)
    _, results = train_one(cfg, dataset)
    headline = {k: results[k] for k in ("test_acc", "params", "nfe_forward", "train_s")}
    return {"headline": {"dataset": cfg.dataset, "model": cfg.model, **headline}, **results}


if __name__ == "__main__":
    main(__name__, Config, run, QUICK)
