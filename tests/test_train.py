"""Training: config checks, schedules, metrics, exact resume after SIGKILL / SIGTERM / SIGINT, one run
per directory, checkpoint fallback, refusals before any work, the default loss, the train step."""

import dataclasses
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from neuralode import data as datasets
from neuralode import rundir
from neuralode.checkpoints import UNUSABLE_DIR, host_arrays
from neuralode import train as training
from neuralode.data import Dataset
from neuralode.resume import (check_config_matches, check_model_config_matches, check_resumable,
                             run_identity)
from neuralode.rundir import CHECKPOINTS_DIR, METRICS_FILE, read_metrics
from neuralode.train import TrainConfig, learning_rate_schedule, make_train_state, make_train_step, train

sys.path.insert(0, os.path.dirname(__file__))
import train_script  # noqa: E402

SCRIPT = os.path.join(os.path.dirname(__file__), "train_script.py")
TOTAL_STEPS = 40  # 4 epochs of 10 batches


def without_timings(records):
    return [{k: v for k, v in r.items() if not k.endswith("seconds")} for r in records]


def assert_params_bitwise_equal(found: dict, expected: dict):
    assert found.keys() == expected.keys()
    for name in expected:
        assert found[name].dtype == expected[name].dtype == np.float64
        assert found[name].tobytes() == expected[name].tobytes(), name


def checkpoint_steps(workdir) -> list[int]:
    directory = workdir / CHECKPOINTS_DIR
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) if directory.is_dir() else []


def corrupt(step_directory):
    """Truncate every file of a checkpoint's state, as a torn write to disk would."""
    state = os.path.join(step_directory, "state")
    for root, _, files in os.walk(state):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "r+b") as f:
                f.truncate(os.path.getsize(path) // 2)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run: its workdir, final parameters and returned record."""
    workdir = tmp_path_factory.mktemp("reference")
    model = train_script.make_model()
    result = train(model, train_script.tiny_dataset(), train_script.CONFIG, workdir)
    return workdir, train_script.flat_params(model), result, model


def test_config_rejects_bad_values_by_name():
    for field, value, message in [
        ("epochs", 0, "TrainConfig.epochs: expected a positive integer, found 0"),
        ("batch_size", 2.5, "TrainConfig.batch_size: expected a positive integer, found 2.5"),
        ("learning_rate", -1.0, "TrainConfig.learning_rate: expected a finite number > 0, found -1.0"),
        ("learning_rate", float("inf"), "TrainConfig.learning_rate: expected a finite number > 0, found inf"),
        ("learning_rate", float("nan"), "TrainConfig.learning_rate: expected a finite number > 0, found nan"),
        ("learning_rate", "1e-3", "TrainConfig.learning_rate: expected a finite number > 0, found '1e-3'"),
        ("weight_decay", float("inf"), "TrainConfig.weight_decay: expected a finite number >= 0, found inf"),
        ("grad_clip_norm", float("nan"), "TrainConfig.grad_clip_norm: expected None or a finite number > 0"),
        ("schedule", "step", r"TrainConfig.schedule: unknown 'step', expected one of \('constant', 'cosine'\)"),
        ("optimizer", "lamb", "TrainConfig.optimizer: unknown 'lamb'"),
        ("weight_decay", -0.1, "TrainConfig.weight_decay: expected a finite number >= 0"),
        ("warmup_steps", -1, "TrainConfig.warmup_steps: expected an integer >= 0"),
        ("augment_shift", -1, "TrainConfig.augment_shift: expected an integer >= 0, found -1"),
        ("checkpoint_every", 0, "TrainConfig.checkpoint_every: expected a positive integer"),
        ("grad_clip_norm", 0.0, "TrainConfig.grad_clip_norm: expected None or a finite number > 0"),
        ("seed", -1, "TrainConfig.seed: expected an integer >= 0"),
    ]:
        with pytest.raises(ValueError, match=message):
            TrainConfig(**{field: value})


def test_learning_rate_schedules():
    with pytest.raises(ValueError, match="TrainConfig.warmup_steps: 10 is more than the run's 9 steps"):
        learning_rate_schedule(TrainConfig(warmup_steps=10), 9)  # was clamped: all warm-up, silently
    cosine = learning_rate_schedule(TrainConfig(learning_rate=0.1, schedule="cosine", warmup_steps=10), 110)
    np.testing.assert_allclose([cosine(0), cosine(5), cosine(10), cosine(60), cosine(110)],
                               [0.0, 0.05, 0.1, 0.05, 0.0], atol=1e-7)
    constant = learning_rate_schedule(TrainConfig(learning_rate=0.1, schedule="constant"), 50)
    np.testing.assert_allclose([constant(0), constant(49)], [0.1, 0.1], atol=1e-7)


def test_reference_run_learns_and_logs_every_epoch(reference):
    workdir, _, result, model = reference
    records = read_metrics(workdir)
    assert [r["epoch"] for r in records] == [1, 2, 3, 4]
    assert [r["step"] for r in records] == [10, 20, 30, 40]
    assert result == records[-1]
    assert records[-1]["train_loss"] < 0.5 * records[0]["train_loss"]
    assert records[-1]["train_accuracy"] >= 0.9 and records[-1]["test_accuracy"] >= 0.85
    lrs = [r["learning_rate"] for r in records]
    assert lrs == sorted(lrs, reverse=True) and lrs[-1] < 1e-4  # cosine decay to ~0
    assert checkpoint_steps(workdir) == [35, 40]  # keep the last 2
    assert model.dropout.deterministic  # left in eval mode
    # The returned test metrics are those of the final parameters.
    ds = train_script.tiny_dataset()
    logits = model(jnp.asarray(ds.x_test, dtype=jnp.float64))
    expected = float((np.argmax(np.asarray(logits), -1) == ds.y_test).mean())
    assert records[-1]["test_accuracy"] == pytest.approx(expected, abs=1e-12)


def test_sigkill_after_checkpoint_then_resume_is_bitwise_equal(reference, tmp_path):
    ref_workdir, ref_params, _, _ = reference
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    checkpoints = tmp_path / CHECKPOINTS_DIR
    first = subprocess.Popen([sys.executable, SCRIPT, str(tmp_path), "fresh"], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while not (checkpoints.is_dir() and any(p.name.isdigit() for p in checkpoints.iterdir())):
        assert first.poll() is None, first.stdout.read().decode()
        assert time.monotonic() < deadline, "no checkpoint within 120 s"
        time.sleep(0.002)
    first.send_signal(signal.SIGKILL)
    assert first.wait() == -signal.SIGKILL
    saved = sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit())
    assert saved and saved[-1] < TOTAL_STEPS, f"the run was not interrupted: checkpoints {saved}"
    assert not (tmp_path / "final_params.npz").exists()

    second = subprocess.run([sys.executable, SCRIPT, str(tmp_path), "resume"], env=env,
                            capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stdout + second.stderr
    with np.load(tmp_path / "final_params.npz") as resumed:
        assert_params_bitwise_equal(dict(resumed), ref_params)
    assert without_timings(read_metrics(tmp_path)) == without_timings(read_metrics(ref_workdir))


def test_resume_mid_epoch_with_shift_augmentation_is_bitwise_equal(reference, tmp_path):
    """The random shifts of a batch are drawn from (seed, epoch, batch), so a run resumed from a
    mid-epoch checkpoint sees the same augmented batches as the run that was never stopped."""
    config = dataclasses.replace(train_script.CONFIG, augment_shift=1, epochs=2, checkpoint_every=3,
                                 keep_checkpoints=100)
    whole = train_script.run(str(tmp_path / "whole"), config=config)
    stopped = tmp_path / "stopped"
    shutil.copytree(tmp_path / "whole" / CHECKPOINTS_DIR, stopped / CHECKPOINTS_DIR,
                    ignore=lambda _, names: [n for n in names if n.isdigit() and int(n) > 13])
    assert checkpoint_steps(stopped)[-1] == 12
    lines = (tmp_path / "whole" / METRICS_FILE).read_text().splitlines(keepends=True)
    (stopped / METRICS_FILE).write_text(lines[0])  # epoch 1 only: stopped in epoch 2
    resumed = train_script.run(str(stopped), resume=True, config=config)
    assert_params_bitwise_equal(train_script.flat_params(resumed), train_script.flat_params(whole))
    assert without_timings(read_metrics(stopped)) == without_timings(read_metrics(tmp_path / "whole"))
    plain = train_script.run(str(tmp_path / "plain"), config=dataclasses.replace(config, augment_shift=0))
    assert not np.array_equal(*(train_script.flat_params(m)["['out']['kernel'].value"]
                                for m in (plain, whole)))


def test_checkpoint_written_before_a_config_field_existed_resumes_with_its_default():
    saved = dataclasses.asdict(train_script.CONFIG)
    del saved["augment_shift"]  # checkpoints from before augmentation was added
    check_config_matches(saved, dataclasses.asdict(train_script.CONFIG))
    with pytest.raises(ValueError, match="augment_shift: checkpoint 0, now 1"):
        check_config_matches(saved, dataclasses.asdict(dataclasses.replace(train_script.CONFIG, augment_shift=1)))


def test_corrupt_latest_checkpoint_falls_back_to_previous(reference, tmp_path):
    ref_workdir, ref_params, _, _ = reference
    workdir = tmp_path / "run"
    shutil.copytree(ref_workdir, workdir)
    corrupt(workdir / CHECKPOINTS_DIR / "40")
    model = train_script.make_model()
    with pytest.warns(RuntimeWarning) as caught:
        train(model, train_script.tiny_dataset(), train_script.CONFIG, workdir, resume=True)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 2
    assert f"{CHECKPOINTS_DIR}/40 is unusable" in messages[0] and "trying the previous one" in messages[0]
    assert "moved unusable checkpoint of step 40 to" in messages[1]
    # Restored step 35, trained the last 5 steps again, and got the same parameters.
    assert_params_bitwise_equal(train_script.flat_params(model), ref_params)
    assert without_timings(read_metrics(workdir)) == without_timings(read_metrics(ref_workdir))
    assert checkpoint_steps(workdir) == [35, 40]
    (aside,) = os.listdir(workdir / UNUSABLE_DIR)  # kept for inspection, not deleted
    assert aside.startswith("40-")


def test_resume_of_a_finished_run_skips_a_torn_metrics_line(reference, tmp_path):
    ref_workdir, ref_params, ref_result, _ = reference
    workdir = tmp_path / "run"
    shutil.copytree(ref_workdir, workdir)
    with open(workdir / METRICS_FILE, "a") as f:
        f.write('{"epoch": 5, "st')  # killed while appending
    model = train_script.make_model()
    with pytest.warns(RuntimeWarning, match="skipping an incomplete last line"):
        result = train(model, train_script.tiny_dataset(), train_script.CONFIG, workdir, resume=True)
    assert result == ref_result
    assert_params_bitwise_equal(train_script.flat_params(model), ref_params)
    assert (workdir / METRICS_FILE).read_text() == (ref_workdir / METRICS_FILE).read_text()


def test_resume_without_usable_checkpoint_is_a_clear_error(reference, tmp_path):
    ref_workdir, _, _, _ = reference
    data = train_script.tiny_dataset()
    with pytest.raises(FileNotFoundError, match=f"resume=True but .*{CHECKPOINTS_DIR} holds no checkpoint"):
        train(train_script.make_model(), data, train_script.CONFIG, tmp_path / "empty", resume=True)
    workdir = tmp_path / "run"
    shutil.copytree(ref_workdir, workdir)
    for step in ("35", "40"):
        corrupt(workdir / CHECKPOINTS_DIR / step)
    with pytest.warns(RuntimeWarning, match="unusable"):
        with pytest.raises(RuntimeError, match=r"none of the 2 checkpoints .* can be restored:\n  step 40: .*\n  step 35: "):
            train(train_script.make_model(), data, train_script.CONFIG, workdir, resume=True)
    assert read_metrics(workdir) == read_metrics(ref_workdir)  # nothing was lost or rewritten


def test_workdir_and_config_mismatches_are_refused(reference, tmp_path):
    ref_workdir, _, _, _ = reference
    data = train_script.tiny_dataset()
    with pytest.raises(FileExistsError, match="already holds a run .* pass resume=True"):
        train(train_script.make_model(), data, train_script.CONFIG, ref_workdir)
    workdir = tmp_path / "run"
    shutil.copytree(ref_workdir, workdir)
    changed = dataclasses.replace(train_script.CONFIG, batch_size=8)
    with pytest.raises(ValueError, match="config: resuming with settings that differ .*batch_size: checkpoint 16, now 8"):
        train(train_script.make_model(), data, changed, workdir, resume=True)
    smaller = data._replace(x_train=data.x_train[:80], y_train=data.y_train[:80])
    with pytest.raises(ValueError, match=r"dataset: checkpoint was trained on .*'train': \[160, 8, 1\]"):
        train(train_script.make_model(), smaller, train_script.CONFIG, workdir, resume=True)
    # the same name and shapes, other contents (another split; Fashion-MNIST in an MNIST directory)
    other = data._replace(x_train=data.x_train[::-1])
    with pytest.raises(ValueError, match=r"dataset: checkpoint was trained on .*'checksum': \d+\}, now "
                                         r".*'checksum': \d+\}"):
        train(train_script.make_model(), other, train_script.CONFIG, workdir, resume=True)
    identity = run_identity(train_script.CONFIG, data, None)
    older = {**identity, "dataset": {k: v for k, v in identity["dataset"].items() if k != "checksum"}}
    check_resumable(older, identity, None)  # a checkpoint from before the checksum: not compared


def test_resume_with_another_model_config_is_refused(tmp_path):
    """Settings outside TrainConfig (a solver tolerance, a regulariser weight) are saved with the
    checkpoints; resuming with other values is refused and names them (tuples compare as lists)."""
    data = train_script.tiny_dataset()
    config = dataclasses.replace(train_script.CONFIG, epochs=1)
    settings = {"rtol": 1e-5, "kinetic_weight": 1e-4, "channels": (8, 16)}
    train(train_script.make_model(), data, config, tmp_path, model_config=settings)
    train(train_script.make_model(), data, config, tmp_path, resume=True, model_config=dict(settings))
    changed = {**settings, "kinetic_weight": 1e-5, "norm": True}
    with pytest.raises(ValueError, match=r"model_config: resuming with settings that differ from the "
                       r"checkpointed run \(kinetic_weight: checkpoint 0.0001, now 1e-05, norm: checkpoint None, now True\)"):
        train(train_script.make_model(), data, config, tmp_path, resume=True, model_config=changed)
    check_model_config_matches(None, changed)  # checkpoints from before the record: not compared


def test_model_with_wrong_logits_is_refused(tmp_path):
    data = train_script.tiny_dataset()
    model = train_script.MLP(8, 16, 3, rngs=nnx.Rngs(0))  # 3 logits for 4 classes
    with pytest.raises(ValueError, match=r"model: maps a batch of 2 inputs \(8, 1\) to \(2, 3\), expected logits of shape \(2, 4\) \(or pass a loss_fn"):
        train(model, data, train_script.CONFIG, tmp_path)


def test_labels_outside_the_classes_raise_or_make_the_loss_nan():
    """A label -1 (the usual "ignore") was read as the last class: a finite loss for the wrong
    target in a loop of the user's, where `train`'s check of the data set does not run."""
    logits = jnp.array([[2.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
    metrics = jax.jit(training.classification_metrics)
    for labels in ([0, -1], [0, 3]):
        with pytest.raises(ValueError, match=rf"labels: labels in \[{min(labels)}, {max(labels)}\], "
                                             r"but the logits have 3 classes, so they must lie in \[0, 2\]"):
            training.classification_metrics(logits, jnp.array(labels))
        assert jnp.isnan(metrics(logits, jnp.array(labels))[0])
    # in range: the cross-entropy, -log softmax(2, 0, 0)_0 for both rows
    np.testing.assert_allclose(metrics(logits, jnp.array([0, 1]))[0], np.log(1 + 2 * np.exp(-2.0)),
                               rtol=1e-6)


def test_custom_loss_fn_adds_regulariser_and_metrics(tmp_path):
    """The hook an ODE model uses: extra loss terms and extra metrics (e.g. NFE) logged per epoch."""

    def loss_fn(model, x, y):
        loss, metrics = training.classification_metrics(model(x), y)
        squares = sum(jnp.sum(p**2) for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
        nfe = jnp.asarray(x.shape[0], dtype=jnp.float64)  # stands in for a per-batch statistic
        return loss + 1e-3 * squares, {**metrics, "squares": squares, "nfe": nfe}

    config = dataclasses.replace(train_script.CONFIG, epochs=2, checkpoint_every=100)
    model = train_script.make_model()
    result = train(model, train_script.tiny_dataset(), config, tmp_path, loss_fn=loss_fn)
    # 160 examples in batches of 16: every batch holds 16; 40 test examples in one batch of 40.
    assert result["train_nfe"] == 16.0 and result["test_nfe"] == 40.0
    final_squares = sum(float(np.sum(p**2)) for p in train_script.flat_params(model).values())
    assert result["test_squares"] == pytest.approx(final_squares, rel=1e-12)
    assert {"train_loss", "train_accuracy", "test_loss", "test_accuracy"} <= result.keys()

    def bad_loss(model, x, y):
        loss, metrics = training.classification_metrics(model(x), y)
        return loss, {**metrics, "per_example": jnp.zeros(x.shape[0])}

    with pytest.raises(ValueError, match=r"loss_fn: metric 'per_example' has shape \(16,\), expected a scalar"):
        train(train_script.make_model(), train_script.tiny_dataset(), config, tmp_path / "bad", loss_fn=bad_loss)


# --- one run per directory; SIGTERM and SIGINT save the current step --------------------------------


def test_sigterm_saves_the_current_step_and_a_second_run_meanwhile_is_refused(reference, tmp_path):
    """A run frozen (SIGSTOP) while it holds the directory: a second fresh run with another seed and
    a resume both fail at once, naming the directory and the holder. SIGTERM then makes the first
    save the step it is on and exit with 143; resuming ends bit for bit where an uninterrupted run
    ends."""
    ref_workdir, ref_params, _, _ = reference
    data = train_script.tiny_dataset()
    lock_file = tmp_path / rundir.LOCK_FILE
    first = subprocess.Popen([sys.executable, SCRIPT, str(tmp_path), "fresh"], env={**os.environ, "JAX_PLATFORMS": "cpu"},
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (lock_file.exists() and lock_file.read_text()):
            assert first.poll() is None, first.communicate()
            assert time.monotonic() < deadline, "the run did not take its lock within 120 s"
            time.sleep(0.002)
        first.send_signal(signal.SIGSTOP)
        holder = rf"workdir {tmp_path} is in use by another training run \(pid {first.pid} on host "
        for config, resume in [(dataclasses.replace(train_script.CONFIG, seed=2), False), (train_script.CONFIG, True)]:
            with pytest.raises(rundir.RunDirectoryLocked, match=holder):
                train(train_script.make_model(), data, config, tmp_path, resume=resume)
    finally:
        first.send_signal(signal.SIGTERM)
        first.send_signal(signal.SIGCONT)
    _, stderr = first.communicate(timeout=120)
    assert first.returncode == 143, stderr
    (step,) = map(int, re.findall(r"SIGTERM received: saved the checkpoint of step (\d+) in ", stderr))
    assert step in checkpoint_steps(tmp_path) and step < TOTAL_STEPS
    assert not (tmp_path / "final_params.npz").exists() and lock_file.read_text() == ""
    resumed = train_script.run(str(tmp_path), resume=True)
    assert_params_bitwise_equal(train_script.flat_params(resumed), ref_params)
    assert without_timings(read_metrics(tmp_path)) == without_timings(read_metrics(ref_workdir))


def test_sigint_saves_the_current_step_then_raises_keyboard_interrupt(reference, tmp_path, monkeypatch, capsys):
    """Ctrl-C while step 13 runs (mid-epoch 2, between the scheduled checkpoints 7 and 14): the
    step finishes, is saved, and KeyboardInterrupt follows; the resumed run is bitwise the reference."""
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signals reach Python handlers only in the main thread")
    ref_workdir, ref_params, _, _ = reference
    yielded = []

    def batches_interrupted_at_step_13(x, y, batch_size, rng=None, *, start=0, fill=False):
        for batch in datasets.batches(x, y, batch_size, rng, start=start, fill=fill):
            if rng is not None:  # training, not evaluation
                yielded.append(1)
                if len(yielded) == 13:
                    current = signal.getsignal(signal.SIGINT)
                    assert getattr(current, "__name__", None) == "_handle", f"SIGINT handler: {current!r}"
                    signal.raise_signal(signal.SIGINT)  # to this (the main) thread, before it returns
            yield batch

    monkeypatch.setattr(training, "batches", batches_interrupted_at_step_13)
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        train_script.run(str(tmp_path))
    assert signal.getsignal(signal.SIGINT) is handler  # restored
    assert f"SIGINT received: saved the checkpoint of step 13 in {tmp_path / CHECKPOINTS_DIR}" in capsys.readouterr().err
    assert checkpoint_steps(tmp_path) == [7, 13] and [r["epoch"] for r in read_metrics(tmp_path)] == [1]
    monkeypatch.undo()
    resumed = train_script.run(str(tmp_path), resume=True)
    assert_params_bitwise_equal(train_script.flat_params(resumed), ref_params)
    assert without_timings(read_metrics(tmp_path)) == without_timings(read_metrics(ref_workdir))


# --- refusals before any work --------------------------------------------------------------------


def test_a_diverging_run_writes_no_checkpoint_of_non_finite_parameters(tmp_path):
    config = dataclasses.replace(train_script.CONFIG, learning_rate=1e300, optimizer="sgd", epochs=1)
    with pytest.raises(FloatingPointError, match=r"training diverged: at step 7, \['model'\]\['hidden'\]\['bias'\]"
                       r"\.value holds \d+ non-finite value\(s\) of 32; no checkpoint was written \(the last one is of step 1\)"):
        train(train_script.make_model(), train_script.tiny_dataset(), config, tmp_path)
    assert checkpoint_steps(tmp_path) == [1]  # orbax saves the first step; its parameters were still finite


def test_a_failed_ode_solve_stops_the_run_before_its_step_is_saved(tmp_path):
    # The models report failures (failed_solves) from inside the compiled step; train raises them.
    from neuralode.adjoints import CheckpointAdjoint
    from neuralode.models import ODENet
    model = ODENet(1, 4, channels=(4,), spatial_dims=1, rtol=1e-9, atol=1e-9, max_steps=3,
                   adjoint=CheckpointAdjoint(), rngs=nnx.Rngs(0))
    config = dataclasses.replace(train_script.CONFIG, checkpoint_every=1)
    with pytest.raises(RuntimeError, match=r"step 1: an ODE solve of the model failed \(failed_solves = 1"):
        train(model, train_script.tiny_dataset(), config, tmp_path)
    assert checkpoint_steps(tmp_path) == []


def test_shifts_as_large_as_the_input_batches_larger_than_the_data_and_an_empty_split_are_refused(tmp_path):
    data = train_script.tiny_dataset()  # sequences of length 8
    too_far = dataclasses.replace(train_script.CONFIG, augment_shift=8)
    with pytest.raises(ValueError, match=r"TrainConfig.augment_shift: 8 is not below the spatial size 8 of the "
                                         r"inputs \(8, 1\); a shift that large moves whole examples out"):
        train(train_script.make_model(), data, too_far, tmp_path / "shift")
    # a batch of 161 from 160 examples would hold every example once and one twice (weighted)
    too_large = dataclasses.replace(train_script.CONFIG, batch_size=len(data.x_train) + 1)
    with pytest.raises(ValueError, match=r"batch_size: 161 is more than the 160 examples, so every batch would "
                                         r"repeat examples; use at most 160"):
        train(train_script.make_model(), data, too_large, tmp_path / "batch")
    empty = data._replace(x_train=data.x_train[:0], y_train=data.y_train[:0])
    with pytest.raises(ValueError, match="dataset 'blobs': x_train holds no examples; training needs at least one"):
        train(train_script.make_model(), empty, train_script.CONFIG, tmp_path / "empty")
    assert not any(os.path.exists(tmp_path / name) for name in ("shift", "batch", "empty"))


def test_resume_with_another_architecture_names_the_arrays_and_nothing_else_is_printed(reference, tmp_path):
    """The shapes recorded with the checkpoint are compared before any array is read: one error
    naming the arrays, no checkpoint reported unusable, no orbax noise after it."""
    ref_workdir, _, _, _ = reference
    shutil.copytree(ref_workdir, tmp_path / "run")
    done = subprocess.run([sys.executable, SCRIPT, str(tmp_path / "run"), "resume", "64"], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert done.returncode == 1
    assert done.stderr.count("Traceback") == 1 and "Event loop is closed" not in done.stderr, done.stderr
    assert "unusable" not in done.stderr and not (tmp_path / "run" / UNUSABLE_DIR).exists()
    assert ("ValueError: model: its arrays differ from the checkpointed run's (built with other settings?):\n"
            "  ['model']['hidden']['bias'].value: checkpoint (32,) float64, now (64,) float64\n"
            "  ['model']['hidden']['kernel'].value: checkpoint (8, 32) float64, now (8, 64) float64\n"
            "  ['model']['out']['kernel'].value: checkpoint (32, 4) float64, now (64, 4) float64\n") in done.stderr
    assert checkpoint_steps(tmp_path / "run") == [35, 40]


# --- the default loss, any loss, the train step ----------------------------------------------------


class RegularisedMLP(train_script.MLP):
    """The protocol of neuralode.models' classifiers: `forward(x) -> (logits, stats)`, with an
    RNODE-like `regularisation` in the stats (here a weight on the squared kernels)."""

    def __init__(self, weight: float, **kwargs):
        super().__init__(8, 32, 4, **kwargs)
        self.weight = weight

    def forward(self, x):
        squares = jnp.sum(self.hidden.kernel[...] ** 2) + jnp.sum(self.out.kernel[...] ** 2)
        return self(x), {"regularisation": self.weight * squares, "squares": squares}


def test_default_loss_trains_the_regulariser_of_models_with_forward(tmp_path):
    data = train_script.tiny_dataset()
    config = dataclasses.replace(train_script.CONFIG, epochs=2, weight_decay=0.0)
    model = RegularisedMLP(0.05, rngs=nnx.Rngs(0))
    squares = lambda: float(model.forward(jnp.asarray(data.x_test[:1], jnp.float64))[1]["squares"])
    initial = squares()  # 36.5; 2 epochs without the penalty end at 38.2
    result = train(model, data, config, tmp_path)
    # The loss minimised per batch is cross-entropy + regularisation, so are their epoch means.
    assert result["train_loss"] == pytest.approx(result["train_cross_entropy"] + result["train_regularisation"],
                                                 rel=1e-12)
    assert result["train_regularisation"] > 0.01 * result["train_cross_entropy"]
    assert squares() < 0.8 * initial  # the gradient saw the penalty

    class TupleForward(train_script.MLP):
        def forward(self, x):
            return self(x)

    with pytest.raises(ValueError, match=r"model: the default loss calls `logits, stats = model.forward\(x\)` .* "
                                         r"but TupleForward.forward returns an array of shape \(2, 4\); pass a loss_fn"):
        train(TupleForward(8, 16, 4, rngs=nnx.Rngs(0)), data, config, tmp_path / "forward")


def test_regression_targets_with_a_custom_loss(tmp_path):
    """Float targets of shape (N, 2) and an MSE loss: no class labels are assumed. Every training
    batch is full, so the step is compiled once."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(96, 3))
    y = np.tanh(x @ rng.normal(size=(3, 2))) + 0.5
    data = Dataset(x[:60], y[:60], x[60:], y[60:], 0, "regression")
    model = nnx.Sequential(nnx.Linear(3, 32, param_dtype=jnp.float64, rngs=nnx.Rngs(0)), jnp.tanh,
                           nnx.Linear(32, 2, param_dtype=jnp.float64, rngs=nnx.Rngs(1)))

    traced_batch_sizes = set()

    def mse(model, x, y):
        traced_batch_sizes.add(x.shape[0])
        loss = jnp.mean((model(x) - y) ** 2)
        return loss, {"loss": loss}

    config = TrainConfig(epochs=40, batch_size=16, learning_rate=1e-2, schedule="constant", weight_decay=0.0,
                         progress=False)
    result = train(model, data, config, tmp_path / "mse", loss_fn=mse)
    records = read_metrics(tmp_path / "mse")
    assert records[-1]["train_loss"] < 0.02 * records[0]["train_loss"]
    assert result["test_loss"] < 0.1 * float(np.var(y[60:], axis=0).mean())  # R^2 > 0.9 on held-out data
    # 60 examples in batches of 16: the last batch is filled, so the step is traced for 16 only
    # (36 is the test split, evaluated in one batch)
    assert traced_batch_sizes == {16, 36}
    with pytest.raises(ValueError, match=r"y_train of shape \(60, 2\) and dtype float64: the default classification "
                                         r"loss needs one integer label per example.*pass a loss_fn"):
        train(model, data, config, tmp_path / "default")


def test_train_step_is_pure_and_equals_an_nnx_optimizer_loop():
    data = train_script.tiny_dataset()
    x, y = jnp.asarray(data.x_train[:16], jnp.float64), jnp.asarray(data.y_train[:16])
    model = train_script.make_model()
    model.train()  # Dropout draws from the model's RNG stream, which the state carries
    graphdef, state = make_train_state(model, optax.adamw(1e-2))
    step = make_train_step(graphdef, training.classification_loss)
    before = host_arrays(state)
    first, metrics = step(state, x, y)
    again, _ = step(state, x, y)
    assert all(np.array_equal(before[k], v) for k, v in host_arrays(state).items())  # the input is untouched
    assert all(np.array_equal(host_arrays(first)[k], v) for k, v in host_arrays(again).items())  # same in, same out
    assert set(metrics) == {"loss", "cross_entropy", "accuracy"}
    for _ in range(3):
        first, _ = step(first, x, y)
    nnx.update(model, first["model"])

    reference = train_script.make_model()
    reference.train()
    optimizer = nnx.Optimizer(reference, optax.adamw(1e-2), wrt=nnx.Param)

    @nnx.jit
    def nnx_step(model, optimizer, x, y):
        grads = nnx.grad(lambda m: training.classification_loss(m, x, y)[0])(model)
        optimizer.update(model, grads)

    for _ in range(4):
        nnx_step(reference, optimizer, x, y)
    assert_params_bitwise_equal(train_script.flat_params(model), train_script.flat_params(reference))


def test_gradient_metrics_measure_the_gradient_the_step_applies():
    """With SGD at learning rate 1 the parameters move by minus the gradient, whose norm the step
    reports through `gradient_metrics` (computed from the same gradient, not a second one)."""
    data = train_script.tiny_dataset()
    x, y = jnp.asarray(data.x_train[:16], jnp.float64), jnp.asarray(data.y_train[:16])
    model = train_script.make_model()
    model.eval()
    graphdef, state = make_train_state(model, optax.sgd(1.0))
    norm = lambda tree: jnp.sqrt(sum(jnp.sum(leaf ** 2) for leaf in jax.tree.leaves(tree)))  # noqa: E731
    step = make_train_step(graphdef, training.classification_loss,
                           gradient_metrics=lambda grads: {"gradient_norm": norm(grads)})
    after, metrics = step(state, x, y)
    assert set(metrics) == {"loss", "cross_entropy", "accuracy", "gradient_norm"}
    moved = jax.tree.map(lambda a, b: a - b, nnx.state(after["model"], nnx.Param),
                         nnx.state(state["model"], nnx.Param))
    np.testing.assert_allclose(float(metrics["gradient_norm"]), float(norm(moved)), rtol=1e-12)
