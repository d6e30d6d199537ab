"""Survivor rules for duplicate rows and keys, and the reference check."""

from __future__ import annotations

import polars as pl

from pipeline.dedup import ORDER, split_survivors
from pipeline.specs import ORDER_ITEMS, ORDERS, PRODUCTS, TableSpec
from pipeline.validate import REASONS, validate
from tests.helpers import text_frame, valid_item, valid_order, valid_product


def checked(spec: TableSpec, rows: list[dict[str, str | None]]) -> pl.DataFrame:
    """Valid rows in batch order, as the step hands them to dedup."""
    frame = validate(text_frame(spec, rows).with_row_index(ORDER), spec)
    return frame.with_columns(pl.col(ORDER).cast(pl.Int64)).sort(ORDER).drop(REASONS)


def outcome(survivors: pl.DataFrame, losers: pl.DataFrame) -> tuple[list[int], dict[int, list[str]]]:
    kept = sorted(survivors.get_column(ORDER).to_list())
    lost = dict(zip(losers.get_column(ORDER).to_list(), losers.get_column(REASONS).to_list()))
    return kept, lost


def test_identical_row_is_a_duplicate_row_and_the_first_survives() -> None:
    rows = [valid_order(order_id="1"), valid_order(order_id="2"), valid_order(order_id="1")]
    kept, lost = outcome(*split_survivors(checked(ORDERS, rows), ORDERS, None))
    assert kept == [0, 1]
    assert lost == {2: ["duplicate_row"]}


def test_rows_identical_after_parsing_are_duplicates() -> None:
    rows = [valid_order(total_amount="12.5"), valid_order(total_amount=" 12.50 ")]
    _, lost = outcome(*split_survivors(checked(ORDERS, rows), ORDERS, None))
    assert lost == {1: ["duplicate_row"]}


def test_duplicate_key_keeps_the_greatest_order_timestamp() -> None:
    rows = [
        valid_order(order_timestamp="2025-04-01T12:00:00", total_amount="1"),
        valid_order(order_timestamp="2025-04-01T13:00:00", total_amount="2"),
        valid_order(order_timestamp="2025-04-01T11:00:00", total_amount="3"),
    ]
    kept, lost = outcome(*split_survivors(checked(ORDERS, rows), ORDERS, None))
    assert kept == [1]
    assert lost == {0: ["duplicate_key"], 2: ["duplicate_key"]}


def test_duplicate_key_tie_keeps_the_later_row() -> None:
    rows = [valid_item(reordered="0"), valid_item(reordered="1"), valid_item(id="2")]
    kept, lost = outcome(*split_survivors(checked(ORDER_ITEMS, rows), ORDER_ITEMS, None))
    assert kept == [1, 2]
    assert lost == {0: ["duplicate_key"]}


def test_products_duplicate_key_keeps_the_later_row() -> None:
    rows = [
        valid_product(product_name="new"),
        valid_product(product_name="newer"),
        valid_product(product_id="6"),
    ]
    survivors, losers = split_survivors(checked(PRODUCTS, rows), PRODUCTS, None)
    assert survivors.filter(pl.col("typed__product_id") == 5).get_column("product_name").to_list() == [
        "newer"
    ]
    assert losers.get_column(REASONS).to_list() == [["duplicate_key"]]


def test_duplicate_row_and_duplicate_key_together() -> None:
    rows = [
        valid_order(order_timestamp="2025-04-01T12:00:00"),
        valid_order(order_timestamp="2025-04-01T12:00:00"),
        valid_order(order_timestamp="2025-04-01T10:00:00"),
    ]
    kept, lost = outcome(*split_survivors(checked(ORDERS, rows), ORDERS, None))
    assert kept == [0]
    assert lost == {1: ["duplicate_row"], 2: ["duplicate_key"]}


def test_no_duplicates_keeps_everything() -> None:
    rows = [valid_order(order_id=str(i)) for i in range(1, 4)]
    survivors, losers = split_survivors(checked(ORDERS, rows), ORDERS, None)
    assert survivors.height == 3 and losers.height == 0


def test_unknown_order_id_and_product_id() -> None:
    rows = [
        valid_item(id="1"),
        valid_item(id="2", order_id="99"),
        valid_item(id="3", order_id="99", product_id="77"),
    ]
    known = {"order_id": pl.Series([10], dtype=pl.Int32), "product_id": pl.Series([5], dtype=pl.Int32)}
    kept, orphans = split_survivors(checked(ORDER_ITEMS, rows), ORDER_ITEMS, known)
    assert kept.get_column("id").to_list() == ["1"]
    assert orphans.get_column(REASONS).to_list() == [
        ["unknown_order_id"],
        ["unknown_order_id", "unknown_product_id"],
    ]


def test_tables_without_foreign_keys_have_no_orphans() -> None:
    kept, orphans = split_survivors(checked(ORDERS, [valid_order()]), ORDERS, {})
    assert kept.height == 1 and orphans.height == 0


def test_a_duplicate_loser_is_not_also_an_orphan_and_the_winner_is_checked() -> None:
    rows = [
        valid_item(order_id="99", order_timestamp="2025-04-01T10:00:00"),
        valid_item(order_id="10", order_timestamp="2025-04-01T11:00:00"),
        valid_item(id="2", order_id="98"),
    ]
    known = {"order_id": pl.Series([10], dtype=pl.Int32), "product_id": pl.Series([5], dtype=pl.Int32)}
    kept, rejected = split_survivors(checked(ORDER_ITEMS, rows), ORDER_ITEMS, known)
    assert kept.get_column(ORDER).to_list() == [1]
    outcome = dict(zip(rejected.get_column(ORDER).to_list(), rejected.get_column(REASONS).to_list()))
    assert outcome == {0: ["duplicate_key"], 2: ["unknown_order_id"]}


def _stored(spec: TableSpec, pairs: list[tuple[int, str]]) -> pl.DataFrame:
    """The lakehouse's key and ordering value, as the step looks them up."""
    return pl.DataFrame(
        {
            f"typed__{spec.primary_key}": [key for key, _ in pairs],
            "typed__order_timestamp": [t for _, t in pairs],
        },
        schema={f"typed__{spec.primary_key}": pl.Int32, "typed__order_timestamp": pl.String},
    ).with_columns(pl.col("typed__order_timestamp").str.to_datetime(time_unit="us", time_zone="UTC"))


def test_a_row_older_than_the_lakehouses_row_is_stale() -> None:
    rows = [
        valid_order(order_id="1", order_timestamp="2025-04-01T10:00:00"),  # older than stored: stale
        valid_order(order_id="2", order_timestamp="2025-04-01T11:27:00"),  # same instant: applied
        valid_order(order_id="3", order_timestamp="2025-04-01T12:00:00"),  # newer: applied
        valid_order(order_id="4"),  # not stored: new
    ]
    stored = _stored(
        ORDERS, [(1, "2025-04-01T11:00:00"), (2, "2025-04-01T11:27:00"), (3, "2025-04-01T11:00:00")]
    )
    kept, lost = outcome(*split_survivors(checked(ORDERS, rows), ORDERS, {}, stored))
    assert kept == [1, 2, 3]
    assert lost == {0: ["stale_row"]}


def test_a_stale_orphan_gets_both_reasons_and_a_duplicate_loser_neither() -> None:
    rows = [
        valid_item(id="1", product_id="77", order_timestamp="2025-04-01T09:00:00"),
        valid_item(id="1", product_id="78", order_timestamp="2025-04-01T08:00:00"),
    ]
    known = {"order_id": pl.Series([10], dtype=pl.Int32), "product_id": pl.Series([5], dtype=pl.Int32)}
    stored = _stored(ORDER_ITEMS, [(1, "2025-04-01T10:00:00")])
    kept, lost = outcome(*split_survivors(checked(ORDER_ITEMS, rows), ORDER_ITEMS, known, stored))
    assert kept == []
    assert lost == {0: ["unknown_product_id", "stale_row"], 1: ["duplicate_key"]}


def test_products_are_never_stale() -> None:
    stored = pl.DataFrame({"typed__product_id": [5]}, schema={"typed__product_id": pl.Int32})
    kept, lost = outcome(*split_survivors(checked(PRODUCTS, [valid_product()]), PRODUCTS, None, stored))
    assert kept == [0] and lost == {}
