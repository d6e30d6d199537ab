"""MERGE semantics on real Delta tables under tmp_path."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from deltalake import DeltaTable
from polars.testing import assert_frame_equal

from pipeline import delta
from pipeline.errors import CommitConflictError, StorageError
from pipeline.specs import ORDERS, PRODUCTS
from pipeline.validate import table_schema


def orders(*rows: tuple[int, str, float]) -> pl.DataFrame:
    """Orders from (order_id, timestamp, total_amount); the date follows the timestamp."""
    return pl.DataFrame(
        [
            {
                "order_num": 1,
                "order_id": order_id,
                "user_id": 7,
                "order_timestamp": datetime.fromisoformat(stamp).replace(tzinfo=timezone.utc),
                "total_amount": amount,
                "date": stamp[:10],
            }
            for order_id, stamp, amount in rows
        ],
        schema=table_schema(ORDERS),
    )


def read(uri: str) -> pl.DataFrame:
    return pl.read_delta(uri).sort("order_id").select(ORDERS.column_names)


def test_first_merge_creates_a_partitioned_table_readers_can_use(tmp_path: Path) -> None:
    uri = str(tmp_path / "orders")
    result = delta.merge_rows(
        uri, orders((1, "2025-01-01 10:00:00", 5.0), (2, "2025-01-02 10:00:00", 6.0)), ORDERS
    )
    assert (result.inserted, result.updated, result.version) == (2, 0, 0)
    table = DeltaTable(uri)
    assert table.metadata().partition_columns == ["date"]
    assert table.protocol().min_reader_version == 1
    assert {p.name for p in Path(uri).iterdir()} >= {"date=2025-01-01", "date=2025-01-02"}
    assert pl.read_delta(uri).schema["order_timestamp"] == pl.Datetime("us", "UTC")


def test_dates_held_in_memory_are_stored_as_their_text(tmp_path: Path) -> None:
    """The pipeline holds ``date`` as a Date; the table stores the same day as text, null as null."""
    rows = orders(
        (1, "2024-12-31 10:00:00", 5.0), (2, "2025-03-01 10:00:00", 6.0), (3, "2025-01-15 08:00:00", 1.0)
    )
    as_dates = rows.with_columns(pl.col("date").str.to_date())
    uri = str(tmp_path / "orders")
    delta.merge_rows(uri, as_dates, ORDERS)
    assert_frame_equal(read(uri), rows.sort("order_id"))
    assert {p.name for p in Path(uri).iterdir() if p.is_dir()} >= {"date=2024-12-31", "date=2025-03-01"}
    with_null = pl.Series("date", [None, *as_dates.get_column("date").to_list()], pl.Date)
    assert delta._date_text(with_null).to_list() == [None, "2024-12-31", "2025-03-01", "2025-01-15"]


def test_look_ups_skip_partitions_whose_statistics_rule_the_keys_out(tmp_path: Path) -> None:
    """A partition none of whose files' key ranges holds a wanted key is not read: here it is gone."""
    uri = str(tmp_path / "orders")
    delta.merge_rows(
        uri,
        orders(
            (1, "2025-01-01 10:00:00", 5.0),
            (2, "2025-01-01 11:00:00", 6.0),
            (100, "2025-01-02 10:00:00", 7.0),
            (101, "2025-01-02 11:00:00", 8.0),
        ),
        ORDERS,
    )
    for data_file in (Path(uri) / "date=2025-01-02").glob("*.parquet"):
        data_file.unlink()

    def existing(*keys: int) -> list[int]:
        return delta.existing_values(uri, "order_id", pl.Series(keys, dtype=pl.Int32)).sort().to_list()

    assert existing(1, 5, 1000) == [1]
    with pytest.raises(StorageError, match="No such file"):
        existing(1, 100)  # 100 is in the range of the missing file: it must be read
    merged = delta.merge_rows(
        uri, orders((3, "2025-01-01 12:00:00", 9.0), (2, "2025-01-01 11:00:00", 6.5)), ORDERS
    )
    assert (merged.inserted, merged.updated) == (1, 1)


def test_new_keys_are_inserted_and_newer_rows_replace(tmp_path: Path) -> None:
    uri = str(tmp_path / "orders")
    delta.merge_rows(uri, orders((1, "2025-01-01 10:00:00", 5.0)), ORDERS)
    result = delta.merge_rows(
        uri, orders((1, "2025-01-01 11:00:00", 7.0), (2, "2025-01-01 09:00:00", 1.0)), ORDERS
    )
    assert (result.inserted, result.updated) == (1, 1)
    assert_frame_equal(read(uri), orders((1, "2025-01-01 11:00:00", 7.0), (2, "2025-01-01 09:00:00", 1.0)))


def test_same_timestamp_replaces(tmp_path: Path) -> None:
    uri = str(tmp_path / "orders")
    delta.merge_rows(uri, orders((1, "2025-01-01 10:00:00", 5.0)), ORDERS)
    result = delta.merge_rows(uri, orders((1, "2025-01-01 10:00:00", 9.5)), ORDERS)
    assert result.updated == 1
    assert read(uri).get_column("total_amount").to_list() == [9.5]


def test_older_row_does_not_overwrite(tmp_path: Path) -> None:
    uri = str(tmp_path / "orders")
    delta.merge_rows(uri, orders((1, "2025-01-02 10:00:00", 5.0)), ORDERS)
    result = delta.merge_rows(uri, orders((1, "2025-01-01 10:00:00", 99.0)), ORDERS)
    assert (result.inserted, result.updated, result.version) == (0, 0, 0)
    assert_frame_equal(read(uri), orders((1, "2025-01-02 10:00:00", 5.0)))


def test_replay_changes_nothing_and_commits_nothing(tmp_path: Path) -> None:
    uri = str(tmp_path / "orders")
    rows = orders((1, "2025-01-01 10:00:00", 5.0), (2, "2025-01-02 10:00:00", 6.0))
    delta.merge_rows(uri, rows, ORDERS)
    files = sorted(DeltaTable(uri).file_uris())
    result = delta.merge_rows(uri, rows, ORDERS)
    assert (result.inserted, result.updated, result.version) == (0, 0, 0)
    assert sorted(DeltaTable(uri).file_uris()) == files
    assert_frame_equal(read(uri), rows)


def test_newer_row_on_another_date_moves_partition_without_duplicating(tmp_path: Path) -> None:
    uri = str(tmp_path / "orders")
    delta.merge_rows(uri, orders((1, "2025-01-01 23:00:00", 5.0), (2, "2025-01-01 10:00:00", 1.0)), ORDERS)
    delta.merge_rows(uri, orders((1, "2025-01-02 01:00:00", 6.0)), ORDERS)
    assert_frame_equal(read(uri), orders((1, "2025-01-02 01:00:00", 6.0), (2, "2025-01-01 10:00:00", 1.0)))


def test_daily_merge_leaves_other_partitions_alone(tmp_path: Path) -> None:
    uri = str(tmp_path / "orders")
    delta.merge_rows(uri, orders(*[(i, f"2025-01-{i:02d} 10:00:00", 1.0) for i in range(1, 6)]), ORDERS)
    before = {f for f in DeltaTable(uri).file_uris() if "date=2025-01-05" not in f}
    delta.merge_rows(uri, orders((5, "2025-01-05 10:00:00", 2.0), (6, "2025-01-06 10:00:00", 1.0)), ORDERS)
    after = set(DeltaTable(uri).file_uris())
    assert before <= after, "files of untouched dates were rewritten"
    assert len(after - before) == 2


def test_products_incoming_row_replaces(tmp_path: Path) -> None:
    uri = str(tmp_path / "products")
    rows = pl.DataFrame(
        {"product_id": [1], "department_id": [2], "department": ["Books"], "product_name": ["Old"]},
        schema=table_schema(PRODUCTS),
    )
    delta.merge_rows(uri, rows, PRODUCTS)
    moved = rows.with_columns(pl.lit(3, pl.Int32).alias("department_id"), pl.lit("New").alias("product_name"))
    result = delta.merge_rows(uri, moved, PRODUCTS)
    assert result.updated == 1
    assert_frame_equal(pl.read_delta(uri).select(PRODUCTS.column_names), moved)


def test_rejected_rows_of_a_batch_are_replaced_not_duplicated(tmp_path: Path) -> None:
    uri = str(tmp_path / "rejected")
    rows = pl.DataFrame({"value": ["a", "b"], "batch_id": ["b1", "b1"]})
    delta.replace_batch_rows(uri, rows, batch_column="batch_id", batch_id="b1")
    delta.replace_batch_rows(
        uri, rows.with_columns(pl.lit("b2").alias("batch_id")), batch_column="batch_id", batch_id="b2"
    )
    delta.replace_batch_rows(uri, rows, batch_column="batch_id", batch_id="b1")
    counts = pl.read_delta(uri).group_by("batch_id").len().sort("batch_id")
    assert counts.rows() == [("b1", 2), ("b2", 2)]


def test_a_commit_conflict_is_retried_and_the_merge_lands_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    uri = str(tmp_path / "orders")
    delta.merge_rows(uri, orders((1, "2025-01-01 10:00:00", 5.0)), ORDERS)
    real_merge = delta._merge_rows_once
    calls = {"n": 0}

    def conflicting_once(*args: object, **kwargs: object) -> delta.MergeResult:
        calls["n"] += 1
        if calls["n"] == 1:
            raise CommitConflictError("another writer committed first")
        return real_merge(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(delta, "_merge_rows_once", conflicting_once)
    monkeypatch.setattr(delta.time, "sleep", lambda seconds: None)
    result = delta.merge_rows(uri, orders((2, "2025-01-01 11:00:00", 6.0)), ORDERS)
    assert calls["n"] == 2 and result.inserted == 1
    assert read(uri).get_column("order_id").to_list() == [1, 2]


def test_commit_conflicts_that_persist_are_raised_as_retryable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def always_conflicting(*args: object, **kwargs: object) -> delta.MergeResult:
        raise CommitConflictError("another writer committed first")

    monkeypatch.setattr(delta, "_merge_rows_once", always_conflicting)
    monkeypatch.setattr(delta.time, "sleep", lambda seconds: None)
    with pytest.raises(CommitConflictError) as raised:
        delta.merge_rows(str(tmp_path / "orders"), orders((1, "2025-01-01 10:00:00", 5.0)), ORDERS)
    assert raised.value.retryable


def test_only_the_kept_rows_are_merged(tmp_path: Path) -> None:
    uri = str(tmp_path / "orders")
    rows = orders(
        (1, "2025-01-01 10:00:00", 5.0), (2, "2025-01-02 10:00:00", 6.0), (3, "2025-01-03 10:00:00", 7.0)
    )
    keep = pl.Series([True, False, True])
    assert delta.merge_rows(uri, rows, ORDERS, keep=keep).inserted == 2
    assert read(uri).get_column("order_id").to_list() == [1, 3]
    result = delta.merge_rows(uri, rows, ORDERS, keep=pl.Series([False, True, False]))
    assert (result.inserted, result.updated) == (1, 0)
    assert read(uri).get_column("order_id").to_list() == [1, 2, 3]


def _first_open_returns(monkeypatch: pytest.MonkeyPatch, first: DeltaTable | None) -> dict[str, int]:
    """``delta.open_table`` returns ``first`` once (what another writer's commit made stale), then the
    real table; the returned dict counts the calls."""
    real_open = delta.open_table
    calls = {"n": 0}

    def opened(table_uri: str) -> DeltaTable | None:
        calls["n"] += 1
        return first if calls["n"] == 1 else real_open(table_uri)

    monkeypatch.setattr(delta, "open_table", opened)
    return calls


def test_a_first_write_that_finds_the_table_created_meanwhile_merges_into_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The writer saw no table, another writer created it before this one wrote: no row twice."""
    uri = str(tmp_path / "orders")
    rows = orders((1, "2025-04-01T10:00:00", 1.0), (2, "2025-04-02T10:00:00", 2.0))
    delta.merge_rows(uri, rows, ORDERS)
    _first_open_returns(monkeypatch, None)
    result = delta.merge_rows(uri, rows, ORDERS)
    assert (result.inserted, result.updated) == (0, 0)
    assert pl.read_delta(uri).height == 2


def test_rows_for_partitions_that_hold_nothing_are_written_not_merged(tmp_path: Path) -> None:
    uri = str(tmp_path / "orders")
    delta.merge_rows(uri, orders((1, "2025-01-01 10:00:00", 5.0)), ORDERS)
    new_days = orders((2, "2025-01-02 10:00:00", 6.0), (3, "2025-01-03 10:00:00", 7.0))
    result = delta.merge_rows(uri, new_days, ORDERS)
    assert (result.inserted, result.updated, result.version) == (2, 0, 1)
    assert DeltaTable(uri).history(1)[0]["operation"] == "WRITE"
    assert_frame_equal(read(uri), pl.concat([orders((1, "2025-01-01 10:00:00", 5.0)), new_days]))
    # A day that holds rows already is merged: its row is replaced, not written twice.
    result = delta.merge_rows(
        uri, orders((3, "2025-01-03 11:00:00", 8.0), (4, "2025-01-04 10:00:00", 1.0)), ORDERS
    )
    assert (result.inserted, result.updated) == (1, 1)
    assert DeltaTable(uri).history(1)[0]["operation"] == "MERGE"
    assert read(uri).get_column("order_id").to_list() == [1, 2, 3, 4]


def test_a_write_into_partitions_filled_meanwhile_conflicts_and_merges(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The writer saw an empty day, another writer filled it before this one committed: no row twice."""
    uri = str(tmp_path / "orders")
    delta.merge_rows(uri, orders((1, "2025-01-01 10:00:00", 5.0)), ORDERS)
    before = DeltaTable(uri)  # version 0: 2025-01-02 holds nothing
    rows = orders((2, "2025-01-02 10:00:00", 6.0), (3, "2025-01-02 11:00:00", 7.0))
    delta.merge_rows(uri, rows, ORDERS)  # the other writer: version 1
    calls = _first_open_returns(monkeypatch, before)
    monkeypatch.setattr(delta.time, "sleep", lambda seconds: None)
    result = delta.merge_rows(uri, rows, ORDERS)
    assert calls["n"] >= 2, "the write from the stale snapshot did not conflict"
    assert (result.inserted, result.updated) == (0, 0)
    assert read(uri).get_column("order_id").to_list() == [1, 2, 3]


def test_a_new_integer_partition_is_written_and_an_existing_one_merged(tmp_path: Path) -> None:
    uri = str(tmp_path / "products")

    def product(product_id: int, department_id: int, name: str) -> pl.DataFrame:
        return pl.DataFrame(
            {
                "product_id": [product_id],
                "department_id": [department_id],
                "department": ["D"],
                "product_name": [name],
            },
            schema=table_schema(PRODUCTS),
        )

    delta.merge_rows(uri, product(1, 2, "a"), PRODUCTS)
    assert delta.merge_rows(uri, product(2, 5, "b"), PRODUCTS).inserted == 1
    assert DeltaTable(uri).history(1)[0]["operation"] == "WRITE"
    assert delta.merge_rows(uri, product(3, 5, "c"), PRODUCTS).inserted == 1
    assert DeltaTable(uri).history(1)[0]["operation"] == "MERGE"
    stored = pl.read_delta(uri).sort("product_id")
    assert stored.select("product_id", "department_id").rows() == [(1, 2), (2, 5), (3, 5)]


def test_rejected_rows_given_as_frames_are_written_once_even_after_a_lost_first_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rows given as a function of frames (the staged rejected rows) are streamed, each frame cast to the
    first one's schema; when the table turns out to exist already, the function is called again."""
    uri = str(tmp_path / "rejected")
    earlier = pl.DataFrame({"value": ["old"], "note": ["x"], "batch_id": ["b1"]})
    delta.replace_batch_rows(uri, earlier, batch_column="batch_id", batch_id="b1")
    calls = {"n": 0}

    def frames() -> Iterator[pl.DataFrame]:
        calls["n"] += 1
        yield pl.DataFrame({"value": ["a"], "note": ["y"], "batch_id": ["b1"]})
        yield pl.DataFrame(schema={"value": pl.String, "note": pl.String, "batch_id": pl.String})
        yield pl.DataFrame({"value": ["b", "c"], "note": [None, None], "batch_id": ["b1", "b1"]})

    _first_open_returns(monkeypatch, None)  # as if another writer created the table meanwhile
    delta.replace_batch_rows(uri, frames, batch_column="batch_id", batch_id="b1")
    assert calls["n"] == 2
    stored = pl.read_delta(uri).sort("value")
    assert stored.select("value", "note").rows() == [("a", "y"), ("b", None), ("c", None)]


def test_no_frames_write_nothing(tmp_path: Path) -> None:
    uri = str(tmp_path / "rejected")
    assert delta.replace_batch_rows(uri, lambda: iter([]), batch_column="batch_id", batch_id="b1") is None
    assert delta.open_table(uri) is None


def _last_operation(uri: str) -> tuple[str, str | None]:
    last = DeltaTable(uri).history(1)[0]
    return last["operation"], last.get("operationParameters", {}).get("mode")


def test_rows_whose_keys_were_not_stored_are_appended_while_the_table_is_where_they_were_looked_up(
    tmp_path: Path,
) -> None:
    uri = str(tmp_path / "orders")
    delta.merge_rows(uri, orders((1, "2025-01-01 10:00:00", 5.0)), ORDERS)
    looked_up = DeltaTable(uri).version()
    # A new key in a day that holds rows: a MERGE without ``none_stored_at``, an append with it.
    result = delta.merge_rows(uri, orders((2, "2025-01-01 11:00:00", 6.0)), ORDERS, none_stored_at=looked_up)
    assert (result.inserted, result.updated, result.version) == (1, 0, looked_up + 1)
    assert _last_operation(uri) == ("WRITE", "Append")
    assert read(uri).get_column("order_id").to_list() == [1, 2]
    # Looked up at an older version: the table moved on since, so the MERGE decides (2 is stored now).
    result = delta.merge_rows(
        uri,
        orders((2, "2025-01-01 11:00:00", 6.5), (3, "2025-01-01 12:00:00", 7.0)),
        ORDERS,
        none_stored_at=looked_up,
    )
    assert (result.inserted, result.updated) == (1, 1)
    assert _last_operation(uri)[0] == "MERGE"
    assert read(uri).get_column("order_id").to_list() == [1, 2, 3]


def test_an_append_that_another_commit_overtakes_is_not_committed_and_the_merge_decides(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same step running twice at once: both found the keys unstored; the second must not append them
    again on top of the first's commit."""
    uri = str(tmp_path / "orders")
    delta.merge_rows(uri, orders((1, "2025-01-01 10:00:00", 5.0)), ORDERS)
    looked_up = DeltaTable(uri).version()
    rows = orders((2, "2025-01-01 11:00:00", 6.0), (3, "2025-01-02 11:00:00", 7.0))
    real_write = delta.write_deltalake
    overtaken = {"n": 0}

    def write_after_the_other_step(table: DeltaTable, data: Any, **options: Any) -> None:
        if options.get("mode") == "append" and not overtaken["n"]:
            overtaken["n"] += 1
            real_write(uri, rows.to_arrow(), mode="append", partition_by=["date"])  # the other step
        real_write(table, data, **options)

    monkeypatch.setattr(delta, "write_deltalake", write_after_the_other_step)
    result = delta.merge_rows(uri, rows, ORDERS, none_stored_at=looked_up)
    assert overtaken["n"] == 1
    assert (result.inserted, result.updated) == (0, 0)
    assert _last_operation(uri) == ("WRITE", "Append")  # the other step's: the MERGE found nothing to do
    assert read(uri).get_column("order_id").to_list() == [1, 2, 3]
