"""The project files the stack deploys: code assets, the Glue wheel and the state machine definition."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parents[2]
DEFINITION = PROJECT_ROOT / "statemachine" / "etl.asl.json"
GLUE_ENTRY = PROJECT_ROOT / "containers" / "glue_entry.py"
DOCKERFILE = "containers/Dockerfile"

# The Lambda zip: the handlers and the core they import (polars-free modules; the rest is never
# imported there). Everything else in the repository stays out of the asset and out of its hash.
LAMBDA_ASSET_EXCLUDES = ["*", "!handlers", "!handlers/**", "!pipeline", "!pipeline/**", "**/__pycache__"]

# Wheel contents: what pyproject.toml packages, plus the files setuptools reads to build it.
_WHEEL_SOURCES = ("pyproject.toml", "README.md", "pipeline", "handlers")


def definition_text() -> str:
    """The state machine definition, exactly as written (CloudFormation substitutes its ``${...}``)."""
    return DEFINITION.read_text()


def placeholders() -> set[str]:
    """Every ``${Name}`` the definition uses."""
    return set(re.findall(r"\$\{(\w+)\}", definition_text()))


def steps() -> list[dict[str, str]]:
    """The definition's table steps (``table``, ``glue_job``): the Glue jobs and crawled tables follow it."""
    definition: dict[str, Any] = json.loads(definition_text())
    return list(definition["States"]["Configure"]["Parameters"]["steps"])


@lru_cache(maxsize=1)
def glue_artifacts() -> Path:
    """A folder with the project's wheel (pure Python, for ``--additional-python-modules``).

    Built without network access (no build isolation) and with a fixed timestamp, so that the same
    source gives the same bytes and the same asset hash: an unchanged project deploys nothing new.
    """
    out = Path(tempfile.mkdtemp(prefix="lakehouse-glue-"))
    source = out / "source"
    source.mkdir()
    for name in _WHEEL_SOURCES:
        path = PROJECT_ROOT / name
        if path.is_dir():
            shutil.copytree(path, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(path, source / name)
    wheels = out / "wheel"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(wheels),
            ".",
        ],
        cwd=source,
        env={**os.environ, "SOURCE_DATE_EPOCH": "315532800", "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(
            f"building the project's wheel for the Glue jobs failed:\n{done.stdout}{done.stderr}"
        )
    shutil.rmtree(source)
    return wheels


# FinishBatch draws reports/<batch_id>.html (pipeline/html_report.py) with these: pure-Python wheels, so
# pip installs the image's lock's pins for the Lambda's platform without Docker.
REPORT_PACKAGES = ("plotly", "narwhals", "packaging")
CONTAINER_LOCK = PROJECT_ROOT / "containers" / "requirements.txt"
LAMBDA_PLATFORM = ("--platform", "manylinux2014_aarch64", "--python-version", "3.12")


def pinned_requirements(names: tuple[str, ...], lock: str) -> list[str]:
    """The lock's lines for ``names`` (``name==version --hash=... --hash=...``), in that order."""
    found = {}
    for entry in re.finditer(r"^([A-Za-z0-9_.-]+)==(\S+)((?:\s*\\\n\s+--hash=\S+)+)", lock, re.MULTILINE):
        hashes = re.findall(r"--hash=\S+", entry.group(3))
        found[entry.group(1).lower()] = f"{entry.group(1)}=={entry.group(2)} {' '.join(hashes)}"
    missing = [name for name in names if name not in found]
    if missing:
        raise RuntimeError(f"{CONTAINER_LOCK} pins no {', '.join(missing)} (with hashes)")
    return [found[name] for name in names]


@lru_cache(maxsize=1)
def report_layer() -> Path:
    """A Lambda layer folder (``python/``) with the report's libraries at the versions the image pins.

    pip checks every wheel against the lock's hashes and installs no dependency the lock does not name
    (``--no-deps``): a new dependency of plotly fails here, not in the deployed function.
    """
    out = Path(tempfile.mkdtemp(prefix="lakehouse-report-layer-"))
    requirements = out / "requirements.txt"
    pins = pinned_requirements(REPORT_PACKAGES, CONTAINER_LOCK.read_text())
    requirements.write_text("\n".join(pins) + "\n")
    layer = out / "layer"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-compile",
            "--require-hashes",
            "--only-binary=:all:",
            *LAMBDA_PLATFORM,
            "--target",
            str(layer / "python"),
            "-r",
            str(requirements),
        ],
        env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"installing the report's libraries for FinishBatch failed:\n{done.stderr}")
    return layer


def wheel_name(folder: Path) -> str:
    """The one wheel in ``folder``."""
    (wheel,) = folder.glob("*.whl")
    return wheel.name
