"""ArchiveETLFiles: move exactly the batch manifest's files from raw/ to archived/<table>/<batch_id>/.

Input (from the state machine): ``{"root": "s3://bucket[/prefix]", "manifest": "manifests/<id>.json"}``.
Raises on any failure so that the state machine sees it; safe to retry.
"""

from __future__ import annotations

from typing import Any

from aws_lambda_powertools import Logger
from aws_lambda_powertools.utilities.typing import LambdaContext

from pipeline.archive import archive_batch
from pipeline.manifest import read_manifest
from pipeline.storage import open_store

logger = Logger(service="ecommerce-lakehouse")


@logger.inject_lambda_context
def lambda_handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    store = open_store(event["root"])
    manifest = read_manifest(store, event["manifest"])
    logger.append_keys(batch_id=manifest.batch_id)
    moved = archive_batch(
        store, manifest, progress=lambda message, **fields: logger.debug(message, extra=fields)
    )
    logger.info("archived", extra={"files": moved})
    return {"batch_id": manifest.batch_id, "archived_files": moved}
