"""Findings of checkov and cfn-lint that do not apply, each skipped on its resource with the reason."""

from __future__ import annotations

import jsii
from aws_cdk import CfnResource, IAspect
from constructs import IConstruct

# Every Lambda function of the stack: our three handlers and the CDK's custom-resource handlers
# (bucket notifications, auto-delete, default security group, bucket deployment).
LAMBDA_SKIPS = {
    "CKV_AWS_115": "reserved concurrency fails deploys in accounts at the default quota of 10; the trigger's "
    "SQS source caps it at 2, the others run once per batch or per deploy",
    "CKV_AWS_116": "none is invoked asynchronously: SQS (with its own dead-letter queue), Step Functions "
    "(synchronous, with retries) or CloudFormation custom resources",
    "CKV_AWS_117": "they call only AWS APIs (S3, Step Functions, CloudFormation); a VPC would add a NAT "
    "dependency and nothing to protect",
    "CKV_AWS_173": "environment variables hold a bucket URL and a state machine ARN, no secrets",
}


def skip_checkov(resource: CfnResource, reasons: dict[str, str]) -> None:
    """Record checkov skips in the resource's metadata (where checkov reads them), merged with any others."""
    existing = resource.get_metadata("checkov") or {}
    skips = {entry["id"]: entry["comment"] for entry in existing.get("skip", [])}
    skips.update(reasons)
    resource.add_metadata(
        "checkov", {"skip": [{"id": key, "comment": text} for key, text in sorted(skips.items())]}
    )


def ignore_cfn_lint(resource: CfnResource, *rules: str) -> None:
    """Record cfn-lint rules to ignore on one resource (its ``Metadata.cfn-lint``)."""
    resource.add_metadata("cfn-lint", {"config": {"ignore_checks": list(rules)}})


@jsii.implements(IAspect)
class LambdaCheckovSkips:
    """Applies LAMBDA_SKIPS to every Lambda function, the CDK's own included."""

    def visit(self, node: IConstruct) -> None:
        # The CDK's custom-resource providers are plain CfnResources of this type, not CfnFunctions.
        if isinstance(node, CfnResource) and node.cfn_resource_type == "AWS::Lambda::Function":
            skip_checkov(node, LAMBDA_SKIPS)
