"""Live progress of a testbed run, read from the basestation's store while it runs.

The store is SQLite in WAL mode, so reading it from here never blocks the
basestation's writes. On a terminal the table redraws in place (rich); in a
log or a pipe one line is printed per finished round.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table


@dataclass(frozen=True)
class RoundProgress:
    """One row of the progress table."""

    round: int
    status: str
    selected: int
    answered: int
    n: int
    m: int
    accuracy: float | None
    energy_j: float
    reports: int  # devices whose energy report for this round has arrived


def read_progress(store: Path, experiment: str) -> list[RoundProgress]:
    """Rounds so far with the energy devices reported for each; [] until the basestation made its store."""
    from basestation.store import Store

    if not store.exists():
        return []
    try:
        with Store(store, readonly=True) as db:
            if db.experiment(experiment) is None:
                return []
            energy: dict[int, float] = {}
            reporters: dict[int, set[str]] = {}
            for record in db.energy(experiment):
                energy[record.round] = energy.get(record.round, 0.0) + (record.joules or 0.0)
                reporters.setdefault(record.round, set()).add(record.device)
            return [RoundProgress(r.round, r.status, len(r.selected), r.accepted, r.n, r.m, r.accuracy,
                                  energy.get(r.round, 0.0), len(reporters.get(r.round, ())))
                    for r in db.rounds(experiment)]
    except (sqlite3.Error, RuntimeError):
        return []  # being created, or locked for a moment: try again next tick


def progress_table(rows: list[RoundProgress], *, title: str, devices_online: int | None = None) -> Table:
    """The rich table shown while a run goes on."""
    total = sum(r.energy_j for r in rows)
    caption = f"energy so far {total:.3g} J"
    if devices_online is not None:
        caption += f" · {devices_online} edge processes running"
    table = Table(title=title, caption=caption)
    for header, justify in (("round", "right"), ("status", "left"), ("answered", "right"), ("n/m bits", "center"),
                            ("accuracy", "right"), ("energy J", "right")):
        table.add_column(header, justify=justify)
    for r in rows[-15:]:
        accuracy = "" if r.accuracy is None else f"{r.accuracy:.3f}"
        table.add_row(str(r.round), r.status, f"{r.answered}/{r.selected}", f"{r.n}/{r.m}", accuracy,
                      f"{r.energy_j:.3g}")
    return table


def round_line(r: RoundProgress, total_j: float) -> str:
    """One plain line for a finished round (non-terminal output)."""
    accuracy = "-" if r.accuracy is None else f"{r.accuracy:.3f}"
    return (f"round {r.round:>3}: {r.status:<9} answered {r.answered}/{r.selected}  n={r.n} m={r.m}  "
            f"accuracy {accuracy}  energy {r.energy_j:.3g} J (total {total_j:.3g} J)")


class Progress:
    """Shows rounds as they close; call :meth:`update` every tick, :meth:`close` at the end."""

    def __init__(self, console: Console, store: Path, experiment: str, title: str):
        self.console = console
        self.store = store
        self.experiment = experiment
        self.title = title
        self._printed: set[int] = set()
        self._live = None
        if console.is_terminal:
            from rich.live import Live

            self._live = Live(progress_table([], title=title), console=console, refresh_per_second=4)
            self._live.start()

    def update(self, devices_online: int | None = None, *, final: bool = False) -> list[RoundProgress]:
        """Re-read the store and redraw, or print the rounds that are complete.

        A round's energy reports arrive just after its updates, so a closed
        round is printed once all its answering devices reported energy, once
        a later round has closed, or on the ``final`` call.
        """
        rows = read_progress(self.store, self.experiment)
        if self._live is not None:
            self._live.update(progress_table(rows, title=self.title, devices_online=devices_online))
            return rows
        total = 0.0
        closed = [r.round for r in rows if r.accuracy is not None]
        for r in rows:
            total += r.energy_j
            complete = final or r.reports >= r.answered or any(later > r.round for later in closed)
            if r.accuracy is not None and r.round not in self._printed and complete:
                self._printed.add(r.round)
                self.console.print(round_line(r, total), highlight=False)
        return rows

    def close(self) -> None:
        """Stop redrawing (the last table stays on screen)."""
        if self._live is not None:
            self._live.stop()
            self._live = None
