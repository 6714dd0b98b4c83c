"""One emulated testbed run, end to end.

    settings = TestbedSettings(devices=4, rounds=10).checked()
    result = run_testbed(settings, Console())
    print(result.summary["final_accuracy"], result.report)

Starts a private Mosquitto, the basestation and N edge processes, each edge
watched by its own meter emulator on its own pseudo-terminal and read through
the real serial reader; waits for the basestation to finish its rounds; stops
everything (also on Ctrl-C or SIGTERM, leaving no process and no
pseudo-terminal link behind); writes ``summary.json`` and the report.
"""

from __future__ import annotations

import json
import re
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from basestation.broker import Broker, BrokerError, free_port
from basestation.report.tables import count_of
from firmware_tools.credentials import Credentials
from basestation.testbed.prepare import RunLayout, prepare_run
from basestation.testbed.processes import Child, Supervisor, deferred_interrupts
from basestation.testbed.progress import Progress
from basestation.testbed.settings import TestbedSettings


class TestbedError(RuntimeError):
    """A run could not complete; the message names the process and quotes its log."""

    __test__ = False


@dataclass(frozen=True)
class RunResult:
    """What a finished run left behind."""

    run_dir: Path
    summary: dict[str, Any]
    report: Path | None


def qfl_argv(*args: str) -> list[str]:
    """The command line that runs ``qfl ARGS`` with this interpreter (no reliance on PATH)."""
    return [sys.executable, "-m", "edge.cli", *args]


class _Stop(Exception):
    """Raised from the SIGTERM handler so the run unwinds like on Ctrl-C."""


def run_testbed(settings: TestbedSettings, console: Console) -> RunResult:
    """Run one experiment as ``settings`` says; see the module docstring."""
    settings = settings.checked()
    started = time.monotonic()
    previous = signal.signal(signal.SIGTERM, _raise_stop)
    broker: Broker | None = None
    try:
        with Supervisor() as children:
            layout, broker = _prepare_broker(settings)
            _start_broker(broker, children)
            console.print(f"[bold]qfl testbed[/] run [cyan]{settings.name}[/] in {layout.root}: "
                          f"{count_of(settings.devices, 'device')}, {count_of(settings.rounds, 'round')}, policy {settings.policy}, "
                          f"board {settings.board}, link {settings.link}; broker {broker.url}", highlight=False)
            station = children.start("basestation", qfl_argv("basestation", "serve", "--config",
                                                             str(layout.basestation_config)),
                                     log=layout.logs / "basestation.log")
            if settings.meters == "fleet":
                _start_fleet(children, layout, settings)
            edges = [_start_device(children, layout, device, index, settings)
                     for index, device in enumerate(sorted(layout.devices))]
            _follow(settings, layout, station, edges, children, console)
            for edge in edges:
                children.stop(edge, timeout=15.0)
    except (KeyboardInterrupt, _Stop):
        console.print(f"[yellow]interrupted[/]: every process was stopped; partial results in {settings.run_dir}")
        raise KeyboardInterrupt from None
    finally:
        if broker is not None:
            broker.stop()
        signal.signal(signal.SIGTERM, previous)
    seconds = time.monotonic() - started
    return _finish(settings, layout, seconds, console)


def _raise_stop(signum: int, frame: object) -> None:
    raise _Stop()


def _prepare_broker(settings: TestbedSettings) -> tuple[RunLayout, Broker]:
    """Pick a port and prepare the run around it; the broker that will serve it, not started yet."""
    port = free_port()
    layout = prepare_run(settings, f"mqtt://127.0.0.1:{port}")
    accounts = Credentials.load(layout.credentials).accounts()
    return layout, Broker(layout.broker_dir, accounts=accounts, experiment=settings.experiment, port=port)


def _start_broker(broker: Broker, children: Supervisor) -> None:
    """Start Mosquitto (another port if that one was taken), watched by the orphan guard."""
    with deferred_interrupts():
        try:
            broker.start()
        except BrokerError as exc:
            raise TestbedError(f"the private Mosquitto did not start: {exc}") from None
        if broker.process is not None:
            children.guard(broker.process.pid)


def _start_device(children: Supervisor, layout: RunLayout, device: str, index: int,
                  settings: TestbedSettings) -> Child:
    """Start one edge process, then the meter emulator that watches it."""
    net: dict[str, object] | None = None
    if settings.link != "loopback":  # the device talks to its meter's relay, which forwards to the broker
        relay = free_port()
        net = {"profile": settings.link, "relay_port": relay,
               "upstream": _point_device_at(layout.device_config(device), relay),
               "seed": settings.seed, "index": index}
    edge = children.start(device, qfl_argv("edge", "run", "--config", str(layout.device_config(device))),
                          log=layout.logs / f"{device}.log")
    if settings.meters == "fleet":
        entry = {"pid": edge.pid, "link": str(layout.meter_link(device)), "seed": settings.seed * 1000 + index,
                 "ground_truth": str(layout.ground_truth / f"{device}.csv"), "net": net}
        with open(layout.root / FLEET_SPEC, "a") as spec:  # the fleet emulator picks it up within a tick
            spec.write(json.dumps(entry) + "\n")
        return edge
    children.start(f"meter-{device}", qfl_argv(
        "meter", "emulate", "--pid", str(edge.pid), "--board", settings.board,
        "--link", str(layout.meter_link(device)), "--seed", str(settings.seed * 1000 + index),
        "--rate", str(settings.meter_rate_hz), "--tick-ms", str(settings.meter_tick_ms),
        "--ground-truth", str(layout.ground_truth / f"{device}.csv"), *_net_flags(net)),
        log=layout.logs / f"meter-{device}.log")
    return edge


def _point_device_at(config: Path, port: int) -> str:
    """Rewrite the device's broker URL to 127.0.0.1:``port``; returns the broker's HOST:PORT it had."""
    text = config.read_text()
    match = re.search(r'^url = "mqtt://([^"/:]+):(\d+)"$', text, flags=re.MULTILINE)
    if match is None:
        raise TestbedError(f"{config} has no plain mqtt:// broker url to route through the link relay")
    config.write_text(text[:match.start()] + f'url = "mqtt://127.0.0.1:{port}"' + text[match.end():])
    return f"{match.group(1)}:{match.group(2)}"


def _net_flags(net: dict[str, object] | None) -> list[str]:
    """``qfl meter emulate``'s flags for the uplink ``net`` (none on loopback)."""
    if net is None:
        return []
    return ["--net", str(net["profile"]), "--relay-port", str(net["relay_port"]), "--upstream", str(net["upstream"]),
            "--net-seed", str(net["seed"]), "--net-index", str(net["index"])]


FLEET_SPEC = "fleet.jsonl"
FLEET_STATS = "fleet-stats.json"


def _start_fleet(children: Supervisor, layout: RunLayout, settings: TestbedSettings) -> Child:
    """Start the one process that emulates every device's meter (devices are added to its spec file)."""
    (layout.root / FLEET_SPEC).write_text("")
    return children.start("meters", qfl_argv(
        "meter", "fleet", "--spec", str(layout.root / FLEET_SPEC), "--board", settings.board,
        "--rate", str(settings.fleet_rate_hz), "--tick-ms", str(settings.fleet_tick_ms),
        "--stats", str(layout.root / FLEET_STATS)), log=layout.logs / "meters.log")


def _follow(settings: TestbedSettings, layout: RunLayout, station: Child, edges: list[Child],
            children: Supervisor, console: Console) -> None:
    """Show progress until the basestation exits; fail early, with the log, if a process dies."""
    progress = Progress(console, layout.store, settings.experiment,
                        f"{settings.name}: {settings.policy} policy, {settings.devices} x {settings.board}")
    try:
        while station.running():
            for child in children.children:
                if child is not station and not child.running() and child.process.returncode not in (0, None):
                    raise TestbedError(f"{child.name} exited with status {child.process.returncode}; "
                                       f"last lines of {child.log}:\n{child.tail()}")
            progress.update(devices_online=sum(edge.running() for edge in edges))
            time.sleep(0.25)
        progress.update(devices_online=sum(edge.running() for edge in edges), final=True)
    finally:
        progress.close()
    if station.process.returncode != 0:
        raise TestbedError(f"the basestation exited with status {station.process.returncode}; "
                           f"last lines of {station.log}:\n{station.tail()}")


def _finish(settings: TestbedSettings, layout: RunLayout, seconds: float, console: Console) -> RunResult:
    """Write summary.json and the report; print where they are."""
    from basestation.report.load import load_run
    from basestation.report.writer import write_report
    from basestation.testbed.summary import summarize

    run = load_run(layout.root, experiment=settings.experiment)
    summary = summarize(settings, layout, run, seconds)
    (layout.root / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    run = load_run(layout.root, experiment=settings.experiment)
    report = write_report([run], layout.root, target_accuracy=settings.target_accuracy).html
    # The model predicts the energy above idle, so that is what it is set against here.
    console.print(f"final accuracy {summary['final_accuracy']:.3f} after {count_of(summary['rounds'], 'round')}; measured "
                  f"{summary['energy_j']:.3g} J, {summary['energy_above_idle_j']:.3g} J of it above idle, where "
                  f"the model said {_joules(summary['energy_model_j'])} ({_calibrated(summary)}); "
                  f"{seconds:.0f} s", highlight=False)
    console.print(f"report: {report}", highlight=False)
    return RunResult(layout.root, summary, report)


def _calibrated(summary: dict) -> str:
    """``"calibrated 0.29 J"``, or where to read why there is no calibrated figure."""
    if summary["energy_calibrated_j"] is None:
        # e.g. every round at one training precision: the fit cannot separate its terms
        return "no calibrated figure: the report's notes say why"
    return f"calibrated {_joules(summary['energy_calibrated_j'])}"


def _joules(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3g} J"

