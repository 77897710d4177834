"""Data parallelism (neuralode.parallel.data, neuralode.parallel.distributed).

The checks on several devices run in subprocesses (tests/data_parallel_script.py): JAX fixes its
devices when it starts. They compile at XLA's lowest optimisation level: every comparison is
between two paths of the same process, and compiling is most of their cost.
"""
import json
import os
import re
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from neuralode.parallel.data import data_mesh, data_parallel_train_step, shard_batch
from neuralode.parallel.distributed import host_devices, initialize
from neuralode.train_step import classification_loss

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data_parallel_script.py")
ENV = {**os.environ, "JAX_PLATFORMS": "cpu",
       "XLA_FLAGS": os.environ["XLA_FLAGS"] + " --xla_llvm_disable_expensive_passes=true"}
STEP, STEPS = 1e-12, 1e-10  # relative agreement after one step and after 20


def test_eight_host_devices_take_the_one_device_step(tmp_path):
    out = tmp_path / "mesh.json"
    done = subprocess.run([sys.executable, SCRIPT, "mesh", str(out)], env=ENV, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.read_text())
    for name in ("resnet", "rknet", "odenet"):
        model = results[name]
        assert model["first_step"] <= STEP and model["metrics"] <= STEP, (name, model)
        assert model["last_step"] <= STEPS, (name, model)
        assert model["sharding"] == "P()", (name, model)  # parameters stay replicated
    # Fixed steps: the same NFE on every device; adaptive: each device its own solve, as the
    # one-device reference that solves the 8 micro-batches one by one.
    assert results["resnet"]["nfe"] == results["resnet"]["nfe_device_max"] == 4
    ode = results["odenet"]
    assert ode["nfe"] < ode["nfe_device_max"] == ode["reference_nfe_device_max"]

    streams = results["random_streams"]
    assert streams["loss"] <= STEP and streams["w"] <= STEP and streams["shards_differ"], streams
    assert streams["counts"] == [1], streams  # the stream advanced once, as on one device

    trained = results["train"]  # train(mesh=...) against train(): records, parameters, resumes
    for key in ("params", "records", "mesh_resumed_on_one", "one_resumed_on_mesh"):
        assert trained[key] <= STEP, (key, trained)
    assert trained["record_keys"] == [], trained

    # Non-finite input on one device: reported by the one-program step (both stages of the 1 of 8
    # devices fail: a mean of 2/8), and an exception, not an abort, from a loss that raises it.
    assert results["nan_reported"] == 2 / 8, results["nan_reported"]
    nan = results["nan_error"]
    assert nan["type"] == "JaxRuntimeError" and nan["non_finite"], nan
    assert "a value check of the model failed there" in nan["notes"][0], nan
    errors = results["errors"]
    assert errors["indivisible"].startswith("ValueError: batch: 10 examples do not divide among the 8")
    assert errors["mesh_axis"].startswith("ValueError: mesh: expected an axis named 'data'")
    assert errors["too_many_devices"].startswith("ValueError: devices: expected a multiple")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_take_the_one_device_steps_and_a_dead_one_stops_the_other(tmp_path):
    port, procs = _free_port(), []
    for process in (0, 1):
        log = open(tmp_path / f"log{process}.txt", "w")
        procs.append(subprocess.Popen([sys.executable, SCRIPT, "process", str(process), str(port),
                                       str(tmp_path / f"process{process}.json")],
                                      env=ENV, stdout=log, stderr=subprocess.STDOUT))
    try:
        assert procs[1].wait(timeout=600) == 0, (tmp_path / "log1.txt").read_text()[-3000:]
        died = time.monotonic()
        procs[0].wait(timeout=120)  # a hang here fails the test
        stopped_after = time.monotonic() - died
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
    first, second = (json.loads((tmp_path / f"process{p}.json").read_text()) for p in (0, 1))
    for results in (first, second):
        assert (results["process_count"], results["devices"], results["local_devices"]) == (2, 8, 4)
        assert results["odd_mesh_error"].startswith("devices: expected a multiple of the process count 2")
    assert (first["rows_here"], second["rows_here"]) == ([0, 2, 4, 6], [8, 10, 12, 14])
    assert first["first_step"] <= STEP and first["metrics"] <= STEP and first["last_step"] <= STEPS, first

    log = (tmp_path / "log0.txt").read_text()
    assert procs[0].returncode != 0 and "process 0 was not stopped" not in log
    assert re.search(r"unhealthy \(stopped sending heartbeats\):\s*1\b", log), log[-3000:]
    assert stopped_after < 60, stopped_after  # heartbeat timeout 5 s, on a loaded machine


def test_bad_arguments_are_named(monkeypatch):
    for name in ("JAX_COORDINATOR_ADDRESS", "NEURALODE_NUM_PROCESSES", "NEURALODE_PROCESS_ID"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ValueError, match="coordinator_address: not given, and the environment variable "
                                         "JAX_COORDINATOR_ADDRESS is not set"):
        initialize(num_processes=2, process_id=0)
    with pytest.raises(ValueError, match="coordinator_address: expected 'host:port'"):
        initialize("localhost", 2, 0)
    with pytest.raises(ValueError, match=r"process_id: expected an int in \[0, 2\)"):
        initialize("localhost:1234", 2, 2)
    with pytest.raises(ValueError, match="num_processes: expected a positive int"):
        initialize("localhost:1234", 0, 0)
    monkeypatch.setenv("NEURALODE_NUM_PROCESSES", "two")
    with pytest.raises(ValueError, match="num_processes: the environment variable NEURALODE_NUM_PROCESSES"):
        initialize("localhost:1234", process_id=0)
    with pytest.raises(ValueError, match="count: expected a positive int"):
        host_devices(0)
    with pytest.raises(TypeError, match="devices: expected an int"):
        data_mesh("8")
    mesh = data_mesh(1)
    with pytest.raises(ValueError, match="batch: expected arrays with one common leading batch axis"):
        shard_batch(mesh, np.zeros((4, 2)), np.zeros(3))
    other = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("batch",))
    with pytest.raises(ValueError, match="mesh: expected an axis named 'data'"):
        data_parallel_train_step(None, classification_loss, other)
