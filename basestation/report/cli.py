"""Write the measured-versus-modelled report of one or more finished runs.

    qfl report runs/fp32                          # report.html, figures/ and CSV files in runs/fp32
    qfl report runs/fp32 runs/int8 --out cmp      # compare runs; savings against the first (or --baseline)
"""

from __future__ import annotations

import argparse
from pathlib import Path


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR",
                        help="run directories written by 'qfl testbed' or the basestation")
    parser.add_argument("--out", type=Path, default=None,
                        help="directory for report.html, figures/ and the CSV files "
                             "(default: the run directory itself when there is one run)")
    parser.add_argument("--target-accuracy", type=float, default=0.9,
                        help="accuracy in [0, 1] whose energy-to-reach the comparison table shows")
    parser.add_argument("--baseline", default=None, metavar="NAME",
                        help="name of the run the savings are relative to (default: the first run)")


def run(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from edge.cli import CommandError
    from basestation.report import metrics
    from basestation.report.data import ReportError
    from basestation.report.load import load_run
    from basestation.report.tables import count_of, format_joules
    from basestation.report.writer import unique_names, write_report

    if args.out is None and len(args.runs) > 1:
        raise CommandError(f"a report of {len(args.runs)} runs needs --out DIR (where to write it)")
    if not 0.0 < args.target_accuracy <= 1.0:
        raise CommandError(f"--target-accuracy must be in (0, 1], got {args.target_accuracy}")
    try:
        runs = [load_run(path) for path in args.runs]
        names = unique_names([r.name for r in runs])
        runs = [replace(r, name=name) for r, name in zip(runs, names)]
        files = write_report(runs, args.out or args.runs[0], target_accuracy=args.target_accuracy,
                             baseline=args.baseline)
    except (ReportError, OSError) as exc:
        raise CommandError(str(exc)) from None
    for row in metrics.compare(runs, args.target_accuracy, args.baseline):
        reached = (f"accuracy {args.target_accuracy:g} at round {row.target.round} after "
                   f"{format_joules(row.target.joules)}" if row.target.reached
                   else f"accuracy {args.target_accuracy:g} not reached")
        final = f"{row.final_accuracy:.4f}" if row.final_accuracy is not None else "-"
        print(f"run {row.name}: {count_of(row.rounds, 'round')}, final accuracy {final}, "
              f"{format_joules(row.total_j)} measured, {reached}")
    print(f"report: {files.html} ({len(files.figures)} figures, {len(files.csv)} CSV files)")
    return 0
