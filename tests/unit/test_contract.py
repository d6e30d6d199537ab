"""The tables' contract: derived from the specs, checked like pandera checks it, exported for consumers."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pandera.polars as pa
import polars as pl
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pandera.errors import SchemaError, SchemaErrors

from pipeline import batch as batch_module
from pipeline import contract as contract_module
from pipeline.batch import run_batch, table_uri
from pipeline.contract import ContractError, check_rows, contract_document, json_schema, schema_of
from pipeline.errors import StepError, UsageError
from pipeline.specs import ORDER_ITEMS, ORDERS, TABLES
from pipeline.storage import open_store
from tests.helpers import write_raw

DAY = datetime(2025, 4, 1, tzinfo=timezone.utc)


def orders_frame(
    rows: list[tuple[int | None, int | None, int | None, int, float | None, int]],
) -> pl.DataFrame:
    """Orders as a step holds them: (order_num, order_id, user_id, hours after DAY, total, date offset)."""
    return pl.DataFrame(
        {
            "order_num": [row[0] for row in rows],
            "order_id": [row[1] for row in rows],
            "user_id": [row[2] for row in rows],
            "order_timestamp": [DAY + timedelta(hours=row[3]) for row in rows],
            "total_amount": [row[4] for row in rows],
            "date": [(DAY + timedelta(hours=row[3])).date() + timedelta(days=row[5]) for row in rows],
        },
        schema={
            "order_num": pl.Int32,
            "order_id": pl.Int32,
            "user_id": pl.Int32,
            "order_timestamp": pl.Datetime("us", "UTC"),
            "total_amount": pl.Float64,
            "date": pl.Date,
        },
    )


small_ints = st.one_of(st.none(), st.integers(-1, 4))
order_rows = st.lists(
    st.tuples(
        small_ints,
        small_ints,
        small_ints,
        st.integers(0, 60),
        st.one_of(st.none(), st.floats(-2, 5, allow_nan=False)),
        st.sampled_from([0, 0, 0, 1, -1]),
    ),
    max_size=8,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=order_rows, keep_bits=st.lists(st.booleans(), min_size=8, max_size=8))
def test_the_vectorised_check_fails_exactly_when_pandera_does(rows: list, keep_bits: list[bool]) -> None:
    frame = orders_frame(rows)
    keep = pl.Series(keep_bits[: frame.height], dtype=pl.Boolean)
    # The reference: pandera's own eager validation of the same schema on the selected rows.
    try:
        schema_of(ORDERS, stored=False).validate(frame.filter(keep), lazy=True)
        pandera_passes = True
    except (SchemaError, SchemaErrors):
        pandera_passes = False
    try:
        check_rows(frame, ORDERS, keep=keep, where="a test")
        ours_passes = True
    except ContractError:
        ours_passes = False
    assert ours_passes == pandera_passes


def test_a_broken_row_is_named_with_its_rule_count_and_an_example() -> None:
    frame = orders_frame([(1, 10, 7, 1, 2.0, 0), (2, 10, 7, 2, 2.0, 0), (3, 11, 0, 3, -1.0, 1)])
    with pytest.raises(ContractError) as raised:
        check_rows(frame, ORDERS, where="the merge")
    message = str(raised.value)
    assert message.startswith("orders: the merge: rows break the table's contract, refusing to commit: ")
    assert "rule order_id unique: 1 row(s), e.g. {'order_num': 1, 'order_id': 10" in message
    assert "rule user_id greater_than(0): 1 row(s), e.g. {'order_num': 3" in message
    assert "rule total_amount greater_than_or_equal_to(0): 1 row(s)" in message
    assert "rule date is the UTC date of order_timestamp: 1 row(s)" in message


def test_rows_outside_the_selection_are_not_judged() -> None:
    frame = orders_frame([(1, 10, 7, 1, 2.0, 0), (2, 10, 7, 2, -5.0, 1)])
    check_rows(frame, ORDERS, keep=pl.Series([True, False]), where="the merge")
    with pytest.raises(ContractError, match="order_id unique"):
        check_rows(frame, ORDERS, keep=pl.Series([True, True]), where="the merge")


def test_a_wrong_type_or_a_missing_column_is_a_schema_error() -> None:
    frame = orders_frame([(1, 10, 7, 1, 2.0, 0)])
    with pytest.raises(ContractError, match="expected column 'order_id' to have type Int32, got Int64"):
        check_rows(frame.with_columns(pl.col("order_id").cast(pl.Int64)), ORDERS, where="the merge")
    with pytest.raises(ContractError, match="user_id"):
        check_rows(frame.drop("user_id"), ORDERS, where="the merge")


def test_the_contract_is_derived_from_the_specs() -> None:
    items = schema_of(ORDER_ITEMS)
    assert list(items.columns) == ORDER_ITEMS.column_names
    assert items.columns["id"].unique and not items.columns["order_id"].unique
    assert items.columns["days_since_prior_order"].nullable and not items.columns["id"].nullable
    assert [check.name for check in items.columns["reordered"].checks] == ["isin"]
    assert items.columns["date"].dtype.type == pl.String  # stored as text
    assert schema_of(ORDER_ITEMS, stored=False).columns["date"].dtype.type == pl.Date
    assert [check.name for check in items.checks] == [contract_module.DATE_AGREES]


def test_the_stored_schema_accepts_the_rows_a_batch_wrote(tmp_path: Path) -> None:
    write_raw(tmp_path, "products", "p.csv", "5,2,Books,Novel")
    write_raw(tmp_path, "orders", "o.csv", "1,10,7,2025-04-01T11:27:00,12.50,2025-04-01")
    write_raw(tmp_path, "order_items", "i.csv", "1,10,7,,5,1,0,2025-04-01T11:27:00,2025-04-01")
    run_batch(open_store(str(tmp_path)))
    store = open_store(str(tmp_path))
    for name, spec in TABLES.items():
        stored = pl.read_delta(table_uri(store, name)).select(spec.column_names)
        # A consumer validating what they read with the exported schema: pandera's full check.
        pa.DataFrameSchema.validate(schema_of(spec), stored, lazy=True)


def test_a_defect_in_the_fast_path_fails_the_step_and_commits_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_raw(tmp_path, "products", "p.csv", "5,2,Books,Novel")
    write_raw(
        tmp_path,
        "orders",
        "o.csv",
        "1,10,7,2025-04-01T11:27:00,12.50,2025-04-01",
        "2,10,7,2025-04-01T12:00:00,13.50,2025-04-01",
    )
    write_raw(tmp_path, "order_items", "i.csv", "1,10,7,,5,1,0,2025-04-01T11:27:00,2025-04-01")
    original = batch_module.survivor_mask

    def keeps_every_row(valid: pl.DataFrame, *args: Any) -> tuple[pl.Series, pl.DataFrame]:
        _, late = original(valid, *args)
        return pl.Series("keep", [True] * valid.height), late.clear()  # dedup "forgot" the duplicate key

    monkeypatch.setattr(batch_module, "survivor_mask", keeps_every_row)
    with pytest.raises(StepError, match=r"orders: the merge: rows break.*order_id unique: 1 row"):
        run_batch(open_store(str(tmp_path)))
    assert not (tmp_path / "lakehouse-dwh" / "orders").exists()
    assert (tmp_path / "raw" / "orders" / "o.csv").exists()


def _serialises_without_pandas() -> bool:
    """pandera writes a polars schema as JSON without pandas from 0.27 on (0.26 is the newest on 3.9)."""
    import importlib.util

    import pandera

    release = tuple(int(part) for part in pandera.__version__.split(".")[:2])
    return release >= (0, 27) or importlib.util.find_spec("pandas") is not None


@pytest.mark.skipif(not _serialises_without_pandas(), reason="this pandera writes schemas through pandas")
def test_the_exported_contract_holds_pandera_and_json_schemas() -> None:
    document = json.loads(contract_document("json"))
    assert list(document["tables"]) == list(TABLES)
    orders = document["tables"]["orders"]
    assert orders["pandera"]["columns"]["order_id"] == {
        "description": "32-bit integer; primary key",
        "dtype": "Int32",
        "unique": True,
        "greater_than": 0,
    }
    assert orders["date_of"] == {
        "date": "date",
        "timestamp": "order_timestamp",
        "rule": "date is the UTC date",
    }
    assert yaml.safe_load(contract_document("yaml")) == document


def test_the_json_schema_says_what_a_row_may_hold() -> None:
    schema = json_schema(ORDER_ITEMS)
    assert schema["required"] == ORDER_ITEMS.column_names and schema["additionalProperties"] is False
    assert schema["properties"]["id"]["exclusiveMinimum"] == 0
    assert schema["properties"]["add_to_cart_order"]["minimum"] == 1
    assert schema["properties"]["days_since_prior_order"]["type"] == ["integer", "null"]
    assert schema["properties"]["reordered"]["enum"] == [0, 1]
    assert schema["properties"]["date"]["format"] == "date"


@pytest.mark.skipif(_serialises_without_pandas(), reason="this pandera writes schemas without pandas")
def test_an_old_pandera_without_pandas_says_what_to_install() -> None:
    with pytest.raises(UsageError, match=r"needs pandas to write a schema: `pip install pandas`"):
        contract_document("json")
