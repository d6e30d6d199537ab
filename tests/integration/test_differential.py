"""The pipeline against the plain-Python reference of the contract, on dirty batches in sequence.

Two batches from ``tests.dirty`` (the second overlapping the first: updates, stale rows, renames)
run through ``run_batch`` and through ``tests.reference``: the tables, every rejected row (text,
reasons, file, line) and every count must be the same.
"""

from __future__ import annotations

from collections import Counter
from datetime import date, datetime
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from pipeline.batch import rejected_uri, run_batch, table_uri
from pipeline.errors import StepError
from pipeline.specs import TABLES
from pipeline.stages import Plan
from pipeline.storage import open_store
from tests import reference
from tests.dirty import dirty_batches


def _land(root: Path, batch: dict[str, list[tuple[str, bytes]]]) -> None:
    for files in batch.values():
        for key, data in files:
            path = root / key
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)


def _plain(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, date):
        return value.isoformat()
    return value


def _tables(root: Path) -> dict[str, dict[int, dict[str, Any]]]:
    store = open_store(str(root))
    found: dict[str, dict[int, dict[str, Any]]] = {}
    for name, spec in TABLES.items():
        if not (root / "lakehouse-dwh" / name).exists():
            found[name] = {}
            continue
        rows = pl.read_delta(table_uri(store, name)).select(spec.column_names).to_dicts()
        found[name] = {row[spec.primary_key]: {k: _plain(v) for k, v in row.items()} for row in rows}
    return found


def _rejected(root: Path) -> Counter[tuple[Any, ...]]:
    store = open_store(str(root))
    found: Counter[tuple[Any, ...]] = Counter()
    for name, spec in TABLES.items():
        if not (root / "rejected" / name).exists():
            continue
        for row in pl.read_delta(rejected_uri(store, name)).to_dicts():
            found[_rejected_key(name, spec.column_names, row)] += 1
    return found


def _rejected_key(table: str, columns: list[str], row: dict[str, Any]) -> tuple[Any, ...]:
    return (
        table,
        row["source_file"],
        row["source_line"],
        tuple(row["reject_reasons"]),
        tuple(row.get(c) for c in columns),
        row.get("raw_record"),
    )


# The staged step (buckets of keys, groups of partitions) must give what one bucket and one group
# give, which is what the reference gives.
PLANS = [Plan(1, 1), Plan(3, 1), Plan(7, 4), Plan(1, 4)]


@pytest.mark.parametrize("plan", PLANS, ids=lambda plan: f"{plan.buckets}b{plan.groups}g")
@pytest.mark.parametrize(
    "seed",
    [
        1,
        2,
        3,
        pytest.param(4, marks=pytest.mark.slow),
        pytest.param(5, marks=pytest.mark.slow),
        pytest.param(6, marks=pytest.mark.slow),
    ],
)
def test_two_dirty_batches_give_what_the_reference_gives(root: Path, seed: int, plan: Plan) -> None:
    _two_batches_against_the_reference(root, seed, plan)


# The distributed path's stages (plans, units, finish; here in this process) against the same reference:
# the same tables, rejected rows and counts as the single-task step.
@pytest.mark.parametrize("plan", [Plan(1, 1), Plan(3, 2)], ids=lambda plan: f"{plan.buckets}b{plan.groups}g")
@pytest.mark.parametrize("seed", [1, 2, pytest.param(3, marks=pytest.mark.slow)])
def test_the_distributed_path_gives_what_the_reference_gives(root: Path, seed: int, plan: Plan) -> None:
    _two_batches_against_the_reference(root, seed, plan, workers=0)
    left = [path for folder in ("plan", "staging") for path in root.glob(f"{folder}/**/*") if path.is_file()]
    assert not left, "plan or staging objects left behind"


def _two_batches_against_the_reference(root: Path, seed: int, plan: Plan, workers: int | None = None) -> None:
    lake = reference.Lake()
    loaded: set[str] = set()
    store = open_store(str(root))
    expected_rejected: Counter[tuple[Any, ...]] = Counter()
    for number, batch in enumerate(dirty_batches(seed)):
        _land(root, batch)
        try:
            expected = reference.run_batch(lake, batch, f"b{number}", loaded)
        except reference.ReferenceFileError as error:
            with pytest.raises(StepError):
                run_batch(store, plan=plan, workers=workers)
            pytest.skip(f"seed {seed} makes a file error, refused by both: {error}")
        report = run_batch(store, plan=plan, workers=workers)
        lake, loaded = expected.lake, expected.loaded_contents
        for row in expected.rejected:
            columns = TABLES[row["table"]].column_names
            expected_rejected[_rejected_key(row["table"], columns, row)] += 1
        for step in report.steps:
            counts = expected.counts[step.table]
            got = (step.rows_in, step.inserted, step.updated, step.unchanged, step.rejected)
            want = (counts.rows_in, counts.inserted, counts.updated, counts.unchanged, counts.rejected)
            assert got == want, f"batch {number} {step.table}"
            assert Counter(step.rejected_by_reason) == counts.rejected_by_reason, (
                f"batch {number} {step.table}"
            )
            assert sum(step.empty_lines.values()) == counts.empty_lines, f"batch {number} {step.table}"
        tables = _tables(root)
        for name in TABLES:
            want_rows = {key: {k: _plain(v) for k, v in row.items()} for key, row in lake.table(name).items()}
            assert tables[name] == want_rows, f"batch {number} {name}"
        assert _rejected(root) == expected_rejected, f"batch {number}"
