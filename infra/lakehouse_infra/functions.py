"""The Lambda handlers of handlers/, deployed as one small zip with AWS's Powertools layer."""

from __future__ import annotations

from collections.abc import Sequence

from aws_cdk import Aws, Duration
from aws_cdk import aws_cloudwatch as cloudwatch
from aws_cdk import aws_iam as iam
from aws_cdk import aws_kms as kms
from aws_cdk import aws_lambda as lambda_
from constructs import Construct

from lakehouse_infra import powertools as powertools_layer
from lakehouse_infra.config import LakehouseConfig
from lakehouse_infra.log_groups import log_group
from lakehouse_infra.sources import LAMBDA_ASSET_EXCLUDES, PROJECT_ROOT, report_layer

RUNTIME = lambda_.Runtime.PYTHON_3_12


def report_libraries(scope: Construct) -> lambda_.LayerVersion:
    """The layer FinishBatch draws the HTML report with: plotly and its dependencies, pinned by the image's
    lock (pure Python, installed by pip at synth: no Docker)."""
    return lambda_.LayerVersion(
        scope,
        "ReportLibraries",
        code=lambda_.Code.from_asset(str(report_layer())),
        compatible_runtimes=[RUNTIME],
        compatible_architectures=[lambda_.Architecture.ARM_64],
        description="plotly for FinishBatch's HTML quality report (reports/<batch_id>.html)",
    )


class HandlerFunction(Construct):
    """One handler: its function, its log group (with retention) and an alarm on its errors."""

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        handler: str,
        description: str,
        environment: dict[str, str],
        timeout: Duration,
        key: kms.IKey,
        config: LakehouseConfig,
        memory_size: int = 256,
        layers: Sequence[lambda_.ILayerVersion] = (),
    ) -> None:
        super().__init__(scope, construct_id)
        self.log_group = log_group(self, "Logs", key=key, config=config)
        # The Powertools layer AWS publishes in every region (no build step, no Docker for synth): the
        # one holding the release pyproject.toml pins, unless the context overrides its version.
        powertools = lambda_.LayerVersion.from_layer_version_arn(
            self,
            "Powertools",
            f"arn:{Aws.PARTITION}:lambda:{Aws.REGION}:{powertools_layer.LAYER_ACCOUNT}:layer:"
            f"{powertools_layer.LAYER_NAME}:"
            f"{config.powertools_layer_version or powertools_layer.layer_version()}",
        )
        # Its own role writing only to its own log group (instead of AWSLambdaBasicExecutionRole's
        # logs actions on every log group).
        self.role = iam.Role(
            self, "Role", assumed_by=iam.ServicePrincipal("lambda.amazonaws.com"), description=description
        )
        self.role.add_to_policy(
            iam.PolicyStatement(
                sid="OwnLogGroup",
                actions=["logs:CreateLogStream", "logs:PutLogEvents"],
                resources=[self.log_group.log_group_arn],
            )
        )
        # Active tracing makes CDK add xray:PutTraceSegments/PutTelemetryRecords on "*": X-Ray has no
        # resource-level permissions.
        self.function = lambda_.Function(
            self,
            "Function",
            description=description,
            runtime=RUNTIME,
            architecture=lambda_.Architecture.ARM_64,
            handler=handler,
            code=lambda_.Code.from_asset(str(PROJECT_ROOT), exclude=LAMBDA_ASSET_EXCLUDES),
            layers=[powertools, *layers],
            memory_size=memory_size,
            timeout=timeout,
            environment={"POWERTOOLS_SERVICE_NAME": "ecommerce-lakehouse", **environment},
            tracing=lambda_.Tracing.ACTIVE,
            log_group=self.log_group,
            role=self.role,
        )
        self.errors_alarm = cloudwatch.Alarm(
            self,
            "Errors",
            alarm_description=f"{construct_id} raised errors (see its log group)",
            metric=self.function.metric_errors(period=Duration.minutes(5), statistic="Sum"),
            threshold=1,
            evaluation_periods=1,
            comparison_operator=cloudwatch.ComparisonOperator.GREATER_THAN_OR_EQUAL_TO_THRESHOLD,
            treat_missing_data=cloudwatch.TreatMissingData.NOT_BREACHING,
        )
