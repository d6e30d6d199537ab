"""The deployment on a moto server that the end-to-end tests drive: upload -> S3 event -> SQS -> trigger ->
Step Functions (executed by moto) -> ECS tasks running our real CLI -> archive Lambda -> crawler -> Athena
-> SNS -> SQS.

moto runs the state machine itself (its ``execute_state_machine`` setting). Where moto stops short of
AWS, small test-side patches bridge it, each commented; they are written for the moto pinned in
pyproject.toml (5.2.5 on Python >= 3.10) and reach into its internals on purpose:
- ECS ``RunTask`` starts no container: the patch runs the task's command as a subprocess of the real
  ``lakehouse`` CLI against the moto bucket, and the ``.sync`` integration fails the state when the
  container exited non-zero, as AWS does;
- Lambda without Docker runs no code: the patch calls our handler module for the function's name;
- Athena executes no SQL: the patch answers ``SELECT COUNT(*) FROM ecommerce_dwh.<table>`` honestly,
  from the Delta table;
- a Distributed Map's ``listObjectsV2`` reader breaks on an empty listing, and a failed child does not
  fail the Map run: both as on AWS;
- Wait states really wait: the patch caps a wait at 50 ms so a test takes seconds, not minutes.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import socket
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.request import Request, urlopen

import boto3
import pytest

from tests.aws.conftest import lambda_context
from tests.statemachine.test_definition import rendered

BUCKET = "e2e-lake"
ROOT = f"s3://{BUCKET}/lakehouse"
ACCOUNT = "123456789012"
REGION = "us-east-1"
PROJECT = Path(__file__).resolve().parents[2]
# Lambda functions whose next invocation fails (a test injects a failure by adding a name).
FAILURES: dict[str, bool] = {}
# The crawlers started, in order (every StartCrawler call the state machine makes).
CRAWLS: list[str] = []
# Every command an ECS task ran, in order (a spy); and the next task whose command names a key of KILLS
# is stopped, as an out-of-memory kill or a Spot interruption stops one: "before" its container runs, or
# "after" a unit's work is done (its output written, its MERGE committed) but before its report landed.
COMMANDS: list[list[str]] = []
KILLS: dict[str, str] = {}
CRAWLER, REJECTED_CRAWLER = "ecommerce-lakehouse-crawler", "ecommerce-lakehouse-rejected-crawler"


ORDER_HEADER = b"order_num,order_id,user_id,order_timestamp,total_amount,date\n"
ITEM_HEADER = (
    b"id,order_id,user_id,days_since_prior_order,product_id,"
    b"add_to_cart_order,reordered,order_timestamp,date\n"
)


PRODUCT_HEADER = b"product_id,department_id,department,product_name\n"


def land_day(n: int, amount: bytes = b"4.5") -> None:
    """Land one product, one order (id 900000 + n, on 2025-06-n) and its item, one file per dataset."""
    from pipeline.storage import open_store

    store = open_store(ROOT)
    day, order, product = f"2025-06-{n:02d}".encode(), str(900_000 + n).encode(), str(9_000 + n).encode()
    store.write_bytes(f"raw/products/p{n}.csv", PRODUCT_HEADER + product + b",1,x,y\n")
    store.write_bytes(
        f"raw/orders/o{n}.csv",
        ORDER_HEADER + b"1," + order + b",1," + day + b"T10:00:00," + amount + b"," + day + b"\n",
    )
    store.write_bytes(
        f"raw/order_items/i{n}.csv",
        ITEM_HEADER + order + b"," + order + b",1,," + product + b",1,0," + day + b"T10:00:00," + day + b"\n",
    )


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _aws_environment(endpoint: str) -> dict[str, str]:
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": REGION,
        "AWS_REGION": REGION,
        "AWS_ALLOW_HTTP": "true",
    }


def _forget_unit_report(command: list[str]) -> None:
    """Delete the report of the unit that ``stage run <item>`` ran: as if its task died just before it."""
    from pipeline.storage import open_store
    from pipeline.workitems import unit_report_key

    assert command[:2] == ["stage", "run"], command
    batch_id, table, stage, unit = command[2].split("/plan/")[1].removesuffix(".json").split("/")
    open_store(ROOT).delete(unit_report_key(batch_id, table, stage, int(unit)))


def _recase(value: Any, first: Any) -> Any:
    """``value`` with every dict key's first letter passed through ``first`` (camelCase <-> PascalCase)."""
    if isinstance(value, dict):
        return {first(key[:1]) + key[1:]: _recase(item, first) for key, item in value.items()}
    if isinstance(value, list):
        return [_recase(item, first) for item in value]
    return value


def _patch_moto(monkeypatch: pytest.MonkeyPatch, endpoint: str) -> None:
    from moto.athena.models import AthenaBackend, QueryResults
    from moto.awslambda_simple.models import LambdaSimpleBackend
    from moto.ecs.models import EC2ContainerServiceBackend
    from moto.stepfunctions.parser.asl.component.state.exec.state_task.service import (
        state_task_service_ecs,
    )
    from moto.stepfunctions.parser.asl.component.state.wait.wait_function import wait_function

    from handlers import archive_files, catalog_changes, finish_batch

    child_env = {**os.environ, **_aws_environment(endpoint)}

    # moto's awsvpc task attachment reads an ENI attribute its EC2 model does not define.
    from moto.ec2.models.elastic_network_interfaces import NetworkInterface

    monkeypatch.setattr(
        NetworkInterface,
        "private_dns_name",
        property(lambda eni: f"ip-{eni.private_ip_address.replace('.', '-')}.ec2.internal"),
        raising=False,
    )

    # AWS reports a finished crawl as LastCrawl.Status SUCCEEDED; moto says COMPLETED.
    from moto.glue.models import FakeCrawler

    real_crawler_dict = FakeCrawler.as_dict

    def crawler_dict(self: Any) -> dict[str, Any]:
        data = dict(real_crawler_dict(self))
        if data.get("LastCrawl", {}).get("Status") == "COMPLETED":
            data["LastCrawl"] = {**data["LastCrawl"], "Status": "SUCCEEDED"}
        return data

    monkeypatch.setattr(FakeCrawler, "as_dict", crawler_dict)

    # A spy, not a change: which crawlers the state machine starts.
    from moto.glue.models import GlueBackend

    real_start_crawler = GlueBackend.start_crawler

    def start_crawler(self: Any, name: str) -> None:
        CRAWLS.append(name)
        real_start_crawler(self, name)

    monkeypatch.setattr(GlueBackend, "start_crawler", start_crawler)

    real_run_task = EC2ContainerServiceBackend.run_task
    stderr_of_task: dict[str, str] = {}

    def run_task(self: Any, *args: Any, **kwargs: Any) -> Any:
        # moto's RunTask starts nothing; run the container's command with the image's entrypoint.
        tasks = real_run_task(self, *args, **kwargs)
        overrides = kwargs.get("overrides") or (args[3] if len(args) > 3 else None) or {}
        command = overrides["containerOverrides"][0]["command"]
        COMMANDS.append(list(command))
        killed = next((name for name in sorted(KILLS) if any(name in part for part in command)), None)
        when = KILLS.pop(killed) if killed is not None else None
        if when != "before":
            done = subprocess.run(
                [sys.executable, "-m", "pipeline", *command],
                env=child_env,
                capture_output=True,
                text=True,
                check=False,
                cwd=PROJECT,
            )
        if when is not None:
            if when == "after":
                _forget_unit_report(command)
            done = subprocess.CompletedProcess(command, 137, "", "OutOfMemoryError: container killed")
        for task in tasks:
            # The container ran to completion above, so the task is over.
            task.last_status = "STOPPED"
            task.desired_status = "STOPPED"
            task.containers[0].exitCode = done.returncode
            stderr_of_task[task.task_arn] = (done.stderr.strip().splitlines() or [""])[-1]
        return tasks

    monkeypatch.setattr(EC2ContainerServiceBackend, "run_task", run_task)

    # AWS's ECS integration takes PascalCase parameters and returns PascalCase output; moto's port of
    # the interpreter leaves both conversions out (botocore then rejects "Cluster").
    def normalise_parameters(self: Any, parameters: dict[str, Any], *args: Any, **kwargs: Any) -> None:
        converted = _recase(parameters, str.lower)
        parameters.clear()
        parameters.update(converted)

    def normalise_response(self: Any, response: Any, *args: Any, **kwargs: Any) -> None:
        converted = _recase(response, str.upper)
        response.clear()
        response.update(converted)

    monkeypatch.setattr(
        state_task_service_ecs.StateTaskServiceEcs, "_normalise_parameters", normalise_parameters
    )
    # AWS's runTask integration accepts CapacityProviderStrategy (how the definition picks FARGATE or
    # FARGATE_SPOT); moto's port filters parameters through a list that lacks it.
    supported = state_task_service_ecs._SUPPORTED_API_PARAM_BINDINGS
    monkeypatch.setitem(supported, "runtask", {*supported["runtask"], "CapacityProviderStrategy"})
    monkeypatch.setattr(state_task_service_ecs.StateTaskServiceEcs, "_normalise_response", normalise_response)

    real_resolver = state_task_service_ecs.StateTaskServiceEcs._build_sync_resolver

    def build_sync_resolver(self: Any, *args: Any, **kwargs: Any) -> Any:
        # AWS fails runTask.sync when an essential container exits non-zero; moto's resolver does not.
        resolve = real_resolver(self, *args, **kwargs)
        assert resolve is not None

        def resolve_and_check() -> Any:
            task = resolve()
            if task is not None:
                codes = [c.get("ExitCode", 0) for c in task.get("Containers", [])]
                if any(code not in (0, None) for code in codes):
                    reason = stderr_of_task.get(task["TaskArn"], "")
                    raise RuntimeError(f"Essential container in task exited with code {codes[0]}: {reason}")
            return task

        return resolve_and_check

    monkeypatch.setattr(
        state_task_service_ecs.StateTaskServiceEcs, "_build_sync_resolver", build_sync_resolver
    )

    handlers = {
        "ArchiveETLFiles": archive_files,
        "CatalogChanges": catalog_changes,
        "FinishBatch": finish_batch,
    }
    failures = FAILURES

    def invoke(
        self: Any, function_name: str, qualifier: Any, body: Any, headers: Any, response_headers: Any
    ) -> bytes:
        # moto without Docker runs no function code: call our handler in process instead.
        name = function_name.split(":function:")[-1].split(":")[0]
        try:
            event = json.loads(body) if body else {}
            if failures.pop(name, None):
                raise ConnectionError(f"injected failure of {name}")
            result = handlers[name].lambda_handler(event, lambda_context())
        except Exception as error:  # reported the way Lambda reports an unhandled error
            response_headers["x-amz-function-error"] = "Unhandled"
            return json.dumps({"errorType": type(error).__name__, "errorMessage": str(error)}).encode()
        return json.dumps(result).encode()

    monkeypatch.setattr(LambdaSimpleBackend, "invoke", invoke)

    def get_query_results(self: Any, exec_id: str) -> QueryResults:
        # moto executes no SQL: answer the COUNT(*) the state machine asks for from the Delta table.
        from pipeline import delta
        from pipeline.batch import table_uri
        from pipeline.storage import open_store

        query = self.executions[exec_id].query
        match = re.fullmatch(r"SELECT COUNT\(\*\) FROM ecommerce_dwh\.(\w+)", query.strip())
        assert match, f"unexpected Athena query {query!r}"
        count = delta.count_rows(table_uri(open_store(ROOT), match.group(1)))
        header = {"Data": [{"VarCharValue": "_col0"}]}
        return QueryResults(rows=[header, {"Data": [{"VarCharValue": str(count)}]}], column_info=[])

    monkeypatch.setattr(AthenaBackend, "get_query_results", get_query_results)

    # moto's Glue job runs run nothing: run our Glue entry script with the run's arguments (and one of
    # Glue's own, which the script must ignore), and fail the run when the script fails.
    from moto.glue.models import FakeJob, FakeJobRun

    real_start_job_run = FakeJob.start_job_run

    def start_job_run(self: Any, *args: Any, **kwargs: Any) -> str:
        run_id = real_start_job_run(self, *args, **kwargs)
        run = self.get_job_run(run_id)
        argv = ["--job-bookmark-option", "job-bookmark-disable"]
        for name, value in (kwargs.get("arguments") or {}).items():
            argv += [name, value]
        done = subprocess.run(
            [sys.executable, str(PROJECT / "containers" / "glue_entry.py"), *argv],
            env=child_env,
            capture_output=True,
            text=True,
            check=False,
            cwd=PROJECT,
        )
        if done.returncode:
            run.status = "FAILED"
            run.error_message = (done.stderr.strip().splitlines() or [""])[-1]
        return str(run_id)

    monkeypatch.setattr(FakeJob, "start_job_run", start_job_run)

    # moto's .sync code releases a callback endpoint that it only creates for services supporting
    # waitForTaskToken, so glue:startJobRun.sync crashes on None; give Glue that endpoint too.
    from moto.stepfunctions.parser.asl.component.state.exec.state_task.service import state_task_service_glue
    from moto.stepfunctions.parser.asl.component.state.exec.state_task.service.resource import (
        ResourceCondition,
    )

    monkeypatch.setattr(
        state_task_service_glue,
        "_SUPPORTED_INTEGRATION_PATTERNS",
        {ResourceCondition.Sync, ResourceCondition.WaitForTaskToken},
    )
    real_run_dict = FakeJobRun.as_dict

    def run_dict(self: Any) -> dict[str, Any]:
        data = dict(real_run_dict(self))
        if getattr(self, "error_message", None):
            data["ErrorMessage"] = self.error_message
        return data

    monkeypatch.setattr(FakeJobRun, "as_dict", run_dict)

    # A Map iteration that fails with a States.* error (a failed task) must fail the Map with that error
    # and its cause, as on AWS; moto's iteration worker wraps the name in a CustomErrorName, which
    # refuses the States. prefix and replaces the real cause with that refusal.
    from moto.stepfunctions.parser.asl.component.common.error_name.error_name import ErrorName
    from moto.stepfunctions.parser.asl.component.state.exec.state_map.iteration import iteration_worker

    class IterationErrorName(ErrorName):
        def __init__(self, error_name: str | None) -> None:
            super().__init__(error_name=error_name)

    monkeypatch.setattr(iteration_worker, "CustomErrorName", IterationErrorName)

    # A Distributed Map's listObjectsV2 reader: AWS gives no item for an empty listing (a stage with no
    # unit, such as moves in a batch that moves no row); moto's reads the listing's absent "Contents".
    from moto.stepfunctions.parser.asl.component.state.exec.state_map.item_reader.eval import (
        resource_eval_s3 as item_reader_s3,
    )

    def list_objects_v2(env: Any, resource_runtime_part: Any, state_credentials: Any) -> None:
        from moto.stepfunctions.parser.asl.utils.boto_client import boto_client_for

        client = boto_client_for(
            region=resource_runtime_part.region, service="s3", state_credentials=state_credentials
        )
        env.stack.append(client.list_objects_v2(**env.stack.pop()).get("Contents", []))

    monkeypatch.setattr(
        item_reader_s3.ResourceEvalS3, "_handle_list_objects_v2", staticmethod(list_objects_v2)
    )

    # A Distributed Map fails once more children failed than it tolerates (this definition tolerates
    # none), with AWS's error and cause; moto's map run counts the failed children and succeeds.
    from moto.stepfunctions.parser.api import ExecutionFailedEventDetails, HistoryEventType
    from moto.stepfunctions.parser.asl.component.common.error_name.failure_event import (
        FailureEvent,
        FailureEventException,
    )
    from moto.stepfunctions.parser.asl.component.common.error_name.states_error_name import StatesErrorName
    from moto.stepfunctions.parser.asl.component.common.error_name.states_error_name_type import (
        StatesErrorNameType,
    )
    from moto.stepfunctions.parser.asl.component.state.exec.state_map.iteration import (
        distributed_iteration_component as distributed,
    )
    from moto.stepfunctions.parser.asl.eval.event.event_detail import EventDetails

    real_map_run = distributed.DistributedIterationComponent._map_run

    def map_run(self: Any, env: Any, eval_input: Any) -> None:
        real_map_run(self, env, eval_input)
        failed = eval_input.map_run_record.item_counter.failed.get()
        if failed:
            env.stack.pop()  # the children's outputs
            error = StatesErrorNameType.StatesExceedToleratedFailureThreshold
            details = ExecutionFailedEventDetails(
                error=error.to_name(), cause="The specified tolerated failure threshold was exceeded"
            )
            raise FailureEventException(
                FailureEvent(
                    env=env,
                    error_name=StatesErrorName(typ=error),
                    event_type=HistoryEventType.MapRunFailed,
                    # moto's TypedDict lists every kind of details; an event carries one.
                    event_details=EventDetails(executionFailedEventDetails=details),  # type: ignore[typeddict-item]
                )
            )

    monkeypatch.setattr(distributed.DistributedIterationComponent, "_map_run", map_run)

    def short_wait(self: Any, env: Any, wait_seconds: int) -> None:
        env.program_state_event.wait(min(wait_seconds, 0.05))

    monkeypatch.setattr(wait_function.WaitFunction, "_wait_interval", short_wait)


@contextlib.contextmanager
def deployed_chain(**substitutions: str) -> Iterator[dict[str, Any]]:
    """A moto server that executes state machines, and the whole deployment on it (the state machine's
    DefinitionSubstitutions overridden by ``substitutions``)."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    with pytest.MonkeyPatch.context() as monkeypatch:
        # moto's state-machine interpreter calls services at localhost:$MOTO_PORT.
        monkeypatch.setenv("MOTO_PORT", str(port))
        for name in list(os.environ):
            if name.startswith("AWS_"):
                monkeypatch.delenv(name)
        for name, value in _aws_environment(endpoint).items():
            monkeypatch.setenv(name, value)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
        try:
            # moto's servers in one process share their backends: start from none of another deployment's.
            urlopen(Request(f"{endpoint}/moto-api/reset", method="POST"))
            config = {"stepfunctions": {"execute_state_machine": True}, "lambda": {"use_docker": False}}
            urlopen(Request(f"{endpoint}/moto-api/config", data=json.dumps(config).encode(), method="POST"))
            # A crawl ends at once (moto would keep it RUNNING until advanced by hand).
            transition = {"model_name": "glue::crawl", "transition": {"progression": "immediate"}}
            urlopen(
                Request(
                    f"{endpoint}/moto-api/state-manager/set-transition",
                    data=json.dumps(transition).encode(),
                    method="POST",
                )
            )
            _patch_moto(monkeypatch, endpoint)
            deployment = _deploy(endpoint, **substitutions)
            # What the trigger Lambda's environment would hold.
            monkeypatch.setenv("LAKEHOUSE_ROOT", ROOT)
            monkeypatch.setenv("STATE_MACHINE_ARN", deployment["machine"])
            yield deployment
        finally:
            server.stop()


def _deploy(endpoint: str, **substitutions: str) -> dict[str, Any]:
    s3, sqs, sns = boto3.client("s3"), boto3.client("sqs"), boto3.client("sns")
    s3.create_bucket(Bucket=BUCKET)
    queue = sqs.create_queue(QueueName="ecommerce-etl-queue")["QueueUrl"]
    queue_arn = sqs.get_queue_attributes(QueueUrl=queue, AttributeNames=["QueueArn"])["Attributes"][
        "QueueArn"
    ]
    s3.put_bucket_notification_configuration(
        Bucket=BUCKET,
        NotificationConfiguration={
            "QueueConfigurations": [
                {
                    "QueueArn": queue_arn,
                    "Events": ["s3:ObjectCreated:*"],
                    "Filter": {
                        "Key": {
                            "FilterRules": [
                                {"Name": "prefix", "Value": "lakehouse/raw/"},
                                {"Name": "suffix", "Value": ".csv"},
                            ]
                        }
                    },
                }
            ]
        },
    )
    topic = sns.create_topic(Name="ecommerce-etl-notifications")["TopicArn"]
    inbox = sqs.create_queue(QueueName="notifications-inbox")["QueueUrl"]
    inbox_arn = sqs.get_queue_attributes(QueueUrl=inbox, AttributeNames=["QueueArn"])["Attributes"][
        "QueueArn"
    ]
    sns.subscribe(
        TopicArn=topic, Protocol="sqs", Endpoint=inbox_arn, Attributes={"RawMessageDelivery": "true"}
    )

    role = boto3.client("iam").create_role(RoleName="lakehouse", AssumeRolePolicyDocument="{}")["Role"]["Arn"]
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as bundle:
        bundle.writestr("handler.py", "def lambda_handler(event, context):\n    return {}\n")
    functions = {
        name: boto3.client("lambda").create_function(
            FunctionName=name,
            Runtime="python3.12",
            Role=role,
            Handler="handler.lambda_handler",
            Code={"ZipFile": archive.getvalue()},
        )["FunctionArn"]
        for name in ("ArchiveETLFiles", "CatalogChanges", "FinishBatch")
    }
    ecs = boto3.client("ecs")
    cluster = ecs.create_cluster(clusterName="lakehouse", capacityProviders=["FARGATE", "FARGATE_SPOT"])[
        "cluster"
    ]["clusterArn"]
    # moto needs the container's memory to place the task.
    task_definition = ecs.register_task_definition(
        family="lakehouse-step",
        containerDefinitions=[{"name": "lakehouse", "image": "lakehouse:test", "memory": 2048}],
        requiresCompatibilities=["FARGATE"],
        networkMode="awsvpc",
        cpu="1024",
        memory="2048",
    )["taskDefinition"]["taskDefinitionArn"]
    ec2 = boto3.client("ec2")
    vpc = ec2.create_vpc(CidrBlock="10.0.0.0/16")["Vpc"]["VpcId"]
    subnets = [ec2.create_subnet(VpcId=vpc, CidrBlock=f"10.0.{i}.0/24")["Subnet"]["SubnetId"] for i in (1, 2)]
    group = ec2.create_security_group(GroupName="lakehouse", Description="tasks", VpcId=vpc)["GroupId"]
    glue = boto3.client("glue")
    glue.create_database(DatabaseInput={"Name": "ecommerce_dwh"})
    for name, folder, prefix in ((CRAWLER, "lakehouse-dwh", ""), (REJECTED_CRAWLER, "rejected", "rejected_")):
        glue.create_crawler(
            Name=name,
            Role=role,
            DatabaseName="ecommerce_dwh",
            TablePrefix=prefix,
            Targets={
                "DeltaTargets": [
                    {
                        "DeltaTables": [
                            f"{ROOT}/{folder}/{t}/" for t in ("products", "orders", "order_items")
                        ],
                        "CreateNativeDeltaTable": True,
                    }
                ]
            },
        )
    boto3.client("athena").create_work_group(Name="ecommerce-lakehouse")
    definition = rendered(
        ClusterArn=cluster,
        TaskDefinitionArn=task_definition,
        SubnetA=subnets[0],
        SubnetB=subnets[1],
        SecurityGroup=group,
        ArchiveFunctionArn=functions["ArchiveETLFiles"],
        CatalogFunctionArn=functions["CatalogChanges"],
        CrawlerName=CRAWLER,
        RejectedCrawlerName=REJECTED_CRAWLER,
        FinishFunctionArn=functions["FinishBatch"],
        TopicArn=topic,
        **substitutions,
    )
    machine = boto3.client("stepfunctions").create_state_machine(
        name="EcommerceETLPipeline", definition=definition, roleArn=role
    )["stateMachineArn"]
    return {"queue": queue, "inbox": inbox, "machine": machine, "definition": definition, "role": role}


def deliver_events(queue: str) -> int:
    """Be the SQS event source of the trigger Lambda: hand it every queued message."""
    from handlers import check_data_availability

    sqs, delivered = boto3.client("sqs"), 0
    while True:
        messages = sqs.receive_message(QueueUrl=queue, MaxNumberOfMessages=10, WaitTimeSeconds=0).get(
            "Messages", []
        )
        if not messages:
            return delivered
        records = [
            {
                "messageId": m["MessageId"],
                "receiptHandle": m["ReceiptHandle"],
                "body": m["Body"],
                "attributes": {},
                "messageAttributes": {},
                "md5OfBody": m["MD5OfBody"],
                "eventSource": "aws:sqs",
                "eventSourceARN": "arn:aws:sqs:us-east-1:123456789012:ecommerce-etl-queue",
                "awsRegion": REGION,
            }
            for m in messages
        ]
        result = check_data_availability.lambda_handler({"Records": records}, lambda_context())
        failed = {f["itemIdentifier"] for f in result["batchItemFailures"]}
        for message in messages:
            if message["MessageId"] not in failed:
                sqs.delete_message(QueueUrl=queue, ReceiptHandle=message["ReceiptHandle"])
        delivered += len(messages)


def wait_for_executions(machine: str, count: int, timeout: float = 60) -> list[dict[str, Any]]:
    stepfunctions, deadline = boto3.client("stepfunctions"), time.monotonic() + timeout
    while time.monotonic() < deadline:
        executions = stepfunctions.list_executions(stateMachineArn=machine)["executions"]
        if len(executions) >= count and all(e["status"] != "RUNNING" for e in executions):
            return sorted(executions, key=lambda e: e["startDate"])
        time.sleep(0.5)
    running = [e for e in executions if e["status"] == "RUNNING"]
    history = stepfunctions.get_execution_history(executionArn=running[0]["executionArn"]) if running else {}
    names = [
        (e["type"], e.get("stateEnteredEventDetails", {}).get("name")) for e in history.get("events", [])
    ]
    outputs = [
        e.get("stateExitedEventDetails", {}).get("output", "")[-400:]
        for e in history.get("events", [])
        if e["type"] == "TaskStateExited"
    ]
    events = {"last states": names[-6:], "last task output": outputs[-1:]}
    crawler = boto3.client("glue").get_crawler(Name="ecommerce-lakehouse-crawler")["Crawler"]
    raise AssertionError(f"executions did not finish: {executions}; last events: {events}; crawler {crawler}")


def notifications(inbox: str) -> list[str]:
    messages = boto3.client("sqs").receive_message(QueueUrl=inbox, MaxNumberOfMessages=10).get("Messages", [])
    for message in messages:
        boto3.client("sqs").delete_message(QueueUrl=inbox, ReceiptHandle=message["ReceiptHandle"])
    return [m["Body"] for m in messages]


def raw_keys() -> list[str]:
    listing = boto3.client("s3").list_objects_v2(Bucket=BUCKET, Prefix="lakehouse/raw/")
    return sorted(o["Key"] for o in listing.get("Contents", []))
