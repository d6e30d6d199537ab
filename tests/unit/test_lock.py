"""The batch lock: holders, takeover of stale locks, leases, unlock, and handing over to an execution."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from pipeline.errors import BatchLockedError
from pipeline.lock import LOCK_KEY, acquire_lock, batch_lock, lock_holder, stale_reason, this_process, unlock
from pipeline.storage import open_store


def _dead_pid() -> int:
    done = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    return int(done.stdout)


def _write_lock(root: Path, **fields: object) -> None:
    open_store(str(root)).write_bytes(LOCK_KEY, json.dumps(fields).encode())


def _later(seconds: float) -> str:
    return (datetime.now(timezone.utc) + timedelta(seconds=seconds)).isoformat()


def test_a_lock_names_its_holder_and_is_released(root: Path) -> None:
    store = open_store(str(root))
    with batch_lock(store, "b1"):
        holder = lock_holder(store)
        assert holder["batch"] == "b1" and holder["pid"] == this_process()["pid"]
        with pytest.raises(BatchLockedError, match="another run holds the lock"):
            acquire_lock(store, "b2")
    assert store.stat(LOCK_KEY) is None


def test_a_lock_whose_process_is_gone_from_this_machine_is_taken_over_with_a_note(root: Path) -> None:
    me = this_process()
    _write_lock(root, batch="old", host=me["host"], boot=me["boot"], pid=_dead_pid(), expires=_later(3600))
    lock = acquire_lock(open_store(str(root)), "new")
    assert lock.note is not None and "took over the lock of batch old" in lock.note and "is gone" in lock.note
    assert lock_holder(open_store(str(root)))["batch"] == "new"


def test_a_reused_pid_is_not_taken_for_the_holder(root: Path) -> None:
    me = this_process()
    _write_lock(
        root, batch="old", host=me["host"], boot=me["boot"], pid=me["pid"], started="1", expires=_later(3600)
    )
    assert stale_reason(lock_holder(open_store(str(root)))) is not None


def test_another_machines_lock_is_taken_over_only_once_its_lease_ran_out(root: Path) -> None:
    store = open_store(str(root))
    _write_lock(root, batch="old", host="elsewhere", pid=1, expires=_later(600))
    with pytest.raises(BatchLockedError, match="lease until"):
        acquire_lock(store, "new")
    _write_lock(root, batch="old", host="elsewhere", pid=1, expires=_later(-1))
    assert "lease ran out" in (acquire_lock(store, "new").note or "")


def test_of_two_runs_taking_over_one_stale_lock_only_one_wins(root: Path) -> None:
    store = open_store(str(root))
    _write_lock(root, batch="old", host="elsewhere", pid=1, expires=_later(-1))
    stale = store.read_bytes(LOCK_KEY)
    first = acquire_lock(store, "a")
    assert first.note
    # The second saw the same stale lock: its swap finds the first's claim instead.
    assert not store.swap(LOCK_KEY, stale, b"{}")
    with pytest.raises(BatchLockedError):
        acquire_lock(store, "b")


def test_a_lease_that_was_taken_over_is_known_lost(root: Path) -> None:
    store = open_store(str(root))
    lock = acquire_lock(store, "a", lease_seconds=0.01)
    _write_lock(root, batch="b", host="elsewhere", pid=1, expires=_later(600))
    assert not lock.renew() and lock.lost.is_set()
    assert not lock.release(), "a lock that is not ours any more is left alone"
    assert lock_holder(store)["batch"] == "b"


def test_unlock_refuses_a_live_holder_unless_forced(root: Path) -> None:
    store = open_store(str(root))
    with batch_lock(store, "running"):
        with pytest.raises(BatchLockedError):
            unlock(store)
        assert unlock(store, force=True) is not None
    assert unlock(store) is None
    me = this_process()
    _write_lock(root, batch="dead", host=me["host"], boot=me["boot"], pid=_dead_pid(), expires=_later(600))
    assert (unlock(store) or {})["batch"] == "dead"


def test_a_lock_handed_to_an_execution_is_judged_by_it_not_by_the_trigger_process(root: Path) -> None:
    store = open_store(str(root))
    lock = acquire_lock(store, "starting")
    lock.hand_over(batch="b1", execution="b1", expires=_later(3600))
    holder = lock_holder(store)
    assert "pid" not in holder and holder["execution"] == "b1"
    assert stale_reason(holder, lambda h: True) is None
    assert "has ended" in (stale_reason(holder, lambda h: False) or "")
    assert stale_reason(holder, lambda h: None) is None, "unknown: the lease decides"


class _Flaky:
    """A store whose compare-and-swap fails from some point on, as a stalled endpoint would."""

    def __init__(self, store: object) -> None:
        self.inner = store
        self.failing = False
        self.root = "flaky"

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)

    def swap(self, key: str, expected: bytes, data: bytes | None) -> bool:
        if self.failing:
            raise OSError("endpoint stalled")
        return bool(self.inner.swap(key, expected, data))  # type: ignore[attr-defined]


def test_a_lease_that_cannot_be_renewed_past_its_end_is_known_lost(root: Path) -> None:
    import time

    store = _Flaky(open_store(str(root)))
    notes: list[str] = []
    with batch_lock(store, "b", lease_seconds=0.2, notify=notes.append) as lock:  # type: ignore[arg-type]
        store.failing = True
        deadline = time.monotonic() + 5
        while not lock.lost.is_set() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert lock.lost.is_set(), "renewals failing for longer than the lease: others may take it over"
        store.failing = False
