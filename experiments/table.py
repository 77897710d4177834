"""Chen et al. 2018 (Neural ODEs), Table 1, on offline data: every model on digits and MNIST-1D.

    python -m experiments.table [--quick] [--out DIR] [--resume]

Rows (each a `neuralode.models.ModelSpec`): ResNet (Euler steps of a depth-varying field), PlainNet
(no identity path), RK-Net (RK4 steps of a weight-tied field, backprop), ODE-Net (adaptive Dopri5,
continuous adjoint), ANODE (the ODE-Net with `augment_channels` zero channels; Dupont et al. 2019)
and RNODE (ODE-Net with the kinetic + Jacobian regulariser of Finlay et al.
2020). RNODE is compared with an unregularised ODE-Net trained and evaluated at the same, tighter
tolerance `rnode_rtol` (row `odenet_tight`): at the table's rtol 1e-3 an ODE-Net already takes
about the fewest steps the controller allows (44 NFE at rtol 1e-1, 56 at 1e-3), so there is nothing
for a regulariser to save. Columns: test error, parameters, compiled temporary memory of the
gradient function (`jax.jit(grad).lower(...).compile().memory_analysis().temp_size_in_bytes`, one
batch), forward and backward NFE, training time (all measured with `neuralode.measure`). Backward
NFE of the adaptive models are counted, not modelled (`counted_nfe`: every call of the field in one
gradient evaluation fires a `jax.debug.callback`; the forward calls of the same loss are
subtracted). Fixed-step models report `solve(...).stats`.

Memory against depth (the O(L) vs O(1) column of Table 1): the same gradient memory for untrained
models on the first dataset, ResNet with 1..16 blocks per stage, RK-Net with 1..16 RK4 steps and
ODE-Net (continuous adjoint) with rtol tightened from 1e-1 to 1e-6, against forward NFE.

Tolerance sweep (where both RNODE and its twin were trained): the two trained nets evaluated at
every rtol = atol of `sweep_rtols`, test accuracy and forward NFE, to see whether the regularised
flow is cheaper at every tolerance or only at the one it was trained at (each evaluation a model
rebuilt from the changed spec, holding the trained parameters: `neuralode.models.rebuild`); and
their fields stepped by fixed-step solvers (Euler, Midpoint, RK4 with `fixed_steps` steps per stage:
an RK-Net holding the ODE-Net's parameters), where no error estimate or step-size controller sets a floor on the
NFE. The NFE ratio at equal accuracy: at the best accuracy both nets reach, the NFE of the
cheapest ODE-Net evaluation at least that accurate over RNODE's, among the tolerances
(`equal_accuracy`) and among all evaluations (`equal_accuracy_any_solver`); and the whole trade:
each net's cheapest evaluation at every accuracy on either one's Pareto front (`nfe_to_reach`).

Writes `DIR/table.json` ({dataset: {model: {test_acc, params, grad_memory_bytes, nfe_forward,
nfe_backward, train_s}}, "memory_vs_depth": {model: [rows]}, "rnode_sweep": {dataset: ...}}),
`DIR/table.md`, `DIR/table_memory.png`, `DIR/table_rnode_<dataset>.png`, and each run's workdir
and curves under DIR (`DIR/table_<dataset>_<row>/`, `DIR/table_<dataset>_<row>.png`); the markdown
and the figures are written by `experiments._table_report`.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import jax.numpy as jnp
from flax import nnx

from experiments._table_report import (AT_RNODE_RTOL, LABELS, markdown, memory_markdown,
                                       plot_memory, plot_sweep, sweep_markdown)
from experiments.common import flag, flag_like, main, plot_history, resume_or_clear, write_json
from neuralode.data import Dataset, load_dataset
from neuralode.measure import (accuracy, cheapest, count_params, counted_nfe, forward_stats,
                               gradient_memory_bytes, pareto_front)
from neuralode.models import ModelSpec, build_model, rebuild
from neuralode.models.spec import RUNGE_KUTTA
from neuralode.train import TrainConfig, classification_loss, read_metrics, train

MODELS = ("resnet", "plainnet", "rknet", "odenet", "anode", "odenet_tight", "rnode")
ROW_MODEL = {"anode": "odenet", "odenet_tight": "odenet", "rnode": "odenet"}  # else the row's name
ADAPTIVE = ("odenet", "anode", "odenet_tight", "rnode")


@dataclasses.dataclass
class Config:
    out: str = flag("results", "directory of table.json, table.md, the figures and the runs")
    quick: bool = flag(False, "small and short: the QUICK settings (explicit flags still win)")
    resume: bool = flag(False, "continue every row's run from its newest checkpoint where it has "
                               "one (refused if a setting changed)")
    datasets: tuple[str, ...] = flag(("digits", "mnist1d"), "data sets (digits, mnist1d)")
    models: tuple[str, ...] = flag(MODELS, "rows: resnet, plainnet, rknet, odenet, anode (odenet "
                                   "with augment_channels), odenet_tight (odenet at rnode_rtol), "
                                   "rnode (odenet_tight with the RNODE regulariser)")
    channels: tuple[int, ...] = flag_like(ModelSpec, "channels")
    blocks: int = flag_like(ModelSpec, "blocks")
    norm: bool = flag_like(ModelSpec, "norm", help="GroupNorm in the fields (as Chen et al.'s "
                                                   "ODE-Net)")
    augment_shift: int = flag(1, "random shifts of up to this many pixels (samples) in training")
    rk_steps: int = flag_like(ModelSpec, "steps", help="RK4 steps per stage of the rknet row")
    rtol: float = flag_like(ModelSpec, "rtol", help="relative tolerance of odenet and anode")
    atol: float = flag_like(ModelSpec, "atol", help="absolute tolerance of odenet and anode")
    augment_channels: int = flag_like(ModelSpec, "augment_channels", default=8,
                                      help="zero channels ANODE adds before every ODE block")
    rnode_rtol: float = flag(1e-5, "rtol = atol of rnode and of its unregularised twin "
                                   "odenet_tight")
    # RNODE's regularisers are sums over all activations (2048 per digit, 1280 per MNIST-1D
    # signal), hence weights far below 0.01. On MNIST-1D 3e-4 / 3e-4 cost 2.3 points of accuracy
    # for the same NFE as 1e-4.
    rnode_kinetic_weight: float = flag(1e-4, "RNODE's weight of the kinetic energy (rnode row)")
    rnode_jacobian_weight: float = flag(1e-4, "RNODE's weight of the Jacobian norm (rnode row)")
    epochs_digits: int = flag(30, "training epochs on digits")
    epochs_mnist1d: int = flag(20, "training epochs on MNIST-1D")
    rnode_epochs_digits: int = flag(30, "training epochs of rnode and odenet_tight on digits")
    rnode_epochs_mnist1d: int = flag(40, "training epochs of rnode and odenet_tight on MNIST-1D "
                                         "(the regularised net still underfits after 20)")
    batch_size: int = flag(128, "examples per training step (and of the forward NFE column)")
    learning_rate: float = flag(3e-3, "peak learning rate of AdamW (cosine schedule)")
    weight_decay: float = flag(1e-4, "AdamW weight decay")
    checkpoint_every: int = flag(100, "training steps between checkpoints (and at every epoch's "
                                      "end); changing it does not prevent --resume")
    measure_batch: int = flag(128, "test examples of the gradient-memory and backward-NFE "
                                   "measurements")
    depths: tuple[int, ...] = flag((1, 2, 4, 8, 16), "memory vs depth: blocks per stage (ResNet) "
                                   "and RK4 steps per stage (RK-Net)")
    memory_rtols: tuple[float, ...] = flag((1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6),
                                           "memory vs depth: the ODE-Net's rtol = atol")
    sweep_rtols: tuple[float, ...] = flag((1e-3, 3e-4, 1e-4, 3e-5, 1e-5, 3e-6, 1e-6, 1e-7),
                                          "the tolerances at which the trained rnode and "
                                          "odenet_tight are evaluated")
    fixed_solvers: tuple[str, ...] = flag(("Euler", "Midpoint", "RK4"), "fixed-step solvers "
                                          f"({', '.join(RUNGE_KUTTA)}) that step their fields")
    fixed_steps: tuple[int, ...] = flag((1, 2, 4, 8), "... with this many steps per stage")
    seed: int = flag(0, "seed of the initial parameters, of RNODE's noise and of the batch order")


QUICK = {"datasets": ("mnist1d",),  # every row, on one dataset: digits as well doubles the time
         "depths": (1, 4), "memory_rtols": (1e-1, 1e-4), "sweep_rtols": (1e-2, 1e-4),
         "fixed_solvers": ("Euler", "RK4"), "fixed_steps": (1, 2),
         "channels": (8, 16), "blocks": 2,
         "epochs_digits": 4, "epochs_mnist1d": 3, "rnode_epochs_digits": 4, "rnode_epochs_mnist1d": 3,
         "rtol": 1e-2, "atol": 1e-2, "rnode_rtol": 1e-3,
         "learning_rate": 1e-2,
         "batch_size": 80}  # 50 full batches an epoch of MNIST-1D's 4000 training examples


def row_spec(cfg: Config, dataset_name: str, row: str) -> ModelSpec:
    """The model of `row` on `dataset_name`."""
    tight, rnode = row in AT_RNODE_RTOL, row == "rnode"
    return ModelSpec(
        model=ROW_MODEL.get(row, row), channels=cfg.channels, blocks=cfg.blocks, steps=cfg.rk_steps,
        rtol=cfg.rnode_rtol if tight else cfg.rtol, atol=cfg.rnode_rtol if tight else cfg.atol,
        kinetic_weight=cfg.rnode_kinetic_weight if rnode else 0.0,
        jacobian_weight=cfg.rnode_jacobian_weight if rnode else 0.0,
        augment_channels=cfg.augment_channels if row == "anode" else 0,
        stem_kernel_size=5 if dataset_name == "mnist1d" else 3, norm=cfg.norm, seed=cfg.seed)


def row_train_config(cfg: Config, dataset_name: str, row: str) -> TrainConfig:
    """How `row` is trained on `dataset_name`."""
    epochs = f"rnode_epochs_{dataset_name}" if row in AT_RNODE_RTOL else f"epochs_{dataset_name}"
    return TrainConfig(epochs=getattr(cfg, epochs), batch_size=cfg.batch_size,
                       learning_rate=cfg.learning_rate, weight_decay=cfg.weight_decay,
                       augment_shift=cfg.augment_shift, seed=cfg.seed,
                       checkpoint_every=cfg.checkpoint_every, progress=False)


def evaluate_row(cfg: Config, dataset_name: str, row: str,
                 dataset: Dataset) -> tuple[dict, nnx.Module]:
    """Train (or resume) one row in `<out>/table_<dataset>_<row>/` and measure it; returns the
    row's numbers and the trained model."""
    name = f"table_{dataset_name}_{row}"
    spec, workdir = row_spec(cfg, dataset_name, row), Path(cfg.out) / name
    model = build_model(spec, dataset)
    last = train(model, dataset, row_train_config(cfg, dataset_name, row), workdir,
                 resume=resume_or_clear(workdir, cfg.resume),
                 loss_fn=classification_loss, model_config=dataclasses.asdict(spec))
    plot_history(cfg, read_metrics(workdir), f"{LABELS[row]} on {dataset_name}", name)
    stats = forward_stats(model, dataset.x_test[:cfg.batch_size])
    x = jnp.asarray(dataset.x_test[:cfg.measure_batch])
    y = jnp.asarray(dataset.y_test[:cfg.measure_batch])
    if row in ADAPTIVE:
        _, nfe_backward = counted_nfe(model, classification_loss, x, y)
    else:
        nfe_backward = int(stats["nfe_backward"])
    numbers = {"test_acc": last["test_accuracy"], "params": count_params(model),
               "grad_memory_bytes": gradient_memory_bytes(model, classification_loss, x, y),
               "nfe_forward": stats["nfe"], "nfe_backward": nfe_backward,
               "train_s": last["train_seconds"]}
    if row in ADAPTIVE:
        numbers["rtol"] = spec.rtol
    print(f"{dataset_name} {row}: {numbers}", flush=True)
    return numbers, model


def _check_sweep_settings(cfg: Config) -> None:
    if len(cfg.sweep_rtols) < 1 or not all(r > 0 for r in cfg.sweep_rtols):
        raise ValueError(f"sweep_rtols: expected positive tolerances, got {cfg.sweep_rtols}")
    unknown = sorted(set(cfg.fixed_solvers) - set(RUNGE_KUTTA))
    if unknown:
        raise ValueError(f"fixed_solvers: unknown {unknown}, expected some of {RUNGE_KUTTA}")
    if not all(isinstance(n, int) and n >= 1 for n in cfg.fixed_steps):
        raise ValueError(f"fixed_steps: expected positive ints, got {cfg.fixed_steps}")


def tolerance_sweep(cfg: Config, dataset: Dataset,
                    trained: dict[str, tuple[ModelSpec, nnx.Module]]) -> dict:
    """Test accuracy and forward NFE (first `batch_size` test examples, the batch of the table's
    NFE column) of the trained adaptive models (`trained[row] = (spec, model)`) evaluated at
    every rtol = atol of `cfg.sweep_rtols` (`rows`) and with their fields stepped by every
    fixed-step solver of `cfg.fixed_solvers` at every number of steps of `cfg.fixed_steps`
    (`fixed_steps`), each a model rebuilt from the changed spec with the trained parameters;
    where both `odenet_tight` and `rnode` are given, their NFE ratio at each tolerance and at
    equal accuracy, over the adaptive evaluations (`equal_accuracy`) and over all of them
    (`equal_accuracy_any_solver`), and the cheapest evaluations along both fronts
    (`nfe_to_reach`)."""
    _check_sweep_settings(cfg)
    x = jnp.asarray(dataset.x_test[:cfg.batch_size])

    def point(spec, model, **setting):
        net = rebuild(model, spec, dataset)
        return {**setting, "test_acc": accuracy(net, dataset.x_test, dataset.y_test),
                "nfe_forward": forward_stats(net, x)["nfe"]}

    rows, fixed = {}, {}
    for name, (spec, model) in trained.items():
        rows[name] = [point(dataclasses.replace(spec, rtol=rtol, atol=rtol), model, rtol=rtol)
                      for rtol in cfg.sweep_rtols]
        fixed[name] = [point(dataclasses.replace(spec, model="rknet", solver=solver, steps=steps),
                             model, solver=solver, steps=steps)
                       for solver in cfg.fixed_solvers for steps in cfg.fixed_steps]
    out = {"rtols": list(cfg.sweep_rtols), "rows": rows, "fixed_steps": fixed}
    if {"odenet_tight", "rnode"} <= set(rows):
        out["nfe_odenet_over_rnode"] = [a["nfe_forward"] / b["nfe_forward"] for a, b in
                                        zip(rows["odenet_tight"], rows["rnode"])]
        out["equal_accuracy"] = equal_accuracy_nfe(rows["odenet_tight"], rows["rnode"])
        every = (rows["odenet_tight"] + fixed["odenet_tight"], rows["rnode"] + fixed["rnode"])
        out["equal_accuracy_any_solver"] = equal_accuracy_nfe(*every)
        out["nfe_to_reach"] = nfe_to_reach(*every)
    return out


def equal_accuracy_nfe(reference: list[dict], regularised: list[dict]) -> dict:
    """Both nets at the best test accuracy both reach among their evaluations (the lower of their
    best): each one's cheapest evaluation at least that accurate, and `ratio`, the reference's NFE
    over the regularised net's, i.e. how many times fewer field evaluations the regularised net
    needs for the same accuracy when each may choose how it is solved."""
    level = min(max(p["test_acc"] for p in reference), max(p["test_acc"] for p in regularised))
    ref, reg = cheapest(reference, level), cheapest(regularised, level)
    return {"test_acc": level, "odenet_tight": ref, "rnode": reg,
            "ratio": ref["nfe_forward"] / reg["nfe_forward"]}


def nfe_to_reach(reference: list[dict], regularised: list[dict]) -> list[dict]:
    """The cost of accuracy for both nets: at every accuracy on either net's Pareto front (an
    evaluation that no other is both as cheap and as accurate as), each net's cheapest evaluation
    at least that accurate (None where it never gets there) and `ratio`, the reference's NFE over
    the regularised net's (None unless both get there)."""
    levels = {p["test_acc"] for p in pareto_front(reference) + pareto_front(regularised)}
    rows = []
    for level in sorted(levels):
        ref, reg = cheapest(reference, level), cheapest(regularised, level)
        rows.append({"test_acc": level, "odenet_tight": ref, "rnode": reg,
                     "ratio": ref["nfe_forward"] / reg["nfe_forward"] if ref and reg else None})
    return rows


def memory_vs_depth(cfg: Config, dataset_name: str, dataset: Dataset,
                    models: tuple[str, ...] = ("resnet", "rknet", "odenet")) -> dict:
    """Gradient memory and forward NFE of untrained `models` as their depth grows (memory depends
    on the shapes and the solver, not on the weights)."""
    unknown = sorted(set(models) - {"resnet", "rknet", "odenet"})
    if unknown or not models:
        raise ValueError(f"models: expected some of ('resnet', 'rknet', 'odenet'), got {models}")
    if len(cfg.depths) < 2 or len(cfg.memory_rtols) < 2:
        raise ValueError(f"depths and memory_rtols need two values or more each, got {cfg.depths} "
                         f"and {cfg.memory_rtols}")
    x = jnp.asarray(dataset.x_test[:cfg.measure_batch])
    y = jnp.asarray(dataset.y_test[:cfg.measure_batch])
    base = row_spec(cfg, dataset_name, "resnet")
    settings = {"resnet": [({"depth": d}, {"blocks": d}) for d in cfg.depths],
                "rknet": [({"depth": d}, {"steps": d}) for d in cfg.depths],
                "odenet": [({"rtol": r}, {"rtol": r, "atol": r}) for r in cfg.memory_rtols]}
    rows = {}
    for name in models:
        rows[name] = []
        for label, options in settings[name]:
            model = build_model(dataclasses.replace(base, model=name, **options), dataset)
            rows[name].append({**label, "nfe_forward": int(forward_stats(model, x)["nfe"]),
                               "grad_memory_bytes": gradient_memory_bytes(
                                   model, classification_loss, x, y)})
    growth = {name: r[-1]["grad_memory_bytes"] / r[0]["grad_memory_bytes"] for name, r in rows.items()}
    nfe_growth = {name: r[-1]["nfe_forward"] / r[0]["nfe_forward"] for name, r in rows.items()}
    print(f"memory vs depth ({dataset_name}): memory grows x{growth} while NFE grows x{nfe_growth}",
          flush=True)
    return {"dataset": dataset_name, "rows": rows, "memory_growth": growth, "nfe_growth": nfe_growth}


def headline(table: dict) -> dict:
    out = {}
    for dataset, rows in table.items():
        for model, r in rows.items():
            out[f"{dataset}_{model}_test_acc"] = round(r["test_acc"], 4)
        if "resnet" in rows and "odenet" in rows:
            out[f"{dataset}_odenet_over_resnet_params"] = round(
                rows["odenet"]["params"] / rows["resnet"]["params"], 3)
            out[f"{dataset}_odenet_minus_resnet_acc_points"] = round(
                100 * (rows["odenet"]["test_acc"] - rows["resnet"]["test_acc"]), 2)
        if "odenet_tight" in rows and "rnode" in rows:
            reference, rnode = rows["odenet_tight"], rows["rnode"]
            out[f"{dataset}_nfe_odenet_over_rnode"] = round(
                reference["nfe_forward"] / rnode["nfe_forward"], 3)
            out[f"{dataset}_rnode_minus_odenet_acc_points"] = round(
                100 * (rnode["test_acc"] - reference["test_acc"]), 2)
    return out


def run(cfg: Config) -> dict:
    unknown = sorted(set(cfg.models) - set(MODELS))
    if unknown:
        raise ValueError(f"models: unknown {unknown}, expected some of {MODELS}")
    bad = sorted(set(cfg.datasets) - {"digits", "mnist1d"})
    if bad:
        raise ValueError(f"datasets: {bad} not supported, expected digits and/or mnist1d")
    _check_sweep_settings(cfg)
    table, datasets, sweeps = {}, {}, {}
    for dataset_name in cfg.datasets:
        dataset = datasets[dataset_name] = load_dataset(dataset_name)
        table[dataset_name], trained = {}, {}
        for row in cfg.models:
            numbers, model = evaluate_row(cfg, dataset_name, row, dataset)
            table[dataset_name][row] = numbers
            if row in AT_RNODE_RTOL:
                trained[row] = (row_spec(cfg, dataset_name, row), model)
            write_json(Path(cfg.out) / "table_partial.json", table)  # rows so far
        if len(trained) == len(AT_RNODE_RTOL):
            sweeps[dataset_name] = tolerance_sweep(cfg, dataset, trained)
            plot_sweep(cfg, dataset_name, sweeps[dataset_name])
    memory = memory_vs_depth(cfg, cfg.datasets[0], datasets[cfg.datasets[0]])
    plot_memory(cfg, memory)
    sweep_md = "".join("\n" + sweep_markdown(name, sweep) for name, sweep in sweeps.items())
    (Path(cfg.out) / "table.md").write_text(markdown(table) + "\n" + memory_markdown(memory) + sweep_md)
    summary = headline(table)
    summary.update({f"memory_growth_{name}": round(g, 2) for name, g in memory["memory_growth"].items()})
    for dataset_name, sweep in sweeps.items():
        summary[f"{dataset_name}_sweep_nfe_odenet_over_rnode"] = [
            round(r, 2) for r in sweep["nfe_odenet_over_rnode"]]
        summary[f"{dataset_name}_equal_accuracy_nfe_ratio"] = round(sweep["equal_accuracy"]["ratio"], 3)
        summary[f"{dataset_name}_equal_accuracy_any_solver_nfe_ratio"] = round(
            sweep["equal_accuracy_any_solver"]["ratio"], 3)
    return {"headline": summary, **table, "memory_vs_depth": memory, "rnode_sweep": sweeps}


if __name__ == "__main__":
    main(__name__, Config, run, QUICK)
