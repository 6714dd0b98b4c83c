"""How well the calibrated testbed energy model predicts the sweep's measured phases, per phase (WAPE).

The fit is held out by seed: the records of every fixed run on the other
seeds calibrate the model (``basestation.energy.calibration.calibrate``, the
fit the basestation makes), which then predicts every train and uplink phase
of this seed's fixed runs. With one seed the fit is in-sample (said in the
result). WAPE = sum |predicted - measured| / sum measured, energies above
idle, as in the report (``basestation.report.metrics.wape``).

Training is scored twice: by the paper's form the fit gives
(``fixed + MACs * A * (n/32)^alpha``, ``wape_calibrated_pct``) and with the
fit's per-n table of median measured joules per iteration where it has one
(``wape_calibrated_table_pct``, ``TestbedEnergy(use_table=True)``).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping

from basestation.energy.records import EnergyRecord


def _records(run_dir: Path, experiment: str) -> list[EnergyRecord]:
    from basestation.store import Store

    store = Store(run_dir / "store.sqlite", readonly=True)
    try:
        out = []
        for report in store.energy_reports(experiment):
            phases = (report.get("meter") or {}).get("phases") or {}
            train, uplink = phases.get("train") or {}, phases.get("uplink") or {}
            if train.get("joules_above_idle") is None or uplink.get("joules_above_idle") is None:
                continue
            out.append(EnergyRecord(device=report["device"], round=report["round"], n=report["n"], m=report["m"],
                                    local_iters=report["iterations"], batch_size=report["batch_size"],
                                    train_j=train["joules_above_idle"], uplink_j=uplink["joules_above_idle"],
                                    uplink_bits=int((report.get("uplink") or {}).get("bytes", 0)) * 8))
        return out
    finally:
        store.close()


def held_out_wape(results: Mapping[str, Mapping[str, Any]], model: str) -> dict[str, Any]:
    """Per phase: WAPE of the prior model and of the seed-held-out calibrated model over the fixed runs."""
    from basestation.energy.calibration import calibrate
    from basestation.energy.testbed_model import PI4_DEFAULTS
    from basestation.report.predict import Work, phase_energy
    from models import counts, get_architecture

    by_seed: dict[int, list[EnergyRecord]] = {}
    for key, row in results.items():
        if row["kind"] == "fixed":
            by_seed.setdefault(row["seed"], []).extend(_records(Path(row["run_dir"]), key))
    macs = counts(get_architecture(model)).macs
    sums = {phase: {"measured": 0.0, "model_abs": 0.0, "cal_abs": 0.0, "table_abs": 0.0, "model": 0.0, "cal": 0.0,
                    "records": 0} for phase in ("train", "uplink")}
    in_sample = len(by_seed) < 2
    for seed, records in by_seed.items():
        train_on = [r for s, rs in by_seed.items() if s != seed or in_sample for r in rs]
        cal = calibrate(train_on, macs_per_sample=macs, alpha_prior=PI4_DEFAULTS.alpha)
        for r in records:
            fitted = cal.for_device(r.device, min_records=10)
            params = PI4_DEFAULTS.with_calibration(fitted, table=False)
            work = Work(n=r.n, m=r.m, iterations=r.local_iters, batch_size=r.batch_size, model=model,
                        uplink_bits=r.uplink_bits)
            for phase, measured in (("train", r.train_j), ("uplink", r.uplink_j)):
                prior = phase_energy(PI4_DEFAULTS, phase, work)
                after = phase_energy(params, phase, work)
                s = sums[phase]
                s["measured"] += measured
                s["model_abs"] += abs(prior - measured)
                s["cal_abs"] += abs(after - measured)
                if phase == "train":  # the per-n table is of training energy only
                    tabled = PI4_DEFAULTS.with_calibration(fitted, table=True)
                    s["table_abs"] += abs(phase_energy(tabled, phase, work, use_table=True) - measured)
                s["model"] += prior
                s["cal"] += after
                s["records"] += 1
    out: dict[str, Any] = {"held_out_by_seed": not in_sample}
    for phase, s in sums.items():
        ok = s["measured"] > 0 and math.isfinite(s["measured"])
        out[phase] = {"records": s["records"], "measured_above_idle_j": s["measured"], "model_j": s["model"],
                      "calibrated_j": s["cal"],
                      "wape_model_pct": 100 * s["model_abs"] / s["measured"] if ok else None,
                      "wape_calibrated_pct": 100 * s["cal_abs"] / s["measured"] if ok else None}
        if phase == "train":
            out[phase]["wape_calibrated_table_pct"] = 100 * s["table_abs"] / s["measured"] if ok else None
    return out
