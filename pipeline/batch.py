"""One batch, end to end: snapshot, the three table steps, archive, checks and the report."""

from __future__ import annotations

import time
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Callable, TypeVar

import polars as pl

from pipeline import delta
from pipeline.archive import archive_batch
from pipeline.dedup import ORDER, repeated_values, split_survivors, typed
from pipeline.errors import (
    CheckFailedError,
    InputFileError,
    LakehouseError,
    StepError,
)
from pipeline.lock import batch_lock
from pipeline.manifest import (
    MANIFESTS,
    Manifest,
    ManifestFile,
    archived_key,
    new_batch_id,
    snapshot,
    unfinished_manifests,
)
from pipeline.reader import (
    RAW_RECORD,
    SOURCE_FILE,
    SOURCE_LINE,
    FileLayout,
    columns_text,
    prefetched,
    read_chunks,
    read_layout,
)
from pipeline.report import (
    BatchReport,
    StepReport,
    load_step_report,
    report_key,
    save_step_report,
)
from pipeline.specs import TABLES, TableSpec
from pipeline.storage import Store
from pipeline.validate import REASONS, TIMESTAMP, parse_text, validate

LAKEHOUSE = "lakehouse-dwh"
REJECTED = "rejected"

Progress = Callable[[str], None]
T = TypeVar("T")


def _quiet(_: str) -> None:
    return None


def table_uri(store: Store, table: str) -> str:
    return store.uri(f"{LAKEHOUSE}/{table}")


def rejected_uri(store: Store, table: str) -> str:
    return store.uri(f"{REJECTED}/{table}")


def _locate(store: Store, table: str, batch_id: str, entry: ManifestFile) -> str:
    """The key holding a manifest file now: in ``raw/`` or, after a partial archive, ``archived/``."""
    info = store.stat(entry.key)
    if info is not None:
        if info.size != entry.size or info.version != entry.version:
            raise InputFileError(
                f"{store.uri(entry.key)} changed after batch {batch_id} was snapshotted "
                f"(size {entry.size} -> {info.size}); put back the original or delete "
                f"{store.uri(f'{MANIFESTS}/{batch_id}.json')} to start a new batch"
            )
        return entry.key
    moved = archived_key(table, batch_id, entry.key)
    if store.stat(moved) is not None:
        return moved
    raise InputFileError(f"{store.uri(entry.key)} of batch {batch_id} is gone (not in raw/ nor archived/)")


def _rejected_rows(frame: pl.DataFrame, spec: TableSpec) -> pl.DataFrame:
    """Rejected rows shaped for ``rejected/<table>``: original text, reasons, where they came from."""
    return frame.select(
        *(pl.col(name).cast(pl.String) for name in spec.column_names),
        (pl.col(RAW_RECORD) if RAW_RECORD in frame.columns else pl.lit(None, pl.String)).alias("raw_record"),
        pl.col(REASONS).cast(pl.List(pl.String)),
        pl.col(SOURCE_FILE).alias("source_file"),
        pl.col(SOURCE_LINE).alias("source_line"),
    )


def _malformed_rows(malformed: pl.DataFrame, spec: TableSpec) -> pl.DataFrame:
    """Malformed records keep their whole text in ``raw_record``; no value is placed in a column."""
    shaped = malformed.with_columns(
        *(pl.lit(None, pl.String).alias(name) for name in spec.column_names),
        pl.lit(["malformed_row"], pl.List(pl.String)).alias(REASONS),
    )
    return _rejected_rows(shaped, spec)


LINE_BITS = 40  # _order = file index << 40 | line: batch order in one integer column


def _order_of(file_index: int) -> pl.Expr:
    return (pl.lit(file_index, pl.Int64) * (1 << LINE_BITS) + pl.col(SOURCE_LINE)).alias(ORDER)


def _original_text(
    late: pl.DataFrame, sources: list[tuple[str, Path, FileLayout]], spec: TableSpec
) -> pl.DataFrame:
    """Rows rejected after parsing (duplicates, orphans) with their original text, read again from source.

    Valid rows are kept only in typed form to save memory; the few that lose later get their text back
    from the file they came from, through the same reader.
    """
    late = late.select(
        ORDER,
        REASONS,
        (pl.col(ORDER) // (1 << LINE_BITS)).alias("file__"),
        (pl.col(ORDER) % (1 << LINE_BITS)).alias(SOURCE_LINE),
    )
    found = []
    for file_index in late.get_column("file__").unique().sort().to_list():
        source, path, layout = sources[file_index]
        wanted = late.filter(pl.col("file__") == file_index).drop("file__")
        lines = wanted.get_column(SOURCE_LINE).implode()
        texts = pl.concat(
            [
                chunk.records.filter(pl.col(SOURCE_LINE).is_in(lines))
                for chunk in read_chunks(path, spec, source, layout)
            ]
        )
        found.append(wanted.join(texts, on=SOURCE_LINE, how="left"))
    return _rejected_rows(pl.concat(found), spec)


@dataclass
class _PreScan:
    """What a fast read of the key and reference columns says about a batch's files."""

    repeated_keys: pl.Series
    references: dict[str, pl.Series]


def _pre_scan(sources: list[tuple[str, Path, FileLayout]], spec: TableSpec) -> _PreScan:
    """Keys occurring more than once (the only rows dedup can reject) and the referenced values."""
    names = [spec.primary_key, *(fk.column for fk in spec.foreign_keys)]
    texts = [columns_text(path, layout, names) for _, path, layout in sources if layout.field_count]
    frame = pl.concat(texts) if texts else pl.DataFrame(schema={name: pl.String for name in names})
    parsed = {name: parse_text(frame.get_column(name), spec.column(name)).drop_nulls() for name in names}
    return _PreScan(
        repeated_keys=repeated_values(parsed[spec.primary_key]),
        references={fk.column: parsed[fk.column].unique() for fk in spec.foreign_keys},
    )


def _known_references(store: Store, spec: TableSpec, values: dict[str, pl.Series]) -> dict[str, pl.Series]:
    """Which of ``values`` (per foreign-key column) exist in the referenced lakehouse tables."""
    return {
        fk.column: delta.existing_values(table_uri(store, fk.ref_table), fk.ref_column, values[fk.column])
        for fk in spec.foreign_keys
    }


def run_step(
    store: Store,
    manifest: Manifest,
    spec: TableSpec,
    *,
    progress: Progress = _quiet,
    now: datetime | None = None,
) -> StepReport:
    """Validate, deduplicate and integrity-check one table's files of a batch, then MERGE them.

    Rejected rows replace whatever this batch rejected before in ``rejected/<table>``, and the MERGE
    changes nothing on a replay, so a step is safe to run again.
    """
    started = time.monotonic()
    batch_id = manifest.batch_id
    typed_columns = [typed(name) for name in spec.column_names]
    text_columns = [*spec.column_names, SOURCE_FILE, SOURCE_LINE, ORDER]
    valid_parts: list[pl.DataFrame] = []
    # Valid rows are kept in typed form only; the original text is kept for the few that dedup or the
    # reference check may still reject (a repeated key, an unknown reference).
    text_parts: list[pl.DataFrame] = []
    rejected_parts: list[pl.DataFrame] = []
    extra_columns: dict[str, list[str]] = {}
    empty_files: list[str] = []
    sources: list[tuple[str, Path, FileLayout]] = []
    rows_in = 0

    with ExitStack() as local_copies:
        for entry in manifest.files[spec.name]:
            key = _locate(store, spec.name, batch_id, entry)
            path = local_copies.enter_context(store.local_path(key))
            layout = read_layout(path, spec, entry.key)
            if layout is None:
                empty_files.append(entry.key)
                layout = FileLayout({}, [], [], 0, 1)
            elif layout.extra:
                extra_columns[entry.key] = layout.extra
            sources.append((entry.key, path, layout))

        progress(f"{spec.name}: looking for repeated keys and looking up references")
        scanned = _pre_scan(sources, spec)
        known = _known_references(store, spec, scanned.references)
        # Testing membership in the few unknown values, not in the many known ones, keeps this cheap.
        unknown = {
            fk.column: scanned.references[fk.column]
            .alias(fk.column)
            .to_frame()
            .filter(~pl.col(fk.column).is_in(known[fk.column].implode()))
            .to_series()
            for fk in spec.foreign_keys
        }
        at_risk = pl.any_horizontal(
            pl.col(typed(spec.primary_key)).is_in(scanned.repeated_keys.implode()),
            *(pl.col(typed(fk.column)).is_in(unknown[fk.column].implode()) for fk in spec.foreign_keys),
        )

        for file_index, (source, path, layout) in enumerate(sources):
            if not layout.field_count:
                continue
            progress(f"{spec.name}: reading {source}")
            for chunk in prefetched(read_chunks(path, spec, source, layout)):
                rows_in += chunk.records.height + chunk.malformed.height
                if chunk.malformed.height:
                    rejected_parts.append(_malformed_rows(chunk.malformed, spec))
                checked = validate(chunk.records, spec, layout.missing)
                is_valid = pl.col(REASONS).list.len() == 0
                rejected_parts.append(_rejected_rows(checked.filter(~is_valid), spec))
                valid = checked.filter(is_valid).with_columns(_order_of(file_index))
                text_parts.append(valid.filter(at_risk).select(text_columns))
                valid_parts.append(valid.select(*typed_columns, ORDER))

        progress(f"{spec.name}: deduplicating and checking references")
        valid = pl.concat(valid_parts, rechunk=False) if valid_parts else pl.DataFrame()
        del valid_parts
        if valid.height:
            # Values the pre-scan did not see (it and the reader disagreed) are looked up now.
            unseen = {
                fk.column: valid.select(pl.col(typed(fk.column)).unique())
                .filter(~pl.col(typed(fk.column)).is_in(scanned.references[fk.column].implode()))
                .to_series()
                for fk in spec.foreign_keys
            }
            if any(values.len() for values in unseen.values()):
                extra = _known_references(store, spec, unseen)
                known = {column: pl.concat([known[column], extra[column]]) for column in known}
            survivors, late = split_survivors(valid, spec, known)
            del valid
            late = late.select(ORDER, REASONS)
            texts = pl.concat(text_parts)
            with_text = late.join(texts, on=ORDER, how="inner")
            rejected_parts.append(_rejected_rows(with_text, spec))
            unmatched = late.join(texts, on=ORDER, how="anti")
            if unmatched.height:
                # Only when the fast key pre-scan and the reader disagreed about a record.
                progress(f"{spec.name}: reading the original text of {unmatched.height:,} rows again")
                rejected_parts.append(_original_text(unmatched, sources, spec))
            rows = survivors.select(pl.col(typed(name)).alias(name) for name in spec.column_names)
            del survivors
        else:
            rows = pl.DataFrame()

    rejected_at = now or datetime.now(timezone.utc)
    kept_parts = [part for part in rejected_parts if part.height]
    rejected = pl.concat(kept_parts) if kept_parts else None
    rejected_rows = 0 if rejected is None else rejected.height
    if rows.height + rejected_rows != rows_in:
        raise LakehouseError(
            f"{spec.name}: {rows_in} rows read but {rows.height} kept and {rejected_rows} rejected; "
            "refusing to write"
        )

    reasons: Counter[str] = Counter()
    if rejected is None:
        rejected_version = delta.table_version(rejected_uri(store, spec.name))
    else:
        reasons.update(rejected.get_column(REASONS).explode().to_list())
        progress(f"{spec.name}: writing {rejected.height:,} rejected rows")
        rejected_version = delta.replace_batch_rows(
            rejected_uri(store, spec.name),
            rejected.with_columns(
                pl.lit(batch_id).alias("batch_id"), pl.lit(rejected_at).cast(TIMESTAMP).alias("rejected_at")
            ),
            batch_column="batch_id",
            batch_id=batch_id,
        )

    progress(f"{spec.name}: merging {rows.height:,} rows")
    merged = delta.merge_rows(table_uri(store, spec.name), rows, spec) if rows.height else None
    inserted = merged.inserted if merged else 0
    updated = merged.updated if merged else 0
    return StepReport(
        table=spec.name,
        files=len(manifest.files[spec.name]),
        rows_in=rows_in,
        inserted=inserted,
        updated=updated,
        unchanged=rows.height - inserted - updated,
        rejected=rejected_rows,
        rejected_by_reason=dict(sorted(reasons.items())),
        delta_version=merged.version if merged else delta.table_version(table_uri(store, spec.name)),
        rejected_version=rejected_version,
        seconds=round(time.monotonic() - started, 3),
        extra_columns=extra_columns,
        empty_files=empty_files,
    )


def check_tables(store: Store) -> dict[str, int]:
    """Row counts of the lakehouse tables; fails when any is empty (the seed's Athena check)."""
    counts = {table: delta.count_rows(table_uri(store, table)) for table in TABLES}
    empty = [table for table, count in counts.items() if count == 0]
    if empty:
        raise CheckFailedError(f"check failed: table {', '.join(empty)} has no rows after the batch")
    return counts


def maintain_tables(
    store: Store, *, retention_hours: int = 168, progress: Progress = _quiet
) -> dict[str, delta.MaintenanceResult]:
    """Compact, vacuum and checkpoint every lakehouse and rejected table of ``store``."""
    results = {}
    for table in TABLES:
        for name, uri in (
            (table, table_uri(store, table)),
            (f"rejected/{table}", rejected_uri(store, table)),
        ):
            progress(f"maintaining {name}")
            result = delta.maintain_table(uri, retention_hours=retention_hours)
            if result is not None:
                results[name] = result
    return results


def run_batch(store: Store, *, progress: Progress = _quiet, now: datetime | None = None) -> BatchReport:
    """Process one batch: resume the unfinished one if there is one, else snapshot ``raw/``.

    Any failure raises with the step named; raw files stay in ``raw/`` until every step has
    committed, and running again resumes the same batch.
    """
    started_at = now or datetime.now(timezone.utc)
    started = time.monotonic()
    batch_id = new_batch_id(started_at)
    with batch_lock(store, batch_id):
        pending = unfinished_manifests(store)
        if pending:
            manifest = pending[0]
            progress(f"resuming unfinished batch {manifest.batch_id}")
        else:
            manifest = _guard("snapshot", lambda: snapshot(store, batch_id, started_at))
            store.write_bytes(manifest.key, manifest.to_json(), if_absent=True)
            progress(f"batch {manifest.batch_id}: {sum(len(f) for f in manifest.files.values())} files")

        steps = []
        for spec in TABLES.values():
            report = load_step_report(store, manifest.batch_id, spec.name)
            if report is None:
                report = _guard(spec.name, partial(run_step, store, manifest, spec, progress=progress))
                save_step_report(store, manifest.batch_id, report)
            steps.append(report)
        archived = _guard("archive", lambda: archive_batch(store, manifest, progress=progress))
        counts = _guard("checks", lambda: check_tables(store))
        batch_report = BatchReport(
            batch_id=manifest.batch_id,
            status="succeeded",
            started_at=started_at.isoformat(),
            finished_at=datetime.now(timezone.utc).isoformat(),
            seconds=round(time.monotonic() - started, 3),
            steps=steps,
            archived_files=archived,
            table_counts=counts,
        )
        store.write_bytes(report_key(manifest.batch_id), batch_report.to_json())
        return batch_report


def _guard(step: str, action: Callable[[], T]) -> T:
    try:
        return action()
    except StepError:
        raise
    except Exception as error:
        if step == "snapshot" and isinstance(error, LakehouseError):
            raise
        raise StepError(step, error) from error
