"""Ctrl-C, SIGTERM and SIGHUP: the lock is released, the exit code says which, and a run resumes."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from pipeline.batch import run_batch
from pipeline.lock import LOCK_KEY
from pipeline.storage import open_store
from tests.integration.test_batch import raw_files, small_batch

# A run whose orders step waits (after products committed) until it is signalled.
HELD_RUN = """
import sys, time
from pathlib import Path
import pipeline.batch as batch
real = batch.run_step
def held(store, manifest, spec, **kwargs):
    if spec.name == "orders":
        Path(sys.argv[2]).write_text("inside")
        time.sleep(120)
    return real(store, manifest, spec, **kwargs)
batch.run_step = held
from pipeline.cli import main
main(["run", "--root", sys.argv[1]])
"""


@pytest.mark.parametrize(
    ("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143), (signal.SIGHUP, 129)]
)
def test_a_signal_releases_the_lock_exits_with_its_code_and_the_next_run_resumes(
    root: Path, tmp_path: Path, signum: int, code: int
) -> None:
    small_batch(root)
    marker = tmp_path / "inside"
    child = subprocess.Popen(
        [sys.executable, "-c", HELD_RUN, str(root), str(marker)], stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 60
    while not marker.exists():
        assert child.poll() is None and time.monotonic() < deadline, "the run ended before its orders step"
        time.sleep(0.05)
    child.send_signal(signum)
    _, err = child.communicate(timeout=60)
    assert child.returncode == code, err
    assert "unfinished" in err and "Traceback" not in err
    store = open_store(str(root))
    assert store.stat(LOCK_KEY) is None
    assert len(raw_files(root)) == 3
    report = run_batch(store)
    assert {s.table: s.inserted for s in report.steps} == {"products": 2, "orders": 1, "order_items": 1}
    assert raw_files(root) == []


def test_after_kill_9_the_next_run_on_this_machine_takes_the_lock_over(root: Path, tmp_path: Path) -> None:
    small_batch(root)
    marker = tmp_path / "inside"
    child = subprocess.Popen([sys.executable, "-c", HELD_RUN, str(root), str(marker)])
    deadline = time.monotonic() + 60
    while not marker.exists():
        assert child.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    child.kill()
    child.wait(30)
    store = open_store(str(root))
    assert store.stat(LOCK_KEY) is not None
    notes: list[str] = []

    def record(message: str, /, **fields: Any) -> None:
        notes.append(message)

    report = run_batch(store, progress=record)
    assert any("took over the lock" in note for note in notes)
    assert report.status == "succeeded" and raw_files(root) == []
