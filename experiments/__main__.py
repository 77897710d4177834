"""Run every experiment with --quick settings into results/ and write results/REPORT.md.

    python -m experiments [--out DIR] [--only NAME ...] [--full]

Each experiment runs in its own process, exactly as `python -m experiments.<name> --quick` would, so
no global JAX setting of one (e.g. float64) leaks into the next.
"""
from __future__ import annotations

import argparse
import json
import pkgutil
import subprocess
import sys
import time
from pathlib import Path

import experiments


def experiment_names() -> list[str]:
    """Every module of the package except the shared ones, benchmarks last."""
    names = [m.name for m in pkgutil.iter_modules(experiments.__path__)
             if not m.name.startswith("_") and m.name != "common"]
    return sorted(names, key=lambda n: (n.startswith("bench_"), n))


def claims_table(rows: list[tuple[str, dict | None, float]]) -> list[str]:
    """The README's claims table, from the `claims` lists of the experiments' JSONs."""
    claims = [(name, c) for name, results, _ in rows for c in (results or {}).get("claims", [])]
    if not claims:
        return []
    cell = lambda text: str(text).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    lines = ["## Claims of the source essays", "",
             "| id | claim | source figure | our measurement | verdict | experiment |",
             "|---|---|---|---|---|---|"]
    for name, c in sorted(claims, key=lambda item: item[1]["id"]):
        lines.append(f"| {cell(c['id'])} | {cell(c['claim'])} | {cell(c['source_figure'])} | "
                     f"{cell(c['measured'])} | {cell(c['verdict'])} | `{name}` |")
    return lines + [""]


def report(rows: list[tuple[str, dict | None, float]]) -> str:
    lines = ["# neuralode experiment report", "",
             "Produced by `python -m experiments`; every number below is in `<name>.json`.", ""]
    for name, results, seconds in rows:
        lines += [f"## {name} ({'ok' if results else 'FAILED'}, {seconds:.0f} s)", ""]
        if results is None:
            lines.append("failed: see the output of the run")
        for key, value in (results or {}).get("headline", {}).items():
            lines.append(f"- `{key}`: {value}")
        lines.append("")
    return "\n".join(lines + claims_table(rows))


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m experiments", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="results", help="output directory")
    parser.add_argument("--only", nargs="+", default=None, help="run only these experiments")
    parser.add_argument("--full", action="store_true", help="full settings instead of --quick")
    args = parser.parse_args()
    rows, failed = [], []
    names = args.only or experiment_names()
    unknown = sorted(set(names) - set(experiment_names()))
    if unknown:
        parser.error(f"--only: unknown experiments {unknown}; expected some of {experiment_names()}")
    for i, name in enumerate(names, 1):
        print(f"=== [{i}/{len(names)}] experiments.{name}", flush=True)
        command = [sys.executable, "-m", f"experiments.{name}", "--out", args.out]
        start = time.perf_counter()
        code = subprocess.call(command + ([] if args.full else ["--quick"]))
        seconds = time.perf_counter() - start
        path = Path(args.out) / f"{name}.json"
        results = json.loads(path.read_text()) if code == 0 and path.exists() else None
        if results is None:
            failed.append(name)
        rows.append((name, results, seconds))
        print(f"=== {name}: {'ok' if results else 'FAILED'} in {seconds:.1f} s", flush=True)
    path = Path(args.out) / "REPORT.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(report(rows))
    print(f"wrote {path}")
    if failed:
        raise SystemExit(f"failed experiments: {', '.join(failed)}")


if __name__ == "__main__":
    main()
