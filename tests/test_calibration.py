"""D4: temperature scaling of an overconfident ResNet on MNIST-1D."""

import numpy as np
import pytest

from experiments import calibration
from experiments.common import run_experiment

# One step per epoch at a large learning rate: the best validation NLL comes at about epoch 40 of 60.
SMALL = ["--channels", "16", "16", "--blocks", "1", "--train-examples", "100", "--validation", "300", "--epochs", "60",
         "--learning-rate", "1e-2"]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("calibration")
    r = run_experiment(calibration.__name__, calibration.Config, calibration.run, calibration.QUICK,
                       SMALL + ["--out", str(out)])
    assert (out / "calibration_reliability.png").stat().st_size > 10_000
    return r


def test_ece_by_hand():
    probs = np.full((10, 2), 0.1)
    probs[:, 0] = 0.9  # confidence 0.9 in the bin (13/15, 14/15]
    logits = np.log(probs)
    labels = np.array([0] * 9 + [1])
    ece, table = calibration.expected_calibration_error(logits, labels, 15)
    assert ece == pytest.approx(0.0, abs=1e-12) and table[0]["count"] == 10
    assert calibration.expected_calibration_error(logits, np.zeros(10, int), 15)[0] == pytest.approx(0.1)
    mixed = np.log(np.array([[0.9, 0.1]] * 10 + [[0.6, 0.4]] * 10))
    ece, table = calibration.expected_calibration_error(mixed, np.zeros(20, int), 15)
    assert ece == pytest.approx(0.5 * 0.1 + 0.5 * 0.4) and len(table) == 2
    assert calibration.nll(np.log(probs), labels) == pytest.approx(-(9 * np.log(0.9) + np.log(0.1)) / 10)


def test_temperature_fit_recovers_a_known_temperature():
    rng = np.random.default_rng(0)
    logits = 3.0 * rng.standard_normal((20000, 10))
    probs = calibration.softmax(logits / 2.5)
    labels = (probs.cumsum(axis=1) < rng.random((20000, 1))).sum(axis=1)  # samples of softmax(z / 2.5)
    assert calibration.fit_temperature(logits, labels) == pytest.approx(2.5, rel=0.05)


def test_temperature_changes_confidence_not_predictions(results):
    t = results["temperature"]
    assert results["argmax_identical"]
    assert results["test"]["before"]["accuracy"] == results["test"]["after"]["accuracy"]
    assert t > 1  # trained past its best NLL: overconfident
    assert results["best_validation_epoch"] < results["config"]["epochs"]
    assert results["validation"]["nll_after"] <= results["validation"]["nll_before"]
    assert results["test"]["after"]["mean_confidence"] < results["test"]["before"]["mean_confidence"]
    for key in ("before", "after"):
        table = results["test"][key]["reliability"]
        assert sum(b["count"] for b in table) == 1000
        ece = sum(b["count"] / 1000 * abs(b["accuracy"] - b["confidence"]) for b in table)
        assert ece == pytest.approx(results["test"][key]["ece"], rel=1e-9)


def test_claim_and_flags(results):
    (claim,) = results["claims"]
    assert claim["id"] == "D4"
    with pytest.raises(ValueError, match="train_examples"):
        calibration.run(calibration.Config(train_examples=3500, validation=1000))
