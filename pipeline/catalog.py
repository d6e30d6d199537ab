"""Which Glue crawls a batch needs. No polars or deltalake on this import path (the handlers use it).

Athena reads a native Delta table's files and versions from its log, so a crawl only matters when a
table is new or its schema changed. Each step reports a digest of its tables' schemas
(``StepReport.schemas``); ``manifests/_catalog.json`` holds the digests the catalog was last brought up
to date with, written by FinishBatch when a batch succeeds (its crawls, if any, succeeded too) and
removed when one fails, so that the batch after a failure crawls again and a catalog that lost a table
is repaired. Local runs never write it: they crawl nothing.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

from pipeline.manifest import MANIFESTS
from pipeline.report import StepReport, load_step_report
from pipeline.storage import Store

CATALOG_KEY = f"{MANIFESTS}/_catalog.json"
# The rejected tables' crawler names them rejected_<table> (its table prefix): rejected/<table>/ and
# lakehouse-dwh/<table>/ end in the same folder name.
REJECTED_PREFIX = "rejected_"


def catalog_name(table: str, *, rejected: bool = False) -> str:
    """The name of a lakehouse table, or of its rejected table, in the Glue catalog."""
    return REJECTED_PREFIX + table if rejected else table


def _known(store: Store) -> dict[str, str]:
    if store.stat(CATALOG_KEY) is None:
        return {}
    return {str(name): str(digest) for name, digest in json.loads(store.read_bytes(CATALOG_KEY)).items()}


def _reported(steps: Iterable[StepReport]) -> dict[str, str]:
    """The schema digests the steps reported, by catalog name."""
    return {name: digest for step in steps for name, digest in step.schemas.items()}


def catalog_changes(store: Store, batch_id: str, tables: Iterable[str]) -> list[str]:
    """The catalog tables that this batch created or whose schema it changed, as far as the catalog knows
    (a table without a step report yet has no digest)."""
    known = _known(store)
    steps = [step for step in (load_step_report(store, batch_id, table) for table in tables) if step]
    return sorted(name for name, digest in _reported(steps).items() if known.get(name) != digest)


def record_catalog(store: Store, steps: Iterable[StepReport]) -> None:
    """Note that the catalog now holds the tables as the batch's steps reported them."""
    known = {**_known(store), **_reported(steps)}
    store.write_bytes(CATALOG_KEY, json.dumps(known, indent=2, sort_keys=True).encode())


def forget_catalog(store: Store) -> None:
    """Make the next batch crawl every table it has (after a failure, the catalog may be behind)."""
    store.delete(CATALOG_KEY)
