"""CheckDataAvailability: S3 events for raw/*.csv arrive through SQS; start the ETL when all data is there.

Environment: ``LAKEHOUSE_ROOT`` (``s3://bucket[/prefix]``) and ``STATE_MACHINE_ARN``.
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from typing import Any

import boto3
from aws_lambda_powertools import Logger
from aws_lambda_powertools.utilities.batch import BatchProcessor, EventType, process_partial_response
from aws_lambda_powertools.utilities.batch.types import PartialItemFailureResponse
from aws_lambda_powertools.utilities.data_classes.sqs_event import SQSRecord
from aws_lambda_powertools.utilities.typing import LambdaContext

from pipeline.manifest import Manifest
from pipeline.storage import open_store
from pipeline.trigger import is_raw_csv, start_ready_batch

processor = BatchProcessor(event_type=EventType.SQS)
logger = Logger(service="ecommerce-lakehouse")


def _root() -> str:
    return os.environ["LAKEHOUSE_ROOT"]


def _root_prefix() -> str:
    return _root()[len("s3://") :].partition("/")[2]


def execution_input(root: str, manifest: Manifest) -> dict[str, Any]:
    """What an execution starts from: where the lakehouse is (its bucket and key prefix too, for the
    Distributed Map's listing of work items) and the batch, with the bytes it will load (which path)."""
    bucket, _, prefix = root[len("s3://") :].partition("/")
    return {
        "root": root,
        "bucket": bucket,
        "prefix": f"{prefix.strip('/')}/" if prefix.strip("/") else "",
        "batch_id": manifest.batch_id,
        "manifest": manifest.key,
        "bytes": sum(
            entry.size for entries in manifest.files.values() for entry in entries if not entry.loaded_by
        ),
    }


def start_execution(manifest: Manifest, name: str) -> None:
    """Start the state machine for ``manifest`` as execution ``name``."""
    stepfunctions = boto3.client("stepfunctions")
    payload = execution_input(_root(), manifest)
    try:
        stepfunctions.start_execution(
            stateMachineArn=os.environ["STATE_MACHINE_ARN"], name=name, input=json.dumps(payload)
        )
    except stepfunctions.exceptions.ExecutionAlreadyExists:
        # Only a running execution of this very batch makes that harmless; anything else would leave
        # the lock with a batch that nothing runs.
        if execution_alive({"execution": name}) is not True:
            raise
        logger.info("execution already running", extra={"execution": name})
        return
    logger.info("execution started", extra={"execution": name, "batch_id": manifest.batch_id})


def execution_alive(holder: dict[str, Any]) -> bool | None:
    """Whether the execution a lock names still runs (None: the lock names none, or it cannot be told)."""
    name = holder.get("execution")
    if not name:
        return None
    stepfunctions = boto3.client("stepfunctions")
    arn = os.environ["STATE_MACHINE_ARN"].replace(":stateMachine:", ":execution:") + f":{name}"
    try:
        status = stepfunctions.describe_execution(executionArn=arn)["status"]
    except stepfunctions.exceptions.ExecutionDoesNotExist:
        # Handed over but not started yet, or never started: the lease decides.
        return None
    return bool(status == "RUNNING")


def record_handler(record: SQSRecord) -> None:
    """One SQS message: an S3 event notification (or S3's test event)."""
    body = json.loads(record.body)
    if body.get("Event") == "s3:TestEvent":
        logger.info("skipping the S3 test event")
        return
    keys = [entry["s3"]["object"]["key"] for entry in body.get("Records", [])]
    if not any(is_raw_csv(key, _root_prefix()) for key in keys):
        logger.info("no raw CSV in this event", extra={"keys": keys})
        return
    started = start_ready_batch(
        open_store(_root()),
        start_execution,
        datetime.now(timezone.utc),
        alive=execution_alive,
        retry_while_starting=True,
    )
    if started is None:
        logger.info("no batch started: a batch is in progress or a dataset has no CSV yet")


@logger.inject_lambda_context
def lambda_handler(event: dict[str, Any], context: LambdaContext) -> PartialItemFailureResponse:
    return process_partial_response(
        event=event, record_handler=record_handler, processor=processor, context=context
    )
