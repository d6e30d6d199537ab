"""Glue Data Catalog (database, Delta crawler) and the Athena workgroup that checks the tables."""

from __future__ import annotations

from aws_cdk import Aws, Duration
from aws_cdk import aws_athena as athena
from aws_cdk import aws_glue as glue
from aws_cdk import aws_iam as iam
from aws_cdk import aws_kms as kms
from aws_cdk import aws_s3 as s3
from constructs import Construct

from lakehouse_infra.config import LakehouseConfig
from lakehouse_infra.sources import steps
from lakehouse_infra.storage import encrypted_bucket

DATABASE = "ecommerce_dwh"
CRAWLER = "ecommerce-lakehouse-crawler"
REJECTED_CRAWLER = "ecommerce-lakehouse-rejected-crawler"
WORKGROUP = "ecommerce-lakehouse"
LAKEHOUSE_PREFIX = "lakehouse-dwh/"
REJECTED_PREFIX = "rejected/"
# rejected/<table>/ and lakehouse-dwh/<table>/ end in the same folder name: the rejected tables' crawler
# names its tables with this prefix (pipeline.catalog.REJECTED_PREFIX).
REJECTED_TABLE_PREFIX = "rejected_"


class LakehouseCatalog(Construct):
    """The tables as native Delta tables in ``ecommerce_dwh``: the lakehouse's crawled from lakehouse-dwh/,
    the rejected rows' (``rejected_<table>``) from rejected/, each by its own crawler."""

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        bucket: s3.IBucket,
        log_bucket: s3.IBucket,
        key: kms.IKey,
        config: LakehouseConfig,
    ) -> None:
        super().__init__(scope, construct_id)
        self.tables = [step["table"] for step in steps()]
        self.security_configuration = glue.SecurityConfiguration(
            self,
            "Security",
            security_configuration_name="ecommerce-lakehouse",
            s3_encryption=glue.S3Encryption.kms(key),
            cloud_watch_encryption=glue.CloudWatchEncryption.kms(key),
            job_bookmarks_encryption=glue.JobBookmarksEncryption.client_side_kms(key),
        )
        self.database = glue.CfnDatabase(
            self,
            "Database",
            catalog_id=Aws.ACCOUNT_ID,
            database_input=glue.CfnDatabase.DatabaseInputProperty(
                name=DATABASE, description="E-commerce lakehouse: Delta tables written by the lakehouse steps"
            ),
        )
        self.crawler_role = iam.Role(
            self,
            "CrawlerRole",
            assumed_by=iam.ServicePrincipal("glue.amazonaws.com"),
            description=f"Glue crawlers {CRAWLER}, {REJECTED_CRAWLER}: read their tables, write {DATABASE}'s",
        )
        bucket.grant_read(self.crawler_role, f"{LAKEHOUSE_PREFIX}*")
        bucket.grant_read(self.crawler_role, f"{REJECTED_PREFIX}*")
        self.crawler_role.add_to_policy(
            iam.PolicyStatement(
                sid="CatalogTables",
                actions=[
                    "glue:GetDatabase",
                    "glue:GetTable",
                    "glue:GetTables",
                    "glue:CreateTable",
                    "glue:UpdateTable",
                    "glue:GetPartition",
                    "glue:GetPartitions",
                    "glue:BatchGetPartition",
                    "glue:BatchCreatePartition",
                    "glue:BatchUpdatePartition",
                ],
                # table/<db>/*: the crawler creates the tables, so their names are not resources yet.
                resources=[self.catalog_arn(), self.database_arn(), self.tables_arn()],
            )
        )
        self.crawler_role.add_to_policy(
            iam.PolicyStatement(
                sid="CrawlerLogs",
                actions=[
                    "logs:CreateLogGroup",
                    "logs:CreateLogStream",
                    "logs:PutLogEvents",
                    "logs:AssociateKmsKey",
                ],
                # Glue writes crawler logs to streams it names per run, under /aws-glue/crawlers*.
                resources=[
                    f"arn:{Aws.PARTITION}:logs:{Aws.REGION}:{Aws.ACCOUNT_ID}:log-group:/aws-glue/crawlers*"
                ],
            )
        )
        key.grant_encrypt_decrypt(self.crawler_role)
        self.crawler = self._crawler(
            "Crawler",
            CRAWLER,
            "Registers the lakehouse's Delta tables (native Delta, no manifests) for Athena",
            [f"s3://{bucket.bucket_name}/{LAKEHOUSE_PREFIX}{table}/" for table in self.tables],
        )
        self.rejected_crawler = self._crawler(
            "RejectedCrawler",
            REJECTED_CRAWLER,
            "Registers the rejected rows' Delta tables as rejected_<table> for Athena",
            [f"s3://{bucket.bucket_name}/{REJECTED_PREFIX}{table}/" for table in self.tables],
            table_prefix=REJECTED_TABLE_PREFIX,
        )

        self.results_bucket = encrypted_bucket(
            self,
            "AthenaResults",
            key=key,
            log_bucket=log_bucket,
            log_prefix="athena-results/",
            lifecycle_rules=[
                s3.LifecycleRule(
                    id="expire-results",
                    expiration=Duration.days(config.athena_results_days),
                    noncurrent_version_expiration=Duration.days(1),
                    abort_incomplete_multipart_upload_after=Duration.days(1),
                )
            ],
            # Query results can always be recomputed.
            retain=False,
        )
        self.workgroup = athena.CfnWorkGroup(
            self,
            "WorkGroup",
            name=WORKGROUP,
            description="Row-count checks of the lakehouse tables after each batch",
            state="ENABLED",
            recursive_delete_option=True,
            work_group_configuration=athena.CfnWorkGroup.WorkGroupConfigurationProperty(
                enforce_work_group_configuration=True,
                publish_cloud_watch_metrics_enabled=True,
                # Native Delta tables need engine version 3.
                engine_version=athena.CfnWorkGroup.EngineVersionProperty(
                    selected_engine_version="Athena engine version 3"
                ),
                result_configuration=athena.CfnWorkGroup.ResultConfigurationProperty(
                    output_location=f"s3://{self.results_bucket.bucket_name}/",
                    encryption_configuration=athena.CfnWorkGroup.EncryptionConfigurationProperty(
                        encryption_option="SSE_KMS", kms_key=key.key_arn
                    ),
                    expected_bucket_owner=Aws.ACCOUNT_ID,
                ),
            ),
        )

    def _crawler(
        self,
        construct_id: str,
        name: str,
        description: str,
        tables: list[str],
        table_prefix: str | None = None,
    ) -> glue.CfnCrawler:
        crawler = glue.CfnCrawler(
            self,
            construct_id,
            name=name,
            description=description,
            role=self.crawler_role.role_arn,
            database_name=DATABASE,
            table_prefix=table_prefix,
            targets=glue.CfnCrawler.TargetsProperty(
                # Delta targets, not S3 targets: an S3 crawl would expose superseded Parquet files as rows.
                delta_targets=[
                    glue.CfnCrawler.DeltaTargetProperty(
                        delta_tables=tables, create_native_delta_table=True, write_manifest=False
                    )
                ]
            ),
            schema_change_policy=glue.CfnCrawler.SchemaChangePolicyProperty(
                update_behavior="UPDATE_IN_DATABASE", delete_behavior="LOG"
            ),
            crawler_security_configuration=self.security_configuration.security_configuration_name,
        )
        crawler.add_resource_dependency(self.database)
        return crawler

    @staticmethod
    def catalog_arn() -> str:
        return f"arn:{Aws.PARTITION}:glue:{Aws.REGION}:{Aws.ACCOUNT_ID}:catalog"

    @staticmethod
    def database_arn() -> str:
        return f"arn:{Aws.PARTITION}:glue:{Aws.REGION}:{Aws.ACCOUNT_ID}:database/{DATABASE}"

    @staticmethod
    def tables_arn() -> str:
        return f"arn:{Aws.PARTITION}:glue:{Aws.REGION}:{Aws.ACCOUNT_ID}:table/{DATABASE}/*"

    @property
    def crawler_arns(self) -> list[str]:
        return [
            f"arn:{Aws.PARTITION}:glue:{Aws.REGION}:{Aws.ACCOUNT_ID}:crawler/{name}"
            for name in (CRAWLER, REJECTED_CRAWLER)
        ]

    @property
    def workgroup_arn(self) -> str:
        return f"arn:{Aws.PARTITION}:athena:{Aws.REGION}:{Aws.ACCOUNT_ID}:workgroup/{WORKGROUP}"
