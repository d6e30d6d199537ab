"""The whole step fuzzed: hypothesis writes the three tables' files, every record must land once, as the
reference says (tables, rejected rows with their reasons and lines, counts)."""

from __future__ import annotations

import csv
import io
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.batch import run_batch
from pipeline.errors import StepError
from pipeline.specs import TABLES
from pipeline.storage import open_store
from tests import reference
from tests.integration.test_differential import _rejected, _rejected_key, _tables

pytestmark = pytest.mark.slow

# Mostly valid values, so that rows survive to the batch rules (duplicates, references, stale rows).
small_int = st.sampled_from(["1", "2", "3", "1", "2", "3", "7", "0", "-1", " 2 ", "x", "", "+3"])
stamp = st.sampled_from(
    [
        "2025-04-01T10:00:00",
        "2025-04-01 12:00:00Z",
        "2025-04-01T09:00:00",
        "2025-04-01T10:00:00.5",
        "0000-01-01T00:00:00",
        "bad",
    ]
)
day = st.sampled_from(["2025-04-01", "2025-04-01", "2025-04-01", "2025-04-02", "2025-02-30", ""])
text = st.text(alphabet=st.sampled_from(list('ab ,"\r\n\u00e9')), max_size=6)
COLUMN_VALUES = {
    "department": text,
    "product_name": text,
    "order_timestamp": stamp,
    "total_amount": st.sampled_from(["1.5", "0", "-0", "-2", "1e3", "nan", ""]),
    "date": day,
    "days_since_prior_order": st.sampled_from(["", "3", "-1"]),
    "reordered": st.sampled_from(["0", "1", "2"]),
}


# One row per table that is surely valid: the seed's check (every table has rows) lets batches go on.
ANCHORS = {
    "products": ["1", "1", "Dept", "Anchor"],
    "orders": ["1", "1", "1", "2025-04-01T10:00:00", "1.0", "2025-04-01"],
    "order_items": ["1", "1", "1", "", "1", "1", "0", "2025-04-01T10:00:00", "2025-04-01"],
}


@st.composite
def table_file(draw: Any, table: str) -> bytes:
    columns = TABLES[table].column_names
    rows = draw(
        st.lists(
            st.one_of(
                st.tuples(*(COLUMN_VALUES.get(name, small_int) for name in columns)).map(list),
                st.lists(small_int, max_size=3),  # a record with the wrong field count
            ),
            max_size=8,
        )
    )
    out = io.StringIO(newline="")
    terminator = draw(st.sampled_from(["\n", "\r\n", "\r"]))
    writer = csv.writer(
        out, lineterminator=terminator, quoting=draw(st.sampled_from([csv.QUOTE_MINIMAL, csv.QUOTE_ALL]))
    )
    writer.writerow(columns)
    for values in [ANCHORS[table], *rows]:
        writer.writerow(values)
        if draw(st.integers(0, 6)) == 0:
            out.write(terminator)
    data = out.getvalue().encode()
    if draw(st.integers(0, 8)) == 0:
        data += b'1,"open'
    return data


batches = st.fixed_dictionaries(
    {table: st.lists(table_file(table), min_size=1, max_size=2) for table in TABLES}
)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
@given(first=batches, second=batches)
def test_two_fuzzed_batches_land_every_record_once_as_the_reference_says(
    first: dict[str, list[bytes]], second: dict[str, list[bytes]]
) -> None:
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        store = open_store(str(root))
        lake, loaded = reference.Lake(), set[str]()
        expected_rejected: Counter[tuple[Any, ...]] = Counter()
        for number, drawn in enumerate((first, second)):
            batch = {
                table: [(f"raw/{table}/b{number}-{i}.csv", data) for i, data in enumerate(files)]
                for table, files in drawn.items()
            }
            for files in batch.values():
                for key, data in files:
                    (root / key).parent.mkdir(parents=True, exist_ok=True)
                    (root / key).write_bytes(data)
            expected = reference.run_batch(lake, batch, f"b{number}", loaded)
            lake, loaded = expected.lake, expected.loaded_contents
            for row in expected.rejected:
                expected_rejected[_rejected_key(row["table"], TABLES[row["table"]].column_names, row)] += 1
            try:
                report = run_batch(store)
            except StepError as error:
                # The seed's check: a table left empty fails the batch after its steps committed,
                # which must then hold what the reference says; the batch stays unfinished.
                assert "has no rows after the batch" in str(error), error
                _compare(root, lake, expected_rejected)
                return
            for step in report.steps:
                counts = expected.counts[step.table]
                assert (step.rows_in, step.inserted, step.updated, step.unchanged, step.rejected) == (
                    counts.rows_in,
                    counts.inserted,
                    counts.updated,
                    counts.unchanged,
                    counts.rejected,
                ), step.table
            _compare(root, lake, expected_rejected)


def _compare(root: Path, lake: reference.Lake, expected_rejected: Counter[tuple[Any, ...]]) -> None:
    from tests.integration.test_differential import _plain

    assert _rejected(root) == expected_rejected
    tables = _tables(root)
    for name in TABLES:
        want = {key: {k: _plain(v) for k, v in row.items()} for key, row in lake.table(name).items()}
        assert tables[name] == want, name
