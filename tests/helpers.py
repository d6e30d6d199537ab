"""Small builders shared by the tests: CSV text, raw folders, frames of original text."""

from __future__ import annotations

from pathlib import Path

import polars as pl

from pipeline.specs import TableSpec

PRODUCTS_HEADER = "product_id,department_id,department,product_name"
ORDERS_HEADER = "order_num,order_id,user_id,order_timestamp,total_amount,date"
ITEMS_HEADER = (
    "id,order_id,user_id,days_since_prior_order,product_id,add_to_cart_order,reordered,order_timestamp,date"
)
HEADERS = {"products": PRODUCTS_HEADER, "orders": ORDERS_HEADER, "order_items": ITEMS_HEADER}


def run_cli(*args: str) -> int:
    """``lakehouse ARGS`` in this process; its exit code."""
    from pipeline.cli import main

    try:
        main(list(args))
    except SystemExit as done:
        return int(done.code or 0)
    return 0


def write_raw(
    root: Path, table: str, name: str, *lines: str, header: str | None = None, newline: str = "\n"
) -> Path:
    """Write ``raw/<table>/<name>`` with a header (the table's own unless given) and ``lines``."""
    path = root / "raw" / table / name
    path.parent.mkdir(parents=True, exist_ok=True)
    text = newline.join([HEADERS[table] if header is None else header, *lines]) + newline
    path.write_bytes(text.encode("utf-8"))
    return path


def text_frame(spec: TableSpec, rows: list[dict[str, str | None]]) -> pl.DataFrame:
    """Rows of original text for ``spec``, the spec's columns in order, absent keys as null."""
    return pl.DataFrame(
        [{name: row.get(name) for name in spec.column_names} for row in rows],
        schema={name: pl.String for name in spec.column_names},
        orient="row",
    )


def valid_order(**overrides: str | None) -> dict[str, str | None]:
    row: dict[str, str | None] = {
        "order_num": "1",
        "order_id": "10",
        "user_id": "7",
        "order_timestamp": "2025-04-01T11:27:00",
        "total_amount": "12.50",
        "date": "2025-04-01",
    }
    row.update(overrides)
    return row


def valid_item(**overrides: str | None) -> dict[str, str | None]:
    row: dict[str, str | None] = {
        "id": "1",
        "order_id": "10",
        "user_id": "7",
        "days_since_prior_order": "3",
        "product_id": "5",
        "add_to_cart_order": "1",
        "reordered": "0",
        "order_timestamp": "2025-04-01T11:27:00",
        "date": "2025-04-01",
    }
    row.update(overrides)
    return row


def valid_product(**overrides: str | None) -> dict[str, str | None]:
    row: dict[str, str | None] = {
        "product_id": "5",
        "department_id": "2",
        "department": "Books",
        "product_name": "A",
    }
    row.update(overrides)
    return row
