"""experiments.classify end to end with --quick on digits: a broken model cannot reach 90 %."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def classify(*args, out):
    return subprocess.run([sys.executable, "-m", "experiments.classify", "--quick", "--out",
                           str(out), *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=600)


@pytest.mark.parametrize("model", ["resnet", "odenet"])
def test_quick_digits_reaches_90_percent(model, tmp_path):
    done = classify("--dataset", "digits", "--model", model, out=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "classify.json").read_text())
    assert results["headline"]["test_acc"] >= 0.90
    assert results["params"] > 0 and len(results["history"]) == results["config"]["epochs"]
    if model == "odenet":
        assert results["nfe_forward"] >= 2 * 7  # two adaptive stages, at least one step each
    else:
        assert results["nfe_forward"] == 2 * results["config"]["blocks"]
    assert (tmp_path / f"classify_digits_{model}.png").stat().st_size > 0
    assert (tmp_path / f"classify_digits_{model}" / "metrics.jsonl").exists()


def test_mnist_without_directory_is_a_clear_error(tmp_path):
    done = classify("--dataset", "mnist", out=tmp_path)
    assert done.returncode != 0
    assert "--dataset mnist needs --mnist-dir" in done.stderr
    assert not (tmp_path / "classify.json").exists()

