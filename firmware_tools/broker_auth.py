"""The broker's login and access files: Mosquitto's hashed password file and the ACL, from the accounts.

    accounts = credentials.accounts()
    Path("acl").write_text(acl_text(accounts, "exp1"))
    write_password_file(Path("passwd"), accounts)      # hashed by mosquitto_passwd -U

Provisioning (``firmware_tools.provision``) writes them into a testbed's
bundle; the basestation's private broker (``basestation.broker``) writes them
for the Mosquitto it starts. The ACL follows DESIGN.md: a device writes only
its own ``device/<id>/{hello,update,energy,status}`` and reads only the plan,
the models and its own acks; the basestation reads and writes all of
``qfl/<exp>/#``. ``rabbitmq_commands`` states the same rights as the
``rabbitmqctl`` calls for a RabbitMQ broker with its MQTT plugin
(docs/broker-cluster.md).
"""

from __future__ import annotations

import os
import re
import shlex
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


SESSION_POLICY = ("qfl-sessions", "^mqtt-subscription-qfl-", '{"ha-mode":"all","ha-sync-mode":"automatic"}')


def rabbitmq_commands(accounts: Iterable[BrokerAccount], experiment: str, *,
                      mirror_sessions: bool = True) -> list[list[str]]:
    """The ``rabbitmqctl`` argument lists that give RabbitMQ's MQTT plugin the rights of :func:`acl_text`.

    MQTT topics are routing keys on ``amq.topic`` with ``/`` turned into
    ``.``; the plugin also needs configure/read/write on the client's own
    session queues ``mqtt-subscription-<client id>qos0|qos1``, so a device
    login can only hold the session of its own client id ``qfl-<exp>-<id>``.
    With ``mirror_sessions`` the last command mirrors every qfl session queue
    to all nodes (a session on a dead node is otherwise unavailable until
    that node returns).

        >>> [command[0] for command in rabbitmq_commands([BrokerAccount("u1", "pw", "dev-1")], "exp1")]
        ['add_user', 'set_permissions', 'set_topic_permissions', 'set_policy']
    """
    exp = _routable(check_name(experiment, "experiment id"), "experiment id")
    root = re.escape(f"qfl.{exp}")
    commands = []
    for account in accounts:
        _check_username(account.username)
        user = account.username
        commands.append(["add_user", user, account.password])
        if account.device is None:
            queues = "mqtt-subscription-.*"
            topics = (rf"^{root}\..*$", rf"^{root}\..*$")
        else:
            dev = _routable(check_name(account.device, "device id"), "device id")
            queues = re.escape(f"mqtt-subscription-qfl-{exp}-{dev}") + "qos[01]"
            dev = re.escape(dev)
            topics = (rf"^{root}\.device\.{dev}\.(hello|update|energy|status)$",
                      rf"^{root}\.(round|model\.[^.]+|device\.{dev}\.ack)$")
        commands.append(["set_permissions", "-p", "/", user, f"^{queues}$", rf"^(amq\.topic|{queues})$",
                         rf"^(amq\.topic|{queues})$"])
        commands.append(["set_topic_permissions", "-p", "/", user, "amq.topic", *topics])
    if mirror_sessions:
        commands.append(["set_policy", "-p", "/", "--apply-to", "queues", *SESSION_POLICY])
    return commands


def rabbitmq_routes(*names: str) -> bool:
    """Whether RabbitMQ's MQTT plugin can route topics holding these ids: it turns a '.' into a topic level."""
    return not any("." in name for name in names)


def _routable(name: str, what: str) -> str:
    if not rabbitmq_routes(name):
        raise ValueError(f"{what} {name!r} holds a '.', which RabbitMQ's MQTT plugin turns into a topic level")
    return name


def rabbitmq_script(accounts: Iterable[BrokerAccount], experiment: str) -> str:
    """A shell script of :func:`rabbitmq_commands` (it holds the passwords: keep it private)."""
    lines = ["#!/bin/sh", "# qfl-testbed: users and permissions for RabbitMQ's MQTT plugin (generated from the",
             "# credentials; docs/broker-cluster.md). Run once on one node of the cluster, as root.", "set -e",
             "rabbitmqctl delete_user guest || true"]
    lines += ["rabbitmqctl " + " ".join(shlex.quote(arg) for arg in command)
              for command in rabbitmq_commands(accounts, experiment)]
    return "\n".join(lines) + "\n"


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
