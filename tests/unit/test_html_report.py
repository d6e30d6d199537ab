"""The HTML quality report: what it shows, that user data cannot break out of it, old reports, the CLI."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pipeline.html_report import TOP, html_report_key, render, reports_until, write_batch_report
from pipeline.report import BatchReport, StepReport, report_key
from pipeline.storage import open_store
from tests.helpers import run_cli

HOSTILE = "</script><script>alert(1)</script>"


def step(table: str, rows_in: int = 1_000, rejected: int = 10, **fields: object) -> StepReport:
    values: dict[str, object] = {
        "table": table,
        "files": 2,
        "rows_in": rows_in,
        "inserted": rows_in - rejected - 5,
        "updated": 5,
        "unchanged": 0,
        "rejected": rejected,
        "rejected_by_reason": {"duplicate_row": rejected // 2, "null:order_id": rejected - rejected // 2}
        if rejected
        else {},
        "delta_version": 3,
        "rejected_version": 1,
        "seconds": 0.5,
    }
    values.update(fields)
    return StepReport(**values)  # type: ignore[arg-type]


def full_step(table: str = "orders") -> StepReport:
    return step(
        table,
        rejected=12,
        rejected_by_file={"raw/orders/orders-2025-01-05.csv": 9, "raw/orders/o-zz-bad.csv": 3},
        rejected_by_partition={"2025-01-04": 4, "2025-01-05": 6, "": 2},
        rejected_samples=[
            {
                "source_file": "raw/orders/o-zz-bad.csv",
                "source_line": 17,
                "reasons": ["null:order_id", "range:total_amount"],
                "record": "1,,7,2025-01-05T10:00:00,-3.50,2025-01-05",
            }
        ],
        gates=[
            {
                "table": table,
                "reason": None,
                "measure": "share",
                "observed": 0.012,
                "threshold": 0.01,
                "level": "warn",
                "outcome": "warned",
            },
            {
                "table": table,
                "reason": "null:order_id",
                "measure": "count",
                "observed": 6,
                "threshold": 100,
                "level": "fail",
                "outcome": "passed",
            },
        ],
    )


def batch(batch_id: str, steps: list[StepReport], status: str = "succeeded", **fields: object) -> BatchReport:
    values: dict[str, object] = {
        "batch_id": batch_id,
        "status": status,
        "started_at": "2026-12-03T06:40:36+00:00",
        "finished_at": "2026-12-03T06:40:39+00:00",
        "seconds": 2.3,
        "steps": steps,
        "archived_files": 6,
        "table_counts": {step.table: step.inserted for step in steps},
    }
    values.update(fields)
    return BatchReport(**values)  # type: ignore[arg-type]


def charts(page: str) -> list[str]:
    return re.findall(r'id="(chart-[a-z-]+)" class="plotly-graph-div"', page)


def test_the_newest_batch_in_detail_with_every_part() -> None:
    cost = {
        "usd": 0.0074,
        "by_service": {"s3": 0.004, "fargate": 0.0023},
        "basis": "local",
        "prices_as_of": "2025-06",
    }
    older = batch("20261201T000000Z-aaaaaa", [step("orders", rows_in=500, rejected=1)])
    newest = batch(
        "20261203T064036Z-ad3e23",
        [step("products", rows_in=504, rejected=0), full_step("orders")],
        cost=cost,
        notes=["a note"],
    )
    page = render([newest, older])  # any order: the newest by id is the one in detail
    assert 'Batch <span class="batch-id">20261203T064036Z-ad3e23</span>' in page
    assert "status-succeeded" in page and "$0.0074" in page and "a note" in page
    assert "1,504" in page  # rows in, both steps
    assert "raw/orders/o-zz-bad.csv:17" in page and "null:order_id, range:total_amount" in page
    assert "1,,7,2025-01-05T10:00:00,-3.50,2025-01-05" in page
    assert 'outcome-warned">warned' in page and "1.20%" in page and "all reasons" in page
    assert "without a partition value" in page and "orders 2" in page
    assert charts(page) == [
        "chart-rows",
        "chart-reasons",
        "chart-partition-days",
        "chart-files",
        "chart-trend",
    ]
    assert "Trend over the last 2 batches" in page and "20261201T000000Z-aaaaaa" in page


def test_plotly_js_is_embedded_once_and_nothing_comes_from_the_network() -> None:
    page = render([batch("20261203T064036Z-ad3e23", [full_step()])])
    assert len(re.findall(r'Plotly\.newPlot\(\s*"chart-', page)) == len(charts(page))
    assert len(re.findall(r"\* plotly\.js v\d", page)) == 1
    assert 'src="https://cdn.plot.ly' not in page  # (the bundle names a CDN for maps, which no chart draws)
    assert not re.search(r"<script[^>]+src=", page)
    assert not re.search(r"<link[^>]+href=", page)


@pytest.mark.parametrize("where", ["record", "source_file", "reason", "partition", "table_note"])
def test_user_data_is_escaped_everywhere(where: str) -> None:
    hostile = step(
        "orders",
        rejected=3,
        rejected_by_reason={HOSTILE: 3} if where == "reason" else {"duplicate_row": 3},
        rejected_by_file={HOSTILE if where == "source_file" else "raw/orders/o.csv": 3},
        rejected_by_partition={HOSTILE if where == "partition" else "2025-01-05": 3},
        rejected_samples=[
            {
                "source_file": HOSTILE if where == "source_file" else "raw/orders/o.csv",
                "source_line": 2,
                "reasons": [HOSTILE if where == "reason" else "duplicate_row"],
                "record": HOSTILE if where == "record" else "1,2,3",
            }
        ],
    )
    notes = [HOSTILE] if where == "table_note" else []
    page = render([batch("20261203T064036Z-ad3e23", [hostile], notes=notes)])
    assert HOSTILE not in page
    assert "<script>alert" not in page
    # Shown as text: escaped in the tables, as entities in the charts' labels (Plotly decodes them), which
    # Plotly's JSON writes with escapes of its own.
    in_table = "&lt;/script&gt;&lt;script&gt;alert(1)&lt;/script&gt;"
    in_chart = in_table.replace("/", "\\u002f")
    assert in_table in page or in_chart in page
    # Not as markup in a chart either: Plotly reads <b>, <br>, <a href> in a label as formatting and links.
    assert "\\u003c\\u002fscript\\u003e" not in page
    # The page's own scripts are the embedded plotly.js, its config, and one per chart.
    assert page.count("<script") == 2 + len(charts(page))


def test_a_report_without_the_new_fields_renders_and_says_so() -> None:
    """Reports written before per-file counts, samples and gates existed, or with those left empty."""
    old = batch("20261203T064036Z-ad3e23", [step("orders", rejected=7)])
    page = render([old])
    assert "does not count its rejected rows by source file" in page
    assert "does not count its rejected rows by partition" in page
    assert "holds no samples of its rejected rows" in page
    assert "No quality gate was judged" in page
    assert charts(page) == ["chart-rows", "chart-reasons", "chart-trend"]


def test_a_clean_batch_and_a_failed_batch_without_steps() -> None:
    clean = render([batch("20261203T064036Z-ad3e23", [step("orders", rejected=0)])])
    assert "No row was rejected." in clean and "0.00%" in clean
    failed = render([batch("20261203T064036Z-ad3e23", [], status="failed", notes=["step orders failed: x"])])
    assert "status-failed" in failed and "has no step reports" in failed and "step orders failed: x" in failed
    assert charts(failed) == ["chart-trend"]
    with pytest.raises(ValueError):
        render([])


def test_products_partitions_are_departments_not_days() -> None:
    products = step("products", rejected=4, rejected_by_partition={"2": 1, "10": 2, "": 1})
    page = render([batch("20261203T064036Z-ad3e23", [products, full_step("orders")])])
    assert "chart-partition-days" in page and "chart-partition-other" in page
    assert "products 1; orders 2" in page


def test_many_reasons_are_cut_to_the_largest() -> None:
    reasons = {f"invalid:column_{index:02d}": index + 1 for index in range(40)}
    page = render(
        [batch("20261203T064036Z-ad3e23", [step("orders", rejected=820, rejected_by_reason=reasons)])]
    )
    assert "invalid:column_39" in page and f"{40 - TOP} others" in page
    assert "invalid:column_00" not in page


def save(root: Path, report: BatchReport) -> None:
    open_store(str(root)).write_bytes(report_key(report.batch_id), report.to_json())


def test_write_batch_report_trends_over_that_batch_and_the_ones_before(root: Path) -> None:
    ids = [f"2026120{day}T000000Z-00000{day}" for day in range(1, 6)]
    for index, batch_id in enumerate(ids):
        save(root, batch(batch_id, [step("orders", rows_in=1_000 + index, rejected=index)]))
    store = open_store(str(root))
    key = write_batch_report(store, ids[3], last=3)
    assert key == html_report_key(ids[3]) == f"reports/{ids[3]}.html"
    page = (root / key).read_text()
    assert "Trend over the last 3 batches" in page
    assert ids[1] in page and ids[2] in page and ids[3] in page
    assert ids[0] not in page and ids[4] not in page  # too old; newer than the batch reported
    # A batch whose report the caller holds but has not stored yet.
    unsaved = batch("20261206T000000Z-000006", [step("orders")])
    write_batch_report(store, unsaved.batch_id, report=unsaved)
    assert unsaved.batch_id in (root / html_report_key(unsaved.batch_id)).read_text()
    assert [report.batch_id for report in reports_until(store, None, 2)] == ids[3:]


def test_the_report_command(root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "report.html"
    assert run_cli("report", "--root", str(root), "--out", str(out)) == 1
    assert "no batch has finished" in capsys.readouterr().err
    ids = ["20261201T000000Z-000001", "20261202T000000Z-000002", "20261203T000000Z-000003"]
    for batch_id in ids:
        save(root, batch(batch_id, [full_step()]))
    assert run_cli("report", "--root", str(root), "--out", str(out)) == 0
    assert f"wrote {out}: batch {ids[2]}" in capsys.readouterr().err
    page = out.read_text()
    assert f'"batch-id">{ids[2]}<' in page and "Trend over the last 3 batches" in page
    assert run_cli("report", "--root", str(root), "--batch", ids[1], "--last", "1", "--out", str(out)) == 0
    page = out.read_text()
    assert f'"batch-id">{ids[1]}<' in page and "Trend over the last 1 batches" in page and ids[2] not in page
    capsys.readouterr()
    assert run_cli("report", "--root", str(root), "--batch", ids[0], "--out", "-") == 0
    assert capsys.readouterr().out.startswith("<!DOCTYPE html>")
    assert (
        run_cli("report", "--root", str(root), "--batch", "20990101T000000Z-ffffff", "--out", str(out)) == 1
    )
    error = capsys.readouterr().err
    assert "batch 20990101T000000Z-ffffff has no report" in error and "Traceback" not in error
    assert run_cli("report", "--root", str(root), "--out", str(tmp_path / "nowhere" / "r.html")) == 1
    assert "does not exist" in capsys.readouterr().err
    assert run_cli("report", "--help") == 0
    assert "--root" in capsys.readouterr().out
