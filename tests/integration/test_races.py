"""Accidents of concurrency: the same step twice at once into a fresh table, two runs on one root."""

from __future__ import annotations

import multiprocessing
import subprocess
import sys
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from pipeline.batch import rejected_uri, table_uri
from pipeline.manifest import new_batch_id, snapshot
from pipeline.specs import TABLES
from pipeline.storage import open_store
from tests.helpers import write_raw


def _step_behind_a_barrier(
    root: str, batch_id: str, table: str, barriers: dict[str, Any], env: dict[str, str]
) -> None:
    """Run one step; both racers write a table's first version only once both have read it as missing.

    A step creates two tables at once (the lakehouse's and the rejected rows'): one barrier each.
    """
    import os

    os.environ.update(env)
    from pipeline import delta
    from pipeline.batch import run_step
    from pipeline.manifest import read_manifest
    from pipeline.specs import get_spec

    real = delta.write_deltalake

    def together(uri: str, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("mode") == "error":
            barriers["rejected" if "/rejected/" in uri else "lakehouse"].wait(timeout=60)
        return real(uri, *args, **kwargs)

    delta.write_deltalake = together  # type: ignore[assignment]
    store = open_store(root)
    run_step(store, read_manifest(store, batch_id), get_spec(table))


def _race(root: str, table: str, env: dict[str, str]) -> None:
    store = open_store(root)
    from datetime import datetime, timezone

    now = datetime.now(timezone.utc)
    manifest = snapshot(store, new_batch_id(now), now)
    store.write_bytes(manifest.key, manifest.to_json(), if_absent=True)
    context = multiprocessing.get_context("spawn")
    barriers = {"lakehouse": context.Barrier(2), "rejected": context.Barrier(2)}
    racers = [
        context.Process(target=_step_behind_a_barrier, args=(root, manifest.batch_id, table, barriers, env))
        for _ in range(2)
    ]
    for racer in racers:
        racer.start()
    for racer in racers:
        racer.join(120)
        assert racer.exitcode == 0


def _land(root: Path) -> None:
    write_raw(
        root, "products", "p.csv", *[f"{i},{i % 5 + 1},Dept,Product {i}" for i in range(1, 301)], "x,1,D,bad"
    )
    write_raw(root, "orders", "o.csv", "1,10,7,2025-04-01T11:27:00,12.50,2025-04-01")
    write_raw(root, "order_items", "i.csv", "1,10,7,,5,1,0,2025-04-01T11:27:00,2025-04-01")


def _assert_once(root: str) -> None:
    store = open_store(root)
    products = pl.read_delta(table_uri(store, "products"), storage_options=_options())
    assert products.height == 300 == products.get_column("product_id").n_unique()
    rejected = pl.read_delta(rejected_uri(store, "products"), storage_options=_options())
    assert rejected.get_column("product_id").to_list() == ["x"]


def _options() -> dict[str, str]:
    from pipeline.settings import load_settings

    return load_settings().delta_storage_options()


@pytest.mark.parametrize("round_", range(3))
def test_the_same_step_twice_at_once_into_a_fresh_table_writes_each_row_once(root: Path, round_: int) -> None:
    _land(root)
    _race(str(root), "products", {})
    _assert_once(str(root))


@pytest.mark.slow
def test_the_same_step_twice_at_once_on_s3_writes_each_row_once(
    s3_root: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    local = tmp_path / "landing"
    _land(local)
    store = open_store(s3_root)
    for path in sorted((local / "raw").rglob("*.csv")):
        store.upload(path, path.relative_to(local).as_posix())
    env = {name: value for name, value in os.environ.items() if name.startswith("AWS_")}
    _race(s3_root, "products", env)
    _assert_once(s3_root)


def test_two_runs_on_one_root_at_once_process_each_file_once(root: Path) -> None:
    from pipeline.generate import generate

    generate(open_store(str(root)), scale=0.001, seed=4)
    runs = [
        subprocess.Popen(
            [sys.executable, "-m", "pipeline", "run", "--root", str(root)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for _ in range(2)
    ]
    outcomes = [(run.wait(300), run.stderr.read().decode() if run.stderr else "") for run in runs]
    assert sorted(code for code, _ in outcomes) in ([0, 0], [0, 1]), outcomes
    for code, err in outcomes:
        if code:
            assert "another run holds the lock" in err or "no batch started" in err, err
    store = open_store(str(root))
    reports = list((root / "reports").glob("*.json"))
    assert len(reports) == 1
    for name, spec in TABLES.items():
        table = pl.read_delta(table_uri(store, name))
        assert table.height == table.get_column(spec.primary_key).n_unique()
        rejected = pl.read_delta(rejected_uri(store, name))
        assert rejected.get_column("batch_id").n_unique() == 1
    assert not list((root / "raw").rglob("*.csv"))
