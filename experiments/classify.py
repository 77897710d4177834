"""Train one classifier of `neuralode.models` on digits, MNIST-1D or local MNIST.

    python -m experiments.classify --dataset {digits,mnist1d,mnist} \\
        --model {resnet,plainnet,rknet,odenet} [--augment-channels K] [--mnist-dir DIR] \\
        [--quick] [--out DIR] [--resume]

Every model is the same stem / stages / transitions / head around one `ConvField`: Euler steps of a
depth-varying stack (resnet), the same without the identity (plainnet), fixed Runge-Kutta steps of
a weight-tied time-conditioned field (rknet), or that field integrated adaptively (odenet; Chen et
al. 2018), ANODE with `--augment-channels K` > 0 (Dupont et al. 2019), RNODE-regularised with
`--kinetic-weight` / `--jacobian-weight` > 0 (Finlay et al. 2020). The model settings are a
`neuralode.models.ModelSpec`, saved with every checkpoint. Training runs in
`<out>/classify_<dataset>_<model>/` (metrics.jsonl, orbax checkpoints; `--resume` continues it);
results go to `<out>/classify.json` and the curves to `<out>/classify_<dataset>_<model>.png`.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from experiments.common import flag, flag_like, main, plot_history, resume_or_clear
from neuralode.data import DATASET_NAMES, Dataset, load_dataset
from neuralode.measure import count_params, forward_stats
from neuralode.models import ModelSpec, build_model
from neuralode.train import TrainConfig, classification_loss, read_metrics, train


@dataclasses.dataclass
class Config:
    out: str = flag("results", "directory of the JSON, the figures and the training run")
    quick: bool = flag(False, "small and short: the QUICK settings (explicit flags still win)")
    resume: bool = flag(False, "continue the run in <out>/classify_<dataset>_<model>/ from its "
                               "newest checkpoint (refused if a setting changed)")
    dataset: str = flag("digits", "data set", choices=DATASET_NAMES)
    mnist_dir: str = flag("", "directory of the MNIST IDX files (needed for --dataset mnist)")
    # The model: the fields of neuralode.models.ModelSpec, same names, defaults and help.
    model: str = flag_like(ModelSpec, "model")
    channels: tuple[int, ...] = flag_like(ModelSpec, "channels")
    blocks: int = flag_like(ModelSpec, "blocks")
    steps: int = flag_like(ModelSpec, "steps")
    solver: str = flag_like(ModelSpec, "solver")
    adjoint: str = flag_like(ModelSpec, "adjoint")
    rtol: float = flag_like(ModelSpec, "rtol")
    atol: float = flag_like(ModelSpec, "atol")
    kinetic_weight: float = flag_like(ModelSpec, "kinetic_weight")
    jacobian_weight: float = flag_like(ModelSpec, "jacobian_weight")
    augment_channels: int = flag_like(ModelSpec, "augment_channels")
    stem_kernel_size: int = flag_like(ModelSpec, "stem_kernel_size")
    norm: bool = flag_like(ModelSpec, "norm")
    seed: int = flag(0, "seed of the initial parameters, of RNODE's noise and of the batch order")
    # Training: the fields of neuralode.train.TrainConfig that this experiment sets.
    epochs: int = flag(30, "passes over the training split")
    batch_size: int = flag(128, "examples per training step (and of the NFE measurement)")
    learning_rate: float = flag(3e-3, "peak learning rate of AdamW (cosine schedule)")
    weight_decay: float = flag(1e-4, "AdamW weight decay")
    augment_shift: int = flag(1, "random translations of up to this many pixels (samples) in "
                                 "training")
    checkpoint_every: int = flag(100, "training steps between checkpoints (and at every epoch's "
                                      "end); changing it does not prevent --resume")
    progress: bool = flag(True, "show a progress bar while training")


QUICK = {"channels": (8, 16), "blocks": 2, "epochs": 10, "batch_size": 64, "rtol": 1e-2,
         "atol": 1e-2, "learning_rate": 1e-2, "progress": False}


def model_spec(cfg: Config) -> ModelSpec:
    return ModelSpec(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(ModelSpec)})


def train_config(cfg: Config) -> TrainConfig:
    return TrainConfig(epochs=cfg.epochs, batch_size=cfg.batch_size,
                       learning_rate=cfg.learning_rate, weight_decay=cfg.weight_decay,
                       augment_shift=cfg.augment_shift, seed=cfg.seed,
                       checkpoint_every=cfg.checkpoint_every, progress=cfg.progress)


def load(cfg: Config) -> Dataset:
    if cfg.dataset == "mnist" and not cfg.mnist_dir:
        raise SystemExit("--dataset mnist needs --mnist-dir DIR, a local directory holding "
                         "train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte "
                         "and t10k-labels-idx1-ubyte (raw or .gz); nothing is downloaded")
    return load_dataset(cfg.dataset, cfg.mnist_dir or None)


def run(cfg: Config) -> dict:
    spec, dataset = model_spec(cfg), load(cfg)
    name = f"classify_{cfg.dataset}_{cfg.model}"
    workdir = Path(cfg.out) / name
    model = build_model(spec, dataset)
    last = train(model, dataset, train_config(cfg), workdir, resume=resume_or_clear(workdir, cfg.resume),
                 loss_fn=classification_loss, model_config=dataclasses.asdict(spec))
    history = read_metrics(workdir)
    figure = plot_history(cfg, history, f"{cfg.model} on {cfg.dataset}", name)
    stats = forward_stats(model, dataset.x_test[:cfg.batch_size])
    results = {"test_acc": last["test_accuracy"], "params": count_params(model),
               "nfe_forward": stats["nfe"], "nfe_backward": stats.get("nfe_backward"),
               "train_s": last["train_seconds"]}
    headline = {k: results[k] for k in ("test_acc", "params", "nfe_forward", "train_s")}
    return {"headline": {"dataset": cfg.dataset, "model": cfg.model, **headline}, **results,
            "epochs": last["epoch"], "workdir": str(workdir), "figure": str(figure),
            "history": history}


if __name__ == "__main__":
    main(__name__, Config, run, QUICK)
