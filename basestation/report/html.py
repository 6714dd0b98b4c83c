"""The self-contained ``report.html``: figures embedded as base64 PNG, tables, inline CSS.

The page loads nothing from anywhere (no scripts, fonts, style sheets or
remote images), so it can be mailed or archived as one file. Every piece of
text that comes from a run (names, devices, config values) is escaped.

    >>> page = render_page(title="qfl-testbed report", generated="2026-01-01 12:00 UTC", target=0.9,
    ...                    sections=[...], comparison=table, comparison_figures=[...], files=["rounds.csv"])
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field

from basestation.report.tables import Table, format_value

STYLE = """
body { font-family: -apple-system, 'Segoe UI', 'DejaVu Sans', Helvetica, Arial, sans-serif; color: #1d1d1d;
       background: #ffffff; margin: 0; line-height: 1.45; }
main { max-width: 1000px; margin: 0 auto; padding: 1.5rem 1.5rem 3rem; }
h1 { font-size: 1.6rem; margin-bottom: 0.2rem; }
h2 { font-size: 1.3rem; border-bottom: 2px solid #1f4e79; padding-bottom: 0.2rem; margin-top: 2.2rem; }
h3 { font-size: 1.05rem; margin-top: 1.6rem; }
.meta { color: #555555; margin-top: 0; }
table { border-collapse: collapse; margin: 0.6rem 0 1rem; font-size: 0.88rem; }
th, td { border: 1px solid #d0d7de; padding: 0.25rem 0.55rem; text-align: right; }
th { background: #eef2f7; }
td.text, th.text { text-align: left; }
table.kv th { text-align: left; width: 16rem; }
figure { margin: 0.8rem 0 1.4rem; }
figure img { max-width: 100%; height: auto; border: 1px solid #e3e3e3; }
figcaption { font-size: 0.85rem; color: #444444; }
.notes { background: #fff8e1; border-left: 4px solid #e0a800; padding: 0.5rem 1rem 0.5rem 1.8rem; }
.missing { color: #8a5300; font-style: italic; }
details summary { cursor: pointer; color: #1f4e79; }
code { font-size: 0.9em; }
.scroll { overflow-x: auto; }
"""


@dataclass(frozen=True)
class FigureImage:
    """A rendered figure: its PNG bytes, title and caption, and the file it was also saved as."""

    key: str
    title: str
    caption: str
    png: bytes
    filename: str


@dataclass(frozen=True)
class RunSection:
    """What the page shows for one run: summary lines, notes, figures and that run's tables."""

    name: str
    slug: str
    path: str
    summary: list[tuple[str, str]]
    notes: list[str]
    figures: dict[str, FigureImage]
    missing: dict[str, str]
    tables: dict[str, Table]
    config: dict = field(default_factory=dict)


def data_uri(png: bytes) -> str:
    """PNG bytes as a ``data:image/png;base64,...`` URI."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _e(text) -> str:
    return html.escape(str(text), quote=True)


def render_table(table: Table, *, empty: str = "nothing to show") -> str:
    """A :class:`Table` as an HTML table, values formatted by column kind."""
    if not table.rows:
        return f'<p class="missing">{_e(empty)}</p>'
    head = "".join(f'<th class="{"text" if c.kind == "text" else "num"}">{_e(c.heading)}</th>'
                   for c in table.columns)
    body = []
    for row in table.rows:
        cells = "".join(f'<td class="{"text" if c.kind == "text" else "num"}">{_e(format_value(v, c.kind))}</td>'
                        for c, v in zip(table.columns, row))
        body.append(f"<tr>{cells}</tr>")
    return (f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'
            "</div>")


def render_figure(fig: FigureImage) -> str:
    """An embedded figure with its caption; the alt text is the title."""
    return (f'<figure id="fig-{_e(fig.key)}"><img src="{data_uri(fig.png)}" alt="{_e(fig.title)}">'
            f"<figcaption><b>{_e(fig.title)}.</b> {_e(fig.caption)} "
            f"(also <code>figures/{_e(fig.filename)}</code>)</figcaption></figure>")


def _figure_or_reason(section: RunSection, key: str) -> str:
    if key in section.figures:
        return render_figure(section.figures[key])
    reason = section.missing.get(key, "not drawn")
    return f'<p class="missing">{_e(reason)}</p>'


def _kv(rows: list[tuple[str, str]]) -> str:
    body = "".join(f"<tr><th>{_e(k)}</th><td class=\"text\">{_e(v)}</td></tr>" for k, v in rows)
    return f'<table class="kv"><tbody>{body}</tbody></table>'


def _flatten(config: dict, prefix: str = "") -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            rows += _flatten(value, name + ".")
        else:
            rows.append((name, _config_value(value)))
    return rows


def _config_value(value: object) -> str:
    """A config value as its file would spell it: booleans lower case, an unset one as a dash."""
    if value is None:
        return "\u2013"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def render_section(section: RunSection) -> str:
    """One run's part of the page."""
    parts = [f'<section id="run-{_e(section.slug)}"><h2>Run {_e(section.name)}</h2>',
             f'<p class="meta">from <code>{_e(section.path)}</code></p>', _kv(section.summary)]
    if section.notes:
        parts.append('<ul class="notes">' + "".join(f"<li>{_e(n)}</li>" for n in section.notes) + "</ul>")
    parts += ["<h3>Accuracy</h3>", _figure_or_reason(section, "accuracy")]
    parts += ["<h3>Energy: measured and modelled</h3>", _figure_or_reason(section, "energy-rounds")]
    errors = section.tables["errors"]
    parts += ["<p>Measured energy above idle beside the model before and after calibration, with the mean "
              "(MAPE) and the energy-weighted (WAPE) absolute percentage error over the energy reports of each "
              "group.</p>",
              render_table(errors.where("group", "all").without("group", "key"), empty="no energy reports"),
              render_table(errors.where("group", "phase").without("group"), empty="no energy reports"),
              _figure_or_reason(section, "energy-devices"),
              "<details><summary>Per device</summary>",
              render_table(errors.where("group", "device").without("group"), empty="no energy reports"),
              "</details>"]
    parts.append("<h3>Agreement with the emulator's ground truth</h3>")
    parts.append(render_table(section.tables["ground_truth"],
                              empty="no ground-truth logs for this run (real meters, or the emulator wrote none)"))
    parts += ["<h3>Precision</h3>", _figure_or_reason(section, "precision")]
    decisions = section.tables["decisions"]
    if decisions.rows:
        parts += ["<details><summary>Solver decisions</summary>", render_table(decisions), "</details>"]
    parts += ["<h3>Refused and dropped messages</h3>",
              render_table(section.tables["rejections"], empty="the basestation refused nothing in this run")]
    parts += ["<h3>Rounds</h3>", "<details><summary>All rounds</summary>",
              render_table(section.tables["rounds"], empty="no rounds recorded"), "</details>"]
    if section.config:
        parts += ["<h3>Configuration</h3>", "<details><summary>Run configuration</summary>",
                  _kv(_flatten(section.config)), "</details>"]
    parts.append("</section>")
    return "\n".join(parts)


def render_page(*, title: str, generated: str, target: float, sections: list[RunSection], comparison: Table,
                comparison_figures: list[FigureImage], files: list[str],
                comparison_missing: list[str] | None = None) -> str:
    """The whole report page as one HTML string."""
    names = ", ".join(s.name for s in sections)
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             '<meta name="viewport" content="width=device-width, initial-scale=1">',
             f"<title>{_e(title)}</title><style>{STYLE}</style></head><body><main>",
             f"<h1>{_e(title)}</h1>",
             f'<p class="meta">{len(sections)} run{"s" if len(sections) != 1 else ""}: {_e(names)}. '
             f"Target accuracy {target:g}. Written {_e(generated)}.</p>",
             "<h2>Energy to reach the target accuracy</h2>",
             "<p>The first round whose test accuracy is at least the target, and the measured energy of all "
             "devices and phases up to and including it. The saving is relative to the baseline run.</p>",
             render_table(comparison, empty="no runs")]
    parts += [render_figure(f) for f in comparison_figures]
    parts += [f'<p class="missing">{_e(reason)}</p>' for reason in comparison_missing or []]
    parts += [render_section(s) for s in sections]
    parts += ["<h2>Files</h2>", "<p>Written beside this page:</p>",
              "<ul>" + "".join(f"<li><code>{_e(f)}</code></li>" for f in files) + "</ul>",
              "</main></body></html>"]
    return "\n".join(parts) + "\n"
