"""Operational faults: a stalled S3 endpoint, a full disk, a cleanup that fails, downloads of killed runs."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.errors import StepError, StorageError
from pipeline.lock import batch_lock
from pipeline.storage import DOWNLOAD_PREFIX, LocalStore, remove_stale_downloads


@pytest.fixture
def stalled_endpoint() -> Iterator[str]:
    """An HTTP endpoint that accepts connections and never answers."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    thread.join()
    for connection in held:
        connection.close()
    server.close()


def _aws_env(endpoint: str) -> dict[str, str]:
    env = {name: value for name, value in os.environ.items() if not name.startswith("AWS_")}
    env.update(
        AWS_ENDPOINT_URL=endpoint,
        AWS_ACCESS_KEY_ID="x",
        AWS_SECRET_ACCESS_KEY="x",
        AWS_REGION="us-east-1",
        AWS_ALLOW_HTTP="true",
        LAKEHOUSE_S3_TIMEOUT="1",
    )
    return env


def test_a_stalled_s3_endpoint_fails_in_seconds_with_one_sentence(stalled_endpoint: str) -> None:
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "pipeline", "--log-format", "text", "run", "--root", "s3://bucket/lake"],
        capture_output=True,
        text=True,
        env=_aws_env(stalled_endpoint),
        timeout=120,
    )
    took = time.monotonic() - started
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot "), done.stderr
    assert "s3://bucket/lake/" in lines[0] and "timeout" in lines[0].lower()
    assert took < 60, f"{took:.0f} s"


class _FailingRelease(LocalStore):
    def swap(self, key: str, expected: bytes, data: bytes | None) -> bool:
        if data is None:
            raise StorageError("cannot write the lock: Read timeout")
        return super().swap(key, expected, data)


def test_a_cleanup_that_fails_never_hides_the_steps_own_error(root: Path) -> None:
    store = _FailingRelease(root)
    notes: list[str] = []
    with (
        pytest.raises(StepError, match="step orders failed: RuntimeError: the real cause"),
        batch_lock(store, "b", notify=notes.append),
    ):
        raise StepError("orders", RuntimeError("the real cause"))
    assert any("could not release the lock" in note for note in notes)
    with pytest.raises(StorageError, match="Read timeout"), batch_lock(_FailingRelease(root / "other"), "c"):
        pass  # alone, the cleanup's error is the error


def test_downloads_of_runs_that_are_gone_are_removed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    stale = tmp_path / f"{DOWNLOAD_PREFIX}{int(dead.stdout)}-abc"
    live = tmp_path / f"{DOWNLOAD_PREFIX}{os.getpid()}-def"
    for folder in (stale, live):
        folder.mkdir()
        (folder / "order_items.csv").write_bytes(b"x" * 100)
    remove_stale_downloads()
    assert not stale.exists() and live.exists()


def _small_disk(path: Path, megabytes: int) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    if not shutil.which("mount") or os.geteuid() != 0:
        return False
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={megabytes}m", "tmpfs", str(path)], capture_output=True
    )
    return done.returncode == 0


@pytest.mark.slow
def test_a_full_disk_is_one_sentence_without_rust_panics(tmp_path: Path) -> None:
    disk = tmp_path / "disk"
    if not _small_disk(disk, 6):
        pytest.skip("needs root and tmpfs to make a small disk")
    try:
        from pipeline.generate import generate
        from pipeline.storage import open_store

        source = tmp_path / "source"
        generate(open_store(str(source)), scale=0.003, seed=2)
        shutil.copytree(source / "raw", disk / "raw")
        done = subprocess.run(
            [sys.executable, "-m", "pipeline", "run", "--root", str(disk)],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 1
        # stderr is no terminal: the log is JSON lines, and a Rust panic's trace would be no JSON.
        assert "panicked" not in done.stderr, done.stderr[-3000:]
        events = [json.loads(line) for line in done.stderr.strip().splitlines()]
        (failed,) = [event for event in events if event["level"] == "error"]
        assert "no space left on device" in failed["message"], failed
        assert len(list((disk / "raw").rglob("*.csv"))) == len(list((source / "raw").rglob("*.csv")))
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


def test_a_killed_runs_staged_files_are_removed_by_the_next_local_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Staging folders are named like downloads; any next step sweeps them, staged itself or not."""
    from pipeline.batch import run_batch
    from pipeline.storage import open_store
    from tests.helpers import write_raw

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    stale = scratch / f"{DOWNLOAD_PREFIX}{int(dead.stdout)}-staging-abc"
    (stale / "parsed" / "part-0").mkdir(parents=True)
    (stale / "parsed" / "part-0" / "000000.parquet").write_bytes(b"x" * 100)
    root = tmp_path / "lake"
    write_raw(root, "products", "p.csv", "5,2,Books,Novel")
    write_raw(root, "orders", "o.csv", "1,10,7,2025-04-01T11:27:00,12.50,2025-04-01")
    write_raw(root, "order_items", "i.csv", "1,10,7,,5,1,0,2025-04-01T11:27:00,2025-04-01")
    run_batch(open_store(str(root)))
    assert not stale.exists()
    assert list(scratch.iterdir()) == []
