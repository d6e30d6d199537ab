"""SQL over the lakehouse tables with Polars SQL: the local stand-in for Athena."""

from __future__ import annotations

import polars as pl

from pipeline import delta
from pipeline.batch import rejected_schema, rejected_uri, table_uri
from pipeline.errors import UsageError
from pipeline.specs import TABLES
from pipeline.storage import Store


def run_query(store: Store, sql: str, *, limit: int | None = None) -> pl.DataFrame:
    """Run ``sql`` over ``products``, ``orders``, ``order_items`` and ``rejected_<table>`` of ``store``.

    ``limit`` is applied inside the query: only what it needs is read. A rejected table that does not
    exist yet (nothing was rejected) is there, empty.
    """
    context = pl.SQLContext()
    found = False
    for name, spec in TABLES.items():
        lazy = delta.scan(table_uri(store, name))
        if lazy is not None:
            context.register(name, lazy)
            found = True
        rejected = delta.scan(rejected_uri(store, name))
        empty = pl.LazyFrame(schema=rejected_schema(spec))  # nothing rejected yet: no table
        context.register(f"rejected_{name}", empty if rejected is None else rejected)
    if not found:
        raise UsageError(
            f"{store.root} has no lakehouse tables yet; run `lakehouse run --root {store.root}` first"
        )
    try:
        lazy = context.execute(sql, eager=False)
        return (lazy if limit is None else lazy.head(limit)).collect()
    except (
        pl.exceptions.SQLInterfaceError,
        pl.exceptions.SQLSyntaxError,
        pl.exceptions.ColumnNotFoundError,
    ) as error:
        message = str(error).splitlines()[0]
        if message.startswith("relation "):  # a table name polars does not know
            message += f"; the tables are: {', '.join(sorted(context.tables()))}"
        raise UsageError(f"query failed: {message}") from error
