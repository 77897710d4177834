"""How experiments.table writes its results: the markdown tables of table.md and the figures.

`markdown` (Table 1 per data set), `memory_markdown` (gradient memory against depth),
`sweep_markdown` (RNODE against the ODE-Net at other tolerances and with fixed steps),
`plot_memory` (table_memory.png) and `plot_sweep` (table_rnode_<dataset>.png). A helper module of
the table experiment (the leading underscore keeps `python -m experiments` from running it).
"""
from __future__ import annotations

from experiments.common import save_figure

LABELS = {"resnet": "ResNet", "plainnet": "PlainNet", "rknet": "RK-Net", "odenet": "ODE-Net",
          "anode": "ANODE", "odenet_tight": "ODE-Net", "rnode": "RNODE"}
AT_RNODE_RTOL = ("odenet_tight", "rnode")  # the rows trained and evaluated at rnode_rtol


def setting(point: dict) -> str:
    """How an evaluation of the sweep was solved: `rtol 1e-05` or `RK4, 2 steps`."""
    if "rtol" in point:
        return f"rtol {point['rtol']:g}"
    return f"{point['solver']}, {point['steps']} step" + (
        "s" if point["steps"] > 1 else "")


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


def plot_memory(cfg, memory: dict) -> None:
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


def plot_sweep(cfg, dataset_name: str, sweep: dict) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
    markers = {"Euler": "s", "Midpoint": "^", "Heun": "v", "RK4": "D"}
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
                         label=f"{LABELS[name]}, {solver}")
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

