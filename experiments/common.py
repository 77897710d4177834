"""What every experiment shares: flags generated from a config dataclass, JSON and figure output, timing.

An experiment module defines

    @dataclasses.dataclass
    class Config:
        out: str = "results"
        quick: bool = False
        ...                                   # every field becomes a flag --field-name
    QUICK = {"field": value, ...}             # overrides applied by --quick (explicit flags still win)

    def run(cfg: Config) -> dict:             # returns the results; may call save_figure(cfg, fig, suffix)
        ...

    if __name__ == "__main__":
        main(__name__, Config, run, QUICK)

and `main` writes `<out>/<name>.json` with the config and the results, then prints where the JSON
and the figures of the run went and the headline. A results dict may carry a `"headline"` dict of
the few numbers that `python -m experiments` copies into REPORT.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import statistics
import sys
import time
import typing
from pathlib import Path
from typing import Any, Callable

import numpy as np

from neuralode.rundir import has_checkpoints


def flag(default, help: str, **metadata) -> Any:
    """A `Config` field: its default, the help text of its flag and other metadata (`choices`)."""
    return dataclasses.field(default=default, metadata={"help": help, **metadata})


def flag_like(cls, name: str, **changes) -> Any:
    """A `Config` field with the default and the metadata (help, choices) of the field `name` of the
    dataclass `cls` (say a `neuralode.models.ModelSpec` setting); `default=` or `help=` replace
    them."""
    source = next(f for f in dataclasses.fields(cls) if f.name == name)
    default = changes.pop("default", source.default)
    return dataclasses.field(default=default, metadata={**source.metadata, **changes})


def short_name(module_name: str) -> str:
    return module_name.rsplit(".", 1)[-1]


def parse_config(config_cls, quick_overrides: dict, argv: list[str] | None, prog: str, doc: str | None):
    """Build argparse flags from the dataclass fields; apply `quick_overrides` under --quick."""
    parser = argparse.ArgumentParser(prog=prog, description=doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    hints = typing.get_type_hints(config_cls)
    for field in dataclasses.fields(config_cls):
        flag = "--" + field.name.replace("_", "-")
        kind = hints[field.name]
        help_text = field.metadata.get("help", field.name.replace("_", " "))
        if field.name in quick_overrides:
            help_text += f" (--quick: {quick_overrides[field.name]})"
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                                help=f"{help_text} [default: {default}]")
        elif typing.get_origin(kind) in (tuple, list):
            inner = typing.get_args(kind)[0]
            parser.add_argument(flag, type=inner, nargs="+", default=None,
                                help=f"{help_text} [default: {' '.join(map(str, default))}]")
        else:
            choices = field.metadata.get("choices")
            parser.add_argument(flag, type=kind, default=None, choices=choices,
                                help=f"{help_text} [default: {default}]")
    args = vars(parser.parse_args(argv))
    values = {}
    if args.get("quick"):
        values.update(quick_overrides)
    values.update({k: (tuple(v) if isinstance(v, list) else v) for k, v in args.items() if v is not None})
    return config_cls(**values)


def to_jsonable(obj: Any) -> Any:
    """Numbers, arrays and nested containers as plain JSON values (non-finite floats as strings)."""
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return to_jsonable(dataclasses.asdict(obj))
    if hasattr(obj, "tolist"):  # numpy and jax arrays and scalars
        return to_jsonable(np.asarray(obj).tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    return obj


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(to_jsonable(data), indent=2) + "\n")


def save_figure(cfg, fig, name: str) -> Path:
    """Save a matplotlib figure as `<out>/<name>.png` and close it."""
    import matplotlib.pyplot as plt

    path = Path(cfg.out) / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_history(cfg, history: list[dict], title: str, name: str) -> Path:
    """Cross-entropy and accuracy per epoch (train and test) of a `neuralode.train` run's metrics
    records, saved as `<out>/<name>.png`."""
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in history]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for split in ("train", "test"):
        axes[0].plot(epochs, [r[f"{split}_cross_entropy"] for r in history], label=split)
        axes[1].plot(epochs, [100 * r[f"{split}_accuracy"] for r in history], label=split)
    axes[0].set(xlabel="epoch", ylabel="cross-entropy", yscale="log")
    axes[1].set(xlabel="epoch", ylabel="accuracy (%)")
    for ax in axes:
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    return save_figure(cfg, fig, name)


def resume_or_clear(workdir: Path, resume: bool) -> bool:
    """The `resume` to pass `neuralode.train.train` for an experiment's own run directory: True
    (continue) with --resume where it holds a checkpoint; otherwise False, after deleting what an
    earlier run left there. The run directories are the experiment's outputs, rewritten on every
    run like its JSON and figures, so running a command twice does not fail on the first run's
    (train refuses a directory that holds a run unless it resumes it)."""
    if resume and has_checkpoints(workdir):
        return True
    if os.path.lexists(workdir):
        shutil.rmtree(workdir)
    return False


def run_experiment(module_name: str, config_cls, run: Callable, quick_overrides: dict,
                   argv: list[str] | None = None, doc: str | None = None) -> dict:
    """Parse flags, run, and write `<out>/<name>.json`; returns the results."""
    import matplotlib

    matplotlib.use("Agg")
    name = short_name(module_name)
    cfg = parse_config(config_cls, quick_overrides, argv, f"python -m experiments.{name}", doc)
    start, started_ns = time.perf_counter(), time.time_ns()
    results = run(cfg)
    results = {"experiment": name, "config": dataclasses.asdict(cfg), **results,
               "wall_s": time.perf_counter() - start}
    path = Path(cfg.out) / f"{name}.json"
    write_json(path, results)
    figures = sorted(p for p in Path(cfg.out).glob("*.png") if p.stat().st_mtime_ns >= started_ns)
    print("\n".join(f"wrote {p}" for p in (path, *figures)))
    for key, value in to_jsonable(results.get("headline", {})).items():
        print(f"  {key}: {json.dumps(value)}")
    return results


def compilation_cache_dir() -> Path:
    """Where `main` keeps compiled XLA programs between runs: `$XDG_CACHE_HOME/neuralode/jax`
    (`~/.cache/neuralode/jax`), unless `JAX_COMPILATION_CACHE_DIR` names another place. Deleting it
    is always safe; programs that hold host callbacks (equinox's value checks, inside every model's
    solve) are never cached and compile on every run."""
    cache_home = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(os.environ.get("JAX_COMPILATION_CACHE_DIR") or Path(cache_home) / "neuralode" / "jax")


def use_compilation_cache() -> None:
    """Turn on JAX's persistent compilation cache, so a second run loads what the first compiled."""
    import jax

    jax.config.update("jax_compilation_cache_dir", str(compilation_cache_dir()))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)


def main(module_name: str, config_cls, run: Callable, quick_overrides: dict) -> None:
    """Entry point of `python -m experiments.<name>`, where the module is named "__main__".

    Experiments use the persistent compilation cache; benchmarks do not, since the compile times
    they report would then be the times to load a cached program."""
    module = sys.modules[module_name]
    if module_name == "__main__" and module.__spec__ is not None:
        module_name = module.__spec__.name
    if not short_name(module_name).startswith("bench_"):
        use_compilation_cache()
    run_experiment(module_name, config_cls, run, quick_overrides, sys.argv[1:], module.__doc__)


# ---------------------------------------------------------------------------------------------
# Timing for the bench_* modules: compile excluded, results blocked on, median of repeats.

def compile_all(fns: dict[Any, Callable], args: dict[Any, tuple]) -> tuple[dict, dict]:
    """Compile each jax.jit-ed function for its arguments ahead of time and run it once (warm-up);
    returns the executables and the compile seconds, both by key."""
    import jax

    compiled, compile_s = {}, {}
    for key, fn in fns.items():
        start = time.perf_counter()
        compiled[key] = fn.lower(*args[key]).compile()
        compile_s[key] = time.perf_counter() - start
        jax.block_until_ready(compiled[key](*args[key]))
    return compiled, compile_s


def blocking_calls(compiled: dict[Any, Callable], args: dict[Any, tuple]) -> dict[Any, Callable]:
    """Zero-argument calls of each executable on its arguments that block until the result is ready."""
    import jax

    return {key: (lambda key=key: jax.block_until_ready(compiled[key](*args[key]))) for key in compiled}


def time_alternating(calls: dict[Any, Callable], repeats: int = 7, number: int | dict = 1,
                     warmup: bool = False, desc: str = "timing") -> dict[Any, dict]:
    """Median wall time of zero-argument callables (which block until their result is ready), run
    in alternation so that drift in machine load hits all alike.

    `number` calls per sample (one count for all, or a dict per key, so that short calls can be
    averaged over many); with `warmup` each sample is preceded by one untimed call, so a small call
    does not pay for what the large one before it left behind (freed buffers, evicted caches).
    A progress bar labelled `desc` counts the rounds.
    """
    from tqdm.auto import tqdm

    counts = number if isinstance(number, dict) else dict.fromkeys(calls, number)
    runs = {key: [] for key in calls}
    for _ in tqdm(range(repeats), desc=desc, leave=False):
        for key, call in calls.items():
            if warmup:
                call()
            start = time.perf_counter()
            for _ in range(counts[key]):
                call()
            runs[key].append((time.perf_counter() - start) / counts[key])
    return {key: {"run_s": statistics.median(runs[key]), "runs_s": runs[key]} for key in calls}


def time_interleaved(fns: dict[Any, Callable], args: dict[Any, tuple], repeats: int = 7,
                     number: int | dict = 1, warmup: bool = False) -> dict[Any, dict]:
    """`compile_all`, then time the compiled calls with `time_alternating`; each key's result holds
    `compile_s`, `run_s` (median over `repeats` of the mean of `number` calls) and `runs_s`."""
    compiled, compile_s = compile_all(fns, args)
    times = time_alternating(blocking_calls(compiled, args), repeats, number, warmup)
    return {key: {"compile_s": compile_s[key], **times[key]} for key in fns}


def time_compiled(fn: Callable, *args, repeats: int = 5, number: int = 1) -> dict:
    """`time_interleaved` of the one jax.jit-ed function `fn` on `args`."""
    return time_interleaved({"fn": fn}, {"fn": args}, repeats, number)["fn"]
