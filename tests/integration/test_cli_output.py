"""What the lakehouse command prints for people (80 columns, no markup) and for machines (JSON lines),
and the roots it refuses before it writes anything."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from rich.console import Console

from pipeline import batch, cli
from pipeline.batch import rejected_uri
from pipeline.errors import InputFileError
from pipeline.manifest import Manifest
from pipeline.report import BatchReport, StepReport, load_report
from pipeline.specs import TableSpec
from pipeline.storage import Store, open_store
from tests.helpers import run_cli


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A root with one dirty batch loaded (its summary has dozens of reasons)."""
    root = tmp_path_factory.mktemp("loaded") / "lake"
    assert run_cli("generate", "--root", str(root), "--scale", "0.01", "--seed", "42") == 0
    assert run_cli("--log-format", "text", "run", "--root", str(root)) == 0
    return root


def _only_report(root: Path) -> BatchReport:
    reports = sorted((root / "reports").glob("*.json"))
    assert len(reports) == 1
    report = load_report(open_store(str(root)), reports[0].stem)
    assert report is not None
    return report


def _summary_at(width: int, root: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    buffer = io.StringIO()
    monkeypatch.setattr(cli, "out", Console(file=buffer, width=width, color_system=None, markup=False))
    cli._print_summary(_only_report(root))
    return buffer.getvalue()


def test_the_summary_fits_80_columns_without_cutting_a_figure(
    loaded: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    report = _only_report(loaded)
    printed = _summary_at(80, loaded, monkeypatch)
    assert max(len(line) for line in printed.splitlines()) <= 80
    assert "…" not in printed
    for step in report.steps:
        row = next(line for line in printed.splitlines() if line.strip().startswith(step.table + " "))
        for figure in (step.rows_in, step.inserted, step.updated, step.unchanged, step.rejected):
            assert f" {figure:,}" in row, (figure, row)
    # The top reasons of each table and the rest counted, never more rows than that.
    for step in report.steps:
        ranked = sorted(step.rejected_by_reason.items(), key=lambda item: (-item[1], item[0]))
        reasons = (
            printed.split("rejected rows: top reasons")[1].split("a row can have")[0].split("\nbatch ")[0]
        )
        reason_lines = [
            line.split() for line in reasons.splitlines() if line.strip().startswith(step.table + " ")
        ]
        assert len(reason_lines) == min(len(ranked), cli.TOP_REASONS) + (len(ranked) > cli.TOP_REASONS)
        for (reason, count), words in zip(ranked[: cli.TOP_REASONS], reason_lines):
            assert words[1:] == [reason, f"{count:,}"]
        if len(ranked) > cli.TOP_REASONS:
            rest = ranked[cli.TOP_REASONS :]
            assert reason_lines[-1][1:] == [
                str(len(rest)),
                "other",
                "reasons",
                f"{sum(c for _, c in rest):,}",
            ]
    several = any(sum(step.rejected_by_reason.values()) > step.rejected for step in report.steps)
    assert several, "the batch should have rows with several reasons"
    assert "a row can have several reasons" in printed


def test_a_wide_terminal_also_shows_files_and_versions(loaded: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert "version" not in _summary_at(80, loaded, monkeypatch).split("rows per table")[1].split("\n")[2]
    header = _summary_at(140, loaded, monkeypatch).splitlines()[2]
    columns = ["table", "files", "rows", "in", "inserted", "updated", "unchanged", "rejected", "version"]
    assert header.split() == [*columns, "seconds"]


def test_a_json_log_has_one_object_per_event_and_the_report_last(
    root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_cli("generate", "--root", str(root), "--scale", "0.001", "--seed", "5") == 0
    capsys.readouterr()
    assert run_cli("--log-format", "json", "run", "--root", str(root)) == 0
    events = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert all({"time", "level", "event", "command", "batch", "message", "elapsed"} <= set(e) for e in events)
    assert {event["command"] for event in events} == {"run"}
    report = _only_report(root)
    assert events[-1]["event"] == "batch_report" and events[-1]["report"]["batch_id"] == report.batch_id
    # The log has the figures, not the rejected records' text (user data) nor the per-day and per-file maps.
    logged = events[-1]["report"]["steps"]
    assert [step["rejected"] for step in logged] == [step.rejected for step in report.steps]
    assert all(step.rejected_samples for step in report.steps)
    unlogged = {"rejected_samples", "rejected_by_partition", "rejected_by_file"}
    assert not unlogged & {name for step in logged for name in step}
    assert {event["batch"] for event in events[1:]} == {report.batch_id}
    finished = {event["table"]: event for event in events if event["event"] == "step_finished"}
    assert list(finished) == ["products", "orders", "order_items"]
    for step in report.steps:
        assert (finished[step.table]["rows"], finished[step.table]["rejected"]) == (
            step.rows_in,
            step.rejected,
        )


def test_a_failure_in_a_json_log_is_an_error_object(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli("--log-format", "json", "run", "--root", str(root)) == 1
    last = json.loads(capsys.readouterr().err.splitlines()[-1])
    assert (last["level"], last["event"], last["error"]) == ("error", "failed", "MissingDatasetError")
    assert "no batch started" in last["message"]


def test_names_are_never_read_as_markup(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli("generate", "--root", str(root), "--scale", "0.001", "--seed", "6") == 0
    orders = next((root / "raw" / "orders").glob("*.csv"))
    orders.rename(orders.with_name("[red]orders.csv"))
    capsys.readouterr()
    assert run_cli("--log-format", "text", "run", "--root", str(root)) == 0
    assert "archiving raw/orders/[red]orders.csv" in capsys.readouterr().err
    assert run_cli("--log-format", "text", "run", "--root", f"s3://[bold]{root}") == 1
    assert "'[bold]" in capsys.readouterr().err
    bracketed = root.parent / "lake[bold]"
    bracketed.mkdir()
    assert run_cli("unlock", "--root", str(bracketed)) == 0
    assert f"{bracketed} is not locked" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("root", "says"),
    [
        ("s3:/bucket/x", "is not an S3 URL"),
        ("s3:bucket", "is not an S3 URL"),
        ("s3://", "names no bucket"),
        ("S3://Lake", "is not a valid S3 bucket name"),
        ("s3://a_b", "is not a valid S3 bucket name"),
        ("typo-of-a-root", "does not exist"),
        ("  ", "the root is empty"),
    ],
)
@pytest.mark.parametrize("command", ["run", "status", "maintain", "unlock"])
def test_bad_roots_are_one_error_and_nothing_is_written(
    command: str,
    root: str,
    says: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    assert run_cli("--log-format", "text", command, "--root", root) == 1
    error = capsys.readouterr().err
    assert says in error and "Traceback" not in error and len(error.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_a_folder_with_nothing_to_load_gets_nothing_written(
    root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_cli("--log-format", "text", "run", "--root", str(root)) == 1
    assert "no batch started" in capsys.readouterr().err
    assert list(root.iterdir()) == []


def test_the_root_comes_from_lakehouse_root_and_version_is_printed(
    loaded: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("LAKEHOUSE_ROOT", str(loaded))
    assert run_cli("status") == 0
    listed = capsys.readouterr().out
    report = _only_report(loaded)
    line = next(line for line in listed.splitlines() if report.batch_id in line)
    written = sum(s.inserted + s.updated for s in report.steps)
    rows_in, rejected = sum(s.rows_in for s in report.steps), sum(s.rejected for s in report.steps)
    assert line.split()[1:5] == ["succeeded", f"{rows_in:,}", f"{written:,}", f"{rejected:,}"]
    assert run_cli("--version") == 0
    assert capsys.readouterr().out.startswith("lakehouse ")


def test_status_lists_an_unfinished_batch(
    root: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_cli("generate", "--root", str(root), "--scale", "0.001", "--seed", "7") == 0
    real_step = batch.run_step

    def failing_order_items(store: Store, manifest: Manifest, spec: TableSpec, **options: Any) -> StepReport:
        if spec.name == "order_items":
            raise InputFileError("order_items: the disk is gone")
        return real_step(store, manifest, spec, **options)

    monkeypatch.setattr(batch, "run_step", failing_order_items)
    assert run_cli("run", "--root", str(root)) == 1
    capsys.readouterr()
    assert run_cli("status", "--root", str(root)) == 0
    assert "unfinished 2/3" in capsys.readouterr().out


def test_query_formats_limits_and_tables(loaded: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sql = "SELECT order_id, total_amount FROM orders ORDER BY order_id"
    every = pl.read_delta(str(loaded / "lakehouse-dwh" / "orders")).sort("order_id")
    capsys.readouterr()
    assert run_cli("query", sql, "--root", str(loaded), "--format", "csv", "--limit", "3") == 0
    captured = capsys.readouterr()
    assert (
        pl.read_csv(io.StringIO(captured.out)).rows()
        == every.select("order_id", "total_amount").head(3).rows()
    )
    assert "the first 3 rows" in captured.err
    assert run_cli("query", sql, "--root", str(loaded), "--format", "json", "--limit", "0") == 0
    lines = capsys.readouterr().out.splitlines()
    assert [json.loads(line)["order_id"] for line in lines] == every.get_column("order_id").to_list()
    assert run_cli("query", "SELECT * FROM order", "--root", str(loaded)) == 1
    error = capsys.readouterr().err
    assert "the tables are: order_items, orders, products, rejected_order_items" in error
    assert run_cli("query", sql, "--root", str(loaded), "--format", "xml") == 2


def test_a_rejected_table_with_nothing_rejected_yet_is_empty(
    root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_cli("generate", "--root", str(root), "--scale", "0.001", "--seed", "8", "--clean") == 0
    assert run_cli("run", "--root", str(root)) == 0
    assert not Path(rejected_uri(open_store(str(root)), "products")).exists()
    capsys.readouterr()
    sql = "SELECT COUNT(*) AS n, MAX(source_line) AS last FROM rejected_products"
    assert run_cli("query", sql, "--root", str(root), "--format", "csv") == 0
    assert capsys.readouterr().out.splitlines() == ["n,last", "0,"]


@pytest.mark.slow
def test_a_plain_install_runs_the_cli_and_its_error_paths(tmp_path: Path) -> None:
    """The README's install with no extras, in a venv of its own: no module the runtime lacks."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    repo = Path(__file__).resolve().parents[2]
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "-e", str(repo)]
    subprocess.run(pip, check=True, capture_output=True, timeout=900)
    lakehouse = str(venv / "bin" / "lakehouse")
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "LAKEHOUSE_ROOT")}

    def cli_in_venv(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [lakehouse, *args], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300
        )

    assert cli_in_venv("--version").returncode == 0
    for args, codes, says in [
        # The help of a bare command exits 2 from click 8.2 (typer's own copy too), 0 before (Python 3.9).
        ((), (0, 2), "Usage: lakehouse"),
        (("rn",), (2,), "No such command 'rn'"),
        (("run",), (2,), "Missing option '--root'"),
        (("run", "--root", "s3:/bucket"), (1,), "is not an S3 URL"),
        (("run", "--root", "nowhere"), (1,), "does not exist"),
        (("run", "--root", str(tmp_path), "--memory-budget", "lots"), (2,), "--memory-budget"),
        (("query", "SELECT 1", "--root", str(tmp_path), "--format", "xml"), (2,), "'xml' is not one of"),
    ]:
        done = cli_in_venv(*args)
        shown = done.stdout + done.stderr
        assert done.returncode in codes and says in shown and "Traceback" not in shown, (args, shown)
    root = tmp_path / "lake"
    assert cli_in_venv("generate", "--root", str(root), "--scale", "0.001").returncode == 0
    done = cli_in_venv("run", "--root", str(root))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stderr.splitlines()[-1])["event"] == "batch_report"
    assert max(len(line) for line in done.stdout.splitlines()) <= 80


def test_a_failed_step_keeps_its_sentence_until_it_succeeds(
    root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from pipeline.manifest import snapshot
    from pipeline.report import load_step_errors

    assert run_cli("generate", "--root", str(root), "--scale", "0.001", "--seed", "9") == 0
    store = open_store(str(root))
    manifest = snapshot(store, "20260101T000000Z-000001", datetime.now(timezone.utc))
    store.write_bytes(manifest.key, manifest.to_json())
    orders = root / manifest.files["orders"][0].key
    good = orders.read_bytes()
    orders.write_bytes(b"\xff\xfe" + good)  # not UTF-8: the step fails, naming the file
    assert run_cli("step", "orders", "--root", str(root), "--manifest", manifest.batch_id) == 1
    (error,) = load_step_errors(store, manifest.batch_id).values()
    assert error.startswith("step orders failed") and str(orders.name) in error
    assert error in capsys.readouterr().err
    orders.write_bytes(good)
    assert run_cli("step", "orders", "--root", str(root), "--manifest", manifest.batch_id) == 0
    assert load_step_errors(store, manifest.batch_id) == {}


def test_a_json_log_beats_with_the_memory_while_a_step_works(
    root: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_cli("generate", "--root", str(root), "--scale", "0.001", "--seed", "10") == 0
    monkeypatch.setattr(cli, "HEARTBEAT_SECONDS", 0.01)
    capsys.readouterr()
    assert run_cli("--log-format", "json", "run", "--root", str(root)) == 0
    events = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    beats = [event for event in events if event["event"] == "heartbeat"]
    assert beats and all(beat["rss_gib"] > 0 and beat["peak_rss_gib"] > 0 for beat in beats)
    assert all(beat["message"].startswith("working: ") for beat in beats)
    assert events[-1]["event"] == "batch_report"


def test_a_terminal_shows_a_bar_per_table_read(
    root: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_cli("generate", "--root", str(root), "--scale", "0.001", "--seed", "11") == 0
    screen = io.StringIO()
    terminal = Console(file=screen, force_terminal=True, width=80, markup=False, color_system=None)
    monkeypatch.setattr(cli, "console", terminal)
    assert run_cli("run", "--root", str(root)) == 0
    shown = screen.getvalue()
    for table in ("products", "orders", "order_items"):
        assert f"  {table} " in shown and "100%" in shown
    assert " rows" in shown and "kB" in shown
