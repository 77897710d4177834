"""D1: activation variance through a deep ReLU MLP with dropout, He vs dropout-corrected init."""
import json
import math

import numpy as np
import pytest

from experiments import init_variance
from experiments.common import run_experiment

SMALL = ["--width", "256", "--depth", "20", "--keep-probs", "0.5", "0.8", "--nets", "8", "--batch", "32"]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("init_variance")
    r = run_experiment(init_variance.__name__, init_variance.Config, init_variance.run, init_variance.QUICK,
                       SMALL + ["--out", str(out)])
    assert json.loads((out / "init_variance.json").read_text())["claims"] == r["claims"]
    assert (out / "init_variance_layers.png").stat().st_size > 10_000
    return r


def rows(results, init, mode):
    return {r["keep_prob"]: r for r in results["rows"] if r["init"] == init and r["mode"] == mode}


def test_closed_form_factors():
    """(sigma_w^2 n / (2p)) per layer with dropout on, sigma_w^2 n / 2 with it off."""
    assert (1 / 0.8) ** 50 == pytest.approx(7.0e4, rel=0.01)  # He init, p = 0.8, 50 layers


def test_he_init_grows_as_one_over_p_to_the_depth(results):
    for p, row in rows(results, "he", "train").items():
        assert row["closed_form_factor_per_layer"] == pytest.approx(1 / p, rel=1e-12)
        measured, closed = np.array(row["measured_over_input"][1:]), np.array(row["closed_form_over_input"][1:])
        relative_log_error = np.abs(np.log(measured / closed)) / np.abs(np.log(closed))
        assert relative_log_error.max() <= 0.2, (p, relative_log_error)
        assert row["last_layer_measured"] > 0.5 * (1 / p) ** 20  # grows, by orders of magnitude at p = 0.5
    # The mean is carried by a heavy tail: the median input's variance grows more slowly.
    assert rows(results, "he", "train")[0.5]["last_layer_median_input"] < rows(results, "he", "train")[0.5][
        "last_layer_measured"]


def test_corrected_init_holds_the_variance_while_dropout_is_on(results):
    for p, row in rows(results, "corrected", "train").items():
        assert row["closed_form_factor_per_layer"] == pytest.approx(1.0, rel=1e-12)
        assert 0.5 <= row["min_over_input"] and row["max_over_input"] <= 2.0, (p, row["measured_over_input"])


def test_without_dropout_he_is_steady_and_corrected_shrinks_as_p_to_the_depth(results):
    for p, row in rows(results, "he", "eval").items():
        assert 0.5 <= min(row["measured_over_input"]) and max(row["measured_over_input"]) <= 2.0
    for p, row in rows(results, "corrected", "eval").items():
        assert row["closed_form_factor_per_layer"] == pytest.approx(p, rel=1e-12)
        assert math.log(row["last_layer_measured"]) == pytest.approx(20 * math.log(p), rel=0.2)


def test_claim_and_flags(results):
    (claim,) = results["claims"]
    assert claim["id"] == "D1" and claim["verdict"].startswith("confirmed"), claim
    with pytest.raises(ValueError, match="keep_probs"):
        init_variance.run(init_variance.Config(keep_probs=(0.0,)))
