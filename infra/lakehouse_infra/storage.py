"""The data bucket (raw/, lakehouse-dwh/, rejected/, archived/, manifests/, reports/) and its access logs."""

from __future__ import annotations

from aws_cdk import Duration, RemovalPolicy
from aws_cdk import aws_kms as kms
from aws_cdk import aws_s3 as s3
from constructs import Construct

from lakehouse_infra.config import LakehouseConfig
from lakehouse_infra.suppressions import skip_checkov


class LakehouseStorage(Construct):
    """An encrypted, versioned, TLS-only data bucket whose server access logs go to a log bucket."""

    def __init__(
        self, scope: Construct, construct_id: str, *, key: kms.IKey, config: LakehouseConfig
    ) -> None:
        super().__init__(scope, construct_id)
        removal = RemovalPolicy.RETAIN if config.retain_data else RemovalPolicy.DESTROY
        # S3 server access logs can only be delivered to a bucket encrypted with SSE-S3.
        self.log_bucket = s3.Bucket(
            self,
            "AccessLogs",
            encryption=s3.BucketEncryption.S3_MANAGED,
            block_public_access=s3.BlockPublicAccess.BLOCK_ALL,
            object_ownership=s3.ObjectOwnership.BUCKET_OWNER_ENFORCED,
            enforce_ssl=True,
            minimum_tls_version=1.2,
            versioned=True,
            lifecycle_rules=[
                s3.LifecycleRule(
                    id="expire-logs",
                    expiration=Duration.days(config.access_log_days),
                    noncurrent_version_expiration=Duration.days(7),
                    abort_incomplete_multipart_upload_after=Duration.days(7),
                )
            ],
            removal_policy=removal,
            auto_delete_objects=not config.retain_data,
        )
        skip_checkov(
            self.log_bucket.node.default_child,  # type: ignore[arg-type]
            {"CKV_AWS_18": "this is the access-log bucket: logging its own access would loop"},
        )
        archive_rule = s3.LifecycleRule(
            id="archived-to-cheaper-storage",
            prefix="archived/",
            transitions=[
                s3.Transition(
                    storage_class=s3.StorageClass.INFREQUENT_ACCESS,
                    transition_after=Duration.days(config.archive_infrequent_access_days),
                ),
                s3.Transition(
                    storage_class=s3.StorageClass.GLACIER_INSTANT_RETRIEVAL,
                    transition_after=Duration.days(config.archive_glacier_days),
                ),
            ],
            expiration=Duration.days(config.archive_expiry_days) if config.archive_expiry_days else None,
        )
        self.bucket = encrypted_bucket(
            self,
            "Data",
            key=key,
            log_bucket=self.log_bucket,
            log_prefix="data-bucket/",
            bucket_name=config.bucket_name,
            lifecycle_rules=[
                archive_rule,
                s3.LifecycleRule(
                    id="old-versions-and-uploads",
                    # Delta vacuum deletes superseded files; versioning keeps them this much longer.
                    noncurrent_version_expiration=Duration.days(config.noncurrent_version_days),
                    abort_incomplete_multipart_upload_after=Duration.days(7),
                    expired_object_delete_marker=True,
                ),
            ],
            retain=config.retain_data,
        )
        self.root = f"s3://{self.bucket.bucket_name}"
        """The lakehouse root every component is given (``LAKEHOUSE_ROOT``, ``--root``)."""


def encrypted_bucket(
    scope: Construct,
    construct_id: str,
    *,
    key: kms.IKey,
    log_bucket: s3.IBucket,
    log_prefix: str,
    lifecycle_rules: list[s3.LifecycleRule],
    retain: bool,
    bucket_name: str | None = None,
) -> s3.Bucket:
    """A bucket encrypted with ``key``, closed to the public, TLS 1.2+ only, versioned, access-logged."""
    return s3.Bucket(
        scope,
        construct_id,
        bucket_name=bucket_name,
        encryption=s3.BucketEncryption.KMS,
        encryption_key=key,
        # One data key per bucket instead of one KMS request per object: Delta writes many objects.
        bucket_key_enabled=True,
        block_public_access=s3.BlockPublicAccess.BLOCK_ALL,
        object_ownership=s3.ObjectOwnership.BUCKET_OWNER_ENFORCED,
        enforce_ssl=True,
        minimum_tls_version=1.2,
        versioned=True,
        server_access_logs_bucket=log_bucket,
        server_access_logs_prefix=log_prefix,
        lifecycle_rules=lifecycle_rules,
        removal_policy=RemovalPolicy.RETAIN if retain else RemovalPolicy.DESTROY,
        auto_delete_objects=not retain,
    )
