"""SQL over the lakehouse tables with Polars SQL: the local stand-in for Athena."""

from __future__ import annotations

import polars as pl

from pipeline import delta
from pipeline.batch import rejected_uri, table_uri
from pipeline.errors import UsageError
from pipeline.specs import TABLES
from pipeline.storage import Store


def run_query(store: Store, sql: str) -> pl.DataFrame:
    """Run ``sql`` over ``products``, ``orders``, ``order_items`` and ``rejected_<table>`` of ``store``."""
    context = pl.SQLContext()
    for name in TABLES:
        for alias, uri in ((name, table_uri(store, name)), (f"rejected_{name}", rejected_uri(store, name))):
            lazy = delta.scan(uri)
            if lazy is not None:
                context.register(alias, lazy)
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
