"""The staged step's plan: sizes, buckets of keys, groups of partitions, staged frames."""

from __future__ import annotations

from collections import Counter
from datetime import date
from pathlib import Path

import polars as pl
import pytest

from pipeline.specs import ORDER_ITEMS
from pipeline.stages import (
    FIXED_BYTES,
    GIB,
    HELD_BYTES_PER_CSV_BYTE,
    HELD_BYTES_PER_STORED_ROW,
    Plan,
    Staging,
    bucket_of,
    parse_size,
    partition_groups,
    plan_for,
)


@pytest.mark.parametrize(
    ("text", "size"),
    [("3GiB", 3 * GIB), ("4GB", 4 * GIB), ("512MiB", 512 << 20), ("1.5g", int(1.5 * GIB)), ("1000", 1000)],
)
def test_sizes_are_read_in_binary_units(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "GB", "3XB", "-1GB", "0", "lots"])
def test_a_bad_size_is_refused_with_the_text(text: str) -> None:
    with pytest.raises(ValueError, match="size"):
        parse_size(text)


def test_a_table_that_fits_the_budget_is_one_bucket_and_one_group() -> None:
    assert plan_for(100 << 20, 3 * GIB) == Plan(1, 1)
    assert not Plan(1, 1).staged


def test_the_parts_grow_with_the_files_and_shrink_with_the_budget() -> None:
    fits = int((3 * GIB - FIXED_BYTES) / HELD_BYTES_PER_CSV_BYTE)  # the budget less the fixed part
    assert plan_for(fits, 3 * GIB) == Plan(1, 1)
    assert plan_for(fits + 1, 3 * GIB) == Plan(2, 2)
    assert plan_for(3 * fits, 3 * GIB) == Plan(3, 3)
    assert plan_for(3 * fits, 6 * GIB).buckets < 3
    with pytest.raises(ValueError):
        plan_for(1, 0)


def test_a_budget_below_twice_the_fixed_part_gives_half_of_it_to_the_rows() -> None:
    budget = FIXED_BYTES  # all of it would go to the fixed part
    fits = int(budget / 2 / HELD_BYTES_PER_CSV_BYTE)
    assert plan_for(fits, budget) == Plan(1, 1)
    assert plan_for(4 * fits, budget) == Plan(4, 4)
    # Continuous where the two rules meet: more budget never gives more parts.
    sizes = [int(FIXED_BYTES * share) for share in (0.5, 1.0, 1.9, 2.0, 2.1, 3.0)]
    parts = [plan_for(10 * GIB, size).buckets for size in sizes]
    assert parts == sorted(parts, reverse=True)


def test_the_default_budget_cuts_scale_one_order_items_in_three() -> None:
    # 2.06 GiB of CSV: the fit behind FIXED_BYTES says 2 buckets would peak near 3 GiB, 3 near 2.4 GiB.
    assert plan_for(2_214_478_436) == Plan(3, 3)


def test_every_row_of_a_key_is_in_one_bucket_and_every_bucket_is_used() -> None:
    keys = pl.DataFrame({"typed__id": pl.Series([i % 500 for i in range(5_000)], dtype=pl.Int32)})
    buckets = keys.with_columns(bucket_of(ORDER_ITEMS, 7))
    per_key = buckets.group_by("typed__id").agg(pl.col("bucket__").n_unique())
    assert per_key.get_column("bucket__").max() == 1
    assert sorted(buckets.get_column("bucket__").unique().to_list()) == list(range(7))


def test_groups_are_runs_of_consecutive_partitions_of_about_equal_rows() -> None:
    rows = Counter({date(2025, 1, day): 10 for day in range(1, 31)})
    groups = partition_groups(rows, 4)
    assert sorted(set(groups.values())) == [0, 1, 2, 3]
    ordered = [groups[day] for day in sorted(rows)]
    assert ordered == sorted(ordered)  # consecutive
    sizes = Counter(groups.values())
    assert max(sizes.values()) - min(sizes.values()) <= 2
    assert set(partition_groups(rows, 1).values()) == {0}
    assert len(set(partition_groups(Counter({1: 5}), 4).values())) == 1


def test_staged_frames_come_back_whole_once(tmp_path: Path) -> None:
    staging = Staging(tmp_path)
    first = pl.DataFrame({"a": [1, 2], "part": [0, 1]})
    staging.put_split("parsed", first, "part")
    staging.put_split("parsed", pl.DataFrame({"a": [3], "part": [1]}), "part")
    staging.put("parsed", 5, pl.DataFrame({"a": []}, schema={"a": pl.Int64}))
    taken = staging.take("parsed", 1)
    assert taken is not None and sorted(taken.get_column("a").to_list()) == [2, 3]
    assert staging.take("parsed", 1) is None  # forgotten once taken
    assert staging.take("parsed", 5) is None  # nothing staged for an empty frame
    again = staging.take("parsed", 0)
    assert again is not None and again.get_column("a").to_list() == [1]
    assert list(tmp_path.rglob(f"*{Staging.SUFFIX}")) == []


def test_stored_rows_a_bucket_may_meet_add_buckets_not_groups() -> None:
    csv_bytes = int((3 * GIB - FIXED_BYTES) / HELD_BYTES_PER_CSV_BYTE)  # one part without stored rows
    met = int((3 * GIB - FIXED_BYTES) / HELD_BYTES_PER_STORED_ROW)  # one part's worth of stored rows
    assert plan_for(csv_bytes, 3 * GIB, csv_rows=10 * met, stored_rows=0) == Plan(1, 1)
    assert plan_for(csv_bytes, 3 * GIB, csv_rows=10 * met, stored_rows=met) == Plan(2, 1)
    assert plan_for(csv_bytes, 3 * GIB, csv_rows=10 * met, stored_rows=3 * met) == Plan(4, 1)
    # A bucket meets at most one stored row per row of the batch: a day into a large lake stays whole.
    assert plan_for(1 << 20, 3 * GIB, csv_rows=10_000, stored_rows=10**9) == Plan(1, 1)


def test_store_parts_are_one_object_per_kind_whose_ranges_give_back_every_part(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipeline import distributed
    from pipeline.distributed import StoreParts, by_part, ranges
    from pipeline.storage import open_store

    store = open_store(str(tmp_path))

    def put_blocks(parts: StoreParts) -> None:
        # Twelve blocks, each split over three parts, in two kinds (what a parse unit does per block).
        for block in range(12):
            frame = pl.DataFrame(
                {"x": range(block * 10, block * 10 + 10), "part": [n % 3 for n in range(10)]}
            )
            parts.put_split("parsed", frame, "part")
            parts.put("rejected", 0, frame.head(1).drop("part"))

    def spans(parts: StoreParts) -> pl.DataFrame:
        return parts.index().with_columns(pl.lit(7, dtype=pl.Int32).alias("unit"))  # as a plan reads it

    parts = StoreParts(store, "staging/b/t", "parse-00007")
    put_blocks(parts)
    parts.flush()
    # Not 12 x 3 + 12 objects: one for each kind.
    assert sorted(info.key for info in store.list("staging/b/t/")) == [
        "staging/b/t/parsed/parse-00007-000000.arrow",
        "staging/b/t/rejected/parse-00007-000001.arrow",
    ]
    assert parts.objects == 2
    parsed = by_part(spans(parts), "parsed")
    assert sorted(parsed) == [0, 1, 2]
    for part, found in parsed.items():
        assert found.get_column("rows").sum() == len([x for x in range(120) if x % 10 % 3 == part])
        got = parts.take(ranges(found, "parsed", "parse"))
        assert got is not None
        assert got.get_column("x").to_list() == [x for x in range(120) if x % 10 % 3 == part]
    rejected = parts.take(ranges(by_part(spans(parts), "rejected")[0], "rejected", "parse"))
    assert rejected is not None and rejected.get_column("x").to_list() == list(range(0, 120, 10))
    assert parts.take([]) is None
    assert parts.reads == 4  # three parts of one object, one of the other

    # Held frames are written whenever they pass FLUSH_BYTES: more objects, the same parts, in order;
    # and the same unit run again writes the very same objects and index (a unit killed part way and run
    # again from the start), each attempt under a folder of its own here, to compare them.
    monkeypatch.setattr(distributed, "FLUSH_BYTES", 400)
    attempts = []
    for attempt in ("first", "again"):
        small = StoreParts(store, f"staging/{attempt}", "parse-00007")
        put_blocks(small)
        small.flush()
        written = {
            info.key.removeprefix(f"staging/{attempt}/"): store.read_bytes(info.key)
            for info in store.list(f"staging/{attempt}/")
        }
        attempts.append((written, small.index()))
        assert len(written) > 2
        for part, found in by_part(spans(small), "parsed").items():
            got = small.take(ranges(found, "parsed", "parse"))
            assert got is not None
            assert got.get_column("x").to_list() == [x for x in range(120) if x % 10 % 3 == part]
    (first, first_index), (again, again_index) = attempts
    assert first == again and first_index.equals(again_index)


def test_reads_ahead_are_bounded_by_count_and_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline import distributed
    from pipeline.distributed import StoreParts
    from pipeline.storage import open_store

    store = open_store(str(tmp_path))
    parts = StoreParts(store, "staging/b/t", "parse-00000")
    for part in range(40):
        parts.put("parsed", part, pl.DataFrame({"x": [part] * 100}))
    parts.flush()
    index = parts.index()
    where = [
        ["parsed/parse-00000-000000.arrow", start, length]
        for start, length in index.select("start", "length").iter_rows()
    ]
    started: list[int] = []
    real = StoreParts.read

    def read(self: StoreParts, key: str, start: int, length: int) -> pl.DataFrame:
        started.append(start)
        return real(self, key, start, length)

    monkeypatch.setattr(StoreParts, "read", read)
    monkeypatch.setattr(distributed, "READ_AHEAD_BYTES", 3 * min(length for _, _, length in where))
    taken = 0
    for frame in parts.frames(where):
        taken += 1
        # At most three ranges' bytes are in flight or held beyond the one taken.
        assert len(started) - taken <= 3
        assert frame.get_column("x").to_list() == [taken - 1] * 100
    assert taken == 40 and parts.reads == 40


def test_a_range_of_a_local_object_is_those_bytes_or_an_error(tmp_path: Path) -> None:
    from pipeline.errors import StorageError
    from pipeline.storage import open_store

    store = open_store(str(tmp_path))
    store.write_bytes("a/b.bin", bytes(range(100)))
    assert store.read_range("a/b.bin", 10, 5) == bytes(range(10, 15))
    with pytest.raises(StorageError, match="3 bytes from 98"):
        store.read_range("a/b.bin", 98, 3)
