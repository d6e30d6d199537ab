"""Rows the lakehouse stores as they are already need no MERGE; a change in any one column is merged.

The comparison is by digests of the typed columns (``pipeline.batch._unchanged``), so every column and
type is tried on its own: a column the digest missed would drop its update without a trace.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from pipeline import delta
from pipeline.batch import run_batch
from pipeline.report import BatchReport
from pipeline.stages import HELD_BYTES_PER_CSV_BYTE, Plan
from pipeline.storage import open_store
from tests.helpers import write_raw

PRODUCTS = ["1,2,Dairy,Milk", "2,2,Dairy,Butter", "3,4,Bakery,Bread"]
ORDERS = [
    "1,10,7,2025-04-01T11:27:00,12.50,2025-04-01",
    "2,11,8,2025-04-02T09:00:00,3.25,2025-04-02",
]
ITEMS = [
    "1,10,7,3,1,1,0,2025-04-01T11:27:00,2025-04-01",
    "2,10,7,,2,2,1,2025-04-01T11:27:00,2025-04-01",
    "3,11,8,5,3,1,0,2025-04-02T09:00:00,2025-04-02",
]
PLANS = [Plan(1, 1), Plan(3, 2)]


def _land(root: Path, products: list[str], orders: list[str], items: list[str], name: str) -> None:
    # The first batch with CRLF, later ones LF: the same rows in other bytes are not skipped as loaded.
    newline = "\r\n" if name == "first" else "\n"
    write_raw(root, "products", f"{name}.csv", *products, newline=newline)
    write_raw(root, "orders", f"{name}.csv", *orders, newline=newline)
    write_raw(root, "order_items", f"{name}.csv", *items, newline=newline)


def _steps(report: BatchReport) -> dict[str, dict[str, int | None]]:
    return {
        step.table: {
            "inserted": step.inserted,
            "updated": step.updated,
            "unchanged": step.unchanged,
            "version": step.delta_version,
        }
        for step in report.steps
    }


# (table, row index, the row as changed): one column each, every other value as it is.
CHANGES = [
    ("products", 0, "1,3,Dairy,Milk"),  # department_id (the partition: the row moves)
    ("products", 0, "1,2,Produce,Milk"),  # department
    ("products", 1, "2,2,Dairy,Salted butter"),  # product_name
    ("orders", 0, "9,10,7,2025-04-01T11:27:00,12.50,2025-04-01"),  # order_num
    ("orders", 0, "1,10,70,2025-04-01T11:27:00,12.50,2025-04-01"),  # user_id
    ("orders", 0, "1,10,7,2025-04-01T11:27:01,12.50,2025-04-01"),  # order_timestamp (a second later)
    ("orders", 0, "1,10,7,2025-04-01T11:27:00.000001,12.50,2025-04-01"),  # a microsecond later
    ("orders", 1, "2,11,8,2025-04-02T09:00:00,3.2500001,2025-04-02"),  # total_amount
    ("order_items", 0, "1,10,70,3,1,1,0,2025-04-01T11:27:00,2025-04-01"),  # user_id
    ("order_items", 0, "1,10,7,,1,1,0,2025-04-01T11:27:00,2025-04-01"),  # days_since_prior_order: null
    ("order_items", 1, "2,10,7,0,2,2,1,2025-04-01T11:27:00,2025-04-01"),  # days_since_prior_order: 0
    ("order_items", 0, "1,10,7,3,3,1,0,2025-04-01T11:27:00,2025-04-01"),  # product_id
    ("order_items", 0, "1,10,7,3,1,5,0,2025-04-01T11:27:00,2025-04-01"),  # add_to_cart_order
    ("order_items", 0, "1,10,7,3,1,1,1,2025-04-01T11:27:00,2025-04-01"),  # reordered
    ("order_items", 2, "3,11,8,5,3,1,0,2025-04-02T10:00:00,2025-04-02"),  # order_timestamp
    ("order_items", 2, "3,10,8,5,3,1,0,2025-04-02T09:00:00,2025-04-02"),  # order_id
]


@pytest.mark.parametrize("plan", PLANS, ids=str)
@pytest.mark.parametrize(("table", "index", "changed"), CHANGES)
def test_a_change_in_any_one_column_is_merged_and_the_rest_is_not(
    tmp_path: Path, plan: Plan, table: str, index: int, changed: str
) -> None:
    store = open_store(str(tmp_path))
    _land(tmp_path, PRODUCTS, ORDERS, ITEMS, "first")
    before = _steps(run_batch(store, plan=plan))
    rows = {"products": list(PRODUCTS), "orders": list(ORDERS), "order_items": list(ITEMS)}
    rows[table][index] = changed
    _land(tmp_path, rows["products"], rows["orders"], rows["order_items"], "again")
    after = _steps(run_batch(store, plan=plan))
    for name, step in after.items():
        if name == table:
            assert (step["inserted"], step["updated"]) == (0, 1), (name, step)
            assert step["unchanged"] == len(rows[name]) - 1
        else:
            assert (step["inserted"], step["updated"], step["unchanged"]) == (0, 0, len(rows[name]))
            assert step["version"] == before[name]["version"], name


@pytest.mark.parametrize("plan", PLANS, ids=str)
def test_the_same_rows_written_otherwise_merge_nothing(
    tmp_path: Path, plan: Plan, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A re-export (other bytes, the same values) is read, checked and rejected as usual, not merged."""
    store = open_store(str(tmp_path))
    _land(tmp_path, PRODUCTS, ORDERS, [*ITEMS, "4,10,7,x,1,1,0,2025-04-01T11:27:00,2025-04-01"], "first")
    first = run_batch(store, plan=plan)

    def no_merge(*_: object, **__: object) -> None:
        raise AssertionError("nothing is to be merged")

    monkeypatch.setattr(delta, "merge_rows", no_merge)
    _land(
        tmp_path,
        [" 1 ,2,Dairy,Milk", "2,2,Dairy,Butter", "3,4,Bakery,Bread"],
        [
            "1,10,7,2025-04-01 11:27:00Z,12.5,2025-04-01",
            "2,11,8,2025-04-02T09:00:00.000000+00:00,3.250,2025-04-02",
        ],
        [*ITEMS, "4,10,7,x,1,1,0,2025-04-01T11:27:00,2025-04-01"],
        "again",
    )
    again = run_batch(store, plan=plan)
    assert {name: step["unchanged"] for name, step in _steps(again).items()} == {
        "products": 3,
        "orders": 2,
        "order_items": 3,
    }
    assert {step.table: step.delta_version for step in again.steps} == {
        step.table: step.delta_version for step in first.steps
    }
    assert [step.rejected for step in again.steps] == [0, 0, 1]


def test_a_batch_of_keys_the_lake_stores_is_cut_in_more_buckets_and_loads_the_same(tmp_path: Path) -> None:
    """The stored rows a bucket meets count in the plan: the same files landed again get more buckets of
    keys (their join with the stored rows is the re-export's peak), the groups stay, no row changes."""
    store = open_store(str(tmp_path))
    _land(tmp_path, PRODUCTS, ORDERS, ITEMS, "first")
    size = (tmp_path / "raw" / "order_items" / "first.csv").stat().st_size
    budget = 2 * math.ceil(size * HELD_BYTES_PER_CSV_BYTE) + 2  # the items' rows in one part, just
    first = run_batch(store, memory_budget=budget)
    _land(tmp_path, PRODUCTS, ORDERS, ITEMS, "again")
    again = run_batch(store, memory_budget=budget)
    loaded, landed = (next(s for s in report.steps if s.table == "order_items") for report in (first, again))
    assert (loaded.buckets, loaded.groups) == (1, 1)
    assert landed.buckets > landed.groups == 1
    assert (landed.inserted, landed.updated, landed.unchanged) == (0, 0, len(ITEMS))
    assert landed.delta_version == loaded.delta_version
