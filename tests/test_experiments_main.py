"""`python -m experiments`: the runner of every experiment, its report and its compilation cache."""
import os
import subprocess
import sys
from pathlib import Path

from experiments.common import compilation_cache_dir


def test_cache_dir_is_under_the_users_cache_unless_jax_is_told_otherwise(monkeypatch, tmp_path):
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert compilation_cache_dir() == tmp_path / "neuralode" / "jax"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert compilation_cache_dir() == Path.home() / ".cache" / "neuralode" / "jax"
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "mine"))
    assert compilation_cache_dir() == tmp_path / "mine"


def run_main(tmp_path, *args):
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env["XDG_CACHE_HOME"] = str(tmp_path / "cache")
    return subprocess.run([sys.executable, "-m", "experiments", "--out", str(tmp_path / "out"), *args],
                          capture_output=True, text=True, env=env, timeout=300)


def test_runs_the_named_experiments_into_a_report_and_fills_the_compilation_cache(tmp_path):
    done = run_main(tmp_path, "--only", "paths")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "=== [1/1] experiments.paths" in done.stdout
    report = (tmp_path / "out" / "REPORT.md").read_text()
    assert "## paths (ok" in report and "| B9 |" in report  # its headline and its claims row
    assert any((tmp_path / "cache" / "neuralode" / "jax").iterdir())  # compiled programs kept


def test_unknown_experiment_names_fail_before_anything_runs(tmp_path):
    done = run_main(tmp_path, "--only", "paths", "nonsense")
    assert done.returncode == 2 and "--only: unknown experiments ['nonsense']" in done.stderr
    assert "===" not in done.stdout and not (tmp_path / "out").exists()


def test_every_flag_of_every_experiment_has_a_help_text():
    import dataclasses
    import importlib

    from experiments.__main__ import experiment_names

    missing = {name: [f.name for f in dataclasses.fields(importlib.import_module(f"experiments.{name}").Config)
                      if not f.metadata.get("help")] for name in experiment_names()}
    assert not {name: fields for name, fields in missing.items() if fields}
