"""Solve the training and uplink precisions that reach a target for the least energy.

    qfl solve --preset kim2022 --epsilon 0.1                          # joint (I, K, m, n)
    qfl solve --preset kim2022 --epsilon 0.1 --tied --local-iters 1 --devices 5
    qfl solve --preset testbed --model mlp --epsilon 0.1 --json --plot precision.png
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from edge.cli import CommandError, seed


def configure(parser: argparse.ArgumentParser) -> None:
    """Options of ``qfl solve``."""
    parser.add_argument("--preset", choices=("kim2022", "testbed"), default="kim2022",
                        help="kim2022: the paper's released constants; testbed: this testbed's measured-like model")
    parser.add_argument("--epsilon", type=float, default=0.1, help="target optimality gap E[F(w_T)] - F*")
    parser.add_argument("--tied", action="store_true",
                        help="ICC 2022 line search: one precision n = m at fixed I and K")
    parser.add_argument("--local-iters", type=int, default=None, metavar="I",
                        help="local iterations per round (tied default 1; joint: searched over 1..30 unless given)")
    parser.add_argument("--devices", type=int, default=None, metavar="K",
                        help="devices per round (tied default 5; joint: searched over 1..N unless given)")
    parser.add_argument("--pareto", action="store_true",
                        help="also list the energy/rounds Pareto front and its Nash bargaining point")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    parser.add_argument("--plot", type=Path, default=None, metavar="FILE.png",
                        help="draw energy and rounds against training precision")
    kim = parser.add_argument_group("kim2022 preset")
    kim.add_argument("--seed", type=seed, default=None, help="seed of the channel average (default 0)")
    kim.add_argument("--draws", type=int, default=None, help="channel draws averaged (default 10000)")
    tb = parser.add_argument_group("testbed preset")
    tb.add_argument("--model", default=None, help="architecture (models.ARCHITECTURES); default mlp")
    tb.add_argument("--fleet", type=int, default=None, metavar="N", help="devices in the testbed (default 10)")
    tb.add_argument("--batch-size", type=int, default=None, help="minibatch of one local iteration (default 32)")
    tb.add_argument("--calibration", type=Path, default=None, metavar="FILE.json",
                    help="energy parameters from a calibration (Calibration.to_dict() as JSON)")


def run(args: argparse.Namespace) -> int:
    """Solve and print."""
    from basestation.energy import solver
    from basestation.energy.problem import SolveError

    preset = _preset(args)
    if not (math.isfinite(args.epsilon) and args.epsilon > 0):
        raise CommandError(f"--epsilon must be a positive number, got {args.epsilon!r}")
    problem = preset.problem(args.epsilon)
    for flag, value, high in (("--local-iters", args.local_iters, solver.MAX_LOCAL_ITERS),
                              ("--devices", args.devices, problem.devices)):
        if value is not None and not 1 <= value <= high:
            raise CommandError(f"{flag} must be in 1..{high} for this preset, got {value}")
    try:
        if args.tied:
            i, k = args.local_iters or 1, args.devices or min(5, problem.devices)
            curve = solver.tied_curve(problem, local_iters=i, devices=k)
            optimum = min(curve, key=lambda s: s.energy_j)
            baseline = problem.setting(i, k, 32, 32)
            front = _tied_front(curve) if args.pareto else None
        else:
            axes = {"local_iters": args.local_iters, "devices": args.devices}
            grid = solver.evaluate_grid(problem, **axes)
            optimum = grid.best()
            baseline = solver.best_full_precision(problem, **axes)
            curve = [_best_at_n(grid, j) for j in range(grid.n.size)]
            front = solver.pareto_front(grid) if args.pareto else None
    except SolveError as exc:
        raise CommandError(str(exc)) from None
    if baseline.energy_j <= 0.0:
        raise CommandError(f"--epsilon {args.epsilon:g} is met without any training (0 rounds at 32 bits); "
                           "choose a smaller optimality gap")
    result: dict[str, Any] = {
        "preset": preset.name, "description": preset.description, "epsilon": args.epsilon,
        "mode": "tied" if args.tied else "joint", "n_min": problem.n_min(),
        "optimum": optimum.to_dict(), "baseline": baseline.to_dict(),
        "saving": 1.0 - optimum.energy_j / baseline.energy_j,
    }
    if front is not None:
        result["pareto"] = [s.to_dict() for s in front]
        result["nash"] = solver.nash_bargaining(front).to_dict()
    if args.plot is not None:
        from basestation.energy.plot import plot_precision, plot_formats

        formats = plot_formats()
        if args.plot.suffix.lstrip(".").lower() not in formats:
            raise CommandError(f"--plot {args.plot}: the file name must end in one of "
                               f"{', '.join('.' + f for f in sorted(formats))}")

        try:
            plot_precision(curve, args.plot, optimum=optimum, baseline=baseline,
                           title=f"{preset.name}, epsilon = {args.epsilon:g} ({result['mode']})")
        except OSError as exc:
            raise CommandError(f"cannot write the plot to {args.plot}: {exc}") from None
        result["plot"] = str(args.plot)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        _print_tables(result)
    return 0


def _preset(args: argparse.Namespace) -> Any:
    from basestation.energy.presets import kim2022, testbed

    only = {"kim2022": {"--seed": args.seed, "--draws": args.draws},
            "testbed": {"--model": args.model, "--fleet": args.fleet, "--batch-size": args.batch_size,
                        "--calibration": args.calibration}}
    other = "testbed" if args.preset == "kim2022" else "kim2022"
    given = [flag for flag, value in only[other].items() if value is not None]
    if given:
        raise CommandError(f"{', '.join(given)} appl{'ies' if len(given) == 1 else 'y'} to --preset {other} only")
    if args.preset == "kim2022":
        draws = 10_000 if args.draws is None else args.draws
        if draws < 1:
            raise CommandError(f"--draws must be at least 1, got {draws}")
        return kim2022(seed=args.seed or 0, draws=draws)
    calibration = _load_calibration(args.calibration) if args.calibration is not None else None
    if args.fleet is not None and args.fleet < 1:
        raise CommandError(f"--fleet must be at least 1, got {args.fleet}")
    if args.batch_size is not None and args.batch_size < 1:
        raise CommandError(f"--batch-size must be at least 1, got {args.batch_size}")
    try:
        return testbed(args.model or "mlp", devices=args.fleet or 10, batch_size=args.batch_size or 32,
                       calibration=calibration)
    except ValueError as exc:
        raise CommandError(str(exc)) from None


def _load_calibration(path: Path) -> Any:
    from basestation.energy.calibration import Calibration

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise CommandError(f"cannot read the calibration {path}: {exc.strerror or exc}") from None
    except json.JSONDecodeError as exc:
        raise CommandError(f"{path} is not JSON: {exc}") from None
    try:
        return Calibration.from_dict(data)
    except ValueError as exc:
        raise CommandError(f"{path}: {exc}") from None


def _best_at_n(grid: Any, j: int) -> Any:
    """The least-energy (I, K, m) at the j-th training precision of the grid."""
    import numpy as np

    sub = grid.energy[..., j]
    i, k, a = np.unravel_index(int(np.argmin(sub)), sub.shape)
    return grid.setting((int(i), int(k), int(a), j))


def _tied_front(curve: list[Any]) -> list[Any]:
    from basestation.energy.solver import pareto_mask

    mask = pareto_mask([s.energy_j for s in curve], [s.rounds for s in curve])
    return sorted((s for s, keep in zip(curve, mask) if keep), key=lambda s: s.energy_j)


def _print_tables(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=f"{result['preset']} ({result['mode']}), epsilon = {result['epsilon']:g}")
    for column in ("", "I", "K", "m", "n", "energy (J)", "rounds"):
        table.add_column(column, justify="right" if column else "left")
    rows = [("optimum", result["optimum"]), ("32-bit baseline", result["baseline"])]
    if "nash" in result:
        rows.append(("Nash bargaining", result["nash"]))
    for label, s in rows:
        table.add_row(label, str(s["I"]), str(s["K"]), str(s["m"]), str(s["n"]), _num(s["energy_j"]),
                      _num(s["rounds"]))
    console.print(table)
    console.print(f"saving against the baseline: [bold]{result['saving']:.1%}[/bold]    n_min: {result['n_min']}")
    console.print(result["description"], style="dim")
    if "pareto" in result:
        console.print(f"Pareto front: {len(result['pareto'])} points from "
                      f"{_num(result['pareto'][0]['energy_j'])} J / {_num(result['pareto'][0]['rounds'])} rounds to "
                      f"{_num(result['pareto'][-1]['energy_j'])} J / {_num(result['pareto'][-1]['rounds'])} rounds")
    if "plot" in result:
        console.print(f"plot written to {result['plot']}")


def _num(value: float | None) -> str:
    return "inf" if value is None else f"{value:.4g}"
