"""``basestation.toml``: one experiment as the basestation runs it.

    cfg = BasestationConfig.load("basestation.toml")

Example (every key but ``experiment`` has a default; relative paths are
relative to the file)::

    experiment = "exp1"
    store = "exp1.sqlite"              # SQLite store (created if missing, resumed if present)
    credentials = "credentials.json"   # from firmware_tools.provision: device keys, broker logins
    dataset = "digits"                 # held-out test set for evaluation
    model = "mlp"
    seed = 0
    rounds = 20                        # stop after this many aggregated rounds (0: run until stopped)
    status_file = "status.json"        # final status, also written on SIGTERM
    ingest_workers = 0                 # N > 0: updates are checked in N processes on an MQTT shared subscription

    [broker]                           # username/password default to the credentials' basestation login
    url = "mqtt://127.0.0.1:1883"

    [round]
    min_devices = 4          # online devices needed before the first round starts
    devices_per_round = 0    # K; 0 selects every online device
    sampling = "uniform"     # or "importance": q_k ~ 1/sigma_k^2 from the energy reports (unbiased weights)
    quorum = 0.75            # fraction of the selected devices that must answer by the deadline
    deadline_seconds = 60
    extensions = 2           # deadline extensions without a quorum before the round is abandoned

    [training]
    iterations = 10
    lr = 0.1
    batch_size = 32
    strategy = "fedavg"      # or "median", "trimmed_mean:0.1"

    [precision]
    policy = "fixed"         # or "model", "measured" (basestation.energy.policies)
    n = 8
    m = 8
    # history = "store"      # measured: learning curves from this store's earlier experiments,
                             # or a curves JSON / another store file (basestation.energy.store_history)

    [bounds]                 # what a device may claim (basestation.bounds, docs/security.md)
    max_update_abs = 0       # |value| bound per update entry; 0: 4 at n < 32 bits, float_update_abs at 32
    float_update_abs = 16
    clock_skew_seconds = 30  # device clocks may be this far off: energy-report timestamps must lie in the round
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

from basestation.bounds import BoundSettings
from edge.mqtt import BrokerSettings, check_name
from edge.runtime.config import ConfigError, Table, broker_settings, read_toml

MAX_MOMENTUM = 0.999
"""Largest local SGD momentum a run accepts (each round restarts from zero velocity)."""

__all__ = ["BasestationConfig", "ConfigError", "PrecisionSettings", "RoundSettings", "TrainingSettings"]


@dataclass(frozen=True)
class RoundSettings:
    """How rounds are staffed and closed (docs/mqtt.md, "Closing a round")."""

    min_devices: int = 1
    min_online: int = 1
    devices_per_round: int = 0
    quorum: float = 1.0
    deadline_seconds: float = 60.0
    extensions: int = 2
    extension_seconds: float = 0.0
    report_wait_seconds: float = 3.0
    stop_at_accuracy: float = 0.0  # finish early once a round's accuracy reaches this (0: run every round)
    sampling: str = "uniform"

    @property
    def extension(self) -> float:
        """Seconds one extension adds (``deadline_seconds`` unless set)."""
        return self.extension_seconds or self.deadline_seconds


@dataclass(frozen=True)
class TrainingSettings:
    """What the plan asks the devices to do, and how updates are combined."""

    iterations: int = 10
    lr: float = 0.1
    momentum: float = 0.0
    batch_size: int = 32
    mode: str = "int"
    uplink_scheme: str = "scaled"
    strategy: str = "fedavg"


@dataclass(frozen=True)
class PrecisionSettings:
    """The precision policy and its options (passed to ``basestation.energy.policies.build_policy``)."""

    policy: str = "fixed"
    n: int = 8
    m: int = 8
    epsilon: float = 0.1
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class BasestationConfig:
    """A parsed ``basestation.toml`` (see the module docstring)."""

    experiment: str
    store: Path
    credentials: Path
    broker: BrokerSettings
    dataset: str = "digits"
    dataset_seed: int = 0
    model: str = "mlp"
    seed: int = 0
    rounds: int = 0
    status_file: Path | None = None
    keep_payloads: bool = False
    synchronous: str = "full"
    ingest_workers: int = 0
    round: RoundSettings = field(default_factory=RoundSettings)
    training: TrainingSettings = field(default_factory=TrainingSettings)
    precision: PrecisionSettings = field(default_factory=PrecisionSettings)
    bounds: BoundSettings = field(default_factory=BoundSettings)

    @property
    def client_id(self) -> str:
        """The basestation's fixed MQTT client id (its persistent session)."""
        return f"qfl-basestation-{self.experiment}"

    def identity(self) -> dict[str, Any]:
        """The settings an experiment cannot change once created (checked on resume)."""
        return {"model": self.model, "dataset": self.dataset, "dataset_seed": self.dataset_seed, "seed": self.seed}

    def to_json(self) -> dict[str, Any]:
        """JSON-safe dict (for the store; no secrets)."""
        doc = asdict(self)
        doc["broker"] = {"url": self.broker.url, "protocol": self.broker.protocol, "username": self.broker.username}
        for key in ("store", "credentials", "status_file"):
            doc[key] = None if doc[key] is None else str(doc[key])
        return doc

    @classmethod
    def load(cls, path: str | Path) -> "BasestationConfig":
        """Read and check ``basestation.toml``."""
        doc, base = read_toml(path)
        return cls.from_mapping(doc, base, where=str(path))

    @classmethod
    def from_mapping(cls, doc: Mapping[str, Any], base: Path, where: str = "basestation.toml") -> "BasestationConfig":
        """Build from a parsed TOML document; ``base`` resolves relative paths."""
        from basestation.strategies import get_strategy
        from edge.wire import SCHEMES
        from models import ARCHITECTURES

        t = Table(doc, where)
        try:
            experiment = check_name(t.get("experiment", str), "experiment")
        except ValueError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        seed = t.integer("seed", 0, low=0)
        model = t.get("model", str, "mlp", choices=tuple(ARCHITECTURES))
        r = Table(t.table("round"), f"{where} [round]")
        rounds = RoundSettings(
            min_devices=r.integer("min_devices", 1, low=1),
            min_online=r.integer("min_online", 1, low=1),
            devices_per_round=r.integer("devices_per_round", 0, low=0),
            quorum=r.number("quorum", 1.0, low=0.0, high=1.0),
            deadline_seconds=r.number("deadline_seconds", 60.0, low=0.1),
            extensions=r.integer("extensions", 2, low=0),
            extension_seconds=r.number("extension_seconds", 0.0, low=0.0),
            report_wait_seconds=r.number("report_wait_seconds", 3.0, low=0.0),
            stop_at_accuracy=r.number("stop_at_accuracy", 0.0, low=0.0, high=1.0),
            sampling=r.get("sampling", str, "uniform", choices=("uniform", "importance")),
        )
        r.finish()
        tr = Table(t.table("training"), f"{where} [training]")
        training = TrainingSettings(
            iterations=tr.integer("iterations", 10, low=1),
            lr=tr.number("lr", 0.1, low=1e-9),
            momentum=tr.number("momentum", 0.0, low=0.0, high=MAX_MOMENTUM),
            batch_size=tr.integer("batch_size", 32, low=1),
            mode=tr.get("mode", str, "int", choices=("int", "master")),
            uplink_scheme=tr.get("uplink_scheme", str, "scaled", choices=tuple(SCHEMES)),
            strategy=tr.get("strategy", str, "fedavg"),
        )
        tr.finish()
        try:
            get_strategy(training.strategy)
        except ValueError as exc:
            raise ConfigError(f"{where} [training]: {exc}") from None
        p = Table(t.table("precision"), f"{where} [precision]")
        precision = PrecisionSettings(
            policy=p.get("policy", str, "fixed", choices=("fixed", "model", "measured", "measured-fit")),
            n=p.integer("n", 8, low=1, high=32),
            m=p.integer("m", 8, low=1, high=32),
            epsilon=p.number("epsilon", 0.1, low=1e-9),
        )
        options = {k: v for k, v in p.doc.items() if k not in p.used}
        precision = PrecisionSettings(precision.policy, precision.n, precision.m, precision.epsilon, options)
        b = Table(t.table("bounds"), f"{where} [bounds]")
        bounds = BoundSettings(max_update_abs=b.number("max_update_abs", 0.0, low=0.0),
                               float_update_abs=b.number("float_update_abs", 16.0, low=1e-9),
                               clock_skew_seconds=b.number("clock_skew_seconds", 30.0, low=0.0))
        b.finish()
        cfg = cls(
            experiment=experiment,
            store=t.path("store", base, f"{experiment}.sqlite"),  # type: ignore[arg-type]
            credentials=t.path("credentials", base, "credentials.json"),  # type: ignore[arg-type]
            broker=broker_settings(t.table("broker"), base, where),
            dataset=t.get("dataset", str, "digits"),
            dataset_seed=t.integer("dataset_seed", seed, low=0),
            model=model,
            seed=seed,
            rounds=t.integer("rounds", 0, low=0),
            status_file=t.path("status_file", base, None),
            keep_payloads=t.get("keep_payloads", bool, False),
            synchronous=t.get("synchronous", str, "full", choices=("full", "normal")),
            ingest_workers=t.integer("ingest_workers", 0, low=0, high=64),
            round=rounds,
            training=training,
            precision=precision,
            bounds=bounds,
        )
        t.finish()
        return cfg
