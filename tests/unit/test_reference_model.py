"""Self-tests of the plain-Python reference model (tests/reference.py), with hand-computed expectations."""

from __future__ import annotations

import copy
import csv
import io
import random
from datetime import date, datetime, timezone

import pytest

from tests.reference import (
    BatchResult,
    Lake,
    ReferenceFileError,
    read_records,
    run_batch,
    sha256_hex,
)

P_HEADER = "product_id,department_id,department,product_name"
O_HEADER = "order_num,order_id,user_id,order_timestamp,total_amount,date"
I_HEADER = (
    "id,order_id,user_id,days_since_prior_order,product_id,add_to_cart_order,reordered,order_timestamp,date"
)


def _csv(header: str, *rows: str) -> bytes:
    return ("\n".join((header, *rows)) + "\n").encode()


def _order(oid: int, hour: int = 10, amount: str = "1.5") -> str:
    return f"1,{oid},7,2024-01-01T{hour:02d}:00:00,{amount},2024-01-01"


def _item(iid: int, oid: int, pid: int, hour: int = 10) -> str:
    return f"{iid},{oid},7,,{pid},1,0,2024-01-01T{hour:02d}:00:00,2024-01-01"


def _reasons(result: BatchResult, table: str) -> dict[tuple[str, int], list[str]]:
    return {
        (r["source_file"], r["source_line"]): r["reject_reasons"]
        for r in result.rejected
        if r["table"] == table
    }


def _utc(hour: int, micro: int = 0) -> datetime:
    return datetime(2024, 1, 1, hour, 0, 0, micro, tzinfo=timezone.utc)


# ------------------------------------------------------------------------------------------- scanner


def _csv_module(text: str) -> tuple[list[tuple[int, tuple[str, ...]]], int]:
    reader = csv.reader(io.StringIO(text, newline=""))
    out, empty, previous = [], 0, 0
    for fields in reader:
        if fields:
            out.append((previous + 1, tuple(fields)))
        else:
            empty += 1
        previous = reader.line_num
    return out, empty


def test_scanner_matches_the_csv_module() -> None:
    rng = random.Random(7)
    alphabet = ["a", ",", '"', '""', "\r", "\n", "\r\n", " "]
    texts = ['a,"b\r\nc",d\r\n\r\n"x""y"z,\n', '"ab"c,d"e\n', "\n\n,\n", '"a\n\n"\n']
    texts += ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12))) for _ in range(1500)]
    for text in texts:
        records, empty = read_records(text)
        assert ([(r.line, r.fields) for r in records], empty) == _csv_module(text), repr(text)


def test_scanner_flags_an_open_quote_at_end_of_file() -> None:
    records, _ = read_records('a,b\n"x\ny,"",z\n')
    assert [(r.line, r.unterminated) for r in records] == [(1, False), (2, True)]
    assert records[1].raw == '"x\ny,"",z\n'
    records, _ = read_records('a,"b"')  # closed exactly at the end: fine
    assert [(r.fields, r.unterminated) for r in records] == [(("a", "b"), False)]


# ------------------------------------------------------------------------------------------ reading


def test_line_numbers_with_crlf_lone_cr_quoted_breaks_and_blank_lines() -> None:
    text = (
        "\n"  # 1
        "\r\n"  # 2
        f"{P_HEADER}\r\n"  # 3
        "1,2,a,b\r"  # 4
        '3,4,"x\ny",c,extra\n'  # 5-6: malformed (5 fields)
        "\n"  # 7
        '7,8,g,"multi\r\nline"\r'  # 8-9
        "5,6,e,f"  # 10, no final line break
    )
    result = run_batch(Lake(), {"products": [("raw/products/a.csv", b"\xef\xbb\xbf" + text.encode())]}, "b1")
    c = result.counts["products"]
    assert (c.rows_in, c.inserted, c.rejected, c.empty_lines) == (4, 3, 1, 3)
    (bad,) = result.rejected
    assert bad["source_line"] == 5
    assert bad["raw_record"] == '3,4,"x\ny",c,extra'
    assert bad["reject_reasons"] == ["malformed_row"]
    assert bad["product_id"] is None and bad["product_name"] is None
    products = result.lake.tables["products"]
    assert sorted(products) == [1, 5, 7]
    assert products[7] == {
        "product_id": 7,
        "department_id": 8,
        "department": "g",
        "product_name": "multi\r\nline",
    }


def test_open_quote_at_end_of_file() -> None:
    data = f'{P_HEADER}\n1,2,a,b\n2,3,"open,x\nmore\n'.encode()
    result = run_batch(Lake(), {"products": [("p.csv", data)]}, "b1")
    c = result.counts["products"]
    assert (c.rows_in, c.inserted, c.rejected) == (2, 1, 1)
    (bad,) = result.rejected
    assert (bad["source_line"], bad["raw_record"], bad["reject_reasons"]) == (
        3,
        '2,3,"open,x\nmore\n',
        ["malformed_row"],
    )
    with pytest.raises(ReferenceFileError):
        run_batch(Lake(), {"products": [("p.csv", b'product_id,"department_id\n1,2\n')]}, "b1")


def test_header_mapping_missing_columns_and_extras() -> None:
    data = b" PRODUCT_ID ,Department_Id,extra,department\n1,2,zzz, d \n"
    result = run_batch(Lake(), {"products": [("p.csv", data)]}, "b1")
    (bad,) = result.rejected
    assert bad["reject_reasons"] == ["missing_column:product_name"]
    assert (bad["product_id"], bad["department"], bad["product_name"]) == ("1", " d ", None)
    assert result.counts["products"].rejected_by_reason == {"missing_column:product_name": 1}


@pytest.mark.parametrize(
    "data",
    [
        b"id,order_id,Order_ID\n1,2,3\n",
        b"product_id;department_id;department;product_name\n1;2;a;b\n",
        b"product_id\tdepartment_id\n",
        b"product_id|department_id\n",
        P_HEADER.encode() + b"\n1,2,a,\xff\n",
    ],
)
def test_file_errors_abort_the_batch(data: bytes) -> None:
    lake = run_batch(Lake(), {"products": [("p0.csv", _csv(P_HEADER, "1,1,d,x"))]}, "b0").lake
    before = copy.deepcopy(lake)
    files = {"products": [("ok.csv", _csv(P_HEADER, "2,1,d,x"))], "order_items": [("bad.csv", data)]}
    with pytest.raises(ReferenceFileError):
        run_batch(lake, files, "b1")
    assert lake == before


def test_files_without_records() -> None:
    files = {
        "products": [("a.csv", b""), ("b.csv", b"\n\r\n\r"), ("c.csv", b"\xef\xbb\xbf" + P_HEADER.encode())]
    }
    c = run_batch(Lake(), files, "b1").counts["products"]
    assert (c.rows_in, c.rejected, c.empty_lines) == (0, 0, 3)


# -------------------------------------------------------------------------------------------- values


def test_row_reasons_and_values() -> None:
    rows = [
        "1,10,7,2024-01-01T10:00:00,1.5,2024-01-01",  # 2 valid
        ",11,7,2024-01-01 10:00:00,1.5,2024-01-01",  # 3
        "x,12,7,2024-01-01T10:00:00,1.5,2024-01-01",  # 4
        "1,0,-3,2024-01-01T10:00:00,-0.5,2024-01-01",  # 5
        "1,13,7,2024-01-01T23:59:59Z,1,2024-01-02",  # 6
        "1,14,7,2024-02-30T00:00:00,1e400,0000-01-01",  # 7
        "2147483648,15,7,2024-01-01T24:00:00,abc,2024-1-01",  # 8
        " 2147483647 ,\u00a016\u3000,+7,2024-01-01 10:00:00.5+00:00,.5e1,2024-01-01",  # 9 valid
        "\x1c1,17,7,2024-01-01T10:00:00,1,2024-01-01",  # 10
        "1,18,7,2024-01-01T10:00:00,1e-400,2024-01-01",  # 11 valid
        "1,19,7,2024-01-01T10:00:00+01:00,1,2024-01-01",  # 12
        "1,20,7,2024-01-01T10:00:00,1,2024-01-01,extra",  # 13 malformed
    ]
    result = run_batch(Lake(), {"orders": [("o.csv", _csv(O_HEADER, *rows))]}, "b1")
    assert _reasons(result, "orders") == {
        ("o.csv", 3): ["null:order_num"],
        ("o.csv", 4): ["invalid:order_num"],
        ("o.csv", 5): ["range:order_id", "range:user_id", "range:total_amount"],
        ("o.csv", 6): ["date_mismatch"],
        ("o.csv", 7): ["invalid:order_timestamp", "invalid:total_amount", "invalid:date"],
        ("o.csv", 8): [
            "invalid:order_num",
            "invalid:order_timestamp",
            "invalid:total_amount",
            "invalid:date",
        ],
        ("o.csv", 10): ["invalid:order_num"],
        ("o.csv", 12): ["invalid:order_timestamp"],
        ("o.csv", 13): ["malformed_row"],
    }
    c = result.counts["orders"]
    assert (c.rows_in, c.inserted, c.rejected) == (12, 3, 9)
    assert c.rejected_by_reason["invalid:order_num"] == 3
    assert c.rejected_by_reason["invalid:total_amount"] == 2
    orders = result.lake.tables["orders"]
    assert orders[16] == {
        "order_num": 2147483647,
        "order_id": 16,
        "user_id": 7,
        "order_timestamp": _utc(10, 500000),
        "total_amount": 5.0,
        "date": date(2024, 1, 1),
    }
    assert orders[18]["total_amount"] == 0.0
    five = next(r for r in result.rejected if r["source_line"] == 5)
    assert five == {
        "table": "orders",
        "order_num": "1",
        "order_id": "0",
        "user_id": "-3",
        "order_timestamp": "2024-01-01T10:00:00",
        "total_amount": "-0.5",
        "date": "2024-01-01",
        "raw_record": None,
        "reject_reasons": ["range:order_id", "range:user_id", "range:total_amount"],
        "source_file": "o.csv",
        "source_line": 5,
        "batch_id": "b1",
    }
    nine = next(r for r in result.rejected if r["source_line"] == 8)
    assert nine["order_num"] == "2147483648"


def test_order_item_ranges() -> None:
    files = {
        "products": [("p.csv", _csv(P_HEADER, "1,1,d,x"))],
        "orders": [("o.csv", _csv(O_HEADER, _order(10)))],
        "order_items": [
            (
                "i.csv",
                _csv(
                    I_HEADER,
                    "1,10,7, ,1,1,1,2024-01-01T10:00:00,2024-01-01",  # 2 valid (days null)
                    "2,10,7,-1,1,0,2,2024-01-01T10:00:00,2024-01-01",  # 3
                    "0,10,7,3,0,1,0,2024-01-01T10:00:00,2024-01-01",  # 4
                ),
            )
        ],
    }
    result = run_batch(Lake(), files, "b1")
    assert _reasons(result, "order_items") == {
        ("i.csv", 3): ["range:days_since_prior_order", "range:add_to_cart_order", "range:reordered"],
        ("i.csv", 4): ["range:id", "range:product_id"],
    }
    assert result.lake.tables["order_items"][1]["days_since_prior_order"] is None


# --------------------------------------------------------------------------------------------- batch


def test_duplicates_and_winners() -> None:
    files = {
        "products": [("p.csv", _csv(P_HEADER, "1,1,d,x", "1,1,d,y", "1,1,d,x"))],
        "orders": [
            ("a.csv", _csv(O_HEADER, _order(1, 10, "1"), _order(1, 10, "1"), _order(1, 12, "2"))),
            ("b.csv", _csv(O_HEADER, _order(1, 11, "3"), _order(2, 10, "1"))),
            ("c.csv", _csv(O_HEADER, _order(2, 10, "2"), _order(1, 10, "1"))),
        ],
    }
    result = run_batch(Lake(), files, "b1")
    assert _reasons(result, "products") == {("p.csv", 2): ["duplicate_key"], ("p.csv", 4): ["duplicate_row"]}
    assert result.lake.tables["products"][1]["product_name"] == "y"
    assert _reasons(result, "orders") == {
        ("a.csv", 2): ["duplicate_key"],
        ("a.csv", 3): ["duplicate_row"],
        ("b.csv", 2): ["duplicate_key"],
        ("b.csv", 3): ["duplicate_key"],  # a tie on order_timestamp: the later row wins
        ("c.csv", 3): ["duplicate_row"],
    }
    orders = result.lake.tables["orders"]
    assert (orders[1]["total_amount"], orders[1]["order_timestamp"]) == (2.0, _utc(12))
    assert orders[2]["total_amount"] == 2.0
    c = result.counts["orders"]
    assert (c.rows_in, c.inserted, c.rejected) == (7, 2, 5)
    assert c.rejected_by_reason == {"duplicate_key": 3, "duplicate_row": 2}


def test_stale_rows_updates_and_unchanged() -> None:
    first = run_batch(
        Lake(), {"orders": [("o1.csv", _csv(O_HEADER, _order(1, 12), _order(2), _order(3)))]}, "b1"
    )
    files = {"orders": [("o2.csv", _csv(O_HEADER, _order(1, 11), _order(2), _order(3, 10, "9"), _order(4)))]}
    second = run_batch(first.lake, files, "b2", first.loaded_contents)
    c = second.counts["orders"]
    assert (c.rows_in, c.inserted, c.updated, c.unchanged, c.rejected) == (4, 1, 1, 1, 1)
    assert _reasons(second, "orders") == {("o2.csv", 2): ["stale_row"]}
    assert second.lake.tables["orders"][1]["order_timestamp"] == _utc(12)
    assert second.lake.tables["orders"][3]["total_amount"] == 9.0
    assert first.lake.tables["orders"][3]["total_amount"] == 1.5  # the input lake is not mutated
    assert len(second.lake.rejected) == 1 and second.lake.rejected[0]["batch_id"] == "b2"


def test_orphan_references() -> None:
    first = run_batch(
        Lake(),
        {
            "products": [("p1.csv", _csv(P_HEADER, "1,1,d,x"))],
            "orders": [("o1.csv", _csv(O_HEADER, _order(10)))],
            "order_items": [("i1.csv", _csv(I_HEADER, _item(5, 10, 1, 12)))],
        },
        "b1",
    )
    files = {
        "products": [("p2.csv", _csv(P_HEADER, "2,1,d,y"))],
        "orders": [("o2.csv", _csv(O_HEADER, _order(20), _order(30, 10, "-1")))],  # 30 is rejected
        "order_items": [
            (
                "i2.csv",
                _csv(
                    I_HEADER,
                    _item(1, 10, 1),
                    _item(2, 20, 2),
                    _item(3, 30, 1),
                    _item(4, 10, 3),
                    _item(5, 99, 99, 11),
                ),
            )
        ],
    }
    second = run_batch(first.lake, files, "b2")
    assert _reasons(second, "order_items") == {
        ("i2.csv", 4): ["unknown_order_id"],
        ("i2.csv", 5): ["unknown_product_id"],
        ("i2.csv", 6): ["unknown_order_id", "unknown_product_id", "stale_row"],
    }
    c = second.counts["order_items"]
    assert (c.rows_in, c.inserted, c.rejected) == (5, 2, 3)
    assert sorted(second.lake.tables["order_items"]) == [1, 2, 5]


def test_chaining_skipped_files_and_force() -> None:
    p1 = _csv(P_HEADER, "1,1,d,x")
    p2 = _csv(P_HEADER, "2,1,d,y", "", "1,1,d,z")
    first = run_batch(Lake(), {"products": [("raw/products/a.csv", p1)]}, "b1")
    assert first.loaded_contents == {sha256_hex(p1)}
    files = {"products": [("raw/products/b.csv", p1), ("raw/products/c.csv", p2)]}
    second = run_batch(first.lake, files, "b2", first.loaded_contents)
    assert second.skipped_files == ["raw/products/b.csv"]
    assert second.loaded_contents == {sha256_hex(p1), sha256_hex(p2)}
    c = second.counts["products"]
    assert (c.rows_in, c.inserted, c.updated, c.empty_lines) == (2, 1, 1, 1)
    third = run_batch(second.lake, files, "b3", second.loaded_contents)
    assert third.skipped_files == ["raw/products/b.csv", "raw/products/c.csv"]
    assert third.counts["products"].rows_in == 0
    forced = run_batch(second.lake, files, "b4", second.loaded_contents, force=True)
    c = forced.counts["products"]
    assert forced.skipped_files == []
    # b.csv's 1,x loses the key to c.csv's later 1,z (unchanged); 2,y unchanged.
    assert (c.rows_in, c.inserted, c.updated, c.unchanged, c.rejected) == (3, 0, 0, 2, 1)
    assert forced.lake.tables["products"][1]["product_name"] == "z"
