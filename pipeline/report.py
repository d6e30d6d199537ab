"""What batches and steps did, as stored in ``reports/``. No polars or deltalake on this import path."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

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

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=2).encode()


def step_report_key(batch_id: str, table: str) -> str:
    return f"{REPORTS}/{batch_id}/{table}.json"


def report_key(batch_id: str) -> str:
    return f"{REPORTS}/{batch_id}.json"


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
