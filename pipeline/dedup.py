"""Batch-level rules over a table spec: duplicate rows, duplicate keys and unresolved references."""

from __future__ import annotations

import polars as pl

from pipeline.specs import TableSpec
from pipeline.validate import REASONS

ORDER = "_order"


def typed(name: str) -> str:
    """The name of the parsed column of table column ``name``."""
    return f"typed__{name}"


def split_duplicates(valid: pl.DataFrame, spec: TableSpec) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Split valid rows (in batch order, ``_order``) into survivors and duplicate losers.

    A row identical to an earlier one loses as ``duplicate_row``. Among rows sharing the primary key,
    the greatest ``spec.order_by`` value survives (ties and specs without one: the later row); the
    others lose as ``duplicate_key``. The losers carry a one-reason ``reject_reasons`` list.
    """
    key = pl.col(typed(spec.primary_key))
    shares_key = key.is_duplicated()
    # Identical rows share their key, so only rows with a shared key need the costlier checks.
    candidates = valid.filter(shares_key).sort(ORDER)
    if candidates.height == 0:
        return valid, _with_reason(valid.head(0), "duplicate_row")
    others = valid.filter(~shares_key)

    is_first = pl.struct([typed(name) for name in spec.column_names]).is_first_distinct()
    distinct = candidates.filter(is_first)
    repeated = candidates.filter(~is_first)

    ranking = [typed(spec.order_by), ORDER] if spec.order_by else [ORDER]
    winners = distinct.sort(ranking).group_by(typed(spec.primary_key), maintain_order=True).last()
    winner_orders = winners.get_column(ORDER)
    is_winner = pl.col(ORDER).is_in(winner_orders.implode())
    survivors = pl.concat([others, distinct.filter(is_winner)])
    losers = pl.concat(
        [
            _with_reason(repeated, "duplicate_row"),
            _with_reason(distinct.filter(~is_winner), "duplicate_key"),
        ]
    )
    return survivors, losers


def split_orphans(
    survivors: pl.DataFrame, spec: TableSpec, known: dict[str, pl.Series]
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Split rows into those whose foreign keys resolve in ``known`` (column -> known values) and orphans.

    Orphans carry every ``unknown_<column>`` reason that applies.
    """
    if not spec.foreign_keys:
        return survivors, _with_reason(survivors.head(0), "")
    unknown = {
        fk.reason: ~pl.col(typed(fk.column)).is_in(known[fk.column].implode()) for fk in spec.foreign_keys
    }
    flagged = survivors.with_columns(expr.alias(reason) for reason, expr in unknown.items())
    is_orphan = pl.any_horizontal(list(unknown))
    # Reason lists are built for the few orphans only; building them for every row costs seconds.
    orphans = flagged.filter(is_orphan).with_columns(
        pl.concat_list(pl.when(pl.col(reason)).then(pl.lit(reason)).otherwise(None) for reason in unknown)
        .list.drop_nulls()
        .alias(REASONS)
    )
    return flagged.filter(~is_orphan).drop(list(unknown)), orphans.drop(list(unknown))


def _with_reason(frame: pl.DataFrame, reason: str) -> pl.DataFrame:
    return frame.with_columns(pl.lit([reason], pl.List(pl.String)).alias(REASONS))
