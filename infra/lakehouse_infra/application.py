"""Build the CDK app: cdk.json's context (feature flags) plus the caller's, one stack."""

from __future__ import annotations

import difflib
import json
import os
from pathlib import Path
from typing import Any

from aws_cdk import App, Aspects, Tags

from lakehouse_infra.config import ConfigError, LakehouseConfig
from lakehouse_infra.stack import LakehouseStack
from lakehouse_infra.suppressions import LambdaCheckovSkips

CDK_JSON = Path(__file__).resolve().parents[1] / "cdk.json"
STACK_NAME = "EcommerceLakehouse"


def check_context_keys(context: dict[str, Any], names: list[str]) -> None:
    """Refuse a context key that is none of ``names``: ``-c runer=glue`` would deploy the default runner.

    The CDK's own keys are left alone: feature flags (``@aws-cdk/...``), the toolkit's
    (``aws:cdk:...``) and cached lookups (``availability-zones:account=...``) all hold a ``@`` or ``:``.
    """
    unknown = sorted(
        key for key in context if key not in names and not key.startswith("@") and ":" not in key
    )
    if not unknown:
        return
    hints = []
    for key in unknown:
        close = difflib.get_close_matches(key, names, n=1)
        hints.append(f"{key} (did you mean {close[0]}?)" if close else key)
    raise ConfigError(
        f"unknown context key{'s' if len(unknown) > 1 else ''} {', '.join(hints)}; "
        f"the keys are: {', '.join(sorted(names))}"
    )


def build_app(context: dict[str, Any] | None = None, outdir: str | None = None) -> App:
    """The app with its stack; ``context`` overrides cdk.json (``cdk -c`` values override both)."""
    defaults = json.loads(CDK_JSON.read_text())["context"]
    # `cdk synth` says where through CDK_OUTDIR; a plain `python app.py` writes infra/cdk.out too.
    outdir = outdir or os.environ.get("CDK_OUTDIR") or str(CDK_JSON.parent / "cdk.out")
    app = App(context={**defaults, **(context or {})}, outdir=outdir)
    names = [field for field in LakehouseConfig.__dataclass_fields__]
    check_context_keys(app.node.get_all_context(), names)
    config = LakehouseConfig.from_context({name: app.node.try_get_context(name) for name in names})
    # Environment-agnostic: synthesizes offline; the account and region come from `cdk deploy`'s profile.
    stack = LakehouseStack(
        app,
        STACK_NAME,
        config=config,
        description=f"E-commerce lakehouse ETL (Polars + delta-rs), steps on {config.runner}",
    )
    Tags.of(stack).add("project", "ecommerce-lakehouse")
    Aspects.of(stack).add(LambdaCheckovSkips())
    return app
