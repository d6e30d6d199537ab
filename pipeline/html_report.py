"""A batch's quality report as one self-contained HTML page: tables and Plotly charts, from ``reports/``.

Rendered from the batches' JSON reports alone (no Delta table is read), so it works wherever the reports
are. plotly.js is embedded once in the page: the file opens offline, from S3 or a laptop. Every piece of
data (file names, reasons, rejected records) is user data and is HTML-escaped, in the tables and in the
charts' labels alike. Plotly is imported when a page is rendered, not with this module.
"""

from __future__ import annotations

import functools
import html
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from pipeline.errors import UsageError
from pipeline.manifest import REPORTS
from pipeline.report import BatchReport, StepReport, load_report

if TYPE_CHECKING:
    from pipeline.storage import Store

# The most bars a chart of reasons or files shows; the rest are summed into one bar.
TOP = 15
# The most sample rows the page lists (the reports keep a few per reason and table).
MAX_SAMPLES = 60
# A record longer than this is cut in the samples table.
MAX_RECORD = 500
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
_TABLE_COLOURS = {"products": "#4c78a8", "orders": "#f58518", "order_items": "#54a24b"}
_OTHER_COLOURS = ("#b279a2", "#e45756", "#72b7b2", "#9d755d")


def html_report_key(batch_id: str) -> str:
    return f"{REPORTS}/{batch_id}.html"


def finished_batches(store: Store) -> list[str]:
    """The ids of the batches that have a final report, oldest first (batch ids sort by time)."""
    return sorted(
        info.key.rsplit("/", 1)[-1].removesuffix(".json")
        for info in store.list(f"{REPORTS}/")
        if info.key.endswith(".json") and info.key.count("/") == 1
    )


def reports_until(
    store: Store, batch_id: str | None, last: int, report: BatchReport | None = None
) -> list[BatchReport]:
    """The report of ``batch_id`` (default: the newest finished batch) and up to ``last - 1`` finished
    batches before it, oldest first. ``report``: that batch's report, when the caller holds it already
    (it need not be stored yet)."""
    if last < 1:
        raise UsageError(f"--last must be at least 1, not {last}")
    finished = finished_batches(store)
    if batch_id is None:
        if report is not None:
            batch_id = report.batch_id
        elif finished:
            batch_id = finished[-1]
        else:
            raise UsageError(f"no batch has finished under {store.root} yet: there is nothing to report")
    if report is None:
        report = load_report(store, batch_id)
        if report is None:
            raise UsageError(
                f"batch {batch_id} has no report under {store.root} (unfinished, or no such batch)"
            )
    earlier = [other for other in finished if other < batch_id][-(last - 1) :] if last > 1 else []
    reports = [loaded for loaded in (load_report(store, other) for other in earlier) if loaded is not None]
    return [*reports, report]


def write_batch_report(store: Store, batch_id: str, last: int = 10, report: BatchReport | None = None) -> str:
    """Write ``reports/<batch_id>.html``: that batch in detail, the trend over it and up to ``last - 1``
    batches before it. Returns the key written."""
    key = html_report_key(batch_id)
    store.write_bytes(key, render(reports_until(store, batch_id, last, report)).encode())
    return key


def render(reports: Sequence[BatchReport]) -> str:
    """The page: the newest of ``reports`` (by batch id) in detail, and the trend over all of them."""
    if not reports:
        raise ValueError("render needs at least one batch report")
    ordered = sorted(reports, key=lambda report: report.batch_id)
    batch = ordered[-1]
    charts = _Charts()
    body = [
        _header(batch),
        _summary(batch),
        _section("Quality gates", _gates_table(batch.steps)),
        _section("Rows per table", _steps_table(batch.steps) + charts.rows_per_table(batch.steps)),
        _section("Rejected rows by reason", charts.by_reason(batch.steps)),
        _section("Rejected rows by partition", charts.by_partition(batch.steps)),
        _section("Rejected rows by source file", charts.by_file(batch.steps)),
        _section("Samples of rejected rows", _samples_table(batch.steps)),
        _section(
            f"Trend over the last {len(ordered)} batches", charts.trend(ordered) + _trend_table(ordered)
        ),
    ]
    return _PAGE.format(
        title=_e(f"Batch {batch.batch_id}: quality report"),
        style=_STYLE,
        plotlyjs=charts.plotlyjs(),
        body="\n".join(body),
    )


# -- the page's parts ---------------------------------------------------------------------------------


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _n(value: float) -> str:
    return f"{value:,}" if isinstance(value, int) else f"{value:,.2f}"


def _share(part: float, whole: float) -> str:
    return f"{part / whole:.2%}" if whole else "-"


def _section(title: str, content: str) -> str:
    anchor = re.sub(r"[^a-z]+", "-", title.lower()).strip("-")
    return f'<section id="{anchor}">\n<h2>{_e(title)}</h2>\n{content}\n</section>'


def _empty(text: str) -> str:
    return f'<p class="empty">{_e(text)}</p>'


def _written(step: StepReport) -> int:
    return step.inserted + step.updated


def _header(batch: BatchReport) -> str:
    facts = [
        ("started", batch.started_at),
        ("finished", batch.finished_at),
        ("duration", f"{batch.seconds:,.1f} s"),
        ("files archived", f"{batch.archived_files:,}"),
    ]
    if batch.cost.get("usd") is not None:
        facts.append(("cost on AWS", _cost_text(batch.cost)))
    if batch.table_counts:
        facts.append(
            ("rows now", ", ".join(f"{name} {count:,}" for name, count in batch.table_counts.items()))
        )
    listing = "".join(f"<dt>{_e(name)}</dt><dd>{_e(value)}</dd>" for name, value in facts)
    notes = "".join(f"<li>{_e(note)}</li>" for note in batch.notes)
    return (
        f'<header>\n<h1>Batch <span class="batch-id">{_e(batch.batch_id)}</span> '
        f'<span class="status status-{_e(batch.status)}">{_e(batch.status)}</span></h1>\n'
        f"<dl>{listing}</dl>\n" + (f'<ul class="notes">{notes}</ul>\n' if notes else "") + "</header>"
    )


def _cost_text(cost: Mapping[str, Any]) -> str:
    from pipeline.costs import cost_line

    try:
        return cost_line(cost)
    except (KeyError, TypeError, ValueError):  # a report of another version: the total alone
        return f"${float(cost['usd']):.4f}"


def _summary(batch: BatchReport) -> str:
    rows_in = sum(step.rows_in for step in batch.steps)
    rejected = sum(step.rejected for step in batch.steps)
    gates = [gate for step in batch.steps for gate in step.gates]
    cards = [
        ("rows in", f"{rows_in:,}"),
        ("written", f"{sum(_written(step) for step in batch.steps):,}"),
        ("rejected", f"{rejected:,}"),
        ("rejected share", _share(rejected, rows_in)),
    ]
    if gates:
        failing = sum(gate.get("outcome") in ("warned", "failed") for gate in gates)
        cards.append(("gates passed", f"{len(gates) - failing} of {len(gates)}"))
    inner = "".join(
        f'<div class="card"><div class="value">{_e(value)}</div><div class="label">{_e(label)}</div></div>'
        for label, value in cards
    )
    return f'<div class="cards">{inner}</div>'


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], numeric: set[int], css: str = "") -> str:
    """A table of already escaped cells; the columns in ``numeric`` are right-aligned."""
    head = "".join(
        f"<th{' class=num' if index in numeric else ''}>{_e(h)}</th>" for index, h in enumerate(headers)
    )
    body = "".join(
        "<tr>"
        + "".join(f"<td{' class=num' if i in numeric else ''}>{cell}</td>" for i, cell in enumerate(row))
        + "</tr>"
        for row in rows
    )
    return f'<table class="{css}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _steps_table(steps: Sequence[StepReport]) -> str:
    if not steps:
        return _empty("This batch has no step reports.")
    rows = [
        [
            _e(step.table),
            _e(f"{step.files:,}"),
            _e(f"{step.rows_in:,}"),
            _e(f"{step.inserted:,}"),
            _e(f"{step.updated:,}"),
            _e(f"{step.unchanged:,}"),
            _e(f"{step.rejected:,}"),
            _e(_share(step.rejected, step.rows_in)),
            _e(f"{step.seconds:,.2f}"),
            _e("-" if step.delta_version is None else step.delta_version),
        ]
        for step in steps
    ]
    headers = ("table", "files", "rows in", "inserted", "updated", "unchanged", "rejected", "rejected %")
    return _table((*headers, "seconds", "Delta version"), rows, set(range(1, 10)), "steps")


def _gate_value(gate: Mapping[str, Any], name: str) -> str:
    value = gate.get(name)
    if value is None:
        return "-"
    if gate.get("measure") == "share" and isinstance(value, (int, float)):
        return f"{value:.2%}"
    return _n(value) if isinstance(value, (int, float)) else str(value)


def _gates_table(steps: Sequence[StepReport]) -> str:
    gates = [gate for step in steps for gate in step.gates]
    if not gates:
        return _empty(
            "No quality gate was judged in this batch (none configured, or the report predates them)."
        )
    rows = []
    for gate in gates:
        outcome = str(gate.get("outcome", "-"))
        rows.append(
            [
                _e(gate.get("table", "-")),
                _e("all reasons" if gate.get("reason") is None else gate["reason"]),
                _e(gate.get("measure", "-")),
                _e(_gate_value(gate, "observed")),
                _e(_gate_value(gate, "threshold")),
                _e(gate.get("level", "-")),
                f'<span class="outcome outcome-{_e(outcome)}">{_e(outcome)}</span>',
            ]
        )
    return _table(
        ("table", "reason", "measure", "observed", "threshold", "level", "outcome"), rows, {3, 4}, "gates"
    )


def _samples_table(steps: Sequence[StepReport]) -> str:
    samples = [(step.table, sample) for step in steps for sample in step.rejected_samples]
    if not samples:
        rejected = sum(step.rejected for step in steps)
        return _empty(
            "No row was rejected."
            if not rejected
            else "This batch's report holds no samples of its rejected rows."
        )
    rows = []
    for table, sample in samples[:MAX_SAMPLES]:
        record = str(sample.get("record", ""))
        cut = len(record) > MAX_RECORD
        line = sample.get("source_line")
        where = f"{sample.get('source_file', '?')}:{'?' if line is None else line}"
        reasons = sample.get("reasons") or []
        rows.append(
            [
                _e(table),
                f"<code>{_e(where)}</code>",
                _e(", ".join(str(reason) for reason in reasons)),
                f"<pre>{_e(record[:MAX_RECORD])}{'…' if cut else ''}</pre>",
            ]
        )
    more = len(samples) - MAX_SAMPLES
    tail = _empty(f"and {more:,} more samples in the JSON report") if more > 0 else ""
    return _table(("table", "file:line", "reasons", "record"), rows, set(), "samples") + tail


def _trend_table(reports: Sequence[BatchReport]) -> str:
    rows = []
    for report in reversed(reports):
        rows_in = sum(step.rows_in for step in report.steps)
        rejected = sum(step.rejected for step in report.steps)
        rows.append(
            [
                f"<code>{_e(report.batch_id)}</code>",
                f'<span class="status status-{_e(report.status)}">{_e(report.status)}</span>',
                _e(f"{rows_in:,}"),
                _e(f"{sum(_written(step) for step in report.steps):,}"),
                _e(f"{rejected:,}"),
                _e(_share(rejected, rows_in)),
                _e(f"{report.seconds:,.1f}"),
            ]
        )
    headers = ("batch", "status", "rows in", "written", "rejected", "rejected %", "seconds")
    return _table(headers, rows, {2, 3, 4, 5, 6}, "trend")


def _colour(table: str, index: int) -> str:
    return _TABLE_COLOURS.get(table, _OTHER_COLOURS[index % len(_OTHER_COLOURS)])


def _top(counts: Mapping[str, int], top: int = TOP) -> dict[str, int]:
    """The ``top`` largest counts; the rest summed under "N others"."""
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    kept = dict(ranked[:top])
    rest = ranked[top:]
    if rest:
        kept[f"{len(rest)} others"] = sum(count for _, count in rest)
    return kept


@functools.lru_cache(maxsize=1)
def _theme() -> dict[str, Any]:
    """Plotly's ``plotly_white`` template as plain data, expanded once per process."""
    import plotly.io as pio

    theme: dict[str, Any] = pio.templates["plotly_white"].to_plotly_json()
    return theme


class _Charts:
    """The page's figures, each a ``<div>`` Plotly draws in; plotly.js itself goes in the page once."""

    def __init__(self) -> None:
        self.count = 0

    def plotlyjs(self) -> str:
        from plotly.offline import get_plotlyjs

        # Once per page, inline: the file draws its charts offline (MathJax is not used, nor fetched).
        return (
            '<script type="text/javascript">window.PlotlyConfig = {MathJaxConfig: "local"};</script>\n'
            f'<script type="text/javascript">{get_plotlyjs()}</script>'
        )

    def _figure(self, name: str, traces: list[Any], height: int, **layout: Any) -> str:
        import plotly.graph_objects as go
        import plotly.io as pio

        # An empty template while the figure is built and validated, the theme's put in after: plotly
        # deep-copies a named template into every figure, which took most of a daily batch's report.
        figure = go.Figure(traces, layout={"template": {}})
        figure.update_layout(
            height=height,
            margin={"l": 10, "r": 10, "t": 30, "b": 10},
            legend={"orientation": "h", "yanchor": "bottom", "y": 1.02, "x": 0},
            font={"family": "system-ui, -apple-system, Segoe UI, Roboto, sans-serif", "size": 12},
            **layout,
        )
        figure.update_xaxes(automargin=True)
        figure.update_yaxes(automargin=True)
        spec = figure.to_plotly_json()
        spec["layout"]["template"] = _theme()
        self.count += 1
        div = pio.to_html(
            spec,
            validate=False,  # validated above, as a Figure
            full_html=False,
            include_plotlyjs=False,
            div_id=f"chart-{name}",
            default_width="100%",
            default_height=f"{height}px",
            config={"displaylogo": False, "displayModeBar": False, "responsive": True},
        )
        return f'<div class="chart" data-chart="{_e(name)}">{div}</div>'

    def rows_per_table(self, steps: Sequence[StepReport]) -> str:
        if not steps:
            return ""
        import plotly.graph_objects as go

        tables = [_e(step.table) for step in steps]
        measures = (
            ("rows in", [step.rows_in for step in steps], "#4c78a8"),
            ("written", [_written(step) for step in steps], "#54a24b"),
            ("unchanged", [step.unchanged for step in steps], "#bab0ac"),
            ("rejected", [step.rejected for step in steps], "#e45756"),
        )
        traces = [
            go.Bar(
                name=name,
                x=tables,
                y=values,
                marker_color=colour,
                texttemplate="%{y:,}",
                textposition="outside",
            )
            for name, values, colour in measures
        ]
        return self._figure(
            "rows", traces, 360, barmode="group", yaxis={"title": "rows", "rangemode": "tozero"}
        )

    def _stacked_by_table(
        self, name: str, steps: Sequence[StepReport], counts: list[dict[str, int]], what: str
    ) -> str:
        """Horizontal bars, a label per bar and a colour per table, largest total first."""
        import plotly.graph_objects as go

        totals: dict[str, int] = {}
        for by_label in counts:
            for label, count in by_label.items():
                totals[label] = totals.get(label, 0) + count
        shown = _top(totals)
        order = list(shown)
        traces = []
        for index, (step, by_label) in enumerate(zip(steps, counts)):
            if not by_label:
                continue
            kept = {label: count for label, count in by_label.items() if label in shown}
            other = sum(count for label, count in by_label.items() if label not in shown)
            if other:
                kept[order[-1]] = other
            labels = [label for label in order if label in kept]
            traces.append(
                go.Bar(
                    name=_e(step.table),
                    y=[_e(label) for label in labels],
                    x=[kept[label] for label in labels],
                    orientation="h",
                    marker_color=_colour(step.table, index),
                    hovertemplate=f"{_e(step.table)}<br>%{{y}}: %{{x:,}} rows<extra></extra>",
                )
            )
        height = max(220, 28 * len(order) + 90)
        return self._figure(
            name,
            traces,
            height,
            barmode="stack",
            xaxis={"title": f"rejected rows ({what})"},
            yaxis={"categoryorder": "array", "categoryarray": [_e(label) for label in reversed(order)]},
        )

    def by_reason(self, steps: Sequence[StepReport]) -> str:
        counts = [dict(step.rejected_by_reason) for step in steps]
        if not any(counts):
            return _empty("No row was rejected.")
        chart = self._stacked_by_table("reasons", steps, counts, "a row can have several reasons")
        return chart + _empty(
            "A row can have several reasons: the counts add up to more than the rows rejected."
        )

    def by_file(self, steps: Sequence[StepReport]) -> str:
        counts = [dict(step.rejected_by_file) for step in steps]
        if not any(counts):
            return self._missing(steps, "by source file")
        return self._stacked_by_table("files", steps, counts, "by the file they came from")

    def _missing(self, steps: Sequence[StepReport], what: str) -> str:
        if not any(step.rejected for step in steps):
            return _empty("No row was rejected.")
        return _empty(f"This batch's report does not count its rejected rows {what}.")

    def by_partition(self, steps: Sequence[StepReport]) -> str:
        """Days (the partitions of orders and order items) in one chart, in order, other partition values
        (products' department) in another; rows without a partition value as a note. Category axes: a
        day is a label, and a stray date far away leaves no gap."""
        import plotly.graph_objects as go

        if not any(step.rejected_by_partition for step in steps):
            return self._missing(steps, "by partition")
        days: list[Any] = []
        other: list[Any] = []
        parts: list[str] = []
        none: list[str] = []
        for index, step in enumerate(steps):
            counts = {key: count for key, count in step.rejected_by_partition.items() if key != ""}
            if step.rejected_by_partition.get("", 0):
                none.append(f"{step.table} {step.rejected_by_partition['']:,}")
            if not counts:
                continue
            dated = all(_DATE.fullmatch(key) for key in counts)
            keys = sorted(counts) if dated else sorted(counts, key=lambda key: (len(key), key))
            trace = go.Bar(
                name=_e(step.table),
                x=[_e(key) for key in keys],
                y=[counts[key] for key in keys],
                marker_color=_colour(step.table, index),
                hovertemplate=f"{_e(step.table)}<br>%{{x}}: %{{y:,}} rows<extra></extra>",
            )
            (days if dated else other).append(trace)
            if not dated:
                parts.append(_e(step.table))
        if days:
            parts_html = self._figure(
                "partition-days",
                days,
                340,
                barmode="stack",
                xaxis={"type": "category", "categoryorder": "category ascending", "title": "partition day"},
                yaxis={"title": "rejected rows"},
            )
        else:
            parts_html = ""
        if other:
            parts_html += self._figure(
                "partition-other",
                other,
                300,
                barmode="group",
                xaxis={"type": "category", "title": "partition value (" + ", ".join(parts) + ")"},
                yaxis={"title": "rejected rows"},
            )
        if none:
            parts_html += _empty(
                "Rejected rows without a partition value (malformed, or the value empty): "
                + "; ".join(none)
                + "."
            )
        return parts_html

    def trend(self, reports: Sequence[BatchReport]) -> str:
        import plotly.graph_objects as go

        ids = [_e(report.batch_id) for report in reports]
        rows_in = [sum(step.rows_in for step in report.steps) for report in reports]
        rejected = [sum(step.rejected for step in report.steps) for report in reports]
        share = [part / whole if whole else None for part, whole in zip(rejected, rows_in)]
        traces = [
            go.Bar(name="rows in", x=ids, y=rows_in, marker_color="#4c78a8", opacity=0.6),
            go.Scatter(
                name="rejected share",
                x=ids,
                y=share,
                yaxis="y2",
                mode="lines+markers",
                line={"color": "#e45756"},
                hovertemplate="%{x}<br>%{y:.2%} rejected<extra></extra>",
            ),
        ]
        return self._figure(
            "trend",
            traces,
            360,
            xaxis={"type": "category", "title": "batch"},
            yaxis={"title": "rows in", "rangemode": "tozero"},
            yaxis2={
                "title": "rejected share",
                "overlaying": "y",
                "side": "right",
                "tickformat": ".1%",
                "rangemode": "tozero",
            },
        )


_STYLE = """
:root { color-scheme: light; --fg: #1f2328; --muted: #59636e; --line: #d1d9e0; --bg: #f6f8fa; }
* { box-sizing: border-box; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--fg);
       margin: 0 auto; max-width: 1200px; padding: 24px; }
h1 { font-size: 24px; margin: 0 0 12px; }
h2 { font-size: 18px; margin: 32px 0 8px; padding-bottom: 4px; border-bottom: 1px solid var(--line); }
.batch-id { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }
dl { display: grid; grid-template-columns: max-content 1fr; gap: 2px 16px; margin: 0; }
dt { color: var(--muted); }
dd { margin: 0; }
.notes { color: var(--muted); }
.status, .outcome { display: inline-block; padding: 1px 8px; border-radius: 10px; font-size: 12px;
                    font-weight: 600; vertical-align: middle; background: #eaeef2; }
.status-succeeded, .outcome-passed { background: #dafbe1; color: #116329; }
.status-failed, .outcome-failed { background: #ffebe9; color: #a40e26; }
.outcome-warned { background: #fff8c5; color: #7d4e00; }
.outcome-accepted { background: #ddf4ff; color: #0550ae; }
.cards { display: flex; flex-wrap: wrap; gap: 12px; margin: 20px 0 0; }
.card { border: 1px solid var(--line); border-radius: 6px; padding: 10px 16px; min-width: 150px;
        background: var(--bg); }
.card .value { font-size: 22px; font-weight: 600; }
.card .label { color: var(--muted); }
table { border-collapse: collapse; width: 100%; margin: 8px 0; }
th, td { border-bottom: 1px solid var(--line); padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: var(--bg); font-weight: 600; }
.num { text-align: right; font-variant-numeric: tabular-nums; }
pre { margin: 0; white-space: pre-wrap; word-break: break-all; font-size: 12px; }
code, pre { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }
.empty { color: var(--muted); font-style: italic; }
.chart { margin: 8px 0; }
footer { margin-top: 40px; color: var(--muted); font-size: 12px; }
"""

_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>{style}</style>
{plotlyjs}
</head>
<body>
{body}
<footer>Written by the lakehouse pipeline from the batches' JSON reports (reports/&lt;batch_id&gt;.json);
self-contained: plotly.js is embedded, nothing is loaded from the network.</footer>
</body>
</html>
"""
