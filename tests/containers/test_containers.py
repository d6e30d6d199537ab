"""The Fargate image's pins and the Glue Python-shell entry (run on 3.9 in CI's 3.9 pass)."""

from __future__ import annotations

import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import polars as pl
import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from pipeline.batch import table_uri
from pipeline.manifest import new_batch_id, snapshot
from pipeline.storage import open_store
from tests.helpers import write_raw

PROJECT = Path(__file__).resolve().parents[2]
CONTAINERS = PROJECT / "containers"
sys.path.insert(0, str(CONTAINERS))
from glue_entry import step_arguments  # noqa: E402


def _project_dependencies() -> list[Requirement]:
    text = (PROJECT / "pyproject.toml").read_text()
    block = text.split("dependencies = [", 1)[1].split("]", 1)[0]
    lines = [line.strip().strip(",").strip('"') for line in block.splitlines()]
    return [Requirement(line) for line in lines if line and not line.startswith("#")]


def _entries(path: Path) -> list[tuple[Requirement, list[str]]]:
    """Each requirement of a pip requirements file, with its ``--hash`` values (continuations joined)."""
    entries = []
    for line in path.read_text().replace("\\\n", " ").splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        spec, *options = line.split(" --hash=")
        entries.append((Requirement(spec.strip()), [option.strip() for option in options]))
    return entries


def _pinned(requirement: Requirement) -> str:
    (specifier,) = requirement.specifier
    assert specifier.operator == "==", f"{requirement} is not pinned with =="
    return specifier.version


def _lock() -> dict[str, str]:
    return {canonicalize_name(req.name): _pinned(req) for req, _ in _entries(CONTAINERS / "requirements.txt")}


def test_the_image_pins_every_dependency_within_the_project_ranges() -> None:
    pins = _lock()
    for requirement in _project_dependencies():
        if requirement.marker is not None and not requirement.marker.evaluate({"python_version": "3.12"}):
            continue  # not installed on the image's Python (3.12), as tomli
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{requirement.name} is not in the lock containers/requirements.txt"
        assert requirement.specifier.contains(pins[name]), (requirement, pins[name])


def test_every_package_of_the_lock_is_pinned_with_its_hashes() -> None:
    entries = _entries(CONTAINERS / "requirements.txt")
    assert entries
    for requirement, hashes in entries:
        _pinned(requirement)
        assert hashes, f"{requirement} has no --hash"
        assert all(value.startswith("sha256:") and len(value) == len("sha256:") + 64 for value in hashes), (
            requirement
        )


def test_the_lock_holds_each_input_at_its_version() -> None:
    pins = _lock()
    for requirement, _ in _entries(CONTAINERS / "requirements.in"):
        name = canonicalize_name(requirement.name)
        assert pins.get(name) == _pinned(requirement), (
            f"containers/requirements.in has {requirement}, the lock {name}=={pins.get(name)}: "
            "regenerate the lock (the command is at the top of requirements.in)"
        )


def test_the_image_installs_the_lock_alone_and_checks_its_hashes() -> None:
    dockerfile = (CONTAINERS / "Dockerfile").read_text()
    assert "COPY containers/requirements.txt ./requirements.txt" in dockerfile
    assert "--require-hashes --no-deps --only-binary=:all: -r requirements.txt" in dockerfile


def test_glue_arguments_keep_ours_and_ignore_glues_own() -> None:
    argv = [
        "--job-bookmark-option",
        "job-bookmark-disable",
        "--root",
        "s3://b/p",
        "--JOB_ID",
        "j_1",
        "--manifest",
        "manifests/x.json",
        "--table",
        "orders",
    ]
    assert step_arguments(argv) == ["step", "orders", "--root", "s3://b/p", "--manifest", "manifests/x.json"]


def test_glue_job_name_implies_the_table() -> None:
    argv = ["--JOB_NAME", "product_etl", "--root", "r", "--manifest", "m"]
    assert step_arguments(argv)[:2] == ["step", "products"]


def test_glue_arguments_without_a_table_are_refused() -> None:
    with pytest.raises(SystemExit):
        step_arguments(["--root", "r", "--manifest", "m"])


def test_glue_entry_runs_one_step(root: Path) -> None:
    write_raw(root, "products", "p.csv", "5,2,Books,Novel", "6,3,Toys,Ball")
    write_raw(root, "orders", "o.csv", "1,10,7,2025-04-01T11:27:00,12.50,2025-04-01")
    write_raw(root, "order_items", "i.csv", "1,10,7,,5,1,0,2025-04-01T11:27:00,2025-04-01")
    store = open_store(str(root))
    now = datetime.now(timezone.utc)
    manifest = snapshot(store, new_batch_id(now), now)
    store.write_bytes(manifest.key, manifest.to_json())
    entry = PROJECT / "containers" / "glue_entry.py"
    argv = [
        "--job-bookmark-option",
        "job-bookmark-disable",
        "--table",
        "products",
        "--root",
        str(root),
        "--manifest",
        manifest.key,
    ]
    done = subprocess.run(
        [sys.executable, str(entry), *argv], capture_output=True, text=True, check=False, cwd=PROJECT
    )
    assert done.returncode == 0, done.stderr
    assert pl.read_delta(table_uri(store, "products")).height == 2
    assert (root / "reports" / manifest.batch_id / "products.json").exists()
