"""The CDK stack: resources, their wiring and their security properties, for both runners."""

from __future__ import annotations

import importlib
import json
import re
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("aws_cdk")

from aws_cdk.assertions import Match, Template
from lakehouse_infra.application import build_app, check_context_keys
from lakehouse_infra.config import ConfigError, LakehouseConfig
from lakehouse_infra.sources import DEFINITION, placeholders

from tests.statemachine.test_definition import PLACEHOLDERS

pytestmark = pytest.mark.slow

# Actions AWS offers no resource-level permissions for, added by CDK for tracing, logging and image pulls.
RESOURCE_STAR_ACTIONS = {
    "xray:PutTraceSegments",
    "xray:PutTelemetryRecords",
    "xray:GetSamplingRules",
    "xray:GetSamplingTargets",
    "logs:CreateLogDelivery",
    "logs:GetLogDelivery",
    "logs:UpdateLogDelivery",
    "logs:DeleteLogDelivery",
    "logs:ListLogDeliveries",
    "logs:PutResourcePolicy",
    "logs:DescribeResourcePolicies",
    "logs:DescribeLogGroups",
    "ecr:GetAuthorizationToken",
}


def resources(template: Template, kind: str, props: dict[str, Any] | None = None) -> dict[str, Any]:
    return dict(template.find_resources(kind, {"Properties": props} if props else None))


def only(template: Template, kind: str, props: dict[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
    found = resources(template, kind, props)
    assert len(found) == 1, f"expected one {kind} matching {props}, found {len(found)}"
    ((logical_id, resource),) = found.items()
    return logical_id, resource


def data_bucket(template: Template) -> tuple[str, dict[str, Any]]:
    """The bucket with lifecycle rule archived-to-cheaper-storage."""
    for logical_id, bucket in resources(template, "AWS::S3::Bucket").items():
        rules = bucket["Properties"].get("LifecycleConfiguration", {}).get("Rules", [])
        if any(rule["Id"] == "archived-to-cheaper-storage" for rule in rules):
            return logical_id, bucket
    raise AssertionError("no data bucket")


def statements(template: Template, role_logical_id: str) -> list[dict[str, Any]]:
    """Every statement of the inline policies attached to one role."""
    found = []
    for policy in resources(template, "AWS::IAM::Policy").values():
        roles = policy["Properties"].get("Roles", [])
        if {"Ref": role_logical_id} in roles:
            found.extend(policy["Properties"]["PolicyDocument"]["Statement"])
    return found


def actions_of(statement: dict[str, Any]) -> list[str]:
    action = statement["Action"]
    return action if isinstance(action, list) else [action]


def state_machine_role(template: Template) -> str:
    _, machine = only(template, "AWS::StepFunctions::StateMachine")
    role: str = machine["Properties"]["RoleArn"]["Fn::GetAtt"][0]
    return role


# --- storage ---------------------------------------------------------------------------------------


def test_data_bucket_is_encrypted_with_the_stacks_key_and_closed_to_the_public(template: Template) -> None:
    _, bucket = data_bucket(template)
    props = bucket["Properties"]
    (encryption,) = props["BucketEncryption"]["ServerSideEncryptionConfiguration"]
    assert encryption["ServerSideEncryptionByDefault"]["SSEAlgorithm"] == "aws:kms"
    assert encryption["BucketKeyEnabled"] is True
    assert props["PublicAccessBlockConfiguration"] == {
        "BlockPublicAcls": True,
        "BlockPublicPolicy": True,
        "IgnorePublicAcls": True,
        "RestrictPublicBuckets": True,
    }
    assert props["VersioningConfiguration"] == {"Status": "Enabled"}
    assert props["LoggingConfiguration"]["LogFilePrefix"] == "data-bucket/"
    assert bucket["DeletionPolicy"] == "Retain"


def test_every_bucket_denies_requests_without_tls(template: Template) -> None:
    buckets = resources(template, "AWS::S3::Bucket")
    policies = resources(template, "AWS::S3::BucketPolicy").values()
    denied = set()
    for policy in policies:
        for statement in policy["Properties"]["PolicyDocument"]["Statement"]:
            if statement["Effect"] == "Deny" and statement.get("Condition", {}).get("Bool") == {
                "aws:SecureTransport": "false"
            }:
                denied.add(policy["Properties"]["Bucket"]["Ref"])
    assert denied == set(buckets)


def test_archived_files_move_to_cheaper_storage_and_old_versions_expire(fargate_template: Template) -> None:
    _, bucket = data_bucket(fargate_template)
    rules = {rule["Id"]: rule for rule in bucket["Properties"]["LifecycleConfiguration"]["Rules"]}
    archived = rules["archived-to-cheaper-storage"]
    assert archived["Prefix"] == "archived/"
    assert [(t["StorageClass"], t["TransitionInDays"]) for t in archived["Transitions"]] == [
        ("STANDARD_IA", 30),
        ("GLACIER_IR", 90),
    ]
    assert "ExpirationInDays" not in archived  # kept forever unless archive_expiry_days is set
    assert rules["old-versions-and-uploads"]["NoncurrentVersionExpiration"] == {"NoncurrentDays": 30}


def test_archive_expiry_bucket_name_and_teardown_follow_the_context(tmp_path: Any) -> None:
    from tests.infra.conftest import synthesize

    stack = synthesize(
        tmp_path, archive_expiry_days="730", bucket_name="my-lakehouse", retain_data="false", runner="fargate"
    )
    template = Template.from_stack(stack)
    _, bucket = data_bucket(template)
    assert bucket["Properties"]["BucketName"] == "my-lakehouse"
    assert bucket["DeletionPolicy"] == "Delete"
    rules = {rule["Id"]: rule for rule in bucket["Properties"]["LifecycleConfiguration"]["Rules"]}
    assert rules["archived-to-cheaper-storage"]["ExpirationInDays"] == 730
    assert resources(template, "Custom::S3AutoDeleteObjects")


# --- events ----------------------------------------------------------------------------------------


def test_raw_csv_uploads_reach_the_queue_and_failures_go_to_a_dead_letter_queue(template: Template) -> None:
    queue_id, queue = only(template, "AWS::SQS::Queue", {"QueueName": "ecommerce-etl-queue"})
    dlq_id, dlq = only(template, "AWS::SQS::Queue", {"QueueName": "ecommerce-etl-queue-dlq"})
    assert queue["Properties"]["SqsManagedSseEnabled"] is True
    assert dlq["Properties"]["SqsManagedSseEnabled"] is True
    assert queue["Properties"]["RedrivePolicy"] == {
        "deadLetterTargetArn": {"Fn::GetAtt": [dlq_id, "Arn"]},
        "maxReceiveCount": 5,
    }
    _, notifications = only(template, "Custom::S3BucketNotifications")
    (config,) = notifications["Properties"]["NotificationConfiguration"]["QueueConfigurations"]
    assert config["Events"] == ["s3:ObjectCreated:*"]
    assert config["QueueArn"] == {"Fn::GetAtt": [queue_id, "Arn"]}
    rules = {rule["Name"]: rule["Value"] for rule in config["Filter"]["Key"]["FilterRules"]}
    assert rules == {"prefix": "raw/", "suffix": ".csv"}
    _, mapping = only(template, "AWS::Lambda::EventSourceMapping")
    assert mapping["Properties"]["EventSourceArn"] == {"Fn::GetAtt": [queue_id, "Arn"]}
    assert mapping["Properties"]["FunctionResponseTypes"] == ["ReportBatchItemFailures"]


def test_handlers_run_on_arm64_python_312_with_tracing_and_point_at_real_functions(
    template: Template,
) -> None:
    ours = {
        logical_id: function
        for logical_id, function in resources(template, "AWS::Lambda::Function").items()
        if function["Properties"].get("Handler", "").startswith("handlers.")
    }
    assert len(ours) == 4
    for function in ours.values():
        props = function["Properties"]
        assert props["Runtime"] == "python3.12"
        assert props["Architectures"] == ["arm64"]
        assert props["TracingConfig"] == {"Mode": "Active"}
        assert any(
            "AWSLambdaPowertoolsPythonV3-python312-arm64" in json.dumps(layer) for layer in props["Layers"]
        )
        module, _, name = props["Handler"].rpartition(".")
        assert callable(getattr(importlib.import_module(module), name))


def test_finish_batch_alone_has_the_report_layer_built_from_the_image_s_pins(template: Template) -> None:
    (layer_id, layer), *others = resources(
        template, "AWS::Lambda::LayerVersion", {"Description": Match.string_like_regexp("plotly")}
    ).items()
    assert not others
    assert layer["Properties"]["CompatibleRuntimes"] == ["python3.12"]
    assert layer["Properties"]["CompatibleArchitectures"] == ["arm64"]
    with_it = [
        function["Properties"]["Handler"]
        for function in resources(template, "AWS::Lambda::Function").values()
        if {"Ref": layer_id} in function["Properties"].get("Layers", [])
    ]
    assert with_it == ["handlers.finish_batch.lambda_handler"]


def test_the_report_layer_alone_draws_a_report_at_the_lock_s_versions() -> None:
    """With no site-packages but the layer's (as in the Lambda, whose runtime has no plotly)."""
    import subprocess
    import sys

    from lakehouse_infra.sources import CONTAINER_LOCK, PROJECT_ROOT, REPORT_PACKAGES, report_layer

    layer = report_layer() / "python"
    lock = CONTAINER_LOCK.read_text()
    for name in REPORT_PACKAGES:
        (installed,) = layer.glob(f"{name}-*.dist-info")
        version = installed.name.removesuffix(".dist-info").split("-", 1)[1]
        assert f"\n{name}=={version} " in lock
    code = (
        f"import sys; sys.path[:0] = [{str(layer)!r}, {str(PROJECT_ROOT)!r}];"
        "from pipeline.html_report import render; from pipeline.report import BatchReport, StepReport;"
        "import plotly; assert plotly.__file__.startswith(sys.path[0]), plotly.__file__;"
        "step = StepReport('orders', 1, 10, 9, 0, 0, 1, {'null:user_id': 1}, 0, 0, 0.1);"
        "page = render([BatchReport('b1', 'succeeded', '2026-01-01T00:00:00+00:00',"
        " '2026-01-01T00:00:01+00:00', 1.0, [step], 1, {'orders': 9})]);"
        "assert 'Plotly.newPlot' in page and 'null:user_id' in page"
    )
    done = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr


def test_a_report_package_the_lock_does_not_pin_is_an_error() -> None:
    from lakehouse_infra.sources import pinned_requirements

    lock = "plotly==7.1.0 \\\n    --hash=sha256:aa \\\n    --hash=sha256:bb\n    # via x\nnarwhals==2.0\n"
    assert pinned_requirements(("plotly",), lock) == ["plotly==7.1.0 --hash=sha256:aa --hash=sha256:bb"]
    with pytest.raises(RuntimeError, match="pins no narwhals"):  # a pin without hashes is none
        pinned_requirements(("plotly", "narwhals"), lock)


def test_log_groups_have_retention_and_the_stacks_key(template: Template) -> None:
    groups = resources(template, "AWS::Logs::LogGroup")
    assert groups
    for group in groups.values():
        assert group["Properties"]["RetentionInDays"] == 90
        assert "KmsKeyId" in group["Properties"]


def test_the_trigger_and_finish_know_the_root_and_the_state_machine(template: Template) -> None:
    machine_id, _ = only(template, "AWS::StepFunctions::StateMachine")
    bucket_id, _ = data_bucket(template)
    functions = resources(template, "AWS::Lambda::Function").values()
    by_handler = {f["Properties"].get("Handler"): f["Properties"] for f in functions}
    trigger = by_handler["handlers.check_data_availability.lambda_handler"]["Environment"]["Variables"]
    finish = by_handler["handlers.finish_batch.lambda_handler"]["Environment"]["Variables"]
    for variables in (trigger, finish):
        assert variables["LAKEHOUSE_ROOT"] == {"Fn::Join": ["", ["s3://", {"Ref": bucket_id}]]}
    assert trigger["STATE_MACHINE_ARN"] == {"Ref": machine_id}
    # FinishBatch is invoked by the state machine, so it names it by ARN instead of a reference (a cycle).
    assert ":stateMachine:EcommerceETLPipeline" in json.dumps(finish["STATE_MACHINE_ARN"])


def test_finish_prices_the_batch_on_the_deployed_task_and_counts_its_transitions(
    fargate_template: Template, glue_template: Template
) -> None:
    from dataclasses import replace

    from pipeline.costs import DEFAULT_TASK, TaskSize

    for template, runner in ((fargate_template, "fargate"), (glue_template, "glue")):
        functions = resources(template, "AWS::Lambda::Function").values()
        finish = next(
            f["Properties"]
            for f in functions
            if f["Properties"].get("Handler", "").endswith("finish_batch.lambda_handler")
        )
        size = TaskSize(**json.loads(finish["Environment"]["Variables"]["LAKEHOUSE_TASK_SIZE"]))
        # The defaults (1 vCPU, 4 GiB, 21 GiB of disk, arm64, on demand; Glue 1 DPU) are what a local
        # run is priced as.
        assert size == TaskSize(runner=runner, vcpu=1.0, memory_gb=4.0, ephemeral_gb=21, glue_dpu=1.0)
        assert replace(size, runner="fargate") == DEFAULT_TASK
        granted = statements(template, finish["Role"]["Fn::GetAtt"][0])
        history = [s for s in granted if "states:GetExecutionHistory" in actions_of(s)]
        assert history and ":execution:EcommerceETLPipeline:" in json.dumps(history[0]["Resource"])


def test_the_trigger_and_finish_may_do_what_starting_a_batch_takes(template: Template) -> None:
    """Take and release the lock, judge the execution holding it, finish a batch of loaded files."""
    functions = resources(template, "AWS::Lambda::Function").values()
    for handler in (
        "handlers.check_data_availability.lambda_handler",
        "handlers.finish_batch.lambda_handler",
    ):
        function = next(f["Properties"] for f in functions if f["Properties"].get("Handler") == handler)
        granted = statements(template, function["Role"]["Fn::GetAtt"][0])
        text = json.dumps(granted)
        actions = {action for statement in granted for action in actions_of(statement)}
        assert {"states:StartExecution", "states:DescribeExecution", "s3:DeleteObject*"} <= actions, handler
        describe = next(s for s in granted if "states:DescribeExecution" in actions_of(s))
        assert ":execution:EcommerceETLPipeline:*" in json.dumps(describe["Resource"]), handler
        for prefix in ("manifests/*", "reports/*", "archived/*", "raw/*"):
            assert f"/{prefix}" in text, (handler, prefix)


# --- runners ---------------------------------------------------------------------------------------


def test_fargate_task_is_arm64_read_only_and_sized_by_the_context(fargate_template: Template) -> None:
    _, task = only(fargate_template, "AWS::ECS::TaskDefinition")
    props = task["Properties"]
    assert props["RuntimePlatform"] == {"CpuArchitecture": "ARM64", "OperatingSystemFamily": "LINUX"}
    assert (props["Cpu"], props["Memory"]) == ("1024", "4096")
    (container,) = props["ContainerDefinitions"]
    assert container["Name"] == "lakehouse"
    assert container["ReadonlyRootFilesystem"] is True
    assert container["MountPoints"] == [{"ContainerPath": "/tmp", "ReadOnly": False, "SourceVolume": "tmp"}]
    _, providers = only(fargate_template, "AWS::ECS::ClusterCapacityProviderAssociations")
    assert set(providers["Properties"]["CapacityProviders"]) == {"FARGATE", "FARGATE_SPOT"}
    assert not resources(fargate_template, "AWS::Glue::Job")


def test_fargate_size_architecture_and_spot_come_from_the_context(tmp_path: Any) -> None:
    from tests.infra.conftest import synthesize

    stack = synthesize(
        tmp_path,
        fargate_cpu="4096",
        fargate_memory_mib="16384",
        fargate_architecture="x86_64",
        fargate_spot="true",
    )
    template = Template.from_stack(stack)
    _, task = only(template, "AWS::ECS::TaskDefinition")
    assert (task["Properties"]["Cpu"], task["Properties"]["Memory"]) == ("4096", "16384")
    assert task["Properties"]["RuntimePlatform"]["CpuArchitecture"] == "X86_64"
    _, machine = only(template, "AWS::StepFunctions::StateMachine")
    assert machine["Properties"]["DefinitionSubstitutions"]["CapacityProvider"] == "FARGATE_SPOT"


def test_tasks_run_in_private_subnets_with_https_out_only(fargate_template: Template) -> None:
    _, machine = only(fargate_template, "AWS::StepFunctions::StateMachine")
    substitutions = machine["Properties"]["DefinitionSubstitutions"]
    subnets = resources(fargate_template, "AWS::EC2::Subnet")
    for name in ("SubnetA", "SubnetB"):
        subnet_id = substitutions[name]["Ref"]
        assert subnets[subnet_id]["Properties"]["MapPublicIpOnLaunch"] is False
    group_id = substitutions["SecurityGroup"]["Fn::GetAtt"][0]
    group = resources(fargate_template, "AWS::EC2::SecurityGroup")[group_id]["Properties"]
    assert "SecurityGroupIngress" not in group
    assert [
        (rule["IpProtocol"], rule["FromPort"], rule["ToPort"]) for rule in group["SecurityGroupEgress"]
    ] == [("tcp", 443, 443)]
    assert resources(fargate_template, "AWS::EC2::FlowLog")
    assert resources(fargate_template, "AWS::EC2::VPCEndpoint", {"VpcEndpointType": "Gateway"})


def test_glue_runner_has_the_three_python_shell_jobs_with_the_projects_wheel(glue_template: Template) -> None:
    jobs = resources(glue_template, "AWS::Glue::Job")
    by_name = {job["Properties"]["Name"]: job["Properties"] for job in jobs.values()}
    assert set(by_name) == {"product_etl", "orders_etl", "order_items_etl"}
    security_id, _ = only(glue_template, "AWS::Glue::SecurityConfiguration")
    for name, table in (
        ("product_etl", "products"),
        ("orders_etl", "orders"),
        ("order_items_etl", "order_items"),
    ):
        job = by_name[name]
        assert job["Command"]["Name"] == "pythonshell"
        assert job["Command"]["PythonVersion"] == "3.9"
        arguments = job["DefaultArguments"]
        assert arguments["--table"] == table
        assert arguments["library-set"] == "none"  # our wheel's dependencies, not Glue's analytics set
        wheel = json.dumps(arguments["--additional-python-modules"])
        assert re.search(r"artifacts/glue/ecommerce_lakehouse-[\d.]+-py3-none-any\.whl", wheel)
        assert job["SecurityConfiguration"] == {"Ref": security_id}
    assert resources(glue_template, "Custom::CDKBucketDeployment")
    assert not resources(glue_template, "AWS::ECS::TaskDefinition")


# --- catalog, Athena, SNS --------------------------------------------------------------------------


def test_crawlers_register_native_delta_tables_of_every_step_and_its_rejected_rows(
    template: Template,
) -> None:
    only(template, "AWS::Glue::Database", {"DatabaseInput": {"Name": "ecommerce_dwh"}})
    crawlers = {
        c["Properties"]["Name"]: c["Properties"] for c in resources(template, "AWS::Glue::Crawler").values()
    }
    assert sorted(crawlers) == ["ecommerce-lakehouse-crawler", "ecommerce-lakehouse-rejected-crawler"]
    for name, folder, prefix in (
        ("ecommerce-lakehouse-crawler", "lakehouse-dwh", None),
        # rejected/<table>/ ends in the same folder name as its table: the prefix tells them apart.
        ("ecommerce-lakehouse-rejected-crawler", "rejected", "rejected_"),
    ):
        props = crawlers[name]
        assert props["DatabaseName"] == "ecommerce_dwh"
        assert props.get("TablePrefix") == prefix
        assert "S3Targets" not in props["Targets"]
        (target,) = props["Targets"]["DeltaTargets"]
        assert target["CreateNativeDeltaTable"] is True
        paths = json.dumps(target["DeltaTables"])
        for table in ("products", "orders", "order_items"):
            assert f"/{folder}/{table}/" in paths
        assert "CrawlerSecurityConfiguration" in props


def test_the_state_machine_knows_both_crawlers_and_the_catalog_function(template: Template) -> None:
    substitutions = only(template, "AWS::StepFunctions::StateMachine")[1]["Properties"][
        "DefinitionSubstitutions"
    ]
    crawler_ids = {
        c["Properties"]["Name"]: logical_id
        for logical_id, c in resources(template, "AWS::Glue::Crawler").items()
    }
    assert substitutions["CrawlerName"] == {"Ref": crawler_ids["ecommerce-lakehouse-crawler"]}
    assert substitutions["RejectedCrawlerName"] == {
        "Ref": crawler_ids["ecommerce-lakehouse-rejected-crawler"]
    }
    function_id = substitutions["CatalogFunctionArn"]["Fn::GetAtt"][0]
    function = resources(template, "AWS::Lambda::Function")[function_id]
    assert function["Properties"]["Handler"] == "handlers.catalog_changes.lambda_handler"
    statements = [
        statement
        for policy in resources(template, "AWS::IAM::Policy").values()
        for statement in policy["Properties"]["PolicyDocument"]["Statement"]
        if "glue:StartCrawler" in json.dumps(statement["Action"])
    ]
    (crawl,) = statements
    for name in crawler_ids:
        assert f"crawler/{name}" in json.dumps(crawl["Resource"])


def test_athena_workgroup_enforces_encrypted_results_in_its_own_bucket(template: Template) -> None:
    _, workgroup = only(template, "AWS::Athena::WorkGroup")
    config = workgroup["Properties"]["WorkGroupConfiguration"]
    assert workgroup["Properties"]["Name"] == "ecommerce-lakehouse"
    assert config["EnforceWorkGroupConfiguration"] is True
    assert config["ResultConfiguration"]["EncryptionConfiguration"]["EncryptionOption"] == "SSE_KMS"
    results_bucket = config["ResultConfiguration"]["OutputLocation"]["Fn::Join"][1][1]["Ref"]
    data_bucket_id, _ = data_bucket(template)
    assert results_bucket != data_bucket_id
    assert results_bucket in resources(template, "AWS::S3::Bucket")


def test_topic_is_encrypted_and_the_email_subscription_is_optional(template: Template) -> None:
    _, topic = only(template, "AWS::SNS::Topic")
    assert topic["Properties"]["TopicName"] == "ecommerce-etl-notifications"
    assert "KmsMasterKeyId" in topic["Properties"]
    parameter = template.to_json()["Parameters"]["NotificationEmail"]
    assert parameter["Default"] == ""
    _, subscription = only(template, "AWS::SNS::Subscription")
    assert subscription["Properties"]["Protocol"] == "email"
    condition = subscription["Condition"]
    assert condition in template.to_json()["Conditions"]


def test_key_rotates(template: Template) -> None:
    _, key = only(template, "AWS::KMS::Key")
    assert key["Properties"]["EnableKeyRotation"] is True


# --- state machine ---------------------------------------------------------------------------------


def test_state_machine_is_the_definition_file_with_every_placeholder_substituted(template: Template) -> None:
    _, machine = only(template, "AWS::StepFunctions::StateMachine")
    props = machine["Properties"]
    assert props["StateMachineName"] == "EcommerceETLPipeline"
    assert props["DefinitionString"] == DEFINITION.read_text()
    substitutions = props["DefinitionSubstitutions"]
    used = set(re.findall(r"\$\{(\w+)\}", props["DefinitionString"]))
    assert used == placeholders() == set(PLACEHOLDERS)
    assert set(substitutions) == used
    assert all(value not in ("", None) for value in substitutions.values())
    assert props["LoggingConfiguration"]["Level"] == "ALL"
    assert props["TracingConfiguration"] == {"Enabled": True}


def test_runner_substitutions_point_at_the_runner(
    fargate_template: Template, glue_template: Template
) -> None:
    fargate = only(fargate_template, "AWS::StepFunctions::StateMachine")[1]["Properties"][
        "DefinitionSubstitutions"
    ]
    glue = only(glue_template, "AWS::StepFunctions::StateMachine")[1]["Properties"]["DefinitionSubstitutions"]
    assert fargate["Runner"] == "fargate" and glue["Runner"] == "glue"
    task_definition = next(iter(resources(fargate_template, "AWS::ECS::TaskDefinition")))
    assert fargate["TaskDefinitionArn"] == {"Ref": task_definition}
    assert fargate["ContainerName"] == "lakehouse"
    assert fargate["CapacityProvider"] == "FARGATE"


def test_state_machine_role_has_exactly_the_actions_of_its_states(
    fargate_template: Template, glue_template: Template
) -> None:
    common = {
        "lambda:InvokeFunction",
        "sns:Publish",
        "glue:GetCrawler",
        "glue:StartCrawler",
        "athena:StartQueryExecution",
        "athena:GetQueryExecution",
        "athena:GetQueryResults",
        # What Athena's COUNT(*) reads with the caller's rights:
        "glue:GetDatabase",
        "glue:GetTable",
        "glue:GetPartition",
        "glue:GetPartitions",
    }
    runners = {
        "fargate": {
            "ecs:RunTask",
            "ecs:DescribeTasks",
            "ecs:StopTask",
            "iam:PassRole",
            "events:PutTargets",
            "events:PutRule",
            "events:DescribeRule",
            # The distributed path's Maps: their STANDARD children are executions of this state machine.
            "states:StartExecution",
            "states:DescribeExecution",
            "states:StopExecution",
        },
        "glue": {"glue:StartJobRun", "glue:GetJobRun", "glue:GetJobRuns", "glue:BatchStopJobRun"},
    }
    for runner, template in (("fargate", fargate_template), ("glue", glue_template)):
        granted = {
            action
            for statement in statements(template, state_machine_role(template))
            for action in actions_of(statement)
            if not action.startswith(("s3:", "kms:")) and action not in RESOURCE_STAR_ACTIONS
        }
        assert granted == common | runners[runner], runner


def test_no_action_on_every_resource_except_those_aws_cannot_scope(template: Template) -> None:
    for logical_id, policy in resources(template, "AWS::IAM::Policy").items():
        for statement in policy["Properties"]["PolicyDocument"]["Statement"]:
            actions = actions_of(statement)
            assert "*" not in actions, logical_id
            if statement["Resource"] == "*" or "*" in (
                statement["Resource"] if isinstance(statement["Resource"], list) else []
            ):
                assert set(actions) <= RESOURCE_STAR_ACTIONS, (logical_id, actions)
    for logical_id, role in resources(template, "AWS::IAM::Role").items():
        for policy in role["Properties"].get("Policies", []):
            for statement in policy["PolicyDocument"]["Statement"]:
                assert statement["Resource"] != "*" or set(actions_of(statement)) <= RESOURCE_STAR_ACTIONS, (
                    logical_id
                )


def test_alarms_on_failed_executions_dead_letters_and_handler_errors_notify_the_topic(
    template: Template,
) -> None:
    topic_id, _ = only(template, "AWS::SNS::Topic")
    alarms = resources(template, "AWS::CloudWatch::Alarm").values()
    metrics = {(alarm["Properties"]["Namespace"], alarm["Properties"]["MetricName"]) for alarm in alarms}
    assert ("AWS/States", "ExecutionsFailed") in metrics
    assert ("AWS/SQS", "ApproximateNumberOfMessagesVisible") in metrics
    assert ("AWS/Lambda", "Errors") in metrics
    for alarm in alarms:
        assert alarm["Properties"]["AlarmActions"] == [{"Ref": topic_id}]


def test_stack_outputs_the_bucket_and_the_state_machine(template: Template) -> None:
    outputs = template.to_json()["Outputs"]
    assert {"BucketName", "LakehouseRoot", "StateMachineArn", "TopicArn", "QueueUrl"} <= set(outputs)


def test_queue_policy_lets_only_this_bucket_send(template: Template) -> None:
    template.has_resource_properties(
        "AWS::SQS::QueuePolicy",
        {
            "PolicyDocument": {
                "Statement": Match.array_with(
                    [
                        Match.object_like(
                            {
                                "Action": Match.array_with(["sqs:SendMessage"]),
                                "Principal": {"Service": "s3.amazonaws.com"},
                                "Condition": {"ArnLike": {"aws:SourceArn": Match.any_value()}},
                            }
                        )
                    ]
                )
            }
        },
    )


# --- configuration ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("context", "message"),
    [
        ({"runner": "spark"}, "runner must be 'fargate' or 'glue'"),
        ({"fargate_cpu": "1024", "fargate_memory_mib": "16384"}, "is not a Fargate size"),
        ({"fargate_spot": "maybe"}, "fargate_spot='maybe' is not a bool"),
        ({"nat_gateways": "0"}, "nat_gateways must be 1 or 2"),
        ({"archive_infrequent_access_days": "10"}, "at least 30"),
        ({"archive_expiry_days": "60"}, "archive_expiry_days must be 0 (never) or later"),
        ({"log_retention_days": "x"}, "log_retention_days='x' is not a int"),
    ],
)
def test_bad_context_values_are_named_in_the_error(context: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        LakehouseConfig.from_context(context)


def test_an_unknown_context_key_fails_synth_with_the_keys(tmp_path: Any) -> None:
    """``-c runer=glue`` must not deploy the default runner in silence."""
    with pytest.raises(
        ConfigError, match=re.escape("unknown context key runer (did you mean runner?)")
    ) as raised:
        build_app({"runer": "glue"}, outdir=str(tmp_path))
    assert "the keys are: access_log_days, archive_expiry_days" in str(raised.value)
    # The CDK's own keys pass: feature flags, the toolkit's, cached lookups.
    check_context_keys(
        {"@aws-cdk/core:x": True, "aws:cdk:enable-path-metadata": True, "availability-zones:account=1": []},
        ["runner"],
    )


def test_defaults_deploy_fargate_on_arm64() -> None:
    config = LakehouseConfig.from_context({})
    assert (config.runner, config.fargate_architecture, config.fargate_spot) == ("fargate", "arm64", False)


def _layer_versions(template: Template) -> set[str]:
    """The version (the ARN's last field) of every Powertools layer the handlers use."""
    versions = set()
    for function in resources(template, "AWS::Lambda::Function").values():
        for layer in function["Properties"].get("Layers", []):
            found = re.search(r"AWSLambdaPowertoolsPythonV3-python312-arm64:(\d+)", json.dumps(layer))
            if found:
                versions.add(found.group(1))
    return versions


def test_the_handlers_layer_is_the_one_of_the_powertools_release_pyproject_pins(
    template: Template,
) -> None:
    from lakehouse_infra.powertools import LAYER_VERSIONS, pinned_release

    assert _layer_versions(template) == {str(LAYER_VERSIONS[pinned_release()])}


def test_the_tests_run_the_powertools_release_the_layer_holds() -> None:
    from importlib.metadata import version

    from lakehouse_infra.powertools import pinned_release

    assert version("aws-lambda-powertools") == pinned_release()


def test_the_powertools_layer_version_context_key_overrides_the_pinned_layer(tmp_path: Any) -> None:
    from tests.infra.conftest import synthesize

    stack = synthesize(tmp_path, powertools_layer_version="30")
    assert _layer_versions(Template.from_stack(stack)) == {"30"}


def test_a_powertools_release_without_a_known_layer_fails_with_the_known_ones() -> None:
    from lakehouse_infra.powertools import layer_version

    with pytest.raises(
        ConfigError, match=re.escape("no known AWSLambdaPowertoolsPythonV3-python312-arm64 layer")
    ):
        layer_version("3.99.0")


def test_the_cdk_toolkit_version_is_written_once_in_infra_package_json() -> None:
    root = Path(__file__).resolve().parents[2]
    package = json.loads((root / "infra" / "package.json").read_text())
    lock = json.loads((root / "infra" / "package-lock.json").read_text())
    assert lock["packages"]["node_modules/aws-cdk"]["version"] == package["devDependencies"]["aws-cdk"]
    for path in [root / ".ci" / "run", *sorted((root / ".github" / "workflows").glob("*.yml"))]:
        assert "aws-cdk@" not in path.read_text(), f"{path.name} installs its own CDK toolkit version"


def test_a_table_s_rejected_share_above_the_threshold_alarms_to_the_topic(
    fargate_template: Template, tmp_path: Any
) -> None:
    from lakehouse_infra.stack import METRICS_NAMESPACE, METRICS_SERVICE

    from handlers import finish_batch
    from tests.infra.conftest import synthesize

    assert (METRICS_NAMESPACE, METRICS_SERVICE) == (finish_batch.NAMESPACE, finish_batch.SERVICE)
    topic_id = next(iter(resources(fargate_template, "AWS::SNS::Topic")))
    alarms = {
        alarm["Properties"]["Dimensions"][1]["Value"]: alarm["Properties"]
        for alarm in resources(fargate_template, "AWS::CloudWatch::Alarm").values()
        if alarm["Properties"].get("MetricName") == "RejectedShare"
    }
    assert sorted(alarms) == ["order_items", "orders", "products"]
    for table, alarm in alarms.items():
        assert alarm["Namespace"] == "EcommerceLakehouse"
        assert alarm["Dimensions"] == [
            {"Name": "service", "Value": "ecommerce-lakehouse"},
            {"Name": "table", "Value": table},
        ]
        assert (alarm["Threshold"], alarm["ComparisonOperator"]) == (10, "GreaterThanThreshold")
        assert alarm["AlarmActions"] == [{"Ref": topic_id}]
    stricter = Template.from_stack(synthesize(tmp_path, reject_share_alarm_percent="2.5"))
    thresholds = {
        alarm["Properties"]["Threshold"]
        for alarm in resources(stricter, "AWS::CloudWatch::Alarm").values()
        if alarm["Properties"].get("MetricName") == "RejectedShare"
    }
    assert thresholds == {2.5}
    with pytest.raises(ConfigError, match="reject_share_alarm_percent"):
        synthesize(tmp_path / "bad", reject_share_alarm_percent="100")


def test_the_distributed_path_is_granted_and_configured(fargate_template: Template) -> None:
    """The Maps list plan/ only and start, watch and stop only this state machine's executions; the
    threshold and concurrency reach the definition from context."""
    found = statements(fargate_template, state_machine_role(fargate_template))
    by_sid = {statement.get("Sid"): statement for statement in found}
    assert by_sid["ListWorkItems"]["Action"] == "s3:ListBucket"
    assert by_sid["ListWorkItems"]["Condition"] == {"StringLike": {"s3:prefix": ["plan/*"]}}
    assert by_sid["StartUnitChildren"]["Action"] == "states:StartExecution"
    assert "stateMachine" in json.dumps(by_sid["StartUnitChildren"]["Resource"])
    assert set(by_sid["WatchUnitChildren"]["Action"]) == {"states:DescribeExecution", "states:StopExecution"}
    assert "execution" in json.dumps(by_sid["WatchUnitChildren"]["Resource"])
    (machine,) = resources(fargate_template, "AWS::StepFunctions::StateMachine").values()
    substitutions = machine["Properties"]["DefinitionSubstitutions"]
    assert substitutions["DistributedThresholdBytes"] == str(50 * 2**30)
    assert substitutions["DistributedMaxConcurrency"] == "40"
    assert substitutions["UnitMemoryBudget"] == "2816MiB"
