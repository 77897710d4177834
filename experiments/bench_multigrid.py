"""Benchmark: our jit-compiled geometric multigrid vs pyamg (Ruge-Stuben AMG) and scipy's sparse direct
solve on 2-D Poisson, O(N) scaling, what one cycle spends per unknown on each level of the
hierarchy, and how close a smoothing sweep runs to memory bandwidth.

All sides solve -Laplace u = f (5-point, Dirichlet) with (n-1)^2 unknowns to ||f - A u|| <= rtol ||f||
in float64. Ours: V(2,1) red-black Gauss-Seidel cycles from u = 0 (compile time excluded and
reported) as float64 defect correction, each cycle run in `--cycle-dtype` (float32 by default:
mixed precision, half the bytes per sweep; the float64 residual still reaches rtol, checked against
scipy's matrix). Pure float64 cycles are timed beside it in the same run and reported too.
pyamg: `ruge_stuben_solver(A)` setup + `solve(b, tol=rtol)` (its default V-cycle, no Krylov
acceleration), setup and solve timed together. scipy: `spsolve` (SuperLU). Timings are medians over
repeats run in alternation, so machine load hits both alike. pyamg and scipy are dev-only
dependencies and are imported here only.

`--cores 1` pins the process to one core. With more, XLA:CPU splits the operations of large grids
across the cores and runs those of small grids on one, paying its dispatch cost; the time per
unknown then mixes the algorithm's scaling with the thread scaling, which `level_costs` shows.
"""
from __future__ import annotations

import dataclasses
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments.common import (blocking_calls, compile_all, flag, main, save_figure,
                                time_alternating, time_interleaved)
from neuralode import multigrid as mg


@dataclasses.dataclass
class Config:
    out: str = flag("results", "directory of bench_multigrid.json and the figure")
    quick: bool = flag(False, "smaller grids, fewer repeats: the QUICK settings (explicit flags still win)")
    n: int = flag(1024, "grid of the head-to-head with pyamg and spsolve: n intervals a side, "
                  "(n-1)^2 unknowns")
    sizes: tuple[int, ...] = flag((128, 256, 512, 1024, 2048), "grids n of the time-per-unknown sweep; "
                                  "the largest also gives the per-level cycle costs")
    rtol: float = flag(1e-8, "solve until ||f - A u|| <= rtol ||f|| (ours and pyamg)")
    repeats: int = flag(5, "timing samples per solver and per cycle level (median); the bandwidth test "
                        "takes 3x as many")
    spsolve_max_n: int = flag(1024, "time scipy's direct spsolve too when n is at most this")
    bandwidth_n: int = flag(2048, "grid n of the sweep-bandwidth test ((n-1)^2 float64 per array: "
                            "32 MiB at 2048, out of cache)")
    cycle_dtype: str = flag("float32", "dtype of the cycles inside the float64 correction",
                            choices=("float32", "float64"))
    cores: int = flag(0, "pin the process to this many cores before JAX starts (0: every core it may use)")


QUICK = {"n": 256, "sizes": (64, 128, 256, 512), "repeats": 3}


def _poisson_matrix(n: int):
    import scipy.sparse as sp

    m = n - 1
    t = sp.diags([-np.ones(m - 1), 2 * np.ones(m), -np.ones(m - 1)], [-1, 0, 1])
    eye = sp.identity(m)
    return ((sp.kron(t, eye) + sp.kron(eye, t)) * float(n**2)).tocsr()  # row-major (i, j) -> i m + j


def _ours(n: int, rtol: float, cycle_dtype: str):
    op = mg.Poisson(n)
    return jax.jit(lambda f: mg.solve(op, f, rtol=rtol, max_cycles=30, cycle_dtype=cycle_dtype))


def head_to_head(cfg: Config) -> dict:
    import pyamg
    import scipy.sparse.linalg as spla

    n = cfg.n
    f = np.random.default_rng(0).standard_normal((n - 1, n - 1))
    A, b = _poisson_matrix(n), f.ravel()
    fj = jnp.asarray(f)
    compiled = _ours(n, cfg.rtol, cfg.cycle_dtype).lower(fj).compile()
    compiled_f64 = _ours(n, cfg.rtol, "float64").lower(fj).compile()
    sol = jax.block_until_ready(compiled(fj))

    def amg():
        ml = pyamg.ruge_stuben_solver(A)
        return ml.solve(b, tol=cfg.rtol, maxiter=100)

    times = time_alternating({"ours": lambda: jax.block_until_ready(compiled(fj)),
                              "ours_float64": lambda: jax.block_until_ready(compiled_f64(fj)), "pyamg": amg},
                             cfg.repeats, warmup=True, desc="timing ours vs pyamg")
    x_amg = amg()
    rel = lambda x: float(np.linalg.norm(b - A @ x) / np.linalg.norm(b))
    out = {"unknowns": (n - 1) ** 2, "cycle_dtype": cfg.cycle_dtype, "ours_s": times["ours"]["run_s"],
           "ours_float64_s": times["ours_float64"]["run_s"], "pyamg_s": times["pyamg"]["run_s"],
           "ours_cycles": int(sol.cycles), "ours_rel_residual": rel(np.asarray(sol.u).ravel()),
           "pyamg_rel_residual": rel(x_amg), "vs_pyamg": times["ours"]["run_s"] / times["pyamg"]["run_s"],
           "vs_pyamg_float64": times["ours_float64"]["run_s"] / times["pyamg"]["run_s"],
           "runs": times}
    if n <= cfg.spsolve_max_n:
        start = time.perf_counter()
        x = spla.spsolve(A.tocsc(), b)
        out["spsolve_s"] = time.perf_counter() - start
        out["spsolve_rel_residual"] = rel(x)
        out["vs_spsolve"] = out["ours_s"] / out["spsolve_s"]
    return out


def scaling(cfg: Config) -> dict:
    """Solve time per unknown for every size, with the configured and with float64 cycles, all
    timed in alternation."""
    solvers, args = {}, {}
    dtypes = dict.fromkeys((cfg.cycle_dtype, "float64"))
    for n in cfg.sizes:
        f = jnp.asarray(np.random.default_rng(n).standard_normal((n - 1, n - 1)))
        for dtype in dtypes:
            solvers[n, dtype], args[n, dtype] = _ours(n, cfg.rtol, dtype), (f,)
    largest = max(cfg.sizes)
    number = {(n, d): min(16, max(1, (largest // n) ** 2)) for n, d in solvers}  # ~equal time per sample
    compiled, compile_s = compile_all(solvers, args)
    times = time_alternating(blocking_calls(compiled, args), cfg.repeats, number, warmup=True)
    out = {}
    for dtype in dtypes:
        rows = {}
        for n in cfg.sizes:
            t = times[n, dtype]
            rows[n] = {"run_s": t["run_s"], "compile_s": compile_s[n, dtype],
                       "cycles": int(compiled[n, dtype](*args[n, dtype]).cycles),
                       "time_per_unknown_s": t["run_s"] / (n - 1) ** 2}
        per = [r["time_per_unknown_s"] for r in rows.values()]
        out[dtype] = {"sizes": rows, "linearity": max(per) / min(per)}
    return {**out[cfg.cycle_dtype], "linearity_goal": 1.5, "cycle_dtype": cfg.cycle_dtype,
            "float64": out["float64"]}


def level_costs(cfg: Config) -> dict:
    """What one V-cycle spends on each level's own work: the cycle started at level k minus the
    cycle started at level k + 1, per unknown of level k, on the hierarchy of the largest size.

    The work per unknown is the same on every level (the same sweeps and transfers), so where these
    times differ, the machine (caches, threads, XLA's fixed cost per operation) is what differs."""
    dtype = jnp.dtype(cfg.cycle_dtype)
    levels = jax.tree.map(lambda w: w.astype(dtype), mg.hierarchy(mg.Poisson(max(cfg.sizes))))
    fns, args = {}, {}
    for k, op in enumerate(levels):
        fns[k] = jax.jit(lambda f, k=k: mg.cycle(levels, jnp.zeros_like(f), f, level=k))
        args[k] = (jnp.asarray(np.random.default_rng(k).standard_normal(op.shape), dtype),)
    number = {k: min(256, max(1, (levels[0].n // op.n) ** 2)) for k, op in enumerate(levels)}
    compiled, _ = compile_all(fns, args)
    times = time_alternating(blocking_calls(compiled, args), cfg.repeats, number, warmup=True,
                             desc="timing cycle levels")
    rows = {}
    for k, op in enumerate(levels):
        below = times[k + 1]["run_s"] if k + 1 < len(levels) else 0.0
        own = times[k]["run_s"] - below
        rows[op.n] = {"cycle_from_here_s": times[k]["run_s"], "own_s": own,
                      "own_per_unknown_s": own / (op.n - 1) ** 2}
    return {"cycle_dtype": cfg.cycle_dtype, "levels": rows}


def bandwidth(cfg: Config) -> dict:
    """Effective bytes of a sweep (read u and f, write u: 24 bytes per unknown) / time, over the
    bandwidth of u + 1 on the same array (read u, write a copy: 16 bytes per unknown); the three are
    timed in alternation."""
    n = cfg.bandwidth_n  # (n - 1)^2 float64 = 32 MiB per array at n = 2048: far out of cache
    op = mg.Poisson(n)
    u = jnp.asarray(np.random.default_rng(1).standard_normal((n - 1, n - 1)))
    f = jnp.ones_like(u)
    fns = {"copy": jax.jit(lambda x: x + 1.0), "jacobi": jax.jit(lambda u, f: mg.jacobi(op, u, f, 0.8)),
           "gauss_seidel": jax.jit(lambda u, f: mg.gauss_seidel(op, u, f))}
    times = time_interleaved(fns, {"copy": (u,), "jacobi": (u, f), "gauss_seidel": (u, f)},
                             repeats=3 * cfg.repeats, number=3)
    copy_bw = 2 * u.nbytes / times["copy"]["run_s"]
    out = {"array_MiB": u.nbytes / 2**20, "copy_GBps": copy_bw / 1e9}
    for name in ("jacobi", "gauss_seidel"):
        bw = 3 * u.nbytes / times[name]["run_s"]
        out[name] = {"sweep_s": times[name]["run_s"], "effective_GBps": bw / 1e9,
                     "bandwidth_fraction": bw / copy_bw}
    out["bandwidth_fraction"] = out["jacobi"]["bandwidth_fraction"]
    out["goal"] = 0.3
    return out


def pin_cores(cores: int) -> int:
    """Restrict this process to its first `cores` allowed cores (0: leave it), before XLA sizes its
    thread pool; returns the number of cores the process may use."""
    if cores == 0:
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if not hasattr(os, "sched_setaffinity"):
        raise ValueError("cores: pinning needs os.sched_setaffinity (Linux); use cores=0 here")
    allowed = sorted(os.sched_getaffinity(0))
    if not isinstance(cores, int) or not 0 < cores <= len(allowed):
        raise ValueError(f"cores must be an int from 0 to {len(allowed)} (this machine), got {cores!r}")
    os.sched_setaffinity(0, allowed[:cores])
    return cores


def run(cfg: Config) -> dict:
    cores = pin_cores(cfg.cores)
    jax.config.update("jax_enable_x64", True)
    h2h = head_to_head(cfg)
    scale = scaling(cfg)
    levels = level_costs(cfg)
    bw = bandwidth(cfg)
    print(f"n={cfg.n}: ours {h2h['ours_s']:.3f} s ({h2h['ours_cycles']} cycles, {cfg.cycle_dtype} cycles; "
          f"float64 cycles {h2h['ours_float64_s']:.3f} s), pyamg {h2h['pyamg_s']:.3f} s, "
          f"vs_pyamg = {h2h['vs_pyamg']:.3f}" + (f", spsolve {h2h['spsolve_s']:.2f} s, vs_spsolve = "
                                                 f"{h2h['vs_spsolve']:.4f}" if "spsolve_s" in h2h else ""))
    print("time per unknown (ns):", {n: round(r["time_per_unknown_s"] * 1e9, 2) for n, r in scale["sizes"].items()},
          f"linearity = {scale['linearity']:.2f} (float64 cycles: {scale['float64']['linearity']:.2f}); cycles:",
          {n: r["cycles"] for n, r in scale["sizes"].items()})
    print("one cycle's own work per level (ns per unknown):",
          {n: round(r["own_per_unknown_s"] * 1e9, 2) for n, r in levels["levels"].items() if n >= 64})
    print(f"copy {bw['copy_GBps']:.2f} GB/s; sweep bandwidth fraction: jacobi {bw['jacobi']['bandwidth_fraction']:.2f},"
          f" red-black GS {bw['gauss_seidel']['bandwidth_fraction']:.2f}")

    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ns = list(scale["sizes"])
    for label, rows in ((f"{cfg.cycle_dtype} cycles", scale["sizes"]), ("float64 cycles", scale["float64"]["sizes"])):
        ax.plot([(n - 1) ** 2 for n in ns], [rows[n]["time_per_unknown_s"] * 1e9 for n in ns], marker="o", label=label)
    ax.legend()
    ax.set(xscale="log", xlabel="unknowns", ylabel="ns per unknown", ylim=(0, None),
           title=f"V(2,1) to rtol {cfg.rtol:g}: linearity {scale['linearity']:.2f}")
    save_figure(cfg, fig, "bench_multigrid_scaling")
    headline = {"cores": cores, "vs_pyamg (goal <= 0.25)": h2h["vs_pyamg"],
                "linearity (goal <= 1.5)": scale["linearity"],
                "bandwidth_fraction (goal >= 0.3)": bw["bandwidth_fraction"], "ours_s": h2h["ours_s"]}
    if "vs_spsolve" in h2h:
        headline["vs_spsolve"] = h2h["vs_spsolve"]
    return {"head_to_head": h2h, "vs_pyamg": h2h["vs_pyamg"], "vs_spsolve": h2h.get("vs_spsolve"),
            "time_per_unknown": scale, "linearity": scale["linearity"], "level_costs": levels,
            "bandwidth": bw,
            "bandwidth_fraction": bw["bandwidth_fraction"], "device": str(jax.devices()[0]),
            "cores": cores,
            "headline": headline}


if __name__ == "__main__":
    main(__name__, Config, run, QUICK)
