"""The HTML quality report in a real browser: headless Chromium, offline, draws every chart, runs no data.

Skipped where no Chromium is installed (``.ci/run`` installs Debian's ``chromium``).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from pipeline.html_report import render
from tests.unit.test_html_report import batch, full_step, step

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# Would mark the page if it ran: as a rejected record, a file name (a chart's label) and a reason.
PAYLOAD = "</script><script>document.body.setAttribute('data-pwned','1')</script>"
IMG_PAYLOAD = "<img src=x onerror=\"document.body.setAttribute('data-pwned','2')\">"
# Plotly reads a few tags in labels as formatting and links: a file name must not become one.
LINK = '<a href="https://example.com/">raw/orders/link.csv</a>'
VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


class _Charts(HTMLParser):
    """For each chart's div (``id="chart-..."``): the classes of every element drawn inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str | None] = []
        self.drawn: dict[str, list[str]] = {}
        self.tags: dict[str, set[str]] = {}

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        chart = next((name for name in reversed(self.stack) if name), None)
        if chart is not None:
            self.drawn[chart].extend((values.get("class") or "").split())
            self.tags[chart].add(tag)
        ident = values.get("id") or ""
        opens = tag == "div" and ident.startswith("chart-")
        if opens:
            self.drawn[ident] = []
            self.tags[ident] = set()
        if tag not in VOID:
            self.stack.append(ident if opens else None)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        chart = next((name for name in reversed(self.stack) if name), None)
        if chart is not None:
            self.drawn[chart].extend((dict(attrs).get("class") or "").split())

    def handle_endtag(self, tag: str) -> None:
        if tag not in VOID and self.stack:
            self.stack.pop()


def _browse(page: Path, tmp_path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    assert CHROMIUM is not None
    return subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            # Offline: any request the page made would go to a proxy that is not there.
            "--proxy-server=127.0.0.1:9",
            "--proxy-bypass-list=<-loopback>",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--virtual-time-budget=5000",
            "--window-size=1200,1600",
            *extra,
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium installed (Debian: apt-get install chromium)")
def test_chromium_draws_every_chart_offline_and_runs_none_of_the_data(tmp_path: Path) -> None:
    hostile = full_step("orders")
    hostile.rejected_by_file[PAYLOAD] = 2
    hostile.rejected_by_file[LINK] = 1
    hostile.rejected_by_reason[IMG_PAYLOAD] = 1
    hostile.rejected_samples.append(
        {"source_file": IMG_PAYLOAD, "source_line": 3, "reasons": [PAYLOAD], "record": PAYLOAD}
    )
    products = step("products", rows_in=504, rejected=4, rejected_by_partition={"2": 3, "": 1})
    reports = [
        batch("20261201T000000Z-000001", [step("orders", rows_in=900, rejected=9)]),
        batch("20261202T000000Z-000002", [products, hostile], notes=[IMG_PAYLOAD]),
    ]
    page = tmp_path / "report.html"
    page.write_text(render(reports), encoding="utf-8")
    expected = re.findall(r'id="(chart-[a-z-]+)" class="plotly-graph-div"', page.read_text())
    assert len(expected) == 6

    done = _browse(page, tmp_path, "--dump-dom")
    assert done.returncode == 0, done.stderr[-2000:]
    dom = done.stdout
    parser = _Charts()
    parser.feed(dom)
    assert sorted(parser.drawn) == sorted(expected)
    for chart, classes in parser.drawn.items():
        assert "js-plotly-plot" in classes or "main-svg" in classes, f"{chart}: Plotly did not draw it"
        assert "main-svg" in classes, f"{chart}: no SVG drawn"
        assert any(name == "trace" for name in classes), f"{chart}: no trace drawn"
        assert "point" in classes, f"{chart}: no bar or marker drawn"
    # The data is shown as text and never ran.
    assert not re.search(r"<body[^>]*data-pwned", dom)
    assert "&lt;/script&gt;&lt;script&gt;document.body.setAttribute" in dom
    # In a chart's label too: Plotly decoded the entities into text, not into elements.
    files_chart = dom.split('id="chart-files"', 1)[1].split('id="chart-trend"', 1)[0]
    assert "&lt;/script&gt;" in files_chart
    assert "<img" not in dom.split("<body", 1)[1]
    assert "&lt;a href=" in files_chart and not parser.tags["chart-files"] & {"a", "img", "script"}
