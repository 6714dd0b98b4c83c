"""Ingest workers: updates are signature-checked and decoded in worker processes fed by an MQTT shared subscription.

With ``ingest_workers = N`` in basestation.toml the service subscribes to
hellos, statuses and energy reports itself and leaves the updates to N
processes, each one member of the shared subscription
``$share/qfl-<exp>-ingest/qfl/<exp>/device/+/update``::

    workers = IngestWorkers(settings, "exp1", keys, count=2, client_id="qfl-basestation-exp1", deliver=queue.put)
    workers.start()
    ...                    # deliver(Checked) for every update a worker received and checked
    workers.ack(checked)   # after the store commit: only now does that worker PUBACK it to the broker
    workers.stop()

A worker runs the costly, stateless part of the verification
(``edge.wire.check_signed_update``: header, key, HMAC, decoding) and hands
the verdict to the service, which runs the rest (topic, nonce, round, base
model, bounds, store) exactly as for an update it received itself. So:

- nothing acknowledged is lost: a worker PUBACKs an update only when the
  service says it is durable in the store;
- nothing is aggregated twice: a worker that dies is restarted under the
  same client id, whose persistent session gets back every update it had not
  PUBACKed; one the store already holds is a ``replayed`` refusal (with a
  ``duplicate`` ack to the device), as after any redelivery;
- the fixed id matters: a dead member of a shared subscription keeps its
  share of the stream queued in its session until a client with its id
  returns (measured in bench/ingest_scale.py).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import multiprocessing
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, Callable, Mapping

from edge.mqtt import BrokerSettings, Connected, Message, MqttLink, Topics
from edge.wire import Verdict, check_signed_update

log = logging.getLogger("qfl.basestation.ingest_workers")
RESTART_DELAY = 1.0  # seconds before a dead worker is started again, doubling (to 30 s) while it keeps dying early


def share_topic(experiment: str) -> str:
    """The shared subscription the workers of ``experiment`` hold."""
    return f"$share/qfl-{experiment}-ingest/{Topics(experiment).devices('update')}"


@dataclass
class Checked:
    """An update a worker received and checked, queued for the service's loop."""

    worker: int
    token: int
    topic: str
    payload: bytes
    retain: bool
    verdict: Verdict | None  # None for an empty payload (a retained message being deleted)
    source: Connection  # the pipe of the worker process that holds the unacknowledged message


class IngestWorkers:
    """``count`` worker processes on the shared subscription, restarted under their own ids when they die."""

    def __init__(self, settings: BrokerSettings, experiment: str, keys: Mapping[str, bytes], *, count: int,
                 client_id: str, deliver: Callable[[Checked], None]):
        if count < 1:
            raise ValueError(f"ingest workers must be at least 1, got {count}")
        self.settings, self.experiment, self.keys = settings, experiment, dict(keys)
        self.count, self.client_id, self.deliver = count, client_id, deliver
        self.received = [0] * count
        self.restarts = 0
        self._context = multiprocessing.get_context("spawn")
        self._processes: list[Any] = [None] * count
        self._pipes: list[Connection | None] = [None] * count
        self._stopping = threading.Event()
        self._ready = [threading.Event() for _ in range(count)]
        self._failures = [0] * count  # restarts in a row without reaching the broker

    def start(self) -> "IngestWorkers":
        """Start every worker (each connects in the background)."""
        for index in range(self.count):
            self._launch(index)
        return self

    def wait_ready(self, timeout: float) -> bool:
        """Block until every worker has connected and subscribed once (False after ``timeout`` seconds).

        Until then an update would find no member of the shared group, and the
        broker would drop it: the service opens no round before this.
        """
        deadline = time.monotonic() + timeout
        return all(ready.wait(max(0.0, deadline - time.monotonic())) for ready in self._ready)

    def pids(self) -> list[int | None]:
        """The current worker processes' ids."""
        return [p.pid if p is not None else None for p in self._processes]

    def ack(self, checked: Checked) -> None:
        """Let the worker that received ``checked`` PUBACK it (call after the store commit)."""
        # If that worker died, its successor gets the update again from the broker, and the store knows it.
        with contextlib.suppress(OSError):
            checked.source.send(checked.token)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the workers; what they hold unacknowledged stays in their sessions for the next start."""
        self._stopping.set()
        for pipe in self._pipes:
            if pipe is not None:
                with contextlib.suppress(OSError):  # already gone
                    pipe.send(None)
        for process in self._processes:
            if process is not None:
                process.join(timeout)
                if process.is_alive():
                    process.kill()
                    process.join(timeout)

    def _launch(self, index: int) -> None:
        ours, theirs = self._context.Pipe()
        process = self._context.Process(target=worker_main, name=f"qfl-ingest-{index}", daemon=True,
                                        args=(self.settings, self.experiment, self.keys,
                                              f"{self.client_id}-ingest-{index}", theirs))
        process.start()
        theirs.close()
        self._processes[index], self._pipes[index] = process, ours
        threading.Thread(target=self._read, args=(index, ours, process), name=f"ingest-{index}-reader",
                         daemon=True).start()

    def _read(self, index: int, pipe: Connection, process: Any) -> None:
        while True:
            try:
                token, topic, payload, retain, verdict = pipe.recv()
            except (EOFError, OSError):
                break
            if token is None:  # connected, subscription sent
                self._ready[index].set()
                self._failures[index] = 0
                continue
            self.received[index] += 1
            self.deliver(Checked(index, token, topic, payload, retain, verdict, pipe))
        process.join(5.0)
        pipe.close()
        if self._stopping.is_set():
            return
        log.warning("ingest worker %d ended (exit code %s); restarting it under its own client id, so the broker "
                    "hands it back what it had not acknowledged", index, process.exitcode)
        self.restarts += 1
        time.sleep(min(30.0, RESTART_DELAY * 2 ** self._failures[index]))
        self._failures[index] = min(self._failures[index] + 1, 5)
        if not self._stopping.is_set():
            self._launch(index)


def worker_main(settings: BrokerSettings, experiment: str, keys: Mapping[str, bytes], client_id: str,
                pipe: Connection) -> None:
    """One worker process: check every update of its share and PUBACK it when the service says so."""
    link = MqttLink(settings, client_id, manual_ack=True, subscriptions=[(share_topic(experiment), 1)])
    pending: dict[int, Message] = {}
    lock = threading.Lock()
    stop = threading.Event()

    def take_acks() -> None:
        while True:
            try:
                token = pipe.recv()
            except (EOFError, OSError):
                break  # the service is gone
            if token is None:
                break
            with lock:
                message = pending.pop(token, None)
            if message is not None:
                link.ack(message)
        stop.set()
        link.wake()

    threading.Thread(target=take_acks, name="acks", daemon=True).start()
    link.start()
    tokens = itertools.count()
    while not stop.is_set():
        event = link.next_event()
        if isinstance(event, Connected):
            pipe.send((None, "", b"", False, None))
        if not isinstance(event, Message):
            continue
        verdict = check_signed_update(event.payload, key=keys.get) if event.payload else None
        token = next(tokens)
        with lock:
            pending[token] = event
        try:
            pipe.send((token, event.topic, bytes(event.payload), event.retain, verdict))
        except OSError:  # the service is gone
            break
    link.stop()
