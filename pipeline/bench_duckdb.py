"""The benchmark's side-by-side row: the same rules as one DuckDB SQL pipeline, partitioned Parquet out.

Not part of the lakehouse (duckdb is in the ``bench`` extra only). The SQL is generated from the table
specs, so it follows the very rules the pipeline does: the types, nulls and ranges of each column, the
date/timestamp agreement, duplicate keys (the greatest ``order_by`` survives), and references to the
tables written before. What it leaves out: a record with the wrong number of fields is skipped by the
CSV reader (``ignore_errors``) rather than kept with its text, rows carry no line numbers (their order
in the batch is the temp table's rowid), and a full load has no stored rows, so no stale check.
It writes the surviving rows per table as Parquet partitioned like the lakehouse tables, and the rejected
rows with their reasons.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.specs import TABLES, Column, TableSpec
from pipeline.validate import DATE_PATTERN, TIMESTAMP_PATTERN


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _typed(column: Column) -> str:
    """The SQL expression of a column's typed value (NULL where its text breaks the column's type)."""
    text = _clean(column)
    if column.type == "timestamp":
        return (
            f"CASE WHEN {_in_years(text, TIMESTAMP_PATTERN)} "
            f"THEN TRY_CAST(regexp_replace({text}, '(Z|\\+00:00)$', '') AS TIMESTAMP) END"
        )
    if column.type == "date":
        return f"CASE WHEN {_in_years(text, DATE_PATTERN)} THEN TRY_CAST({text} AS DATE) END"
    if column.type == "double":
        return f"CASE WHEN isfinite(TRY_CAST({text} AS DOUBLE)) THEN TRY_CAST({text} AS DOUBLE) + 0.0 END"
    if column.type == "int":
        # Digits with an optional sign only: DuckDB would also cast '1.0' and '1e3' to an integer.
        return f"CASE WHEN regexp_full_match({text}, '[+-]?[0-9]+') THEN TRY_CAST({text} AS INTEGER) END"
    return text


def _in_years(text: str, pattern: str) -> str:
    return f"regexp_full_match({text}, {_literal(pattern)}) AND NOT starts_with({text}, '0000')"


def _clean(column: Column) -> str:
    return f"clean__{column.name}"


def _quoted(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _reasons(spec: TableSpec) -> str:
    """The SQL list of every reason a row breaks the spec's column rules (empty for a valid row)."""
    cases = []
    for column in spec.columns:
        text, typed = _clean(column), f"typed__{column.name}"
        if not column.nullable:
            cases.append((f"{text} IS NULL", f"null:{column.name}"))
        cases.append((f"{text} IS NOT NULL AND {typed} IS NULL", f"invalid:{column.name}"))
        ranges = []
        if column.greater_than is not None:
            ranges.append(f"{typed} <= {column.greater_than}")
        if column.at_least is not None:
            ranges.append(f"{typed} < {column.at_least}")
        if column.allowed is not None:
            ranges.append(f"{typed} NOT IN ({', '.join(str(value) for value in column.allowed)})")
        if ranges:
            cases.append((f"coalesce({' OR '.join(ranges)}, false)", f"range:{column.name}"))
    if spec.date_of:
        date, stamp = spec.date_of
        cases.append((f"coalesce(typed__{date} <> CAST(typed__{stamp} AS DATE), false)", "date_mismatch"))
    listed = ", ".join(f"CASE WHEN {condition} THEN {_literal(reason)} END" for condition, reason in cases)
    return f"list_filter([{listed}], lambda reason: reason IS NOT NULL)"


def load(raw: Path, out: Path) -> dict[str, Any]:
    """Run the pipeline over ``raw/<table>/*.csv`` into ``out``; the rows kept and rejected per table."""
    import duckdb

    out.mkdir(parents=True, exist_ok=True)
    connection = duckdb.connect()
    connection.execute(f"SET temp_directory = {_literal(str(out / '_spill'))}")
    counts: dict[str, Any] = {}
    for name, spec in TABLES.items():
        files = sorted(str(path) for path in (raw / name).glob("*.csv"))
        if not files:
            continue
        cleaned = ", ".join(f"nullif(trim({_quoted(c.name)}), '') AS {_clean(c)}" for c in spec.columns)
        typed = ", ".join(f"{_typed(c)} AS typed__{c.name}" for c in spec.columns)
        # union_by_name: a file without a column gives NULLs there, which the rules reject.
        source = (
            f"read_csv({files!r}, header = true, all_varchar = true, union_by_name = true, "
            "ignore_errors = true, filename = true)"
        )
        # The text is kept for rejected rows only, as the pipeline keeps it.
        texts = ", ".join(
            f"CASE WHEN len(reasons) > 0 THEN {_quoted(c.name)} END AS {_quoted(c.name)}"
            for c in spec.columns
        )
        typed_names = ", ".join(f"typed__{c.name}" for c in spec.columns)
        connection.execute(
            f"CREATE TEMP TABLE parsed_{name} AS SELECT {typed_names}, reasons, {texts}, "
            "CASE WHEN len(reasons) > 0 THEN filename END AS filename "
            f"FROM (SELECT *, {_reasons(spec)} AS reasons "
            f"FROM (SELECT *, {typed} FROM (SELECT *, {cleaned} FROM {source})))"
        )
        # Ties go to the later row: the temp table keeps the files' order, so its rowid is the batch order.
        ranking = f"typed__{spec.order_by} DESC, rowid DESC" if spec.order_by else "rowid DESC"
        references = " ".join(
            f"AND typed__{fk.column} IN (SELECT {fk.ref_column} FROM kept_{fk.ref_table})"
            for fk in spec.foreign_keys
        )
        selected = ", ".join(
            f"CAST(typed__{c.name} AS VARCHAR) AS {c.name}"
            if c.type == "date"
            else f"typed__{c.name} AS {c.name}"
            for c in spec.columns
        )
        connection.execute(
            f"CREATE TEMP TABLE kept_{name} AS SELECT {selected} FROM ("
            f"SELECT *, row_number() OVER (PARTITION BY typed__{spec.primary_key} ORDER BY {ranking}) "
            "AS rank__ "
            f"FROM parsed_{name} WHERE len(reasons) = 0) WHERE rank__ = 1 {references}"
        )
        target = out / name
        connection.execute(
            f"COPY kept_{name} TO {_literal(str(target))} "
            f"(FORMAT parquet, PARTITION_BY ({spec.partition_by}), OVERWRITE_OR_IGNORE)"
        )
        connection.execute(
            f"COPY (SELECT {', '.join(_quoted(c.name) for c in spec.columns)}, filename, reasons "
            f"FROM parsed_{name} WHERE len(reasons) > 0) "
            f"TO {_literal(str(out / f'rejected_{name}.parquet'))} (FORMAT parquet)"
        )
        rows = connection.execute(f"SELECT count(*) FROM parsed_{name}").fetchone()
        kept = connection.execute(f"SELECT count(*) FROM kept_{name}").fetchone()
        counts[name] = {"rows_parsed": rows[0] if rows else 0, "kept": kept[0] if kept else 0}
        connection.execute(f"DROP TABLE parsed_{name}")
    return counts
