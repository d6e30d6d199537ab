"""Starting batches from S3 events (the CheckDataAvailability Lambda's core).

No polars or deltalake on this import path: it must fit a zip-deployed Lambda.
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Callable
from urllib.parse import unquote_plus

from pipeline.archive import archive_batch
from pipeline.errors import BatchLockedError, MissingDatasetError
from pipeline.lock import Liveness, acquire_lock, lock_holder
from pipeline.manifest import (
    Manifest,
    new_batch_id,
    raw_prefix,
    record_loaded,
    snapshot,
    unfinished_manifests,
)
from pipeline.report import BatchReport, StepReport, load_report, report_key, save_step_report
from pipeline.specs import TABLES
from pipeline.storage import Store

# Starts the state machine for a manifest under an execution name.
StartExecution = Callable[[Manifest, str], None]
# How long a trigger may take to start an execution before another may take its lock over.
STARTING_LEASE_SECONDS = 300.0
# The lease an execution gets: longer than any batch may run (the state machine's timeout).
EXECUTION_LEASE = timedelta(hours=24)


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


def start_ready_batch(
    store: Store,
    start: StartExecution,
    now: datetime,
    *,
    alive: Liveness | None = None,
    retry_while_starting: bool = False,
) -> Manifest | None:
    """Start the next batch if none is in progress and every dataset has a CSV in ``raw/``.

    Takes the root's batch lock (so two triggers never start overlapping batches; a lock whose
    execution ``alive`` says has ended, or whose lease ran out, is taken over); an unfinished batch is
    resumed before a new one is snapshotted; the lock is handed to the started execution, which the
    state machine's last step releases. A batch made only of files that earlier batches loaded
    already is finished here (archived and reported, nothing written) and the lock released.
    Returns the started (or so finished) manifest, or None when nothing was started.

    While another trigger is starting a batch, its snapshot may have missed the files of this event:
    with ``retry_while_starting`` the lock error is raised (so the event comes again), else None.
    """
    try:
        lock = acquire_lock(store, "starting", lease_seconds=STARTING_LEASE_SECONDS, alive=alive)
    except BatchLockedError:
        if retry_while_starting and lock_holder(store).get("batch") == "starting":
            raise
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
                lock.release()
                return None
            batch_id = content_batch_id(taken)
            if load_report(store, batch_id) is not None:
                # The very same files again, after their batch finished: a batch of its own.
                batch_id = new_batch_id(now)
            manifest = replace(taken, batch_id=batch_id)
            store.write_bytes(manifest.key, manifest.to_json(), if_absent=True)
        if all(entry.loaded_by for entries in manifest.files.values() for entry in entries):
            finish_skipped_batch(store, manifest, now)
            lock.release()
            return manifest
        # A resumed batch already used its own name once; execution names stay taken for 90 days.
        name = f"{manifest.batch_id}-{now:%Y%m%dT%H%M%S}" if resumed else manifest.batch_id
        # Handed over before the start (an execution may finish at once); the long lease only once
        # it started, so that a trigger dying in between blocks the root for minutes, not a day.
        starting = now + timedelta(seconds=STARTING_LEASE_SECONDS)
        lock.hand_over(batch=manifest.batch_id, execution=name, expires=starting.isoformat())
        start(manifest, name)
    except BaseException:
        # Released on the way out; a release that fails too must not hide why the start failed.
        with contextlib.suppress(Exception):
            lock.release()
        raise
    # If the execution ended already and released the lock, there is nothing to extend.
    with contextlib.suppress(BatchLockedError):
        lock.hand_over(expires=(now + EXECUTION_LEASE).isoformat())
    return manifest


def finish_skipped_batch(store: Store, manifest: Manifest, now: datetime) -> BatchReport:
    """Finish a batch whose every file was loaded before: archive them and report; no table changes."""
    steps = []
    for table, entries in manifest.files.items():
        step = StepReport(
            table=table,
            files=len(entries),
            rows_in=0,
            inserted=0,
            updated=0,
            unchanged=0,
            rejected=0,
            rejected_by_reason={},
            delta_version=None,
            rejected_version=None,
            seconds=0.0,
            skipped_files={entry.key: entry.loaded_by or "" for entry in entries},
        )
        save_step_report(store, manifest.batch_id, step)
        steps.append(step)
    archived = archive_batch(store, manifest)
    record_loaded(store, manifest, now)
    report = BatchReport(
        batch_id=manifest.batch_id,
        status="succeeded",
        started_at=manifest.created_at,
        finished_at=now.isoformat(),
        seconds=0.0,
        steps=steps,
        archived_files=archived,
        table_counts={},
    )
    store.write_bytes(report_key(manifest.batch_id), report.to_json())
    return report
