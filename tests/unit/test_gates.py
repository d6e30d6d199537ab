"""Quality gates: their settings, how they are judged, and what a batch does when one is crossed."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.batch import run_batch
from pipeline.errors import StepError, UsageError
from pipeline.gates import CONFIG_KEY, GateFailedError, GateSettings, judge, known_reasons, parse_settings
from pipeline.manifest import unfinished_manifests
from pipeline.report import load_step_report
from pipeline.specs import TABLES
from pipeline.storage import open_store
from tests.helpers import run_cli, write_raw


def outcomes(results: list) -> list[tuple]:
    return [(r.reason, r.measure, r.level, r.outcome) for r in results]


def test_the_defaults_warn_above_one_percent_and_fail_above_ten() -> None:
    settings = GateSettings()
    assert outcomes(judge(settings, "orders", "b", 100, 1, {})) == [
        (None, "share", "fail", "passed"),
        (None, "share", "warn", "passed"),
    ]
    assert outcomes(judge(settings, "orders", "b", 100, 2, {})) == [
        (None, "share", "fail", "passed"),
        (None, "share", "warn", "warned"),
    ]
    assert [r.outcome for r in judge(settings, "orders", "b", 100, 10, {})] == ["passed", "warned"]
    with pytest.raises(GateFailedError) as failed:
        judge(settings, "orders", "b", 100, 11, {})
    message = str(failed.value)
    assert message.startswith("orders: 11.00% rows rejected, failed: above the fail gate of 10.00%")
    assert "nothing of orders was committed and its files stay in raw/" in message
    assert "--accept-gates" in message and "'b'" in message


def test_share_gates_judge_a_step_of_at_least_min_rows() -> None:
    assert judge(GateSettings(), "orders", "b", 99, 99, {}) == []  # a share of a few rows says little
    assert [r.outcome for r in judge(GateSettings(min_rows=0), "orders", "b", 0, 0, {})] == ["passed"] * 2
    with pytest.raises(GateFailedError):
        judge(GateSettings(min_rows=0), "orders", "b", 3, 3, {})
    counted = parse_settings("[gates]\nfail_count = 2\n", "f")
    with pytest.raises(GateFailedError, match="orders: 3 rows rejected, failed: above the fail gate of 2"):
        judge(counted, "orders", "b", 3, 3, {})  # count gates judge every step
    assert parse_settings("[gates]\nmin_rows = 0\n", "f").min_rows == 0


def test_an_accepted_batch_lands_and_says_so() -> None:
    accepted = GateSettings(accept=True)
    assert [r.outcome for r in judge(accepted, "orders", "b", 100, 50, {})] == ["accepted", "warned"]
    by_id = GateSettings(accept_batches=("b",))
    assert [r.outcome for r in judge(by_id, "orders", "b", 100, 50, {})] == ["accepted", "warned"]
    with pytest.raises(GateFailedError):
        judge(by_id, "orders", "another", 100, 50, {})
    assert judge(accepted, "orders", "b", 100, 50, {})[0].sentence() == (
        "orders: 50.00% rows rejected, accepted although above the fail gate of 10.00%"
    )


def test_reason_and_table_gates_from_the_file() -> None:
    settings = parse_settings(
        """
        [gates]
        warn_percent = 2
        [gates.reasons.unknown_order_id]
        warn_count = 0
        [gates.tables.order_items]
        fail_percent = 50
        [gates.tables.order_items.reasons.unknown_order_id]
        fail_count = 3
        """,
        "lakehouse.toml",
    )
    items = judge(settings, "order_items", "b", 100, 20, {"unknown_order_id": 3, "date_mismatch": 17})
    assert outcomes(items) == [
        (None, "share", "fail", "passed"),  # 20% is within the table's own 50%
        (None, "share", "warn", "warned"),
        ("unknown_order_id", "count", "fail", "passed"),  # 3 is not above 3
        ("unknown_order_id", "count", "warn", "warned"),
    ]
    with pytest.raises(GateFailedError, match=r"order_items: 4 rows rejected for unknown_order_id, failed"):
        judge(settings, "order_items", "b", 100, 20, {"unknown_order_id": 4})
    # Other tables keep every table's gates: 10% fails orders.
    with pytest.raises(GateFailedError, match=r"orders: 11\.00% rows rejected"):
        judge(settings, "orders", "b", 100, 11, {})


def test_the_command_line_overrides_the_file() -> None:
    settings = parse_settings("[gates]\nfail_percent = 50\n", "f").with_limits(
        fail_percent=5, warn_percent=None
    )
    with pytest.raises(GateFailedError):
        judge(settings, "orders", "b", 100, 6, {})


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("[gate]\nfail_percent = 1", "unknown section(s) gate"),
        ("[gates]\nfail_precent = 1", "f [gates]: unknown key(s) fail_precent; the keys are"),
        ("[gates]\nfail_percent = 101", "fail_percent must be 0 to 100, not 101"),
        ("[gates]\nwarn_count = -1", "warn_count must be 0 or more, not -1"),
        ("[gates]\nwarn_count = '5'", "warn_count must be a number, not '5'"),
        ("[gates]\nwarn_count = true", "warn_count must be a number, not True"),
        ("[gates.tables.order]\nfail_percent = 1", "[gates.tables]: unknown key(s) order"),
        ("[gates.tables.orders]\nfail_percnt = 1", "[gates.tables.orders]: unknown key(s) fail_percnt"),
        ("[gates.reasons.unknown_id]\nfail_count = 1", "[gates.reasons]: unknown key(s) unknown_id"),
        (
            "[gates.tables.products.reasons.unknown_order_id]\nfail_count = 1",
            "[gates.tables.products.reasons]: unknown key(s) unknown_order_id",
        ),
        ("[gates]\naccept_batches = 'b'", "accept_batches must be a list of batch ids"),
        ("[gates]\nmin_rows = 1.5", "min_rows must be a whole number, 0 or more, not 1.5"),
        ("[gates\n", "f is not valid TOML"),
    ],
)
def test_a_mistake_in_the_file_is_an_error_that_names_it(text: str, complaint: str) -> None:
    with pytest.raises(UsageError) as raised:
        parse_settings(text, "f")
    assert complaint in str(raised.value)


def test_known_reasons_are_those_the_rules_give() -> None:
    assert known_reasons(TABLES["products"]) >= {"malformed_row", "invalid:product_id", "range:department_id"}
    assert "date_mismatch" not in known_reasons(TABLES["products"])
    assert {"unknown_order_id", "stale_row", "null:order_timestamp"} <= known_reasons(TABLES["order_items"])
    assert "null:days_since_prior_order" not in known_reasons(TABLES["order_items"])


def dirty_orders(root: Path, bad: int, good: int = 10, gates: str = "") -> None:
    """A batch whose orders are ``bad`` rows with a negative amount among ``good`` valid ones, and a
    ``lakehouse.toml`` whose share gates judge so few rows."""
    (root / CONFIG_KEY).write_text("[gates]\nmin_rows = 0\n" + gates)
    write_raw(root, "products", "p.csv", "5,2,Books,Novel")
    rows = [f"{n},{10 + n},7,2025-04-01T11:27:00,12.50,2025-04-01" for n in range(1, good + 1)]
    rows += [f"{n},{10 + n},7,2025-04-01T11:27:00,-1,2025-04-01" for n in range(good + 1, good + bad + 1)]
    write_raw(root, "orders", "o.csv", *rows)
    write_raw(root, "order_items", "i.csv", "1,11,7,,5,1,0,2025-04-01T11:27:00,2025-04-01")


def test_a_failed_gate_commits_nothing_of_its_table_and_keeps_the_files(root: Path) -> None:
    dirty_orders(root, bad=2)  # 2 of 12: 16.7%
    with pytest.raises(StepError) as failed:
        run_batch(open_store(str(root)))
    batch_id = unfinished_manifests(open_store(str(root)))[0].batch_id
    assert str(failed.value) == (
        "step orders failed: orders: 16.67% rows rejected, failed: above the fail gate of 10.00%; nothing "
        "of orders was committed and its files stay in raw/: fix the export and run again, or land it "
        f"anyway with `lakehouse run --accept-gates` (or add {batch_id!r} "
        "to accept_batches in lakehouse.toml)"
    )
    assert not (root / "lakehouse-dwh" / "orders").exists()
    assert not (root / "rejected" / "orders").exists()
    assert (root / "raw" / "orders" / "o.csv").exists()
    # The same export fails the same way; accepted, the very batch lands.
    with pytest.raises(StepError, match="failed: above the fail gate"):
        run_batch(open_store(str(root)))
    assert unfinished_manifests(open_store(str(root)))[0].batch_id == batch_id
    report = run_batch(open_store(str(root)), accept_gates=True)
    assert report.batch_id == batch_id and report.status == "succeeded"
    orders = next(step for step in report.steps if step.table == "orders")
    assert (orders.inserted, orders.rejected) == (10, 2)
    assert [(g["level"], g["outcome"]) for g in orders.gates] == [("fail", "accepted"), ("warn", "warned")]
    assert not (root / "raw" / "orders" / "o.csv").exists()


def test_a_batch_listed_in_the_file_is_accepted(root: Path) -> None:
    dirty_orders(root, bad=5)
    with pytest.raises(StepError):
        run_batch(open_store(str(root)))
    batch_id = unfinished_manifests(open_store(str(root)))[0].batch_id
    (root / CONFIG_KEY).write_text(f'[gates]\nmin_rows = 0\naccept_batches = ["{batch_id}"]\n')
    assert run_batch(open_store(str(root))).status == "succeeded"
    step = load_step_report(open_store(str(root)), batch_id, "orders")
    assert step is not None and step.gates[0]["outcome"] == "accepted"


def run_captured(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    """``lakehouse ARGS``: its exit code and what it printed (stdout and stderr)."""
    code = run_cli(*args)
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_warnings_reach_the_summary_and_the_report(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dirty_orders(root, bad=2, gates="[gates.tables.orders]\nfail_percent = 50\n")
    code, output = run_captured(capsys, "run", "--root", str(root))
    assert code == 0, output
    assert "gate: orders: 16.67% rows rejected, warning: above the warn gate of 1.00%" in output


def test_the_command_line_sets_the_gates_of_a_run(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dirty_orders(root, bad=1, good=30)  # 3.2%
    code, output = run_captured(capsys, "run", "--root", str(root), "--fail-percent", "3")
    assert code == 1
    assert "orders: 3.23% rows rejected, failed: above the fail gate of 3.00%" in " ".join(output.split())
    assert run_captured(capsys, "run", "--root", str(root), "--fail-percent", "300")[0] == 2
    assert run_captured(capsys, "run", "--root", str(root), "--accept-gates")[0] == 0
