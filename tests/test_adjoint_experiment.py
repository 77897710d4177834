"""experiments.adjoint with --quick settings: the numbers that must hold on any machine (memory from
the compiled program, errors from the arithmetic); timings are recorded but not asserted."""
import numpy as np

from experiments.adjoint import QUICK, Config, run


def test_adjoint_experiment_quick(tmp_path):
    results = run(Config(**QUICK, out=str(tmp_path)))
    memory = results["memory_bytes"]
    assert memory["backsolve"][1000] / memory["backsolve"][10] <= 1.1  # constant memory
    assert memory["checkpoint"][1000] / memory["checkpoint"][10] <= 15  # ~sqrt(L) segments
    assert memory["discrete"][1000] > 20 * memory["discrete"][10]  # every step stored
    assert memory["discrete"][1000] > 10 * memory["checkpoint"][1000]
    # With every step an output time the trajectory itself is stored: O(len(ts)) for every
    # adjoint, at least one state (batch x width) per output time (measured: backsolve 2.0, its
    # states and their cotangents; checkpoint 1.1; discrete 5.0).
    every = results["memory_bytes_every_step"]
    per_output = results["every_step_bytes_per_output_in_states"]
    for name in ("discrete", "checkpoint", "backsolve"):
        assert every[name][1000] > 20 * every[name][10], name
        assert per_output[name] >= 0.9, (name, per_output)
    assert per_output["backsolve"] > per_output["checkpoint"]

    for name, times in results["grad_time_s"].items():
        assert all(np.isfinite(t) and t > 0 for t in times.values()), name
    assert results["nfe"]["checkpoint"][1000]["nfe_backward"] == 2 * results["nfe"]["discrete"][
        1000]["nfe_backward"]

    # The ANODE effect: the continuous adjoint is not backprop's gradient, and worse for ReLU.
    relu, tanh = results["grad_rel_error"], results["grad_rel_error_tanh"]
    steps = sorted(relu)
    assert steps == sorted(QUICK["error_steps"])
    for L in steps:
        assert relu[L] > tanh[L] > 0, L
    assert all(relu[a] > relu[b] for a, b in zip(steps, steps[1:])), relu
    assert relu[steps[0]] > 1e-2  # few steps: a gradient off by percent, not rounding
    # Heun's continuous adjoint matches backprop to O(h^3) on the smooth field; the ReLU field's
    # jumps in df/dy cost about an order (measured slopes ~2.2 vs ~2.9).
    sweep = results["error_sweeps"]["Heun"]
    assert sweep["tanh"]["slope"] > sweep["relu"]["slope"] + 0.3

    for name in ("adjoint_memory_time.png", "adjoint_error.png"):
        assert (tmp_path / name).stat().st_size > 0
