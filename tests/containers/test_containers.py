"""The Fargate image's pins and the Glue Python-shell entry (run on 3.9 in CI's 3.9 pass)."""

from __future__ import annotations

import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import polars as pl
import pytest
from packaging.requirements import Requirement

from pipeline.batch import table_uri
from pipeline.manifest import new_batch_id, snapshot
from pipeline.storage import open_store
from tests.helpers import write_raw

PROJECT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(PROJECT / "containers"))
from glue_entry import step_arguments  # noqa: E402


def _project_dependencies() -> list[Requirement]:
    text = (PROJECT / "pyproject.toml").read_text()
    block = text.split("dependencies = [", 1)[1].split("]", 1)[0]
    lines = [line.strip().strip(",").strip('"') for line in block.splitlines()]
    return [Requirement(line) for line in lines if line and not line.startswith("#")]


def test_the_image_pins_every_dependency_within_the_project_ranges() -> None:
    pins = {}
    for line in (PROJECT / "containers" / "requirements.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pins[name.strip()] = version.strip()
    for requirement in _project_dependencies():
        assert requirement.name in pins, f"{requirement.name} is not pinned in containers/requirements.txt"
        assert requirement.specifier.contains(pins[requirement.name]), requirement


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
