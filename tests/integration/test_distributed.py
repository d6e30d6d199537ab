"""The distributed path's commands as its tasks run them: ``lakehouse stage plan|run|finish`` one unit at a
time, a unit run twice, a resumed stage, a typo'd item; and ``lakehouse run --workers 2`` in processes."""

from __future__ import annotations

import json
import shutil
from datetime import datetime, timezone
from pathlib import Path

import polars as pl
import pytest

from pipeline.batch import abandon_batch, load_step_report, rejected_uri, run_batch, table_uri
from pipeline.distributed import plan_prefix, staging_prefix
from pipeline.generate import generate
from pipeline.manifest import new_batch_id, read_manifest, snapshot
from pipeline.specs import TABLES
from pipeline.storage import open_store
from tests.helpers import run_cli

NOW = datetime(2026, 12, 4, 6, 0, tzinfo=timezone.utc)


def _landed(root: Path) -> str:
    """Generate a small batch in ``raw/`` and write its manifest (the trigger's part); its id."""
    store = open_store(str(root))
    generate(store, scale=0.002, seed=3)
    manifest = snapshot(store, new_batch_id(NOW), NOW)
    store.write_bytes(manifest.key, manifest.to_json(), if_absent=True)
    return manifest.batch_id


def _items(root: Path, batch_id: str, table: str, stage: str) -> list[str]:
    folder = root / plan_prefix(batch_id, table, stage)
    return sorted(str(path.relative_to(root)) for path in folder.glob("*.json"))


def _sorted_tables(root: Path) -> dict[str, pl.DataFrame]:
    store = open_store(str(root))
    found = {}
    for name, spec in TABLES.items():
        found[name] = pl.read_delta(table_uri(store, name)).select(spec.column_names).sort(spec.primary_key)
        rejected = pl.read_delta(rejected_uri(store, name)).drop("rejected_at", "batch_id")
        found[f"rejected_{name}"] = rejected.select(sorted(rejected.columns)).sort(
            "source_file", "source_line"
        )
    return found


def _run_table_by_hand(root: Path, batch_id: str, table: str, capsys: pytest.CaptureFixture[str]) -> None:
    """What the state machine does for one table: each plan, then every item it wrote, then the finish."""
    at = ("--root", str(root))
    # A small budget makes several buckets and groups from a small batch.
    assert (
        run_cli("stage", "plan", table, "parse", *at, "--manifest", batch_id, "--memory-budget", "256KiB")
        == 0
    )
    for item in _items(root, batch_id, table, "parse"):
        assert run_cli("stage", "run", item, *at) == 0
    assert run_cli("stage", "plan", table, "resolve", *at, "--manifest", batch_id) == 0
    for item in _items(root, batch_id, table, "resolve"):
        assert run_cli("stage", "run", item, *at) == 0
    assert run_cli("stage", "plan", table, "write", *at, "--manifest", batch_id) == 0
    for stage in ("write", "moves", "late"):
        for item in _items(root, batch_id, table, stage):
            assert run_cli("stage", "run", item, *at) == 0
    capsys.readouterr()
    assert run_cli("stage", "finish", table, *at, "--manifest", batch_id) == 0
    assert table in capsys.readouterr().out


def test_the_stage_commands_one_unit_at_a_time_give_what_one_step_gives(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    by_hand, at_once = tmp_path / "by-hand", tmp_path / "at-once"
    batch_id = _landed(by_hand)
    shutil.copytree(by_hand, at_once)
    shapes = {}
    for table in TABLES:
        _run_table_by_hand(by_hand, batch_id, table, capsys)
        report = load_step_report(open_store(str(by_hand)), batch_id, table)
        assert report is not None
        shapes[table] = (report.buckets, report.groups)
        assert set(report.stages) == {"plan", "parse", "resolve", "write", "moves", "late", "finish"}
        files = read_manifest(open_store(str(by_hand)), batch_id).files[table]
        assert report.stages["parse"]["units"] == len(files)
        # Three plans and a finish besides the units, each task with its billed seconds.
        assert report.stages["plan"]["units"] == 3 and report.stages["finish"]["units"] == 1
        assert all(figures["billed_seconds"] > 0 for figures in report.stages.values() if figures["units"])
        # Each unit writes its index and a few objects, and reads ranges: every resolve unit reads one
        # from each object of valid rows that holds its bucket; the resolve plan reads the parse indexes.
        assert report.stages["parse"]["objects"] >= 2 * report.stages["parse"]["units"]
        assert report.stages["resolve"]["reads"] >= report.stages["resolve"]["units"]
        assert report.stages["plan"]["reads"] >= report.stages["parse"]["units"]
        assert report.stages["finish"]["reads"] >= 1
        assert not list((by_hand / plan_prefix(batch_id, table)).rglob("*.json"))
        assert not [p for p in (by_hand / staging_prefix(batch_id, table)).rglob("*") if p.is_file()]
    assert shapes["order_items"][0] > 1 and shapes["order_items"][1] > 1, shapes
    run_batch(open_store(str(at_once)), now=NOW)
    theirs, ours = _sorted_tables(at_once), _sorted_tables(by_hand)
    assert ours.keys() == theirs.keys()
    for name, frame in theirs.items():
        assert ours[name].equals(frame), name


def test_a_unit_run_again_is_skipped_and_a_stage_planned_again_keeps_what_is_done(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    batch_id = _landed(tmp_path)
    at = ("--root", str(tmp_path))
    plan = ("stage", "plan", "products", "parse", *at, "--manifest", batch_id, "--memory-budget", "64KiB")
    assert run_cli(*plan) == 0
    assert "work item(s) planned" in capsys.readouterr().out
    first, *rest = _items(tmp_path, batch_id, "products", "parse")
    assert run_cli("stage", "run", first, *at) == 0
    done = json.loads(capsys.readouterr().out)
    assert done["stage"] == "parse" and "skipped" not in done
    staged = sorted(p for p in (tmp_path / staging_prefix(batch_id, "products")).rglob("*.arrow"))
    assert staged
    assert run_cli("stage", "run", first, *at) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["skipped"] is True and again["rows_in"] == done["rows_in"]
    assert sorted((tmp_path / staging_prefix(batch_id, "products")).rglob("*.arrow")) == staged
    # A resumed batch plans again: only the units not done get items (its Map starts no task for the
    # finished one), and the finished unit's report still counts for the stage after.
    assert run_cli(*plan) == 0
    assert _items(tmp_path, batch_id, "products", "parse") == rest
    capsys.readouterr()
    assert run_cli("stage", "run", first, *at) == 1
    assert "no work item" in capsys.readouterr().err
    for item in rest:  # by full location, as a Distributed Map's child names its item
        assert run_cli("stage", "run", str(tmp_path / item), *at) == 0
        assert json.loads(capsys.readouterr().out)["stage"] == "parse"
    assert run_cli("stage", "plan", "products", "resolve", *at, "--manifest", batch_id) == 0
    assert "work item(s) planned" in capsys.readouterr().out


def test_stage_commands_refuse_what_is_not_theirs_in_one_sentence(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    batch_id = _landed(tmp_path)
    at = ("--root", str(tmp_path))
    assert run_cli("stage", "run", "plan/x/products/parse.json", *at) != 0
    assert "is not a work item key" in capsys.readouterr().err
    assert run_cli("stage", "run", f"plan/{batch_id}/products/parse/00007.json", *at) == 1
    assert f"no work item {tmp_path}" in " ".join(capsys.readouterr().err.split())
    assert run_cli("stage", "plan", "products", "merge", *at, "--manifest", batch_id) != 0
    assert "no plan for 'merge'" in capsys.readouterr().err
    # The resolve plan needs the parse's: a stage out of order is refused, not guessed at.
    assert run_cli("stage", "plan", "orders", "resolve", *at, "--manifest", batch_id) == 1
    error = capsys.readouterr().err
    assert "orders" in error and "Traceback" not in error


def test_abandon_clears_a_batch_s_plans_and_staged_parts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    batch_id = _landed(tmp_path)
    at = ("--root", str(tmp_path))
    assert run_cli("stage", "plan", "products", "parse", *at, "--manifest", batch_id) == 0
    for item in _items(tmp_path, batch_id, "products", "parse"):
        assert run_cli("stage", "run", item, *at) == 0
    assert list((tmp_path / "staging" / batch_id).rglob("*.arrow"))
    abandon_batch(open_store(str(tmp_path)), batch_id)
    assert not [p for folder in ("plan", "staging") for p in (tmp_path / folder).rglob("*") if p.is_file()]


@pytest.mark.slow
def test_run_with_two_worker_processes_gives_what_one_task_gives(tmp_path: Path) -> None:
    two, one = tmp_path / "two", tmp_path / "one"
    for root in (two, one):
        generate(open_store(str(root)), scale=0.002, seed=4)
    # Each unit is a process of its own (about a second to start): a budget that makes a few units.
    assert run_cli("run", "--root", str(two), "--workers", "2", "--memory-budget", "1MiB") == 0
    assert run_cli("run", "--root", str(one)) == 0
    theirs, ours = _sorted_tables(one), _sorted_tables(two)
    for name, frame in theirs.items():
        assert ours[name].equals(frame), name


def test_a_crossed_fail_gate_stops_the_write_plan_before_any_merge(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    batch_id = _landed(tmp_path)
    at = ("--root", str(tmp_path), "--manifest", batch_id)
    assert run_cli("stage", "plan", "orders", "parse", *at) == 0
    for stage in ("parse", "resolve"):
        for item in _items(tmp_path, batch_id, "orders", stage):
            assert run_cli("stage", "run", item, "--root", str(tmp_path)) == 0
        if stage == "parse":
            assert run_cli("stage", "plan", "orders", "resolve", *at) == 0
    capsys.readouterr()
    # The generated batch rejects about 1% of its orders: a fail gate at 0.1% is crossed.
    assert run_cli("stage", "plan", "orders", "write", *at, "--fail-percent", "0.1") == 1
    assert "gate" in capsys.readouterr().err
    assert not _items(tmp_path, batch_id, "orders", "write")
    assert not (tmp_path / "lakehouse-dwh" / "orders").exists()
    assert run_cli("stage", "plan", "orders", "write", *at, "--fail-percent", "0.1", "--accept-gates") == 0
    assert _items(tmp_path, batch_id, "orders", "write")


def test_the_units_not_done_are_those_planned_without_a_report_in_plan_order(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from pipeline.workitems import units_not_done

    batch_id = _landed(tmp_path)
    at = ("--root", str(tmp_path))
    for table in ("order_items", "products"):  # planned out of order: listed in the steps' order
        plan = ("stage", "plan", table, "parse", *at, "--manifest", batch_id, "--memory-budget", "64KiB")
        assert run_cli(*plan) == 0
    products = _items(tmp_path, batch_id, "products", "parse")
    items = _items(tmp_path, batch_id, "order_items", "parse")
    assert len(products) > 1 and items
    assert units_not_done(open_store(str(tmp_path)), batch_id) == products + items
    assert run_cli("stage", "run", products[0], *at) == 0
    assert units_not_done(open_store(str(tmp_path)), batch_id) == products[1:] + items
    # What FinishBatch tells of a failed batch: the units left, as "<table> <stage> <unit>".
    from handlers.finish_batch import _failure

    message = _failure(open_store(str(tmp_path)), {"batch_id": batch_id, "error": "X", "cause": "y"})[
        "message"
    ]
    left = products[1:] + items
    shown = ", ".join(" ".join(key.split("/")[2:]).removesuffix(".json") for key in left[:10])
    assert f"Units not done: {shown}" in message
    assert f"Units not done: products parse {Path(products[1]).stem}, " in message
    assert (f" and {len(left) - 10} more" in message) == (len(left) > 10)


def test_a_plan_refuses_to_go_on_when_the_staged_rows_are_not_those_the_units_reported(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import io

    from pipeline.distributed import index_key

    batch_id = _landed(tmp_path)
    at = ("--root", str(tmp_path))
    plan = ("stage", "plan", "orders", "parse", *at, "--manifest", batch_id, "--memory-budget", "64KiB")
    assert run_cli(*plan) == 0
    for item in _items(tmp_path, batch_id, "orders", "parse"):
        assert run_cli("stage", "run", item, *at) == 0
    # One part of one unit's valid rows goes missing from its index (as a lost or stale object would).
    store = open_store(str(tmp_path))
    key = index_key(batch_id, "orders", "parse", 0)
    index = pl.read_ipc(io.BytesIO(store.read_bytes(key)))
    parsed = index.filter(pl.col("kind") == "parsed")
    assert parsed.height > 1
    body = io.BytesIO()
    index.filter(
        ~((pl.col("kind") == "parsed") & (pl.col("part") == parsed.get_column("part")[0]))
    ).write_ipc(body)
    store.write_bytes(key, body.getvalue())
    capsys.readouterr()
    assert run_cli("stage", "plan", "orders", "resolve", *at, "--manifest", batch_id) == 1
    error = " ".join(capsys.readouterr().err.split())
    assert "valid rows of the parse units" in error and "refusing to go on" in error
    assert not _items(tmp_path, batch_id, "orders", "resolve")


@pytest.mark.slow
def test_every_unit_run_twice_at_once_gives_what_one_step_gives(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A Map that starts a child twice (a redriven run, a retry of a task that did start): both tasks write
    the same objects and report, and both MERGEs of a write unit commit nothing twice."""
    import subprocess
    import sys

    twice, once = tmp_path / "twice", tmp_path / "once"
    batch_id = _landed(twice)
    shutil.copytree(twice, once)
    at = ("--root", str(twice))

    def both(items: list[str]) -> None:
        for item in items:
            command = [sys.executable, "-m", "pipeline", "stage", "run", item, *at]
            runs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in "ab"]
            for run in runs:
                _, err = run.communicate(timeout=300)
                assert run.returncode == 0, err.decode()

    for table in TABLES:
        # The default budget: one unit a stage but the files' (every process costs a second or two).
        assert run_cli("stage", "plan", table, "parse", *at, "--manifest", batch_id) == 0
        both(_items(twice, batch_id, table, "parse"))
        assert run_cli("stage", "plan", table, "resolve", *at, "--manifest", batch_id) == 0
        both(_items(twice, batch_id, table, "resolve"))
        assert run_cli("stage", "plan", table, "write", *at, "--manifest", batch_id) == 0
        for stage in ("write", "moves", "late"):
            both(_items(twice, batch_id, table, stage))
        assert run_cli("stage", "finish", table, *at, "--manifest", batch_id) == 0
    run_batch(open_store(str(once)), now=NOW)
    theirs, ours = _sorted_tables(once), _sorted_tables(twice)
    for name, frame in theirs.items():
        assert ours[name].equals(frame), name
