"""Benchmark of the joint integer search of the kim2022 preset: numpy broadcasting against a plain Python loop.

Prints one JSON object. The loop baseline evaluates the same model functions
one grid point at a time; by default it times every ``--stride``-th point of
the grid and extrapolates to the whole grid (said in the JSON).

    .venv/bin/python bench/solve.py [--repeats 5] [--stride 20]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time

import numpy as np

from basestation.energy import kim2022 as model
from basestation.energy.presets import kim2022
from basestation.energy.solver import MAX_LOCAL_ITERS, best_full_precision, evaluate_grid


def loop_search(problem, points):
    """The least energy over ``points`` (tuples I, K, m, n), one scalar evaluation each."""
    hw, conv, d, eps = problem.energy.hw, problem.convergence, problem.d, problem.epsilon
    q = problem.weights
    jpb = float(np.dot(q, problem.energy.joules_per_bit))
    best = (math.inf, None)
    for i, k, m, n in points:
        t = float(model.rounds(i, k, m, n, d, conv, eps))
        if not math.isfinite(t):
            continue
        e_train = float(model.train_energy(n, hw))
        e_comm = float(model.uplink_energy(m, d, jpb))
        energy = t * k * (i * e_train + e_comm)
        if energy < best[0]:
            best = (energy, (i, k, m, n))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of the vectorised search (best taken)")
    parser.add_argument("--stride", type=int, default=20, help="time every STRIDE-th grid point of the loop (1: all)")
    args = parser.parse_args()

    start = time.perf_counter()
    problem = kim2022().problem(epsilon=0.1)
    preset_seconds = time.perf_counter() - start
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        grid = evaluate_grid(problem)
        best = grid.best()
        baseline = best_full_precision(problem)
        times.append(time.perf_counter() - start)
    vectorised = min(times)

    axes = [range(1, MAX_LOCAL_ITERS + 1), range(1, problem.devices + 1), range(1, 33), range(problem.n_min(), 33)]
    all_points = [(i, k, m, n) for i in axes[0] for k in axes[1] for m in axes[2] for n in axes[3]]
    sample = all_points[::args.stride]
    start = time.perf_counter()
    loop_best = loop_search(problem, sample)
    loop_sample = time.perf_counter() - start
    loop_full = loop_sample * len(all_points) / len(sample)
    # The sampled loop must agree with the grid on the points it saw.
    agree = abs(loop_best[0] - float(np.min(grid.energy.ravel()[::args.stride]))) <= 1e-9 * loop_best[0]

    print(json.dumps({
        "benchmark": "joint integer search, kim2022 preset, epsilon 0.1",
        "grid_points": len(all_points),
        "preset_seconds": preset_seconds,
        "optimum": best.to_dict(),
        "saving_vs_best_full_precision": 1 - best.energy_j / baseline.energy_j,
        "vectorised_seconds": vectorised,
        "vectorised_seconds_all_runs": times,
        "vectorised_under_1s": vectorised < 1.0,
        "loop_points_timed": len(sample),
        "loop_stride": args.stride,
        "loop_seconds_timed": loop_sample,
        "loop_seconds_whole_grid": loop_full,
        "loop_extrapolated": args.stride > 1,
        "loop_agrees_on_timed_points": bool(agree),
        "speedup": loop_full / vectorised,
        "python": platform.python_version(),
        "numpy": np.__version__,
    }, indent=2))


if __name__ == "__main__":
    main()
