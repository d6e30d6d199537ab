"""Deploy-time settings: CDK context values (``cdk deploy -c name=value``) with checked defaults."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Literal

Runner = Literal["fargate", "glue"]
Architecture = Literal["arm64", "x86_64"]

# Fargate's valid (vCPU units -> memory MiB range) pairs for the sizes this pipeline can use.
FARGATE_MEMORY = {
    1024: range(2048, 8193, 1024),
    2048: range(4096, 16385, 1024),
    4096: range(8192, 30721, 1024),
    8192: range(16384, 61441, 4096),
    16384: range(32768, 122881, 8192),
}


class ConfigError(ValueError):
    """A context value that cannot be deployed; the message names the key and the value."""


@dataclass(frozen=True)
class LakehouseConfig:
    """Everything a deployment may change; each field is a context key of the same name."""

    runner: Runner = "fargate"
    """Who runs the table steps: ECS Fargate tasks, or Glue Python-shell jobs (the original's runtime)."""
    bucket_name: str | None = None
    """The data bucket's name; CloudFormation picks a unique one when unset."""
    retain_data: bool = True
    """Keep the data bucket, its key and the log buckets on `cdk destroy` (the lakehouse survives)."""
    fargate_cpu: int = 1024
    fargate_memory_mib: int = 4096
    """1 vCPU / 4 GiB: a full Instacart-scale load peaks at 2.2 GiB (the steps' default memory budget is
    for a 4 GiB task) in a minute on one core, and a daily batch's three tasks are billed their minute
    each: 0.004 USD instead of 0.0064 at 2 vCPU / 8 GiB (README: What a batch costs)."""
    fargate_ephemeral_gib: int = 21
    fargate_architecture: Architecture = "arm64"
    fargate_spot: bool = False
    """Run steps on Fargate Spot (about 70% cheaper; an interrupted step fails the batch, which resumes)."""
    nat_gateways: int = 1
    """NAT gateways of the task VPC (1 is cheapest; 2 survives the loss of an availability zone)."""
    distributed_threshold_gib: float = 50.0
    """A batch of this many GiB of CSV or more runs as stages whose units are Fargate tasks of their own
    (Distributed Maps); below it, one task per table. Fargate runner only."""
    distributed_max_concurrency: int = 40
    """Units running at once in a Distributed Map (each a Fargate task: mind the account's vCPU quota)."""
    glue_max_capacity: float = 1.0
    """DPUs of each Glue Python-shell job: 0.0625 or 1."""
    archive_infrequent_access_days: int = 30
    archive_glacier_days: int = 90
    archive_expiry_days: int = 0
    """Delete archived raw files after this many days; 0 keeps them forever."""
    noncurrent_version_days: int = 30
    """Keep overwritten and deleted object versions (vacuumed Delta files included) this long."""
    access_log_days: int = 365
    athena_results_days: int = 30
    log_retention_days: int = 90
    batch_timeout_hours: int = 6
    reject_share_alarm_percent: float = 10.0
    """Alarm (to the SNS topic) when a batch rejects more than this share of a table's rows in."""
    powertools_layer_version: int = 0
    """Override of the version of AWS's public Powertools v3 layer; 0 (the default) takes the layer of
    the release pyproject.toml pins (lakehouse_infra/powertools.py), the one the handlers' tests run."""

    @classmethod
    def from_context(cls, context: dict[str, Any]) -> LakehouseConfig:
        """Settings from CDK context values (strings from ``-c``, or JSON values from cdk.json)."""
        values: dict[str, Any] = {}
        for field in fields(cls):
            if context.get(field.name) is None:
                continue
            values[field.name] = _parse(field.name, field.type, context[field.name])
        config = cls(**values)
        config.check()
        return config

    def check(self) -> None:
        """Raise ConfigError for a combination AWS would reject at deploy time."""
        if self.runner not in ("fargate", "glue"):
            raise ConfigError(f"runner must be 'fargate' or 'glue', not {self.runner!r}")
        if self.fargate_architecture not in ("arm64", "x86_64"):
            raise ConfigError(
                f"fargate_architecture must be 'arm64' or 'x86_64', not {self.fargate_architecture!r}"
            )
        if self.fargate_memory_mib not in FARGATE_MEMORY.get(self.fargate_cpu, range(0)):
            raise ConfigError(
                f"fargate_cpu={self.fargate_cpu} with fargate_memory_mib={self.fargate_memory_mib} "
                "is not a Fargate "
                f"size; valid cpu values: {sorted(FARGATE_MEMORY)} (see the AWS Fargate task size table)"
            )
        if not 21 <= self.fargate_ephemeral_gib <= 200:
            raise ConfigError(f"fargate_ephemeral_gib must be 21..200, not {self.fargate_ephemeral_gib}")
        if self.nat_gateways not in (1, 2):
            raise ConfigError(
                f"nat_gateways must be 1 or 2 (the tasks run in private subnets), not {self.nat_gateways}"
            )
        if not 0 <= self.reject_share_alarm_percent < 100:
            raise ConfigError(
                f"reject_share_alarm_percent must be 0 to under 100, not {self.reject_share_alarm_percent}"
            )
        if not self.distributed_threshold_gib > 0:
            raise ConfigError(
                f"distributed_threshold_gib must be above 0, not {self.distributed_threshold_gib}"
            )
        if not 1 <= self.distributed_max_concurrency <= 10_000:
            raise ConfigError(
                f"distributed_max_concurrency must be 1..10000, not {self.distributed_max_concurrency}"
            )
        if self.glue_max_capacity not in (0.0625, 1.0):
            raise ConfigError(f"glue_max_capacity must be 0.0625 or 1, not {self.glue_max_capacity}")
        if self.archive_infrequent_access_days < 30:
            raise ConfigError(
                "archive_infrequent_access_days must be at least 30 (an S3 rule for STANDARD_IA)"
            )
        if self.archive_glacier_days < self.archive_infrequent_access_days + 30:
            raise ConfigError(
                "archive_glacier_days must be at least 30 days after archive_infrequent_access_days"
            )
        if self.archive_expiry_days and self.archive_expiry_days <= self.archive_glacier_days:
            raise ConfigError("archive_expiry_days must be 0 (never) or later than archive_glacier_days")
        for name in (
            "noncurrent_version_days",
            "access_log_days",
            "athena_results_days",
            "batch_timeout_hours",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, not {getattr(self, name)}")


def _parse(name: str, kind: Any, value: Any) -> Any:
    kind = str(kind)
    text = str(value).strip()
    try:
        if kind == "bool":
            if isinstance(value, bool):
                return value
            if text.lower() in ("true", "1", "yes"):
                return True
            if text.lower() in ("false", "0", "no"):
                return False
            raise ValueError(text)
        if kind == "int":
            return int(text)
        if kind == "float":
            return float(text)
    except ValueError:
        raise ConfigError(f"context value {name}={value!r} is not a {kind}") from None
    return text or None
