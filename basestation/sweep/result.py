"""The figures of a finished sweep: mean energy to target per setting, hindsight best, each policy's regret.

``sweep_object`` is exactly what ``qfl sweep --json`` prints:

    {"target_accuracy", "settings": [{"n", "m", "I", "seed", "energy_to_target_j", "rounds_to_target"}],
     "hindsight_best": {"n", "m", "I", "energy_to_target_j"},
     "policies": {NAME: {"energy_to_target_j", "regret", "saving_vs_fl32"}}}

Means are over seeds; a setting or policy that missed the target on any seed
has no mean (null), and the hindsight best is the least mean among settings
that reached the target on every seed. regret = policy / best - 1.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping

import numpy as np

from basestation.sweep.grid import POLICY_NAMES


def _mean(values: list[float | None]) -> float | None:
    if not values or any(v is None or not math.isfinite(v) for v in values):
        return None
    return float(np.mean(values))


def setting_means(rows: Iterable[Mapping[str, Any]]) -> dict[tuple[int, int, int], float | None]:
    """Mean energy to target of each fixed (n, m, I) over its seeds."""
    groups: dict[tuple[int, int, int], list[float | None]] = {}
    for r in rows:
        if r["kind"] == "fixed":
            groups.setdefault((r["n"], r["m"], r["I"]), []).append(r["energy_to_target_j"])
    return {s: _mean(v) for s, v in sorted(groups.items())}


def policies_shown(results: Mapping[str, Mapping[str, Any]], asked: Iterable[str]) -> tuple[str, ...]:
    """The policies asked for, then every other policy with finished runs in the sweep's folder.

    A sweep resumed with fewer ``--policies`` keeps the runs of the others,
    and its summary and report keep showing them.
    """
    asked = tuple(asked)
    finished = {r["policy"] for r in results.values() if r["kind"] == "policy"}
    return asked + tuple(name for name in POLICY_NAMES if name in finished and name not in asked)


def sweep_object(results: Mapping[str, Mapping[str, Any]], target: float, policies: Iterable[str]) -> dict[str, Any]:
    """The ``--json`` object of the sweep (see the module docstring)."""
    rows = list(results.values())
    fixed = sorted((r for r in rows if r["kind"] == "fixed"), key=lambda r: (r["I"], r["n"], r["m"], r["seed"]))
    settings = [{"n": r["n"], "m": r["m"], "I": r["I"], "seed": r["seed"],
                 "energy_to_target_j": r["energy_to_target_j"], "rounds_to_target": r["rounds_to_target"]}
                for r in fixed]
    means = {s: v for s, v in setting_means(fixed).items() if v is not None}
    best = None
    if means:
        (n, m, i), energy = min(means.items(), key=lambda kv: kv[1])
        best = {"n": n, "m": m, "I": i, "energy_to_target_j": energy}
    policy_means = {name: _mean([r["energy_to_target_j"] for r in rows if r["kind"] == "policy"
                                 and r["policy"] == name]) for name in policies}
    fl32 = policy_means.get("fl32")
    out = {}
    for name in policies:
        energy = policy_means[name]
        out[name] = {"energy_to_target_j": energy,
                     "regret": None if energy is None or best is None else energy / best["energy_to_target_j"] - 1,
                     "saving_vs_fl32": None if energy is None or not fl32 else 1 - energy / fl32}
    return {"target_accuracy": target, "settings": settings, "hindsight_best": best, "policies": out}
