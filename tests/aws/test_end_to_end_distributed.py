"""The distributed path end to end on a moto server (``tests.aws.moto_chain``): upload, trigger, each
table's plans as ECS tasks and its units as Distributed Map children running ``lakehouse stage run`` against
the moto bucket, archive, checks, SNS. Every batch is also loaded by one process (``run_batch``) into a
local lake from the very same files: the tables and rejected rows must be the same."""

from __future__ import annotations

import re
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import polars as pl
import pytest

from pipeline.batch import abandon_batch, rejected_uri, run_batch, table_uri
from pipeline.costs import local_transitions
from pipeline.delta import scan
from pipeline.generate import generate, generate_next_day
from pipeline.report import load_report
from pipeline.specs import TABLES
from pipeline.storage import Store, open_store
from tests.aws.moto_chain import (
    BUCKET,
    COMMANDS,
    CRAWLS,
    KILLS,
    ROOT,
    deliver_events,
    deployed_chain,
    land_day,
    notifications,
    raw_keys,
    wait_for_executions,
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(sys.version_info < (3, 10), reason="written for moto 5.2 (Python >= 3.10)"),
]

# Every batch takes the distributed path; units of 2 MiB cut the first load's order items (0.9 MB of
# CSV) into 2 buckets of keys and 2 groups of partitions: children of one Map run (and commit) side by side.
SUBSTITUTIONS = {"DistributedThresholdBytes": "0", "UnitMemoryBudget": "2MiB"}
ITEM = re.compile(r"/plan/(?P<batch>[^/]+)/(?P<table>\w+)/(?P<stage>\w+)/(?P<unit>\d+)\.json$")


@pytest.fixture(scope="module")
def chain() -> Iterator[dict[str, Any]]:
    with deployed_chain(**SUBSTITUTIONS) as deployment:
        yield deployment


@pytest.fixture(scope="module")
def local(tmp_path_factory: pytest.TempPathFactory) -> Store:
    """The lake that one process loads from the same files, batch after batch (the single-task path)."""
    return open_store(str(tmp_path_factory.mktemp("single-task")))


def _land(local: Store, keys: list[str]) -> None:
    """Upload the files generated into the local lake's raw/ to the bucket, byte for byte."""
    bucket = open_store(ROOT)
    for key in keys:
        bucket.write_bytes(key, local.read_bytes(key))


def _contents(store: Store) -> dict[str, pl.DataFrame]:
    """Every table and every rejected row, in a stable order, without what names the batch."""
    found = {}
    for name, spec in TABLES.items():
        table = scan(table_uri(store, name))
        assert table is not None, name
        found[name] = table.select(spec.column_names).sort(spec.primary_key).collect()
        stored = scan(rejected_uri(store, name))
        assert stored is not None, f"rejected_{name}"
        rejected = stored.drop("rejected_at", "batch_id").collect()
        # Two batches' files may share a name (and so file and line): every column but the list orders them.
        columns = sorted(column for column, kind in rejected.schema.items() if kind != pl.List(pl.String))
        found[f"rejected_{name}"] = rejected.select(*columns, "reject_reasons").sort(columns, nulls_last=True)
    return found


def _assert_same_lakes(bucket: Store, local: Store) -> None:
    ours, theirs = _contents(bucket), _contents(local)
    for name, frame in theirs.items():
        assert ours[name].height == frame.height, name
        assert ours[name].equals(frame), name


def _units_run(commands: list[list[str]]) -> list[tuple[str, str, int, str]]:
    """The (table, stage, unit, item) of every ``stage run`` among ``commands``, in order."""
    runs = []
    for command in commands:
        if command[:2] == ["stage", "run"]:
            match = ITEM.search(command[2])
            assert match, command
            runs.append((match["table"], match["stage"], int(match["unit"]), command[2]))
    return runs


def _leftovers(batch_id: str) -> list[str]:
    found = []
    for folder in ("plan", "staging"):
        listing = boto3.client("s3").list_objects_v2(Bucket=BUCKET, Prefix=f"lakehouse/{folder}/{batch_id}/")
        found += [entry["Key"] for entry in listing.get("Contents", [])]
    return found


def test_a_dirty_first_load_whose_unit_is_killed_resumes_and_gives_what_one_task_gives(
    chain: dict[str, Any], local: Store
) -> None:
    generated = generate(local, scale=0.0005, seed=31)
    _land(local, generated.files)
    # The first write unit of the order items is stopped after its MERGE committed but before its report
    # landed (as an out-of-memory kill or a Spot interruption stops a task); the other group's unit merges.
    KILLS["/order_items/write/"] = "after"
    COMMANDS.clear()
    deliver_events(chain["queue"])
    (failed,) = wait_for_executions(chain["machine"], 1, timeout=600)
    assert failed["status"] == "FAILED"
    first = list(COMMANDS)
    assert not [command for command in first if command[0] == "step"], "the single-task path ran"
    runs = _units_run(first)
    shape = Counter((table, stage) for table, stage, _, _ in runs)
    assert shape["order_items", "resolve"] == shape["order_items", "write"] == 2, shape
    assert shape["products", "parse"] == shape["orders", "parse"] == shape["order_items", "parse"] == 2
    killed = next(run for run in runs if run[:2] == ("order_items", "write"))
    (message,) = notifications(chain["inbox"])
    assert f"Batch {failed['name']} failed: States.ExceedToleratedFailureThreshold." in message
    assert f"Units not done: order_items write {killed[2]:05d}" in message
    assert "Its raw files stay in raw/" in message
    assert len(raw_keys()) == len(generated.files)

    # The next event resumes the batch: its plans write items only for the units without a report.
    COMMANDS.clear()
    boto3.client("s3").copy_object(
        Bucket=BUCKET,
        Key=f"lakehouse/{generated.files[0]}",
        CopySource={"Bucket": BUCKET, "Key": f"lakehouse/{generated.files[0]}"},
        MetadataDirective="REPLACE",
    )
    deliver_events(chain["queue"])
    resumed = wait_for_executions(chain["machine"], 2, timeout=600)[-1]
    assert resumed["name"].startswith(failed["name"] + "-")
    assert resumed["status"] == "SUCCEEDED", notifications(chain["inbox"])
    again = _units_run(COMMANDS)
    done_before = {run[3] for run in runs} - {killed[3]}
    assert killed[3] in {run[3] for run in again}
    assert not done_before & {run[3] for run in again}, "a finished unit ran again"
    assert {(table, stage) for table, stage, _, _ in again} <= {
        ("order_items", stage) for stage in ("write", "moves", "late")
    }
    (message,) = notifications(chain["inbox"])
    assert f"Batch {failed['name']} succeeded." in message
    assert raw_keys() == [] and _leftovers(failed["name"]) == []

    run_batch(local)
    _assert_same_lakes(open_store(ROOT), local)


def test_a_next_day_batch_on_the_distributed_path_gives_what_one_task_gives(
    chain: dict[str, Any], local: Store
) -> None:
    # The next day of the lake both hold: new orders and items (some late, for earlier days), corrected
    # orders, renamed products, about 1% dirty rows.
    generated = generate_next_day(local, scale=0.0005, seed=31)
    _land(local, generated.files)
    COMMANDS.clear()
    CRAWLS.clear()
    deliver_events(chain["queue"])
    execution = wait_for_executions(chain["machine"], 3, timeout=600)[-1]
    assert execution["status"] == "SUCCEEDED", notifications(chain["inbox"])
    assert {command[1] for command in COMMANDS if command[0] == "stage"} == {"plan", "run", "finish"}
    assert not [command for command in COMMANDS if command[0] == "step"]
    # Its cost counts the parent's transitions (its history: the distributed happy path's model) and
    # each unit's child execution; each task is billed (3 plans, the units and a finish per table).
    cost = load_report(open_store(ROOT), execution["name"])
    assert cost is not None
    usage = cost.cost["usage"]
    assert usage["transitions"] == local_transitions(3, len(CRAWLS), 3, distributed=True)
    assert usage["child_executions"] == len(_units_run(COMMANDS))
    tasks = sum(figures["units"] for step in cost.steps for figures in step.stages.values())
    assert tasks == len(COMMANDS) == len(_units_run(COMMANDS)) + 3 * 4
    report = run_batch(local)
    assert sum(step.updated for step in report.steps) > 0  # corrections and renames applied
    _assert_same_lakes(open_store(ROOT), local)
    (message,) = notifications(chain["inbox"])
    assert f"Batch {execution['name']} succeeded." in message
    assert raw_keys() == [] and _leftovers(execution["name"]) == []


def test_a_unit_that_fails_on_its_file_is_notified_with_its_cause(chain: dict[str, Any]) -> None:
    land_day(2, amount=b"\xff\xfe")  # the orders file is not UTF-8: its parse unit fails
    deliver_events(chain["queue"])
    failed = wait_for_executions(chain["machine"], 4, timeout=600)[-1]
    assert failed["status"] == "FAILED"
    (message,) = notifications(chain["inbox"])
    assert f"Batch {failed['name']} failed: States.ExceedToleratedFailureThreshold." in message
    # The unit's own sentence (its task only says that its container exited 1), and what is left to run.
    assert "Cause: step orders failed" in message and "raw/orders/o2.csv" in message
    assert "Units not done: orders parse 00000" in message
    assert len(raw_keys()) == 3
    # Given up: its plans and staged parts go with it; its files stay in raw/.
    store = open_store(ROOT)
    assert _leftovers(failed["name"])
    abandon_batch(store, failed["name"])
    assert _leftovers(failed["name"]) == [] and len(raw_keys()) == 3
    for key in raw_keys():
        store.delete(Path(key).relative_to("lakehouse").as_posix())
