"""Convergence constants of the testbed, estimated from what devices report, and rounds predicted vs observed.

The bound of ``basestation.energy.kim2022`` needs L, mu, G, sigma_k, Gamma and
rho. Each round every device reports its mean minibatch loss, mean squared
minibatch gradient norm and minibatch gradient variance (``RoundStats``).
From those (docs/precision.md gives the reasoning for each):

- G^2: a high quantile (default 0.95) of the reported squared gradient norms,
  since the bound assumes E||g||^2 <= G^2 everywhere;
- sigma_k^2: device k's mean reported minibatch gradient variance;
- F*: the asymptote of the global loss curve fitted to the bound's shape
  F_t = F* + C / (tau_t + gamma), tau_t the local iterations run before round t,
  over the second half of the rounds (the early plateau is not of that shape);
- mu: from the Polyak-Lojasiewicz inequality ||grad F||^2 >= 2 mu (F - F*),
  with ||grad F_t||^2 estimated as (mean squared norm - variance), the
  smallest ratio over blocks of consecutive rounds;
- L: from gradient secants ||g(w') - g(w)|| / ||w' - w|| when the basestation
  supplies full gradients of successive global models, otherwise from the
  loss decrease per round (descent lemma: F_{t+1} - F_t <= -eta I ||grad F||^2
  + (L/2) eta^2 I E||g||^2, which bounds L from below each round);
- Gamma: F* minus the sample-weighted mean of each device's lowest local loss;
- rho: not identifiable from these statistics, taken from the prior.

    >>> est = estimate_constants(stats, prior=prior, devices=["pi-1", "pi-2"])   # doctest: +SKIP
    >>> compare_rounds(est, d=2410, target=0.3, local_iters=5, devices=2, m=8, n=16)   # doctest: +SKIP
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, replace
from typing import Any, Sequence

import numpy as np

from basestation.energy import kim2022
from basestation.energy.kim2022 import ConvergenceConstants
from basestation.energy.records import RoundStats


@dataclass(frozen=True)
class LossCurve:
    """Per-round sample-weighted means of what the devices reported, rounds ascending."""

    rounds: np.ndarray
    loss: np.ndarray
    grad_sq_norm: np.ndarray
    grad_variance: np.ndarray
    local_iters: np.ndarray
    lr: np.ndarray            # nan where no device reported a learning rate

    @property
    def full_grad_sq(self) -> np.ndarray:
        """Estimated ||grad F_t||^2: mean squared minibatch norm minus minibatch variance, clipped at 0."""
        return np.maximum(self.grad_sq_norm - self.grad_variance, 0.0)

    @property
    def iterations_before(self) -> np.ndarray:
        """tau_t: local iterations run before each round (cumulative over the curve)."""
        return np.concatenate([[0.0], np.cumsum(self.local_iters[:-1])])


@dataclass(frozen=True)
class ConvergenceEstimate:
    """Estimated constants, the fitted loss asymptote and curve scale, and where each constant came from."""

    constants: ConvergenceConstants
    f_star: float | None
    curve_scale: float | None
    rounds_used: int
    sources: dict[str, str]

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable summary."""
        c = self.constants
        return {"L": c.L, "mu": c.mu, "G": c.G, "Gamma": c.Gamma, "rho": c.rho, "sigma": list(c.sigma),
                "f_star": self.f_star, "curve_scale": self.curve_scale, "rounds_used": self.rounds_used,
                "sources": dict(self.sources)}


@dataclass(frozen=True)
class RoundsComparison:
    """Rounds to a target: predicted by the bound, predicted by the fitted loss curve, and observed."""

    target: float
    kind: str
    epsilon: float | None
    predicted_bound: float | None
    predicted_curve: float | None
    observed: int | None

    @property
    def ratio(self) -> float | None:
        """Bound prediction / observed (how loose the bound is), when both exist."""
        if self.predicted_bound is None or not self.observed:
            return None
        return self.predicted_bound / self.observed

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable summary."""
        return {"target": self.target, "kind": self.kind, "epsilon": self.epsilon,
                "predicted_bound": self.predicted_bound, "predicted_curve": self.predicted_curve,
                "observed": self.observed, "ratio": self.ratio}


def loss_curve(stats: Sequence[RoundStats]) -> LossCurve:
    """Aggregate per-device statistics into one value per round (weights: samples)."""
    groups: dict[int, list[RoundStats]] = defaultdict(list)
    for s in stats:
        if not isinstance(s, RoundStats):
            raise TypeError(f"loss_curve() needs RoundStats items, got {type(s).__name__}")
        groups[s.round].append(s)
    rounds = sorted(groups)
    cols: dict[str, list[float]] = defaultdict(list)
    for r in rounds:
        group = groups[r]
        w = np.array([s.samples for s in group], dtype=float)
        w /= w.sum()
        for name in ("loss", "grad_sq_norm", "grad_variance"):
            cols[name].append(robust_weighted_mean([getattr(s, name) for s in group], w))
        cols["local_iters"].append(float(np.dot(w, [s.local_iters for s in group])))
        lrs = [s.lr for s in group if s.lr is not None]
        cols["lr"].append(float(np.mean(lrs)) if lrs else math.nan)
    return LossCurve(rounds=np.array(rounds, dtype=int), **{k: np.array(cols[k], dtype=float) for k in
                                                             ("loss", "grad_sq_norm", "grad_variance",
                                                              "local_iters", "lr")})


OUTLIER_MADS = 5.0


def robust_weighted_mean(values: Sequence[float], weights: np.ndarray) -> float:
    """Weighted mean of the values within 5 scaled MADs of the median (all of them below 3 values).

    One device reporting a wild loss or gradient norm cannot move the round's
    figure: with three or more reports it is left out, and the median itself is
    unmoved by a single value.

        >>> robust_weighted_mean([1.0, 1.1, 0.9, 1e300], np.full(4, 0.25))
        1.0
    """
    x = np.asarray(values, dtype=float)
    keep = np.ones(x.size, bool)
    if x.size >= 3:
        med = float(np.median(x))
        spread = 1.4826 * float(np.median(np.abs(x - med))) or 1e-9 * max(abs(med), 1e-12)
        keep = np.abs(x - med) <= OUTLIER_MADS * spread
    w = weights[keep]
    return float(np.dot(w / w.sum(), x[keep]))


def fit_loss_curve(curve: LossCurve, gamma: float = 1.0, tail: float = 0.5) -> tuple[float, float]:
    """Least-squares fit of F_t = F* + C / (tau_t + gamma), C >= 0, F* >= 0, on the last ``tail`` of the rounds.

    Neural-network loss curves start with a plateau that the bound's 1/t shape
    does not describe, so by default only the second half of the rounds (at
    least 3) is fitted. Returns (F*, C).
    """
    if curve.rounds.size < 3:
        raise ValueError(f"fitting the loss curve needs 3 or more rounds, got {curve.rounds.size}")
    if not 0 < tail <= 1:
        raise ValueError(f"tail must be a fraction in (0, 1], got {tail!r}")
    keep = max(3, int(math.ceil(tail * curve.rounds.size)))
    x = 1.0 / (curve.iterations_before[-keep:] + gamma)
    loss = curve.loss[-keep:]
    design = np.stack([np.ones_like(x), x], axis=1)
    (f_star, scale), *_ = np.linalg.lstsq(design, loss, rcond=None)
    if scale < 0:                      # a flat or rising tail: no decay to fit
        return float(max(np.min(loss), 0.0)), 0.0
    if f_star < 0:                     # the loss is non-negative: refit the scale with F* = 0
        return 0.0, float(max(np.dot(x, loss) / np.dot(x, x), 0.0))
    return float(f_star), float(scale)


def smoothness_from_secants(weights: Sequence[np.ndarray], grads: Sequence[np.ndarray]) -> float:
    """L estimated as the largest ||g_{t+1} - g_t|| / ||w_{t+1} - w_t|| over successive (model, full gradient) pairs.

    Arrays are flattened; pairs whose models are identical are skipped.
    """
    if len(weights) != len(grads) or len(weights) < 2:
        raise ValueError("need two or more models with one gradient each to form secants")
    flat_w = [np.ravel(np.asarray(w, dtype=float)) for w in weights]
    flat_g = [np.ravel(np.asarray(g, dtype=float)) for g in grads]
    ratios = []
    for i in range(len(flat_w) - 1):
        step = float(np.linalg.norm(flat_w[i + 1] - flat_w[i]))
        if step > 0:
            ratios.append(float(np.linalg.norm(flat_g[i + 1] - flat_g[i])) / step)
    if not ratios:
        raise ValueError("all successive models are identical; no secant to measure")
    return max(ratios)


def estimate_constants(stats: Sequence[RoundStats], *, prior: ConvergenceConstants,
                       devices: Sequence[str] | None = None, secants: tuple[Sequence[np.ndarray],
                                                                              Sequence[np.ndarray]] | None = None,
                       g_quantile: float = 0.95) -> ConvergenceEstimate:
    """Estimate the bound's constants from device statistics, falling back to ``prior`` per constant.

    ``devices`` fixes the order (and number) of the sigma values; by default
    the devices seen in ``stats``, sorted (then ``prior`` must have as many
    sigma values or uniform sampling is used). ``secants`` is an optional
    (models, full gradients) pair of sequences for L.
    """
    names = list(devices) if devices is not None else sorted({s.device for s in stats})
    if not names:
        raise ValueError("no devices: pass devices= or stats from at least one device")
    sources: dict[str, str] = {}
    values: dict[str, Any] = {"L": prior.L, "mu": prior.mu, "G": prior.G, "Gamma": prior.Gamma, "rho": prior.rho}
    sources["rho"] = "prior (not identifiable from device statistics)"
    stats = list(stats)

    # sigma_k: each device's mean minibatch gradient variance; unseen devices get the median of the seen ones.
    per_device: dict[str, list[float]] = defaultdict(list)
    for s in stats:
        per_device[s.device].append(s.grad_variance)
    seen = {k: math.sqrt(float(np.mean(v))) for k, v in per_device.items()}
    if seen:
        fallback = float(np.median(list(seen.values())))
        sigma = tuple(seen.get(name, fallback) for name in names)
        sources["sigma"] = "mean reported minibatch gradient variance per device"
    else:
        sigma = _prior_sigma(prior, len(names))
        sources["sigma"] = "prior (no statistics)"
    if not any(v > 0 for v in sigma):
        sigma = _prior_sigma(prior, len(names))
        sources["sigma"] = "prior (reported variances are all zero)"

    if stats:
        values["G"] = math.sqrt(float(np.quantile([s.grad_sq_norm for s in stats], g_quantile)))
        sources["G"] = f"{g_quantile:g} quantile of reported squared gradient norms"
    else:
        sources["G"] = "prior (no statistics)"

    curve = loss_curve(stats) if stats else None
    f_star = scale = None
    if curve is not None and curve.rounds.size >= 3:
        f_star, scale = fit_loss_curve(curve, prior.gamma)
        mu = _pl_ratio(curve, f_star)
        if mu is not None:
            values["mu"] = mu
            sources["mu"] = "Polyak-Lojasiewicz ratio, smallest over blocks of rounds"
        sources.setdefault("mu", "prior (no usable loss gap)")
        # Gamma: F* minus the weighted mean of each device's lowest local loss.
        lowest: dict[str, float] = {}
        samples: dict[str, float] = defaultdict(float)
        for s in stats:
            lowest[s.device] = min(lowest.get(s.device, math.inf), s.loss)
            samples[s.device] += s.samples
        total = sum(samples.values())
        weighted_low = sum(samples[k] / total * lowest[k] for k in lowest)
        values["Gamma"] = max(f_star - weighted_low, 0.0)
        sources["Gamma"] = "F* minus the sample-weighted lowest local loss"
    else:
        sources["mu"] = sources["Gamma"] = "prior (fewer than 3 rounds)"

    if secants is not None:
        values["L"] = smoothness_from_secants(*secants)
        sources["L"] = "gradient secants of successive global models"
    elif curve is not None and curve.rounds.size >= 2 and np.any(np.isfinite(curve.lr)):
        lower = []
        for t in range(curve.rounds.size - 1):
            eta, its, gsq = curve.lr[t], curve.local_iters[t], curve.grad_sq_norm[t]
            if math.isfinite(eta) and gsq > 0:
                drop = curve.loss[t + 1] - curve.loss[t] + eta * its * curve.full_grad_sq[t]
                lower.append(2.0 * drop / (eta ** 2 * its * gsq))
        positive = [v for v in lower if v > 0]
        if positive:
            values["L"] = float(np.quantile(positive, 0.9))
            sources["L"] = "descent-lemma curvature of the loss decrease, 0.9 quantile over rounds"
    sources.setdefault("L", "prior (no secants and no usable loss decrease)")

    if values["mu"] >= values["L"]:       # strong convexity cannot exceed smoothness
        values["mu"] = 0.5 * values["L"]
        sources["mu"] += "; clipped to L / 2"
    sampling = prior.sampling if (prior.sampling is not None and len(prior.sampling) == len(names)) else None
    if sampling is None:
        sampling = tuple([1.0 / len(names)] * len(names))
    constants = replace(prior, L=float(values["L"]), mu=float(values["mu"]), G=float(values["G"]),
                        Gamma=float(values["Gamma"]), rho=float(values["rho"]), sigma=tuple(float(v) for v in sigma),
                        sampling=sampling, beta=None)
    rounds_used = 0 if curve is None else int(curve.rounds.size)
    return ConvergenceEstimate(constants=constants, f_star=f_star, curve_scale=scale, rounds_used=rounds_used,
                               sources=sources)


def compare_rounds(estimate: ConvergenceEstimate, *, d: int, curve: LossCurve, target: float, local_iters: int,
                   devices: int, m: float, n: float, accuracy: Sequence[tuple[int, float]] | None = None
                   ) -> RoundsComparison:
    """Rounds to reach ``target``: the bound's prediction, the fitted curve's, and what was observed.

    The loss a device reports in round r is measured on the global model after
    r rounds (counted from the first round of ``curve``). Without ``accuracy``
    the target is a loss: observed is the number of completed rounds at which
    the mean loss first falls to it, and epsilon = target - F*. With
    ``accuracy`` (pairs of completed rounds and the global model's accuracy)
    the target is an accuracy: observed is the first count that reaches it,
    and the predictions use the loss at that count as the loss target.
    """
    kind = "loss" if accuracy is None else "accuracy"
    observed: int | None = None
    loss_target = target
    completed = curve.rounds - (int(curve.rounds[0]) if curve.rounds.size else 0)
    if accuracy is None:
        hits = np.nonzero(curve.loss <= target)[0]
        if hits.size:
            observed = int(completed[hits[0]])
    else:
        reached = [int(r) for r, acc in sorted(accuracy) if acc >= target]
        loss_target = math.nan
        if reached:
            observed = reached[0]
            at = np.nonzero(completed == observed)[0]
            if at.size:
                loss_target = float(curve.loss[at[0]])
    f_star = estimate.f_star
    epsilon = predicted_bound = predicted_curve = None
    if f_star is not None and math.isfinite(loss_target) and loss_target > f_star:
        epsilon = loss_target - f_star
        t = float(kim2022.rounds(local_iters, devices, m, n, d, estimate.constants, epsilon))
        predicted_bound = max(t, 0.0) if math.isfinite(t) else None
        if estimate.curve_scale:
            predicted_curve = max((estimate.curve_scale / epsilon - estimate.constants.gamma) / local_iters, 0.0)
    return RoundsComparison(target=float(target), kind=kind, epsilon=epsilon, predicted_bound=predicted_bound,
                            predicted_curve=predicted_curve, observed=observed)


def _pl_ratio(curve: LossCurve, f_star: float) -> float | None:
    """The smallest ||grad F||^2 / (2 (F - F*)) over blocks of consecutive rounds, or None.

    The per-round estimate of ||grad F||^2 (mean squared minibatch norm minus
    the minibatch variance) is the difference of two noisy numbers and is often
    negative late in training; summing numerator and denominator over blocks
    (about an eighth of the rounds, at least 3) averages that noise out while
    keeping the minimum the inequality asks for.
    """
    full = curve.grad_sq_norm - curve.grad_variance
    gap = curve.loss - f_star
    size = max(3, curve.rounds.size // 8)
    ratios = []
    for start in range(0, curve.rounds.size - size + 1, size):
        num, den = float(np.sum(full[start:start + size])), float(np.sum(2.0 * gap[start:start + size]))
        if num > 0 and den > 0:
            ratios.append(num / den)
    return min(ratios) if ratios else None


def _prior_sigma(prior: ConvergenceConstants, count: int) -> tuple[float, ...]:
    if len(prior.sigma) == count:
        return tuple(prior.sigma)
    return tuple([float(np.median(prior.sigma))] * count)
