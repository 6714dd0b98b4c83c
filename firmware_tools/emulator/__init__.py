"""The board-power meter emulator: a qfl meter on a pseudo-terminal, powered by a real process's activity.

    from firmware_tools.emulator import MeterEmulator, FaultPlan, parse_window
    with MeterEmulator(pid=pid, board="pi4", link="/tmp/qfl-meter0", seed=1,
                       faults=FaultPlan(unplugs=(parse_window("3:2"),))) as emulator:
        ...

Modules: ``boards`` (profiles from boards.toml, supply physics), ``procwatch``
(CPU time and bytes written from /proc), ``faults`` (fault plan and line
faults), ``ptylink`` (the pty and its symlink), ``truth`` (ground-truth CSV),
``emulator`` (the loop that ties them to the real firmware and the emulated INA219).
"""

from firmware_tools.emulator.boards import BoardError, BoardProfile, get_board, load_boards
from firmware_tools.emulator.emulator import EmulatorError, EmulatorStats, MeterEmulator
from firmware_tools.emulator.faults import FaultError, FaultPlan, Window, parse_window
from firmware_tools.emulator.procwatch import ProcessWatcher, WatchError
from firmware_tools.emulator.truth import read_ground_truth, truth_energy

__all__ = [
    "BoardError",
    "BoardProfile",
    "EmulatorError",
    "EmulatorStats",
    "FaultError",
    "FaultPlan",
    "MeterEmulator",
    "ProcessWatcher",
    "WatchError",
    "Window",
    "get_board",
    "load_boards",
    "parse_window",
    "read_ground_truth",
    "truth_energy",
]
