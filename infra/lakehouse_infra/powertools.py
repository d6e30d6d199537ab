"""Which of AWS's public Powertools layers the handlers run with: the one of the release pyproject pins.

The handlers' tests run with the ``aws-lambda-powertools`` that pyproject.toml's ``aws`` extra pins
(``==``); the deployed functions get it from AWS's layer, whose versions are plain counters (one per
publication, not one per release). So the pin is the one place the version is written, and the layer
version is looked up here from the release. ``python -m lakehouse_infra.powertools`` prints both (the
deploy workflow checks them against the layer's own description before deploying).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from lakehouse_infra.config import ConfigError
from lakehouse_infra.sources import PROJECT_ROOT

if sys.version_info >= (3, 11):
    import tomllib
else:  # the CDK app runs on 3.11+; this keeps mypy's 3.10 pass honest
    import tomli as tomllib

PACKAGE = "aws-lambda-powertools"
LAYER_ACCOUNT = "017000801446"
LAYER_NAME = "AWSLambdaPowertoolsPythonV3-python312-arm64"

# Release -> version N of arn:aws:lambda:REGION:017000801446:layer:AWSLambdaPowertoolsPythonV3-*:N.
# The maintainers' "docs(layer): update layer version number - vX" pull requests name the layer each
# release created (https://github.com/aws-powertools/powertools-lambda-python/pull/5426 for 3.2.0 -> 3,
# /pull/5785 for 3.4.0 -> 5, /pull/5869 for 3.4.1 -> 6). 3.23.0 -> 27: layer 26 was the newest on
# 2025-11-09 (/issues/7650, while 3.22.1 was the newest release), 3.23.0 came out on 2025-11-13, and
# the docs went to 27 right after (/pull/7757) and still showed it for 3.24.0. 3.23.0 is also the last
# release that installs on Python 3.9 (3.24.0 needs 3.10), which the Glue runtime's test run needs.
# The layer's description ends with its release ("... with extra dependencies version 3.23.0"):
# `aws lambda get-layer-version-by-arn --arn <arn>` shows it, and the deploy workflow checks it.
# Adding a release: add its row from such a source, then change the pin in pyproject.toml.
LAYER_VERSIONS: dict[str, int] = {
    "3.2.0": 3,
    "3.4.0": 5,
    "3.4.1": 6,
    "3.23.0": 27,
}


def pinned_release(pyproject: Path = PROJECT_ROOT / "pyproject.toml") -> str:
    """The ``aws-lambda-powertools==X`` of pyproject.toml's ``aws`` extra."""
    extras = tomllib.loads(pyproject.read_text())["project"]["optional-dependencies"]
    for requirement in extras["aws"]:
        match = re.fullmatch(rf"{PACKAGE}\s*==\s*([\w.]+)", requirement.split(";")[0].strip())
        if match:
            return match.group(1)
    raise ConfigError(f"pyproject.toml's 'aws' extra must pin {PACKAGE}==X.Y.Z, it has {extras['aws']}")


def layer_version(release: str | None = None) -> int:
    """The version of AWS's layer that holds ``release`` (by default, the pinned one)."""
    release = release or pinned_release()
    if release not in LAYER_VERSIONS:
        raise ConfigError(
            f"no known {LAYER_NAME} layer for {PACKAGE}=={release} (pyproject.toml); known releases: "
            f"{sorted(LAYER_VERSIONS)}: add its row to LAYER_VERSIONS in {Path(__file__).name}"
        )
    return LAYER_VERSIONS[release]


if __name__ == "__main__":
    print(pinned_release(), layer_version())
