"""The lakehouse command as a user meets it: help, summaries, and one-sentence errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

from pipeline import delta
from pipeline.batch import rejected_uri, table_uri
from pipeline.storage import open_store
from tests.helpers import run_cli


@pytest.mark.parametrize(
    "command",
    [
        *("generate", "run", "step", "stage plan", "stage run", "stage finish"),
        *("query", "unlock", "abandon", "cost", "history"),
    ],
)
def test_every_command_has_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(*command.split(), "--help") == 0
    assert "--root" in capsys.readouterr().out


def test_generate_run_and_query(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli("generate", "--root", str(root), "--scale", "0.001", "--seed", "1") == 0
    assert run_cli("run", "--root", str(root)) == 0
    output = capsys.readouterr().out
    assert "rows per table" in output and "order_items" in output and "succeeded" in output
    assert run_cli("query", "--root", str(root), "SELECT COUNT(*) AS n, 'marker' AS m FROM orders") == 0
    printed = capsys.readouterr().out
    assert "marker" in printed
    stored = delta.count_rows(table_uri(open_store(str(root)), "orders"))
    assert f" {stored} " in printed
    assert run_cli("query", "--root", str(root), "SELECT COUNT(*) AS bad FROM rejected_order_items") == 0
    rejected = pl.read_delta(rejected_uri(open_store(str(root)), "order_items")).height
    assert f" {rejected} " in capsys.readouterr().out
    assert run_cli("query", "--root", str(root), "SELECT * FROM nowhere") == 1
    error = capsys.readouterr().err
    assert "query failed" in error and "Traceback" not in error


def test_a_batch_prints_its_cost_and_cost_reprices_it_at_another_task_size(
    root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from pipeline.report import batch_history, load_report

    assert run_cli("cost", "--root", str(root)) == 1
    assert "no batch has finished" in capsys.readouterr().err
    assert run_cli("generate", "--root", str(root), "--scale", "0.001", "--seed", "1") == 0
    assert run_cli("run", "--root", str(root)) == 0
    store = open_store(str(root))
    report = load_report(store, batch_history(store, 1)[0].batch_id)
    assert report is not None
    assert f"cost on AWS: ${report.cost['usd']:.4f}" in capsys.readouterr().out
    assert run_cli("cost", "--root", str(root), "--cpu", "1024", "--memory", "2048", "--crawls", "1") == 0
    printed = " ".join(capsys.readouterr().out.split())
    # Three steps of well under 30 s: a minute each at 1 vCPU and 2 GB, and one crawl of ten minutes.
    fargate = 3 * 60 * (1 * 0.03238 + 2 * 0.00356 + 1 * 0.000111) / 3600
    assert f"fargate ${fargate:.4f}" in printed and "crawler $0.0733" in printed
    assert "1 vCPU / 2 GB" in printed and "Glue Spark" in printed
    assert run_cli("cost", "--root", str(root), "--runner", "gleu") == 1
    assert "--runner must be fargate or glue" in capsys.readouterr().err
    assert run_cli("cost", "--root", str(root), "--batch", "nope") == 1
    assert "batch nope has no report" in capsys.readouterr().err


@pytest.mark.parametrize("budget", ["3GiB", "512KiB"])  # one step at once, and staged
def test_every_commit_names_its_batch_and_history_lists_them(
    tmp_path: Path, budget: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from pipeline.generate import generate, generate_next_day
    from pipeline.report import batch_history

    store = open_store(str(tmp_path))
    generate(store, scale=0.002, seed=5)
    assert run_cli("run", "--root", str(tmp_path), "--memory-budget", budget) == 0
    generate_next_day(store, scale=0.002, seed=5)
    assert run_cli("run", "--root", str(tmp_path), "--memory-budget", budget) == 0
    batches = sorted(line.batch_id for line in batch_history(store, 10))
    for name in ("products", "orders", "order_items"):
        for uri in (table_uri(store, name), rejected_uri(store, name)):
            commits = delta.history(uri)
            assert [c.version for c in commits] == list(range(len(commits) - 1, -1, -1))
            assert {c.batch_id for c in commits} == set(batches), uri  # every commit names its batch
            assert commits[-1].operation == "WRITE" and commits[-1].files_added > 0
    orders = delta.history(table_uri(store, "orders"))
    next_day = [c for c in orders if c.batch_id == batches[1]]
    assert sum(c.rows.get("updated", 0) for c in next_day) > 0  # the corrections
    capsys.readouterr()
    assert run_cli("history", "orders", "--root", str(tmp_path), "--limit", "1") == 0
    printed = capsys.readouterr().out
    assert batches[1] in printed and batches[0] not in printed and "updated" in printed
    assert run_cli("history", "order", "--root", str(tmp_path)) == 1
    assert "the tables are products, orders, order_items, rejected_products" in capsys.readouterr().err


def test_missing_dataset_is_one_sentence_and_exit_1(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli("run", "--root", str(root)) == 1
    error = capsys.readouterr().err
    assert "no batch started" in error and "raw/products/" in error
    assert "Traceback" not in error


def test_unknown_table_is_a_clear_error(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli("step", "customers", "--root", str(root), "--manifest", "x") == 1
    assert "unknown table 'customers'" in capsys.readouterr().err


def test_bad_root_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli("run", "--root", "gs://bucket") == 1
    assert "neither a local folder nor an s3:// URL" in capsys.readouterr().err


def test_python_dash_m_pipeline_works() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "pipeline", "--help"], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0 and "generate" in done.stdout


def test_a_typo_is_a_usage_error_without_a_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli("rn", "--root", "x") == 2
    error = capsys.readouterr().err
    assert "No such command 'rn'" in error and "Traceback" not in error


def test_abandon_and_unlock_say_what_they_did(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli("unlock", "--root", str(root)) == 0
    assert "is not locked" in capsys.readouterr().out
    assert run_cli("abandon", "nothing", "--root", str(root)) == 1
    assert "no manifest at" in capsys.readouterr().err


def test_a_small_memory_budget_stages_the_step_and_loads_the_same_rows(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    roots = {budget: tmp_path / budget for budget in ("3GiB", "512KiB")}
    for budget, root in roots.items():
        assert run_cli("generate", "--root", str(root), "--scale", "0.001", "--seed", "4") == 0
        assert run_cli("run", "--root", str(root), "--memory-budget", budget) == 0
    counts = {
        budget: {
            name: delta.count_rows(table_uri(open_store(str(root)), name))
            for name in ("products", "orders", "order_items")
        }
        for budget, root in roots.items()
    }
    assert counts["512KiB"] == counts["3GiB"] and counts["3GiB"]["order_items"] > 0
    assert run_cli("run", "--root", str(tmp_path / "x"), "--memory-budget", "lots") == 2
    assert "--memory-budget" in capsys.readouterr().err
