"""The edge runtime: one device taking part in rounds over MQTT.

    cfg = DeviceConfig.load("device.toml")
    runtime = EdgeRuntime(cfg)
    status = runtime.run()          # until SIGTERM/SIGINT (request_stop) or the experiment finishes

What it does (docs/mqtt.md has the messages):

1. Connects with a persistent session under a fixed client id, publishes a
   signed ``hello`` and a retained ``online`` status (its last will is a
   retained ``offline``), and re-publishes every spooled, unacknowledged
   message (after its own restart or the broker's).
2. Keeps the newest round plan and the verified global model of that round.
3. When selected (and not yet done with that round): trains ``I`` local
   iterations at ``n`` bits inside the meter's ``train`` phase, quantizes the
   difference at ``m`` bits, signs it, spools it, publishes it at QoS 1
   inside the ``uplink`` phase, then spools and publishes a signed energy
   report (``"meter": null`` without a meter).
4. Deletes a spooled message when the basestation's ack names its nonce.

All work happens in the caller's thread; paho's network thread only queues
events. Bad messages are logged and ignored; nothing in them can stop the loop.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
import time
import zlib
from typing import Any, Iterator

import numpy as np

from edge.mqtt import Connected, Message, MqttError, MqttLink, Refused, Topics
from edge.runtime.config import DeviceConfig
from edge.runtime.messages import Ack, MessageError, RoundPlan, sign_json, status_payload
from edge.runtime.spool import Spool

log = logging.getLogger("qfl.edge")
PHASE_FIELDS = ("joules", "joules_above_idle", "seconds", "samples", "gap_seconds", "partial", "uncertainty_j")


def software_version() -> str:
    """The installed qfl-testbed version (``unknown`` from a bare checkout)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("qfl-testbed")
    except PackageNotFoundError:
        return "unknown"


def round_seed(seed: int, device: str, round_: int, stream: int) -> np.random.SeedSequence:
    """Seed of one random stream (0 = minibatches, 1 = uplink rounding) of one device in one round."""
    return np.random.SeedSequence([seed, zlib.crc32(device.encode()), round_, stream])


def _finite(value: Any) -> Any:
    """Plain JSON value: numpy scalars unwrapped, non-finite floats as None."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def phase_report(phase: Any) -> dict[str, Any]:
    """The JSON figures of one ``edge.meter.PhaseEnergy``: the standard fields, then its counters."""
    out = {name: _finite(getattr(phase, name)) for name in PHASE_FIELDS}
    for name in ("start", "end", "covered_seconds", "idle_watts", "lost_samples", "overflow_samples", "crc_errors",
                 "malformed_lines", "meter_errors", "reconnects"):
        out[name] = _finite(getattr(phase, name))
    # Host monotonic times: the clock of the emulators' ground-truth logs on the same machine.
    out["gaps"] = [[_finite(a), _finite(b)] for a, b in phase.gaps]
    return out


def _published(info: Any) -> bool:
    """True once the broker acknowledged a publish; False if not yet, or if paho could not send it
    (disconnected: the spool re-sends it after the next connect)."""
    try:
        return bool(info.is_published())
    except (RuntimeError, ValueError):
        return False


class EdgeRuntime:
    """One device's federation loop (see the module docstring).

    ``meter`` is an open ``edge.meter.PowerMeter``; None opens
    ``config.meter_port`` when set and runs without a meter otherwise.
    """

    def __init__(self, config: DeviceConfig, *, meter: Any = None):
        self.config = config
        self.topics = Topics(config.experiment)
        self.spool = Spool(config.spool_dir, config.max_spool)
        state = self.spool.load_state()
        self.last_round = int(state.get("last_round", 0)) if state.get("experiment") == config.experiment else 0
        self.meter = meter
        self._own_meter = False
        self.plan: RoundPlan | None = None
        self.models: dict[int, Any] = {}
        self.finished = False
        self.rounds_trained = 0
        self._failed_rounds: set[int] = set()
        self._sent_at: dict[str, float] = {}  # nonce -> when it was last published
        self._next_resend = time.monotonic() + config.resend_seconds
        self._stop = threading.Event()
        self.x: np.ndarray | None = None
        self.y: np.ndarray | None = None
        self.link = MqttLink(
            config.broker, config.client_id,
            subscriptions=[(self.topics.round, 1), (self.topics.models, 1),
                           (self.topics.device(config.device_id, "ack"), 1)],
            will=(self.topics.device(config.device_id, "status"), status_payload(config.device_id, "offline")),
        )

    def __repr__(self) -> str:
        return (f"<EdgeRuntime {self.config.device_id} exp={self.config.experiment} last_round={self.last_round} "
                f"spooled={len(self.spool)}>")

    def request_stop(self) -> None:
        """Ask the loop to finish (safe from a signal handler or another thread)."""
        self._stop.set()

    # ---- main loop ----
    def run(self) -> int:
        """Run until stopped or finished; returns the process exit status (0 = clean)."""
        from edge.data import load_shard

        self.x, self.y = load_shard(self.config.shard)
        if self.meter is None and self.config.meter_port:
            from edge.meter import PowerMeter

            wait_for_port(self.config.meter_port, self.config.meter_wait_seconds, self._stop)
            self.meter = PowerMeter(self.config.meter_port, idle_seconds=self.config.meter_idle_seconds)
            self._own_meter = True
        log.info("device %s: %d samples, meter %s, broker %s", self.config.device_id, len(self.y),
                 self.config.meter_port or "none", self.config.broker.url)
        self.link.start()
        finished_at: float | None = None
        try:
            while not self._stop.is_set():
                event = self.link.next_event(0.2)
                if event is not None:
                    self._handle(event)
                    self._maybe_train()
                if self.link.connected and time.monotonic() >= self._next_resend:
                    self._resend_spool("still unacknowledged", older_than=self.config.resend_seconds)
                    self._next_resend = time.monotonic() + self.config.resend_seconds / 2
                if self.finished and self.config.exit_when_finished:
                    finished_at = finished_at or time.monotonic()
                    # Give the last acks a moment so the spool ends empty.
                    if len(self.spool) == 0 or time.monotonic() - finished_at > 5.0:
                        log.info("experiment %s finished; exiting", self.config.experiment)
                        break
        finally:
            self.link.stop(publish=(self.topics.device(self.config.device_id, "status"),
                                    status_payload(self.config.device_id, "offline")))
            if self._own_meter and self.meter is not None:
                self.meter.close()
        return 0

    def _handle(self, event: Any) -> None:
        if isinstance(event, Connected):
            self._on_connect(event.session_present)
        elif isinstance(event, Refused):
            if event.permanent:
                raise MqttError(f"broker {self.config.broker.url} refused device {self.config.device_id}: "
                                f"{event.reason}; check username/password in the device config")
        elif isinstance(event, Message):
            try:
                self._on_message(event)
            except ValueError as exc:  # MessageError, or a topic this device has no business with
                log.warning("ignoring message on %s: %s", event.topic, exc)

    def _on_connect(self, session_present: bool) -> None:
        cfg = self.config
        log.info("connected to %s (session %s)", cfg.broker.url, "resumed" if session_present else "new")
        hello = {"kind": "hello", "device": cfg.device_id, "experiment": cfg.experiment,
                 "dataset_size": int(len(self.y)) if self.y is not None else 0, "board": cfg.board,
                 "meter_id": self._meter_id(), "software": software_version(), "protocol": cfg.broker.protocol,
                 "sent_at": time.time(), "nonce": os.urandom(8).hex()}
        # Retained, so a basestation that subscribes later still learns about this device.
        self.link.publish(self.topics.device(cfg.device_id, "hello"), sign_json(hello, cfg.hmac_key), qos=1,
                          retain=True)
        self.link.publish(self.topics.device(cfg.device_id, "status"), status_payload(cfg.device_id, "online"),
                          qos=1, retain=True)
        self._resend_spool("after connecting")

    def _resend_spool(self, why: str, older_than: float = 0.0) -> None:
        """Publish again every spooled message (sent at least ``older_than`` seconds ago)."""
        now = time.time()
        entries = [e for e in self.spool.entries() if now - self._sent_at.get(e.nonce, e.created) >= older_than]
        for entry in entries:
            self.link.publish(entry.topic, entry.payload, qos=1)
            self._sent_at[entry.nonce] = now
        if entries:
            log.info("re-sent %d unacknowledged message(s) from the spool %s", len(entries), why)

    def _on_message(self, msg: Message) -> None:
        kind, _, round_ = self.topics.parse(msg.topic)
        if kind == "round":
            self._on_plan(msg.payload)
        elif kind == "model" and round_ is not None:
            self._on_model(round_, msg.payload)
        elif kind == "ack":
            ack = Ack.from_json(msg.payload)
            self._sent_at.pop(ack.nonce, None)
            if self.spool.remove(ack.nonce):
                log.info("basestation %s %s of round %d", ack.status, ack.kind, ack.round)

    def _on_plan(self, payload: bytes) -> None:
        if not payload:
            return
        plan = RoundPlan.from_json(payload)
        if plan.experiment != self.config.experiment:
            raise MessageError("malformed", f"plan for experiment {plan.experiment!r}")
        if plan.status == "finished":
            self.finished = True
            return
        self.finished = False  # an experiment resumed with more rounds
        if self.plan is not None and plan.round < self.plan.round:
            return  # an old retained plan, e.g. restored by a broker from an old autosave
        if self.plan is not None and plan.sync != self.plan.sync:
            # The basestation reconnected to a broker that had lost its session: what we sent
            # while it was not subscribed is gone.
            self._resend_spool("for a basestation that lost its session")
        self.plan = plan

    def _on_model(self, round_: int, payload: bytes) -> None:
        if not payload:
            return
        from edge.wire import verify_model

        verdict = verify_model(payload, experiment=self.config.experiment, key=self.config.model_public_key, round=round_)
        if not verdict.accepted:
            log.warning("ignoring global model for round %d: %s (%s)", round_, verdict.reason, verdict.detail)
            return
        self.models[round_] = verdict.message
        for old in [r for r in self.models if r < round_ - 1]:
            del self.models[old]

    # ---- one round ----
    def _maybe_train(self) -> None:
        plan = self.plan
        if plan is None or self.finished or plan.round <= self.last_round:
            return
        if self.config.device_id not in plan.selected:
            return
        model = self.models.get(plan.round)
        if model is None or model.base_hash.hex() != plan.model_hash:
            return  # wait for the matching global model
        if time.time() > plan.deadline:
            log.info("round %d: deadline passed before training started; waiting for the next plan", plan.round)
            return
        if plan.round in self._failed_rounds:
            return
        try:
            self.train_round(plan, model)
        except (ValueError, TypeError, ArithmeticError) as exc:
            # A plan this device cannot carry out (unknown model, data of the wrong shape, ...): say so
            # once and wait for the next round rather than stopping.
            self._failed_rounds.add(plan.round)
            log.error("round %d: cannot train as planned: %s", plan.round, exc)

    def train_round(self, plan: RoundPlan, model: Any) -> None:
        """Train, quantize, sign, spool and publish one round's update and energy report."""
        from edge.network import Network
        from edge.trainer import LocalTrainer
        from edge.wire import encode_update, quantize_update
        from models import get_architecture

        cfg = self.config
        started = time.time()
        log.info("round %d: training %d iterations at n=%d", plan.round, plan.iterations, plan.n)
        # The network's seed drives its stochastic rounding: a fresh stream per device and round, so the
        # rounding noise does not repeat from one round to the next.
        net_seed = int(round_seed(cfg.seed, cfg.device_id, plan.round, 2).generate_state(1)[0])
        net = Network(get_architecture(plan.model), bits=plan.n, mode=plan.mode, seed=net_seed)
        net.set_weights(model.weights())
        batch_seed = int(round_seed(cfg.seed, cfg.device_id, plan.round, 0).generate_state(1)[0])
        trainer = LocalTrainer(lr=plan.lr, momentum=plan.momentum, batch_size=plan.batch_size, seed=batch_seed)
        with self._phase("train"):
            result = trainer.train(net, self.x, self.y, iterations=plan.iterations)
        rng = np.random.default_rng(round_seed(cfg.seed, cfg.device_id, plan.round, 1))
        m = plan.m_for(cfg.device_id)
        tensors = quantize_update(result.delta, m, rng, scheme=plan.uplink_scheme)
        nonce = os.urandom(16)
        data = encode_update(tensors, experiment=cfg.experiment, device=cfg.device_id, round=plan.round,
                             base_hash=model.base_hash, samples=int(len(self.y)), key=cfg.hmac_key, nonce=nonce)
        topic = self.topics.device(cfg.device_id, "update")
        self.spool.put(kind="update", round_=plan.round, nonce=nonce.hex(), topic=topic, payload=data)
        self._sent_at[nonce.hex()] = time.time()
        self.last_round = plan.round
        self.spool.save_state({"experiment": cfg.experiment, "last_round": plan.round})
        uplink_started = time.monotonic()
        with self._phase("uplink"):
            info = self.link.publish(topic, data, qos=1)
            with contextlib.suppress(RuntimeError, ValueError):
                info.wait_for_publish(cfg.publish_timeout)
        uplink_seconds = time.monotonic() - uplink_started
        self.rounds_trained += 1
        log.info("round %d: trained %d iterations at n=%d (loss %.4f), sent %d bytes at m=%d", plan.round,
                 plan.iterations, plan.n, float(result.loss), len(data), m)
        self._send_energy_report(plan, result, nonce.hex(), len(data), uplink_seconds, _published(info), started)

    def _send_energy_report(self, plan: RoundPlan, result: Any, update_nonce: str, size: int, uplink_seconds: float,
                            delivered: bool, started: float) -> None:
        cfg = self.config
        nonce = os.urandom(16).hex()
        body = {
            "kind": "energy", "device": cfg.device_id, "experiment": cfg.experiment, "round": plan.round,
            "nonce": nonce, "update_nonce": update_nonce, "n": plan.n, "m": plan.m_for(cfg.device_id),
            "iterations": plan.iterations, "batch_size": plan.batch_size, "lr": plan.lr, "samples": int(len(self.y)),
            "train": {name: _finite(getattr(result, name, None)) for name in
                      ("seconds", "loss", "grad_sq_norm", "grad_variance", "samples", "iterations")},
            "uplink": {"bytes": size, "seconds": uplink_seconds, "broker_acknowledged": bool(delivered)},
            "meter": self._meter_report(),
            "started_at": started, "sent_at": time.time(),
        }
        data = sign_json(body, cfg.hmac_key)
        topic = self.topics.device(cfg.device_id, "energy")
        self.spool.put(kind="energy", round_=plan.round, nonce=nonce, topic=topic, payload=data)
        self._sent_at[nonce] = time.time()
        self.link.publish(topic, data, qos=1)

    # ---- meter ----
    @contextlib.contextmanager
    def _phase(self, name: str) -> Iterator[None]:
        if self.meter is None:
            yield
        else:
            with self.meter.phase(name):
                yield

    def _meter_id(self) -> str | None:
        identity = self.meter.identity if self.meter is not None else None
        return identity.meter_id if identity is not None else None

    def _meter_report(self) -> dict[str, Any] | None:
        """Per-phase energy of this round and the meter's health, or None without a meter."""
        meter = self.meter
        if meter is None:
            return None
        from edge.meter import MeterError

        phases = {}
        for name in ("train", "uplink"):
            try:
                phases[name] = phase_report(meter.phase_energy(name))
            except MeterError as exc:  # e.g. the meter was unplugged during the phase
                log.warning("no %s energy from the meter: %s", name, exc)
        identity = meter.identity
        health = {"state": meter.state, "drift_ppm": _finite(meter.drift_ppm),
                  "drift_uncertainty_ppm": _finite(meter.drift_uncertainty_ppm), "idle_watts": _finite(meter.idle_watts),
                  "firmware": identity.firmware if identity is not None else None,
                  "counters": meter.counters.as_dict()}
        return {"id": self._meter_id(), "board": self.config.board, "phases": phases, "health": health}


def wait_for_port(port: str, seconds: float, stop: threading.Event) -> None:
    """Wait up to ``seconds`` for a serial device path to appear (a USB meter still enumerating after boot,
    or an emulator that starts after this process); PowerMeter then reports a missing port itself."""
    if "://" in port:
        return
    deadline = time.monotonic() + seconds
    while not os.path.exists(port) and time.monotonic() < deadline and not stop.is_set():
        time.sleep(0.05)
