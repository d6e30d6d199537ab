#!/usr/bin/env python3
"""CDK entry: `cdk synth` / `cdk deploy` from infra/ (or `python app.py` to synthesize to cdk.out)."""

from lakehouse_infra.application import build_app

build_app().synth()
