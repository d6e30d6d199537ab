"""AWS fixtures for the Lambda handlers: moto in process (the handlers use boto3 only)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, cast

import boto3
import pytest
from aws_lambda_powertools.utilities.typing import LambdaContext
from moto import mock_aws

BUCKET = "lake-bucket"
ROOT = f"s3://{BUCKET}/lakehouse"


@dataclass
class FakeLambdaContext:
    """The fields powertools reads from a Lambda context."""

    function_name: str = "test"
    memory_limit_in_mb: int = 128
    invoked_function_arn: str = "arn:aws:lambda:us-east-1:123456789012:function:test"
    aws_request_id: str = "52fdfc07-2182-154f-163f-5f0f9a621d72"


def lambda_context() -> LambdaContext:
    return cast(LambdaContext, FakeLambdaContext())


@pytest.fixture
def aws(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    # Explicitly not executing state machines: the end-to-end test's moto server turns that on for the
    # whole process (moto's configuration is global), and here an execution must stay RUNNING.
    with mock_aws(config={"stepfunctions": {"execute_state_machine": False}}):
        boto3.client("s3").create_bucket(Bucket=BUCKET)
        machine = boto3.client("stepfunctions").create_state_machine(
            name="EcommerceETLPipeline",
            definition=json.dumps({"StartAt": "Done", "States": {"Done": {"Type": "Succeed"}}}),
            roleArn="arn:aws:iam::123456789012:role/sfn",
        )
        monkeypatch.setenv("LAKEHOUSE_ROOT", ROOT)
        monkeypatch.setenv("STATE_MACHINE_ARN", machine["stateMachineArn"])
        yield {"state_machine": machine["stateMachineArn"]}


def put(key: str, body: bytes = b"h\n1\n") -> None:
    boto3.client("s3").put_object(Bucket=BUCKET, Key=f"lakehouse/{key}", Body=body)


def s3_message(*keys: str, message_id: str = "m1") -> dict[str, Any]:
    """An SQS record carrying an S3 notification, keys URL-encoded as S3 sends them."""
    from urllib.parse import quote_plus

    body = {
        "Records": [
            {
                "eventSource": "aws:s3",
                "eventName": "ObjectCreated:Put",
                "s3": {
                    "bucket": {"name": BUCKET},
                    "object": {"key": quote_plus(f"lakehouse/{key}", safe="/")},
                },
            }
            for key in keys
        ]
    }
    return {
        "messageId": message_id,
        "receiptHandle": "r",
        "body": json.dumps(body),
        "attributes": {},
        "messageAttributes": {},
        "md5OfBody": "",
        "eventSource": "aws:sqs",
        "eventSourceARN": "arn:aws:sqs:us-east-1:123456789012:ecommerce-etl-queue",
        "awsRegion": "us-east-1",
    }


def executions(arn: str) -> list[dict[str, Any]]:
    return list(boto3.client("stepfunctions").list_executions(stateMachineArn=arn)["executions"])
