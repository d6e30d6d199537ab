"""The batch lock of a root: while it exists, one batch is in progress and no other may start.

The CLI's `run` holds it for its whole run; on AWS the trigger takes it before starting an execution
and the state machine's last step releases it. No polars or deltalake on this import path.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Any

from pipeline.errors import BatchLockedError, LakehouseError
from pipeline.manifest import MANIFESTS
from pipeline.storage import Store

LOCK_KEY = f"{MANIFESTS}/_lock.json"


def _claim(batch: str) -> bytes:
    return json.dumps(
        {
            "batch": batch,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "since": datetime.now(timezone.utc).isoformat(),
        }
    ).encode()


def acquire_lock(store: Store, batch: str) -> None:
    """Take the lock for ``batch`` or raise ``BatchLockedError`` naming the holder."""
    if store.write_bytes(LOCK_KEY, _claim(batch), if_absent=True):
        return
    holder = lock_holder(store)
    raise BatchLockedError(
        f"another run holds the lock of {store.root} (batch {holder.get('batch', '?')}, "
        f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, since {holder.get('since', '?')}); "
        f"if it is no longer running, remove it with `lakehouse unlock --root {store.root}`"
    )


def hand_over_lock(store: Store, batch: str) -> None:
    """Name ``batch`` as the holder of a lock the caller already holds."""
    store.write_bytes(LOCK_KEY, _claim(batch))


def lock_holder(store: Store) -> dict[str, Any]:
    """What the lock says about its holder (empty when there is no lock or it cannot be read)."""
    try:
        return dict(json.loads(store.read_bytes(LOCK_KEY)))
    except (LakehouseError, ValueError, TypeError):
        return {}


def release_lock(store: Store, batch: str | None = None) -> bool:
    """Remove the lock; with ``batch``, only if that batch holds it. Returns whether it was removed."""
    if store.stat(LOCK_KEY) is None:
        return False
    if batch is not None and lock_holder(store).get("batch") != batch:
        return False
    store.delete(LOCK_KEY)
    return True


@contextmanager
def batch_lock(store: Store, batch: str) -> Iterator[None]:
    """Hold the root's batch lock so two runs never process the same files."""
    acquire_lock(store, batch)
    try:
        yield
    finally:
        store.delete(LOCK_KEY)
