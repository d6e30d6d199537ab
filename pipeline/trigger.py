"""Starting batches from S3 events (the CheckDataAvailability Lambda's core).

No polars or deltalake on this import path: it must fit a zip-deployed Lambda.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace
from datetime import datetime
from typing import Callable
from urllib.parse import unquote_plus

from pipeline.errors import BatchLockedError, MissingDatasetError
from pipeline.lock import acquire_lock, hand_over_lock, release_lock
from pipeline.manifest import Manifest, raw_prefix, snapshot, unfinished_manifests
from pipeline.specs import TABLES
from pipeline.storage import Store

# Starts the state machine for a manifest; the flag says whether the batch is resumed after a failure.
StartExecution = Callable[[Manifest, bool], None]


def is_raw_csv(key: str, prefix: str = "") -> bool:
    """Whether an S3 key (URL-encoded as in S3 events, under an optional root prefix) is a raw CSV."""
    key = unquote_plus(key)
    if prefix:
        if not key.startswith(prefix.rstrip("/") + "/"):
            return False
        key = key[len(prefix.rstrip("/")) + 1 :]
    return key.lower().endswith(".csv") and any(key.startswith(raw_prefix(table)) for table in TABLES)


def content_batch_id(manifest: Manifest) -> str:
    """A batch id that depends only on the files (key, size, version): redelivered events agree on it."""
    digest = hashlib.sha256()
    for table in TABLES:
        for entry in manifest.files[table]:
            digest.update(f"{entry.key}\0{entry.size}\0{entry.version}\n".encode())
    return f"batch-{digest.hexdigest()[:24]}"


def start_ready_batch(store: Store, start: StartExecution, now: datetime) -> Manifest | None:
    """Start the next batch if none is in progress and every dataset has a CSV in ``raw/``.

    Takes the root's batch lock (so two triggers never start overlapping batches); an unfinished
    batch is resumed before a new one is snapshotted; the lock stays with the started batch until the
    state machine releases it. Returns the started manifest, or None when nothing was started.
    """
    try:
        acquire_lock(store, "starting")
    except BatchLockedError:
        return None  # the running batch's final re-check picks up files that landed meanwhile
    try:
        pending = unfinished_manifests(store)
        resumed = bool(pending)
        if resumed:
            manifest = pending[0]
        else:
            try:
                taken = snapshot(store, "pending", now)
            except MissingDatasetError:
                release_lock(store)
                return None
            manifest = replace(taken, batch_id=content_batch_id(taken))
            store.write_bytes(manifest.key, manifest.to_json(), if_absent=True)
        hand_over_lock(store, manifest.batch_id)
        start(manifest, resumed)
    except BaseException:
        release_lock(store)
        raise
    return manifest
