"""experiments.bench_layer_parallel: its probe is exact on 8 host devices (float64, in a child
process started by this file run as a script), and its work model (`experiments._mgrit_model`)
gives the closed forms."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from experiments import _mgrit_model as model
from experiments import bench_layer_parallel as bench

DEPTH, COARSENING = 32, 4  # N / m = 8 iterations: exact


def child_probe() -> dict:
    """Run in the child: the bench's probe at its smallest size on 8 devices."""
    from neuralode.parallel import host_devices

    host_devices(8)
    cfg = bench.Config(width=8, batch=4, coarsening=COARSENING, probe_iterations=DEPTH)
    y0, w = bench.inputs(cfg)
    return bench.probe(cfg, bench.make_field(cfg, DEPTH), y0, w, devices=8)


@pytest.fixture(scope="module")
def probe() -> dict:
    env = dict(os.environ, JAX_ENABLE_X64="1", JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True,
                          timeout=300, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_forward_and_gradient_are_exact_after_n_over_m_iterations(probe):
    assert probe["devices"] == 8 and probe["exact"] and probe["iterations"] == DEPTH // COARSENING
    assert probe["forward_error"] <= 1e-12
    assert probe["gradient_error"] <= 1e-10


def test_probe_reports_a_decreasing_residual_of_both_solves(probe):
    for direction in ("forward", "backward"):
        residuals = [r for r in probe[f"{direction}_residuals"] if np.isfinite(r)]
        assert len(residuals) >= 3, residuals
        assert all(b < a for a, b in zip(residuals, residuals[1:])), residuals


@pytest.mark.parametrize("devices, coarsening, iterations, expected", [
    (8, 4, 2, 1.0),                      # 1 / (1/4 + 2 (1/8 + 1/4))
    (1024, 4, 2, 1 / (0.25 + 2 * (1 / 1024 + 0.25))),
    (64, 16, 1, 1 / (1 / 16 + 1 / 64 + 1 / 16)),
])
def test_work_model_is_the_issues_closed_form(devices, coarsening, iterations, expected):
    assert model.work_model_speedup(devices, coarsening, iterations) == pytest.approx(expected,
                                                                                     rel=1e-15)


def test_mgrit_seconds_counts_the_rounds_phases_and_collectives():
    # (K + 1) [ S_P + (1 + 1/m) R_P + 3 lam [P > 1] ], m = 4, K = 2.
    assert model.mgrit_seconds(8, 4, 2, sweep_s=16.0, relax_s=8.0) == 3 * (16 + 10)
    assert model.mgrit_seconds(8, 4, 2, sweep_s=16.0, relax_s=8.0, latency_s=0.5) == 3 * 27.5
    assert model.mgrit_seconds(1, 4, 2, sweep_s=16.0, relax_s=8.0, latency_s=0.5) == 3 * 26
    assert model.mgrit_seconds(8, 4, 0, sweep_s=16.0, relax_s=8.0) == 26.0


def test_equal_step_costs_without_communication_give_the_issues_model_plus_one_relaxation():
    # With N/m steps in the sweep, N/P in the relaxation, all of one cost and no collectives the
    # speed-up is N / (N/m + K (N/P + N/m) + N/P + (K + 1) N/(mP)): the issue's rounds, the
    # F-relaxation that gives the states, the FAS coarse steps.
    n, p, m, k = 4096, 64, 4, 2
    ours = n / model.mgrit_seconds(p, m, k, sweep_s=n / m, relax_s=n / p)
    issue = model.work_model_speedup(p, m, k)
    assert 1 / ours == pytest.approx(1 / issue + 1 / p + (k + 1) / (m * p), rel=1e-14)


def test_machine_measurements_are_one_round_of_each_phase_and_one_hand_off():
    rounds, steps = 3, model.RING_STEPS
    times = {(phase, p): {"run_s": 3.0 * (i + 1) / p} for p in (1, 2)
             for i, phase in enumerate(model.PHASES)}
    times["ring", 2] = {"run_s": steps * 3e-5}
    measured = model.machine_measurements(times, [1, 2], rounds)
    assert measured[1] == {"latency_s": 0.0, "sweep_s": 1.0, "relax_s": 2.0,
                           "adjoint_sweep_s": 3.0, "adjoint_relax_s": 4.0}
    assert measured[2]["relax_s"] == 1.0 and measured[2]["latency_s"] == pytest.approx(3e-5)


def test_predicted_seconds_adds_the_adjoint_solve_to_the_forward():
    cfg = bench.Config(coarsening=4, iterations=2, backward_iterations=1)
    phases = {"latency_s": 0.0, "sweep_s": 16.0, "relax_s": 8.0, "adjoint_sweep_s": 32.0,
              "adjoint_relax_s": 16.0}
    assert model.predicted_seconds(cfg, 2, phases) == {"forward": 3 * 26.0,
                                                       "forward_backward": 3 * 26.0 + 2 * 52.0}


def test_extrapolation_takes_the_relaxation_cost_of_the_nearest_working_set():
    # N = 1024 on P = 16 devices: 64 layers per device, nearest the one-device run at depth 64
    # (per step 1.0 s there, 5.0 s at depth 1024); sweeps N/m = 256 steps of 0.5 s and 2.0 s.
    cfg = bench.Config(coarsening=4, iterations=2, backward_iterations=1)
    costs = {"sweep": 0.5, "adjoint_sweep": 2.0}
    one_device = {64: {"relax_s": 64.0, "adjoint_relax_s": 128.0},
                  1024: {"relax_s": 5120.0, "adjoint_relax_s": 10240.0}}
    speedup = model.extrapolated_speedup(cfg, 1024, [16], costs, one_device, latency_s=0.0)[16]
    forward = 3 * (128 + 1.25 * 64)
    assert speedup["forward"] == pytest.approx(512 / forward, rel=1e-14)
    assert speedup["forward_backward"] == pytest.approx(2048 / (forward + 2 * (512 + 1.25 * 128)),
                                                        rel=1e-14)


def test_one_depth_on_one_device_measures_every_phase_and_predicts_from_them():
    cfg = bench.Config(width=8, batch=4, coarsening=4, repeats=1, probe_max_depth=0)
    row = bench.measure_depth(cfg, 16, [1], model.ring_calls(cfg, [1]))
    phases, entry = row["machine"][1], row["parallel"][1]
    assert set(phases) == {"latency_s", *(f"{phase}_s" for phase in model.PHASES)}
    assert phases["latency_s"] == 0.0 and all(v > 0 for v in phases.values() if v)
    assert entry["predicted_s"] == model.predicted_seconds(cfg, 1, phases)
    assert entry["iterations"] == cfg.iterations and np.isfinite(entry["final_error"])


if __name__ == "__main__":
    print(json.dumps(child_probe()))
