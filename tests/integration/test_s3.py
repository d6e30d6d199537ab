"""The same batch on an S3 bucket served by a moto server on 127.0.0.1."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import boto3
import polars as pl
import pytest

from pipeline import delta
from pipeline.batch import rejected_uri, run_batch, run_step, table_uri
from pipeline.cli import main
from pipeline.errors import MissingDatasetError
from pipeline.generate import generate
from pipeline.manifest import new_batch_id, snapshot
from pipeline.query import run_query
from pipeline.specs import TABLES
from pipeline.storage import open_store

pytestmark = pytest.mark.slow


def keys(root: str, prefix: str) -> list[str]:
    bucket, _, base = root[len("s3://") :].partition("/")
    listing = boto3.client("s3").list_objects_v2(Bucket=bucket, Prefix=f"{base}/{prefix}")
    return [obj["Key"][len(base) + 1 :] for obj in listing.get("Contents", [])]


def test_full_run_on_s3(s3_root: str) -> None:
    store = open_store(s3_root)
    generated = generate(store, scale=0.001, seed=21)
    report = run_batch(store)
    for step in report.steps:
        stored = delta.count_rows(table_uri(store, step.table))
        rejected = pl.read_delta(rejected_uri(store, step.table), storage_options=_options()).height
        assert stored + rejected == step.rows_in
    assert keys(s3_root, "raw/") == []
    assert len([k for k in keys(s3_root, "archived/") if k.endswith(".csv")]) == len(generated.files)
    assert f"reports/{report.batch_id}.json" in keys(s3_root, "reports/")
    counts = run_query(store, "SELECT COUNT(*) AS n FROM orders").item()
    assert counts == report.table_counts["orders"]
    assert run_query(store, "SELECT COUNT(*) FROM orders WHERE date = '2099-01-01'").item() == 0


def test_step_command_runs_one_table_of_a_manifest(s3_root: str) -> None:
    store = open_store(s3_root)
    generate(store, scale=0.001, seed=22)
    now = datetime.now(timezone.utc)
    manifest = snapshot(store, new_batch_id(now), now)
    store.write_bytes(manifest.key, manifest.to_json())
    main(["step", "products", "--root", s3_root, "--manifest", store.uri(manifest.key)])
    assert delta.count_rows(table_uri(store, "products")) > 0
    assert delta.count_rows(table_uri(store, "orders")) == 0
    assert f"reports/{manifest.batch_id}/products.json" in keys(s3_root, "reports/")
    for name in ("orders", "order_items"):
        run_step(store, manifest, TABLES[name])
    assert delta.count_rows(table_uri(store, "order_items")) > 0
    assert len(keys(s3_root, "raw/")) == sum(len(f) for f in manifest.files.values())


def test_missing_dataset_on_s3(s3_root: str) -> None:
    store = open_store(s3_root)
    store.write_bytes("raw/products/p.csv", b"product_id,department_id,department,product_name\n1,2,a,b\n")
    with pytest.raises(MissingDatasetError, match="raw/orders/, raw/order_items/"):
        run_batch(store)
    assert keys(s3_root, "raw/") == ["raw/products/p.csv"]


def _options() -> dict[str, str]:
    from pipeline.settings import load_settings

    return load_settings().delta_storage_options()


@pytest.mark.parametrize(
    "buckets_groups_workers", [(1, 1, None), (3, 4, None), (3, 4, 0)], ids=["whole", "staged", "distributed"]
)
def test_two_dirty_batches_on_s3_give_what_the_reference_gives(
    s3_root: str, buckets_groups_workers: tuple[int, int, int | None], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The differential test on the moto server: exactly-once, stale rows and line numbers on S3 too; and
    the distributed path's stages (in this process), their parts read back from S3 by ranges."""
    from collections import Counter

    from pipeline import distributed
    from pipeline.stages import Plan
    from tests import reference

    buckets, groups, workers = buckets_groups_workers
    plan = Plan(buckets, groups)
    # Parts written in many objects each: every stage reads ranges of several objects.
    monkeypatch.setattr(distributed, "FLUSH_BYTES", 4096)
    from tests.dirty import dirty_batches

    store = open_store(s3_root)
    lake, loaded = reference.Lake(), set[str]()
    for number, batch in enumerate(dirty_batches(2)):
        for files in batch.values():
            for key, data in files:
                store.write_bytes(key, data)
        expected = reference.run_batch(lake, batch, f"b{number}", loaded)
        lake, loaded = expected.lake, expected.loaded_contents
        report = run_batch(store, plan=plan, workers=workers)
        for step in report.steps:
            counts = expected.counts[step.table]
            assert (step.rows_in, step.inserted, step.updated, step.rejected) == (
                counts.rows_in,
                counts.inserted,
                counts.updated,
                counts.rejected,
            )
            assert Counter(step.rejected_by_reason) == counts.rejected_by_reason
    for name, spec in TABLES.items():
        stored = pl.read_delta(table_uri(store, name), storage_options=_options())
        assert stored.height == len(lake.table(name))
        assert set(stored.get_column(spec.primary_key).to_list()) == set(lake.table(name))
    # The second batch's files landed again: skipped, nothing stored twice.
    for files in dirty_batches(2)[1].values():
        for key, data in files:
            store.write_bytes(key, data)
    before = {
        name: pl.read_delta(rejected_uri(store, name), storage_options=_options()).height for name in TABLES
    }
    again = run_batch(store)
    assert all(step.rows_in == 0 for step in again.steps)
    after = {
        name: pl.read_delta(rejected_uri(store, name), storage_options=_options()).height for name in TABLES
    }
    assert after == before
    assert keys(s3_root, "staging/") == keys(s3_root, "plan/") == []


def test_a_range_of_an_object_on_s3_is_those_bytes_or_an_error(s3_root: str) -> None:
    from pipeline.errors import StorageError

    store = open_store(s3_root)
    store.write_bytes("a/b.bin", bytes(range(100)))
    assert store.read_range("a/b.bin", 10, 5) == bytes(range(10, 15))
    with pytest.raises(StorageError, match="3 bytes from 98"):
        store.read_range("a/b.bin", 98, 3)


@pytest.mark.parametrize("after_the_check", [False, True], ids=["before the check", "after the check"])
def test_an_object_replaced_while_its_step_downloads_it_fails_the_step(
    s3_root: str, monkeypatch: pytest.MonkeyPatch, after_the_check: bool
) -> None:
    """Replaced before the download's size/ETag check, or between it and the ranged reads (If-Match)."""
    from pipeline.errors import StepError
    from pipeline.storage import S3Store

    store = open_store(s3_root)
    generate(store, scale=0.0005, seed=23)
    real = S3Store._download_exactly

    def replaced(self: S3Store, key: str, etag: str, size: int | None, path: Path) -> None:
        if "/orders/" in key:
            checked = self.stat(key)
            body = self.read_bytes(key)
            self.write_bytes(key, body.replace(b"2025", b"2024", 1))
            if after_the_check:
                monkeypatch.setattr(self, "stat", lambda _key: checked)  # what the check saw
        real(self, key, etag, size, path)

    monkeypatch.setattr(S3Store, "_download_exactly", replaced)
    with pytest.raises(
        StepError, match=r"step orders failed: .*raw/orders/.* changed after its batch was snapshotted"
    ):
        run_batch(store)
    assert delta.count_rows(table_uri(store, "orders")) == 0
    assert len([k for k in keys(s3_root, "raw/") if k.endswith(".csv")]) > 3
