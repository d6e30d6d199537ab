"""A generator of dirty batches that owes nothing to ``pipeline.generate``: other shapes, other mistakes.

Each batch is a dict table -> [(raw key, file bytes)]. Files vary in line endings (LF, CRLF, CR),
quoting, BOM, blank lines (also before the header), header case and order, extra and missing
columns, timestamp forms (``T`` or space, fractions, ``Z`` or ``+00:00``), and carry rows that break
every rule: bad numbers, blanks, whitespace-only lines, year 0000, impossible dates, wrong field
counts, a quote left open at the end, duplicates across files, stale rows, unknown references.
A later batch reuses keys of the earlier one (updates, stale rows, renames).
"""

from __future__ import annotations

import csv
import io
import random
from datetime import datetime, timedelta, timezone

HEADERS = {
    "products": ["product_id", "department_id", "department", "product_name"],
    "orders": ["order_num", "order_id", "user_id", "order_timestamp", "total_amount", "date"],
    "order_items": [
        "id",
        "order_id",
        "user_id",
        "days_since_prior_order",
        "product_id",
        "add_to_cart_order",
        "reordered",
        "order_timestamp",
        "date",
    ],
}
BAD_INTS = ["x", "1.5", "", " ", "99999999999", "-0x1", "\u0663"]
BAD_STAMPS = [
    "0000-01-01T00:00:00",
    "2025-02-30T10:00:00",
    "2025-01-01T25:00:00",
    "yesterday",
    "",
    "2025-01-01",
]


def _stamp(rng: random.Random, moment: datetime) -> str:
    form = rng.choice(["%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M:%S"])
    text = moment.strftime(form)
    if rng.random() < 0.2:
        text += f".{moment.microsecond:06d}"[: rng.choice([2, 4, 7])]
    return text + rng.choice(["", "", "Z", "+00:00"])


def _moment(rng: random.Random, day: int) -> datetime:
    start = datetime(2024, 6, 1, tzinfo=timezone.utc)
    return start + timedelta(days=day, seconds=rng.randrange(86_400), microseconds=rng.randrange(1_000_000))


def _spoil(rng: random.Random, row: list[str], table: str) -> list[str]:
    """One mistake in a row: a bad value, a blank, an out-of-range number, a wrong field count."""
    row = list(row)
    kind = rng.choice(["int", "stamp", "blank", "range", "fields", "date", "spaces"])
    ints = [i for i, name in enumerate(HEADERS[table]) if name.endswith("id") or name in ("order_num",)]
    if kind == "int":
        row[rng.choice(ints)] = rng.choice(BAD_INTS)
    elif kind == "stamp" and table != "products":
        row[HEADERS[table].index("order_timestamp")] = rng.choice(BAD_STAMPS)
    elif kind == "date" and table != "products":
        row[-1] = rng.choice(["2025-13-01", "0000-01-01", "2024-06-31", "20240601", row[-1] + " "])
    elif kind == "blank":
        row[rng.randrange(len(row))] = rng.choice(["", "  "])
    elif kind == "range":
        row[rng.choice(ints)] = rng.choice(["0", "-3"])
    elif kind == "fields":
        row = row[:-1] if rng.random() < 0.5 else [*row, "extra"]
    else:
        row[rng.randrange(len(row))] = " " + row[rng.randrange(len(row))] + " "
    return row


def _file(rng: random.Random, table: str, rows: list[list[str]]) -> bytes:
    """Rows written in one of many shapes."""
    header = list(HEADERS[table])
    order = list(range(len(header)))
    if rng.random() < 0.3:
        rng.shuffle(order)
    names = [header[i] for i in order]
    if rng.random() < 0.2:
        names = [name.upper() if rng.random() < 0.5 else name for name in names]
    extra = rng.random() < 0.2
    if extra:
        names.append("comment")
    terminator = rng.choice(["\n", "\r\n", "\r"])
    out = io.StringIO(newline="")
    writer = csv.writer(
        out, lineterminator=terminator, quoting=rng.choice([csv.QUOTE_MINIMAL, csv.QUOTE_ALL])
    )
    if rng.random() < 0.2:
        out.write(terminator * rng.randint(1, 2))  # blank lines before the header
    writer.writerow(names)
    for row in rows:
        if len(row) == len(header):
            shaped = [row[i] for i in order] + (['a, "note"\nover two lines'] if extra else [])
        else:
            shaped = row
        roll = rng.random()
        if roll < 0.02:
            out.write(" \t" + terminator)  # a line of whitespace only
        elif roll < 0.05:
            out.write(terminator)  # a blank line
        writer.writerow(shaped)
    text = out.getvalue()
    if rng.random() < 0.3:
        text = text.rstrip("\r\n")
    data = text.encode()
    return (b"\xef\xbb\xbf" + data) if rng.random() < 0.2 else data


def _split(rng: random.Random, table: str, rows: list[list[str]], prefix: str) -> list[tuple[str, bytes]]:
    files = []
    parts = rng.randint(1, 3)
    size = max(1, len(rows) // parts)
    for index in range(parts):
        chunk = rows[index * size : (index + 1) * size if index < parts - 1 else len(rows)]
        files.append((f"raw/{table}/{prefix}-{index}.csv", _file(rng, table, chunk)))
    if rng.random() < 0.3:  # a file whose last quote is never closed
        open_quote = _file(rng, table, rows[:2]) + b'\n9,9,"never closed\n1,2\n'
        files.append((f"raw/{table}/{prefix}-open.csv", open_quote))
    if rng.random() < 0.2:  # a file lacking a column
        lacking = [name for name in HEADERS[table][:-1]]
        body = "\n".join([",".join(lacking), *(",".join(r[:-1]) for r in rows[:3])])
        files.append((f"raw/{table}/{prefix}-lacking.csv", body.encode()))
    return files


def dirty_batches(seed: int) -> list[dict[str, list[tuple[str, bytes]]]]:
    """Two batches in sequence, the second overlapping the first's keys."""
    rng = random.Random(seed)
    batches = []
    products: dict[int, list[str]] = {}
    orders: dict[int, tuple[list[str], datetime]] = {}
    item_id = 0
    for batch in range(2):
        product_rows, order_rows, item_rows = [], [], []
        for pid in rng.sample(range(1, 40), 25):
            dept = rng.randint(1, 4)
            name = rng.choice(
                ["Milk", "Tea, green", 'The "best" jam', "Brot\u00e9", "  pad  ", 'Big 12" pizza']
            )
            row = [
                str(pid),
                str(dept),
                f"dept {dept}",
                f"{name} {batch if rng.random() < 0.3 else ''}".strip(),
            ]
            products[pid] = row
            product_rows.append(row)
        for _ in range(30):
            oid = rng.randint(1, 50)
            day = rng.randint(0, 5) + batch * 3
            moment = _moment(rng, day)
            if oid in orders and rng.random() < 0.3:
                moment = orders[oid][1] - timedelta(hours=1)  # older than what the lake holds: stale
            date = moment.date().isoformat()
            row = [
                str(rng.randint(1, 9)),
                str(oid),
                str(rng.randint(1, 7)),
                _stamp(rng, moment),
                f"{rng.uniform(0, 90):.2f}",
                date,
            ]
            if rng.random() < 0.05:
                row[-1] = (moment.date() + timedelta(days=1)).isoformat()  # date_mismatch
            orders[oid] = (row, max(moment, orders[oid][1]) if oid in orders else moment)
            order_rows.append(row)
        order_rows += [list(order_rows[i]) for i in rng.sample(range(len(order_rows)), 3)]  # duplicate rows
        for _ in range(60):
            item_id += rng.choice([0, 1, 1, 1])  # a repeated id now and then: duplicate keys
            oid = rng.randint(1, 55)
            moment = orders[oid][1] if oid in orders else _moment(rng, 2)
            row = [
                str(max(1, item_id)),
                str(oid),
                str(rng.randint(1, 7)),
                rng.choice(["", "3", "0", "12"]),
                str(rng.randint(1, 42)),
                str(rng.randint(1, 8)),
                rng.choice(["0", "1"]),
                _stamp(rng, moment),
                moment.date().isoformat(),
            ]
            item_rows.append(row)
        spoiled = {
            "products": [_spoil(rng, r, "products") if rng.random() < 0.12 else r for r in product_rows],
            "orders": [_spoil(rng, r, "orders") if rng.random() < 0.12 else r for r in order_rows],
            "order_items": [_spoil(rng, r, "order_items") if rng.random() < 0.12 else r for r in item_rows],
        }
        batches.append({table: _split(rng, table, rows, f"b{batch}") for table, rows in spoiled.items()})
    return batches
