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


def test_gradient_memory_grows_with_resnet_depth_not_with_odenet_steps():
    """Table 1's memory column: backprop through L blocks stores O(L) activations; the continuous
    adjoint's gradient memory does not depend on how many steps the solver takes."""
    from experiments.classify import Config as ClassifyConfig
    from experiments.classify import load
    from experiments.table import Config, memory_vs_depth

    cfg = Config(channels=(4, 8), measure_batch=8, depths=(1, 4), memory_rtols=(1e-1, 1e-6))
    memory = memory_vs_depth(cfg, "digits", load(ClassifyConfig(dataset="digits")), ("resnet", "odenet"))
    resnet, odenet = memory["rows"]["resnet"], memory["rows"]["odenet"]
    assert [r["nfe_forward"] for r in resnet] == [2, 8]  # two stages of 1 and 4 Euler steps
    assert memory["memory_growth"]["resnet"] > 2
    assert odenet[1]["nfe_forward"] > odenet[0]["nfe_forward"]
    assert odenet[1]["grad_memory_bytes"] == odenet[0]["grad_memory_bytes"]
