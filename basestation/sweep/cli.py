"""``qfl sweep``: every fixed (n, m, I) of a grid, then each policy, on the same seeds, data, board and link.

    qfl sweep --grid-bits 4,8,16,32 --grid-uplink-bits 4,8,16,32 --grid-iterations 5,20 \\
        --policies fl32,model,measured --seeds 3 --board pi4 --link wifi --out sweeps/a [--json]

Every run stops at the first round that reaches --target-accuracy (or after
--rounds). A killed sweep continues from the runs already in --out. The
report (``--out``/report.html) has a heatmap of energy to target over (n, m)
for each I and the policy table; ``sweep-result.json`` holds the --json
object plus the convergence model's held-out errors and the calibrated energy model's per-phase WAPE
(held out by seed, ``basestation.sweep.wape``).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from basestation.testbed.settings import BOARDS, TestbedSettings
from edge.cli import seed

_D = TestbedSettings()


def configure(parser: argparse.ArgumentParser) -> None:
    """Options of ``qfl sweep``."""
    add = parser.add_argument
    add("--grid-bits", default="4,8,16,32", help="training precisions n of the grid (comma-separated, 1..32)")
    add("--grid-uplink-bits", default="4,8,16,32", help="uplink precisions m of the grid (1..32)")
    add("--grid-iterations", default="1,5,20",
        help="local iterations I of the grid; three or more let the rounds model fit how rounds scale with I")
    add("--policies", default="fl32,model,measured",
        help="policies run after the grid: fl32 (n = m = 32 at --iterations), model, measured")
    add("--seeds", type=int, default=3, help="seeds per setting (--seed, --seed + 1, ...)")
    add("--link", default=_D.link, help="uplink link profile (loopback, wifi, lte-m, kim2022)")
    add("--board", default=_D.board, help=f"board profile the meters emulate ({', '.join(BOARDS)})")
    add("--devices", type=int, default=_D.devices, help="edge processes per run")
    add("--meters", default=_D.meters,
        help="'fleet' (one process emulates every meter, 10 ms tick) or 'process' (one emulator per device, "
             "2 ms tick)")
    add("--rounds", type=int, default=30, help="most rounds a run may take to reach the target")
    add("--dataset", default=_D.dataset, help="'digits', 'mnist-subset', 'mnist:DIR' or 'fashion-mnist:DIR'")
    add("--model", default=_D.model, help="architecture from models/ (mlp, mlp-mnist, cnn, cnn-mnist)")
    add("--partition", default=_D.partition, help="'iid', 'dirichlet:ALPHA' or 'shards:K'")
    add("--bits", type=int, default=_D.bits, help="start n of the adaptive policies")
    add("--uplink-bits", type=int, default=_D.uplink_bits, help="start m of the adaptive policies")
    add("--iterations", type=int, default=_D.iterations, help="the experiment's I (fl32, model, measured's start)")
    add("--lr", type=float, default=_D.lr, help="local SGD learning rate")
    add("--momentum", type=float, default=_D.momentum,
        help="local SGD momentum, 0 to 0.999; each round starts from zero velocity (0: plain SGD)")
    add("--deadline", type=float, default=_D.deadline_seconds, help="seconds a round waits for updates")
    add("--seed", type=seed, default=_D.seed, help="first seed")
    add("--target-accuracy", type=float, default=_D.target_accuracy, help="accuracy the energy is measured to")
    add("--out", type=Path, default=Path("sweeps/sweep"), help="folder of the sweep (resumed if it exists)")
    add("--json", action="store_true", help="print the result object to stdout (progress goes to stderr)")


def run(args: argparse.Namespace) -> int:
    """Parse and check everything first (exit 2 on bad input), then run, report and print."""
    from rich.console import Console

    from basestation.sweep.grid import Grid, GridError, parse_bits, parse_iterations, parse_policies
    from basestation.testbed.prepare import load_and_split
    from basestation.testbed.settings import SettingsError
    from edge.cli import CommandError

    try:
        grid = Grid(parse_bits("--grid-bits", args.grid_bits), parse_bits("--grid-uplink-bits", args.grid_uplink_bits),
                    parse_iterations("--grid-iterations", args.grid_iterations))
        policies = parse_policies(args.policies)
        if not 1 <= args.seeds <= 100:
            raise GridError(f"--seeds must be 1..100, got {args.seeds}")
        if args.board not in BOARDS:
            raise GridError(f"unknown board {args.board!r}; valid: {', '.join(BOARDS)}")
        base = TestbedSettings(devices=args.devices, rounds=args.rounds, dataset=args.dataset, model=args.model,
                               partition=args.partition, bits=args.bits, uplink_bits=args.uplink_bits,
                               board=args.board, iterations=args.iterations, lr=args.lr, momentum=args.momentum,
                               deadline_seconds=args.deadline, seed=args.seed, target_accuracy=args.target_accuracy,
                               link=args.link, meters=args.meters, name="sweep").checked()
        if args.out.exists() and not args.out.is_dir():
            raise GridError(f"--out {args.out} is a file; it must be the sweep's folder (created if missing)")
        load_and_split(base)
    except (GridError, SettingsError, ValueError) as exc:
        raise CommandError(str(exc)) from None

    from firmware_tools.broker_auth import MosquittoMissing
    from basestation.report.sweep import write_sweep_report
    from basestation.sweep.result import policies_shown, sweep_object
    from basestation.sweep.runner import SweepError, run_sweep
    from basestation.sweep.wape import held_out_wape
    from basestation.testbed.run import TestbedError

    console = Console(stderr=True, soft_wrap=True) if args.json else Console(soft_wrap=True)
    out = args.out
    try:
        results = run_sweep(base, grid, policies, args.seeds, out, console)
    except (SweepError, TestbedError, MosquittoMissing, ValueError) as exc:
        raise CommandError(str(exc)) from None
    obj = sweep_object(results, base.target_accuracy, policies_shown(results, policies))
    extended = {**obj, "scenario": {"model": base.model, "board": base.board, "link": base.link,
                                    "devices": base.devices, "meters": base.meters, "dataset": base.dataset,
                                    "iterations": base.iterations,
                                    "max_rounds": base.rounds, "grid": {"bits": grid.bits,
                                                                        "uplink_bits": grid.uplink_bits,
                                                                        "iterations": grid.iterations},
                                    "seeds": args.seeds},
                "convergence_model": _holdout(out, base.target_accuracy),
                "calibration_wape_by_phase": held_out_wape(results, base.model),
                "policy_runs": {k: {f: r.get(f) for f in ("bits", "iterations", "explored", "reasons",
                                                          "energy_to_target_j", "rounds_to_target", "loadavg")}
                                for k, r in sorted(results.items()) if r["kind"] == "policy"},
                "loadavg_end": list(os.getloadavg())}
    (out / "sweep-result.json").write_text(json.dumps(extended, indent=2) + "\n")
    report = write_sweep_report(extended, out)
    if args.json:
        print(json.dumps(obj, indent=2))
    else:
        console.print(f"sweep report: {report}", highlight=False)
    return 0


def _holdout(out: Path, target: float) -> dict:
    """Leave-one-setting-out and leave-one-I-out errors of the rounds model on the sweep's own curves."""
    from basestation.energy.empirical import CurveError, error_summary, fit_rounds, holdout_errors, load_curves

    try:
        curves = load_curves(out / "curves.json")
        fit = fit_rounds(curves, target)
    except CurveError as exc:
        return {"error": str(exc)}
    by_setting = holdout_errors(curves, target, by="setting")
    by_i = holdout_errors(curves, target, by="I")
    return {"fit": fit.to_dict(), "leave_one_setting_out": error_summary(by_setting),
            "leave_one_I_out": error_summary(by_i), "rows_setting": by_setting, "rows_I": by_i}
