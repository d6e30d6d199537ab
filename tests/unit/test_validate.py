"""One test per row rule of the data contract, on tiny frames of original text."""

from __future__ import annotations

from datetime import date, datetime, timezone

import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.specs import ORDER_ITEMS, ORDERS, PRODUCTS, TableSpec
from pipeline.validate import REASONS, validate
from tests.helpers import text_frame, valid_item, valid_order, valid_product


def reasons_of(
    spec: TableSpec, row: dict[str, str | None], missing: tuple[str, ...] | list[str] = ()
) -> list[str]:
    checked = validate(text_frame(spec, [row]), spec, missing)
    return checked.get_column(REASONS).to_list()[0]


def test_valid_rows_have_no_reasons() -> None:
    assert reasons_of(ORDERS, valid_order()) == []
    assert reasons_of(ORDER_ITEMS, valid_item()) == []
    assert reasons_of(PRODUCTS, valid_product()) == []


def test_values_are_parsed_to_the_table_types() -> None:
    checked = validate(text_frame(ORDERS, [valid_order(total_amount=" 12.5 ")]), ORDERS)
    row = checked.row(0, named=True)
    assert row["typed__order_id"] == 10
    assert checked.schema["typed__order_id"] == pl.Int32
    assert row["typed__total_amount"] == 12.5
    assert row["typed__order_timestamp"] == datetime(2025, 4, 1, 11, 27, tzinfo=timezone.utc)
    assert checked.schema["typed__order_timestamp"] == pl.Datetime("us", "UTC")
    assert row["typed__date"] == date(2025, 4, 1)


def test_missing_column_names_the_column_and_other_columns_are_still_checked() -> None:
    reasons = reasons_of(ORDERS, valid_order(total_amount=None, user_id="x"), missing=("total_amount",))
    assert reasons == ["invalid:user_id", "missing_column:total_amount"]


@pytest.mark.parametrize("column", [c.name for c in ORDER_ITEMS.columns if not c.nullable])
def test_null_not_null_column_is_rejected(column: str) -> None:
    reasons = reasons_of(ORDER_ITEMS, valid_item(**{column: ""}))
    assert f"null:{column}" in reasons


def test_whitespace_only_value_is_null() -> None:
    assert reasons_of(PRODUCTS, valid_product(department="   ")) == ["null:department"]


def test_null_days_since_prior_order_is_allowed() -> None:
    assert reasons_of(ORDER_ITEMS, valid_item(days_since_prior_order="")) == []
    assert reasons_of(ORDER_ITEMS, valid_item(days_since_prior_order=None)) == []


@pytest.mark.parametrize(
    "value", ["12x", "1.0", "1e3", "0x10", "1_000", "99999999999", "2147483648", "--1", "+", "1 2", "\u0663"]
)
def test_invalid_integer(value: str) -> None:
    assert reasons_of(ORDERS, valid_order(user_id=value)) == ["invalid:user_id"]


@pytest.mark.parametrize(("value", "parsed"), [("+7", 7), ("007", 7), (" 7 ", 7), ("2147483647", 2147483647)])
def test_integer_accepts_sign_and_digits(value: str, parsed: int) -> None:
    checked = validate(text_frame(ORDERS, [valid_order(user_id=value)]), ORDERS)
    assert checked.get_column(REASONS).to_list() == [[]]
    assert checked.get_column("typed__user_id").to_list() == [parsed]


def test_integers_follow_the_reference_rule() -> None:
    """Every text of a small alphabet parses exactly when Python's rule says so, to the same value."""
    import itertools
    import random
    import re

    alphabet = ["0", "1", "7", "9", "+", "-", " ", ".", "e", "x", "_", "\u0663", "\t"]
    texts = ["".join(chars) for size in (1, 2, 3) for chars in itertools.product(alphabet, repeat=size)]
    rng = random.Random(5)
    texts += [str(rng.randint(-(2**33), 2**33)) for _ in range(2000)]
    texts += ["2147483647", "2147483648", "-2147483648", "-2147483649", "+0002147483647", "9" * 30]

    def reference(text: str) -> int | None:
        stripped = text.strip(" \t")
        if not re.fullmatch(r"[+-]?[0-9]+", stripped, flags=re.ASCII):
            return None
        number = int(stripped)
        return number if -(2**31) <= number <= 2**31 - 1 else None

    rows = [valid_order(user_id=text) for text in texts]
    checked = validate(text_frame(ORDERS, rows).with_row_index("row"), ORDERS).sort("row")
    expected = [reference(text) for text in texts]
    assert checked.get_column("typed__user_id").to_list() == expected
    flagged = [("invalid:user_id" in reasons) or ("null:user_id" in reasons) for reasons in checked[REASONS]]
    assert flagged == [value is None for value in expected]


@pytest.mark.parametrize("value", ["NaN", "nan", "inf", "-inf", "Infinity", "abc", "1,5", "12.5.1"])
def test_invalid_double(value: str) -> None:
    assert reasons_of(ORDERS, valid_order(total_amount=value)) == ["invalid:total_amount"]


@pytest.mark.parametrize(
    "value",
    [
        "2025-04-01 11:27:00",
        "2025-04-01T11:27:00",
        "2025-04-01T11:27:00.5",
        "2025-04-01T11:27:00.123456",
        "2025-04-01T11:27:00Z",
        "2025-04-01T11:27:00+00:00",
        "2025-04-01 11:27:00.000001Z",
    ],
)
def test_timestamp_accepted_forms(value: str) -> None:
    assert reasons_of(ORDERS, valid_order(order_timestamp=value)) == []


@pytest.mark.parametrize(
    "value",
    [
        "2025-02-30T10:00:00",  # impossible date
        "2025-04-01T24:00:00",
        "2025-04-01T11:27:60",
        "2025-04-01T11:27",
        "2025-04-01T11:27:00.1234567",  # finer than microseconds
        "2025-04-01T11:27:00+02:00",  # only UTC offsets are accepted
        "01/04/2025 11:27:00",
        "yesterday",
        "0000-01-01T00:00:00",  # year 0 parses, but no Delta reader can store it
        "0000-12-31 23:59:59Z",
    ],
)
def test_invalid_timestamp(value: str) -> None:
    assert reasons_of(ORDERS, valid_order(order_timestamp=value)) == ["invalid:order_timestamp"]


def test_the_first_and_last_years_are_valid() -> None:
    for stamp, day in (("0001-01-01T00:00:00", "0001-01-01"), ("9999-12-31 23:59:59.999999Z", "9999-12-31")):
        assert reasons_of(ORDERS, valid_order(order_timestamp=stamp, date=day)) == []


def test_fractional_timestamp_keeps_microseconds() -> None:
    checked = validate(
        text_frame(ORDERS, [valid_order(order_timestamp="2025-04-01T11:27:00.000123Z")]), ORDERS
    )
    assert checked.get_column("typed__order_timestamp").dt.microsecond().to_list() == [123]


@pytest.mark.parametrize(
    "value", ["2025-02-30", "2025-13-01", "2025-4-1", "20250401", "2025-04-01T00:00:00", "0000-01-01"]
)
def test_invalid_date(value: str) -> None:
    assert reasons_of(ORDERS, valid_order(date=value)) == ["invalid:date"]


@pytest.mark.parametrize(
    ("spec", "row", "reason"),
    [
        (PRODUCTS, valid_product(product_id="0"), "range:product_id"),
        (PRODUCTS, valid_product(department_id="-3"), "range:department_id"),
        (ORDERS, valid_order(order_id="0"), "range:order_id"),
        (ORDERS, valid_order(user_id="-1"), "range:user_id"),
        (ORDERS, valid_order(order_num="0"), "range:order_num"),
        (ORDERS, valid_order(total_amount="-0.01"), "range:total_amount"),
        (ORDER_ITEMS, valid_item(id="0"), "range:id"),
        (ORDER_ITEMS, valid_item(product_id="0"), "range:product_id"),
        (ORDER_ITEMS, valid_item(add_to_cart_order="0"), "range:add_to_cart_order"),
        (ORDER_ITEMS, valid_item(reordered="2"), "range:reordered"),
        (ORDER_ITEMS, valid_item(days_since_prior_order="-1"), "range:days_since_prior_order"),
    ],
)
def test_out_of_range_value(spec: TableSpec, row: dict[str, str | None], reason: str) -> None:
    assert reasons_of(spec, row) == [reason]


def test_range_boundaries_are_inclusive_where_the_rule_says_so() -> None:
    assert reasons_of(ORDERS, valid_order(total_amount="0")) == []
    assert (
        reasons_of(ORDER_ITEMS, valid_item(days_since_prior_order="0", add_to_cart_order="1", reordered="1"))
        == []
    )


def test_date_mismatch() -> None:
    assert reasons_of(ORDERS, valid_order(date="2025-04-02")) == ["date_mismatch"]


def test_date_mismatch_uses_the_utc_date() -> None:
    assert reasons_of(ORDERS, valid_order(order_timestamp="2025-04-01T23:59:59Z", date="2025-04-01")) == []
    assert reasons_of(ORDERS, valid_order(order_timestamp="2025-04-02 00:00:00", date="2025-04-01")) == [
        "date_mismatch"
    ]


def test_no_date_mismatch_when_a_side_does_not_parse() -> None:
    assert reasons_of(ORDERS, valid_order(date="2025-04-31")) == ["invalid:date"]


def test_every_reason_that_applies_is_listed() -> None:
    row = valid_item(id="", order_id="x", reordered="7", add_to_cart_order="0", date="2025-04-03")
    assert reasons_of(ORDER_ITEMS, row) == [
        "null:id",
        "invalid:order_id",
        "range:add_to_cart_order",
        "range:reordered",
        "date_mismatch",
    ]


def test_validate_keeps_every_row() -> None:
    rows = [valid_order(order_id=str(i)) for i in range(1, 6)] + [valid_order(order_id="bad")]
    checked = validate(text_frame(ORDERS, rows), ORDERS)
    assert checked.height == 6
    assert sorted(checked.get_column("order_id").to_list()) == sorted(["1", "2", "3", "4", "5", "bad"])


def test_fast_path_agrees_with_the_full_rules() -> None:
    """Rows taken by the untrimmed fast path get exactly what the full rules would give them."""
    from pipeline.validate import _validate_fully

    variants: dict[str, list[str | None]] = {
        "id": ["1", " 2", "+3", "0", "x", "", None],
        "days_since_prior_order": ["3", "", " ", "-1", " 4 ", None],
        "total": ["1"],
        "order_timestamp": [
            "2025-04-01T11:27:00",
            "2025-04-01T11:27:00.25",
            " 2025-04-01T11:27:00",
            "2025-04-01 11:27:00Z",
            "bad",
        ],
        "date": ["2025-04-01", "2025-04-02", " 2025-04-01", "2025-02-30"],
    }
    rows = [
        valid_item(id=i, days_since_prior_order=d, order_timestamp=t, date=day)
        for i in variants["id"]
        for d in variants["days_since_prior_order"]
        for t in variants["order_timestamp"]
        for day in variants["date"]
    ]
    frame = text_frame(ORDER_ITEMS, rows).with_row_index("row")
    fast = validate(frame, ORDER_ITEMS).sort("row")
    full = _validate_fully(frame, ORDER_ITEMS, set()).sort("row")
    assert fast.height == full.height == len(rows)
    assert fast.equals(full.select(fast.columns))


TIMESTAMP_FORMS = [
    separator + fraction + zone
    for separator in ("T", " ")
    for fraction in ("", ".5", ".123", ".123456")
    for zone in ("", "Z", "+00:00")
]


@pytest.mark.parametrize("form", TIMESTAMP_FORMS, ids=repr)
def test_a_chunk_in_any_accepted_timestamp_form_takes_the_fast_path(form: str) -> None:
    """Every row of a chunk written in one accepted form parses as written, to the full rules' value."""
    from pipeline.validate import _parsed_as_written, _validate_fully, timestamp_forms

    separator, suffix = form[0], form[1:]
    stamps = [f"2025-04-{day:02d}{separator}{hour:02d}:27:59{suffix}" for day in (1, 30) for hour in (0, 23)]
    frame = text_frame(ORDERS, [valid_order(order_timestamp=stamp, date=stamp[:10]) for stamp in stamps])
    column = next(column for column in ORDERS.columns if column.name == "order_timestamp")
    forms = timestamp_forms(frame, ORDERS)
    fast = frame.select(_parsed_as_written(column, pl.col("order_timestamp"), forms["order_timestamp"]))
    assert fast.to_series().null_count() == 0
    full = _validate_fully(frame, ORDERS, set()).get_column("typed__order_timestamp")
    assert fast.to_series().equals(full, check_names=False)
    assert validate(frame, ORDERS).get_column(REASONS).list.len().sum() == 0


def _timestamp_text() -> st.SearchStrategy[str]:
    """Text near the accepted timestamp forms: every part may be right, wrong or missing."""
    digits = st.text("0123456789", min_size=1, max_size=4)
    part = st.one_of(
        digits, st.sampled_from(["2025", "0000", "9999", "04", "13", "00", "23", "24", "59", "60"])
    )
    separator = st.sampled_from(["T", " ", "t", "  ", ""])
    fraction = st.one_of(st.just(""), st.builds(lambda d: "." + d, st.text("0123456789", max_size=8)))
    zone = st.sampled_from(["", "Z", "+00:00", "+01:00", "z", " "])
    return st.builds(
        lambda y, mo, d, sep, h, mi, s, f, z, pad: f"{pad}{y}-{mo}-{d}{sep}{h}:{mi}:{s}{f}{z}",
        part,
        part,
        part,
        separator,
        part,
        part,
        part,
        fraction,
        zone,
        st.sampled_from(["", " "]),
    )


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_timestamp_text(), min_size=1, max_size=30))
def test_the_fast_path_agrees_with_the_full_rules_on_any_timestamp_text(stamps: list[str]) -> None:
    from pipeline.validate import _validate_fully

    frame = text_frame(ORDERS, [valid_order(order_timestamp=stamp) for stamp in stamps]).with_row_index("row")
    fast = validate(frame, ORDERS).sort("row")
    full = _validate_fully(frame, ORDERS, set()).sort("row")
    assert fast.equals(full.select(fast.columns))
