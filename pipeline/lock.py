"""The batch lock of a root: while it is held, one batch is in progress and no other may start.

The lock (``manifests/_lock.json``) names its holder: a process (host, boot, pid and the process's
start time, so a reused pid is not mistaken for it) or, on AWS, a state machine execution. A held
lock is a lease: its holder renews it while it runs, and a lock whose lease has run out, or whose
process is gone from this very machine, is taken over (atomically: of two runs taking over the same
stale lock, one wins). The CLI's ``run`` holds it for its whole run; on AWS the trigger takes it
before starting an execution and the state machine's last step releases it.

No polars or deltalake on this import path.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Callable

from pipeline.errors import BatchLockedError, LakehouseError
from pipeline.manifest import MANIFESTS
from pipeline.storage import Store, process_alive

LOCK_KEY = f"{MANIFESTS}/_lock.json"
# A run renews its lease every LEASE_SECONDS / 4; another machine takes over once it has run out.
LEASE_SECONDS = 120.0

# Tells whether a holder that is not a process of this machine still runs (e.g. a state machine
# execution); None: unknown, the lease decides.
Liveness = Callable[[dict[str, Any]], "bool | None"]


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as handle:
            return handle.read().strip()
    except OSError:
        return ""


def _start_time(pid: int) -> str:
    """When process ``pid`` started (clock ticks since boot, Linux), or "" where that is unknown."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def this_process() -> dict[str, Any]:
    """The holder fields of the calling process."""
    pid = os.getpid()
    return {"host": socket.gethostname(), "boot": _boot_id(), "pid": pid, "started": _start_time(pid)}


@dataclass
class Lock:
    """A held lock: the exact claim written, to renew or release it only while it is still ours."""

    store: Store
    claim: bytes
    note: str | None = None
    lost: threading.Event = field(default_factory=threading.Event)
    # Renewals (a thread) and the release swap ``claim``: one at a time, the release with the latest.
    _swapping: threading.Lock = field(default_factory=threading.Lock)

    @property
    def holder(self) -> dict[str, Any]:
        return dict(json.loads(self.claim))

    def renew(self, lease_seconds: float = LEASE_SECONDS) -> bool:
        """Push the lease's end further; False (and ``lost`` set) when someone took the lock over."""
        with self._swapping:
            if self.lost.is_set():
                return False
            claim = _claim({**self.holder, "expires": _expiry(lease_seconds)})
            if self.store.swap(LOCK_KEY, self.claim, claim):
                self.claim = claim
                return True
            self.lost.set()
            return False

    def hand_over(self, **holder: Any) -> None:
        """Name another holder (e.g. the execution the trigger started) in the lock this caller holds."""
        process = ("host", "boot", "pid", "started")
        kept = {k: v for k, v in self.holder.items() if k not in process or "execution" not in holder}
        claim = _claim({**kept, **holder})
        with self._swapping:
            if not self.store.swap(LOCK_KEY, self.claim, claim):
                raise BatchLockedError(
                    f"the lock of {self.store.root} was taken over before it was handed on"
                )
            self.claim = claim

    def release(self) -> bool:
        """Remove the lock if it is still this claim; whether it was removed."""
        with self._swapping:
            return self.store.swap(LOCK_KEY, self.claim, None)


def _expiry(lease_seconds: float) -> str:
    return (datetime.now(timezone.utc) + timedelta(seconds=lease_seconds)).isoformat()


def _claim(fields: dict[str, Any]) -> bytes:
    return json.dumps(fields, sort_keys=True).encode()


def acquire_lock(
    store: Store,
    batch: str,
    *,
    lease_seconds: float = LEASE_SECONDS,
    alive: Liveness | None = None,
    **holder: Any,
) -> Lock:
    """Take the lock for ``batch`` or raise ``BatchLockedError`` naming the holder.

    ``holder`` fields default to this process. A stale lock (its lease ran out, its process is gone
    from this machine, or ``alive`` says its holder ended) is taken over; ``Lock.note`` says so.
    """
    claim = _claim(
        {
            "batch": batch,
            **(holder or this_process()),
            "since": datetime.now(timezone.utc).isoformat(),
            "expires": _expiry(lease_seconds),
            "token": secrets.token_hex(8),
        }
    )
    if store.write_bytes(LOCK_KEY, claim, if_absent=True):
        return Lock(store, claim)
    current = _read(store)
    if current is None:  # released meanwhile
        if store.write_bytes(LOCK_KEY, claim, if_absent=True):
            return Lock(store, claim)
        current = _read(store)
    if current is not None:
        raw, fields = current
        why = stale_reason(fields, alive)
        if why is not None and store.swap(LOCK_KEY, raw, claim):
            return Lock(store, claim, note=f"took over the lock of batch {fields.get('batch', '?')}: {why}")
    raise BatchLockedError(_held_message(store, current[1] if current else {}))


def _read(store: Store) -> tuple[bytes, dict[str, Any]] | None:
    try:
        raw = store.read_bytes(LOCK_KEY)
    except LakehouseError:
        return None
    try:
        fields = json.loads(raw)
    except ValueError:
        fields = {}
    return raw, dict(fields) if isinstance(fields, dict) else {}


def lock_holder(store: Store) -> dict[str, Any]:
    """What the lock says about its holder (empty when there is no lock or it cannot be read)."""
    current = _read(store)
    return current[1] if current else {}


def stale_reason(holder: dict[str, Any], alive: Liveness | None = None) -> str | None:
    """Why the lock of ``holder`` no longer protects a running batch (None: it may still run)."""
    if holder.get("execution") is None and holder.get("pid") is not None and _same_machine(holder):
        pid = int(holder["pid"])
        if not process_alive(pid) or (holder.get("started") and _start_time(pid) != holder["started"]):
            return f"its process {pid} on {holder.get('host')} is gone"
        return None
    if alive is not None:
        try:
            verdict = alive(holder)
        except Exception:  # cannot be told (no permission, throttled): the lease decides
            verdict = None
        if verdict is not None:
            return None if verdict else f"{_who(holder)} has ended"
    expires = holder.get("expires")
    try:
        ended = datetime.fromisoformat(str(expires)) < datetime.now(timezone.utc)
    except (ValueError, TypeError):
        return None  # a lock that cannot be judged is never taken over: `unlock --force` removes it
    return f"its lease ran out at {expires}" if ended else None


def _same_machine(holder: dict[str, Any]) -> bool:
    me = this_process()
    return holder.get("host") == me["host"] and holder.get("boot", "") == me["boot"]


def _who(holder: dict[str, Any]) -> str:
    if holder.get("execution"):
        return f"execution {holder['execution']}"
    return f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}"


def _held_message(store: Store, holder: dict[str, Any]) -> str:
    return (
        f"another run holds the lock of {store.root} (batch {holder.get('batch', '?')}, {_who(holder)}, "
        f"since {holder.get('since', '?')}, lease until {holder.get('expires', '?')}); it is taken over "
        f"once that process is gone or its lease runs out, or remove it with "
        f"`lakehouse unlock --root {store.root} --force` if you know it no longer runs"
    )


def release_lock(store: Store, batch: str | None = None) -> bool:
    """Remove the lock; with ``batch``, only if that batch holds it. Returns whether it was removed."""
    current = _read(store)
    if current is None:
        return False
    raw, fields = current
    if batch is not None and fields.get("batch") != batch:
        return False
    return store.swap(LOCK_KEY, raw, None)


def unlock(store: Store, *, force: bool = False) -> dict[str, Any] | None:
    """Remove the lock for ``lakehouse unlock``: refused while its holder may run, unless ``force``.

    Returns the holder removed (None: there was no lock).
    """
    current = _read(store)
    if current is None:
        return None
    raw, fields = current
    if not force and stale_reason(fields) is None:
        raise BatchLockedError(_held_message(store, fields).replace(", or remove it", "; or remove it"))
    if not store.swap(LOCK_KEY, raw, None):
        raise BatchLockedError(f"the lock of {store.root} changed meanwhile; look again")
    return fields


@contextmanager
def batch_lock(
    store: Store,
    batch: str,
    *,
    lease_seconds: float = LEASE_SECONDS,
    notify: Callable[[str], None] | None = None,
) -> Iterator[Lock]:
    """Hold the root's batch lock so two runs never process the same files; renewed while held."""
    lock = acquire_lock(store, batch, lease_seconds=lease_seconds)
    if lock.note and notify is not None:
        notify(lock.note)
    stop = threading.Event()

    def keep() -> None:
        renewed = time.monotonic()
        while not stop.wait(lease_seconds / 4):
            try:
                if not lock.renew(lease_seconds):
                    return
                renewed = time.monotonic()
            except Exception:  # a renewal that fails now may work next time; the lease is long
                if time.monotonic() - renewed > lease_seconds:
                    lock.lost.set()  # others may have taken it over by now
                    return

    renewer = threading.Thread(target=keep, name="lock-lease", daemon=True)
    renewer.start()
    failed = False
    try:
        yield lock
    except BaseException:
        failed = True
        raise
    finally:
        stop.set()
        renewer.join(timeout=5)
        try:
            if not lock.release() and not lock.lost.is_set() and notify is not None:
                notify(f"the lock of {store.root} was not ours any more when this run ended")
        except Exception as error:
            # The step's own error must not be hidden by the cleanup's: say it, raise it only if alone.
            if not failed:
                raise
            if notify is not None:
                notify(f"could not release the lock of {store.root}: {error}")
