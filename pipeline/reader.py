"""Read one raw CSV file into frames of original text, keeping every record and its line number.

``pipeline.records`` finds where each record starts and ends and on which physical line (RFC 4180
quoting; LF, CRLF or CR line breaks; empty lines are no records); pyarrow parses the fields of those
records, window by window, materialising only the table's columns. A record whose field count
differs from the header's, or whose quote is never closed, becomes a ``malformed_row`` rejection
with its exact text, never shifted or cut into values.
"""

from __future__ import annotations

import csv
import re
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from queue import Empty, Full, Queue
from typing import Any, TypeVar

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.csv as pacsv

from pipeline.errors import InputFileError, LakehouseError
from pipeline.records import BOM, MAX_RECORD_BYTES, RAW_LIMIT, LongRecord, RecordStream, Span
from pipeline.specs import TableSpec

SOURCE_FILE = "_source_file"
SOURCE_LINE = "_source_line"
RAW_RECORD = "_raw_record"
T = TypeVar("T")

# Large blocks amortise per-block work; one block is the unit of memory for the raw text.
BLOCK_SIZE = 32 << 20
# pyarrow parses a window in blocks of this size: faster than one block per window (0.11-0.12 s vs
# 0.18-0.24 s for 32 MiB of order items).
PARSE_BLOCK = 1 << 20
# Extra header names a note lists; a header may hold millions of them.
EXTRA_NAMES_NOTED = 10
# Before pyarrow 25 a cast to string_view whose values are all inline leaves a null buffer slot that
# crashes the export to Polars (apache/arrow#49740; reproduced here with pyarrow 21 and 24).
_SAFE_VIEW_CASTS = int(pa.__version__.split(".")[0]) >= 25
_DELIMITERS = {";": "semicolons", "\t": "tabs", "|": "pipes"}
_LINE_BREAK = re.compile(rb"\r\n|\r|\n")


@dataclass
class FileLayout:
    """What the header of one file says: where each table column is, and what is missing or extra.

    Attributes:
        positions: the field index of each table column the header names.
        missing: table columns the header does not name.
        extra: the first EXTRA_NAMES_NOTED header names that are not table columns.
        extra_count: how many header names are not table columns.
        field_count: the header's number of fields: every record must have as many.
        header_line: the line of the header (empty lines may come before it).
        matched_by_case: header names matched to a table column only when letter case is ignored.
    """

    positions: dict[str, int]
    missing: list[str]
    extra: list[str]
    field_count: int
    header_line: int = 1
    extra_count: int = 0
    matched_by_case: dict[str, str] = field(default_factory=dict)


@dataclass
class RawChunk:
    """One block of a file: well-formed records as text, and the malformed ones."""

    records: pl.DataFrame
    malformed: pl.DataFrame


@dataclass
class ReadStats:
    """What reading a whole file found besides its records.

    Attributes:
        empty_lines: empty lines (no records; counted, not rejected).
        digest: SHA-256 of the bytes read.
        notes: long records kept in part, and the like.
        bytes_read: how far into the file reading is (for progress; read ahead by up to a block).
    """

    empty_lines: int = 0
    digest: str | None = None
    notes: list[str] = field(default_factory=list)
    bytes_read: int = 0


def read_layout(path: Path, spec: TableSpec, source: str) -> FileLayout | None:
    """Parse the header of ``path`` (its first record); None for a file with no record at all."""
    with path.open("rb") as handle:
        stream = RecordStream(handle, block_size=1 << 16)
        for item in stream:
            return _layout(item, spec, source)
    return None


def estimated_records(path: Path, sample_bytes: int = 1 << 20) -> int:
    """About how many records ``path`` holds: its size over the mean length of the lines of its first
    ``sample_bytes`` (exact line count for a file no larger)."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        sample = handle.read(sample_bytes)
    lines = sample.count(b"\n") or sample.count(b"\r")
    if len(sample) >= size:
        return lines + (1 if sample and not sample.endswith((b"\n", b"\r")) else 0)
    return round(size * max(lines, 1) / len(sample))


def count_empty_lines(path: Path) -> int:
    """The empty lines of a file (for a file with no record, which has no layout)."""
    with path.open("rb") as handle:
        stream = RecordStream(handle, block_size=1 << 20)
        for _ in stream:
            pass
    return stream.empty_lines


def _header(item: Span | LongRecord, source: str) -> tuple[list[str], int]:
    """The header's fields and line."""
    if isinstance(item, LongRecord):
        why = "opens a quote that is never closed" if item.open_quote else "is longer than 64 MiB"
        raise InputFileError(f"{source} line {item.line}: the header {why}")
    line = int(item.lines[0])
    try:
        text = item.text(0).decode("utf-8")
    except UnicodeDecodeError as error:
        raise InputFileError(f"{source} is not UTF-8 text (line {line}, the header)") from error
    return _fields(text), line


def _fields(record: str) -> list[str]:
    """The fields of one record's text, as ``csv`` reads them (a NUL is text, as on Python 3.11+)."""
    # Python 3.9's csv refuses NUL ("line contains NUL"); U+FFFF is a noncharacter no text holds.
    if "\0" in record:
        return [field.replace("\uffff", "\0") for field in next(csv.reader([record.replace("\0", "\uffff")]))]
    return next(csv.reader([record]), [""])


def _layout(item: Span | LongRecord, spec: TableSpec, source: str) -> FileLayout:
    header, line = _header(item, source)
    names = [name.strip() for name in header]
    if len(header) == 1:
        for delimiter, plural in _DELIMITERS.items():
            if delimiter in header[0]:
                raise InputFileError(
                    f"{source} line {line}: the header is a single field {_shown(names[0])}; "
                    f"the file seems to be separated by {plural}, and only commas separate fields"
                )
    positions: dict[str, int] = {}
    by_case: dict[str, str] = {}
    columns = set(spec.column_names)
    folded = {column.casefold(): column for column in spec.column_names}

    def place(column: str, index: int) -> None:
        if column in positions:
            raise InputFileError(
                f"{source} line {line}: the header names column {column!r} twice "
                f"(fields {positions[column] + 1} and {index + 1})"
            )
        positions[column] = index

    for index, name in enumerate(names):
        if name in columns:
            place(name, index)
    for index, name in enumerate(names):
        column = folded.get(name.casefold())
        if column is not None and name not in columns:
            place(column, index)
            by_case[name] = column
    missing = [name for name in spec.column_names if name not in positions]
    taken = set(positions.values())
    extra = [name for index, name in enumerate(names) if index not in taken]
    return FileLayout(
        positions=positions,
        missing=missing,
        extra=extra[:EXTRA_NAMES_NOTED],
        field_count=len(names),
        header_line=line,
        extra_count=len(extra),
        matched_by_case=by_case,
    )


def _shown(text: str, limit: int = 60) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


def read_chunks(
    path: Path,
    spec: TableSpec,
    source: str,
    layout: FileLayout,
    *,
    block_size: int = BLOCK_SIZE,
    stats: ReadStats | None = None,
    expected_digest: str | None = None,
) -> Iterator[RawChunk]:
    """Stream ``path`` as chunks of original text, one column per table column.

    Values keep their original text (untrimmed, empty as ``""``); a column the file lacks is null.
    Each record carries ``_source_file`` and ``_source_line`` (the physical line where it starts).
    With ``expected_digest`` (SHA-256), the bytes read must be those: else the file changed while it
    was read, and the last step of the iteration raises before anything read can be committed.
    """
    stats = stats if stats is not None else ReadStats()
    with path.open("rb") as handle:
        stream = RecordStream(handle, block_size=block_size, hashed=expected_digest is not None)
        header_seen = False
        for item in stream:
            if not header_seen:
                header_seen = True
                _header(item, source)  # the header itself; read_layout judged it
                assert isinstance(item, Span)
                item = Span(
                    item.data, item.base, item.starts[1:], item.ends[1:], item.lines[1:], item.empty_lines
                )
                if not item.starts.size:
                    continue
            chunk = (
                _long_record(item, spec, source, stats)
                if isinstance(item, LongRecord)
                else _parse_span(item, spec, source, layout, stats)
            )
            stats.bytes_read = handle.tell()
            yield chunk
        stats.empty_lines = stream.empty_lines
        stats.digest = stream.digest
    if expected_digest is not None and stream.digest != expected_digest:
        raise InputFileError(
            f"{source} changed while it was read (its content is not the batch's any more); "
            "nothing of it was written"
        )


def _csv_options(
    layout: FileLayout, spec: TableSpec, *, block_size: int, on_invalid_row: Callable[[Any], str]
) -> dict[str, Any]:
    """How the fields of records are parsed: RFC 4180, all text, only the table's columns materialised."""
    names = [f"f{i}" for i in range(layout.field_count)]
    wanted = [f"f{layout.positions[name]}" for name in spec.column_names if name in layout.positions]
    return {
        "read_options": pacsv.ReadOptions(
            column_names=names,
            block_size=block_size,
            # Single-threaded parsing is what numbers malformed rows; files are read two at a time.
            use_threads=False,
        ),
        "parse_options": pacsv.ParseOptions(
            newlines_in_values=True, ignore_empty_lines=True, invalid_row_handler=on_invalid_row
        ),
        "convert_options": pacsv.ConvertOptions(
            column_types={name: pa.string() for name in wanted},
            include_columns=wanted,
            strings_can_be_null=False,
            quoted_strings_can_be_null=False,
            # The bytes were checked before (``_check_utf8``): one scan proves most text is ASCII.
            check_utf8=False,
        ),
    }


def _parse_fields(
    data: bytes | memoryview, layout: FileLayout, spec: TableSpec
) -> tuple[pa.Table, list[int]]:
    """The well-formed records of ``data`` parsed, and the (0-based) indexes of the malformed ones."""
    invalid: list[int] = []

    def on_invalid_row(row: Any) -> str:
        if row.number is None:
            raise LakehouseError("the CSV parser could not number a malformed record")
        invalid.append(row.number - 1)
        return "skip"

    options = _csv_options(layout, spec, block_size=PARSE_BLOCK, on_invalid_row=on_invalid_row)
    table = pacsv.read_csv(pa.BufferReader(pa.py_buffer(data)), **options)
    return table, invalid


def _parse_span(span: Span, spec: TableSpec, source: str, layout: FileLayout, stats: ReadStats) -> RawChunk:
    """The records of one span: well-formed ones as text per column, the others with their whole text."""
    count = span.starts.size
    first, last = int(span.starts[0]) - span.base, int(span.ends[-1]) - span.base
    _check_utf8(span, first, last, source, layout)
    fields: bytes | memoryview = memoryview(span.data)[first:last]
    if span.data.startswith(BOM, first):
        # pyarrow drops a BOM at the start of what it parses: here it is a record's text.
        fields = b"\n" + bytes(fields)
    try:
        table, invalid = _parse_fields(fields, layout, spec)
    except pa.ArrowInvalid as error:
        raise InputFileError(
            f"{source} near line {int(span.lines[0])} cannot be parsed as CSV: {_first_line(error)}"
        ) from error
    bad = np.zeros(count, dtype=bool)
    bad[np.array(invalid, dtype=np.int64)] = True
    if table.num_rows + len(invalid) != count or int(bad.sum()) != len(invalid):
        raise LakehouseError(
            f"{source} near line {int(span.lines[0])}: the CSV parser found {table.num_rows + len(invalid)} "
            f"records where the record scan found {count}; refusing to guess"
        )
    sizes = span.ends - span.starts
    too_long = sizes > MAX_RECORD_BYTES
    if too_long.any():  # malformed whatever its fields say, like a record too long for one window
        table = table.filter(pa.array(~too_long[~bad]))
        bad |= too_long
    frame = _as_frame(table) if table.num_rows else pl.DataFrame()
    records = _shaped(frame, spec, layout, source, span.lines[~bad])
    texts = []
    for index in np.flatnonzero(bad):
        texts.append(_kept_text(span.text(int(index))))
        if sizes[index] > RAW_LIMIT:
            stats.notes.append(
                f"{source} line {int(span.lines[index])}: a malformed record of {int(sizes[index]):,} bytes; "
                f"raw_record keeps its first {RAW_LIMIT:,}"
            )
    return RawChunk(records, _malformed(source, span.lines[bad].tolist(), texts))


def _shaped(
    fields: pl.DataFrame, spec: TableSpec, layout: FileLayout, source: str, lines: np.ndarray
) -> pl.DataFrame:
    if not lines.size:
        return _empty_records(spec)
    if not layout.positions:  # the header names no table column: only the lines say what was read
        return pl.DataFrame({SOURCE_LINE: lines}).select(
            *(pl.lit(None, pl.String).alias(name) for name in spec.column_names),
            pl.lit(source, pl.String).alias(SOURCE_FILE),
            pl.col(SOURCE_LINE).cast(pl.Int64),
        )
    columns: list[pl.Expr | pl.Series] = [
        (
            fields.get_column(f"f{layout.positions[name]}")
            if name in layout.positions
            else pl.lit(None, pl.String)
        ).alias(name)
        for name in spec.column_names
    ]
    source_columns: list[pl.Expr | pl.Series] = [
        pl.lit(source, pl.String).alias(SOURCE_FILE),
        pl.Series(SOURCE_LINE, lines, pl.Int64),
    ]
    return fields.select(*columns, *source_columns)


def _malformed(source: str, lines: list[int], texts: list[str]) -> pl.DataFrame:
    return pl.DataFrame(
        {SOURCE_FILE: [source] * len(lines), SOURCE_LINE: lines, RAW_RECORD: texts},
        schema={SOURCE_FILE: pl.String, SOURCE_LINE: pl.Int64, RAW_RECORD: pl.String},
    )


def _kept_text(raw: bytes) -> str:
    """A malformed record's text (checked UTF-8 already), its first RAW_LIMIT bytes at most."""
    return raw[:RAW_LIMIT].decode("utf-8", errors="ignore") if len(raw) > RAW_LIMIT else raw.decode("utf-8")


def _long_record(record: LongRecord, spec: TableSpec, source: str, stats: ReadStats) -> RawChunk:
    """A record whose quote never closes, or that is too long: malformed, with its first bytes kept."""
    text = record.text
    try:
        decoded = text.decode("utf-8")
    except UnicodeDecodeError as error:
        # The kept part may end inside a character; anything else is not UTF-8.
        if record.size == len(text) or error.start < len(text) - 3:
            line = record.line + len(_LINE_BREAK.findall(text[: error.start]))
            bad = text[error.start : error.end]
            raise InputFileError(f"{source} is not UTF-8 text (line {line}, bytes {bad!r})") from error
        decoded = text[: error.start].decode("utf-8")
    why = "opens a quote that is never closed" if record.open_quote else "is too long to be a row"
    if record.size > len(text):
        stats.notes.append(
            f"{source} line {record.line}: a record of {record.size:,} bytes {why}; "
            f"raw_record keeps its first {len(decoded.encode()):,}"
        )
    elif record.open_quote:
        stats.notes.append(f"{source} line {record.line}: a record {why} (it runs to the end of the file)")
    return RawChunk(_empty_records(spec), _malformed(source, [record.line], [decoded]))


def _check_utf8(span: Span, first: int, last: int, source: str, layout: FileLayout) -> None:
    """Raise naming the line, column and bytes where ``span.data[first:last]`` is not UTF-8."""
    if last <= first:
        return
    data = np.frombuffer(span.data, dtype=np.uint8, count=last - first, offset=first)
    if int(data.max()) < 0x80:
        return
    try:
        span.data[first:last].decode("utf-8")
        return
    except UnicodeDecodeError as error:
        at = span.base + first + error.start
        bad = bytes(span.data[first + error.start : first + error.end])
    index = int(np.searchsorted(span.starts, at, side="right")) - 1
    start = int(span.starts[index])
    before = span.data[start - span.base : at - span.base]
    line = int(span.lines[index]) + len(_LINE_BREAK.findall(before))
    field_index = len(_fields(before.decode("utf-8", errors="replace"))) - 1
    names = {position: name for name, position in layout.positions.items()}
    column = names.get(field_index, f"field {field_index + 1}")
    raise InputFileError(f"{source} is not UTF-8 text (line {line}, column {column}, bytes {bad!r})")


def records_at_lines(
    path: Path, spec: TableSpec, source: str, layout: FileLayout, lines: pl.Series
) -> pl.DataFrame | None:
    """The original text of the records that start at physical ``lines`` of ``path``.

    The file's records are found again by the same scan as ``read_chunks``, but only the wanted
    ones are parsed, all at once. Returns None when a line starts no well-formed record.
    """
    wanted = np.unique(lines.cast(pl.Int64).to_numpy())
    if not wanted.size:
        return _empty_records(spec)
    texts: list[bytes] = []
    found: list[np.ndarray] = []
    with path.open("rb") as handle:
        for item in RecordStream(handle, block_size=BLOCK_SIZE):
            if isinstance(item, LongRecord):
                if _among(np.array([item.line]), wanted).any():
                    return None
                continue
            hit = np.flatnonzero(_among(item.lines, wanted))
            texts += [item.text(int(i)) for i in hit]
            found.append(item.lines[hit])
    at = np.concatenate(found) if found else np.zeros(0, dtype=np.int64)
    if not np.array_equal(at, wanted):
        return None
    # A leading line break: pyarrow would take a BOM at the start for the file's own.
    data = b"\n" + b"\n".join(texts)
    try:
        table, invalid = _parse_fields(data, layout, spec)
    except pa.ArrowInvalid:
        return None
    if invalid or table.num_rows != len(texts):
        return None
    return _shaped(pl.DataFrame(table), spec, layout, source, wanted)


def _among(values: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """Whether each of ``values`` is in the sorted ``wanted`` (a binary search; ``np.isin`` sorts both)."""
    at = np.minimum(np.searchsorted(wanted, values), wanted.size - 1)
    return wanted[at] == values


def prefetched(
    streams: Sequence[Iterator[T]], *, readers: int = 2, depth: int = 2
) -> Iterator[tuple[int, T]]:
    """Iterate ``streams`` on background threads, ``readers`` streams at a time, as (stream index, item).

    pyarrow parses with the GIL released: the caller's Polars work and the parsing of up to ``readers``
    files share the cores. Items of different streams interleave; each stream's stay in order.
    """
    done = object()
    queue: Queue[object] = Queue(maxsize=depth * readers)
    stop = threading.Event()
    pending = iter(range(len(streams)))
    claim = threading.Lock()

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                queue.put(item, timeout=0.1)
                return True
            except Full:
                continue
        return False

    def produce() -> None:
        try:
            while True:
                with claim:
                    index = next(pending, None)
                if index is None:
                    break
                for item in streams[index]:
                    if not put((index, item)):
                        return
            put(done)
        except BaseException as error:  # handed to the consumer, which re-raises it
            put(error)

    workers = [
        threading.Thread(target=produce, name=f"csv-reader-{n}", daemon=True)
        for n in range(max(1, min(readers, len(streams))))
    ]
    for worker in workers:
        worker.start()
    finished = 0
    try:
        while finished < len(workers):
            item = queue.get()
            if item is done:
                finished += 1
                continue
            if isinstance(item, BaseException):
                raise item
            yield item  # type: ignore[misc]
    finally:
        stop.set()
        for worker in workers:
            while worker.is_alive():
                try:
                    queue.get_nowait()
                except Empty:
                    worker.join(timeout=0.1)


def _as_frame(table: pa.Table) -> pl.DataFrame:
    """The parsed fields as a Polars frame without copying their text.

    Polars holds strings as views; Arrow's cast to views points into the parsed text instead of
    the conversion ``from_arrow`` makes of a plain string column (per 5 M-row file: 0.5 instead of
    0.6-1.1 CPU s and a tenth of the page faults). Rows kept past their block must be ``detached``.
    """
    if _SAFE_VIEW_CASTS:
        views = [column.cast(pa.string_view()) for column in table.columns]
        table = pa.Table.from_arrays(views, names=table.schema.names)
    frame = pl.from_arrow(table)
    assert isinstance(frame, pl.DataFrame)
    return frame


def detached(frame: pl.DataFrame) -> pl.DataFrame:
    """``frame`` with its text copied out of the blocks it was read from.

    Text read by ``read_chunks`` is views into the block's buffers: a few rows kept from a block
    would keep the whole block alive. Arrow's oldest format has no views, so the export copies
    just these rows' text.
    """
    text = [name for name, dtype in frame.schema.items() if dtype == pl.String]
    if not text or not frame.height:
        return frame
    copied = pl.DataFrame(frame.select(text).to_arrow(compat_level=pl.CompatLevel.oldest()))
    return frame.with_columns(copied)


def _empty_records(spec: TableSpec) -> pl.DataFrame:
    schema: dict[str, Any] = {name: pl.String for name in spec.column_names}
    schema.update({SOURCE_FILE: pl.String, SOURCE_LINE: pl.Int64})
    return pl.DataFrame(schema=schema)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
