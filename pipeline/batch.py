"""One batch, end to end: snapshot, the three table steps, archive, checks and the report."""

from __future__ import annotations

import os
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Any, Callable, Protocol, TypeVar

import polars as pl

from pipeline import delta
from pipeline.archive import archive_batch, restore_batch
from pipeline.catalog import catalog_name
from pipeline.contract import check_rows
from pipeline.costs import local_estimate
from pipeline.dedup import DIGESTS, ORDER, alongside, row_digests, survivor_mask, typed
from pipeline.errors import (
    BatchLockedError,
    CheckFailedError,
    InputFileError,
    LakehouseError,
    StepError,
    UsageError,
)
from pipeline.gates import GateSettings, judge, load_settings
from pipeline.html_report import write_batch_report
from pipeline.lock import Lock, batch_lock
from pipeline.manifest import (
    Manifest,
    ManifestFile,
    archived_key,
    forget_loaded,
    new_batch_id,
    raw_files,
    read_manifest,
    record_loaded,
    snapshot,
    unfinished_manifests,
)
from pipeline.progress import Progress
from pipeline.progress import quiet as _quiet
from pipeline.reader import (
    RAW_RECORD,
    SOURCE_FILE,
    SOURCE_LINE,
    FileLayout,
    RawChunk,
    ReadStats,
    count_empty_lines,
    detached,
    estimated_records,
    prefetched,
    read_chunks,
    read_layout,
    records_at_lines,
)
from pipeline.report import (
    BatchReport,
    StepReport,
    load_report,
    load_step_report,
    report_key,
    save_step_report,
    step_report_key,
)
from pipeline.specs import TABLES, TableSpec
from pipeline.stages import (
    BUCKET,
    DEFAULT_MEMORY_BUDGET,
    Plan,
    StageClock,
    Staging,
    bucket_of,
    partition_groups,
    plan_for,
)
from pipeline.storage import DOWNLOAD_PREFIX, Store, remove_stale_downloads
from pipeline.validate import REASONS, TIMESTAMP, polars_type, split_valid, validate

LAKEHOUSE = "lakehouse-dwh"
REJECTED = "rejected"

T = TypeVar("T")


def table_uri(store: Store, table: str) -> str:
    return store.uri(f"{LAKEHOUSE}/{table}")


def rejected_uri(store: Store, table: str) -> str:
    return store.uri(f"{REJECTED}/{table}")


def _locate(store: Store, table: str, batch_id: str, entry: ManifestFile) -> str:
    """The key holding a manifest file now: in ``raw/`` or, after a partial archive, ``archived/``.

    A file whose size or ETag differs is refused at once; a local file's content is checked as it is
    read (its digest), so a file only touched since the snapshot is read as usual.
    """
    info = store.stat(entry.key)
    if info is not None:
        hashed_locally = entry.content.startswith("sha256:")
        if info.size != entry.size or (not hashed_locally and info.version != entry.version):
            raise InputFileError(
                f"{store.uri(entry.key)} changed after batch {batch_id} was snapshotted "
                f"(size {entry.size} -> {info.size}); put back the original, or give the batch up with "
                f"`lakehouse abandon {batch_id}` and run again"
            )
        return entry.key
    moved = archived_key(table, batch_id, entry.key)
    if store.stat(moved) is not None:
        return moved
    raise InputFileError(
        f"{store.uri(entry.key)} of batch {batch_id} is gone (not in raw/ nor archived/); put it back, or "
        f"give the batch up with `lakehouse abandon {batch_id}`"
    )


def _expected_digest(entry: ManifestFile) -> str | None:
    """The SHA-256 a local file's bytes must have (S3 copies are fetched by ETag instead)."""
    return entry.content[len("sha256:") :] if entry.content.startswith("sha256:") else None


def _rejected_rows(frame: pl.DataFrame, spec: TableSpec) -> pl.DataFrame:
    """Rejected rows shaped for ``rejected/<table>``: original text, reasons, where they came from."""
    return frame.select(
        *(pl.col(name).cast(pl.String) for name in spec.column_names),
        (pl.col(RAW_RECORD) if RAW_RECORD in frame.columns else pl.lit(None, pl.String)).alias("raw_record"),
        pl.col(REASONS).cast(pl.List(pl.String)),
        pl.col(SOURCE_FILE).alias("source_file"),
        pl.col(SOURCE_LINE).alias("source_line"),
    )


def rejected_schema(spec: TableSpec) -> pl.Schema:
    """The columns of ``rejected/<table>``: every column as text, the record, reasons, source, batch."""
    columns: dict[str, pl.DataType] = {name: pl.String() for name in spec.column_names}
    return pl.Schema(
        {
            **columns,
            "raw_record": pl.String(),
            REASONS: pl.List(pl.String),
            "source_file": pl.String(),
            "source_line": pl.Int64(),
            "batch_id": pl.String(),
            "rejected_at": TIMESTAMP,
        }
    )


def _malformed_rows(malformed: pl.DataFrame, spec: TableSpec) -> pl.DataFrame:
    """Malformed records keep their whole text in ``raw_record``; no value is placed in a column."""
    shaped = malformed.with_columns(
        *(pl.lit(None, pl.String).alias(name) for name in spec.column_names),
        pl.lit(["malformed_row"], pl.List(pl.String)).alias(REASONS),
    )
    return _rejected_rows(shaped, spec)


LINE_BITS = 40  # _order = file index << 40 | line: batch order in one integer column


def _split_chunk(
    chunk: RawChunk,
    spec: TableSpec,
    layout: FileLayout,
    file_index: int,
    reject: Callable[[pl.DataFrame], None],
) -> pl.DataFrame:
    """A chunk's valid rows, typed and with their ``_order``; its malformed and invalid rows, with their
    text and reasons, go to ``reject``."""
    if chunk.malformed.height:
        reject(_malformed_rows(chunk.malformed, spec))
    # Valid rows are kept typed only: the text of the few rejected later is cut out again.
    valid_rows, invalid_rows = split_valid(chunk.records, spec, layout.missing, keep=[SOURCE_LINE])
    reject(_rejected_rows(invalid_rows, spec))
    return valid_rows.select(*(typed(name) for name in spec.column_names), _order_of(file_index))


def _order_of(file_index: int) -> pl.Expr:
    return (pl.lit(file_index, pl.Int64) * (1 << LINE_BITS) + pl.col(SOURCE_LINE)).alias(ORDER)


FILE = "file__"


def _file_of_order() -> pl.Expr:
    return (pl.col(ORDER) // (1 << LINE_BITS)).cast(pl.Int32).alias(FILE)


def _original_text(
    files: list[int],
    late_of: Callable[[int], pl.DataFrame],
    sources: list[tuple[str, Path, FileLayout]],
    spec: TableSpec,
    digests: list[str | None],
) -> Iterator[pl.DataFrame]:
    """Rows rejected after parsing (duplicates, orphans) with their original text, file by file.

    ``late_of(file)`` gives a file's late rejects (typed, with ``_order`` and reasons). Valid rows are
    kept only in typed form to save memory. The few that lose later get their text back by cutting
    their records out of the file (``records_at_lines``); the text is checked by parsing it again,
    which must give the very values the row had. A file where that fails is read again in full
    through the same reader.
    """

    def text_of_file(file_index: int) -> pl.DataFrame:
        return _late_text(late_of(file_index), sources[file_index], spec, digests[file_index])

    # Two files at a time: the byte scans release the GIL.
    with ThreadPoolExecutor(max_workers=2) as pool:
        yield from pool.map(text_of_file, files)


def _late_text(
    late: pl.DataFrame, source: tuple[str, Path, FileLayout], spec: TableSpec, digest: str | None
) -> pl.DataFrame:
    """One file's late rejects (``_original_text``) as rejected rows with their original text."""
    name, path, layout = source
    wanted = late.with_columns((pl.col(ORDER) % (1 << LINE_BITS)).alias(SOURCE_LINE))
    lines = wanted.get_column(SOURCE_LINE)
    texts = records_at_lines(path, spec, name, layout, lines)
    if texts is None or not _same_values(texts, wanted, spec, layout):
        texts = pl.concat(
            [
                chunk.records.filter(pl.col(SOURCE_LINE).is_in(lines.implode()))
                for chunk in read_chunks(path, spec, name, layout, expected_digest=digest)
            ]
        )
    found = wanted.select(SOURCE_LINE, REASONS).join(texts, on=SOURCE_LINE, how="left")
    return _rejected_rows(found, spec)


class _Rejected:
    """A step's rejected rows as they are found: held in memory, or staged when the step is (then no
    more than one file's late rejects and one staged part are in memory at a time)."""

    KIND = "rejected"

    def __init__(self, staging: Staging | None) -> None:
        self.staging = staging
        self.rows = 0
        self._held: list[pl.DataFrame] = []

    def add(self, frame: pl.DataFrame) -> None:
        if not frame.height:
            return
        self.rows += frame.height
        if self.staging is None:
            self._held.append(detached(frame))  # kept text must not pin the block it was read from
        else:
            self.staging.put(self.KIND, 0, frame)

    def frames(self) -> Iterator[pl.DataFrame]:
        if self.staging is None:
            yield from self._held
        else:
            for path in self.staging.files(self.KIND, 0):
                yield self.staging.read(path)

    def reasons(self) -> Counter[str]:
        """How many rows have each reason (a row may have several)."""
        return _reason_counts([self.scan()]) if self.rows else Counter()

    def scan(self) -> pl.LazyFrame:
        """Every rejected row found so far (there must be one)."""
        if self.staging is None:
            return pl.concat([frame.lazy() for frame in self._held])
        return self.staging.scan(self.KIND, 0)


SAMPLES_PER_REASON = 5


def _rejected_summary(
    rejected: _Rejected, spec: TableSpec
) -> tuple[dict[str, int], dict[str, int], list[dict[str, Any]]]:
    """The rejected rows by source file and by partition text, and a few of them per reason (for the
    report: ``pipeline.html_report``)."""
    if not rejected.rows:
        return {}, {}, []
    lazy = rejected.scan()
    # A malformed row keeps its whole text; another row's text is its columns' again.
    fields = [pl.col(name).fill_null("") for name in spec.column_names]
    record = pl.coalesce(pl.col("raw_record"), pl.concat_str(fields, separator=","))
    # The first rows of each reason picked on their file and line alone, then only those rows' text
    # built and ordered: a high reject share sorts narrow keys, never every record.
    first = (
        lazy.select("source_file", "source_line", pl.col(REASONS).alias("reason"))
        .explode("reason")
        .group_by("reason")
        .agg(pl.struct("source_file", "source_line").sort().head(SAMPLES_PER_REASON).alias("at"))
        .explode("at")
        .unnest("at")
        .select("source_file", "source_line")
    )
    by_file, by_partition, samples = pl.collect_all(
        [
            lazy.group_by("source_file").len().sort("source_file"),
            lazy.group_by(pl.col(spec.partition_by).fill_null("")).len().sort(spec.partition_by),
            lazy.join(first.unique(), on=["source_file", "source_line"], how="semi")
            .select("source_file", "source_line", REASONS, record.alias("record"))
            .with_columns(pl.col(REASONS).alias("reason"))
            .explode("reason")
            .sort("source_file", "source_line")
            .group_by("reason", maintain_order=True)
            .head(SAMPLES_PER_REASON)
            .unique(["source_file", "source_line"], keep="first", maintain_order=True),
        ]
    )
    return (
        dict(by_file.iter_rows()),
        dict(by_partition.iter_rows()),
        samples.select("source_file", "source_line", REASONS, "record")
        .rename({REASONS: "reasons"})
        .to_dicts(),
    )


def _reason_counts(frames: list[pl.LazyFrame]) -> Counter[str]:
    """How many rows of ``frames`` have each reason (a row may have several)."""
    if not frames:
        return Counter()
    lazy = pl.concat([frame.select(REASONS) for frame in frames])
    # In Polars: millions of rows at 3x the batch.
    counted = lazy.select(pl.col(REASONS).explode().drop_nulls().value_counts()).unnest(REASONS).collect()
    return Counter(dict(zip(counted.get_column(REASONS).to_list(), counted.get_column("count").to_list())))


def _same_values(texts: pl.DataFrame, wanted: pl.DataFrame, spec: TableSpec, layout: FileLayout) -> bool:
    """Whether ``texts`` parse to exactly the typed values of ``wanted`` (same lines, every column)."""
    if texts.height != wanted.height:
        return False
    checked = validate(texts, spec, layout.missing).sort(SOURCE_LINE)
    expected = wanted.sort(SOURCE_LINE)
    if not checked.get_column(SOURCE_LINE).equals(expected.get_column(SOURCE_LINE)):
        return False
    if checked.get_column(REASONS).list.len().max() not in (0, None):
        return False
    return all(
        checked.get_column(typed(name)).equals(expected.get_column(typed(name)))
        for name in spec.column_names
        if name not in layout.missing
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
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    plan: Plan | None = None,
    gates: GateSettings | None = None,
) -> StepReport:
    """Validate, deduplicate and integrity-check one table's files of a batch, then MERGE them.

    Rejected rows replace whatever this batch rejected before in ``rejected/<table>``, and the MERGE
    changes nothing on a replay, so a step is safe to run again. A table whose files would hold more
    than ``memory_budget`` is resolved bucket by bucket and merged group by group (``plan``, by default
    from the budget; see ``pipeline.stages``), which gives the very same rows. The table's quality gates
    (``gates``, by default the root's ``lakehouse.toml``) are judged before anything is committed.
    """
    started = time.monotonic()
    gates = load_settings(store) if gates is None else gates
    clock = StageClock()
    # Where the tables stood: what this step's commits did is priced in the batch's cost estimate.
    states_before = [delta.table_state(uri) for uri in _step_uris(store, spec.name)]
    remove_stale_downloads()  # every step, staged or not: a killed run's folders go with the next one
    batch_id = manifest.batch_id
    typed_columns = [typed(name) for name in spec.column_names]
    valid_parts: list[pl.DataFrame] = []
    extra_columns: dict[str, list[str]] = {}
    empty_files: list[str] = []
    notes: list[str] = []
    sources: list[tuple[str, Path, FileLayout]] = []
    digests: list[str | None] = []
    stats: dict[int, ReadStats] = {}
    skipped = {entry.key: entry.loaded_by for entry in manifest.files[spec.name] if entry.loaded_by}
    record_less: dict[str, int] = {}
    rows_in = 0

    with ExitStack() as local_copies:
        for entry in manifest.files[spec.name]:
            if entry.loaded_by:
                continue
            key = _locate(store, spec.name, batch_id, entry)
            path = local_copies.enter_context(store.local_path(key, entry.version, entry.size))
            digests.append(_expected_digest(entry))
            layout = read_layout(path, spec, entry.key)
            if layout is None:
                empty_files.append(entry.key)
                layout = FileLayout({}, [], [], 0)
                blank = count_empty_lines(path)
                if blank:
                    record_less[entry.key] = blank
            notes += _layout_notes(entry.key, layout)
            if layout.extra:
                extra_columns[entry.key] = layout.extra
            sources.append((entry.key, path, layout))
        if plan is None:
            plan = _plan(store, spec, sources, memory_budget)

        staging = (
            Staging(Path(local_copies.enter_context(tempfile.TemporaryDirectory(prefix=_staging_prefix()))))
            if plan.staged
            else None
        )
        rejected = _Rejected(staging)
        rows_per_partition: Counter[Any] = Counter()
        referenced_parts: dict[str, list[pl.Series]] = {fk.column: [] for fk in spec.foreign_keys}
        readable = [(index, source) for index, source in enumerate(sources) if source[2].field_count]
        total_bytes = sum(source[1].stat().st_size for _, source in readable)
        progress(
            f"{spec.name}: reading {len(readable)} file(s)"
            + (f" into {plan.buckets} buckets of keys" if staging else ""),
            event="step_started",
            table=spec.name,
            files=len(readable),
            bytes=total_bytes,
        )
        streams = []
        for index, (name, path, layout) in readable:
            stats[index] = ReadStats()
            streams.append(
                read_chunks(path, spec, name, layout, stats=stats[index], expected_digest=digests[index])
            )
        # Chunks of two files interleave; a row's place in the batch is its _order (file, line).
        for stream_index, chunk in prefetched(streams):
            file_index = readable[stream_index][0]
            rows_in += chunk.records.height + chunk.malformed.height
            read_bytes = min(total_bytes, sum(read.bytes_read for read in stats.values()))
            progress(
                f"{spec.name}: reading, {rows_in:,} rows so far",
                event="reading",
                table=spec.name,
                rows=rows_in,
                bytes=read_bytes,
                total_bytes=total_bytes,
            )
            typed_rows = _split_chunk(chunk, spec, sources[file_index][2], file_index, rejected.add)
            if staging is None:
                valid_parts.append(detached(typed_rows))
            else:
                counts = typed_rows.get_column(typed(spec.partition_by)).value_counts()
                rows_per_partition.update(dict(counts.iter_rows()))
                for fk in spec.foreign_keys:
                    referenced_parts[fk.column] = _compacted(
                        [*referenced_parts[fk.column], typed_rows.get_column(typed(fk.column)).unique()]
                    )
                staging.put_split("parsed", typed_rows.with_columns(bucket_of(spec, plan.buckets)), BUCKET)
        empty_lines = {
            **record_less,
            **{sources[index][0]: read.empty_lines for index, read in stats.items() if read.empty_lines},
        }
        notes += [note for read in stats.values() for note in read.notes]

        clock.mark("read")
        progress(
            f"{spec.name}: deduplicating and checking references",
            event="resolving",
            table=spec.name,
            rows=rows_in,
        )
        valid = pl.concat(valid_parts, rechunk=False) if valid_parts else pl.DataFrame()
        del valid_parts
        moved_from: list[Any] = []
        if staging is not None:
            # The references are looked up once for the whole batch, not once per bucket.
            known = _known_references(
                store,
                spec,
                {column: _compacted(parts, force=True)[0] for column, parts in referenced_parts.items()},
            )
            kept, to_merge, late_rows, late_reasons, moved_from = _resolve_staged(
                store, spec, staging, plan, rows_per_partition, known, progress
            )
            late_files = staging.parts(LATE)
            late_of: Callable[[int], pl.DataFrame] = partial(_take_late, staging)
            rows, keep = pl.DataFrame(), pl.Series("keep", [], pl.Boolean)
            stored_partitions: list[Any] = []
            stored_version, none_stored = None, False
        elif valid.height:
            # Lazily and together: Polars then hashes the columns in parallel (measured on the 33 M
            # order items: 0.5 s instead of 1.1 s for eager uniques one after the other).
            uniques = pl.collect_all(
                [valid.lazy().select(pl.col(typed(fk.column)).unique()) for fk in spec.foreign_keys]
            )
            referenced = {fk.column: found.to_series() for fk, found in zip(spec.foreign_keys, uniques)}
            known = _known_references(store, spec, referenced)
            # Read first: the rows are appended without a MERGE only while the table is still there.
            stored_version = delta.table_version(table_uri(store, spec.name))
            theirs = _stored_alongside(store, spec, valid, stored_version)
            keep, late = survivor_mask(valid, spec, known, _stored_order(theirs))
            late_rows, late_by_file = late.height, _late_by_file(late, typed_columns)
            late_reasons = _reason_counts([late.lazy()])
            late_files, late_of = sorted(late_by_file), late_by_file.pop
            del late
            kept = int(keep.sum())
            keep = keep & ~_unchanged(valid, theirs, spec)  # kept, but nothing to merge
            to_merge = int(keep.sum())
            # Where the keys to merge are stored now: the MERGE rewrites those partitions too.
            stored_partitions = (
                []
                if theirs is None
                else _as_stored(theirs.get_column(STORED_PART).filter(keep).drop_nulls().unique(), spec)
            )
            # A stored row's digest is never null, whatever its values: null means no stored key.
            none_stored = theirs is None or to_merge == (
                theirs.get_column(DIGESTS[0]).filter(keep).null_count()
            )
            del theirs
            # The survivors are not copied out: the merge filters them slice by slice with ``keep``.
            rows = valid.select(pl.col(typed(name)).alias(name) for name in spec.column_names)
            del valid
        else:
            rows, keep, kept, to_merge = pl.DataFrame(), pl.Series("keep", [], pl.Boolean), 0, 0
            late_rows, late_files, late_of, stored_partitions = 0, [], _no_late, []
            late_reasons = Counter()
            stored_version, none_stored = None, False

        clock.mark("resolve")
        rejected_rows = rejected.rows + late_rows
        if kept + rejected_rows != rows_in:
            raise LakehouseError(
                f"{spec.name}: {rows_in} rows read but {kept} kept and {rejected_rows} rejected; "
                "refusing to write"
            )
        # Before any commit: a crossed fail gate leaves the table as it was and the files in raw/.
        gate_results = judge(
            gates, spec.name, batch_id, rows_in, rejected_rows, rejected.reasons() + late_reasons
        )

        # The MERGE runs while the late rejects' text is cut out and the rejected rows are written:
        # delta-rs leaves a core idle most of the time and those steps hold the GIL part of theirs.
        # The two commits are independent, each safe to repeat, so their order does not matter.
        contract = _ContractClock()
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="merge") as merger:
            progress(
                f"{spec.name}: merging {to_merge:,} rows"
                + (f" in {plan.groups} groups" if staging else "")
                + (f"; {kept - to_merge:,} are stored as they are" if kept > to_merge else ""),
                event="merging",
                table=spec.name,
                rows=to_merge,
            )
            if not to_merge:
                merging = None
            elif staging is not None:
                merging = merger.submit(
                    _merge_staged, store, spec, staging, plan, moved_from, batch_id, contract
                )
            else:
                merging = merger.submit(
                    _checked_merge,
                    contract,
                    table_uri(store, spec.name),
                    rows,
                    spec,
                    keep=keep,
                    stored_partitions=stored_partitions,
                    none_stored_at=stored_version if none_stored else None,
                    batch_id=batch_id,
                )
            if late_rows:
                progress(
                    f"{spec.name}: taking the original text of {late_rows:,} rows rejected late",
                    event="late_rejects",
                    table=spec.name,
                    rows=late_rows,
                )
                for texts in _original_text(late_files, late_of, sources, spec, digests):
                    rejected.add(texts)
            if rejected.rows != rejected_rows:
                raise LakehouseError(
                    f"{spec.name}: {rejected_rows} rows rejected but {rejected.rows} have their text; "
                    "refusing to write"
                )
            rejected_version, reasons = _write_rejected(
                store, spec, batch_id, rejected, now or datetime.now(timezone.utc), progress
            )
            by_file, by_partition, samples = _rejected_summary(rejected, spec)
            merged = merging.result() if merging else None
        clock.mark("write")
    inserted = merged.inserted if merged else 0
    updated = merged.updated if merged else 0
    table_changes, rejected_changes = (
        delta.changes_since(uri, state) for uri, state in zip(_step_uris(store, spec.name), states_before)
    )
    changes = (table_changes, rejected_changes)
    return StepReport(
        table=spec.name,
        files=len(manifest.files[spec.name]),
        rows_in=rows_in,
        inserted=inserted,
        updated=updated,
        unchanged=kept - inserted - updated,
        rejected=rejected_rows,
        rejected_by_reason=dict(sorted(reasons.items())),
        delta_version=merged.version if merged else table_changes.version,
        rejected_version=rejected_version,
        seconds=round(time.monotonic() - started, 3),
        extra_columns=extra_columns,
        empty_files=empty_files,
        empty_lines=empty_lines,
        notes=notes,
        skipped_files=skipped,
        buckets=plan.buckets,
        groups=plan.groups,
        stages=clock.figures,
        commits=sum(change.commits for change in changes),
        files_added=sum(change.files_added for change in changes),
        files_read=sum(change.files_removed for change in changes),
        schemas=_schemas(spec.name, table_changes, rejected_changes),
        contract_seconds=round(contract.seconds, 3),
        gates=[result.to_dict() for result in gate_results],
        rejected_by_file=by_file,
        rejected_by_partition=by_partition,
        rejected_samples=samples,
    )


def _step_uris(store: Store, table: str) -> tuple[str, str]:
    """The Delta tables a step of ``table`` commits to: the table and its rejected rows."""
    return table_uri(store, table), rejected_uri(store, table)


def _schemas(table: str, changes: delta.TableChanges, rejected: delta.TableChanges) -> dict[str, str]:
    """The catalog names of ``table`` and its rejected table, where they exist, with their schema digests."""
    digests = {
        catalog_name(table): changes.schema_digest,
        catalog_name(table, rejected=True): rejected.schema_digest,
    }
    return {name: digest for name, digest in digests.items() if digest is not None}


def _plan(
    store: Store, spec: TableSpec, sources: list[tuple[str, Path, FileLayout]], memory_budget: int
) -> Plan:
    """The plan for the files of this step (``plan_for``), with the rows the lakehouse stores now."""
    readable = [path for _, path, layout in sources if layout.field_count]
    csv_bytes = sum(path.stat().st_size for path in readable)
    csv_rows = sum(estimated_records(path) for path in readable)
    at_most = plan_for(csv_bytes, memory_budget, csv_rows=csv_rows, stored_rows=csv_rows)
    if at_most == plan_for(csv_bytes, memory_budget):
        return at_most  # the stored rows cannot change it (a daily batch): the log is not read
    stored = delta.stored_row_count(table_uri(store, spec.name))
    # A table without row counts in its log is taken to hold a stored row for every row of the batch.
    return plan_for(
        csv_bytes, memory_budget, csv_rows=csv_rows, stored_rows=csv_rows if stored is None else stored
    )


def _layout_notes(source: str, layout: FileLayout) -> list[str]:
    """What a user should know about a file's header: columns matched by case, extra columns."""
    notes = [f"{source}: column {name!r} read as {column}" for name, column in layout.matched_by_case.items()]
    if layout.extra_count:
        shown = ", ".join(repr(name) for name in layout.extra)
        more = layout.extra_count - len(layout.extra)
        notes.append(
            f"{source}: {layout.extra_count:,} extra column(s) ignored: {shown}"
            + (f" and {more:,} more" if more else "")
        )
    return notes


STORED_PART, STORED_ORDER = "stored_partition__", "stored_order__"


def _stored_alongside(
    store: Store, spec: TableSpec, valid: pl.DataFrame, version: int | None = None
) -> pl.DataFrame | None:
    """For each valid row, in order: the partition and ordering value (both typed) and the row digests of
    the row the lakehouse stores under its key as of ``version`` (None: now; nulls where none is; None:
    nothing is stored)."""
    as_typed = {
        c.name: (pl.col(c.name).str.to_date("%Y-%m-%d") if c.type == "date" else pl.col(c.name)).alias(
            typed(c.name)
        )
        for c in spec.columns
    }
    derived = [
        as_typed[spec.partition_by].alias(STORED_PART),  # typed: a date is 4 bytes, its text 16
        *([pl.col(spec.order_by).cast(TIMESTAMP).alias(STORED_ORDER)] if spec.order_by else []),
        *row_digests(list(as_typed.values())),
    ]
    key = typed(spec.primary_key)
    stored = delta.stored_rows(
        table_uri(store, spec.name), spec, valid.get_column(key), [], derived, version=version
    )
    if not stored.height:
        return None
    # One join serves the stale check, the unchanged rows and the moving keys.
    return alongside(valid, key, stored, spec.primary_key)


def _as_stored(partitions: pl.Series, spec: TableSpec) -> list[Any]:
    """Typed partition values as the lakehouse stores them (a date as its text)."""
    return partitions.cast(polars_type(spec.column(spec.partition_by))).to_list()


def _stored_order(theirs: pl.DataFrame | None) -> pl.Series | None:
    return theirs.get_column(STORED_ORDER) if theirs is not None and STORED_ORDER in theirs.columns else None


def _unchanged(valid: pl.DataFrame, theirs: pl.DataFrame | None, spec: TableSpec) -> pl.Series:
    """Which ``valid`` rows equal, in every column, the row the lakehouse stores under their key.

    They need no MERGE: a re-export or a replay of what is loaded then writes nothing at all. Rows are
    compared by two 64-bit digests of all their typed columns (hashdiff), so the stored side is read as
    key and digests only; two different rows agree on both with odds of about 2^-128.
    """
    if theirs is None:
        return pl.Series("unchanged", [False] * valid.height, pl.Boolean)
    # Streaming: the struct each digest hashes is built a morsel at a time, not for every row at once
    # (a copy of every column: 1.6 GiB more on 17 M order items).
    digests = row_digests([pl.col(typed(name)) for name in spec.column_names])
    mine = valid.lazy().select(digests).collect(engine="streaming")
    return (
        pl.concat([mine, theirs.select(pl.col(list(DIGESTS)).name.suffix("_stored"))], how="horizontal")
        .select(
            pl.all_horizontal(pl.col(name) == pl.col(f"{name}_stored") for name in DIGESTS)
            .fill_null(False)
            .alias("unchanged")
        )
        .to_series()
    )


def _moves(valid: pl.DataFrame, theirs: pl.DataFrame | None, spec: TableSpec) -> pl.Series:
    """Which ``valid`` rows' keys the lakehouse stores in another partition now."""
    if theirs is None or theirs.schema[STORED_PART] == pl.Null:
        return pl.Series("moves", [False] * valid.height, pl.Boolean)
    return (valid.get_column(typed(spec.partition_by)) != theirs.get_column(STORED_PART)).fill_null(False)


def _staging_prefix() -> str:
    # The downloads' prefix and pid: a killed run's staged files are swept like its downloads.
    return f"{DOWNLOAD_PREFIX}{os.getpid()}-staging-"


def _resolve_staged(
    store: Store,
    spec: TableSpec,
    staging: Staging,
    plan: Plan,
    rows_per_partition: Counter[Any],
    known: dict[str, pl.Series],
    progress: Progress,
) -> tuple[int, int, int, Counter[str], list[Any]]:
    """Resolve the staged valid rows bucket by bucket (``resolve_bucket``). Returns the survivors'
    count, how many of them are to be merged, how many were rejected late and for which reasons, and
    the partitions the moving keys leave."""
    groups = partition_groups(rows_per_partition, plan.groups)
    kept, to_merge, late_rows, late_reasons, moved_from = 0, 0, 0, Counter[str](), set()
    for bucket in range(plan.buckets):
        valid = staging.take("parsed", bucket)
        if valid is None:
            continue
        progress(
            f"{spec.name}: resolving bucket {bucket + 1} of {plan.buckets} ({valid.height:,} rows)",
            event="resolving",
            table=spec.name,
            rows=valid.height,
            bucket=bucket + 1,
            buckets=plan.buckets,
        )
        resolved = resolve_bucket(store, spec, valid, known, groups, staging, bucket=bucket)
        del valid  # before the next bucket is read
        kept += resolved.survivors
        to_merge += resolved.to_merge
        late_rows += resolved.late_rows
        late_reasons += resolved.late_reasons
        moved_from |= set(resolved.moved_from)
    return kept, to_merge, late_rows, late_reasons, sorted(moved_from)


class StagedParts(Protocol):
    """Where a stage puts frames by kind and part: a local ``Staging`` or a batch's objects in the store
    (``pipeline.distributed``)."""

    def put(self, kind: str, part: int, frame: pl.DataFrame) -> None: ...

    def put_split(self, kind: str, frame: pl.DataFrame, part_column: str) -> None: ...


@dataclass(frozen=True)
class ResolvedBucket:
    """What resolving one bucket found: survivors, of which ``to_merge`` are to be merged, rows rejected
    late (with their reasons), and the partitions the moving keys leave."""

    survivors: int
    to_merge: int
    late_rows: int
    late_reasons: Counter[str]
    moved_from: list[Any]


def resolve_bucket(
    store: Store,
    spec: TableSpec,
    valid: pl.DataFrame,
    known: dict[str, pl.Series],
    groups: dict[Any, int],
    staged: StagedParts,
    *,
    bucket: int,
) -> ResolvedBucket:
    """Resolve one bucket's valid rows (typed, with ``_order``); put the survivors by group of partitions.

    Survivors whose key the lakehouse stores in another partition are put apart (``moves``): they are
    merged last, with both partitions in the predicate. Survivors stored as they are already are not
    put at all. The rows rejected late are put by file (``LATE``, typed, with ``_order`` and reasons).
    ``known`` holds, per foreign key, the referenced values that exist (at least all of this bucket's).
    """
    typed_columns = [typed(name) for name in spec.column_names]
    theirs = _stored_alongside(store, spec, valid)
    keep, late = survivor_mask(valid, spec, known, _stored_order(theirs))
    # Put by file: their text is recovered file by file once every bucket is resolved.
    late = late.select(*typed_columns, ORDER, REASONS, _file_of_order())
    staged.put_split(LATE, late, FILE)
    late_rows, late_reasons = late.height, _reason_counts([late.lazy()]) if late.height else Counter()
    del late
    survivors = int(keep.sum())
    unchanged = keep & _unchanged(valid, theirs, spec)
    staged_rows = int(unchanged.sum())  # kept as they are: nothing to merge
    keep = keep & ~unchanged
    to_merge = survivors - staged_rows
    moves = keep & _moves(valid, theirs, spec)
    moved_from: list[Any] = []
    if moves.any():
        assert theirs is not None
        staged.put("moves", 0, valid.filter(moves).select(typed_columns))
        staged_rows += int(moves.sum())
        moved_from = _as_stored(theirs.get_column(STORED_PART).filter(moves).unique(), spec)
        keep = keep & ~moves
    del theirs, unchanged, moves
    # Each group's survivors are cut straight from the bucket: one copy of each row, not two.
    group = valid.select(
        pl.col(typed(spec.partition_by))
        .replace_strict(list(groups), list(groups.values()), default=0, return_dtype=pl.Int32)
        .fill_null(0)  # a null partition (a spec may allow one) merges with the first group
    ).to_series()
    for number in sorted(set(groups.values())):
        piece = valid.filter(keep & (group == number)).select(typed_columns)
        staged_rows += piece.height
        staged.put("resolved", number, piece)
        del piece
    if staged_rows != survivors:
        raise LakehouseError(
            f"{spec.name}: bucket {bucket + 1} has {survivors} surviving rows but {staged_rows} were staged "
            "or unchanged; refusing to write"
        )
    return ResolvedBucket(survivors, to_merge, late_rows, late_reasons, sorted(moved_from, key=str))


LATE = "late"


def _take_late(staging: Staging, file_index: int) -> pl.DataFrame:
    late = staging.take(LATE, file_index)
    assert late is not None, f"no late rejects staged for file {file_index}"
    return late


def _late_by_file(late: pl.DataFrame, typed_columns: list[str]) -> dict[int, pl.DataFrame]:
    shaped = late.select(*typed_columns, ORDER, REASONS, _file_of_order())
    return {
        int(file): part
        for (file,), part in shaped.partition_by(FILE, as_dict=True, include_key=False).items()
    }


def _no_late(file_index: int) -> pl.DataFrame:
    raise AssertionError(f"no rows were rejected late (file {file_index})")


def _compacted(parts: list[pl.Series], *, force: bool = False) -> list[pl.Series]:
    """``parts`` of distinct values, made one once they are many (bounded by the distinct values)."""
    if not force and len(parts) < 16:
        return parts
    if not parts:
        return [pl.Series([], dtype=pl.Int32)]
    return [pl.concat(parts).unique()]


class _ContractClock:
    """Checks rows against the table's contract (``pipeline.contract``) and adds up the seconds it took."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def check(self, rows: pl.DataFrame, spec: TableSpec, *, keep: pl.Series | None, where: str) -> None:
        started = time.monotonic()
        check_rows(rows, spec, keep=keep, where=where)
        self.seconds += time.monotonic() - started


def _checked_merge(
    contract: _ContractClock, uri: str, rows: pl.DataFrame, spec: TableSpec, **merge: Any
) -> delta.MergeResult:
    """MERGE ``rows`` once they are checked against the contract (both in the merge's thread: the check
    overlaps the late rejects' text recovery on the step's)."""
    contract.check(rows, spec, keep=merge.get("keep"), where="the merge")
    return delta.merge_rows(uri, rows, spec, **merge)


def _merge_staged(
    store: Store,
    spec: TableSpec,
    staging: Staging,
    plan: Plan,
    moved_from: list[Any],
    batch_id: str,
    contract: _ContractClock,
) -> delta.MergeResult:
    """MERGE the staged survivors group by group, then the moving keys, each checked against the contract
    first; the sums of what they did."""
    uri = table_uri(store, spec.name)
    names = {typed(name): name for name in spec.column_names}
    inserted = updated = 0
    version = None
    for part, stored_partitions in [*((group, []) for group in range(plan.groups)), (None, moved_from)]:
        rows = staging.take("resolved", part) if part is not None else staging.take("moves", 0)
        if rows is None:
            continue
        rows = rows.rename(names)
        contract.check(rows, spec, keep=None, where="the moving keys" if part is None else f"group {part}")
        # The group's own partitions are its predicate; the moving keys' also name where they leave.
        merged = delta.merge_rows(uri, rows, spec, stored_partitions=stored_partitions, batch_id=batch_id)
        del rows
        inserted, updated, version = inserted + merged.inserted, updated + merged.updated, merged.version
    return delta.MergeResult(inserted, updated, version)


def _write_rejected(
    store: Store,
    spec: TableSpec,
    batch_id: str,
    rejected: _Rejected,
    rejected_at: datetime,
    progress: Progress,
) -> tuple[int | None, Counter[str]]:
    """Replace this batch's rows of ``rejected/<table>`` with ``rejected``'s: the table version and
    the reasons. The rows are written as a stream of their parts, never concatenated."""
    if not rejected.rows:
        return delta.table_version(rejected_uri(store, spec.name)), Counter()
    reasons = rejected.reasons()
    progress(
        f"{spec.name}: writing {rejected.rows:,} rejected rows",
        event="rejected",
        table=spec.name,
        rows=rejected.rows,
    )
    batch = (pl.lit(batch_id).alias("batch_id"), pl.lit(rejected_at).cast(TIMESTAMP).alias("rejected_at"))
    version = delta.replace_batch_rows(
        rejected_uri(store, spec.name),
        lambda: (frame.with_columns(*batch) for frame in rejected.frames()),
        batch_column="batch_id",
        batch_id=batch_id,
    )
    return version, reasons


def check_tables(store: Store) -> dict[str, int]:
    """Row counts of the lakehouse tables; fails when any is empty (the seed's Athena check).

    Counted from the log's statistics where every file has them (10 ms, not the 70-100 ms of reading
    every file's footer at scale 1.0), else from the files.
    """
    counts = {}
    for table in TABLES:
        uri = table_uri(store, table)
        stored = delta.stored_row_count(uri)
        counts[table] = delta.count_rows(uri) if stored is None else stored
    empty = [table for table, count in counts.items() if count == 0]
    if empty:
        raise CheckFailedError(f"check failed: table {', '.join(empty)} has no rows after the batch")
    return counts


def maintain_tables(
    store: Store, *, retention_hours: int = 168, progress: Progress = _quiet
) -> dict[str, delta.MaintenanceResult]:
    """Compact, vacuum and checkpoint every lakehouse and rejected table of ``store``, holding the
    root's batch lock (``BatchLockedError`` while a batch runs): an OPTIMIZE beside a batch's commit of
    files written earlier can keep both the compacted rows and the new ones, doubling rows."""
    tables = [
        (name, uri)
        for table in TABLES
        for name, uri in ((table, table_uri(store, table)), (f"rejected/{table}", rejected_uri(store, table)))
        if delta.table_version(uri) is not None
    ]
    results: dict[str, delta.MaintenanceResult] = {}
    if not tables:  # no lock written into a folder that holds no lakehouse
        return results
    with batch_lock(store, "maintain", notify=progress) as lock:
        for name, uri in tables:
            _still_held(lock)
            progress(f"maintaining {name}")
            result = delta.maintain_table(uri, retention_hours=retention_hours)
            if result is not None:
                results[name] = result
    return results


def run_batch(
    store: Store,
    *,
    progress: Progress = _quiet,
    now: datetime | None = None,
    force: bool = False,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    plan: Plan | None = None,
    gates: GateSettings | None = None,
    accept_gates: bool = False,
    workers: int | None = None,
) -> BatchReport:
    """Process one batch: resume the unfinished one if there is one, else snapshot ``raw/``.

    Any failure raises with the step named; raw files stay in ``raw/`` until every step has
    committed, and running again resumes the same batch. Files whose content a succeeded batch
    loaded already are skipped (and archived) unless ``force``. ``memory_budget``, ``plan`` and ``gates``
    (by default the root's ``lakehouse.toml``; ``accept_gates`` lands the batch whatever they say) are
    passed to each step (``run_step``). With ``workers``, each step runs as the distributed path's stages
    instead (``pipeline.distributed``): their units in ``workers`` processes of their own, or in this
    one for 0.
    """
    started_at = now or datetime.now(timezone.utc)
    started = time.monotonic()
    batch_id = new_batch_id(started_at)
    notes: list[str] = []

    def note(message: str) -> None:
        notes.append(message)
        progress(message)

    if not unfinished_manifests(store):
        raw_files(store)  # nothing to load writes nothing: no lock in a folder that is no lakehouse
    gates = load_settings(store) if gates is None else gates
    if accept_gates:
        gates = replace(gates, accept=True)
    with batch_lock(store, batch_id, notify=note) as lock:
        pending = unfinished_manifests(store)
        if pending:
            manifest = pending[0]
            progress(
                f"resuming unfinished batch {manifest.batch_id}",
                event="batch_resumed",
                batch=manifest.batch_id,
            )
        else:
            manifest = _guard("snapshot", lambda: snapshot(store, batch_id, started_at, force=force))
            store.write_bytes(manifest.key, manifest.to_json(), if_absent=True)
            files = sum(len(f) for f in manifest.files.values())
            progress(
                f"batch {manifest.batch_id}: {files} files",
                event="batch_started",
                batch=manifest.batch_id,
                files=files,
            )

        steps = []
        for spec in TABLES.values():
            report = load_step_report(store, manifest.batch_id, spec.name)
            if report is None:
                _still_held(lock)
                step: Callable[[], StepReport] = partial(
                    run_step,
                    store,
                    manifest,
                    spec,
                    progress=progress,
                    memory_budget=memory_budget,
                    plan=plan,
                    gates=gates,
                )
                if workers is not None:
                    from pipeline import distributed  # it builds on this module

                    runner = (
                        distributed.in_processes(store.root, workers)
                        if workers
                        else distributed.in_process(store)
                    )
                    step = partial(
                        distributed.run_staged_step,
                        store,
                        manifest,
                        spec,
                        runner,
                        progress=progress,
                        memory_budget=memory_budget,
                        plan=plan,
                        gates=gates,
                    )
                report = _guard(spec.name, step)
                save_step_report(store, manifest.batch_id, report)
                progress(
                    f"{spec.name}: {report.rows_in:,} rows in, {report.inserted + report.updated:,} written, "
                    f"{report.rejected:,} rejected in {report.seconds:.1f} s",
                    event="step_finished",
                    table=spec.name,
                    rows=report.rows_in,
                    written=report.inserted + report.updated,
                    rejected=report.rejected,
                    seconds=report.seconds,
                )
            steps.append(report)
        _still_held(lock)
        # Checks before the archive: a batch that fails them keeps its files in raw/.
        counts = _guard("checks", lambda: check_tables(store))
        archived = _guard("archive", lambda: archive_batch(store, manifest, progress=progress))
        finished_at = datetime.now(timezone.utc)
        _guard("load history", lambda: record_loaded(store, manifest, finished_at))
        batch_report = BatchReport(
            batch_id=manifest.batch_id,
            status="succeeded",
            started_at=started_at.isoformat(),
            finished_at=finished_at.isoformat(),
            seconds=round(time.monotonic() - started, 3),
            steps=steps,
            archived_files=archived,
            table_counts=counts,
            notes=notes,
            cost=local_estimate(
                steps, [entry.size for entries in manifest.files.values() for entry in entries], len(counts)
            ).to_dict(),
        )
        # The page before the JSON report: that one is the batch's last write, which finishes it, so a run
        # killed in between resumes and writes both.
        try:
            write_batch_report(store, manifest.batch_id, report=batch_report)
        except Exception as error:  # the tables have landed: a page that could not be drawn is only a note
            note(f"the HTML report of batch {manifest.batch_id} could not be written: {error}")
        store.write_bytes(report_key(manifest.batch_id), batch_report.to_json())
        return batch_report


@dataclass(frozen=True)
class Abandoned:
    """What ``abandon_batch`` removed."""

    batch_id: str
    rejected_rows: dict[str, int]
    step_reports: int
    history_notes: int
    raw_files: int
    restored: list[str]


def abandon_batch(store: Store, batch_id: str) -> Abandoned:
    """Give up an unfinished batch: remove its rejected rows, step reports, load notes and manifest.

    Its files stay in ``raw/`` for the next batch; those a partial archive moved come back there
    (beside a newer upload of the same name, if there is one), so that no row is left out of every
    place. Rows that its finished steps merged stay in the tables: they are valid rows, and a next
    batch with the same files finds them unchanged. The manifest goes last, so an abandon that fails
    part way can be run again.
    """
    with batch_lock(store, f"abandon {batch_id}"):
        manifest = read_manifest(store, batch_id)
        if load_report(store, manifest.batch_id) is not None:
            raise UsageError(
                f"batch {manifest.batch_id} succeeded; only an unfinished batch can be abandoned"
            )
        removed = {
            table: delta.delete_batch_rows(
                rejected_uri(store, table), batch_column="batch_id", batch_id=manifest.batch_id
            )
            for table in TABLES
        }
        reports = 0
        for table in TABLES:
            key = step_report_key(manifest.batch_id, table)
            if store.stat(key) is not None:
                store.delete(key)
                reports += 1
        notes = forget_loaded(store, manifest)
        from pipeline.distributed import clear_batch  # it builds on this module

        clear_batch(store, manifest.batch_id)
        restored = restore_batch(store, manifest)
        store.delete(manifest.key)
        raw = sum(1 for entries in manifest.files.values() for entry in entries if store.stat(entry.key))
        return Abandoned(manifest.batch_id, removed, reports, notes, raw, restored)


def _still_held(lock: Lock) -> None:
    if lock.lost.is_set():
        raise BatchLockedError(
            f"this run lost the lock of {lock.store.root} (its lease ran out and another run took it over); "
            "stopping before the next step"
        )


def _guard(step: str, action: Callable[[], T]) -> T:
    try:
        return action()
    except StepError:
        raise
    except Exception as error:
        if step == "snapshot" and isinstance(error, LakehouseError):
            raise
        raise StepError(step, error) from error
