"""The reader fuzzed: every record accounted for once, as the plain-Python reference reads it.

Files are written by Python's csv module (any quoting, any line ending, a BOM, blank lines), then
perhaps damaged (cut anywhere, bytes inserted, a quote or a comma dropped). On undamaged files the
records must also be exactly those of ``csv.reader``.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.errors import InputFileError
from pipeline.reader import RAW_RECORD, SOURCE_LINE, ReadStats, read_chunks, read_layout
from pipeline.specs import PRODUCTS
from tests import reference

HEADER = PRODUCTS.column_names
field_text = st.text(alphabet=st.sampled_from(list('ab1 ,"\r\n\té\u2603;|')), max_size=8)
row = st.lists(field_text, min_size=2, max_size=6)


@st.composite
def csv_files(draw: Any) -> tuple[bytes, bool]:
    """A products file written by the csv module, and whether it was damaged afterwards."""
    header = list(draw(st.permutations(HEADER)))
    if draw(st.booleans()):
        header.insert(
            draw(st.integers(0, len(header))), draw(st.sampled_from(["extra", "Product_Name2", ""]))
        )
    rows = draw(
        st.lists(
            st.one_of(row, st.lists(field_text, min_size=len(header), max_size=len(header))), max_size=12
        )
    )
    terminator = draw(st.sampled_from(["\n", "\r\n", "\r"]))
    quoting = draw(st.sampled_from([csv.QUOTE_MINIMAL, csv.QUOTE_ALL]))
    out = io.StringIO(newline="")
    writer = csv.writer(out, lineterminator=terminator, quoting=quoting)
    writer.writerow(header)
    for values in rows:
        writer.writerow(values)
        if draw(st.integers(0, 5)) == 0:
            out.write(terminator)  # a blank line
    text = out.getvalue()
    if draw(st.booleans()):
        text = terminator * draw(st.integers(1, 2)) + text  # blank lines before the header
    if not draw(st.booleans()):
        text = text.rstrip("\r\n")  # no final line break
    data = (b"\xef\xbb\xbf" if draw(st.booleans()) else b"") + text.encode()
    damaged = False
    for _ in range(draw(st.integers(0, 2))):
        damaged = True
        at = draw(st.integers(0, len(data)))
        kind = draw(st.sampled_from(["cut", "insert", "drop"]))
        if kind == "cut":
            data = data[:at]
        elif kind == "insert":
            data = (
                data[:at] + draw(st.sampled_from([b'"', b",", b"\n", b"\r", b" ", b"\xff", b"x"])) + data[at:]
            )
        else:
            data = data[:at] + data[at + 1 :]
    return data, damaged


def _ours(path: Path) -> tuple[list[tuple[int, Any]], int] | str:
    """(line, values or raw text) of every record, and the empty lines; or 'error' for a file error."""
    try:
        layout = read_layout(path, PRODUCTS, "f.csv")
        if layout is None:
            return [], -1
        stats = ReadStats()
        found: list[tuple[int, Any]] = []
        for chunk in read_chunks(path, PRODUCTS, "f.csv", layout, block_size=64, stats=stats):
            for record in chunk.records.iter_rows(named=True):
                found.append((record[SOURCE_LINE], tuple(record[name] for name in HEADER)))
            for bad in chunk.malformed.iter_rows(named=True):
                found.append((bad[SOURCE_LINE], bad[RAW_RECORD]))
    except InputFileError:
        return "error"
    return sorted(found, key=lambda item: item[0]), stats.empty_lines


def _reference(data: bytes) -> tuple[list[tuple[int, Any]], int] | str:
    try:
        parsed = reference.parse_file(data, "f.csv")
        if parsed.header is None:
            return [], -1
        mapping = reference.map_header("products", parsed.header.fields, "f.csv")
    except reference.ReferenceFileError:
        return "error"
    width = len(parsed.header.fields)
    found: list[tuple[int, Any]] = []
    for record in parsed.records:
        if record.unterminated or len(record.fields) != width:
            found.append((record.line, record.raw))
        else:
            found.append(
                (record.line, tuple(record.fields[mapping[n]] if n in mapping else None for n in HEADER))
            )
    return found, parsed.empty_lines


@settings(
    max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
@given(sample=csv_files())
def test_every_record_is_read_once_as_the_reference_reads_it(
    sample: tuple[bytes, bool], tmp_path_factory: pytest.TempPathFactory
) -> None:
    data, damaged = sample
    path = tmp_path_factory.mktemp("fuzz") / "f.csv"
    path.write_bytes(data)
    ours, expected = _ours(path), _reference(data)
    assert ours == expected
    if not damaged and isinstance(ours, tuple):
        text = data.decode("utf-8-sig")
        rows = [r for r in csv.reader(io.StringIO(text, newline="")) if r][1:]
        values = [v for _, v in ours[0]]
        layout = read_layout(path, PRODUCTS, "f.csv")
        assert layout is not None
        assert len(values) == len(rows)
        for got, written in zip(values, rows):
            if isinstance(got, tuple):
                assert got == tuple(
                    written[layout.positions[n]] if n in layout.positions else None for n in HEADER
                )


@pytest.mark.slow
@settings(max_examples=150, deadline=None)
@given(data=st.binary(max_size=200))
def test_random_bytes_are_read_whole_or_refused_as_the_reference_does(
    data: bytes, tmp_path_factory: pytest.TempPathFactory
) -> None:
    path = tmp_path_factory.mktemp("bytes") / "f.csv"
    path.write_bytes(b"product_id,department_id,department,product_name\n" + data)
    assert _ours(path) == _reference(path.read_bytes())
