"""experiments.classify end to end with --quick on digits: a broken model cannot reach 90 %; the
flags reach the model and the training run."""
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import xla_flags_for_long_runs

from neuralode.rundir import METRICS_FILE, checkpoints_dir

ROOT = Path(__file__).resolve().parents[1]


def classify(*args, out):
    # Training runs long enough that XLA's optimised CPU code pays for its compilation: without
    # conftest's optimisation level 0 the ODE-Net run takes 113 s of CPU instead of 155.
    # Its own compilation cache: the user's (~/.cache/neuralode/jax) is neither read nor filled.
    return subprocess.run([sys.executable, "-m", "experiments.classify", "--quick", "--out",
                           str(out), *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags_for_long_runs(),
                               "JAX_COMPILATION_CACHE_DIR": str(out / "jax-cache")}, timeout=600)


@pytest.mark.parametrize("model", ["resnet", "odenet"])
def test_quick_digits_reaches_90_percent(model, tmp_path):
    # Every 45 steps (each save costs ~0.14 s): the kept checkpoints of the 230 steps are 180, 225
    # and the last, so one of them lies between two epochs' ends (23 steps each).
    done = classify("--dataset", "digits", "--model", model, "--checkpoint-every", "45", out=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "classify.json").read_text())
    assert f"wrote {tmp_path / 'classify.json'}" in done.stdout
    assert f"wrote {tmp_path / f'classify_digits_{model}.png'}" in done.stdout
    assert results["headline"]["test_acc"] >= 0.90
    assert results["params"] > 0 and len(results["history"]) == results["config"]["epochs"]
    if model == "odenet":
        assert results["nfe_forward"] >= 2 * 7  # two adaptive stages, at least one step each
    else:
        assert results["nfe_forward"] == 2 * results["config"]["blocks"]
    assert (tmp_path / f"classify_digits_{model}.png").stat().st_size > 0
    assert (tmp_path / f"classify_digits_{model}" / METRICS_FILE).exists()
    # --checkpoint-every reaches the training run: a checkpoint between two epochs' ends at a
    # multiple of 45 steps (the default saves every 100).
    steps_per_epoch = results["history"][0]["step"]
    saved = [int(p.name) for p in Path(checkpoints_dir(tmp_path / f"classify_digits_{model}")).iterdir()
             if p.name.isdigit()]
    assert any(s % 45 == 0 and s % steps_per_epoch for s in saved), (saved, steps_per_epoch)


def test_mnist_without_directory_is_a_clear_error(tmp_path):
    done = classify("--dataset", "mnist", out=tmp_path)
    assert done.returncode != 0
    assert "--dataset mnist needs --mnist-dir" in done.stderr
    assert not (tmp_path / "classify.json").exists()



def test_the_model_flags_are_a_model_spec():
    from experiments.classify import Config, model_spec
    from neuralode.models import ModelSpec

    cfg = Config(model="odenet", augment_channels=4, rtol=1e-5, solver="Tsit5")
    spec = model_spec(cfg)
    assert spec == ModelSpec(model="odenet", augment_channels=4, rtol=1e-5, solver="Tsit5")
    defaults = {f.name: f.default for f in dataclasses.fields(Config)}
    assert all(defaults[f.name] == f.default for f in dataclasses.fields(ModelSpec))
