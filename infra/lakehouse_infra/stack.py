"""The whole pipeline in one stack; the grants between its parts are made here."""

from __future__ import annotations

import json
from typing import Any

from aws_cdk import Aws, CfnOutput, Duration, RemovalPolicy, Stack
from aws_cdk import aws_cloudwatch as cloudwatch
from aws_cdk import aws_cloudwatch_actions as cloudwatch_actions
from aws_cdk import aws_iam as iam
from aws_cdk import aws_kms as kms
from aws_cdk import aws_s3 as s3
from constructs import Construct

from lakehouse_infra.catalog import DATABASE, WORKGROUP, LakehouseCatalog
from lakehouse_infra.config import LakehouseConfig
from lakehouse_infra.functions import HandlerFunction, report_libraries
from lakehouse_infra.ingest import RawFileEvents
from lakehouse_infra.orchestration import EtlStateMachine, Notifications, execution_arns, state_machine_arn
from lakehouse_infra.runners import CONTAINER_NAME, FargateRunner, GlueRunner
from lakehouse_infra.storage import LakehouseStorage

NOT_USED = "not-used-by-this-runner"
# What handlers/finish_batch.py publishes its metrics under (a test checks that they agree).
METRICS_NAMESPACE, METRICS_SERVICE = "EcommerceLakehouse", "ecommerce-lakehouse"


class LakehouseStack(Stack):
    """Bucket, events, handlers, step runner (Fargate or Glue), catalog, Athena, SNS and the state machine."""

    def __init__(
        self, scope: Construct, construct_id: str, *, config: LakehouseConfig, **kwargs: Any
    ) -> None:
        super().__init__(scope, construct_id, **kwargs)
        self.config = config
        key = self._key()
        storage = LakehouseStorage(self, "Storage", key=key, config=config)
        bucket = storage.bucket
        catalog = LakehouseCatalog(
            self, "Catalog", bucket=bucket, log_bucket=storage.log_bucket, key=key, config=config
        )
        notifications = Notifications(self, "Notifications", key=key)

        archive = HandlerFunction(
            self,
            "ArchiveETLFiles",
            handler="handlers.archive_files.lambda_handler",
            description="Move a finished batch's raw files to archived/",
            environment={},
            timeout=Duration.minutes(10),
            key=key,
            config=config,
        )
        plan_catalog = HandlerFunction(
            self,
            "CatalogChanges",
            handler="handlers.catalog_changes.lambda_handler",
            description="Which Glue crawlers a batch needs: those of a table it created or changed",
            environment={},
            timeout=Duration.minutes(1),
            key=key,
            config=config,
        )
        finish = HandlerFunction(
            self,
            "FinishBatch",
            handler="handlers.finish_batch.lambda_handler",
            description="Final report, lock release and the SNS message of a batch; starts the next one",
            environment={
                "LAKEHOUSE_ROOT": storage.root,
                "STATE_MACHINE_ARN": state_machine_arn(self),
                "LAKEHOUSE_TASK_SIZE": json.dumps(_task_size(config)),
            },
            timeout=Duration.minutes(2),
            key=key,
            config=config,
            layers=[report_libraries(self)],
        )

        substitutions = {
            "Runner": config.runner,
            "ArchiveFunctionArn": archive.function.function_arn,
            "FinishFunctionArn": finish.function.function_arn,
            "CatalogFunctionArn": plan_catalog.function.function_arn,
            "CrawlerName": catalog.crawler.ref,
            "RejectedCrawlerName": catalog.rejected_crawler.ref,
            "GlueDatabase": DATABASE,
            "AthenaWorkGroup": catalog.workgroup.ref,
            "TopicArn": notifications.topic.topic_arn,
            "DistributedThresholdBytes": str(int(config.distributed_threshold_gib * 2**30)),
            "DistributedMaxConcurrency": str(config.distributed_max_concurrency),
            # A unit's budget is the task's memory less what the process itself takes (2.75 of 4 GiB).
            "UnitMemoryBudget": f"{config.fargate_memory_mib * 11 // 16}MiB",
        }
        fargate: FargateRunner | None = None
        glue: GlueRunner | None = None
        if config.runner == "fargate":
            fargate = FargateRunner(self, "Fargate", log_bucket=storage.log_bucket, key=key, config=config)
            substitutions.update(
                ClusterArn=fargate.cluster.cluster_arn,
                TaskDefinitionArn=fargate.task_definition.task_definition_arn,
                SubnetA=fargate.subnets[0],
                SubnetB=fargate.subnets[1],
                SecurityGroup=fargate.security_group.security_group_id,
                ContainerName=CONTAINER_NAME,
                CapacityProvider=fargate.capacity_provider,
            )
        else:
            glue = GlueRunner(
                self,
                "Glue",
                bucket=bucket,
                security_configuration=catalog.security_configuration,
                key=key,
                config=config,
            )
            for name in (
                "ClusterArn",
                "TaskDefinitionArn",
                "SubnetA",
                "SubnetB",
                "SecurityGroup",
                "ContainerName",
            ):
                substitutions[name] = NOT_USED
            substitutions["CapacityProvider"] = NOT_USED
        pipeline = EtlStateMachine(self, "Pipeline", substitutions=substitutions, key=key, config=config)
        events = RawFileEvents(
            self,
            "RawFileEvents",
            bucket=bucket,
            root=storage.root,
            state_machine_arn=pipeline.state_machine.state_machine_arn,
            key=key,
            config=config,
        )

        # Handlers: each reads the bucket and writes only the prefixes it owns.
        trigger = events.trigger.function
        pipeline.state_machine.grant_start_execution(trigger)
        bucket.grant_read(archive.function)
        bucket.grant_read(plan_catalog.function, "reports/*")
        bucket.grant_read(plan_catalog.function, "manifests/*")
        bucket.grant_put(archive.function, "archived/*")
        bucket.grant_delete(archive.function, "raw/*")
        finish.function.add_to_role_policy(
            iam.PolicyStatement(
                sid="StartNextBatch", actions=["states:StartExecution"], resources=[state_machine_arn(self)]
            )
        )
        finish.function.add_to_role_policy(
            iam.PolicyStatement(
                # The batch's cost estimate counts the state transitions of its execution.
                sid="CountTransitions",
                actions=["states:GetExecutionHistory"],
                resources=[execution_arns(self)],
            )
        )
        for starter in (trigger, finish.function):
            # Both start batches: take and release the lock (manifests/), judge a lock's execution,
            # and finish a batch of files loaded already themselves (archive, reports).
            bucket.grant_read(starter)
            bucket.grant_put(starter, "manifests/*")
            bucket.grant_delete(starter, "manifests/*")
            bucket.grant_put(starter, "reports/*")
            bucket.grant_put(starter, "archived/*")
            bucket.grant_delete(starter, "raw/*")
            starter.add_to_role_policy(
                iam.PolicyStatement(
                    sid="JudgeLockHolder",
                    actions=["states:DescribeExecution"],
                    resources=[execution_arns(self)],
                )
            )

        role = pipeline.role
        if fargate is not None:
            self._grant_step(bucket, fargate.task_role)
            self._grant_fargate_runs(role, fargate)
            self._grant_distributed_maps(role, bucket)
        if glue is not None:
            self._grant_step(bucket, glue.role)
            role.add_to_policy(
                iam.PolicyStatement(
                    sid="RunStepJobs",
                    actions=["glue:StartJobRun", "glue:GetJobRun", "glue:GetJobRuns", "glue:BatchStopJobRun"],
                    resources=[job.job_arn for job in glue.jobs],
                )
            )

        # The state machine: its Lambda, crawler, Athena and SNS states.
        archive.function.grant_invoke(role)
        plan_catalog.function.grant_invoke(role)
        finish.function.grant_invoke(role)
        notifications.topic.grant_publish(role)
        role.add_to_policy(
            iam.PolicyStatement(
                sid="Crawl", actions=["glue:GetCrawler", "glue:StartCrawler"], resources=catalog.crawler_arns
            )
        )
        role.add_to_policy(
            iam.PolicyStatement(
                sid="CountRows",
                actions=["athena:StartQueryExecution", "athena:GetQueryExecution", "athena:GetQueryResults"],
                resources=[catalog.workgroup_arn],
            )
        )
        # Athena runs the COUNT(*) with the caller's rights: catalog lookups, table files, results.
        role.add_to_policy(
            iam.PolicyStatement(
                sid="ReadCatalog",
                actions=["glue:GetDatabase", "glue:GetTable", "glue:GetPartition", "glue:GetPartitions"],
                # table/<db>/*: the crawler names the tables.
                resources=[catalog.catalog_arn(), catalog.database_arn(), catalog.tables_arn()],
            )
        )
        bucket.grant_read(role, "lakehouse-dwh/*")
        catalog.results_bucket.grant_read_write(role)

        alarm_action = cloudwatch_actions.SnsAction(notifications.topic)
        alarms = [
            *self._reject_share_alarms(catalog.tables, config),
            *pipeline.alarms,
            events.dead_letters_alarm,
            events.trigger.errors_alarm,
            archive.errors_alarm,
            plan_catalog.errors_alarm,
            finish.errors_alarm,
        ]
        for alarm in alarms:
            alarm.add_alarm_action(alarm_action)

        CfnOutput(
            self, "BucketName", value=bucket.bucket_name, description="Upload CSVs to raw/<table>/ here"
        )
        CfnOutput(self, "LakehouseRoot", value=storage.root)
        CfnOutput(self, "StateMachineArn", value=pipeline.state_machine.state_machine_arn)
        CfnOutput(self, "TopicArn", value=notifications.topic.topic_arn)
        CfnOutput(self, "QueueUrl", value=events.queue.queue_url)
        CfnOutput(self, "DeadLetterQueueUrl", value=events.dead_letters.queue_url)
        CfnOutput(self, "AthenaWorkGroup", value=WORKGROUP)

    def _key(self) -> kms.Key:
        """The stack's customer-managed key: bucket, topic, Athena results, Glue and state-machine logs.

        CDK's default key policy gives the account's root kms:* on the key: AWS's default key policy,
        which hands access control to IAM policies (the grants below).
        """
        key = kms.Key(
            self,
            "Key",
            alias="alias/ecommerce-lakehouse",
            description="E-commerce lakehouse: data, Athena results, SNS topic, Glue and Step Functions logs",
            enable_key_rotation=True,
            # The data bucket outlives the stack by default; its key must too, or the data is unreadable.
            removal_policy=RemovalPolicy.RETAIN if self.config.retain_data else RemovalPolicy.DESTROY,
        )
        key.add_to_resource_policy(
            iam.PolicyStatement(
                sid="CloudWatchLogsEncryptLogGroups",
                principals=[iam.ServicePrincipal(f"logs.{Aws.REGION}.amazonaws.com")],
                actions=[
                    "kms:Encrypt*",
                    "kms:Decrypt*",
                    "kms:ReEncrypt*",
                    "kms:GenerateDataKey*",
                    "kms:Describe*",
                ],
                # In a key policy "*" is this key.
                resources=["*"],
                conditions={
                    "ArnLike": {
                        "kms:EncryptionContext:aws:logs:arn": (
                            f"arn:{Aws.PARTITION}:logs:{Aws.REGION}:{Aws.ACCOUNT_ID}:log-group:*"
                        )
                    }
                },
            )
        )
        key.add_to_resource_policy(
            iam.PolicyStatement(
                sid="CloudWatchAlarmsPublishToTopic",
                principals=[iam.ServicePrincipal("cloudwatch.amazonaws.com")],
                actions=["kms:Decrypt", "kms:GenerateDataKey*"],
                # In a key policy "*" is this key.
                resources=["*"],
                conditions={"StringEquals": {"aws:SourceAccount": Aws.ACCOUNT_ID}},
            )
        )
        return key

    def _reject_share_alarms(self, tables: list[str], config: LakehouseConfig) -> list[cloudwatch.Alarm]:
        """Per table: a batch rejected more than the configured share of its rows (FinishBatch's metric)."""
        return [
            cloudwatch.Alarm(
                self,
                f"RejectedShare-{table}",
                alarm_description=(
                    f"a batch rejected more than {config.reject_share_alarm_percent:g}% of the {table} rows "
                    f"it read (see its report, and rejected_{table} in Athena)"
                ),
                metric=cloudwatch.Metric(
                    namespace=METRICS_NAMESPACE,
                    metric_name="RejectedShare",
                    dimensions_map={"service": METRICS_SERVICE, "table": table},
                    statistic="Maximum",
                    period=Duration.hours(1),
                ),
                threshold=config.reject_share_alarm_percent,
                evaluation_periods=1,
                comparison_operator=cloudwatch.ComparisonOperator.GREATER_THAN_THRESHOLD,
                treat_missing_data=cloudwatch.TreatMissingData.NOT_BREACHING,
            )
            for table in tables
        ]

    @staticmethod
    def _grant_step(bucket: s3.IBucket, role: iam.IRole) -> None:
        """A step reads raw/ and manifests/ and writes the tables, rejected rows and reports."""
        bucket.grant_read(role, "raw/*")
        bucket.grant_read(role, "manifests/*")
        # plan/ and staging/: the distributed path's work items and the frames its units hand on.
        for prefix in ("lakehouse-dwh/*", "rejected/*", "reports/*", "plan/*", "staging/*"):
            bucket.grant_read_write(role, prefix)

    def _grant_distributed_maps(self, role: iam.IRole, bucket: s3.IBucket) -> None:
        """What a Distributed Map needs: list its items under plan/, start and watch its child executions."""
        role.add_to_principal_policy(
            iam.PolicyStatement(
                sid="ListWorkItems",
                actions=["s3:ListBucket"],
                resources=[bucket.bucket_arn],
                conditions={"StringLike": {"s3:prefix": ["plan/*"]}},
            )
        )
        role.add_to_principal_policy(
            iam.PolicyStatement(
                sid="StartUnitChildren",
                actions=["states:StartExecution"],
                resources=[state_machine_arn(self)],
            )
        )
        role.add_to_principal_policy(
            iam.PolicyStatement(
                sid="WatchUnitChildren",
                actions=["states:DescribeExecution", "states:StopExecution"],
                resources=[execution_arns(self)],
            )
        )

    def _grant_fargate_runs(self, role: iam.IRole, fargate: FargateRunner) -> None:
        """What ``ecs:runTask.sync`` needs: run, watch and stop the task, pass its roles, its event rule."""
        role.add_to_principal_policy(
            iam.PolicyStatement(
                sid="RunStepTask",
                actions=["ecs:RunTask"],
                resources=[fargate.task_definition.task_definition_arn],
                conditions={"ArnEquals": {"ecs:cluster": fargate.cluster.cluster_arn}},
            )
        )
        role.add_to_principal_policy(
            iam.PolicyStatement(
                sid="WatchStepTask",
                actions=["ecs:DescribeTasks", "ecs:StopTask"],
                # task/<cluster>/*: task ids are assigned when the task starts.
                resources=[
                    self.format_arn(
                        service="ecs", resource="task", resource_name=f"{fargate.cluster.cluster_name}/*"
                    )
                ],
            )
        )
        role.add_to_principal_policy(
            iam.PolicyStatement(
                sid="PassStepTaskRoles",
                actions=["iam:PassRole"],
                resources=[
                    fargate.task_role.role_arn,
                    fargate.task_definition.obtain_execution_role().role_arn,
                ],
                conditions={"StringEquals": {"iam:PassedToService": "ecs-tasks.amazonaws.com"}},
            )
        )
        role.add_to_principal_policy(
            iam.PolicyStatement(
                sid="SyncTaskEvents",
                actions=["events:PutTargets", "events:PutRule", "events:DescribeRule"],
                # The managed rule Step Functions uses to hear that an ECS task stopped.
                resources=[
                    self.format_arn(
                        service="events",
                        resource="rule",
                        resource_name="StepFunctionsGetEventsForECSTaskRule",
                    )
                ],
            )
        )


def _task_size(config: LakehouseConfig) -> dict[str, Any]:
    """What a step runs on, as the batch's cost estimate takes it (``pipeline.costs.TaskSize``)."""
    return {
        "runner": config.runner,
        "vcpu": config.fargate_cpu / 1024,
        "memory_gb": config.fargate_memory_mib / 1024,
        "ephemeral_gb": config.fargate_ephemeral_gib,
        "architecture": config.fargate_architecture,
        "spot": config.fargate_spot,
        "glue_dpu": config.glue_max_capacity,
    }
