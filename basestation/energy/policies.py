"""Precision policies: what (n, m) the next round uses. Pure classes in the style of Flower strategies.

The basestation loop feeds a policy every energy record and training
statistic received so far and stores the ``Decision`` it returns (the chosen
precisions, the reason and every input, all JSON-serialisable). Policies never
touch the network or the store.

- ``FixedPolicy``: n and m (optionally per device) given by the experiment.
- ``ModelPolicy``: the analytic model's optimum (no measurements), e.g. of the
  ``kim2022`` or ``testbed`` preset.
- ``EnergyToTargetPolicy`` (``measured``, in ``target_policy``): least predicted energy to the target
  accuracy from learning-curve history and the meters (the repaired closed loop).
- ``MeasuredPolicy`` (``measured-fit``): after every round, refit the testbed energy model to the
  records (``calibration``), re-solve (n, m), move only when the predicted
  saving beats a hysteresis margin, and explore a neighbouring precision while
  the fit cannot tell the candidates apart.

    >>> policy = MeasuredPolicy(model="mlp", devices=["pi-0", "pi-1"], epsilon=0.1, local_iters=5, devices_per_round=2)
    >>> decision = policy.decide(0, records=[], stats=[])        # later rounds: everything received so far
    >>> store.add_decision(exp, 0, policy=decision.policy, n=decision.n, m=decision.m,
    ...                    inputs=decision.inputs, detail=decision.detail())          # doctest: +SKIP
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Protocol, Sequence

import numpy as np

from basestation.energy.calibration import Calibration, ComputeFit, UplinkFit, calibrate
from basestation.energy.convergence import estimate_constants
from basestation.energy.kim2022 import N_MAX, ConvergenceConstants
from basestation.energy.presets import TESTBED_CONVERGENCE, get_preset
from basestation.energy.problem import Problem, Setting
from basestation.energy.records import EnergyRecord, RoundStats
from basestation.energy.solver import Grid, evaluate_grid, joint_search, per_device_uplink, tied_line_search
from basestation.energy.testbed_model import PI4_DEFAULTS, DeviceEnergyParams, TestbedEnergy


@dataclass(frozen=True)
class Decision:
    """A policy's choice for one round.

    ``m_per_device`` overrides ``m`` for the devices it names. ``inputs`` is
    everything the policy based the choice on; ``state`` is the policy's state
    after deciding (``policy.resume(decision)`` restores it after a restart).
    """

    round: int
    policy: str
    n: int
    m: int
    local_iters: int
    devices_per_round: int
    reason: str
    inputs: dict[str, Any]
    m_per_device: dict[str, int] | None = None
    explore: bool = False
    predicted: dict[str, Any] | None = None
    state: dict[str, Any] = field(default_factory=dict)

    def m_for(self, device: str) -> int:
        """Uplink precision of ``device``."""
        if self.m_per_device and device in self.m_per_device:
            return self.m_per_device[device]
        return self.m

    def detail(self) -> dict[str, Any]:
        """Everything but (round, policy, n, m, inputs), for the store's ``detail`` column."""
        return {"reason": self.reason, "local_iters": self.local_iters, "devices_per_round": self.devices_per_round,
                "m_per_device": self.m_per_device, "explore": self.explore, "predicted": self.predicted,
                "state": self.state}

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict."""
        return _json_safe(asdict(self))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Decision":
        """Inverse of ``to_dict``."""
        return cls(**dict(data))


class PrecisionPolicy(Protocol):
    """What the basestation loop calls once per round."""

    name: str

    def decide(self, round: int, records: Sequence[EnergyRecord], stats: Sequence[RoundStats] = ()) -> Decision:
        """Choose the precisions of ``round`` from everything received so far."""

    def resume(self, previous: Decision | None) -> None:
        """Restore the state after a restart from the last stored decision."""


class FixedPolicy:
    """Always the given n and m (and per-device m, if given).

        >>> FixedPolicy(n=8, m=4).decide(0, []).m
        4
    """

    name = "fixed"

    def __init__(self, *, n: int, m: int, local_iters: int = 1, devices_per_round: int = 1,
                 m_per_device: Mapping[str, int] | None = None) -> None:
        _check_bits("n", n)
        _check_bits("m", m)
        for device, bits in (m_per_device or {}).items():
            _check_bits(f"m of device {device!r}", bits)
        _check_positive("local_iters", local_iters)
        _check_positive("devices_per_round", devices_per_round)
        self.n, self.m = n, m
        self.local_iters, self.devices_per_round = local_iters, devices_per_round
        self.m_per_device = dict(m_per_device) if m_per_device else None

    def __repr__(self) -> str:
        return f"FixedPolicy(n={self.n}, m={self.m})"

    def decide(self, round: int, records: Sequence[EnergyRecord], stats: Sequence[RoundStats] = ()) -> Decision:
        """The configured precisions, every round."""
        _check_round(round)
        return Decision(round=round, policy=self.name, n=self.n, m=self.m, local_iters=self.local_iters,
                        devices_per_round=self.devices_per_round, reason="fixed by the experiment",
                        inputs={"round": round, "n": self.n, "m": self.m, "m_per_device": self.m_per_device,
                                "records": len(records)},
                        m_per_device=self.m_per_device)

    def resume(self, previous: Decision | None) -> None:
        """Nothing to restore."""


class ModelPolicy:
    """The analytic optimum of ``problem``, solved once (it does not depend on measurements).

    ``mode``: ``"tied"`` (n = m, the ICC line search), ``"nm"`` (n and m free,
    I and K fixed) or ``"joint"`` (I, K, m and n). With ``per_device_m`` each
    device gets its own m (``solver.per_device_uplink``).
    """

    name = "model"

    def __init__(self, problem: Problem, *, local_iters: int = 1, devices_per_round: int = 1, mode: str = "nm",
                 per_device_m: bool = False) -> None:
        if mode not in ("tied", "nm", "joint"):
            raise ValueError(f"mode must be 'tied', 'nm' or 'joint', got {mode!r}")
        _check_positive("local_iters", local_iters)
        _check_positive("devices_per_round", devices_per_round)
        self.problem, self.mode, self.per_device_m = problem, mode, per_device_m
        self.local_iters, self.devices_per_round = local_iters, devices_per_round
        self._solution: Setting | None = None

    def __repr__(self) -> str:
        return f"ModelPolicy({self.problem!r}, mode={self.mode!r})"

    def solution(self) -> Setting:
        """The optimum (solved on first use)."""
        if self._solution is None:
            p, i, k = self.problem, self.local_iters, self.devices_per_round
            if self.mode == "tied":
                best = tied_line_search(p, local_iters=i, devices=k)
            elif self.mode == "nm":
                best = joint_search(p, local_iters=[i], devices=[k])
            else:
                best = joint_search(p)
            self._solution = per_device_uplink(p, best) if self.per_device_m else best
        return self._solution

    def decide(self, round: int, records: Sequence[EnergyRecord], stats: Sequence[RoundStats] = ()) -> Decision:
        """The model's optimum, every round."""
        _check_round(round)
        best = self.solution()
        return Decision(round=round, policy=self.name, n=best.n, m=best.m, local_iters=best.I,
                        devices_per_round=best.K,
                        reason=f"analytic optimum ({self.mode}) of the {self.problem.name or 'given'} model",
                        inputs={"round": round, "model": self.problem.name, "epsilon": self.problem.epsilon,
                                "mode": self.mode, "n_min": self.problem.n_min(), "records": len(records)},
                        m_per_device=dict(best.m_per_device) if best.m_per_device else None,
                        predicted=_json_safe(best.to_dict()))

    def resume(self, previous: Decision | None) -> None:
        """Nothing to restore (the solution is recomputed)."""


@dataclass(frozen=True)
class LoopTuning:
    """The tuning keywords of ``MeasuredPolicy``, checked in one place (see its docstring for how each is used).

    ``hysteresis``: smallest predicted saving worth a switch, and the
    tolerance of "near-optimal"; ``confidence``: share of draws in which a
    candidate must be near-optimal to be adopted; ``switch_confidence``: share
    of draws in which a new optimum must beat the settled choice; ``relapse``:
    below this share the settled choice is re-examined; ``samples``: parameter
    draws per decision; ``explore_step``: bits between a candidate and the
    neighbours explored; ``max_explore``: exploration rounds before adopting
    regardless; ``alpha_prior_sd``: standard deviation of the Gaussian prior
    on alpha, centred on the prior parameters' alpha; ``min_distinct``: training and uplink
    precisions the records must span; ``min_device_records``: records before
    a device's own fit replaces the fleet's.
    """

    hysteresis: float = 0.01
    confidence: float = 0.8
    switch_confidence: float = 0.95
    relapse: float = 0.5
    samples: int = 200
    explore_step: int = 1
    max_explore: int = 8
    alpha_prior_sd: float = 0.5
    min_distinct: int = 3
    min_device_records: int = 10

    def __post_init__(self) -> None:
        for label in ("hysteresis", "confidence", "switch_confidence", "relapse"):
            value = getattr(self, label)
            if not (isinstance(value, (int, float)) and 0 <= value <= 1):
                raise ValueError(f"{label} must be a fraction in [0, 1], got {value!r}")
        for label in ("samples", "explore_step", "min_distinct"):
            _check_positive(label, getattr(self, label))
        for label in ("max_explore", "min_device_records"):
            value = getattr(self, label)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{label} must be a non-negative integer, got {value!r}")
        if not (isinstance(self.alpha_prior_sd, (int, float)) and self.alpha_prior_sd > 0):
            raise ValueError(f"alpha_prior_sd must be a positive number, got {self.alpha_prior_sd!r}")


class MeasuredPolicy:
    """Closed loop over measured energy: refit, re-solve (n, m) at fixed I and K, hysteresis, exploration.

    Each round: calibrate the testbed energy model to all records so far (the
    ``prior`` fills parts the data cannot fit yet), solve (n, m) for the least
    total energy, and judge the fit's uncertainty by re-solving ``samples``
    times with parameters drawn from the fits' standard errors. A candidate
    is trusted when, in at least ``confidence`` of the draws, it is within
    ``hysteresis`` of the draw's optimum; until then the policy measures the
    candidate and then its least-observed neighbour (n +- step, m +- step).
    Once settled it moves only when the new optimum is predicted to save more
    than ``hysteresis`` and is cheaper than the settled choice in at least
    ``switch_confidence`` of the draws (the hysteresis: leaving needs strong
    evidence, staying needs none), and resumes exploring only if the settled
    choice is near-optimal in fewer than ``relapse`` of the draws. After
    ``max_explore`` exploration rounds the candidate is adopted regardless.
    """

    name = "measured-fit"

    def __init__(self, *, model: str = "mlp", devices: Sequence[str], epsilon: float, local_iters: int,
                 devices_per_round: int, batch_size: int = 32, messages: int = 1,
                 convergence: ConvergenceConstants | None = None, prior: DeviceEnergyParams = PI4_DEFAULTS,
                 hysteresis: float = 0.01, confidence: float = 0.8, switch_confidence: float = 0.95,
                 relapse: float = 0.5, samples: int = 200, explore_step: int = 1, max_explore: int = 8,
                 alpha_prior_sd: float = 0.5, min_distinct: int = 3, min_device_records: int = 10,
                 per_device_m: bool = False, refit_convergence: bool = False, seed: int = 0) -> None:
        from models import counts, get_architecture

        self.devices = list(devices)
        if not self.devices or len(set(self.devices)) != len(self.devices):
            raise ValueError(f"devices must be a non-empty list of distinct names, got {devices!r}")
        _check_positive("local_iters", local_iters)
        _check_positive("batch_size", batch_size)
        _check_positive("messages", messages)
        if not (isinstance(epsilon, (int, float)) and math.isfinite(epsilon) and epsilon > 0):
            raise ValueError(f"epsilon (the target optimality gap) must be a positive number, got {epsilon!r}")
        if not (isinstance(devices_per_round, int) and 1 <= devices_per_round <= len(self.devices)):
            raise ValueError(f"devices_per_round must be an integer in 1..{len(self.devices)}, "
                             f"got {devices_per_round!r}")
        self.model = model
        self.counts = counts(get_architecture(model))
        self.epsilon = epsilon
        self.local_iters, self.devices_per_round = local_iters, devices_per_round
        self.batch_size, self.messages = batch_size, messages
        self.convergence = convergence if convergence is not None else _testbed_convergence(len(self.devices))
        if self.convergence.devices != len(self.devices):
            raise ValueError(f"convergence constants describe {self.convergence.devices} devices, "
                             f"but {len(self.devices)} device names were given")
        self.prior = prior
        self.tuning = LoopTuning(hysteresis=hysteresis, confidence=confidence, switch_confidence=switch_confidence,
                                 relapse=relapse, samples=samples, explore_step=explore_step, max_explore=max_explore,
                                 alpha_prior_sd=alpha_prior_sd, min_distinct=min_distinct,
                                 min_device_records=min_device_records)
        self.per_device_m, self.refit_convergence, self.seed = per_device_m, refit_convergence, seed
        self.last_calibration: Calibration | None = None
        self._incumbent: tuple[int, int] | None = None
        self._m_map: dict[str, int] | None = None
        self._explored = 0

    def __repr__(self) -> str:
        return (f"MeasuredPolicy(model={self.model!r}, devices={len(self.devices)}, epsilon={self.epsilon:g}, "
                f"incumbent={self._incumbent})")

    # -- state --------------------------------------------------------------------------------------------
    def resume(self, previous: Decision | None) -> None:
        """Restore incumbent, per-device m and exploration count from the last stored decision."""
        state = previous.state if previous is not None else {}
        incumbent = state.get("incumbent")
        self._incumbent = (int(incumbent[0]), int(incumbent[1])) if incumbent else None
        m_map = state.get("m_per_device")
        self._m_map = {str(k): int(v) for k, v in m_map.items()} if m_map else None
        self._explored = int(state.get("explored", 0))

    def _state(self) -> dict[str, Any]:
        return {"incumbent": list(self._incumbent) if self._incumbent else None, "m_per_device": self._m_map,
                "explored": self._explored}

    # -- model ----------------------------------------------------------------------------------------------
    def problem(self, calibration: Calibration, stats: Sequence[RoundStats]) -> Problem:
        """The testbed problem with the calibrated energy model (and re-estimated constants if enabled)."""
        energy = TestbedEnergy.from_calibration(self.counts, calibration, self.devices, prior=self.prior,
                                                batch_size=self.batch_size, messages=self.messages,
                                                min_records=self.tuning.min_device_records)
        convergence = self.convergence
        if self.refit_convergence and stats:
            convergence = estimate_constants(stats, prior=self.convergence, devices=self.devices).constants
        return Problem(energy, convergence, self.epsilon, name=f"testbed:{self.model}")

    # -- the decision ---------------------------------------------------------------------------------------
    def decide(self, round: int, records: Sequence[EnergyRecord], stats: Sequence[RoundStats] = ()) -> Decision:
        """Refit, re-solve and choose the precisions of ``round``."""
        _check_round(round)
        t = self.tuning
        records = [r for r in records if r.device in self.devices]
        calibration = calibrate(records, macs_per_sample=self.counts.macs, alpha_prior=self.prior.alpha,
                                alpha_prior_sd=t.alpha_prior_sd)
        self.last_calibration = calibration
        problem = self.problem(calibration, stats)
        grid = evaluate_grid(problem, local_iters=[self.local_iters], devices=[self.devices_per_round])
        candidate = grid.best()
        draws, missing = self._sampled_energy(problem, calibration, grid)
        # A fit over a narrow span of precisions can be confidently wrong (e.g. a cost per bit pinned at 0
        # from two neighbouring m), so the loop insists on a minimum spread before it trusts one.
        if len({r.n for r in records}) < t.min_distinct:
            missing.append(f"records at {t.min_distinct} or more training precisions")
        if len({r.m for r in records if r.messages and r.uplink_bits}) < t.min_distinct:
            missing.append(f"uplinks at {t.min_distinct} or more precisions")
        missing = sorted(set(missing))
        cand_ok = _within(draws, grid, (candidate.m, candidate.n), t.hysteresis)
        inputs: dict[str, Any] = {
            "round": round, "records": len(records), "devices_reporting": len({r.device for r in records}),
            "epsilon": self.epsilon, "local_iters": self.local_iters, "devices_per_round": self.devices_per_round,
            "n_min": problem.n_min(), "calibration": _calibration_summary(calibration), "fit_missing": missing,
            "candidate": candidate.to_dict(), "candidate_confidence": cand_ok, "state_before": self._state(),
            "tuning": asdict(t), "convergence": _constants_summary(problem.convergence),
        }

        explore_reason = None
        if self._incumbent is None:
            if missing:
                explore_reason = "the fit needs " + " and ".join(missing)
            elif cand_ok < t.confidence:
                explore_reason = (f"the candidate is near-optimal in only {cand_ok:.0%} of the fit's draws "
                                  f"(need {t.confidence:.0%})")
        elif not missing:
            inc_ok = _within(draws, grid, (self._incumbent[1], self._incumbent[0]), t.hysteresis)
            inputs["incumbent_confidence"] = inc_ok
            if inc_ok < t.relapse:
                explore_reason = (f"the settled choice is near-optimal in only {inc_ok:.0%} of the fit's draws "
                                  f"(below {t.relapse:.0%})")
                self._incumbent = None

        if explore_reason is not None and self._explored < t.max_explore:
            n, m, why = self._explore_target(candidate, records, grid)
            self._explored += 1
            chosen = problem.setting(self.local_iters, self.devices_per_round, m, n)
            return self._decision(round, chosen, f"explore {why}: {explore_reason}", inputs, explore=True)
        if explore_reason is not None:
            reason = f"adopt the candidate: exploration budget of {t.max_explore} rounds spent ({explore_reason})"
            self._incumbent = (candidate.n, candidate.m)
        elif self._incumbent is None:
            reason = f"adopt the candidate (near-optimal in {cand_ok:.0%} of the fit's draws)"
            self._incumbent = (candidate.n, candidate.m)
        else:
            reason = self._keep_or_switch(grid, draws, candidate, inputs)
        n, m = self._incumbent
        chosen = problem.setting(self.local_iters, self.devices_per_round, m, n)
        if self.per_device_m:
            chosen = self._per_device(problem, chosen)
        return self._decision(round, chosen, reason, inputs, explore=False)

    def _keep_or_switch(self, grid: Grid, draws: np.ndarray, candidate: Setting, inputs: dict[str, Any]) -> str:
        """The hysteresis: move to ``candidate`` only on a large enough and likely enough saving."""
        t = self.tuning
        inc_n, inc_m = self._incumbent
        if (candidate.n, candidate.m) == (inc_n, inc_m):
            return "keep: the settled choice is still the optimum"
        if inc_n not in grid.n:                       # below a raised n_min: the settled choice is infeasible
            self._incumbent = (candidate.n, candidate.m)
            return f"switch: n={inc_n} is now below n_min={int(grid.n[0])}"
        current = float(grid.energy[0, 0, list(grid.m).index(inc_m), list(grid.n).index(inc_n)])
        saving = 1.0 - candidate.energy_j / current
        better = _better(draws, grid, (candidate.m, candidate.n), (inc_m, inc_n))
        inputs["candidate_saving"] = saving
        inputs["candidate_better"] = better
        if saving > t.hysteresis and better >= t.switch_confidence:
            self._incumbent = (candidate.n, candidate.m)
            return (f"switch: the new optimum saves {saving:.1%} (> {t.hysteresis:.1%}) and is cheaper in "
                    f"{better:.0%} of the fit's draws")
        return (f"keep: the new optimum would save {saving:.1%} and is cheaper in {better:.0%} of the fit's draws "
                f"(a switch needs > {t.hysteresis:.1%} and {t.switch_confidence:.0%})")

    def _decision(self, round: int, chosen: Setting, reason: str, inputs: dict[str, Any], *,
                  explore: bool) -> Decision:
        return Decision(round=round, policy=self.name, n=chosen.n, m=chosen.m, local_iters=chosen.I,
                        devices_per_round=chosen.K, reason=reason, inputs=_json_safe(inputs),
                        m_per_device=dict(chosen.m_per_device) if chosen.m_per_device else None,
                        explore=explore, predicted=_json_safe(chosen.to_dict()), state=_json_safe(self._state()))

    def _per_device(self, problem: Problem, chosen: Setting) -> Setting:
        """Per-device m around the chosen (n, m), kept unless the new map saves more than the hysteresis."""
        fresh = per_device_uplink(problem, chosen)
        if self._m_map is not None and set(self._m_map) == set(self.devices):
            kept = problem.setting_per_device(chosen.I, chosen.K, chosen.n,
                                              [self._m_map[name] for name in problem.energy.devices])
            if kept.energy_j <= fresh.energy_j * (1.0 + self.tuning.hysteresis):
                fresh = kept
        self._m_map = dict(fresh.m_per_device or {})
        return fresh

    def _explore_target(self, candidate: Setting, records: Sequence[EnergyRecord], grid: Grid
                        ) -> tuple[int, int, str]:
        """The candidate if never measured, else its least-measured neighbour (new n and m values first)."""
        measured = Counter((r.n, r.m) for r in records)
        if measured[(candidate.n, candidate.m)] == 0:
            return candidate.n, candidate.m, "the current best estimate"
        per_n = Counter(r.n for r in records)
        per_m = Counter(r.m for r in records)
        s = self.tuning.explore_step
        n_lo, n_hi = int(grid.n[0]), int(grid.n[-1])
        options = []
        for dn, dm in ((-s, -s), (s, s), (-s, s), (s, -s), (-s, 0), (s, 0), (0, -s), (0, s)):
            n, m = candidate.n + dn, candidate.m + dm
            if n_lo <= n <= n_hi and 1 <= m <= N_MAX and (n, m) != (candidate.n, candidate.m):
                options.append((per_n[n] + per_m[m], measured[(n, m)], n, m))
        if not options:
            return candidate.n, candidate.m, "the current best estimate (no neighbour in range)"
        _, _, n, m = min(options, key=lambda o: (o[0], o[1]))
        return n, m, f"a neighbouring precision (n={n}, m={m})"

    def _sampled_energy(self, problem: Problem, calibration: Calibration, grid: Grid
                        ) -> tuple[np.ndarray, list[str]]:
        """Total energy on the (m, n) grid for parameter draws from the fits: shape (samples, |m|, |n|)."""
        rng = np.random.default_rng([self.seed, len(calibration.devices), calibration.records])
        n_ax, m_ax = grid.n.astype(float), grid.m.astype(float)
        work = self.batch_size * self.counts.macs
        q = problem.weights
        train = np.zeros((self.tuning.samples, n_ax.size))
        uplink = np.zeros((self.tuning.samples, m_ax.size))
        missing: set[str] = set()
        for k, name in enumerate(problem.energy.devices):
            fits = calibration.for_device(name, min_records=self.tuning.min_device_records)
            if fits.compute.ok:
                c0, a, alpha = _draw_compute(fits.compute, self.tuning.samples, rng)
            else:
                missing.add(f"records at {self.tuning.min_distinct} or more training precisions")
                c0, a, alpha = (np.full(self.tuning.samples, v) for v in
                                (self.prior.fixed_j, self.prior.joules_per_mac, self.prior.alpha))
            train += q[k] * (c0[:, None] + work * a[:, None] * (n_ax[None, :] / 32.0) ** alpha[:, None])
            if fits.uplink.ok:
                per_msg, per_bit = _draw_uplink(fits.uplink, self.tuning.samples, rng)
            else:
                missing.add(f"uplinks at {self.tuning.min_distinct} or more precisions")
                per_msg = np.full(self.tuning.samples, self.prior.joules_per_message)
                per_bit = np.full(self.tuning.samples, self.prior.joules_per_bit)
            bits = m_ax * problem.d
            uplink += q[k] * (self.messages * per_msg[:, None] + per_bit[:, None] * bits[None, :])
        rounds = grid.rounds[0, 0]                                        # (|m|, |n|)
        k_, i_ = self.devices_per_round, self.local_iters
        per_round = k_ * problem.device_round_energy(i_, train[:, None, :], uplink[:, :, None])   # (S, |m|, |n|)
        with np.errstate(invalid="ignore"):
            draws = np.where(np.isfinite(rounds)[None], rounds[None] * per_round, np.inf)
        return draws, sorted(missing)


def build_policy(name: str, *, devices: Sequence[str], local_iters: int, devices_per_round: int,
                 model: str = "mlp", epsilon: float = 0.1, n: int | None = None, m: int | None = None,
                 **options: Any) -> FixedPolicy | ModelPolicy | MeasuredPolicy:
    """A policy from plain configuration values (what an experiment file holds).

    ``fixed`` needs ``n`` and ``m``; ``model`` solves the ``testbed`` preset
    for ``model`` with one entry per device (``preset="kim2022"`` for the
    paper's); ``measured`` passes ``options`` to ``MeasuredPolicy``, where
    ``prior`` may be a mapping of ``DeviceEnergyParams`` fields and
    ``convergence`` a mapping of L, mu, G, Gamma, rho and sigma (one value or
    one per device), as a TOML file gives them.

        >>> build_policy("fixed", devices=["pi-0"], local_iters=1, devices_per_round=1, n=8, m=8).decide(0, []).n
        8
    """
    if name == "fixed":
        if n is None or m is None:
            raise ValueError("the fixed policy needs n and m")
        return FixedPolicy(n=n, m=m, local_iters=local_iters, devices_per_round=devices_per_round,
                           m_per_device=options.get("m_per_device"))
    if name == "model":
        preset_name = options.pop("preset", "testbed")
        mode = options.pop("mode", "nm")
        per_device_m = options.pop("per_device_m", False)
        preset_options = {"model": model, "devices": len(devices), **options} if preset_name == "testbed" else options
        preset = get_preset(preset_name, **preset_options)
        return ModelPolicy(preset.problem(epsilon), local_iters=local_iters, devices_per_round=devices_per_round,
                           mode=mode, per_device_m=per_device_m)
    if name == "measured":
        from basestation.energy.target_policy import EnergyToTargetPolicy

        if n is None or m is None:
            raise ValueError("the measured policy needs the starting n and m")
        return EnergyToTargetPolicy(devices=devices, n=n, m=m, local_iters=local_iters,
                                    devices_per_round=devices_per_round, model=model, **options)
    if name == "measured-fit":
        if isinstance(options.get("prior"), Mapping):
            options["prior"] = DeviceEnergyParams(**options["prior"])
        if isinstance(options.get("convergence"), Mapping):
            options["convergence"] = _convergence_from_mapping(options["convergence"], len(devices))
        return MeasuredPolicy(model=model, devices=devices, epsilon=epsilon, local_iters=local_iters,
                              devices_per_round=devices_per_round, **options)
    raise ValueError(f"unknown precision policy {name!r}; choose one of: fixed, model, measured, measured-fit")


# --- helpers ----------------------------------------------------------------------------------------------

def _index(grid: Grid, point: tuple[int, int]) -> tuple[int, int] | None:
    """Position of the (m, n) point on the grid's (m, n) axes, or None when n is off the grid."""
    m, n = point
    if n not in grid.n or m not in grid.m:
        return None
    return list(grid.m).index(m), list(grid.n).index(n)


def _within(draws: np.ndarray, grid: Grid, point: tuple[int, int], tolerance: float) -> float:
    """Fraction of draws in which the (m, n) ``point`` costs at most (1 + tolerance) times that draw's optimum."""
    at = _index(grid, point)
    if at is None:
        return 0.0
    best = np.min(draws.reshape(draws.shape[0], -1), axis=1)
    return float(np.mean(draws[:, at[0], at[1]] <= best * (1.0 + tolerance)))


def _better(draws: np.ndarray, grid: Grid, new: tuple[int, int], old: tuple[int, int]) -> float:
    """Fraction of draws in which the (m, n) point ``new`` costs less than ``old``."""
    a, b = _index(grid, new), _index(grid, old)
    if b is None:
        return 1.0
    if a is None:
        return 0.0
    return float(np.mean(draws[:, a[0], a[1]] < draws[:, b[0], b[1]]))


def _gaussian(mean: np.ndarray, stderr: np.ndarray, corr: np.ndarray, count: int,
              rng: np.random.Generator) -> np.ndarray:
    values, vectors = np.linalg.eigh(np.asarray(corr, dtype=float))
    root = vectors * np.sqrt(np.clip(values, 0.0, None))
    z = rng.standard_normal((count, mean.size)) @ root.T
    return mean[None, :] + z * stderr[None, :]


def _draw_compute(fit: ComputeFit, count: int, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    mean = np.array([fit.fixed_j, fit.joules_per_mac, fit.alpha])
    se = np.array([_se(fit.stderr, "fixed_j"), _se(fit.stderr, "joules_per_mac"), _se(fit.stderr, "alpha")])
    draws = _gaussian(mean, se, np.array(fit.correlation), count, rng)
    return (np.maximum(draws[:, 0], 0.0), np.maximum(draws[:, 1], 0.0), np.clip(draws[:, 2], 0.0, 4.0))


def _draw_uplink(fit: UplinkFit, count: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    mean = np.array([fit.joules_per_message, fit.joules_per_bit])
    se = np.array([_se(fit.stderr, "joules_per_message"), _se(fit.stderr, "joules_per_bit")])
    draws = np.maximum(_gaussian(mean, se, np.array(fit.correlation), count, rng), 0.0)
    return draws[:, 0], draws[:, 1]


def _se(stderr: Mapping[str, float | None] | None, name: str) -> float:
    value = (stderr or {}).get(name)
    return float(value) if value is not None and math.isfinite(value) else 0.0


def _calibration_summary(cal: Calibration) -> dict[str, Any]:
    c, u = cal.fleet.compute, cal.fleet.uplink
    return {"records": cal.records, "devices": sorted(cal.devices),
            "compute": {"status": c.status, "reason": c.reason, "fixed_j": c.fixed_j,
                        "joules_per_mac": c.joules_per_mac, "alpha": c.alpha, "alpha_prior": c.alpha_prior,
                        "stderr": c.stderr, "quality": asdict(c.quality) if c.quality else None},
            "uplink": {"status": u.status, "reason": u.reason, "joules_per_bit": u.joules_per_bit,
                       "joules_per_message": u.joules_per_message, "stderr": u.stderr,
                       "quality": asdict(u.quality) if u.quality else None}}


def _constants_summary(c: ConvergenceConstants) -> dict[str, Any]:
    return {"L": c.L, "mu": c.mu, "G": c.G, "Gamma": c.Gamma, "rho": c.rho, "sigma": list(c.sigma)}


def _convergence_from_mapping(data: Mapping[str, Any], devices: int) -> ConvergenceConstants:
    values = dict(data)
    sigma = values.pop("sigma", TESTBED_CONVERGENCE["sigma"])
    sigma = tuple(float(s) for s in sigma) if isinstance(sigma, (list, tuple)) else tuple([float(sigma)] * devices)
    values.setdefault("sampling", tuple([1.0 / devices] * devices))
    try:
        return ConvergenceConstants(sigma=sigma, **values)
    except TypeError as exc:
        raise ValueError(f"convergence options: {exc}; expected L, mu, G, Gamma, rho, sigma") from None


def _testbed_convergence(devices: int) -> ConvergenceConstants:
    scalars = {k: v for k, v in TESTBED_CONVERGENCE.items() if k != "sigma"}
    return ConvergenceConstants(sigma=tuple([TESTBED_CONVERGENCE["sigma"]] * devices),
                                sampling=tuple([1.0 / devices] * devices), **scalars)


def _json_safe(value: Any) -> Any:
    """Plain JSON types only: numpy scalars to Python, tuples to lists, non-finite floats to None."""
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.ndarray):
        return [_json_safe(v) for v in value.tolist()]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    return value


def _check_bits(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 1 <= value <= N_MAX:
        raise ValueError(f"{name} must be an integer number of bits in 1..{N_MAX}, got {value!r}")


def _check_positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _check_round(round: int) -> None:
    if isinstance(round, bool) or not isinstance(round, (int, np.integer)) or round < 0:
        raise ValueError(f"round must be a non-negative integer, got {round!r}")
