"""A private Mosquitto broker: generated config, password file, ACL, start and stop by PID.

    with Broker("runs/broker", accounts=creds.accounts(), experiment="exp1") as broker:
        print(broker.url)          # mqtt://127.0.0.1:<free port>
        broker.restart()           # SIGTERM (persistence written), start again on the same port
        broker.kill()              # SIGKILL, as a power cut would

Without ``accounts`` the broker allows anonymous clients and has no ACL
(convenient in tests that only need a broker). With accounts, every client
logs in, and the ACL follows DESIGN.md: a device writes only its own
``device/<id>/{hello,update,energy,status}`` and reads only the plan, the
models and its own acks; the basestation reads and writes all of
``qfl/<exp>/#``.

The port is chosen without races: a free port is picked, and if Mosquitto
reports it taken by the time it binds, another is tried. Field deployments
use ``qfl broker run`` (basestation/broker_cli.py) with a fixed port and TLS.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from firmware_tools.broker_auth import BrokerError, acl_text, find_program, write_password_file
from firmware_tools.credentials import BrokerAccount

@dataclass(frozen=True)
class BrokerTls:
    """TLS for the listener: server certificate and key, and the CA for client certificates."""

    certfile: str
    keyfile: str
    cafile: str | None = None
    require_certificate: bool = False


def mosquitto_config(*, port: int, host: str, directory: Path, password_file: Path | None, acl_file: Path | None,
                     tls: BrokerTls | None = None, autosave_interval: int = 30, max_queued_messages: int = 10000,
                     extra: Sequence[str] = ()) -> str:
    """Text of a ``mosquitto.conf`` for one listener; pure, so it is easy to test and read."""
    data_dir = Path(directory) / "data"
    lines = [
        "# qfl-testbed private broker (generated)",
        "per_listener_settings false",
        f"allow_anonymous {'false' if password_file else 'true'}",
        "persistence true",
        f"persistence_location {data_dir}/",
        f"autosave_interval {int(autosave_interval)}",
        "log_dest stderr",
        "log_type error", "log_type warning", "log_type notice", "log_type information",
        "connection_messages true",
        "log_timestamp true",
        f"max_queued_messages {int(max_queued_messages)}",
        "max_inflight_messages 100",
    ]
    if password_file is not None:
        lines.append(f"password_file {password_file}")
    if acl_file is not None:
        lines.append(f"acl_file {acl_file}")
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        lines.append("user root")  # otherwise it drops to 'mosquitto', who cannot write our directory
    lines.append(f"listener {int(port)} {host}")
    if tls is not None:
        lines += [f"certfile {tls.certfile}", f"keyfile {tls.keyfile}"]
        if tls.cafile:
            lines.append(f"cafile {tls.cafile}")
        lines.append(f"require_certificate {'true' if tls.require_certificate else 'false'}")
    lines += list(extra)
    return "\n".join(lines) + "\n"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the caller retries if it is taken by then)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class Broker:
    """A Mosquitto process with its own directory, started and stopped by PID.

    ``port=0`` picks a free loopback port (retrying if it is taken meanwhile).
    ``directory`` receives ``mosquitto.conf``, ``passwd``, ``acl``, ``data/``
    (persistence) and ``mosquitto.log``.
    """

    def __init__(self, directory: str | Path, *, accounts: Sequence[BrokerAccount] = (), experiment: str = "+",
                 host: str = "127.0.0.1", port: int = 0, tls: BrokerTls | None = None, autosave_interval: int = 30,
                 max_queued_messages: int = 10000, start_timeout: float = 10.0, extra_config: Sequence[str] = ()):
        self.directory = Path(directory)
        self.accounts = list(accounts)
        self.experiment = experiment
        self.host = host
        self.port = int(port)
        self.tls = tls
        self.autosave_interval = autosave_interval
        self.max_queued_messages = max_queued_messages
        self.start_timeout = start_timeout
        self.extra_config = list(extra_config)
        self.process: subprocess.Popen[bytes] | None = None
        self._mosquitto = find_program("mosquitto")
        if self.accounts:
            find_program("mosquitto_passwd")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be 0 (pick a free one) or 1..65535, got {port!r}")

    # ---- paths ----
    @property
    def config_path(self) -> Path:
        """The generated mosquitto.conf."""
        return self.directory / "mosquitto.conf"

    @property
    def log_path(self) -> Path:
        """Mosquitto's stderr log."""
        return self.directory / "mosquitto.log"

    @property
    def url(self) -> str:
        """``mqtt://host:port`` (or ``mqtts://`` with TLS) of the running broker."""
        if not self.port:
            raise BrokerError("the broker has no port yet; call start() first")
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        """PID of the running Mosquitto, or None."""
        return self.process.pid if self.running and self.process else None

    @property
    def running(self) -> bool:
        """True while the Mosquitto process is alive."""
        return self.process is not None and self.process.poll() is None

    # ---- lifecycle ----
    def start(self) -> "Broker":
        """Write the files, start Mosquitto and wait until it accepts connections."""
        if self.running:
            return self
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / "data").mkdir(exist_ok=True)
        password_file = acl_file = None
        if self.accounts:
            password_file = write_password_file(self.directory / "passwd", self.accounts)
            acl_file = self.directory / "acl"
            acl_file.write_text(acl_text(self.accounts, self.experiment))
            os.chmod(acl_file, 0o600)
        fixed = self.port != 0
        for _ in range(1 if fixed else 20):
            port = self.port if fixed else free_port(self.host)
            self.config_path.write_text(mosquitto_config(
                port=port, host=self.host, directory=self.directory, password_file=password_file, acl_file=acl_file,
                tls=self.tls, autosave_interval=self.autosave_interval,
                max_queued_messages=self.max_queued_messages, extra=self.extra_config))
            if self._launch(port):
                self.port = port
                return self
        if fixed:
            raise BrokerError(f"port {self.port} on {self.host} is in use by another program; choose another "
                              f"port or stop that program (see {self.log_path})")
        raise BrokerError(f"could not find a free port for Mosquitto on {self.host}; see {self.log_path}")

    def _launch(self, port: int) -> bool:
        """Start once on ``port``; False if the port was taken, BrokerError for other failures."""
        log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as log_file:
            self.process = subprocess.Popen([self._mosquitto, "-c", str(self.config_path)], stdin=subprocess.DEVNULL,
                                            stdout=log_file, stderr=log_file, start_new_session=True)
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            text = self._log_since(log_offset)
            if self.process.poll() is not None:
                if "in use" in text:
                    return False
                raise BrokerError(f"mosquitto exited with status {self.process.returncode} at start:\n"
                                  f"{text.strip()[-2000:]}\n(config: {self.config_path})")
            if " running" in text and _accepts(self.host, port):
                return True
            time.sleep(0.02)
        self._terminate(signal.SIGKILL, 2.0)
        raise BrokerError(f"mosquitto did not accept connections on {self.host}:{port} within "
                          f"{self.start_timeout} s; see {self.log_path}")

    def _log_since(self, offset: int) -> str:
        try:
            with open(self.log_path, "rb") as fh:
                fh.seek(offset)
                return fh.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM (Mosquitto writes its persistence file), then SIGKILL after ``timeout`` s. Safe twice."""
        self._terminate(signal.SIGTERM, timeout)

    def kill(self) -> None:
        """SIGKILL: no persistence written since the last autosave, as after a power cut."""
        self._terminate(signal.SIGKILL, 5.0)

    def restart(self, *, kill: bool = False) -> None:
        """Stop (or kill) and start again on the same port with the same state directory."""
        self.kill() if kill else self.stop()
        self.start()

    def _terminate(self, sig: int, timeout: float) -> None:
        proc = self.process
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5.0)

    def log_text(self) -> str:
        """Everything Mosquitto logged so far (for error messages and tests)."""
        return self._log_since(0)

    def __enter__(self) -> "Broker":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"pid {self.pid}" if self.running else "stopped"
        where = f"{self.host}:{self.port}" if self.port else self.host
        return f"<Broker {where} {state} dir={str(self.directory)!r}>"


def _accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False
