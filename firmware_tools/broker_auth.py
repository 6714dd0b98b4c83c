"""The broker's login and access files: Mosquitto's hashed password file and the ACL, from the accounts.

    accounts = credentials.accounts()
    Path("acl").write_text(acl_text(accounts, "exp1"))
    write_password_file(Path("passwd"), accounts)      # hashed by mosquitto_passwd -U

Provisioning (``firmware_tools.provision``) writes them into a testbed's
bundle; the basestation's private broker (``basestation.broker``) writes them
for the Mosquitto it starts. The ACL follows DESIGN.md: a device writes only
its own ``device/<id>/{hello,update,energy,status}`` and reads only the plan,
the models and its own acks; the basestation reads and writes all of
``qfl/<exp>/#``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Iterable

from edge.mqtt import check_name
from firmware_tools.credentials import BrokerAccount

INSTALL_HINT = "install it with: sudo apt-get install mosquitto mosquitto-clients"


class BrokerError(RuntimeError):
    """Mosquitto failed to start, or stop, or was configured wrongly."""


class MosquittoMissing(BrokerError, FileNotFoundError):
    """The mosquitto (or mosquitto_passwd) program is not installed."""


def find_program(name: str) -> str:
    """Path of a Mosquitto program (PATH, then /usr/sbin); MosquittoMissing if absent."""
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/local/sbin")
    if found is None:
        raise MosquittoMissing(f"{name} not found; {INSTALL_HINT}")
    return found


def acl_text(accounts: Iterable[BrokerAccount], experiment: str = "+") -> str:
    """Mosquitto ACL file for ``accounts`` (see the module docstring).

    ``experiment="+"`` grants the same rights in every experiment.

        >>> print(acl_text([BrokerAccount("bs", "pw")], "exp1"))  # doctest: +NORMALIZE_WHITESPACE
        # qfl-testbed broker ACL (generated; edit the credentials, not this file)
        user bs
        topic readwrite qfl/exp1/#
    """
    if experiment != "+":
        check_name(experiment, "experiment id")
    root = f"qfl/{experiment}"
    lines = ["# qfl-testbed broker ACL (generated; edit the credentials, not this file)"]
    for account in accounts:
        _check_username(account.username)
        lines.append(f"user {account.username}")
        if account.device is None:
            lines.append(f"topic readwrite {root}/#")
        else:
            dev = check_name(account.device, "device id")
            for kind in ("hello", "update", "energy", "status"):
                lines.append(f"topic write {root}/device/{dev}/{kind}")
            lines += [f"topic read {root}/round", f"topic read {root}/model/+", f"topic read {root}/device/{dev}/ack"]
        lines.append("")
    return "\n".join(lines).rstrip("\n") + "\n"


def _check_username(name: str) -> None:
    if not name or any(c in name for c in ": \t\n\r#+/") or len(name) > 64:
        raise ValueError(f"broker username must be 1-64 characters without spaces, ':', '/', '#' or '+', got {name!r}")


def write_password_file(path: Path, accounts: Iterable[BrokerAccount], mosquitto_passwd: str | None = None) -> Path:
    """Write Mosquitto's hashed password file for ``accounts`` (via ``mosquitto_passwd -U``)."""
    program = mosquitto_passwd or find_program("mosquitto_passwd")
    lines = []
    for account in accounts:
        _check_username(account.username)
        if not account.password or "\n" in account.password:
            raise ValueError(f"password of {account.username!r} must be non-empty and one line")
        lines.append(f"{account.username}:{account.password}\n")
    path = Path(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.writelines(lines)
    done = subprocess.run([program, "-U", str(path)], capture_output=True, text=True)
    if done.returncode != 0:
        raise BrokerError(f"mosquitto_passwd -U {path} failed: {(done.stderr or done.stdout).strip()}")
    return path
