"""Who may talk to the broker and the basestation: one JSON file per testbed.

``firmware_tools.provision`` writes it; the broker reads the usernames and
passwords from it, the basestation the per-device HMAC keys::

    creds = Credentials.load("provision/credentials.json")
    creds.devices["dev-01"].hmac_key       # bytes: signs that device's updates and reports
    creds.model_signing_key                 # bytes: Ed25519 private key that signs global models (basestation only)
    creds.model_public_key                  # bytes: its public key, which every device gets to check models
    creds.accounts()                        # for basestation.broker.Broker

File layout::

    {"experiment": "exp1",
     "model_signing_key": "<hex, 32 bytes>",
     "basestation": {"username": "basestation", "password": "..."},
     "devices": {"dev-01": {"username": "dev-01", "password": "...", "hmac_key": "<hex>"}}}

The file holds secrets: it is written with mode 0600.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge.mqtt import check_name


class CredentialsError(ValueError):
    """The credentials file is missing, unreadable or malformed."""


@dataclass(frozen=True)
class DeviceCredentials:
    """A device's broker login and the key that signs its updates."""

    username: str
    password: str
    hmac_key: bytes

    def to_json(self) -> dict[str, str]:
        """The JSON object stored for this device."""
        return {"username": self.username, "password": self.password, "hmac_key": self.hmac_key.hex()}


@dataclass(frozen=True)
class BrokerAccount:
    """One broker login. ``device`` is None for the basestation (all of qfl/<exp>/#)."""

    username: str
    password: str
    device: str | None = None


@dataclass
class Credentials:
    """Broker logins and HMAC keys of one testbed (see the module docstring)."""

    experiment: str
    basestation_username: str
    basestation_password: str
    model_signing_key: bytes
    devices: dict[str, DeviceCredentials] = field(default_factory=dict)

    @property
    def model_public_key(self) -> bytes:
        """The Ed25519 public key devices check global models with."""
        from edge.wire.signing import public_key

        return public_key(self.model_signing_key)

    def accounts(self) -> list[BrokerAccount]:
        """Every broker login: the basestation's first, then one per device."""
        out = [BrokerAccount(self.basestation_username, self.basestation_password, None)]
        out += [BrokerAccount(c.username, c.password, dev) for dev, c in sorted(self.devices.items())]
        return out

    def keys(self) -> dict[str, bytes]:
        """device id -> HMAC key."""
        return {dev: c.hmac_key for dev, c in self.devices.items()}

    def to_json(self) -> dict[str, Any]:
        """The JSON document :meth:`save` writes."""
        return {
            "experiment": self.experiment,
            "model_signing_key": self.model_signing_key.hex(),
            "basestation": {"username": self.basestation_username, "password": self.basestation_password},
            "devices": {dev: c.to_json() for dev, c in sorted(self.devices.items())},
        }

    def save(self, path: str | Path) -> Path:
        """Write the file atomically with mode 0600 and return its path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(self.to_json(), fh, indent=2)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Credentials":
        """Read and check a credentials file."""
        path = Path(path)
        try:
            doc = json.loads(path.read_text())
        except FileNotFoundError:
            raise CredentialsError(f"credentials file not found: {path}; create it with "
                                   "'qfl broker provision'") from None
        except (OSError, json.JSONDecodeError) as exc:
            raise CredentialsError(f"cannot read credentials file {path}: {exc}") from None
        return cls.from_json(doc, source=str(path))

    @classmethod
    def from_json(cls, doc: Any, source: str = "credentials") -> "Credentials":
        """Build from the parsed JSON document, with errors that name the bad field."""
        try:
            experiment = check_name(doc["experiment"], "experiment id")
            bs = doc["basestation"]
            if "model_signing_key" not in doc and "model_key" in doc:
                raise CredentialsError(f"{source} holds a shared HMAC model_key from before global models were "
                                       "Ed25519-signed: provision the testbed again (firmware_tools.provision)")
            model_key = _key(doc["model_signing_key"], "model_signing_key", source)
            if len(model_key) != 32:
                raise CredentialsError(f"{source}: model_signing_key must be 32 bytes (an Ed25519 private key), "
                                       f"got {len(model_key)}")
            devices = {}
            for dev, entry in dict(doc.get("devices", {})).items():
                check_name(dev, "device id")
                key = _key(entry["hmac_key"], f"hmac_key of {dev}", source)
                devices[dev] = DeviceCredentials(str(entry["username"]), str(entry["password"]), key)
            return cls(experiment, str(bs["username"]), str(bs["password"]), model_key, devices)
        except KeyError as exc:
            raise CredentialsError(f"{source}: missing field {exc.args[0]!r}") from None
        except (TypeError, AttributeError, ValueError) as exc:
            if isinstance(exc, CredentialsError):
                raise
            raise CredentialsError(f"{source}: malformed credentials: {exc}") from None


def _key(text: Any, what: str, source: str) -> bytes:
    try:
        key = bytes.fromhex(str(text))
    except ValueError:
        raise CredentialsError(f"{source}: {what} must be hex digits") from None
    if len(key) < 16:
        raise CredentialsError(f"{source}: {what} has {len(key)} bytes; need at least 16")
    return key
