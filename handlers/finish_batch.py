"""FinishBatch: the state machine's last step, on success and on failure.

Writes the batch's final report (JSON, and its HTML page) and publishes its metrics, notes what the
Glue catalog now holds (``pipeline.catalog``), releases the root's batch lock, composes the SNS message
and, after a success, starts the next batch if files landed meanwhile. Input:
``{"root", "batch_id", "manifest", "status": "SUCCEEDED" | "FAILED", "counts"?: [{"table", "rows",
"statistics"?}], "crawled"?: [crawler names], "execution"?: ARN, "error"?: str, "cause"?: str}``.
Environment: as CheckDataAvailability (``LAKEHOUSE_ROOT``, ``STATE_MACHINE_ARN``), for starting the
next batch, and ``LAKEHOUSE_TASK_SIZE`` (JSON of ``pipeline.costs.TaskSize``), for the cost estimate.
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from typing import Any

import boto3
from aws_lambda_powertools import Logger
from aws_lambda_powertools.metrics import EphemeralMetrics, MetricUnit
from aws_lambda_powertools.utilities.typing import LambdaContext

from handlers.check_data_availability import execution_alive, start_execution
from pipeline.catalog import forget_catalog, record_catalog
from pipeline.costs import CostEstimate, TaskSize, cost_line, estimate, is_distributed, local_transitions
from pipeline.html_report import write_batch_report
from pipeline.lock import release_lock
from pipeline.manifest import read_manifest, record_loaded
from pipeline.report import (
    BatchReport,
    StepReport,
    gate_notices,
    load_step_errors,
    load_step_report,
    report_key,
)
from pipeline.specs import TABLES
from pipeline.storage import Store, open_store
from pipeline.trigger import start_ready_batch
from pipeline.workitems import units_not_done

SERVICE = "ecommerce-lakehouse"
# CloudWatch metrics of each succeeded batch (infra/lakehouse_infra/stack.py alarms on RejectedShare).
NAMESPACE = "EcommerceLakehouse"
logger = Logger(service=SERVICE)


def publish_metrics(report: BatchReport) -> None:
    """The batch's figures as CloudWatch metrics in Embedded Metric Format (CloudWatch Logs extracts
    them from the function's log): the batch's seconds and cost, and per table (dimension ``table``)
    rows in, inserted, updated, rejected and the rejected share in percent, and the rejections per
    reason (dimensions ``table``, ``reason``)."""
    batch = EphemeralMetrics(namespace=NAMESPACE, service=SERVICE)
    batch.add_metric(name="BatchSeconds", unit=MetricUnit.Seconds, value=report.seconds)
    if report.cost:
        batch.add_metric(name="EstimatedCostUSD", unit=MetricUnit.NoUnit, value=report.cost["usd"])
    batch.flush_metrics()
    for step in report.steps:
        table = EphemeralMetrics(namespace=NAMESPACE, service=SERVICE)
        table.add_dimension(name="table", value=step.table)
        for name, count in (
            ("RowsIn", step.rows_in),
            ("Inserted", step.inserted),
            ("Updated", step.updated),
            ("Rejected", step.rejected),
        ):
            table.add_metric(name=name, unit=MetricUnit.Count, value=count)
        share = 100.0 * step.rejected / step.rows_in if step.rows_in else 0.0
        table.add_metric(name="RejectedShare", unit=MetricUnit.Percent, value=share)
        table.flush_metrics()
        for reason, count in sorted(step.rejected_by_reason.items()):
            by_reason = EphemeralMetrics(namespace=NAMESPACE, service=SERVICE)
            by_reason.add_dimension(name="table", value=step.table)
            by_reason.add_dimension(name="reason", value=reason)
            by_reason.add_metric(name="RejectedByReason", unit=MetricUnit.Count, value=count)
            by_reason.flush_metrics()


def _counts(counts: list[dict[str, Any]] | dict[str, Any]) -> dict[str, int]:
    """Row counts per table: the state machine's Athena results (``[{"table", "rows"}]``) or a mapping."""
    if isinstance(counts, dict):
        return {table: int(rows) for table, rows in counts.items()}
    return {entry["table"]: int(entry["rows"]) for entry in counts}


def _transitions(execution: str) -> int:
    """The state transitions of the execution so far, and the one left (the SNS notification)."""
    pages = boto3.client("stepfunctions").get_paginator("get_execution_history")
    entered = sum(
        event["type"].endswith("StateEntered")
        for page in pages.paginate(executionArn=execution)
        for event in page["events"]
    )
    return entered + 1


def _cost(event: dict[str, Any], steps: list[StepReport], sizes: list[int]) -> CostEstimate:
    counts = event.get("counts") or []
    crawls = len(event.get("crawled") or [])
    execution = event.get("execution")
    return estimate(
        steps,
        raw_files=len(sizes),
        raw_bytes=sum(sizes),
        crawls=crawls,
        transitions=_transitions(execution)
        if execution
        else local_transitions(len(steps), crawls, len(counts), distributed=any(map(is_distributed, steps))),
        athena_bytes=[
            int((entry.get("statistics") or {}).get("DataScannedInBytes") or 0)
            for entry in counts
            if isinstance(entry, dict)
        ],
        task=TaskSize(**json.loads(os.environ.get("LAKEHOUSE_TASK_SIZE") or "{}")),
        basis="estimate from this execution" if execution else "estimate",
    )


def _success(store: Store, event: dict[str, Any], now: datetime) -> dict[str, Any]:
    manifest = read_manifest(store, event["manifest"])
    steps = [load_step_report(store, manifest.batch_id, table) for table in TABLES]
    missing = [table for table, step in zip(TABLES, steps) if step is None]
    if missing:
        raise RuntimeError(f"batch {manifest.batch_id} has no step report for {', '.join(missing)}")
    started = datetime.fromisoformat(manifest.created_at)
    report = BatchReport(
        batch_id=manifest.batch_id,
        status="succeeded",
        started_at=manifest.created_at,
        finished_at=now.isoformat(),
        seconds=round((now - started).total_seconds(), 3),
        steps=[step for step in steps if step is not None],
        archived_files=sum(len(entries) for entries in manifest.files.values()),
        table_counts=_counts(event.get("counts", [])),
    )
    sizes = [entry.size for entries in manifest.files.values() for entry in entries]
    report.cost = _cost(event, report.steps, sizes).to_dict()
    record_loaded(store, manifest, now)
    record_catalog(store, report.steps)  # its crawls, if it needed any, succeeded
    # The page before the JSON report, as run_batch does: a retry after a failure in between writes both.
    drawn = _write_html_report(store, report)
    store.write_bytes(report_key(manifest.batch_id), report.to_json())
    publish_metrics(report)  # once the report is written: a retry after a failure before it adds none
    lines = [f"Batch {report.batch_id} succeeded."]
    for step in report.steps:
        lines.append(
            f"{step.table}: {step.rows_in:,} rows in, {step.inserted:,} inserted, {step.updated:,} updated, "
            f"{step.rejected:,} rejected"
        )
    lines += [f"Gate: {notice}" for notice in gate_notices(report.steps)]
    lines.append("Rows now: " + ", ".join(f"{t} {n:,}" for t, n in report.table_counts.items()))
    lines.append(f"Cost on AWS: {cost_line(report.cost)}")
    lines.append(f"Report: {drawn}")
    return {"subject": f"Lakehouse batch {report.batch_id} succeeded", "message": "\n".join(lines)}


def _write_html_report(store: Store, report: BatchReport) -> str:
    """Write ``reports/<batch_id>.html``; say where it is, or why there is none (the batch has landed:
    a page that could not be drawn does not fail it)."""
    try:
        key = write_batch_report(store, report.batch_id, report=report)
    except Exception as error:
        logger.exception("the HTML report could not be written", extra={"batch_id": report.batch_id})
        return f"none (the HTML report could not be written: {error})"
    return store.uri(key)


def _failure(store: Store, event: dict[str, Any]) -> dict[str, Any]:
    error, cause = event.get("error") or "unknown error", event.get("cause") or "no cause given"
    forget_catalog(store)  # a crawl or a check may have failed: the next batch crawls again
    # A step's own sentence (a Fargate task's failure only says that its container exited).
    steps = load_step_errors(store, event["batch_id"])
    lines = [f"Batch {event['batch_id']} failed: {error}."]
    lines += [f"Cause: {sentence}" for sentence in steps.values()] or [f"Cause: {cause}"]
    if steps:
        lines.append(f"As the state machine reported it: {cause}")
    pending = units_not_done(store, event["batch_id"])
    if pending:
        # A unit whose task was stopped (out of memory, a Spot interruption) says nothing itself.
        shown = ", ".join(" ".join(key.split("/")[2:]).removesuffix(".json") for key in pending[:10])
        lines.append(
            f"Units not done: {shown}" + (f" and {len(pending) - 10} more" if len(pending) > 10 else "")
        )
    lines.append("Its raw files stay in raw/; the next upload (or a re-run) resumes the batch.")
    message = "\n".join(lines)
    return {"subject": f"Lakehouse batch {event['batch_id']} FAILED", "message": message}


@logger.inject_lambda_context
def lambda_handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    store = open_store(event["root"])
    logger.append_keys(batch_id=event["batch_id"])
    now = datetime.now(timezone.utc)
    succeeded = event.get("status") == "SUCCEEDED"
    result = _success(store, event, now) if succeeded else _failure(store, event)
    release_lock(store, event["batch_id"])
    if succeeded:
        # Files that landed while this batch ran start the next one now (their events found the lock).
        following = start_ready_batch(store, start_execution, now, alive=execution_alive)
        result["next_batch"] = following.batch_id if following else None
    logger.info(
        "batch finished", extra={"status": event.get("status"), "next_batch": result.get("next_batch")}
    )
    return result
