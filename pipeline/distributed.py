"""A table's step as separate stages whose units run anywhere: Distributed Map children, local processes.

The same functions as the single-task step (``pipeline.batch``), cut where a unit's input and output fit in
objects of the store:

    plan parse ─▶ parse (one unit per file) ─▶ plan resolve ─▶ resolve (one per bucket of keys)
    ─▶ plan write (the gates) ─▶ write (one per group of partitions) ─▶ moves ─▶ late (one per file)
    ─▶ finish (the rejected rows' commit and the step report)

A plan writes one small JSON item per unit under ``plan/<batch>/<table>/<stage>/`` (what a Distributed
Map lists), naming where the unit's input is: byte ranges of the objects the units before wrote. A unit
reads those ranges, writes its output under ``staging/<batch>/<table>/`` as a few objects (every part of
its output, each bucket or group or file, one range of them) and its report last, with where each part
is; a unit with a report is done and a resumed batch skips it. A unit run again after a crash writes the
same objects under the same names (same file, same blocks), and its MERGE changes nothing twice.
Groups of partitions are disjoint, so their MERGEs commit side by side. Every plan and the finish run in
one process and check that the stage before is complete; the finish removes the plan and staged objects.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tempfile
import time
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from itertools import count
from pathlib import Path
from typing import Any, Callable

import polars as pl

from pipeline import delta
from pipeline.batch import (
    LATE,
    _ContractClock,
    _expected_digest,
    _known_references,
    _late_text,
    _layout_notes,
    _locate,
    _reason_counts,
    _Rejected,
    _rejected_summary,
    _schemas,
    _split_chunk,
    _step_uris,
    _write_rejected,
    resolve_bucket,
    table_uri,
)
from pipeline.costs import billed_task_seconds
from pipeline.dedup import typed
from pipeline.errors import LakehouseError, UsageError
from pipeline.gates import GateSettings, judge, load_settings
from pipeline.manifest import Manifest, ManifestFile, read_manifest
from pipeline.progress import Progress
from pipeline.progress import quiet as _quiet
from pipeline.reader import ReadStats, count_empty_lines, read_chunks, read_layout
from pipeline.report import StepReport, load_step_report, save_step_report
from pipeline.specs import TableSpec, get_spec
from pipeline.stages import (
    BUCKET,
    DEFAULT_MEMORY_BUDGET,
    GIB,
    Plan,
    Staging,
    bucket_of,
    partition_groups,
    plan_for,
)
from pipeline.stages import peak_rss as process_peak_rss
from pipeline.storage import Store, open_store
from pipeline.validate import polars_type
from pipeline.workitems import (
    PLAN,
    PLANNED,
    STAGES,
    STAGING,
    plan_prefix,
    planned_key,
    staging_prefix,
    unit_report_key,
)

# The smallest row a CSV of these tables can hold (an order item with one-digit values): the batch's
# rows at most, to size the buckets by the stored rows they may meet without reading the files.
MIN_ROW_BYTES = 20


def _state_key(batch_id: str, table: str) -> str:
    return f"{staging_prefix(batch_id, table)}/plan.json"


# A unit keeps the frames it puts in memory up to this size, then writes them as one object: a unit puts
# a frame per block it reads and per part (bucket, group, file), and an object for each would be millions
# of requests for a terabyte (32 MiB blocks x a thousand buckets), which cost more than the compute.
FLUSH_BYTES = 256 << 20
# Ranges a unit reads at once, and what they may hold before it takes them (S3 answers a GET in tens of
# milliseconds; a range larger than this is read alone).
READ_THREADS = 16
READ_AHEAD_BYTES = 64 << 20

Ranges = list[list[Any]]
"""Where a part's frames are: ``[key, start, length]`` per object that holds some, each range one IPC file."""

# A unit's index: where each part of each kind is in the objects it wrote (numbered), and its rows.
INDEX_SCHEMA = {
    "kind": pl.String,
    "number": pl.Int32,
    "part": pl.Int32,
    "start": pl.Int64,
    "length": pl.Int64,
    "rows": pl.Int64,
}


class StoreParts:
    """Frames put by kind and part (``StagedParts``), kept in memory and written as few objects under
    ``prefix``: each holds, for every part, its frames as one Arrow IPC file, the parts back to back.

    ``index`` tells where each part is in each object written (a unit writes it beside its report; the
    plan of the stage after hands each unit its ranges). Objects are named after the unit and numbered:
    a unit run again writes the same objects, and one that died part way leaves objects no index names.
    """

    SUFFIX = ".arrow"

    def __init__(self, store: Store, prefix: str, unit: str = "") -> None:
        self.store, self.prefix, self.unit = store, prefix, unit
        self.objects = 0  # objects written
        self.reads = 0  # ranges and indexes read
        self._spans: list[tuple[str, int, int, int, int, int]] = []
        self._held: dict[str, dict[int, list[pl.DataFrame]]] = {}
        self._held_bytes = 0
        self._numbers = count()

    def put(self, kind: str, part: int, frame: pl.DataFrame) -> None:
        if not frame.height:
            return
        self._held.setdefault(kind, {}).setdefault(part, []).append(frame)
        self._held_bytes += int(frame.estimated_size())
        if self._held_bytes >= FLUSH_BYTES:
            self.flush()

    def put_split(self, kind: str, frame: pl.DataFrame, part_column: str) -> None:
        for (part,), piece in frame.partition_by(part_column, as_dict=True, include_key=False).items():
            self.put(kind, int(part), piece)

    def flush(self) -> None:
        """Write what is held: one object per kind."""
        for kind, parts in self._held.items():
            number, body = next(self._numbers), io.BytesIO()
            for part in sorted(parts):
                start = body.tell()
                frame = pl.concat(parts[part], how="vertical_relaxed", rechunk=False)
                parts[part].clear()
                # lz4: staged objects cross the network on AWS; compressing them costs less than sending.
                frame.write_ipc(body, compression="lz4")
                self._spans.append((kind, number, part, start, body.tell() - start, frame.height))
                del frame
            self.store.write_bytes(f"{self.prefix}/{object_key(kind, self.unit, number)}", body.getvalue())
            self.objects += 1
        self._held.clear()
        self._held_bytes = 0

    def index(self) -> pl.DataFrame:
        """Where each part is in the objects written (``INDEX_SCHEMA``)."""
        return pl.DataFrame(self._spans, schema=INDEX_SCHEMA, orient="row")

    def read(self, key: str, start: int, length: int) -> pl.DataFrame:
        return pl.read_ipc(io.BytesIO(self.store.read_range(f"{self.prefix}/{key}", start, length)))

    def frames(self, ranges: Ranges) -> Iterator[pl.DataFrame]:
        """The frames at ``ranges``, in their order, read a few at a time."""
        with ThreadPoolExecutor(max_workers=READ_THREADS) as pool:
            window: deque[tuple[Future[pl.DataFrame], int]] = deque()
            held = 0
            for key, start, length in ranges:
                while window and (len(window) == READ_THREADS or held + length > READ_AHEAD_BYTES):
                    future, size = window.popleft()
                    held -= size
                    yield future.result()
                window.append((pool.submit(self.read, key, start, length), length))
                held += length
                self.reads += 1
            while window:
                yield window.popleft()[0].result()

    def take(self, ranges: Ranges) -> pl.DataFrame | None:
        """The frames at ``ranges`` as one frame (None: there are none)."""
        frames = list(self.frames(ranges))
        return pl.concat(frames, how="vertical_relaxed", rechunk=False) if frames else None

    def indexes(self, state: StepState, stage: str, units: Iterable[int]) -> pl.DataFrame:
        """The indexes of ``stage``'s ``units`` as one frame, each span with its ``unit``."""
        frames = [
            pl.read_ipc(
                io.BytesIO(self.store.read_bytes(index_key(state.batch_id, state.table, stage, unit)))
            ).with_columns(pl.lit(unit, dtype=pl.Int32).alias("unit"))
            for unit in units
        ]
        self.reads += len(frames)
        return pl.concat(frames) if frames else pl.DataFrame(schema={**INDEX_SCHEMA, "unit": pl.Int32})


def object_key(kind: str, unit: str, number: int) -> str:
    """The key (under a step's staging prefix) of the ``number``th object of ``kind`` a unit wrote."""
    return f"{kind}/{unit}-{number:06d}{StoreParts.SUFFIX}"


def index_key(batch_id: str, table: str, stage: str, unit: int) -> str:
    return unit_report_key(batch_id, table, stage, unit).removesuffix(".json") + ".index.arrow"


def ranges(spans: pl.DataFrame, kind: str, stage: str) -> Ranges:
    """The ranges of ``spans`` (rows of ``kind`` of ``stage``'s indexes, each with its ``unit``)."""
    return [
        [object_key(kind, f"{stage}-{unit:05d}", number), start, length]
        for unit, number, start, length in spans.select("unit", "number", "start", "length").iter_rows()
    ]


def by_part(spans: pl.DataFrame, kind: str) -> dict[int, pl.DataFrame]:
    """The spans of ``kind`` by part."""
    chosen = spans.filter(pl.col("kind") == kind)
    return {int(part): frame for (part,), frame in chosen.partition_by("part", as_dict=True).items()}


@dataclass
class StepState:
    """What the parse plan fixed for a table's stages: the files (manifest index, key), the plan, and
    where the step's two tables stood before (for the step's commit figures)."""

    table: str
    batch_id: str
    files: list[tuple[int, str]]
    buckets: int
    groups: int
    versions_before: list[int | None]
    files_before: list[list[str]]
    started: float


def _save(store: Store, key: str, value: Any) -> None:
    store.write_bytes(key, json.dumps(value, separators=(",", ":"), default=str).encode())


def _save_frame(store: Store, key: str, frame: pl.DataFrame) -> None:
    body = io.BytesIO()
    frame.write_ipc(body)
    store.write_bytes(key, body.getvalue())


def _load(store: Store, key: str) -> Any:
    return json.loads(store.read_bytes(key))


def _state(store: Store, batch_id: str, table: str) -> StepState:
    key = _state_key(batch_id, table)
    if store.stat(key) is None:
        raise UsageError(f"{table} of batch {batch_id} has no plan; run `lakehouse stage plan {table} parse`")
    saved = _load(store, key)
    return StepState(**{**saved, "files": [tuple(pair) for pair in saved["files"]]})


def _items(
    store: Store,
    state: StepState,
    stage: str,
    units: list[int],
    inputs: Callable[[int], dict[str, Ranges]] = lambda unit: {},
) -> list[str]:
    """Plan ``units`` as ``stage``'s (replacing any earlier plan of it) and write one item for each unit
    without a report, with where its ``inputs(unit)`` are; the keys of the items written. A resumed
    batch's Map lists only the units to run."""
    prefix = plan_prefix(state.batch_id, state.table, stage)
    for info in store.list(prefix):
        store.delete(info.key)
    _save(store, planned_key(state.batch_id, state.table, stage), units)
    keys = []
    for unit in units:
        if store.stat(unit_report_key(state.batch_id, state.table, stage, unit)) is not None:
            continue
        key = f"{prefix}{unit:05d}.json"
        item = {"batch_id": state.batch_id, "table": state.table, "stage": stage, "unit": unit}
        _save(store, key, {**item, "inputs": inputs(unit)})
        keys.append(key)
    return keys


def _unit_reports(store: Store, state: StepState, stage: str) -> dict[int, dict[str, Any]]:
    """The reports of the planned units of ``stage``; an error naming any unit without one."""
    planned = planned_key(state.batch_id, state.table, stage)
    if store.stat(planned) is None:
        raise LakehouseError(f"{state.table} of batch {state.batch_id}: {stage} is not planned")
    reports, missing = {}, []
    for unit in _load(store, planned):
        key = unit_report_key(state.batch_id, state.table, stage, unit)
        if store.stat(key) is None:
            missing.append(unit)
        else:
            reports[unit] = _load(store, key)
    if missing:
        shown = ", ".join(str(unit) for unit in missing[:10]) + (" ..." if len(missing) > 10 else "")
        raise LakehouseError(
            f"{state.table} of batch {state.batch_id}: {len(missing)} {stage} unit(s) not done ({shown}); "
            "run them before the next stage"
        )
    return reports


def plan_stage(
    store: Store,
    manifest: Manifest,
    spec: TableSpec,
    stage: str,
    *,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    plan: Plan | None = None,
    gates: GateSettings | None = None,
) -> list[str]:
    """Write the items of ``stage`` (``parse``, ``resolve`` or ``write``, which also plans ``moves`` and
    ``late``) for ``spec``'s step of ``manifest``; the keys of the items written.

    ``parse`` cuts the table's files into buckets of keys and groups of partitions for ``memory_budget``
    per unit (``plan`` overrides it). ``write`` judges the quality gates (``gates``, by default the
    root's ``lakehouse.toml``) first: a crossed fail gate raises before any commit.
    """
    if stage not in PLANNED:
        raise UsageError(f"no plan for stage {stage!r}; plans are {', '.join(PLANNED)}")
    if load_step_report(store, manifest.batch_id, spec.name) is not None:
        # A resumed batch whose step of this table finished (its plan and staging went with the finish):
        # nothing to run, and planning again would load the files a second time.
        return []
    started = time.monotonic()
    reader = StoreParts(store, staging_prefix(manifest.batch_id, spec.name))
    items = _plan(store, manifest, spec, stage, memory_budget, plan, gates, reader)
    # What the plan's task did, for the step's cost (a plan run again counts once, as its last run).
    _save(store, _plan_task_key(manifest.batch_id, spec.name, stage), _task_figures(started, reader))
    return items


def _task_figures(started: float, parts: StoreParts) -> dict[str, float]:
    """A task's seconds since ``started`` (``time.monotonic``), its process's peak memory so far, and the
    staged objects it wrote and ranges and indexes it read (``parts``)."""
    return {
        "seconds": round(time.monotonic() - started, 3),
        "peak_rss_gib": round(process_peak_rss() / GIB, 3),
        "objects": parts.objects,
        "reads": parts.reads,
    }


def _plan_task_key(batch_id: str, table: str, stage: str) -> str:
    return f"{staging_prefix(batch_id, table)}/tasks/plan-{stage}.json"


def _plan(
    store: Store,
    manifest: Manifest,
    spec: TableSpec,
    stage: str,
    memory_budget: int,
    plan: Plan | None,
    gates: GateSettings | None,
    reader: StoreParts,
) -> list[str]:
    batch_id = manifest.batch_id
    if stage == "parse" and store.stat(_state_key(batch_id, spec.name)) is not None:
        # Planned already (a resumed batch): the same cut, or the units done would not fit the rest.
        state = _state(store, batch_id, spec.name)
        return _items(store, state, "parse", [index for index, _ in state.files])
    if stage == "parse":
        entries = [entry for entry in manifest.files[spec.name] if not entry.loaded_by]
        files = [(index, entry.key) for index, entry in enumerate(entries)]
        if plan is None:
            csv_bytes = sum(entry.size for entry in entries)
            stored = delta.stored_row_count(table_uri(store, spec.name))
            plan = _plan_of(csv_bytes, memory_budget, stored)
        befores = [delta.table_state(uri) for uri in _step_uris(store, spec.name)]
        state = StepState(
            spec.name,
            batch_id,
            files,
            plan.buckets,
            plan.groups,
            [before.version for before in befores],
            [sorted(before.files) for before in befores],
            time.time(),
        )
        _save(store, _state_key(batch_id, spec.name), asdict(state))
        return _items(store, state, "parse", [index for index, _ in files])
    state = _state(store, batch_id, spec.name)
    if stage == "resolve":
        parsed = _unit_reports(store, state, "parse")
        spans = reader.indexes(state, "parse", parsed)
        counts = reader.take(ranges(spans.filter(pl.col("kind") == "partitions"), "partitions", "parse"))
        group_of = partition_groups(_partition_counts(counts, spec), state.groups)
        mapping = pl.DataFrame(
            {
                typed(spec.partition_by): pl.Series(list(group_of), dtype=_partition_type(spec)),
                "group": pl.Series(list(group_of.values()), dtype=pl.Int32),
            }
        )
        _save_frame(store, _groups_key(batch_id, spec.name), mapping)
        valid = sum(report["rows_in"] - report["rejected"] for report in parsed.values())
        _staged_as_reported(spec, spans, ["parsed"], valid, "valid rows of the parse units")
        buckets = by_part(spans, "parsed")
        return _items(
            store,
            state,
            "resolve",
            sorted(buckets),
            lambda b: {"parsed": ranges(buckets[b], "parsed", "parse")},
        )
    parsed, resolved = _unit_reports(store, state, "parse"), _unit_reports(store, state, "resolve")
    rows_in, rejected, reasons = _counts(parsed, resolved)
    gates = load_settings(store) if gates is None else gates
    results = judge(gates, spec.name, batch_id, rows_in, rejected, reasons)
    _save(store, f"{staging_prefix(batch_id, spec.name)}/gates.json", [r.to_dict() for r in results])
    spans = reader.indexes(state, "resolve", resolved)
    to_merge = sum(report["to_merge"] for report in resolved.values())
    _staged_as_reported(spec, spans, ["resolved", "moves"], to_merge, "rows to merge of the resolve units")
    late_rows = sum(report["late_rows"] for report in resolved.values())
    _staged_as_reported(spec, spans, [LATE], late_rows, "late rejects of the resolve units")
    groups, moves, late = (by_part(spans, kind) for kind in ("resolved", "moves", LATE))
    return [
        *_items(
            store,
            state,
            "write",
            sorted(groups),
            lambda g: {"resolved": ranges(groups[g], "resolved", "resolve")},
        ),
        *_items(
            store, state, "moves", sorted(moves), lambda _: {"moves": ranges(moves[0], "moves", "resolve")}
        ),
        *_items(store, state, "late", sorted(late), lambda f: {"late": ranges(late[f], LATE, "resolve")}),
    ]


def _staged_as_reported(spec: TableSpec, spans: pl.DataFrame, kinds: list[str], rows: int, what: str) -> None:
    """Refuse to go on unless the staged ``kinds`` hold as many rows as the units reported."""
    staged = int(spans.filter(pl.col("kind").is_in(kinds)).get_column("rows").sum())
    if staged != rows:
        raise LakehouseError(
            f"{spec.name}: {rows} {what} but {staged} staged ({', '.join(kinds)}); refusing to go on"
        )


def _plan_of(csv_bytes: int, memory_budget: int, stored_rows: int | None) -> Plan:
    rows = csv_bytes // MIN_ROW_BYTES
    return plan_for(
        csv_bytes, memory_budget, csv_rows=rows, stored_rows=rows if stored_rows is None else stored_rows
    )


def _partition_type(spec: TableSpec) -> pl.DataType:
    column = spec.column(spec.partition_by)
    return pl.Date() if column.type == "date" else polars_type(column)


def _groups_key(batch_id: str, table: str) -> str:
    return f"{staging_prefix(batch_id, table)}/groups.arrow"


def _partition_counts(counted: pl.DataFrame | None, spec: TableSpec) -> Counter[Any]:
    """Rows per partition value over the parse units' counts."""
    if counted is None:
        return Counter()
    summed = counted.group_by(typed(spec.partition_by)).agg(pl.col("len").sum())
    return Counter(dict(summed.iter_rows()))


def _counts(
    parsed: dict[int, dict[str, Any]], resolved: dict[int, dict[str, Any]]
) -> tuple[int, int, Counter[str]]:
    """Rows in, rows rejected and their reasons over every parse and resolve unit."""
    reasons: Counter[str] = Counter()
    for report in [*parsed.values(), *resolved.values()]:
        reasons.update(report["reasons"])
    rows_in = sum(report["rows_in"] for report in parsed.values())
    rejected = sum(report["rejected"] for report in parsed.values()) + sum(
        report["late_rows"] for report in resolved.values()
    )
    return rows_in, rejected, reasons


@dataclass(frozen=True)
class Unit:
    """What a unit runs on: the step's store, manifest, table and state, its number in its stage (a file,
    a bucket, a group), where it puts its output, and where its input is (by kind)."""

    store: Store
    manifest: Manifest
    spec: TableSpec
    state: StepState
    number: int
    parts: StoreParts
    inputs: dict[str, Ranges]


def run_unit(store: Store, item: str) -> dict[str, Any]:
    """Run the unit an item (a key under ``plan/``) names, unless its report says it is done; its report."""
    if store.stat(item) is None:
        raise UsageError(f"no work item {store.uri(item)}")
    named = _load(store, item)
    batch_id, table, stage, unit = named["batch_id"], named["table"], named["stage"], int(named["unit"])
    report_key = unit_report_key(batch_id, table, stage, unit)
    if store.stat(report_key) is not None:
        return {**_load(store, report_key), "skipped": True}
    spec, manifest = get_spec(table), read_manifest(store, batch_id)
    state = _state(store, batch_id, table)
    started = time.monotonic()
    parts = StoreParts(store, staging_prefix(batch_id, table), f"{stage}-{unit:05d}")
    report = _UNITS[stage](Unit(store, manifest, spec, state, unit, parts, named.get("inputs", {})))
    parts.flush()
    _save_frame(store, index_key(batch_id, table, stage, unit), parts.index())
    parts.objects += 1  # the index
    report.update(stage=stage, unit=unit, **_task_figures(started, parts))
    _save(store, report_key, report)  # last: a unit with a report is done
    return report


def _entry(manifest: Manifest, spec: TableSpec, state: StepState, unit: int) -> ManifestFile:
    key = dict(state.files)[unit]
    return next(entry for entry in manifest.files[spec.name] if entry.key == key)


def _parse_unit(unit: Unit) -> dict[str, Any]:
    """Read and validate one file: its valid rows by bucket, its rejected rows, its partitions' counts."""
    store, manifest, spec, parts = unit.store, unit.manifest, unit.spec, unit.parts
    entry = _entry(manifest, spec, unit.state, unit.number)
    report: dict[str, Any] = {"file": entry.key, "rows_in": 0, "rejected": 0, "reasons": {}, "empty": False}
    report.update(layout_notes=[], read_notes=[], extra_columns=[], empty_lines=0)
    key = _locate(store, spec.name, manifest.batch_id, entry)
    with store.local_path(key, entry.version, entry.size) as path:
        layout = read_layout(path, spec, entry.key)
        if layout is None:
            report.update(empty=True, empty_lines=count_empty_lines(path))
            return report
        report.update(layout_notes=_layout_notes(entry.key, layout), extra_columns=layout.extra)
        stats, reasons, partitions = ReadStats(), Counter[str](), Counter[Any]()

        def reject(frame: pl.DataFrame) -> None:
            if frame.height:
                report["rejected"] += frame.height
                reasons.update(_reason_counts([frame.lazy()]))
                parts.put(_Rejected.KIND, 0, frame)

        for chunk in read_chunks(
            path, spec, entry.key, layout, stats=stats, expected_digest=_expected_digest(entry)
        ):
            report["rows_in"] += chunk.records.height + chunk.malformed.height
            typed_rows = _split_chunk(chunk, spec, layout, unit.number, reject)
            counts = typed_rows.get_column(typed(spec.partition_by)).value_counts()
            partitions.update(dict(counts.iter_rows()))
            parts.put_split("parsed", typed_rows.with_columns(bucket_of(spec, unit.state.buckets)), BUCKET)
    counted = pl.DataFrame(
        {
            typed(spec.partition_by): pl.Series(list(partitions), dtype=_partition_type(spec)),
            "len": pl.Series(list(partitions.values()), dtype=pl.Int64),
        }
    )
    parts.put("partitions", 0, counted)
    report.update(reasons=dict(reasons), read_notes=stats.notes, empty_lines=stats.empty_lines)
    return report


def _groups(store: Store, state: StepState, spec: TableSpec) -> dict[Any, int]:
    mapping = pl.read_ipc(io.BytesIO(store.read_bytes(_groups_key(state.batch_id, state.table))))
    return dict(mapping.select(typed(spec.partition_by), "group").iter_rows())


def _resolve_unit(unit: Unit) -> dict[str, Any]:
    """Resolve one bucket of keys: dedup, references (this bucket's), stale rows, moves, groups."""
    store, spec, state, parts = unit.store, unit.spec, unit.state, unit.parts
    valid = parts.take(unit.inputs["parsed"])
    if valid is None:
        valid = pl.DataFrame()
    referenced = {fk.column: valid.get_column(typed(fk.column)).unique() for fk in spec.foreign_keys}
    known = _known_references(store, spec, referenced)
    resolved = resolve_bucket(
        store, spec, valid, known, _groups(store, state, spec), parts, bucket=unit.number
    )
    return {
        "survivors": resolved.survivors,
        "to_merge": resolved.to_merge,
        "late_rows": resolved.late_rows,
        "reasons": dict(resolved.late_reasons),
        "moved_from": resolved.moved_from,
    }


def _write_unit(unit: Unit) -> dict[str, Any]:
    """MERGE one group of partitions' survivors (its partitions as literals: groups commit side by side)."""
    rows = unit.parts.take(unit.inputs["resolved"])
    return _merged(unit.store, unit.spec, unit.state, rows, [], f"group {unit.number}")


def _moves_unit(unit: Unit) -> dict[str, Any]:
    """MERGE the keys that change partition, naming the partitions they leave too (after the groups)."""
    resolved = _unit_reports(unit.store, unit.state, "resolve")
    moved_from = sorted({value for report in resolved.values() for value in report["moved_from"]}, key=str)
    rows = unit.parts.take(unit.inputs["moves"])
    return _merged(unit.store, unit.spec, unit.state, rows, moved_from, "the moving keys")


def _merged(
    store: Store,
    spec: TableSpec,
    state: StepState,
    rows: pl.DataFrame | None,
    moved_from: list[Any],
    where: str,
) -> dict[str, Any]:
    if rows is None:
        return {"inserted": 0, "updated": 0, "version": None, "contract_seconds": 0.0}
    rows = rows.rename({typed(name): name for name in spec.column_names})
    contract = _ContractClock()
    contract.check(rows, spec, keep=None, where=where)
    merged = delta.merge_rows(
        table_uri(store, spec.name), rows, spec, stored_partitions=moved_from, batch_id=state.batch_id
    )
    return {
        "inserted": merged.inserted,
        "updated": merged.updated,
        "version": merged.version,
        "contract_seconds": round(contract.seconds, 3),
    }


def _late_unit(unit: Unit) -> dict[str, Any]:
    """Cut one file's late rejects' original text out of it (``_late_text``) and put them as rejected."""
    store, manifest, spec, parts = unit.store, unit.manifest, unit.spec, unit.parts
    late = parts.take(unit.inputs["late"])
    if late is None:
        return {"rows": 0}
    entry = _entry(manifest, spec, unit.state, unit.number)
    key = _locate(store, spec.name, manifest.batch_id, entry)
    with store.local_path(key, entry.version, entry.size) as path:
        layout = read_layout(path, spec, entry.key)
        assert layout is not None, f"{entry.key} has late rejects but no header"
        texts = _late_text(late, (entry.key, path, layout), spec, _expected_digest(entry))
    parts.put(_Rejected.KIND, 0, texts)
    return {"rows": texts.height}


_UNITS: dict[str, Callable[[Unit], dict[str, Any]]] = {
    "parse": _parse_unit,
    "resolve": _resolve_unit,
    "write": _write_unit,
    "moves": _moves_unit,
    "late": _late_unit,
}


def finish_step(
    store: Store,
    manifest: Manifest,
    spec: TableSpec,
    *,
    now: datetime | None = None,
    progress: Progress = _quiet,
) -> StepReport:
    """Commit the staged rejected rows, check that every row is in one place, and build the step's report
    from its units' (their plan and staged objects are removed after)."""
    started = time.monotonic()
    batch_id = manifest.batch_id
    state = _state(store, batch_id, spec.name)
    reports = {stage: _unit_reports(store, state, stage) for stage in STAGES}
    parsed, resolved, late = reports["parse"], reports["resolve"], reports["late"]
    rows_in, rejected_rows, _ = _counts(parsed, resolved)
    kept = sum(report["survivors"] for report in resolved.values())
    if kept + rejected_rows != rows_in:
        raise LakehouseError(
            f"{spec.name}: {rows_in} rows read but {kept} kept and {rejected_rows} rejected; "
            "refusing to write"
        )
    texts = sum(report["rejected"] for report in parsed.values()) + sum(r["rows"] for r in late.values())
    if texts != rejected_rows:
        raise LakehouseError(
            f"{spec.name}: {rejected_rows} rows rejected but {texts} have their text; refusing to write"
        )
    parts = StoreParts(store, staging_prefix(batch_id, spec.name))
    where = [
        ranges(spans.filter(pl.col("kind") == _Rejected.KIND), _Rejected.KIND, stage)
        for stage, spans in (
            ("parse", parts.indexes(state, "parse", parsed)),
            ("late", parts.indexes(state, "late", late)),
        )
    ]
    with tempfile.TemporaryDirectory(prefix="lakehouse-finish-") as folder:
        local = Staging(Path(folder))
        rejected = _Rejected(local)
        for frame in parts.frames([*where[0], *where[1]]):
            rejected.add(frame)
        if rejected.rows != rejected_rows:
            raise LakehouseError(
                f"{spec.name}: {rejected_rows} rows rejected but {rejected.rows} staged; refusing to write"
            )
        rejected_version, reasons = _write_rejected(
            store, spec, batch_id, rejected, now or datetime.now(timezone.utc), progress
        )
        by_file, by_partition, samples = _rejected_summary(rejected, spec)
    merges = [*reports["write"].values(), *reports["moves"].values()]
    inserted = sum(report["inserted"] for report in merges)
    updated = sum(report["updated"] for report in merges)
    befores = [
        delta.TableState(version, frozenset(files))
        for version, files in zip(state.versions_before, state.files_before)
    ]
    table_changes, rejected_changes = (
        delta.changes_since(uri, before) for uri, before in zip(_step_uris(store, spec.name), befores)
    )
    plans = [_load(store, _plan_task_key(batch_id, spec.name, stage)) for stage in PLANNED]
    tasks = {**{stage: list(units.values()) for stage, units in reports.items()}, "plan": plans}
    tasks["finish"] = [_task_figures(started, parts)]
    by_stage = {stage: _stage_figures(done) for stage, done in tasks.items()}
    # How many partition values the groups were cut from: no more write units than that, however big.
    by_stage["write"]["partitions"] = len(_groups(store, state, spec))
    gates_key = f"{staging_prefix(batch_id, spec.name)}/gates.json"
    step = StepReport(
        table=spec.name,
        files=len(manifest.files[spec.name]),
        rows_in=rows_in,
        inserted=inserted,
        updated=updated,
        unchanged=kept - inserted - updated,
        rejected=rejected_rows,
        rejected_by_reason=dict(sorted(reasons.items())),
        delta_version=table_changes.version,
        rejected_version=rejected_version,
        seconds=round(time.time() - state.started, 3),
        extra_columns={r["file"]: r["extra_columns"] for r in parsed.values() if r["extra_columns"]},
        empty_files=[r["file"] for r in parsed.values() if r["empty"]],
        empty_lines={r["file"]: r["empty_lines"] for r in parsed.values() if r["empty_lines"]},
        notes=[note for key in ("layout_notes", "read_notes") for r in parsed.values() for note in r[key]],
        skipped_files={entry.key: entry.loaded_by for entry in manifest.files[spec.name] if entry.loaded_by},
        buckets=state.buckets,
        groups=state.groups,
        stages=by_stage,
        commits=table_changes.commits + rejected_changes.commits,
        files_added=table_changes.files_added + rejected_changes.files_added,
        files_read=table_changes.files_removed + rejected_changes.files_removed,
        schemas=_schemas(spec.name, table_changes, rejected_changes),
        contract_seconds=round(sum(report["contract_seconds"] for report in merges), 3),
        gates=_load(store, gates_key) if store.stat(gates_key) else [],
        rejected_by_file=by_file,
        rejected_by_partition=by_partition,
        rejected_samples=samples,
    )
    save_step_report(store, batch_id, step)  # before the staged objects go: a finish run again finds it
    clear_step(store, batch_id, spec.name)
    return step


def _stage_figures(tasks: list[dict[str, Any]]) -> dict[str, Any]:
    """A stage's figures over its tasks (units, or the plans, or the finish): their seconds, the largest
    peak, how many, the seconds Fargate bills for them, the staged objects they wrote and what they read of
    them (ranges and indexes)."""
    return {
        "seconds": round(sum(task["seconds"] for task in tasks), 3),
        "peak_rss_gib": max((task["peak_rss_gib"] for task in tasks), default=0.0),
        "units": len(tasks),
        "billed_seconds": round(sum(billed_task_seconds(task["seconds"]) for task in tasks), 3),
        "objects": sum(task["objects"] for task in tasks),
        "reads": sum(task["reads"] for task in tasks),
    }


def clear_step(store: Store, batch_id: str, table: str) -> int:
    """Remove a table's plan items and staged objects of a batch (after its step report is saved, or when
    the batch is abandoned); how many objects went."""
    gone = 0
    for prefix in (plan_prefix(batch_id, table), f"{staging_prefix(batch_id, table)}/"):
        for info in store.list(prefix):
            store.delete(info.key)
            gone += 1
    return gone


def clear_batch(store: Store, batch_id: str) -> int:
    """Remove every plan item and staged object of a batch (``lakehouse abandon``)."""
    gone = 0
    for prefix in (f"{PLAN}/{batch_id}/", f"{STAGING}/{batch_id}/"):
        for info in store.list(prefix):
            store.delete(info.key)
            gone += 1
    return gone


UnitRunner = Callable[[list[str]], list[dict[str, Any]]]


def in_process(store: Store) -> UnitRunner:
    """Run units one after another in this process (tests; a machine with one worker)."""
    return lambda items: [run_unit(store, item) for item in items]


def in_processes(root: str, workers: int) -> UnitRunner:
    """Run each unit as a process of its own (``lakehouse stage run``), ``workers`` at a time: what a
    Distributed Map does with its children, on this machine."""

    store = open_store(root)

    def run(item: str) -> dict[str, Any]:
        command = [
            sys.executable,
            "-m",
            "pipeline",
            "--log-format",
            "json",
            "stage",
            "run",
            item,
            "--root",
            root,
        ]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            tail = " / ".join((done.stderr or done.stdout).strip().splitlines()[-3:])
            raise LakehouseError(f"unit {item} failed: {tail}")
        named = _load(store, item)
        return _load(store, unit_report_key(named["batch_id"], named["table"], named["stage"], named["unit"]))

    def run_all(items: list[str]) -> list[dict[str, Any]]:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            return list(pool.map(run, items))

    return run_all


def run_staged_step(
    store: Store,
    manifest: Manifest,
    spec: TableSpec,
    runner: UnitRunner,
    *,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    plan: Plan | None = None,
    gates: GateSettings | None = None,
    now: datetime | None = None,
    progress: Progress = _quiet,
) -> StepReport:
    """A table's step as the distributed path runs it: each plan, then its units through ``runner``, then
    the finish (the state machine's order; ``run_step`` gives the same tables and rejected rows)."""
    progress(f"{spec.name}: planning the parse", event="stage", table=spec.name, stage="plan")
    runner(plan_stage(store, manifest, spec, "parse", memory_budget=memory_budget, plan=plan))
    runner(plan_stage(store, manifest, spec, "resolve"))
    items = plan_stage(store, manifest, spec, "write", gates=gates)
    for stage in ("write", "moves", "late"):
        runner([item for item in items if f"/{stage}/" in item])
    return finish_step(store, manifest, spec, now=now, progress=progress)
