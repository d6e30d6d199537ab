"""The whole chain on a moto server (``tests.aws.moto_chain``), on the single-task path: upload -> S3 event
-> SQS -> trigger -> Step Functions -> an ECS task (or a Glue job) per table running our real step command
-> archive Lambda -> crawler -> Athena -> SNS -> SQS."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Any

import boto3
import polars as pl
import pytest

from tests.aws.moto_chain import (
    BUCKET,
    CRAWLER,
    CRAWLS,
    FAILURES,
    REJECTED_CRAWLER,
    ROOT,
    deliver_events,
    deployed_chain,
    land_day,
    notifications,
    raw_keys,
    wait_for_executions,
)

pytestmark = [
    pytest.mark.slow,
    # The bridge patches the internals of the moto pinned for Python >= 3.10 (see pyproject.toml);
    # the 3.9 run is for the pipeline code that Glue runs, not for this emulation.
    pytest.mark.skipif(sys.version_info < (3, 10), reason="written for moto 5.2 (Python >= 3.10)"),
]


@pytest.fixture(scope="module")
def chain() -> Iterator[dict[str, Any]]:
    """A moto server that executes state machines, and the whole deployment on it."""
    with deployed_chain() as deployment:
        yield deployment


def test_upload_to_notification_on_fargate(chain: dict[str, Any]) -> None:
    from pipeline import delta
    from pipeline.batch import table_uri
    from pipeline.generate import generate
    from pipeline.storage import open_store

    store = open_store(ROOT)
    # Clean: the rejected tables are created later, by the batch that first rejects rows.
    generate(store, scale=0.0005, seed=31, dirty=False)
    assert deliver_events(chain["queue"]) > 0
    (execution,) = wait_for_executions(chain["machine"], 1)
    assert execution["status"] == "SUCCEEDED", notifications(chain["inbox"])
    counts = {t: delta.count_rows(table_uri(store, t)) for t in ("products", "orders", "order_items")}
    assert all(counts.values())
    (message,) = notifications(chain["inbox"])
    assert f"Batch {execution['name']} succeeded." in message
    assert f"Rows now: products {counts['products']:,}, orders {counts['orders']:,}" in message
    assert raw_keys() == []
    # The first batch created the lakehouse tables and rejected nothing: one crawl, of their crawler.
    assert CRAWLS == [CRAWLER]


def test_a_batch_that_changes_no_table_schema_starts_no_crawler(chain: dict[str, Any]) -> None:
    CRAWLS.clear()
    land_day(1)
    deliver_events(chain["queue"])
    execution = wait_for_executions(chain["machine"], 2)[-1]
    assert execution["status"] == "SUCCEEDED", notifications(chain["inbox"])
    (message,) = notifications(chain["inbox"])
    assert "succeeded" in message
    assert CRAWLS == []
    # The cost estimate counts this execution's transitions: the happy path's model, measured.
    from pipeline.costs import local_transitions
    from pipeline.report import load_report
    from pipeline.storage import open_store

    report = load_report(open_store(ROOT), execution["name"])
    assert report is not None
    assert report.cost["usage"]["transitions"] == local_transitions(3, 0, 3)
    assert report.cost["usage"]["crawls"] == 0
    assert report.cost["basis"].startswith("estimate from this execution")
    assert f"Cost on AWS: ${report.cost['usd']:.4f}" in message


def test_a_batch_that_creates_a_rejected_table_crawls_it(chain: dict[str, Any]) -> None:
    from pipeline import delta
    from pipeline.batch import rejected_uri
    from pipeline.storage import open_store

    CRAWLS.clear()
    land_day(5, amount=b"lots")  # the order is rejected, and so its item (its order is missing)
    deliver_events(chain["queue"])
    execution = wait_for_executions(chain["machine"], 3)[-1]
    assert execution["status"] == "SUCCEEDED", notifications(chain["inbox"])
    notifications(chain["inbox"])
    store = open_store(ROOT)
    assert delta.count_rows(rejected_uri(store, "orders")) == 1
    assert delta.count_rows(rejected_uri(store, "order_items")) == 1
    # One crawl for both new rejected tables; the lakehouse tables' schemas did not change.
    assert CRAWLS == [REJECTED_CRAWLER]
    from pipeline.report import load_report

    report = load_report(store, execution["name"])
    assert report is not None
    assert report.cost["usage"]["crawls"] == 1 and report.cost["by_service"]["crawler"] > 0.07


def test_a_failing_step_is_notified_with_its_cause_and_a_fixed_batch_then_loads(
    chain: dict[str, Any],
) -> None:
    from pipeline import delta
    from pipeline.batch import table_uri
    from pipeline.storage import open_store

    store = open_store(ROOT)
    before = {t: delta.table_version(table_uri(store, t)) for t in ("products", "orders", "order_items")}
    land_day(2, amount=b"\xff\xfe")  # the orders file is not UTF-8: its step fails
    deliver_events(chain["queue"])
    failed = wait_for_executions(chain["machine"], 4)[-1]
    assert failed["status"] == "FAILED"
    (message,) = notifications(chain["inbox"])
    assert f"Batch {failed['name']} failed" in message
    assert "step orders failed" in message and "raw/orders/o2.csv" in message
    assert raw_keys() == sorted(
        f"lakehouse/{k}" for k in ("raw/order_items/i2.csv", "raw/orders/o2.csv", "raw/products/p2.csv")
    )
    after = {t: delta.table_version(table_uri(store, t)) for t in ("products", "orders", "order_items")}
    assert after["orders"] == before["orders"] and after["order_items"] == before["order_items"]

    # The operator fixes the file and abandons the failed batch; the next upload starts a new one.
    store.delete(f"manifests/{failed['name']}.json")
    CRAWLS.clear()
    land_day(2)
    deliver_events(chain["queue"])
    fixed = wait_for_executions(chain["machine"], 5)[-1]
    assert fixed["status"] == "SUCCEEDED", notifications(chain["inbox"])
    # After a failed batch the catalog may be behind (a crawl or a check may have failed): all crawl.
    assert sorted(CRAWLS) == [CRAWLER, REJECTED_CRAWLER]
    assert "succeeded" in notifications(chain["inbox"])[0]
    assert raw_keys() == []
    orders = delta.scan(table_uri(store, "orders"))
    assert orders is not None
    order = orders.filter(pl.col("order_id") == 900_002).collect()
    assert order.height == 1


def test_a_failed_archive_is_notified_and_the_next_event_resumes_the_batch(chain: dict[str, Any]) -> None:
    FAILURES["ArchiveETLFiles"] = True
    land_day(3)
    deliver_events(chain["queue"])
    failed = wait_for_executions(chain["machine"], 6)[-1]
    assert failed["status"] == "FAILED"
    (message,) = notifications(chain["inbox"])
    assert "injected failure of ArchiveETLFiles" in message
    assert len(raw_keys()) == 3

    # Any later event (here a re-delivered one) resumes the unfinished batch, under a new execution name.
    boto3.client("s3").copy_object(
        Bucket=BUCKET,
        Key="lakehouse/raw/products/p3.csv",
        CopySource={"Bucket": BUCKET, "Key": "lakehouse/raw/products/p3.csv"},
        MetadataDirective="REPLACE",
    )
    deliver_events(chain["queue"])
    resumed = wait_for_executions(chain["machine"], 7)[-1]
    assert resumed["name"].startswith(failed["name"] + "-")
    assert resumed["status"] == "SUCCEEDED", notifications(chain["inbox"])
    assert raw_keys() == []


def test_the_glue_runner_loads_a_batch(chain: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline import delta
    from pipeline.batch import table_uri
    from pipeline.storage import open_store

    glue = boto3.client("glue")
    for job in ("product_etl", "orders_etl", "order_items_etl"):
        glue.create_job(
            Name=job,
            Role=chain["role"],
            Command={
                "Name": "pythonshell",
                "ScriptLocation": f"s3://{BUCKET}/glue/glue_entry.py",
                "PythonVersion": "3.9",
            },
        )
    definition = chain["definition"].replace('"runner": "fargate"', '"runner": "glue"')
    machine = boto3.client("stepfunctions").create_state_machine(
        name="EcommerceETLPipelineGlue", definition=definition, roleArn=chain["role"]
    )["stateMachineArn"]
    monkeypatch.setenv("STATE_MACHINE_ARN", machine)
    store = open_store(ROOT)
    land_day(4)
    deliver_events(chain["queue"])
    (execution,) = wait_for_executions(machine, 1)
    assert execution["status"] == "SUCCEEDED", notifications(chain["inbox"])
    runs = glue.get_job_runs(JobName="orders_etl")["JobRuns"]
    assert [run["Arguments"]["--table"] for run in runs] == ["orders"]
    assert "succeeded" in notifications(chain["inbox"])[0]
    orders = delta.scan(table_uri(store, "orders"))
    assert orders is not None
    assert orders.filter(pl.col("order_id") == 900_004).collect().height == 1
