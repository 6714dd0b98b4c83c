"""``qfl edge run`` as a user meets it: a config path that is not a file, a broker that cannot be reached."""

from __future__ import annotations

import logging
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from basestation.broker import free_port
from edge.data import save_shard
from edge.mqtt import BrokerSettings, MqttLink, connect_failure_reason
from edge.wire.signing import public_key


def _qfl(*args: str) -> list[str]:
    return [str(Path(sys.executable).with_name("qfl")), *args]


def _device_toml(tmp_path: Path, url: str) -> Path:
    rng = np.random.default_rng(0)
    save_shard(tmp_path / "shard.npz", rng.random((20, 64), dtype=np.float32), rng.integers(0, 10, 20))
    config = tmp_path / "device.toml"
    config.write_text(f'device_id = "dev-01"\nexperiment = "exp1"\nhmac_key = "{"11" * 32}"\n'
                      f'model_public_key = "{public_key(bytes.fromhex("22" * 32)).hex()}"\n'
                      f'shard = "shard.npz"\n[broker]\nurl = "{url}"\nusername = "dev-01"\npassword = "pw"\n')
    return config


@pytest.mark.parametrize("config, message", [
    ("DIR", "DIR is a directory; give the path of a .toml config file"),
    ("", "the config path is empty; give the path of a .toml file"),
])
def test_config_that_is_not_a_file_is_one_line(config: str, message: str, tmp_path: Path) -> None:
    done = subprocess.run(_qfl("edge", "run", "--config", config.replace("DIR", str(tmp_path))),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip() == f"qfl edge run: error: {message.replace('DIR', str(tmp_path))}"


def _stderr_until(proc: subprocess.Popen[str], needle: str, seconds: float) -> str:
    """What ``proc`` wrote to stderr, read until ``needle`` appears or ``seconds`` pass."""
    seen, deadline = "", time.monotonic() + seconds
    while needle not in seen and time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        seen += line
    return seen


def test_unreachable_broker_is_reported_once_while_retrying(tmp_path: Path) -> None:
    url = f"mqtt://127.0.0.1:{free_port()}"  # nothing listens: every attempt is refused
    proc = subprocess.Popen(_qfl("edge", "run", "--config", str(_device_toml(tmp_path, url))),
                            stderr=subprocess.PIPE, text=True)
    try:
        seen = _stderr_until(proc, "cannot connect", 20.0)
        time.sleep(3.0)  # several more refused attempts (0.5 s, 1 s, 2 s backoff)
    finally:
        proc.send_signal(signal.SIGTERM)
        rest = proc.communicate(timeout=30)[1]
    assert f"WARNING cannot connect to {url}: connection refused; retrying every 0.5 s" in seen
    assert (seen + rest).count("cannot connect") == 1, seen + rest
    assert proc.returncode == 0


def test_unresolvable_host_names_the_host(caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(socket.gaierror) as info:
        socket.getaddrinfo("no-such-host.invalid", 1883)
    assert connect_failure_reason(info.value, "no-such-host.invalid").startswith(
        "cannot resolve host 'no-such-host.invalid' (")
    link = MqttLink(BrokerSettings("mqtt://no-such-host.invalid", reconnect_min=0.1, reconnect_max=0.2), "x")
    with caplog.at_level(logging.WARNING, logger="qfl.mqtt"):
        link.start()
        deadline = time.monotonic() + 20.0
        while link.last_connect_failure is None and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(1.0)
        link.stop()
    warnings = [r.getMessage() for r in caplog.records if "cannot connect" in r.getMessage()]
    assert len(warnings) == 1 and "cannot resolve host 'no-such-host.invalid'" in warnings[0]
