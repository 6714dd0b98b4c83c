"""Light devices: real MQTT clients that answer round plans with precomputed updates, without training.

For load tests and benchmarks of a basestation (and of a field broker): each
``LightDevice`` logs in with its own credentials, says hello, and when a plan
selects it, signs a stored model difference for that round and publishes it
with an energy report (``"meter": null``), exactly as ``qfl edge run`` would,
only without the training in between::

    devices = [LightDevice(settings_for(d), "exp1", d, creds.devices[d].hmac_key, creds.model_public_key, delta=delta)
               for d in creds.devices]
    for dev in devices: dev.start()
    ...
    for dev in devices: dev.stop()
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Mapping

import numpy as np

from edge.mqtt import BrokerSettings, Connected, Message, MqttLink, Topics
from edge.runtime.messages import MessageError, RoundPlan, sign_json, status_payload
from edge.wire import QuantizedTensor, encode_update, quantize_update, read_header, verify_model

log = logging.getLogger("qfl.loadgen")


class LightDevice:
    """A device that publishes ``delta`` (quantized at the plan's m) whenever it is selected.

    ``answered`` maps round -> seconds between receiving the plan and publishing.
    """

    def __init__(self, settings: BrokerSettings, experiment: str, device: str, key: bytes, model_public_key: bytes, *,
                 delta: Mapping[str, np.ndarray], samples: int = 100, seed: int = 0, check_model: bool = True):
        self.device, self.key, self.model_key = device, key, model_public_key
        self.topics = Topics(experiment)
        self.experiment = experiment
        self.delta = {k: np.asarray(v, np.float32) for k, v in delta.items()}
        self.samples = samples
        self.check_model = check_model
        self.rng = np.random.default_rng(seed)
        self._quantized: dict[tuple[int, str], list[QuantizedTensor]] = {}
        self.plan: RoundPlan | None = None
        self.model_hashes: dict[int, bytes] = {}
        self.answered: dict[int, float] = {}
        self._plan_seen: dict[int, float] = {}
        self.link = MqttLink(settings, f"qfl-{experiment}-{device}",
                             subscriptions=[(self.topics.round, 1), (self.topics.models, 1),
                                            (self.topics.device(device, "ack"), 1)],
                             will=(self.topics.device(device, "status"), status_payload(device, "offline")))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"LightDevice({device})", daemon=True)
        self.acks = 0

    def start(self) -> "LightDevice":
        """Connect and start answering plans in a background thread."""
        self.link.start()
        self._thread.start()
        return self

    def stop(self) -> None:
        """Publish offline and disconnect."""
        self._stop.set()
        self.link.wake()
        self._thread.join(5.0)
        self.link.stop(publish=(self.topics.device(self.device, "status"), status_payload(self.device, "offline")))

    def _loop(self) -> None:
        while not self._stop.is_set():
            # Blocks until an event or stop()'s wake-up: a thousand devices polling
            # ten times a second would cost the load generator more than the basestation.
            event = self.link.next_event()
            if isinstance(event, Connected):
                hello = {"kind": "hello", "device": self.device, "experiment": self.experiment,
                         "dataset_size": self.samples, "board": "loadgen", "meter_id": None, "software": "loadgen",
                         "protocol": self.link.settings.protocol, "sent_at": time.time(),
                         "nonce": os.urandom(8).hex()}
                self.link.publish(self.topics.device(self.device, "hello"), sign_json(hello, self.key), retain=True)
                self.link.publish(self.topics.device(self.device, "status"), status_payload(self.device, "online"),
                                  retain=True)
            elif isinstance(event, Message):
                try:
                    self._on_message(event)
                except (MessageError, ValueError) as exc:
                    log.warning("%s ignores %s: %s", self.device, event.topic, exc)

    def _on_message(self, msg: Message) -> None:
        kind, _, round_ = self.topics.parse(msg.topic)
        if kind == "ack":
            self.acks += 1
            return
        if not msg.payload:
            return
        if kind == "round":
            plan = RoundPlan.from_json(msg.payload)
            if plan.status == "open" and (self.plan is None or plan.round >= self.plan.round):
                self.plan = plan
                self._plan_seen.setdefault(plan.round, time.perf_counter())
        elif kind == "model" and round_ is not None:
            if self.check_model:
                verdict = verify_model(msg.payload, experiment=self.experiment, key=self.model_key, round=round_)
                if not verdict.accepted:
                    return
                self.model_hashes[round_] = verdict.message.base_hash
            else:
                self.model_hashes[round_] = read_header(msg.payload).base_hash
        self._maybe_answer()

    def _maybe_answer(self) -> None:
        plan = self.plan
        if plan is None or plan.round in self.answered or self.device not in plan.selected:
            return
        base = self.model_hashes.get(plan.round)
        if base is None or base.hex() != plan.model_hash:
            return
        m = plan.m_for(self.device)
        key = (m, plan.uplink_scheme)
        if key not in self._quantized:
            self._quantized[key] = quantize_update(self.delta, m, self.rng, scheme=plan.uplink_scheme)
        data = encode_update(self._quantized[key], experiment=self.experiment, device=self.device, round=plan.round,
                             base_hash=base, samples=self.samples, key=self.key)
        self.link.publish(self.topics.device(self.device, "update"), data)
        report = {"kind": "energy", "device": self.device, "experiment": self.experiment, "round": plan.round,
                  "nonce": os.urandom(16).hex(), "n": plan.n, "m": m, "iterations": plan.iterations,
                  "batch_size": plan.batch_size, "lr": plan.lr, "samples": self.samples, "train": {},
                  "uplink": {"bytes": len(data)}, "meter": None, "sent_at": time.time()}
        self.link.publish(self.topics.device(self.device, "energy"), sign_json(report, self.key))
        self.answered[plan.round] = time.perf_counter() - self._plan_seen.get(plan.round, time.perf_counter())
