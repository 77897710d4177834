"""Every claim of docs/claims.md, recomputed with --quick settings and checked against the source's
figures."""
import json
import math

import pytest

from experiments import expressivity, gradient_flow, paths, scaled_residuals, stability, stages
from experiments.common import run_experiment


def quick(module, tmp_path_factory):
    out = tmp_path_factory.mktemp(module.__name__.rsplit(".", 1)[-1])
    results = run_experiment(module.__name__, module.Config, module.run, module.QUICK, ["--quick", "--out", str(out)])
    name = module.__name__.rsplit(".", 1)[-1]
    assert json.loads((out / f"{name}.json").read_text())["headline"]  # the JSON is written and readable
    assert list(out.glob(f"{name}_*.png"))
    for claim in results["claims"]:
        assert set(claim) == {"id", "claim", "source_figure", "measured", "verdict"}
        assert not claim["verdict"].startswith("refuted"), claim
    return results


@pytest.fixture(scope="module")
def flow(tmp_path_factory):
    return quick(gradient_flow, tmp_path_factory)


def test_b1_b2_closed_forms_and_scalar_chains(flow):
    assert round(flow["closed_forms"]["0.9^20"], 4) == 0.1216
    assert flow["scalar_chains"]["plain_a0.9_L20"] == pytest.approx(0.9**20, rel=1e-13)
    assert 100 * flow["scalar_chains"]["plain_a0.9_L100"] == pytest.approx(0.0027, abs=5e-5)
    assert flow["scalar_chains"]["residual_over_plain_a0.5_L20"] == pytest.approx(3.0**20, rel=1e-12)
    assert 3.48e9 < flow["closed_forms"]["(1.5/0.5)^20"] < 3.49e9


def test_b2_real_networks_residual_over_plain_grows_with_depth(flow):
    for kind in ("mlp", "conv"):
        rows = flow["stacks"][kind]
        ratios = [r["residual_over_plain"] for r in rows]
        assert all(b > a for a, b in zip(ratios, ratios[1:])), (kind, ratios)
        assert ratios[-1] > 10
        # The Euler odeint of the DepthStack is the same ResNet as the explicit blocks.
        assert max(r["residual_odeint_vs_layers_rel"] for r in rows) < 1e-12


def test_b3_eigenvalues_shift_by_one(flow):
    assert flow["eigenvalue_shift"]["max_error"] < 1e-12


def test_b5_branch_scaling_matches_one_plus_s_squared_to_the_L(flow):
    for row in flow["branch_scale"]:
        if row["scale"] != "1":  # s = 1 is log-normal heavy-tailed: its sample mean is not Gaussian
            assert abs(row["forward_ratio"] - row["closed_form"]) < 4 * row["forward_standard_error"], row
    deepest = {r["scale"]: r for r in flow["branch_scale"] if r["depth"] == max(r["depth"] for r in flow["branch_scale"])}
    assert deepest["1"]["forward_ratio"] > 1e10
    assert deepest["1/sqrt(L)"]["forward_ratio"] == pytest.approx(math.e, rel=0.15)
    # 1/L collapses to the identity: distance ~ L^(-1/2).
    assert deepest["1/L"]["distance_from_identity"] < 0.5 * deepest["1/sqrt(L)"]["distance_from_identity"] / 4


def test_b7_activation_derivatives(flow):
    assert flow["activations"]["sigmoid_max_derivative"] == 0.25
    assert abs(flow["activations"]["sigmoid_argmax"]) < 1e-12
    assert flow["activations"]["relu_derivative_positive_min"] == flow["activations"]["relu_derivative_positive_max"] == 1
    assert flow["activations"]["relu_derivative_negative_max"] == 0


def test_b8_adam_equalises_update_sizes_above_eps(flow):
    sizes = flow["update_sizes"]
    assert sizes["sgd"]["max_over_min"] > 1e6
    assert sizes["adam_eps0"]["max_over_min"] < 3
    assert sizes["adam"]["max_over_min"] < 1e-3 * sizes["sgd"]["max_over_min"]


def test_b4_scaled_residual_bound(tmp_path_factory):
    r = quick(scaled_residuals, tmp_path_factory)
    bound = r["lipschitz_bound_first_block"]
    assert bound["power_iteration"] == pytest.approx(bound["exact_svd"], rel=1e-9)
    for name, case in r["cases"].items():
        if name == "unscaled":
            assert case["gain_at_depth"] > 10
            continue
        beta = float(name.split("=")[1])
        assert case["max_block_jacobian_norm"] <= 1.0
        assert max(case["gradient_gain_max"]) <= 1.0
        depth = len(case["gradient_gain_min"])
        assert case["min_gain_at_depth"] >= (1 - 2 * beta) ** depth  # the lower bound of the docstring


def test_a3_and_stability(tmp_path_factory):
    r = quick(stability, tmp_path_factory)
    for case in r["a3"].values():
        assert case["propagated_sum_mismatch"] < 1e-11
        assert case["gradient_mismatch"] < 1e-12
    assert r["a3"]["stable"]["spectral_radius_M"] < 1 < r["a3"]["unstable"]["spectral_radius_M"]
    assert r["a3"]["unstable"]["per_step_mismatch"] < 1e-12
    assert r["trained_field"]["final_loss"] < 0.1 * r["trained_field"]["initial_loss"]
    inside = r["trained_field"]["fraction_inside"]
    assert inside["RK4"]["h=0.25"] == 1.0 and inside["RK4"]["h=1"] >= inside["Euler"]["h=1"]
    hr = r["haber_ruthotto"]
    assert hr["field_max_abs_real_eig"] < 1e-14 and hr["hamiltonian_max_abs_real_eig"] < 1e-14
    assert hr["linear_euler_undamped_gain"] == pytest.approx(hr["linear_euler_undamped_closed_form"], rel=1e-10)
    assert hr["linear_euler_damped_gain"] <= 1 + 1e-12
    assert 0.98 < hr["linear_leapfrog_gain_min"] <= hr["linear_leapfrog_gain_max"] < 1.02


def test_c1_c2_b6_expressivity(tmp_path_factory):
    r = quick(expressivity, tmp_path_factory)
    for row in r["hat"]:
        assert row["peaks"] == 2 ** (row["depth"] - 1)
        assert row["linear_pieces"] == 2 ** row["depth"]
        assert row["max_abs_diff_from_composition"] == 0.0
    for row in r["polynomial"]:
        assert row["measured_degree"] == row["power_m"] ** row["depth"]
        assert row["leading_relative_error"] < 1e-10
    kinks = r["breakpoints"]
    assert all(k["identity_path_breakpoints"] == 0 for k in kinks)
    plain = [k["plain_breakpoints"] for k in kinks]
    assert all(b > a for a, b in zip(plain, plain[1:]))
    assert kinks[-1]["residual_breakpoints"] > kinks[0]["residual_breakpoints"]


def test_b9_paths(tmp_path_factory):
    r = quick(paths, tmp_path_factory)
    for row in r["random_skips"]:
        assert abs(row["z_score"]) < 4.5, row  # Monte-Carlo error only
    assert all(row["paths_by_autodiff"] == row["closed_form"] for row in r["densenet"])


def test_c3_stages(tmp_path_factory):
    r = quick(stages, tmp_path_factory)
    for row in r["stacks"]:
        assert row["total_stride_measured"] == row["total_stride_product"]
        assert row["main_offset"] == pytest.approx(row["predicted_main_offset"], abs=1e-9)
        assert row["shapes_match"]
        if row["input"] % 2 == 1:
            assert abs(row["main_offset"]) < 1e-9 and abs(row["shortcut_offset"]) < 1e-9
        elif row["padding"].startswith("SAME"):
            assert row["main_offset"] - row["shortcut_offset"] == pytest.approx(2 ** len(r["config"]["strides"]) - 1)
    assert not r["source_block"]["addable"]
