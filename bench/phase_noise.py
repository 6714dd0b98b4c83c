"""The repeatability floor of the emulated energy phases; prints one JSON object.

Runs the same fixed testbed settings (every n x m asked for) R times with
the same seed, so each repeat does the same work bit for bit (same data, same
updates, same bytes on the link) and only the host differs from one repeat to
the next. It then scores, per phase (train, uplink), two predictors of each
repeat's phases, both held out by repeat:

- the floor: the median of the other repeats' phases of the same setting
  (n, m, I), over every device and round. The median is the constant with
  the least absolute error, so no model whose inputs are the setting can do
  better on this host, except by chance. Predicting by the mean of the
  same device and round instead (``floor_same_device_round_wape_pct``) does
  worse: device and round carry no signal here, and a mean of R - 1 values
  adds its own noise;
- the calibrated testbed model (``basestation.sweep.wape.held_out_wape``, the
  fit the basestation makes) fitted to the other repeats. Its uplink fit
  needs two or more m to tell the cost per bit from the cost per message;
  training is also scored with the fit's per-n table of measured medians.

WAPE = sum |predicted - measured| / sum measured, energies above idle. A
model cannot score below the floor except by chance, so a WAPE goal below it
cannot be met on this host. ``calibrated / floor`` is the ratio.

    .venv/bin/python bench/phase_noise.py [--repeats 4] [--model mlp --board pi4 --link wifi] [--uplink-bits 4,16]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Callable

from rich.console import Console

from basestation.energy.records import EnergyRecord
from basestation.sweep.wape import _records, held_out_wape
from basestation.testbed.run import run_testbed
from basestation.testbed.settings import TestbedSettings

PHASES = ("train", "uplink")


def setting_key(record: EnergyRecord) -> tuple:
    """What the energy model sees of a phase: the setting."""
    return record.n, record.m, record.local_iters


def device_round_key(record: EnergyRecord) -> tuple:
    """The setting, the device and the round."""
    return record.n, record.m, record.local_iters, record.device, record.round


def floor_wape(repeats: list[list[EnergyRecord]], phase: str, key: Callable[[EnergyRecord], tuple],
               centre: Callable[[list[float]], float]) -> float | None:
    """WAPE (percent) of predicting each phase by ``centre`` of the other repeats' phases with the same ``key``."""
    attr = f"{phase}_j"
    abs_error = measured = 0.0
    for k, records in enumerate(repeats):
        others: dict[tuple, list[float]] = {}
        for j, other in enumerate(repeats):
            if j != k:
                for r in other:
                    others.setdefault(key(r), []).append(getattr(r, attr))
        for r in records:
            peers = others.get(key(r))
            if peers:
                abs_error += abs(getattr(r, attr) - centre(peers))
                measured += getattr(r, attr)
    return 100 * abs_error / measured if measured > 0 else None


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 4,16, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _bit_list(text: str) -> tuple[int, ...]:
    values = _int_list(text)
    if not all(1 <= v <= 32 for v in values):
        raise argparse.ArgumentTypeError(f"precisions are 1..32, got {text!r}")
    return values


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--repeats", type=int, default=4, help="runs of the same setting (at least 2)")
    ap.add_argument("--model", default="mlp")
    ap.add_argument("--board", default="pi4")
    ap.add_argument("--link", default="wifi")
    ap.add_argument("--bits", type=_bit_list, default=(8,), help="training precisions n, comma-separated")
    ap.add_argument("--uplink-bits", type=_bit_list, default=(4, 16), help="uplink precisions m, comma-separated")
    ap.add_argument("--iterations", type=_int_list, default=(20,), help="local iterations I, comma-separated")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--devices", type=int, default=4)
    ap.add_argument("--meters", default="fleet", choices=("fleet", "process"))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.repeats < 2:
        ap.error(f"--repeats must be at least 2 (the floor holds one run out), got {args.repeats}")

    quiet = Console(file=open(os.devnull, "w"))
    loads = []
    with tempfile.TemporaryDirectory(prefix="qfl-phase-noise-") as tmp:
        results, repeats = {}, []
        settings_grid = [(n, m, i) for n in args.bits for m in args.uplink_bits for i in args.iterations]
        for k in range(args.repeats):
            repeats.append([])
            for n, m, i in settings_grid:
                settings = TestbedSettings(model=args.model, board=args.board, link=args.link, policy="fixed",
                                           bits=n, uplink_bits=m, iterations=i, rounds=args.rounds,
                                           devices=args.devices, meters=args.meters, seed=args.seed,
                                           out=Path(tmp), name=f"repeat{k}-n{n}-m{m}-I{i}").checked()
                result = run_testbed(settings, quiet)
                loads.append(os.getloadavg()[0])
                repeats[k].extend(_records(result.run_dir, settings.experiment))
                # each repeat stands in for a seed, so held_out_wape holds out one repeat at a time
                results[settings.name] = {"kind": "fixed", "seed": k, "run_dir": str(result.run_dir)}
            print(f"repeat {k + 1}/{args.repeats} done", file=sys.stderr)
        calibrated = held_out_wape(results, args.model)

    out = {"bench": "phase_noise", "python": platform.python_version(),
           "setting": {"model": args.model, "board": args.board, "link": args.link, "n": list(args.bits),
                       "m": list(args.uplink_bits), "I": list(args.iterations), "rounds": args.rounds,
                       "devices": args.devices, "meters": args.meters, "seed": args.seed},
           "repeats": args.repeats, "loadavg_1min_after_each_run": [round(x, 2) for x in loads], "phases": {}}
    for phase in PHASES:
        totals = [sum(getattr(r, f"{phase}_j") for r in records) for records in repeats]
        floor = floor_wape(repeats, phase, setting_key, statistics.median)
        cell = floor_wape(repeats, phase, device_round_key, statistics.fmean)
        cal = calibrated[phase]["wape_calibrated_pct"]
        out["phases"][phase] = {
            "records_per_repeat": [len(records) for records in repeats],
            "repeat_totals_above_idle_j": [round(t, 6) for t in totals],
            "repeat_total_spread_pct": round(100 * statistics.pstdev(totals) / statistics.fmean(totals), 2),
            "floor_wape_pct": None if floor is None else round(floor, 2),
            "floor_same_device_round_wape_pct": None if cell is None else round(cell, 2),
            "calibrated_wape_pct": None if cal is None else round(cal, 2),
            "calibrated_over_floor": None if not (floor and cal) else round(cal / floor, 2)}
        table = calibrated[phase].get("wape_calibrated_table_pct")
        if table is not None:
            out["phases"][phase]["calibrated_table_wape_pct"] = round(table, 2)
            out["phases"][phase]["calibrated_table_over_floor"] = round(table / floor, 2) if floor else None
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
