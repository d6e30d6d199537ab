"""What batches and steps did, as stored in ``reports/``. No polars or deltalake on this import path."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from pipeline.manifest import REPORTS
from pipeline.storage import Store


@dataclass
class StepReport:
    """What one table step did."""

    table: str
    files: int
    rows_in: int
    inserted: int
    updated: int
    unchanged: int
    rejected: int
    rejected_by_reason: dict[str, int]
    delta_version: int | None
    rejected_version: int | None
    seconds: float
    extra_columns: dict[str, list[str]] = field(default_factory=dict)
    empty_files: list[str] = field(default_factory=list)
    empty_lines: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    skipped_files: dict[str, str] = field(default_factory=dict)
    buckets: int = 1
    groups: int = 1
    stages: dict[str, dict[str, float]] = field(default_factory=dict)
    commits: int = 0
    """Delta commits of this step (its table and its rejected table); with the next two, for the S3
    requests of the cost estimate (``pipeline.costs``)."""
    files_added: int = 0
    files_read: int = 0
    """Data files the commits replaced (a MERGE read each of them)."""
    schemas: dict[str, str] = field(default_factory=dict)
    """The catalog's names of this step's tables (``products``, ``rejected_products``) that exist after it,
    with a digest of their schemas: whether a crawl is needed (``pipeline.catalog``)."""
    rejected_by_file: dict[str, int] = field(default_factory=dict)
    """Rejected rows by the key of the file they came from."""
    rejected_by_partition: dict[str, int] = field(default_factory=dict)
    """Rejected rows by the text of their partition column (``date`` or ``department_id``); ``""`` where
    the row had none (a malformed row, an empty value)."""
    rejected_samples: list[dict[str, Any]] = field(default_factory=list)
    """A few rejected rows per reason: ``source_file``, ``source_line``, ``reasons`` and ``record`` (the
    row's original text)."""
    gates: list[dict[str, Any]] = field(default_factory=list)
    """The quality gates judged on this step (``pipeline.gates.GateResult`` as dicts)."""
    contract_seconds: float = 0.0
    """Seconds spent checking the rows to commit against the table's contract (``pipeline.contract``)."""


@dataclass
class BatchReport:
    """What one batch did, step by step."""

    batch_id: str
    status: str
    started_at: str
    finished_at: str
    seconds: float
    steps: list[StepReport]
    archived_files: int
    table_counts: dict[str, int]
    notes: list[str] = field(default_factory=list)
    cost: dict[str, Any] = field(default_factory=dict)
    """What the batch cost on AWS at list prices (``pipeline.costs.CostEstimate``), or would on Fargate."""

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=2).encode()


def gate_notices(steps: list[StepReport]) -> list[str]:
    """A sentence for each gate the steps crossed and landed anyway (warned, or failed but accepted)."""
    from pipeline.gates import GateResult

    return [
        GateResult(**gate).sentence()
        for step in steps
        for gate in step.gates
        if gate["outcome"] in ("warned", "accepted")
    ]


def step_report_key(batch_id: str, table: str) -> str:
    return f"{REPORTS}/{batch_id}/{table}.json"


def report_key(batch_id: str) -> str:
    return f"{REPORTS}/{batch_id}.json"


def step_error_key(batch_id: str, table: str) -> str:
    return f"{REPORTS}/{batch_id}/{table}.error.json"


def save_step_error(store: Store, batch_id: str, table: str, error: str) -> None:
    """Keep why a step failed next to where its report would be (FinishBatch puts it in the message)."""
    store.write_bytes(step_error_key(batch_id, table), json.dumps({"table": table, "error": error}).encode())


def forget_step_error(store: Store, batch_id: str, table: str) -> None:
    store.delete(step_error_key(batch_id, table))


def load_step_errors(store: Store, batch_id: str) -> dict[str, str]:
    """Why the steps of a batch that failed did, by table (none: no step failed, or none said why)."""
    errors = {}
    for info in store.list(f"{REPORTS}/{batch_id}/"):
        if info.key.endswith(".error.json"):
            saved = json.loads(store.read_bytes(info.key))
            errors[str(saved["table"])] = str(saved["error"])
    return errors


def save_step_report(store: Store, batch_id: str, report: StepReport) -> None:
    store.write_bytes(step_report_key(batch_id, report.table), json.dumps(asdict(report), indent=2).encode())


def load_step_report(store: Store, batch_id: str, table: str) -> StepReport | None:
    key = step_report_key(batch_id, table)
    if store.stat(key) is None:
        return None
    return StepReport(**json.loads(store.read_bytes(key)))


def load_report(store: Store, batch_id: str) -> BatchReport | None:
    """The final report of a batch, or None when the batch has not finished."""
    key = report_key(batch_id)
    if store.stat(key) is None:
        return None
    raw = json.loads(store.read_bytes(key))
    raw["steps"] = [StepReport(**step) for step in raw["steps"]]
    return BatchReport(**raw)


@dataclass(frozen=True)
class BatchLine:
    """One batch as ``lakehouse status`` lists it."""

    batch_id: str
    status: str
    rows_in: int
    written: int
    rejected: int
    seconds: float | None
    steps_done: int
    steps: int


def batch_history(store: Store, last: int) -> list[BatchLine]:
    """The ``last`` batches, newest first: finished ones from their reports, unfinished ones from their
    manifests and the step reports written so far."""
    from pipeline.manifest import unfinished_manifests

    finished = [
        info.key.rsplit("/", 1)[-1].removesuffix(".json")
        for info in store.list(f"{REPORTS}/")
        if info.key.endswith(".json") and info.key.count("/") == 1
    ]
    lines = []
    for manifest in unfinished_manifests(store):
        steps = [
            step
            for step in (load_step_report(store, manifest.batch_id, table) for table in manifest.files)
            if step is not None
        ]
        lines.append(_line(manifest.batch_id, "unfinished", steps, None, len(manifest.files)))
    for batch_id in sorted(finished)[-last:]:
        report = load_report(store, batch_id)
        if report is not None:
            lines.append(_line(batch_id, report.status, report.steps, report.seconds, len(report.steps)))
    return sorted(lines, key=lambda line: line.batch_id, reverse=True)[:last]


def _line(
    batch_id: str, status: str, steps: list[StepReport], seconds: float | None, tables: int
) -> BatchLine:
    return BatchLine(
        batch_id=batch_id,
        status=status,
        rows_in=sum(step.rows_in for step in steps),
        written=sum(step.inserted + step.updated for step in steps),
        rejected=sum(step.rejected for step in steps),
        seconds=seconds,
        steps_done=len(steps),
        steps=tables,
    )
