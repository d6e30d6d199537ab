"""Instacart-like sample data: clean rows plus about 1% dirty ones that exercise every rejection rule.

Scale 1.0 is the Instacart size (49,688 products in 21 departments, 3,421,083 orders, 33,819,106
order items) spread over 365 days. Output is deterministic for a seed.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import polars as pl

from pipeline import delta
from pipeline.batch import table_uri
from pipeline.errors import UsageError
from pipeline.manifest import raw_prefix
from pipeline.progress import Progress, quiet
from pipeline.specs import ORDER_ITEMS, ORDERS, PRODUCTS, TableSpec
from pipeline.storage import Store

PRODUCTS_AT_SCALE_1 = 49_688
ORDERS_AT_SCALE_1 = 3_421_083
ITEMS_AT_SCALE_1 = 33_819_106
USERS_AT_SCALE_1 = 206_209
DAYS = 365
FIRST_DAY = date(2025, 1, 1)
DIRTY_SHARE = 0.01
PART_ROWS = 5_000_000
TIMESTAMP_FORMAT = "%Y-%m-%dT%H:%M:%S"

DEPARTMENTS = (
    "frozen",
    "other",
    "bakery",
    "produce",
    "alcohol",
    "international",
    "beverages",
    "pets",
    "dry goods pasta",
    "bulk",
    "personal care",
    "meat seafood",
    "pantry",
    "breakfast",
    "canned goods",
    "dairy eggs",
    "household",
    "babies",
    "snacks",
    "deli",
    "missing",
)
WORDS = (
    "Organic",
    "Banana",
    "Whole",
    "Milk",
    "Greek",
    "Yogurt",
    "Baby",
    "Spinach",
    "Large",
    "Avocado",
    "Sparkling",
    "Water",
    "Honey",
    "Crisp",
    "Apple",
    "Sea",
    "Salt",
    "Chips",
    "Extra",
    "Virgin",
    "Olive",
    "Oil",
    "Free",
    "Range",
    "Eggs",
    "Dark",
    "Chocolate",
    "Almond",
    "Butter",
    "Sourdough",
    "Bread",
)


@dataclass
class Generated:
    """Rows written per table (dirty ones included) and the files written."""

    rows: dict[str, int]
    files: list[str]


def _part_name(table: str, label: str) -> str:
    return f"{raw_prefix(table)}{table}-{label}.csv"


def _to_text(frame: pl.DataFrame) -> pl.DataFrame:
    """Every column as the text a CSV producer would write."""
    return frame.select(
        pl.col(name).dt.strftime(TIMESTAMP_FORMAT)
        if dtype == pl.Datetime("us", "UTC")
        else pl.col(name).cast(pl.String)
        for name, dtype in frame.schema.items()
    )


def _corrupt(text: pl.DataFrame, spec: TableSpec, rng: np.random.Generator, share: float) -> pl.DataFrame:
    """Break about ``share`` of the rows, each in one way, and add duplicate rows and keys."""
    n = text.height
    count = round(n * share)
    if count == 0 or n < 10:
        return text
    picked = rng.choice(n, size=min(count, n), replace=False)
    kinds = ["null", "invalid", "range"]
    if spec.date_of:
        kinds.append("date_mismatch")
    kinds += ["duplicate_row", "duplicate_key"]
    kinds += [fk.reason for fk in spec.foreign_keys]
    kind_of = rng.integers(0, len(kinds), size=picked.size)
    columns = [c for c in spec.columns]
    column_of = rng.integers(0, len(columns), size=picked.size)

    row_index = pl.int_range(pl.len(), dtype=pl.Int64)
    updates: dict[str, list[tuple[np.ndarray, str]]] = {c.name: [] for c in columns}
    for kind_number, kind in enumerate(kinds):
        rows = picked[kind_of == kind_number]
        cols = column_of[kind_of == kind_number]
        for column_number, column in enumerate(columns):
            chosen = rows[cols == column_number]
            if not chosen.size:
                continue
            if kind == "null" and not column.nullable:
                updates[column.name].append((chosen, ""))
            elif kind == "invalid":
                bad = {
                    "int": "12x",
                    "double": "NaN",
                    "timestamp": "2025-02-30T10:00:00",
                    "date": "2025-13-01",
                    "string": None,
                }[column.type]
                if bad is not None:
                    updates[column.name].append((chosen, bad))
            elif kind == "range" and column.has_range_rule:
                bad = "2" if column.allowed else ("-1" if column.at_least is not None else "0")
                updates[column.name].append((chosen, bad))
        for fk in spec.foreign_keys:
            if kind == fk.reason:
                # A well-formed id that no generated row has.
                updates[fk.column].append((rows, "2000000000"))
        if kind == "date_mismatch" and spec.date_of:
            updates[spec.date_of[0]].append((rows, "2024-06-15"))

    broken = text.with_columns(
        pl.coalesce(
            *(
                pl.when(row_index.is_in(pl.Series(chosen).implode())).then(pl.lit(value))
                for chosen, value in pending
            ),
            pl.col(name),
        ).alias(name)
        for name, pending in updates.items()
        if pending
    )
    duplicate_rows = text[picked[np.asarray(kind_of) == kinds.index("duplicate_row")].tolist()]
    key_copies = text[picked[np.asarray(kind_of) == kinds.index("duplicate_key")].tolist()]
    changed = next((c.name for c in spec.columns if c.type == "string" and c.name != spec.partition_by), None)
    if changed is None:
        changed = (
            next(c.name for c in spec.columns if c.type == "double")
            if any(c.type == "double" for c in spec.columns)
            else next(
                c.name
                for c in spec.columns
                if c.name not in (spec.primary_key, spec.partition_by, spec.order_by)
                and c.type == "int"
                and not c.allowed
            )
        )
    key_copies = key_copies.with_columns((pl.col(changed) + pl.lit("9")).alias(changed))
    return pl.concat([broken, duplicate_rows, key_copies])


def _malformed_lines(text: pl.DataFrame) -> str:
    """Two records with the wrong number of fields: one short, one long."""
    first = ["" if value is None else str(value) for value in text.row(0)]
    return ",".join(first[:-1]) + "\n" + ",".join((*first, "surplus")) + "\n"


def _write_parts(
    store: Store, workdir: Path, table: str, frames: Iterator[tuple[str, pl.DataFrame]], progress: Progress
) -> list[str]:
    written = []
    for label, frame in frames:
        key = _part_name(table, label)
        path = workdir / key.replace("/", "__")
        progress(f"writing {key} ({frame.height:,} rows)")
        frame.write_csv(path)
        store.upload(path, key)
        if path.resolve() != Path(store.uri(key)).resolve():
            path.unlink()
        written.append(key)
    return written


def _products(rng: np.random.Generator, ids: np.ndarray) -> pl.DataFrame:
    department_id = rng.integers(1, len(DEPARTMENTS) + 1, size=ids.size).astype(np.int32)
    first = rng.integers(0, len(WORDS), size=ids.size)
    second = rng.integers(0, len(WORDS), size=ids.size)
    return pl.DataFrame(
        {"product_id": ids.astype(np.int32), "department_id": department_id, "w1": first, "w2": second}
    ).select(
        "product_id",
        "department_id",
        pl.col("department_id")
        .replace_strict(list(range(1, len(DEPARTMENTS) + 1)), list(DEPARTMENTS), return_dtype=pl.String)
        .alias("department"),
        pl.format(
            "{} {}",
            pl.col("w1").replace_strict(list(range(len(WORDS))), list(WORDS), return_dtype=pl.String),
            pl.col("w2").replace_strict(list(range(len(WORDS))), list(WORDS), return_dtype=pl.String),
        ).alias("product_name"),
    )


def _orders(
    rng: np.random.Generator, first_id: int, count: int, users: int, days: np.ndarray
) -> pl.DataFrame:
    seconds = rng.integers(0, 86_400, size=count)
    start = datetime(FIRST_DAY.year, FIRST_DAY.month, FIRST_DAY.day, tzinfo=timezone.utc)
    stamps = np.sort(days.astype(np.int64) * 86_400 + seconds)
    amounts = np.round(rng.lognormal(mean=3.6, sigma=0.6, size=count), 2)
    frame = pl.DataFrame(
        {
            "order_id": np.arange(first_id, first_id + count, dtype=np.int32),
            "user_id": rng.integers(1, users + 1, size=count).astype(np.int32),
            "offset": stamps,
            "total_amount": amounts,
        }
    )
    return frame.select(
        (pl.col("order_id").cum_count().over("user_id")).cast(pl.Int32).alias("order_num"),
        "order_id",
        "user_id",
        (pl.lit(start) + pl.duration(seconds=pl.col("offset")))
        .dt.cast_time_unit("us")
        .alias("order_timestamp"),
        "total_amount",
    ).with_columns(pl.col("order_timestamp").dt.date().cast(pl.String).alias("date"))


def _items(
    rng: np.random.Generator, orders: pl.DataFrame, first_id: int, count: int, products: int
) -> pl.DataFrame:
    n_orders = orders.height
    extra = np.sort(rng.integers(0, n_orders, size=max(count - n_orders, 0)))
    order_index = np.sort(np.concatenate([np.arange(n_orders), extra]))[:count]
    parent = orders[["order_id", "user_id", "order_num", "order_timestamp", "date"]][order_index.tolist()]
    days_since = rng.integers(0, 31, size=count).astype(np.int32)
    # Skewed popularity, as in Instacart: a few products are in most baskets.
    product = np.minimum((rng.pareto(1.2, size=count) * products / 20).astype(np.int64), products - 1) + 1
    return parent.with_columns(
        pl.Series("id", np.arange(first_id, first_id + count, dtype=np.int32)),
        pl.when(pl.col("order_num") == 1)
        .then(None)
        .otherwise(pl.Series(days_since))
        .alias("days_since_prior_order"),
        pl.Series("product_id", product.astype(np.int32)),
        (pl.int_range(pl.len()).over("order_id") + 1).cast(pl.Int32).alias("add_to_cart_order"),
        pl.Series("reordered", rng.integers(0, 2, size=count).astype(np.int32)),
    ).select(ORDER_ITEMS.column_names)


def _chunks(
    frame: pl.DataFrame, spec: TableSpec, rng: np.random.Generator, share: float, label: str
) -> Iterator[tuple[str, pl.DataFrame]]:
    parts = max(1, -(-frame.height // PART_ROWS))
    for number in range(parts):
        part = frame.slice(number * PART_ROWS, PART_ROWS).select(spec.column_names)
        yield f"{label}-{number + 1:04d}" if parts > 1 else label, _corrupt(_to_text(part), spec, rng, share)


def _dirty_files(store: Store, workdir: Path, samples: dict[str, pl.DataFrame]) -> list[str]:
    """Per table, one small file lacking a required column, and two malformed records."""
    written = []
    for table, sample in samples.items():
        spec = {s.name: s for s in (PRODUCTS, ORDERS, ORDER_ITEMS)}[table]
        dropped = next(c.name for c in reversed(spec.columns) if c.name != spec.primary_key)
        key = _part_name(table, "zz-missing-column")
        path = workdir / key.replace("/", "__")
        text = _to_text(sample.head(3)).drop(dropped)
        content = text.write_csv() + _malformed_lines(text)
        path.write_text(content, encoding="utf-8")
        store.upload(path, key)
        written.append(key)
    return written


def generate(
    store: Store,
    *,
    scale: float = 0.01,
    seed: int = 42,
    dirty: bool = True,
    progress: Progress | None = None,
) -> Generated:
    """Write a full Instacart-like batch into ``raw/`` of ``store``."""
    if scale <= 0:
        raise UsageError(f"scale must be positive, not {scale}")
    report = progress or quiet
    rng = np.random.default_rng(seed)
    share = DIRTY_SHARE if dirty else 0.0
    n_products = max(10, round(PRODUCTS_AT_SCALE_1 * scale))
    n_orders = max(10, round(ORDERS_AT_SCALE_1 * scale))
    n_items = max(n_orders, round(ITEMS_AT_SCALE_1 * scale))
    n_users = max(5, round(USERS_AT_SCALE_1 * scale))

    report(f"generating {n_products:,} products, {n_orders:,} orders, {n_items:,} order items")
    products = _products(rng, np.arange(1, n_products + 1))
    orders = _orders(rng, 1, n_orders, n_users, rng.integers(0, DAYS, size=n_orders))
    items = _items(rng, orders, 1, n_items, n_products)
    return _write_all(
        store,
        rng,
        share,
        {"products": products, "orders": orders, "order_items": items},
        "full",
        dirty,
        report,
    )


def _write_all(
    store: Store,
    rng: np.random.Generator,
    share: float,
    frames: dict[str, pl.DataFrame],
    label: str,
    dirty: bool,
    report: Progress,
) -> Generated:
    files: list[str] = []
    with tempfile.TemporaryDirectory(prefix="lakehouse-generate-") as tmp:
        workdir = Path(tmp)
        for spec in (PRODUCTS, ORDERS, ORDER_ITEMS):
            files += _write_parts(
                store, workdir, spec.name, _chunks(frames[spec.name], spec, rng, share, label), report
            )
        if dirty:
            files += _dirty_files(
                store,
                workdir,
                {
                    name: frame.select(
                        {s.name: s for s in (PRODUCTS, ORDERS, ORDER_ITEMS)}[name].column_names
                    )
                    for name, frame in frames.items()
                },
            )
    return Generated(rows={name: frame.height for name, frame in frames.items()}, files=files)


def generate_next_day(
    store: Store,
    *,
    scale: float = 0.01,
    seed: int = 42,
    dirty: bool = True,
    progress: Progress | None = None,
    product_limit: int | None = None,
) -> Generated:
    """Write the next day's batch for the lake at ``store``: new orders and items, updates, renames.

    ``product_limit`` keeps the items' product ids at or below it, so the same batch finds all its
    products in a smaller lake too (the benchmark's growth figure merges one batch into two lakes).
    """
    report = progress or quiet
    orders_scan = delta.scan(table_uri(store, "orders"))
    products_scan = delta.scan(table_uri(store, "products"))
    items_scan = delta.scan(table_uri(store, "order_items"))
    if orders_scan is None or products_scan is None or items_scan is None:
        raise UsageError(f"--next-day needs a loaded lakehouse at {store.root}; run `lakehouse run` first")
    stats = orders_scan.select(pl.col("date").max(), pl.col("order_id").max()).collect()
    last_day, last_order = stats.row(0)
    last_item = items_scan.select(pl.col("id").max()).collect().item()
    if last_day >= "9999-12-31":
        raise UsageError(f"the lakehouse at {store.root} reaches 9999-12-31: there is no next day")
    day = date.fromisoformat(last_day) + timedelta(days=1)
    rng = np.random.default_rng([seed, day.toordinal()])

    n_orders = max(5, round(ORDERS_AT_SCALE_1 * scale / DAYS))
    n_items = max(n_orders, round(ITEMS_AT_SCALE_1 * scale / DAYS))
    n_users = max(5, round(USERS_AT_SCALE_1 * scale))
    report(
        f"generating day {day}: {n_orders:,} new orders, {n_items:,} order items, updates and product changes"
    )
    today = (day - FIRST_DAY).days
    # About 1% of the day's orders arrive late, stamped on one of the previous 30 days: they land in
    # old partitions as small files, which is what `lakehouse maintain` compacts.
    late = max(1, n_orders // 100)
    days = np.concatenate([np.full(n_orders - late, today), rng.integers(today - 30, today, size=late)])
    new_orders = _orders(rng, last_order + 1, n_orders, n_users, days)
    product_count = int(products_scan.select(pl.len()).collect().item())
    highest_product = int(products_scan.select(pl.col("product_id").max()).collect().item())
    new_items = _items(
        rng, new_orders, last_item + 1, n_items, min(highest_product, product_limit or highest_product)
    )

    # Corrections to recent orders keep their timestamp (so they apply) and change the amount.
    updated = (
        orders_scan.filter(pl.col("date") == last_day)
        .sort("order_id")
        .head(max(1, n_orders // 100))
        .collect()
        .with_columns((pl.col("total_amount") + 1.25).round(2))
    )
    renamed = (
        products_scan.sort("product_id")
        .head(max(1, product_count // 1000))
        .collect()
        .with_columns(pl.format("{} (new recipe)", pl.col("product_name")).alias("product_name"))
    )
    frames = {
        "products": renamed.select(PRODUCTS.column_names),
        "orders": pl.concat([new_orders.select(ORDERS.column_names), updated.select(ORDERS.column_names)]),
        "order_items": new_items,
    }
    share = DIRTY_SHARE if dirty else 0.0
    return _write_all(store, rng, share, frames, day.isoformat(), dirty, report)
