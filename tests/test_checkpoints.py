"""Checkpoint storage and the run directory: checksums caught on restore, refusal of non-finite
states, writability checked before training, the run lock, and the metrics file's errors."""

import dataclasses
import os
import shutil
import socket
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from neuralode import rundir
from neuralode.checkpoints import CheckpointStore, layout_differences
from neuralode.rundir import CHECKPOINTS_DIR, LOCK_FILE, METRICS_FILE, RunDirectoryLocked, read_metrics
from neuralode.train import train

sys.path.insert(0, os.path.dirname(__file__))
import train_script  # noqa: E402

CONFIG = dataclasses.replace(train_script.CONFIG, epochs=2)  # 20 steps: checkpoints 14 and 20 kept


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished two-epoch run and its final parameters."""
    workdir = tmp_path_factory.mktemp("finished")
    return workdir, train_script.flat_params(train_script.run(str(workdir), config=CONFIG))


def test_a_flipped_bit_is_caught_by_its_checksum_and_the_previous_checkpoint_is_used(finished, tmp_path):
    workdir, params = finished
    shutil.copytree(workdir, tmp_path / "run")
    data = tmp_path / "run" / CHECKPOINTS_DIR / "20" / "state" / "ocdbt.process_0" / "d"
    largest = max(data.iterdir(), key=lambda p: p.stat().st_size)  # the arrays' bytes
    raw = bytearray(largest.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    largest.write_bytes(raw)
    with pytest.warns(RuntimeWarning) as caught:
        resumed = train_script.run(str(tmp_path / "run"), resume=True, config=CONFIG)
    messages = [str(w.message) for w in caught]
    assert f"{CHECKPOINTS_DIR}/20 is unusable (ValueError: the data of " in messages[0]
    assert "do not match the checksum saved with them (the file was corrupted on disk)" in messages[0]
    assert "moved unusable checkpoint of step 20" in messages[1]
    # Restored step 14, trained the last 6 steps again: the same parameters, bit for bit.
    found = train_script.flat_params(resumed)
    assert all(found[k].tobytes() == params[k].tobytes() for k in params)


def test_a_state_with_non_finite_values_is_never_saved(tmp_path):
    with CheckpointStore(tmp_path, keep=2, every=1) as store:
        assert store.save(1, {"w": jnp.ones(3), "b": jnp.zeros(2)}, {"step": 1})
        with pytest.raises(FloatingPointError, match=r"at step 2, \['w'\] holds 1 non-finite value\(s\) of 3; no "
                                                     r"checkpoint was written \(the last one is of step 1\)"):
            store.save(2, {"w": jnp.array([1.0, jnp.nan, 2.0]), "b": jnp.zeros(2)}, {"step": 2})
        assert store.steps() == [1]
        assert not store.save(1, {"w": jnp.ones(3), "b": jnp.zeros(2)}, {"step": 1})  # saved already


def test_layout_differences_name_each_array():
    saved = {"['a']": {"shape": [2, 3], "dtype": "float64"}, "['b']": {"shape": [4], "dtype": "float64"},
             "['c']": {"shape": [], "dtype": "int32"}}
    state = {"a": jnp.zeros((2, 3)), "b": jnp.zeros(5), "d": jnp.zeros(1, jnp.float32)}
    assert layout_differences(saved, state) == [
        "['b']: checkpoint (4,) float64, now (5,) float64",
        "['c']: only in the checkpoint",
        "['d']: not in the checkpoint",
    ]


# --- writability, checked before training ----------------------------------------------------------


@pytest.fixture
def read_only(tmp_path):
    """Make a directory read-only: by its mode, or, for root (which ignores modes), by a read-only
    bind mount; skip where neither works."""
    mounted = []

    def make(path):
        os.chmod(path, 0o555)
        try:
            (path / "probe").touch()
        except PermissionError:
            return
        (path / "probe").unlink()
        os.chmod(path, 0o755)
        if subprocess.run(["mount", "--bind", "-o", "ro", str(path), str(path)], capture_output=True).returncode:
            pytest.skip("cannot make a directory read-only here (root without mount)")
        mounted.append(path)

    yield make
    for path in mounted:
        subprocess.run(["umount", str(path)], check=True)
    for root, dirs, _ in os.walk(tmp_path):
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o755)


def test_read_only_checkpoints_are_refused_before_training(finished, tmp_path, read_only):
    workdir, _ = finished
    shutil.copytree(workdir, tmp_path / "run")
    metrics = (tmp_path / "run" / METRICS_FILE).read_text()
    read_only(tmp_path / "run" / CHECKPOINTS_DIR)
    with pytest.raises(OSError, match=rf"checkpoint directory {tmp_path / 'run' / CHECKPOINTS_DIR} is not "
                                      r"writable \(.*\); nothing was trained"):
        train(train_script.make_model(), train_script.tiny_dataset(), CONFIG, tmp_path / "run", resume=True)
    assert (tmp_path / "run" / METRICS_FILE).read_text() == metrics


def test_a_full_disk_is_refused_before_training(tmp_path, monkeypatch):
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=100_000))
    with pytest.raises(OSError, match=r"checkpoint directory .*: 0.1 MiB free, a checkpoint needs about 1.0 MiB; "
                                      "nothing was trained"):
        train(train_script.make_model(), train_script.tiny_dataset(), CONFIG, tmp_path)
    assert not (tmp_path / METRICS_FILE).exists()


# --- the run directory ----------------------------------------------------------------------------


def test_the_lock_is_exclusive_names_its_holder_and_is_released(tmp_path):
    with rundir.lock(tmp_path):
        holder = (tmp_path / LOCK_FILE).read_text()
        assert holder.startswith(f"pid {os.getpid()} on host {socket.gethostname()}, since ")
        with pytest.raises(RunDirectoryLocked, match=rf"workdir {tmp_path} is in use by another training run "
                                                     rf"\(pid {os.getpid()} on host .*\); wait for it to finish"):
            with rundir.lock(tmp_path):
                pass
    assert (tmp_path / LOCK_FILE).read_text() == ""
    # A holder killed with SIGKILL leaves its pid in the file, but the kernel released its lock.
    killed = subprocess.run([sys.executable, "-c", (
        "import fcntl, os, signal, sys\n"
        "f = open(sys.argv[1], 'a+'); fcntl.flock(f, fcntl.LOCK_EX); f.write('pid %d' % os.getpid()); f.flush()\n"
        "os.kill(os.getpid(), signal.SIGKILL)"), str(tmp_path / LOCK_FILE)])
    assert killed.returncode == -9 and (tmp_path / LOCK_FILE).read_text().startswith("pid ")
    with rundir.lock(tmp_path):
        assert (tmp_path / LOCK_FILE).read_text().startswith(f"pid {os.getpid()} ")


def test_a_corrupt_metrics_line_is_named(tmp_path):
    (tmp_path / METRICS_FILE).write_text('{"epoch": 1}\n{"epoch": 2, oops}\n{"epoch": 3}\n')
    with pytest.raises(ValueError, match=rf"{tmp_path / METRICS_FILE}, line 2: not a JSON record"):
        read_metrics(tmp_path)
    (tmp_path / METRICS_FILE).write_text('{"epoch": 1}\n{"epoch": 2, "st')
    with pytest.warns(RuntimeWarning, match="skipping an incomplete last line"):
        assert read_metrics(tmp_path) == [{"epoch": 1}]
    assert not rundir.has_checkpoints(tmp_path) and rundir.holds_run(tmp_path)
    np.testing.assert_equal(read_metrics(tmp_path / "nowhere"), [])
