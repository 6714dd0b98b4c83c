"""Board power profiles (``boards.toml``) and the supply physics that turns power into register inputs.

    >>> board = get_board("pi4")
    >>> round(board.power(busy_cores=1.0, bytes_per_second=0.0), 2)
    3.63
    >>> current, volts = board.operating_point(3.63)
    >>> round(float(current), 3), round(float(volts), 3)
    (0.733, 4.953)

The model is linear in its inputs, which is what the energy model it feeds
assumes too: ``P = idle_w + core_w * busy_cores + radio_j_per_byte *
bytes_per_second`` (plus seeded white noise added by the emulator). The
supply is an ideal source ``supply_v`` behind ``source_ohms`` (supply, cable,
connector) and the meter's shunt; the board draws ``P`` at whatever voltage
reaches it: ``P = V_load * I`` with ``V_load = supply_v - I * (source_ohms +
shunt)``. The INA219 sees ``I * shunt`` across the shunt and ``V_load`` on
its bus input (VIN-, the load side). Sources for the numbers: docs/boards.md.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from firmware_tools.emulator.profiles import read_profile_tables

BOARDS_FILE = Path(__file__).with_name("boards.toml")


class BoardError(ValueError):
    """A board profile that is missing, unknown or malformed."""


@dataclass(frozen=True)
class BoardProfile:
    """Power figures of one board (see boards.toml for the meaning of each field)."""

    name: str
    description: str
    idle_w: float
    core_w: float
    cores: int
    radio_j_per_byte: float
    supply_v: float
    source_ohms: float
    noise_w: float
    meter_config: int
    shunt_milliohm: float

    @property
    def shunt_ohms(self) -> float:
        return self.shunt_milliohm / 1000.0

    @property
    def series_ohms(self) -> float:
        """Everything between the ideal supply and the board: source plus shunt."""
        return self.source_ohms + self.shunt_ohms

    def power(self, busy_cores: float, bytes_per_second: float) -> float:
        """Noise-free board power for a CPU load (cores, capped at ``cores``) and a write rate."""
        busy = min(max(busy_cores, 0.0), float(self.cores))
        return self.idle_w + self.core_w * busy + self.radio_j_per_byte * max(bytes_per_second, 0.0)

    def operating_point(self, power_w: float | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(current A, load voltage V) at which the board draws ``power_w`` (a number or an array).

        Solves ``R I^2 - V I + P = 0`` for the smaller root; beyond the
        supply's maximum power transfer the current stays at ``V / 2R``.
        """
        r, v = self.series_ohms, self.supply_v
        power = np.maximum(np.asarray(power_w, dtype=float), 0.0)
        disc = np.maximum(v * v - 4.0 * r * power, 0.0)
        current = (v - np.sqrt(disc)) / (2.0 * r)
        return current, v - current * r


def load_boards(path: str | Path | None = None) -> dict[str, BoardProfile]:
    """Read every profile of a boards TOML file (default: the one shipped beside this module)."""
    path = Path(path) if path is not None else BOARDS_FILE
    data = read_profile_tables(path, "board", BoardError)
    wanted = {f.name: f.type for f in fields(BoardProfile) if f.name != "name"}
    boards = {}
    for name, table in data.items():
        if not isinstance(table, dict):
            raise BoardError(f"{path}: [{name}] must be a table of fields")
        missing = sorted(set(wanted) - set(table))
        extra = sorted(set(table) - set(wanted))
        if missing or extra:
            raise BoardError(f"{path}: board {name!r} is missing {missing or 'nothing'} and has unknown {extra or 'nothing'}")
        values = {}
        for key, kind in wanted.items():
            value = table[key]
            if kind == "str":
                if not isinstance(value, str):
                    raise BoardError(f"{path}: {name}.{key} must be a string, got {value!r}")
            elif kind == "int":
                if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                    raise BoardError(f"{path}: {name}.{key} must be a non-negative integer, got {value!r}")
            elif isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise BoardError(f"{path}: {name}.{key} must be a non-negative number, got {value!r}")
            values[key] = float(value) if kind == "float" else value
        if values["supply_v"] <= 0 or values["cores"] < 1 or values["shunt_milliohm"] <= 0:
            raise BoardError(f"{path}: board {name!r} needs supply_v > 0, cores >= 1 and shunt_milliohm > 0")
        if not 0 <= values["meter_config"] <= 0x7FFF:
            raise BoardError(f"{path}: {name}.meter_config must be an INA219 configuration 0..0x7FFF")
        boards[name] = BoardProfile(name=name, **values)
    if not boards:
        raise BoardError(f"{path} defines no boards")
    return boards


def get_board(name: str, path: str | Path | None = None) -> BoardProfile:
    """One profile by name; the error lists the names that exist."""
    boards = load_boards(path)
    if name not in boards:
        raise BoardError(f"unknown board {name!r}; choose one of: {', '.join(sorted(boards))}")
    return boards[name]
