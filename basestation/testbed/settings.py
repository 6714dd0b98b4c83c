"""What one emulated testbed run is: its size, data, model, policy and board."""

from __future__ import annotations

import math
import re
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from basestation.config import MAX_MOMENTUM

POLICIES = ("measured", "measured-fit", "model", "fixed")
BOARDS = ("pi-zero-2w", "pi4", "pi5")
SAMPLINGS = ("uniform", "importance")
METERS = ("fleet", "process")


class SettingsError(ValueError):
    """A testbed setting out of range; the message names the setting and what it accepts."""


@dataclass(frozen=True)
class TestbedSettings:
    """Every knob of ``qfl testbed`` (see ``qfl testbed --help`` for their meaning)."""

    __test__ = False  # not a pytest test class, despite the name

    devices: int = 4
    rounds: int = 10
    dataset: str = "digits"
    model: str = "mlp"
    partition: str = "iid"
    policy: str = "measured"
    bits: int = 8
    uplink_bits: int = 8
    board: str = "pi4"
    seed: int = 0
    iterations: int = 20
    lr: float = 0.2
    momentum: float = 0.0
    batch_size: int = 32
    mode: str = "int"
    deadline_seconds: float = 30.0
    per_round: int | None = None
    sampling: str = "uniform"
    quorum: float = 0.75
    meter_rate_hz: int = 1000
    meter_tick_ms: float = 2.0
    meters: str = "fleet"
    fleet_tick_ms: float = 10.0
    fleet_sample_budget: int = 12_500  # samples/s over all fleet meters (~0.3 core on a 2-core test machine)
    target_accuracy: float = 0.9
    out: Path = Path("runs")
    name: str = ""
    link: str = "loopback"
    stop_at_target: bool = False
    history: Path | None = None

    def checked(self) -> "TestbedSettings":
        """Return the settings with a run name filled in; SettingsError for anything out of range."""
        if not 1 <= self.devices <= 64:
            raise SettingsError(f"--devices must be 1..64 on one machine, got {self.devices}")
        if not 1 <= self.rounds <= 10_000:
            raise SettingsError(f"--rounds must be at least 1, got {self.rounds}")
        if self.per_round is not None and not 1 <= self.per_round <= self.devices:
            raise SettingsError(f"--per-round must be 1..{self.devices} (the number of --devices), "
                                f"got {self.per_round}")
        if self.sampling not in SAMPLINGS:
            raise SettingsError(f"--sampling must be one of {', '.join(SAMPLINGS)}, got {self.sampling!r}")
        if self.meters not in METERS:
            raise SettingsError(f"--meters must be one of {', '.join(METERS)}, got {self.meters!r}")
        if self.policy not in POLICIES:
            raise SettingsError(f"--policy must be one of {', '.join(POLICIES)}, got {self.policy!r}")
        if self.board not in BOARDS:
            raise SettingsError(f"--board must be one of {', '.join(BOARDS)}, got {self.board!r}")
        for flag, value in (("--bits", self.bits), ("--uplink-bits", self.uplink_bits)):
            if not 1 <= value <= 32:
                raise SettingsError(f"{flag} must be 1..32, got {value}")
        if not 1 <= self.iterations <= 100_000:
            raise SettingsError(f"--iterations must be 1..100000, got {self.iterations}")
        if not (math.isfinite(self.deadline_seconds) and self.deadline_seconds > 0.0):
            raise SettingsError(f"--deadline must be a positive number of seconds, got {self.deadline_seconds}")
        if not 0 <= self.seed < 2**32:
            raise SettingsError(f"--seed must be 0..{2**32 - 1}, got {self.seed}")
        from models import get_architecture
        try:
            get_architecture(self.model)
        except ValueError as exc:
            raise SettingsError(f"--model: {exc}") from None
        if self.out.exists() and not self.out.is_dir():
            raise SettingsError(f"--out {self.out} is a file; it must be a folder (created if missing)")
        if not (math.isfinite(self.lr) and self.lr > 0.0):
            raise SettingsError(f"--lr must be a positive number, got {self.lr}")
        if not 0.0 <= self.momentum <= MAX_MOMENTUM:
            raise SettingsError(f"--momentum must be in [0, {MAX_MOMENTUM}], got {self.momentum}")
        if not 0.0 < self.quorum <= 1.0:
            raise SettingsError(f"--quorum must be in (0, 1], got {self.quorum}")
        if not 0.0 < self.target_accuracy <= 1.0:
            raise SettingsError(f"--target-accuracy must be in (0, 1], got {self.target_accuracy}")
        from firmware_tools.emulator.link import LinkProfileError, get_link, link_names
        try:
            get_link(self.link)
        except LinkProfileError:
            raise SettingsError(f"--link must be one of {', '.join(link_names())}, got {self.link!r}") from None
        if self.history is not None and not Path(self.history).is_file():
            raise SettingsError(f"--history {self.history} is not a file (a curves JSON written by qfl sweep, or a run's store.sqlite)")
        name = self.name or f"{time.strftime('%Y%m%d-%H%M%S')}-{self.policy}"
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", name):
            raise SettingsError(f"run name must be letters, digits, '.', '_' or '-', got {name!r}")
        return replace(self, name=name)

    @property
    def experiment(self) -> str:
        """Experiment id in the store and on the broker topics (the run name, MQTT-safe)."""
        return re.sub(r"[^A-Za-z0-9_-]", "-", self.name)

    @property
    def run_dir(self) -> Path:
        """Where this run writes everything."""
        return self.out / self.name

    @property
    def fleet_rate_hz(self) -> int:
        """The meter rate of a fleet run: ``meter_rate_hz`` until the fleet's sample budget is shared out."""
        return int(min(self.meter_rate_hz, max(100, self.fleet_sample_budget // self.devices)))

    def to_json(self) -> dict[str, Any]:
        """JSON-safe dict, written to the run's ``config.json``."""
        doc = asdict(self)
        doc["out"] = str(self.out)
        doc["history"] = None if self.history is None else str(self.history)
        return doc
