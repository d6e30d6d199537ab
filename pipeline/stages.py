"""The staged step's plan and its staged files: buckets of keys and groups of partitions.

A table's step holds one bucket of its valid rows at a time while it resolves duplicates, references
and stale rows, and one group of its surviving rows while it merges them. A bucket is the rows whose
primary key hashes to it, so every row of a key is in one bucket and resolving bucket by bucket is
exact. A group is a run of consecutive partition values, so MERGEs of different groups touch
disjoint partitions. The number of both follows from a memory budget; a batch that fits the budget
whole is one bucket and one group, and then nothing is staged at all.
"""

from __future__ import annotations

import math
import resource
import shutil
import sys
import time
from collections import Counter
from dataclasses import dataclass
from itertools import count
from pathlib import Path
from typing import Any

import polars as pl

from pipeline.dedup import typed
from pipeline.specs import TableSpec

GIB = 1 << 30
# Under 3 GB (2.95), leaving a 4 GiB Fargate task 1.25 GiB for what the estimate below misses.
DEFAULT_MEMORY_BUDGET = int(2.75 * GIB)
# A step's peak is about FIXED_BYTES + HELD_BYTES_PER_CSV_BYTE x the CSV bytes of one bucket. Fitted on
# the 2.06 GiB of order items at scale 1.0 in 2, 3 and 4 buckets (peaks 2.98, 2.44 and 2.16 GiB): the
# fixed part is Python, Polars, delta-rs and what the allocator keeps from the earlier steps; the held
# part is the bucket's typed rows, its dedup and join working set and one group's MERGE.
FIXED_BYTES = int(1.35 * GIB)
HELD_BYTES_PER_CSV_BYTE = 1.6
# What a bucket's rows cost more when the lakehouse stores their keys already: each stored row's key,
# partition, ordering value and digests, and their join to the bucket (a re-export of scale 1.0 in 3
# buckets: 1.24 GiB more at the resolve than the full load, for 11.1 M stored rows a bucket).
HELD_BYTES_PER_STORED_ROW = 120
BUCKET = "bucket__"


@dataclass(frozen=True)
class Plan:
    """How a table's step is cut: ``buckets`` of keys to resolve, ``groups`` of partitions to merge."""

    buckets: int = 1
    groups: int = 1

    @property
    def staged(self) -> bool:
        return self.buckets > 1 or self.groups > 1


def plan_for(
    csv_bytes: int, memory_budget: int = DEFAULT_MEMORY_BUDGET, *, csv_rows: int = 0, stored_rows: int = 0
) -> Plan:
    """The plan that holds at most ``memory_budget`` bytes for a table with ``csv_bytes`` of files.

    ``csv_rows`` (an estimate) and ``stored_rows`` (the table's now) size the buckets by the stored rows
    they may meet too: at most one per row of the batch, so a daily batch into a large lake stays one
    bucket. The groups merge the batch's rows only and follow from ``csv_bytes`` alone.
    """
    if memory_budget <= 0:
        raise ValueError(f"the memory budget must be positive, not {memory_budget}")
    # Below twice the fixed part no plan can meet the budget; half of it then goes to the rows (the two
    # meet at twice the fixed part, so more budget never means more parts).
    for_rows = max(memory_budget - FIXED_BYTES, memory_budget / 2)
    held = csv_bytes * HELD_BYTES_PER_CSV_BYTE
    met = min(csv_rows, stored_rows) * HELD_BYTES_PER_STORED_ROW
    groups = max(1, math.ceil(held / for_rows))
    return Plan(buckets=max(groups, math.ceil((held + met) / for_rows)), groups=groups)


def parse_size(text: str) -> int:
    """Bytes of a size written as ``4GB``, ``512MiB``, ``3.5G`` or a plain number of bytes."""
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    cleaned = text.strip().upper().removesuffix("B").removesuffix("I")
    number, unit = (cleaned[:-1], cleaned[-1]) if cleaned and cleaned[-1] in units else (cleaned, "")
    try:
        value = float(number) * units[unit]
    except ValueError:
        raise ValueError(f"{text!r} is not a size (for example 4GB or 512MiB)") from None
    if value <= 0:
        raise ValueError(f"{text!r} is not a positive size")
    return int(value)


def bucket_of(spec: TableSpec, buckets: int) -> pl.Expr:
    """The bucket of each row: a hash of its typed primary key (fixed seeds: stable within a run)."""
    key = pl.col(typed(spec.primary_key))
    return (key.hash(seed=0) % buckets).cast(pl.Int32).alias(BUCKET)


def partition_groups(rows_per_value: Counter[Any], groups: int) -> dict[Any, int]:
    """Consecutive runs of the sorted partition values, of about equal rows: value -> group number."""
    total = sum(rows_per_value.values())
    share = max(1, math.ceil(total / max(1, groups)))
    assigned, group, filled = {}, 0, 0
    for value in sorted(rows_per_value):
        if filled >= share and group < groups - 1:
            group, filled = group + 1, 0
        assigned[value] = group
        filled += rows_per_value[value]
    return assigned


def peak_rss() -> int:
    """The process's peak resident memory so far, in bytes."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


class StageClock:
    """Seconds of each stage of a step, and the process's peak memory by the end of each (a peak so far:
    the stage where it rises is the one that set it)."""

    def __init__(self) -> None:
        self._last = time.monotonic()
        self.figures: dict[str, dict[str, float]] = {}

    def mark(self, stage: str) -> None:
        now = time.monotonic()
        self.figures[stage] = {
            "seconds": round(now - self._last, 3),
            "peak_rss_gib": round(peak_rss() / GIB, 2),
        }
        self._last = now


class Staging:
    """Frames put aside by kind and part (a bucket, a group) as Arrow IPC files in ``folder``.

    Uncompressed IPC, not Parquet: staged files are written once and read once, soon, from a local
    disk, and IPC writes at twice the speed (5 M typed order items: 0.33 s against 0.68 s for lz4
    Parquet, read back in 0.10 s against 0.14 s) for about twice the disk.
    """

    SUFFIX = ".arrow"

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._numbers = count()

    def put(self, kind: str, part: int, frame: pl.DataFrame) -> None:
        if not frame.height:
            return
        folder = self.folder / kind / f"part-{part}"
        folder.mkdir(parents=True, exist_ok=True)
        frame.write_ipc(folder / f"{next(self._numbers):06d}{self.SUFFIX}", compression="uncompressed")

    def put_split(self, kind: str, frame: pl.DataFrame, part_column: str) -> None:
        """Put each part of ``frame`` (by its ``part_column``, which is dropped) under its part."""
        for (part,), piece in frame.partition_by(part_column, as_dict=True, include_key=False).items():
            self.put(kind, int(part), piece)

    def files(self, kind: str, part: int) -> list[Path]:
        """The files put under ``kind`` and ``part``, in the order they were put."""
        folder = self.folder / kind / f"part-{part}"
        return sorted(folder.glob(f"*{self.SUFFIX}")) if folder.exists() else []

    def parts(self, kind: str) -> list[int]:
        """The parts something was put under for ``kind``."""
        folder = self.folder / kind
        found = folder.glob("part-*") if folder.exists() else []
        return sorted(int(path.name.removeprefix("part-")) for path in found)

    def read(self, path: Path) -> pl.DataFrame:
        """One staged file's frame."""
        return pl.read_ipc(path)

    def scan(self, kind: str, part: int) -> pl.LazyFrame:
        """The files put under ``kind`` and ``part`` as one lazy frame (something must have been put)."""
        return pl.scan_ipc(self.files(kind, part))

    def take(self, kind: str, part: int) -> pl.DataFrame | None:
        """Everything put under ``kind`` and ``part`` as one frame (None: nothing was), then forgotten."""
        files = self.files(kind, part)
        if not files:
            return None
        # Relaxed: a part whose column is all null (Null) joins one where it has values.
        frame = pl.concat([self.read(path) for path in files], how="vertical_relaxed", rechunk=False)
        shutil.rmtree(files[0].parent)
        return frame
