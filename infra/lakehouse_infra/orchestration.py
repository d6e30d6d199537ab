"""EcommerceETLPipeline (statemachine/etl.asl.json) and the SNS topic that tells people how a batch went."""

from __future__ import annotations

from aws_cdk import (
    Acknowledgment,
    ArnFormat,
    CfnCondition,
    CfnParameter,
    Duration,
    Fn,
    Stack,
    Validations,
)
from aws_cdk import aws_cloudwatch as cloudwatch
from aws_cdk import aws_iam as iam
from aws_cdk import aws_kms as kms
from aws_cdk import aws_sns as sns
from aws_cdk import aws_stepfunctions as sfn
from constructs import Construct

from lakehouse_infra.config import LakehouseConfig
from lakehouse_infra.log_groups import log_group
from lakehouse_infra.sources import definition_text, placeholders
from lakehouse_infra.suppressions import ignore_cfn_lint

STATE_MACHINE = "EcommerceETLPipeline"
TOPIC = "ecommerce-etl-notifications"


def execution_arns(scope: Construct) -> str:
    """The ARNs of the state machine's executions (a lock names the execution that holds it)."""
    return Stack.of(scope).format_arn(
        service="states",
        resource="execution",
        resource_name=f"{STATE_MACHINE}:*",
        arn_format=ArnFormat.COLON_RESOURCE_NAME,
    )


def state_machine_arn(scope: Construct) -> str:
    """The state machine's ARN from its fixed name: handlers it invokes can start it without a cycle."""
    return Stack.of(scope).format_arn(
        service="states",
        resource="stateMachine",
        resource_name=STATE_MACHINE,
        arn_format=ArnFormat.COLON_RESOURCE_NAME,
    )


class Notifications(Construct):
    """The encrypted topic ``ecommerce-etl-notifications``, with an optional e-mail subscription."""

    def __init__(self, scope: Construct, construct_id: str, *, key: kms.IKey) -> None:
        super().__init__(scope, construct_id)
        self.topic = sns.Topic(self, "Topic", topic_name=TOPIC, master_key=key, enforce_ssl=True)
        email = CfnParameter(
            Stack.of(self),
            "NotificationEmail",
            type="String",
            default="",
            allowed_pattern=r"^$|^[^@\s]+@[^@\s]+\.[^@\s]+$",
            description="E-mail address subscribed to ecommerce-etl-notifications (empty: no subscription)",
        )
        wanted = CfnCondition(
            self,
            "HasNotificationEmail",
            expression=Fn.condition_not(Fn.condition_equals(email.value_as_string, "")),
        )
        subscription = sns.CfnSubscription(
            self, "Email", topic_arn=self.topic.topic_arn, protocol="email", endpoint=email.value_as_string
        )
        subscription.cfn_options.condition = wanted


class EtlStateMachine(Construct):
    """The definition inlined as written (so cfn-lint reads it), its ``${...}`` filled by substitutions.

    Its role starts empty: the stack grants exactly what the definition's states call.
    """

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        substitutions: dict[str, str],
        key: kms.IKey,
        config: LakehouseConfig,
    ) -> None:
        super().__init__(scope, construct_id)
        missing = placeholders() - set(substitutions)
        if missing:
            raise ValueError(
                f"statemachine/etl.asl.json uses ${{...}} with no value: {', '.join(sorted(missing))}"
            )
        self.role = iam.Role(
            self,
            "Role",
            assumed_by=iam.ServicePrincipal("states.amazonaws.com"),
            description=f"{STATE_MACHINE}: the actions of its states, nothing else",
        )
        # /aws/vendedlogs/ keeps CloudWatch Logs' resource policy from growing per log group.
        self.log_group = log_group(
            self, "Logs", key=key, config=config, name=f"/aws/vendedlogs/states/{STATE_MACHINE}"
        )
        # CDK adds X-Ray and log-delivery statements on "*" to the role for tracing and logging:
        # those APIs have no resource-level permissions.
        self.state_machine = sfn.StateMachine(
            self,
            "StateMachine",
            state_machine_name=STATE_MACHINE,
            definition_body=sfn.DefinitionBody.from_string(definition_text()),
            definition_substitutions=substitutions,
            role=self.role,
            logs=sfn.LogOptions(
                destination=self.log_group, level=sfn.LogLevel.ALL, include_execution_data=True
            ),
            tracing_enabled=True,
            timeout=Duration.hours(config.batch_timeout_hours),
        )
        # The same finding from the CDK's built-in validation and from cfn-lint: neither reads the
        # DefinitionSubstitutions that fill the ${...} of the definition.
        ignore_cfn_lint(self.state_machine.node.default_child, "E1029")  # type: ignore[arg-type]
        Validations.of(self.state_machine).acknowledge(
            Acknowledgment(
                id="CloudFormation-Validate::E1029",
                reason="the ${...} in DefinitionString are DefinitionSubstitutions, "
                "which CloudFormation fills in",
            )
        )
        self.alarms = [
            cloudwatch.Alarm(
                self,
                name,
                alarm_description=f"{STATE_MACHINE} executions {what}: "
                "see the SNS message and the execution history",
                metric=metric,
                threshold=1,
                evaluation_periods=1,
                comparison_operator=cloudwatch.ComparisonOperator.GREATER_THAN_OR_EQUAL_TO_THRESHOLD,
                treat_missing_data=cloudwatch.TreatMissingData.NOT_BREACHING,
            )
            for name, what, metric in (
                (
                    "Failed",
                    "failed",
                    self.state_machine.metric_failed(period=Duration.minutes(5), statistic="Sum"),
                ),
                (
                    "TimedOut",
                    "timed out",
                    self.state_machine.metric_timed_out(period=Duration.minutes(5), statistic="Sum"),
                ),
            )
        ]
