"""Batch-level rules over a table spec: duplicate rows, duplicate keys and unresolved references."""

from __future__ import annotations

import polars as pl

from pipeline.specs import TableSpec
from pipeline.validate import REASONS

ORDER = "_order"


def typed(name: str) -> str:
    """The name of the parsed column of table column ``name``."""
    return f"typed__{name}"


DIGESTS = ("digest_a__", "digest_b__")


def row_digests(columns: list[pl.Expr]) -> list[pl.Expr]:
    """Two independent 64-bit digests of a row of ``columns`` (fixed seeds: comparable within a run).

    The columns must have the same types and order on both sides being compared.
    """
    row = pl.struct([column.alias(f"c{index}") for index, column in enumerate(columns)])
    return [row.hash(seed=seed).alias(name) for seed, name in zip((7, 1_000_003), DIGESTS)]


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


STALE = "stale_row"


def survivor_mask(
    valid: pl.DataFrame,
    spec: TableSpec,
    known: dict[str, pl.Series] | None,
    stored_order: pl.Series | None = None,
) -> tuple[pl.Series, pl.DataFrame]:
    """Which valid rows survive dedup, the reference check and the stale check, and the rejected rows.

    Duplicates lose first (see ``duplicate_losers``). A surviving row is then rejected with every reason
    that applies: ``unknown_<column>`` when a foreign key is not in ``known`` (column -> values that
    exist; None skips the check), and ``stale_row`` when ``stored_order`` (for each valid row, in order,
    the lakehouse's ``spec.order_by`` under its key; null where none is stored) is newer than the row's.
    The big frame itself is never copied here.
    """
    losers = duplicate_losers(valid, spec)
    survives_dedup = ~pl.col(ORDER).is_in(losers.get_column(ORDER).implode())
    flagged = {
        fk.reason: ~pl.col(typed(fk.column)).is_in(known[fk.column].implode())
        for fk in spec.foreign_keys
        if known is not None
    }
    if stored_order is not None and spec.order_by is not None:
        flagged[STALE] = (pl.lit(stored_order) > pl.col(typed(spec.order_by))).fill_null(False)
    if not flagged:
        return valid.select(survives_dedup.alias("keep")).to_series(), losers
    flags = valid.select(survives_dedup.alias("dedup__"), *(expr.alias(r) for r, expr in flagged.items()))
    is_rejected = flags.select(pl.col("dedup__") & pl.any_horizontal(list(flagged))).to_series()
    # Reason lists are built for the few rejected rows only; building them for every row costs seconds.
    reasons = flags.filter(is_rejected).select(
        pl.concat_list(pl.when(pl.col(r)).then(pl.lit(r)).otherwise(None) for r in flagged)
        .list.drop_nulls()
        .alias(REASONS)
    )
    rejected = valid.filter(is_rejected).with_columns(reasons.to_series())
    keep = flags.select(pl.col("dedup__") & ~is_rejected).to_series().alias("keep")
    return keep, pl.concat([losers, rejected])


def alongside(valid: pl.DataFrame, key: str, stored: pl.DataFrame, stored_key: str) -> pl.DataFrame:
    """``stored``'s other columns for each row of ``valid``, matched on the key, in ``valid``'s order
    (nulls where nothing is stored under the key). Stored keys are unique: one row per valid row."""
    return (
        valid.select(key)
        .join(stored.rename({stored_key: key}), on=key, how="left", maintain_order="left")
        .drop(key)
    )


def split_survivors(
    valid: pl.DataFrame,
    spec: TableSpec,
    known: dict[str, pl.Series] | None,
    stored: pl.DataFrame | None = None,
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """The surviving rows themselves (a copy) and the rejected rows; see ``survivor_mask``.

    ``stored``: the lakehouse's ``typed__<key>`` and ``typed__<order_by>`` of the batch's keys.
    """
    stored_order = None
    if stored is not None and spec.order_by is not None:
        key = typed(spec.primary_key)
        stored_order = alongside(valid, key, stored, key).get_column(typed(spec.order_by))
    keep, rejected = survivor_mask(valid, spec, known, stored_order)
    return valid.filter(keep), rejected


def _with_reason(frame: pl.DataFrame, reason: str) -> pl.DataFrame:
    return frame.with_columns(pl.lit([reason], pl.List(pl.String)).alias(REASONS))
