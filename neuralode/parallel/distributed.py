"""Starting JAX on many devices: host CPU devices, and many processes through `jax.distributed`.

Both must happen before JAX runs anything (the first array created fixes the devices).

- `host_devices(n)`: n CPU devices in this process (`jax_num_cpu_devices`), so that data
  parallelism runs, and is tested, on a machine without accelerators. They share the machine's
  cores: a speed-up needs the cores, the code path does not.
- `initialize(coordinator_address, num_processes, process_id)`: join a job of several processes
  (`jax.distributed.initialize`), each arguments from the call or, where None, from the
  environment: `JAX_COORDINATOR_ADDRESS` (host:port of process 0, read by JAX itself),
  `NEURALODE_NUM_PROCESSES`, `NEURALODE_PROCESS_ID`. CPU devices talk through gloo collectives
  (`jax_cpu_collectives_implementation`), so a job of processes on one machine runs without GPUs.

Failure: JAX's coordination service watches every process. If one dies, the others stop within
`heartbeat_timeout_s` with a fatal error naming it ("The following tasks are unhealthy (stopped
sending heartbeats): 1"), instead of waiting forever at their next collective.
"""
from __future__ import annotations

import os

import jax

COORDINATOR_ENV, PROCESSES_ENV, PROCESS_ID_ENV = (
    "JAX_COORDINATOR_ADDRESS", "NEURALODE_NUM_PROCESSES", "NEURALODE_PROCESS_ID")


def host_devices(count: int) -> None:
    """Make JAX's CPU backend show `count` devices (`jax_num_cpu_devices`); JAX refuses it (a
    RuntimeError) once a computation has run."""
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise ValueError(f"count: expected a positive int, got {count!r}")
    jax.config.update("jax_num_cpu_devices", count)


def _from_env(value, name: str, argument: str):
    if value is not None:
        return value
    text = os.environ.get(name)
    if text is None:
        return None
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{argument}: the environment variable {name}={text!r} is not an integer") from None


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, heartbeat_timeout_s: int = 100,
               initialization_timeout_s: int = 300) -> None:
    """Join the job of `num_processes` processes as process `process_id` (0 is the coordinator,
    at `coordinator_address` = "host:port"); every argument left None comes from the environment
    (`JAX_COORDINATOR_ADDRESS`, `NEURALODE_NUM_PROCESSES`, `NEURALODE_PROCESS_ID`).

    A process that stops for longer than `heartbeat_timeout_s` stops the others with an error
    naming it; processes that have not all joined after `initialization_timeout_s` fail to start.
    Afterwards `jax.devices()` lists the devices of all processes, `jax.local_devices()` this one's.
    """
    coordinator_address = coordinator_address or os.environ.get(COORDINATOR_ENV)
    num_processes = _from_env(num_processes, PROCESSES_ENV, "num_processes")
    process_id = _from_env(process_id, PROCESS_ID_ENV, "process_id")
    for argument, value, env in (("coordinator_address", coordinator_address, COORDINATOR_ENV),
                                 ("num_processes", num_processes, PROCESSES_ENV),
                                 ("process_id", process_id, PROCESS_ID_ENV)):
        if value is None:
            raise ValueError(f"{argument}: not given, and the environment variable {env} is not set")
    if not isinstance(coordinator_address, str) or ":" not in coordinator_address:
        raise ValueError(f"coordinator_address: expected 'host:port' of process 0, got {coordinator_address!r}")
    if not isinstance(num_processes, int) or isinstance(num_processes, bool) or num_processes < 1:
        raise ValueError(f"num_processes: expected a positive int, got {num_processes!r}")
    if not isinstance(process_id, int) or isinstance(process_id, bool) or not 0 <= process_id < num_processes:
        raise ValueError(f"process_id: expected an int in [0, {num_processes}) for num_processes="
                         f"{num_processes}, got {process_id!r}")
    for argument, value in (("heartbeat_timeout_s", heartbeat_timeout_s),
                            ("initialization_timeout_s", initialization_timeout_s)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{argument}: expected a positive int of seconds, got {value!r}")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address, num_processes, process_id,
                               initialization_timeout=initialization_timeout_s,
                               heartbeat_timeout_seconds=heartbeat_timeout_s,
                               shutdown_timeout_seconds=heartbeat_timeout_s)
