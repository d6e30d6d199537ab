"""The Lambda handlers against moto: idempotent starts, no overlapping batches, exact archiving."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import boto3
import pytest

from handlers import archive_files, check_data_availability, finish_batch
from pipeline.lock import LOCK_KEY, lock_holder
from pipeline.manifest import read_manifest
from pipeline.report import save_step_error
from pipeline.storage import open_store
from tests.aws.conftest import BUCKET, ROOT, executions, lambda_context, put, s3_message

ALL = ("raw/products/p.csv", "raw/orders/o.csv", "raw/order_items/i.csv")


def trigger(*records: dict[str, Any]) -> dict[str, Any]:
    return dict(check_data_availability.lambda_handler({"Records": list(records)}, lambda_context()))


def keys(prefix: str) -> list[str]:
    listing = boto3.client("s3").list_objects_v2(Bucket=BUCKET, Prefix=f"lakehouse/{prefix}")
    return sorted(obj["Key"][len("lakehouse/") :] for obj in listing.get("Contents", []))


def test_handlers_import_neither_polars_nor_deltalake() -> None:
    code = (
        "import sys, handlers.check_data_availability, handlers.archive_files, handlers.finish_batch,"
        " handlers.catalog_changes;"
        "heavy = [m for m in ('polars', 'deltalake', 'pyarrow', 'numpy') if m in sys.modules];"
        "assert not heavy, heavy"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr


def test_test_event_and_non_csv_keys_start_nothing(aws: dict[str, Any]) -> None:
    for key in ALL:
        put(key)
    test_event = {**s3_message(message_id="t"), "body": json.dumps({"Event": "s3:TestEvent"})}
    result = trigger(test_event, s3_message("raw/orders/readme.txt"), s3_message("archived/x.csv"))
    assert result == {"batchItemFailures": []}
    assert executions(aws["state_machine"]) == []


def test_waits_until_every_dataset_has_a_csv(aws: dict[str, Any]) -> None:
    put(ALL[0])
    put(ALL[1])
    trigger(s3_message(ALL[0]), s3_message(ALL[1]))
    assert executions(aws["state_machine"]) == []
    assert keys("manifests/") == []
    put(ALL[2])
    trigger(s3_message(ALL[2]))
    (execution,) = executions(aws["state_machine"])
    manifest = read_manifest(open_store(ROOT), execution["name"])
    assert [e.key for entries in manifest.files.values() for e in entries] == [ALL[0], ALL[1], ALL[2]]


def test_url_encoded_keys_are_decoded(aws: dict[str, Any]) -> None:
    names = ("raw/products/new products.csv", "raw/orders/o+1.csv", "raw/order_items/i.csv")
    for key in names:
        put(key)
    trigger(s3_message(*names))
    (execution,) = executions(aws["state_machine"])
    manifest = read_manifest(open_store(ROOT), execution["name"])
    assert manifest.files["products"][0].key == "raw/products/new products.csv"


def test_duplicate_and_redelivered_events_start_one_execution(aws: dict[str, Any]) -> None:
    for key in ALL:
        put(key)
    messages = [s3_message(key, message_id=f"m{i}") for i, key in enumerate(ALL)]
    trigger(*messages)
    trigger(*messages)  # SQS is at-least-once: the same messages again
    assert len(executions(aws["state_machine"])) == 1
    assert lock_holder(open_store(ROOT))["batch"] == executions(aws["state_machine"])[0]["name"]


def test_files_landing_during_a_batch_start_the_next_one_when_it_finishes(aws: dict[str, Any]) -> None:
    for key in ALL:
        put(key)
    trigger(s3_message(*ALL))
    (first,) = executions(aws["state_machine"])
    store = open_store(ROOT)
    manifest = read_manifest(store, first["name"])
    # The batch runs: its files are archived; meanwhile a new day's files land and find the lock.
    archive_files.lambda_handler({"root": ROOT, "manifest": manifest.key}, lambda_context())
    later = ("raw/products/p2.csv", "raw/orders/o2.csv", "raw/order_items/i2.csv")
    for key in later:
        put(key, b"h\n2\n")  # new content: the same bytes again would be skipped as already loaded
    trigger(s3_message(*later))
    assert len(executions(aws["state_machine"])) == 1
    _write_step_reports(manifest.batch_id)
    result = finish_batch.lambda_handler(
        {
            "root": ROOT,
            "batch_id": manifest.batch_id,
            "manifest": manifest.key,
            "status": "SUCCEEDED",
            "counts": [{"table": t, "rows": "1"} for t in ("products", "orders", "order_items")],
        },
        lambda_context(),
    )
    assert result["next_batch"] is not None and result["next_batch"] != manifest.batch_id
    assert "succeeded" in result["subject"] and "products: 1 rows in" in result["message"]
    assert len(executions(aws["state_machine"])) == 2
    second = read_manifest(store, result["next_batch"])
    assert sorted(e.key for entries in second.files.values() for e in entries) == sorted(later)


def test_a_failed_batch_releases_the_lock_and_is_resumed_by_the_next_upload(aws: dict[str, Any]) -> None:
    for key in ALL:
        put(key)
    trigger(s3_message(*ALL))
    (first,) = executions(aws["state_machine"])
    result = finish_batch.lambda_handler(
        {
            "root": ROOT,
            "batch_id": first["name"],
            "manifest": f"manifests/{first['name']}.json",
            "status": "FAILED",
            "error": "States.TaskFailed",
            "cause": "step orders failed: boom",
        },
        lambda_context(),
    )
    assert "FAILED" in result["subject"] and "step orders failed: boom" in result["message"]
    assert "next_batch" not in result
    assert open_store(ROOT).stat(LOCK_KEY) is None
    assert keys("raw/") == sorted(ALL)
    put("raw/orders/o2.csv")
    trigger(s3_message("raw/orders/o2.csv"))
    names = sorted(e["name"] for e in executions(aws["state_machine"]))
    assert len(names) == 2 and names[1].startswith(first["name"] + "-")
    resumed = json.loads(
        boto3.client("stepfunctions").describe_execution(
            executionArn=next(e for e in executions(aws["state_machine"]) if e["name"] == names[1])[
                "executionArn"
            ]
        )["input"]
    )
    assert resumed["batch_id"] == first["name"]


def test_a_failing_record_is_reported_for_retry(aws: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ALL:
        put(key)

    def throttled(*args: object, **kwargs: object) -> None:
        raise RuntimeError("ThrottlingException")

    monkeypatch.setattr(check_data_availability, "start_ready_batch", throttled)
    result = trigger(
        s3_message(ALL[0], message_id="ok-but-failing"), s3_message("raw/x.txt", message_id="skip")
    )
    assert result == {"batchItemFailures": [{"itemIdentifier": "ok-but-failing"}]}


def test_archive_moves_exactly_the_manifest_files_and_is_idempotent(aws: dict[str, Any]) -> None:
    for key in ALL:
        put(key)
    trigger(s3_message(*ALL))
    (execution,) = executions(aws["state_machine"])
    put("raw/orders/late.csv")
    event = {"root": ROOT, "manifest": f"manifests/{execution['name']}.json"}
    assert archive_files.lambda_handler(event, lambda_context())["archived_files"] == 3
    assert archive_files.lambda_handler(event, lambda_context())["archived_files"] == 3
    assert keys("raw/") == ["raw/orders/late.csv"]
    assert keys(f"archived/orders/{execution['name']}/") == [f"archived/orders/{execution['name']}/o.csv"]


def _write_step_reports(batch_id: str) -> None:
    from pipeline.report import StepReport, save_step_report

    store = open_store(ROOT)
    for table in ("products", "orders", "order_items"):
        save_step_report(store, batch_id, StepReport(table, 1, 1, 1, 0, 0, 0, {}, 0, None, 0.1))


def _finish(batch_id: str) -> dict[str, Any]:
    _write_step_reports(batch_id)
    return dict(
        finish_batch.lambda_handler(
            {
                "root": ROOT,
                "batch_id": batch_id,
                "manifest": f"manifests/{batch_id}.json",
                "status": "SUCCEEDED",
                "counts": [{"table": t, "rows": "1"} for t in ("products", "orders", "order_items")],
            },
            lambda_context(),
        )
    )


def test_the_same_files_again_after_their_batch_finished_are_skipped_and_free_the_lock(
    aws: dict[str, Any],
) -> None:
    for key in ALL:
        put(key)
    trigger(s3_message(*ALL))
    (first,) = executions(aws["state_machine"])
    archive_files.lambda_handler(
        {"root": ROOT, "manifest": f"manifests/{first['name']}.json"}, lambda_context()
    )
    _finish(first["name"])
    for key in ALL:  # uploaded again, byte for byte
        put(key)
    trigger(s3_message(*ALL))
    assert len(executions(aws["state_machine"])) == 1, "no execution for files loaded already"
    store = open_store(ROOT)
    assert store.stat(LOCK_KEY) is None
    assert keys("raw/") == []
    reports = [key for key in keys("reports/") if key.count("/") == 1 and key.endswith(".json")]
    assert len(reports) == 2
    put("raw/orders/o3.csv", b"h\n3\n")
    for key in ("raw/products/p.csv", "raw/order_items/i.csv"):
        put(key)
    trigger(s3_message("raw/orders/o3.csv"))
    assert len(executions(aws["state_machine"])) == 2, "new content starts a batch again"


def test_a_lock_whose_execution_ended_is_taken_over(aws: dict[str, Any]) -> None:
    for key in ALL:
        put(key)
    trigger(s3_message(*ALL))
    (first,) = executions(aws["state_machine"])
    # The execution is stopped from outside: FinishBatch never runs, the lock stays with it.
    boto3.client("stepfunctions").stop_execution(executionArn=first["executionArn"])
    assert lock_holder(open_store(ROOT))["execution"] == first["name"]
    put("raw/orders/o2.csv", b"h\n2\n")
    trigger(s3_message("raw/orders/o2.csv"))
    names = sorted(e["name"] for e in executions(aws["state_machine"]))
    assert len(names) == 2 and names[1].startswith(first["name"] + "-"), "the stopped batch is resumed"


def test_an_event_that_finds_another_trigger_starting_is_retried(aws: dict[str, Any]) -> None:
    """That trigger's snapshot may have missed this event's file: the message must come again."""
    from pipeline.lock import acquire_lock

    for key in ALL:
        put(key)
    starting = acquire_lock(open_store(ROOT), "starting")
    result = trigger(s3_message(ALL[2], message_id="late"), s3_message("raw/readme.txt", message_id="other"))
    assert result == {"batchItemFailures": [{"itemIdentifier": "late"}]}
    starting.release()
    assert trigger(s3_message(ALL[2], message_id="late")) == {"batchItemFailures": []}
    assert len(executions(aws["state_machine"])) == 1


def _start_batch(aws: dict[str, Any]) -> str:
    """Land every dataset's file and let the trigger start their batch; its id."""
    for key in ALL:
        put(key)
    trigger(s3_message(*ALL))
    (execution,) = executions(aws["state_machine"])
    return str(execution["name"])


def test_a_step_already_done_is_not_run_again(
    aws: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    from pipeline.cli import main

    batch_id = _start_batch(aws)
    _write_step_reports(batch_id)
    main(["step", "products", "--root", ROOT, "--manifest", batch_id])
    assert "done already" in capsys.readouterr().out


def test_a_failed_step_s_own_sentence_is_the_cause_in_the_message(aws: dict[str, Any]) -> None:
    """On Fargate the task's failure says only that the container exited; the step kept why."""
    for key in ALL:
        put(key)
    trigger(s3_message(*ALL))
    (first,) = executions(aws["state_machine"])
    sentence = "step orders failed: raw/orders/o.csv line 2, column order_id: 'x' is not an integer"
    save_step_error(open_store(ROOT), first["name"], "orders", sentence)
    result = finish_batch.lambda_handler(
        {
            "root": ROOT,
            "batch_id": first["name"],
            "manifest": f"manifests/{first['name']}.json",
            "status": "FAILED",
            "error": "States.TaskFailed",
            "cause": '{"StopCode": "EssentialContainerExited", "Containers": [{"ExitCode": 1}]}',
        },
        lambda_context(),
    )
    lines = result["message"].splitlines()
    assert lines[1] == f"Cause: {sentence}"
    assert "EssentialContainerExited" in lines[2]


def _plan_catalog(batch_id: str) -> dict[str, Any]:
    from handlers import catalog_changes

    crawlers = {"lakehouse": "lake-crawler", "rejected": "rejected-crawler"}
    return dict(
        catalog_changes.lambda_handler(
            {"root": ROOT, "batch_id": batch_id, "crawlers": crawlers}, lambda_context()
        )
    )


def _report_schemas(batch_id: str, schemas: dict[str, dict[str, str]]) -> list[Any]:
    """Step reports of a batch with these schema digests (saved, and returned as FinishBatch has them)."""
    from pipeline.report import StepReport, save_step_report

    store, steps = open_store(ROOT), []
    for table, digests in schemas.items():
        step = StepReport(table, 1, 1, 1, 0, 0, 0, {}, 0, None, 0.1, schemas=digests)
        save_step_report(store, batch_id, step)
        steps.append(step)
    return steps


def test_crawlers_run_for_new_or_changed_tables_only(aws: dict[str, Any]) -> None:
    from pipeline.catalog import record_catalog

    store = open_store(ROOT)
    first = {"products": {"products": "a"}, "orders": {"orders": "b"}, "order_items": {"order_items": "c"}}
    steps = _report_schemas("b1", first)
    assert _plan_catalog("b1") == {
        "changed": ["order_items", "orders", "products"],
        "crawlers": ["lake-crawler"],
    }
    record_catalog(store, steps)  # FinishBatch, once the batch succeeded

    _report_schemas("b2", first)
    assert _plan_catalog("b2") == {"changed": [], "crawlers": []}

    # The first rejected rows of orders create rejected_orders: only the rejected tables' crawler runs.
    steps = _report_schemas("b3", {**first, "orders": {"orders": "b", "rejected_orders": "r"}})
    assert _plan_catalog("b3") == {"changed": ["rejected_orders"], "crawlers": ["rejected-crawler"]}
    record_catalog(store, steps)

    # A schema change of a lakehouse table and a new rejected table: both crawl.
    _report_schemas("b4", {**first, "products": {"products": "a2", "rejected_products": "s"}})
    assert _plan_catalog("b4") == {
        "changed": ["products", "rejected_products"],
        "crawlers": ["lake-crawler", "rejected-crawler"],
    }


def test_a_failed_batch_makes_the_next_one_crawl_everything(aws: dict[str, Any]) -> None:
    from pipeline.catalog import record_catalog

    store = open_store(ROOT)
    schemas = {"products": {"products": "a", "rejected_products": "r"}, "orders": {"orders": "b"}}
    record_catalog(store, _report_schemas("b1", schemas))
    _report_schemas("b2", schemas)
    assert _plan_catalog("b2")["crawlers"] == []
    finish_batch.lambda_handler(
        {"root": ROOT, "batch_id": "b2", "manifest": "manifests/b2.json", "status": "FAILED"},
        lambda_context(),
    )
    assert _plan_catalog("b2")["crawlers"] == ["lake-crawler", "rejected-crawler"]


def test_finish_prices_the_batch_on_the_task_it_is_told_of(
    aws: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipeline.report import load_report

    monkeypatch.setenv("LAKEHOUSE_TASK_SIZE", json.dumps({"runner": "glue", "glue_dpu": 0.0625}))
    batch_id = _start_batch(aws)
    result = _finish(batch_id)
    report = load_report(open_store(ROOT), batch_id)
    assert report is not None
    # Three steps of 0.1 s, billed a minute each at 0.0625 DPU; no execution named: transitions modelled.
    assert report.cost["by_service"]["glue"] == pytest.approx(3 * 60 * 0.0625 / 3600 * 0.44, abs=1e-8)
    assert report.cost["usage"]["crawls"] == 0 and report.cost["usage"]["athena_bytes"] == 3 * 10_000_000
    assert "Glue Python shell, 0.0625 DPU" in report.cost["basis"]
    assert f"Cost on AWS: ${report.cost['usd']:.4f} (" in result["message"]


def _emf_blobs(printed: str) -> list[dict[str, Any]]:
    """The Embedded Metric Format objects a handler printed (one JSON object per line with ``_aws``)."""
    blobs = []
    for line in printed.splitlines():
        if line.startswith("{") and '"_aws"' in line:
            blob = json.loads(line)
            # A metric's values are a list (one value per add_metric call): each is added once here.
            metrics = blob["_aws"]["CloudWatchMetrics"][0]["Metrics"]
            for metric in metrics:
                (blob[metric["Name"]],) = blob[metric["Name"]]
            blobs.append(blob)
    return blobs


def test_finish_publishes_the_batch_s_metrics_per_table_and_reason(
    aws: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    from pipeline.report import StepReport, save_step_report

    batch_id = _start_batch(aws)
    store = open_store(ROOT)
    figures = {"products": (10, 9, 0, 1), "orders": (200, 150, 10, 40), "order_items": (0, 0, 0, 0)}
    for table, (rows_in, inserted, updated, rejected) in figures.items():
        reasons = {"null:user_id": 30, "duplicate_key": 15} if table == "orders" else {}
        step = StepReport(table, 1, rows_in, inserted, updated, 0, rejected, reasons, 1, None, 0.5)
        save_step_report(store, batch_id, step)
    capsys.readouterr()
    finish_batch.lambda_handler(
        {
            "root": ROOT,
            "batch_id": batch_id,
            "manifest": f"manifests/{batch_id}.json",
            "status": "SUCCEEDED",
            "counts": [{"table": t, "rows": "1"} for t in figures],
        },
        lambda_context(),
    )
    blobs = _emf_blobs(capsys.readouterr().out)
    for blob in blobs:
        (directive,) = blob["_aws"]["CloudWatchMetrics"]
        assert directive["Namespace"] == finish_batch.NAMESPACE == "EcommerceLakehouse"
        assert blob["service"] == "ecommerce-lakehouse"
    per_table = {blob["table"]: blob for blob in blobs if "table" in blob and "reason" not in blob}
    assert sorted(per_table) == sorted(figures)
    for table, (rows_in, inserted, updated, rejected) in figures.items():
        blob = per_table[table]
        assert (blob["RowsIn"], blob["Inserted"], blob["Updated"], blob["Rejected"]) == (
            rows_in,
            inserted,
            updated,
            rejected,
        )
        assert blob["RejectedShare"] == pytest.approx(100 * rejected / rows_in if rows_in else 0.0)
    assert per_table["orders"]["RejectedShare"] == 20.0
    by_reason = {(b["table"], b["reason"]): b["RejectedByReason"] for b in blobs if "reason" in b}
    assert by_reason == {("orders", "duplicate_key"): 15, ("orders", "null:user_id"): 30}
    (batch,) = [blob for blob in blobs if "BatchSeconds" in blob]
    assert batch["EstimatedCostUSD"] > 0 and "table" not in batch


def test_finish_writes_the_html_report_served_as_html_before_the_json_one(aws: dict[str, Any]) -> None:
    batch_id = _start_batch(aws)
    result = _finish(batch_id)
    s3 = boto3.client("s3")
    page = s3.get_object(Bucket=BUCKET, Key=f"lakehouse/reports/{batch_id}.html")
    assert page["ContentType"] == "text/html; charset=utf-8"  # a browser opening it from S3 shows it
    text = page["Body"].read().decode()
    assert text.startswith("<!DOCTYPE html>") and batch_id in text and "Plotly.newPlot" in text
    json_report = s3.get_object(Bucket=BUCKET, Key=f"lakehouse/reports/{batch_id}.json")
    assert json_report["ContentType"] == "application/json"
    # The JSON report finishes the batch: it is written last.
    assert page["LastModified"] <= json_report["LastModified"]
    assert f"Report: s3://{BUCKET}/lakehouse/reports/{batch_id}.html" in result["message"]


def test_a_report_that_cannot_be_drawn_does_not_fail_the_batch(
    aws: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipeline.report import load_report

    monkeypatch.setitem(sys.modules, "plotly", None)  # as in a Lambda deployed without the report layer
    batch_id = _start_batch(aws)
    result = _finish(batch_id)
    assert "succeeded" in result["subject"]
    assert "Report: none (the HTML report could not be written: " in result["message"]
    assert load_report(open_store(ROOT), batch_id) is not None
    assert f"reports/{batch_id}.json" in keys("reports/")
    assert not [key for key in keys("reports/") if key.endswith(".html")]
