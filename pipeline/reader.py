"""Read one raw CSV file into frames of original text, keeping every record and its line number.

pyarrow's streaming CSV reader parses RFC 4180 (quotes, CRLF, newlines in quoted values) block by
block. A record whose field count differs from the header's is handed to a callback with its exact
text and physical line number; those become ``malformed_row`` rejections, never shifted or cut.
"""

from __future__ import annotations

import csv
import io
import mmap
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

from pipeline.errors import InputFileError
from pipeline.specs import TableSpec

SOURCE_FILE = "_source_file"
SOURCE_LINE = "_source_line"
RAW_RECORD = "_raw_record"
T = TypeVar("T")

# Large blocks amortise per-batch work; one block is the unit of memory for the raw text.
BLOCK_SIZE = 32 << 20
# Before pyarrow 25 a cast to string_view whose values are all inline leaves a null buffer slot that
# crashes the export to Polars (apache/arrow#49740; reproduced here with pyarrow 21 and 24).
_SAFE_VIEW_CASTS = int(pa.__version__.split(".")[0]) >= 25


@dataclass
class FileLayout:
    """What the header of one file says: where each table column is, and what is missing or extra."""

    positions: dict[str, int]
    missing: list[str]
    extra: list[str]
    field_count: int
    header_lines: int


@dataclass
class RawChunk:
    """One block of a file: well-formed records as text, and the malformed ones."""

    records: pl.DataFrame
    malformed: pl.DataFrame


@dataclass
class _Cursor:
    """Where the reader is: the next record's number (pyarrow's count, header = 1) and physical line."""

    record: int
    line: int
    pending_records: list[int] = field(default_factory=list)
    pending_texts: list[str] = field(default_factory=list)


def read_layout(path: Path, spec: TableSpec, source: str) -> FileLayout | None:
    """Parse the header of ``path``; None for an empty file (no header, no rows)."""
    # Only the header's own lines are decoded here: bad bytes further on are read_chunks' to report.
    with path.open("rb") as handle:
        raw = handle.readline()
        while raw.count(b'"') % 2:  # a quoted name holding a line break
            more = handle.readline()
            if not more:
                break
            raw += more
    try:
        header = next(csv.reader(io.StringIO(raw.decode("utf-8-sig"), newline="")), None)
    except UnicodeDecodeError as error:
        line = 1 + raw[: error.start].count(b"\n")
        raise InputFileError(f"{source} is not UTF-8 text (line {line}, the header)") from error
    if header is None:
        return None
    names = [name.strip() for name in header]
    positions: dict[str, int] = {}
    for index, name in enumerate(names):
        if name in spec.column_names:
            if name in positions:
                raise InputFileError(f"{source} line 1: the header names column {name!r} twice")
            positions[name] = index
    missing = [name for name in spec.column_names if name not in positions]
    extra = [name for name in names if name not in spec.column_names]
    header_lines = 1 + sum(name.count("\n") for name in header)
    return FileLayout(positions, missing, extra, len(names), header_lines)


def read_chunks(
    path: Path, spec: TableSpec, source: str, layout: FileLayout, *, block_size: int = BLOCK_SIZE
) -> Iterator[RawChunk]:
    """Stream ``path`` as chunks of original text, one column per table column.

    Values keep their original text (untrimmed, empty as ``""``); a column the file lacks is null.
    Each record carries ``_source_file`` and ``_source_line`` (its first physical line, the header
    being line 1).
    """
    cursor = _Cursor(record=2, line=layout.header_lines + 1)

    def on_invalid_row(row: pacsv.InvalidRow) -> str:
        # pyarrow numbers rows (records), counting the header as 1, and may report a row of the
        # block it parses ahead before it yields the current one: _place_rows sorts that out.
        if row.number is None:
            raise InputFileError(f"{source}: a malformed record could not be located")
        cursor.pending_records.append(row.number)
        cursor.pending_texts.append(row.text)
        return "skip"

    try:
        reader = pacsv.open_csv(
            path, **_csv_options(layout, skip_rows=1, block_size=block_size, on_invalid_row=on_invalid_row)
        )
        for batch in reader:
            if not _is_utf8(batch):
                raise _not_utf8(path, source, layout) or InputFileError(f"{source} is not UTF-8 text")
            spans_lines = _has_newline(batch)
            chunk = _place_rows(_as_frame(batch), cursor, spec, layout, source, spans_lines)
            if chunk is not None:
                yield chunk
        tail = _place_rows(pl.DataFrame(), cursor, spec, layout, source)
        if tail is not None:
            yield tail
    except (pa.ArrowInvalid, UnicodeDecodeError) as error:
        # pyarrow cannot hand a malformed record that is not UTF-8 to the handler: say what is wrong.
        not_utf8 = _not_utf8(path, source, layout)
        if not_utf8 is not None:
            raise not_utf8 from error
        raise InputFileError(f"{source} cannot be parsed as CSV: {_first_line(error)}") from error


def _csv_options(
    layout: FileLayout,
    *,
    skip_rows: int,
    block_size: int,
    on_invalid_row: Callable[[pacsv.InvalidRow], str] | None = None,
) -> dict[str, Any]:
    """How every record is parsed, in a whole file and in records cut out of it: RFC 4180, all text."""
    names = [f"f{i}" for i in range(layout.field_count)]
    return {
        "read_options": pacsv.ReadOptions(
            skip_rows=skip_rows,
            column_names=names,
            block_size=block_size,
            # Single-threaded parsing is what numbers malformed rows, and the streaming reader is
            # as fast with it (measured: 1.0 s vs 1.3 s for 5 M rows).
            use_threads=False,
        ),
        "parse_options": pacsv.ParseOptions(
            newlines_in_values=True, ignore_empty_lines=False, invalid_row_handler=on_invalid_row
        ),
        "convert_options": pacsv.ConvertOptions(
            column_types={name: pa.string() for name in names},
            strings_can_be_null=False,
            quoted_strings_can_be_null=False,
            # ``read_chunks`` checks each block itself (``_is_utf8``): most text is ASCII, which one
            # scan of the block's bytes proves (0.2-0.4 CPU s less per 5 M-row file).
            check_utf8=False,
        ),
    }


def _is_utf8(batch: pa.RecordBatch) -> bool:
    """Whether every value of the block is UTF-8: ASCII bytes are, others are checked value by value."""
    for column in batch.columns:
        buffers = column.buffers()
        data = buffers[2] if len(buffers) > 2 else None
        if data is None or not data.size or int(np.frombuffer(data, dtype=np.uint8).max()) < 0x80:
            continue
        try:
            column.validate(full=True)
        except pa.ArrowInvalid:
            return False
    return True


def _not_utf8(path: Path, source: str, layout: FileLayout) -> InputFileError | None:
    """The error naming the first line of ``path`` that is not UTF-8, its column and bytes (None: none)."""
    with path.open("rb") as handle:
        for number, line in enumerate(handle, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as error:
                before = line[: error.start].decode("utf-8", errors="replace")
                field = len(next(csv.reader([before]), [""])) - 1
                names = {position: name for name, position in layout.positions.items()}
                column = names.get(field, f"field {field + 1}")
                bad = line[error.start : error.end]
                return InputFileError(
                    f"{source} is not UTF-8 text (line {number}, column {column}, bytes {bad!r})"
                )
    return None


def _as_frame(batch: pa.RecordBatch) -> pl.DataFrame:
    """The block as a Polars frame without copying its text.

    Polars holds strings as views; Arrow's cast to views points into the block's text instead of
    the conversion ``from_arrow`` makes of a plain string column (per 5 M-row file: 0.5 instead of
    0.6-1.1 CPU s and a tenth of the page faults). Rows kept past their block must be ``detached``.
    """
    if _SAFE_VIEW_CASTS:
        views = [column.cast(pa.string_view()) for column in batch.columns]
        batch = pa.RecordBatch.from_arrays(views, names=batch.schema.names)
    frame = pl.from_arrow(batch)
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


def _has_newline(batch: pa.RecordBatch) -> bool:
    """Whether any value of the block may hold a line break (one scan of its string bytes)."""
    for column in batch.columns:
        buffers = column.buffers()
        data = buffers[2] if len(buffers) > 2 else None
        if data is not None and data.size and bool((np.frombuffer(data, dtype=np.uint8) == 10).any()):
            return True
    return False


def _place_rows(
    fields: pl.DataFrame,
    cursor: _Cursor,
    spec: TableSpec,
    layout: FileLayout,
    source: str,
    spans_lines: bool = True,
) -> RawChunk | None:
    """Give one block's well-formed records and the malformed ones among them their physical lines.

    ``spans_lines=False`` says no value holds a line break, so every well-formed record is one line.
    """
    n = fields.height
    order = np.argsort(np.array(cursor.pending_records, dtype=np.int64), kind="stable")
    records = np.array(cursor.pending_records, dtype=np.int64)[order]
    texts = [cursor.pending_texts[i] for i in order]
    # The j-th malformed record has (record - first record - j) well-formed records before it.
    valid_before = records - cursor.record - np.arange(records.size)
    is_last_batch = n == 0
    take = records.size if is_last_batch else int(np.searchsorted(valid_before, n, side="right"))
    cursor.pending_records = records[take:].tolist()
    cursor.pending_texts = texts[take:]
    valid_before, texts = valid_before[:take], texts[:take]
    if n == 0 and take == 0:
        return None

    spans = np.ones(n, dtype=np.int64)
    if n and fields.width and spans_lines:
        newlines = fields.select(pl.sum_horizontal(pl.all().str.count_matches("\n", literal=True)))
        spans += newlines.to_series().to_numpy().astype(np.int64)
    before = np.concatenate(([0], np.cumsum(spans)))  # valid lines before valid record i
    bad_spans = np.array([1 + text.count("\n") for text in texts], dtype=np.int64)
    bad_before = np.concatenate(([0], np.cumsum(bad_spans)))
    shift = np.cumsum(np.bincount(valid_before, weights=bad_spans, minlength=n + 1))[:n].astype(np.int64)
    lines = cursor.line + before[:n] + shift
    bad_lines = cursor.line + before[valid_before] + bad_before[:-1]
    cursor.line += int(before[-1] + bad_before[-1])
    cursor.record += n + take

    columns = [
        (
            fields.get_column(f"f{layout.positions[name]}")
            if name in layout.positions
            else pl.lit(None, pl.String)
        ).alias(name)
        for name in spec.column_names
    ]
    shaped = (
        fields.select(
            *columns, pl.lit(source, pl.String).alias(SOURCE_FILE), pl.Series(SOURCE_LINE, lines, pl.Int64)
        )
        if n
        else _empty_records(spec)
    )
    malformed = pl.DataFrame(
        {SOURCE_FILE: [source] * take, SOURCE_LINE: bad_lines.tolist(), RAW_RECORD: texts},
        schema={SOURCE_FILE: pl.String, SOURCE_LINE: pl.Int64, RAW_RECORD: pl.String},
    )
    return RawChunk(shaped, malformed)


def records_at_lines(
    path: Path, spec: TableSpec, source: str, layout: FileLayout, lines: pl.Series
) -> pl.DataFrame | None:
    """The original text of the records that start at physical ``lines`` of ``path``, cut out directly.

    Finds the lines' byte offsets with one vectorised pass over the file and parses just those
    records (as ``read_chunks`` shapes them), instead of parsing the whole file again. Returns None
    when a record does not split into the header's field count or a line is past the end of the file:
    the caller then reads the file again.
    """
    wanted = np.unique(lines.cast(pl.Int64).to_numpy())
    if not wanted.size:
        return _empty_records(spec)
    with path.open("rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
        cut = _cut_lines(data, wanted)
        if cut is None:
            return None
        starts, pieces = cut
        for index, piece in enumerate(pieces):
            # A quote left open: the record goes on over the next lines.
            if piece.count(b'"') % 2:
                end = _record_end(data, int(starts[index]))
                if end is None:
                    return None
                pieces[index] = data[int(starts[index]) : end]
    # One parse of all the cut-out records (each ends with its quotes closed), by the reader's rules.
    text = b"\n".join(pieces)
    try:
        table = pacsv.read_csv(
            pa.BufferReader(text), **_csv_options(layout, skip_rows=0, block_size=len(text) + 1)
        )
    except pa.ArrowInvalid:  # a record with more or fewer fields than the header
        return None
    if table.num_rows != len(pieces):
        return None
    fields = pl.DataFrame(table)
    return fields.select(
        *(
            (
                fields.get_column(f"f{layout.positions[name]}")
                if name in layout.positions
                else pl.lit(None, pl.String)
            ).alias(name)
            for name in spec.column_names
        ),
        pl.lit(source, pl.String).alias(SOURCE_FILE),
        pl.Series(SOURCE_LINE, wanted, pl.Int64),
    )


_SCAN_BLOCK = 64 << 20


def _cut_lines(data: mmap.mmap, lines: np.ndarray) -> tuple[np.ndarray, list[bytes]] | None:
    """The start offsets and bytes (up to the line break) of the sorted physical ``lines`` (1-based).

    None when a line is past the end of the file. One vectorised pass finds the line breaks; each
    block's pages are released once its lines are cut, so the scan does not hold the file in memory.
    """
    # Line L starts right after the (L-1)-th line break and ends at the L-th.
    targets = lines - 1
    starts = np.full(targets.size, -1, dtype=np.int64)
    ends = np.full(targets.size, len(data), dtype=np.int64)
    starts[targets == 0] = 0
    pieces: list[bytes] = []
    seen = 0
    started = int(np.searchsorted(targets, 0, side="right"))
    for block_start in range(0, len(data), _SCAN_BLOCK):
        if len(pieces) == targets.size:
            break
        count = min(_SCAN_BLOCK, len(data) - block_start)
        newlines = np.flatnonzero(np.frombuffer(data, dtype=np.uint8, count=count, offset=block_start) == 10)
        total = seen + newlines.size
        upto = int(np.searchsorted(targets, total, side="right"))
        starts[started:upto] = block_start + newlines[targets[started:upto] - seen - 1] + 1
        ended = int(np.searchsorted(targets, total - 1, side="right"))
        done = len(pieces)
        ends[done:ended] = block_start + newlines[targets[done:ended] - seen]
        pieces.extend(data[s:e] for s, e in zip(starts[done:ended].tolist(), ends[done:ended].tolist()))
        started, seen = upto, total
        # The view into the map must be gone before the map can be closed.
        del newlines
        if hasattr(mmap, "MADV_DONTNEED"):
            aligned = block_start - block_start % mmap.PAGESIZE
            data.madvise(mmap.MADV_DONTNEED, aligned, count + block_start - aligned)
    if (starts < 0).any():
        return None
    # Lines after the last line break (a file that does not end with one).
    done = len(pieces)
    pieces.extend(data[s : len(data)] for s in starts[done:].tolist())
    return starts, pieces


def _record_end(data: mmap.mmap, start: int) -> int | None:
    """The end (exclusive, at its line break) of the record at ``start``: where its quotes balance."""
    end, quotes = start, 0
    while True:
        newline = data.find(b"\n", end)
        stop = len(data) if newline < 0 else newline
        quotes += data[end:stop].count(b'"')
        if quotes % 2 == 0:
            return stop
        if newline < 0:
            return None
        end = newline + 1


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


def _empty_records(spec: TableSpec) -> pl.DataFrame:
    schema: dict[str, Any] = {name: pl.String for name in spec.column_names}
    schema.update({SOURCE_FILE: pl.String, SOURCE_LINE: pl.Int64})
    return pl.DataFrame(schema=schema)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
