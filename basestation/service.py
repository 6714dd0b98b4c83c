"""The basestation service: the round loop over MQTT, around a store, a strategy and a precision policy.

    cfg = BasestationConfig.load("basestation.toml")
    station = Basestation(cfg)
    status = station.run()          # until ``cfg.rounds`` rounds are aggregated, or request_stop()

One loop in one thread (paho's network thread only queues events; with
``ingest_workers`` > 0, worker processes check and decode the updates and
queue them too, and PUBACK each only when this loop says it is stored:
``basestation.ingest_workers``):

1. Create the experiment in the store, or resume it: the open round's plan,
   its accepted updates (reloaded from their stored payloads and
   accumulated again, so none is counted twice) and the policy's state.
2. Wait until ``min_devices`` devices said hello and are online, then for
   each round: ask the precision policy for (n, m), select devices, store the
   decision and the plan, publish the global model and the plan (retained).
3. Drain received messages in batches: one store transaction per batch
   (``basestation.ingest``), then the acks and PUBACKs of that batch, so an
   update is acknowledged only once it is durable.
4. Close the round when every selected device answered, or at the deadline
   with a quorum (else extend, then abandon; ``basestation.rounds``);
   aggregate with the strategy, evaluate on the held-out set, store the new
   model, evaluation and round in one transaction.
5. After each aggregation, wait (briefly) for the energy reports of the
   devices it aggregated, so the next decision sees them. After ``rounds``
   aggregated rounds publish a ``finished`` plan, write the final status and
   return 0.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from basestation.bounds import UpdateBounds
from basestation.config import BasestationConfig
from firmware_tools.credentials import Credentials
from basestation.ingest import Ingest, Outcome
from basestation.ingest_workers import Checked, IngestWorkers
from basestation.screening import Entry, aggregate_screened, try_result
from basestation.rounds import (RoundProgress, apply_update, evaluate_model, initial_model, quantize_model,
                                quorum_count)
from basestation.store import Store, StoreError
from basestation.strategies import Accumulator, Selection, get_strategy, sample_devices
from edge.mqtt import Connected, Message, MqttError, MqttLink, Refused, Topics
from edge.runtime.messages import RoundPlan
from edge.wire import decode_message, dequantize, encode_model, model_hash, quantize_update

log = logging.getLogger("qfl.basestation")
BATCH = 512
WORKERS_READY_SECONDS = 60.0  # spawning a worker imports numpy: seconds on a Pi


class ServiceError(RuntimeError):
    """The experiment cannot be run as configured (mismatched credentials, changed model, ...)."""


@dataclasses.dataclass
class CurrentRound:
    """The open round: its plan, who answered by when, the running aggregate, and the model message."""

    plan: RoundPlan
    progress: RoundProgress
    accumulator: Accumulator
    model_message: bytes
    selection: Selection | None = None

    def weight(self, device: str, samples: float) -> float:
        """The accumulator weight of ``device``'s update (the sampling's unbiased weight, or its samples)."""
        return float(samples) if self.selection is None else self.selection.weight(device, samples)


class Basestation:
    """The round loop of one experiment (see the module docstring)."""

    def __init__(self, config: BasestationConfig, *, rounds: int | None = None):
        self.config = config
        self.target_rounds = config.rounds if rounds is None else rounds
        self.topics = Topics(config.experiment)
        self.credentials = Credentials.load(config.credentials)
        if self.credentials.experiment != config.experiment:
            raise ServiceError(f"credentials {config.credentials} are for experiment "
                               f"{self.credentials.experiment!r}, the config runs {config.experiment!r}")
        if not self.credentials.devices:
            raise ServiceError(f"credentials {config.credentials} list no devices")
        settings = config.broker
        if settings.username is None:
            settings = settings.with_credentials(self.credentials.basestation_username,
                                                 self.credentials.basestation_password)
        self.strategy = get_strategy(config.training.strategy)
        self.store = Store(config.store, synchronous=config.synchronous)
        self.ingest = Ingest(self.store, config.experiment, self.credentials.keys(), bounds=config.bounds)
        kinds = ("hello", "status", "energy") if config.ingest_workers else ("hello", "status", "update", "energy")
        self.link = MqttLink(settings, config.client_id, manual_ack=True,
                             subscriptions=[(self.topics.devices(kind), 1) for kind in kinds])
        self.workers = IngestWorkers(settings, config.experiment, self.credentials.keys(),
                                     count=config.ingest_workers, client_id=config.client_id,
                                     deliver=self.link.post) if config.ingest_workers else None
        self._stop = threading.Event()
        self.current: CurrentRound | None = None
        self.plan: RoundPlan | None = None  # the plan last published (the open round's, or the final one)
        self.global_weights: dict[str, np.ndarray] = {}
        self.global_hash = ""
        self.sync = os.urandom(4).hex()
        self.finished = False
        self.x_test: np.ndarray | None = None
        self.y_test: np.ndarray | None = None
        self.policy: Any = None

    def __repr__(self) -> str:
        where = f"round {self.current.plan.round}" if self.current else "between rounds"
        return f"<Basestation {self.config.experiment} {where} store={str(self.config.store)!r}>"

    def request_stop(self) -> None:
        """Ask the loop to stop after the current batch (safe from a signal handler)."""
        self._stop.set()

    # ---- startup ----
    def _prepare(self) -> None:
        from basestation.energy.policies import build_policy
        from edge.data import load_dataset

        cfg, exp = self.config, self.config.experiment
        record = self.store.experiment(exp)
        if record is None:
            weights = initial_model(cfg.model, cfg.seed)
            digest = model_hash(weights).hex()
            with self.store.transaction():
                self.store.create_experiment(exp, cfg.to_json())
                self.store.save_model(exp, 1, digest, weights)
            log.info("created experiment %s in %s", exp, cfg.store)
        else:
            stored = {k: record.config.get(k) for k in cfg.identity()}
            if stored != cfg.identity():
                raise ServiceError(f"experiment {exp!r} in {cfg.store} was created with {stored}; the config now "
                                   f"says {cfg.identity()}: use a new experiment id or the original settings")
            self.store.set_experiment_status(exp, "running")
            log.info("resuming experiment %s from %s", exp, cfg.store)
        dataset = load_dataset(cfg.dataset, seed=cfg.dataset_seed)
        self.x_test, self.y_test = dataset.x_test, dataset.y_test
        devices = sorted(self.credentials.devices)
        per_round = cfg.round.devices_per_round or len(devices)
        if per_round > len(devices):
            raise ServiceError(f"devices_per_round is {per_round} but the credentials list {len(devices)} devices")
        options = dict(cfg.precision.options)
        if cfg.precision.policy == "measured" and options.get("history") is not None:
            options["history"] = self._history(options["history"])
        self.policy = build_policy(cfg.precision.policy, devices=devices, local_iters=cfg.training.iterations,
                                   devices_per_round=per_round, model=cfg.model, epsilon=cfg.precision.epsilon,
                                   n=cfg.precision.n, m=cfg.precision.m, **options)
        self.policy.resume(self._last_decision())
        self._restore_round()

    def _history(self, history: Any) -> list:
        """The learning curves ``[precision] history`` names (see ``basestation.energy.store_history``)."""
        from basestation.energy.store_history import resolve_history

        try:
            curves, skipped = resolve_history(history, own_store=self.store, like=self.config.to_json(),
                                              experiment=self.config.experiment)
        except ValueError as exc:
            raise ServiceError(str(exc)) from None
        for experiment, why in sorted(skipped.items()):
            log.info("history: experiment %s gives no learning curve: %s", experiment, why)
        log.info("history: %d learning curve(s) from %s", len(curves), history)
        return curves

    def _last_decision(self) -> Any:
        from basestation.energy.policies import Decision

        decisions = self.store.decisions(self.config.experiment)
        if not decisions:
            return None
        d = decisions[-1]
        detail = d.detail or {}
        return Decision(round=d.round, policy=d.policy, n=d.n, m=d.m, local_iters=detail.get("local_iters", 1),
                        devices_per_round=detail.get("devices_per_round", 1), reason=detail.get("reason", ""),
                        inputs=d.inputs, m_per_device=detail.get("m_per_device"),
                        explore=bool(detail.get("explore", False)), predicted=detail.get("predicted"),
                        state=detail.get("state") or {})

    def _restore_round(self) -> None:
        """Reload the open round (plan, answered devices, accumulated updates) from the store."""
        exp = self.config.experiment
        current = self.store.current_round(exp)
        if current is None:
            return
        stored = self.store.model(exp, current.round)
        plan_doc = self.store.plan(exp, current.round)
        if stored is None or plan_doc is None:
            raise StoreError(f"round {current.round} of {exp!r} is open but its model or plan is missing")
        self.global_hash, self.global_weights = stored
        plan = RoundPlan.from_json(json.dumps(plan_doc).encode())
        progress = RoundProgress(current.round, current.selected, current.deadline, current.quorum,
                                 current.extensions)
        selection = Selection.from_json(plan_doc["sampling"]) if plan_doc.get("sampling") else None
        accumulator = self._new_accumulator(selection)
        restored = CurrentRound(plan, progress, accumulator, self._encode_model(current.round), selection)
        self.ingest.open_round(current.round, bytes.fromhex(self.global_hash), current.selected, self.global_weights,
                               bounds=self._bounds(plan))
        for update, payload in self.store.update_payloads(exp, current.round):
            delta = dequantize(decode_message(payload).tensors)
            problem = self.ingest.screen(update.device, update.samples, delta)
            if problem is not None:  # stored by a basestation that did not check this bound
                self._drop(current.round, Entry(update.nonce, update.device, delta, update.samples),
                           f"dropped on restart: {problem}")
                continue
            accumulator.add(delta, restored.weight(update.device, update.samples))
            progress.answered.add(update.device)
        self.current = restored
        self.plan = plan
        log.info("round %d is open with %d of %d updates already stored", current.round,
                 len(progress.answered), len(current.selected))

    # ---- main loop ----
    def run(self) -> int:
        """Run the experiment; returns 0 when finished or stopped cleanly."""
        try:
            self._prepare()
            self.link.start()
            if self.workers is not None and not self.workers.start().wait_ready(WORKERS_READY_SECONDS):
                raise ServiceError(f"the {self.workers.count} ingest workers did not all connect to "
                                   f"{self.config.broker.url} within {WORKERS_READY_SECONDS:.0f} s")
            while not self._stop.is_set() and not self.finished:
                events = self._next_events()
                if events:
                    self._process(events)
                for _ in range(3):  # e.g. aggregate, then open the next round at once
                    if not self._tick(time.time()):
                        break
        finally:
            if self.workers is not None:
                self.workers.stop()
            self.link.stop()
            if not self.finished:
                try:
                    self._write_status("stopped")
                    self.store.set_experiment_status(self.config.experiment, "stopped")
                except Exception as exc:  # never hide why we are stopping (the error itself propagates)
                    log.error("could not record the stop in the store: %s: %s", type(exc).__name__, exc)
            self.store.close()
        return 0

    def _next_events(self) -> list[Any]:
        timeout = 0.25
        if self.current is not None:
            timeout = min(timeout, max(0.0, self.current.progress.deadline - time.time()) + 0.001)
        first = self.link.next_event(timeout)
        if first is None:
            return []
        events = [first]
        while len(events) < BATCH:
            more = self.link.next_event(0)
            if more is None:
                break
            events.append(more)
        return events

    def _process(self, events: list[Any]) -> None:
        messages = [e for e in events if isinstance(e, (Message, Checked))]
        for event in events:
            if isinstance(event, Refused) and event.permanent:
                raise MqttError(f"broker {self.config.broker.url} refused the basestation: {event.reason}; check "
                                "the [broker] credentials")
        outcomes = []
        if messages:
            now = time.time()
            with self.store.transaction():
                outcomes = [self._handle(m, now) for m in messages]
            # Durable now: acknowledge, then let the broker forget them.
            for outcome in outcomes:
                if outcome.ack is not None:
                    self.link.publish(outcome.ack[0], outcome.ack[1], qos=1)
                if outcome.clear is not None:  # delete a device's retained update/report from the broker
                    self.link.publish(outcome.clear, b"", qos=1, retain=True)
                if outcome.delta is not None and self.current is not None:
                    self.current.accumulator.add(outcome.delta,
                                                 self.current.weight(outcome.device, outcome.samples))  # type: ignore[arg-type]
                    self.current.progress.answered.add(outcome.device)  # type: ignore[arg-type]
            for message in messages:
                if isinstance(message, Checked):
                    self.workers.ack(message)  # type: ignore[union-attr]
                else:
                    self.link.ack(message)
        connects = [e for e in events if isinstance(e, Connected)]
        if connects:
            if not all(e.session_present for e in connects):
                # The broker lost our session (and with it what devices sent meanwhile): a new sync
                # token in the plan makes every device re-send what we have not acknowledged.
                self.sync = os.urandom(4).hex()
                if self.plan is not None:
                    self.plan = dataclasses.replace(self.plan, sync=self.sync)
                    if self.current is not None:
                        self.current.plan = self.plan
                        self.store.add_plan(self.config.experiment, self.plan.round, self._plan_doc(self.current))
            self._republish()

    def _handle(self, message: Message | Checked, now: float) -> Outcome:
        """One message inside the batch's transaction; a bug it triggers costs that message only."""
        checked = message.verdict if isinstance(message, Checked) else None
        try:
            with self.store.savepoint():
                return self.ingest.handle(message.topic, message.payload, now, retained=message.retain,
                                          checked=checked)
        except (sqlite3.Error, OSError):
            raise  # the store itself failing is not the message's fault: stop before acknowledging anything
        except Exception as exc:
            log.exception("internal error while handling a message on %s", message.topic)
            self.store.add_rejection(self.config.experiment, "other", "internal_error",
                                     detail=f"{message.topic}: {type(exc).__name__}: {exc}"[:500], now=now)
            return Outcome("other", None, reason="internal_error")

    def _republish(self) -> None:
        """After (re)connecting: the broker may have lost the retained plan and model; publish them again."""
        if self.finished or self.plan is None:
            return
        if self.current is not None:
            self.link.publish(self.topics.model(self.current.plan.round), self.current.model_message, qos=1,
                              retain=True)
        self.link.publish(self.topics.round, self.plan.to_json(), qos=1, retain=True)

    # ---- round state machine ----
    def _tick(self, now: float) -> bool:
        """Advance the round state machine; True if the state changed (so another tick may do more)."""
        if self.finished:
            return False
        current = self.current
        if current is not None:
            verdict = current.progress.verdict(now, self.config.round.extensions)
            if verdict == "aggregate":
                self._aggregate(current)
            elif verdict == "extend":
                self._extend(current, now)
            elif verdict == "abandon":
                self._abandon(current)
            return verdict != "wait"
        rounds = self.store.rounds(self.config.experiment)
        if rounds and self._awaiting_reports(rounds[-1], now):
            return False  # the policy (and the end) should see the last round's energy reports
        done = sum(r.status == "aggregated" for r in rounds)
        stop_at = self.config.round.stop_at_accuracy
        reached = stop_at > 0 and any(r.status == "aggregated" and r.accuracy is not None and r.accuracy >= stop_at
                                      for r in rounds)
        if (self.target_rounds and done >= self.target_rounds) or reached:
            self._finish(now)
            return False
        eligible = self.ingest.eligible()
        needed = self.config.round.min_devices if not rounds else self.config.round.min_online
        if len(eligible) >= needed:
            self._open_round(eligible, now)
            return True
        return False

    def _awaiting_reports(self, last: Any, now: float) -> bool:
        """True while some device whose update ``last`` aggregated has not sent its energy report yet,
        for at most ``report_wait_seconds`` after the round closed."""
        if last.status != "aggregated" or last.closed_at is None:
            return False
        if now - last.closed_at >= self.config.round.report_wait_seconds:
            return False
        exp = self.config.experiment
        senders = {u.device for u in self.store.updates(exp, last.round)}
        reported = {r["device"] for r in self.store.energy_reports(exp, round_=last.round)}
        return not senders <= reported

    def _energy_inputs(self) -> tuple[list[Any], list[Any]]:
        """EnergyRecords and RoundStats for the policy, from every stored energy report."""
        from basestation.energy.records import EnergyRecord, RoundStats

        records, stats = [], []
        for report in self.store.energy_reports(self.config.experiment):
            train, uplink, meter = report.get("train") or {}, report.get("uplink") or {}, report.get("meter")
            try:
                if isinstance(meter, dict):
                    phases = meter.get("phases") or {}
                    train_j = (phases.get("train") or {}).get("joules_above_idle")
                    uplink_j = (phases.get("uplink") or {}).get("joules_above_idle")
                    if train_j is not None and uplink_j is not None:
                        records.append(EnergyRecord(
                            device=report["device"], round=report["round"], n=report["n"], m=report["m"],
                            local_iters=report["iterations"], batch_size=report["batch_size"], train_j=train_j,
                            uplink_j=uplink_j, uplink_bits=int(uplink.get("bytes", 0)) * 8))
                stats.append(RoundStats(device=report["device"], round=report["round"], loss=train["loss"],
                                        grad_sq_norm=train["grad_sq_norm"], grad_variance=train["grad_variance"],
                                        samples=report["samples"], local_iters=report["iterations"], n=report["n"],
                                        lr=report.get("lr")))
            except (KeyError, TypeError, ValueError) as exc:
                log.debug("energy report of %s round %s not usable by the policy: %s", report.get("device"),
                          report.get("round"), exc)
        return records, stats

    def _open_round(self, eligible: list[str], now: float) -> None:
        cfg, exp = self.config, self.config.experiment
        previous = self.store.rounds(exp)
        number = previous[-1].round + 1 if previous else 1
        stored = self.store.model(exp, number)
        if stored is None:
            raise StoreError(f"no global model stored for round {number} of {exp!r}")
        self.global_hash, self.global_weights = stored
        records, stats = self._energy_inputs()
        decision = self.policy.decide(number, records, stats)
        selection = self._sample(eligible, decision.devices_per_round, number, stats)
        selected = list(selection.selected)
        quorum = quorum_count(len(selected), cfg.round.quorum)
        plan = RoundPlan(
            experiment=exp, round=number, selected=tuple(selected), n=decision.n, m=decision.m,
            iterations=decision.local_iters, lr=cfg.training.lr, batch_size=cfg.training.batch_size,
            deadline=now + cfg.round.deadline_seconds, quorum=quorum, model_hash=self.global_hash, model=cfg.model,
            uplink_scheme=cfg.training.uplink_scheme, momentum=cfg.training.momentum, mode=cfg.training.mode,
            seed=cfg.seed, issued_at=now, m_per_device=decision.m_per_device, sync=self.sync)
        with self.store.transaction():
            self.store.add_decision(exp, number, policy=decision.policy, n=decision.n, m=decision.m,
                                    inputs=decision.inputs, detail=decision.detail(), now=now)
            if getattr(self.policy, "last_calibration", None) is not None:
                self.store.add_calibration(exp, number, self.policy.last_calibration.to_dict(), now=now)
            self.store.open_round(exp, number, selected=selected, n=decision.n, m=decision.m, deadline=plan.deadline,
                                  quorum=quorum, model_hash=self.global_hash,
                                  plan={**json.loads(plan.to_json()), "sampling": selection.to_json()}, now=now)
        self.plan = plan
        self.current = CurrentRound(plan, RoundProgress(number, tuple(selected), plan.deadline, quorum),
                                    selection.accumulator(self.strategy), self._encode_model(number), selection)
        self.ingest.open_round(number, bytes.fromhex(self.global_hash), selected, self.global_weights,
                               bounds=self._bounds(plan))
        self._republish()
        if number > 1:  # the previous round's model is no longer needed by anyone
            self.link.publish(self.topics.model(number - 1), b"", qos=1, retain=True)
        log.info("round %d: %d devices selected (quorum %d), n=%d m=%d I=%d (%s)", number, len(selected), quorum,
                 decision.n, decision.m, decision.local_iters, decision.reason)

    @staticmethod
    def _plan_doc(current: CurrentRound) -> dict[str, Any]:
        """The plan as stored: the published plan plus the round's sampling record (for resume)."""
        doc = json.loads(current.plan.to_json())
        if current.selection is not None:
            doc["sampling"] = current.selection.to_json()
        return doc

    def _sample(self, eligible: list[str], k: int, number: int, stats: list[Any]) -> Selection:
        """This round's devices by the configured sampling (basestation.strategies.sample_devices)."""
        sizes = {d.device: d.dataset_size for d in self.store.devices(self.config.experiment) if d.dataset_size}
        variances = {s.device: s.grad_variance for s in sorted(stats, key=lambda s: s.round)}  # newest wins
        return sample_devices(self.config.round.sampling, eligible, k, seed=self.config.seed, round_=number,
                              samples=sizes, variances=variances)

    def _encode_model(self, round_: int) -> bytes:
        tensors = quantize_update(self.global_weights, 32, None)
        return encode_model(tensors, experiment=self.config.experiment, round=round_,
                            key=self.credentials.model_signing_key)

    def _new_accumulator(self, selection: Selection | None) -> Accumulator:
        """An empty running aggregate for a round with ``selection`` (unbiased sums under importance sampling)."""
        return selection.accumulator(self.strategy) if selection else self.strategy.accumulator()

    def _bounds(self, plan: RoundPlan) -> UpdateBounds:
        return UpdateBounds.for_round(plan.n, self.config.bounds)

    def _drop(self, round_: int, entry: Entry, reason: str) -> None:
        """Take an accepted update out of the open round, with its reason among the rejections."""
        exp = self.config.experiment
        with self.store.transaction():
            self.store.drop_update(exp, entry.nonce)
            self.store.add_rejection(exp, "update", "out_of_bounds", device=entry.device, round_=round_,
                                     detail=reason[:500])
        log.warning("update of %s dropped from round %s: %s", entry.device, round_, reason)

    def _screened_result(self, current: CurrentRound) -> tuple[Any, ...] | None:
        """(delta, new weights, loss, accuracy) that can be committed, dropping updates that prevent it."""
        cfg, plan = self.config, current.plan
        base = quantize_model(cfg.model, self.global_weights, plan.n, plan.mode)

        def evaluate(delta: Any) -> tuple[dict[str, np.ndarray], float, float]:
            weights = apply_update(base, delta)
            loss, accuracy = evaluate_model(cfg.model, weights, plan.n, plan.mode, self.x_test, self.y_test)
            return weights, loss, accuracy

        bounds = self._bounds(plan)
        result, problem = try_result(current.accumulator.result, evaluate, bounds)
        if result is not None:
            return result
        entries = [Entry(u.nonce, u.device, dequantize(decode_message(p).tensors), u.samples,
                         current.weight(u.device, u.samples))
                   for u, p in self.store.update_payloads(cfg.experiment, plan.round)]
        screened = aggregate_screened(lambda: self._new_accumulator(current.selection), entries, evaluate, bounds, first_problem=problem)
        for entry, reason in screened.dropped:
            self._drop(plan.round, entry, reason)
            current.progress.answered.discard(entry.device)
        if screened.delta is None:
            return None
        current.accumulator = self._new_accumulator(current.selection)
        for entry in screened.kept:
            current.accumulator.add(entry.delta, entry.accumulator_weight)
        return screened.delta, screened.weights, screened.loss, screened.accuracy

    def _aggregate(self, current: CurrentRound) -> None:
        cfg, exp = self.config, self.config.experiment
        plan, progress = current.plan, current.progress
        result = self._screened_result(current)
        if result is None:
            log.warning("round %d: no acceptable update remains", plan.round)
            self._abandon(current)
            return
        delta, new_weights, loss, accuracy = result
        new_hash = model_hash(new_weights).hex()
        with self.store.transaction():
            self.store.close_round(exp, plan.round, "aggregated", result_hash=new_hash,
                                   drop_payloads=not cfg.keep_payloads)
            self.store.add_evaluation(exp, plan.round, loss=loss, accuracy=accuracy, samples=len(self.y_test),
                                      model_hash=new_hash)
            self.store.save_model(exp, plan.round + 1, new_hash, new_weights)
        log.info("round %d aggregated from %d update(s) (%s): accuracy %.4f, loss %.4f", plan.round,
                 current.accumulator.count, ", ".join(sorted(progress.answered)), accuracy, loss)
        self._end_round()

    def _extend(self, current: CurrentRound, now: float) -> None:
        progress = current.progress
        deadline = max(now, progress.deadline) + self.config.round.extension
        current.plan = self.plan = dataclasses.replace(current.plan, deadline=deadline, issued_at=now)
        with self.store.transaction():
            self.store.extend_round(self.config.experiment, progress.round, deadline, self._plan_doc(current),
                                    now=now)
        progress.deadline = deadline
        progress.extensions += 1
        self.link.publish(self.topics.round, current.plan.to_json(), qos=1, retain=True)
        log.info("round %d: %d of %d answered, quorum %d not reached; deadline extended (%d of %d)", progress.round,
                 len(progress.answered), len(progress.selected), progress.quorum, progress.extensions,
                 self.config.round.extensions)

    def _abandon(self, current: CurrentRound) -> None:
        exp, progress = self.config.experiment, current.progress
        with self.store.transaction():
            self.store.close_round(exp, progress.round, "abandoned", drop_payloads=not self.config.keep_payloads)
            self.store.save_model(exp, progress.round + 1, self.global_hash, self.global_weights)
        log.warning("round %d abandoned: %d of %d answered after %d extension(s); the model is unchanged",
                    progress.round, len(progress.answered), len(progress.selected), progress.extensions)
        self._end_round()

    def _end_round(self) -> None:
        self.store.checkpoint()
        self.current = None
        self.ingest.close_round()

    # ---- the end ----
    def _finish(self, now: float) -> None:
        exp = self.config.experiment
        rounds = self.store.rounds(exp)
        last = rounds[-1] if rounds else None
        if self.plan is not None:
            final = dataclasses.replace(self.plan, selected=(), status="finished", issued_at=now, m_per_device=None)
        else:
            final = RoundPlan(experiment=exp, round=last.round if last else 0, selected=(), n=self.config.precision.n,
                              m=self.config.precision.m, iterations=1, lr=self.config.training.lr,
                              batch_size=self.config.training.batch_size, deadline=now, quorum=0,
                              model_hash=self.global_hash, model=self.config.model, issued_at=now,
                              status="finished")
        self.plan = final
        # Wait for the broker to take it (and the acks queued before it) before this process goes away.
        if not self.link.publish_confirmed(self.topics.round, final.to_json(), qos=1, retain=True, timeout=30.0):
            log.warning("the broker did not confirm the final plan within 30 s; devices may keep waiting")
        status = self._write_status("finished")
        self.store.set_experiment_status(exp, "finished", status)
        self.finished = True
        log.info("experiment %s finished after %d round(s)", exp, status["rounds_aggregated"])

    def status(self, state: str) -> dict[str, Any]:
        """The status document: progress, last evaluation, counts of updates, reports and rejections."""
        exp = self.config.experiment
        rounds = self.store.rounds(exp)
        aggregated = [r for r in rounds if r.status == "aggregated"]
        last = aggregated[-1] if aggregated else None
        return {
            "experiment": exp, "state": state, "written_at": time.time(),
            "rounds_aggregated": len(aggregated), "rounds_abandoned": sum(r.status == "abandoned" for r in rounds),
            "last_round": rounds[-1].round if rounds else 0,
            "accuracy": last.accuracy if last else None, "loss": last.loss if last else None,
            "model_hash": last.result_hash if last else None,
            "updates": len(self.store.updates(exp)), "energy_reports": len(self.store.energy_reports(exp)),
            "devices": len(self.store.devices(exp)), "rejections": self.store.rejection_counts(exp),
        }

    def _write_status(self, state: str) -> dict[str, Any]:
        status = self.status(state)
        path = self.config.status_file
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(f"{path}.tmp")
            tmp.write_text(json.dumps(status, indent=2, sort_keys=True) + "\n")
            tmp.replace(path)
        return status
