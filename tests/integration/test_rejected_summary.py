"""The step report's account of its rejected rows (by file, by partition, samples) against a plain-Python
reading of the rejected table it wrote."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import polars as pl

from pipeline.batch import SAMPLES_PER_REASON, rejected_uri, run_batch
from pipeline.generate import generate
from pipeline.specs import TABLES
from pipeline.storage import open_store


def test_rejected_counts_and_samples_match_the_rejected_table(root: Path) -> None:
    store = open_store(str(root))
    generate(store, scale=0.002, seed=11)
    report = run_batch(store)
    for step in report.steps:
        spec = TABLES[step.table]
        rows = pl.read_delta(rejected_uri(store, step.table)).to_dicts()
        assert len(rows) == step.rejected > 0
        assert step.rejected_by_file == dict(Counter(row["source_file"] for row in rows))
        partition = spec.partition_by
        assert step.rejected_by_partition == dict(Counter(row[partition] or "" for row in rows))
        # The first rows (by file, then line) of every reason, each once, with its reasons and text.
        first: set[tuple[str, int]] = set()
        for reason in {reason for row in rows for reason in row["reject_reasons"]}:
            having = sorted(
                (r["source_file"], r["source_line"]) for r in rows if reason in r["reject_reasons"]
            )
            first.update(having[:SAMPLES_PER_REASON])
        by_place = {(row["source_file"], row["source_line"]): row for row in rows}
        samples = step.rejected_samples
        assert sorted((s["source_file"], s["source_line"]) for s in samples) == sorted(first)
        for sample in samples:
            row = by_place[sample["source_file"], sample["source_line"]]
            assert sample["reasons"] == row["reject_reasons"]
            text = row["raw_record"]
            if text is None:
                text = ",".join(row[name] or "" for name in spec.column_names)
            assert sample["record"] == text


def test_samples_do_not_depend_on_the_order_rows_were_rejected_in(root: Path) -> None:
    """Late rejects and staged parts arrive out of file order: the samples are the first by place still."""
    from pipeline.batch import _Rejected, _rejected_summary

    store = open_store(str(root))
    generate(store, scale=0.002, seed=11)
    report = run_batch(store)
    for step in report.steps:
        table = pl.read_delta(rejected_uri(store, step.table))
        for seed in (1, 2):
            rejected = _Rejected(None)
            rejected.add(table.sample(fraction=1.0, shuffle=True, seed=seed))
            by_file, by_partition, samples = _rejected_summary(rejected, TABLES[step.table])
            assert (by_file, by_partition) == (step.rejected_by_file, step.rejected_by_partition)
            assert samples == step.rejected_samples
