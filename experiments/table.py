"""Chen et al. 2018 (Neural ODEs), Table 1, on offline data: every model on digits and MNIST-1D.

    python -m experiments.table [--quick] [--out DIR] [--resume]

Rows: ResNet (Euler steps of a depth-varying field), PlainNet (no identity path), RK-Net (RK4
steps of a weight-tied field, backprop), ODE-Net (adaptive Dopri5, continuous adjoint), ANODE
(Dupont et al. 2019) and RNODE (ODE-Net with the kinetic + Jacobian regulariser of Finlay et al.
2020). RNODE is compared with an unregularised ODE-Net trained and evaluated at the same, tighter
tolerance `rnode_rtol` (row `odenet_tight`): at the table's rtol 1e-3 an ODE-Net already takes
about the fewest steps the controller allows (44 NFE at rtol 1e-1, 56 at 1e-3), so there is nothing
for a regulariser to save. Columns: test error, parameters, compiled temporary memory of the
gradient function (`jax.jit(grad).lower(...).compile().memory_analysis().temp_size_in_bytes`, one
batch), forward and backward NFE, training time. Backward NFE of the adaptive models are counted,
not modelled: every call of the field in one gradient evaluation fires a `jax.debug.callback`; the
forward calls of the same loss are subtracted. Fixed-step models report `solve(...).stats`.

Memory against depth (the O(L) vs O(1) column of Table 1): the same gradient memory for untrained
models on the first dataset, ResNet with 1..16 blocks per stage, RK-Net with 1..16 RK4 steps and
ODE-Net (continuous adjoint) with rtol tightened from 1e-1 to 1e-6, against forward NFE.

Tolerance sweep (where both RNODE and its twin were trained): the two trained nets evaluated at
every rtol = atol of `sweep_rtols`, test accuracy and forward NFE, to see whether the regularised
flow is cheaper at every tolerance or only at the one it was trained at; and their fields stepped
by fixed-step solvers (Euler, midpoint, RK4 with `fixed_steps` steps per stage: an RK-Net holding
the ODE-Net's parameters), where no error estimate or step-size controller sets a floor on the
NFE. The NFE ratio at equal accuracy: at the best accuracy both nets reach, the NFE of the
cheapest ODE-Net evaluation at least that accurate over RNODE's, among the tolerances
(`equal_accuracy`) and among all evaluations (`equal_accuracy_any_solver`); and the whole trade:
each net's cheapest evaluation at every accuracy on either one's Pareto front (`nfe_to_reach`).

Writes `DIR/table.json` ({dataset: {model: {test_acc, params, grad_memory_bytes, nfe_forward,
nfe_backward, train_s}}, "memory_vs_depth": {model: [rows]}, "rnode_sweep": {dataset: ...}}),
`DIR/table.md`, `DIR/table_memory.png`, `DIR/table_rnode_<dataset>.png`, and each run's workdir
and curves under DIR.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from experiments.classify import Config as ClassifyConfig
from experiments.classify import build_model, forward_stats, load, train_one
from experiments.common import main, save_figure, write_json
from neuralode.data import batches
from neuralode.solvers import RK4, Euler, Midpoint
from neuralode.train import classification_loss

MODELS = ("resnet", "plainnet", "rknet", "odenet", "anode", "odenet_tight", "rnode")
ADAPTIVE = ("odenet", "anode", "odenet_tight", "rnode")
AT_RNODE_RTOL = ("odenet_tight", "rnode")  # trained and evaluated at rnode_rtol
FIXED_SOLVERS = {"euler": Euler, "midpoint": Midpoint, "rk4": RK4}
LABELS = {"resnet": "ResNet", "plainnet": "PlainNet", "rknet": "RK-Net", "odenet": "ODE-Net",
          "anode": "ANODE", "odenet_tight": "ODE-Net", "rnode": "RNODE"}


@dataclasses.dataclass
class Config:
    out: str = "results"
    quick: bool = False
    resume: bool = False
    datasets: tuple[str, ...] = ("digits", "mnist1d")
    models: tuple[str, ...] = MODELS
    channels: tuple[int, ...] = (32, 64)
    blocks: int = 3
    norm: bool = True  # GroupNorm in the fields (as Chen et al.'s ODE-Net)
    augment_shift: int = 1  # random shifts of up to one pixel (sample) in training
    rk_steps: int = 1
    rtol: float = 1e-3
    atol: float = 1e-3
    rnode_rtol: float = 1e-5  # rtol = atol of rnode and of its unregularised twin odenet_tight
    # RNODE's kinetic and Jacobian weights (equal by default, as in Finlay et al.); its regularisers
    # are sums over all activations (2048 per digit, 1280 per MNIST-1D signal), hence weights far
    # below 0.01. On MNIST-1D 3e-4 / 3e-4 cost 2.3 points of accuracy for the same NFE as 1e-4.
    rnode_kinetic_weight: float = 1e-4
    rnode_jacobian_weight: float = 1e-4
    epochs_digits: int = 30
    epochs_mnist1d: int = 20
    rnode_epochs_digits: int = 30  # rnode and odenet_tight; on MNIST-1D the regularised net is
    rnode_epochs_mnist1d: int = 40  # still underfitting after 20 epochs
    batch_size: int = 128
    learning_rate: float = 3e-3
    measure_batch: int = 128
    depths: tuple[int, ...] = (1, 2, 4, 8, 16)  # memory vs depth: blocks (ResNet), RK4 steps
    memory_rtols: tuple[float, ...] = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6)  # ... and ODE-Net rtol
    # the evaluation tolerances of the trained rnode and odenet_tight
    sweep_rtols: tuple[float, ...] = (1e-3, 3e-4, 1e-4, 3e-5, 1e-5, 3e-6, 1e-6, 1e-7)
    # ... and their fields stepped by fixed-step solvers, `fixed_steps` steps per stage
    fixed_solvers: tuple[str, ...] = ("euler", "midpoint", "rk4")
    fixed_steps: tuple[int, ...] = (1, 2, 4, 8)
    seed: int = 0


QUICK = {"depths": (1, 4), "memory_rtols": (1e-1, 1e-4), "sweep_rtols": (1e-2, 1e-4),
         "fixed_solvers": ("euler", "rk4"), "fixed_steps": (1, 2),
         "channels": (8, 16), "blocks": 2,
         "epochs_digits": 4, "epochs_mnist1d": 3, "rnode_epochs_digits": 4, "rnode_epochs_mnist1d": 3,
         "rtol": 1e-2, "atol": 1e-2, "rnode_rtol": 1e-3,
         "learning_rate": 1e-2, "batch_size": 64}


class _Counter:
    def __init__(self):
        self.calls = 0

    def __call__(self):
        self.calls += 1


class CountedField(nnx.Module):
    """A field that reports every call to a host-side counter (`jax.debug.callback`)."""

    def __init__(self, field: nnx.Module, counter: _Counter):
        self.field, self.counter = field, counter

    def __call__(self, t, y):
        jax.debug.callback(self.counter)
        return self.field(t, y)


def _loss_and_grad(model: nnx.Module):
    """The training-mode loss and its parameter gradient as pure functions of the model state
    (`nnx.grad` inside, so the RNODE noise counter may advance in the trace)."""
    model.train()
    graphdef, state = nnx.split(model)
    model.eval()

    def loss(state, x, y):
        return classification_loss(nnx.merge(graphdef, state), x, y)[0]

    def grad(state, x, y):
        return nnx.grad(lambda m: classification_loss(m, x, y)[0])(nnx.merge(graphdef, state))

    return loss, grad, state


def grad_memory_bytes(model: nnx.Module, x, y) -> int:
    """Compiled temporary memory of the training-mode gradient of the loss over one batch."""
    _, grad, state = _loss_and_grad(model)
    compiled = jax.jit(grad).lower(state, x, y).compile()
    return int(compiled.memory_analysis().temp_size_in_bytes)


def counted_nfe(model: nnx.Module, x, y) -> tuple[int, int]:
    """(forward, backward) field calls of one training-mode loss and its gradient, counted."""
    clone = nnx.clone(model)
    counter = _Counter()
    for index in range(len(clone.stages)):
        clone.stages[index] = CountedField(clone.stages[index], counter)
    loss, grad, state = _loss_and_grad(clone)
    jax.block_until_ready(jax.jit(loss)(state, x, y))
    forward, counter.calls = counter.calls, 0
    jax.block_until_ready(jax.jit(grad)(state, x, y))
    return forward, counter.calls - forward


def classify_config(cfg: Config, dataset: str, model: str) -> ClassifyConfig:
    tight = model in AT_RNODE_RTOL
    epochs = getattr(cfg, f"rnode_epochs_{dataset}" if tight else f"epochs_{dataset}")
    rnode = model == "rnode"
    rtol, atol = (cfg.rnode_rtol, cfg.rnode_rtol) if tight else (cfg.rtol, cfg.atol)
    return ClassifyConfig(
        out=cfg.out, dataset=dataset, model="odenet" if tight else model,
        channels=tuple(cfg.channels), blocks=cfg.blocks, rk_steps=cfg.rk_steps, norm=cfg.norm,
        augment_shift=cfg.augment_shift, rtol=rtol, atol=atol,
        kinetic_weight=cfg.rnode_kinetic_weight if rnode else 0.0,
        jacobian_weight=cfg.rnode_jacobian_weight if rnode else 0.0, epochs=epochs,
        batch_size=cfg.batch_size, learning_rate=cfg.learning_rate, seed=cfg.seed,
        stem_kernel_size=5 if dataset == "mnist1d" else 3, progress=False)


def evaluate_row(cfg: Config, dataset_name: str, model_name: str, dataset) -> tuple[dict, nnx.Module]:
    """Train (or resume) one row and measure it; returns the row and the trained model."""
    name = f"table_{dataset_name}_{model_name}"
    ccfg = classify_config(cfg, dataset_name, model_name)
    resume = cfg.resume and (Path(cfg.out) / name / "checkpoints").is_dir()
    model, results = train_one(dataclasses.replace(ccfg, resume=resume), dataset, name)
    x = jnp.asarray(dataset.x_test[:cfg.measure_batch])
    y = jnp.asarray(dataset.y_test[:cfg.measure_batch])
    if model_name in ADAPTIVE:
        _, nfe_backward = counted_nfe(model, x, y)
    else:
        nfe_backward = int(results["nfe_backward"])
    row = {"test_acc": results["test_acc"], "params": results["params"],
           "grad_memory_bytes": grad_memory_bytes(model, x, y),
           "nfe_forward": results["nfe_forward"], "nfe_backward": nfe_backward,
           "train_s": results["train_s"]}
    if model_name in ADAPTIVE:
        row["rtol"] = ccfg.rtol
    print(f"{dataset_name} {model_name}: {row}", flush=True)
    return row, model


def held_out_accuracy(model: nnx.Module, dataset, batch_size: int = 1000) -> float:
    """Accuracy of the eval-mode `model` on the whole test split."""
    model.eval()
    correct = sum(int(np.sum(np.asarray(_predict(model, x)) == y))
                  for x, y in batches(dataset.x_test, dataset.y_test, batch_size))
    return correct / len(dataset.y_test)


@nnx.jit
def _predict(model: nnx.Module, x):
    return jnp.argmax(model(x), axis=-1)


def _check_sweep_settings(cfg: Config) -> None:
    if len(cfg.sweep_rtols) < 1 or not all(r > 0 for r in cfg.sweep_rtols):
        raise ValueError(f"sweep_rtols: expected positive tolerances, got {cfg.sweep_rtols}")
    unknown = sorted(set(cfg.fixed_solvers) - set(FIXED_SOLVERS))
    if unknown:
        raise ValueError(f"fixed_solvers: unknown {unknown}, expected some of {tuple(FIXED_SOLVERS)}")
    if not all(isinstance(n, int) and n >= 1 for n in cfg.fixed_steps):
        raise ValueError(f"fixed_steps: expected positive ints, got {cfg.fixed_steps}")


def fixed_step_net(cfg: Config, dataset_name: str, dataset, model: nnx.Module, solver: str,
                   steps: int) -> nnx.Module:
    """The trained ODE-Net `model` with its field stepped `steps` times per stage by the fixed-step
    `solver`: an RK-Net holding the ODE-Net's parameters (built abstractly, so no initialiser
    runs, then filled with them)."""
    options = dataclasses.replace(classify_config(cfg, dataset_name, "odenet"), model="rknet",
                                  rk_steps=steps)
    net = nnx.eval_shape(lambda: build_model(options, dataset))
    net.solver = FIXED_SOLVERS[solver]()
    params, expected = nnx.state(model, nnx.Param), nnx.state(net, nnx.Param)
    if (jax.tree.structure(params) != jax.tree.structure(expected)
            or [jnp.shape(p) for p in jax.tree.leaves(params)]
            != [p.shape for p in jax.tree.leaves(expected)]):
        raise ValueError(f"model: its parameters do not fit an RK-Net of the table's settings "
                         f"(channels {cfg.channels}, norm {cfg.norm}); was it trained with them?")
    nnx.update(net, params)
    return net


def tolerance_sweep(cfg: Config, dataset_name: str, dataset, models: dict[str, nnx.Module]) -> dict:
    """Test accuracy and forward NFE (first `batch_size` test examples, the batch of the table's
    NFE column) of the trained adaptive `models` evaluated at every rtol = atol of
    `cfg.sweep_rtols` (`rows`) and with their fields stepped by every fixed-step solver of
    `cfg.fixed_solvers` at every number of steps of `cfg.fixed_steps` (`fixed_steps`); where both
    `odenet_tight` and `rnode` are given, their NFE ratio at each tolerance and at equal accuracy,
    over the adaptive evaluations (`equal_accuracy`) and over all of them
    (`equal_accuracy_any_solver`)."""
    _check_sweep_settings(cfg)
    x = jnp.asarray(dataset.x_test[:cfg.batch_size])

    def point(net, **setting):
        return {**setting, "test_acc": held_out_accuracy(net, dataset),
                "nfe_forward": forward_stats(net, x)["nfe"]}

    rows, fixed = {}, {}
    for name, model in models.items():
        rows[name] = []
        for rtol in cfg.sweep_rtols:
            clone = nnx.clone(model)
            clone.rtol = clone.atol = float(rtol)
            rows[name].append(point(clone, rtol=rtol))
        fixed[name] = [point(fixed_step_net(cfg, dataset_name, dataset, model, solver, steps),
                             solver=solver, steps=steps)
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


def _cheapest(points: list[dict], accuracy: float) -> dict | None:
    """The evaluation with the fewest NFE among `points` at least `accuracy` accurate, or None."""
    reached = [p for p in points if p["test_acc"] >= accuracy]
    return min(reached, key=lambda p: p["nfe_forward"]) if reached else None


def equal_accuracy_nfe(reference: list[dict], regularised: list[dict]) -> dict:
    """Both nets at the best test accuracy both reach among their evaluations (the lower of their
    best): each one's cheapest evaluation at least that accurate, and `ratio`, the reference's NFE
    over the regularised net's, i.e. how many times fewer field evaluations the regularised net
    needs for the same accuracy when each may choose how it is solved."""
    accuracy = min(max(p["test_acc"] for p in reference), max(p["test_acc"] for p in regularised))
    ref, reg = _cheapest(reference, accuracy), _cheapest(regularised, accuracy)
    return {"test_acc": accuracy, "odenet_tight": ref, "rnode": reg,
            "ratio": ref["nfe_forward"] / reg["nfe_forward"]}


def nfe_to_reach(reference: list[dict], regularised: list[dict]) -> list[dict]:
    """The cost of accuracy for both nets: at every accuracy on either net's Pareto front (an
    evaluation that no other is both as cheap and as accurate as), each net's cheapest evaluation
    at least that accurate (None where it never gets there) and `ratio`, the reference's NFE over
    the regularised net's (None unless both get there)."""
    def front(points):
        def dominates(q, p):
            return (q["nfe_forward"] <= p["nfe_forward"] and q["test_acc"] >= p["test_acc"]
                    and (q["nfe_forward"], q["test_acc"]) != (p["nfe_forward"], p["test_acc"]))

        return {p["test_acc"] for p in points if not any(dominates(q, p) for q in points)}

    rows = []
    for accuracy in sorted(front(reference) | front(regularised)):
        ref, reg = _cheapest(reference, accuracy), _cheapest(regularised, accuracy)
        rows.append({"test_acc": accuracy, "odenet_tight": ref, "rnode": reg,
                     "ratio": ref["nfe_forward"] / reg["nfe_forward"] if ref and reg else None})
    return rows


def setting(point: dict) -> str:
    """How an evaluation of the sweep was solved: `rtol 1e-05` or `RK4, 2 steps`."""
    if "rtol" in point:
        return f"rtol {point['rtol']:g}"
    return f"{FIXED_SOLVERS[point['solver']].__name__}, {point['steps']} step" + (
        "s" if point["steps"] > 1 else "")


def plot_sweep(cfg: Config, dataset_name: str, sweep: dict) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
    markers = {"euler": "s", "midpoint": "^", "rk4": "D"}
    for (name, rows), color in zip(sweep["rows"].items(), ("C0", "C1")):
        rtols = [r["rtol"] for r in rows]
        axes[0].plot(rtols, [r["nfe_forward"] for r in rows], marker="o", color=color, label=LABELS[name])
        axes[1].plot(rtols, [100 * r["test_acc"] for r in rows], marker="o", color=color, label=LABELS[name])
        axes[2].plot([r["nfe_forward"] for r in rows], [100 * r["test_acc"] for r in rows],
                     marker="o", color=color, label=f"{LABELS[name]}, Dopri5")
        for solver in cfg.fixed_solvers:
            points = [p for p in sweep["fixed_steps"][name] if p["solver"] == solver]
            axes[2].plot([p["nfe_forward"] for p in points], [100 * p["test_acc"] for p in points],
                         marker=markers[solver], color=color, linestyle=":",
                         label=f"{LABELS[name]}, {FIXED_SOLVERS[solver].__name__}")
    axes[0].set(xscale="log", yscale="log", xlabel="evaluation rtol = atol",
                ylabel="field evaluations per forward pass")
    axes[1].set(xscale="log", xlabel="evaluation rtol = atol", ylabel="test accuracy (%)")
    accuracies = [100 * p["test_acc"] for points in (*sweep["rows"].values(),
                                                     *sweep["fixed_steps"].values()) for p in points]
    bottom = max(min(accuracies) - 1, max(accuracies) - 15)  # all points unless some collapse
    axes[2].set(xscale="log", xlabel="field evaluations per forward pass (fixed: steps 1, 2, ...)",
                ylabel="test accuracy (%)", ylim=(bottom, 100))
    for ax in axes[:2]:
        ax.invert_xaxis()
    for ax in axes:
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3, which="both")
    fig.suptitle(f"RNODE vs ODE-Net on {dataset_name}, both trained at rtol {cfg.rnode_rtol:g}")
    save_figure(cfg, fig, f"table_rnode_{dataset_name}")


def memory_vs_depth(cfg: Config, dataset_name: str, dataset,
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
    base = classify_config(cfg, dataset_name, "resnet")
    rows = {name: [] for name in models}
    for depth in cfg.depths:
        for name, options in (("resnet", {"blocks": depth}), ("rknet", {"rk_steps": depth})):
            if name not in models:
                continue
            model = build_model(dataclasses.replace(base, model=name, **options), dataset)
            rows[name].append({"depth": depth, "nfe_forward": int(forward_stats(model, x)["nfe"]),
                               "grad_memory_bytes": grad_memory_bytes(model, x, y)})
    for rtol in cfg.memory_rtols if "odenet" in models else ():
        model = build_model(dataclasses.replace(base, model="odenet", rtol=rtol, atol=rtol), dataset)
        rows["odenet"].append({"rtol": rtol, "nfe_forward": int(forward_stats(model, x)["nfe"]),
                               "grad_memory_bytes": grad_memory_bytes(model, x, y)})
    growth = {name: r[-1]["grad_memory_bytes"] / r[0]["grad_memory_bytes"] for name, r in rows.items()}
    nfe_growth = {name: r[-1]["nfe_forward"] / r[0]["nfe_forward"] for name, r in rows.items()}
    print(f"memory vs depth ({dataset_name}): memory grows x{growth} while NFE grows x{nfe_growth}",
          flush=True)
    return {"dataset": dataset_name, "rows": rows, "memory_growth": growth, "nfe_growth": nfe_growth}


def plot_memory(cfg: Config, memory: dict) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for name, rows in memory["rows"].items():
        ax.plot([r["nfe_forward"] for r in rows], [r["grad_memory_bytes"] / 2**20 for r in rows],
                marker="o", label=LABELS[name] + (" (rtol)" if name == "odenet" else " (depth)"))
    ax.set(xscale="log", yscale="log", xlabel="field evaluations per forward pass",
           ylabel="gradient memory (MiB)", title=f"memory vs depth on {memory['dataset']}")
    ax.legend()
    ax.grid(alpha=0.3, which="both")
    save_figure(cfg, fig, "table_memory")


def markdown(table: dict) -> str:
    lines = ["Chen et al. 2018, Table 1 layout; test error on the held-out split, memory = "
             "compiled temporaries of one gradient evaluation (one batch), NFE per forward / "
             "backward pass (one batch), time = training wall-clock on this machine.", ""]
    for dataset, rows in table.items():
        lines += [f"### {dataset}", "", "| model | test error | # params | grad memory | "
                  "NFE fwd | NFE bwd | train time |", "|---|---:|---:|---:|---:|---:|---:|"]
        for model, r in rows.items():
            label = LABELS[model] + (f" (rtol {r['rtol']:g})" if model in AT_RNODE_RTOL else "")
            lines.append(f"| {label} | {100 * (1 - r['test_acc']):.2f} % | "
                         f"{r['params'] / 1e3:.1f} K | {r['grad_memory_bytes'] / 2**20:.2f} MiB "
                         f"| {r['nfe_forward']:.0f} | {r['nfe_backward']:.0f} | "
                         f"{r['train_s']:.0f} s |")
        lines.append("")
    return "\n".join(lines)


def memory_markdown(memory: dict) -> str:
    lines = [f"### gradient memory vs depth ({memory['dataset']}, untrained models)", "",
             "| model | depth / rtol | NFE fwd | grad memory |", "|---|---:|---:|---:|"]
    for name, rows in memory["rows"].items():
        for r in rows:
            setting = f"rtol {r['rtol']:g}" if "rtol" in r else str(r["depth"])
            lines.append(f"| {LABELS[name]} | {setting} | {r['nfe_forward']} | "
                         f"{r['grad_memory_bytes'] / 2**20:.2f} MiB |")
    return "\n".join(lines + [""])


def sweep_markdown(dataset_name: str, sweep: dict) -> str:
    names = list(sweep["rows"])
    compared = "nfe_odenet_over_rnode" in sweep
    header = " | ".join(f"{LABELS[n]} acc | {LABELS[n]} NFE" for n in names)

    def cells(points):
        return " | ".join(f"{100 * p['test_acc']:.1f} % | {p['nfe_forward']:.0f}" for p in points)

    lines = [f"### RNODE vs ODE-Net on {dataset_name}, evaluated at other tolerances", "",
             "| rtol | " + header + (" | NFE ratio |" if compared else " |"),
             "|---:|" + "---:|---:|" * len(names) + ("---:|" if compared else "")]
    for i, rtol in enumerate(sweep["rtols"]):
        ratio = f" | {sweep['nfe_odenet_over_rnode'][i]:.2f}x" if compared else ""
        lines.append(f"| {rtol:g} | " + cells([sweep["rows"][n][i] for n in names]) + ratio + " |")
    fixed = sweep.get("fixed_steps", {})
    if fixed:
        lines += ["", "Their fields stepped with fixed steps (steps per stage):", "",
                  "| solver | " + header + " |", "|---|" + "---:|---:|" * len(names)]
        for i, p in enumerate(fixed[names[0]]):
            lines.append(f"| {setting(p)} | " + cells([fixed[n][i] for n in names]) + " |")
    for key, among in (("equal_accuracy", "the tolerances"), ("equal_accuracy_any_solver", "all evaluations")):
        if key in sweep:
            equal = sweep[key]
            ref, reg = equal["odenet_tight"], equal["rnode"]
            lines += ["", f"Among {among}, at the best accuracy both reach "
                      f"({100 * equal['test_acc']:.1f} %): {LABELS['odenet_tight']} "
                      f"{ref['nfe_forward']:.0f} NFE ({setting(ref)}), {LABELS['rnode']} "
                      f"{reg['nfe_forward']:.0f} NFE ({setting(reg)}): {equal['ratio']:.2f}x fewer "
                      f"at equal accuracy."]
    if "nfe_to_reach" in sweep:
        lines += ["", "The cheapest evaluation of each net at every accuracy on either one's Pareto front:",
                  "", f"| accuracy | {LABELS['odenet_tight']} NFE | {LABELS['rnode']} NFE | ratio |",
                  "|---:|---:|---:|---:|"]

        def cell(point):
            return f"{point['nfe_forward']:.0f} ({setting(point)})" if point else "never"

        for row in sweep["nfe_to_reach"]:
            ratio = f"{row['ratio']:.2f}x" if row["ratio"] else "-"
            lines.append(f"| >= {100 * row['test_acc']:.1f} % | {cell(row['odenet_tight'])} | "
                         f"{cell(row['rnode'])} | {ratio} |")
    return "\n".join(lines + [""])


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
        dataset = datasets[dataset_name] = load(ClassifyConfig(dataset=dataset_name))
        table[dataset_name], trained = {}, {}
        for model_name in cfg.models:
            row, model = evaluate_row(cfg, dataset_name, model_name, dataset)
            table[dataset_name][model_name] = row
            if model_name in AT_RNODE_RTOL:
                trained[model_name] = model
            write_json(Path(cfg.out) / "table_partial.json", table)  # rows so far
        if len(trained) == len(AT_RNODE_RTOL):
            sweeps[dataset_name] = tolerance_sweep(cfg, dataset_name, dataset, trained)
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
