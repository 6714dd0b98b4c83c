"""Empirical rounds-to-target model R(n, m, I), fitted to measured learning curves.

The paper's bound (Kim et al., ICC 2022; docs/energy-model.md) cannot count
rounds on our testbed (it predicts ~1e7 where runs take a handful), but its
form says how precision hurts: a training-precision floor d (rho - mu) / 4^n
and an uplink term growing as I / 4^m eat into the target gap, and rounds
grow as the gap left shrinks. We keep that shape and fit every constant to
the curves:

    R(n, m, I) = exp(a) * I^b / (1 - u_n 4^-(n-1) - u_m I 4^-(m-1))     (infinite when the bracket <= 0)

by least squares on log R. A curve that never reached the target within its
rounds is censored: it only says R > its length, so it adds a residual only
when the model predicts fewer rounds than it ran (a one-sided, Tobit-like
penalty).

Curves at a single I cannot say how rounds scale with I: there ``a`` and
``b`` are one constant. Nor can curves at several I of which only one I ever
reached the target: the others are censored, a lower bound the fit would meet
by predicting just above their lengths. The fit then takes ``b = -1``
(``SINGLE_I_EXPONENT``):
a fixed number of SGD steps to the target, so R halves when I doubles. That is
local SGD's behaviour on IID data while I is small against the steps needed
(Stich, "Local SGD converges fast and communicates little", ICLR 2019). It does
not change any prediction at the curves' own I. With two or more I the data
fit ``b``. The quiet sweep (a) gave -0.83 (docs/precision.md).

    curves = load_curves("curves.json")
    fit = fit_rounds(curves, target=0.9)
    fit.predict(8, 4, 20)                     # rounds to 0.9 at n=8, m=4, I=20
    holdout_errors(curves, 0.9, by="setting") # leave-one-setting-out relative errors
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np


SINGLE_I_EXPONENT = -1.0
"""The exponent b of I taken when every curve has the same I (see the module docstring)."""


class CurveError(ValueError):
    """A learning-curve file or entry that cannot be used."""


@dataclass(frozen=True)
class Curve:
    """One run at a fixed setting: accuracy after each round and the measured energy of each round (J, all devices).

    ``train_j`` and ``uplink_j`` are the above-idle joules of those phases per
    round; ``energy_j`` is everything the meters measured (idle included).
    """

    n: int
    m: int
    I: int
    seed: int
    accuracy: tuple[float, ...]
    energy_j: tuple[float, ...] = ()
    train_j: tuple[float, ...] = ()
    uplink_j: tuple[float, ...] = ()

    @property
    def setting(self) -> tuple[int, int, int]:
        return self.n, self.m, self.I

    def rounds_to(self, target: float) -> int | None:
        """First round (1-based) whose accuracy reaches ``target``; None if none did (censored)."""
        for index, acc in enumerate(self.accuracy):
            if acc is not None and acc >= target:
                return index + 1
        return None

    def to_dict(self) -> dict[str, Any]:
        return {"n": self.n, "m": self.m, "I": self.I, "seed": self.seed, "accuracy": list(self.accuracy),
                "energy_j": list(self.energy_j), "train_j": list(self.train_j), "uplink_j": list(self.uplink_j)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Curve":
        try:
            return cls(n=int(data["n"]), m=int(data["m"]), I=int(data["I"]), seed=int(data.get("seed", 0)),
                       accuracy=tuple(float(a) for a in data["accuracy"]),
                       energy_j=tuple(float(e) for e in data.get("energy_j", ())),
                       train_j=tuple(float(e) for e in data.get("train_j", ())),
                       uplink_j=tuple(float(e) for e in data.get("uplink_j", ())))
        except (KeyError, TypeError, ValueError) as exc:
            raise CurveError(f"a learning curve needs n, m, I and accuracy (a list); got {dict(data)!r}: {exc}") \
                from None


def load_curves(path: str | Path) -> list[Curve]:
    """Curves from a JSON file: ``{"curves": [...]}`` (what ``qfl sweep`` writes) or a bare list."""
    try:
        doc = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise CurveError(f"learning-curve file {path} does not exist") from None
    except json.JSONDecodeError as exc:
        raise CurveError(f"learning-curve file {path} is not JSON: {exc}") from None
    except UnicodeDecodeError:
        raise CurveError(f"learning-curve file {path} is not text (neither a curves JSON nor a store)") from None
    except OSError as exc:
        raise CurveError(f"cannot read the learning-curve file {path}: {exc.strerror or exc}") from None
    items = doc.get("curves") if isinstance(doc, dict) else doc
    if not isinstance(items, list) or not items:
        raise CurveError(f"{path} holds no learning curves (expected {{\"curves\": [...]}})")
    return [Curve.from_dict(item) for item in items]


def save_curves(path: str | Path, curves: Iterable[Curve], **meta: Any) -> None:
    """Write ``curves`` (and ``meta`` such as the model, board and link) as JSON."""
    Path(path).write_text(json.dumps({**meta, "curves": [c.to_dict() for c in curves]}, indent=1) + "\n")


@dataclass(frozen=True)
class RoundsFit:
    """Fitted R(n, m, I) (see the module docstring); ``params`` = (a, b, log u_n, log u_m)."""

    params: tuple[float, float, float, float]
    target: float
    observations: int
    censored: int
    rms_log_error: float

    def predict(self, n: int | float, m: int | float, I: int | float) -> float:
        """Predicted rounds to the target; ``math.inf`` where the model says the target is out of reach."""
        return float(_predict(np.asarray(self.params), np.array([n], float), np.array([m], float),
                              np.array([I], float))[0])

    def to_dict(self) -> dict[str, Any]:
        a, b, lun, lum = self.params
        return {"a": a, "b": b, "u_n": math.exp(lun), "u_m": math.exp(lum), "target": self.target,
                "observations": self.observations, "censored": self.censored, "rms_log_error": self.rms_log_error}


def _predict(p: np.ndarray, n: np.ndarray, m: np.ndarray, I: np.ndarray) -> np.ndarray:
    a, b, lun, lum = p
    bracket = 1.0 - math.exp(lun) * 4.0 ** (-(n - 1)) - math.exp(lum) * I * 4.0 ** (-(m - 1))
    with np.errstate(divide="ignore", over="ignore"):
        base = np.exp(a + b * np.log(I))
        return np.where(bracket > 0, base / np.maximum(bracket, 1e-300), np.inf)


def _log_pred(p: np.ndarray, n: np.ndarray, m: np.ndarray, I: np.ndarray) -> np.ndarray:
    a, b, lun, lum = p
    bracket = 1.0 - np.exp(lun) * 4.0 ** (-(n - 1)) - np.exp(lum) * I * 4.0 ** (-(m - 1))
    # A smooth floor keeps the residuals finite where the bracket crosses 0, so the optimiser can move back.
    log_bracket = np.where(bracket > 1e-6, np.log(np.maximum(bracket, 1e-6)), math.log(1e-6) + (bracket - 1e-6))
    return a + b * np.log(I) - log_bracket


def fit_rounds(curves: Sequence[Curve], target: float) -> RoundsFit:
    """Least-squares fit of R(n, m, I) to ``curves`` at ``target`` accuracy, censored curves one-sided."""
    from scipy.optimize import least_squares

    if not curves:
        raise CurveError("no learning curves to fit")
    rows = []
    for c in curves:
        reached = c.rounds_to(target)
        if reached is not None:
            rows.append((c.n, c.m, c.I, float(reached), False))
        elif c.accuracy:
            rows.append((c.n, c.m, c.I, float(len(c.accuracy)), True))
    if not any(not cens for *_, cens in rows):
        raise CurveError(f"no curve reached the target accuracy {target}; nothing to fit the rounds to")
    n, m, I, r, cens = (np.array(col) for col in zip(*rows))
    n, m, I, logr = n.astype(float), m.astype(float), I.astype(float), np.log(r.astype(float))
    cens = cens.astype(bool)
    single_i = np.unique(I).size < 2
    # Censored curves only bound R from below, so with targets reached at one I alone b is not identified:
    # the fit would take R at the other I just above their lengths. There b is the prior as well.
    reached_at_one_i = not single_i and np.unique(I[~cens]).size < 2

    def residuals(p: np.ndarray) -> np.ndarray:
        if single_i:
            p = np.array([p[0], 0.0, p[2], p[3]])
        elif reached_at_one_i:
            p = np.array([p[0], SINGLE_I_EXPONENT, p[2], p[3]])
        res = _log_pred(p, n, m, I) - logr
        res[cens] = np.minimum(res[cens], 0.0)  # censored: only predicting too few rounds is an error
        # A weak pull of the precision constants towards "no effect" keeps them defined when the data say nothing.
        return np.concatenate([res, 1e-3 * (p[2:] + 10.0)])

    uncensored = ~cens
    start = np.array([float(np.mean(logr[uncensored])), 0.0, -10.0, -10.0])
    best = None
    for lun0 in (-10.0, 6.0):         # "no precision effect" and "a strong one", for each of n and m
        for lum0 in (-10.0, 6.0):
            start[2], start[3] = lun0, lum0
            sol = least_squares(residuals, start, bounds=([-20, -3, -25, -25], [20, 3, 25, 25]))
            if best is None or sol.cost < best.cost:
                best = sol
    p = best.x.copy()
    if single_i:  # fitted with b = 0; the same predictions at that I with b = SINGLE_I_EXPONENT
        p[0] -= SINGLE_I_EXPONENT * math.log(float(I[0]))
        p[1] = SINGLE_I_EXPONENT
    elif reached_at_one_i:
        p[1] = SINGLE_I_EXPONENT
    res = residuals(p)[:-2]
    return RoundsFit(params=tuple(float(v) for v in p), target=float(target), observations=int(len(rows)),
                     censored=int(cens.sum()), rms_log_error=float(np.sqrt(np.mean(res ** 2))))


def mean_rounds(curves: Sequence[Curve], target: float) -> dict[tuple[int, int, int], float | None]:
    """Mean rounds to target per setting over its seeds; None if any seed never reached it."""
    groups: dict[tuple[int, int, int], list[int | None]] = {}
    for c in curves:
        groups.setdefault(c.setting, []).append(c.rounds_to(target))
    return {s: (None if any(v is None for v in vals) else float(np.mean(vals))) for s, vals in groups.items()}


def holdout_errors(curves: Sequence[Curve], target: float, *, by: str = "setting") -> list[dict[str, Any]]:
    """Relative errors of R on held-out data: ``by="setting"`` leaves out one (n, m, I) at a time,
    ``by="I"`` every setting of one I. Each row: setting, measured mean rounds, predicted, relative error
    (None when the model predicts the target is never reached; only settings whose every seed reached
    the target are scored)."""
    if by not in ("setting", "I"):
        raise ValueError(f"by must be 'setting' or 'I', got {by!r}")
    truth = mean_rounds(curves, target)
    rows = []
    for setting, measured in sorted(truth.items()):
        if measured is None:
            continue
        held = [c for c in curves if (c.setting != setting if by == "setting" else c.I != setting[2])]
        try:
            fit = fit_rounds(held, target)
        except CurveError:
            continue
        predicted = fit.predict(*setting)
        error = (predicted - measured) / measured if math.isfinite(predicted) else None  # None: "never"
        rows.append({"n": setting[0], "m": setting[1], "I": setting[2], "measured_rounds": measured,
                     "predicted_rounds": predicted if math.isfinite(predicted) else None, "relative_error": error})
    return rows


def error_summary(rows: Sequence[Mapping[str, Any]], within: float = 0.25) -> dict[str, Any]:
    """Share of held-out settings predicted within ``within``, and the median and max absolute error."""
    errors = np.array([math.inf if r["relative_error"] is None else abs(r["relative_error"]) for r in rows],
                      dtype=float)
    if errors.size == 0:
        return {"settings": 0, "within": within, "share_within": None, "median_abs_error": None,
                "max_abs_error": None}
    return {"settings": int(errors.size), "within": within, "share_within": float(np.mean(errors <= within)),
            "median_abs_error": float(np.median(errors)),
            "max_abs_error": float(np.max(errors)) if np.all(np.isfinite(errors)) else None}
