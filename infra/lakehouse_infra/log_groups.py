"""CloudWatch log groups of the stack: retention from the config, encrypted with the stack's key."""

from __future__ import annotations

from aws_cdk import RemovalPolicy
from aws_cdk import aws_kms as kms
from aws_cdk import aws_logs as logs
from constructs import Construct

from lakehouse_infra.config import LakehouseConfig


def log_group(
    scope: Construct, construct_id: str, *, key: kms.IKey, config: LakehouseConfig, name: str | None = None
) -> logs.LogGroup:
    """A log group kept ``log_retention_days`` (rounded up to a period CloudWatch offers), KMS-encrypted."""
    return logs.LogGroup(
        scope,
        construct_id,
        log_group_name=name,
        retention=retention(config.log_retention_days),
        encryption_key=key,
        removal_policy=RemovalPolicy.DESTROY,
    )


_RETENTION = {
    1: logs.RetentionDays.ONE_DAY,
    3: logs.RetentionDays.THREE_DAYS,
    5: logs.RetentionDays.FIVE_DAYS,
    7: logs.RetentionDays.ONE_WEEK,
    14: logs.RetentionDays.TWO_WEEKS,
    30: logs.RetentionDays.ONE_MONTH,
    60: logs.RetentionDays.TWO_MONTHS,
    90: logs.RetentionDays.THREE_MONTHS,
    120: logs.RetentionDays.FOUR_MONTHS,
    150: logs.RetentionDays.FIVE_MONTHS,
    180: logs.RetentionDays.SIX_MONTHS,
    365: logs.RetentionDays.ONE_YEAR,
    400: logs.RetentionDays.THIRTEEN_MONTHS,
    545: logs.RetentionDays.EIGHTEEN_MONTHS,
    731: logs.RetentionDays.TWO_YEARS,
    1096: logs.RetentionDays.THREE_YEARS,
    1827: logs.RetentionDays.FIVE_YEARS,
    3653: logs.RetentionDays.TEN_YEARS,
}


def retention(days: int) -> logs.RetentionDays:
    """The shortest CloudWatch Logs retention period that keeps at least ``days`` days."""
    return next(
        (value for limit, value in sorted(_RETENTION.items()) if limit >= days), logs.RetentionDays.TEN_YEARS
    )
