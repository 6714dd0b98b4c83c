"""Emulated uplink radio: link profiles (``links.toml``) and a TCP relay that makes real bytes pay for airtime.

    profile = get_link("lte-m")
    radio = RadioLog()
    relay = Relay(profile.for_device(seed=0, index=3), radio, listen_port=18830, upstream=("127.0.0.1", 1883))
    relay.start()                      # the edge's MQTT client connects to 127.0.0.1:18830
    radio.busy_fraction(t0, t1)        # share of [t0, t1] the radio was transmitting (the meter adds tx power)
    relay.stop()

Every chunk the device writes towards the broker occupies the radio for
``len(chunk) * 8 / rate`` seconds, after whatever is still queued ahead of it
(one radio, so transmissions never overlap), and is handed to the broker
``latency`` seconds after its last bit left. The relay records each busy
interval in a ``RadioLog``; the meter emulator in the same process adds the
profile's transmit power for the share of each sample period the radio was
busy, so the measured energy contains the airtime and nothing is added
afterwards. Bytes from the broker to the device get the latency only (the
downlink is not what the paper's trade-off is about; see docs/boards.md).
On real hardware none of this runs: the meter sees the real radio.
"""

from __future__ import annotations

import math
import queue
import socket
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from firmware_tools.emulator.profiles import read_profile_tables

LINKS_FILE = Path(__file__).with_name("links.toml")
_CHUNK = 65536
_KEEP_SECONDS = 30.0  # busy intervals older than this are dropped (the meter asks about the last tick only)


class LinkProfileError(ValueError):
    """A link profile that is missing, unknown or malformed."""


@dataclass(frozen=True)
class LinkProfile:
    """Rate (bit/s; 0 means no radio), one-way latency (s) and transmit power (W) of one uplink."""

    name: str
    description: str
    rate_bps: float
    latency_s: float
    tx_power_w: float
    channel: str = "fixed"
    bandwidth_hz: float = 0.0
    noise_w_per_hz: float = 0.0
    area_min_m: float = 1.0
    area_max_m: float = 500.0
    path_loss_exponent: float = 4.0
    distance_m: float | None = None
    fading: float | None = None

    @property
    def emulated(self) -> bool:
        """True when the link has a radio to emulate (every profile but loopback)."""
        return self.rate_bps > 0 or self.channel == "rayleigh"

    def for_device(self, *, seed: int, index: int) -> "LinkProfile":
        """The profile as device ``index`` sees it: a rayleigh channel draws its distance and fading here.

        The draw depends only on (seed, index), so a device keeps its channel
        across runs of a sweep and devices of one run differ.
        """
        if self.channel != "rayleigh":
            return self
        rng = np.random.default_rng([int(seed), int(index), 2022])
        x, y = rng.uniform(self.area_min_m, self.area_max_m, size=2)
        distance = float(math.hypot(x, y))
        fading = float(rng.exponential(1.0))
        gain = fading * distance ** (-self.path_loss_exponent)
        snr = self.tx_power_w * gain / (self.bandwidth_hz * self.noise_w_per_hz)
        rate = self.bandwidth_hz * math.log2(1.0 + snr)
        return replace(self, rate_bps=rate, distance_m=distance, fading=fading, channel="fixed")

    def airtime(self, nbytes: int) -> float:
        """Seconds the radio needs for ``nbytes`` (0 without a radio)."""
        return nbytes * 8.0 / self.rate_bps if self.rate_bps > 0 else 0.0


_FIELDS = {"description": str, "rate_bps": float, "latency_s": float, "tx_power_w": float, "channel": str,
           "bandwidth_hz": float, "noise_w_per_hz": float, "area_min_m": float, "area_max_m": float,
           "path_loss_exponent": float}
_REQUIRED = ("description", "rate_bps", "latency_s", "tx_power_w", "channel")


def load_links(path: str | Path | None = None) -> dict[str, LinkProfile]:
    """Every profile of a links TOML file (default: the one shipped beside this module)."""
    path = Path(path) if path is not None else LINKS_FILE
    data = read_profile_tables(path, "link", LinkProfileError)
    links = {}
    for name, table in data.items():
        if not isinstance(table, dict):
            raise LinkProfileError(f"{path}: [{name}] must be a table of fields")
        missing = [k for k in _REQUIRED if k not in table]
        extra = sorted(set(table) - set(_FIELDS))
        if missing or extra:
            raise LinkProfileError(f"{path}: link {name!r} is missing {missing or 'nothing'} and has unknown "
                                   f"{extra or 'nothing'}")
        values = {}
        for key, value in table.items():
            if _FIELDS[key] is str:
                if not isinstance(value, str):
                    raise LinkProfileError(f"{path}: {name}.{key} must be a string, got {value!r}")
            elif isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value < 0:
                raise LinkProfileError(f"{path}: {name}.{key} must be a non-negative number, got {value!r}")
            values[key] = float(value) if _FIELDS[key] is float else value
        if values["channel"] not in ("fixed", "rayleigh"):
            raise LinkProfileError(f"{path}: {name}.channel must be 'fixed' or 'rayleigh', got {values['channel']!r}")
        if values["channel"] == "rayleigh" and not (values.get("bandwidth_hz", 0) > 0
                                                    and values.get("noise_w_per_hz", 0) > 0
                                                    and values["tx_power_w"] > 0):
            raise LinkProfileError(f"{path}: rayleigh link {name!r} needs bandwidth_hz, noise_w_per_hz and "
                                   f"tx_power_w > 0")
        links[name] = LinkProfile(name=name, **values)
    if not links:
        raise LinkProfileError(f"{path} defines no links")
    return links


def link_names(path: str | Path | None = None) -> list[str]:
    """Names of the profiles, in file order."""
    return list(load_links(path))


def get_link(name: str, path: str | Path | None = None) -> LinkProfile:
    """One profile by name; the error lists the names that exist."""
    links = load_links(path)
    if name not in links:
        raise LinkProfileError(f"unknown link {name!r}; choose one of: {', '.join(links)}")
    return links[name]


class RadioLog:
    """Busy intervals of one radio (host monotonic seconds), shared by the relay and the meter emulator."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._intervals: list[tuple[float, float]] = []
        self._free_at = 0.0
        self.busy_seconds = 0.0
        self.bytes_sent = 0

    def transmit(self, nbytes: int, airtime: float, now: float | None = None) -> tuple[float, float]:
        """Queue ``nbytes`` taking ``airtime`` s behind what is on air already; returns (start, end)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            start = max(now, self._free_at)
            end = start + airtime
            self._free_at = end
            if airtime > 0:
                self._intervals.append((start, end))
                self.busy_seconds += airtime
            self.bytes_sent += nbytes
            cutoff = now - _KEEP_SECONDS
            if self._intervals and self._intervals[0][1] < cutoff:
                self._intervals = [iv for iv in self._intervals if iv[1] >= cutoff]
        return start, end

    def intervals(self) -> list[tuple[float, float]]:
        """A copy of the recorded busy intervals."""
        with self._lock:
            return list(self._intervals)

    def busy_fraction(self, starts: np.ndarray | float, ends: np.ndarray | float) -> np.ndarray:
        """Share of each window [start, end] during which the radio transmitted (0..1)."""
        starts = np.atleast_1d(np.asarray(starts, dtype=float))
        ends = np.atleast_1d(np.asarray(ends, dtype=float))
        with self._lock:
            spans = [iv for iv in self._intervals if iv[1] > starts.min() and iv[0] < ends.max()] if starts.size else []
        busy = np.zeros(starts.shape)
        for a, b in spans:
            busy += np.clip(np.minimum(ends, b) - np.maximum(starts, a), 0.0, None)
        width = np.maximum(ends - starts, 1e-12)
        return np.clip(busy / width, 0.0, 1.0)


class Relay:
    """A TCP relay on 127.0.0.1 that delays the device's bytes as the link profile says (module docstring)."""

    def __init__(self, profile: LinkProfile, radio: RadioLog, *, listen_port: int,
                 upstream: tuple[str, int], listen_host: str = "127.0.0.1") -> None:
        self.profile, self.radio, self.upstream = profile, radio, upstream
        self._server = socket.create_server((listen_host, listen_port), reuse_port=False)
        self._server.settimeout(0.2)
        self.port = self._server.getsockname()[1]
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._sockets: list[socket.socket] = []
        self.connections = 0

    def __repr__(self) -> str:
        return f"Relay({self.profile.name}, :{self.port} -> {self.upstream[0]}:{self.upstream[1]})"

    def start(self) -> "Relay":
        """Accept connections in a background thread."""
        self._spawn(self._accept, "relay-accept")
        return self

    def stop(self) -> None:
        """Close the listening socket and every relayed connection."""
        self._stop.set()
        for s in [self._server, *self._sockets]:
            try:
                s.close()
            except OSError:
                pass
        for t in self._threads:
            t.join(timeout=1.0)

    def __enter__(self) -> "Relay":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _spawn(self, target, name: str, *args) -> None:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                device, _ = self._server.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            try:
                broker = socket.create_connection(self.upstream, timeout=5.0)
            except OSError:
                device.close()
                continue
            for s in (device, broker):
                s.settimeout(None)
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._sockets += [device, broker]
            self.connections += 1
            self._pipe(device, broker, uplink=True)
            self._pipe(broker, device, uplink=False)

    def _pipe(self, src: socket.socket, dst: socket.socket, *, uplink: bool) -> None:
        """Reader thread stamps each chunk with its delivery time; sender thread delivers it then."""
        pending: queue.Queue = queue.Queue()
        self._spawn(self._read, "relay-up-read" if uplink else "relay-down-read", src, dst, pending, uplink)
        self._spawn(self._send, "relay-up-send" if uplink else "relay-down-send", dst, src, pending)

    def _read(self, src: socket.socket, dst: socket.socket, pending: queue.Queue, uplink: bool) -> None:
        latency = self.profile.latency_s
        try:
            while True:
                data = src.recv(_CHUNK)
                if not data:
                    break
                if uplink:
                    _, end = self.radio.transmit(len(data), self.profile.airtime(len(data)))
                else:
                    end = time.monotonic()
                pending.put((end + latency, data))
        except OSError:
            pass
        pending.put(None)

    def _send(self, dst: socket.socket, src: socket.socket, pending: queue.Queue) -> None:
        try:
            while True:
                item = pending.get()
                if item is None:
                    break
                due, data = item
                wait = due - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                dst.sendall(data)
        except OSError:
            pass
        for s in (dst, src):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
