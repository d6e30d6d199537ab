"""The lakehouse tables as data: one spec per table drives validation, dedup, integrity and merge."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

ColumnType = Literal["int", "double", "string", "timestamp", "date"]


@dataclass(frozen=True)
class Column:
    """One column of a table and the rules its values must follow.

    Attributes:
        name: the column name, in the CSV header and in the Delta table.
        type: ``int`` (32-bit, as the seed's Integer), ``double``, ``string``,
            ``timestamp`` (UTC, microseconds) or ``date`` (``YYYY-MM-DD``, stored as a string).
        nullable: whether an empty value is allowed.
        greater_than: values must be strictly greater than this.
        at_least: values must be greater than or equal to this.
        allowed: values must be one of these.
    """

    name: str
    type: ColumnType
    nullable: bool = False
    greater_than: float | None = None
    at_least: float | None = None
    allowed: tuple[int, ...] | None = None

    @property
    def has_range_rule(self) -> bool:
        return self.greater_than is not None or self.at_least is not None or self.allowed is not None


@dataclass(frozen=True)
class ForeignKey:
    """``column`` must name an existing ``ref_column`` of table ``ref_table``."""

    column: str
    ref_table: str
    ref_column: str

    @property
    def reason(self) -> str:
        return f"unknown_{self.column}"


@dataclass(frozen=True)
class TableSpec:
    """A lakehouse table: its columns, keys, partitioning and integrity rules.

    Attributes:
        name: the table name (folder under ``raw/``, ``lakehouse-dwh/`` and ``rejected/``).
        columns: the table's columns, in table order.
        primary_key: the column that identifies a row.
        partition_by: the Delta partition column.
        order_by: among rows sharing a key, the one with the greatest value survives (ties: the
            later row) and an existing row is only replaced by one that is the same or newer.
            ``None``: the later row survives and always replaces.
        foreign_keys: references that must resolve in the lakehouse.
        date_of: ``(date_column, timestamp_column)`` where the date must be the timestamp's UTC date.
    """

    name: str
    columns: tuple[Column, ...]
    primary_key: str
    partition_by: str
    order_by: str | None = None
    foreign_keys: tuple[ForeignKey, ...] = field(default_factory=tuple)
    date_of: tuple[str, str] | None = None

    @property
    def column_names(self) -> list[str]:
        return [c.name for c in self.columns]

    def column(self, name: str) -> Column:
        for col in self.columns:
            if col.name == name:
                return col
        raise KeyError(f"table {self.name} has no column {name}")


PRODUCTS = TableSpec(
    name="products",
    columns=(
        Column("product_id", "int", greater_than=0),
        Column("department_id", "int", greater_than=0),
        Column("department", "string"),
        Column("product_name", "string"),
    ),
    primary_key="product_id",
    partition_by="department_id",
)

ORDERS = TableSpec(
    name="orders",
    columns=(
        Column("order_num", "int", greater_than=0),
        Column("order_id", "int", greater_than=0),
        Column("user_id", "int", greater_than=0),
        Column("order_timestamp", "timestamp"),
        Column("total_amount", "double", at_least=0),
        Column("date", "date"),
    ),
    primary_key="order_id",
    partition_by="date",
    order_by="order_timestamp",
    date_of=("date", "order_timestamp"),
)

ORDER_ITEMS = TableSpec(
    name="order_items",
    columns=(
        Column("id", "int", greater_than=0),
        Column("order_id", "int", greater_than=0),
        Column("user_id", "int", greater_than=0),
        Column("days_since_prior_order", "int", nullable=True, at_least=0),
        Column("product_id", "int", greater_than=0),
        Column("add_to_cart_order", "int", at_least=1),
        Column("reordered", "int", allowed=(0, 1)),
        Column("order_timestamp", "timestamp"),
        Column("date", "date"),
    ),
    primary_key="id",
    partition_by="date",
    order_by="order_timestamp",
    foreign_keys=(
        ForeignKey("order_id", "orders", "order_id"),
        ForeignKey("product_id", "products", "product_id"),
    ),
    date_of=("date", "order_timestamp"),
)

# Processing order matters: order_items' foreign keys resolve against the tables before it.
TABLES: dict[str, TableSpec] = {spec.name: spec for spec in (PRODUCTS, ORDERS, ORDER_ITEMS)}


def get_spec(name: str) -> TableSpec:
    """Return the spec of table ``name`` or raise a clear error."""
    from pipeline.errors import UsageError

    try:
        return TABLES[name]
    except KeyError:
        raise UsageError(f"unknown table {name!r}; the tables are {', '.join(TABLES)}") from None
