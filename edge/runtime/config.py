"""``device.toml``: everything one device needs to take part in an experiment.

    cfg = DeviceConfig.load("device.toml")
    cfg.device_id, cfg.broker.url, cfg.meter_port   # meter_port None: run without a meter

Example file (``firmware_tools.provision`` writes one per device)::

    device_id = "dev-01"
    experiment = "exp1"
    hmac_key = "<64 hex digits>"      # signs this device's updates and reports
    model_public_key = "<64 hex digits>"  # the basestation's Ed25519 public key: checks global models
    shard = "shard.npz"               # this device's training data (edge.data.save_shard)
    board = "pi4"
    meter_port = "/dev/ttyACM0"       # leave out to run without a power meter; relative: beside this file
    meter_wait_seconds = 10           # how long to wait for the port to appear (USB, or an emulator)
    spool_dir = "spool"
    seed = 0

    [broker]
    url = "mqtts://basestation.lan:8883"
    username = "dev-01"
    password = "..."
    ca_file = "ca.crt"
    protocol = "5"                    # or "3.1.1"

Relative paths are relative to the file. Unknown keys are errors, so a typo
does not silently fall back to a default.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from edge.mqtt import BrokerSettings, check_name


class ConfigError(ValueError):
    """A config file that is missing, not TOML, or has a bad or unknown setting."""


def read_toml(path: str | Path) -> tuple[dict[str, Any], Path]:
    """Parse a TOML file; returns (table, directory of the file)."""
    if not str(path):
        raise ConfigError("the config path is empty; give the path of a .toml file")
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh), path.resolve().parent
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except IsADirectoryError:
        raise ConfigError(f"{path} is a directory; give the path of a .toml config file") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not valid TOML: not UTF-8 text") from None


class Table:
    """Typed access to one TOML table that remembers which keys were read.

        t = Table(doc, "device.toml")
        seed = t.get("seed", int, 0)
        t.finish()          # ConfigError for any key nobody asked for
    """

    def __init__(self, doc: Mapping[str, Any], where: str):
        self.doc = dict(doc)
        self.where = where
        self.used: set[str] = set()

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = ..., *, choices: tuple[Any, ...] = ()) -> Any:
        """The value of ``key`` checked against ``kind`` (and ``choices``); ``default`` if absent (required if ...)."""
        self.used.add(key)
        if key not in self.doc:
            if default is ...:
                raise ConfigError(f"{self.where}: missing required setting {key!r}")
            return default
        value = self.doc[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if float in kinds and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            names = " or ".join(k.__name__ for k in kinds)
            raise ConfigError(f"{self.where}: {key} must be {names}, got {value!r}")
        if choices and value not in choices:
            raise ConfigError(f"{self.where}: {key} must be one of {', '.join(map(repr, choices))}, got {value!r}")
        return value

    def number(self, key: str, default: float, *, low: float | None = None, high: float | None = None) -> float:
        """A float setting within [low, high]."""
        value = self.get(key, float, default)
        if (low is not None and value < low) or (high is not None and value > high):
            raise ConfigError(f"{self.where}: {key} must be in [{low}, {high}], got {value!r}")
        return value

    def integer(self, key: str, default: Any = ..., *, low: int | None = None, high: int | None = None) -> int:
        """An int setting within [low, high]."""
        value = self.get(key, int, default)
        if (low is not None and value < low) or (high is not None and value > high):
            raise ConfigError(f"{self.where}: {key} must be an integer in [{low}, {high}], got {value!r}")
        return value

    def path(self, key: str, base: Path, default: Any = ...) -> Path | None:
        """A path setting, relative to ``base``; None if absent and default None."""
        value = self.get(key, str, default)
        if value is None:
            return None
        p = Path(value).expanduser()
        return p if p.is_absolute() else base / p

    def key_bytes(self, key: str) -> bytes:
        """A hex-encoded secret of at least 16 bytes."""
        text = self.get(key, str)
        try:
            raw = bytes.fromhex(text)
        except ValueError:
            raise ConfigError(f"{self.where}: {key} must be hex digits") from None
        if len(raw) < 16:
            raise ConfigError(f"{self.where}: {key} must be at least 16 bytes (32 hex digits), got {len(raw)}")
        return raw

    def public_key(self, key: str) -> bytes:
        """A hex-encoded 32-byte Ed25519 public key."""
        if key not in self.doc and "model_key" in self.doc:
            raise ConfigError(f"{self.where}: model_key (a shared HMAC key) was replaced by {key} (the basestation's "
                              "Ed25519 public key): provision the device again")
        raw = self.key_bytes(key)
        if len(raw) != 32:
            raise ConfigError(f"{self.where}: {key} must be 32 bytes (64 hex digits), got {len(raw)}")
        return raw

    def table(self, key: str) -> dict[str, Any]:
        """A sub-table (empty if absent)."""
        return dict(self.get(key, dict, {}))

    def finish(self) -> None:
        """Raise ConfigError naming every key that no ``get`` asked for."""
        unknown = sorted(set(self.doc) - self.used)
        if unknown:
            raise ConfigError(f"{self.where}: unknown setting(s) {', '.join(unknown)}; known: "
                              f"{', '.join(sorted(self.used))}")


def broker_settings(table: Mapping[str, Any], base: Path, where: str) -> BrokerSettings:
    """The ``[broker]`` table as :class:`BrokerSettings`, with the config's error type."""
    try:
        return BrokerSettings.from_mapping(table, base)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{where} [broker]: {exc}") from None


def meter_port_path(port: str | None, base: Path) -> str | None:
    """A serial device path relative to the config file's folder; absolute paths and pyserial URLs stay as given."""
    if port is None or "://" in port or Path(port).is_absolute():
        return port
    return str(base / port)


@dataclass(frozen=True)
class DeviceConfig:
    """A parsed ``device.toml`` (see the module docstring)."""

    device_id: str
    experiment: str
    hmac_key: bytes
    model_public_key: bytes
    shard: Path
    broker: BrokerSettings
    spool_dir: Path
    board: str = "unknown"
    meter_port: str | None = None
    meter_idle_seconds: float = 1.0
    meter_wait_seconds: float = 10.0
    seed: int = 0
    exit_when_finished: bool = True
    publish_timeout: float = 10.0
    resend_seconds: float = 30.0
    max_spool: int = 256

    @property
    def client_id(self) -> str:
        """The fixed MQTT client id that keeps this device's persistent session."""
        return f"qfl-{self.experiment}-{self.device_id}"

    @classmethod
    def load(cls, path: str | Path) -> "DeviceConfig":
        """Read and check ``device.toml``."""
        doc, base = read_toml(path)
        return cls.from_mapping(doc, base, where=str(path))

    @classmethod
    def from_mapping(cls, doc: Mapping[str, Any], base: Path, where: str = "device.toml") -> "DeviceConfig":
        """Build from a parsed TOML document; ``base`` resolves relative paths."""
        t = Table(doc, where)
        try:
            device_id = check_name(t.get("device_id", str), "device_id")
            experiment = check_name(t.get("experiment", str), "experiment")
        except ValueError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        cfg = cls(
            device_id=device_id,
            experiment=experiment,
            hmac_key=t.key_bytes("hmac_key"),
            model_public_key=t.public_key("model_public_key"),
            shard=t.path("shard", base),  # type: ignore[arg-type]
            broker=broker_settings(t.table("broker"), base, where),
            spool_dir=t.path("spool_dir", base, "spool"),  # type: ignore[arg-type]
            board=t.get("board", str, "unknown"),
            meter_port=meter_port_path(t.get("meter_port", str, None), base),
            meter_idle_seconds=t.number("meter_idle_seconds", 1.0, low=0.0, high=60.0),
            meter_wait_seconds=t.number("meter_wait_seconds", 10.0, low=0.0, high=600.0),
            seed=t.integer("seed", 0, low=0),
            exit_when_finished=t.get("exit_when_finished", bool, True),
            publish_timeout=t.number("publish_timeout", 10.0, low=0.1, high=600.0),
            resend_seconds=t.number("resend_seconds", 30.0, low=1.0),
            max_spool=t.integer("max_spool", 256, low=2, high=100_000),
        )
        t.finish()
        return cfg
