"""Record boundaries and line numbers: the vectorised scan against a character-by-character reference."""

from __future__ import annotations

import csv
import io

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline import records as records_module
from pipeline.records import LongRecord, RecordStream, ScanState, Span, scan_window


def reference_records(data: bytes) -> tuple[list[tuple[int, str, bool]], int]:
    """(line, text, quote left open) of every non-empty record, and the empty lines, one character at a time.

    The states are those of CPython's ``_csv.c`` reader (excel dialect, not strict).
    """
    text = data.decode("utf-8")
    if text.startswith("\ufeff"):
        text = text[1:]
    found: list[tuple[int, str, bool]] = []
    empty = 0
    line = 1
    start, start_line = 0, 1
    state = "record"  # record | field | unquoted | quoted | quote_in_quoted
    index = 0
    while index < len(text):
        char = text[index]
        if char in "\r\n" and state != "quoted":
            end = index
            if char == "\r" and text[index + 1 : index + 2] == "\n":
                index += 1
            line += 1
            if end == start:
                empty += 1
            else:
                found.append((start_line, text[start:end], False))
            start, start_line, state = index + 1, line, "record"
        elif char in "\r\n":  # a line break inside a quoted field
            if char == "\r" and text[index + 1 : index + 2] == "\n":
                index += 1
            line += 1
        elif state in ("record", "field"):
            state = "quoted" if char == '"' else "field" if char == "," else "unquoted"
        elif state == "unquoted":
            state = "field" if char == "," else "unquoted"
        elif state == "quoted":
            state = "quote_in_quoted" if char == '"' else "quoted"
        elif state == "quote_in_quoted":
            state = "quoted" if char == '"' else "field" if char == "," else "unquoted"
        index += 1
    if start < len(text):
        found.append((start_line, text[start:], state == "quoted"))
    return found, empty


def scanned_records(data: bytes, block_size: int) -> tuple[list[tuple[int, str, bool]], int]:
    stream = RecordStream(io.BytesIO(data), block_size=block_size)
    found: list[tuple[int, str, bool]] = []
    for item in stream:
        if isinstance(item, Span):
            found += [(int(item.lines[i]), item.text(i).decode(), False) for i in range(item.starts.size)]
        else:
            found.append((item.line, item.text.decode(), item.open_quote))
    return found, stream.empty_lines


csv_text = st.text(alphabet=st.sampled_from(list('ab ,"\r\n\u00e9')), max_size=60)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=csv_text, block_size=st.sampled_from([1, 2, 3, 5, 16, 1 << 16]), bom=st.booleans())
def test_records_and_lines_equal_the_reference(text: str, block_size: int, bom: bool) -> None:
    data = (b"\xef\xbb\xbf" if bom else b"") + text.encode()
    assert scanned_records(data, block_size) == reference_records(data)


@settings(max_examples=300, deadline=None)
@given(text=csv_text)
def test_closed_records_split_into_the_fields_pythons_csv_reads(text: str) -> None:
    """Each record cut out on its own reads as the csv module reads it within the whole text."""
    found, _ = scanned_records(text.encode(), 1 << 16)
    rows = [row for row in csv.reader(io.StringIO(text, newline="")) if row]
    closed = [record for _, record, open_quote in found if not open_quote]
    assert len(rows) == len(found)
    assert [next(csv.reader([record])) for record in closed] == rows[: len(closed)]


def _exact_ends(data: bytes, positions: np.ndarray) -> tuple[list[bool], bool]:
    state = ScanState()
    quotes = np.flatnonzero(np.frombuffer(data, dtype=np.uint8) == 34).tolist()
    opens, closes = records_module._quoted_spans(data, 0, len(data), quotes, state)
    if not opens.size:
        return [True] * positions.size, state.in_quote
    last = np.searchsorted(opens, positions, side="right") - 1
    inside = (last >= 0) & (positions < closes[np.maximum(last, 0)])
    return (~inside).tolist(), state.in_quote


@settings(max_examples=400, deadline=None)
@given(text=st.text(alphabet=st.sampled_from(list('ab,"\n')), max_size=40))
def test_counting_quotes_agrees_with_following_them_one_by_one(text: str) -> None:
    """The shortcut for well-formed quoting gives what following every quote in order gives."""
    data = text.encode()
    state = ScanState()
    breaks = scan_window(data, 0, len(data), 0, state, at_eof=True)
    positions = np.flatnonzero(np.frombuffer(data, dtype=np.uint8) == 10)
    assert (breaks.ends_record.tolist(), state.in_quote) == _exact_ends(data, positions)


def test_lines_count_crlf_once_and_a_lone_cr_as_a_break() -> None:
    data = b'a,b\r\nc,"x\r\ny"\rd\n\ne\r\r\nf'
    found, empty = scanned_records(data, 4)
    assert found == [
        (1, "a,b", False),
        (2, 'c,"x\r\ny"', False),
        (4, "d", False),
        (6, "e", False),
        (8, "f", False),
    ]
    assert empty == 2


def test_a_quote_open_at_the_end_is_a_long_record_from_its_line() -> None:
    data = b'h\n1,"never closed\n2,b\n3,c\n'
    found, _ = scanned_records(data, 8)
    assert found == [(1, "h", False), (2, '1,"never closed\n2,b\n3,c\n', True)]


def test_an_overlong_record_keeps_its_first_bytes_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(records_module, "MAX_RECORD_BYTES", 100)
    monkeypatch.setattr(records_module, "RAW_LIMIT", 10)
    data = b'h\n"' + b"x" * 500 + b'",y\nnext\n'
    long_records, texts = [], []
    for item in RecordStream(io.BytesIO(data), block_size=32):
        if isinstance(item, LongRecord):
            long_records.append((item.line, item.text, item.size, item.open_quote))
        else:  # a span is valid until the next item is asked for
            texts += [item.text(i) for i in range(item.starts.size)]
    assert long_records == [(2, b'"' + b"x" * 9, 504, False)]
    assert texts == [b"h", b"next"]


def test_the_digest_is_of_every_byte_read() -> None:
    import hashlib

    data = b"\xef\xbb\xbfa,b\n1,2\n"
    stream = RecordStream(io.BytesIO(data), block_size=2, hashed=True)
    list(stream)
    assert stream.digest == hashlib.sha256(data).hexdigest()


@settings(max_examples=200, deadline=None)
@given(text=st.text(alphabet=st.sampled_from(list('a,"\r\n')), max_size=60))
def test_quotes_found_one_by_one_or_by_array_scan_give_the_same_records(text: str) -> None:
    data = text.encode()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(records_module, "_FEW_QUOTES", 2)
        assert scanned_records(data, 8) == reference_records(data)
