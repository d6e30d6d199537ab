"""An independent plain-Python model of the pipeline's data contract, for differential tests.

It shares no code with ``pipeline/``: it reads the CSV bytes with its own scanner (a transcription of
CPython's ``_csv`` reader state machine for the excel dialect, so it behaves the same on every Python
version, with no field-size limit and with NUL as an ordinary character), validates every value, then
applies the batch rules (duplicates, winners, references, stale rows) to a dict-based "lake".

Entry point: :func:`run_batch`. Lower-level pieces (:func:`read_records`, :func:`parse_file`,
:func:`validate_row`) are public so tests can check one step at a time.
"""

from __future__ import annotations

import copy
import hashlib
import math
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import date, datetime, timezone
from typing import Any, Callable

# --------------------------------------------------------------------------------------------- schema

TABLES: tuple[str, ...] = ("products", "orders", "order_items")

#: Per table, its columns in order with their types (int, double, string, timestamp, date).
SCHEMAS: dict[str, tuple[tuple[str, str], ...]] = {
    "products": (
        ("product_id", "int"),
        ("department_id", "int"),
        ("department", "string"),
        ("product_name", "string"),
    ),
    "orders": (
        ("order_num", "int"),
        ("order_id", "int"),
        ("user_id", "int"),
        ("order_timestamp", "timestamp"),
        ("total_amount", "double"),
        ("date", "date"),
    ),
    "order_items": (
        ("id", "int"),
        ("order_id", "int"),
        ("user_id", "int"),
        ("days_since_prior_order", "int"),
        ("product_id", "int"),
        ("add_to_cart_order", "int"),
        ("reordered", "int"),
        ("order_timestamp", "timestamp"),
        ("date", "date"),
    ),
}
COLUMNS: dict[str, tuple[str, ...]] = {t: tuple(c for c, _ in cols) for t, cols in SCHEMAS.items()}
KEYS: dict[str, str] = {"products": "product_id", "orders": "order_id", "order_items": "id"}
#: The ordering column of a table (None: the later row of the batch wins, no stale check).
ORDERING: dict[str, str | None] = {
    "products": None,
    "orders": "order_timestamp",
    "order_items": "order_timestamp",
}
NULLABLE: dict[str, tuple[str, ...]] = {
    "products": (),
    "orders": (),
    "order_items": ("days_since_prior_order",),
}


def _not_positive(v: Any) -> bool:
    return bool(v <= 0)


#: Per table, per column: a predicate that is True when a parsed value is out of range.
OUT_OF_RANGE: dict[str, dict[str, Callable[[Any], bool]]] = {
    "products": {"product_id": _not_positive, "department_id": _not_positive},
    "orders": {
        "order_num": _not_positive,
        "order_id": _not_positive,
        "user_id": _not_positive,
        "total_amount": lambda v: bool(v < 0),
    },
    "order_items": {
        "id": _not_positive,
        "order_id": _not_positive,
        "user_id": _not_positive,
        "product_id": _not_positive,
        "add_to_cart_order": lambda v: bool(v < 1),
        "reordered": lambda v: v not in (0, 1),
        "days_since_prior_order": lambda v: bool(v < 0),
    },
}

Row = dict[str, Any]

# ---------------------------------------------------------------------------------------------- types


class ReferenceFileError(Exception):
    """A file-level error: the whole batch is aborted."""

    def __init__(self, message: str, source_file: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.source_file = source_file


def _empty_tables() -> dict[str, dict[int, Row]]:
    return {t: {} for t in TABLES}


@dataclass
class Lake:
    """The lakehouse: per table, key -> row of typed values (all columns), and every rejected row."""

    tables: dict[str, dict[int, Row]] = field(default_factory=_empty_tables)
    rejected: list[Row] = field(default_factory=list)

    def table(self, name: str) -> dict[int, Row]:
        return self.tables.setdefault(name, {})


@dataclass
class TableCounts:
    rows_in: int = 0
    inserted: int = 0
    updated: int = 0
    unchanged: int = 0
    rejected: int = 0
    rejected_by_reason: Counter[str] = field(default_factory=Counter)
    empty_lines: int = 0


@dataclass
class BatchResult:
    lake: Lake
    counts: dict[str, TableCounts]
    #: Source keys of the files skipped because their content was already loaded.
    skipped_files: list[str]
    #: sha256 hex digests of every file loaded so far (the input set plus every file of this batch).
    loaded_contents: set[str]
    #: The rows this batch rejected (also appended to ``lake.rejected``), in table then batch order.
    rejected: list[Row] = field(default_factory=list)


@dataclass(frozen=True)
class Record:
    """One CSV record as the excel-dialect reader yields it."""

    #: Physical line (1-based) where the record starts.
    line: int
    fields: tuple[str, ...]
    #: The record's text, without its terminating line break (to the end of the file if unterminated).
    raw: str
    #: True when a quoted field is still open at the end of the file.
    unterminated: bool = False


@dataclass
class ParsedFile:
    """A file read into records: the header (or None if the file has no record) and the data records."""

    header: Record | None
    records: list[Record]
    empty_lines: int


# ------------------------------------------------------------------------------------------- scanning

_LINE_BREAK = re.compile(r"\r\n|\r|\n")
_BOM = b"\xef\xbb\xbf"

(_START_RECORD, _START_FIELD, _IN_FIELD, _IN_QUOTED, _QUOTE_IN_QUOTED, _EAT_CRNL) = range(6)


def _physical_lines(text: str) -> Iterator[tuple[int, int, int]]:
    """(start, content end, end) of each line, split as ``io.StringIO(text, newline="")`` splits them."""
    pos = 0
    for m in _LINE_BREAK.finditer(text):
        yield pos, m.start(), m.end()
        pos = m.end()
    if pos < len(text):
        yield pos, len(text), len(text)


def read_records(text: str) -> tuple[list[Record], int]:
    """Every non-empty record of ``text`` and the number of empty lines.

    Same records as ``csv.reader(io.StringIO(text, newline=""))`` (excel dialect, non-strict) minus its
    ``[]`` for empty lines; a record whose quoted field is open at the end of the text is flagged.
    """
    records: list[Record] = []
    empty = 0
    state = _START_RECORD
    fields: list[str] = []
    buf: list[str] = []
    rec_start = 0
    rec_line = 0
    line_no = 0
    for start, content_end, end in _physical_lines(text):
        line_no += 1
        if state == _START_RECORD:
            rec_start, rec_line = start, line_no
            fields, buf = [], []
            if content_end == start:
                empty += 1
                continue
            content = text[start:content_end]
            if '"' not in content:
                records.append(Record(line_no, tuple(content.split(",")), content))
                continue
            state = _START_FIELD
        for ch in text[start:end]:
            if state == _START_FIELD:
                if ch in "\r\n":
                    fields.append("")
                    state = _EAT_CRNL
                elif ch == '"':
                    state = _IN_QUOTED
                elif ch == ",":
                    fields.append("")
                else:
                    buf.append(ch)
                    state = _IN_FIELD
            elif state == _IN_FIELD:
                if ch in "\r\n" or ch == ",":
                    fields.append("".join(buf))
                    buf = []
                    state = _EAT_CRNL if ch != "," else _START_FIELD
                else:
                    buf.append(ch)
            elif state == _IN_QUOTED:
                if ch == '"':
                    state = _QUOTE_IN_QUOTED
                else:
                    buf.append(ch)
            elif state == _QUOTE_IN_QUOTED:
                if ch == '"':
                    buf.append(ch)
                    state = _IN_QUOTED
                elif ch in "\r\n" or ch == ",":
                    fields.append("".join(buf))
                    buf = []
                    state = _EAT_CRNL if ch != "," else _START_FIELD
                else:  # non-strict: the quote closed the quoted part, the rest is plain text
                    buf.append(ch)
                    state = _IN_FIELD
            # _EAT_CRNL: only the rest of the line break (\n of \r\n) can follow; nothing to do.
        # End of the line.
        if state in (_START_FIELD, _IN_FIELD, _QUOTE_IN_QUOTED):  # the last line, with no line break
            fields.append("".join(buf))
            buf = []
            state = _START_RECORD
        elif state == _EAT_CRNL:
            state = _START_RECORD
        if state == _START_RECORD:
            records.append(Record(rec_line, tuple(fields), text[rec_start:content_end]))
    if state != _START_RECORD:  # a quoted field is open at the end of the text
        fields.append("".join(buf))
        records.append(Record(rec_line, tuple(fields), text[rec_start:], unterminated=True))
    return records, empty


def decode(data: bytes, source_file: str = "") -> str:
    """UTF-8 text of a file; a BOM at byte 0 is dropped."""
    if data.startswith(_BOM):
        data = data[len(_BOM) :]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ReferenceFileError(f"{source_file}: not UTF-8 ({exc})", source_file) from exc


def parse_file(data: bytes, source_file: str = "") -> ParsedFile:
    """Decode and split a file into its header record and data records (file-level errors raise)."""
    records, empty = read_records(decode(data, source_file))
    if not records:
        return ParsedFile(None, [], empty)
    header = records[0]
    if header.unterminated:
        raise ReferenceFileError(f"{source_file}: the header's quoted field is never closed", source_file)
    if len(header.fields) == 1 and any(ch in header.fields[0] for ch in ";\t|"):
        raise ReferenceFileError(
            f"{source_file}: the header is one field with another delimiter: {header.fields[0]!r}",
            source_file,
        )
    return ParsedFile(header, records[1:], empty)


def map_header(table: str, header: tuple[str, ...], source_file: str = "") -> dict[str, int]:
    """Column -> index of the header field naming it (exactly, else ignoring case)."""
    columns = COLUMNS[table]
    folded = {c.casefold(): c for c in columns}
    mapping: dict[str, int] = {}
    for index, raw_name in enumerate(header):
        name = raw_name.strip()
        column = name if name in columns else folded.get(name.casefold())
        if column is None:
            continue
        if column in mapping:
            raise ReferenceFileError(
                f"{source_file}: header fields {mapping[column] + 1} and {index + 1} both name {column}",
                source_file,
            )
        mapping[column] = index
    return mapping


# ----------------------------------------------------------------------------------------- validating

#: Unicode White_Space (not str.strip()'s set, which adds U+001C..U+001F).
WHITE_SPACE = (
    "\t\n\x0b\x0c\r \x85\xa0\u1680"
    + "".join(chr(c) for c in range(0x2000, 0x200B))
    + "\u2028\u2029\u202f\u205f\u3000"
)

_INT_RE = re.compile(r"[+-]?[0-9]+")
_DOUBLE_RE = re.compile(r"[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]+)?")
_TS_RE = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})[T ]([01][0-9]|2[0-3]):([0-5][0-9]):([0-5][0-9])"
    r"(\.[0-9]{1,6})?(Z|\+00:00)?"
)
_DATE_RE = re.compile(r"([0-9]{4})-([0-9]{2})-([0-9]{2})")
_INT_MIN, _INT_MAX = -(2**31), 2**31 - 1


def _calendar_date(y: str, m: str, d: str) -> date | None:
    year = int(y)
    if year < 1:
        return None
    try:
        return date(year, int(m), int(d))
    except ValueError:
        return None


def parse_value(kind: str, text: str) -> tuple[bool, Any]:
    """(True, typed value) or (False, None) for a trimmed, non-empty text of the given type."""
    if kind == "string":
        return True, text
    if kind == "int":
        if not _INT_RE.fullmatch(text):
            return False, None
        if len(text.lstrip("+-").lstrip("0")) > 10:  # also keeps int() clear of its digit limit
            return False, None
        number = int(text)
        return (True, number) if _INT_MIN <= number <= _INT_MAX else (False, None)
    if kind == "double":
        if not _DOUBLE_RE.fullmatch(text):
            return False, None
        value = float(text)
        return (True, value) if math.isfinite(value) else (False, None)
    if kind == "timestamp":
        m = _TS_RE.fullmatch(text)
        if not m:
            return False, None
        day = _calendar_date(m.group(1), m.group(2), m.group(3))
        if day is None:
            return False, None
        fraction = m.group(7)
        micros = int(fraction[1:].ljust(6, "0")) if fraction else 0
        return True, datetime(
            day.year,
            day.month,
            day.day,
            int(m.group(4)),
            int(m.group(5)),
            int(m.group(6)),
            micros,
            tzinfo=timezone.utc,
        )
    if kind == "date":
        m = _DATE_RE.fullmatch(text)
        if not m:
            return False, None
        day = _calendar_date(m.group(1), m.group(2), m.group(3))
        return (False, None) if day is None else (True, day)
    raise ValueError(f"unknown type {kind!r}")


def validate_row(table: str, texts: dict[str, str | None]) -> tuple[Row, list[str]]:
    """Typed values and reject reasons of one well-formed record.

    ``texts`` maps every column to its original text, or None when the file has no such column.
    """
    values: Row = {}
    reasons: list[str] = []
    ranges = OUT_OF_RANGE[table]
    for column, kind in SCHEMAS[table]:
        original = texts.get(column)
        values[column] = None
        if original is None:
            reasons.append(f"missing_column:{column}")
            continue
        text = original.strip(WHITE_SPACE)
        if text == "":
            if column not in NULLABLE[table]:
                reasons.append(f"null:{column}")
            continue
        ok, value = parse_value(kind, text)
        if not ok:
            reasons.append(f"invalid:{column}")
            continue
        values[column] = value
        check = ranges.get(column)
        if check is not None and check(value):
            reasons.append(f"range:{column}")
    if "date" in values and "order_timestamp" in values:
        day, stamp = values["date"], values["order_timestamp"]
        if day is not None and stamp is not None and day != stamp.astimezone(timezone.utc).date():
            reasons.append("date_mismatch")
    return values, reasons


# ------------------------------------------------------------------------------------------- batching


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class _Candidate:
    order: tuple[int, int]  # (file index, line): batch order
    source_file: str
    line: int
    texts: dict[str, str | None]
    values: Row
    raw_record: str | None = None


def _reject(table: str, cand: _Candidate, reasons: list[str], batch_id: str) -> Row:
    row: Row = {"table": table}
    for column in COLUMNS[table]:
        row[column] = cand.texts.get(column)
    row["raw_record"] = cand.raw_record
    row["reject_reasons"] = list(reasons)
    row["source_file"] = cand.source_file
    row["source_line"] = cand.line
    row["batch_id"] = batch_id
    return row


def _process_table(
    table: str,
    parsed: list[tuple[str, ParsedFile]],
    lake: Lake,
    batch_id: str,
    counts: TableCounts,
) -> list[Row]:
    columns = COLUMNS[table]
    rejected: list[tuple[tuple[int, int], Row]] = []

    def reject(cand: _Candidate, reasons: list[str]) -> None:
        rejected.append((cand.order, _reject(table, cand, reasons, batch_id)))
        counts.rejected += 1
        counts.rejected_by_reason.update(reasons)

    # Early rules, per record.
    valid: list[_Candidate] = []
    for file_index, (source_file, pf) in enumerate(parsed):
        counts.empty_lines += pf.empty_lines
        if pf.header is None:
            continue
        mapping = map_header(table, pf.header.fields, source_file)
        width = len(pf.header.fields)
        for rec in pf.records:
            counts.rows_in += 1
            order = (file_index, rec.line)
            if rec.unterminated or len(rec.fields) != width:
                blank: dict[str, str | None] = {c: None for c in columns}
                reject(_Candidate(order, source_file, rec.line, blank, {}, rec.raw), ["malformed_row"])
                continue
            texts = {c: (rec.fields[mapping[c]] if c in mapping else None) for c in columns}
            values, reasons = validate_row(table, texts)
            cand = _Candidate(order, source_file, rec.line, texts, values)
            if reasons:
                reject(cand, reasons)
            else:
                valid.append(cand)

    # duplicate_row, then one winner per key.
    seen: set[tuple[Any, ...]] = set()
    winners: dict[int, _Candidate] = {}
    ordering = ORDERING[table]
    key_col = KEYS[table]
    for cand in valid:
        ident = tuple(cand.values[c] for c in columns)
        if ident in seen:
            reject(cand, ["duplicate_row"])
            continue
        seen.add(ident)
        key = cand.values[key_col]
        best = winners.get(key)
        if best is None:
            winners[key] = cand
        elif ordering is None or cand.values[ordering] >= best.values[ordering]:
            reject(best, ["duplicate_key"])
            winners[key] = cand
        else:
            reject(cand, ["duplicate_key"])

    # References, stale rows, then apply.
    target = lake.table(table)
    before = dict(target)
    orders_keys = lake.table("orders")
    products_keys = lake.table("products")
    for key, cand in sorted(winners.items(), key=lambda kv: kv[1].order):
        late: list[str] = []
        if table == "order_items":
            if cand.values["order_id"] not in orders_keys:
                late.append("unknown_order_id")
            if cand.values["product_id"] not in products_keys:
                late.append("unknown_product_id")
        old = before.get(key)
        if ordering is not None and old is not None and old[ordering] > cand.values[ordering]:
            late.append("stale_row")
        if late:
            reject(cand, late)
        elif old is None:
            target[key] = dict(cand.values)
            counts.inserted += 1
        elif old != cand.values:
            target[key] = dict(cand.values)
            counts.updated += 1
        else:
            counts.unchanged += 1

    rejected.sort(key=lambda item: item[0])
    return [row for _, row in rejected]


def run_batch(
    lake: Lake,
    files: dict[str, list[tuple[str, bytes]]],
    batch_id: str,
    loaded_contents: set[str] | None = None,
    force: bool = False,
) -> BatchResult:
    """Run one batch over ``files`` (per table, (source key, bytes) in batch order) on a copy of ``lake``.

    A file whose sha256 is in ``loaded_contents`` is skipped (unless ``force``). A file-level error
    raises :class:`ReferenceFileError` and nothing is returned.
    """
    unknown = set(files) - set(TABLES)
    if unknown:
        raise ValueError(f"unknown tables: {sorted(unknown)}")
    already = set(loaded_contents or ())
    new_lake = copy.deepcopy(lake)
    for t in TABLES:
        new_lake.table(t)
    skipped: list[str] = []
    digests: set[str] = set()
    parsed: dict[str, list[tuple[str, ParsedFile]]] = {}
    # Read every file first: any file-level error aborts the batch before anything is applied.
    for table in TABLES:
        parsed[table] = []
        for source_file, data in files.get(table, []):
            digest = sha256_hex(data)
            digests.add(digest)
            if digest in already and not force:
                skipped.append(source_file)
                continue
            pf = parse_file(data, source_file)
            if pf.header is not None:
                map_header(table, pf.header.fields, source_file)
            parsed[table].append((source_file, pf))
    counts: dict[str, TableCounts] = {}
    batch_rejected: list[Row] = []
    for table in TABLES:
        counts[table] = TableCounts()
        batch_rejected.extend(_process_table(table, parsed[table], new_lake, batch_id, counts[table]))
    new_lake.rejected.extend(batch_rejected)
    return BatchResult(
        lake=new_lake,
        counts=counts,
        skipped_files=skipped,
        loaded_contents=already | digests,
        rejected=batch_rejected,
    )
