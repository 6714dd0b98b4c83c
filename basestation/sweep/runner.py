"""Run a sweep into its ``--out`` folder, resumably.

    out/sweep.json       what the sweep is (testbed settings, grid, seeds); a resumed sweep must match it
    out/results.jsonl    one line per finished run (fixed setting or policy, seed, curve, energy per round)
    out/runs/<key>/      each run's testbed directory (store, logs, report)
    out/curves.json      the fixed runs' learning curves (the ``measured`` policy's history format)

A run whose line is in ``results.jsonl`` is never run again; a run directory
without a line (the sweep was killed during that run) is removed and run
again, so a killed sweep continues where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
from pathlib import Path
from typing import Any, Callable

from rich.console import Console

from basestation.energy.empirical import Curve, save_curves
from basestation.energy.store_history import energy_per_round
from basestation.sweep.grid import Grid
from basestation.testbed.settings import TestbedSettings

RESULTS = "results.jsonl"
SPEC = "sweep.json"


class SweepError(ValueError):
    """The sweep cannot run as asked (e.g. --out holds a different sweep)."""


def fixed_key(n: int, m: int, i: int, seed: int) -> str:
    return f"fixed-n{n}-m{m}-I{i}-s{seed}"


def policy_key(name: str, seed: int) -> str:
    return f"policy-{name}-s{seed}"


def spec_of(base: TestbedSettings, grid: Grid, seeds: int) -> dict[str, Any]:
    """What makes two sweeps the same sweep (policies may be added on resume)."""
    doc = base.to_json()
    for key in ("name", "out", "policy", "bits", "uplink_bits", "history", "stop_at_target"):
        doc.pop(key, None)
    return {"testbed": doc, "grid": dataclasses.asdict(grid), "seeds": seeds}


def same_sweep(stored: dict[str, Any], spec: dict[str, Any]) -> bool:
    """Whether a stored spec describes the sweep ``spec`` asks for.

    A testbed option the stored spec lacks (it was written before the option
    existed) counts as that option's default, so such a sweep still resumes
    when it is asked for with the default.
    """
    defaults = json.loads(json.dumps(TestbedSettings().to_json()))  # as stored: tuples become lists
    stored_testbed = stored.get("testbed", {})
    missing = {key: defaults[key] for key in spec["testbed"].keys() - stored_testbed.keys() if key in defaults}
    return {**stored, "testbed": {**missing, **stored_testbed}} == spec


# What every stored result row must hold to count as a finished run (the fields the sweep reads back).
RESULT_FIELDS = frozenset({"key", "kind", "n", "m", "I", "seed", "accuracy", "energy_j", "train_j", "uplink_j",
                           "energy_to_target_j", "rounds_to_target"})


def read_results(path: Path) -> tuple[dict[str, dict[str, Any]], int]:
    """Finished runs of ``path`` by key, and how many lines were not whole result rows (torn by a kill,
    damaged): those runs are run again."""
    results: dict[str, dict[str, Any]] = {}
    unreadable = 0
    if not path.exists():
        return results, 0
    for line in path.read_bytes().decode("utf-8", "replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if isinstance(row, dict) and RESULT_FIELDS <= row.keys() and isinstance(row["key"], str):
            results[row["key"]] = row
        elif line.strip():
            unreadable += 1
    return results, unreadable


def run_sweep(base: TestbedSettings, grid: Grid, policies: tuple[str, ...], seeds: int, out: Path,
              console: Console, progress: Callable[[str], None] | None = None) -> dict[str, dict[str, Any]]:
    """Run every missing fixed setting, then every missing policy run; returns all results by key."""
    out.mkdir(parents=True, exist_ok=True)
    spec = json.loads(json.dumps(spec_of(base, grid, seeds)))  # as stored: tuples become lists
    spec_path = out / SPEC
    if spec_path.exists():
        try:
            stored = json.loads(spec_path.read_bytes())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise SweepError(f"{spec_path} is damaged ({exc}); it says which sweep {out} holds, so fix or remove "
                             "it (the finished runs in results.jsonl stay and are reused if the options match)") \
                from None
        if not isinstance(stored, dict) or not same_sweep(stored, spec):
            raise SweepError(f"{out} holds a different sweep ({spec_path}); use another --out or the same options")
    else:
        spec_path.write_text(json.dumps(spec, indent=2) + "\n")
    results, unreadable = read_results(out / RESULTS)
    if unreadable:
        console.print(f"[yellow]{out / RESULTS}: {unreadable} line(s) are not result rows (torn or damaged); "
                      "their runs are run again[/]", highlight=False)
    seed_values = [base.seed + k for k in range(seeds)]
    jobs: list[tuple[str, Callable[[], TestbedSettings]]] = []
    for seed in seed_values:
        for n, m, i in grid.settings():
            jobs.append((fixed_key(n, m, i, seed), _fixed(base, out, n, m, i, seed)))
    for name in policies:
        for seed in seed_values:
            jobs.append((policy_key(name, seed), _policy(base, out, name, seed, results)))
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
        TimeRemainingColumn

    bar = Progress(TextColumn("[bold]qfl sweep[/]"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TimeRemainingColumn(), TextColumn("{task.description}"), console=console, transient=False)
    quiet = Console(file=open(os.devnull, "w"), soft_wrap=True)
    with bar:
        task = bar.add_task("", total=len(jobs), completed=sum(key in results for key, _ in jobs))
        for key, make in jobs:
            if key in results:
                continue
            bar.update(task, description=key)
            settings = make()
            if settings.run_dir.exists():
                shutil.rmtree(settings.run_dir)  # a run the sweep was killed in: start it over
            results[key] = _run_one(key, settings, quiet)
            with open(out / RESULTS, "a") as f:
                f.write(json.dumps(results[key]) + "\n")
            if key.startswith("fixed-"):
                write_curves(out, results)
            bar.advance(task)
        bar.update(task, description="done")
    write_curves(out, results)
    return results


def _fixed(base: TestbedSettings, out: Path, n: int, m: int, i: int, seed: int) -> Callable[[], TestbedSettings]:
    return lambda: dataclasses.replace(base, out=out / "runs", name=fixed_key(n, m, i, seed), policy="fixed",
                                       bits=n, uplink_bits=m, iterations=i, seed=seed, stop_at_target=True,
                                       history=None)


def _policy(base: TestbedSettings, out: Path, name: str, seed: int,
            results: dict[str, dict[str, Any]]) -> Callable[[], TestbedSettings]:
    def make() -> TestbedSettings:
        common = dict(out=out / "runs", name=policy_key(name, seed), seed=seed, stop_at_target=True, history=None)
        if name == "fl32":
            return dataclasses.replace(base, policy="fixed", bits=32, uplink_bits=32, **common)
        if name == "model":
            return dataclasses.replace(base, policy="model", **common)
        # The measured policy learns from the other seeds' fixed runs (held-out history), never its own seed's.
        curves = [r for r in results.values() if r["kind"] == "fixed" and r["seed"] != seed]
        in_sample = not curves
        if in_sample:
            curves = [r for r in results.values() if r["kind"] == "fixed"]
        history = out / f"history-s{seed}.json"
        save_curves(history, [_curve(r) for r in curves], in_sample=in_sample)
        common["history"] = history
        return dataclasses.replace(base, policy="measured", **common)
    return make


def _run_one(key: str, settings: TestbedSettings, console: Console) -> dict[str, Any]:
    from basestation.report.load import load_run
    from basestation.testbed.run import run_testbed

    result = run_testbed(settings, console)
    run = load_run(result.run_dir, experiment=settings.experiment)
    rounds = run.sorted_rounds()
    energy, train, uplink = energy_per_round(run.energy, [r.round for r in rounds])
    s = result.summary
    iterations = [d.get("local_iters") for d in run.decisions]
    return {"key": key, "kind": "fixed" if settings.policy == "fixed" and key.startswith("fixed-") else "policy",
            "policy": key.split("-")[1] if key.startswith("policy-") else "fixed",
            "n": settings.bits if settings.policy == "fixed" else (s["bits"][-1][0] if s["bits"] else None),
            "m": settings.uplink_bits if settings.policy == "fixed" else (s["bits"][-1][1] if s["bits"] else None),
            "I": settings.iterations if settings.policy == "fixed" else (iterations[-1] if iterations else None),
            "seed": settings.seed, "energy_to_target_j": s["energy_to_target_j"],
            "rounds_to_target": s["target_round"], "accuracy": [r.accuracy for r in rounds],
            "energy_j": list(energy), "train_j": list(train), "uplink_j": list(uplink), "bits": s["bits"],
            "iterations": iterations,
            "explored": sum(bool(d.get("explore")) for d in run.decisions),
            "reasons": [d.get("reason") for d in run.decisions],
            "energy_by_phase_j": s["energy_by_phase_j"], "energy_above_idle_j": s["energy_above_idle_j"],
            "energy_calibrated_j": s["energy_calibrated_j"], "seconds": s["seconds"],
            "loadavg": list(os.getloadavg()), "run_dir": str(result.run_dir)}


def _curve(row: dict[str, Any]) -> Curve:
    return Curve(n=row["n"], m=row["m"], I=row["I"], seed=row["seed"],
                 accuracy=tuple(a if a is not None and math.isfinite(a) else 0.0 for a in row["accuracy"]),
                 energy_j=tuple(row["energy_j"]), train_j=tuple(row["train_j"]), uplink_j=tuple(row["uplink_j"]))


def write_curves(out: Path, results: dict[str, dict[str, Any]]) -> Path:
    """The fixed runs' curves as ``out/curves.json``."""
    path = out / "curves.json"
    save_curves(path, [_curve(r) for r in results.values() if r["kind"] == "fixed"])
    return path
