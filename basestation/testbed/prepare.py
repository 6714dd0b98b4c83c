"""Lay out a run directory: config, shards, credentials, device bundles, basestation.toml.

    run/
      config.json                  the testbed settings
      shards/device-NNN.npz        each device's training data
      provision/credentials.json   keys and broker logins (from firmware_tools.provision)
      provision/devices/<id>/      device.toml, shard.npz, spool/, meter.tty (the emulated meter's link)
      basestation.toml, store.sqlite, status.json
      broker/                      the private Mosquitto's config, password file, ACL, log
      ground-truth/<id>.csv        the power each meter emulator really simulated
      logs/                        one log per process
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from basestation.testbed.settings import TestbedSettings
from edge.data import Dataset, load_dataset, partition, save_shard
from models import get_architecture
from firmware_tools.provision import provision, toml_text

METER_LINK = "meter.tty"


@dataclass(frozen=True)
class RunLayout:
    """Paths of one prepared run."""

    root: Path
    config: Path
    basestation_config: Path
    credentials: Path
    store: Path
    status: Path
    broker_dir: Path
    logs: Path
    ground_truth: Path
    devices: dict[str, Path]

    def device_config(self, device: str) -> Path:
        return self.devices[device] / "device.toml"

    def meter_link(self, device: str) -> Path:
        return self.devices[device] / METER_LINK


def load_and_split(settings: TestbedSettings) -> tuple[Dataset, list[np.ndarray]]:
    """The run's dataset and its per-device split; ValueError naming the problem if the model cannot train on it."""
    try:
        dataset = load_dataset(settings.dataset, seed=settings.seed)
    except OSError as exc:
        raise ValueError(f"cannot load dataset {settings.dataset!r}: {exc}") from None
    reason = get_architecture(settings.model).mismatch(dataset.name, dataset.input_shape, dataset.classes)
    if reason:
        raise ValueError(reason)
    return dataset, partition(dataset.y_train, settings.devices, settings.partition, seed=settings.seed)


def check_history(settings: TestbedSettings) -> None:
    """ValueError naming ``--history`` if it is neither a readable curves JSON nor a readable store."""
    if settings.history is None:
        return
    from basestation.energy.store_history import resolve_history

    try:
        resolve_history(settings.history, own_store=None, like={}, experiment="")
    except ValueError as exc:
        raise ValueError(f"--history {settings.history}: {str(exc).removeprefix('[precision] history: ')}") from None


def prepare_run(settings: TestbedSettings, broker_url: str) -> RunLayout:
    """Write everything a run needs before any process starts; returns its layout."""
    root = settings.run_dir
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(f"run directory {root} exists and is not empty; choose another --name or --out")
    dataset, parts = load_and_split(settings)  # bad data, model or partition fails before anything is written
    check_history(settings)
    root.mkdir(parents=True, exist_ok=True)
    config = root / "config.json"
    config.write_text(json.dumps(settings.to_json(), indent=2) + "\n")

    shards = root / "shards"
    for index, part in enumerate(parts):
        save_shard(shards / f"device-{index:03d}.npz", dataset.x_train[part], dataset.y_train[part])

    result = provision(root / "provision", experiment=settings.experiment, devices=settings.devices,
                       broker_url=broker_url, board=settings.board, meter_port=METER_LINK, shards=shards,
                       seed=settings.seed)
    layout = RunLayout(root=root, config=config, basestation_config=root / "basestation.toml",
                       credentials=result.credentials, store=root / "store.sqlite", status=root / "status.json",
                       broker_dir=root / "broker", logs=root / "logs", ground_truth=root / "ground-truth",
                       devices=dict(result.bundles))
    layout.logs.mkdir(exist_ok=True)
    layout.ground_truth.mkdir(exist_ok=True)
    layout.basestation_config.write_text(basestation_toml(settings, layout, broker_url))
    return layout


def basestation_toml(settings: TestbedSettings, layout: RunLayout, broker_url: str) -> str:
    """The basestation.toml of a testbed run."""
    top = {"experiment": settings.experiment, "store": layout.store.name,
           "credentials": str(layout.credentials.relative_to(layout.root)), "dataset": settings.dataset,
           "model": settings.model, "seed": settings.seed, "rounds": settings.rounds,
           "status_file": layout.status.name}
    sections = {
        "broker": {"url": broker_url},
        "round": {"min_devices": settings.devices, "quorum": settings.quorum,
                  "deadline_seconds": settings.deadline_seconds, "devices_per_round": settings.per_round or 0,
                  "sampling": settings.sampling},
        "training": {"iterations": settings.iterations, "lr": settings.lr, "momentum": settings.momentum,
                     "batch_size": settings.batch_size, "mode": settings.mode},
        "precision": {"policy": settings.policy, "n": settings.bits, "m": settings.uplink_bits},
    }
    if settings.stop_at_target:
        sections["round"]["stop_at_accuracy"] = settings.target_accuracy
    if settings.history is not None and settings.policy == "measured":  # only that policy reads curves
        sections["precision"]["history"] = str(Path(settings.history).resolve())
        sections["precision"]["target_accuracy"] = settings.target_accuracy
    return toml_text(top, sections, f"basestation of testbed run {settings.name} (generated by qfl testbed)")
