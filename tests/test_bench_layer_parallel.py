"""experiments.bench_layer_parallel: its probe is exact on 8 host devices (float64, in a child
process started by this file run as a script), and its work model gives the closed forms."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

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
    assert bench.work_model_speedup(devices, coarsening, iterations) == pytest.approx(expected,
                                                                                     rel=1e-15)


def test_mgrit_seconds_counts_the_rounds_steps_and_collectives():
    # (K + 1) [ N/m c_s + (N/P)(1 + 1/m) c_r P / C_P + (P + 3) lam ], N = 64, m = 4, K = 2.
    unit = dict(sweep_step_s=1.0, relax_step_s=1.0)
    assert bench.mgrit_seconds(64, 8, 4, 2, concurrency=8, **unit) == 78.0
    assert bench.mgrit_seconds(64, 8, 4, 2, concurrency=2, **unit) == 168.0
    assert bench.mgrit_seconds(64, 8, 4, 2, concurrency=8, latency_s=0.5, **unit) == 78.0 + 16.5
    assert bench.mgrit_seconds(64, 1, 4, 2, concurrency=1, sweep_step_s=2.0, relax_step_s=0.5,
                               latency_s=0.5) == 3 * (16 * 2.0 + 80 * 0.5)
    # The relaxation step that reproduces a one-device time is the one that gave it.
    seconds = bench.mgrit_seconds(256, 1, 4, 2, concurrency=1, sweep_step_s=3e-4,
                                  relax_step_s=7e-4)
    assert bench.relax_step_seconds(seconds, 256, 4, 2, 3e-4) == pytest.approx(7e-4, rel=1e-12)


def test_equal_step_costs_without_communication_give_the_issues_model_plus_one_relaxation():
    # With c_s = c_r and no collectives the speed-up is
    # N / (N/m + K (N/P + N/m) + N/P + (K + 1) N/(mP)): the issue's rounds, the F-relaxation that
    # gives the states, the FAS coarse steps.
    n, p, m, k = 4096, 64, 4, 2
    ours = n / bench.mgrit_seconds(n, p, m, k, concurrency=p, sweep_step_s=1.0, relax_step_s=1.0)
    issue = bench.work_model_speedup(p, m, k)
    assert 1 / ours == pytest.approx(1 / issue + 1 / p + (k + 1) / (m * p), rel=1e-14)


def test_machine_concurrency_is_the_throughput_of_p_devices_and_latency_one_hand_off():
    steps = bench.MACHINE_STEPS
    times = {("busy", 1): {"runs_s": [2.0, 2.4, 2.2]}, ("busy", 2): {"runs_s": [2.0, 4.0, 2.0]},
             ("ring", 2): {"run_s": steps * 3e-5}}
    measured = bench.machine_measurements(times, [1, 2])
    assert measured[1] == {"latency_s": 0.0, "concurrency": 1.0}
    assert measured[2]["concurrency"] == pytest.approx(2.0)  # median of P t_1 / t_P: 2.0, 1.2, 2.2
    assert measured[2]["latency_s"] == pytest.approx(3e-5)


if __name__ == "__main__":
    print(json.dumps(child_probe()))
