"""D2: inactive units at init, dead units after a too-large learning rate, born-dead narrow nets."""

import jax
import jax.numpy as jnp
import pytest

from experiments import dead_units
from experiments.common import run_experiment

SMALL = ["--init-depth", "8", "--init-width", "128", "--hidden", "64", "64", "--learning-rates", "0.1",
         "--large-learning-rate", "0.1", "--epochs", "4", "--born-dead-depths", "1", "3", "12",
         "--born-dead-inputs", "21"]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("dead_units")
    r = run_experiment(dead_units.__name__, dead_units.Config, dead_units.run, dead_units.QUICK, SMALL + ["--out", str(out)])
    assert (out / "dead_units_overview.png").stat().st_size > 10_000
    return r


def test_unit_statistics_on_known_pre_activations():
    h = jnp.array([[1.0, -1.0, -1.0, -9.0], [-2.0, -1.0, 0.5, -8.0], [3.0, -2.0, -1.0, -7.0]])
    relu = dead_units.unit_statistics([h], jax.nn.relu, 1e-4)
    assert relu["inactive_per_input"] == [9 / 12]
    assert relu["negative_on_all"] == [0.5] and relu["dead"] == [0.5]
    leaky = dead_units.unit_statistics([h], dead_units.ACTIVATIONS["leaky_relu"], 1e-4)
    assert leaky["negative_on_all"] == [0.5] and leaky["dead"] == [0.0]  # slope 0.01 everywhere
    gelu = dead_units.unit_statistics([h], jax.nn.gelu, 1e-4)
    assert gelu["dead"] == [0.25]  # only the unit at h <= -7 on every input passes no gradient


def test_half_inactive_per_input_at_init(results):
    assert abs(results["init"]["mean_inactive_per_input"] - 0.5) <= 0.03
    assert max(results["init"]["dead"]) < 0.5  # dead on the whole set is a different, smaller number


def test_large_learning_rate_kills_relu_units_not_leaky_ones(results):
    runs = {(r["learning_rate"], r["activation"]): r for r in results["sweep"]}
    assert runs[0.1, "relu"]["dead"] > max(0.2, 2 * runs[0.1, "relu"]["dead_at_init"])
    assert all(r["dead"] == 0 for r in results["sweep"] if r["activation"] == "leaky_relu")
    # Leaky units can sit below zero on every input and still pass a gradient.
    assert runs[0.1, "leaky_relu"]["negative_on_all"] > 0
    for r in results["sweep"]:
        assert r["dead"] <= r["negative_on_all"] + 1e-12 or r["activation"] == "gelu"
        assert r["dead_at_init"] <= 0.2


def test_born_dead_within_bounds(results):
    for row in results["born_dead"]:
        alive = (1 - 2.0 ** -row["width"]) ** row["depth"]
        assert row["upper_bound"] == pytest.approx(1 - alive) and row["lower_bound"] == pytest.approx(max(0, 1 - 2 * alive))
        assert min(row["p_value_above_upper"], row["p_value_below_lower"]) > 1e-4, row
        if row["depth"] == 1:
            assert row["born_dead"] == 0  # one layer: the units dead for x > 0 are alive for x < 0
    deep = {r["width"]: r["born_dead"] for r in results["born_dead"] if r["depth"] == 12}
    assert deep[2] > deep[3] > deep[4] > 0.1


def test_claims_and_flags(results):
    ids = [c["id"] for c in results["claims"]]
    assert ids == ["D2", "D2-born-dead"]
    assert all(not c["verdict"].startswith("refuted") for c in results["claims"]), results["claims"]
    with pytest.raises(ValueError, match="large_learning_rate"):
        dead_units.run(dead_units.Config(learning_rates=(1e-3,), large_learning_rate=0.1))
