"""The sweep's report section: energy to target over (n, m) as one heatmap per I, and the policy table.

    write_sweep_report(result, Path("sweeps/a"))   # sweeps/a/report.html, sweeps/a/heatmap-I<I>.png
"""

from __future__ import annotations

import base64
import html
import io
import math
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from basestation.report.tables import count_of


def heatmap_png(result: Mapping[str, Any], iterations: int) -> bytes:
    """PNG of the mean energy to target (J) over n (rows) and m (columns) at local iterations ``iterations``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = result["scenario"]["grid"]
    ns, ms = list(grid["bits"]), list(grid["uplink_bits"])
    values = np.full((len(ns), len(ms)), np.nan)
    for (n, m), energy in _means(result, iterations).items():
        if energy is not None:
            values[ns.index(n), ms.index(m)] = energy
    fig, ax = plt.subplots(figsize=(1.2 * len(ms) + 2.2, 1.0 * len(ns) + 1.6))
    image = ax.imshow(values, cmap="viridis_r", origin="lower", aspect="auto")
    ax.set_xticks(range(len(ms)), [str(m) for m in ms])
    ax.set_yticks(range(len(ns)), [str(n) for n in ns])
    ax.set_xlabel("uplink bits m")
    ax.set_ylabel("training bits n")
    best = result.get("hindsight_best")
    for i, j in np.ndindex(values.shape):
        text = "never" if math.isnan(values[i, j]) else f"{values[i, j]:.3g}"  # neighbours differ by a few %
        star = best is not None and (ns[i], ms[j], iterations) == (best["n"], best["m"], best["I"])
        light = math.isnan(values[i, j]) or image.norm(values[i, j]) < 0.5  # viridis_r is light at the low end
        ax.text(j, i, text + (" *" if star else ""), ha="center", va="center", fontsize=8,
                color="black" if light else "white")
    s = result["scenario"]
    ax.set_title(f"energy to {result['target_accuracy']:.2f} (J), I={iterations}\n{s['model']}, {s['board']}, "
                 f"{s['link']}, mean of {count_of(s['seeds'], 'seed')}", fontsize=9)
    if not np.isnan(values).all():  # a scale for no values would only show matplotlib's default range
        fig.colorbar(image, ax=ax, label="J")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def _values(values: Any) -> str:
    return ", ".join(str(v) for v in values)


def _means(result: Mapping[str, Any], iterations: int) -> dict[tuple[int, int], float | None]:
    groups: dict[tuple[int, int], list[float | None]] = {}
    for row in result["settings"]:
        if row["I"] == iterations:
            groups.setdefault((row["n"], row["m"]), []).append(row["energy_to_target_j"])
    return {k: (None if any(v is None for v in vals) else float(np.mean(vals))) for k, vals in groups.items()}


def policy_rows(result: Mapping[str, Any]) -> list[list[str]]:
    """Policy, energy to target, regret, saving vs fl32, settings used (from the runs)."""
    rows = []
    for name, p in result["policies"].items():
        used = sorted({f"{b[0]}/{b[1]}/I{i}" for key, run in result.get("policy_runs", {}).items()
                       if key.startswith(f"policy-{name}-")
                       for b, i in zip(run.get("bits") or [], run.get("iterations") or [])})
        rows.append([name, _j(p["energy_to_target_j"]), _pct(p["regret"]), _pct(p["saving_vs_fl32"]),
                     ", ".join(used) or "-"])
    return rows


def write_sweep_report(result: Mapping[str, Any], out: Path) -> Path:
    """Write ``out/report.html`` (heatmaps embedded) and one PNG per I; returns the HTML path."""
    parts = [f"<h1>qfl sweep: energy to target accuracy {result['target_accuracy']:.2f}</h1>"]
    s = result["scenario"]
    parts.append(f"<p>{html.escape(s['model'])} on {html.escape(s['board'])} over {html.escape(s['link'])}, "
                 f"{s['devices']} devices, grid n = {_values(s['grid']['bits'])}, m = "
                 f"{_values(s['grid']['uplink_bits'])}, I = {_values(s['grid']['iterations'])}, "
                 f"{count_of(s['seeds'], 'seed')}, at most {s['max_rounds']} rounds.</p>")
    best = result.get("hindsight_best")
    parts.append("<p>Hindsight best: " + ("none reached the target on every seed" if best is None else
                 f"n={best['n']}, m={best['m']}, I={best['I']}: {best['energy_to_target_j']:.2f} J") + "</p>")
    parts.append("<h2>Policies</h2><table border=1 cellpadding=4><tr><th>policy</th><th>energy to target J</th>"
                 "<th>regret</th><th>saving vs fl32</th><th>settings used n/m/I</th></tr>")
    for row in policy_rows(result):
        parts.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>")
    parts.append("</table>")
    conv = result.get("convergence_model") or {}
    for label in ("leave_one_setting_out", "leave_one_I_out"):
        if label in conv:
            e = conv[label]
            parts.append(f"<p>Rounds model, {label.replace('_', ' ')}: {e['settings']} settings, "
                         f"{_share(e['share_within'])} within 25%, median |error| "
                         f"{_share(e['median_abs_error'])}</p>")
    if "leave_one_I_out" in conv and len(s["grid"]["iterations"]) < 3:
        parts.append("<p>With fewer than three I in the grid, each held-out I is predicted from curves at one I "
                     "or none, where the exponent of I is the prior (-1), not a fit. A grid with three or more I "
                     "tests how rounds scale with I.</p>")
    wape = result.get("calibration_wape_by_phase") or {}
    for phase in ("train", "uplink"):
        if isinstance(wape.get(phase), dict) and wape[phase].get("wape_calibrated_pct") is not None:
            w = wape[phase]
            parts.append(f"<p>Energy model, {phase} phase: WAPE {w['wape_model_pct']:.0f}% before calibration, "
                         f"{w['wape_calibrated_pct']:.0f}% after"
                         + (f", {w['wape_calibrated_table_pct']:.0f}% with the per-n table"
                            if w.get("wape_calibrated_table_pct") is not None else "")
                         + f" ({w['records']} phases"
                         f"{', fit held out by seed' if wape.get('held_out_by_seed') else ', in-sample fit'}).</p>")
    parts.append("<h2>Energy to target over (n, m)</h2>")
    for iterations in s["grid"]["iterations"]:
        png = heatmap_png(result, iterations)
        (out / f"heatmap-I{iterations}.png").write_bytes(png)
        parts.append(f'<img alt="heatmap I={iterations}" src="data:image/png;base64,'
                     f'{base64.b64encode(png).decode()}">')
    path = out / "report.html"
    path.write_text("<!doctype html><meta charset=utf-8><title>qfl sweep</title>\n" + "\n".join(parts) + "\n")
    return path


def _j(value: float | None) -> str:
    return "not reached" if value is None else f"{value:.2f}"


def _share(value: float | None) -> str:
    """A share or a magnitude as a percentage, unsigned (``_pct`` signs changes)."""
    return "-" if value is None else f"{value:.1%}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:+.1%}" if value < 0 or value > 0 else "0.0%"
