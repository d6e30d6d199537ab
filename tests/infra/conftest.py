"""Synthesized stacks for both runners (one synth per runner per session: each takes seconds)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("aws_cdk", reason="the CDK app needs the 'infra' extra (pip install -e '.[dev]')")

from aws_cdk import Stack
from aws_cdk.assertions import Template
from lakehouse_infra.application import STACK_NAME, build_app


def synthesize(outdir: Path, **context: Any) -> Stack:
    """The lakehouse stack of an app built with ``context`` (over cdk.json's)."""
    app = build_app(context, outdir=str(outdir))
    stack = app.node.find_child(STACK_NAME)
    assert isinstance(stack, Stack)
    return stack


@pytest.fixture(scope="session")
def fargate_template(tmp_path_factory: pytest.TempPathFactory) -> Template:
    return Template.from_stack(synthesize(tmp_path_factory.mktemp("cdk-fargate")))


@pytest.fixture(scope="session")
def glue_template(tmp_path_factory: pytest.TempPathFactory) -> Template:
    return Template.from_stack(synthesize(tmp_path_factory.mktemp("cdk-glue"), runner="glue"))


@pytest.fixture(params=["fargate", "glue"])
def template(request: pytest.FixtureRequest) -> Template:
    """Each runner's template in turn, for properties both must have."""
    fixture: Template = request.getfixturevalue(f"{request.param}_template")
    return fixture
