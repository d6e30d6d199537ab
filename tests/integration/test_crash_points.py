"""kill -9 at every commit point of a batch, then ``run`` again with no manual step.

A child process runs the batch and kills itself (SIGKILL) right before or right after its N-th
commit: a Delta commit (MERGE, rejected rows), an object written (manifest, step report, load note,
report) or a file archived. Whatever N, a second ``run`` must leave the tables, the rejected rows and
the archive exactly as one uninterrupted run does.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from pipeline.batch import rejected_uri, run_batch, table_uri
from pipeline.errors import MissingDatasetError
from pipeline.generate import generate
from pipeline.settings import load_settings
from pipeline.specs import TABLES
from pipeline.storage import Store, open_store
from tests.helpers import write_raw

CHILD = """
import atexit, os, signal, sys, threading
from pipeline import delta, storage
root, target, when, counter = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
count = [0]
counting = threading.Lock()

def hook(owner, name):
    real = getattr(owner, name)

    def hooked(*args, **kwargs):
        with counting:  # the MERGE and the rejected rows commit on two threads at once
            count[0] += 1
            mine = count[0]
        if when == "before" and mine == target:
            os.kill(os.getpid(), signal.SIGKILL)
        result = real(*args, **kwargs)
        if when == "after" and mine == target:
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    setattr(owner, name, hooked)

for store in (storage.LocalStore, storage.S3Store):
    hook(store, "write_bytes")
    hook(store, "move")
hook(delta, "merge_rows")
hook(delta, "replace_batch_rows")
atexit.register(lambda: open(counter, "w").write(str(count[0])))
from pipeline.cli import main
main(["run", "--root", root])
"""


def _batch(root: Path) -> None:
    write_raw(root, "products", "p.csv", "5,2,Books,Novel", "6,3,Toys,Ball", "6,3,Toys,Ball", "x,1,Home,Lamp")
    write_raw(
        root,
        "products",
        "q.csv",
        "7,2,Books,Atlas",
        header="PRODUCT_ID,department_id,department,product_name",
    )
    write_raw(
        root,
        "orders",
        "o.csv",
        "1,10,7,2025-04-01T11:27:00,12.50,2025-04-01",
        "2,11,7,2025-04-02 09:00:00Z,-3,2025-04-02",
        "3,12,8,2025-04-02T09:00:00,5,2025-04-02",
        newline="\r\n",
    )
    write_raw(
        root,
        "order_items",
        "i.csv",
        "1,10,7,,5,1,0,2025-04-01T11:27:00,2025-04-01",
        "2,10,7,3,99,2,1,2025-04-01T11:27:00,2025-04-01",
        "3,12,8,3,7,1,0,2025-04-02T09:00:00,2025-04-02",
        "4,10,7,3,5,2",
        "",
        "5,11,7,3,6,1,0,2025-04-02T09:00:00,2025-04-02",
    )


def _land(source: Path, store: Store) -> None:
    for path in sorted((source / "raw").rglob("*.csv")):
        store.upload(path, path.relative_to(source).as_posix())


def _state(store: Store) -> dict[str, Any]:
    """Tables, rejected rows (without batch ids and times) and archived file names."""
    options = load_settings().delta_storage_options()
    state: dict[str, Any] = {}
    for name, spec in TABLES.items():
        state[name] = pl.read_delta(table_uri(store, name), storage_options=options).sort(spec.primary_key)
        rejected = pl.read_delta(rejected_uri(store, name), storage_options=options)
        state[f"rejected {name}"] = rejected.drop("batch_id", "rejected_at").sort(
            "source_file", "source_line"
        )
    state["raw"] = [info.key for info in store.list("raw/")]
    state["archived"] = sorted(info.key.split("/", 3)[-1] for info in store.list("archived/"))
    state["reports"] = len([info for info in store.list("reports/") if info.key.count("/") == 1])
    return state


def _same(got: dict[str, Any], want: dict[str, Any], label: str) -> None:
    assert got.keys() == want.keys()
    for key, value in want.items():
        if isinstance(value, pl.DataFrame):
            assert got[key].equals(value), f"{label}: {key}\n{got[key]}\n{value}"
        else:
            assert got[key] == value, f"{label}: {key}"


def _child(root: str, target: int, when: str, counter: Path) -> int:
    done = subprocess.run(
        [sys.executable, "-c", CHILD, root, str(target), when, str(counter)],
        capture_output=True,
        text=True,
        env=dict(os.environ),
        timeout=300,
    )
    if done.returncode not in (0, -9):
        raise AssertionError(f"the child failed ({done.returncode}): {done.stderr[-2000:]}")
    return done.returncode


def _crash_everywhere(make_root: Any, source: Path, tmp_path: Path) -> None:
    clean = make_root("clean")
    _land(source, clean)
    run_batch(clean)
    expected = _state(clean)

    counting = make_root("count")
    _land(source, counting)
    counter = tmp_path / "count.txt"
    assert _child(counting.root, 0, "never", counter) == 0
    points = int(counter.read_text())
    assert points >= 10, "manifest, lock, two commits and a report per step, archive moves, notes, report"
    for target in range(1, points + 1):
        for when in ("before", "after"):
            store = make_root(f"{when}-{target}")
            _land(source, store)
            counted = tmp_path / f"{when}-{target}.txt"
            code = _child(store.root, target, when, counted)
            assert code == -9, f"{when} {target}: the run ended after {counted.read_text()} commits"
            try:
                assert run_batch(store).status == "succeeded"
            except MissingDatasetError:  # killed after its final report: the batch had finished
                assert target == points and when == "after"
            _same(_state(store), expected, f"killed {when} commit {target} of {points}")


@pytest.mark.slow
def test_kill_9_at_every_commit_point_then_run_again_equals_one_run(tmp_path: Path) -> None:
    source = tmp_path / "source"
    _batch(source)

    def make_root(name: str) -> Store:
        path = tmp_path / name
        path.mkdir()
        return open_store(str(path))

    _crash_everywhere(make_root, source, tmp_path)


@pytest.mark.slow
def test_kill_9_at_every_commit_point_on_s3_then_run_again_equals_one_run(
    s3_root: str, tmp_path: Path
) -> None:
    import boto3

    source = tmp_path / "source"
    _batch(source)
    bucket = s3_root[len("s3://") :].split("/", 1)[0]
    client = boto3.client("s3")

    def make_root(name: str) -> Store:
        return open_store(f"s3://{bucket}/{name}")

    assert client.head_bucket(Bucket=bucket)
    _crash_everywhere(make_root, source, tmp_path)


def test_a_generated_batch_killed_half_way_resumes_to_the_same_tables(tmp_path: Path) -> None:
    """The same on a generated batch, killed once, after the commit half way through the run."""
    clean, crashed, probe = tmp_path / "clean", tmp_path / "crashed", tmp_path / "probe"
    generate(open_store(str(clean)), scale=0.0005, seed=8)
    shutil.copytree(clean, crashed)
    shutil.copytree(clean, probe)
    run_batch(open_store(str(clean)))
    expected = _state(open_store(str(clean)))
    counter = tmp_path / "count.txt"
    assert _child(str(probe), 0, "never", counter) == 0
    half = int(counter.read_text()) // 2
    assert _child(str(crashed), half, "after", tmp_path / "ignored.txt") == -9
    run_batch(open_store(str(crashed)))
    _same(_state(open_store(str(crashed))), expected, f"killed after commit {half}")
