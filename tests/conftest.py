"""Shared fixtures: real Mosquitto brokers and child processes, always cleaned up by PID.

- ``broker``: an anonymous private Mosquitto for one test (``broker.url``).
- ``module_broker``: the same, shared by the tests of one module.
- ``broker_factory(**kwargs)``: more brokers, e.g. with accounts and an ACL
  (keyword arguments of :class:`basestation.broker.Broker`).
- ``mqtt_settings``: :class:`edge.mqtt.BrokerSettings` for ``broker``, or for
  the field broker given with ``--broker-url`` (and ``--broker-username``,
  ``--broker-password``, ``--broker-ca``).
- ``spawn(args, name=...)``: start a child process with its output in a log
  file under the test's tmp_path; terminated (SIGTERM, then SIGKILL) at teardown.
- ``meter_port``: the serial port given with ``--meter-port`` (None without).
- ``federation(**options)``: a provisioned testbed in tmp_path (credentials,
  digits shards, a Mosquitto with per-device logins and the ACL, configs)
  whose edge and basestation processes start through ``spawn``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pytest

from basestation.broker import Broker
from firmware_tools.broker_auth import MosquittoMissing
from basestation.store import Store
from edge.mqtt import BrokerSettings


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("qfl", "qfl-testbed hardware and field options")
    group.addoption("--broker-url", default=None, help="run MQTT tests against this broker (mqtt://host:port)")
    group.addoption("--broker-username", default=None, help="username for --broker-url")
    group.addoption("--broker-password", default=None, help="password for --broker-url")
    group.addoption("--broker-ca", default=None, help="CA file for an mqtts:// --broker-url")
    group.addoption("--meter-port", default=None, help="serial port of a real meter (e.g. /dev/ttyACM0)")


def _start_broker(directory: Path, **kwargs: object) -> Broker:
    try:
        return Broker(directory, **kwargs).start()  # type: ignore[arg-type]
    except MosquittoMissing as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture
def broker_factory(tmp_path: Path) -> Iterator[Callable[..., Broker]]:
    """Start brokers on demand; every one is stopped by PID at teardown."""
    started: list[Broker] = []

    def make(**kwargs: object) -> Broker:
        directory = tmp_path / f"broker{len(started)}"
        broker = _start_broker(directory, **kwargs)
        started.append(broker)
        return broker

    yield make
    for broker in started:
        broker.stop(timeout=3.0)


@pytest.fixture
def broker(broker_factory: Callable[..., Broker]) -> Broker:
    """An anonymous private Mosquitto on a free loopback port, for one test."""
    return broker_factory()


@pytest.fixture(scope="module")
def module_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    """An anonymous private Mosquitto shared by the tests of one module."""
    broker = _start_broker(tmp_path_factory.mktemp("module-broker"))
    yield broker
    broker.stop(timeout=3.0)


@pytest.fixture
def mqtt_settings(request: pytest.FixtureRequest) -> BrokerSettings:
    """Settings for ``--broker-url`` if given, else for a private broker started for this test."""
    url = request.config.getoption("--broker-url")
    if url:
        return BrokerSettings(url=url, username=request.config.getoption("--broker-username"),
                              password=request.config.getoption("--broker-password"),
                              ca_file=request.config.getoption("--broker-ca"), reconnect_max=2.0)
    private: Broker = request.getfixturevalue("broker")
    return BrokerSettings(url=private.url, reconnect_max=2.0)


@pytest.fixture
def meter_port(request: pytest.FixtureRequest) -> str | None:
    """The ``--meter-port`` option (a real meter), or None."""
    return request.config.getoption("--meter-port")


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    """Start child processes whose output goes to ``tmp_path/<name>.log``; all are ended at teardown.

        proc = spawn([sys.executable, "-m", "edge.cli", "edge", "run", "--config", cfg], name="dev-01")
    """
    children: list[subprocess.Popen[bytes]] = []

    def start(args: list[str], *, name: str | None = None, env: dict[str, str] | None = None,
              cwd: str | Path | None = None) -> subprocess.Popen[bytes]:
        log_path = tmp_path / f"{name or f'proc{len(children)}'}.log"
        merged = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
        with open(log_path, "ab") as log_file:
            proc = subprocess.Popen(args, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=merged, cwd=cwd)
        proc.log_path = log_path  # type: ignore[attr-defined]
        children.append(proc)
        return proc

    yield start
    for proc in children:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in children:
        try:
            proc.wait(5.0)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5.0)


def qfl_argv() -> list[str]:
    """The argv prefix of the ``qfl`` console script installed beside this interpreter.

    (``python -m edge.cli`` would load the dispatcher twice, as ``__main__`` and
    as ``edge.cli``, and its CommandError would not be caught.)
    """
    script = Path(sys.executable).with_name("qfl")
    if not script.exists():
        pytest.fail(f"the qfl console script is missing beside {sys.executable}; install the project "
                    "(pip install -e '.[dev]')", pytrace=False)
    return [str(script)]


@pytest.fixture
def qfl_command() -> list[str]:
    """The argv prefix that runs the ``qfl`` command (see :func:`qfl_argv`)."""
    return qfl_argv()


class Federation:
    """A testbed on this machine: shards, credentials, a broker with the ACL, device and basestation configs.

        fed = federation(devices=4, rounds=5)
        edges = [fed.start_edge(i) for i in range(4)]
        bs = fed.start_basestation()
        assert bs.wait(60) == 0
        with fed.store() as store: ...
    """

    def __init__(self, root: Path, spawn: Callable[..., subprocess.Popen[bytes]],
                 broker_factory: Callable[..., Broker], *, devices: int = 4, protocol: str = "5",
                 experiment: str = "exp1", seed: int = 0, scheme: str = "iid", **basestation: Any):
        from firmware_tools.credentials import Credentials, DeviceCredentials
        from edge.data import load_dataset, partition, save_shard

        self.root, self._spawn, self.protocol, self.experiment = root, spawn, protocol, experiment
        self.devices = [f"device-{i:03d}" for i in range(devices)]
        rng = np.random.default_rng(seed)
        self.credentials = Credentials(experiment, "basestation", "bs-" + rng.bytes(8).hex(), rng.bytes(32))  # Ed25519 seed
        for dev in self.devices:
            self.credentials.devices[dev] = DeviceCredentials(dev, "pw-" + rng.bytes(8).hex(), rng.bytes(32))
        self.credentials_path = self.credentials.save(root / "credentials.json")
        self.broker = broker_factory(accounts=self.credentials.accounts(), experiment=experiment)
        ds = load_dataset("digits", seed=seed)
        for dev, index in zip(self.devices, partition(ds.y_train, devices, scheme, seed=seed)):
            save_shard(root / "shards" / f"{dev}.npz", ds.x_train[index], ds.y_train[index])
        self.basestation_options = basestation
        self.store_path = root / "exp.sqlite"
        self.status_path = root / "status.json"

    # ---- configs ----
    def broker_table(self, username: str, password: str) -> dict[str, object]:
        return {"url": self.broker.url, "username": username, "password": password, "protocol": self.protocol,
                "reconnect_min": 0.2, "reconnect_max": 1.0, "keepalive": 10}

    def device_config(self, i: int, **overrides: object) -> Path:
        """Write and return device i's device.toml."""
        from firmware_tools.provision import toml_text

        dev = self.devices[i]
        entry = self.credentials.devices[dev]
        top: dict[str, object] = {"device_id": dev, "experiment": self.experiment, "hmac_key": entry.hmac_key.hex(),
                                  "model_public_key": self.credentials.model_public_key.hex(),
                                  "shard": str(self.root / "shards" / f"{dev}.npz"), "board": "pi4",
                                  "spool_dir": str(self.root / "spool" / dev), "seed": i, "publish_timeout": 5.0}
        top.update(overrides)
        path = self.root / f"{dev}.toml"
        path.write_text(toml_text(top, {"broker": self.broker_table(entry.username, entry.password)}))
        return path

    def basestation_config(self, **overrides: object) -> Path:
        """Write and return basestation.toml (fixture options, then ``overrides``; dotted keys go to tables)."""
        from firmware_tools.provision import toml_text

        top: dict[str, object] = {"experiment": self.experiment, "store": str(self.store_path),
                                  "credentials": str(self.credentials_path), "dataset": "digits", "model": "mlp",
                                  "seed": 0, "rounds": 5, "status_file": str(self.status_path),
                                  "synchronous": "normal"}
        sections: dict[str, dict[str, object]] = {
            "broker": {"url": self.broker.url, "protocol": self.protocol, "reconnect_min": 0.2, "reconnect_max": 1.0},
            "round": {"min_devices": len(self.devices), "quorum": 0.75, "deadline_seconds": 20.0, "extensions": 1},
            "training": {"iterations": 20, "lr": 0.2, "batch_size": 32},
            "precision": {"policy": "fixed", "n": 8, "m": 8},
        }
        for key, value in {**self.basestation_options, **overrides}.items():
            table, _, name = key.rpartition(".")
            (sections.setdefault(table, {}) if table else top)[name] = value
        path = self.root / "basestation.toml"
        path.write_text(toml_text(top, sections))
        return path

    # ---- processes ----
    def start_edge(self, i: int, **overrides: object) -> subprocess.Popen[bytes]:
        """``qfl edge run`` for device i (output in tmp_path/<device>.log)."""
        config = self.device_config(i, **overrides)
        return self._spawn([*qfl_argv(), "edge", "run", "--config", str(config)],
                           name=self.devices[i])

    def start_basestation(self, *args: str, **overrides: object) -> subprocess.Popen[bytes]:
        """``qfl basestation serve`` (output appended to tmp_path/basestation.log)."""
        config = self.basestation_config(**overrides)
        return self._spawn([*qfl_argv(), "basestation", "serve", "--config", str(config), *args],
                           name="basestation")

    @contextlib.contextmanager
    def basestation_thread(self, **overrides: object) -> Iterator[Any]:
        """Run the basestation service in a thread of this process; yields the Basestation; stops it on exit."""
        from basestation.config import BasestationConfig
        from basestation.service import Basestation

        station = Basestation(BasestationConfig.load(self.basestation_config(**overrides)))
        failure: list[BaseException] = []

        def main() -> None:
            try:
                station.run()
            except BaseException as exc:  # reported in the test's thread below
                failure.append(exc)

        thread = threading.Thread(target=main, name="basestation", daemon=True)
        thread.start()
        try:
            yield station
        finally:
            station.request_stop()
            thread.join(30)
        if failure:
            raise failure[0]
        assert not thread.is_alive(), "the basestation did not stop within 30 s"

    def store(self) -> "Store":
        """The basestation's store, opened read-only (close it, or use ``with``)."""
        return Store(self.store_path, readonly=True)

    def read(self, query: Callable[["Store"], Any], default: Any = None) -> Any:
        """``query(store)`` on a read-only store, or ``default`` while the basestation has not created it."""
        from basestation.store import StoreError

        try:
            with self.store() as store:
                return query(store)
        except StoreError:
            return default

    def wait_until(self, predicate: Callable[[], bool], timeout: float, what: str,
                   procs: tuple[subprocess.Popen[bytes], ...] = ()) -> None:
        """Poll ``predicate`` until true; fail with ``what`` (and the logs of ``procs``) after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                logs = "\n".join(f"--- {p.log_path.name}\n{p.log_path.read_text()[-3000:]}"  # type: ignore[attr-defined]
                                  for p in procs)
                pytest.fail(f"timed out after {timeout} s waiting for {what}\n{logs}")
            time.sleep(0.05)

    def rounds(self, status: str | None = None) -> list[Any]:
        """Rounds in the store (empty before the store exists)."""
        return self.read(lambda store: store.rounds(self.experiment, status=status), [])


@pytest.fixture
def federation(tmp_path: Path, spawn: Callable[..., subprocess.Popen[bytes]],
               broker_factory: Callable[..., Broker]) -> Callable[..., Federation]:
    """Make a :class:`Federation` in this test's tmp_path."""
    def make(**options: Any) -> Federation:
        return Federation(tmp_path, spawn, broker_factory, **options)

    return make


_BUSY_WORKER = ("import time\n"
                "while True:\n"
                "    t = time.monotonic()\n"
                "    while time.monotonic() - t < 0.03: pass\n"
                "    time.sleep(0.12)\n")


@pytest.fixture
def worker() -> Iterator[subprocess.Popen[bytes]]:
    """A child process that is busy 30 ms out of every 150 ms: something for a meter emulator to watch."""
    child = subprocess.Popen([sys.executable, "-c", _BUSY_WORKER])
    yield child
    child.kill()
    child.wait()
