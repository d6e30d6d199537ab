"""Who runs `lakehouse step TABLE`: an ECS Fargate task (default) or Glue Python-shell jobs."""

from __future__ import annotations

from aws_cdk import Aws, Duration
from aws_cdk import aws_ec2 as ec2
from aws_cdk import aws_ecr_assets as ecr_assets
from aws_cdk import aws_ecs as ecs
from aws_cdk import aws_glue as glue
from aws_cdk import aws_iam as iam
from aws_cdk import aws_kms as kms
from aws_cdk import aws_s3 as s3
from aws_cdk import aws_s3_deployment as s3deploy
from constructs import Construct

from lakehouse_infra.config import LakehouseConfig
from lakehouse_infra.log_groups import log_group
from lakehouse_infra.sources import DOCKERFILE, GLUE_ENTRY, PROJECT_ROOT, glue_artifacts, steps, wheel_name

CONTAINER_NAME = "lakehouse"
GLUE_ARTIFACTS_PREFIX = "artifacts/glue/"


class FargateRunner(Construct):
    """A VPC with private subnets, a cluster, and the step task built from containers/Dockerfile."""

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        log_bucket: s3.IBucket,
        key: kms.IKey,
        config: LakehouseConfig,
    ) -> None:
        super().__init__(scope, construct_id)
        self.vpc = ec2.Vpc(
            self,
            "Vpc",
            max_azs=2,
            nat_gateways=config.nat_gateways,
            subnet_configuration=[
                ec2.SubnetConfiguration(name="public", subnet_type=ec2.SubnetType.PUBLIC, cidr_mask=24),
                ec2.SubnetConfiguration(
                    name="tasks", subnet_type=ec2.SubnetType.PRIVATE_WITH_EGRESS, cidr_mask=22
                ),
            ],
            # S3 traffic (all of the data) stays off the NAT gateway, and off its per-GB charge.
            gateway_endpoints={
                "S3": ec2.GatewayVpcEndpointOptions(service=ec2.GatewayVpcEndpointAwsService.S3)
            },
            flow_logs={
                "Rejected": ec2.FlowLogOptions(
                    destination=ec2.FlowLogDestination.to_s3(log_bucket, "vpc-flow-logs/"),
                    traffic_type=ec2.FlowLogTrafficType.REJECT,
                )
            },
            restrict_default_security_group=True,
        )
        self.subnets = self.vpc.select_subnets(subnet_type=ec2.SubnetType.PRIVATE_WITH_EGRESS).subnet_ids
        self.security_group = ec2.SecurityGroup(
            self,
            "Tasks",
            vpc=self.vpc,
            description="Lakehouse step tasks: HTTPS out to AWS APIs and S3, nothing in",
            allow_all_outbound=False,
        )
        self.security_group.add_egress_rule(
            ec2.Peer.any_ipv4(), ec2.Port.tcp(443), "HTTPS to AWS APIs (S3 through the gateway endpoint)"
        )
        self.cluster = ecs.Cluster(
            self,
            "Cluster",
            vpc=self.vpc,
            container_insights_v2=ecs.ContainerInsights.ENABLED,
            enable_fargate_capacity_providers=True,
        )
        arm = config.fargate_architecture == "arm64"
        self.task_definition = ecs.FargateTaskDefinition(
            self,
            "StepTask",
            family="lakehouse-step",
            cpu=config.fargate_cpu,
            memory_limit_mib=config.fargate_memory_mib,
            ephemeral_storage_gib=config.fargate_ephemeral_gib if config.fargate_ephemeral_gib > 21 else None,
            runtime_platform=ecs.RuntimePlatform(
                cpu_architecture=ecs.CpuArchitecture.ARM64 if arm else ecs.CpuArchitecture.X86_64,
                operating_system_family=ecs.OperatingSystemFamily.LINUX,
            ),
        )
        self.log_group = log_group(self, "Logs", key=key, config=config)
        # The task's scratch space (S3 downloads): the root filesystem itself stays read-only.
        self.task_definition.add_volume(name="tmp")
        # Pulling the image makes CDK give the execution role ecr:GetAuthorizationToken on "*": the
        # action has no resource-level permissions (the pull itself is scoped to the repository).
        self.container = self.task_definition.add_container(
            CONTAINER_NAME,
            container_name=CONTAINER_NAME,
            image=ecs.ContainerImage.from_asset(
                str(PROJECT_ROOT),
                file=DOCKERFILE,
                platform=ecr_assets.Platform.LINUX_ARM64 if arm else ecr_assets.Platform.LINUX_AMD64,
            ),
            logging=ecs.LogDrivers.aws_logs(stream_prefix="step", log_group=self.log_group),
            readonly_root_filesystem=True,
            essential=True,
            # delta-rs and Polars sign S3 requests for this region (boto3 alone would find it anyway).
            environment={"AWS_REGION": Aws.REGION},
        )
        self.container.add_mount_points(
            ecs.MountPoint(container_path="/tmp", source_volume="tmp", read_only=False)
        )
        self.capacity_provider = "FARGATE_SPOT" if config.fargate_spot else "FARGATE"

    @property
    def task_role(self) -> iam.IRole:
        return self.task_definition.task_role


class GlueRunner(Construct):
    """The Python-shell jobs of the definition's steps (product_etl, orders_etl, order_items_etl)."""

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        bucket: s3.IBucket,
        security_configuration: glue.ISecurityConfiguration,
        key: kms.IKey,
        config: LakehouseConfig,
    ) -> None:
        super().__init__(scope, construct_id)
        artifacts = glue_artifacts()
        # pip installs a wheel only under its real file name, which CDK's hashed asset keys lose;
        # the deployment copies it into the bucket under that name.
        self.artifacts = s3deploy.BucketDeployment(
            self,
            "Artifacts",
            sources=[s3deploy.Source.asset(str(artifacts))],
            destination_bucket=bucket,
            destination_key_prefix=GLUE_ARTIFACTS_PREFIX,
            log_group=log_group(self, "ArtifactsLogs", key=key, config=config),
        )
        wheel = f"s3://{bucket.bucket_name}/{GLUE_ARTIFACTS_PREFIX}{wheel_name(artifacts)}"
        self.role = iam.Role(
            self,
            "JobRole",
            assumed_by=iam.ServicePrincipal("glue.amazonaws.com"),
            description="Glue Python-shell jobs of the lakehouse steps",
        )
        self.role.add_to_policy(
            iam.PolicyStatement(
                sid="JobLogs",
                actions=[
                    "logs:CreateLogGroup",
                    "logs:CreateLogStream",
                    "logs:PutLogEvents",
                    "logs:AssociateKmsKey",
                ],
                # Glue names its log groups and streams at run time, under /aws-glue/.
                resources=[f"arn:{Aws.PARTITION}:logs:{Aws.REGION}:{Aws.ACCOUNT_ID}:log-group:/aws-glue/*"],
            )
        )
        bucket.grant_read(self.role, f"{GLUE_ARTIFACTS_PREFIX}*")
        script = glue.Code.from_asset(str(GLUE_ENTRY))
        self.jobs: list[glue.PythonShellJob] = []
        for step in steps():
            job = glue.PythonShellJob(
                self,
                step["glue_job"],
                job_name=step["glue_job"],
                description=f"lakehouse step {step['table']} (containers/glue_entry.py)",
                role=self.role,
                script=script,
                python_version=glue.PythonVersion.THREE_NINE,
                # Our wheel's own pins (polars 1.x, deltalake, pyarrow) rather than Glue's analytics set.
                library_set=glue.LibrarySet.NONE,
                max_capacity=glue.MaxCapacity.DPU_1
                if config.glue_max_capacity == 1.0
                else glue.MaxCapacity.DPU_1_16TH,
                default_arguments={"--additional-python-modules": wheel, "--table": step["table"]},
                security_configuration=security_configuration,
                timeout=Duration.hours(config.batch_timeout_hours),
                max_concurrent_runs=1,
                max_retries=0,
            )
            job.node.add_dependency(self.artifacts)
            self.jobs.append(job)
