"""Whole batches on a local root: accounting, rejected rows, archive, failures and re-runs."""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from pipeline import batch as batch_module
from pipeline import delta
from pipeline.batch import BatchReport, StepReport, rejected_uri, run_batch, table_uri
from pipeline.errors import BatchLockedError, MissingDatasetError, StepError
from pipeline.generate import generate, generate_next_day
from pipeline.lock import LOCK_KEY
from pipeline.manifest import Manifest, unfinished_manifests
from pipeline.specs import TABLES, TableSpec
from pipeline.storage import Store, open_store
from tests.conftest import SHARED_SAMPLE
from tests.helpers import write_raw

RULES = {
    "missing_column",
    "malformed_row",
    "null",
    "invalid",
    "range",
    "date_mismatch",
    "duplicate_row",
    "duplicate_key",
    "unknown_order_id",
    "unknown_product_id",
}


def raw_files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in (root / "raw").rglob("*.csv"))


def table_state(root: Path) -> dict[str, pl.DataFrame]:
    store = open_store(str(root))
    return {
        name: pl.read_delta(table_uri(store, name)).sort(spec.primary_key)
        for name, spec in TABLES.items()
        if (root / "lakehouse-dwh" / name).exists()
    }


def small_batch(root: Path) -> None:
    write_raw(root, "products", "p.csv", "5,2,Books,Novel", "6,3,Toys,Ball", "6,3,Toys,Ball", "x,1,Home,Lamp")
    write_raw(
        root,
        "orders",
        "o.csv",
        "1,10,7,2025-04-01T11:27:00,12.50,2025-04-01",
        "2,11,7,2025-04-02T09:00:00,-3,2025-04-02",
        "3,12,8,2025-04-02T09:00:00,5,2025-04-03",
    )
    write_raw(
        root,
        "order_items",
        "i.csv",
        "1,10,7,,5,1,0,2025-04-01T11:27:00,2025-04-01",
        "2,10,7,3,99,2,1,2025-04-01T11:27:00,2025-04-01",
        "3,11,7,3,5,1,0,2025-04-02T09:00:00,2025-04-02",
        "4,10,7,3,5,2",
    )


def test_small_batch_writes_valid_rows_and_rejects_the_rest_with_reasons(root: Path) -> None:
    small_batch(root)
    report = run_batch(open_store(str(root)))
    steps = {s.table: s for s in report.steps}
    assert (steps["products"].inserted, steps["products"].rejected) == (2, 2)
    assert (steps["orders"].inserted, steps["orders"].rejected) == (1, 2)
    assert (steps["order_items"].inserted, steps["order_items"].rejected) == (1, 3)
    assert report.table_counts == {"products": 2, "orders": 1, "order_items": 1}

    rejected = pl.read_delta(rejected_uri(open_store(str(root)), "order_items")).sort("source_line")
    assert rejected.select("id", "reject_reasons", "source_file", "source_line").rows() == [
        ("2", ["unknown_product_id"], "raw/order_items/i.csv", 3),
        ("3", ["unknown_order_id"], "raw/order_items/i.csv", 4),
        (None, ["malformed_row"], "raw/order_items/i.csv", 5),
    ]
    assert rejected.get_column("raw_record").to_list()[-1] == "4,10,7,3,5,2"
    assert rejected.get_column("batch_id").unique().to_list() == [report.batch_id]
    assert rejected.schema["rejected_at"] == pl.Datetime("us", "UTC")

    orders_rejected = pl.read_delta(rejected_uri(open_store(str(root)), "orders")).sort("source_line")
    assert orders_rejected.select("total_amount", "date", "reject_reasons").rows() == [
        ("-3", "2025-04-02", ["range:total_amount"]),
        ("5", "2025-04-03", ["date_mismatch"]),
    ]
    products_rejected = pl.read_delta(rejected_uri(open_store(str(root)), "products")).sort("source_line")
    assert products_rejected.get_column("reject_reasons").to_list() == [
        ["duplicate_row"],
        ["invalid:product_id"],
    ]


def test_generated_batch_accounts_for_every_row_and_covers_every_rule(root: Path) -> None:
    store = open_store(str(root))
    generated = generate(store, scale=0.002, seed=7)
    report = run_batch(store)
    seen_rules = set()
    for step in report.steps:
        table_rows = delta.count_rows(table_uri(store, step.table))
        rejected_rows = pl.read_delta(rejected_uri(store, step.table)).height
        assert step.rows_in == step.inserted + step.rejected
        assert table_rows + rejected_rows == step.rows_in, step.table
        assert (
            rejected_rows
            == step.rejected
            == sum(step.rejected_by_reason.values()) - _multi(store, step.table)
        )
        seen_rules |= {reason.split(":")[0] for reason in step.rejected_by_reason}
    assert seen_rules == RULES
    assert sum(s.rows_in for s in report.steps) > sum(generated.rows.values())
    assert raw_files(root) == []
    assert len(list((root / "archived").rglob("*.csv"))) == len(generated.files)
    assert (root / "reports" / f"{report.batch_id}.json").exists()
    assert (root / "manifests" / f"{report.batch_id}.json").exists()


def _multi(store: Store, table: str) -> int:
    """Reasons beyond the first on rows rejected for several reasons at once."""
    reasons = pl.read_delta(rejected_uri(store, table)).get_column("reject_reasons").list.len()
    return int((reasons - 1).sum())


def test_same_files_again_change_nothing(root: Path) -> None:
    store = open_store(str(root))
    generate(store, scale=0.001, seed=3)
    first = run_batch(store)
    before = table_state(root)
    versions = {s.table: s.delta_version for s in first.steps}
    for path in (root / "archived").rglob("*.csv"):
        table = path.relative_to(root / "archived").parts[0]
        shutil.copy(path, root / "raw" / table / path.name)
    second = run_batch(store)
    assert [(s.inserted, s.updated) for s in second.steps] == [(0, 0)] * 3
    assert {s.table: s.delta_version for s in second.steps} == versions
    for name, frame in table_state(root).items():
        assert frame.equals(before[name]), name


def test_next_day_batch_inserts_updates_and_replays_idempotently(root: Path) -> None:
    store = open_store(str(root))
    generate(store, scale=0.002, seed=5, dirty=False)
    run_batch(store)
    generate_next_day(store, scale=0.002, seed=5, dirty=False)
    day = run_batch(store)
    steps = {s.table: s for s in day.steps}
    assert steps["orders"].inserted > 0 and steps["orders"].updated > 0
    assert steps["products"].updated > 0
    assert steps["order_items"].inserted > 0
    assert all(s.rejected == 0 for s in day.steps)
    versions = {s.table: s.delta_version for s in day.steps}
    for path in (root / "archived").rglob(f"*/{day.batch_id}/*.csv"):
        table = path.relative_to(root / "archived").parts[0]
        shutil.copy(path, root / "raw" / table / path.name)
    replay = run_batch(store)
    assert {s.table: s.delta_version for s in replay.steps} == versions
    assert all(s.unchanged == s.rows_in for s in replay.steps)


def test_steps_report_their_tables_schemas_for_the_catalog(root: Path) -> None:
    store = open_store(str(root))
    generate(store, scale=0.002, seed=5, dirty=False)
    first = {s.table: s.schemas for s in run_batch(store).steps}
    # Only tables that exist: a clean batch creates no rejected table.
    assert {table: sorted(digests) for table, digests in first.items()} == {t: [t] for t in TABLES}
    generate_next_day(store, scale=0.002, seed=5, dirty=True)
    day = {s.table: s.schemas for s in run_batch(store).steps}
    for table in TABLES:
        assert day[table][table] == first[table][table]  # the same schema: the same digest
        assert f"rejected_{table}" in day[table]
    # The digest follows the schema: the same rows and partitions with one column's type changed.
    products = delta.scan(table_uri(store, "products"))
    assert products is not None
    rows = products.collect()
    changed = rows.with_columns(pl.col("product_id").cast(pl.Int64))
    for name, frame in (("same", rows), ("again", rows), ("other", changed)):
        delta.write_deltalake(str(root / name), frame.to_arrow(), partition_by=["department_id"])
    same = delta.schema_digest(str(root / "same"))
    assert same == delta.schema_digest(str(root / "again"))
    assert delta.schema_digest(str(root / "other")) not in (None, same)
    assert delta.schema_digest(str(root / "none")) is None


def test_missing_dataset_processes_nothing(root: Path) -> None:
    write_raw(root, "products", "p.csv", "5,2,Books,Novel")
    write_raw(root, "order_items", "i.csv", "1,10,7,,5,1,0,2025-04-01T11:27:00,2025-04-01")
    with pytest.raises(MissingDatasetError, match="raw/orders/"):
        run_batch(open_store(str(root)))
    assert raw_files(root) == ["raw/order_items/i.csv", "raw/products/p.csv"]
    assert not (root / "manifests").exists() or not list((root / "manifests").glob("*.json"))
    assert not (root / "lakehouse-dwh").exists()


def test_non_csv_files_do_not_count_as_a_dataset(root: Path) -> None:
    small_batch(root)
    (root / "raw" / "orders" / "o.csv").rename(root / "raw" / "orders" / "o.txt")
    with pytest.raises(MissingDatasetError, match="raw/orders/"):
        run_batch(open_store(str(root)))


def test_failure_part_way_keeps_raw_files_and_a_rerun_resumes(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = open_store(str(root))
    generate(store, scale=0.001, seed=11)
    files = raw_files(root)
    real_merge = delta.merge_rows

    def failing_merge(uri: str, rows: pl.DataFrame, spec: TableSpec, **kwargs: Any) -> delta.MergeResult:
        if spec.name == "order_items":
            raise OSError("disk full")
        return real_merge(uri, rows, spec, **kwargs)

    monkeypatch.setattr(delta, "merge_rows", failing_merge)
    with pytest.raises(StepError, match="step order_items failed: OSError: disk full"):
        run_batch(store)
    assert raw_files(root) == files
    assert store.stat(LOCK_KEY) is None
    (pending,) = unfinished_manifests(store)
    committed = table_state(root)
    assert set(committed) == {"products", "orders"}

    monkeypatch.setattr(delta, "merge_rows", real_merge)
    report = run_batch(store)
    assert report.batch_id == pending.batch_id
    assert raw_files(root) == []
    assert table_state(root)["orders"].equals(committed["orders"])
    for step in report.steps:
        rejected = pl.read_delta(rejected_uri(store, step.table))
        assert rejected.height == step.rejected, f"{step.table} rejected rows duplicated by the re-run"


def test_archive_failure_leaves_the_rest_in_raw_and_a_rerun_finishes(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = open_store(str(root))
    generate(store, scale=0.001, seed=12)
    files = raw_files(root)
    calls = {"n": 0}
    real_move = type(store).move

    def flaky_move(self: Store, src: str, dst: str, **kwargs: Any) -> None:
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("network down")
        return real_move(self, src, dst, **kwargs)

    monkeypatch.setattr(type(store), "move", flaky_move)
    with pytest.raises(StepError, match="step archive failed"):
        run_batch(store)
    assert len(raw_files(root)) == len(files) - 1
    monkeypatch.setattr(type(store), "move", real_move)
    report = run_batch(store)
    assert report.archived_files == len(files)
    assert raw_files(root) == []


def test_files_landing_after_the_snapshot_wait_for_the_next_batch(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    small_batch(root)
    real_step = batch_module.run_step

    def step_then_land(store: Store, manifest: Manifest, spec: TableSpec, **kwargs: Any) -> StepReport:
        write_raw(root, spec.name, "late.csv", *([] if spec.name != "products" else ["9,1,Home,Late"]))
        return real_step(store, manifest, spec, **kwargs)

    monkeypatch.setattr(batch_module, "run_step", step_then_land)
    report = run_batch(open_store(str(root)))
    assert raw_files(root) == ["raw/order_items/late.csv", "raw/orders/late.csv", "raw/products/late.csv"]
    assert report.table_counts["products"] == 2
    monkeypatch.undo()
    later = run_batch(open_store(str(root)))
    assert later.batch_id != report.batch_id
    assert {s.table: s.inserted for s in later.steps}["products"] == 1
    assert raw_files(root) == []


def test_two_runs_at_once_never_process_the_same_files(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    small_batch(root)
    inside, release = threading.Event(), threading.Event()
    real_step = batch_module.run_step

    def held_step(store: Store, manifest: Manifest, spec: TableSpec, **kwargs: Any) -> StepReport:
        inside.set()
        assert release.wait(30)
        return real_step(store, manifest, spec, **kwargs)

    monkeypatch.setattr(batch_module, "run_step", held_step)
    results: list[BatchReport] = []
    first = threading.Thread(target=lambda: results.append(run_batch(open_store(str(root)))))
    first.start()
    try:
        assert inside.wait(30)
        with pytest.raises(BatchLockedError):
            run_batch(open_store(str(root)))
    finally:
        release.set()
        first.join()
    assert len(results) == 1
    assert len(list((root / "archived").rglob("*.csv"))) == 3
    assert len(list((root / "reports").glob("*.json"))) == 1


def test_a_second_run_waits_for_the_lock(root: Path) -> None:
    small_batch(root)
    store = open_store(str(root))
    store.write_bytes(LOCK_KEY, b'{"batch": "other", "pid": 1, "host": "h", "since": "t"}')
    with pytest.raises(BatchLockedError, match="another run holds the lock"):
        run_batch(store)
    assert len(raw_files(root)) == 3


def test_a_file_changed_after_the_snapshot_is_refused(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    small_batch(root)
    store = open_store(str(root))

    def fail(*args: object, **kwargs: object) -> int:
        raise OSError("boom")

    monkeypatch.setattr(batch_module, "archive_batch", fail)
    with pytest.raises(StepError):
        run_batch(store)
    monkeypatch.undo()
    write_raw(root, "orders", "o.csv", "1,10,7,2025-04-01T11:27:00,99.00,2025-04-01")
    with pytest.raises(StepError, match=r"raw/orders/o\.csv changed after batch"):
        run_batch(store)


@pytest.mark.skipif(not SHARED_SAMPLE.is_dir(), reason="../shared/data/original-sample is not present")
def test_original_public_sample_loads_whole(root: Path) -> None:
    for table in TABLES:
        (root / "raw" / table).mkdir(parents=True)
        shutil.copy(SHARED_SAMPLE / f"{table}.csv", root / "raw" / table / f"{table}.csv")
    report = run_batch(open_store(str(root)))
    assert {s.table: (s.rows_in, s.inserted, s.rejected) for s in report.steps} == {
        "products": (1000, 1000, 0),
        "orders": (7500, 7500, 0),
        "order_items": (40803, 40803, 0),
    }
    assert report.table_counts == {"products": 1000, "orders": 7500, "order_items": 40803}


def test_late_rejects_get_their_text_without_reading_files_again(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = open_store(str(root))
    generate(store, scale=0.001, seed=9)
    reads: Counter[str] = Counter()
    real_read_chunks = batch_module.read_chunks

    def counted(path: Path, spec: TableSpec, source: str, *args: Any, **kwargs: Any) -> Any:
        reads[source] += 1
        return real_read_chunks(path, spec, source, *args, **kwargs)

    monkeypatch.setattr(batch_module, "read_chunks", counted)
    report = run_batch(store)
    late = {"duplicate_row", "duplicate_key", "unknown_order_id", "unknown_product_id"}
    assert any(reason in late for step in report.steps for reason in step.rejected_by_reason)
    assert reads and set(reads.values()) == {1}
    rejected = pl.read_delta(rejected_uri(store, "order_items")).filter(
        pl.col("reject_reasons").list.contains("unknown_order_id")
    )
    assert rejected.height and rejected.get_column("id").null_count() == 0


def test_late_rejects_fall_back_to_reading_again_when_the_cut_out_text_differs(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    small_batch(root)

    def wrong_text(path: Path, spec: TableSpec, source: str, layout: Any, lines: pl.Series) -> pl.DataFrame:
        shaped = real(path, spec, source, layout, lines)
        assert shaped is not None
        return shaped.with_columns(pl.lit("7").alias(spec.primary_key))

    real = batch_module.records_at_lines
    monkeypatch.setattr(batch_module, "records_at_lines", wrong_text)
    report = run_batch(open_store(str(root)))
    assert {s.table: s.rejected_by_reason for s in report.steps}["order_items"] == {
        "malformed_row": 1,
        "unknown_order_id": 1,
        "unknown_product_id": 1,
    }
    rejected = pl.read_delta(rejected_uri(open_store(str(root)), "products")).sort("source_line")
    assert rejected.select("product_id", "department", "reject_reasons").rows() == [
        ("6", "Toys", ["duplicate_row"]),
        ("x", "Home", ["invalid:product_id"]),
    ]


def test_rows_older_than_the_lakehouse_are_rejected_as_stale_not_counted_unchanged(root: Path) -> None:
    store = open_store(str(root))
    small_batch(root)
    run_batch(store)
    write_raw(root, "products", "p2.csv", "5,2,Books,Novel")
    write_raw(
        root,
        "orders",
        "o2.csv",
        "1,10,7,2025-04-01T11:00:00,99.00,2025-04-01",  # older than the stored 11:27: stale
        "1,13,7,2025-04-05T08:00:00,1.00,2025-04-05",
    )
    write_raw(root, "order_items", "i2.csv", "1,10,7,,5,1,0,2025-04-01T10:00:00,2025-04-01")
    report = run_batch(store)
    steps = {s.table: s for s in report.steps}
    assert steps["orders"].rejected_by_reason == {"stale_row": 1}
    assert (steps["orders"].inserted, steps["orders"].updated, steps["orders"].unchanged) == (1, 0, 0)
    assert steps["order_items"].rejected_by_reason == {"stale_row": 1}
    for step in report.steps:
        assert step.inserted + step.updated + step.unchanged + step.rejected == step.rows_in
    orders = table_state(root)["orders"]
    assert orders.filter(pl.col("order_id") == 10).get_column("total_amount").to_list() == [12.5]
    stale = pl.read_delta(rejected_uri(store, "orders")).filter(pl.col("batch_id") == report.batch_id)
    assert stale.select("order_id", "total_amount", "source_line").rows() == [("10", "99.00", 2)]


def test_the_next_day_follows_a_lake_of_any_year(root: Path) -> None:
    """A lake loaded from someone else's files (here 2019) gets its next day too."""
    store = open_store(str(root))
    write_raw(root, "products", "p.csv", "5,2,Books,Novel")
    write_raw(root, "orders", "o.csv", "1,10,7,2019-03-01T10:00:00,12.50,2019-03-01")
    write_raw(root, "order_items", "i.csv", "1,10,7,,5,1,0,2019-03-01T10:00:00,2019-03-01")
    run_batch(store)
    generate_next_day(store, scale=0.001, seed=1, dirty=False)
    report = run_batch(store)
    orders = table_state(root)["orders"]
    assert report.status == "succeeded" and orders.get_column("date").max() == "2019-03-02"
    assert str(orders.get_column("date").min()) >= "2019-01-30"


def _land_again(root: Path, batch_id: str) -> None:
    for path in (root / "archived").rglob(f"*/{batch_id}/*.csv"):
        table = path.relative_to(root / "archived").parts[0]
        shutil.copy(path, root / "raw" / table / path.name)


def test_the_same_files_again_are_skipped_and_store_no_rejected_row_twice(root: Path) -> None:
    store = open_store(str(root))
    generate(store, scale=0.001, seed=3)
    first = run_batch(store)
    rejected_before = {name: pl.read_delta(rejected_uri(store, name)).height for name in TABLES}
    _land_again(root, first.batch_id)
    again = run_batch(store)
    assert all(s.rows_in == 0 and len(s.skipped_files) == s.files for s in again.steps)
    assert {name: pl.read_delta(rejected_uri(store, name)).height for name in TABLES} == rejected_before
    assert raw_files(root) == []
    forced = (root / "archived" / "orders" / first.batch_id).glob("*.csv")
    for path in forced:
        shutil.copy(path, root / "raw" / "orders" / path.name)
    _land_again(root, first.batch_id)
    report = run_batch(store, force=True)
    assert {s.table: s.unchanged for s in report.steps}["orders"] > 0
    assert not any(s.skipped_files for s in report.steps)


def test_an_old_batch_landed_again_after_a_newer_one_reverts_nothing(root: Path) -> None:
    store = open_store(str(root))
    generate(store, scale=0.002, seed=5, dirty=False)
    old = run_batch(store)
    generate_next_day(store, scale=0.002, seed=5, dirty=False)
    day = run_batch(store)
    assert {s.table: s.updated for s in day.steps}["orders"] > 0
    after_day = table_state(root)
    _land_again(root, old.batch_id)
    run_batch(store)
    for name, frame in table_state(root).items():
        assert frame.equals(after_day[name]), f"{name}: corrections or renames were reverted"


def test_a_re_export_of_the_same_rows_in_other_files_changes_no_table(root: Path) -> None:
    store = open_store(str(root))
    generate(store, scale=0.001, seed=6, dirty=False)
    first = run_batch(store)
    before = table_state(root)
    versions = {s.table: delta.table_version(table_uri(store, s.table)) for s in first.steps}
    for table in TABLES:
        rows = pl.concat(
            [
                pl.read_csv(p, infer_schema=False)
                for p in (root / "archived" / table / first.batch_id).glob("*.csv")
            ]
        )
        half = rows.height // 2
        # Other files, other order, CRLF, every field quoted: the same rows.
        rows.reverse().head(half).write_csv(
            root / "raw" / table / "export-a.csv", line_terminator="\r\n", quote_style="always"
        )
        rows.reverse().tail(rows.height - half).write_csv(root / "raw" / table / "export-b.csv")
    again = run_batch(store)
    assert all(s.unchanged == s.rows_in and s.rejected == 0 for s in again.steps)
    assert {s.table: delta.table_version(table_uri(store, s.table)) for s in again.steps} == versions
    for name, frame in table_state(root).items():
        assert frame.equals(before[name]), name


def test_a_file_touched_after_the_snapshot_is_read_as_usual(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    small_batch(root)
    real_step = batch_module.run_step

    def touch_then_step(store: Store, manifest: Manifest, spec: TableSpec, **kwargs: Any) -> StepReport:
        for path in (root / "raw" / spec.name).glob("*.csv"):
            os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
        return real_step(store, manifest, spec, **kwargs)

    monkeypatch.setattr(batch_module, "run_step", touch_then_step)
    report = run_batch(open_store(str(root)))
    assert report.status == "succeeded" and raw_files(root) == []


def test_a_file_overwritten_while_its_step_reads_it_fails_the_step_and_commits_nothing(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipeline import records

    write_raw(root, "products", "p.csv", *[f"{i},1,Books,Product {i}" for i in range(1, 2001)])
    write_raw(root, "orders", "o.csv", "1,10,7,2025-04-01T11:27:00,12.50,2025-04-01")
    write_raw(root, "order_items", "i.csv", "1,10,7,,5,1,0,2025-04-01T11:27:00,2025-04-01")
    original = (root / "raw" / "products" / "p.csv").read_bytes()
    real_fill = records._Buffer.fill
    calls = {"n": 0}

    def overwrite_after_the_first_block(self: Any) -> int:
        read = real_fill(self)
        calls["n"] += 1
        if calls["n"] == 2:  # another writer replaces the file in place, half of it read
            (root / "raw" / "products" / "p.csv").write_bytes(original.replace(b"Product", b"Changed"))
        return read

    monkeypatch.setattr(records._Buffer, "fill", overwrite_after_the_first_block)
    monkeypatch.setattr(
        batch_module, "read_chunks", functools.partial(batch_module.read_chunks, block_size=4096)
    )
    with pytest.raises(StepError, match=r"raw/products/p\.csv changed while it was read"):
        run_batch(open_store(str(root)))
    assert not (root / "lakehouse-dwh" / "products").exists()
    assert not (root / "rejected" / "products").exists()
    assert len(raw_files(root)) == 3


def test_a_batch_failing_its_checks_keeps_its_files_in_raw_and_can_be_abandoned(root: Path) -> None:
    from pipeline.batch import abandon_batch
    from pipeline.errors import StepError as Failed

    store = open_store(str(root))
    write_raw(root, "products", "p.csv", "x,2,Books,Novel")  # every product rejected: an empty table
    write_raw(root, "orders", "o.csv", "1,10,7,2025-04-01T11:27:00,12.50,2025-04-01")
    write_raw(root, "order_items", "i.csv", "1,10,7,,5,1,0,2025-04-01T11:27:00,2025-04-01")
    with pytest.raises(Failed, match=r"step checks failed: .*table products"):
        run_batch(store)
    assert len(raw_files(root)) == 3, "a batch that fails its checks archives nothing"
    (pending,) = unfinished_manifests(store)
    done = abandon_batch(store, pending.batch_id)
    assert done.rejected_rows["products"] == 1 and not unfinished_manifests(store)
    assert pl.read_delta(rejected_uri(store, "products")).height == 0
    write_raw(root, "products", "p.csv", "5,2,Books,Novel")  # fixed
    report = run_batch(store)
    assert report.status == "succeeded" and raw_files(root) == []


def test_a_partial_archive_finishes_even_when_a_new_file_of_the_same_name_landed(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    small_batch(root)
    store = open_store(str(root))
    real_move = type(store).move
    calls = {"n": 0}

    def dies_second(self: Store, src: str, dst: str, **kwargs: Any) -> None:
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("killed")
        return real_move(self, src, dst, **kwargs)

    monkeypatch.setattr(type(store), "move", dies_second)
    with pytest.raises(StepError, match="step archive failed"):
        run_batch(store)
    monkeypatch.undo()
    # Tomorrow's products file lands under the same name as the one already archived.
    write_raw(root, "products", "p.csv", "8,2,Books,Tomorrow")
    first = run_batch(store)
    assert first.archived_files == 3 and raw_files(root) == ["raw/products/p.csv"]
    write_raw(root, "orders", "o2.csv", "1,20,7,2025-04-05T11:27:00,1.50,2025-04-05")
    write_raw(root, "order_items", "i2.csv", "9,20,7,,8,1,0,2025-04-05T11:27:00,2025-04-05")
    second = run_batch(store)
    assert {s.table: s.inserted for s in second.steps}["products"] == 1


def test_abandon_brings_archived_files_back_to_raw(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.batch import abandon_batch

    small_batch(root)
    store = open_store(str(root))
    monkeypatch.setattr(batch_module, "check_tables", lambda store: {})
    real_move = type(store).move
    calls = {"n": 0}

    def dies_second(self: Store, src: str, dst: str, **kwargs: Any) -> None:
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("killed")
        return real_move(self, src, dst, **kwargs)

    monkeypatch.setattr(type(store), "move", dies_second)
    with pytest.raises(StepError):
        run_batch(store)
    monkeypatch.undo()
    assert len(raw_files(root)) == 2
    write_raw(root, "products", "p.csv", "8,2,Books,Tomorrow")
    (pending,) = unfinished_manifests(store)
    done = abandon_batch(store, pending.batch_id)
    assert done.restored == [f"raw/products/p.{pending.batch_id}.csv"]
    assert len(raw_files(root)) == 4 and not list((root / "archived").rglob("*.csv"))
    report = run_batch(store)
    assert {s.table: s.rows_in for s in report.steps}["products"] == 5


def _rejected_state(root: Path) -> dict[str, pl.DataFrame]:
    store = open_store(str(root))
    return {
        name: pl.read_delta(rejected_uri(store, name))
        .drop("batch_id", "rejected_at")
        .sort("source_file", "source_line", nulls_last=True)
        for name in TABLES
    }


def test_a_staged_batch_failing_after_its_first_group_resumes_to_one_runs_tables(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A staged step commits group by group: a failure between two groups is repaired by running again."""
    from pipeline.stages import Plan
    from pipeline.storage import DOWNLOAD_PREFIX

    plain, staged = tmp_path / "plain", tmp_path / "staged"
    for lake in (plain, staged):
        generate(open_store(str(lake)), scale=0.002, seed=13)
    run_batch(open_store(str(plain)))

    real_merge = delta.merge_rows
    merges: list[str] = []

    def failing_second_merge(
        uri: str, rows: pl.DataFrame, spec: TableSpec, **kwargs: Any
    ) -> delta.MergeResult:
        merges.append(spec.name)
        if merges.count("order_items") == 2:
            raise OSError("disk full")
        return real_merge(uri, rows, spec, **kwargs)

    monkeypatch.setattr(delta, "merge_rows", failing_second_merge)
    store = open_store(str(staged))
    with pytest.raises(StepError, match="step order_items failed"):
        run_batch(store, plan=Plan(3, 4))
    assert delta.count_rows(table_uri(store, "order_items")) > 0  # the first group committed
    monkeypatch.setattr(delta, "merge_rows", real_merge)
    report = run_batch(store, plan=Plan(3, 4))

    assert raw_files(staged) == []
    expected, got = table_state(plain), table_state(staged)
    assert all(got[name].equals(expected[name]) for name in TABLES)
    assert all(frame.equals(_rejected_state(plain)[name]) for name, frame in _rejected_state(staged).items())
    items = next(step for step in report.steps if step.table == "order_items")
    assert items.unchanged > 0  # the first group's rows, merged before the failure, are found unchanged
    assert (items.buckets, items.groups) == (3, 4)
    assert set(items.stages) == {"read", "resolve", "write"}
    assert all(stage["peak_rss_gib"] > 0 for stage in items.stages.values())
    leftovers = list(Path(tempfile.gettempdir()).glob(f"{DOWNLOAD_PREFIX}{os.getpid()}-staging-*"))
    assert leftovers == []
