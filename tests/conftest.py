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
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Callable, Iterator

import pytest

from basestation.broker import Broker, MosquittoMissing
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


@pytest.fixture
def qfl_command() -> list[str]:
    """The argv prefix that runs the ``qfl`` command with this interpreter."""
    return [sys.executable, "-m", "edge.cli"]
