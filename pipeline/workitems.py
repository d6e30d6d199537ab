"""Where the distributed path's work items and unit reports live: names only, light enough for the
Lambda handlers (no polars)."""

from __future__ import annotations

from pathlib import Path

from pipeline.specs import TABLES
from pipeline.storage import Store

PLAN = "plan"
STAGING = "staging"
STAGES = ("parse", "resolve", "write", "moves", "late")
# What each plan writes items for: the write plan judges the gates once, for the three stages after it.
PLANNED = {"parse": ("parse",), "resolve": ("resolve",), "write": ("write", "moves", "late")}


def plan_prefix(batch_id: str, table: str, stage: str | None = None) -> str:
    return f"{PLAN}/{batch_id}/{table}/" + (f"{stage}/" if stage else "")


def staging_prefix(batch_id: str, table: str) -> str:
    return f"{STAGING}/{batch_id}/{table}"


def unit_report_key(batch_id: str, table: str, stage: str, unit: int) -> str:
    return f"{staging_prefix(batch_id, table)}/units/{stage}/{unit:05d}.json"


def planned_key(batch_id: str, table: str, stage: str) -> str:
    return f"{staging_prefix(batch_id, table)}/units/{stage}.planned.json"


def units_not_done(store: Store, batch_id: str) -> list[str]:
    """The work items of a batch whose unit has no report (what a failed batch left to run), in plan order."""
    pending = []
    for info in store.list(f"{PLAN}/{batch_id}/"):
        parts = info.key.split("/")
        if len(parts) != 5 or parts[3] not in STAGES or not info.key.endswith(".json"):
            continue  # not a work item
        if store.stat(unit_report_key(batch_id, parts[2], parts[3], int(Path(parts[4]).stem))) is None:
            pending.append(info.key)
    order = {table: index for index, table in enumerate(TABLES)}  # the steps' order
    return sorted(
        pending, key=lambda key: (order.get(key.split("/")[2], 9), STAGES.index(key.split("/")[3]), key)
    )
