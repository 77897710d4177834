"""`python -m experiments`: the runner of every experiment, its report and its compilation cache."""
import os
import subprocess
import sys
from pathlib import Path

from experiments.common import compilation_cache_dir, resume_or_clear
from helpers import xla_flags_for_long_runs


def test_cache_dir_is_under_the_users_cache_unless_jax_is_told_otherwise(monkeypatch, tmp_path):
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert compilation_cache_dir() == tmp_path / "neuralode" / "jax"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert compilation_cache_dir() == Path.home() / ".cache" / "neuralode" / "jax"
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "mine"))
    assert compilation_cache_dir() == tmp_path / "mine"


def run_main(tmp_path, *args):
    # init_variance runs long enough for optimised code: 10 s instead of 29 s at level 0.
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env["XLA_FLAGS"] = xla_flags_for_long_runs()
    env["XDG_CACHE_HOME"] = str(tmp_path / "cache")
    return subprocess.run([sys.executable, "-m", "experiments", "--out", str(tmp_path / "out"), *args],
                          capture_output=True, text=True, env=env, timeout=300)


def test_runs_the_named_experiments_into_a_report_and_fills_the_compilation_cache(tmp_path):
    done = run_main(tmp_path, "--only", "stages", "init_variance", "--jobs", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    for name in ("stages", "init_variance"):  # started together, each writing its own log
        assert f"experiments.{name} (output: {tmp_path / 'out' / 'logs' / name}.log)" in done.stdout
        assert f"=== {name}: ok in" in done.stdout
        log = (tmp_path / "out" / "logs" / f"{name}.log").read_text()
        assert f"wrote {tmp_path / 'out' / name}.json" in log
    report = (tmp_path / "out" / "REPORT.md").read_text()
    assert "## stages (ok" in report and "| C3 |" in report  # its headline and its claims row
    assert report.index("## stages") < report.index("## init_variance")  # in the order asked for
    assert any((tmp_path / "cache" / "neuralode" / "jax").iterdir())  # compiled programs kept


def test_an_experiments_run_directory_is_resumed_with_resume_and_started_afresh_without(tmp_path):
    """Running `python -m experiments` twice into the same directory failed in classify and table:
    train refused the run directories the first run had left (FileExistsError)."""
    from neuralode.rundir import METRICS_FILE, checkpoints_dir

    workdir = tmp_path / "classify_digits_resnet"
    workdir.mkdir()
    (workdir / METRICS_FILE).write_text('{"epoch": 1}\n')
    assert resume_or_clear(workdir, resume=True) is False and not workdir.exists()  # no checkpoint
    os.makedirs(Path(checkpoints_dir(workdir)) / "40")
    assert resume_or_clear(workdir, resume=True) is True and workdir.exists()
    assert resume_or_clear(workdir, resume=False) is False and not workdir.exists()
    assert resume_or_clear(workdir, resume=False) is False  # nothing there: nothing to clear


def test_the_longest_experiment_starts_first_and_the_benchmarks_come_last():
    from experiments.__main__ import experiment_names

    names = experiment_names()
    benchmarks = [n for n in names if n.startswith("bench_")]
    assert names[0] == "table" and benchmarks and names[-len(benchmarks):] == benchmarks


def test_unknown_experiment_names_fail_before_anything_runs(tmp_path):
    done = run_main(tmp_path, "--only", "paths", "nonsense")
    assert done.returncode == 2 and "--only: unknown experiments ['nonsense']" in done.stderr
    assert "===" not in done.stdout and not (tmp_path / "out").exists()
    done = run_main(tmp_path, "--only", "paths", "--jobs", "0")
    assert done.returncode == 2 and "--jobs must be >= 1, got 0" in done.stderr


def test_every_flag_of_every_experiment_has_a_help_text():
    import dataclasses
    import importlib

    from experiments.__main__ import experiment_names

    missing = {name: [f.name for f in dataclasses.fields(importlib.import_module(f"experiments.{name}").Config)
                      if not f.metadata.get("help")] for name in experiment_names()}
    assert not {name: fields for name, fields in missing.items() if fields}
