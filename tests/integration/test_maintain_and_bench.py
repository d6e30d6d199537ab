"""Delta maintenance, and a smoke run of the benchmark (its figures are not asserted, only produced)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import polars as pl
import pytest
from deltalake import DeltaTable

from pipeline.batch import maintain_tables, run_batch, table_uri
from pipeline.cli import main
from pipeline.errors import BatchLockedError
from pipeline.lock import acquire_lock, lock_holder
from pipeline.storage import open_store
from tests.helpers import write_raw


def test_maintain_compacts_daily_files_and_keeps_the_data(root: Path) -> None:
    store = open_store(str(root))
    write_raw(root, "products", "p.csv", "5,2,Books,Novel")
    for day in range(3):
        # Inserts into an existing partition add a file beside the old ones: what compaction is for.
        for table, line in (
            ("orders", f"1,{day + 10},7,2025-04-01T11:27:00,12.50,2025-04-01"),
            ("order_items", f"{day + 1},{day + 10},7,,5,1,0,2025-04-01T11:27:00,2025-04-01"),
        ):
            write_raw(root, table, f"day{day}.csv", line)
        if day:
            write_raw(root, "products", f"p{day}.csv", "5,2,Books,Novel")
        run_batch(store)
    uri = table_uri(store, "orders")
    before = pl.read_delta(uri).sort("order_id")
    files_before = len(DeltaTable(uri).file_uris())
    results = maintain_tables(store, retention_hours=168)
    assert results["orders"].files_removed > results["orders"].files_added
    assert len(DeltaTable(uri).file_uris()) < files_before
    assert pl.read_delta(uri).sort("order_id").equals(before)
    # Files replaced by compaction stay until the retention has passed: older versions still read.
    assert results["orders"].vacuumed == 0
    assert pl.read_delta(uri, version=0).height > 0
    assert (Path(uri) / "_delta_log" / "_last_checkpoint").exists()


def test_maintain_command_on_an_empty_root(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    main(["maintain", "--root", str(root)])
    assert "maintenance" in capsys.readouterr().out


@pytest.mark.slow
def test_benchmark_smoke_run(tmp_path: Path) -> None:
    figures_file = tmp_path / "bench.json"
    main(
        [
            "bench",
            "--scale",
            "0.003",
            "--small-scale",
            "0.002",
            "--root",
            str(tmp_path / "b"),
            "--json",
            str(figures_file),
            "--shapes",
            "crlf,one-file",
            "--triple",
        ]
    )
    figures = json.loads(figures_file.read_text())
    phases = {phase["phase"]: phase for phase in figures["phases"]}
    assert {"floor", "full load", "full load, unstaged", "daily batch", "replay", "maintain"} <= set(phases)
    # The DuckDB pipeline of the same rules keeps exactly the rows the lakehouse wrote, table by table.
    assert "same rows kept" in phases["DuckDB, same rules"]["note"]
    assert figures["full_load_vs_duckdb"] > 0
    assert phases["re-export"]["rows"] == phases["full load"]["rows"]
    assert phases["re-export"]["note"].endswith("no new version of any lakehouse table")
    assert set(figures["shapes_vs_floor"]) == {"crlf", "one-file"}
    assert 2.5 < figures["three_times_over"]["rows"] < 3.5
    items = figures["stages"]["full load"]["order_items"]
    assert items["buckets"] == 1 and items["read"]["seconds"] >= 0 and items["write"]["peak_rss_gib"] > 0
    assert phases["full load, crlf"]["rows"] == phases["full load"]["rows"]
    assert phases["replay"]["note"] == "no new commit"
    assert all(phase["peak_rss_gib"] > 0 and phase["wall_s"] > 0 for phase in phases.values())
    assert phases["daily batch"]["rows"] == phases["daily batch into scale 0.002"]["rows"]
    shutil.rmtree(tmp_path / "b")


@pytest.mark.slow
def test_benchmark_of_the_distributed_path_smoke_run(tmp_path: Path) -> None:
    figures_file = tmp_path / "bench.json"
    at = ["--root", str(tmp_path / "b"), "--json", str(figures_file)]
    main(["bench", "--scale", "0.002", "--workers", "2", "--memory-budget", "4MiB", *at])
    figures = json.loads(figures_file.read_text())
    phases = {phase["phase"]: phase for phase in figures["phases"]}
    assert list(phases) == ["1x, one task", "1x, 1 worker(s)", "1x, 2 worker(s)", "3x, 2 worker(s)"]
    assert phases["1x, 2 worker(s)"]["rows"] == phases["1x, one task"]["rows"]
    assert 2.5 < phases["3x, 2 worker(s)"]["rows"] / phases["1x, one task"]["rows"] < 3.5
    items = phases["3x, 2 worker(s)"]["tables"]["order_items"]
    assert items["parse"]["units"] >= 1 and items["write"]["units"] > 1 and items["write"]["peak_rss_gib"] > 0
    assert figures["speed_up"] > 0 and figures["worker_peak_3x_vs_1x"] > 0
    assert (
        figures["coordinator_peak_3x_vs_1x"] > 0 and "plans and finishes" in phases["3x, 2 worker(s)"]["note"]
    )
    # A terabyte like the batch, modelled from the 2-worker run: every table cut by the terabyte's plan.
    terabyte = figures["per_terabyte"]
    assert terabyte["usage"]["raw_bytes"] == 10**12
    assert terabyte["usage"]["child_executions"] > sum(
        buckets + groups for buckets, groups in terabyte["plans"].values()
    )
    assert terabyte["by_service"]["fargate"] > 0 and terabyte["by_service"]["s3"] > 0
    shutil.rmtree(tmp_path / "b")


def _loaded(lake: Path) -> tuple[dict[str, pl.DataFrame], dict[str, list[tuple[str, ...]]]]:
    """The lakehouse tables (timestamps to the second) and each table's rejected reasons, sorted."""
    from pipeline.batch import rejected_uri
    from pipeline.specs import TABLES

    store = open_store(str(lake))
    tables, reasons = {}, {}
    for name, spec in TABLES.items():
        frame = pl.read_delta(table_uri(store, name)).with_columns(
            pl.col(pl.Datetime("us", "UTC")).dt.truncate("1s")
        )
        tables[name] = frame.sort(spec.primary_key)
        rejected = pl.read_delta(rejected_uri(store, name))
        reasons[name] = sorted(tuple(row) for row in rejected.get_column("reject_reasons").to_list())
    return tables, reasons


@pytest.mark.slow
def test_every_input_shape_of_the_benchmark_loads_the_same_tables(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each shape is the same batch written otherwise: the same rows must land and the same be rejected."""
    from pipeline import generate as generator
    from pipeline.bench import SHAPES, reshape

    monkeypatch.setattr(generator, "PART_ROWS", 2_000)  # several files per table, for one-file to join
    source = tmp_path / "generated"
    generator.generate(open_store(str(source)), scale=0.0005, seed=31)
    assert len(list((source / "raw" / "order_items").glob("*.csv"))) > 3
    shaped = {}
    for shape in SHAPES:
        lake = tmp_path / shape
        reshape(source, lake, shape)
        shaped[shape] = lake
    run_batch(open_store(str(source)))
    expected_tables, expected_reasons = _loaded(source)
    assert sum(len(found) for found in expected_reasons.values()) > 10  # the batch is dirty
    assert len(list((shaped["one-file"] / "raw" / "order_items").glob("*.csv"))) == 2  # and the dirty one
    for shape, lake in shaped.items():
        run_batch(open_store(str(lake)))
        tables, reasons = _loaded(lake)
        assert reasons == expected_reasons, shape
        for name, frame in tables.items():
            assert frame.equals(expected_tables[name]), (shape, name)


def test_maintain_refuses_while_a_batch_holds_the_lock(root: Path) -> None:
    """An OPTIMIZE beside a batch's commit of files it wrote earlier can double the compacted rows."""
    store = open_store(str(root))
    write_raw(root, "products", "p.csv", "5,2,Books,Novel")
    write_raw(root, "orders", "o.csv", "1,10,7,2025-04-01T11:27:00,12.50,2025-04-01")
    write_raw(root, "order_items", "i.csv", "1,10,7,,5,1,0,2025-04-01T11:27:00,2025-04-01")
    run_batch(store)
    running = acquire_lock(store, "20261203T000000Z-abcdef")
    with pytest.raises(BatchLockedError, match="20261203T000000Z-abcdef"):
        maintain_tables(store)
    assert lock_holder(store)["batch"] == "20261203T000000Z-abcdef"  # the batch keeps its lock
    running.release()
    assert "products" in maintain_tables(store)
    assert lock_holder(store) == {}  # released after maintaining


def test_maintain_writes_no_lock_into_a_folder_without_tables(root: Path) -> None:
    assert maintain_tables(open_store(str(root))) == {}
    assert list(root.iterdir()) == []
