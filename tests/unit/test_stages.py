"""The staged step's plan: sizes, buckets of keys, groups of partitions, staged frames."""

from __future__ import annotations

from collections import Counter
from datetime import date
from pathlib import Path

import polars as pl
import pytest

from pipeline.specs import ORDER_ITEMS
from pipeline.stages import (
    GIB,
    HELD_BYTES_PER_CSV_BYTE,
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
    fits = int(3 * GIB / HELD_BYTES_PER_CSV_BYTE)
    assert plan_for(fits, 3 * GIB) == Plan(1, 1)
    assert plan_for(fits + 1, 3 * GIB) == Plan(2, 2)
    assert plan_for(3 * fits, 3 * GIB) == Plan(3, 3)
    assert plan_for(3 * fits, 1 * GIB).buckets == 9
    with pytest.raises(ValueError):
        plan_for(1, 0)


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
    assert list(tmp_path.rglob("*.parquet")) == []
