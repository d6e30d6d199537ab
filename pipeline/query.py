"""SQL over the lakehouse tables with Polars SQL: the local stand-in for Athena."""

from __future__ import annotations

import polars as pl

from pipeline import delta
from pipeline.batch import table_uri
from pipeline.errors import UsageError
from pipeline.specs import TABLES
from pipeline.storage import Store


def run_query(store: Store, sql: str) -> pl.DataFrame:
    """Run ``sql`` over the tables ``products``, ``orders`` and ``order_items`` of ``store``."""
    context = pl.SQLContext()
    for name in TABLES:
        lazy = delta.scan(table_uri(store, name))
        if lazy is not None:
            context.register(name, lazy)
    if not context.tables():
        raise UsageError(
            f"{store.root} has no lakehouse tables yet; run `lakehouse run --root {store.root}` first"
        )
    try:
        return context.execute(sql, eager=True)
    except (
        pl.exceptions.SQLInterfaceError,
        pl.exceptions.SQLSyntaxError,
        pl.exceptions.ColumnNotFoundError,
    ) as error:
        raise UsageError(f"query failed: {str(error).splitlines()[0]}") from error
