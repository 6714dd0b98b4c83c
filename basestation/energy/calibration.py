"""Calibration of the testbed's energy model from measured energy records, per device and for the fleet.

Computation: the joules above idle of one training phase of I local
iterations are a part per phase plus I iterations of the paper's form with a
fixed part,

    E_train(n, I) = phase_j + I * E_iter(n)
    E_iter(n)     = fixed_j + batch_size * macs_per_sample * A * (n / 32)^alpha

(``A`` is then joules per MAC at 32 bits, directly comparable with the paper's
3.7e-12 J). ``phase_j`` is what a phase costs whatever its length (putting the
shard on its grid, building the batches' order, Python's setup); it can only be
told apart from the iterations where records ran at two or more I at the
same n, and is 0 otherwise. It is estimated first, from the median phase
energy at each (n, B, I): the intercept of a line through those medians
against I, per n and batch size B (where the largest I is at least twice the
smallest), and the median of those intercepts (floored at 0). The iteration
fit and the per-n table then use ``(train_j - phase_j) / I``. Uplink: joules above idle of one round's uplink,

    E_up = joules_per_message * messages + joules_per_bit * bits.

Both fits minimise Huber's loss of relative residuals (each divided by the median
reading at its precision) by iteratively
reweighted least squares with non-negative coefficients (numpy only), so a few
outlying rounds (a retransmission, a busy background process) do not move
them; alpha is profiled over a grid (coarse, then 0.001 fine). A fit reports
its quality (R^2, MAPE, outliers) and standard errors, and a fit the data
cannot support comes back with ``status == "insufficient data"`` and a reason
instead of raising. Where several rounds ran at the same n, a free per-n table
of median joules per iteration is returned as well.

    >>> from basestation.energy.calibration import calibrate
    >>> cal = calibrate(records, macs_per_sample=2368)          # doctest: +SKIP
    >>> cal.fleet.compute.alpha, cal.devices["pi-1"].uplink.joules_per_bit   # doctest: +SKIP
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from basestation.energy.records import EnergyRecord

OK = "ok"
INSUFFICIENT = "insufficient data"
HUBER_K = 1.345          # 95% efficiency under Gaussian noise
OUTLIER_Z = 3.0
ALPHA_RANGE = (0.0, 4.0)


@dataclass(frozen=True)
class FitQuality:
    """How well a fit explains its data: points used, points flagged as outliers (|z| > 3), and R^2 and
    MAPE (a fraction: 0.05 is 5%) over the other points."""

    points: int
    outliers: int
    r2: float | None
    mape: float | None


@dataclass(frozen=True)
class PerNEnergy:
    """One entry of the free per-n table: median joules per local iteration at training precision ``n``."""

    n: int
    joules_per_iter: float
    spread_j: float
    records: int


@dataclass(frozen=True)
class ComputeFit:
    """Fit of the joules per local iteration against n (see the module docstring).

    ``alpha_prior`` is the prior (mean, standard deviation) alpha was shrunk
    towards, if any. ``stderr`` and ``correlation`` (order: fixed_j,
    joules_per_mac, alpha) describe the parameter uncertainty.
    """

    status: str
    reason: str
    macs_per_sample: int
    fixed_j: float | None = None
    joules_per_mac: float | None = None
    alpha: float | None = None
    alpha_prior: tuple[float, float] | None = None
    stderr: dict[str, float | None] | None = None
    correlation: list[list[float]] | None = None
    quality: FitQuality | None = None
    table: tuple[PerNEnergy, ...] = ()
    phase_j: float = 0.0

    @property
    def ok(self) -> bool:
        """True when the parameters are usable."""
        return self.status == OK

    def energy_per_iter(self, n: Any, batch_size: int) -> np.ndarray:
        """Modelled joules per local iteration at precision(s) ``n``."""
        if not self.ok:
            raise ValueError(f"compute fit is not usable: {self.reason}")
        n = np.asarray(n, dtype=float)
        return self.fixed_j + batch_size * self.macs_per_sample * self.joules_per_mac * (n / 32.0) ** self.alpha

    def table_lookup(self) -> dict[int, float]:
        """The per-n table as {n: joules per iteration}."""
        return {entry.n: entry.joules_per_iter for entry in self.table}


@dataclass(frozen=True)
class UplinkFit:
    """Fit of the uplink joules against bits and messages (see the module docstring)."""

    status: str
    reason: str
    joules_per_bit: float | None = None
    joules_per_message: float | None = None
    stderr: dict[str, float | None] | None = None
    correlation: list[list[float]] | None = None
    quality: FitQuality | None = None

    @property
    def ok(self) -> bool:
        """True when the parameters are usable."""
        return self.status == OK

    def energy(self, bits: Any, messages: Any = 1) -> np.ndarray:
        """Modelled uplink joules for ``bits`` sent in ``messages`` messages."""
        if not self.ok:
            raise ValueError(f"uplink fit is not usable: {self.reason}")
        return self.joules_per_message * np.asarray(messages, dtype=float) + self.joules_per_bit * np.asarray(
            bits, dtype=float)


@dataclass(frozen=True)
class DeviceCalibration:
    """Computation and uplink fits of one device (or of the whole fleet, device ``"*"``)."""

    device: str
    records: int
    compute: ComputeFit
    uplink: UplinkFit


@dataclass(frozen=True)
class Calibration:
    """Per-device fits and the fit of all records pooled (``fleet``), with the inputs' size."""

    macs_per_sample: int
    records: int
    fleet: DeviceCalibration
    devices: dict[str, DeviceCalibration] = field(default_factory=dict)

    def for_device(self, device: str, *, min_records: int = 0) -> DeviceCalibration:
        """The device's own fits where usable, the fleet's otherwise (per part).

        Own fits are used once the device has at least ``min_records`` records.
        """
        own = self.devices.get(device)
        if own is None or own.records < min_records:
            return self.fleet
        compute = own.compute if own.compute.ok else self.fleet.compute
        uplink = own.uplink if own.uplink.ok else self.fleet.uplink
        return DeviceCalibration(device, own.records, compute, uplink)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict (what the store persists)."""
        return _clean(asdict(self))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Calibration":
        """Inverse of ``to_dict``."""
        try:
            return cls(macs_per_sample=int(data["macs_per_sample"]), records=int(data["records"]),
                       fleet=_device_from_dict(data["fleet"]),
                       devices={str(k): _device_from_dict(v) for k, v in data.get("devices", {}).items()})
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not a calibration dict (as written by Calibration.to_dict): {exc}") from None


def calibrate(records: Sequence[EnergyRecord], *, macs_per_sample: int, alpha_prior: float | None = None,
              alpha_prior_sd: float = 0.5, min_table_records: int = 3) -> Calibration:
    """Fit every device's records and all records pooled.

    ``macs_per_sample`` is N_c of the model (``models.counts(arch).macs``).
    ``alpha_prior``, when given, shrinks alpha towards it (a Gaussian prior of
    standard deviation ``alpha_prior_sd``: a maximum a posteriori fit), which
    keeps alpha sensible while the records span few precisions and lets a fit
    start from two precisions instead of three.
    """
    if not (isinstance(macs_per_sample, int) and macs_per_sample >= 1):
        raise ValueError(f"macs_per_sample must be a positive integer (N_c of the model), got {macs_per_sample!r}")
    by_device: dict[str, list[EnergyRecord]] = defaultdict(list)
    for record in records:
        if not isinstance(record, EnergyRecord):
            raise TypeError(f"calibrate() needs EnergyRecord items, got {type(record).__name__}")
        by_device[record.device].append(record)
    options = {"macs_per_sample": macs_per_sample, "alpha_prior": alpha_prior, "alpha_prior_sd": alpha_prior_sd,
               "min_table_records": min_table_records}
    devices = {name: fit_device(name, recs, **options) for name, recs in sorted(by_device.items())}
    fleet = fit_device("*", list(records), **options)
    return Calibration(macs_per_sample=macs_per_sample, records=len(records), fleet=fleet, devices=devices)


def fit_device(device: str, records: Sequence[EnergyRecord], *, macs_per_sample: int,
               alpha_prior: float | None = None, alpha_prior_sd: float = 0.5,
               min_table_records: int = 3) -> DeviceCalibration:
    """Computation and uplink fits of one set of records."""
    compute = fit_compute(records, macs_per_sample=macs_per_sample, alpha_prior=alpha_prior,
                          alpha_prior_sd=alpha_prior_sd, min_table_records=min_table_records)
    return DeviceCalibration(device=device, records=len(records), compute=compute, uplink=fit_uplink(records))


def fit_compute(records: Sequence[EnergyRecord], *, macs_per_sample: int, alpha_prior: float | None = None,
                alpha_prior_sd: float = 0.5, min_table_records: int = 3) -> ComputeFit:
    """Fit fixed_j, joules_per_mac and alpha to the records' joules per local iteration."""
    phase_j = per_phase_energy(records, min_records=min_table_records)
    y = np.array([(r.train_j - phase_j) / r.local_iters for r in records], dtype=float)
    n = np.array([r.n for r in records], dtype=float)
    work = np.array([r.batch_size for r in records], dtype=float) * macs_per_sample
    table = _per_n_table(n, y, min_table_records)
    distinct = sorted({int(v) for v in n})
    prior = None
    if alpha_prior is not None:
        if not (math.isfinite(alpha_prior) and ALPHA_RANGE[0] <= alpha_prior <= ALPHA_RANGE[1]):
            raise ValueError(f"alpha_prior must lie within {ALPHA_RANGE}, got {alpha_prior!r}")
        if not (math.isfinite(alpha_prior_sd) and alpha_prior_sd > 0):
            raise ValueError(f"alpha_prior_sd must be a positive number, got {alpha_prior_sd!r}")
        prior = (float(alpha_prior), float(alpha_prior_sd))
    need_n, need_points = (2, 3) if prior else (3, 5)
    if len(distinct) < need_n or len(y) < need_points:
        return ComputeFit(status=INSUFFICIENT, reason=f"need {need_points} or more records at {need_n} or more "
                          f"training precisions{' (with the alpha prior)' if prior else ''}; have {len(y)} record(s) "
                          f"at n = {', '.join(map(str, distinct)) or 'none'}",
                          macs_per_sample=macs_per_sample, alpha_prior=prior, table=table, phase_j=phase_j)
    scale = _relative_scale(y, n)
    alpha, coef, sigma, weights = _profile_alpha(n, work, y, scale, prior)
    fixed_j, per_mac = float(coef[0]), float(coef[1])
    powered = work * (n / 32.0) ** alpha
    fitted = fixed_j + per_mac * powered
    jac = np.stack([np.ones_like(y), powered, per_mac * powered * np.log(n / 32.0)], axis=1) / scale[:, None]
    prior_precision = np.array([0.0, 0.0, 0.0 if prior is None else 1.0 / prior[1] ** 2])
    stderr, corr = _uncertainty(jac, weights, sigma, ["fixed_j", "joules_per_mac", "alpha"], prior_precision)
    return ComputeFit(status=OK, reason="fitted" if prior is None else f"fitted, alpha shrunk towards {prior[0]:g}",
                      macs_per_sample=macs_per_sample, fixed_j=fixed_j, joules_per_mac=per_mac, alpha=float(alpha),
                      alpha_prior=prior, stderr=stderr, correlation=corr,
                      quality=_quality(y, fitted, (y - fitted) / scale / sigma), table=table, phase_j=phase_j)


def per_phase_energy(records: Sequence[EnergyRecord], *, min_records: int = 3) -> float:
    """Joules a training phase costs whatever its number of iterations; 0 unless two or more I ran at one n.

    Per n and batch size with ``min_records`` or more records at each of two or more I, the
    largest at least twice the smallest: the intercept of the least-squares
    line through the median phase energies against I. The result is the median of those intercepts, floored at 0.
    """
    by_setting: dict[tuple[int, int, int], list[float]] = defaultdict(list)
    for r in records:
        by_setting[(r.n, r.batch_size, r.local_iters)].append(r.train_j)
    intercepts = []
    for group in sorted({key[:2] for key in by_setting}):
        points = [(key[2], float(np.median(v))) for key, v in by_setting.items()
                  if key[:2] == group and len(v) >= min_records]
        iters, medians = np.array(points, dtype=float).reshape(-1, 2).T
        # Two I close together put the line's intercept far from the data, where noise dominates it.
        if len(points) >= 2 and iters.max() >= 2 * iters.min():
            intercepts.append(float(np.polyfit(iters, medians, 1)[1]))
    return max(0.0, float(np.median(intercepts))) if intercepts else 0.0


def fit_uplink(records: Sequence[EnergyRecord]) -> UplinkFit:
    """Fit joules_per_message and joules_per_bit to the records' uplink joules."""
    used = [r for r in records if r.messages > 0 and r.uplink_bits > 0]
    if len(used) < 3:
        return UplinkFit(status=INSUFFICIENT, reason=f"need 3 or more records with an uplink; have {len(used)}")
    y = np.array([r.uplink_j for r in used], dtype=float)
    msgs = np.array([r.messages for r in used], dtype=float)
    bits = np.array([r.uplink_bits for r in used], dtype=float)
    if len({(b / m) for b, m in zip(bits, msgs)}) < 2:
        return UplinkFit(status=INSUFFICIENT, reason=f"every uplink sent {bits[0] / msgs[0]:g} bits per message; "
                         "need at least two message sizes (two uplink precisions m) to separate the cost per bit "
                         "from the cost per message")
    scale = _relative_scale(y, bits / msgs)
    design = np.stack([msgs, bits], axis=1)[None]
    coef_g, _, sigma, weights_g = _huber_nnls(design, y, scale)
    coef, weights = coef_g[0], weights_g[0]
    fitted = coef[0] * msgs + coef[1] * bits
    stderr, corr = _uncertainty(design[0] / scale[:, None], weights, sigma, ["joules_per_message", "joules_per_bit"])
    return UplinkFit(status=OK, reason="fitted", joules_per_bit=float(coef[1]), joules_per_message=float(coef[0]),
                     stderr=stderr, correlation=corr, quality=_quality(y, fitted, (y - fitted) / scale / sigma))


# --- numerics ---------------------------------------------------------------------------------------------

def _relative_scale(y: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Per-point scale of the residuals: the median |y| of the point's group (same precision), floored.

    Dividing each residual by its own reading would reward fits that run low
    (an underestimate can be off by at most 100%, an overestimate by any
    amount), which on noisy meters biased the calibrated model well below the
    measurements. The group median keeps the residuals relative, for
    precisions whose energies differ by orders of magnitude, without that bias.
    """
    magnitude = np.abs(y)
    level = np.empty_like(magnitude)
    for value in np.unique(groups):
        members = groups == value
        level[members] = np.median(magnitude[members])
    floor = 0.05 * float(np.median(magnitude)) or 1e-12
    return np.maximum(level, floor)


def _compute_design(n: np.ndarray, work: np.ndarray, alphas: np.ndarray) -> np.ndarray:
    """Design matrices for every alpha: shape (G, P, 2), columns [1, work (n/32)^alpha]."""
    powered = work[None, :] * (n[None, :] / 32.0) ** alphas[:, None]
    return np.stack([np.ones_like(powered), powered], axis=2)


def _profile_alpha(n: np.ndarray, work: np.ndarray, y: np.ndarray, scale: np.ndarray,
                   prior: tuple[float, float] | None) -> tuple[float, np.ndarray, float, np.ndarray]:
    """Minimise the Huber loss (plus the prior's penalty) over alpha: a coarse grid, then a 0.001 grid.

    The first pass only sets the robust scale; the scale is then held fixed so
    the losses of different alphas compare on one footing.
    """
    coarse = np.round(np.arange(ALPHA_RANGE[0], ALPHA_RANGE[1] + 1e-9, 0.05), 10)

    def penalty(alphas: np.ndarray) -> np.ndarray:
        return np.zeros_like(alphas) if prior is None else 0.5 * ((alphas - prior[0]) / prior[1]) ** 2

    _, loss, _, _ = _huber_nnls(_compute_design(n, work, coarse), y, scale)
    best = coarse[int(np.argmin(loss + penalty(coarse)))]
    _, _, sigma, _ = _huber_nnls(_compute_design(n, work, np.array([best])), y, scale)
    _, loss, _, _ = _huber_nnls(_compute_design(n, work, coarse), y, scale, sigma=sigma)
    best = coarse[int(np.argmin(loss + penalty(coarse)))]
    fine = np.clip(np.arange(best - 0.06, best + 0.06 + 1e-9, 0.001), *ALPHA_RANGE)
    coef, loss, _, weights = _huber_nnls(_compute_design(n, work, fine), y, scale, sigma=sigma)
    i = int(np.argmin(loss + penalty(fine)))
    return float(fine[i]), coef[i], sigma, weights[i]


def _huber_nnls(design: np.ndarray, y: np.ndarray, scale: np.ndarray, *, sigma: float | None = None,
                iterations: int = 30) -> tuple[np.ndarray, np.ndarray, float, np.ndarray]:
    """Huber IRLS with two non-negative coefficients, vectorised over G design matrices (G, P, 2).

    Residuals are divided by ``scale`` (relative residuals). With ``sigma``
    None the robust scale is re-estimated (1.4826 MAD) each iteration, from the
    first design. Returns (coefficients (G, 2), Huber loss (G,), sigma, weights (G, P)).
    """
    xs = design / scale[None, :, None]
    ys = y / scale
    weights = np.ones(xs.shape[:2])
    coef = _nnls2(xs, ys, weights)
    fixed_sigma = sigma
    for _ in range(iterations):
        resid = ys[None, :] - np.einsum("gpk,gk->gp", xs, coef)
        if fixed_sigma is None:
            sigma = _robust_sigma(resid[0])
        z = np.abs(resid) / sigma
        new_weights = np.where(z <= HUBER_K, 1.0, HUBER_K / np.maximum(z, 1e-300))
        new_coef = _nnls2(xs, ys, new_weights)
        done = np.allclose(new_coef, coef, rtol=1e-7, atol=0.0)
        coef, weights = new_coef, new_weights
        if done:
            break
    resid = ys[None, :] - np.einsum("gpk,gk->gp", xs, coef)
    if fixed_sigma is None:
        sigma = _robust_sigma(resid[0])
    z = np.abs(resid) / sigma
    loss = np.sum(np.where(z <= HUBER_K, 0.5 * z ** 2, HUBER_K * z - 0.5 * HUBER_K ** 2), axis=1)
    weights = np.where(z <= HUBER_K, 1.0, HUBER_K / np.maximum(z, 1e-300))
    return coef, loss, float(sigma), weights


def _robust_sigma(resid: np.ndarray) -> float:
    mad = float(np.median(np.abs(resid - np.median(resid))))
    return max(1.4826 * mad, 1e-9)


def _nnls2(xs: np.ndarray, ys: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Weighted least squares with two non-negative coefficients, for G problems at once.

    Solves the 2x2 normal equations; where a coefficient comes out negative the
    best single-column fit (or zero) replaces it, which is the exact NNLS answer
    for two unknowns.
    """
    a = xs[..., 0]
    b = xs[..., 1]
    w = weights
    saa = np.sum(w * a * a, axis=1)
    sbb = np.sum(w * b * b, axis=1)
    sab = np.sum(w * a * b, axis=1)
    say = np.sum(w * a * ys, axis=1)
    sby = np.sum(w * b * ys, axis=1)
    det = saa * sbb - sab ** 2
    with np.errstate(divide="ignore", invalid="ignore"):
        ca = (sbb * say - sab * sby) / det
        cb = (saa * sby - sab * say) / det
        only_a = np.where(saa > 0, np.maximum(say / saa, 0.0), 0.0)
        only_b = np.where(sbb > 0, np.maximum(sby / sbb, 0.0), 0.0)
    both_ok = (det > 1e-12 * saa * sbb) & (ca >= 0) & (cb >= 0)
    # Among the boundary solutions pick the one with the smaller weighted residual.
    ra = np.sum(w * (ys[None, :] - only_a[:, None] * a) ** 2, axis=1)
    rb = np.sum(w * (ys[None, :] - only_b[:, None] * b) ** 2, axis=1)
    pick_a = ra <= rb
    out_a = np.where(both_ok, ca, np.where(pick_a, only_a, 0.0))
    out_b = np.where(both_ok, cb, np.where(pick_a, 0.0, only_b))
    return np.stack([np.nan_to_num(out_a), np.nan_to_num(out_b)], axis=1)


def _uncertainty(jac: np.ndarray, weights: np.ndarray, sigma: float, names: list[str],
                 prior_precision: np.ndarray | None = None) -> tuple[dict[str, float | None], list[list[float]]]:
    """Standard errors and correlation from the Gauss-Newton information J^T W J / sigma^2 (+ prior precision).

    Columns are scaled to unit norm before inverting (the parameters differ by
    many orders of magnitude); sigma^2 is inflated by points / (points - parameters).
    """
    norms = np.linalg.norm(jac, axis=0)
    norms[norms == 0] = 1.0
    scaled = jac / norms
    dof = max(jac.shape[0] - jac.shape[1], 1)
    variance = sigma ** 2 * jac.shape[0] / dof
    info = scaled.T @ (weights[:, None] * scaled) / variance
    if prior_precision is not None:
        info = info + np.diag(prior_precision / norms ** 2)
    cov = np.linalg.pinv(info) / np.outer(norms, norms)
    se = np.sqrt(np.maximum(np.diag(cov), 0.0))
    degenerate = np.diag(info) < 1e-12 / variance
    stderr = {name: (None if bad else float(value)) for name, value, bad in zip(names, se, degenerate)}
    with np.errstate(divide="ignore", invalid="ignore"):
        corr = cov / np.outer(se, se)
    corr = np.where(np.isfinite(corr), corr, 0.0)
    np.fill_diagonal(corr, 1.0)
    return stderr, np.clip(corr, -1.0, 1.0).tolist()


def _quality(y: np.ndarray, fitted: np.ndarray, z: np.ndarray) -> FitQuality:
    """R^2 and MAPE over the inliers (|z| <= 3), so a few flagged outliers do not hide a good fit."""
    inlier = np.abs(z) <= OUTLIER_Z
    yi, fi = y[inlier], fitted[inlier]
    ss_tot = float(np.sum((yi - yi.mean()) ** 2)) if yi.size else 0.0
    r2 = 1.0 - float(np.sum((yi - fi) ** 2)) / ss_tot if ss_tot > 0 else None
    nonzero = np.abs(yi) > 0
    mape = float(np.mean(np.abs(yi[nonzero] - fi[nonzero]) / np.abs(yi[nonzero]))) if nonzero.any() else None
    return FitQuality(points=int(y.size), outliers=int(np.sum(~inlier)), r2=r2, mape=mape)


def _per_n_table(n: np.ndarray, y: np.ndarray, min_records: int) -> tuple[PerNEnergy, ...]:
    entries = []
    for value in sorted({int(v) for v in n}):
        sel = y[n == value]
        if sel.size >= min_records:
            med = float(np.median(sel))
            entries.append(PerNEnergy(n=value, joules_per_iter=med,
                                      spread_j=float(1.4826 * np.median(np.abs(sel - med))), records=int(sel.size)))
    return tuple(entries)


# --- (de)serialisation ------------------------------------------------------------------------------------

def _clean(value: Any) -> Any:
    """Replace non-finite floats by None so the dict is strict JSON."""
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _quality_from_dict(data: Mapping[str, Any] | None) -> FitQuality | None:
    return None if data is None else FitQuality(**data)


def _device_from_dict(data: Mapping[str, Any]) -> DeviceCalibration:
    c = dict(data["compute"])
    c["quality"] = _quality_from_dict(c.get("quality"))
    c["table"] = tuple(PerNEnergy(**entry) for entry in c.get("table", ()))
    if c.get("alpha_prior") is not None:
        c["alpha_prior"] = tuple(c["alpha_prior"])
    u = dict(data["uplink"])
    u["quality"] = _quality_from_dict(u.get("quality"))
    return DeviceCalibration(device=str(data["device"]), records=int(data["records"]),
                             compute=ComputeFit(**c), uplink=UplinkFit(**u))
