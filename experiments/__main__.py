"""Run every experiment with --quick settings into results/ and write results/REPORT.md.

    python -m experiments [--out DIR] [--only NAME ...] [--full]
"""
from __future__ import annotations

import argparse
import importlib
import pkgutil
import time
import traceback
from pathlib import Path

import experiments
from experiments.common import run_experiment


def experiment_names() -> list[str]:
    """Every module of the package except the shared ones, benchmarks last."""
    names = [m.name for m in pkgutil.iter_modules(experiments.__path__)
             if not m.name.startswith("_") and m.name != "common"]
    return sorted(names, key=lambda n: (n.startswith("bench_"), n))


def report(rows: list[tuple[str, dict | None, str]]) -> str:
    lines = ["# neuralode experiment report", "",
             "Produced by `python -m experiments`; every number below is in `<name>.json`.", ""]
    for name, results, status in rows:
        lines.append(f"## {name} ({status})")
        lines.append("")
        if results is None:
            lines.append("failed; see the traceback printed by the run")
        else:
            for key, value in results.get("headline", {}).items():
                lines.append(f"- `{key}`: {value}")
            lines.append(f"- wall time: {results['wall_s']:.1f} s")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m experiments", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="results", help="output directory")
    parser.add_argument("--only", nargs="+", default=None, help="run only these experiments")
    parser.add_argument("--full", action="store_true", help="full settings instead of --quick")
    args = parser.parse_args()
    names = args.only or experiment_names()
    rows, failed = [], []
    for name in names:
        print(f"=== experiments.{name}", flush=True)
        module = importlib.import_module(f"experiments.{name}")
        argv = ["--out", args.out] + ([] if args.full else ["--quick"])
        start = time.perf_counter()
        try:
            results = run_experiment(module.__name__, module.Config, module.run, module.QUICK, argv,
                                     module.__doc__)
            rows.append((name, results, "ok"))
        except Exception:  # report every experiment, then fail at the end
            traceback.print_exc()
            rows.append((name, None, "FAILED"))
            failed.append(name)
        print(f"=== {name}: {time.perf_counter() - start:.1f} s", flush=True)
    path = Path(args.out) / "REPORT.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(report(rows))
    print(f"wrote {path}")
    if failed:
        raise SystemExit(f"failed experiments: {', '.join(failed)}")


if __name__ == "__main__":
    main()
