"""Provision a testbed: per-device keys and broker logins, device.toml bundles, the broker's password file and ACL.

    python -m firmware_tools.provision --experiment exp1 --devices 4 --broker-url mqtts://bs.lan:8883 \\
        --ca-file ca.crt --shards shards/ --out provision/
    # or: qfl broker provision ...

writes::

    provision/credentials.json           basestation side: keys and logins (mode 0600)
    provision/broker/passwd, broker/acl  for Mosquitto (hashed with mosquitto_passwd)
    provision/broker/rabbitmq-setup.sh   the same rights for a RabbitMQ cluster (docs/broker-cluster.md;
                                         holds the passwords, mode 0600; not written for ids with a '.')
    provision/basestation.toml           a starting point for the basestation
    provision/devices/<id>/device.toml   one bundle per device: copy the folder to the Pi
    provision/devices/<id>/shard.npz     (with --shards DIR: DIR/<id>.npz, as 'qfl partition' names them)
    provision/devices/<id>/ca.crt        (with --ca-file)

Running it again keeps existing devices' keys and passwords and adds the new
ones, so a bundle already on a Pi stays valid. From Python::

    result = provision("provision", experiment="exp1", devices=4, broker_url="mqtt://10.0.0.1:1883")
    result.bundles["device-000"]          # path of that device's folder
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from firmware_tools.broker_auth import acl_text, rabbitmq_routes, rabbitmq_script, write_password_file
from firmware_tools.credentials import Credentials, CredentialsError, DeviceCredentials
from edge.mqtt import BrokerSettings, check_name
from edge.wire.signing import generate_signing_key


class ProvisionError(ValueError):
    """Provisioning cannot proceed (bad names, another experiment's credentials, missing files)."""


@dataclass(frozen=True)
class ProvisionResult:
    """Where everything was written."""

    credentials: Path
    password_file: Path
    acl_file: Path
    basestation_config: Path
    bundles: dict[str, Path]


def device_names(devices: int | Sequence[str]) -> list[str]:
    """``device-000``, ``device-001``, ... for a count (the names 'qfl partition' gives shards), or the given ids."""
    names = [f"device-{i:03d}" for i in range(devices)] if isinstance(devices, int) else list(devices)
    if not names:
        raise ProvisionError("provision at least one device")
    if len(set(names)) != len(names):
        raise ProvisionError(f"device ids must be distinct: {names}")
    try:
        return [check_name(n, "device id") for n in names]
    except ValueError as exc:
        raise ProvisionError(str(exc)) from None


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))  # a JSON string is a valid TOML basic string


def toml_text(table: dict[str, object], sections: dict[str, dict[str, object]], header: str = "") -> str:
    """A flat TOML document: top-level keys, then one table per section; None values are left out."""
    lines = [f"# {line}" for line in header.splitlines()] + ([""] if header else [])
    lines += [f"{k} = {_toml_value(v)}" for k, v in table.items() if v is not None]
    for name, section in sections.items():
        lines += ["", f"[{name}]"] + [f"{k} = {_toml_value(v)}" for k, v in section.items() if v is not None]
    return "\n".join(lines) + "\n"


def _write_secret(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)


def provision(out: str | Path, *, experiment: str, devices: int | Sequence[str], broker_url: str,
              protocol: str = "5", ca_file: str | Path | None = None, board: str = "pi4",
              meter_port: str | None = None, shards: str | Path | None = None, seed: int = 0,
              basestation_user: str = "basestation") -> ProvisionResult:
    """Write (or extend) the provisioning folder ``out``; see the module docstring."""
    out = Path(out)
    try:
        check_name(experiment, "experiment id")
        BrokerSettings(url=broker_url, protocol=protocol)
    except ValueError as exc:
        raise ProvisionError(str(exc)) from None
    names = device_names(devices)
    if ca_file is not None and not Path(ca_file).is_file():
        raise ProvisionError(f"CA file not found: {ca_file}")
    if shards is not None:
        missing = [n for n in names if not (Path(shards) / f"{n}.npz").is_file()]
        if missing:
            raise ProvisionError(f"no shard for {', '.join(missing)} in {shards} (expected <device id>.npz, "
                                 "as written by 'qfl partition')")
    creds_path = out / "credentials.json"
    if creds_path.exists():
        try:
            creds = Credentials.load(creds_path)
        except CredentialsError as exc:
            raise ProvisionError(str(exc)) from None
        if creds.experiment != experiment:
            raise ProvisionError(f"{creds_path} belongs to experiment {creds.experiment!r}; use another --out")
    else:
        creds = Credentials(experiment, basestation_user, secrets.token_urlsafe(24), generate_signing_key())
    for name in names:
        if name not in creds.devices:
            creds.devices[name] = DeviceCredentials(name, secrets.token_urlsafe(18), secrets.token_bytes(32))
    creds.save(creds_path)

    broker_dir = out / "broker"
    broker_dir.mkdir(parents=True, exist_ok=True)
    passwd = write_password_file(broker_dir / "passwd", creds.accounts())
    acl = broker_dir / "acl"
    _write_secret(acl, acl_text(creds.accounts(), experiment))
    if rabbitmq_routes(experiment, *creds.devices):
        _write_secret(broker_dir / "rabbitmq-setup.sh", rabbitmq_script(creds.accounts(), experiment))

    bundles = {}
    for name in names:
        entry = creds.devices[name]
        folder = out / "devices" / name
        folder.mkdir(parents=True, exist_ok=True)
        if ca_file is not None:
            shutil.copyfile(ca_file, folder / "ca.crt")
        if shards is not None:
            shutil.copyfile(Path(shards) / f"{name}.npz", folder / "shard.npz")
        top = {"device_id": name, "experiment": experiment, "hmac_key": entry.hmac_key.hex(),
               "model_public_key": creds.model_public_key.hex(), "shard": "shard.npz", "board": board, "meter_port": meter_port,
               "spool_dir": "spool", "seed": seed}
        broker = {"url": broker_url, "username": entry.username, "password": entry.password, "protocol": protocol,
                  "ca_file": "ca.crt" if ca_file is not None else None}
        _write_secret(folder / "device.toml", toml_text(top, {"broker": broker},
                                                    f"qfl-testbed device {name} of experiment {experiment}.\n"
                                                    "Holds secrets: keep it readable by the qfl user only.\n"
                                                    "Run: qfl edge run --config device.toml"))
        bundles[name] = folder

    bs_config = out / "basestation.toml"
    if not bs_config.exists():
        bs_config.write_text(toml_text(
            {"experiment": experiment, "store": f"{experiment}.sqlite", "credentials": "credentials.json",
             "dataset": "digits", "model": "mlp", "seed": seed, "rounds": 20, "status_file": "status.json"},
            {"broker": {"url": broker_url, "protocol": protocol, "ca_file": str(Path(ca_file).resolve()) if ca_file else None},
             "round": {"min_devices": len(creds.devices), "quorum": 0.75, "deadline_seconds": 120.0},
             "training": {"iterations": 10, "lr": 0.1, "batch_size": 32},
             "precision": {"policy": "fixed", "n": 8, "m": 8}},
            f"qfl-testbed basestation for experiment {experiment}.\nRun: qfl basestation serve --config basestation.toml"))
    return ProvisionResult(creds_path, passwd, acl, bs_config, bundles)


def configure(parser: argparse.ArgumentParser) -> None:
    """Options of the provisioning command."""
    parser.add_argument("--experiment", required=True, help="experiment id (topic level qfl/<experiment>/...)")
    parser.add_argument("--devices", required=True,
                        help="a count (names device-000, ...) or comma-separated device ids")
    parser.add_argument("--broker-url", required=True, help="how devices reach the broker: mqtt://host:port or "
                                                            "mqtts://host:port")
    parser.add_argument("--protocol", default="5", choices=["5", "3.1.1"], help="MQTT version for the devices")
    parser.add_argument("--ca-file", default=None, help="CA certificate the devices use to check an mqtts:// broker")
    from firmware_tools.emulator.boards import load_boards

    parser.add_argument("--board", default="pi4", choices=sorted(load_boards()),
                        help="board profile written to each device.toml (docs/boards.md)")
    parser.add_argument("--meter-port", default=None, help="meter serial port on the devices (e.g. /dev/ttyACM0)")
    parser.add_argument("--shards", default=None, help="directory of <device id>.npz shards to copy into the bundles")
    parser.add_argument("--seed", type=int, default=0, help="seed written to the configs")
    parser.add_argument("--out", required=True, help="provisioning folder (created or extended)")


def run(args: argparse.Namespace) -> int:
    """Provision from parsed arguments; prints a JSON summary."""
    devices: int | list[str] = int(args.devices) if args.devices.isdigit() else args.devices.split(",")
    result = provision(args.out, experiment=args.experiment, devices=devices, broker_url=args.broker_url,
                       protocol=args.protocol, ca_file=args.ca_file, board=args.board, meter_port=args.meter_port,
                       shards=args.shards, seed=args.seed)
    print(json.dumps({"credentials": str(result.credentials), "password_file": str(result.password_file),
                      "acl": str(result.acl_file), "basestation_config": str(result.basestation_config),
                      "devices": {k: str(v) for k, v in result.bundles.items()}}, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m firmware_tools.provision``."""
    parser = argparse.ArgumentParser(prog="python -m firmware_tools.provision", description=__doc__.splitlines()[0])
    configure(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except (ProvisionError, OSError) as exc:
        print(f"provision: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
