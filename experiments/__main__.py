"""Run every experiment with --quick settings into results/ and write results/REPORT.md.

    python -m experiments [--out DIR] [--only NAME ...] [--full] [--jobs N]

Each experiment runs in its own process, exactly as `python -m experiments.<name> --quick` would, so
no global JAX setting of one (e.g. float64) leaks into the next. `--jobs N` experiments run at once
(default: one per core; most of a quick run is XLA compiling on one thread), each writing its output
to DIR/logs/<name>.log; with one job they print to the terminal. The benchmarks (bench_*) run after
the experiments, one at a time and alone on the machine, since their timings are measurements.
"""
from __future__ import annotations

import argparse
import json
import os
import pkgutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import experiments

# table --quick is about a third of the whole job: started first, the other experiments fill the
# remaining jobs around it instead of leaving it to run alone at the end.
LONGEST = "table"


def experiment_names() -> list[str]:
    """Every module of the package except the shared ones, benchmarks last."""
    names = [m.name for m in pkgutil.iter_modules(experiments.__path__)
             if not m.name.startswith("_") and m.name != "common"]
    return sorted(names, key=lambda n: (n.startswith("bench_"), n != LONGEST, n))


def default_jobs() -> int:
    cores = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    return max(1, len(cores))


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


def run_one(name: str, out: str, full: bool, log: Path | None) -> tuple[dict | None, float]:
    """Run `python -m experiments.<name>` (with --quick unless `full`); its results, or None if it
    failed, and its wall time. Its output goes to `log` if given, else to the terminal."""
    command = [sys.executable, "-m", f"experiments.{name}", "--out", out] + ([] if full else ["--quick"])
    start = time.perf_counter()
    if log is None:
        code = subprocess.call(command)
    else:
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("w") as stream:
            code = subprocess.call(command, stdout=stream, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    path = Path(out) / f"{name}.json"
    return (json.loads(path.read_text()) if code == 0 and path.exists() else None), seconds


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m experiments", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="results", help="output directory")
    parser.add_argument("--only", nargs="+", default=None, help="run only these experiments")
    parser.add_argument("--full", action="store_true", help="full settings instead of --quick")
    parser.add_argument("--jobs", type=int, default=default_jobs(),
                        help="experiments run at once (benchmarks always one at a time) "
                             "[default: the number of cores, %(default)s here]")
    args = parser.parse_args()
    names = args.only or experiment_names()
    unknown = sorted(set(names) - set(experiment_names()))
    if unknown:
        parser.error(f"--only: unknown experiments {unknown}; expected some of {experiment_names()}")
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    results, started, lock = {}, iter(range(1, len(names) + 1)), threading.Lock()

    def run(name: str, jobs: int) -> None:
        log = Path(args.out) / "logs" / f"{name}.log" if jobs > 1 else None
        with lock:
            print(f"=== [{next(started)}/{len(names)}] experiments.{name}"
                  + (f" (output: {log})" if log else ""), flush=True)
        results[name] = run_one(name, args.out, args.full, log)
        ok = results[name][0] is not None
        with lock:
            print(f"=== {name}: {'ok' if ok else 'FAILED'} in {results[name][1]:.1f} s", flush=True)
            if not ok and log:
                print("".join(log.read_text().splitlines(keepends=True)[-30:]), flush=True)

    benchmarks = [n for n in names if n.startswith("bench_")]
    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(lambda name: run(name, args.jobs), [n for n in names if n not in benchmarks]))
    for name in benchmarks:
        run(name, 1)
    rows = [(name, *results[name]) for name in names]
    path = Path(args.out) / "REPORT.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(report(rows))
    print(f"wrote {path}")
    failed = [name for name, result, _ in rows if result is None]
    if failed:
        raise SystemExit(f"failed experiments: {', '.join(failed)}")


if __name__ == "__main__":
    main()
