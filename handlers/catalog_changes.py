"""CatalogChanges: which Glue crawlers a batch needs, after its steps and before the Athena checks.

Input (from the state machine): ``{"root", "batch_id", "crawlers": {"lakehouse": name, "rejected": name}}``.
Returns ``{"changed": [catalog tables new or changed], "crawlers": [names to run]}``: a crawler runs
only when one of its tables is new or its schema changed (``pipeline.catalog``); none, and the state
machine goes straight to the checks.
"""

from __future__ import annotations

from typing import Any

from aws_lambda_powertools import Logger
from aws_lambda_powertools.utilities.typing import LambdaContext

from pipeline.catalog import REJECTED_PREFIX, catalog_changes
from pipeline.specs import TABLES
from pipeline.storage import open_store

logger = Logger(service="ecommerce-lakehouse")


@logger.inject_lambda_context
def lambda_handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    store = open_store(event["root"])
    logger.append_keys(batch_id=event["batch_id"])
    changed = catalog_changes(store, event["batch_id"], TABLES)
    rejected = [name for name in changed if name.startswith(REJECTED_PREFIX)]
    crawlers = event["crawlers"]
    to_run = [crawlers["lakehouse"]] if len(rejected) < len(changed) else []
    to_run += [crawlers["rejected"]] if rejected else []
    logger.info("catalog changes", extra={"changed": changed, "crawlers": to_run})
    return {"changed": changed, "crawlers": to_run}
