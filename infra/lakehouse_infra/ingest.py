"""raw/*.csv events: S3 -> SQS (with a dead-letter queue) -> CheckDataAvailability."""

from __future__ import annotations

from aws_cdk import Duration
from aws_cdk import aws_cloudwatch as cloudwatch
from aws_cdk import aws_kms as kms
from aws_cdk import aws_lambda_event_sources as event_sources
from aws_cdk import aws_s3 as s3
from aws_cdk import aws_s3_notifications as s3n
from aws_cdk import aws_sqs as sqs
from constructs import Construct

from lakehouse_infra.config import LakehouseConfig
from lakehouse_infra.functions import HandlerFunction
from lakehouse_infra.suppressions import skip_checkov

TRIGGER_TIMEOUT = Duration.seconds(60)


class RawFileEvents(Construct):
    """The queue ``ecommerce-etl-queue`` fed by raw/ uploads, and the trigger that drains it."""

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        bucket: s3.IBucket,
        root: str,
        state_machine_arn: str,
        key: kms.IKey,
        config: LakehouseConfig,
    ) -> None:
        super().__init__(scope, construct_id)
        self.dead_letters = sqs.Queue(
            self,
            "DeadLetters",
            queue_name="ecommerce-etl-queue-dlq",
            encryption=sqs.QueueEncryption.SQS_MANAGED,
            enforce_ssl=True,
            retention_period=Duration.days(14),
        )
        self.queue = sqs.Queue(
            self,
            "Queue",
            queue_name="ecommerce-etl-queue",
            encryption=sqs.QueueEncryption.SQS_MANAGED,
            enforce_ssl=True,
            # AWS's advice for a Lambda event source: at least six times the function's timeout.
            visibility_timeout=Duration.seconds(TRIGGER_TIMEOUT.to_seconds() * 6),
            retention_period=Duration.days(4),
            dead_letter_queue=sqs.DeadLetterQueue(queue=self.dead_letters, max_receive_count=5),
        )
        # SSE-SQS: with the stack's key, the key policy (which must name the bucket for S3's
        # notifications) and the bucket (encrypted with the key) would depend on each other.
        for queue in (self.queue, self.dead_letters):
            skip_checkov(
                queue.node.default_child,  # type: ignore[arg-type]
                {
                    "CKV_AWS_27": "encrypted at rest with SSE-SQS (SqsManagedSseEnabled), "
                    "which this check does not read"
                },
            )
        bucket.add_event_notification(
            s3.EventType.OBJECT_CREATED,
            s3n.SqsDestination(self.queue),
            s3.NotificationKeyFilter(prefix="raw/", suffix=".csv"),
        )
        self.trigger = HandlerFunction(
            self,
            "CheckDataAvailability",
            handler="handlers.check_data_availability.lambda_handler",
            description="raw/*.csv events: start EcommerceETLPipeline when every dataset has a file",
            environment={"LAKEHOUSE_ROOT": root, "STATE_MACHINE_ARN": state_machine_arn},
            timeout=TRIGGER_TIMEOUT,
            key=key,
            config=config,
        )
        self.trigger.function.add_event_source(
            event_sources.SqsEventSource(
                self.queue,
                batch_size=10,
                max_batching_window=Duration.seconds(20),
                # Failed records come back alone (powertools' partial batch response), not the batch.
                report_batch_item_failures=True,
                # The batch lock serializes starts anyway; two pollers are plenty.
                max_concurrency=2,
            )
        )
        self.dead_letters_alarm = cloudwatch.Alarm(
            self,
            "DeadLettersWaiting",
            alarm_description="raw/ file events failed five times and wait in ecommerce-etl-queue-dlq",
            metric=self.dead_letters.metric_approximate_number_of_messages_visible(
                period=Duration.minutes(5), statistic="Maximum"
            ),
            threshold=1,
            evaluation_periods=1,
            comparison_operator=cloudwatch.ComparisonOperator.GREATER_THAN_OR_EQUAL_TO_THRESHOLD,
            treat_missing_data=cloudwatch.TreatMissingData.NOT_BREACHING,
        )
