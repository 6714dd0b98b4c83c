"""The ``measured`` policy: least measured energy to the target accuracy, from learning curves and the meters.

For every candidate setting s = (n, m, I) that the history holds curves of,
at least one of which reached the target (of a setting that never did, the
history says only that it needs more rounds than it ran), the policy
predicts the energy to target as

    E_round(s) x R(s)

- R(s): rounds to target from the empirical model fitted to the history's
  curves (``basestation.energy.empirical``), never from the paper's bound;
- E_round(s): the history's measured energy per round, smoothed across
  settings by one least-squares fit linear in the work (``_smoothed``), and
  calibrated to this run: the above-idle train and uplink parts are scaled by the ratio of
  what this run's meters measured to what the history predicted for the
  settings this run has used (one factor per phase); the idle part is the
  history's.

Exploration is a one-step value-of-information decision: measuring a
candidate for one round resolves the uncertainty of its calibrated energy
per round (its spread across the history's seeds), not of its rounds. The
expected saving is E[max(0, T_incumbent - T_s)] with T_s ~ Normal(predicted,
spread); the cost is the round's energy less what the progress it makes
(1 / R(s) of the way) is worth at the incumbent's price, T_incumbent / R(s). It
explores a candidate only when the saving exceeds the cost, each candidate
at most once, at most ``max_explore`` times in all, and only before it has
first held a setting (then it is settled: no exploration, no flip-flop); otherwise it holds
the incumbent, and moves only when the best candidate is predicted to save
more than ``hysteresis``. Every number of that reasoning is stored in the
decision's inputs. Without a history it holds the configured setting.

    >>> policy = EnergyToTargetPolicy(devices=["pi-0"], n=8, m=8, local_iters=5, devices_per_round=1)
    >>> policy.decide(1, []).reason
    'hold the configured setting: no learning-curve history to predict rounds from'
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from basestation.energy.empirical import Curve, CurveError, RoundsFit, fit_rounds, load_curves
from basestation.energy.records import EnergyRecord, RoundStats

Setting3 = tuple[int, int, int]


class EnergyToTargetPolicy:
    """See the module docstring; ``history`` is a curves JSON path or a list of ``Curve``."""

    name = "measured"

    def __init__(self, *, devices: Sequence[str], n: int, m: int, local_iters: int, devices_per_round: int,
                 history: str | Path | Sequence[Curve] | None = None, target_accuracy: float = 0.9,
                 hysteresis: float = 0.05, max_explore: int = 3, model: str = "mlp", **_: Any) -> None:
        if not 0 <= hysteresis < 1:
            raise ValueError(f"hysteresis must be a fraction in [0, 1), got {hysteresis!r}")
        if not 0 < target_accuracy <= 1:
            raise ValueError(f"target_accuracy must be in (0, 1], got {target_accuracy!r}")
        self.devices = list(devices)
        self.start: Setting3 = (int(n), int(m), int(local_iters))
        self.devices_per_round = devices_per_round
        self.target, self.hysteresis, self.max_explore = float(target_accuracy), float(hysteresis), int(max_explore)
        try:
            curves = load_curves(history) if isinstance(history, (str, Path)) else list(history or [])
        except CurveError as exc:
            raise ValueError(str(exc)) from None
        self.curves = curves
        self.fit: RoundsFit | None = None
        if curves:
            try:
                self.fit = fit_rounds(curves, self.target)
            except CurveError:
                self.fit = None
        self._per_round = self._history_energy(curves)
        self._reached = {c.setting for c in curves if c.rounds_to(self.target) is not None}
        self.incumbent: Setting3 | None = None
        self.explored: list[Setting3] = []
        self.settled = False  # once it has held a setting without exploring, it never explores again
        self.model = model
        # The testbed energy model refitted to the meters, for the report's "after calibration" figures only:
        # the decision itself calibrates the history's per-round energies (``_calibration``).
        self.last_calibration = None

    def __repr__(self) -> str:
        return f"EnergyToTargetPolicy(curves={len(self.curves)}, incumbent={self.incumbent})"

    # -- state ----------------------------------------------------------------------------------------------
    def resume(self, previous: Any) -> None:
        """Restore incumbent and explored settings from the last stored decision."""
        state = getattr(previous, "state", None) or {}
        if state.get("incumbent"):
            self.incumbent = tuple(state["incumbent"])  # type: ignore[assignment]
        self.explored = [tuple(s) for s in state.get("explored", [])]  # type: ignore[misc]
        self.settled = bool(state.get("settled", False))

    def _state(self) -> dict[str, Any]:
        return {"incumbent": list(self.incumbent) if self.incumbent else None,
                "explored": [list(s) for s in self.explored], "settled": self.settled}

    # -- deciding -------------------------------------------------------------------------------------------
    def decide(self, round: int, records: Sequence[EnergyRecord], stats: Sequence[RoundStats] = ()) -> Any:
        """The setting of ``round``; see the module docstring."""
        self._refit(records)
        if self.fit is None or not self._per_round:
            why = ("no learning-curve history to predict rounds from" if not self.curves else
                   f"no history curve reached the target {self.target}")
            return self._decision(round, self.start, f"hold the configured setting: {why}",
                                  {"round": round, "records": len(records), "history_curves": len(self.curves)})
        factors = self._calibration(records)
        table = self._predictions(factors)
        inputs: dict[str, Any] = {"round": round, "records": len(records), "history_curves": len(self.curves),
                                  "rounds_model": self.fit.to_dict(),
                                  "calibration": factors, "hysteresis": self.hysteresis,
                                  "candidates": [{"n": s[0], "m": s[1], "I": s[2], **v} for s, v in
                                                 sorted(table.items(), key=lambda kv: kv[1]["energy_to_target_j"])]}
        # A setting none of whose history curves reached the target has only a lower bound on its rounds
        # (the censored runs' lengths), so it is neither adopted nor explored on that bound.
        feasible = {s: v for s, v in table.items() if math.isfinite(v["energy_to_target_j"]) and v["reached"]}
        if not feasible:
            return self._decision(round, self.incumbent or self.start,
                                  "hold: no candidate that reached the target in the history is predicted to reach it",
                                  inputs)
        best = min(feasible, key=lambda s: feasible[s]["energy_to_target_j"])
        if self.incumbent is None or self.incumbent not in feasible:
            self.incumbent = best
            reason = "adopt the predicted optimum"
        else:
            current = feasible[self.incumbent]["energy_to_target_j"]
            saving = 1.0 - feasible[best]["energy_to_target_j"] / current
            inputs["best_saving"] = saving
            if best != self.incumbent and saving > self.hysteresis:
                self.incumbent = best
                reason = f"switch: the predicted optimum saves {saving:.1%} (> {self.hysteresis:.0%})"
            else:
                reason = (f"hold: the best other candidate would save {saving:.1%} (a switch needs "
                          f"> {self.hysteresis:.0%})") if best != self.incumbent else "hold: still the optimum"
        target = self._exploration(feasible, records, inputs)
        if target is not None:
            self.explored.append(target)
            return self._decision(round, target, f"explore n={target[0]} m={target[1]} I={target[2]} for one "
                                  f"round: expected saving beats its cost ({reason})", inputs, explore=True)
        self.settled = True
        return self._decision(round, self.incumbent, reason, inputs)

    def _refit(self, records: Sequence[EnergyRecord]) -> None:
        from basestation.energy.calibration import calibrate
        from basestation.energy.testbed_model import PI4_DEFAULTS
        from models import counts, get_architecture

        records = [r for r in records if r.device in self.devices]
        if not records:
            return
        try:
            self.last_calibration = calibrate(records, macs_per_sample=counts(get_architecture(self.model)).macs,
                                              alpha_prior=PI4_DEFAULTS.alpha)
        except ValueError:
            self.last_calibration = None

    def _exploration(self, feasible: dict[Setting3, dict[str, float]], records: Sequence[EnergyRecord],
                     inputs: dict[str, Any]) -> Setting3 | None:
        """The candidate whose one-round measurement is worth more than it costs, if any."""
        measured = {(r.n, r.m, r.local_iters) for r in records}
        inc = feasible[self.incumbent]
        options = []
        for s, v in feasible.items():
            if s == self.incumbent or s in self.explored or s in measured:
                continue
            mu, sd = v["energy_to_target_j"], v["energy_to_target_j"] * v["energy_spread"]
            gain = _expected_improvement(inc["energy_to_target_j"], mu, sd)
            # A round at s moves 1/R(s) of the way to the target, worth T_inc / R(s) at the incumbent's price.
            cost = max(0.0, v["energy_per_round_j"] - inc["energy_to_target_j"] / v["predicted_rounds"])
            options.append({"n": s[0], "m": s[1], "I": s[2], "expected_saving_j": gain, "cost_j": cost})
        options.sort(key=lambda o: o["cost_j"] - o["expected_saving_j"])
        inputs["exploration"] = {"budget_left": self.max_explore - len(self.explored), "settled": self.settled,
                                 "options": options[:5]}
        if self.settled or len(self.explored) >= self.max_explore or not options:
            return None
        top = options[0]
        if top["expected_saving_j"] > top["cost_j"]:
            return top["n"], top["m"], top["I"]
        return None

    def _calibration(self, records: Sequence[EnergyRecord]) -> dict[str, Any]:
        """Measured / history above-idle energy per phase, over the settings this run has used."""
        totals = {"train": [0.0, 0.0], "uplink": [0.0, 0.0]}
        sums: dict[tuple[int, Setting3], list[float]] = {}
        for r in records:
            key = (r.round, (r.n, r.m, r.local_iters))
            acc = sums.setdefault(key, [0.0, 0.0])
            acc[0] += r.train_j
            acc[1] += r.uplink_j
        rounds_used = 0
        for (_, s), (train, uplink) in sums.items():
            hist = self._per_round.get(s)
            if hist is None:
                continue
            rounds_used += 1
            totals["train"][0] += train
            totals["train"][1] += hist["train_j"]
            totals["uplink"][0] += uplink
            totals["uplink"][1] += hist["uplink_j"]
        factor = {phase: (m / h if rounds_used and h > 0 and m > 0 else 1.0) for phase, (m, h) in totals.items()}
        return {"rounds_used": rounds_used, "train_factor": factor["train"], "uplink_factor": factor["uplink"]}

    def _predictions(self, factors: dict[str, Any]) -> dict[Setting3, dict[str, float]]:
        out = {}
        for s, h in self._per_round.items():
            per_round = h["idle_j"] + factors["train_factor"] * h["train_j"] + factors["uplink_factor"] * h["uplink_j"]
            rounds = self.fit.predict(*s)
            out[s] = {"energy_per_round_j": per_round, "predicted_rounds": rounds if math.isfinite(rounds) else None,
                      "energy_to_target_j": per_round * rounds if math.isfinite(rounds) else math.inf,
                      "energy_spread": h["spread"], "reached": s in self._reached}
        return out

    @staticmethod
    def _history_energy(curves: Sequence[Curve]) -> dict[Setting3, dict[str, float]]:
        """Per setting: mean energy per round (total, train, uplink above idle, the rest) and its seed spread."""
        groups: dict[Setting3, list[Curve]] = {}
        for c in curves:
            if c.energy_j:
                groups.setdefault(c.setting, []).append(c)
        out = {}
        for s, cs in groups.items():
            totals = [float(np.mean(c.energy_j)) for c in cs]
            train = float(np.mean([np.mean(c.train_j) if c.train_j else 0.0 for c in cs]))
            uplink = float(np.mean([np.mean(c.uplink_j) if c.uplink_j else 0.0 for c in cs]))
            total = float(np.mean(totals))
            spread = float(np.std(totals) / total) if len(totals) > 1 and total > 0 else 0.1
            out[s] = {"energy_j": total, "train_j": train, "uplink_j": uplink,
                      "idle_j": max(total - train - uplink, 0.0), "spread": spread, "curves": len(cs)}
        return _smoothed(out)

    def _decision(self, round: int, s: Setting3, reason: str, inputs: dict[str, Any], *, explore: bool = False):
        from basestation.energy.policies import Decision, _json_safe

        return Decision(round=round, policy=self.name, n=int(s[0]), m=int(s[1]), local_iters=int(s[2]),
                        devices_per_round=self.devices_per_round, reason=reason, inputs=_json_safe(inputs),
                        explore=explore, state=_json_safe(self._state()))


def _features(s: Setting3) -> list[float]:
    """What the energy of a round depends on: a constant, I, I at fixed point (n < 32) and per bit of n, and m."""
    n, m, i = s
    return [1.0, i, i * (n < 32), i * n / 32.0, m]


def _smoothed(per_setting: dict[Setting3, dict[str, float]]) -> dict[Setting3, dict[str, float]]:
    """Per-round energies from one least-squares fit across all settings instead of each setting's own mean.

    One setting's mean over a few seeds carries the whole noise of a shared
    machine (idle time stretched by other load); a fit linear in the work
    (I, I x fixed point, I x n, m) pools every setting's rounds, so the
    comparison between candidates is not decided by that noise. With fewer
    settings than features the means are kept.
    """
    settings = sorted(per_setting)
    x = np.array([_features(s) for s in settings]).reshape(len(settings), 5)
    if len(settings) <= x.shape[1]:
        return per_setting
    w = np.sqrt([per_setting[s]["curves"] for s in settings])
    out = {s: dict(v) for s, v in per_setting.items()}
    for part in ("train_j", "uplink_j", "idle_j"):
        y = np.array([per_setting[s][part] for s in settings])
        coef, *_ = np.linalg.lstsq(x * w[:, None], y * w, rcond=None)
        for s, value in zip(settings, x @ coef):
            out[s][part] = max(float(value), 0.0)
    totals = np.array([per_setting[s]["energy_j"] for s in settings])
    fitted = np.array([out[s]["train_j"] + out[s]["uplink_j"] + out[s]["idle_j"] for s in settings])
    spread = float(np.sqrt(np.mean(((totals - fitted) / np.maximum(fitted, 1e-12)) ** 2)))
    for s in settings:
        out[s]["energy_j"] = out[s]["train_j"] + out[s]["uplink_j"] + out[s]["idle_j"]
        out[s]["spread"] = spread
    return out


def _expected_improvement(incumbent: float, mean: float, sd: float) -> float:
    """E[max(0, incumbent - X)] for X ~ Normal(mean, sd)."""
    if sd <= 0:
        return max(0.0, incumbent - mean)
    z = (incumbent - mean) / sd
    pdf = math.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
    cdf = 0.5 * (1 + math.erf(z / math.sqrt(2)))
    return (incumbent - mean) * cdf + sd * pdf
